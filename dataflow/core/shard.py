"""One state shard: many feature keys, their counters and the shard's copy of the clock.

Keys are grouped into a fixed number of shards (`FEATURE_SHARDS`) by a stable hash, and
each shard is one Bytewax key. Time-driven work (re-stating every key when the clock enters
a new day, deleting keys whose 30 days are empty) then needs no per-key timer: the shard
does it when its clock moves. See docs/architecture.md for the trade-offs.

Pure: the clock is whatever the inputs say it is.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain, islice

from dataflow.core import native, snapshots
from dataflow.core.counters import (
    KeyState,
    add,
    from_bytes,
    pack_states,
    prune,
    unpack_states,
    unpack_states_layout_4,
)
from dataflow.core.families import (
    AC,
    DOC,
    LAYOUT_TABLE,
    LAYOUTS,
    QD,
    FeatureParams,
    Fields,
    Update,
    family_of,
    fields_for,
    params_table,
)
from dataflow.core.priors import Fit
from dataflow.core.segments import Done, Pending, Ref, SegmentStore
from dataflow.core.smoothing import Prior
from dataflow.core.windows import DAY_MS, RETENTION_DAYS
from dataflow.errors import SegmentError

LAYOUT = 5
"""Version of the recovery state's layout (`dataflow.core.snapshots`) without a segment
store: the keys' states in one buffer of varints (`counters.pack_states`), and the
re-statement queue as a `range` of positions in the keys' order when it is one (a list of
suffixes otherwise). Layouts 4 (int64 items, the queue always a list), 3 (a dict of each
key's bytes) and 2 (that, without fitted priors) are still read."""
SEGMENTED_LAYOUT = 6
"""The layout with a segment store: the keys' states in a chain of segments
(`dataflow.core.segments`) and a tail, the rest as in layout 5."""
TAIL_BYTES = 64 * 1024
"""A tail larger than this (packed) goes to the store as a segment at the snapshot
(`SNAPSHOT_TAIL_BYTES`). Bounds what every snapshot writes beyond the epoch's own changes,
and makes every delta segment at least this large, which bounds the chain a restore
reads."""
MAX_DELTAS = 32
"""A chain with more deltas than this is replaced by a new base."""
RETIRE_AFTER = 2
"""Segments a new base replaced are retired at the shard's second snapshot after it: its
epoch has closed since, and the snapshot that no longer refers to them is committed."""
_PRIOR_FIELD = {DOC: "doc", QD: "qd", AC: "ac"}

Write = tuple[str, Fields | None]
"""(key suffix, fields to HSET) or (key suffix, None) to DEL."""

ShardItem = int | list[Update] | dict[str, str] | Fit
"""A clock reading (epoch ms), a batch of counter updates, key labels (suffix → text), or
the fitted prior of a family for a day (`dataflow.core.priors`)."""


@dataclass(slots=True)
class StepResult:
    writes: list[Write] = field(default_factory=list)
    late_updates: int = 0
    new_day: bool = False
    """The writes re-state every key after a new day: each refreshes its key's TTL."""
    created: set[str] = field(default_factory=set)
    """Written keys that are new since the last flush: their write sets the key's TTL.
    Between a key's creation and the next day, no write needs to touch it again."""
    labels: dict[str, str] = field(default_factory=dict)
    """For written or deleted keys that have one: the text behind a hashed key (`acq`)."""
    fresh: list[int] = field(default_factory=list)
    """The `as_of` of each write that events caused (not of re-statements or deletions):
    what the sink's freshness histogram observes."""

    def sets_ttl(self, suffix: str) -> bool:
        """Whether the write of `suffix` sets its key's TTL."""
        return self.new_day or suffix in self.created


class FeatureShard:
    """The counters of the keys in one shard, and which keys need writing.

    `step` applies inputs and marks keys dirty; `flush` turns the dirty keys into writes.
    Between the two, many updates of a hot key coalesce into one write. The dirty set is
    part of the snapshot, so a crash between a step and its flush loses no write; so is the
    set of keys created since the last flush, whose writes set the TTL.

    When the clock enters a new day every live key is queued for re-statement, and each
    flush writes at most `restate_per_flush` of them (None: all at once), so a day change
    at millions of keys is spread over time instead of one burst. A key is rendered when its
    turn comes, at the clock of that moment; a newer day replaces the queue, so during a
    backfill the re-statements of days that passed meanwhile are never written at all.
    `restate_all` queues every live key the same way without a new day: the repair of a
    store that lost what was written to it (`dataflow.repair`).

    Families in `fitted` render with the prior fitted for the clock's day (`Fit` items,
    normally received a day ahead). Until it arrives they render with the configured prior,
    and the family's keys are queued for re-statement when it does; so are they when the
    prior of the day is fitted again with a different result.
    """

    __slots__ = (
        "base_bytes",
        "chain",
        "clock",
        "created",
        "deleted",
        "delta_bytes",
        "dirty",
        "fitted",
        "keys",
        "labels",
        "labels_changed",
        "labels_gone",
        "mark",
        "max_deltas",
        "owner",
        "params",
        "priors",
        "provisional",
        "rebase",
        "restate_at",
        "restate_from",
        "restate_per_flush",
        "restating",
        "retiring",
        "segments",
        "tail_bytes",
        "touched",
    )

    def __init__(
        self,
        params: FeatureParams,
        *,
        clock: int = 0,
        keys: dict[str, KeyState] | None = None,
        dirty: set[str] | None = None,
        deleted: set[str] | None = None,
        restating: list[str] | None = None,
        restate_from: int | None = None,
        labels: dict[str, str] | None = None,
        created: set[str] | None = None,
        restate_per_flush: int | None = None,
        fitted: frozenset[int] = frozenset(),
        priors: dict[int, dict[int, Prior]] | None = None,
        provisional: set[int] | None = None,
    ):
        self.params = params
        self.fitted = fitted
        self.priors: dict[int, dict[int, Prior]] = {} if priors is None else priors
        """Family -> day -> its fitted prior (from the clock's day on)."""
        self.provisional: set[int] = set() if provisional is None else provisional
        """Fitted families with keys written on the clock's day before its prior arrived."""
        self.clock = clock
        self.keys: dict[str, KeyState] = {} if keys is None else keys
        self.dirty: set[str] = set() if dirty is None else dirty
        self.deleted: set[str] = set() if deleted is None else deleted
        # Keys still to re-state after the last new day, from `restate_at` on.
        self.restating: list[str] = [] if restating is None else restating
        self.restate_at = 0
        self.restate_from = 0 if restating is None else restate_from
        """When the queue is a run of the keys in the dict's order (a new day's, a repair's),
        the position of its first key: the snapshot then stores the run's bounds, not its
        suffixes. The dict only grows between two new days, so the positions hold. None: a
        queue of any keys (`_take_fits`), stored as suffixes."""
        self.restate_per_flush = restate_per_flush
        self.labels: dict[str, str] = {} if labels is None else labels
        self.created: set[str] = set() if created is None else created
        # With a segment store (`dataflow.core.segments`; None: every snapshot holds every
        # key's state): the keys' states at the last segment are `chain` (a base, then
        # deltas); the keys changed since are the *tail*: the keys in `touched` or `dirty`,
        # and the keys from position `mark` on in the dict's order (created since; keys are
        # deleted only on a new day, which sets `rebase`). With `mark` 0 the tail is every
        # key and the chain is empty.
        self.segments: SegmentStore | None = None
        self.owner = ""
        self.tail_bytes = TAIL_BYTES
        self.max_deltas = MAX_DELTAS
        self.chain: list[Pending] = []
        self.base_bytes = 0
        self.delta_bytes = 0
        self.mark = 0
        self.touched: set[str] = set()
        self.labels_changed: set[str] = set()
        self.labels_gone: set[str] = set()
        """Labels set and removed since the last segment (the labels travel with the
        segments: an `acq` key's text, `StepResult.labels`)."""
        self.rebase = False
        self.retiring: list[tuple[int, tuple[Ref, ...]]] = []
        """Replaced segments, each group with the snapshots it still waits."""

    # Recovery: Bytewax pickles snapshots *after* the logic may already have processed the
    # next epoch, so a snapshot must not share mutable objects with the live state. Pickling
    # here costs what Bytewax would spend anyway, and returns immutable bytes.
    def snapshot(self) -> bytes | snapshots.Deferred:
        if self.segments is not None:
            return self._segmented_snapshot(self.segments)
        compiled = native.core
        state = (
            self.clock,
            pack_states(self.keys) if compiled is None else compiled.pack_states(self.keys),
            *self._rest(),
        )
        return snapshots.wrap("features", LAYOUT, state)

    def _rest(self) -> tuple[object, ...]:
        """The state besides the keys' counters, as every layout from 3 on stores it."""
        return (
            self.dirty,
            self.deleted,
            self._queue_state(),
            self.labels,
            self.created,
            {f: {d: (p.alpha, p.beta) for d, p in days.items()} for f, days in self.priors.items()},
            self.provisional,
        )

    def use_segments(
        self,
        store: SegmentStore,
        *,
        tail_bytes: int = TAIL_BYTES,
        max_deltas: int = MAX_DELTAS,
        owner: str | None = None,
    ) -> None:
        """Keep the keys' states in `store` from the next snapshot on. `owner` names the
        shard's segments in the store (a shard's segments then land together, which only
        speeds up a restore): kept in the snapshot, new for a new shard."""
        self.segments = store
        self.tail_bytes, self.max_deltas = tail_bytes, max_deltas
        self.owner = owner or self.owner or f"features/{uuid.uuid4().hex[:16]}"

    def _segmented_snapshot(self, store: SegmentStore) -> bytes | snapshots.Deferred:
        """Layout 6: the chain's references and the tail (see `dataflow.core.segments`).

        Every snapshot writes the tail; a tail past `tail_bytes` becomes a delta segment,
        and a base replaces the chain when the deltas outgrow it, when there are more than
        `max_deltas`, or after a new day (which rewrites old days and deletes keys)."""
        self._retire_due(store)
        if self.rebase:
            self._drop_chain()
            self.rebase = False
        tail = self._tail()
        if len(tail) > self.tail_bytes:
            replace_chain = (
                not self.chain
                or self.delta_bytes + len(tail) > self.base_bytes
                or len(self.chain) > self.max_deltas
            )
            if replace_chain:
                payload = tail if not self.chain else self._base()
                self._drop_chain()
                self.chain = [store.append(self.owner, payload)]
                self.base_bytes = len(payload)
            else:
                self.chain.append(store.append(self.owner, tail))
                self.delta_bytes += len(tail)
            self.mark = len(self.keys)
            self.touched, self.labels_changed, self.labels_gone = set(), set(), set()
            tail = _segment(b"", {}, ())
        dirty, deleted, queue, _labels, created, priors, provisional = self._rest()
        state = (self.clock, self.owner, self.mark, tail, dirty, deleted, queue, created)
        body = pickle.dumps(  # the labels are in the segments and the tail
            (*state, priors, provisional, self.retiring), protocol=pickle.HIGHEST_PROTOCOL
        )
        chain = list(self.chain)

        def finish() -> bytes:
            refs = tuple(_ref_state(pending.ref()) for pending in chain)
            return snapshots.wrap("features", SEGMENTED_LAYOUT, (refs, body))

        if all(pending.done for pending in chain):
            return finish()
        return snapshots.Deferred(finish)

    def _base(self) -> bytes:
        """Every key's state and label, as a segment."""
        return _segment(self._pack(self.keys), self.labels, ())

    def _tail(self) -> bytes:
        """The keys and labels changed since the last segment, as a segment to apply over
        the chain on restore: changed older keys (their dict positions stay), then the new
        ones in dict order; labels set since, and labels removed since."""
        keys = self.keys
        if self.mark == 0:
            return self._base()
        born = list(islice(reversed(keys), len(keys) - self.mark))
        born.reverse()
        changed = self.touched | self.dirty
        if born:
            changed.difference_update(born)
        out = {suffix: keys[suffix] for suffix in changed}
        for suffix in born:
            out[suffix] = keys[suffix]
        labels = self.labels
        return _segment(
            self._pack(out),
            {s: labels[s] for s in self.labels_changed if s in labels},
            self.labels_gone,
        )

    @staticmethod
    def _pack(keys: dict[str, KeyState]) -> bytes:
        compiled = native.core
        return pack_states(keys) if compiled is None else compiled.pack_states(keys)

    def _drop_chain(self) -> None:
        """Start over with every key in the tail; the chain's segments retire later."""
        if self.chain:
            refs = tuple(pending.ref() for pending in self.chain)
            self.retiring.append((RETIRE_AFTER, refs))
        self.chain = []
        self.base_bytes = self.delta_bytes = self.mark = 0
        self.touched, self.labels_changed, self.labels_gone = set(), set(), set()

    def _retire_due(self, store: SegmentStore) -> None:
        due: list[Ref] = []
        waiting: list[tuple[int, tuple[Ref, ...]]] = []
        for left, refs in self.retiring:
            if left <= 1:
                due.extend(refs)
            else:
                waiting.append((left - 1, refs))
        self.retiring = waiting
        if due:
            store.retire(due)

    def _queue_state(self) -> range | list[str]:
        """The keys still to re-state, as a snapshot stores them: the positions of a run of
        the keys' order (a few bytes however long the queue), else their suffixes."""
        at, start = self.restate_at, self.restate_from
        if start is None:
            return self.restating[at:]
        return range(start + at, start + len(self.restating))

    @classmethod
    def restore(
        cls,
        params: FeatureParams,
        blob: bytes,
        restate_per_flush: int | None = None,
        fitted: frozenset[int] = frozenset(),
        segments: SegmentStore | None = None,
        *,
        tail_bytes: int = TAIL_BYTES,
    ) -> FeatureShard:
        """The shard a snapshot holds. `segments`: the store a layout-6 snapshot's chain is
        in, and where the restored shard keeps its states from then on (`use_segments`)."""
        layout, state = snapshots.unwrap_layouts(
            "features", (SEGMENTED_LAYOUT, LAYOUT, 4, 3, 2), blob
        )
        compiled = native.core
        unpack = unpack_states if compiled is None else compiled.unpack_states
        chain: list[Pending] = []
        sizes: list[int] = []
        mark = 0
        retiring: list[tuple[int, tuple[Ref, ...]]] = []
        if layout == SEGMENTED_LAYOUT:
            if segments is None:
                raise SegmentError(
                    "a feature shard's recovery state is in a segment store, and none is "
                    "configured: run the pipeline through `python -m dataflow.run`"
                )
            refs, body = state
            (clock, owner, mark, tail, dirty, deleted, queue, created, priors, provisional,
             retiring) = pickle.loads(body)  # fmt: skip # noqa: S301 - our own bytes
            chain = [Done(Ref(*ref)) for ref in refs]
            payloads = segments.read([pending.ref() for pending in chain])
            sizes = [len(payload) for payload in payloads]
            keys: dict[str, KeyState] = {}
            labels: dict[str, str] = {}
            for payload in [*payloads, tail]:
                packed, set_labels, gone = pickle.loads(payload)  # noqa: S301 - our own
                keys.update(unpack(packed))
                labels.update(set_labels)
                for suffix in gone:
                    labels.pop(suffix, None)
            tail_states, tail_labels, tail_gone = pickle.loads(tail)  # noqa: S301 - our own
            touched = unpack(tail_states) if mark else {}
            state = (clock, None, dirty, deleted, queue, labels, created, priors, provisional)
        else:
            owner, touched, tail_labels, tail_gone = None, {}, {}, ()
            if layout == 2:
                state = (*state, {}, set())
        clock, packed, dirty, deleted, queue, labels, created, priors, provisional = state
        if layout == LAYOUT:
            keys = unpack(packed)
        elif layout == 4:
            keys = (
                unpack_states_layout_4(packed)
                if compiled is None
                else compiled.unpack_states_layout_4(packed)
            )
        elif layout != SEGMENTED_LAYOUT:
            keys = {suffix: from_bytes(counts) for suffix, counts in packed.items()}
        if isinstance(queue, range):
            restating, restate_from = list(islice(keys, queue.start, queue.stop)), queue.start
        else:
            restating, restate_from = queue, None
        shard = cls(
            params,
            clock=clock,
            keys=keys,
            dirty=dirty,
            deleted=deleted,
            restating=restating,
            restate_from=restate_from,
            labels=labels,
            created=created,
            restate_per_flush=restate_per_flush,
            fitted=fitted,
            priors={f: {d: Prior(*ab) for d, ab in days.items()} for f, days in priors.items()},
            provisional=provisional,
        )
        if segments is not None:
            shard.use_segments(segments, tail_bytes=tail_bytes, owner=owner)
            shard.chain = chain
            shard.base_bytes = sizes[0] if sizes else 0
            shard.delta_bytes = sum(sizes[1:])
            shard.mark = mark
            shard.touched = set(touched)
            shard.labels_changed = set(tail_labels) if mark else set()
            shard.labels_gone = set(tail_gone) if mark else set()
            shard.retiring = list(retiring)
        return shard

    def step(self, items: list[ShardItem]) -> StepResult:
        """Apply clock readings and update batches in order; mark what needs writing.

        When the clock enters a new day every key needs re-stating (or deleting once its
        30 days are empty), which keeps each value a pure function of the events and the
        clock's day. The returned result carries counts only; `flush` makes the writes.
        """
        result = StepResult()
        start_day = self.clock // DAY_MS
        clock = self.clock
        late_before = (clock // DAY_MS) - RETENTION_DAYS  # a day <= this is late
        dirty = self.dirty
        keys = self.keys
        fits: list[Fit] = []
        for item in items:
            if isinstance(item, Fit):
                fits.append(item)
                continue
            if isinstance(item, int):
                if item > clock:
                    clock = item
                    late_before = clock // DAY_MS - RETENTION_DAYS
                continue
            if isinstance(item, dict):
                self.labels.update(item)
                if self.mark:
                    self.labels_changed.update(item)
                    self.labels_gone.difference_update(item)
                continue
            compiled = native.core
            if compiled is not None:
                clock, late_before, late = compiled.apply(
                    item,
                    keys,
                    dirty,
                    self.created,
                    self.deleted,
                    LAYOUT_TABLE,
                    clock,
                    late_before,
                )
                result.late_updates += late
                continue
            for family, suffix, ts, counts in item:
                if ts > clock:
                    clock = ts
                    late_before = clock // DAY_MS - RETENTION_DAYS
                if ts // DAY_MS <= late_before:
                    result.late_updates += 1
                    continue
                state = keys.get(suffix)
                if state is None:
                    keys[suffix] = add(None, LAYOUTS[family], ts, counts)
                    self.deleted.discard(suffix)
                    self.created.add(suffix)
                else:
                    add(state, LAYOUTS[family], ts, counts)
                dirty.add(suffix)
        self.clock = clock
        day = clock // DAY_MS
        if day != start_day:
            result.new_day = True
            self.rebase = True  # old days pruned and keys deleted: the next snapshot rebuilds
            first_kept = day - RETENTION_DAYS + 1
            expired = [
                suffix
                for suffix, state in keys.items()
                if prune(state, LAYOUTS[family_of(suffix)], first_kept)
            ]
            for suffix in expired:
                del keys[suffix]
                dirty.discard(suffix)
                self.created.discard(suffix)
            self.deleted.update(expired)
            # A label whose key never got (or no longer has) counts is not needed.
            for suffix in [s for s in self.labels if s not in keys and s not in self.deleted]:
                del self.labels[suffix]
            self.restating = list(keys)
            self.restate_at, self.restate_from = 0, 0
            self.provisional.clear()
            for days in self.priors.values():
                for old in [d for d in days if d < day]:
                    del days[old]
        if fits:
            self._take_fits(fits, day)
        return result

    def _take_fits(self, fits: list[Fit], today: int) -> None:
        """Keep the fitted priors of today and later; re-state a family whose keys were
        written today with another prior than the one now in force."""
        restate: set[int] = set()
        for fit in fits:
            if fit.day < today or fit.family not in self.fitted:
                continue
            days = self.priors.setdefault(fit.family, {})
            old = days.get(fit.day)
            days[fit.day] = fit.prior
            if fit.day == today and (
                fit.family in self.provisional or (old is not None and old != fit.prior)
            ):
                restate.add(fit.family)
        if restate:
            self.provisional -= restate
            queued = self.restating[self.restate_at :]
            waiting = set(queued)
            self.restating = queued + [
                s for s in self.keys if s not in waiting and family_of(s) in restate
            ]
            self.restate_at, self.restate_from = 0, None

    def params_for(self, day: int) -> tuple[FeatureParams, frozenset[int]]:
        """The parameters to render keys with on `day`, and the fitted families whose prior
        for that day has not arrived (they render with the configured one meanwhile)."""
        if not self.fitted:
            return self.params, frozenset()
        changes: dict[str, Prior] = {}
        missing: set[int] = set()
        for family in self.fitted:
            prior = self.priors.get(family, {}).get(day)
            if prior is None:
                missing.add(family)
            else:
                changes[_PRIOR_FIELD[family]] = prior
        return replace(self.params, **changes), frozenset(missing)  # type: ignore[arg-type]

    def flush(self, *, everything: bool = False) -> StepResult:
        """The writes for every dirty key (its values now), every deleted key, and the next
        keys queued for re-statement (all of them with `everything`, as at the end of
        input). `new_day` marks a result that re-states keys."""
        day_start = (self.clock // DAY_MS) * DAY_MS
        params, missing = self.params_for(self.clock // DAY_MS)
        keys = self.keys
        dirty = self.dirty
        writes: list[Write] = [(suffix, None) for suffix in self.deleted]
        restating = self.restating
        end = len(restating)
        if self.restate_per_flush is not None and not everything:
            end = min(end, self.restate_at + self.restate_per_flush)
        # A key re-stated in this flush is written once, and sets its TTL (see StepResult).
        turn = [s for s in restating[self.restate_at : end] if s in keys]
        self.restate_at = end
        if end == len(restating):
            self.restating, self.restate_at, self.restate_from = [], 0, 0
        changed = dirty.difference(turn) if turn else dirty
        if missing:
            families = map(family_of, chain(changed, turn))
            self.provisional.update(f for f in families if f in missing)
        fresh: list[int] = []
        compiled = native.core
        if compiled is not None:
            render = partial(fields_for, params=params)  # for a key the compiled sums overflow
            table = params_table(params)
            compiled.render(keys, changed, day_start, LAYOUT_TABLE, table, render, writes, fresh)
            if turn:
                compiled.render(keys, turn, day_start, LAYOUT_TABLE, table, render, writes)
        else:
            for suffixes, as_ofs in ((changed, fresh), (turn, None)):
                for suffix in suffixes:
                    state = keys[suffix]
                    as_of = max(state[0], day_start)
                    writes.append((suffix, fields_for(family_of(suffix), state, as_of, params)))
                    if as_ofs is not None:
                        as_ofs.append(as_of)
        labels = self.labels
        result = StepResult(writes=writes, new_day=bool(turn), created=self.created, fresh=fresh)
        if labels:
            result.labels = {s: labels[s] for s, _ in writes if s in labels}
            for suffix in self.deleted:
                if labels.pop(suffix, None) is not None and self.mark:
                    self.labels_gone.add(suffix)
                    self.labels_changed.discard(suffix)
        if self.segments is not None and self.mark:
            self.touched |= dirty
        self.dirty = set()
        self.deleted = set()
        self.created = set()
        return result

    def restate_all(self) -> int:
        """Queue every live key for re-statement exactly as a new day does: the same queue,
        written `restate_per_flush` keys per flush, kept in the snapshot, each write setting
        its key's TTL (`StepResult.new_day`). For a store that lost what was written to it;
        replaces a queue in progress. Returns how many keys were queued."""
        self.restating = list(self.keys)
        self.restate_at, self.restate_from = 0, 0
        return len(self.restating)

    @property
    def restate_left(self) -> int:
        """Keys queued for re-statement and not written yet."""
        return len(self.restating) - self.restate_at

    @property
    def pending(self) -> bool:
        return bool(self.dirty or self.deleted or self.restating)

    def __len__(self) -> int:
        return len(self.keys)


def _ref_state(ref: Ref) -> tuple[str, int, tuple[int, ...]]:
    """A reference as a snapshot stores it: plain values, whatever becomes of `Ref`."""
    return (ref.segment, ref.partition, ref.offsets)


def _segment(states: bytes, labels: dict[str, str], gone: Iterable[str]) -> bytes:
    """A segment's payload: packed key states (`counters.pack_states`), the labels set and
    the labels removed."""
    return pickle.dumps((states, labels, sorted(gone)), protocol=pickle.HIGHEST_PROTOCOL)
