"""Dedup slots: the 24-hour horizon, forgetting, and snapshots."""

from dataflow.dedup import (
    HORIZON_MS,
    SLOT_MS,
    SeenIds,
    dedup_key,
    id_digest,
    last_forgotten_slot,
    slots_to_forget,
)


def test_slot_is_forgotten_only_once_the_clock_passes_24h_after_its_end() -> None:
    slot = 1000
    end = (slot + 1) * SLOT_MS
    assert last_forgotten_slot(end + HORIZON_MS) < slot  # exactly 24 h: still remembered
    assert last_forgotten_slot(end + HORIZON_MS + 1) == slot


def test_slots_to_forget_covers_each_slot_once() -> None:
    clocks = [5_000 * SLOT_MS, 5_000 * SLOT_MS + 7, 5_150 * SLOT_MS, 5_151 * SLOT_MS + 1, 5_400 * SLOT_MS]
    seen: list[int] = []
    for old, new in zip(clocks, clocks[1:], strict=False):
        seen.extend(slots_to_forget(old, new))
    assert seen == sorted(set(seen))
    assert seen[-1] == last_forgotten_slot(clocks[-1])
    assert seen[0] == last_forgotten_slot(clocks[0]) + 1


def test_nothing_to_forget_at_start_and_jumps_are_capped() -> None:
    assert list(slots_to_forget(0, 10**12)) == []
    jump = slots_to_forget(SLOT_MS * 10, SLOT_MS * 10**6)
    assert len(jump) == 31 * 144


def test_first_copy_wins_and_forgetting_lets_copies_through() -> None:
    ids = SeenIds()
    a, b = id_digest("a"), id_digest("b")
    assert list(ids.admit([(a, "a1"), (b, "b1"), (a, "a2")])) == ["a1", "b1"]
    assert list(ids.admit([(a, "a3")])) == []
    ids.forget()
    assert list(ids.admit([(a, "a4"), (a, "a5")])) == ["a4", "a5"]
    assert ids.seen == set()


def test_snapshot_round_trip_is_detached() -> None:
    ids = SeenIds()
    list(ids.admit([(1, "x")]))
    blob = ids.snapshot()
    list(ids.admit([(2, "y")]))
    restored = SeenIds.restore(blob)
    assert restored.seen == {1}
    assert restored.forgotten is False


def test_keys_are_stable() -> None:
    assert id_digest("event-1") == 0x1D4103BFFB51791D  # BLAKE2b-64, same in every process
    assert dedup_key(7, 35, 16) == "7:3"
