"""The autocomplete → search → click link (contract §4.4): a per-session join.

An `ac_select` at `t` with normalised candidate `c` is *searched* when its session has a
`search_impression` for `c` with `t <= ts <= t + 60 s`, and *clicked* when it has a
`click` for `c` with `t <= ts <= t + 30 min`; each select counts once, and at most once
each way. The output is `ACQ` counter increments bucketed by the select's `ts`, applied by
the state shards like every other family.

Why increments work although arrival order is free: a select emits `+1 select` (plus
whatever the partners already held give it) the moment it arrives; a search or click that
arrives later emits `+1 searched`/`+1 clicked` for each held select it completes, and a
flag on the select makes that happen at most once. Whichever of two partners arrives
second sees the first, so the totals are the brute-force join's, provided the first is
still held (the disorder tolerance below). A link is only ever made when the window rule
holds, so beyond the tolerance counts can fall short but never exceed the true values.

State and expiry, without a timer per session: sessions are grouped into a fixed number of
join shards by a stable hash (`link_shard`), one Bytewax key per shard. Within a session,
entries are pruned against the *session's* clock (its largest link-event `ts`): a select
is held until that clock passes `t + 30 min + grace`, a search or click until it passes
`ts + grace`. A whole session is dropped once the *shard's* clock (largest `ts` it has
seen, or a clock reading) has moved `30 min + grace` past the session's last arrival.
Each step's items are sorted by `ts` first, so disorder inside one batch costs nothing.

Tolerance (exact results) — for every select and matching search/click, when the later
of the two reaches the join: (i) its session's clock is at most `grace` ahead of its
`ts`, and (ii) the session has had an arrival within the last `30 min + grace` of the
shard's clock. Both hold when every link event reaches the join at most `grace` behind
the largest `ts` read before it. A whole session arriving late (an offline client
uploading an hour later) is fine: (i) and (ii) are about the session, not the stream.

Pure: no Bytewax, no wall clock. See docs/contract.md §4.4.
"""

from __future__ import annotations

import bisect
import gc
import pickle
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Final

from dataflow.core import keys
from dataflow.core.events import AcSelect, Click, Event, SearchImpression
from dataflow.core.families import ACQ, Update

SEARCH_WINDOW_MS: Final = 60_000
"""A search links a select at `t` when `t <= ts <= t + SEARCH_WINDOW_MS`."""
CLICK_WINDOW_MS: Final = 30 * 60_000
"""A click links a select at `t` when `t <= ts <= t + CLICK_WINDOW_MS`."""
DEFAULT_GRACE_MS: Final = 10 * 60_000
"""Default disorder tolerance: how far behind its session's clock a link event may
arrive and still be joined exactly (the same 10 minutes as the future-timestamp rule)."""
SWEEP_MS: Final = 60_000
"""Idle sessions are swept in buckets of this much shard clock, and a session's expired
entries are pruned at most once per this much session clock. Both only hold state a
little longer than needed, which never changes a count (see the module docstring)."""

SELECT: Final = 0
SEARCH: Final = 1
CLICK: Final = 2

# A held select is one int, `ts << 2 | flags`: sorting the ints sorts by ts, and a million
# selects are a million plain ints rather than a million small lists for the garbage
# collector to walk (which made restoring a large snapshot ten times slower).
_SEARCHED: Final = 1
_CLICKED: Final = 2
_LINKED: Final = _SEARCHED | _CLICKED
_FLAG_BITS: Final = 2

_SELECT_ONLY: Final = (1, 0, 0)
_SEARCHED_INC: Final = (0, 1, 0)
_CLICKED_INC: Final = (0, 0, 1)
_SELECT_COUNTS: Final = (
    (1, 0, 0),  # neither
    (1, 1, 0),  # searched
    (1, 0, 1),  # clicked
    (1, 1, 1),  # both
)

LinkItem = tuple[int, str, int, str, int]
"""(SELECT | SEARCH | CLICK, session id, ts, query hash of the normalised text, origin: the
Kafka partition the event came from, `intake.origin_id`)."""

