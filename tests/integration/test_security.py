"""The pipeline and the reader against the secured side of the stack (`stack/stack.sh`):
Kafka over SASL_SSL (SCRAM-SHA-512, ACLs), Redis over TLS only (ACL users, the default
user off) and OpenSearch with its security plugin (https only, internal users and roles),
all verified against the stack's CA, each as a user with the least rights.

- the whole pipeline (`python -m dataflow.run`, preflight included) reads its input from
  the secured broker as `search-features`, creates its dead-letter topic there, writes
  exactly the reference model's features as the `search-features` Redis user over
  `rediss://` and the popularity `rank_feature` documents as the `search-features`
  OpenSearch user over https, every password read from a file (`*_PASSWORD_FILE`), and no
  secret is in any line it prints (at DEBUG), in its `/metrics` and `/dataflow` or in its
  dead letters;
- the reader reads them as the read-only `ranking` user, sync and async, and what each user
  may not do is refused, in Redis, in Kafka and in OpenSearch;
- every bad credential (wrong password, unknown user, no password, a certificate the client
  does not trust, an OpenSearch index outside the user's role) stops the pipeline at start:
  one line naming the variable and the service, exit status 3, no secret in it, nothing
  created.

The secured OpenSearch runs 2.19.4, the newest release whose security plugin is on Maven
Central (the open node runs 2.19.6; docs/operations.md, "Security").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opensearchpy import (
    AuthenticationException,
    AuthorizationException,
    OpenSearch,
)
from opensearchpy import ConnectionError as OSConnectionError

from dataflow.config import RedisSettings
from dataflow.core import counters, keys
from dataflow.core.families import AC, ACQ, DOC, LAYOUTS, QD, FeatureParams, fields_for
from dataflow.core.smoothing import Prior
from dataflow.errors import ReaderError
from dataflow.kafka.topics import Message
from dataflow.opensearch.index import IndexAdmin
from dataflow.opensearch.updates import DOC_FEATURES, IndexSpec
from dataflow.reader import (
    AsyncFeatureReader,
    AutocompleteFeatures,
    AutocompleteLink,
    DocFeatures,
    FeatureReader,
    QueryDocFeatures,
)
from dataflow.retry import NO_WAIT
from dataflow.settings import Secret
from dataflow.sinks.redis import RedisWriter, connect
from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.conftest import (
    SecuredKafka,
    SecuredOpenSearch,
    SecuredRedis,
    TopicFactory,
    http_get,
)
from tests.integration.harness import PipelineProcess, dump, free_port, pipeline_env
from tests.integration.test_opensearch import FEATURES, index_docs, mismatches, redis_docs
from tests.integration.test_preflight import one_line, run_pipeline
from tests.reference_model import diff_stores, expected_store, select_families

PIPELINE_USER, READER_USER = "search-features", "ranking"
ALL = ("doc", "qd", "ac", "acq")
NOW = int(time.time() * 1000)
PARAMS = FeatureParams(doc=Prior(1.0, 20.0), qd=Prior(2.0, 30.0), ac=Prior(1.0, 5.0))


def redis_env(secured: SecuredRedis, user: str = PIPELINE_USER) -> dict[str, str]:
    """The pipeline's Redis settings for the secured side: no password in the URL."""
    return {
        "REDIS_URL": secured.url(user),
        "REDIS_PASSWORD": secured.passwords[PIPELINE_USER],
        "REDIS_CA_FILE": secured.ca_file,
    }


def kafka_env(secured: SecuredKafka, user: str = PIPELINE_USER) -> dict[str, str]:
    """The pipeline's Kafka settings for the secured broker."""
    return {
        "KAFKA_BROKERS": secured.brokers,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": user,
        "KAFKA_SASL_PASSWORD": secured.passwords[PIPELINE_USER],
        "KAFKA_SSL_CA_LOCATION": secured.ca_file,
    }


