"""Kafka consumer lag per topic/partition, measured off the hot path.

Lag = the partition's end offset (its high watermark, or last stable offset for
transactional topics) minus the next offset this process will read. The intake step reports
the last offset it saw once per batch (a dict update); a daemon thread asks the broker for
end offsets about once a second and sets `search_features_consumer_lag`.

Why not Bytewax's `bytewax_kafka_consumer_lag`: it is set from librdkafka statistics, which
are only delivered while the input step polls the consumer. When a sink blocks the worker
(Redis retrying, say) no poll happens, so that gauge freezes at its last value, or never
appears, while the real lag grows. A separate thread keeps measuring while the worker is
stuck, which is exactly when an operator needs the number.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import IsolationLevel, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from dataflow import metrics
from dataflow.config import KafkaSettings
from dataflow.kafka.source import kafka_partition

log = logging.getLogger(__name__)

Partition = tuple[str, int]
"""(topic, partition)."""

REFRESH_SECONDS = 1.0
FAILURE_LOG_SECONDS = 60.0


class Offsets(Protocol):
    """Where `LagTracker` reads partition offsets; `KafkaOffsets` is the real one."""

    def fetch(
        self, ends_of: Sequence[Partition], starts_of: Sequence[Partition]
    ) -> tuple[dict[Partition, int], dict[Partition, int]]:
        """End offsets of `ends_of`, start (earliest retained) offsets of `starts_of`."""
        ...

    def close(self) -> None: ...


class LagTracker:
    """Next-offset bookkeeping for the partitions this process reads, and the lag gauge.

    `assigned`/`released` come from the source partitions, `consumed` from the intake step.
    `refresh` measures once; a daemon thread, started by the first `assigned` and stopped
    after the last `released`, calls it every `interval` seconds (`background=False`: no
    thread, call `refresh` yourself). `offsets` makes the offset reader, in that thread.
    """

    def __init__(
        self,
        offsets: Callable[[], Offsets],
        *,
        interval: float = REFRESH_SECONDS,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make_offsets = offsets
        self._offsets: Offsets | None = None
        self.interval = interval
        self.background = background
        self._clock = clock
        self._lock = threading.Lock()
        self._start: dict[Partition, int | None] = {}
        self._last: dict[Partition, int] = {}
        # The running thread and its own stop event (a thread being stopped never shares an
        # event with the one that replaces it).
        self._thread: tuple[threading.Thread, threading.Event] | None = None
        self._last_failure_log = -FAILURE_LOG_SECONDS

    # --- reports --------------------------------------------------------------------------

    def assigned(self, topic: str, partition: int, next_offset: int | None) -> None:
        """This process reads `partition` from `next_offset` (None or negative: the earliest
        retained offset, as with `OFFSET_BEGINNING`). Starts the thread on first use."""
        thread = None
        with self._lock:
            self._start[(topic, partition)] = (
                next_offset if next_offset is not None and next_offset >= 0 else None
            )
            self._last.pop((topic, partition), None)
            if self.background and self._thread is None:
                stop = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(stop,), name="search-features-lag", daemon=True
                )
                self._thread = (thread, stop)
        if thread is not None:
            thread.start()

    def released(self, topic: str, partition: int) -> None:
        """The partition is closed: forget it, drop its series; stop the thread after the last."""
        with self._lock:
            self._start.pop((topic, partition), None)
            self._last.pop((topic, partition), None)
            running = self._thread if not self._start else None
            if running is not None:
                self._thread = None
        with contextlib.suppress(KeyError):  # never measured: no series to drop
            metrics.CONSUMER_LAG.remove(topic, str(partition))
        if running is not None:
            thread, stop = running
            stop.set()
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def consumed(self, last_offsets: Mapping[Partition, int]) -> None:
        """The intake step saw these offsets (the largest per partition, for one batch)."""
        with self._lock:
            self._last.update(last_offsets)

    # --- measurement ----------------------------------------------------------------------

    def positions(self) -> dict[Partition, int | None]:
        """Next offset to read per partition (None: the earliest retained one)."""
        with self._lock:
            positions = dict(self._start)
            for part, offset in self._last.items():
                positions[part] = offset + 1
        return positions

    def refresh(self) -> dict[Partition, int]:
        """Ask the broker for end offsets once and set the gauge; returns the lags."""
        if self._offsets is None:
            self._offsets = self._make_offsets()
        return self._measure(self._offsets)

    def _measure(self, reader: Offsets) -> dict[Partition, int]:
        positions = self.positions()
        if not positions:
            return {}
        unknown = [part for part, nxt in positions.items() if nxt is None]
        ends, starts = reader.fetch(list(positions), unknown)
        lags: dict[Partition, int] = {}
        for part, nxt in positions.items():
            end = ends.get(part)
            start = nxt if nxt is not None else starts.get(part)
            if end is None or start is None:
                continue
            # The end offset may be a moment older than the position: never below zero.
            lags[part] = max(0, end - start)
        with self._lock:
            live = set(self._start) | set(self._last)
        for (topic, partition), lag in lags.items():
            if (topic, partition) in live:  # not released while we asked the broker
                metrics.CONSUMER_LAG.labels(topic=topic, partition=str(partition)).set(lag)
        return lags

    def _run(self, stop: threading.Event) -> None:
        reader: Offsets | None = None
        while not stop.wait(self.interval):
            try:
                if reader is None:
                    reader = self._make_offsets()
                self._measure(reader)
            except Exception as exc:  # noqa: BLE001 (any failure: count, log, try again)
                metrics.LAG_REFRESH_FAILURES.inc()
                now = self._clock()
                if now - self._last_failure_log >= FAILURE_LOG_SECONDS:
                    self._last_failure_log = now
                    log.warning(
                        "could not read Kafka end offsets; consumer lag keeps its last values",
                        extra={"error": str(exc)},
                    )
        if reader is not None:
            reader.close()


_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]
_EARLIEST = OffsetSpec.earliest()  # type: ignore[no-untyped-call]


class KafkaOffsets:
    """End (and start) offsets from the brokers, one batched ListOffsets per kind.

    Read-committed, as the consumer reads: on a transactional topic the end is the last
    stable offset, which is as far as the consumer can get.
    """

    def __init__(self, settings: KafkaSettings, timeout: float = 5.0) -> None:
        self._admin = AdminClient(settings.producer_config())
        self._timeout = timeout

    def _list(self, parts: Iterable[Partition], spec: Any) -> dict[Partition, int]:
        request = {TopicPartition(topic, partition): spec for topic, partition in parts}
        if not request:
            return {}
        futures = self._admin.list_offsets(
            request,
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=self._timeout,
        )
        return {
            (tp.topic, tp.partition): int(future.result(timeout=self._timeout).offset)
            for tp, future in futures.items()
        }

    def fetch(
        self, ends_of: Sequence[Partition], starts_of: Sequence[Partition]
    ) -> tuple[dict[Partition, int], dict[Partition, int]]:
        return self._list(ends_of, _LATEST), self._list(starts_of, _EARLIEST)

    def close(self) -> None:
        """Nothing to release: the admin client has no connections to flush."""


class LagTrackingSource(FixedPartitionedSource[Any, Any]):
    """A partitioned source (the `KafkaSource`) that tells a `LagTracker` which partitions
    this process reads, from which offset, and when it stops reading them."""

    def __init__(self, inner: FixedPartitionedSource[Any, Any], tracker: LagTracker) -> None:
        self.inner = inner
        self.tracker = tracker

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: Any
    ) -> StatefulSourcePartition[Any, Any]:
        part = self.inner.build_part(step_id, for_part, resume_state)
        topic, idx = kafka_partition(for_part)
        self.tracker.assigned(topic, idx, resume_state)
        return _TrackedPartition(part, self.tracker, topic, idx)


class _TrackedPartition(StatefulSourcePartition[Any, Any]):
    """Delegates to Bytewax's partition; tells the tracker when it closes."""

    def __init__(
        self, inner: StatefulSourcePartition[Any, Any], tracker: LagTracker, topic: str, idx: int
    ) -> None:
        self.inner = inner
        self.tracker = tracker
        self.topic = topic
        self.idx = idx

    def next_batch(self) -> Iterable[Any]:
        return self.inner.next_batch()

    def next_awake(self) -> Any:
        return self.inner.next_awake()

    def snapshot(self) -> Any:
        return self.inner.snapshot()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.tracker.released(self.topic, self.idx)