JoinItem = LinkItem | int
"""A link event, or a clock reading (epoch ms) that only moves the shard's clock."""

_item_ts = itemgetter(2)


def session_of(event: Event) -> str | None:
    """The session an event joins in, or None. An empty `session_id` is no session: it
    cannot tell one visitor from another, so linking on it would join strangers."""
    return event.session_id or None


def link_shard(session_id: str, shards: int) -> int:
    """The join shard of a session (stable across processes and runs, unlike `hash()`)."""
    return zlib.crc32(session_id.encode("utf-8", "surrogatepass")) % shards


@dataclass(slots=True)
class LinkRoute:
    """Accepted events sorted for the link: join items by Bytewax key (the join shard),
    and the updates that need no join (selects without a session: `+1 select`)."""

    by_shard: dict[str, list[LinkItem]] = field(default_factory=dict)
    direct: list[Update] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    """`acq` key suffix → the normalised candidate it counts (the key holds only its hash);
    the OpenSearch autocomplete index is keyed by the candidate text."""


def route(events: Iterable[Event], shards: int) -> LinkRoute:
    """Which accepted events the link needs, and where they go.

    A select whose candidate normalises to empty has no `acq` key and is skipped entirely
    (it still counts in the `ac` family, elsewhere). Searches and clicks matter only with a
    session and a non-empty normalised query; every other event is ignored here.
    """
    out = LinkRoute()
    by_shard = out.by_shard
    for event in events:
        if isinstance(event, AcSelect):
            kind = SELECT
            text = event.candidate
        elif isinstance(event, SearchImpression):
            kind = SEARCH
            text = event.query
        elif isinstance(event, Click):
            kind = CLICK
            text = event.query
        else:
            continue
        session = session_of(event)
        if session is None and kind != SELECT:
            continue
        normalized = keys.q_norm(text) if text else ""
        if not normalized:
            continue
        qhash = keys.hash_normalized(normalized)
        if kind == SELECT:
            out.labels[keys.acq_suffix(qhash)] = normalized
        if session is None:
            out.direct.append((ACQ, keys.acq_suffix(qhash), event.ts, _SELECT_ONLY))
            continue
        shard_key = str(link_shard(session, shards))
        item: LinkItem = (kind, session, event.ts, qhash, event.origin)
        batch = by_shard.get(shard_key)
        if batch is None:
            by_shard[shard_key] = [item]
        else:
            batch.append(item)
    return out


class _Session:
    """One session's held link events, per query hash, each list sorted by `ts`."""

    __slots__ = ("clicks", "clock", "due", "mark", "origin", "pruned", "searches", "selects")

    def __init__(self, clock: int, mark: int, pruned: int, origin: int) -> None:
        self.clock = clock  # largest ts of the session's link events
        self.mark = mark  # its partition's clock at the session's last arrival
        self.origin = origin  # the Kafka partition its events come from
        self.pruned = pruned  # the session clock at its last prune
        self.due = -1  # the sweep bucket the session is registered in
        self.selects: dict[str, list[int]] = {}  # ts << 2 | link flags
        self.searches: dict[str, list[int]] = {}  # distinct ts: only existence matters
        self.clicks: dict[str, list[int]] = {}

    def held(self) -> int:
        return sum(
            len(v) for table in (self.selects, self.searches, self.clicks) for v in table.values()
        )


