"""A feature shard whose key states live in a segment store (snapshot layout 6): restored
anywhere, it holds and writes what a shard never restored holds and writes, and an epoch's
snapshot costs what changed in it."""

import pickle
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dataflow.core import counters, snapshots
from dataflow.core.families import DOC, QD, FeatureParams
from dataflow.core.segments import MemorySegments
from dataflow.core.shard import FeatureShard
from dataflow.core.windows import DAY_MS
from dataflow.errors import SegmentError, SegmentMissingError
from tests.core.test_shard import (
    BASE,
    FITTED,
    apply_operation,
    same_flush,
    shard_operations,
    upd,
)

PARAMS = FeatureParams()


def through_bytewax(snapshot: bytes | snapshots.Deferred) -> bytes:
    """What Bytewax hands a builder: the snapshot pickled, then unpickled."""
    blob = pickle.loads(pickle.dumps(snapshot))  # noqa: S301 - our own bytes
    assert isinstance(blob, bytes)
    return blob


def segmented(store: MemorySegments, tail_bytes: int = 64 * 1024, **kwargs: Any) -> FeatureShard:
    shard = FeatureShard(PARAMS, **kwargs)
    shard.use_segments(store, tail_bytes=tail_bytes, max_deltas=3)
    return shard


def restore(
    store: MemorySegments, blob: bytes, tail_bytes: int = 64 * 1024, **kwargs: Any
) -> FeatureShard:
    shard = FeatureShard.restore(PARAMS, blob, segments=store, tail_bytes=tail_bytes, **kwargs)
    shard.max_deltas = 3
    return shard


operations = shard_operations(
    81,
    25,
    st.tuples(st.just("label"), st.integers(0, 80), st.sampled_from(["x", "y" * 30])),
    st.tuples(st.just("snapshot")),
    max_size=40,
)


@example(
    [
        ("step", [((DOC, "doc:"), i, 0) for i in range(20)]),
        ("label", 3, "x"),
        ("snapshot",),
        ("label", 4, "y"),
        ("step", [((DOC, "doc:"), i, 0) for i in range(18, 30)]),
        ("snapshot",),
        ("step", [((QD, "qd:h:"), 3, 0), ((DOC, "doc:"), 2, 0)]),
        ("restore",),
        ("tick", DAY_MS),
        ("step", [((DOC, "doc:"), 40, DAY_MS)]),
        ("restore",),
        ("flush",),
    ],
    3,
)
@given(operations, st.sampled_from([None, 3]))
@settings(max_examples=150)
def test_a_shard_restored_from_segments_anywhere_holds_and_writes_what_one_never_restored_does(
    ops: list[tuple[Any, ...]], per_flush: int | None
) -> None:
    """Segments of a few keys (a tail of 120 bytes, at most 3 deltas), so that short runs
    make chains, deltas and new bases."""
    store = MemorySegments()
    kept = FeatureShard(PARAMS, restate_per_flush=per_flush, fitted=FITTED)
    restored = segmented(store, 120, restate_per_flush=per_flush, fitted=FITTED)
    for op in [*ops, ("restore",), ("flush",), ("flush",)]:
        if op[0] == "snapshot":
            through_bytewax(restored.snapshot())
            continue
        if op[0] == "restore":
            blob = through_bytewax(restored.snapshot())
            restored = restore(store, blob, 120, restate_per_flush=per_flush, fitted=FITTED)
            assert list(restored.keys.items()) == list(kept.keys.items())  # order included
            continue
        for shard in (kept, restored):
            apply_operation(shard, op)
        if op[0] == "flush":
            a, b = same_flush(kept, restored)
            assert a.labels == b.labels
        assert kept.restate_left == restored.restate_left
    assert list(restored.keys.items()) == list(kept.keys.items())
    assert (restored.dirty, restored.deleted, restored.labels) == (
        kept.dirty,
        kept.deleted,
        kept.labels,
    )


def build(store: MemorySegments, n: int) -> FeatureShard:
    shard = segmented(store)
    shard.step([[upd(DOC, f"doc:{i:07}", BASE, (1, 0, 0)) for i in range(n)]])
    shard.flush()
    return shard


