"""The autocomplete → search → click link (dataflow/core/aclink.py) against the reference model.

Why: the join emits increments as partners arrive, in any order, from sharded state that
expires and is snapshotted; the brute-force model (tests/reference_model.py) has none of
that. Edge cases pin the window ends to the millisecond; property tests check that any
arrival order within the disorder tolerance gives the model's totals exactly, that beyond
it links can only be missed, never invented, and that the output is the same for any
batching, any order of the join's inputs, and any restart point.
"""

from __future__ import annotations

import gc
import json
import pickle
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.core import aclink, keys
from dataflow.core.aclink import (
    CLICK_WINDOW_MS,
    DEFAULT_GRACE_MS,
    SEARCH_WINDOW_MS,
    LinkItem,
    LinkShard,
    link_shard,
    route,
)
from dataflow.core.events import Event, Rejection, decode
from dataflow.core.families import ACQ, LAYOUTS, FeatureParams, Update
from dataflow.core.shard import FeatureShard
from dataflow.errors import RecoveryFormatError
from tests.reference_model import (
    ACQ_CLICK_WINDOW_MS,
    ACQ_SEARCH_WINDOW_MS,
    ModelParams,
    acq_contributions,
    diff_stores,
    expected_store,
    select_families,
)

DAY_MS = 86_400_000
MIN = 60_000
T0 = 20_000 * DAY_MS + 12 * 3_600_000  # noon, so an hour either way stays in one day
GRACE = DEFAULT_GRACE_MS

Totals = Counter[tuple[str, int, str]]
"""(suffix, select ts, kind) -> count: what the increments add up to."""

_ids = iter(range(10**9))


def _event(kind: str, ts: int, session: str | None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"event_id": f"e{next(_ids)}", "type": kind, "ts": ts, **fields}
    if session is not None:
        event["session_id"] = session
    return event


def sel(ts: int, candidate: str, session: str | None = "s1", prefix: str = "ip") -> dict[str, Any]:
    return _event("ac_select", ts, session, prefix=prefix, candidate=candidate)


def search(ts: int, query: str, session: str | None = "s1") -> dict[str, Any]:
    return _event("search_impression", ts, session, query=query, doc_ids=["d1"])


def click(ts: int, query: str, session: str | None = "s1") -> dict[str, Any]:
    return _event("click", ts, session, query=query, doc_id="d1")


def dwell(ts: int, query: str, session: str | None = "s1") -> dict[str, Any]:
    return _event("dwell", ts, session, query=query, doc_id="d1", dwell_ms=60_000)


def to_event(raw: dict[str, Any], clock: int = 0) -> Event:
    """Through the real decoder, so the join sees exactly what the pipeline would; `clock`
    is the partition's clock before this message."""
    decoded = decode(
        json.dumps(raw).encode(), now_ms=T0 + 400 * DAY_MS, future_tolerance_ms=0, clock=clock
    )
    assert not isinstance(decoded, Rejection), decoded
    return decoded


def suffix(candidate: str) -> str:
    return keys.acq_suffix(keys.query_hash(candidate))


def totals(updates: Iterable[Update]) -> Totals:
    out: Totals = Counter()
    for family, key, ts, (selects, searched, clicked) in updates:
        assert family == ACQ
        assert (selects, searched, clicked) != (0, 0, 0)
        for kind, n in (("select", selects), ("searched", searched), ("clicked", clicked)):
            if n:
                out[key, ts, kind] += n
    return out


def model_totals(raw: Sequence[dict[str, Any]]) -> Totals:
    out: Totals = Counter()
    for c in acq_contributions(raw, "feat", ModelParams()):
        out[c.key.removeprefix("feat:"), c.ts, c.kind] += 1
    return out