class LinkShard:
    """The sessions of one join shard: `step` turns link items into `ACQ` increments."""

    __slots__ = ("clock", "due", "grace_ms", "origins", "sessions", "stale")

    def __init__(self, grace_ms: int = DEFAULT_GRACE_MS, clock: int = 0) -> None:
        if grace_ms < 0:
            raise ValueError(f"grace_ms must be >= 0, got {grace_ms}")
        self.grace_ms = grace_ms
        self.clock = clock
        # Each source partition's clock: a session is idle by its own partition's clock,
        # so a partition read far behind the others (a backlog) keeps its sessions.
        self.origins: dict[int, int] = {}
        self.sessions: dict[str, _Session] = {}
        # (origin, sweep bucket) -> sessions registered there
        self.due: dict[tuple[int, int], list[str]] = {}
        self.stale = 0
        """Link events that arrived more than `grace_ms` behind their session's clock
        (cumulative, not snapshotted): their links may be missed. For a metric."""

    @property
    def idle_ms(self) -> int:
        """Shard-clock time after a session's last arrival before it is dropped."""
        return CLICK_WINDOW_MS + self.grace_ms

    # --- recovery ------------------------------------------------------------------------

    # Bytewax pickles a snapshot after the logic may have moved on to the next epoch, so
    # it must not share mutable lists with the live state: return immutable bytes. The
    # sweep index is not stored; it is a function of each session's `mark`.
    def snapshot(self) -> bytes:
        sessions = {
            sid: (s.clock, s.mark, s.pruned, s.origin, s.selects, s.searches, s.clicks)
            for sid, s in self.sessions.items()
        }
        state = (self.clock, self.origins, sessions)
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, blob: bytes, grace_ms: int = DEFAULT_GRACE_MS) -> LinkShard:
        with _gc_paused():
            clock, origins, sessions = pickle.loads(blob)  # noqa: S301 - our own snapshot
            shard = cls(grace_ms, clock)
            shard.origins = origins
            for sid, state in sessions.items():
                s_clock, mark, pruned, origin, selects, searches, clicks = state
                session = _Session(s_clock, mark, pruned, origin)
                session.selects, session.searches, session.clicks = selects, searches, clicks
                shard.sessions[sid] = session
                shard._register(sid, session)
        return shard

    # --- the join ------------------------------------------------------------------------

    def step(self, items: Iterable[JoinItem]) -> list[Update]:
        """Apply link items (sorted by `ts` first) and clock readings; return increments."""
        links: list[LinkItem] = []
        clock = self.clock
        for item in items:
            if isinstance(item, int):
                clock = max(clock, item)
            else:
                links.append(item)
        # Sorting makes the order inside a batch irrelevant: only disorder *across* steps
        # counts against the grace (batches are regrouped by key upstream, by dedup slot).
        links.sort(key=_item_ts)
        out: list[Update] = []
        origins = self.origins
        for kind, sid, ts, qhash, origin in links:
            self.clock = max(self.clock, ts)
            if ts > origins.get(origin, 0):
                origins[origin] = ts
            session = self._touch(sid, ts, origin)
            if kind == SELECT:
                self._select(session, ts, qhash, out)
            else:
                self._partner(session, ts, qhash, _SEARCHED if kind == SEARCH else _CLICKED, out)
        if clock > self.clock:
            # A reading (not fed by the flow; for idle shards and tests) is a promise about
            # every partition at once.
            self.clock = clock
            for origin, at in origins.items():
                origins[origin] = max(at, clock)
        self._sweep()
        return out

    def _touch(self, sid: str, ts: int, origin: int) -> _Session:
        session = self.sessions.get(sid)
        mark = self.origins[origin]
        if session is None:
            session = _Session(ts, mark, ts, origin)
            self.sessions[sid] = session
        else:
            # A session keyed to one partition by its producer stays there; should it ever
            # move, follow the partition it is read from now.
            session.origin = origin
            session.mark = mark
            if ts > session.clock:
                session.clock = ts
                # Pruning walks every query the session holds: do it once a sweep period,
                # not at every event of a busy session.
                if ts - session.pruned >= SWEEP_MS:
                    session.pruned = ts
                    self._prune(session)
            elif ts + self.grace_ms < session.clock:
                self.stale += 1
        self._register(sid, session)
        return session

    def _select(self, session: _Session, ts: int, qhash: str, out: list[Update]) -> None:
        flags = 0
        if _any_within(session.searches.get(qhash), ts, ts + SEARCH_WINDOW_MS):
            flags |= _SEARCHED
        if _any_within(session.clicks.get(qhash), ts, ts + CLICK_WINDOW_MS):
            flags |= _CLICKED
        out.append((ACQ, keys.acq_suffix(qhash), ts, _SELECT_COUNTS[flags]))
        # A fully linked select can change no more; one past its hold can't be reached
        # by a partner within the tolerance. Neither needs holding.
        if flags != _LINKED and ts + self.idle_ms >= session.clock:
            code = ts << _FLAG_BITS | flags
            held = session.selects.get(qhash)
            if held is None:
                session.selects[qhash] = [code]
            else:
                bisect.insort(held, code)

    def _partner(
        self, session: _Session, ts: int, qhash: str, flag: int, out: list[Update]
    ) -> None:
        """A search (`flag` = searched) or click at `ts` completes the held selects at
        `[ts - window, ts]`, each at most once."""
        held = session.selects.get(qhash)
        if held:
            searched = flag == _SEARCHED
            window = SEARCH_WINDOW_MS if searched else CLICK_WINDOW_MS
            increment = _SEARCHED_INC if searched else _CLICKED_INC
            suffix = keys.acq_suffix(qhash)
            # Setting a flag can unsort selects of the *same* ts among themselves; they are
            # interchangeable, and the order by ts (all that bisect relies on) stays.
            i = bisect.bisect_left(held, (ts - window) << _FLAG_BITS)
            end = (ts + 1) << _FLAG_BITS  # every select at or before ts is below this
            n = len(held)
            while i < n and held[i] < end:
                code = held[i]
                if not code & flag:
                    held[i] = code | flag
                    out.append((ACQ, suffix, code >> _FLAG_BITS, increment))
                i += 1
        if ts + self.grace_ms >= session.clock:
            table = session.searches if flag == _SEARCHED else session.clicks
            stamps = table.get(qhash)
            if stamps is None:
                table[qhash] = [ts]
            else:
                j = bisect.bisect_left(stamps, ts)
                if j == len(stamps) or stamps[j] != ts:
                    stamps.insert(j, ts)

    def _prune(self, session: _Session) -> None:
        """Drop what no partner within the tolerance can reach any more."""
        clock = session.clock
        oldest_select = clock - self.idle_ms
        for qhash, held in list(session.selects.items()):
            start = bisect.bisect_left(held, oldest_select << _FLAG_BITS)
            kept = [code for code in held[start:] if code & _LINKED != _LINKED]
            if kept:
                session.selects[qhash] = kept
            else:
                del session.selects[qhash]
        oldest = clock - self.grace_ms
        for table in (session.searches, session.clicks):
            for qhash, stamps in list(table.items()):
                start = bisect.bisect_left(stamps, oldest)
                if start == len(stamps):
                    del table[qhash]
                elif start:
                    del stamps[:start]

    def _register(self, sid: str, session: _Session) -> None:
        due = (session.mark + self.idle_ms) // SWEEP_MS
        if due != session.due:
            session.due = due
            key = (session.origin, due)
            bucket = self.due.get(key)
            if bucket is None:
                self.due[key] = [sid]
            else:
                bucket.append(sid)

    def _sweep(self) -> None:
        """Drop the sessions idle for `idle_ms` of shard clock (whole buckets only, so a
        session may outlive its hold by up to `SWEEP_MS`: holding longer is harmless)."""
        origins = self.origins
        # Buckets that lie wholly before their partition's clock.
        done = [key for key in self.due if key[1] <= origins.get(key[0], 0) // SWEEP_MS - 1]
        sessions = self.sessions
        for key in done:
            for sid in self.due.pop(key):
                session = sessions.get(sid)
                # A session touched since registering here has moved to a later bucket.
                if session is not None and session.due == key[1] and session.origin == key[0]:
                    del sessions[sid]

    # --- sizes, for metrics ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sessions)

    def held(self) -> int:
        """Selects, searches and clicks held over all sessions (O(state): for tests and
        occasional gauges, not per batch)."""
        return sum(session.held() for session in self.sessions.values())


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Bulk-building many small containers triggers collections that re-walk the whole
    heap (5x the load time measured on a 20k-session shard); none of them is garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _any_within(stamps: list[int] | None, lo: int, hi: int) -> bool:
    """Whether the sorted `stamps` hold a value in `[lo, hi]`."""
    if not stamps:
        return False
    i = bisect.bisect_left(stamps, lo)
    return i < len(stamps) and stamps[i] <= hi
