"""Stream shapes a backfill meets, on the real Kafka and Redis, against the reference model:
a sparse history whose consumer batches span days, a partition read days after the others
(with a restart in between), and whole sessions uploaded hours late."""

from __future__ import annotations

import random
import time
import zlib
from pathlib import Path
from typing import Any

import redis
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import run_main
from confluent_kafka import Producer

from dataflow.config import Config
from dataflow.flow import build_flow
from dataflow.tools.generator import GeneratedMessage, GeneratorConfig, generate
from tests.integration.harness import dump
from tests.reference_model import diff_stores, expected_store, select_families

ALL = ("doc", "qd", "ac", "acq")
DAY_MS = 86_400_000
PARTITIONS = 3


def partition_of(message: GeneratedMessage, i: int) -> int:
    """A session stays on one partition, as the producer's key hashing keeps it; a re-sent
    message without a session goes where its first copy went (copies across partitions
    read days apart are the one limit, docs/contract.md §5)."""
    key = message.key or message.value
    return zlib.crc32(key) % PARTITIONS


def stream(
    seed: int,
    n_events: int,
    span_ms: int,
    *,
    duplicates: float,
    disorder_ms: int,
    docs: int = 300,
    queries: int = 30,
) -> list[GeneratedMessage]:
    """A generated stream ending now, with 1% broken messages."""
    now = int(time.time() * 1000)
    return list(
        generate(
            GeneratorConfig(
                seed=seed,
                n_events=n_events,
                n_docs=docs,
                n_queries=queries,
                start_ms=now - span_ms,
                span_ms=span_ms - 60_000,
                duplicate_fraction=duplicates,
                invalid_fraction=0.01,
                max_disorder_ms=disorder_ms,
            )
        )
    )


def produce_to(brokers: str, topic: str, messages: list[tuple[int, GeneratedMessage]]) -> None:
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20})
    for partition, msg in messages:
        while True:
            try:
                producer.produce(topic, value=msg.value, key=msg.key, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def config(brokers: str, topic: str, dlq: str, prefix: str, redis_url: str, batch: int) -> Config:
    return Config.from_env(
        {
            "KAFKA_BROKERS": brokers,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": dlq,
            "KAFKA_STOP_AT_END": "true",
            "KAFKA_BATCH_SIZE": str(batch),
            "REDIS_URL": redis_url,
            "FEATURE_PREFIX": prefix,
            "OPENSEARCH_URL": "",
            "FEATURE_SHARDS": "16",
        }
    )


def assert_exact(
    client: redis.Redis, prefix: str, placed: list[tuple[int, GeneratedMessage]]
) -> None:
    """The store equals the model's for the messages as placed on partitions (dedup judges
    a copy by its own partition's clock, contract §5)."""
    valid = [(p, m.event) for p, m in placed if m.event is not None]
    actual = dump(client, prefix)
    store = expected_store([e for _, e in valid], prefix=prefix, partitions=[p for p, _ in valid])
    expected = select_families(store, ALL, prefix=prefix)
    diffs = diff_stores(actual, expected)
    assert not diffs, "\n".join(diffs[:30])
    assert {k.split(":")[1] for k in actual} == set(ALL)


def test_a_sparse_backfill_whose_batches_span_days_drops_every_copy(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
) -> None:
    # ~7,600 events over 20 days on 3 partitions, copies re-sent close to their original:
    # one 1000-message consumer batch covers days of event time.
    messages = stream(
        23, 7_000, 20 * DAY_MS, duplicates=0.1, disorder_ms=300_000, docs=400, queries=40
    )
    # Copies can follow their original by most of a day of event time here, so whether one
    # is still checked depends on its partition's clock, not the stream's.
    placed = [(partition_of(m, i), m) for i, m in enumerate(messages)]
    topic, dlq = topic_factory(PARTITIONS), topic_factory(1)
    produce_to(kafka_brokers, topic, placed)
    run_main(build_flow(config(kafka_brokers, topic, dlq, key_prefix, redis_url, 1000)))
    assert_exact(redis_client, key_prefix, placed)


def test_a_partition_read_days_after_the_others_keeps_its_duplicates_out(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    # Partitions 0 and 1 are read to the end (ten days), the pipeline stops, and only then
    # does partition 2 get its ten days: it is read from a restart, days behind the others.
    # (The model, like the pipeline, judges each copy by its own partition's clock.)
    messages = stream(29, 8_000, 10 * DAY_MS, duplicates=0.1, disorder_ms=300_000)
    placed = [(partition_of(m, i), m) for i, m in enumerate(messages)]
    topic, dlq = topic_factory(PARTITIONS), topic_factory(1)
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    cfg = config(kafka_brokers, topic, dlq, key_prefix, redis_url, 200)

    produce_to(kafka_brokers, topic, [(p, m) for p, m in placed if p != 2])
    run_main(build_flow(cfg), recovery_config=RecoveryConfig(str(recovery)))
    produce_to(kafka_brokers, topic, [(p, m) for p, m in placed if p == 2])
    run_main(build_flow(cfg), recovery_config=RecoveryConfig(str(recovery)))
    assert_exact(redis_client, key_prefix, placed)


def test_sessions_uploaded_hours_late_as_a_whole_link_exactly(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
) -> None:
    messages = stream(31, 6_000, 8 * 3_600_000, duplicates=0.05, disorder_ms=60_000)
    # A third of the sessions reach Kafka at the very end, each as a whole, in order:
    # hours behind the other sessions of their partition.
    rnd = random.Random(5)
    late = {m.key for m in messages if m.key and rnd.random() < 0.33}
    order = [m for m in messages if m.key not in late] + [m for m in messages if m.key in late]
    placed = [(partition_of(m, i), m) for i, m in enumerate(order)]
    topic, dlq = topic_factory(PARTITIONS), topic_factory(1)
    produce_to(kafka_brokers, topic, placed)
    run_main(build_flow(config(kafka_brokers, topic, dlq, key_prefix, redis_url, 100)))
    assert_exact(redis_client, key_prefix, placed)