class Pipeline:
    """The link as the flow runs it: route each batch, step each join shard, keep the
    direct updates; optionally snapshot and restore every shard between batches."""

    def __init__(self, shards: int = 3, grace_ms: int = GRACE) -> None:
        self.shards = shards
        self.grace_ms = grace_ms
        self.joins: dict[str, LinkShard] = {}
        self.updates: list[Update] = []
        self.clock = 0  # the partition's clock: these events are read from one partition

    def events(self, raw: Sequence[dict[str, Any]]) -> list[Event]:
        out = []
        for r in raw:
            event = to_event(r, self.clock)
            self.clock = event.clock
            out.append(event)
        return out

    def feed(self, raw: Sequence[dict[str, Any]]) -> list[Update]:
        return self.join(self.events(raw))

    def join(self, events: Iterable[Event], shuffle: random.Random | None = None) -> list[Update]:
        routed = route(events, self.shards)
        out = list(routed.direct)
        for key, items in routed.by_shard.items():
            if shuffle is not None:
                shuffle.shuffle(items)
            join = self.joins.setdefault(key, LinkShard(self.grace_ms))
            out.extend(join.step(items))
        self.updates.extend(out)
        return out

    def recover(self) -> None:
        """An epoch closes, the state is snapshotted, and the join resumes from it."""
        self.joins = {
            k: LinkShard.restore(j.snapshot(), self.grace_ms) for k, j in self.joins.items()
        }

    def totals(self) -> Totals:
        return totals(self.updates)

    def stale(self) -> int:
        return sum(j.stale for j in self.joins.values())

    def sessions(self) -> int:
        return sum(len(j) for j in self.joins.values())


def run_one_by_one(raw: Sequence[dict[str, Any]], **kw: Any) -> Pipeline:
    pipe = Pipeline(**kw)
    for event in raw:
        pipe.feed([event])
    return pipe


def linked(raw: Sequence[dict[str, Any]], candidate: str) -> tuple[int, int, int]:
    """(selects, searched, clicked) of one candidate, with the events arriving one by one
    in the given order, checked against the model on the way."""
    got = run_one_by_one(raw).totals()
    assert got == model_totals(raw)
    key = suffix(candidate)

    def count(want: str) -> int:
        return sum(n for (k, _, kind), n in got.items() if k == key and kind == want)

    return count("select"), count("searched"), count("clicked")


# ------------------------------------------------------------------ the window edges


@pytest.mark.parametrize(
    ("offset", "searched"),
    [
        (-1, False),  # before the select: not "after" it
        (0, True),  # the same millisecond counts (Choice: t <= ts)
        (59_000, True),
        (SEARCH_WINDOW_MS, True),  # exactly 60 s: in
        (SEARCH_WINDOW_MS + 1, False),
        (61_000, False),
    ],
)
def test_search_window_edges(offset: int, searched: bool) -> None:
    assert SEARCH_WINDOW_MS == ACQ_SEARCH_WINDOW_MS == 60_000
    events = [sel(T0, "iphone"), search(T0 + offset, "iphone")]
    assert linked(events, "iphone") == (1, int(searched), 0)
    assert linked(events[::-1], "iphone") == (1, int(searched), 0)  # search arrives first


@pytest.mark.parametrize(
    ("offset", "clicked"),
    [
        (-1, False),
        (0, True),
        (29 * MIN, True),
        (CLICK_WINDOW_MS, True),  # exactly 30 min: in
        (CLICK_WINDOW_MS + 1, False),
        (31 * MIN, False),
    ],
)
def test_click_window_edges(offset: int, clicked: bool) -> None:
    assert CLICK_WINDOW_MS == ACQ_CLICK_WINDOW_MS == 30 * MIN
    events = [sel(T0, "iphone"), click(T0 + offset, "iphone")]
    assert linked(events, "iphone") == (1, 0, int(clicked))
    assert linked(events[::-1], "iphone") == (1, 0, int(clicked))


def test_searched_and_clicked_are_independent() -> None:
    # A click without a search still marks the select clicked (the contract's two tests
    # are separate), and a search alone does not make a click.
    assert linked([sel(T0, "a"), click(T0 + 5 * MIN, "a")], "a") == (1, 0, 1)
    assert linked([sel(T0, "a"), search(T0 + 5_000, "a")], "a") == (1, 1, 0)
    assert linked([sel(T0, "a"), search(T0 + 5_000, "a"), click(T0 + 9_000, "a")], "a") == (
        1,
        1,
        1,
    )


