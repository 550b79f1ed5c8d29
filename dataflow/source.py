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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from dataflow import metrics
from dataflow.config import KafkaSettings

log = logging.getLogger(__name__)

EarliestOffset = Callable[[str, int], int | None]
"""`(topic, partition) -> earliest retained offset`, or None when the broker can't say."""


class EarliestOffsets:
    """The earliest retained offset of a partition, asked of the brokers (ListOffsets).

    One admin client per process, made on first use; `AdminClient` is thread-safe, and
    Bytewax builds partitions from several worker threads.
    """

    def __init__(self, settings: KafkaSettings, timeout_s: float = 10.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._admin: AdminClient | None = None
        self._lock = threading.Lock()

    def __call__(self, topic: str, partition: int) -> int | None:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient(dict(self._settings.client_config()))
            admin = self._admin
        request = {TopicPartition(topic, partition): OffsetSpec.earliest()}  # type: ignore[no-untyped-call]
        try:
            futures = admin.list_offsets(request, request_timeout=self._timeout_s)
            (future,) = futures.values()
            return int(future.result(timeout=self._timeout_s).offset)
        except (KafkaException, TimeoutError) as exc:
            # Not knowing is not a reason to stop reading: the first-message check below
            # still runs, and the warning says the gap could not be measured.
            log.warning(
                "could not read the earliest retained offset",
                extra={"topic": topic, "partition": partition, "error": str(exc)},
            )
            return None


class OffsetGapCheckingSource(FixedPartitionedSource[Any, Any]):
    """Wraps a `KafkaSource` (same partitions, same snapshots) and checks each resume."""

    def __init__(self, inner: FixedPartitionedSource[Any, Any], earliest: EarliestOffset) -> None:
        self.inner = inner
        self.earliest = earliest

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: Any
    ) -> StatefulSourcePartition[Any, Any]:
        part = self.inner.build_part(step_id, for_part, resume_state)
        # No snapshot, or one taken before the first read (OFFSET_BEGINNING is negative):
        # the partition starts at the earliest retained offset and nothing was promised.
        if not isinstance(resume_state, int) or resume_state < 0:
            return part
        # KafkaSource names its partitions "{index}-{topic}"; its state is the next offset.
        idx, topic = for_part.split("-", 1)
        return GapCheckingPartition(part, topic, int(idx), resume_state, self.earliest)


class GapCheckingPartition(StatefulSourcePartition[Any, Any]):
    """Delegates to the Kafka partition; checks the first read against the resume offset."""

    def __init__(
        self,
        inner: StatefulSourcePartition[Any, Any],
        topic: str,
        partition: int,
        resume_offset: int,
        earliest: EarliestOffset,
    ) -> None:
        self.inner = inner
        self.topic = topic
        self.partition = partition
        self.resume_offset = resume_offset
        self.earliest = earliest
        self.checked = False
        log.info(
            "resuming a Kafka partition from the recovery snapshot",
            extra={"topic": topic, "partition": partition, "offset": resume_offset},
        )
        low = earliest(topic, partition)
        if low is not None and low > resume_offset:
            self._report_loss(low - resume_offset, low)
            self.checked = True

    def next_batch(self) -> Iterable[Any]:
        batch = self.inner.next_batch()
        if not self.checked:
            batch = list(batch)
            first = _first_offset(batch)
            if first is not None:
                self.checked = True
                self._check_first(first)
        return batch

    def _check_first(self, first: int) -> None:
        resume = self.resume_offset
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


def _first_offset(batch: list[Any]) -> int | None:
    for item in batch:
        msg = item.msg if isinstance(item, KafkaError) else item
        if isinstance(msg, KafkaSourceMessage) and msg.offset is not None and msg.offset >= 0:
            return int(msg.offset)
    return None
