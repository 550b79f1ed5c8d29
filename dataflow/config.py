"""Typed, validated configuration from environment variables.

`Config.from_env()` reads every setting once at start, through the rows of
`dataflow.settings` (the one table of names, defaults, parsers, bounds and docs); a missing
or malformed value raises `ConfigError` naming the variable, so a bad deployment fails
before it reads a message. The dataclasses' defaults are the table's defaults. Secrets are
`Secret` objects whose repr is masked; `Config.describe()` is safe to log.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from dataflow import settings as s
from dataflow.core import native
from dataflow.core.families import AC, DOC, FAMILY_NAMES, QD, FeatureParams
from dataflow.core.priors import FitRules
from dataflow.core.smoothing import Prior
from dataflow.errors import ConfigError
from dataflow.logs import librdkafka_log_level
from dataflow.settings import Secret, Setting, mask_url, masked

__all__ = [
    "Config",
    "KafkaSettings",
    "OpenSearchSettings",
    "RedisSettings",
    "Secret",
    "mask_url",
]


CONSUMER_ONLY = frozenset(
    {
        "auto.commit.interval.ms",
        "auto.offset.reset",
        "check.crcs",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "enable.partition.eof",
        "fetch.error.backoff.ms",
        "fetch.max.bytes",
        "fetch.message.max.bytes",
        "fetch.min.bytes",
        "fetch.wait.max.ms",
        "group.id",
        "group.instance.id",
        "group.protocol",
        "heartbeat.interval.ms",
        "isolation.level",
        "max.partition.fetch.bytes",
        "max.poll.interval.ms",
        "partition.assignment.strategy",
        "queued.max.messages.kbytes",
        "queued.min.messages",
        "session.timeout.ms",
    }
)
"""librdkafka properties a consumer reads and a producer ignores with a warning (the `C`
rows of librdkafka's CONFIGURATION.md that Python clients set)."""


_TLS_PROTOCOLS = ("SSL", "SASL_SSL")


def _readable_file(variable: str, path: str) -> None:
    """ConfigError naming `variable` unless `path` is a file this process can read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path!r} ({exc.strerror})") from None


@dataclass(frozen=True)
class KafkaSettings:
    brokers: tuple[str, ...] = s.KAFKA_BROKERS.value
    topics: tuple[str, ...] = s.KAFKA_TOPICS.value
    dlq_topic: str = s.KAFKA_DLQ_TOPIC.value
    state_topic: str = s.KAFKA_STATE_TOPIC.value
    batch_size: int = s.KAFKA_BATCH_SIZE.value
    stop_at_end: bool = s.KAFKA_STOP_AT_END.value
    security_protocol: str = s.KAFKA_SECURITY_PROTOCOL.value
    sasl_mechanism: str = s.KAFKA_SASL_MECHANISM.value
    sasl_username: str = s.KAFKA_SASL_USERNAME.value
    sasl_password: Secret = s.KAFKA_SASL_PASSWORD.value
    ssl_ca_location: str = s.KAFKA_SSL_CA_LOCATION.value

    def client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by every client, consumer, producer or admin: brokers,
        security (for `SSL`/`SASL_SSL` the brokers' certificates verified against
        `KAFKA_SSL_CA_LOCATION` and their names checked), and the `log_level` of
        librdkafka's own stderr lines (warnings and worse, all of them with
        `LOG_LEVEL=DEBUG`: `dataflow.logs.librdkafka_log_level`)."""
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": ",".join(self.brokers),
            "log_level": librdkafka_log_level(),
        }
        if self.security_protocol != "PLAINTEXT":
            config["security.protocol"] = self.security_protocol
        if self.security_protocol in _TLS_PROTOCOLS:
            config["ssl.endpoint.identification.algorithm"] = "https"
            if self.ssl_ca_location:
                config["ssl.ca.location"] = self.ssl_ca_location
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get()
        return config

    def check(self) -> None:
        """ConfigError when the security settings contradict each other or name an
        unreadable file: TLS settings without TLS, SASL settings without SASL or the other
        way round, a SASL user or password missing."""
        protocol, mechanism = self.security_protocol, self.sasl_mechanism
        if self.ssl_ca_location:
            if protocol not in _TLS_PROTOCOLS:
                raise ConfigError(
                    "KAFKA_SSL_CA_LOCATION",
                    f"is set but KAFKA_SECURITY_PROTOCOL is {protocol} (no TLS)",
                )
            _readable_file("KAFKA_SSL_CA_LOCATION", self.ssl_ca_location)
        sasl = protocol.startswith("SASL_")
        if mechanism and not sasl:
            raise ConfigError(
                "KAFKA_SASL_MECHANISM",
                f"is set but KAFKA_SECURITY_PROTOCOL is {protocol} (no SASL)",
            )
        if sasl and not mechanism:
            raise ConfigError(
                "KAFKA_SASL_MECHANISM",
                f"is empty but KAFKA_SECURITY_PROTOCOL is {protocol}; set it (e.g. SCRAM-SHA-512)",
            )
        if sasl and mechanism != "GSSAPI":
            if not self.sasl_username:
                raise ConfigError("KAFKA_SASL_USERNAME", f"is empty but {mechanism} needs a user")
            if not self.sasl_password:
                raise ConfigError(
                    "KAFKA_SASL_PASSWORD",
                    f"is empty (and KAFKA_SASL_PASSWORD_FILE unset) but {mechanism} needs one",
                )

    def producer_config(
        self, extra: Mapping[str, str | int | float | bool] | None = None
    ) -> dict[str, str | int | float | bool]:
        """Settings for a producer or an admin client (librdkafka builds both as producers):
        `client_config()` and `extra`, without any consumer-only property, which librdkafka
        would ignore with a `CONFWARN` line on stderr."""
        config = {**self.client_config(), **(extra or {})}
        return {k: v for k, v in config.items() if k not in CONSUMER_ONLY}