def test_dwell_is_not_a_click() -> None:
    assert linked([sel(T0, "a"), dwell(T0 + 1_000, "a")], "a") == (1, 0, 0)


# ---------------------------------------------------------- at most once, many selects


def test_many_partners_count_once_per_select() -> None:
    events = [sel(T0, "a")]
    events += [search(T0 + i * 1_000, "a") for i in range(5)]
    events += [click(T0 + i * MIN, "a") for i in range(5)]
    assert linked(events, "a") == (1, 1, 1)
    assert linked(events[::-1], "a") == (1, 1, 1)


def test_two_selects_of_one_candidate_in_one_session() -> None:
    # One search can serve both selects; each select is still counted once each way.
    both = [sel(T0, "a"), sel(T0 + 30_000, "a"), search(T0 + 50_000, "a")]
    assert linked(both, "a") == (2, 2, 0)
    assert linked(both[::-1], "a") == (2, 2, 0)
    # 70 s after the first select, 40 s after the second: only the second is searched.
    one = [sel(T0, "a"), sel(T0 + 30_000, "a"), search(T0 + 70_000, "a")]
    assert linked(one, "a") == (2, 1, 0)
    got = run_one_by_one(one).totals()
    assert got[suffix("a"), T0 + 30_000, "searched"] == 1
    assert got[suffix("a"), T0, "searched"] == 0
    # Same candidate, same millisecond, two events: two selects.
    twins = [sel(T0, "a"), sel(T0, "a"), search(T0 + 1, "a")]
    assert linked(twins, "a") == (2, 2, 0)


# ------------------------------------------------------------------------- sessions


@pytest.mark.parametrize("session", [None, ""])
def test_select_without_a_session_counts_but_never_links(session: str | None) -> None:
    events = [sel(T0, "a", session=session), search(T0 + 1, "a", session=session)]
    events.append(click(T0 + 2, "a", session=session))
    assert linked(events, "a") == (1, 0, 0)
    routed = route([to_event(e) for e in events], 4)
    assert routed.by_shard == {}  # nothing to join: no state at all
    assert routed.direct == [(ACQ, suffix("a"), T0, (1, 0, 0))]


def test_a_session_without_id_never_joins_one_with_an_id() -> None:
    events = [sel(T0, "a", session=None), search(T0 + 1, "a", session="s1")]
    assert linked(events, "a") == (1, 0, 0)
    events = [sel(T0, "a", session="s1"), search(T0 + 1, "a", session=None)]
    assert linked(events, "a") == (1, 0, 0)


def test_other_sessions_do_not_link_and_ids_are_exact() -> None:
    events = [sel(T0, "a", session="s1"), search(T0 + 1, "a", session="S1")]
    events.append(click(T0 + 2, "a", session="s2"))
    assert linked(events, "a") == (1, 0, 0)


# ------------------------------------------------------------- normalisation and keys


def test_unicode_and_case_variants_of_the_candidate_link() -> None:
    events = [
        sel(T0, "ＩＰｈｏｎｅ  Case"),  # fullwidth, double space
        search(T0 + 1_000, " iphone case "),
        click(T0 + 2_000, "IPHONE\tCASE"),
        sel(T0 + 3_000, "Straße"),
        search(T0 + 4_000, "STRASSE"),  # casefold, not lower
    ]
    assert linked(events, "iphone case") == (1, 1, 1)
    assert linked(events, "strasse") == (1, 1, 0)
    assert suffix("ＩＰｈｏｎｅ  Case") == suffix("iphone case")


def test_near_misses_of_the_candidate_do_not_link() -> None:
    events = [sel(T0, "iphone case"), search(T0 + 1, "iphone cases"), click(T0 + 2, "iphonecase")]
    assert linked(events, "iphone case") == (1, 0, 0)


def test_same_candidate_under_different_prefixes_is_one_key() -> None:
    events = [
        sel(T0, "iPhone", prefix="i"),
        sel(T0 + 1_000, "iphone", prefix="IPH"),
        sel(T0 + 2_000, "iphone", prefix=""),  # an empty typed prefix still selects
        search(T0 + 10_000, "iphone"),
    ]
    assert linked(events, "iphone") == (3, 3, 0)
    keys_written = {u[1] for u in run_one_by_one(events).updates}
    assert keys_written == {suffix("iphone")}


