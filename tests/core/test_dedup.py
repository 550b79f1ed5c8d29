"""Dedup: first copy wins, the 24-hour horizon by each partition's clock, the watermark that
forgets, and the same result for any batching, interleaving and restart point."""

from __future__ import annotations

import pickle
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.core.dedup import (
    HORIZON_MS,
    RING_SLOTS,
    SLOT_MS,
    DedupEntry,
    Forget,
    Watermark,
    dedup_key,
    entry_key,
    id_digest,
    last_forgotten_slot,
    slot_of,
)
from dataflow.errors import RecoveryFormatError

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 20_000 * DAY


def test_slot_is_past_the_horizon_only_once_the_clock_passes_24h_after_its_end() -> None:
    slot = 1000
    end = (slot + 1) * SLOT_MS
    assert last_forgotten_slot(end + HORIZON_MS) < slot  # exactly 24 h: still checked
    assert last_forgotten_slot(end + HORIZON_MS + 1) == slot


def test_first_copy_wins_within_a_slot() -> None:
    entry = DedupEntry()
    a, b = id_digest("a"), id_digest("b")
    assert list(entry.admit(7, [(a, "a1"), (b, "b1"), (a, "a2")])) == ["a1", "b1"]
    assert list(entry.admit(7, [(a, "a3")])) == []


def test_an_entry_holds_every_slot_the_watermark_has_not_passed() -> None:
    # Two slots of one ring position (72 h apart, as a backfill reads them within seconds):
    # both stay checked until the watermark passes the older one.
    entry = DedupEntry()
    a = id_digest("a")
    newer = 7 + RING_SLOTS
    assert list(entry.admit(7, [(a, "old")])) == ["old"]
    assert list(entry.admit(newer, [(a, "new")])) == ["new"]  # another event: another slot
    assert list(entry.admit(7, [(a, "copy")])) == []  # the old slot is still checked
    entry.forget(Forget(7, frozenset({0})))
    assert list(entry.admit(7, [(a, "copy")])) == []  # forgets wait for the epoch's close
    entry.close_epoch()
    assert set(entry.slots) == {newer}
    assert entry.held() == 1


def test_a_slot_checked_by_a_partition_the_watermark_did_not_know_is_kept() -> None:
    entry = DedupEntry()
    list(entry.admit(7, [(1, "x")], origin=1))
    entry.forget(Forget(7, frozenset({2})))  # computed before partition 1 was read
    entry.close_epoch()
    assert list(entry.admit(7, [(1, "copy")], origin=1)) == []
    entry.forget(Forget(7 + RING_SLOTS, frozenset({1, 2})))
    entry.close_epoch()
    assert entry.held() == 0


def test_a_check_of_a_forgotten_slot_is_counted_and_starts_it_afresh() -> None:
    entry = DedupEntry()
    list(entry.admit(7, [(1, "x")]))
    entry.forget(Forget(7, frozenset({0})))
    entry.close_epoch()
    assert list(entry.admit(7, [(1, "x again"), (1, "copy")])) == ["x again"]
    assert entry.unheld == 1


def test_ring_keys_are_fixed_and_stable() -> None:
    assert id_digest("event-1") == 0x1D4103BFFB51791D  # BLAKE2b-64, same in every process
    assert dedup_key(7, 35, 16) == "7:3" == entry_key(7, 3)
    assert dedup_key(7 + RING_SLOTS, 35, 16) == "7:3"


def test_snapshot_round_trip_is_detached_and_applies_pending_forgets() -> None:
    entry = DedupEntry()
    list(entry.admit(3, [(1, "x")]))
    list(entry.admit(4, [(1, "x")]))
    entry.forget(Forget(3, frozenset({0})))
    blob = entry.snapshot()
    list(entry.admit(4, [(2, "y")]))
    restored = DedupEntry.restore(blob)
    assert restored.slots == {4: {1}}
    assert restored.forgotten == 3


def test_a_snapshot_of_the_previous_layout_names_the_way_forward() -> None:
    old = pickle.dumps((3, {1, 2}))  # (slot, seen): the ring entry before the watermark
    with pytest.raises(RecoveryFormatError, match=r"'dedup'.*version none.*dataflow.tools.replay"):
        DedupEntry.restore(old)
    with pytest.raises(RecoveryFormatError, match="'dedup_watermark'"):
        Watermark.restore(DedupEntry().snapshot())


