"""A state shard: order-independent results, daily re-statement, expiry, late updates."""

import pickle
import random
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dataflow.core import counters, snapshots
from dataflow.core.families import ACQ, DOC, LAYOUTS, QD, FeatureParams, Update
from dataflow.core.priors import Fit
from dataflow.core.shard import FeatureShard, StepResult
from dataflow.core.windows import DAY_MS
from dataflow.errors import RecoveryFormatError
from tests.fakes import layout_4_states

BASE = 20_000 * DAY_MS
PARAMS = FeatureParams()


def upd(family: int, suffix: str, ts: int, counts: tuple[int, ...]) -> Update:
    """An update; counts left out at the end (a doc key's expected clicks) are zero."""
    return (family, suffix, ts, counts + (0,) * (LAYOUTS[family].counts - len(counts)))


updates_strategy = st.lists(
    st.tuples(
        st.sampled_from([(DOC, "doc:a"), (DOC, "doc:b"), (QD, "qd:h:a")]),
        st.integers(min_value=0, max_value=45 * DAY_MS),
        st.sampled_from([(1, 0, 0), (0, 1, 0), (0, 0, 1)]),
    ),
    min_size=1,
    max_size=40,
)


def run(batches: list[list[Update]]) -> tuple[FeatureShard, dict[str, dict[str, str] | None]]:
    shard = FeatureShard(PARAMS)
    store: dict[str, dict[str, str] | None] = {}
    for batch in batches:
        shard.step([batch])
        for suffix, fields in shard.flush().writes:
            store[suffix] = fields
    return shard, store


@given(updates_strategy, st.randoms(use_true_random=False))
def test_final_writes_do_not_depend_on_order_or_batching(
    raw: list[tuple[tuple[int, str], int, tuple[int, ...]]], rnd: random.Random
) -> None:
    updates = [upd(f, s, BASE + off, c) for (f, s), off, c in raw]
    clock = max(u[2] for u in updates)
    in_order = sorted(updates, key=lambda u: u[2])
    shuffled = list(updates)
    rnd.shuffle(shuffled)
    cut = rnd.randint(1, len(shuffled))
    a_shard, a = run([in_order, [upd(DOC, "doc:a", clock, (0, 0, 0))]])
    b_shard, b = run([shuffled[:cut], shuffled[cut:], [upd(DOC, "doc:a", clock, (0, 0, 0))]])
    live = {k: v for k, v in a.items() if v is not None}
    assert live == {k: v for k, v in b.items() if v is not None}
    assert a_shard.keys == b_shard.keys


def test_new_day_restates_idle_keys_with_day_start_as_of() -> None:
    shard = FeatureShard(PARAMS)
    shard.step([[upd(DOC, "doc:idle", BASE + 1000, (1, 0, 0))]])
    first = shard.flush()
    assert first.writes[0][1] is not None and first.writes[0][1]["as_of"] == str(BASE + 1000)
    # Another key's event on a later day moves the clock: the idle key is re-stated.
    assert shard.step([[upd(DOC, "doc:busy", BASE + 3 * DAY_MS + 5, (0, 1, 0))]]).new_day
    result = shard.flush()
    assert result.new_day
    by_key = dict(result.writes)
    idle = by_key["doc:idle"]
    assert idle is not None
    assert idle["as_of"] == str(BASE + 3 * DAY_MS)
    assert idle["impressions_7d"] == "1"
    assert float(idle["impressions_decay"]) < 1.0  # decayed by 3 days minus 1 s


def test_fresh_holds_the_as_of_of_event_driven_writes_only() -> None:
    shard = FeatureShard(PARAMS, clock=BASE, restate_per_flush=1)
    shard.step(
        [[upd(DOC, "doc:a", BASE + 1000, (1, 0, 0)), upd(QD, "qd:h:a", BASE + 9, (1, 0, 0))]]
    )
    assert sorted(shard.flush().fresh) == [BASE + 9, BASE + 1000]
    shard.step([[upd(DOC, "doc:b", BASE + DAY_MS + 5, (0, 1, 0))]])  # a new day: re-statements
    result = shard.flush()
    assert result.new_day
    assert len(result.writes) == 2  # doc:b for its event, one key's turn
    assert result.fresh == [BASE + DAY_MS + 5]
    shard.step([[upd(DOC, "doc:a", BASE + DAY_MS + 7, (1, 0, 0))]])
    result = shard.flush()
    assert [s for s, _ in result.writes] == ["doc:a", "qd:h:a"]  # its event, the next turn
    assert result.fresh == [BASE + DAY_MS + 7]
    shard.step([BASE + 40 * DAY_MS])  # every key expires: deletions are not fresh writes
    result = shard.flush()
    assert result.writes and all(f is None for _, f in result.writes)
    assert result.fresh == []


