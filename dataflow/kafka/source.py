"""Kafka input that notices when a resume skipped messages retention had already deleted.

On resume, Bytewax's `KafkaSource` asks for the offset stored in the recovery snapshot. If
retention has deleted that offset in the meantime, the consumer falls back to
`auto.offset.reset`: `earliest` (set in `flow.kafka_source`) resumes at the oldest retained
message, so nothing that still exists is skipped. The messages between the snapshotted
offset and that oldest one are gone for good, and the state silently misses them unless
someone says so. This wrapper says so: it logs the gap once and counts it in
`search_features_offsets_skipped_total{topic,partition}`.

How a gap is told apart from harmless holes in the offset sequence (transaction markers,
compacted records): the lost messages are only those below the partition's *earliest
retained offset*. The check runs once per resumed partition:

1. when the partition is built: earliest retained > snapshotted offset means loss, whatever
   is read next (this also catches a partition with nothing left to read);
2. otherwise on the first message read: if it is past the snapshotted offset, retention may
   have struck between (1) and the fetch, so the earliest offset is asked again and
   `min(first, earliest) - snapshotted` is the loss (0 for a transaction marker).

A first message *below* the snapshotted offset means the consumer was reset to the start
(the topic was deleted and re-created, or truncated): logged as a warning, not counted.
A partition that starts without a snapshot (first run, new partition) starts at the
earliest offset by design and is not checked.

The partitions hand out `KafkaRecord`s (`RecordSource`): Bytewax's partitions, read as
they read themselves, with one tuple per message instead of Bytewax's message dataclass.

Every partition also reports the next offset it will read to `POSITIONS`, so that
`python -m dataflow.tools.replay` can show the offsets left to read from the first second on
(the consumer-lag gauge of `dataflow.kafka.lag` needs a refresh cycle before its first reading).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import partial
from typing import Any, NamedTuple

from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import KafkaError as ConfluentKafkaError
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from dataflow import metrics
from dataflow.config import KafkaSettings
from dataflow.errors import PipelineError

log = logging.getLogger(__name__)

EarliestOffset = Callable[[str, int], int | None]
"""`(topic, partition) -> earliest retained offset`, or None when the broker can't say."""

Partition = tuple[str, int]
"""(topic, partition)."""


