"""Dedup ring entries: first copy wins, recycling, the 24-hour horizon, snapshots."""

from dataflow.core.dedup import (
    HORIZON_MS,
    RING_SLOTS,
    SLOT_MS,
    SlotIds,
    dedup_key,
    id_digest,
    last_forgotten_slot,
)


def test_slot_is_past_the_horizon_only_once_the_clock_passes_24h_after_its_end() -> None:
    slot = 1000
    end = (slot + 1) * SLOT_MS
    assert last_forgotten_slot(end + HORIZON_MS) < slot  # exactly 24 h: still checked
    assert last_forgotten_slot(end + HORIZON_MS + 1) == slot


def test_first_copy_wins_within_a_slot() -> None:
    ids = SlotIds()
    a, b = id_digest("a"), id_digest("b")
    assert list(ids.admit(7, [(a, "a1"), (b, "b1"), (a, "a2")])) == ["a1", "b1"]
    assert list(ids.admit(7, [(a, "a3")])) == []


def test_a_newer_slot_recycles_the_entry_and_older_slots_pass_unchecked() -> None:
    ids = SlotIds()
    a = id_digest("a")
    list(ids.admit(7, [(a, "old")]))
    newer = 7 + RING_SLOTS
    assert list(ids.admit(newer, [(a, "new")])) == ["new"]  # a different event: new slot
    assert ids.slot == newer and ids.seen == {a}
    # A straggler of the recycled slot has nothing left to be checked against.
    assert list(ids.admit(7, [(a, "x"), (a, "y")])) == ["x", "y"]


def test_ring_keys_are_fixed_and_stable() -> None:
    assert id_digest("event-1") == 0x1D4103BFFB51791D  # BLAKE2b-64, same in every process
    assert dedup_key(7, 35, 16) == "7:3"
    assert dedup_key(7 + RING_SLOTS, 35, 16) == "7:3"
    assert RING_SLOTS * SLOT_MS == 3 * HORIZON_MS  # 24 h horizon + 48 h partition skew


def test_snapshot_round_trip_is_detached() -> None:
    ids = SlotIds()
    list(ids.admit(3, [(1, "x")]))
    blob = ids.snapshot()
    list(ids.admit(3, [(2, "y")]))
    restored = SlotIds.restore(blob)
    assert (restored.slot, restored.seen) == (3, {1})
