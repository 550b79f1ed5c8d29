"""Fixtures for tests against the real services of the local stack (`make up`).

Every service fixture first checks that its service answers, and fails the test (never
skips) with "run `make up`" when it does not: a skipped integration suite shows green in
CI while testing nothing. The checks run once per session.

Ports come from the same environment variables as stack/stack.sh (KAFKA_PORT, REDIS_PORT,
OPENSEARCH_PORT, PROMETHEUS_PORT, METRICS_PORTS); everything listens on 127.0.0.1.

Isolation and cleanup, so tests can share one long-lived stack:
- `unique_name` gives each test a fresh token (`t` + 8 hex digits) for its names.
- `topic_factory` topics are named `<prefix>-<token>-<n>` and are deleted at the end of
  the session, not after each test: deleting a topic while a consumer of a failed test
  still polls it only adds noise. Set KEEP_TEST_TOPICS=1 to keep them for debugging.
- Redis keys under `key_prefix` are deleted after each test.
- Indices and consumer groups are the test's own business (use `unique_name`).

The secured side of the stack (`redis-tls`: TLS only, ACL users with passwords;
`kafka-sasl`: SASL_SSL with SCRAM-SHA-512 users and ACLs; `opensearch-secure`: the
security plugin, https only, internal users and roles) is reached through `secured_redis`,
`secured_kafka` and `secured_opensearch`: their ports (REDIS_TLS_PORT, KAFKA_SASL_PORT,
OPENSEARCH_SECURE_PORT), the stack's CA and the users' password files under STACK_DIR
(default `<repo>/.stack`), as `stack/stack.sh secured` lists them.
`secured_topic_factory` makes topics there (as stack-admin), deleted at the end of the
session; `secured_os_admin` is the secured OpenSearch as stack-admin.

Every test collected under tests/integration is marked `integration`, so
`pytest -m "not integration"` runs without the stack.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode

import pytest
import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from opensearchpy import OpenSearch, OpenSearchException

HOST = "127.0.0.1"
INTEGRATION_DIR = Path(__file__).resolve().parent
# How long a freshly created topic may take to get a leader for every partition.
TOPIC_READY_TIMEOUT_S = 30.0

TopicFactory = Callable[..., str]
PrometheusApi = Callable[..., Any]
PrometheusQuery = Callable[[str], list[dict[str, Any]]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, not only this directory's.
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)


def _port(var: str, default: int) -> int:
    raw = os.environ.get(var, str(default))
    try:
        return int(raw)
    except ValueError:
        pytest.fail(f"{var}={raw!r} is not a port number", pytrace=False)


def _unavailable(service: str, where: str, reason: object) -> NoReturn:
    message = (
        f"{service} is not answering at {where} ({reason}); run `make up` "
        "(`make status` shows what runs, the logs are under .stack/logs/)"
    )
    # `from None`: the reason is in the message; the chained traceback would only bury it.
    raise pytest.fail.Exception(message, pytrace=False) from None


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    """GET http://127.0.0.1:<port><path>; raises OSError unless the answer is 200."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"GET {path} returned HTTP {resp.status}: {body[:200]!r}")
    return body


def http_get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    return json.loads(http_get(port, path, timeout))


# --------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="session")
def kafka_brokers() -> str:
    """`127.0.0.1:<KAFKA_PORT>`, once the broker has answered a metadata request."""
    port = _port("KAFKA_PORT", 9092)
    brokers = f"{HOST}:{port}"
    # A plain connect first: librdkafka would retry a refused port for the whole timeout
    # and print a line per attempt.
    try:
        socket.create_connection((HOST, port), timeout=3).close()
    except OSError as exc:
        _unavailable("Kafka", brokers, exc)
    probe = AdminClient({"bootstrap.servers": brokers, "log_level": 3})
    try:
        metadata = probe.list_topics(timeout=10)
    except KafkaException as exc:
        _unavailable("Kafka", brokers, exc)
    if not metadata.brokers:
        _unavailable("Kafka", brokers, "the metadata lists no broker")
    return brokers


@pytest.fixture(scope="session")
def kafka_admin(kafka_brokers: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_brokers})


