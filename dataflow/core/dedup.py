"""Event-id dedup over 24 hours of event time (contract §5), for any arrival pattern.

Ids are grouped by the 10-minute slot of their `ts` and by a stable hash shard. The slots
live in a fixed ring of `RING_SLOTS` Bytewax keys per shard (`slot % RING_SLOTS`), so the
key space is fixed (`RING_SLOTS × DEDUP_SHARDS`): no per-id or per-slot keys that would each
leave a tombstone in the recovery store, no timers, and a recovery snapshot re-writes only
the entries that received events in that epoch (a few minutes of ids), never 24 hours.

Two decisions, each a function of what was read and nothing else:

- **Is an event checked?** By its own Kafka partition's clock at that message (the largest
  `ts` read from the partition so far, kept with the partition's offset in the source's
  snapshot, `dataflow.core.intake`): an event whose slot that clock has passed by more than
  24 hours has nothing to be checked against and is accepted. Every other event is checked,
  and the first copy wins.
- **When may a slot's ids be forgotten?** Only once *every* partition's clock has passed
  the slot by more than 24 hours: the dedup watermark, the smallest partition clock
  (`Watermark`). Then no partition can still deliver an event that would be checked against
  it. A partition that reads days behind the others (a stalled consumer, a backfill, one
  partition restored from an older snapshot) therefore holds ids back instead of letting its
  copies through: memory grows with the skew actually present, and shows in
  `search_features_dedup_ids` and `search_features_dedup_watermark_lag_seconds`.

A ring entry holds as many slots as the watermark keeps alive (one, when partitions read
together). The watermark's forgets reach the entries as items of the same epoch as the
readings that moved it, and an entry applies them only when that epoch closes: by then
every event read before the watermark moved has been checked, whatever the interleaving.

Beyond the guarantee: a partition that delivers its first event after the watermark moved
on (a partition added later, or one that was empty) is not yet part of the watermark. An
event of it checked against a slot already forgotten is counted
(`search_features_dedup_unheld_checks_total`) and starts the slot afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

from dataflow.core import snapshots

SLOT_MS: Final = 600_000
HORIZON_MS: Final = 86_400_000
RING_SLOTS: Final = 432
"""72 hours of slots: with partitions read together, an entry holds one slot at a time."""
ENTRY_LAYOUT: Final = 2
WATERMARK_LAYOUT: Final = 1

E = TypeVar("E")


def id_digest(event_id: str) -> int:
    """64-bit BLAKE2b digest of an event id: 8 bytes per id instead of the whole string."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest(), "big")


def slot_of(ts_ms: int) -> int:
    return ts_ms // SLOT_MS


def entry_key(slot: int, shard: int) -> str:
    """The Bytewax key of the ring entry holding `slot` of dedup shard `shard`."""
    return f"{slot % RING_SLOTS}:{shard}"


def dedup_key(slot: int, digest: int, shards: int) -> str:
    """The Bytewax key (ring entry) an event id is looked up in."""
    return entry_key(slot, digest % shards)


def last_forgotten_slot(clock_ms: int) -> int:
    """The newest slot past the horizon at `clock_ms`: the clock has passed its end by more
    than 24 hours (`clock > (slot + 1) * SLOT_MS + HORIZON_MS`)."""
    return (clock_ms - HORIZON_MS - 1) // SLOT_MS - 1


@dataclass(frozen=True, slots=True)
class Forget:
    """Tells a ring entry that every slot up to `slot` is past the watermark of the
    partitions in `origins` (the ones the watermark knew when it moved)."""

    slot: int
    origins: frozenset[int]


