"""The segment store of the feature shards' recovery state: a compacted Kafka topic.

A feature shard's snapshot refers to segments of key states (`dataflow.core.segments`).
They must outlive the process that wrote them and be readable from whichever process
restores the shard after a rescale, so they go where the input already is, to Kafka:

- `KAFKA_STATE_TOPIC`, created by the preflight (or on first use) with
  `cleanup.policy=compact` and `min.compaction.lag.ms` of an hour. Compaction keeps the
  newest record of each key, and every chunk of every segment has a key of its own
  (`<segment>#<chunk>`), so a record stays until its own tombstone; a tombstone removes
  it no sooner than an hour later.
- A segment is split into chunks of at most `CHUNK_BYTES` (the broker's default largest
  message is 1 MB), all in the partition its owner (the shard) hashes to, and referenced
  by their offsets: a restore seeks to them instead of scanning the topic.
- Writes are asynchronous: `append` returns at once, and the snapshot that refers to the
  segment waits for its offsets only when Bytewax pickles it (`snapshots.Deferred`), so
  the segments of all shards of an epoch are acknowledged together, with `acks=all` and
  idempotence. A write that fails stops the dataflow before the epoch commits.
- `retire` writes the tombstones of segments no snapshot refers to any more, without
  waiting; one that fails is logged and left in the topic.

Segments written by an execution that was killed before its epoch committed are referred
to by no snapshot and stay in the topic (docs/operations.md, "Known limits").
"""

from __future__ import annotations

import atexit
import logging
import threading
import uuid
import zlib
from collections.abc import Sequence
from functools import partial

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from dataflow import metrics
from dataflow.config import KafkaSettings
from dataflow.core.segments import Pending, Ref
from dataflow.errors import PipelineError, SegmentError, SegmentMissingError
from dataflow.kafka.topics import ensure_topics

log = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024
PARTITIONS = 8
"""Partitions of the state topic when this process creates it."""
TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "min.compaction.lag.ms": str(3_600_000),
}
WRITE_TIMEOUT_S = 300.0
"""How long a snapshot waits for its segments (a broker restart stalls it meanwhile)."""
READ_TIMEOUT_S = 30.0


class KafkaPending:
    """One segment's chunks on their way to Kafka. Delivery callbacks may run on any
    thread that polls the producer: each only sets its own chunk's slot."""

    __slots__ = ("_errors", "_offsets", "_producer", "partition", "segment", "size")

    def __init__(
        self, producer: Producer, segment: str, partition: int, chunks: int, size: int
    ) -> None:
        self._producer = producer
        self.segment, self.partition, self.size = segment, partition, size
        self._offsets: list[int] = [-1] * chunks
        self._errors: list[str] = []

    def delivered(self, chunk: int, err: KafkaError | None, msg: Message) -> None:
        offset = msg.offset()
        if err is not None or offset is None:
            self._errors.append(str(err))
            return
        self._offsets[chunk] = offset
        if self.done:
            metrics.STATE_SEGMENTS.labels("written").inc()
            metrics.STATE_SEGMENT_BYTES.inc(self.size)

    @property
    def done(self) -> bool:
        return -1 not in self._offsets

    def ref(self) -> Ref:
        if not self.done and not self._errors:
            self._producer.flush(WRITE_TIMEOUT_S)
        if self._errors or not self.done:
            reason = self._errors[0] if self._errors else "not acknowledged in time"
            raise SegmentError(f"segment {self.segment!r} could not be written to Kafka: {reason}")
        return Ref(self.segment, self.partition, tuple(self._offsets))


