"""Replay into a fresh version (`python -m dataflow.tools.replay`) while the live pipeline serves,
hand the new version over to a live pipeline without a gap, switch readers with one
setting, drop the old version (docs/operations.md, "Replay into a new version")."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import redis

from dataflow.kafka.topics import produce
from dataflow.reader import FeatureReader
from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.harness import (
    PipelineProcess,
    dump,
    pipeline_env,
    snapshot_offsets,
    two_phase_stream,
)
from tests.reference_model import diff_stores, expected_store, select_families

WIRED = ("doc", "qd", "ac", "acq")  # the families the flow writes
HOUR_MS = 3_600_000
PROGRESS = re.compile(r"replay \S+: [\d,]+ events read, [\d,]+ events/s, offsets left [\d,]+, ETA")
RESUMED = re.compile(r"resuming a Kafka partition from the recovery snapshot topic=(\S+) "
                     r"partition=(\d+) offset=(\d+)")  # fmt: skip


def differences(client: redis.Redis, prefix: str, events: list[dict[str, Any]]) -> list[str]:
    actual = select_families(dump(client, prefix), WIRED, prefix=prefix)
    expected = select_families(expected_store(events, prefix=prefix), WIRED, prefix=prefix)
    return diff_stores(actual, expected)


def eventually(check: Callable[[], list[str]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    problems = check()
    while problems and time.monotonic() < deadline:
        time.sleep(0.5)
        problems = check()
    assert not problems, f"{what}:\n" + "\n".join(problems[:20])


@pytest.mark.slow
def test_replay_into_a_new_version_while_live_serves_then_hand_over_and_drop_the_old(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, dlq = topic_factory(2), topic_factory(1)
    now = int(time.time() * 1000)
    history = two_phase_stream(51, now, head=1_000, tail=6_000)
    fresh = list(
        generate(
            GeneratorConfig(
                seed=53, n_events=2_000, n_docs=300, n_queries=30,
                start_ms=now - 2 * HOUR_MS, span_ms=HOUR_MS,
                duplicate_fraction=0.05, invalid_fraction=0.01,
            )
        )
    )  # fmt: skip
    produce(kafka_brokers, topic, history)
    old, new = key_prefix, f"{key_prefix}_v2"

    def env(prefix: str, **extra: str) -> dict[str, str]:
        return pipeline_env(
            brokers=kafka_brokers, topic=topic, dlq=dlq, redis_url=redis_url, prefix=prefix,
            **extra,
        )  # fmt: skip

    # The live pipeline serves `old` and keeps consuming (it never stops by itself).
    live = PipelineProcess(
        {**env(old, KAFKA_STOP_AT_END="false"), "RECOVERY_DIR": str(tmp_path / "live")},
        tmp_path / "live.log",
    )
    try:
        everything = [m.event for m in history if m.event is not None]
        eventually(lambda: differences(redis_client, old, everything), 120, "live never caught up")

        # Rebuild into `new` from the earliest offsets, with FEATURE_PREFIX still naming the
        # served version (as on a production host); events keep arriving meanwhile.
        replay_dir = tmp_path / "replay"
        replay = PipelineProcess(
            env(old),
            tmp_path / "replay.log",
            ["--prefix", new, "--recovery-dir", str(replay_dir), "--progress-interval", "0.3"],
            module="dataflow.tools.replay",
        )
        produce(kafka_brokers, topic, fresh)
        replay.wait_ok()
        output = replay.log_path.read_text()
        assert PROGRESS.search(output), output[-2_000:]
        assert "read to the end" in output
        assert live.alive()

        everything += [m.event for m in fresh if m.event is not None]
        eventually(lambda: differences(redis_client, old, everything), 120, "live stopped serving")

        # Hand over: the new version's live pipeline starts from the replay's last snapshot
        # (here it reads to the end and stops, so the test can look).
        handed = snapshot_offsets(replay_dir)
        assert sum(handed.values()) > 0
        takeover = PipelineProcess(
            {**env(new), "RECOVERY_DIR": str(replay_dir)}, tmp_path / "takeover.log"
        )
        takeover.wait_ok()
        resumed = {
            f"{m.group(2)}-{m.group(1)}": int(m.group(3))
            for m in RESUMED.finditer(takeover.log_path.read_text())
        }
        assert resumed == handed  # no gap, nothing read twice
        assert not differences(redis_client, new, everything)

        # Readers switch with one setting.
        monkeypatch.setenv("FEATURE_PREFIX", new)
        reader = FeatureReader.from_url(redis_url)
        doc_key = next(k for k in dump(redis_client, new) if k.startswith(f"{new}:doc:"))
        doc_id = unquote(doc_key.split(":", 2)[2])
        stored = redis_client.hgetall(doc_key)
        assert reader.doc_features([doc_id])[doc_id].impressions_30d == int(
            stored[b"impressions_30d"]
        )
    finally:
        if live.alive():
            live.kill()

    # With the old pipeline stopped and readers moved, the old version goes.
    kept = len(dump(redis_client, new))
    assert len(dump(redis_client, old)) > 1_000
    dry = PipelineProcess(
        env(new), tmp_path / "drop.log", ["--drop-prefix", old], "dataflow.tools.replay"
    )
    dry.wait_ok()
    assert len(dump(redis_client, old)) > 1_000  # a dry run deletes nothing
    drop = PipelineProcess(
        env(new), tmp_path / "drop.log", ["--drop-prefix", old, "--yes"], "dataflow.tools.replay"
    )
    drop.wait_ok()
    assert dump(redis_client, old) == {}
    assert len(dump(redis_client, new)) == kept


def test_replay_refuses_a_prefix_that_already_has_keys(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    taken = f"{key_prefix}_v2"
    redis_client.hset(f"{taken}:doc:d1", mapping={"as_of": "1"})
    topic, dlq = topic_factory(1), topic_factory(1)
    env = pipeline_env(
        brokers=kafka_brokers, topic=topic, dlq=dlq, redis_url=redis_url, prefix=key_prefix
    )
    run = PipelineProcess(
        env, tmp_path / "replay.log", ["--prefix", taken, "--recovery-dir", str(tmp_path / "r")],
        module="dataflow.tools.replay",
    )  # fmt: skip
    assert run.wait(60) == 2
    assert "already holds keys" in run.tail()
    assert redis_client.hgetall(f"{taken}:doc:d1") == {b"as_of": b"1"}