def test_empty_candidate_or_query_gives_nothing() -> None:
    events = [sel(T0, "  "), sel(T0, "", session=None), search(T0 + 1, ""), click(T0 + 2, " ")]
    routed = route([to_event(e) for e in events], 4)
    assert routed.by_shard == {} and routed.direct == []
    assert model_totals(events) == Counter()


def test_route_sends_each_session_to_one_stable_shard() -> None:
    events = [sel(T0, "a", session=f"s{i}") for i in range(50)]
    routed = route([to_event(e) for e in events], 7)
    for key, items in routed.by_shard.items():
        assert all(str(link_shard(sid, 7)) == key for _, sid, _, _, _, _ in items)
    assert sum(len(v) for v in routed.by_shard.values()) == 50
    assert len(routed.by_shard) > 1
    # Pinned, so a change of hash (or a salted `hash()`) that would re-shard restored
    # state is caught.
    assert [link_shard(f"s{i}", 7) for i in range(6)] == [
        zlib.crc32(f"s{i}".encode()) % 7 for i in range(6)
    ]
    assert link_shard("session-42", 1_000) == 641  # crc32 = 3_143_075_641


# ------------------------------------------------------------------------ arrival order


def test_partners_that_arrive_before_their_select_still_link() -> None:
    # Stream order: click, search, select; time order: select, search, click. The select
    # is 5 min behind its session's clock: inside the 10-min grace.
    events = [click(T0 + 5 * MIN, "a"), search(T0 + 30_000, "a"), sel(T0, "a")]
    pipe = run_one_by_one(events)
    # One increment, since both partners were held when the select came.
    assert pipe.updates == [(ACQ, suffix("a"), T0, (1, 1, 1))]
    assert pipe.totals() == model_totals(events)
    assert pipe.stale() == 0


def test_partners_read_further_apart_than_the_hold_do_not_link() -> None:
    # The search is read 2 h after its select by the partition's clock (other sessions
    # moved it): past the 40-min hold it is not joined, although its ts is in the window.
    events = [sel(T0, "a"), sel(T0 + 2 * 3_600_000, "x", session="other"), search(T0 + 30_000, "a")]
    pipe = run_one_by_one(events)
    assert pipe.stale() == 1  # the search was read 2 h after its own ts
    assert pipe.totals()[suffix("a"), T0, "searched"] == 0  # missed, never invented
    assert model_totals(events)[suffix("a"), T0, "searched"] == 1  # the truth
    # Read within the hold of each other, the same disorder is exact.
    close = [click(T0 + 20 * MIN, "a"), search(T0 + 30_000, "a"), sel(T0, "a")]
    assert run_one_by_one(close).totals() == model_totals(close)


def test_batching_never_matters() -> None:
    # Hours of disorder: the select and its search are read two hours of partition clock
    # after the session that pushed the clock; both carry that clock, so they link in one
    # batch, one by one, or cut anywhere.
    events = [search(T0 + 2 * 3_600_000, "b"), sel(T0, "a"), search(T0 + 30_000, "a")]
    pipe = Pipeline()
    pipe.feed(events)
    assert pipe.totals() == model_totals(events)
    assert run_one_by_one(events).totals() == pipe.totals()


def test_session_arriving_late_as_a_whole_still_links() -> None:
    # An offline client uploads an hour later: the stream has moved on, and the session's
    # events are all read at that later clock, so they join each other exactly.
    pipe = Pipeline(shards=1)
    pipe.feed([sel(T0 + 3_600_000, "x", session="other")])
    pipe.feed([sel(T0, "a", session="offline")])
    pipe.feed([click(T0 + 10 * MIN, "a", session="offline")])
    pipe.feed([search(T0 + 20_000, "a", session="offline")])
    assert pipe.totals()[suffix("a"), T0, "searched"] == 1
    assert pipe.totals()[suffix("a"), T0, "clicked"] == 1
    assert pipe.stale() == 3  # read over 40 min after their ts: counted, and still linked
    pipe.recover()
    assert pipe.sessions() == 2  # an epoch close keeps what can still link


