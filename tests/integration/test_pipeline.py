"""The pipeline on the real Kafka and Redis: a generated stream with broken messages and
re-sent duplicates goes in; Redis must hold exactly the reference model's features, and the
dead-letter topic exactly the broken messages with the right reasons."""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import redis
from bytewax.testing import run_main
from confluent_kafka import Consumer, Producer

from dataflow.config import Config
from dataflow.flow import build_flow
from dataflow.kafka.topics import produce
from dataflow.reader import FeatureReader
from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.harness import dump
from tests.reference_model import (
    diff_stores,
    expected_store,
    select_families,
)

ALL = ("doc", "qd", "ac", "acq")

DAY_MS = 86_400_000


def consume_all(brokers: str, topic: str, expected: int, timeout_s: float = 60) -> list[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"test-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
        # Anything extra would be a bug too: give stragglers a moment to show up.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    return out


def pipeline_config(brokers: str, topic: str, dlq: str, prefix: str, redis_url: str) -> Config:
    return Config.from_env(
        {
            "KAFKA_BROKERS": brokers,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": dlq,
            "KAFKA_STOP_AT_END": "true",
            "KAFKA_BATCH_SIZE": "50",
            "REDIS_URL": redis_url,
            "FEATURE_PREFIX": prefix,
            "OPENSEARCH_URL": "",
            "FEATURE_SHARDS": "16",
        }
    )


def test_stream_with_broken_messages_gives_exact_features_and_dead_letters(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
) -> None:
    topic, dlq = topic_factory(3), topic_factory(1)
    now = int(time.time() * 1000)
    messages = list(
        generate(
            GeneratorConfig(
                seed=11,
                n_events=6_000,
                n_docs=300,
                n_queries=40,
                # A realistic density: partitions read in step cover similar event time, as
                # they do live (the link join and dedup tolerate bounded partition skew;
                # docs/contract.md). Windows and expiry are covered by the unit tests.
                start_ms=now - 6 * 3_600_000,
                span_ms=6 * 3_600_000 - 60_000,
                duplicate_fraction=0.1,
                invalid_fraction=0.05,
                max_disorder_ms=300_000,
            )
        )
    )
    produce(kafka_brokers, topic, messages)

    config = pipeline_config(kafka_brokers, topic, dlq, key_prefix, redis_url)
    run_main(build_flow(config))

    valid = [m.event for m in messages if m.event is not None]
    full = expected_store(valid, prefix=key_prefix)
    actual = dump(redis_client, key_prefix)
    # Three partitions read from a backlog drift apart in event time; dedup and the link
    # join follow each partition's own clock, so every family is exact.
    diffs = diff_stores(actual, select_families(full, ALL, prefix=key_prefix))
    assert not diffs, "\n".join(diffs[:30])
    assert len(actual) > 500  # the stream really produced features of every family
    assert {k.split(":")[1] for k in actual} == set(ALL)

    broken = [m for m in messages if m.expected_reason is not None]
    letters = consume_all(kafka_brokers, dlq, len(broken))
    bodies = [json.loads(m.value()) for m in letters]
    assert collections.Counter(b["reason"] for b in bodies) == collections.Counter(
        m.expected_reason for m in broken
    )
    assert all(b["topic"] == topic and b["detail"] for b in bodies)
    sent = collections.Counter(m.value for m in broken)
    got = collections.Counter(
        b["payload"].encode()
        if "payload" in b
        else __import__("base64").b64decode(b["payload_b64"])
        for b in bodies
    )
    assert got == sent  # every broken message arrived whole, exactly once
    for msg, body in zip(letters, bodies, strict=True):
        assert msg.key() == f"{body['topic']}:{body['partition']}:{body['offset']}".encode()

    # Every key carries a TTL (the safety net for keys the pipeline never revisits).
    sample = next(iter(actual))
    assert 0 < redis_client.ttl(sample) <= config.redis.ttl_seconds


def test_reader_reads_what_the_pipeline_wrote_in_one_round_trip(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
) -> None:
    topic, dlq = topic_factory(1), topic_factory(1)
    now = int(time.time() * 1000)
    events = [
        {
            "event_id": "i1",
            "type": "search_impression",
            "ts": now - 5_000,
            "query": "iPhone Case",
            "doc_ids": ["d1", "d:2"],
        },
        {
            "event_id": "c1",
            "type": "click",
            "ts": now - 4_000,
            "query": "iphone case",
            "doc_id": "d1",
        },
        {
            "event_id": "a1",
            "type": "ac_impression",
            "ts": now - 6_000,
            "prefix": "ip",
            "candidates": ["iPhone case", "ipad"],
        },
        {
            "event_id": "a2",
            "type": "ac_select",
            "ts": now - 5_500,
            "prefix": "IP",
            "candidate": "iphone case",
        },
    ]
    producer = Producer({"bootstrap.servers": kafka_brokers})
    for event in events:
        producer.produce(topic, json.dumps(event).encode())
    assert producer.flush(30) == 0
    run_main(build_flow(pipeline_config(kafka_brokers, topic, dlq, key_prefix, redis_url)))

    reader = FeatureReader(redis_client, prefix=key_prefix)
    # One connection borrowed per call (tests/integration/test_reader.py shows that each
    # call is one round trip on it).
    borrows = 0
    pool = redis_client.connection_pool
    real_get = pool.get_connection

    def counting_get(*args: Any, **kwargs: Any) -> Any:
        nonlocal borrows
        borrows += 1
        return real_get(*args, **kwargs)

    pool.get_connection = counting_get  # type: ignore[method-assign]
    try:
        docs = reader.doc_features(["d1", "d:2", "never-seen"])
        assert borrows == 1
        qd = reader.query_doc_features("ＩＰＨＯＮＥ case", ["d1", "d:2"])
        ac = reader.autocomplete_features(" ip ", ["IPHONE CASE", "ipad", "other"])
        assert borrows == 3
    finally:
        del pool.get_connection  # back to the class attribute

    assert (docs["d1"].impressions_30d, docs["d1"].clicks_30d) == (1, 1)
    assert docs["d1"].ctr_30d == (1 + 1) / (1 + 1 + 20)
    assert docs["d:2"].clicks_30d == 0 and docs["d:2"].found
    missing = docs["never-seen"]
    assert not missing.found
    assert (missing.impressions_30d, missing.ctr_30d, missing.as_of) == (0, 1 / 21, 0)
    assert qd["d1"].clicks_7d == 1 and qd["d:2"].impressions_7d == 1
    assert (ac["IPHONE CASE"].impressions_30d, ac["IPHONE CASE"].selects_30d) == (1, 1)
    assert ac["ipad"].selects_30d == 0 and not ac["other"].found

    later = docs["d1"].decayed_to(docs["d1"].as_of + 7 * DAY_MS, reader.params.doc)
    assert abs(later.clicks_decay - docs["d1"].clicks_decay / 2) < 1e-12
    assert later.ctr_decay == reader.params.doc.rate(later.clicks_decay, later.impressions_decay)
