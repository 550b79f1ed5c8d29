"""A Redis that lost what the pipeline wrote is repaired, with no new event to help.

The stream lies inside ONE UTC day (yesterday), so the daily re-statement (which re-writes
every live key when the clock enters a new day) cannot be what brings the keys back: the
clock enters that day at the first event and never leaves it. The pipeline runs in tail
mode (`KAFKA_STOP_AT_END=false`) with recovery, so after the topic is read it sits idle,
its shards with no event and no timer.

- `FLUSHDB` under the running pipeline: its marker check (every `STORE_CHECK_SECONDS`)
  finds the marker gone, every shard queues every live key and re-writes it at
  `RESTATE_KEYS_PER_SECOND`; the store ends equal to the reference model, every key with
  its TTL, within the bound below, and no faster than the rate allows. The flush runs on a
  Redis database of its own (`PRIVATE_DB`), so it takes no other test's keys with it.
- `python -m dataflow.tools.resync` after keys were deleted and edited behind the marker's
  back (a restored backup does that): it deletes the marker, the running pipeline re-writes
  every key, the command follows it and exits 0 once the store is whole again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from dataflow.kafka.topics import produce
from dataflow.recovery import ensure_recovery_dir
from dataflow.sinks.marker import Mark, mark_field, marker_key
from dataflow.tools.generator import GeneratedMessage, GeneratorConfig, generate
from tests.integration.conftest import http_get
from tests.integration.harness import PipelineProcess, dump, free_port, pipeline_env
from tests.reference_model import diff_stores, expected_store, select_families

WIRED = ("doc", "qd", "ac", "acq")
DAY_MS = 86_400_000
RATE = 2_000
"""RESTATE_KEYS_PER_SECOND of these runs: the ~8,500 keys take about 4 s to re-write."""
CHECK_S = 1.0
"""STORE_CHECK_SECONDS of these runs."""
SLACK_S = 15.0
"""Beyond keys / RATE: the check interval, the wake-up, an epoch, a loaded machine."""
PRIVATE_DB = 9
SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$")


def one_day(seed: int) -> list[GeneratedMessage]:
    today = int(time.time() * 1000) // DAY_MS * DAY_MS
    return list(
        generate(
            GeneratorConfig(
                seed=seed,
                n_events=30_000,
                n_docs=3_000,
                n_queries=300,
                start_ms=today - DAY_MS,
                span_ms=DAY_MS - 3_600_000,
            )
        )
    )


def expected(messages: list[GeneratedMessage], prefix: str) -> dict[str, dict[str, str]]:
    events = [m.event for m in messages if m.event is not None]
    store = select_families(expected_store(events, prefix=prefix), WIRED, prefix=prefix)
    return store  # type: ignore[return-value]


def stored(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    return select_families(dump(client, prefix), WIRED, prefix=prefix)  # type: ignore[return-value]


def metric(port: int, name: str, **labels: str) -> float:
    want = set(labels.items())
    for line in http_get(port, "/metrics", timeout=5).decode().splitlines():
        match = SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        if set(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")) == want:
            return float(match.group(3))
    return 0.0


def wait_until_equal(
    client: redis.Redis,
    prefix: str,
    want: dict[str, dict[str, str]],
    runs: PipelineProcess | list[PipelineProcess],
    timeout: float,
) -> float:
    """Seconds until the store equals `want`; fails with the differences after `timeout`."""
    runs = runs if isinstance(runs, list) else [runs]
    run = runs[0]
    started = time.monotonic()
    while True:
        for each in runs:
            assert each.alive(), f"the pipeline stopped:\n{each.tail()}"
        diffs = diff_stores(stored(client, prefix), want)  # type: ignore[arg-type]
        if not diffs:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{len(diffs)} differences after {timeout:.0f}s, e.g.\n"
                + "\n".join(diffs[:10])
                + f"\n{run.tail()}"
            )
        time.sleep(0.2)


def ttls(client: redis.Redis, keys: list[str]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    return [int(t) for t in pipe.execute()]


def start(
    tmp_path: Path,
    kafka_brokers: str,
    topic: str,
    dlq: str,
    url: str,
    prefix: str,
    port: int,
    args: list[str] | None = None,
    log: str = "run.log",
) -> PipelineProcess:
    env = pipeline_env(
        brokers=kafka_brokers,
        topic=topic,
        dlq=dlq,
        redis_url=url,
        prefix=prefix,
        recovery_dir=tmp_path / "recovery",
        KAFKA_STOP_AT_END="false",
        METRICS_ENABLED="true",
        BYTEWAX_DATAFLOW_API_PORT=str(port),
        FEATURE_FLUSH_INTERVAL_MS="200",
        RESTATE_KEYS_PER_SECOND=str(RATE),
        STORE_CHECK_SECONDS=str(CHECK_S),
    )
    return PipelineProcess(env, tmp_path / log, args or [])


def marks(client: redis.Redis, prefix: str, workers: int) -> list[str | None]:
    """The state of each worker's mark (None: missing)."""
    raw = client.hmget(marker_key(prefix), [mark_field(w) for w in range(workers)])
    decoded = [Mark.decode(v) if v is not None else None for v in raw]
    return [m.state if m is not None else None for m in decoded]