# ------------------------------------------------------ the written fields, end to end


def store_after(updates: Sequence[Update], clock: int) -> dict[str, dict[str, str]]:
    """What the state shard writes for these increments (the flow's `features` step),
    with a final clock reading as the `clock` step broadcasts it."""
    shard = FeatureShard(FeatureParams())
    shard.step([list(updates), clock])
    written = dict(shard.flush().writes)
    return {f"feat:{k}": v for k, v in written.items() if v is not None}


def test_counts_are_bucketed_by_the_select_day() -> None:
    midnight = 20_001 * DAY_MS
    events = [
        sel(midnight - 30_000, "a"),  # 23:59:30
        search(midnight + 10_000, "a"),  # 00:00:10 the next day
        click(midnight + 20 * MIN, "a"),
        sel(midnight + 7 * DAY_MS, "clock", session=None),
    ]
    pipe = run_one_by_one(events)
    store = store_after(pipe.updates, midnight + 7 * DAY_MS)
    fields = store[f"feat:{suffix('a')}"]
    # Seven days on, the select's day has left the 7-day window and takes its links along,
    # although the search and click themselves happened on a day still inside it.
    assert (fields["selects_7d"], fields["searched_7d"], fields["clicked_7d"]) == ("0", "0", "0")
    assert (fields["selects_30d"], fields["searched_30d"], fields["clicked_30d"]) == ("1", "1", "1")
    assert fields["search_rate_30d"] == fields["click_rate_30d"] == repr(2 / 22)
    assert fields["as_of"] == str(midnight + 7 * DAY_MS)
    assert not diff_stores(store, select_families(expected_store(events), ["acq"]))


# --------------------------------------------------------------------- bounded state


def item(kind: int, sid: str, ts: int, qhash: str, clock: int | None = None) -> LinkItem:
    """A link item of partition 0; its clock defaults to its own ts (read in order)."""
    return (kind, sid, ts, qhash, 0, ts if clock is None else clock)


def test_fully_linked_selects_are_not_held() -> None:
    join = LinkShard()
    join.step([item(aclink.SEARCH, "s", T0 + 1, "h"), item(aclink.CLICK, "s", T0 + 2, "h")])
    join.step([item(aclink.SELECT, "s", T0, "h", clock=T0 + 2)])
    assert join.held() == 2  # the search and the click; the select has nothing to wait for
    join.step([item(aclink.SELECT, "s", T0 + 3, "h")])  # after both: still open
    assert join.held() == 3


def test_idle_sessions_are_dropped_when_an_epoch_closes_past_their_hold() -> None:
    join = LinkShard()
    join.step([item(aclink.SELECT, f"s{i}", T0 + i, "h") for i in range(100)])
    assert len(join) == 100 and join.held() == 100
    hold = CLICK_WINDOW_MS + GRACE
    join.step([item(aclink.SELECT, "late", T0 + hold, "x")])
    join.close_epoch()
    assert len(join) == 101  # not yet past any session's hold
    join.step([item(aclink.SELECT, "later", T0 + 100 + hold, "x")])
    assert len(join) == 102  # nothing is dropped between epoch closes
    join.close_epoch()
    assert set(join.sessions) == {"late", "later"}


def test_a_touched_session_outlives_its_first_expiry() -> None:
    join = LinkShard()
    hold = CLICK_WINDOW_MS + GRACE
    join.step([item(aclink.SELECT, "busy", T0, "h"), item(aclink.SELECT, "idle", T0, "h")])
    join.step([item(aclink.SEARCH, "busy", T0 + hold, "h")])
    join.step([item(aclink.SELECT, "x", T0 + hold + 1, "x")])
    join.close_epoch()
    assert set(join.sessions) == {"busy", "x"}


def test_a_long_session_holds_only_its_recent_events() -> None:
    join = LinkShard()
    most = 0
    for minute in range(600):  # ten hours, one select and one search a minute
        ts = T0 + minute * MIN
        join.step(
            [item(aclink.SELECT, "s", ts, f"q{minute}"), item(aclink.SEARCH, "s", ts, f"r{minute}")]
        )
        join.close_epoch()  # an epoch a minute
        most = max(most, join.held())
    # Both are held 30 min + grace of partition clock (41 minutes each).
    assert most == 41 + 41
    assert len(join) == 1