def test_an_epochs_snapshot_costs_what_changed_not_what_is_held() -> None:
    store = MemorySegments()
    shard = build(store, 50_000)
    shard.step([{suffix: f"the text behind {suffix}" for suffix in shard.keys}])  # labels
    first = through_bytewax(shard.snapshot())
    base = store.appended
    # every key and label went to the store, once
    assert base > len(counters.pack_states(shard.keys)) + 50_000 * 20
    assert len(first) < 1_000  # the snapshot itself: the base's reference
    for round_ in range(5):
        changed = [upd(DOC, f"doc:{i:07}", BASE + 1 + round_, (0, 1, 0)) for i in range(100)]
        shard.step([changed])
        shard.flush()
        blob = through_bytewax(shard.snapshot())
        assert len(blob) < 100 * 60  # the hundred changed keys, not the fifty thousand
    assert store.appended == base  # small tails stay in the snapshot
    again = restore(store, blob)
    assert list(again.keys.items()) == list(shard.keys.items())
    assert again.labels == shard.labels


def test_a_tail_past_its_bound_becomes_a_delta_and_deltas_outgrowing_the_base_a_new_base() -> None:
    store = MemorySegments()
    shard = build(store, 20_000)
    through_bytewax(shard.snapshot())
    assert len(shard.chain) == 1
    # 3 000 new keys: a tail past TAIL_BYTES, a delta much smaller than the base
    shard.step([[upd(DOC, f"doc:n{i:07}", BASE, (1, 0, 0)) for i in range(3_000)]])
    shard.flush()
    through_bytewax(shard.snapshot())
    assert len(shard.chain) == 2 and shard.mark == len(shard.keys)
    # every key changed: the deltas would outgrow the base, so a new base replaces them
    shard.step([[upd(DOC, s, BASE + 5, (0, 1, 0)) for s in list(shard.keys)]])
    shard.flush()
    old = [p.ref().segment for p in shard.chain]
    through_bytewax(shard.snapshot())
    assert len(shard.chain) == 1 and shard.delta_bytes == 0
    assert store.retired == []
    through_bytewax(shard.snapshot())
    assert store.retired == []  # the snapshot that dropped them may not be committed yet
    through_bytewax(shard.snapshot())
    assert store.retired == old
    assert set(store.segments) == {shard.chain[0].ref().segment}


def test_a_new_day_rebuilds_the_base() -> None:
    store = MemorySegments()
    shard = build(store, 20_000)
    through_bytewax(shard.snapshot())
    before = shard.chain[0].ref().segment
    shard.step([BASE + DAY_MS])
    blob = through_bytewax(shard.snapshot())
    assert shard.chain[0].ref().segment != before
    assert list(restore(store, blob).keys.items()) == list(shard.keys.items())


def test_a_deferred_snapshot_waits_for_its_segments_and_pickles_as_bytes() -> None:
    class Slow(MemorySegments):
        def append(self, owner: str, payload: bytes) -> Any:
            done = super().append(owner, payload)
            waited: list[bool] = []

            class Later:
                done = False

                def ref(self) -> Any:
                    waited.append(True)
                    return done.ref()

            self.waited = waited
            return Later()

    store = Slow()
    shard = build(store, 20_000)
    snap = shard.snapshot()
    assert isinstance(snap, snapshots.Deferred)
    assert store.waited == []  # nothing waited for until Bytewax pickles it
    blob = through_bytewax(snap)
    assert store.waited and list(restore(store, blob).keys.items()) == list(shard.keys.items())


def test_a_missing_segment_fails_the_restore_naming_the_way_forward() -> None:
    store = MemorySegments()
    shard = build(store, 20_000)
    blob = through_bytewax(shard.snapshot())
    store.segments.clear()
    with pytest.raises(SegmentMissingError, match="dataflow.tools.replay"):
        restore(store, blob)


def test_a_segmented_snapshot_without_a_store_says_what_is_missing() -> None:
    store = MemorySegments()
    blob = through_bytewax(build(store, 20_000).snapshot())
    with pytest.raises(SegmentError, match="segment store"):
        FeatureShard.restore(PARAMS, blob)


def test_a_snapshot_of_layout_5_restores_into_segments() -> None:
    plain = FeatureShard(PARAMS)
    plain.step([[upd(DOC, f"doc:{i:07}", BASE, (1, 0, 0)) for i in range(20_000)]])
    store = MemorySegments()
    shard = restore(store, plain.snapshot())
    blob = through_bytewax(shard.snapshot())
    assert len(shard.chain) == 1 and shard.dirty == plain.dirty
    assert list(restore(store, blob).keys.items()) == list(plain.keys.items())
