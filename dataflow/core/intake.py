"""The first step after Kafka: decode a batch of messages and route what comes out.

Rejected messages become dead letters; valid events that are late are dropped; the rest are
grouped by dedup slot, or pass unchecked when their partition's clock is past the dedup
horizon; each partition's clock becomes a reading for the global clock and the dedup
watermark. Pure apart from the wall-clock callable it is given (future-timestamp rule).

It runs where a partition is read (`dataflow.kafka.intake`), so the partition clocks it
keeps are snapshotted with the partition's offset: every decision that depends on them is a
function of the partition's message sequence, whatever the batching, and survives restarts.
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
    by_slot: dict[tuple[str, int, int], list[tuple[int, Event]]] = field(default_factory=dict)
    """Events to check, by (ring key, slot, origin id)."""
    unchecked: list[Event] = field(default_factory=list)
    """Valid events whose dedup slot their partition's clock has already passed by more than
    24 hours: nothing to check them against, so they skip dedup (docs/contract.md §5)."""
    partition_clocks: dict[int, int] = field(default_factory=dict)
    """Origin id -> that partition's clock after this batch, for each partition read."""
    events_by_type: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    messages_by_partition: Counter[tuple[str, int]] = field(default_factory=Counter)
    last_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    """The last offset read per partition (for the consumer-lag gauge)."""
    consumer_errors: list[object] = field(default_factory=list)
    """Errors the consumer reported in place of messages (set by the source, logged and
    counted by the flow)."""


PartitionClocks = dict[tuple[str, int], int]
"""(topic, partition) -> the largest valid `ts` read from it so far."""


def origin_id(topic: str, partition: int) -> int:
    """A stable small id of a Kafka partition (the same in every process), carried on
    events so that time-driven state can follow each partition's own clock."""
    return zlib.crc32(f"{topic}:{partition}".encode())


class Intake:
    """Decode-and-route, with this process's view of the global clock.

    The late rule needs *a* clock before dedup, so that events older than the 30-day window
    never reach dedup state. This process's largest valid `ts` is a lower bound of the
    global clock; the state shards re-apply the rule with their own copy. Worker threads of
    one process share this object; each source partition brings its own `PartitionClocks`.
    """

    def __init__(
        self, *, future_tolerance_ms: int, dedup_shards: int, now_ms: Callable[[], int]
    ) -> None:
        self.future_tolerance_ms = future_tolerance_ms
        self.dedup_shards = dedup_shards
        self.now_ms = now_ms
        self.clock = 0
        self.origin_ids: dict[tuple[str, int], int] = {}  # memo of `origin_id`, per message

    def route(self, messages: Iterable[KafkaMessage], clocks: PartitionClocks) -> IntakeResult:
        """Route one batch of one source partition; `clocks` is that partition's state and is
        updated in place, message by message."""
        result = IntakeResult()
        now = self.now_ms()
        tolerance = self.future_tolerance_ms
        shards = self.dedup_shards
        clock = self.clock
        late_day = clock // DAY_MS - RETENTION_DAYS
        origin_ids = self.origin_ids
        for msg in messages:
            topic = msg.topic or ""
            partition = msg.partition if msg.partition is not None else -1
            origin = (topic, partition)
            result.messages_by_partition[origin] += 1
            if msg.offset is not None:
                result.last_offsets[origin] = msg.offset
            origin_number = origin_ids.get(origin)
            if origin_number is None:
                origin_number = origin_ids[origin] = origin_id(topic, partition)
            partition_clock = clocks.get(origin, 0)
            decoded = decode(
                msg.value,
                now_ms=now,
                future_tolerance_ms=tolerance,
                origin=origin_number,
                clock=partition_clock,
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
            if ts > partition_clock:
                clocks[origin] = partition_clock = ts
            result.partition_clocks[origin_number] = partition_clock
            if ts // DAY_MS <= late_day:
                result.dropped["late"] += 1
                continue
            slot = slot_of(ts)
            if slot <= last_forgotten_slot(partition_clock):
                result.unchecked.append(decoded)
                continue
            digest = id_digest(decoded.event_id)
            entry = (dedup_key(slot, digest, shards), slot, origin_number)
            batch = result.by_slot.get(entry)
            if batch is None:
                result.by_slot[entry] = [(digest, decoded)]
            else:
                batch.append((digest, decoded))
        # Worker threads of one process share this object: never move the clock backwards.
        self.clock = max(self.clock, clock)
        return result