def _wait_for_topic(admin: AdminClient, topic: str, partitions: int) -> None:
    """create_topics returns when the controller accepted the topic; a producer or an
    assign() right after may still see no leader. Wait until every partition has one."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    state = "not in the metadata"
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if meta is not None and meta.error is None:
            leaders = [p.leader for p in meta.partitions.values()]
            if len(leaders) == partitions and all(leader >= 0 for leader in leaders):
                return
            state = f"partition leaders {leaders}"
        elif meta is not None:
            state = str(meta.error)
        time.sleep(0.1)
    pytest.fail(f"topic {topic} not ready after {TOPIC_READY_TIMEOUT_S}s: {state}")


@pytest.fixture(scope="session")
def _session_topics(kafka_admin: AdminClient) -> Iterator[list[str]]:
    topics: list[str] = []
    yield topics
    if not topics or os.environ.get("KEEP_TEST_TOPICS"):
        return
    failures = []
    for topic, future in kafka_admin.delete_topics(topics, operation_timeout=30).items():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            # A test may have deleted its topic itself; anything else is a broker problem.
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                failures.append(f"{topic}: {exc}")
    assert not failures, f"could not delete test topics: {failures}"


@pytest.fixture
def topic_factory(
    kafka_admin: AdminClient, _session_topics: list[str], unique_name: str
) -> TopicFactory:
    """`topic_factory(partitions=1, prefix="it", config=None) -> name`: creates a topic
    with a name no other test uses and returns once every partition has a leader."""
    counter = itertools.count()

    def create(
        partitions: int = 1, *, prefix: str = "it", config: dict[str, str] | None = None
    ) -> str:
        name = f"{prefix}-{unique_name}-{next(counter)}"
        new = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
        kafka_admin.create_topics([new], operation_timeout=30)[name].result(timeout=60)
        _session_topics.append(name)
        _wait_for_topic(kafka_admin, name, partitions)
        return name

    return create


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    """`redis://127.0.0.1:<REDIS_PORT>/0`, once Redis has answered a PING."""
    url = f"redis://{HOST}:{_port('REDIS_PORT', 6379)}/0"
    probe = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        probe.ping()
    except redis.RedisError as exc:
        _unavailable("Redis", url, exc)
    finally:
        probe.close()
    return url


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """Bytes in, bytes out (decode_responses=False), as the feature store stores them."""
    client = redis.Redis.from_url(redis_url, decode_responses=False, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis, unique_name: str) -> Iterator[str]:
    """`it_<token>` (FEATURE_PREFIX allows no colon), so it can serve as FEATURE_PREFIX. Every key
    starting with it is deleted after the test."""
    prefix = f"it_{unique_name}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        redis_client.delete(*keys[start : start + 500])


# --------------------------------------------------------------------------- the secured side

STACK_DIR = Path(os.environ.get("STACK_DIR") or INTEGRATION_DIR.parents[1] / ".stack")

# The secured Redis's ACL users (stack/stack.sh, configure_redis-tls) and their password files.
REDIS_USERS = {
    "search-features": "redis-pipeline",  # the pipeline: PING HSET HMGET EXPIRE DEL SCAN
    "ranking": "redis-reader",  # the reader: HGETALL PING, read-only on feat*
    "stack-admin": "redis-admin",  # everything
}


@dataclass(frozen=True)
class SecuredRedis:
    """The stack's TLS-only Redis: `url(user)` carries no password; `passwords[user]`."""

    port: int
    ca_file: str
    passwords: Mapping[str, str] = field(repr=False)  # never in a test report

    def url(self, user: str, host: str = HOST) -> str:
        return f"rediss://{user}@{host}:{self.port}/0"

    def client(self, user: str = "stack-admin", **options: Any) -> redis.Redis:
        options = {"socket_timeout": 10, "socket_connect_timeout": 5, **options}
        return redis.Redis.from_url(
            self.url(user), password=self.passwords[user], ssl_ca_certs=self.ca_file, **options
        )


@pytest.fixture(scope="session")
def secured_redis() -> Iterator[SecuredRedis]:
    """The secured Redis, once its admin user has answered a PING over TLS."""
    port = _port("REDIS_TLS_PORT", 6380)
    where = f"rediss://127.0.0.1:{port}"
    ca_file = STACK_DIR / "tls" / "ca.pem"
    try:
        passwords = {
            user: (STACK_DIR / "secrets" / f"{name}.password").read_text().strip()
            for user, name in REDIS_USERS.items()
        }
        ca_file.read_bytes()
    except OSError as exc:
        _unavailable("The secured Redis", where, exc)
    secured = SecuredRedis(port, str(ca_file), passwords)
    probe = secured.client(socket_timeout=5)
    try:
        probe.ping()
    except redis.RedisError as exc:
        _unavailable("The secured Redis", where, exc)
    finally:
        probe.close()
    yield secured