def test_clock_tick_alone_restates_and_expires() -> None:
    shard = FeatureShard(PARAMS)
    shard.step(
        [[upd(DOC, "doc:old", BASE, (1, 0, 0)), upd(DOC, "doc:new", BASE + 20 * DAY_MS, (1, 0, 0))]]
    )
    shard.flush()
    shard.step([BASE + 30 * DAY_MS])  # a clock reading from another worker
    result = shard.flush()
    assert dict(result.writes)["doc:old"] is None  # 30 days empty: deleted
    assert dict(result.writes)["doc:new"] is not None
    assert "doc:old" not in shard.keys


def test_late_updates_are_dropped() -> None:
    shard = FeatureShard(PARAMS)
    shard.step([[upd(DOC, "doc:a", BASE + 40 * DAY_MS, (1, 0, 0))]])
    result = shard.step([[upd(DOC, "doc:b", BASE + 10 * DAY_MS, (1, 0, 0))]])
    assert result.late_updates == 1
    assert "doc:b" not in shard.keys
    kept = shard.step([[upd(DOC, "doc:c", BASE + 11 * DAY_MS, (1, 0, 0))]])
    assert kept.late_updates == 0  # day 11 is inside the 30-day window of day 40


def test_snapshot_is_detached_from_live_state() -> None:
    shard = FeatureShard(PARAMS)
    shard.step([[upd(DOC, "doc:a", BASE, (1, 0, 0))]])
    blob = shard.snapshot()
    shard.step([[upd(DOC, "doc:a", BASE + 1, (1, 0, 0))]])
    restored = FeatureShard.restore(PARAMS, blob)
    assert restored.keys["doc:a"][2] == 1  # one impression, not two
    assert restored.clock == BASE


def test_a_snapshot_of_the_previous_layout_names_the_way_forward() -> None:
    old = pickle.dumps((BASE, {}, set(), set(), False, {}))  # the tuple before the envelope
    with pytest.raises(RecoveryFormatError, match=r"'features'.*dataflow.tools.replay"):
        FeatureShard.restore(PARAMS, old)


def test_a_snapshot_of_layout_3_still_restores() -> None:
    """Recovery directories written before the keys' states shared one buffer."""
    shard = FeatureShard(PARAMS)
    shard.step([[upd(DOC, "doc:a", BASE, (1, 1, 0)), upd(QD, "qd:h:a", BASE + 5, (1, 0, 0))]])
    shard.flush()
    shard.step([[upd(DOC, "doc:a", BASE + 9, (0, 0, 1))]])
    layout_3 = snapshots.wrap(
        "features",
        3,
        (
            shard.clock,
            {suffix: counters.to_bytes(state) for suffix, state in shard.keys.items()},
            shard.dirty,
            shard.deleted,
            [],
            {},
            shard.created,
            {},
            set(),
        ),
    )
    blobs = (layout_3, shard.snapshot())
    states = {s: v.tobytes() for s, v in shard.keys.items()}
    writes = shard.flush().writes
    for blob in blobs:
        restored = FeatureShard.restore(PARAMS, blob)
        assert {s: v.tobytes() for s, v in restored.keys.items()} == states
        assert restored.dirty == {"doc:a"}
        assert restored.flush().writes == writes


def test_hot_key_updates_coalesce_into_one_write_per_flush() -> None:
    shard = FeatureShard(PARAMS)
    for i in range(50):
        shard.step([[upd(DOC, "doc:hot", BASE + i, (1, 0, 0))]])
    writes = shard.flush().writes
    assert [suffix for suffix, _ in writes] == ["doc:hot"]
    assert writes[0][1] is not None and writes[0][1]["impressions_7d"] == "50"
    assert shard.flush().writes == []  # nothing dirty any more


def test_dirty_keys_survive_a_snapshot() -> None:
    shard = FeatureShard(PARAMS)
    shard.step([[upd(DOC, "doc:a", BASE, (1, 0, 0))]])
    restored = FeatureShard.restore(PARAMS, shard.snapshot())
    assert [s for s, _ in restored.flush().writes] == ["doc:a"]