def test_a_late_select_is_still_held_for_partners_yet_to_come() -> None:
    # A select read 15 min after its ts is held by its read clock, so a click that comes
    # later still links.
    events = [search(T0 + 15 * MIN, "other"), sel(T0, "a"), click(T0 + 20 * MIN, "a")]
    pipe = run_one_by_one(events)
    assert pipe.totals() == model_totals(events)


def test_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="grace_ms"):
        LinkShard(-1)


# -------------------------------------------------------------------------- snapshots


def test_snapshot_is_bytes_that_later_steps_do_not_change() -> None:
    join = LinkShard()
    join.step([item(aclink.SELECT, "s", T0, "h")])
    blob = join.snapshot()
    assert isinstance(blob, bytes)
    before = pickle.loads(blob)  # noqa: S301 - our own bytes
    join.step([item(aclink.SEARCH, "s", T0 + 1, "h"), item(aclink.SELECT, "t", T0 + 2, "g")])
    assert pickle.loads(blob) == before  # noqa: S301
    # Restoring the old snapshot replays the search into the same increments.
    again = LinkShard.restore(blob)
    assert again.step([item(aclink.SEARCH, "s", T0 + 1, "h")]) == [(ACQ, "acq:h", T0, (0, 1, 0))]


def test_restore_keeps_what_the_next_epoch_may_still_link() -> None:
    join = LinkShard()
    join.step([item(aclink.SELECT, "s", T0, "h")])
    restored = LinkShard.restore(join.snapshot())
    assert gc.isenabled()  # paused only while the snapshot loads
    assert len(restored) == 1
    restored.step([item(aclink.SELECT, "x", T0 + CLICK_WINDOW_MS + GRACE + 1, "x")])
    restored.close_epoch()
    assert set(restored.sessions) == {"x"}


def test_a_snapshot_of_the_previous_layout_names_the_way_forward() -> None:
    old = pickle.dumps((T0, {}, {}))  # (clock, origins, sessions): the layout before
    with pytest.raises(RecoveryFormatError, match=r"'aclink'.*dataflow.tools.replay"):
        LinkShard.restore(old)


# ------------------------------------------------------------------------- properties

SESSIONS = ["s0", "s1", "s2", None, ""]
TEXTS = ["iPhone", "iphone ", "ＩＰＨＯＮＥ", "ipad", "", "Straße", "strasse"]
DELTAS = [0, 1, -1, 59_999, 60_000, 60_001, 1_799_999, 1_800_000, 1_800_001]

raw_events = st.lists(
    st.tuples(
        st.sampled_from(["ac_select", "ac_select", "search_impression", "click", "dwell"]),
        st.sampled_from(SESSIONS),
        st.sampled_from(TEXTS),
        st.integers(0, 8),  # anchor: T0 + k * 7 min
        st.one_of(st.sampled_from(DELTAS), st.integers(0, 40 * MIN)),
    ),
    min_size=1,
    max_size=40,
)


def build(spec: list[tuple[str, str | None, str, int, int]]) -> list[dict[str, Any]]:
    makers: dict[str, Callable[[int, str, str | None], dict[str, Any]]] = {
        "ac_select": sel,
        "search_impression": search,
        "click": click,
        "dwell": dwell,
    }
    return [
        makers[kind](T0 + k * 7 * MIN + delta, text, session)
        for kind, session, text, k, delta in spec
    ]


def run_batches(
    raw: Sequence[dict[str, Any]], rnd: random.Random, shards: int, grace_ms: int = GRACE
) -> Pipeline:
    """Random batch cuts, and a snapshot-restore at random points between batches."""
    pipe = Pipeline(shards, grace_ms)
    i = 0
    while i < len(raw):
        n = rnd.randint(1, 6)
        pipe.feed(raw[i : i + n])
        i += n
        if rnd.random() < 0.3:
            pipe.recover()
    return pipe