class KafkaSegments:
    """`dataflow.core.segments.SegmentStore` on `settings.state_topic`. Connects on first
    use, so a pipeline without recovery never touches the topic; one per process, shared
    by its workers."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.topic = settings.state_topic
        self._lock = threading.Lock()
        self._producer: Producer | None = None
        self._partitions = 0

    def _ready(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._partitions = ensure_state_topic(self.settings)
                self._producer = Producer(
                    self.settings.producer_config(
                        {
                            "acks": "all",
                            "enable.idempotence": True,
                            "linger.ms": 5,
                            "compression.type": "lz4",
                            "delivery.timeout.ms": int(WRITE_TIMEOUT_S * 1000),
                        }
                    )
                )
                # Tombstones still queued when the dataflow ends (retire does not wait).
                atexit.register(self._producer.flush, 10)
            return self._producer

    def append(self, owner: str, payload: bytes) -> Pending:
        producer = self._ready()
        segment = f"{owner}/{uuid.uuid4().hex}"
        partition = zlib.crc32(owner.encode()) % self._partitions
        chunks = [payload[at : at + CHUNK_BYTES] for at in range(0, len(payload), CHUNK_BYTES)]
        chunks = chunks or [b""]
        pending = KafkaPending(producer, segment, partition, len(chunks), len(payload))
        for i, chunk in enumerate(chunks):
            delivered = partial(pending.delivered, i)
            while True:
                try:
                    producer.produce(
                        self.topic,
                        value=chunk,
                        key=f"{segment}#{i}".encode(),
                        partition=partition,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    producer.poll(0.05)
        producer.poll(0)
        return pending

    def read(self, refs: Sequence[Ref]) -> list[bytes]:
        if not refs:
            return []
        consumer = Consumer(
            {
                **self.settings.client_config(),
                "group.id": "search-features-segments",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                # A fetch the broker holds open at the end of the partition would delay
                # the next segment's assign by its wait (500 ms by default): a restore
                # reads a shard's chain, segment after segment, at about 1 ms each.
                "fetch.wait.max.ms": 0,
            }
        )
        try:
            payloads = [self._read_one(consumer, ref) for ref in refs]
        finally:
            consumer.close()
        metrics.STATE_SEGMENTS.labels("read").inc(len(payloads))
        return payloads

    def _read_one(self, consumer: Consumer, ref: Ref) -> bytes:
        """The chunks of `ref`, read forward from its first offset (the chunks of one
        segment were written together, so little else lies between them)."""
        wanted = {offset: i for i, offset in enumerate(ref.offsets)}
        chunks: list[bytes | None] = [None] * len(ref.offsets)
        missing = SegmentMissingError(ref.segment, f"Kafka topic {self.topic!r}")
        consumer.assign([TopicPartition(self.topic, ref.partition, min(wanted))])
        last = max(wanted)
        left = len(wanted)
        while left:
            msg = consumer.poll(READ_TIMEOUT_S)
            if msg is None:
                raise SegmentError(
                    f"segment {ref.segment!r} could not be read from Kafka topic "
                    f"{self.topic!r} within {READ_TIMEOUT_S:.0f} s"
                )
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    raise missing
                raise SegmentError(f"segment {ref.segment!r} could not be read: {err}")
            offset = msg.offset()
            if offset is None or offset > last:
                raise missing
            i = wanted.get(offset)
            if i is None:
                continue
            value = msg.value()
            if value is None or msg.key() != f"{ref.segment}#{i}".encode():
                raise missing
            chunks[i] = value
            left -= 1
        return b"".join(c for c in chunks if c is not None)

    def retire(self, refs: Sequence[Ref]) -> None:
        producer = self._ready()

        def logged(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.warning(
                    "a retired segment's tombstone was not written; the segment stays in the topic",
                    extra={"topic": self.topic, "error": str(err)},
                )

        for ref in refs:
            for i in range(len(ref.offsets)):
                key = f"{ref.segment}#{i}".encode()
                producer.produce(
                    self.topic, value=None, key=key, partition=ref.partition, on_delivery=logged
                )
        metrics.STATE_SEGMENTS.labels("retired").inc(len(refs))
        producer.poll(0)


def ensure_state_topic(settings: KafkaSettings, timeout_s: float = 30.0) -> int:
    """Create the state topic with compaction, or check that the existing one compacts and
    deletes nothing by age; returns its partition count. `StateTopicError` otherwise."""
    topic = settings.state_topic
    try:
        ensure_topics(
            settings,
            [topic],
            partitions=PARTITIONS,
            replication_factor=-1,
            timeout_s=timeout_s,
            config=TOPIC_CONFIG,
        )
        admin = AdminClient(settings.producer_config())
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        configs = admin.describe_configs([resource])[resource].result(timeout_s)
        partitions = admin.list_topics(topic, timeout=timeout_s).topics[topic].partitions
    except (KafkaException, PipelineError) as exc:
        reason = exc.args[0].str() if exc.args and isinstance(exc.args[0], KafkaError) else exc
        raise StateTopicError(
            topic,
            f"could not be created or checked ({reason}); create it with "
            "cleanup.policy=compact, or give this user the right to",
        ) from None
    policy = configs["cleanup.policy"].value
    if policy != "compact":
        raise StateTopicError(
            topic,
            f"cleanup.policy is {policy!r}; it must be 'compact' (with 'delete' Kafka would "
            "drop segments that recovery snapshots refer to): alter the topic, or name a new "
            "one",
        )
    return len(partitions)


class StateTopicError(SegmentError):
    """The state topic cannot be used: `problem` says why."""

    def __init__(self, topic: str, problem: str) -> None:
        self.topic, self.problem = topic, problem
        super().__init__(f"KAFKA_STATE_TOPIC={topic}: {problem}")