def test_the_watermark_is_the_slowest_partition_and_forgets_only_past_it() -> None:
    mark = Watermark()
    first = mark.advance([(1, T0), (2, T0)], shards=2)  # every ring position, once
    assert len(first) == RING_SLOTS * 2
    assert max(f.slot for _, f in first) == last_forgotten_slot(T0)
    fast = T0 + 5 * DAY
    assert mark.advance([(1, fast)], shards=2) == []  # partition 2 still reads at T0
    forgets = mark.advance([(2, T0 + DAY + 2 * SLOT_MS)], shards=2)
    newest = last_forgotten_slot(T0 + DAY + 2 * SLOT_MS)
    known = frozenset({1, 2})
    assert forgets[-2:] == [
        (entry_key(newest, 0), Forget(newest, known)),
        (entry_key(newest, 1), Forget(newest, known)),
    ]
    assert {f.slot for _, f in forgets} == set(range(last_forgotten_slot(T0) + 1, newest + 1))
    # A jump of days names each ring position once, with its newest slot.
    jump = mark.advance([(2, fast)], shards=1)
    assert len(jump) == RING_SLOTS
    assert len({key for key, _ in jump}) == RING_SLOTS


def test_a_partition_seen_late_pulls_the_watermark_back_without_new_forgets() -> None:
    mark = Watermark()
    mark.advance([(1, T0)], shards=1)
    assert mark.advance([(1, T0 + 2 * DAY)], shards=1)
    assert mark.advance([(3, T0 - DAY)], shards=1) == []
    assert mark.value == T0 - DAY


# --- the whole decision, against any arrival pattern --------------------------------------

Message = tuple[str, int]
"""(event id, ts)."""


class Engine:
    """Intake's dedup decisions and the dedup step's state, driven the way Bytewax drives
    them: partition clocks per partition (snapshotted with the offsets), ring entries,
    the watermark, forgets applied when an epoch closes, restarts from the last close."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.clocks: dict[int, int] = {}
        self.entries: dict[str, DedupEntry] = {}
        self.mark = Watermark()
        self.accepted: list[tuple[int, int]] = []  # (partition, position)
        self.offsets: dict[int, int] = {}

    def read(self, partition: int, batch: list[tuple[int, Message]]) -> None:
        clock = self.clocks.get(partition, 0)
        checked: dict[tuple[str, int], list[tuple[int, tuple[int, int]]]] = {}
        for position, (event_id, ts) in batch:
            clock = max(clock, ts)
            slot = slot_of(ts)
            if slot <= last_forgotten_slot(clock):
                self.accepted.append((partition, position))  # past the horizon: unchecked
                continue
            digest = id_digest(event_id)
            checked.setdefault((dedup_key(slot, digest, self.shards), slot), []).append(
                (digest, (partition, position))
            )
            self.offsets[partition] = position + 1
        self.clocks[partition] = clock
        self.offsets[partition] = batch[-1][0] + 1
        items = list(checked.items())
        random.Random(len(self.accepted)).shuffle(items)  # entries run in any order
        for (key, slot), pairs in items:
            entry = self.entries.setdefault(key, DedupEntry())
            self.accepted.extend(entry.admit(slot, pairs, partition))
        for key, forget in self.mark.advance([(partition, clock)], self.shards):
            self.entries.setdefault(key, DedupEntry()).forget(forget)

    def close_epoch(self) -> bytes:
        return pickle.dumps(
            (
                dict(self.clocks),
                {k: e.snapshot() for k, e in self.entries.items()},
                self.mark.snapshot(),
                list(self.accepted),
                dict(self.offsets),
            )
        )

    def restore(self, blob: bytes) -> None:
        clocks, entries, mark, accepted, offsets = pickle.loads(blob)  # noqa: S301
        self.clocks, self.accepted, self.offsets = clocks, accepted, offsets
        self.entries = {k: DedupEntry.restore(v) for k, v in entries.items()}
        self.mark = Watermark.restore(mark)


def run(
    sequences: list[list[Message]], rnd: random.Random, shards: int
) -> Counter[tuple[int, int]]:
    engine = Engine(shards)
    saved = engine.close_epoch()
    while True:
        live = [p for p, seq in enumerate(sequences) if engine.offsets.get(p, 0) < len(seq)]
        if not live:
            break
        partition = rnd.choice(live)
        start = engine.offsets.get(partition, 0)
        size = rnd.choice([1, 2, 5, 50, 1000])
        batch = list(enumerate(sequences[partition]))[start : start + size]
        engine.read(partition, batch)
        if rnd.random() < 0.3:
            saved = engine.close_epoch()
        if rnd.random() < 0.1:
            engine.restore(saved)  # a crash: back to the last epoch's close
    engine.close_epoch()
    return Counter(engine.accepted)


def model(sequences: list[list[Message]]) -> Counter[tuple[int, int]]:
    """Brute force, for copies within one partition: a message is a duplicate when an
    earlier message of its partition has the same id and its partition's clock has not
    passed the id's slot by more than 24 hours."""
    out: Counter[tuple[int, int]] = Counter()
    for p, seq in enumerate(sequences):
        clock = 0
        seen: set[tuple[str, int]] = set()
        for position, (event_id, ts) in enumerate(seq):
            clock = max(clock, ts)
            slot = slot_of(ts)
            if slot <= last_forgotten_slot(clock):
                out[p, position] += 1
            elif (event_id, slot) not in seen:
                seen.add((event_id, slot))
                out[p, position] += 1
    return out