@settings(max_examples=300)
@given(raw_events, st.randoms(use_true_random=False), st.integers(1, 4))
def test_any_order_within_the_grace_equals_the_model(
    spec: list[tuple[str, str | None, str, int, int]], rnd: random.Random, shards: int
) -> None:
    raw = build(spec)
    # Sorting by ts plus a jitter of up to the grace gives every arrival order in which
    # no event comes more than the grace behind one that arrived before it.
    arrival = sorted(raw, key=lambda e: e["ts"] + rnd.randint(0, GRACE))
    pipe = run_batches(arrival, rnd, shards)
    assert pipe.totals() == model_totals(raw)
    assert pipe.stale() == 0
    in_order = run_one_by_one(sorted(raw, key=lambda e: e["ts"]), shards=shards)
    assert in_order.totals() == pipe.totals()


@settings(max_examples=200)
@given(raw_events, st.randoms(use_true_random=False))
def test_written_fields_equal_the_model_within_the_grace(
    spec: list[tuple[str, str | None, str, int, int]], rnd: random.Random
) -> None:
    raw = build(spec)
    arrival = sorted(raw, key=lambda e: e["ts"] + rnd.randint(0, GRACE))
    pipe = run_batches(arrival, rnd, 3)
    store = store_after(pipe.updates, max(e["ts"] for e in raw))
    expected = select_families(expected_store(raw), ["acq"])
    assert not diff_stores(store, expected)
    for fields in store.values():
        assert set(fields) == {
            "selects_7d", "searched_7d", "clicked_7d", "selects_30d", "searched_30d",
            "clicked_30d", "search_rate_30d", "click_rate_30d", "as_of",
        }  # fmt: skip


@settings(max_examples=200)
@given(raw_events, st.randoms(use_true_random=False), st.sampled_from([0, MIN, GRACE]))
def test_any_order_at_all_counts_selects_exactly_and_never_invents_a_link(
    spec: list[tuple[str, str | None, str, int, int]], rnd: random.Random, grace_ms: int
) -> None:
    raw = build(spec)
    arrival = list(raw)
    rnd.shuffle(arrival)
    got = run_batches(arrival, rnd, 2, grace_ms).totals()
    want = model_totals(raw)
    for (key, ts, kind), n in got.items():
        assert n <= want[key, ts, kind], (key, ts, kind)
        if kind == "select":
            assert n == want[key, ts, kind]
    assert sum(n for (_, _, kind), n in got.items() if kind == "select") == sum(
        n for (_, _, kind), n in want.items() if kind == "select"
    )


def test_layout_of_the_increments_matches_the_family() -> None:
    # (selects, searched, clicked): the order `fields_for` reads the ACQ counters in.
    assert LAYOUTS[ACQ].counts == 3
    pipe = run_one_by_one([sel(T0, "a"), search(T0 + 1, "a"), click(T0 + 2, "a")])
    assert pipe.updates == [
        (ACQ, suffix("a"), T0, (1, 0, 0)),
        (ACQ, suffix("a"), T0, (0, 1, 0)),
        (ACQ, suffix("a"), T0, (0, 0, 1)),
    ]


def test_a_partition_read_far_behind_the_others_keeps_its_sessions() -> None:
    """Idleness is judged by each session's own partition clock: a partition that runs
    hours behind another in event time (a backlog) still links its selects."""
    join = LinkShard()
    slow, fast = 1, 2
    assert join.step([(aclink.SELECT, "s", T0, "h", slow, T0)]) == [
        (ACQ, keys.acq_suffix("h"), T0, (1, 0, 0))
    ]
    six, seven = T0 + 6 * 3_600_000, T0 + 7 * 3_600_000  # the fast partition, hours ahead
    join.step([(aclink.SELECT, "other", six, "x", fast, six)])
    join.close_epoch()
    join.step([(aclink.SELECT, "other", seven, "x", fast, seven)])
    join.close_epoch()
    linked = join.step([(aclink.SEARCH, "s", T0 + 30_000, "h", slow, T0 + 30_000)])
    assert linked == [(ACQ, keys.acq_suffix("h"), T0, (0, 1, 0))]


