"""What an operator reads: a pipeline run at INFO over a small topic, on the real services,
with dead letters (the producer) and OpenSearch (the HTTP client) in use, logs its own lines
only: no line per HTTP request, nothing printed by librdkafka (no `CONFWARN` about a
consumer setting given to a producer or an admin client), and the configuration once, as a
short block in text or one JSON object in JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opensearchpy import OpenSearch

from dataflow.kafka.topics import produce
from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.harness import REPO, pipeline_env

DAY_MS = 86_400_000
REQUEST_LINE = re.compile(r"\[status:\S+ request:[\d.]+s\]")  # opensearch-py's per request
LIBRDKAFKA_LINE = re.compile(r"^%\d\|")  # librdkafka prints `%LEVEL|time|FAC|client| ...`


@pytest.fixture
def aliases(unique_name: str, opensearch_client: OpenSearch) -> Iterator[dict[str, str]]:
    names = {
        "OPENSEARCH_INDEX": f"lg-{unique_name}-doc",
        "OPENSEARCH_AC_INDEX": f"lg-{unique_name}-ac",
    }
    yield names
    opensearch_client.indices.delete(index=f"lg-{unique_name}-*", ignore_unavailable=True)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_run_at_info_logs_no_library_request_lines_and_no_librdkafka_warnings(
    fmt: str,
    kafka_brokers: str,
    topic_factory: Any,
    redis_url: str,
    key_prefix: str,
    opensearch_url: str,
    aliases: dict[str, str],
) -> None:
    topic, dlq = topic_factory(2), topic_factory(1)
    now = int(time.time() * 1000)
    messages = generate(
        GeneratorConfig(
            seed=7,
            n_events=600,
            n_docs=40,
            n_queries=8,
            start_ms=now - DAY_MS,
            span_ms=DAY_MS - 60_000,
            invalid_fraction=0.05,  # dead letters: the producer runs
        )
    )
    produce(kafka_brokers, topic, messages)
    env = pipeline_env(
        brokers=kafka_brokers,
        topic=topic,
        dlq=dlq,
        redis_url=redis_url,
        prefix=key_prefix,
        OPENSEARCH_URL=opensearch_url,  # new aliases: the preflight creates them
        OPENSEARCH_PARTITIONS="2",
        LOG_LEVEL="INFO",
        LOG_FORMAT=fmt,
        KAFKA_SASL_PASSWORD="never-sh0wn",  # noqa: S106 - unused on PLAINTEXT, logged masked
        **aliases,
    )
    done = subprocess.run(
        [sys.executable, "-m", "dataflow.run"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = output.splitlines()
    assert "dead letters written" in output  # the producer did run
    assert not [line for line in lines if REQUEST_LINE.search(line)], output
    assert not [line for line in lines if LIBRDKAFKA_LINE.match(line)], output
    assert "CONFWARN" not in output
    assert "never-sh0wn" not in output
    starts = [i for i, line in enumerate(lines) if "starting search_features" in line]
    assert len(starts) == 1, output
    if fmt == "json":
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        config = records[starts[0]]["config"]
        assert config["kafka"]["topics"] == [topic]
        assert config["kafka"]["sasl_password"] == "********"  # noqa: S105
        return
    block = lines[starts[0] : starts[0] + 6]
    assert block[1].startswith(f"  kafka: brokers={kafka_brokers} topics={topic} ")
    assert "sasl_password=********" in block[1]
    assert block[2].startswith(f"  redis: url={redis_url} prefix={key_prefix} ")
    assert block[3].startswith(f"  opensearch: url={opensearch_url} ")
    assert block[4].startswith("  features: ")