@st.composite
def streams(draw: st.DrawFn) -> list[list[Message]]:
    """Partitions that read sparse or dense histories, some days apart, with copies re-sent
    a few messages later (a producer retry) or much later."""
    partitions = draw(st.integers(1, 4))
    out = []
    for p in range(partitions):
        start = T0 + draw(st.integers(0, 20)) * DAY  # partitions days apart
        gap = draw(st.sampled_from([1_000, 60_000, HOUR, 6 * HOUR, DAY]))  # dense .. sparse
        n = draw(st.integers(1, 60))
        seq: list[Message] = []
        ts = start
        for i in range(n):
            ts += draw(st.integers(0, gap))
            seq.append((f"p{p}-e{i}", ts))
        for _ in range(draw(st.integers(0, n))):
            i = draw(st.integers(0, n - 1))
            at = draw(st.integers(i + 1, len(seq)))
            seq.insert(at, seq[i])  # a copy, somewhere later in the same partition
        out.append(seq)
    return out


@settings(max_examples=300)
@given(streams(), st.randoms(use_true_random=False), st.integers(1, 4))
def test_any_batching_interleaving_and_restart_gives_the_model(
    sequences: list[list[Message]], rnd: random.Random, shards: int
) -> None:
    assert run(sequences, rnd, shards) == model(sequences)


def test_a_sparse_backfill_batch_spanning_weeks_drops_every_copy() -> None:
    # The shape that leaked through the fixed 72-hour ring: one 1000-message batch covers
    # 20 days, and copies of each event follow it within a few messages.
    rnd = random.Random(7)
    seq: list[Message] = []
    for i in range(700):
        seq.append((f"e{i}", T0 + i * 41 * 60_000))
        if rnd.random() < 0.4:
            seq.append(seq[rnd.randint(max(0, len(seq) - 30), len(seq) - 1)])
    other = [(f"b-{event_id}", ts) for event_id, ts in seq[::2]]
    got = run([seq, other], random.Random(1), 4)
    assert got == model([seq, other])


def test_partitions_read_days_apart_hold_ids_until_the_slowest_passes() -> None:
    fast = [(f"f{i}", T0 + i * HOUR) for i in range(24 * 10)]  # ten days, hourly
    slow = [(f"s{i}", T0 + i * HOUR) for i in range(5)]
    engine = Engine(shards=1)
    engine.read(1, list(enumerate(slow)))
    engine.read(0, list(enumerate(fast)))
    engine.close_epoch()
    held = sum(e.held() for e in engine.entries.values())
    assert held == len(fast) + len(slow)  # nothing forgotten: partition 1 is ten days behind
    engine.read(1, [(5, ("late", T0 + 10 * DAY))])
    engine.close_epoch()
    assert sum(e.held() for e in engine.entries.values()) < 24 * 2 + 5
