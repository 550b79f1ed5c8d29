"""The autocomplete → search → click link (contract §4.4): a per-session join.

An `ac_select` at `t` with normalised candidate `c` is *searched* when its session has a
`search_impression` for `c` with `t <= ts <= t + 60 s`, and *clicked* when it has a
`click` for `c` with `t <= ts <= t + 30 min`; each select counts once, and at most once
each way. The output is `ACQ` counter increments bucketed by the select's `ts`, applied by
the state shards like every other family.

**A deterministic function of each partition's message sequence.** Every link event
carries its partition's clock when it was read (`Event.clock`: the largest `ts` read from
that partition so far, snapshotted with the partition's offset). A select and a partner are
joined when the window rule holds *and* they were read within `hold_ms` = 30 min + grace of
each other by that clock: `|clock_select − clock_partner| <= hold_ms`. The relation is
symmetric and uses nothing but values fixed at intake, so whichever of the two arrives
second links them, in any order, batching, worker count or crash point:

- a select emits `+1 select` (plus what the held partners it links give it) on arrival; a
  search or click emits `+1 searched`/`+1 clicked` for each held select it completes, and a
  flag on the select makes that happen at most once each way;
- an entry is held until no event it could still link can arrive: when an epoch closes,
  entries with `clock + hold_ms` below the largest clock read from their partition in that
  epoch or before are dropped (every later event of the partition has a larger clock). The
  epoch close is where Bytewax snapshots the join, so pruning happens in `snapshot()`.

Tolerance (exact results against the brute-force join): every linked pair is read within
`hold_ms` of each other in its partition's clock. A live stream reads a click 30 minutes
after its select, a grace of disorder later at most; a session uploaded hours late as a
whole arrives with one clock and links exactly. Beyond the tolerance counts fall short
(selects stay exact), and a link is never invented. A session's events must be read from one
partition (producers key by session), as their clocks are compared.

State and expiry, without a timer per session: sessions are grouped into a fixed number of
join shards by a stable hash (`link_shard`), one Bytewax key per shard.

Pure: no Bytewax, no wall clock. See docs/contract.md §4.4.
"""

from __future__ import annotations

import gc
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from dataflow.core import keys, snapshots
from dataflow.core.events import AcSelect, Click, Event, SearchImpression
from dataflow.core.families import ACQ, Update

SEARCH_WINDOW_MS: Final = 60_000
"""A search links a select at `t` when `t <= ts <= t + SEARCH_WINDOW_MS`."""
CLICK_WINDOW_MS: Final = 30 * 60_000
"""A click links a select at `t` when `t <= ts <= t + CLICK_WINDOW_MS`."""
DEFAULT_GRACE_MS: Final = 10 * 60_000
"""Default disorder tolerance on top of the click window: a select and a partner are joined
when read within 30 min + grace of each other by their partition's clock."""

SELECT: Final = 0
SEARCH: Final = 1
CLICK: Final = 2

_SEARCHED: Final = 1
_CLICKED: Final = 2
_LINKED: Final = _SEARCHED | _CLICKED

_SELECT_ONLY: Final = (1, 0, 0)
_SEARCHED_INC: Final = (0, 1, 0)
_CLICKED_INC: Final = (0, 0, 1)
_SELECT_COUNTS: Final = (
    (1, 0, 0),  # neither
    (1, 1, 0),  # searched
    (1, 0, 1),  # clicked
    (1, 1, 1),  # both
)

LinkItem = tuple[int, str, int, str, int, int]
"""(SELECT | SEARCH | CLICK, session id, ts, query hash of the normalised text, origin: the
Kafka partition the event came from (`intake.origin_id`), that partition's clock when the
event was read)."""

LAYOUT: Final = 2


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
        item: LinkItem = (kind, session, event.ts, qhash, event.origin, event.clock)
        batch = by_shard.get(shard_key)
        if batch is None:
            by_shard[shard_key] = [item]
        else:
            batch.append(item)
    return out


class _Session:
    """One session's held link events, per query hash.

    Selects are `[ts, clock, flags]`; searches and clicks `(ts, clock)` (distinct pairs:
    only existence matters)."""

    __slots__ = ("clicks", "clock", "origin", "searches", "selects")

    def __init__(self, origin: int) -> None:
        self.origin = origin  # the Kafka partition its events are read from
        self.clock = 0  # the largest partition clock of its held events
        self.selects: dict[str, list[list[int]]] = {}
        self.searches: dict[str, set[tuple[int, int]]] = {}
        self.clicks: dict[str, set[tuple[int, int]]] = {}

    def held(self) -> int:
        return sum(
            len(v) for table in (self.selects, self.searches, self.clicks) for v in table.values()
        )