def redis_options(url: str, password: str = "", ca_file: str = "") -> dict[str, Any]:
    """redis-py connection options, besides the URL, of every client of the feature store
    (the sink, the preflight, the tools, `FeatureReader.from_url`): the password when the
    URL holds none, and for `rediss://` a verified TLS connection (the server certificate
    must chain to `ca_file`, else to the system's CAs, and name the URL's host)."""
    options: dict[str, Any] = {}
    if password:
        options["password"] = password
    if urlsplit(url).scheme == "rediss":
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        if ca_file:
            options["ssl_ca_certs"] = ca_file
    return options


@dataclass(frozen=True)
class RedisSettings:
    url: Secret = s.REDIS_URL.value
    password: Secret = s.REDIS_PASSWORD.value
    ca_file: str = s.REDIS_CA_FILE.value
    prefix: str = s.FEATURE_PREFIX.value
    ttl_seconds: int = s.FEATURE_TTL_SECONDS.value
    pipeline_keys: int = s.REDIS_PIPELINE_KEYS.value
    backoff_max_seconds: float = s.REDIS_BACKOFF_MAX_SECONDS.value
    outage_exit_seconds: int = s.REDIS_OUTAGE_EXIT_SECONDS.value
    check_seconds: float = s.STORE_CHECK_SECONDS.value

    def client_options(self) -> dict[str, Any]:
        """`redis_options` of these settings: pass them to `redis.Redis.from_url(url, ...)`."""
        return redis_options(self.url.get(), self.password.get(), self.ca_file)

    def check(self) -> None:
        """ConfigError when the settings contradict each other or name an unreadable file."""
        parts = urlsplit(self.url.get())
        if self.password and parts.password is not None:
            raise ConfigError(
                self.password.source or "REDIS_PASSWORD",
                f"{self.url.source or 'REDIS_URL'} holds a password too; set the password in one "
                "place",
            )
        if self.ca_file:
            if parts.scheme != "rediss":
                raise ConfigError(
                    "REDIS_CA_FILE", "is set but REDIS_URL is not a rediss:// (TLS) URL"
                )
            _readable_file("REDIS_CA_FILE", self.ca_file)


@dataclass(frozen=True)
class OpenSearchSettings:
    url: Secret = s.OPENSEARCH_URL.value
    index: str = s.OPENSEARCH_INDEX.value
    ac_index: str = s.OPENSEARCH_AC_INDEX.value
    docs_index: str = s.OPENSEARCH_DOCS_INDEX.value
    username: str = s.OPENSEARCH_USERNAME.value
    password: Secret = s.OPENSEARCH_PASSWORD.value
    ca_file: str = s.OPENSEARCH_CA_FILE.value
    verify_certs: bool = s.OPENSEARCH_VERIFY_CERTS.value
    min_change: float = s.OPENSEARCH_MIN_CHANGE.value
    bulk_docs: int = s.OPENSEARCH_BULK_DOCS.value
    bulk_bytes: int = s.OPENSEARCH_BULK_BYTES.value
    max_pending: int = s.OPENSEARCH_MAX_PENDING.value
    partitions: int = s.OPENSEARCH_PARTITIONS.value
    timeout_seconds: float = s.OPENSEARCH_TIMEOUT_SECONDS.value
    max_retries: int = s.OPENSEARCH_MAX_RETRIES.value
    backoff_max_seconds: float = s.OPENSEARCH_BACKOFF_MAX_SECONDS.value

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url.get()).scheme == "https"

    def check(self) -> None:
        """ConfigError when the TLS settings contradict the URL or each other, or name an
        unreadable file."""
        if not self.ca_file:
            return
        if not self.tls:
            raise ConfigError("OPENSEARCH_CA_FILE", "is set but OPENSEARCH_URL is not https://")
        if not self.verify_certs:
            raise ConfigError(
                "OPENSEARCH_CA_FILE",
                "is set but OPENSEARCH_VERIFY_CERTS is false: it would not be used",
            )
        _readable_file("OPENSEARCH_CA_FILE", self.ca_file)


