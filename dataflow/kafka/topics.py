"""Kafka topic administration and bulk producing, shared by the demo, the replay tool, the
benchmarks and the tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from dataflow.config import KafkaSettings
from dataflow.errors import PipelineError

log = logging.getLogger(__name__)


def ensure_topics(
    settings: KafkaSettings,
    topics: Iterable[str],
    *,
    partitions: int,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
    config: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (existing ones are left as they are), with
    the topic `config` given; returns the ones this call created. `partitions` or
    `replication_factor` -1: the broker's default (`num.partitions`,
    `default.replication.factor`)."""
    admin = AdminClient(settings.producer_config())
    wanted = list(dict.fromkeys(topics))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [t for t in wanted if t not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    t,
                    num_partitions=partitions,
                    replication_factor=replication_factor,
                    config=dict(config or {}),
                )
                for t in missing
            ]
        )
        for topic, future in futures.items():
            try:
                future.result(timeout_s)
                created.append(topic)
                shown = partitions if partitions > 0 else "the broker's default"
                log.info("created topic", extra={"topic": topic, "partitions": shown})
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise PipelineError(f"could not create Kafka topic {topic!r}: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # metadata for a new topic takes a moment to spread
        meta = admin.list_topics(timeout=timeout_s).topics
        if all(t in meta and meta[t].partitions for t in wanted):
            return created
        time.sleep(0.2)
    raise PipelineError(f"Kafka topics {wanted} did not appear within {timeout_s:.0f}s")


def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """The high watermark of every partition of `topic`."""
    consumer = Consumer({**settings.client_config(), "group.id": "search-features-admin"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        out = {}
        for partition in meta.partitions:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10
            )
            out[partition] = high
        return out
    finally:
        consumer.close()


class Message(Protocol):
    """Anything with a value and a key, such as `dataflow.tools.generator.GeneratedMessage`."""

    @property
    def value(self) -> bytes: ...
    @property
    def key(self) -> bytes | None: ...


def produce(brokers: str, topic: str, messages: Iterable[Message], timeout_s: float = 60) -> int:
    """Produce every message (keyed, so a session stays on one partition) and wait until
    Kafka has acknowledged all of them; returns the count."""
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "compression.type": "lz4"})
    count = 0
    for msg in messages:
        while True:
            try:
                producer.produce(topic, value=msg.value, key=msg.key)
                break
            except BufferError:  # the local queue is full: let deliveries drain
                producer.poll(0.05)
        count += 1
    left = producer.flush(timeout_s)
    if left:
        raise PipelineError(f"Kafka did not acknowledge {left} of {count} messages to {topic!r}")
    return count