class LinkShard:
    """The sessions of one join shard: `step` turns link items into `ACQ` increments."""

    __slots__ = ("grace_ms", "read", "sessions", "stale")

    def __init__(self, grace_ms: int = DEFAULT_GRACE_MS) -> None:
        if grace_ms < 0:
            raise ValueError(f"grace_ms must be >= 0, got {grace_ms}")
        self.grace_ms = grace_ms
        # The largest clock read from each partition: a bound on every later event's clock.
        self.read: dict[int, int] = {}
        self.sessions: dict[str, _Session] = {}
        self.stale = 0
        """Link events read more than `hold_ms` after their own `ts` (cumulative, not
        snapshotted): a partner read before them may have been dropped. For a metric."""

    @property
    def hold_ms(self) -> int:
        """How far apart, in their partition's clock, a select and a partner may be read."""
        return CLICK_WINDOW_MS + self.grace_ms

    # --- recovery ------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The state at an epoch's close, after dropping what can no longer link."""
        self.close_epoch()
        sessions = {
            sid: (s.origin, s.clock, s.selects, s.searches, s.clicks)
            for sid, s in self.sessions.items()
        }
        return snapshots.wrap("aclink", LAYOUT, (self.read, sessions))

    @classmethod
    def restore(cls, blob: bytes, grace_ms: int = DEFAULT_GRACE_MS) -> LinkShard:
        with _gc_paused():
            read, sessions = snapshots.unwrap("aclink", LAYOUT, blob)
            shard = cls(grace_ms)
            shard.read = read
            for sid, (origin, clock, selects, searches, clicks) in sessions.items():
                session = _Session(origin)
                session.clock = clock
                session.selects, session.searches, session.clicks = selects, searches, clicks
                shard.sessions[sid] = session
        return shard

    # --- the join ------------------------------------------------------------------------

    def step(self, items: Iterable[LinkItem]) -> list[Update]:
        """Apply link items, in any order; return the increments."""
        out: list[Update] = []
        read = self.read
        hold = self.hold_ms
        sessions = self.sessions
        for kind, sid, ts, qhash, origin, clock in items:
            if clock > read.get(origin, -1):
                read[origin] = clock
            if clock - ts > hold:
                self.stale += 1
            session = sessions.get(sid)
            if session is None:
                session = sessions[sid] = _Session(origin)
            session.origin = origin
            session.clock = max(session.clock, clock)
            if kind == SELECT:
                self._select(session, ts, clock, qhash, out)
            else:
                self._partner(session, ts, clock, qhash, kind, out)
        return out

    def _select(
        self, session: _Session, ts: int, clock: int, qhash: str, out: list[Update]
    ) -> None:
        hold = self.hold_ms
        flags = 0
        searches = session.searches.get(qhash)
        if searches and any(
            ts <= p_ts <= ts + SEARCH_WINDOW_MS and abs(p_clock - clock) <= hold
            for p_ts, p_clock in searches
        ):
            flags |= _SEARCHED
        clicks = session.clicks.get(qhash)
        if clicks and any(
            ts <= p_ts <= ts + CLICK_WINDOW_MS and abs(p_clock - clock) <= hold
            for p_ts, p_clock in clicks
        ):
            flags |= _CLICKED
        out.append((ACQ, keys.acq_suffix(qhash), ts, _SELECT_COUNTS[flags]))
        if flags != _LINKED:  # a fully linked select can change no more
            session.selects.setdefault(qhash, []).append([ts, clock, flags])

    def _partner(  # noqa: PLR0917 - the hot path passes the item's fields as they are
        self, session: _Session, ts: int, clock: int, qhash: str, kind: int, out: list[Update]
    ) -> None:
        """A search or click at `ts` completes the held selects at `[ts - window, ts]` read
        within the hold of it, each at most once."""
        searched = kind == SEARCH
        flag = _SEARCHED if searched else _CLICKED
        window = SEARCH_WINDOW_MS if searched else CLICK_WINDOW_MS
        held = session.selects.get(qhash)
        if held:
            hold = self.hold_ms
            increment = _SEARCHED_INC if searched else _CLICKED_INC
            suffix = keys.acq_suffix(qhash)
            for entry in held:
                s_ts, s_clock, flags = entry
                if (
                    not flags & flag
                    and s_ts <= ts <= s_ts + window
                    and abs(s_clock - clock) <= hold
                ):
                    entry[2] = flags | flag
                    out.append((ACQ, suffix, s_ts, increment))
            if any(entry[2] == _LINKED for entry in held):
                held[:] = [entry for entry in held if entry[2] != _LINKED]
                if not held:
                    del session.selects[qhash]
        table = session.searches if searched else session.clicks
        stamps = table.get(qhash)
        if stamps is None:
            table[qhash] = {(ts, clock)}
        else:
            stamps.add((ts, clock))

    def close_epoch(self) -> None:
        """Drop what no event still to be read can link: entries read more than `hold_ms`
        before the largest clock read from their partition (in this epoch or before)."""
        read = self.read
        hold = self.hold_ms
        for sid in list(self.sessions):
            session = self.sessions[sid]
            horizon = read.get(session.origin, 0) - hold
            if session.clock < horizon:
                del self.sessions[sid]
                continue
            for qhash, held in list(session.selects.items()):
                kept = [entry for entry in held if entry[1] >= horizon]
                if kept:
                    session.selects[qhash] = kept
                else:
                    del session.selects[qhash]
            for table in (session.searches, session.clicks):
                for qhash, stamps in list(table.items()):
                    live = {stamp for stamp in stamps if stamp[1] >= horizon}
                    if live:
                        table[qhash] = live
                    else:
                        del table[qhash]

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