@dataclass(frozen=True)
class Config:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    opensearch: OpenSearchSettings = field(default_factory=OpenSearchSettings)
    # FeatureParams (dataflow.core) keeps its own defaults: the core imports no settings.
    # tests/test_config.py checks that they equal the table's.
    features: FeatureParams = field(default_factory=FeatureParams)
    priors: FitRules = field(default_factory=FitRules)
    """Which families' priors are fitted from their keys, and how (`PRIOR_FIT_*`)."""
    future_tolerance_ms: int = 1000 * s.FUTURE_TOLERANCE_SECONDS.value
    flush_interval_ms: int = s.FEATURE_FLUSH_INTERVAL_MS.value
    restate_keys_per_second: int = s.RESTATE_KEYS_PER_SECOND.value
    link_grace_ms: int = 1000 * s.ACQ_LINK_GRACE_SECONDS.value
    link_shards: int = s.LINK_SHARDS.value
    feature_shards: int = s.FEATURE_SHARDS.value
    dedup_shards: int = s.DEDUP_SHARDS.value
    snapshot_tail_bytes: int = s.SNAPSHOT_TAIL_BYTES.value
    log_level: str = s.LOG_LEVEL.value
    log_format: str = s.LOG_FORMAT.value
    native_core: bool = s.NATIVE_CORE.value
    """Whether the flow runs the compiled state core (`dataflow.core.native`)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read and validate every setting; raises ConfigError naming the variable."""
        e = os.environ if env is None else env
        kafka = KafkaSettings(
            brokers=s.KAFKA_BROKERS.read(e),
            topics=s.KAFKA_TOPICS.read(e),
            dlq_topic=s.KAFKA_DLQ_TOPIC.read(e),
            state_topic=s.KAFKA_STATE_TOPIC.read(e),
            batch_size=s.KAFKA_BATCH_SIZE.read(e),
            stop_at_end=s.KAFKA_STOP_AT_END.read(e),
            security_protocol=s.KAFKA_SECURITY_PROTOCOL.read(e),
            sasl_mechanism=s.KAFKA_SASL_MECHANISM.read(e),
            sasl_username=s.KAFKA_SASL_USERNAME.read(e),
            sasl_password=s.KAFKA_SASL_PASSWORD.read(e),
            ssl_ca_location=s.KAFKA_SSL_CA_LOCATION.read(e),
        )
        kafka.check()
        if kafka.dlq_topic in kafka.topics:
            raise ConfigError("KAFKA_DLQ_TOPIC", "must not be one of KAFKA_TOPICS (a loop)")
        if kafka.state_topic in (*kafka.topics, kafka.dlq_topic):
            raise ConfigError(
                "KAFKA_STATE_TOPIC", "must not be KAFKA_DLQ_TOPIC or one of KAFKA_TOPICS"
            )
        s.REDIS_MAX_RETRIES.read(e)  # deprecated: still validated, otherwise ignored
        redis = RedisSettings(
            url=s.REDIS_URL.read(e),
            password=s.REDIS_PASSWORD.read(e),
            ca_file=s.REDIS_CA_FILE.read(e),
            prefix=s.FEATURE_PREFIX.read(e),
            ttl_seconds=s.FEATURE_TTL_SECONDS.read(e),
            pipeline_keys=s.REDIS_PIPELINE_KEYS.read(e),
            backoff_max_seconds=s.REDIS_BACKOFF_MAX_SECONDS.read(e),
            outage_exit_seconds=s.REDIS_OUTAGE_EXIT_SECONDS.read(e),
            check_seconds=s.STORE_CHECK_SECONDS.read(e),
        )
        redis.check()
        opensearch = OpenSearchSettings(
            url=s.OPENSEARCH_URL.read(e),
            index=s.OPENSEARCH_INDEX.read(e),
            ac_index=s.OPENSEARCH_AC_INDEX.read(e),
            docs_index=s.OPENSEARCH_DOCS_INDEX.read(e),
            username=s.OPENSEARCH_USERNAME.read(e),
            password=s.OPENSEARCH_PASSWORD.read(e),
            ca_file=s.OPENSEARCH_CA_FILE.read(e),
            verify_certs=s.OPENSEARCH_VERIFY_CERTS.read(e),
            min_change=s.OPENSEARCH_MIN_CHANGE.read(e),
            bulk_docs=s.OPENSEARCH_BULK_DOCS.read(e),
            bulk_bytes=s.OPENSEARCH_BULK_BYTES.read(e),
            max_pending=s.OPENSEARCH_MAX_PENDING.read(e),
            partitions=s.OPENSEARCH_PARTITIONS.read(e),
            timeout_seconds=s.OPENSEARCH_TIMEOUT_SECONDS.read(e),
            max_retries=s.OPENSEARCH_MAX_RETRIES.read(e),
            backoff_max_seconds=s.OPENSEARCH_BACKOFF_MAX_SECONDS.read(e),
        )
        opensearch.check()
        features = FeatureParams(
            doc=_prior(e, s.SMOOTHING_DOC_ALPHA, s.SMOOTHING_DOC_BETA),
            qd=_prior(e, s.SMOOTHING_QD_ALPHA, s.SMOOTHING_QD_BETA),
            ac=_prior(e, s.SMOOTHING_AC_ALPHA, s.SMOOTHING_AC_BETA),
            acq=_prior(e, s.SMOOTHING_ACQ_ALPHA, s.SMOOTHING_ACQ_BETA),
            weight_click=s.POPULARITY_WEIGHT_CLICK.read(e),
            weight_impression=s.POPULARITY_WEIGHT_IMPRESSION.read(e),
            weight_long_click=s.POPULARITY_WEIGHT_LONG_CLICK.read(e),
            long_dwell_ms=s.LONG_DWELL_MS.read(e),
            reference_ctr=tuple(float(ctr) for ctr in s.COEC_REFERENCE_CTR.read(e)),
            coec_prior=s.COEC_PRIOR.read(e),
        )
        fitted = (
            (DOC, s.SMOOTHING_DOC_PRIOR),
            (QD, s.SMOOTHING_QD_PRIOR),
            (AC, s.SMOOTHING_AC_PRIOR),
        )
        priors = FitRules(
            families=frozenset(f for f, setting in fitted if setting.read(e) == "fitted"),
            sample=s.PRIOR_FIT_SAMPLE.read(e),
            min_keys=s.PRIOR_FIT_MIN_KEYS.read(e),
            min_trials=s.PRIOR_FIT_MIN_IMPRESSIONS.read(e),
            grace_ms=1000 * s.PRIOR_FIT_GRACE_SECONDS.read(e),
        )
        return cls(
            kafka=kafka,
            redis=redis,
            opensearch=opensearch,
            features=features,
            priors=priors,
            future_tolerance_ms=1000 * s.FUTURE_TOLERANCE_SECONDS.read(e),
            flush_interval_ms=s.FEATURE_FLUSH_INTERVAL_MS.read(e),
            restate_keys_per_second=s.RESTATE_KEYS_PER_SECOND.read(e),
            link_grace_ms=1000 * s.ACQ_LINK_GRACE_SECONDS.read(e),
            link_shards=s.LINK_SHARDS.read(e),
            feature_shards=s.FEATURE_SHARDS.read(e),
            dedup_shards=s.DEDUP_SHARDS.read(e),
            snapshot_tail_bytes=s.SNAPSHOT_TAIL_BYTES.read(e),
            log_level=s.LOG_LEVEL.read(e),
            log_format=s.LOG_FORMAT.read(e),
            native_core=_native_core(e),
        )

    def describe(self) -> dict[str, Any]:
        """Every setting as plain data, secrets masked: what the start-up log line shows."""
        described: dict[str, Any] = _describe(self)
        return described


def _native_core(env: Mapping[str, str]) -> bool:
    wanted = s.NATIVE_CORE.read(env)
    if wanted and native.BUILT is None:
        raise ConfigError(
            "NATIVE_CORE",
            "is true but this installation has no compiled core (dataflow.core._native): "
            "reinstall the package where a C compiler and Python's headers are present "
            "(pip install .), or set NATIVE_CORE=false to run the pure-Python core",
        )
    return wanted


def _prior(env: Mapping[str, str], alpha: Setting[float], beta: Setting[float]) -> Prior:
    a, b = alpha.read(env), beta.read(env)
    if a + b <= 0:
        raise ConfigError(beta.name, "alpha + beta must be positive")
    return Prior(a, b)


def _describe(obj: Any) -> Any:
    if isinstance(obj, Secret):  # a URL without its password, any other secret as ********
        return masked(obj.get())
    if isinstance(obj, FitRules):  # families by name
        described = {f.name: _describe(getattr(obj, f.name)) for f in fields(obj)}
        described["families"] = [FAMILY_NAMES[f] for f in sorted(obj.families)]
        return described
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _describe(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_describe(v) for v in obj]
    return obj
