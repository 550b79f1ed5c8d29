"""Event-id dedup over 24 hours of event time (contract §5), split by time slot.

Ids are grouped by the 10-minute slot of their `ts` and by a stable hash shard; each
(slot, shard) pair is one Bytewax key holding a set of 64-bit id digests. A recovery
snapshot then re-writes only the slots that received events in that epoch (not 24 hours
of ids), and a whole slot is forgotten at once when the clock is 24 hours past its end:
no per-id timers, no per-id tombstones in the recovery store. See docs/contract.md §5.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Iterator
from typing import Final, TypeVar

SLOT_MS: Final = 600_000
HORIZON_MS: Final = 86_400_000
MAX_EXPIRY_SLOTS: Final = 31 * 144
"""A clock jump never expires more than the 30-day late horizon's worth of slots; older
slots cannot receive events (those are late and dropped before dedup)."""

E = TypeVar("E")


def id_digest(event_id: str) -> int:
    """64-bit BLAKE2b digest of an event id: 8 bytes per id instead of the whole string."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest(), "big")


def slot_of(ts_ms: int) -> int:
    return ts_ms // SLOT_MS


def dedup_key(slot: int, digest: int, shards: int) -> str:
    """The Bytewax key of the (slot, shard) an event id is looked up in."""
    return f"{slot}:{digest % shards}"


def last_forgotten_slot(clock_ms: int) -> int:
    """The newest slot whose ids are forgotten at `clock_ms`: the clock has passed its end
    by more than 24 hours (`clock > (slot + 1) * SLOT_MS + HORIZON_MS`)."""
    return (clock_ms - HORIZON_MS - 1) // SLOT_MS - 1


def slots_to_forget(old_clock_ms: int, new_clock_ms: int) -> range:
    """Slots that the clock moving from `old` to `new` makes forgettable (none at start)."""
    if old_clock_ms <= 0:
        return range(0)
    end = last_forgotten_slot(new_clock_ms) + 1
    start = max(last_forgotten_slot(old_clock_ms) + 1, end - MAX_EXPIRY_SLOTS)
    return range(start, max(start, end))


class SeenIds:
    """The ids accepted in one (slot, shard). After `forget()` it stays as a small marker,
    so that stragglers for a forgotten slot pass through instead of re-growing state."""

    __slots__ = ("forgotten", "seen")

    def __init__(self, seen: set[int] | None = None, forgotten: bool = False) -> None:
        self.seen: set[int] = set() if seen is None else seen
        self.forgotten = forgotten

    def admit(self, events: Iterable[tuple[int, E]]) -> Iterator[E]:
        """Yield the events whose digest is new (first copy wins); remember them."""
        if self.forgotten:
            for _, event in events:
                yield event
            return
        seen = self.seen
        for digest, event in events:
            if digest not in seen:
                seen.add(digest)
                yield event

    def forget(self) -> None:
        self.seen = set()
        self.forgotten = True

    def snapshot(self) -> bytes:
        # Immutable bytes: Bytewax pickles snapshots later, after more items may arrive.
        return pickle.dumps((self.forgotten, self.seen), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, blob: bytes) -> SeenIds:
        forgotten, seen = pickle.loads(blob)  # noqa: S301 - our own recovery snapshot
        return cls(seen, forgotten)
