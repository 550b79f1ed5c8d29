"""Event-id dedup over 24 hours of event time (contract §5), split by time slot.

Ids are grouped by the 10-minute slot of their `ts` and by a stable hash shard. The slots
live in a fixed ring of `RING_SLOTS` Bytewax keys per shard (`slot % RING_SLOTS`): a ring
entry holds the ids of one slot and is recycled when an event of a newer slot that maps to
it arrives. So:

- a recovery snapshot re-writes only the entries that received events in that epoch (a few
  minutes of ids), never 24 hours of them;
- the key space is fixed (`RING_SLOTS × DEDUP_SHARDS`): no per-id or per-slot keys that
  would each leave a tombstone in the recovery store forever, no timers;
- an entry is recycled 72 hours after its slot, so the 24-hour horizon holds even while one
  Kafka partition runs up to 48 hours of event time ahead of another (a backfill).

Which events are checked at all is decided per source partition (`Intake`): an event whose
slot its own partition's clock has passed by more than 24 hours has nothing to be checked
against and is accepted (docs/contract.md §5).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Iterator
from typing import Final, TypeVar

SLOT_MS: Final = 600_000
HORIZON_MS: Final = 86_400_000
RING_SLOTS: Final = 432
"""72 hours of slots: 24 h of horizon plus 48 h of tolerated skew between partitions."""

E = TypeVar("E")


def id_digest(event_id: str) -> int:
    """64-bit BLAKE2b digest of an event id: 8 bytes per id instead of the whole string."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest(), "big")


def slot_of(ts_ms: int) -> int:
    return ts_ms // SLOT_MS


def dedup_key(slot: int, digest: int, shards: int) -> str:
    """The Bytewax key (ring entry) an event id is looked up in."""
    return f"{slot % RING_SLOTS}:{digest % shards}"


def last_forgotten_slot(clock_ms: int) -> int:
    """The newest slot past the horizon at `clock_ms`: the clock has passed its end by more
    than 24 hours (`clock > (slot + 1) * SLOT_MS + HORIZON_MS`)."""
    return (clock_ms - HORIZON_MS - 1) // SLOT_MS - 1


class SlotIds:
    """One ring entry: the id digests accepted for `slot` (first copy wins)."""

    __slots__ = ("seen", "slot")

    def __init__(self, slot: int = -1, seen: set[int] | None = None) -> None:
        self.slot = slot
        self.seen: set[int] = set() if seen is None else seen

    def admit(self, slot: int, events: Iterable[tuple[int, E]]) -> Iterator[E]:
        """Yield the events whose digest is new for `slot`; remember them."""
        if slot > self.slot:  # the entry's old slot is 72 h behind: recycle it
            self.slot = slot
            self.seen = set()
        elif slot < self.slot:  # the ring has moved on: nothing left to check against
            for _, event in events:
                yield event
            return
        seen = self.seen
        for digest, event in events:
            if digest not in seen:
                seen.add(digest)
                yield event

    def snapshot(self) -> bytes:
        # Immutable bytes: Bytewax pickles snapshots later, after more items may arrive.
        return pickle.dumps((self.slot, self.seen), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, blob: bytes) -> SlotIds:
        slot, seen = pickle.loads(blob)  # noqa: S301 - our own recovery snapshot
        return cls(slot, seen)
