"""The first step after Kafka: decode a batch of messages and route what comes out.

Rejected messages become dead letters; valid events that are late are dropped; the rest are
grouped by dedup slot, and the batch's largest `ts` becomes a clock reading. Pure apart from
the wall-clock callable it is given (for the future-timestamp rule).
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from dataflow.core.deadletter import DeadLetter, Source, dead_letter
from dataflow.core.dedup import dedup_key, id_digest, last_forgotten_slot, slot_of
from dataflow.core.events import Event, Rejection, decode
from dataflow.core.windows import DAY_MS, RETENTION_DAYS


class KafkaMessage(Protocol):
    """What intake needs of a consumed message (Bytewax's `KafkaSourceMessage` fits)."""

    @property
    def topic(self) -> str | None: ...
    @property
    def partition(self) -> int | None: ...
    @property
    def offset(self) -> int | None: ...
    @property
    def value(self) -> bytes | None: ...


DedupBatch = tuple[int, list[tuple[int, Event]]]
"""(slot, [(id digest, event), ...]) bound for one dedup ring entry."""


@dataclass(slots=True)
class IntakeResult:
    dead_letters: list[DeadLetter] = field(default_factory=list)
    by_slot: dict[tuple[str, int], list[tuple[int, Event]]] = field(default_factory=dict)
    """Events to check, by (ring key, slot)."""
    unchecked: list[Event] = field(default_factory=list)
    """Valid events whose dedup slot is already past the 24-hour horizon: nothing to check
    them against, so they skip dedup (docs/contract.md §5)."""
    max_ts: int = 0
    events_by_type: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    messages_by_partition: Counter[tuple[str, int]] = field(default_factory=Counter)


def origin_id(topic: str, partition: int) -> int:
    """A stable small id of a Kafka partition (the same in every process), carried on
    events so that time-driven state can follow each partition's own clock."""
    return zlib.crc32(f"{topic}:{partition}".encode())


class Intake:
    """Decode-and-route, with this process's view of the clock.

    - The late rule needs *a* clock before dedup, so that events older than the 30-day
      window never reach dedup state. This process's largest valid `ts` is a lower bound of
      the global clock; the state shards re-apply the rule with their own copy.
    - The dedup horizon is judged by the clock of the event's own Kafka partition, so that a
      partition reading behind the others (a backfill) still has its duplicates checked.
    """

    def __init__(
        self, *, future_tolerance_ms: int, dedup_shards: int, now_ms: Callable[[], int]
    ) -> None:
        self.future_tolerance_ms = future_tolerance_ms
        self.dedup_shards = dedup_shards
        self.now_ms = now_ms
        self.clock = 0
        self.partition_clocks: dict[tuple[str, int], int] = {}
        self.origin_ids: dict[tuple[str, int], int] = {}  # memo of `origin_id`, per message

    def route(self, messages: Iterable[KafkaMessage]) -> IntakeResult:
        result = IntakeResult()
        now = self.now_ms()
        tolerance = self.future_tolerance_ms
        shards = self.dedup_shards
        clock = self.clock
        late_day = clock // DAY_MS - RETENTION_DAYS
        partition_clocks = self.partition_clocks
        origin_ids = self.origin_ids
        for msg in messages:
            topic = msg.topic or ""
            partition = msg.partition if msg.partition is not None else -1
            origin = (topic, partition)
            result.messages_by_partition[origin] += 1
            origin_number = origin_ids.get(origin)
            if origin_number is None:
                origin_number = origin_ids[origin] = origin_id(topic, partition)
            decoded = decode(
                msg.value, now_ms=now, future_tolerance_ms=tolerance, origin=origin_number
            )
            if isinstance(decoded, Rejection):
                source = Source(topic, partition, msg.offset if msg.offset is not None else -1)
                result.dead_letters.append(
                    dead_letter(source, msg.value, decoded.reason, decoded.detail)
                )
                result.dropped[decoded.reason] += 1
                continue
            ts = decoded.ts
            result.events_by_type[decoded.TYPE] += 1
            if ts > clock:
                clock = ts
                late_day = clock // DAY_MS - RETENTION_DAYS
            partition_clock = partition_clocks.get(origin, 0)
            if ts > partition_clock:
                partition_clocks[origin] = partition_clock = ts
            if ts // DAY_MS <= late_day:
                result.dropped["late"] += 1
                continue
            slot = slot_of(ts)
            if slot <= last_forgotten_slot(partition_clock):
                result.unchecked.append(decoded)
                continue
            digest = id_digest(decoded.event_id)
            entry = (dedup_key(slot, digest, shards), slot)
            batch = result.by_slot.get(entry)
            if batch is None:
                result.by_slot[entry] = [(digest, decoded)]
            else:
                batch.append((digest, decoded))
        # Worker threads of one process share this object: never move the clock backwards.
        self.clock = max(self.clock, clock)
        result.max_ts = clock
        return result
