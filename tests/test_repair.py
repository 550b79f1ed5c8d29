"""Repairing a store that lost data, inside one process and without services: the signal the
Redis sink raises (`StoreRepairs`), the feature shards that act on it (`ShardLogic`), and
the `store_checks` wake-ups that reach idle shards (`StoreWakeSource`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dataflow.core.families import DOC, LAYOUTS, FeatureParams, Update
from dataflow.core.shard import FeatureShard, StepResult
from dataflow.core.windows import DAY_MS
from dataflow.flow import WAKE, ShardLogic, StoreWakeSource, Wake
from dataflow.repair import StoreRepairs
from tests.registry import sample

BASE = 20_000 * DAY_MS
PARAMS = FeatureParams()


def updates(n: int, first: int = 0) -> list[Update]:
    """One impression for each of `n` documents."""
    counts = (1,) + (0,) * (LAYOUTS[DOC].counts - 1)
    return [(DOC, f"doc:{i}", BASE + i, counts) for i in range(first, first + n)]


def shard(repairs: StoreRepairs, *, keys: int = 0, restored: bool = False) -> ShardLogic:
    """A shard logic holding `keys` keys, all written already (nothing pending)."""
    resume = None
    if restored:
        state = FeatureShard(PARAMS)
        state.step([updates(keys)])
        while state.pending:
            state.flush()
        resume = state.snapshot()
    logic = ShardLogic(PARAMS, 200, 2, resume, repairs)
    if keys and not restored:
        logic.on_batch([updates(keys)])
        logic.on_eof()
    assert not logic.shard.pending
    return logic


def writes(results: object) -> list[StepResult]:
    out = list(results)  # type: ignore[call-overload]
    assert all(isinstance(r, StepResult) for r in out)
    return out


def wake_partition(repairs: StoreRepairs, shards: int, *, stop_at_end: bool = False) -> object:
    return StoreWakeSource(repairs, shards, stop_at_end=stop_at_end).build("store_checks", 0, 1)


def test_a_loss_while_running_re_states_every_key_of_every_shard_without_events() -> None:
    repairs = StoreRepairs()
    fresh, restored = shard(repairs, keys=3), shard(repairs, keys=5, restored=True)
    waker = wake_partition(repairs, 2)
    assert waker.next_batch() == []  # type: ignore[attr-defined]
    assert repairs.status().settled  # nothing lost, every shard at generation 0

    generation = repairs.lost()
    assert not repairs.status().settled
    wakes = waker.next_batch()  # type: ignore[attr-defined]
    assert wakes == [("0", WAKE), ("1", WAKE)]
    assert waker.next_batch() == []  # type: ignore[attr-defined]  # once per generation

    for logic in (fresh, restored):
        out, _ = logic.on_batch([Wake()])  # a copy, as another process would send it
        assert writes(out) == []  # nothing at once: the flush timer re-states them
        assert logic.notify_at() is not None  # so they go out without any event
    assert sample("search_features_keys_to_restate") >= 8
    status = repairs.status()
    assert status.generation == generation and status.keys_queued == 8
    assert not status.settled  # queued, but in no snapshot yet
    fresh.snapshot()
    assert not repairs.status().settled
    restored.snapshot()
    assert repairs.status().settled and repairs.status().shards_queued == 2

    for logic, keys in ((fresh, 3), (restored, 5)):
        written: set[str] = set()
        while logic.shard.pending:
            assert logic.notify_at() is not None
            [result] = writes(logic.on_notify()[0])
            assert len(result.writes) <= 2  # the rate: restate_per_flush keys per flush
            assert all(result.sets_ttl(s) for s, _ in result.writes)  # EXPIRE with each
            written |= {s for s, _ in result.writes}
        assert written == {f"doc:{i}" for i in range(keys)}


def test_a_marker_missing_at_start_re_states_only_what_was_restored() -> None:
    repairs = StoreRepairs()
    restored = shard(repairs, keys=4, restored=True)
    fresh = shard(repairs, keys=3)  # wrote to this store since the process started
    repairs.lost(at_start=True)
    fresh.on_batch([WAKE])
    restored.on_batch([WAKE])
    assert not fresh.shard.pending
    assert restored.shard.restate_left == 4
    assert repairs.status().keys_queued == 4
    # A shard that starts after a loss holds nothing the store lost.
    late = shard(repairs)
    late.on_batch([updates(2, first=10)])
    assert late.repaired == repairs.generation
    assert repairs.status().keys_queued == 4
    # A loss while running re-states every shard, new ones included.
    repairs.lost()
    for logic in (fresh, restored, late):
        logic.on_eof()
        logic.on_notify()
        assert not logic.shard.pending
    assert repairs.status().keys_queued == 3 + 4 + 2


def test_a_shard_acts_on_the_signal_at_any_activation() -> None:
    repairs = StoreRepairs()
    logic = shard(repairs, keys=3)
    repairs.lost()
    logic.on_batch([updates(1, first=50)])  # an event, no wake-up
    assert logic.shard.restate_left == 3  # the keys it held; the new one is written as new
    repairs.lost()
    [result] = writes(logic.on_eof()[0])  # the end of input writes it all
    assert {s for s, _ in result.writes} == {"doc:0", "doc:1", "doc:2", "doc:50"}
    assert all(result.sets_ttl(s) for s, _ in result.writes)


def test_without_a_marker_shards_never_re_state() -> None:
    logic = ShardLogic(PARAMS, 200, 2, None)
    logic.on_batch([updates(3)])
    logic.on_eof()
    assert logic.repaired == 0 and not logic.shard.pending


@pytest.mark.parametrize("stop_at_end", [True, False])
def test_the_wake_ups_end_with_a_finite_input_once_nothing_waits(stop_at_end: bool) -> None:
    repairs = StoreRepairs()
    logic = shard(repairs, keys=2, restored=True)
    waker = wake_partition(repairs, 1, stop_at_end=stop_at_end)
    repairs.lost(at_start=True)
    assert waker.next_batch() == [("0", WAKE)]  # type: ignore[attr-defined]
    logic.on_batch([WAKE])
    logic.snapshot()
    assert waker.next_batch() == []  # type: ignore[attr-defined]  # the sink has not checked yet
    repairs.checked()
    if stop_at_end:
        with pytest.raises(StopIteration):
            waker.next_batch()  # type: ignore[attr-defined]
        assert repairs.status().settled  # it no longer waits for this waker
    else:
        assert waker.next_batch() == []  # type: ignore[attr-defined]  # tail mode: forever
        awake = waker.next_awake()  # type: ignore[attr-defined]
        assert awake is not None and awake > datetime.now(UTC)


def test_a_repair_waits_for_every_worker_to_have_run() -> None:
    repairs = StoreRepairs()
    first, second = wake_partition(repairs, 1), wake_partition(repairs, 1)
    repairs.lost()
    first.next_batch()  # type: ignore[attr-defined]
    assert not repairs.status().settled  # the second worker's restored shards may not exist
    second.next_batch()  # type: ignore[attr-defined]
    assert repairs.status().settled


def test_a_queue_waits_for_its_snapshot_even_when_a_later_loss_needs_nothing() -> None:
    repairs = StoreRepairs()
    logic = shard(repairs, keys=3)
    waker = wake_partition(repairs, 1)
    repairs.lost()
    waker.next_batch()  # type: ignore[attr-defined]
    logic.on_batch([WAKE])  # 3 keys queued, in no snapshot yet
    repairs.lost(at_start=True)  # a worker's mark missing at its start: nothing due here
    waker.next_batch()  # type: ignore[attr-defined]
    logic.on_batch([WAKE])
    assert logic.repaired == repairs.generation
    assert not repairs.status().settled  # the first queue is still only in memory
    logic.snapshot()
    assert repairs.status().settled