class Positions:
    """The next offset each Kafka partition of this process will read (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[Partition, int] = {}

    def set(self, topic: str, partition: int, next_offset: int) -> None:
        with self._lock:
            self._next[(topic, partition)] = next_offset

    def snapshot(self) -> dict[Partition, int]:
        with self._lock:
            return dict(self._next)


POSITIONS = Positions()


class BrokerOffsets:
    """Partition offsets asked of the brokers (ListOffsets): called as an `EarliestOffset`
    for one partition, or `fetch` for many (earliest retained or end offsets).

    One admin client per process, made on first use; `AdminClient` is thread-safe, and
    Bytewax builds partitions from several worker threads. `quiet`: librdkafka prints no log
    line of its own (for callers that report failures themselves, as the preflight does).
    `on_error`: librdkafka's error events (a refused login, a certificate it does not trust,
    brokers down), handed over when a `topics()` call fails.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        timeout_s: float = 10.0,
        *,
        quiet: bool = False,
        on_error: Callable[[Any], None] | None = None,
    ) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._quiet = quiet
        self._on_error = on_error
        self._admin: AdminClient | None = None
        self._lock = threading.Lock()

    def _client(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                # log_level 0 (syslog "emergency"): nothing librdkafka would say.
                quiet = {"log_level": 0} if self._quiet else None
                config: dict[str, Any] = self._settings.producer_config(quiet)
                if self._on_error is not None:
                    config["error_cb"] = self._on_error
                self._admin = AdminClient(config)
            return self._admin

    def topics(self, timeout_s: float | None = None) -> dict[str, list[int]]:
        """Every topic the brokers list (to these credentials), with its partitions.

        One metadata request for all topics: unlike a request naming a topic, it never makes
        a broker with `auto.create.topics.enable` create one. Raises KafkaException when no
        broker answers within the timeout (`timeout_s`, default the one given at creation);
        the error events that explain it have gone to `on_error` by then.
        """
        client = self._client()
        try:
            meta = client.list_topics(timeout=self._timeout_s if timeout_s is None else timeout_s)
        except KafkaException:
            client.poll(0)  # serves the queued error events to `on_error`
            raise
        return {name: sorted(topic.partitions) for name, topic in meta.topics.items()}

    def source_parts(self) -> list[str]:
        """The partitions of `KAFKA_TOPICS` named as `KafkaSource` names them
        (`"{partition}-{topic}"`); raises PipelineError naming a topic that does not exist."""
        listed = self.topics()
        missing = [topic for topic in self._settings.topics if topic not in listed]
        if missing:
            raise PipelineError(
                f"Kafka topics {missing} of KAFKA_TOPICS do not exist (or this user may not "
                "describe them); the pipeline never creates its input topics"
            )
        return [f"{p}-{topic}" for topic in self._settings.topics for p in listed[topic]]

    def __call__(self, topic: str, partition: int) -> int | None:
        try:
            return self.fetch({(topic, partition)}, latest=False).get((topic, partition))
        except (KafkaException, TimeoutError) as exc:
            # Not knowing is not a reason to stop reading: the first-message check below
            # still runs, and the warning says the gap could not be measured.
            log.warning(
                "could not read the earliest retained offset",
                extra={"topic": topic, "partition": partition, "error": str(exc)},
            )
            return None

    def fetch(self, parts: Iterable[Partition], *, latest: bool) -> dict[Partition, int]:
        """Earliest retained (or, with `latest`, end) offsets of `parts`, one request."""
        admin = self._client()
        spec = OffsetSpec.latest() if latest else OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        request = {TopicPartition(topic, partition): spec for topic, partition in parts}
        if not request:
            return {}
        futures = admin.list_offsets(request, request_timeout=self._timeout_s)
        return {
            (tp.topic, tp.partition): int(future.result(timeout=self._timeout_s).offset)
            for tp, future in futures.items()
        }


def kafka_partition(for_part: str) -> tuple[str, int]:
    """(topic, partition) of a `KafkaSource` partition key, which it names
    `"{index}-{topic}"`; the partition's snapshot state is its next offset."""
    idx, topic = for_part.split("-", 1)
    return topic, int(idx)


class OffsetGapCheckingSource(FixedPartitionedSource[Any, Any]):
    """Wraps a `KafkaSource` (same partitions, same snapshots): checks each resume, reports
    positions.

    With a `BrokerOffsets` for `earliest` (as `flow.kafka_source` builds it, from the same
    settings as the `KafkaSource`), the partitions are listed by its admin client. Bytewax's
    own listing builds an admin client from the consumer's settings (librdkafka warns about
    `auto.offset.reset` on stderr, `CONFWARN`) and asks for each topic by name, which makes a
    broker with `auto.create.topics.enable` create a missing input topic.
    """

    def __init__(self, inner: FixedPartitionedSource[Any, Any], earliest: EarliestOffset) -> None:
        self.inner = inner
        self.earliest = earliest

    def list_parts(self) -> list[str]:
        if isinstance(self.earliest, BrokerOffsets) and isinstance(self.inner, KafkaSource):
            return self.earliest.source_parts()
        return self.inner.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: Any
    ) -> StatefulSourcePartition[Any, Any]:
        part = self.inner.build_part(step_id, for_part, resume_state)
        topic, idx = kafka_partition(for_part)
        # No snapshot, or one taken before the first read (OFFSET_BEGINNING is negative):
        # the partition starts at the earliest retained offset and nothing was promised.
        resume = resume_state if isinstance(resume_state, int) and resume_state >= 0 else None
        return GapCheckingPartition(part, topic, idx, resume, self.earliest)


class GapCheckingPartition(StatefulSourcePartition[Any, Any]):
    """Delegates to the Kafka partition; reports its position to `POSITIONS` and, when it
    resumes from a snapshot (`resume_offset`), checks its first read against it."""

    def __init__(
        self,
        inner: StatefulSourcePartition[Any, Any],
        topic: str,
        partition: int,
        resume_offset: int | None,
        earliest: EarliestOffset,
        *,
        positions: Positions = POSITIONS,
    ) -> None:
        self.inner = inner
        self.topic = topic
        self.partition = partition
        self.resume_offset = resume_offset
        self.earliest = earliest
        self.positions = positions
        # Declared at zero, so that the first loss shows in increase() (as in metrics.py).
        metrics.OFFSETS_SKIPPED.labels(topic=topic, partition=str(partition))
        low = earliest(topic, partition)
        if resume_offset is None:
            self.checked = True  # nothing was promised: it starts at the earliest offset
            log.info(
                "reading a Kafka partition from its earliest retained offset",
                extra={"topic": topic, "partition": partition, "offset": low},
            )
            if low is not None:
                positions.set(topic, partition, low)
            return
        self.checked = False
        positions.set(topic, partition, resume_offset)
        log.info(
            "resuming a Kafka partition from the recovery snapshot",
            extra={"topic": topic, "partition": partition, "offset": resume_offset},
        )
        if low is not None and low > resume_offset:
            self._report_loss(low - resume_offset, low)
            self.checked = True
            positions.set(topic, partition, low)

    def next_batch(self) -> Iterable[Any]:
        batch = self.inner.next_batch()
        if not isinstance(batch, list):
            batch = list(batch)
        if not batch:
            return batch
        if not self.checked:
            first = _first_offset(batch)
            if first is not None:
                self.checked = True
                self._check_first(first)
        last = _last_offset(batch)
        if last is not None:
            self.positions.set(self.topic, self.partition, last + 1)
        return batch

    def _check_first(self, first: int) -> None:
        resume = self.resume_offset
        if resume is None:
            return
        if first > resume:
            low = self.earliest(self.topic, self.partition)
            lost = (min(first, low) if low is not None else first) - resume
            if lost > 0:
                self._report_loss(lost, first)
        elif first < resume:
            log.warning(
                "partition resumed below its snapshotted offset: the topic was re-created "
                "or truncated, so its offsets no longer match the recovery snapshot",
                extra={
                    "topic": self.topic,
                    "partition": self.partition,
                    "snapshot_offset": resume,
                    "first_offset": first,
                },
            )

    def _report_loss(self, lost: int, resumed_at: int) -> None:
        metrics.OFFSETS_SKIPPED.labels(topic=self.topic, partition=str(self.partition)).inc(lost)
        log.error(
            "messages lost to retention before they were read: the recovery snapshot "
            "resumes at an offset Kafka no longer holds; the features miss these events",
            extra={
                "topic": self.topic,
                "partition": self.partition,
                "snapshot_offset": self.resume_offset,
                "resumed_at": resumed_at,
                "skipped": lost,
            },
        )

    def next_awake(self) -> datetime | None:
        awake: datetime | None = self.inner.next_awake()
        return awake

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