def opensearch_env(secured: SecuredOpenSearch, user: str = PIPELINE_USER) -> dict[str, str]:
    """The pipeline's OpenSearch settings for the secured node."""
    return {
        "OPENSEARCH_URL": secured.url,
        "OPENSEARCH_CA_FILE": secured.ca_file,
        "OPENSEARCH_USERNAME": user,
        "OPENSEARCH_PASSWORD": secured.passwords[PIPELINE_USER],
    }


def produce_secured(secured: SecuredKafka, topic: str, messages: list[Message]) -> None:
    """As stack-admin: the input the pipeline reads."""
    producer = Producer(secured.client_config(**{"linger.ms": 20}))
    for msg in messages:
        producer.produce(topic, value=msg.value, key=msg.key)
        producer.poll(0)
    assert producer.flush(60) == 0


def read_secured(secured: SecuredKafka, topic: str) -> list[bytes]:
    """Every value in `topic` (one partition), as stack-admin."""
    consumer = Consumer(
        secured.client_config(**{"group.id": "stack-admin-read", "enable.partition.eof": True})
    )
    out: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                return out
            if error is None:
                out.append(msg.value() or b"")
        raise AssertionError(f"{topic}: no end of partition within 60s")
    finally:
        consumer.close()


@pytest.fixture
def aliases(secured_os_admin: OpenSearch, unique_name: str) -> Iterator[dict[str, str]]:
    """Two aliases of the test's own, inside the pipeline user's index patterns on the
    secured node (`doc-features*`, `ac-features*`); they and their indices are removed
    afterwards."""
    yield {
        "OPENSEARCH_INDEX": f"doc-features-it-{unique_name}",
        "OPENSEARCH_AC_INDEX": f"ac-features-it-{unique_name}",
    }
    secured_os_admin.indices.delete(
        index=f"doc-features-it-{unique_name}*,ac-features-it-{unique_name}*",
        ignore_unavailable=True,
        expand_wildcards="all",
    )


def made_for(admin: OpenSearch, unique_name: str) -> list[str]:
    """Every index or alias on the secured node with the test's token in its name."""
    found = admin.indices.get_alias(index=f"*{unique_name}*", ignore_unavailable=True)
    names = set(found)
    for info in found.values():
        names.update(info.get("aliases", {}))
    return sorted(names)


# --------------------------------------------------------------------------- the pipeline


def scrape_while_running(run: PipelineProcess, port: int) -> list[str]:
    """Every answer of `/metrics` and `/dataflow` (the Bytewax API server) while `run` lives."""
    bodies: list[str] = []
    while run.alive():
        for path in ("/metrics", "/dataflow"):
            with contextlib.suppress(OSError):  # not up yet, or gone
                bodies.append(http_get(port, path, timeout=2).decode())
        time.sleep(0.2)
    return bodies


