"""Repairing a feature store that lost data: the signal one process's parts share.

Redis can come back without what the pipeline wrote (a restart without persistence, a
`FLUSHDB`, a failover to a replica that lost writes, a restored backup). The Redis sink
notices it through its marker (`dataflow.sinks.marker`) and raises a new *generation* here;
every feature shard of the process then queues every live key for re-statement
(`FeatureShard.restate_all`), exactly as a new day does: rate-limited by
`RESTATE_KEYS_PER_SECOND`, kept in the snapshot, each write setting its key's TTL.

`StoreRepairs` is that signal, one per dataflow (in practice one per process), shared by:

- the Redis sink's marker guard, which raises a generation (`lost`) and writes the marker
  back once the repair is safely queued (`settled`);
- the feature shards (`ShardLogic` in `dataflow.flow`), which read `generation` at every
  activation, queue their keys when it moved (`queued`), and report each snapshot taken
  with the queue in it (`saved`);
- the `store_checks` input (`StoreWakeSource` in `dataflow.flow`), one partition per worker,
  which wakes every feature shard when the generation moves, so that idle shards repair
  too without waiting for an event (`woke`).

Each process repairs its own shards: the Redis sink is a `DynamicSink` fed by the local
shards, so the keys a process's sink wrote are exactly those its shards hold, and each
process's sink checks the marker fields of its own workers.

A repair is *settled* once every shard of the process has queued it and had a snapshot
taken with the queue in it (or had nothing to queue), after every worker's wake-up went
out: from then on a crash resumes with the queue, so the marker may say the store is whole
again. Thread-safe: the guard runs on its own thread, shards and wake-ups on the workers'.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass


@dataclass(frozen=True)
class RepairStatus:
    """What the guard needs to report on the repair in progress."""

    generation: int
    checked: bool
    """The sink has checked the marks of this process at least once."""
    settled: bool
    shards: int
    """Feature shards of this process."""
    shards_queued: int
    """Of them, the ones whose queue for `generation` is in a snapshot (or was empty)."""
    keys_queued: int
    """Keys queued for re-statement by the shards for `generation`."""


class StoreRepairs:
    """The generation of the store as this process knows it, and who has acted on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generation = 0
        """Raised by one each time the store is found to have lost data. Read without the
        lock by the shards (an int attribute: one atomic read)."""
        self._shards: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._queued: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._wakers: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._everyone = 0
        """The newest generation every shard must re-state (not only restored ones)."""
        self._running = False
        self._checked = False
        self._keys_queued = 0

    # --- the Redis sink --------------------------------------------------------------------

    def lost(self, *, at_start: bool = False) -> int:
        """The store lost data: a new generation, which every shard of the process will
        re-state; returns it. `at_start`: the marker was missing when the sink started, so
        only what shards restored from a snapshot may be missing; what this process wrote
        since it started went to this store and is there."""
        with self._lock:
            self.generation += 1
            if not at_start:
                self._everyone = self.generation
            self._keys_queued = 0
            return self.generation

    def checked(self) -> None:
        """The sink has checked the marks of this process (done after every check)."""
        self._checked = True

    def status(self) -> RepairStatus:
        with self._lock:
            generation = self.generation
            queued = sum(1 for acked in self._shards.values() if acked >= generation)
            woken = all(emitted >= generation for emitted in self._wakers.values())
            return RepairStatus(
                generation=generation,
                checked=self._checked,
                # Before the dataflow runs, restored shards may not exist yet.
                settled=self._running and woken and queued == len(self._shards),
                shards=len(self._shards),
                shards_queued=queued,
                keys_queued=self._keys_queued,
            )

    # --- the feature shards ----------------------------------------------------------------

    def join(self, shard: object, *, restored: bool) -> int:
        """A shard of this process starts; returns the generation it has acted on. A shard
        restored from a snapshot holds keys written before any loss this process noticed,
        so it starts at 0; a new one holds nothing yet, so it starts at the current one."""
        with self._lock:
            start = 0 if restored else self.generation
            self._shards[shard] = start
            return start

    def due(self, since: int, *, restored: bool) -> bool:
        """Whether a shard that has acted on generation `since` must re-state its keys now
        (a new shard only for a loss noticed while running)."""
        return self.generation > since and (restored or self._everyone > since)

    def queued(self, shard: object, generation: int, keys: int) -> None:
        """`shard` queued `keys` keys for `generation`; with none, it has nothing to save."""
        with self._lock:
            if generation == self.generation:
                self._keys_queued += keys
            # Acknowledged at its next snapshot; so is nothing queued while an earlier queue
            # still waits for one.
            if keys or shard in self._queued:
                self._queued[shard] = generation
            elif self._shards.get(shard, -1) < generation:
                self._shards[shard] = generation

    def saved(self, shard: object) -> None:
        """A snapshot of `shard` was taken: what it had queued is in it."""
        with self._lock:
            generation = self._queued.pop(shard, None)
            if generation is not None and self._shards.get(shard, -1) < generation:
                self._shards[shard] = generation

    # --- the wake-ups ----------------------------------------------------------------------

    def enter(self, waker: object) -> None:
        """`waker` (one per worker) was built: the status waits for its first run, after
        which its worker's restored shards exist."""
        with self._lock:
            self._wakers[waker] = -1

    def woke(self, waker: object, generation: int) -> None:
        """`waker` (one per worker) has run, and woken every shard for `generation`."""
        with self._lock:
            self._running = True
            self._wakers[waker] = generation

    def leave(self, waker: object) -> None:
        """`waker` stopped: the status no longer waits for it."""
        with self._lock:
            self._wakers.pop(waker, None)