class KafkaRecord(NamedTuple):
    """A consumed message, as the pipeline reads it (`core.intake.KafkaMessage`): one tuple,
    where Bytewax's `KafkaSourceMessage` (a frozen dataclass of eight fields, four of which
    the pipeline never reads) costs about 4 µs a message to build."""

    topic: str | None
    partition: int | None
    offset: int | None
    value: bytes | None


class RecordSource(KafkaSource):
    """Bytewax's `KafkaSource` (the same consumer settings, partitions, offsets and
    snapshots) whose partitions hand out `KafkaRecord`s (`RecordPartition`)."""

    # Bytewax annotates its own partition class here, narrower than the ABC's return type.
    def build_part(  # type: ignore[override]
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> RecordPartition:
        return RecordPartition(super().build_part(step_id, for_part, resume_state))


class RecordPartition(StatefulSourcePartition[Any, int | None]):
    """Bytewax 0.21's Kafka partition (`bytewax.connectors.kafka._KafkaSourcePartition`,
    pinned in pyproject.toml) read as it reads itself, batch for batch, with a `KafkaRecord`
    per message. Its consumer, end-of-partition flag and offset are the partition's own, so
    its snapshot, close and metrics stay Bytewax's. An error stays Bytewax's `KafkaError`,
    with the message as Bytewax builds it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def next_batch(self) -> list[Any]:
        inner = self.inner
        if inner._eof:
            raise StopIteration
        batch: list[Any] = []
        last_offset = None
        record = partial(tuple.__new__, KafkaRecord)
        for msg in inner._consumer.consume(inner._batch_size, 0.001):
            error = msg.error()
            if error is None:
                last_offset = msg.offset()
                batch.append(record((msg.topic(), msg.partition(), last_offset, msg.value())))
                continue
            if error.code() == ConfluentKafkaError._PARTITION_EOF:
                inner._eof = True  # StopIteration on the next call: this batch goes out first
                break
            if inner._raise_on_errors:
                raise RuntimeError(f"error consuming from Kafka topic `{inner._topic!r}`: {error}")
            message = KafkaSourceMessage(
                key=msg.key(),
                value=msg.value(),
                topic=msg.topic(),
                headers=msg.headers() or [],
                latency=msg.latency(),
                offset=msg.offset(),
                partition=msg.partition(),
                timestamp=msg.timestamp(),
            )
            batch.append(KafkaError(error, message))
            last_offset = msg.offset()
        if last_offset is not None:
            inner._offset = last_offset + 1  # resume from the next message, as Bytewax does
        return batch

    def next_awake(self) -> datetime | None:
        awake: datetime | None = self.inner.next_awake()
        return awake

    def snapshot(self) -> int | None:
        offset: int | None = self.inner.snapshot()
        return offset

    def close(self) -> None:
        self.inner.close()


def _offset(item: Any) -> int | None:
    msg = item.msg if isinstance(item, KafkaError) else item
    if (
        isinstance(msg, KafkaRecord | KafkaSourceMessage)
        and msg.offset is not None
        and msg.offset >= 0
    ):
        return int(msg.offset)
    return None


def _first_offset(batch: list[Any]) -> int | None:
    return next((o for o in map(_offset, batch) if o is not None), None)


def _last_offset(batch: list[Any]) -> int | None:
    return next((o for o in map(_offset, reversed(batch)) if o is not None), None)