def partition_sequences(raw: Sequence[dict[str, Any]], partitions: int) -> list[list[Event]]:
    """The events as `partitions` Kafka partitions deliver them: each session on one
    partition (its producer keys by session), in the given order, with each partition's
    clock."""
    queues: list[list[dict[str, Any]]] = [[] for _ in range(partitions)]
    for r in raw:
        session = r.get("session_id") or ""
        queues[zlib.crc32(session.encode()) % partitions].append(r)
    out = []
    for n, queue in enumerate(queues):
        clock = 0
        events = []
        for r in queue:
            event = to_event(r, clock)
            object.__setattr__(event, "origin", n)
            clock = event.clock
            events.append(event)
        out.append(events)
    return out


def run_interleaved(
    sequences: list[list[Event]], rnd: random.Random, shards: int, grace_ms: int = GRACE
) -> Counter[Update]:
    """The join as the flow may feed it: partitions interleaved at random, cut into random
    batches, each batch's items in any order (dedup and the exchange between workers
    reorder them), epochs closed and the state restored at random points."""
    pipe = Pipeline(shards, grace_ms)
    cursors = [0] * len(sequences)
    while any(c < len(s) for c, s in zip(cursors, sequences, strict=True)):
        batch: list[Event] = []
        for _ in range(rnd.randint(1, 3)):
            live = [i for i, s in enumerate(sequences) if cursors[i] < len(s)]
            if not live:
                break
            i = rnd.choice(live)
            n = rnd.randint(1, 5)
            batch.extend(sequences[i][cursors[i] : cursors[i] + n])
            cursors[i] += n
        pipe.join(batch, shuffle=rnd)
        if rnd.random() < 0.3:
            pipe.recover()
    return Counter(pipe.updates)


late_sessions = st.lists(
    st.tuples(
        st.sampled_from(["ac_select", "ac_select", "search_impression", "click"]),
        st.sampled_from(["s0", "s1", "s2", "s3"]),
        st.sampled_from(["iphone", "ipad"]),
        st.integers(0, 40),  # anchor: T0 + k * 7 min, so sessions spread over 4.7 hours
        st.one_of(st.sampled_from(DELTAS), st.integers(0, 40 * MIN)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200)
@given(late_sessions, st.randoms(use_true_random=False), st.integers(1, 3), st.integers(1, 3))
def test_the_same_partition_sequences_give_the_same_increments_for_any_batching(
    spec: list[tuple[str, str | None, str, int, int]],
    rnd: random.Random,
    partitions: int,
    shards: int,
) -> None:
    raw = build(spec)
    rnd.shuffle(raw)  # any disorder, hours of it: whole sessions late, partners reversed
    sequences = partition_sequences(raw, partitions)
    first = run_interleaved(sequences, random.Random(rnd.random()), shards)
    again = run_interleaved(sequences, random.Random(rnd.random()), shards)
    assert totals(first.elements()) == totals(again.elements())


@settings(max_examples=200)
@given(late_sessions, st.randoms(use_true_random=False))
def test_sessions_arriving_hours_late_as_a_whole_link_exactly(
    spec: list[tuple[str, str | None, str, int, int]], rnd: random.Random
) -> None:
    raw = build(spec)
    # Whole sessions in any order (an offline client uploads hours later); inside each
    # session, events within the grace of each other.
    sessions: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(raw, key=lambda e: e["ts"] + rnd.randint(0, GRACE)):
        sessions.setdefault(r["session_id"], []).append(r)
    order = list(sessions)
    rnd.shuffle(order)
    arrival = [r for sid in order for r in sessions[sid]]
    # One session is read in at most 4.7 h + 40 min of clock... only its own span counts:
    # keep sessions shorter than the hold apart from that.
    span_ok = all(
        max(e["ts"] for e in evs) - min(e["ts"] for e in evs) <= CLICK_WINDOW_MS
        for evs in sessions.values()
    )
    got = totals(run_interleaved(partition_sequences(arrival, 2), rnd, 2).elements())
    want = model_totals(raw)
    if span_ok:
        assert got == want
    for key, n in got.items():
        assert n <= want[key]