def test_the_pipeline_over_sasl_ssl_and_tls_writes_exactly_the_model_and_leaks_nothing(
    secured_kafka: SecuredKafka,
    secured_topic_factory: TopicFactory,
    secured_redis: SecuredRedis,
    secured_admin: redis.Redis,
    secured_prefix: str,
    secured_opensearch: SecuredOpenSearch,
    secured_os_admin: OpenSearch,
    aliases: dict[str, str],
    tmp_path: Path,
) -> None:
    topic = secured_topic_factory(2)
    # Not made here: the pipeline creates it (its user has the Create ACL for it).
    dlq = secured_topic_factory(prefix="search-events-dlq-it", create=False)
    messages = list(
        generate(
            GeneratorConfig(
                seed=12,
                n_events=3_000,
                n_docs=200,
                n_queries=30,
                start_ms=NOW - 6 * 3_600_000,
                span_ms=6 * 3_600_000 - 60_000,
                duplicate_fraction=0.1,
                invalid_fraction=0.05,
                max_disorder_ms=300_000,
            )
        )
    )
    produce_secured(secured_kafka, topic, messages)
    # Every password from a file, as a mounted Kubernetes Secret gives them.
    (tmp_path / "redis-password").write_text(secured_redis.passwords[PIPELINE_USER] + "\n")
    (tmp_path / "kafka-password").write_text(secured_kafka.passwords[PIPELINE_USER] + "\n")
    (tmp_path / "os-password").write_text(secured_opensearch.passwords[PIPELINE_USER] + "\n")
    settings = {
        **redis_env(secured_redis),
        **kafka_env(secured_kafka),
        **opensearch_env(secured_opensearch),
    }
    for name in ("REDIS_PASSWORD", "KAFKA_SASL_PASSWORD", "OPENSEARCH_PASSWORD", "KAFKA_BROKERS"):
        del settings[name]
    port = free_port()
    env = pipeline_env(
        brokers=secured_kafka.brokers,
        topic=topic,
        dlq=dlq,
        redis_url=secured_redis.url(PIPELINE_USER),
        prefix=secured_prefix,
        **settings,
        REDIS_PASSWORD_FILE=str(tmp_path / "redis-password"),
        KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "kafka-password"),
        OPENSEARCH_PASSWORD_FILE=str(tmp_path / "os-password"),
        LOG_LEVEL="DEBUG",
        METRICS_ENABLED="true",
        BYTEWAX_DATAFLOW_API_PORT=str(port),
        **aliases,
    )
    for name in ("REDIS_PASSWORD", "KAFKA_SASL_PASSWORD", "OPENSEARCH_PASSWORD"):
        env.pop(name, None)
    run = PipelineProcess(env, tmp_path / "pipeline.log")
    scraped = scrape_while_running(run, port)
    run.wait_ok()

    valid = [m.event for m in messages if m.event is not None]
    expected = select_families(
        expected_store(valid, prefix=secured_prefix), ALL, prefix=secured_prefix
    )
    actual = dump(secured_admin, secured_prefix)
    diffs = diff_stores(actual, expected)
    assert not diffs, "\n".join(diffs[:30])
    assert len(actual) > 300
    assert {k.split(":")[1] for k in actual} == set(ALL)
    assert 0 < secured_admin.ttl(next(iter(actual))) <= 35 * 86_400  # EXPIRE is allowed
    # Popularity went to the secured OpenSearch over https, as search-features: a
    # rank_feature document for every document in Redis, within the sink's 5% threshold.
    indexed = index_docs(secured_os_admin, aliases["OPENSEARCH_INDEX"])
    problems = mismatches(redis_docs(secured_admin, secured_prefix), indexed, FEATURES)
    assert not problems, "\n".join(problems[:30])
    assert len(indexed) > 100
    mapping = secured_os_admin.indices.get_mapping(index=aliases["OPENSEARCH_INDEX"])
    (properties,) = (m["mappings"]["properties"] for m in mapping.values())
    assert {properties[name]["type"] for name in FEATURES} == {"rank_feature"}
    assert index_docs(secured_os_admin, aliases["OPENSEARCH_AC_INDEX"])  # candidates too

    # No secret anywhere: every line logged (DEBUG and up), every scrape, every dead letter.
    log_lines = run.log_path.read_text(errors="replace").splitlines()
    assert any("password=********" in line for line in log_lines)  # the configuration line
    assert any("search_features_" in body for body in scraped), "no /metrics scrape"
    letters = [value.decode(errors="replace") for value in read_secured(secured_kafka, dlq)]
    broken = sum(1 for m in messages if m.expected_reason is not None)
    assert len(letters) == broken, "every broken message dead-lettered, once"
    secrets = [
        *secured_redis.passwords.values(),
        *secured_kafka.passwords.values(),
        *secured_opensearch.passwords.values(),
    ]
    for text in (*log_lines, *scraped, *letters):
        for secret in secrets:
            assert secret not in text, f"a password in: {text[:200]}"


# --------------------------------------------------------------------------- the reader