@pytest.fixture(scope="session")
def secured_admin(secured_redis: SecuredRedis) -> Iterator[redis.Redis]:
    """The secured Redis as its admin user (bytes in, bytes out)."""
    client = secured_redis.client()
    yield client
    client.close()


@pytest.fixture
def secured_prefix(secured_admin: redis.Redis, unique_name: str) -> Iterator[str]:
    """`feat_it_<token>`: a FEATURE_PREFIX inside the ACL users' key pattern `feat*`; every key
    under it is deleted after the test."""
    prefix = f"feat_it_{unique_name}"
    yield prefix
    keys = list(secured_admin.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        secured_admin.delete(*keys[start : start + 500])


# The secured Kafka's SCRAM users and their password files.
KAFKA_USERS = {"search-features": "kafka-pipeline", "stack-admin": "kafka-admin"}


@dataclass(frozen=True)
class SecuredKafka:
    """The stack's SASL_SSL broker: `client_config(user)` logs in as that user."""

    brokers: str
    ca_file: str
    passwords: Mapping[str, str] = field(repr=False)  # never in a test report

    def client_config(self, user: str = "stack-admin", **extra: Any) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.brokers,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": self.passwords[user],
            "ssl.ca.location": self.ca_file,
            **extra,
        }


@pytest.fixture(scope="session")
def secured_kafka() -> SecuredKafka:
    """The secured broker, once stack-admin has listed its topics over SASL_SSL."""
    port = _port("KAFKA_SASL_PORT", 9094)
    brokers = f"{HOST}:{port}"
    try:
        passwords = {
            user: (STACK_DIR / "secrets" / f"{name}.password").read_text().strip()
            for user, name in KAFKA_USERS.items()
        }
        socket.create_connection((HOST, port), timeout=3).close()
    except OSError as exc:
        _unavailable("The secured Kafka", brokers, exc)
    secured = SecuredKafka(brokers, str(STACK_DIR / "tls" / "ca.pem"), passwords)
    try:
        AdminClient(secured.client_config(log_level=3)).list_topics(timeout=10)
    except KafkaException as exc:
        _unavailable("The secured Kafka", brokers, exc)
    return secured


@pytest.fixture(scope="session")
def _secured_topics(secured_kafka: SecuredKafka) -> Iterator[list[str]]:
    topics: list[str] = []
    yield topics
    if topics and not os.environ.get("KEEP_TEST_TOPICS"):
        admin = AdminClient(secured_kafka.client_config())
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            with contextlib.suppress(KafkaException):  # never created (a dead-letter name)
                future.result(timeout=60)


@pytest.fixture
def secured_topic_factory(
    secured_kafka: SecuredKafka, _secured_topics: list[str], unique_name: str
) -> TopicFactory:
    """`secured_topic_factory(partitions=1, prefix="search-events-it", create=True)`: a topic
    on the secured broker, inside the pipeline user's ACLs (`search-events*` to read,
    `search-events-dlq*` to write and create); `create=False` only names one (deleted at the
    end of the session all the same, if something made it)."""
    counter = itertools.count()
    admin = AdminClient(secured_kafka.client_config())

    def make(partitions: int = 1, *, prefix: str = "search-events-it", create: bool = True) -> str:
        name = f"{prefix}-{unique_name}-{next(counter)}"
        _secured_topics.append(name)
        if create:
            new = NewTopic(name, num_partitions=partitions, replication_factor=1)
            admin.create_topics([new], operation_timeout=30)[name].result(timeout=60)
            _wait_for_topic(admin, name, partitions)
        return name

    return make


# The secured OpenSearch's internal users and their password files.
OPENSEARCH_USERS = {
    "search-features": "opensearch-pipeline",  # the sink: its aliases and their indices
    "stack-admin": "opensearch-admin",  # all_access
}


