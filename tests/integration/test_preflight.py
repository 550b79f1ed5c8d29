"""`python -m dataflow.run`'s preflight on the real services: each failure is one line on
stderr naming the variable and its value (secrets masked), exit status 3, no traceback; what
the pipeline may create (the dead-letter topic, the OpenSearch aliases) it creates, says so,
and runs.

Each case runs `python -m dataflow.run` as a subprocess with a short environment: only the
variables it names, so nothing of the developer's shell leaks in.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from opensearchpy import OpenSearch

from dataflow.recovery import ensure_recovery_dir
from tests.integration.harness import REPO

PREFLIGHT_FAILED = 3


def closed_port() -> int:
    """A local port nothing listens on (bound, then released: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run_pipeline(**env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PYTHONPATH": str(REPO),
        "KAFKA_STOP_AT_END": "true",
        "OPENSEARCH_URL": "",
        "METRICS_ENABLED": "false",
        "FEATURE_SHARDS": "4",
    }
    return subprocess.run(
        [sys.executable, "-m", "dataflow.run"],
        env={**base, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed preflight (and nothing on stdout)."""
    lines = done.stderr.splitlines()
    assert done.returncode == PREFLIGHT_FAILED, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    return lines[0]


@pytest.fixture
def kafka_env(
    kafka_brokers: str, topic_factory: Any, redis_url: str, key_prefix: str
) -> dict[str, str]:
    """A complete, working environment: a topic, a dead-letter topic, Redis."""
    return {
        "KAFKA_BROKERS": kafka_brokers,
        "KAFKA_TOPICS": topic_factory(1),
        "KAFKA_DLQ_TOPIC": topic_factory(1),
        "REDIS_URL": redis_url,
        "FEATURE_PREFIX": key_prefix,
    }


def topic_names(admin: AdminClient) -> set[str]:
    return set(admin.list_topics(timeout=10).topics)


def test_a_missing_input_topic_is_named_and_never_created(
    kafka_env: dict[str, str], kafka_admin: AdminClient, unique_name: str
) -> None:
    missing = f"it-{unique_name}-never-made"
    topics = f"{kafka_env['KAFKA_TOPICS']},{missing}"
    line = one_line(run_pipeline(**{**kafka_env, "KAFKA_TOPICS": topics}))
    assert line == (
        f"preflight failed: KAFKA_TOPICS={topics}: topic '{missing}' does not exist on "
        f"{kafka_env['KAFKA_BROKERS']} (or this user may not describe it); create it first: "
        "the pipeline never creates its input topics"
    )
    # The local broker auto-creates topics a client asks for by name: nothing asked.
    assert missing not in topic_names(kafka_admin)


def test_an_unreachable_redis_is_named_with_its_url(kafka_env: dict[str, str]) -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    line = one_line(run_pipeline(**{**kafka_env, "REDIS_URL": url}))
    assert line.startswith(f"preflight failed: REDIS_URL={url}: cannot connect (")
    assert "Connection refused" in line


def test_a_wrong_redis_password_is_named_with_the_password_masked(
    kafka_env: dict[str, str], redis_url: str
) -> None:
    # The local Redis has no password for its default user; a user that does not exist
    # fails authentication the same way a wrong password does (WRONGPASS).
    url = redis_url.replace("redis://", "redis://nobody:hunter2-s3cret@")
    line = one_line(run_pipeline(**{**kafka_env, "REDIS_URL": url}))
    shown = redis_url.replace("redis://", "redis://nobody:****@")
    assert line.startswith(f"preflight failed: REDIS_URL={shown}: Redis refused the credentials")
    assert "hunter2-s3cret" not in line


def test_an_unreachable_opensearch_is_named_with_its_url_masked(
    kafka_env: dict[str, str],
) -> None:
    port = closed_port()
    env = {**kafka_env, "OPENSEARCH_URL": f"http://admin:os-pa55@127.0.0.1:{port}"}
    line = one_line(run_pipeline(**env))
    assert line.startswith(
        f"preflight failed: OPENSEARCH_URL=http://admin:****@127.0.0.1:{port}: no answer ("
    )
    assert "Connection refused" in line
    assert "os-pa55" not in line


def test_unreachable_brokers_are_named(kafka_env: dict[str, str]) -> None:
    brokers = f"127.0.0.1:{closed_port()}"
    line = one_line(run_pipeline(**{**kafka_env, "KAFKA_BROKERS": brokers}))
    assert line.startswith(f"preflight failed: KAFKA_BROKERS={brokers}: no broker answered")


@pytest.fixture
def fresh_names(
    unique_name: str, kafka_admin: AdminClient, opensearch_client: OpenSearch
) -> Iterator[dict[str, str]]:
    """A dead-letter topic and two aliases that do not exist yet; removed afterwards."""
    names = {
        "KAFKA_DLQ_TOPIC": f"it-{unique_name}-dlq-made",
        "OPENSEARCH_INDEX": f"pf-{unique_name}-doc",
        "OPENSEARCH_AC_INDEX": f"pf-{unique_name}-ac",
    }
    yield names
    dlq = names["KAFKA_DLQ_TOPIC"]
    if dlq in topic_names(kafka_admin):
        kafka_admin.delete_topics([dlq], operation_timeout=30)[dlq].result(timeout=60)
    opensearch_client.indices.delete(index=f"pf-{unique_name}-*", ignore_unavailable=True)


def test_the_dead_letter_topic_and_the_aliases_are_created_and_the_run_goes_on(
    kafka_env: dict[str, str],
    fresh_names: dict[str, str],
    opensearch_url: str,
    opensearch_client: OpenSearch,
    kafka_admin: AdminClient,
) -> None:
    env = {**kafka_env, **fresh_names, "OPENSEARCH_URL": opensearch_url}
    done = run_pipeline(**env)
    assert done.returncode == 0, done.stderr  # an empty input topic: read to its end
    assert "created the dead-letter topic" in done.stderr
    assert fresh_names["KAFKA_DLQ_TOPIC"] in topic_names(kafka_admin)
    for alias in (fresh_names["OPENSEARCH_INDEX"], fresh_names["OPENSEARCH_AC_INDEX"]):
        assert list(opensearch_client.indices.get_alias(name=alias)) == [f"{alias}-000001"]
    # Run again: everything exists now, nothing is created or said.
    again = run_pipeline(**env)
    assert again.returncode == 0, again.stderr
    assert "created the dead-letter topic" not in again.stderr


def test_with_recovery_a_state_topic_that_deletes_by_age_is_named(
    kafka_env: dict[str, str], topic_factory: Any, tmp_path: Any
) -> None:
    state = topic_factory(1)  # the broker's default: cleanup.policy=delete
    ensure_recovery_dir(tmp_path / "r", 1)  # made beforehand: its creation is logged
    env = {**kafka_env, "KAFKA_STATE_TOPIC": state, "RECOVERY_DIR": str(tmp_path / "r")}
    line = one_line(run_pipeline(**env))
    assert line == (
        f"preflight failed: KAFKA_STATE_TOPIC={state}: cleanup.policy is 'delete'; it must be "
        "'compact' (with 'delete' Kafka would drop segments that recovery snapshots refer "
        "to): alter the topic, or name a new one"
    )
