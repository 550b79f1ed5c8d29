"""More workers, same features: one worker, `-w 2` and a two-process cluster (`-i 0/1 -a`)
write the same Redis hashes from the same Kafka input, and each key's `as_of` only ever
moves forward even though every worker's state shards keep their own copy of the clock
(docs/contract.md §3, docs/operations.md "Scaling out")."""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSink, cluster_main

from dataflow.config import Config
from dataflow.core.shard import StepResult
from dataflow.flow import build_flow
from dataflow.kafka.topics import produce
from tests.fakes import MemoryStore
from tests.integration.harness import (
    FITTED,
    FITTED_ENV,
    PipelineProcess,
    assert_published_priors,
    dump,
    free_port,
    pipeline_env,
    read_topic,
    two_phase_stream,
)
from tests.reference_model import diff_stores, expected_store, select_families

WIRED = ("doc", "qd", "ac", "acq")  # the families the flow writes
PARTITIONS = 4
READING = re.compile(r"reading a Kafka partition from its earliest retained offset topic=\S+ "
                     r"partition=(\d+)")  # fmt: skip


def wired(store: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    return select_families(store, WIRED, prefix=prefix)


@pytest.mark.slow
def test_one_worker_two_workers_and_two_processes_write_the_same_features(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    topic = topic_factory(PARTITIONS)
    messages = two_phase_stream(41, int(time.time() * 1000), head=2_000, tail=16_000)
    produce(kafka_brokers, topic, messages)
    events = [m.event for m in messages if m.event is not None]
    broken = sum(1 for m in messages if m.expected_reason is not None)

    def env(prefix: str, dlq: str) -> dict[str, str]:
        return pipeline_env(
            brokers=kafka_brokers,
            topic=topic,
            dlq=dlq,
            redis_url=redis_url,
            prefix=prefix,
            **FITTED_ENV,  # one fit step, wherever it runs, for every worker's shards
        )

    runs = {name: (f"{key_prefix}_{name}", topic_factory(1)) for name in ("one", "w2", "cluster")}
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    # All four processes at once: they are independent (own prefix, own dead-letter topic).
    processes = [
        PipelineProcess(env(*runs["one"]), tmp_path / "one.log"),
        PipelineProcess(env(*runs["w2"]), tmp_path / "w2.log", ["-w", "2"]),
        *(
            PipelineProcess(env(*runs["cluster"]), tmp_path / f"cluster{i}.log",
                            ["-i", str(i), "-a", addresses])
            for i in (0, 1)
        ),
    ]  # fmt: skip
    for process in processes:
        process.wait_ok(timeout=300)

    # Both cluster processes really read: the partitions are split between them.
    read_by = [
        {int(p) for p in READING.findall((tmp_path / f"cluster{i}.log").read_text())}
        for i in (0, 1)
    ]
    assert read_by[0] and read_by[1] and not read_by[0] & read_by[1]
    assert read_by[0] | read_by[1] == set(range(PARTITIONS))

    def features(prefix: str) -> dict[str, dict[str, Any]]:
        store = wired(dump(redis_client, prefix), prefix)
        return {k.replace(prefix, "P", 1): v for k, v in store.items()}

    stores = {name: features(prefix) for name, (prefix, _) in runs.items()}
    assert len(stores["one"]) > 3_000
    assert stores["w2"] == stores["one"]
    assert stores["cluster"] == stores["one"]
    priors = {
        name: redis_client.hgetall(f"{prefix}:prior:doc") for name, (prefix, _) in runs.items()
    }
    assert priors["w2"] == priors["cluster"] == priors["one"]
    assert_published_priors(redis_client, runs["one"][0], events)
    expected = expected_store(events, prefix="P", params=FITTED)
    diffs = diff_stores(stores["one"], select_families(expected, WIRED, prefix="P"))
    assert not diffs, "\n".join(diffs[:20])
    for name, (_, dlq) in runs.items():  # each broken message once: nothing restarted
        letters = read_topic(kafka_brokers, dlq)
        assert len(letters) == broken == len({key for key, _ in letters}), name


class _Recorder(DynamicSink[StepResult]):
    """Every write of every worker, in the order each worker made them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.writes: list[tuple[int, list[StepResult]]] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
        recorder = self

        class _Part(StatelessSinkPartition[StepResult]):
            def write_batch(self, items: list[StepResult]) -> None:
                with recorder.lock:
                    recorder.writes.append((worker_index, list(items)))

        return _Part()


def test_per_worker_clocks_never_move_a_keys_as_of_backwards(
    kafka_brokers: str, topic_factory: Any
) -> None:
    topic, dlq = topic_factory(PARTITIONS), topic_factory(1)
    messages = two_phase_stream(43, int(time.time() * 1000), head=1_500, tail=6_000)
    produce(kafka_brokers, topic, messages)
    events = [m.event for m in messages if m.event is not None]
    config = Config.from_env(
        {
            "KAFKA_BROKERS": kafka_brokers,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": dlq,
            "KAFKA_STOP_AT_END": "true",
            "OPENSEARCH_URL": "",
            "FEATURE_SHARDS": "16",
        }
    )
    recorder = _Recorder()
    flow = build_flow(config, redis_sink=recorder, dlq_sink=TestingSink([]))
    cluster_main(flow, [], 0, epoch_interval=timedelta(seconds=1), worker_count_per_proc=2)

    history: dict[str, list[int | None]] = defaultdict(list)
    writers: dict[str, set[int]] = defaultdict(set)
    store = MemoryStore()
    for worker, batch in recorder.writes:
        store.apply(batch)
        for result in batch:
            for suffix, fields in result.writes:
                history[suffix].append(None if fields is None else int(fields["as_of"]))
                writers[suffix].add(worker)
    assert {w for ws in writers.values() for w in ws} == {0, 1}  # both workers wrote
    assert all(len(ws) == 1 for ws in writers.values())  # each key from one worker, in order
    final_clock = max(e["ts"] for e in events)
    for suffix, as_ofs in history.items():
        # (A key can be created and expire within one flush interval: a DEL and no HSET.)
        stamps = [a for a in as_ofs if a is not None]
        assert stamps == sorted(stamps), f"{suffix}: as_of went backwards: {as_ofs}"
        assert all(a <= final_clock for a in stamps)
    diffs = diff_stores(wired(store.hashes, "feat"), wired(expected_store(events), "feat"))
    assert not diffs, "\n".join(diffs[:20])