@dataclass(frozen=True)
class SecuredOpenSearch:
    """The stack's OpenSearch with the security plugin: `client(user)` logs in as that user
    over https, the certificate verified against the stack's CA."""

    url: str
    ca_file: str
    passwords: Mapping[str, str] = field(repr=False)  # never in a test report

    def client(self, user: str = "stack-admin", **options: Any) -> OpenSearch:
        return OpenSearch(
            hosts=[self.url],
            http_auth=(user, self.passwords[user]),
            ca_certs=self.ca_file,
            verify_certs=True,
            **{"timeout": 30, **options},
        )


@pytest.fixture(scope="session")
def secured_opensearch() -> SecuredOpenSearch:
    """The secured OpenSearch, once stack-admin has seen its cluster green or yellow."""
    port = _port("OPENSEARCH_SECURE_PORT", 9201)
    url = f"https://{HOST}:{port}"
    try:
        passwords = {
            user: (STACK_DIR / "secrets" / f"{name}.password").read_text().strip()
            for user, name in OPENSEARCH_USERS.items()
        }
    except OSError as exc:
        _unavailable("The secured OpenSearch", url, exc)
    secured = SecuredOpenSearch(url, str(STACK_DIR / "tls" / "ca.pem"), passwords)
    probe = secured.client(timeout=10)
    try:
        health = probe.cluster.health()
    except OpenSearchException as exc:
        _unavailable("The secured OpenSearch", url, exc)
    finally:
        probe.close()
    if health.get("status") not in ("green", "yellow"):
        _unavailable("The secured OpenSearch", url, f"cluster health is {health.get('status')}")
    return secured


@pytest.fixture(scope="session")
def secured_os_admin(secured_opensearch: SecuredOpenSearch) -> Iterator[OpenSearch]:
    """The secured OpenSearch as stack-admin."""
    client = secured_opensearch.client()
    yield client
    client.close()


# --------------------------------------------------------------------------- OpenSearch


@pytest.fixture(scope="session")
def opensearch_url() -> str:
    """`http://127.0.0.1:<OPENSEARCH_PORT>`, once the cluster health is green or yellow."""
    port = _port("OPENSEARCH_PORT", 9200)
    url = f"http://{HOST}:{port}"
    try:
        health = http_get_json(port, "/_cluster/health")
    except (OSError, ValueError) as exc:
        _unavailable("OpenSearch", url, exc)
    if health.get("status") not in ("green", "yellow"):
        _unavailable("OpenSearch", url, f"cluster health is {health.get('status')}")
    return url


@pytest.fixture(scope="session")
def opensearch_client(opensearch_url: str) -> Iterator[OpenSearch]:
    client = OpenSearch(hosts=[opensearch_url], timeout=30)
    yield client
    client.close()


# --------------------------------------------------------------------------- Prometheus


@pytest.fixture(scope="session")
def prometheus_url() -> str:
    """`http://127.0.0.1:<PROMETHEUS_PORT>`, once /-/ready answers."""
    port = _port("PROMETHEUS_PORT", 9090)
    url = f"http://{HOST}:{port}"
    try:
        http_get(port, "/-/ready")
    except (OSError, ValueError) as exc:
        _unavailable("Prometheus", url, exc)
    return url


@pytest.fixture(scope="session")
def prometheus_api(prometheus_url: str) -> PrometheusApi:
    """`prometheus_api("/api/v1/targets", state="active") -> decoded JSON body` of a GET on
    Prometheus' HTTP API (the whole body, "status" included)."""
    port = _port("PROMETHEUS_PORT", 9090)

    def get(path: str, **params: str) -> Any:
        return http_get_json(port, path + ("?" + urlencode(params) if params else ""))

    return get


@pytest.fixture(scope="session")
def prometheus_query(prometheus_api: PrometheusApi) -> PrometheusQuery:
    """`prometheus_query(expr) -> result list` of an instant query; raises unless
    Prometheus answers with status success."""

    def query(expr: str) -> list[dict[str, Any]]:
        body = prometheus_api("/api/v1/query", query=expr)
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    return query


@pytest.fixture(scope="session")
def metrics_ports() -> list[int]:
    """The pipeline's metrics ports that Prometheus scrapes (METRICS_PORTS, default 3030,3031)."""
    raw = os.environ.get("METRICS_PORTS", "3030,3031")
    return [int(p) for p in raw.split(",") if p.strip()]


# --------------------------------------------------------------------------- naming


@pytest.fixture
def unique_name() -> str:
    """A short token no other test (or earlier run) uses: `t` + 8 hex digits."""
    return f"t{uuid.uuid4().hex[:8]}"
