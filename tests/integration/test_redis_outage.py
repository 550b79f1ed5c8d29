"""Redis stops for 20 s in the middle of a run (`stack/stack.sh stop redis`) and comes back;
the same `python -m dataflow.run` process rides it out and ends with exact features.

What it proves, and how the test is built so that it can:

- The local Redis runs without persistence, so after the restart it is EMPTY: whatever the
  pipeline wrote before the outage is gone. (The sink's marker check notices that and
  re-writes every live key, tests/integration/test_store_repair.py; this test does not rely
  on it.) So the stream is made such that every key is written again after the outage: one
  Kafka partition (read in order) holding a first day of events (day D-2) and then a
  second day (D-1). When the clock enters D-1, every live key of every shard is re-stated
  (docs/architecture.md, "The clock and `as_of`"), each with an absolute `HSET` of every
  field. The test stops Redis once the pipeline has written (so the outage interrupts a
  running pipeline with writes in flight) and checks, on `/metrics` while the sink is
  down, that the pipeline clock is still in D-2: with one worker a waiting sink holds every
  step, so the day change, and with it the re-statement of every key, happens after Redis
  is back.
- Then the final Redis equals the reference model of the whole stream, byte for byte, for
  every family. That holds only if nothing the pipeline held was lost across the outage:
  the chunk it was writing when Redis went away was sent again, the batch it was in was
  finished, and the rest of the topic was read afterwards, by the same process (its exit
  status is checked; it was never restarted).
- `/metrics` kept being served during the outage, showed `search_features_sink_up
  {sink="redis"}` at 0, and the messages read stayed put (the pipeline stopped consuming);
  the log has one line when the outage started and one when it ended, not one per retry.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from dataflow.kafka.topics import produce
from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.conftest import http_get
from tests.integration.harness import REPO, PipelineProcess, dump, free_port, pipeline_env
from tests.reference_model import diff_stores, expected_store, select_families

WIRED = ("doc", "qd", "ac", "acq")
DAY_MS = 86_400_000
OUTAGE_S = 20.0
STACK = REPO / "stack" / "stack.sh"
SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    out = {}
    for line in http_get(port, "/metrics", timeout=5).decode().splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = frozenset(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        out[(name, pairs)] = float(value)
    return out


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def stack(command: str) -> None:
    subprocess.run(
        [str(STACK), command, "redis"], cwd=REPO, check=True, capture_output=True, timeout=120
    )


def test_a_redis_outage_mid_run_is_ridden_out_and_the_features_are_exact(
    kafka_brokers: str,
    topic_factory: Any,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    today = int(time.time() * 1000) // DAY_MS * DAY_MS
    first_day, second_day = today - 2 * DAY_MS, today - DAY_MS
    day = {"n_docs": 3_000, "n_queries": 300, "span_ms": DAY_MS - 3_600_000}
    messages = [
        *generate(GeneratorConfig(seed=11, n_events=40_000, start_ms=first_day, **day)),  # type: ignore[arg-type]
        *generate(GeneratorConfig(seed=12, n_events=4_000, start_ms=second_day, **day)),  # type: ignore[arg-type]
    ]
    topic, dlq = topic_factory(1), topic_factory(1)
    produce(kafka_brokers, topic, messages)
    port = free_port()
    env = pipeline_env(
        brokers=kafka_brokers,
        topic=topic,
        dlq=dlq,
        redis_url=redis_url,
        prefix=key_prefix,
        METRICS_ENABLED="true",
        BYTEWAX_DATAFLOW_API_PORT=str(port),
        KAFKA_BATCH_SIZE="200",
        FEATURE_FLUSH_INTERVAL_MS="200",
        REDIS_BACKOFF_MAX_SECONDS="1",
    )
    run = PipelineProcess(env, tmp_path / "run.log")
    stopped_at = None
    down_scrapes: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []
    try:
        # Wait until it has written to Redis, then take Redis away.
        deadline = time.monotonic() + 60
        while True:
            assert run.alive(), f"the pipeline ended before it wrote:\n{run.tail()}"
            assert time.monotonic() < deadline, f"no Redis write within 60 s:\n{run.tail()}"
            try:
                samples = scrape(port)
            except OSError:
                samples = {}
            if value(samples, "search_features_sink_writes_total", result="success", sink="redis"):
                break
            time.sleep(0.05)
        stack("stop")
        stopped_at = time.monotonic()
        # Meanwhile: /metrics answers, the sink is down, nothing more is read.
        while time.monotonic() - stopped_at < OUTAGE_S:
            assert run.alive(), f"the pipeline stopped during the outage:\n{run.tail()}"
            samples = scrape(port)  # raises if /metrics stopped answering
            if value(samples, "search_features_sink_up", sink="redis") == 0.0:
                down_scrapes.append(samples)
            time.sleep(0.5)
    finally:
        stack("start")
    outage = time.monotonic() - (stopped_at or 0.0)
    run.wait_ok(timeout=180)

    assert len(down_scrapes) >= 10, "/metrics never showed the Redis sink down"
    # The worker goes on until it next hands writes to its writer thread (`WriteBehind`),
    # which is retrying: within a flush interval; from then on it reads nothing.
    read = [
        value(s, "search_features_messages_total", topic=topic, partition="0") for s in down_scrapes
    ]
    assert len(set(read[4:])) == 1, f"messages were read while Redis was down: {read}"
    clock = max(value(s, "search_features_clock_seconds") for s in down_scrapes)
    assert 0 < clock * 1000 < second_day, (
        "the pipeline reached the second day before Redis stopped: keys written before the "
        "outage are not all re-written after it, so this run proves less; make the first "
        f"day longer for this machine ({run.log_path})"
    )

    log = run.log_path.read_text()
    down_lines = [line for line in log.splitlines() if "redis unreachable" in line]
    back_lines = [line for line in log.splitlines() if "redis answers again" in line]
    assert len(down_lines) == 1 and len(back_lines) == 1, log[-3000:]
    down_for = float(re.search(r"down_seconds=([\d.]+)", back_lines[0]).group(1))  # type: ignore[union-attr]
    assert OUTAGE_S - 1 < down_for < outage + 5, (down_for, outage)
    assert "redis write failed, retrying" not in log  # retries are DEBUG lines

    client = redis.Redis.from_url(redis_url)
    try:
        stored = select_families(dump(client, key_prefix), WIRED, prefix=key_prefix)
    finally:
        client.close()
    events = [m.event for m in messages if m.event is not None]
    expected = select_families(expected_store(events, prefix=key_prefix), WIRED, prefix=key_prefix)
    assert len(expected) > 5_000
    diffs = diff_stores(stored, expected)
    assert not diffs, f"{len(diffs)} differences, e.g.\n" + "\n".join(diffs[:10])