def test_labels_travel_with_writes_and_go_with_expired_keys() -> None:
    shard = FeatureShard(PARAMS)
    shard.step([{"acq:abc": "iphone case", "acq:never": "no counts"}])
    shard.step([[upd(ACQ, "acq:abc", BASE, (1, 0, 0))]])
    result = shard.flush()
    assert result.labels == {"acq:abc": "iphone case"}
    restored = FeatureShard.restore(PARAMS, shard.snapshot())
    assert restored.labels["acq:abc"] == "iphone case"
    shard.step([BASE + 31 * DAY_MS])  # the key's 30 days are empty: deleted
    deleted = shard.flush()
    assert deleted.writes == [("acq:abc", None)]
    assert deleted.labels == {"acq:abc": "iphone case"}  # the index can drop the candidate
    assert shard.labels == {}  # neither the expired key's nor the orphan label is kept


def test_a_key_sets_its_ttl_when_created_and_when_re_stated_after_a_new_day() -> None:
    shard = FeatureShard(PARAMS)
    shard.step([[upd(DOC, "doc:a", BASE, (1, 0, 0)), upd(DOC, "doc:b", BASE, (1, 0, 0))]])
    first = shard.flush()
    assert {s for s, _ in first.writes if first.sets_ttl(s)} == {"doc:a", "doc:b"}
    shard.step([[upd(DOC, "doc:a", BASE + 1, (1, 0, 0)), upd(DOC, "doc:c", BASE + 1, (1, 0, 0))]])
    restored = FeatureShard.restore(PARAMS, shard.snapshot())  # the set survives a crash
    second = restored.flush()
    assert {s for s, _ in second.writes} == {"doc:a", "doc:c"}
    assert {s for s, _ in second.writes if second.sets_ttl(s)} == {"doc:c"}
    restored.step([BASE + DAY_MS])
    third = restored.flush()
    assert third.new_day
    assert all(third.sets_ttl(s) for s, _ in third.writes)
    assert {s for s, _ in third.writes} == {"doc:a", "doc:b", "doc:c"}


def test_re_statements_after_a_new_day_are_spread_over_flushes() -> None:
    def run(shard: FeatureShard, flushes: int) -> tuple[dict[str, Any], list[int]]:
        store: dict[str, Any] = {}
        sizes = []
        shard.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(5)]])
        shard.flush()
        shard.step([BASE + DAY_MS])
        for n in range(flushes):
            if n == 1:  # an event meanwhile
                shard.step([[upd(DOC, "doc:4", BASE + DAY_MS + 1, (0, 1, 0))]])
            if n == 2:  # a crash and a restore
                shard = FeatureShard.restore(PARAMS, shard.snapshot(), shard.restate_per_flush)
            result = shard.flush()
            sizes.append(len(result.writes))
            store.update(result.writes)
        assert not shard.pending
        return store, sizes

    spread, sizes = run(FeatureShard(PARAMS, restate_per_flush=2), 4)
    at_once, _ = run(FeatureShard(PARAMS), 2)
    assert spread == at_once  # the same values in the end, written in turns
    assert sizes[0] == 2 and max(sizes) <= 3


def test_a_newer_day_replaces_the_re_statements_not_yet_written() -> None:
    shard = FeatureShard(PARAMS, restate_per_flush=1)
    shard.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(3)]])
    shard.flush()
    shard.step([BASE + DAY_MS])
    shard.flush()
    shard.step([BASE + 2 * DAY_MS])  # a backfill: the next day comes before the queue ends
    written = [shard.flush(), shard.flush(), shard.flush()]
    assert not shard.pending
    assert all(
        f is not None and f["as_of"] == str((BASE + 2 * DAY_MS) // DAY_MS * DAY_MS)
        for r in written
        for _, f in r.writes
    )
    everything = FeatureShard(PARAMS, restate_per_flush=1)
    everything.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(3)], BASE + DAY_MS])
    assert len(everything.flush(everything=True).writes) == 3


# --- repairing a store that lost data (restate_all) ------------------------------------------


def drain(shard: FeatureShard) -> dict[str, Any]:
    """Flush until nothing is pending (the first events of a shard are a new day, too)."""
    store: dict[str, Any] = {}
    while shard.pending:
        store.update(shard.flush().writes)
    return store


def written(shard: FeatureShard, flushes: int) -> list[set[str]]:
    """The keys each of `flushes` flushes writes, all of them setting their TTL."""
    out = []
    for _ in range(flushes):
        result = shard.flush()
        assert all(result.sets_ttl(s) for s, f in result.writes if f is not None)
        out.append({s for s, _ in result.writes})
    return out