LAYOUTS = {
    "one worker": [[]],
    "two workers": [["-w", "2"]],
    "two processes": [["-i", "0", "-a", "{addresses}"], ["-i", "1", "-a", "{addresses}"]],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_flushed_store_is_rewritten_whole_without_new_events(
    kafka_brokers: str,
    topic_factory: Any,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    layout: str,
) -> None:
    messages = one_day(seed=31)
    topic, dlq = topic_factory(2), topic_factory(1)
    produce(kafka_brokers, topic, messages)
    want = expected(messages, key_prefix)
    assert len(want) > 5_000
    url = redis_url.rsplit("/", 1)[0] + f"/{PRIVATE_DB}"
    client = redis.Redis.from_url(url)
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    commands = [[a.format(addresses=addresses) for a in args] for args in LAYOUTS[layout]]
    workers = 2 if layout != "one worker" else 1
    ensure_recovery_dir(tmp_path / "recovery", 1)  # shared by the processes of a cluster
    ports = [free_port() for _ in commands]
    runs = [
        start(tmp_path, kafka_brokers, topic, dlq, url, key_prefix, port, args, f"run{i}.log")
        for i, (port, args) in enumerate(zip(ports, commands, strict=True))
    ]

    def repairs() -> list[float]:
        return [
            metric(port, "search_features_store_repairs_total", trigger="missing") for port in ports
        ]

    try:
        wait_until_equal(client, key_prefix, want, runs, timeout=180)
        time.sleep(2 * CHECK_S)  # the first check of the marker is long done
        assert marks(client, key_prefix, workers) == ["whole"] * workers
        assert repairs() == [0] * len(runs)

        client.flushdb()  # nothing of this pipeline's is left, marker included
        took = wait_until_equal(client, key_prefix, want, runs, timeout=len(want) / RATE + SLACK_S)

        # Rate-limited: no faster than RESTATE_KEYS_PER_SECOND allows (with a margin for
        # the shards' shares not being exactly equal).
        assert took > 0.6 * len(want) / RATE, (took, len(want))
        # Every repaired key has its TTL again: the repair's writes set it like a new day's.
        keys = sorted(want)
        assert all(ttl > 0 for ttl in ttls(client, keys)), "a repaired key has no TTL"
        deadline = time.monotonic() + 30
        while (
            any(metric(port, "search_features_keys_to_restate") for port in ports)
            or marks(client, key_prefix, workers) != ["whole"] * workers
        ):
            assert time.monotonic() < deadline, runs[0].tail()
            time.sleep(0.2)
        assert repairs() == [1] * len(runs)  # each process noticed it, once
        assert sum(metric(p, "search_features_keys_restated_total") for p in ports) >= len(want)
        deadline = time.monotonic() + 30
        while not all("store repair done" in run.log_path.read_text() for run in runs):
            assert time.monotonic() < deadline, runs[0].tail()
            time.sleep(0.2)
    finally:
        for run in runs:
            run.kill()
        for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
            client.delete(key)
        client.close()
    for i, run in enumerate(runs):
        log = run.log_path.read_text()
        lost = [line for line in log.splitlines() if "feature store lost data" in line]
        assert len(lost) == 1, log[-3000:]
        own = [i] if len(runs) > 1 else range(workers)  # each process checks its own workers
        fields = ",".join(mark_field(w) for w in own)
        assert f"marker {fields} is missing" in lost[0] and "trigger=missing" in lost[0]
        assert "store repair queued" in log
    print(f"repair, {layout}: {len(want)} keys back in {took:.1f}s at {RATE} keys/s")  # noqa: T201


def test_resync_rewrites_every_key_behind_an_intact_marker(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    messages = one_day(seed=41)
    topic, dlq = topic_factory(1), topic_factory(1)
    produce(kafka_brokers, topic, messages)
    want = expected(messages, key_prefix)
    port = free_port()
    run = start(tmp_path, kafka_brokers, topic, dlq, redis_url, key_prefix, port)
    try:
        wait_until_equal(redis_client, key_prefix, want, run, timeout=180)
        time.sleep(2 * CHECK_S)
        # What a restored backup does: keys missing, others holding older values without
        # their TTL, the marker intact.
        keys = sorted(want)
        pipe = redis_client.pipeline(transaction=False)
        for i, key in enumerate(keys):
            if i % 2:
                pipe.delete(key)
            else:
                pipe.hset(key, "as_of", "1")
                pipe.persist(key)
        pipe.execute()
        time.sleep(3 * CHECK_S)
        assert diff_stores(stored(redis_client, key_prefix), want), (  # type: ignore[arg-type]
            "the pipeline repaired keys with its marker intact: this test proves nothing"
        )

        env = pipeline_env(
            brokers=kafka_brokers, topic=topic, dlq=dlq, redis_url=redis_url, prefix=key_prefix
        )
        started = time.monotonic()
        resync = PipelineProcess(
            env, tmp_path / "resync.log", ["--progress-interval", "1"], "dataflow.tools.resync"
        )
        assert resync.wait(len(want) / RATE + 60) == 0, resync.tail()
        took = time.monotonic() - started
        assert not diff_stores(stored(redis_client, key_prefix), want)  # type: ignore[arg-type]
        assert all(ttl > 0 for ttl in ttls(redis_client, keys)), "a re-written key has no TTL"
        assert metric(port, "search_features_store_repairs_total", trigger="missing") == 1
    finally:
        run.kill()
    out = resync.log_path.read_text()
    assert "running, re-writing every live key it holds: 1 process" in out, out
    assert "keys left" in out, out  # progress lines
    assert re.search(r"every live key re-written by 1 process in \d+s", out), out
    print(f"resync: {len(want)} keys re-written in {took:.1f}s at {RATE} keys/s")  # noqa: T201


def test_resync_with_no_running_pipeline_says_so(
    redis_client: redis.Redis, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    redis_client.hset(marker_key(key_prefix), mark_field(0), "left by a stopped run")
    env = pipeline_env(
        brokers="127.0.0.1:1", topic="t", dlq="d", redis_url=redis_url, prefix=key_prefix
    )
    resync = PipelineProcess(env, tmp_path / "resync.log", [], "dataflow.tools.resync")
    assert resync.wait(30) == 3, resync.tail()
    assert "no running pipeline keeps it" in resync.tail()
    assert not redis_client.exists(marker_key(key_prefix))
