"""Preflight: what `python -m dataflow.run` checks before it starts the dataflow.

A pipeline that starts against a missing topic, an unreachable Redis or wrong credentials
fails later, deep inside Bytewax, with a traceback that names neither the setting nor its
value. These checks run first, in this order, and stop at the first failure with
`PreflightError`: one line, `VARIABLE=value: what is wrong` (secrets masked), which
`dataflow.run` prints and turns into exit status 3.

1. **Kafka** (`KAFKA_BROKERS`): a broker answers a metadata request for all topics (such a
   request never auto-creates a topic), logged in with `KAFKA_SASL_*` over verified TLS
   for `SASL_SSL`/`SSL` (`KAFKA_SSL_CA_LOCATION`): refused credentials and an untrusted
   certificate each get their own line, within a second or two rather than at the end of
   the timeout; every `KAFKA_TOPICS` topic is listed. A missing
   input topic is an error naming it: the pipeline never creates its input, and reading a
   missing topic by name would let a broker with `auto.create.topics.enable` create it
   with whatever defaults it has.
2. **Redis** (`REDIS_URL`): answers `PING` on an authenticated connection (the URL's user,
   the password, the database), over verified TLS for `rediss://` (`REDIS_CA_FILE`). Wrong
   credentials and an untrusted or misnamed server certificate each get their own line.
3. **OpenSearch** (`OPENSEARCH_URL`, when set): answers (for `https://`, with a
   certificate that verifies against `OPENSEARCH_CA_FILE`), accepts the login
   (`OPENSEARCH_USERNAME`, HTTP 401 otherwise) and lets this user look up and set up the
   sink's aliases (HTTP 403 otherwise, the alias named), which exist or are created, with
   the fields it writes (`IndexAdmin.ensure`, what the sink does before its first write);
   `OPENSEARCH_DOCS_INDEX`, when set, exists with them (`IndexAdmin.verify`). The first
   request only looks, so refused credentials create nothing here.
4. **Dead-letter topic** (`KAFKA_DLQ_TOPIC`): exists, or is created here with the broker's
   default partitions and replication, on purpose and said so in a WARNING line. Last, so
   that a pipeline with bad Redis or OpenSearch credentials creates nothing in Kafka.

No message carries a secret: URLs are shown with the password masked, and the errors of
the clients (which never contain the password) are quoted as they are.

The checks use the pipeline's own clients: `BrokerOffsets` (the admin client of
`dataflow.kafka.source`), `ensure_topics`, redis-py as the sink builds it and
`IndexAdmin`. While they run, librdkafka and the HTTP libraries print nothing of their own:
a failure is reported once, by the check's line.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import redis
from confluent_kafka import KafkaError, KafkaException
from opensearchpy import (
    AuthenticationException,
    AuthorizationException,
    OpenSearchException,
    TransportError,
)
from opensearchpy import ConnectionError as OSConnectionError

from dataflow import settings as s
from dataflow.config import Config, KafkaSettings, OpenSearchSettings, RedisSettings
from dataflow.errors import IndexMappingError, PipelineError, PreflightError
from dataflow.kafka.segments import StateTopicError, ensure_state_topic
from dataflow.kafka.source import BrokerOffsets
from dataflow.kafka.topics import ensure_topics
from dataflow.opensearch.index import IndexAdmin, client_for
from dataflow.opensearch.updates import specs_for
from dataflow.sinks.redis import connect

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0
# Loggers of the HTTP libraries under opensearch-py: they log every failed request (with a
# traceback for a refused connection), which the check reports itself.
_HTTP_LOGGERS = ("opensearch", "urllib3", "elastic_transport")


def check(config: Config, *, recovery: bool = False) -> None:
    """Every check, in order; raises PreflightError at the first failure. With `recovery`,
    the state topic too (`ensure_state_topic`)."""
    topics = check_kafka(config.kafka)
    check_redis(config.redis)
    if config.opensearch.enabled:
        check_opensearch(config.opensearch)
    ensure_dead_letter_topic(config.kafka, topics)
    if recovery:
        check_state_topic(config.kafka)


def check_state_topic(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> None:
    """The state topic of the feature shards' recovery segments compacts, or is created
    compacting (`dataflow.kafka.segments`)."""
    try:
        ensure_state_topic(settings, timeout_s)
    except StateTopicError as exc:
        raise PreflightError("KAFKA_STATE_TOPIC", exc.topic, exc.problem) from None


def check_kafka(settings: KafkaSettings, timeout_s: float = TIMEOUT_S) -> set[str]:
    """The brokers answer and every input topic exists; returns the topics the broker
    lists (nothing is created here)."""
    brokers = ",".join(settings.brokers)
    events: list[KafkaError] = []
    offsets = BrokerOffsets(settings, timeout_s, quiet=True, on_error=events.append)
    deadline = time.monotonic() + timeout_s
    while True:
        # Short attempts: librdkafka keeps retrying a refused login for the whole timeout,
        # but says why after the first one.
        left = deadline - time.monotonic()
        try:
            topics = offsets.topics(timeout_s=max(0.1, min(1.0, left)))
            break
        except KafkaException as exc:
            _refused(settings, brokers, events)
            if time.monotonic() >= deadline:
                raise PreflightError(
                    "KAFKA_BROKERS",
                    brokers,
                    f"no broker answered within {timeout_s:.0f}s ({_kafka_reason(exc)}); check "
                    "the addresses, the network and KAFKA_SECURITY_PROTOCOL",
                ) from None
    missing = [topic for topic in settings.topics if topic not in topics]
    if missing:
        names = ", ".join(repr(topic) for topic in missing)
        what, does, them = (
            ("topic", "does", "it") if len(missing) == 1 else ("topics", "do", "them")
        )
        raise PreflightError(
            "KAFKA_TOPICS",
            ",".join(settings.topics),
            f"{what} {names} {does} not exist on {brokers} (or this user may not describe "
            f"{them}); create {them} first: the pipeline never creates its input topics",
        )
    return set(topics)


def ensure_dead_letter_topic(
    settings: KafkaSettings, topics: set[str], timeout_s: float = TIMEOUT_S
) -> None:
    """The dead-letter topic is among `topics`, or is created."""
    if settings.dlq_topic in topics:
        return
    try:
        created = ensure_topics(
            settings,
            [settings.dlq_topic],
            partitions=-1,
            replication_factor=-1,
            timeout_s=timeout_s,
        )
    except (KafkaException, PipelineError) as exc:
        raise PreflightError(
            "KAFKA_DLQ_TOPIC",
            settings.dlq_topic,
            f"does not exist and could not be created ({_kafka_reason(exc)}); create it, or "
            "give this user the right to",
        ) from None
    if created:
        log.warning(
            "created the dead-letter topic: KAFKA_DLQ_TOPIC did not exist; it has the "
            "broker's default partitions and replication",
            extra={"topic": settings.dlq_topic},
        )


def check_redis(settings: RedisSettings, timeout_s: float = TIMEOUT_S) -> None:
    """Redis answers PING on a connection made as the sink makes it (URL credentials and
    database included)."""
    url = s.REDIS_URL.display(settings.url.get())
    client = connect(settings, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        if settings.password:
            password = settings.password.source or "REDIS_PASSWORD"
        else:
            password = f"the password in {settings.url.source or 'REDIS_URL'}"
        raise PreflightError(
            "REDIS_URL",
            url,
            f"Redis refused the credentials ({exc}); check the user in REDIS_URL and {password}",
        ) from None
    except redis.TimeoutError as exc:
        raise PreflightError(
            "REDIS_URL", url, f"no answer within {timeout_s:.0f}s ({exc})"
        ) from None
    except redis.ConnectionError as exc:
        untrusted = _certificate_problem(exc)
        if untrusted is None:
            raise PreflightError("REDIS_URL", url, f"cannot connect ({exc})") from None
        if "mismatch" in untrusted:  # the certificate is fine, but for another name
            raise PreflightError(
                "REDIS_URL",
                url,
                f"the Redis server's TLS certificate does not name this host ({untrusted}); "
                "connect by a name the certificate holds",
            ) from None
        trusted = repr(settings.ca_file) if settings.ca_file else "the system's trusted CAs"
        raise PreflightError(
            "REDIS_CA_FILE",
            settings.ca_file,
            f"the TLS certificate of Redis at {url} is not signed by a CA in {trusted} "
            f"({untrusted}); set REDIS_CA_FILE to the CA that signed it",
        ) from None
    except redis.RedisError as exc:  # NOAUTH, a database index out of range, ...
        raise PreflightError("REDIS_URL", url, f"Redis refused the connection ({exc})") from None
    finally:
        client.close()


def check_opensearch(settings: OpenSearchSettings) -> None:
    """OpenSearch answers; the sink's aliases exist or are created; the search index of
    `OPENSEARCH_DOCS_INDEX` (when set) exists with the popularity fields."""
    url = s.OPENSEARCH_URL.display(settings.url.get())
    variables = {
        "support": "OPENSEARCH_INDEX",
        "ac": "OPENSEARCH_AC_INDEX",
        "docs": "OPENSEARCH_DOCS_INDEX",
    }
    admin = IndexAdmin(client_for(settings))
    try:
        with _quiet(_HTTP_LOGGERS):
            for spec in specs_for(settings):
                try:
                    if spec.op == "index":
                        admin.ensure(spec)
                    else:
                        admin.verify(spec)
                except IndexMappingError as exc:
                    raise PreflightError(variables[spec.name], spec.target, str(exc)) from None
                except AuthorizationException as exc:
                    variable = variables[spec.name]
                    raise PreflightError(
                        "OPENSEARCH_USERNAME",
                        settings.username,
                        f"OpenSearch at {url} does not allow this user to set up and write "
                        f"{spec.target} ({variable}) (HTTP 403: {_os_reason(exc)}); grant its "
                        f"role the sink's rights on {spec.target} and its indices, or set "
                        f"{variable} to an index it has them on",
                    ) from None
    except OSConnectionError as exc:
        untrusted = _certificate_problem(exc) or (
            _certificate_problem(exc.info) if isinstance(exc.info, BaseException) else None
        )
        if untrusted is not None:
            trusted = repr(settings.ca_file) if settings.ca_file else "opensearch-py's CA bundle"
            raise PreflightError(
                "OPENSEARCH_CA_FILE",
                settings.ca_file,
                f"the TLS certificate of OpenSearch at {url} is not signed by a CA in {trusted} "
                f"or does not name the host ({untrusted}); set OPENSEARCH_CA_FILE to the CA "
                "that signed it",
            ) from None
        scheme = "" if settings.tls else " (https:// for a node that speaks TLS)"
        raise PreflightError(
            "OPENSEARCH_URL",
            url,
            f"no answer ({exc.error}); check the URL{scheme}, or set OPENSEARCH_URL empty to "
            "run without the OpenSearch sink",
        ) from None
    except AuthenticationException:
        raise _refused_login(settings, url) from None
    except AuthorizationException as exc:  # a request outside the loop's specs
        raise PreflightError(
            "OPENSEARCH_USERNAME",
            settings.username,
            f"OpenSearch at {url} does not allow this user to manage the sink's indices "
            f"(HTTP 403: {_os_reason(exc)})",
        ) from None
    except TransportError as exc:
        raise PreflightError(
            "OPENSEARCH_URL",
            url,
            f"OpenSearch refused to set up the sink's indices (HTTP {exc.status_code}: "
            f"{_os_reason(exc)})",
        ) from None
    except OpenSearchException as exc:  # an answer that is not OpenSearch's (a proxy page)
        raise PreflightError(
            "OPENSEARCH_URL", url, f"the answer is not OpenSearch's ({exc})"
        ) from None
    finally:
        admin.client.close()


def _refused_login(settings: OpenSearchSettings, url: str) -> PreflightError:
    """HTTP 401 from OpenSearch, said with where the credentials came from (or that none
    were given)."""
    if settings.username:
        if settings.password:
            password = settings.password.source or "OPENSEARCH_PASSWORD"
            hint = f"check OPENSEARCH_USERNAME and {password}"
        else:
            hint = "no password is set: set OPENSEARCH_PASSWORD or OPENSEARCH_PASSWORD_FILE"
        return PreflightError(
            "OPENSEARCH_USERNAME",
            settings.username,
            f"OpenSearch at {url} refused the credentials (HTTP 401); {hint}",
        )
    if urlsplit(settings.url.get()).username:
        source = settings.url.source or "OPENSEARCH_URL"
        return PreflightError(
            "OPENSEARCH_URL",
            url,
            f"OpenSearch refused the credentials (HTTP 401); check the user and the password "
            f"in {source}",
        )
    return PreflightError(
        "OPENSEARCH_USERNAME",
        "",
        f"OpenSearch at {url} asks for a login (HTTP 401); set OPENSEARCH_USERNAME and "
        "OPENSEARCH_PASSWORD or OPENSEARCH_PASSWORD_FILE",
    )


def _certificate_problem(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, when that is what `exc` (or an error it
    was raised from) says; None for any other failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    marker = "certificate verify failed: "
    if "CERTIFICATE_VERIFY_FAILED" in text and marker in text:
        return text.split(marker, 1)[1].split(" (_ssl.c", 1)[0]
    return None


def _refused(settings: KafkaSettings, brokers: str, events: list[KafkaError]) -> None:
    """PreflightError when librdkafka said the brokers refused the login or their
    certificate was not trusted; nothing when it said nothing of the kind (yet)."""
    for event in events:
        reason = _event_text(event)
        if event.code() == KafkaError._AUTHENTICATION:
            password = settings.sasl_password.source or "KAFKA_SASL_PASSWORD"
            raise PreflightError(
                "KAFKA_SASL_USERNAME",
                settings.sasl_username,
                f"Kafka at {brokers} refused the credentials ({reason}); check "
                f"KAFKA_SASL_USERNAME and {password}",
            )
        if "certificate verify failed" in reason:
            trusted = (
                repr(settings.ssl_ca_location)
                if settings.ssl_ca_location
                else "the system's trusted CAs"
            )
            raise PreflightError(
                "KAFKA_SSL_CA_LOCATION",
                settings.ssl_ca_location,
                f"the TLS certificate of Kafka at {brokers} is not signed by a CA in {trusted} "
                f"or does not name the broker ({reason}); set KAFKA_SSL_CA_LOCATION to the CA "
                "that signed it",
            )


def _event_text(event: KafkaError) -> str:
    """An error event's text without the broker prefix and librdkafka's timing suffix."""
    text = str(event.str())
    _, sep, rest = text.partition("/bootstrap: ")
    text = rest if sep else text
    return text.split(" (after ", 1)[0]


def _kafka_reason(exc: Exception) -> str:
    """librdkafka's message alone (not the KafkaError repr around it)."""
    if isinstance(exc, KafkaException) and exc.args and hasattr(exc.args[0], "str"):
        return str(exc.args[0].str())
    return str(exc)


def _os_reason(exc: TransportError) -> str:
    info = exc.info
    error = info.get("error") if isinstance(info, dict) else None
    if isinstance(error, dict):
        return f"{error.get('type', '')}: {error.get('reason', '')}"
    return str(exc.error) or "no reason given"  # (the answer to a HEAD request has no body)


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """The named loggers say nothing below CRITICAL while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
