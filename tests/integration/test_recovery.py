"""Restarts and replays change nothing (contract §5), on the real Kafka and Redis.

- SIGKILL the pipeline (`python -m dataflow.run` with recovery) at random points of the
  stream, one of them while a Redis pipeline write is half applied, restart it each time,
  and the final Redis state equals an uninterrupted run's, byte for byte, and the
  reference model's; with fitted priors and COEC on, the published priors too.
- A duplicate storm (half the events re-sent minutes later) gives identical features.
- A resume whose snapshotted offsets retention has deleted reads on from the earliest
  retained offset, and logs and counts the messages it never saw.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from dataflow import metrics
from dataflow.config import Config
from dataflow.flow import build_flow
from dataflow.kafka.topics import produce
from dataflow.recovery import partitions as recovery_partitions
from dataflow.recovery import resume_point
from dataflow.tools.generator import GeneratedMessage, GeneratorConfig, generate
from tests.integration.harness import (
    FITTED,
    FITTED_ENV,
    PipelineProcess,
    assert_published_priors,
    dump,
    pipeline_env,
    read_topic,
    redis_proxy,
    snapshot_offsets,
    two_phase_stream,
)
from tests.reference_model import (
    DEFAULT_PARAMS,
    ModelParams,
    diff_stores,
    expected_store,
    select_families,
)

WIRED = ("doc", "qd", "ac", "acq")  # the families the flow writes
DAY_MS = 86_400_000
MINUTE_MS = 60_000

KILLS = 5
RESUME_LINE = re.compile(
    r"resuming a Kafka partition from the recovery snapshot topic=(\S+) partition=(\d+) "
    r"offset=(\d+)"
)


def model(
    events: list[dict[str, Any]], prefix: str, params: ModelParams = DEFAULT_PARAMS
) -> dict[str, dict[str, Any]]:
    store = expected_store(events, prefix=prefix, params=params)
    return select_families(store, WIRED, prefix=prefix)


def wired(store: dict[str, dict[str, str]], prefix: str) -> dict[str, dict[str, str]]:
    return select_families(store, WIRED, prefix=prefix)


def resumed_offsets(log: Path) -> dict[str, int]:
    return {
        f"{m.group(2)}-{m.group(1)}": int(m.group(3))
        for m in RESUME_LINE.finditer(log.read_text(errors="replace"))
    }


@pytest.mark.slow
def test_sigkill_at_random_points_then_restart_ends_exactly_like_an_uninterrupted_run(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    context = f"(CRASH_SEED={seed} reproduces the kill points; logs in {tmp_path})"
    (tmp_path / "seed.txt").write_text(f"{seed}\n")
    topic, dlq, straight_dlq = topic_factory(3), topic_factory(1), topic_factory(1)
    messages = two_phase_stream(seed % 1000, int(time.time() * 1000), head=3_000, tail=27_000)
    produce(kafka_brokers, topic, messages)
    events = [m.event for m in messages if m.event is not None]

    common = {"brokers": kafka_brokers, "topic": topic}
    straight_prefix = f"{key_prefix}_straight"
    straight = PipelineProcess(
        pipeline_env(
            **common, dlq=straight_dlq, redis_url=redis_url, prefix=straight_prefix, **FITTED_ENV
        ),
        tmp_path / "straight.log",
    )

    recovery = tmp_path / "recovery"
    # Kill points: random positions in the stream, as event times; the pipeline is killed
    # once its writes show it got there (whatever the speed of the machine), plus a random
    # delay of up to half a flush interval (writes come once per FEATURE_FLUSH_INTERVAL_MS).
    # The runs to kill do not stop at the end of the topic: writes trail the reading by up
    # to the writer's buffer, so a run timed by its writes may have read everything by then.
    stamps = sorted(e["ts"] for e in events)
    targets = [
        stamps[int(f * len(stamps))] for f in sorted(rng.uniform(0.05, 0.6) for _ in range(KILLS))
    ]
    trap_kill = rng.randrange(KILLS)
    snapshots: list[dict[str, int]] = []
    with redis_proxy(redis_url) as proxy:
        env = pipeline_env(
            **common,
            dlq=dlq,
            redis_url=proxy.url,
            prefix=key_prefix,
            recovery_dir=recovery,
            **FITTED_ENV,
        )
        for i, target in enumerate(targets):
            proxy.reset()
            run = PipelineProcess({**env, "KAFKA_STOP_AT_END": "false"}, tmp_path / f"run{i}.log")
            proxy.wait_for(target, run)
            if i == trap_kill:
                proxy.arm_trap()
                held = proxy.wait_trapped(run, timeout=60)
            else:
                time.sleep(rng.uniform(0.0, 0.5))
                assert run.alive(), f"run {i} stopped before its kill {context}"
            code = run.kill()
            assert code == -signal.SIGKILL, f"run {i} exited with {code} {context}"
            if i == trap_kill:
                # The kill landed mid-pipeline: what went through is in Redis, the rest
                # never will be (the proxy held it until the process died).
                assert held.held, "nothing was held back"
                proxy.wait_ended()
                for args in held.applied:
                    if args[0].upper() == b"HSET":
                        key, pairs = args[1], args[2:]
                        stored = redis_client.hgetall(key)
                        assert stored == dict(zip(pairs[::2], pairs[1::2], strict=True))
            snapshots.append(snapshot_offsets(recovery))

        proxy.reset()
        final = PipelineProcess(env, tmp_path / "final.log")
        final.wait_ok()
        # Every restart resumed from the last committed snapshot before it, exactly.
        for i, snapshot in enumerate(snapshots):
            log = tmp_path / (f"run{i + 1}.log" if i + 1 < KILLS else "final.log")
            assert resumed_offsets(log) == snapshot, f"restart {i + 1} {context}"
    straight.wait_ok()

    # The kills landed mid-stream: progress was kept between kills, and some restart had to
    # resume from the middle of the topic (not from the start, not after the end).
    totals = [sum(s.values()) for s in snapshots]
    assert totals == sorted(totals), f"snapshots went backwards: {totals} {context}"
    assert any(0 < t < len(messages) for t in totals), f"{totals} {context}"

    # Byte for byte. Only the families the flow writes today: the autocomplete link (acq)
    # is being wired and is compared by its own rules elsewhere.
    recovered = wired(dump(redis_client, key_prefix), key_prefix)
    uninterrupted = wired(dump(redis_client, straight_prefix), straight_prefix)
    assert len(uninterrupted) > 3_000
    renamed = {k.replace(straight_prefix, key_prefix, 1): v for k, v in uninterrupted.items()}
    expected = model(events, key_prefix, FITTED)
    if recovered != renamed:  # say which side left the model, to tell recovery from the rest
        off_recovered = diff_stores(recovered, expected)
        off_straight = diff_stores(renamed, expected)
        pytest.fail(
            f"recovered != uninterrupted {context}\nrecovered vs model: {len(off_recovered)} "
            f"differences {off_recovered[:10]}\nuninterrupted vs model: {len(off_straight)} "
            f"differences {off_straight[:10]}"
        )
    diffs = diff_stores(recovered, expected)
    assert not diffs, "\n".join(diffs[:20]) + context
    # The published priors: the model's (fitted, or the fallback when the stream's keys do
    # not spread beyond chance), the same after the kills.
    assert_published_priors(redis_client, straight_prefix, events)
    assert_published_priors(redis_client, key_prefix, events)

    # Dead letters are at-least-once but never lost: each broken message is there, under
    # its own topic:partition:offset key, however many times the restarts re-sent it.
    broken = sum(1 for m in messages if m.expected_reason is not None)
    letters = read_topic(kafka_brokers, dlq)
    assert len({key for key, _ in letters}) == broken
    assert len(read_topic(kafka_brokers, straight_dlq)) == broken


# --------------------------------------------------------------------------- unfinished epochs


def test_snapshots_a_killed_run_left_in_an_epoch_it_did_not_finish_are_never_restored(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    """A run killed after writing the snapshots of an epoch, before its frontier passed it,
    leaves them behind (Bytewax 0.21 does not remove them). The next run starts from the
    epoch before and, once it has finished that epoch without touching those keys again, a
    later restart would restore the killed run's states, which lack what the next run read
    since. The restart discards them first (`dataflow.recovery`), so the end is the model's.

    Built without timing luck: the killed run is a real run on a copy of the directory
    (`unfinished`), its snapshots moved into the directory at a later epoch with its
    execution and no frontier, exactly what a SIGKILL between the two writes leaves.
    """
    now = int(time.time() * 1000)
    stream = list(
        generate(
            GeneratorConfig(
                seed=31,
                n_events=4_000,
                n_docs=300,
                n_queries=30,
                start_ms=now - DAY_MS // 2,
                span_ms=DAY_MS // 2 - MINUTE_MS,
            )
        )
    )
    first, killed, more, last = (stream[i * 1_000 : (i + 1) * 1_000] for i in range(4))
    topic, dlq = topic_factory(3), topic_factory(1)
    recovery, unfinished = tmp_path / "recovery", tmp_path / "unfinished"
    env = pipeline_env(
        brokers=kafka_brokers,
        topic=topic,
        dlq=dlq,
        redis_url=redis_url,
        prefix=key_prefix,
        recovery_dir=recovery,
    )

    def run(name: str, directory: Path = recovery, **extra: str) -> PipelineProcess:
        return PipelineProcess({**env, "RECOVERY_DIR": str(directory), **extra}, tmp_path / name)

    produce(kafka_brokers, topic, first)
    run("first.log").wait_ok()
    shutil.copytree(recovery, unfinished)
    produce(kafka_brokers, topic, killed)
    run("killed.log", unfinished).wait_ok()  # what the killed run had done

    with recovery_partitions(recovery) as (db,), recovery_partitions(unfinished) as (copy,):
        start = resume_point([db])
        assert start.execution is not None
        (workers,) = db.execute(
            "SELECT worker_count FROM exs WHERE ex_num = ?", (start.execution,)
        ).fetchone()
        # The killed run got as far as writing every state but the Kafka offsets' (a kill
        # lands anywhere in an epoch's writes), each at a later epoch than the next run
        # will touch them in.
        stale = start.epoch + 3
        rows = copy.execute(
            "SELECT step_id, state_key, ser_change FROM snaps s WHERE snap_epoch = "
            "(SELECT MAX(snap_epoch) FROM snaps WHERE step_id = s.step_id "
            "AND state_key = s.state_key) AND snap_epoch >= ? AND step_id NOT LIKE ?",
            (start.epoch, "%.kafka_in"),
        ).fetchall()
        assert len(rows) > 100
        with db:
            db.execute(
                "INSERT INTO exs (ex_num, worker_count, resume_epoch) VALUES (?, ?, ?)",
                (start.execution + 1, workers, start.epoch),
            )
            db.executemany(
                "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) "
                "VALUES (?, ?, ?, ?)",
                [(step, key, stale, blob) for step, key, blob in rows],
            )

    # The next run reads on past that epoch, then stops (killed while idle: no end of input,
    # so nothing but the epochs it finished is in its snapshots).
    produce(kafka_brokers, topic, more)
    going = run("next.log", KAFKA_STOP_AT_END="false")
    deadline = time.monotonic() + 60
    while resume_point_of(recovery) <= stale:
        assert going.alive(), going.tail()
        assert time.monotonic() < deadline, "the next run never finished the epoch"
        time.sleep(0.2)
    assert going.kill() == -signal.SIGKILL
    assert "discarded" in (tmp_path / "next.log").read_text()

    produce(kafka_brokers, topic, last)
    run("last.log").wait_ok()
    events = [m.event for m in stream if m.event is not None]
    diffs = diff_stores(
        wired(dump(redis_client, key_prefix), key_prefix), model(events, key_prefix)
    )
    assert not diffs, "\n".join(diffs[:20])


def resume_point_of(directory: Path) -> int:
    with recovery_partitions(directory) as dbs:
        return resume_point(dbs).epoch


# --------------------------------------------------------------------------- duplicates


def duplicate_storm(
    messages: list[GeneratedMessage], rng: random.Random
) -> tuple[list[GeneratedMessage], int]:
    """The stream with half its events re-sent 1..30 minutes of event time later."""
    chosen = rng.sample(range(len(messages)), len(messages) // 2)
    copies = sorted(
        (messages[i].event["ts"] + rng.randint(MINUTE_MS, 30 * MINUTE_MS), i)  # type: ignore[index]
        for i in chosen
    )
    out: list[GeneratedMessage] = []
    j = 0
    for msg in messages:
        ts = msg.event["ts"]  # type: ignore[index]
        while j < len(copies) and copies[j][0] <= ts:
            out.append(messages[copies[j][1]])
            j += 1
        out.append(msg)
    out.extend(messages[i] for _, i in copies[j:])
    return out, len(copies)


def run_in_process(brokers: str, topic: str, dlq: str, redis_url: str, prefix: str) -> None:
    config = Config.from_env(
        {
            "KAFKA_BROKERS": brokers,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": dlq,
            "KAFKA_STOP_AT_END": "true",
            "REDIS_URL": redis_url,
            "FEATURE_PREFIX": prefix,
            "OPENSEARCH_URL": "",
            "FEATURE_SHARDS": "16",
        }
    )
    run_main(build_flow(config), epoch_interval=timedelta(seconds=1))


def duplicates_dropped() -> float:
    return float(metrics.DROPPED.labels(reason="duplicate")._value.get())


def test_duplicate_storm_gives_identical_features(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
) -> None:
    now = int(time.time() * 1000)
    messages = list(
        generate(
            GeneratorConfig(
                seed=23,
                n_events=6_000,
                n_docs=600,
                n_queries=60,
                # Two days: the clock changes day, and the whole stream fits in the dedup
                # ring's 72 hours however far apart the two partitions are read.
                start_ms=now - 2 * DAY_MS,
                span_ms=2 * DAY_MS - 60 * MINUTE_MS,
                max_disorder_ms=60_000,
            )
        )
    )
    storm, resent = duplicate_storm(messages, random.Random(5))
    assert len(storm) == len(messages) + resent and resent == 3_000
    clean_topic, storm_topic, dlq = topic_factory(2), topic_factory(2), topic_factory(1)
    produce(kafka_brokers, clean_topic, messages)
    produce(kafka_brokers, storm_topic, storm)

    clean_prefix, storm_prefix = f"{key_prefix}_clean", f"{key_prefix}_storm"
    before = duplicates_dropped()
    run_in_process(kafka_brokers, clean_topic, dlq, redis_url, clean_prefix)
    assert duplicates_dropped() == before
    run_in_process(kafka_brokers, storm_topic, dlq, redis_url, storm_prefix)
    assert duplicates_dropped() - before == resent  # every copy caught, no original lost

    clean = dump(redis_client, clean_prefix)
    stormy = dump(redis_client, storm_prefix)
    assert len(clean) > 1_000
    assert stormy == {k.replace(clean_prefix, storm_prefix, 1): v for k, v in clean.items()}
    events = [m.event for m in messages if m.event is not None]
    diffs = diff_stores(wired(stormy, storm_prefix), model(events, storm_prefix))
    assert not diffs, "\n".join(diffs[:20])


# --------------------------------------------------------------------------- retention


def test_resume_past_retention_reads_on_and_counts_what_it_never_saw(
    kafka_brokers: str,
    kafka_admin: AdminClient,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic, dlq = topic_factory(1), topic_factory(1)
    now = int(time.time() * 1000)
    messages = list(
        generate(
            GeneratorConfig(
                seed=31, n_events=200, n_docs=50, n_queries=10,
                start_ms=now - 2 * DAY_MS, span_ms=DAY_MS,
            )
        )
    )  # fmt: skip
    config = Config.from_env(
        {
            "KAFKA_BROKERS": kafka_brokers,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": dlq,
            "KAFKA_STOP_AT_END": "true",
            "REDIS_URL": redis_url,
            "FEATURE_PREFIX": key_prefix,
            "OPENSEARCH_URL": "",
            "FEATURE_SHARDS": "4",
        }
    )
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)

    def run() -> None:
        run_main(
            build_flow(config),
            epoch_interval=timedelta(seconds=1),
            recovery_config=RecoveryConfig(str(recovery)),
        )

    produce(kafka_brokers, topic, messages[:100])
    run()
    assert snapshot_offsets(recovery) == {f"0-{topic}": 100}

    # While the pipeline is down, 100 more arrive and retention deletes offsets 0..149:
    # 100..149 were never read.
    produce(kafka_brokers, topic, messages[100:])
    futures = kafka_admin.delete_records([TopicPartition(topic, 0, 150)])
    for future in futures.values():
        future.result(timeout=30)
    skipped = metrics.OFFSETS_SKIPPED.labels(topic=topic, partition="0")
    before = skipped._value.get()
    with caplog.at_level("INFO", logger="dataflow.kafka.source"):
        run()

    assert skipped._value.get() - before == 50
    errors = [
        r for r in caplog.records if r.levelname == "ERROR" and r.name == "dataflow.kafka.source"
    ]
    assert len(errors) == 1 and errors[0].skipped == 50  # type: ignore[attr-defined]
    assert snapshot_offsets(recovery) == {f"0-{topic}": 200}
    # The features hold what was read, 0..99 and 150..199, and nothing else.
    kept = [m.event for m in messages[:100] + messages[150:] if m.event is not None]
    diffs = diff_stores(wired(dump(redis_client, key_prefix), key_prefix), model(kept, key_prefix))
    assert not diffs, "\n".join(diffs[:20])