def test_restate_all_queues_every_live_key_without_a_new_day() -> None:
    shard = FeatureShard(PARAMS, restate_per_flush=3)
    shard.step([[upd(DOC, f"doc:{i}", BASE + i, (1, 0, 0)) for i in range(7)]])
    before = drain(shard)
    assert shard.restate_left == 0
    assert shard.restate_all() == 7
    assert shard.pending and shard.restate_left == 7
    results = [shard.flush() for _ in range(3)]
    assert [len(r.writes) for r in results] == [3, 3, 1]  # restate_per_flush keys per flush
    assert all(r.sets_ttl(s) for r in results for s, _ in r.writes)
    assert not shard.pending and shard.restate_left == 0
    # Every live key, with the values it had: a re-statement within the day changes nothing.
    assert {s: f for r in results for s, f in r.writes} == before


def test_a_repair_writes_the_current_values_and_every_write_sets_the_ttl() -> None:
    shard = FeatureShard(PARAMS, restate_per_flush=2)
    shard.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(4)]])
    drain(shard)
    shard.restate_all()
    # Meanwhile: an event for a queued key, a new key; both written at the next flush.
    shard.step([[upd(DOC, "doc:3", BASE + 5, (0, 1, 0)), upd(DOC, "doc:new", BASE + 5, (1, 0, 0))]])
    first = shard.flush()
    assert first.new_day  # the TTL rule: every write of a re-statement sets it
    by_key = dict(first.writes)
    assert {"doc:3", "doc:new", "doc:0", "doc:1"} <= set(by_key)
    assert all(first.sets_ttl(s) for s in by_key)
    assert by_key["doc:3"] is not None and by_key["doc:3"]["clicks_7d"] == "1"
    rest = shard.flush()
    assert {s for s, _ in rest.writes} == {"doc:2", "doc:3"}
    assert all(rest.sets_ttl(s) for s, _ in rest.writes)
    assert not shard.pending


def test_a_repair_in_progress_survives_a_snapshot_and_restore() -> None:
    shard = FeatureShard(PARAMS, restate_per_flush=2)
    shard.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(5)]])
    drain(shard)
    shard.restate_all()
    first = {s for s, _ in shard.flush().writes}
    restored = FeatureShard.restore(PARAMS, shard.snapshot(), restate_per_flush=2)
    assert restored.restate_left == 3
    rest = written(restored, 2)
    assert first.isdisjoint(set().union(*rest))
    assert first | set().union(*rest) == {f"doc:{i}" for i in range(5)}
    assert not restored.pending


def test_a_repair_restarts_a_queue_in_progress_and_a_new_day_replaces_it() -> None:
    shard = FeatureShard(PARAMS, restate_per_flush=2)
    shard.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(4)], BASE + DAY_MS])
    assert shard.restate_left == 4
    shard.flush()
    assert shard.restate_all() == 4  # a loss mid-way: the keys already written are lost too
    assert shard.restate_left == 4
    shard.step([BASE + 2 * DAY_MS])  # a newer day covers everything again
    assert shard.restate_left == 4
    assert sum(len(t) for t in written(shard, 2)) == 4
    assert FeatureShard(PARAMS).restate_all() == 0  # an empty shard has nothing to queue


# --- the re-statement queue across snapshots --------------------------------------------------

FITTED = frozenset({DOC})


