"""Where a feature shard's key states are kept between snapshots: the segment store.

A feature shard's recovery state used to be every key's state, written whole each epoch
the shard was touched, so an epoch's snapshot cost the whole feature state (tens of
millions of keys: hundreds of megabytes per epoch). With a segment store the shard's key
states live in a chain of immutable *segments*: a base (every key, written rarely) and
deltas (the keys changed since the previous segment). The shard's Bytewax snapshot holds
only the chain's references and the *tail*, the states changed since the last segment
(at most `TAIL_BYTES` plus what one epoch changed), so an epoch's snapshot costs what
changed in it (`dataflow.core.shard`; docs/architecture.md, "Snapshots").

The store must be reachable from any process that may restore the shard: after a rescale
a shard's state moves to another process, and with a recovery volume per pod its files
would not follow. `dataflow.kafka.segments` keeps segments in a compacted Kafka topic, each
under a key of its own, referenced by offset. A segment no snapshot refers to any more is
*retired*: its deletion waits until the snapshot that dropped it is certainly committed.

This module holds the contract and an in-memory store for tests of the pure core.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dataflow.errors import SegmentMissingError


@dataclass(frozen=True, slots=True)
class Ref:
    """Where a segment is: its id and, for each of its chunks in order, the offset in the
    store's partition `partition`."""

    segment: str
    partition: int
    offsets: tuple[int, ...]


class Pending(Protocol):
    """A segment handed to the store; `ref` waits until it is durable."""

    def ref(self) -> Ref: ...

    @property
    def done(self) -> bool:
        """Whether `ref` would return without waiting."""
        ...


class SegmentStore(Protocol):
    """Durable, immutable segments, readable from every process of the cluster."""

    def append(self, owner: str, payload: bytes) -> Pending:
        """Store `payload` as a new segment of `owner` (a shard's name: a shard's segments
        share a partition, so that a restore reads them close together). Returns at once;
        the write completes in the background."""
        ...

    def read(self, refs: Sequence[Ref]) -> list[bytes]:
        """The payloads of `refs`, in order; `SegmentMissingError` for one it lacks."""
        ...

    def retire(self, refs: Sequence[Ref]) -> None:
        """Delete segments that no snapshot that may still be restored refers to."""
        ...


class Done:
    """A segment already durable (read back on restore)."""

    __slots__ = ("_ref",)

    def __init__(self, ref: Ref) -> None:
        self._ref = ref

    def ref(self) -> Ref:
        return self._ref

    @property
    def done(self) -> bool:
        return True


class MemorySegments:
    """A `SegmentStore` in a dict, for tests of the pure core: durable at once."""

    def __init__(self) -> None:
        self.segments: dict[str, bytes] = {}
        self.retired: list[str] = []
        self._ids = itertools.count()
        self.appended = 0

    def append(self, owner: str, payload: bytes) -> Pending:
        segment = f"{owner}/{next(self._ids)}"
        self.segments[segment] = bytes(payload)
        self.appended += len(payload)
        return Done(Ref(segment, 0, (len(self.segments),)))

    def read(self, refs: Sequence[Ref]) -> list[bytes]:
        out = []
        for ref in refs:
            if ref.segment not in self.segments:
                raise SegmentMissingError(ref.segment, "the in-memory store")
            out.append(self.segments[ref.segment])
        return out

    def retire(self, refs: Sequence[Ref]) -> None:
        for ref in refs:
            self.segments.pop(ref.segment, None)
            self.retired.append(ref.segment)