def fields_of(family: int, rnd: random.Random) -> dict[str, str]:
    layout = LAYOUTS[family]
    state = None
    for _ in range(rnd.randint(1, 4)):
        counts = tuple(rnd.randint(0, 30) for _ in range(layout.counts))
        state = counters.add(state, layout, NOW - rnd.randrange(29 * 86_400_000), counts)
    assert state is not None
    return fields_for(family, state, NOW, PARAMS)


def test_the_reader_reads_over_tls_as_the_read_only_user(
    secured_redis: SecuredRedis,
    secured_admin: redis.Redis,
    secured_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rnd = random.Random(5)
    docs, query, typed = ["d1", "a:b", "ü", "missing"], "iPhone Case", "ip"
    qhash = keys.query_hash(query)
    writes: list[tuple[str, dict[str, str] | None]] = []
    for doc in docs[:3]:
        writes += [
            (keys.doc_suffix(doc), fields_of(DOC, rnd)),
            (keys.qd_suffix(qhash, doc), fields_of(QD, rnd)),
            (keys.ac_suffix(typed, keys.q_norm(doc)), fields_of(AC, rnd)),
            (keys.acq_suffix(keys.query_hash(doc)), fields_of(ACQ, rnd)),
        ]
    # Written by the sink's own writer, connected as the pipeline's user.
    settings = RedisSettings(
        url=Secret(secured_redis.url(PIPELINE_USER)),
        password=Secret(secured_redis.passwords[PIPELINE_USER]),
        ca_file=secured_redis.ca_file,
        prefix=secured_prefix,
    )
    writer_client = connect(settings)
    try:
        RedisWriter(writer_client, settings, NO_WAIT).write(writes)
    finally:
        writer_client.close()

    def expected(key_list: list[str], record: Any, prior: Prior) -> dict[str, Any]:
        return {
            d: record.parse(secured_admin.hgetall(k), prior)
            for d, k in zip(docs, key_list, strict=True)
        }

    p = secured_prefix
    want = {
        "doc": expected([keys.doc_key(p, d) for d in docs], DocFeatures, PARAMS.doc),
        "qd": expected([keys.qd_key(p, query, d) for d in docs], QueryDocFeatures, PARAMS.qd),
        "ac": expected([keys.ac_key(p, typed, d) for d in docs], AutocompleteFeatures, PARAMS.ac),
        "acq": expected([keys.acq_key(p, d) for d in docs], AutocompleteLink, PARAMS.acq),
    }
    assert sum(r.found for r in want["doc"].values()) == 3

    url, password = secured_redis.url(READER_USER), secured_redis.passwords[READER_USER]
    reader = FeatureReader.from_url(
        url, prefix=p, params=PARAMS, deadline_ms=5000, password=password,
        ca_file=secured_redis.ca_file,
    )  # fmt: skip
    try:
        docs_read, qd_read = reader.ranking_features(query, docs)
        got = {
            "doc": docs_read,
            "qd": qd_read,
            "ac": reader.autocomplete_features(typed, docs),
            "acq": reader.autocomplete_link(docs),
        }
    finally:
        reader.close()
    assert got == want

    # The async reader, with the password and the CA from the environment.
    monkeypatch.setenv("REDIS_PASSWORD", password)
    monkeypatch.setenv("REDIS_CA_FILE", secured_redis.ca_file)

    async def read_async() -> dict[str, Any]:
        areader = AsyncFeatureReader.from_url(url, prefix=p, params=PARAMS, deadline_ms=5000)
        try:
            return await areader.doc_features(docs)
        finally:
            await areader.aclose()

    assert asyncio.run(read_async()) == want["doc"]


def test_a_reader_with_bad_credentials_or_an_untrusted_server_fails_without_the_secret(
    secured_redis: SecuredRedis, secured_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("REDIS_CA_FILE", raising=False)
    url, password = secured_redis.url(READER_USER), secured_redis.passwords[READER_USER]
    cases = {
        "wrong password": {"password": "not-the-password-4711", "ca_file": secured_redis.ca_file},
        "untrusted": {"password": password, "ca_file": None},  # the system's CAs
    }
    for case, options in cases.items():
        reader = FeatureReader.from_url(url, prefix=secured_prefix, deadline_ms=5000, **options)
        with pytest.raises(ReaderError) as caught:
            reader.doc_features(["d1"])
        reader.close()
        text = str(caught.value)
        assert password not in text and "not-the-password-4711" not in text, case
        if case == "untrusted":
            assert "certificate verify failed" in text, text


# --------------------------------------------------------------------------- least rights


def test_each_user_has_only_the_rights_it_needs(
    secured_redis: SecuredRedis, secured_prefix: str
) -> None:
    key = f"{secured_prefix}:doc:x"
    pipeline, reader = secured_redis.client(PIPELINE_USER), secured_redis.client(READER_USER)
    try:
        pipeline.hset(key, "clicks_7d", "1")
        assert reader.hgetall(key) == {b"clicks_7d": b"1"}
        refused = [
            lambda: pipeline.hgetall(key),  # writes, never reads features
            lambda: pipeline.hset("other:doc:x", "a", "1"),  # only keys feat*
            pipeline.flushall,
            lambda: pipeline.config_get("*"),
            lambda: reader.hset(key, "a", "1"),  # read-only
            lambda: reader.hgetall("other:doc:x"),
            lambda: reader.delete(key),
        ]
        for number, call in enumerate(refused):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
                pytest.fail(f"call {number} was allowed")
        assert pipeline.delete(key) == 1
    finally:
        pipeline.close()
        reader.close()
    # The default user is off: no password, no access. Plain TCP gets no answer at all.
    anonymous = redis.Redis.from_url(
        f"rediss://127.0.0.1:{secured_redis.port}/0", ssl_ca_certs=secured_redis.ca_file
    )
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    plain = redis.Redis.from_url(f"redis://127.0.0.1:{secured_redis.port}/0", socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()


# --------------------------------------------------------------------------- bad credentials


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that signed nothing the stack runs."""
    directory = tmp_path_factory.mktemp("other-ca")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"),
         "-subj", "/CN=some other CA"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(directory / "ca.pem")


WRONG = "wr0ng-pa55word-0815"
REDIS_CASES = ["wrong password", "unknown user", "no password", "system CAs", "another CA"]
KAFKA_CASES = ["kafka wrong password", "kafka unknown user", "kafka system CAs"]
OPENSEARCH_CASES = [
    "opensearch wrong password",
    "opensearch unknown user",
    "opensearch system CAs",
    "opensearch another CA",
    "opensearch index without rights",
]


def broken_env(
    case: str,
    good: dict[str, str],
    secured_redis: SecuredRedis,
    other_ca: str,
    tmp: Path,
    other_index: str,
) -> dict[str, str]:
    """The working secured environment `good` with the one thing `case` breaks."""
    env = dict(good)
    if case == "wrong password":  # from a file, as a mounted secret
        del env["REDIS_PASSWORD"]
        env["REDIS_PASSWORD_FILE"] = str(tmp / "password")
        (tmp / "password").write_text(WRONG + "\n")
    elif case == "unknown user":
        env["REDIS_URL"] = secured_redis.url("nobody")
    elif case == "no password":
        del env["REDIS_PASSWORD"]
    elif case == "system CAs":
        del env["REDIS_CA_FILE"]
    elif case == "another CA":
        env["REDIS_CA_FILE"] = other_ca
    elif case == "kafka wrong password":  # from a file too
        del env["KAFKA_SASL_PASSWORD"]
        env["KAFKA_SASL_PASSWORD_FILE"] = str(tmp / "password")
        (tmp / "password").write_text(WRONG + "\n")
    elif case == "kafka unknown user":
        env["KAFKA_SASL_USERNAME"] = "nobody"
    elif case == "kafka system CAs":
        del env["KAFKA_SSL_CA_LOCATION"]
    elif case == "opensearch wrong password":  # from a file too
        del env["OPENSEARCH_PASSWORD"]
        env["OPENSEARCH_PASSWORD_FILE"] = str(tmp / "password")
        (tmp / "password").write_text(WRONG + "\n")
    elif case == "opensearch unknown user":
        env["OPENSEARCH_USERNAME"] = "nobody"
    elif case == "opensearch system CAs":  # opensearch-py's own bundle (certifi)
        del env["OPENSEARCH_CA_FILE"]
    elif case == "opensearch another CA":
        env["OPENSEARCH_CA_FILE"] = other_ca
    elif case == "opensearch index without rights":  # outside doc-features*, ac-features*
        env["OPENSEARCH_INDEX"] = other_index
    return env


@pytest.mark.parametrize("case", REDIS_CASES + KAFKA_CASES + OPENSEARCH_CASES)
def test_bad_credentials_stop_the_pipeline_at_start_with_one_line(
    case: str,
    secured_kafka: SecuredKafka,
    secured_topic_factory: TopicFactory,
    secured_redis: SecuredRedis,
    secured_prefix: str,
    secured_opensearch: SecuredOpenSearch,
    secured_os_admin: OpenSearch,
    aliases: dict[str, str],
    unique_name: str,
    other_ca: str,
    tmp_path: Path,
) -> None:
    good = {
        **kafka_env(secured_kafka),
        **redis_env(secured_redis),
        **opensearch_env(secured_opensearch),
        **aliases,
    }
    other_index = f"other-it-{unique_name}"
    env = broken_env(case, good, secured_redis, other_ca, tmp_path, other_index)
    dlq = secured_topic_factory(prefix="search-events-dlq-it", create=False)
    started = time.monotonic()
    done = run_pipeline(
        KAFKA_TOPICS=secured_topic_factory(1),
        KAFKA_DLQ_TOPIC=dlq,
        FEATURE_PREFIX=secured_prefix,
        **env,
    )
    took = time.monotonic() - started
    line = one_line(done)
    url, brokers, os_url = env["REDIS_URL"], secured_kafka.brokers, secured_opensearch.url
    if case in ("wrong password", "unknown user", "no password"):
        password = {"wrong password": "REDIS_PASSWORD_FILE", "unknown user": "REDIS_PASSWORD"}
        assert line.startswith(f"preflight failed: REDIS_URL={url}: Redis refused the credentials")
        assert line.endswith(
            "; check the user in REDIS_URL and " + password.get(case, "the password in REDIS_URL")
        ), line
    elif case == "system CAs":
        assert line.startswith(
            f"preflight failed: REDIS_CA_FILE=: the TLS certificate of Redis at {url} is not "
            "signed by a CA in the system's trusted CAs (self-signed certificate in certificate "
            "chain); set REDIS_CA_FILE"
        ), line
    elif case == "another CA":  # (the server sends the CA along: "self-signed ... in chain")
        assert line.startswith(
            f"preflight failed: REDIS_CA_FILE={other_ca}: the TLS certificate of Redis at {url} "
            f"is not signed by a CA in '{other_ca}' ("
        ), line
    elif case in ("kafka wrong password", "kafka unknown user"):
        user = env["KAFKA_SASL_USERNAME"]
        password = "KAFKA_SASL_PASSWORD_FILE" if "wrong" in case else "KAFKA_SASL_PASSWORD"
        assert line == (
            f"preflight failed: KAFKA_SASL_USERNAME={user}: Kafka at {brokers} refused the "
            "credentials (SASL authentication error: Authentication failed during "
            "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512); "
            f"check KAFKA_SASL_USERNAME and {password}"
        ), line
    elif case == "kafka system CAs":
        assert line.startswith(
            f"preflight failed: KAFKA_SSL_CA_LOCATION=: the TLS certificate of Kafka at "
            f"{brokers} is not signed by a CA in the system's trusted CAs or does not name the "
            "broker ("
        ), line
        assert "certificate verify failed" in line
    elif case in ("opensearch wrong password", "opensearch unknown user"):
        user = env["OPENSEARCH_USERNAME"]
        password = "OPENSEARCH_PASSWORD_FILE" if "wrong" in case else "OPENSEARCH_PASSWORD"
        assert line == (
            f"preflight failed: OPENSEARCH_USERNAME={user}: OpenSearch at {os_url} refused the "
            f"credentials (HTTP 401); check OPENSEARCH_USERNAME and {password}"
        ), line
    elif case in ("opensearch system CAs", "opensearch another CA"):
        ca, trusted = (
            ("", "opensearch-py's CA bundle") if "system" in case else (other_ca, f"'{other_ca}'")
        )
        assert line.startswith(
            f"preflight failed: OPENSEARCH_CA_FILE={ca}: the TLS certificate of OpenSearch at "
            f"{os_url} is not signed by a CA in {trusted} or does not name the host ("
        ), line
        assert line.endswith("); set OPENSEARCH_CA_FILE to the CA that signed it"), line
    else:  # the security plugin's 403, with the permission it missed
        assert line.startswith(
            f"preflight failed: OPENSEARCH_USERNAME={PIPELINE_USER}: OpenSearch at {os_url} "
            f"does not allow this user to set up and write {other_index} (OPENSEARCH_INDEX) "
            "(HTTP 403: security_exception: no permissions for [indices:admin/aliases/get] "
            f"and User [name={PIPELINE_USER}"
        ), line
        assert line.endswith(
            f"; grant its role the sink's rights on {other_index} and its indices, or set "
            "OPENSEARCH_INDEX to an index it has them on"
        ), line
    passwords = (
        *secured_redis.passwords.values(),
        *secured_kafka.passwords.values(),
        *secured_opensearch.passwords.values(),
    )
    for secret in (WRONG, *passwords):
        assert secret not in done.stdout + done.stderr
    assert took < 20, f"a refused login is told at once, not after the timeout ({took:.1f}s)"
    # Nothing was created: the preflight only looked (OpenSearch) before it failed, and the
    # dead-letter topic comes after every check.
    admin = AdminClient(secured_kafka.client_config())
    assert dlq not in admin.list_topics(timeout=10).topics
    assert made_for(secured_os_admin, unique_name) == []


def test_the_pipeline_user_has_only_its_kafka_rights(
    secured_kafka: SecuredKafka, secured_topic_factory: TopicFactory, unique_name: str
) -> None:
    inputs = secured_topic_factory(1)
    other = secured_topic_factory(1, prefix="other-it")  # outside its ACLs
    pipeline = AdminClient(secured_kafka.client_config(PIPELINE_USER))
    listed = pipeline.list_topics(timeout=10).topics
    assert inputs in listed and other not in listed  # not even its name
    # It may create dead-letter topics, nothing else, and delete none.
    name = f"search-events-it-{unique_name}-made-by-the-pipeline-user"
    new = NewTopic(name, num_partitions=1, replication_factor=1)
    with pytest.raises(KafkaException) as caught:
        pipeline.create_topics([new], operation_timeout=10)[name].result(timeout=30)
    assert caught.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    with pytest.raises(KafkaException) as caught:
        pipeline.delete_topics([inputs], operation_timeout=10)[inputs].result(timeout=30)
    assert caught.value.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    # It reads its input but may not write to it.
    failures: list[KafkaError] = []
    producer = Producer(secured_kafka.client_config(PIPELINE_USER, log_level=0))
    producer.produce(inputs, b"x", on_delivery=lambda err, _msg: failures.append(err))
    producer.flush(30)
    assert [err.code() for err in failures] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]


# --------------------------------------------------------------------------- OpenSearch


def test_the_pipeline_user_has_only_its_opensearch_rights(
    secured_opensearch: SecuredOpenSearch,
    secured_os_admin: OpenSearch,
    aliases: dict[str, str],
    unique_name: str,
) -> None:
    index = aliases["OPENSEARCH_INDEX"]
    pipeline = secured_opensearch.client(PIPELINE_USER)
    try:
        # What the sink does: make its alias and index, write and delete documents.
        target = IndexAdmin(pipeline).ensure(IndexSpec("support", index, "doc", DOC_FEATURES))
        assert target.indices == [f"{index}-000001"]
        body = [
            {"index": {"_index": index, "_id": "d1"}},
            {"doc_id": "d1", "popularity_7d": 2.0, "as_of": NOW},
            {"delete": {"_index": index, "_id": "d0"}},
        ]
        reply = pipeline.bulk(body=body, params={"require_alias": "true"})
        assert [next(iter(item.values()))["status"] for item in reply["items"]] == [201, 404]
        secured_os_admin.indices.refresh(index=index)
        assert secured_os_admin.get(index=index, id="d1")["_source"]["popularity_7d"] == 2.0
        other = f"other-it-{unique_name}"
        refused = [
            lambda: pipeline.search(index=index),  # writes, never reads
            lambda: pipeline.count(index=index),
            lambda: pipeline.indices.delete(index=f"{index}-000001"),
            lambda: pipeline.indices.create(index=other),  # only doc-features*, ac-features*
            lambda: pipeline.index(index=other, body={"a": 1}),
            lambda: pipeline.search(index=".opendistro_security"),
            pipeline.cluster.get_settings,
            lambda: pipeline.cluster.put_settings(body={"persistent": {"x.y": None}}),
            lambda: pipeline.transport.perform_request(
                "GET", "/_plugins/_security/api/internalusers"
            ),
        ]
        for number, call in enumerate(refused):
            with pytest.raises(AuthorizationException):
                call()
                pytest.fail(f"call {number} was allowed")
        assert made_for(secured_os_admin, other) == []
    finally:
        pipeline.close()
    # No login, no access; plain HTTP on its port gets no answer at all.
    anonymous = OpenSearch(hosts=[secured_opensearch.url], ca_certs=secured_opensearch.ca_file)
    with pytest.raises(AuthenticationException):
        anonymous.cluster.health()
    anonymous.close()
    plain = OpenSearch(hosts=[secured_opensearch.url.replace("https", "http")], max_retries=0)
    with pytest.raises(OSConnectionError):
        plain.cluster.health()
    plain.close()


def test_opensearch_over_https_by_either_name_and_without_verification(
    kafka_brokers: str,
    topic_factory: TopicFactory,
    redis_url: str,
    key_prefix: str,
    secured_opensearch: SecuredOpenSearch,
    secured_os_admin: OpenSearch,
    aliases: dict[str, str],
) -> None:
    base = {
        "KAFKA_BROKERS": kafka_brokers,
        "KAFKA_TOPICS": topic_factory(1),
        "KAFKA_DLQ_TOPIC": topic_factory(1),
        "REDIS_URL": redis_url,
        "FEATURE_PREFIX": key_prefix,
        **opensearch_env(secured_opensearch),
        **aliases,
    }
    # By the other name on the certificate: the aliases are made, it runs.
    by_name = secured_opensearch.url.replace("127.0.0.1", "localhost")
    done = run_pipeline(**{**base, "OPENSEARCH_URL": by_name})
    assert done.returncode == 0, done.stderr
    assert secured_os_admin.indices.exists_alias(name=aliases["OPENSEARCH_INDEX"])
    assert "OPENSEARCH_VERIFY_CERTS" not in done.stderr
    # Not verified, on purpose (and so without a CA file): it runs, and says so once.
    del base["OPENSEARCH_CA_FILE"]
    done = run_pipeline(**base, OPENSEARCH_VERIFY_CERTS="false")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "OPENSEARCH_VERIFY_CERTS" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], done.stderr