def shard_operations(
    keys: int, per_step: int, *extra: st.SearchStrategy[tuple[Any, ...]], max_size: int = 30
) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Sequences of what a shard lives through: steps over `keys` doc and query-doc ids (at
    most `per_step` updates each, over four days), ticks of the clock, fitted priors,
    repairs, flushes and restores, and `extra` operations."""
    return st.lists(
        st.one_of(
            st.tuples(
                st.just("step"),
                st.lists(
                    st.tuples(
                        st.sampled_from([(DOC, "doc:"), (QD, "qd:h:")]),
                        st.integers(0, keys - 1),
                        st.integers(0, 4 * DAY_MS),
                    ),
                    min_size=1,
                    max_size=per_step,
                ),
            ),
            st.tuples(st.just("tick"), st.integers(0, 4 * DAY_MS)),
            st.tuples(st.just("fit"), st.integers(0, 4), st.sampled_from([1.0, 2.0, 3.0])),
            st.tuples(st.just("restate_all")),
            st.tuples(st.just("flush")),
            st.tuples(st.just("restore")),
            *extra,
        ),
        max_size=max_size,
    )


operations = shard_operations(10, 6)


@example(
    [
        ("step", [((DOC, "doc:"), 0, 0), ((DOC, "doc:"), 1, 0), ((QD, "qd:h:"), 0, 0)]),
        ("flush",),
        ("tick", DAY_MS),
        ("flush",),
        ("step", [((DOC, "doc:"), 3, DAY_MS)]),
        ("flush",),
        ("fit", 1, 2.0),  # today's prior after keys were written with the configured one
        ("restore",),
    ],
    1,
)
@given(operations, st.sampled_from([None, 1, 3]))
def test_a_restore_anywhere_changes_no_write_of_a_re_statement_queue(
    ops: list[tuple[Any, ...]], per_flush: int | None
) -> None:
    """New days, repairs, fitted priors (which queue keys out of the dict's order) and
    flushes in any order: a shard restored at any point writes what one never restored
    writes, flush by flush."""
    kept = FeatureShard(PARAMS, restate_per_flush=per_flush, fitted=FITTED)
    restored = FeatureShard(PARAMS, restate_per_flush=per_flush, fitted=FITTED)
    for op in [*ops, ("flush",), ("flush",)]:
        if op[0] == "restore":
            restored = FeatureShard.restore(PARAMS, restored.snapshot(), per_flush, FITTED)
            continue
        for shard in (kept, restored):
            apply_operation(shard, op)
        if op[0] == "flush":
            same_flush(kept, restored)
        assert kept.restate_left == restored.restate_left


def apply_operation(shard: FeatureShard, op: tuple[Any, ...]) -> None:
    """One operation of `shard_operations` (flushes, snapshots and restores are the
    caller's)."""
    if op[0] == "step":
        shard.step([[upd(f, f"{p}{i}", BASE + ts, (1, 0, 0)) for (f, p), i, ts in op[1]]])
    elif op[0] == "tick":
        shard.step([BASE + op[1]])
    elif op[0] == "label":
        shard.step([{f"qd:h:{op[1]}": op[2]}])
    elif op[0] == "fit":
        shard.step([Fit(DOC, BASE // DAY_MS + op[1], op[2], 8.0, 100, True)])
    elif op[0] == "restate_all":
        shard.restate_all()


def same_flush(kept: FeatureShard, restored: FeatureShard) -> tuple[StepResult, StepResult]:
    """Flush both; they must write the same (the dirty set's order is a set's)."""
    a, b = kept.flush(), restored.flush()
    assert len(a.writes) == len(b.writes)
    assert dict(a.writes) == dict(b.writes)
    assert a.new_day == b.new_day and a.created == b.created
    return a, b


def test_a_new_days_queue_is_stored_as_positions_not_names() -> None:
    shard = FeatureShard(PARAMS, restate_per_flush=10)
    shard.step([[upd(DOC, f"doc:{i:06}", BASE, (1, 0, 0)) for i in range(5_000)]])
    shard.flush()
    idle = len(shard.snapshot())
    shard.step([BASE + DAY_MS])
    shard.flush()
    assert shard.restate_left == 4_990
    assert len(shard.snapshot()) - idle < 100  # not 4 990 suffixes
    restored = FeatureShard.restore(PARAMS, shard.snapshot(), 10)
    assert restored.restating == shard.restating[shard.restate_at :]


def test_a_snapshot_of_layout_4_still_restores_its_queue() -> None:
    """Layout 4 stored the queue as suffixes, and the key states as int64 items."""
    shard = FeatureShard(PARAMS, restate_per_flush=1)
    shard.step([[upd(DOC, f"doc:{i}", BASE, (1, 0, 0)) for i in range(3)], BASE + DAY_MS])
    first = shard.flush()
    state = list(snapshots.unwrap("features", 5, shard.snapshot()))
    assert isinstance(state[4], range)
    state[1] = layout_4_states(shard.keys)
    state[4] = shard.restating[shard.restate_at :]
    restored = FeatureShard.restore(PARAMS, snapshots.wrap("features", 4, tuple(state)), 1)
    assert restored.restate_from is None and restored.restate_left == 2
    rest = [restored.flush().writes, restored.flush().writes]
    assert {s for w in [first.writes, *rest] for s, _ in w} == {"doc:0", "doc:1", "doc:2"}