class DedupEntry:
    """One ring entry: the id digests accepted per slot (first copy wins), and which
    partitions' events put them there."""

    __slots__ = ("forgotten", "origins", "pending", "slots", "unheld")

    def __init__(self) -> None:
        self.slots: dict[int, set[int]] = {}
        self.origins: dict[int, set[int]] = {}  # slot -> the partitions that checked it
        self.pending: Forget | None = None  # the newest forget, applied at the epoch's close
        self.forgotten = -1  # the newest slot a forget was applied for
        self.unheld = 0
        """Checks of a slot this entry had already forgotten (cumulative, for a metric)."""

    def admit(self, slot: int, events: Iterable[tuple[int, E]], origin: int = 0) -> Iterator[E]:
        """Yield the events (read from partition `origin`) whose digest is new for `slot`;
        remember them."""
        seen = self.slots.get(slot)
        if seen is None:
            seen = self.slots[slot] = set()
            self.origins[slot] = {origin}
            if slot <= self.forgotten:
                self.unheld += 1
        else:
            self.origins[slot].add(origin)
        for digest, event in events:
            if digest not in seen:
                seen.add(digest)
                yield event

    def forget(self, forget: Forget) -> None:
        """Note a forget of the watermark; applied by `close_epoch`."""
        if self.pending is None or forget.slot >= self.pending.slot:
            self.pending = forget

    def close_epoch(self) -> None:
        """Drop the slots the watermark has passed. Called when the epoch in which the
        forget arrived closes, so every event read before the watermark moved was checked.
        A slot also checked by a partition the watermark did not know yet stays (until a
        later forget that knows it)."""
        forget = self.pending
        if forget is None:
            return
        self.pending = None
        self.forgotten = max(self.forgotten, forget.slot)
        for slot in [s for s in self.slots if s <= forget.slot]:
            if self.origins[slot] <= forget.origins:
                del self.slots[slot]
                del self.origins[slot]

    def held(self) -> int:
        return sum(len(ids) for ids in self.slots.values())

    def snapshot(self) -> bytes:
        self.close_epoch()
        return snapshots.wrap("dedup", ENTRY_LAYOUT, (self.forgotten, self.slots, self.origins))

    @classmethod
    def restore(cls, blob: bytes) -> DedupEntry:
        entry = cls()
        entry.forgotten, entry.slots, entry.origins = snapshots.unwrap("dedup", ENTRY_LAYOUT, blob)
        return entry


class Watermark:
    """The smallest partition clock: how far every partition has read in event time.

    Fed with each intake batch's partition clocks; when the watermark passes a slot's
    horizon, `advance` names the ring entries that may forget it. One instance sees every
    partition (a single Bytewax key)."""

    __slots__ = ("clocks", "forgotten")

    def __init__(self) -> None:
        self.clocks: dict[int, int] = {}  # origin id -> that partition's clock
        self.forgotten: int | None = None  # newest slot already announced

    @property
    def value(self) -> int:
        return min(self.clocks.values()) if self.clocks else 0

    def advance(self, readings: Iterable[tuple[int, int]], shards: int) -> list[tuple[str, Forget]]:
        """Apply `(origin, clock)` readings; return the forgets to send, by entry key."""
        clocks = self.clocks
        for origin, clock in readings:
            if clock > clocks.get(origin, -1):
                clocks[origin] = clock
        newest = last_forgotten_slot(self.value)
        old = self.forgotten
        if old is not None and newest <= old:
            return []
        self.forgotten = newest
        # An entry drops every slot up to the one it is told, so each ring position needs
        # only the newest of its slots in the range (the first time: every position).
        first = newest - RING_SLOTS + 1 if old is None else max(old + 1, newest - RING_SLOTS + 1)
        known = frozenset(clocks)
        return [
            (entry_key(slot, shard), Forget(slot, known))
            for slot in range(first, newest + 1)
            for shard in range(shards)
        ]

    def snapshot(self) -> bytes:
        return snapshots.wrap("dedup_watermark", WATERMARK_LAYOUT, (self.clocks, self.forgotten))

    @classmethod
    def restore(cls, blob: bytes) -> Watermark:
        mark = cls()
        mark.clocks, mark.forgotten = snapshots.unwrap("dedup_watermark", WATERMARK_LAYOUT, blob)
        return mark
