"""Daily counters and decay against a brute-force sum over the raw events."""

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from dataflow.core.counters import (
    KeyState,
    Layout,
    _totals,
    add,
    from_bytes,
    prune,
    to_bytes,
    totals,
)
from dataflow.core.windows import DAY_MS, HALF_LIFE_MS, decay_factor, decayed_sum, forward_weight

LAYOUT = Layout(counts=3, decayed=(0, 1))
BASE = 20_000 * DAY_MS

events_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=40 * DAY_MS),  # offset from BASE
        st.sampled_from([(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]),
    ),
    min_size=1,
    max_size=60,
)


def build(events: list[tuple[int, tuple[int, int, int]]]) -> KeyState:
    state = None
    for offset, counts in events:
        state = add(state, LAYOUT, BASE + offset, counts)
    assert state is not None
    return state


@given(events_strategy, st.integers(min_value=0, max_value=45 * DAY_MS))
def test_totals_match_brute_force(
    events: list[tuple[int, tuple[int, int, int]]], extra: int
) -> None:
    state = build(events)
    as_of = max(BASE + o for o, _ in events) + extra
    day = as_of // DAY_MS
    got = totals(state, LAYOUT, day, as_of)
    for i in range(3):
        assert got.last_7d[i] == sum(
            c[i] for o, c in events if day - 7 < (BASE + o) // DAY_MS <= day
        )
        assert got.last_30d[i] == sum(
            c[i] for o, c in events if day - 30 < (BASE + o) // DAY_MS <= day
        )
    for j, i in enumerate(LAYOUT.decayed):
        exact = math.fsum(
            c[i] * 2 ** (-(as_of - BASE - o) / HALF_LIFE_MS)
            for o, c in events
            if day - 30 < (BASE + o) // DAY_MS <= day
        )
        assert math.isclose(got.decayed[j], exact, rel_tol=1e-9, abs_tol=1e-12)


@given(events_strategy, st.randoms(use_true_random=False))
def test_state_is_independent_of_arrival_order(
    events: list[tuple[int, tuple[int, int, int]]], rnd: random.Random
) -> None:
    shuffled = list(events)
    rnd.shuffle(shuffled)
    assert build(events) == build(shuffled)


def test_days_are_sorted_records() -> None:
    state = build([(5 * DAY_MS, (1, 0, 0)), (1 * DAY_MS, (0, 1, 0)), (3 * DAY_MS, (1, 0, 0))])
    days = list(state[1 :: LAYOUT.width])
    assert days == sorted(days)
    assert state[0] == BASE + 5 * DAY_MS  # newest ts first


def test_prune_drops_old_days_and_reports_empty() -> None:
    state = build([(0, (1, 0, 0)), (10 * DAY_MS, (0, 1, 0))])
    first_day = BASE // DAY_MS
    assert prune(state, LAYOUT, first_day + 5) is False
    assert list(state[1 :: LAYOUT.width]) == [first_day + 10]
    assert prune(state, LAYOUT, first_day + 11) is True


def test_forward_weight_range_and_decay_half_life() -> None:
    assert forward_weight(BASE) == 1 << 32
    assert (1 << 32) <= forward_weight(BASE + DAY_MS - 1) < int((1 << 32) * 2 ** (1 / 7)) + 1
    assert math.isclose(decay_factor(0, HALF_LIFE_MS), 0.5)
    state = add(None, LAYOUT, BASE, (1, 0, 0))
    got = totals(state, LAYOUT, (BASE + HALF_LIFE_MS) // DAY_MS, BASE + HALF_LIFE_MS)
    assert math.isclose(got.decayed[0], 0.5, rel_tol=1e-9)


@given(events_strategy, st.integers(min_value=0, max_value=45 * DAY_MS))
def test_decayed_sums_are_the_per_day_formula_bit_for_bit(
    events: list[tuple[int, tuple[int, int, int]]], extra: int
) -> None:
    """The hot-path loop adds the same terms in the same order as `windows.decayed_sum`."""
    state = build(events)
    as_of = max(BASE + o for o, _ in events) + extra
    day = as_of // DAY_MS
    got = totals(state, LAYOUT, day, as_of)
    records = [p for p in range(1, len(state), LAYOUT.width) if day - 30 < state[p] <= day]
    for j in range(2):
        pairs = [(state[p], state[p + 4 + j]) for p in records]
        assert got.decayed[j] == decayed_sum(pairs, as_of)


@given(events_strategy)
def test_a_state_round_trips_through_its_snapshot_bytes(
    events: list[tuple[int, tuple[int, int, int]]],
) -> None:
    state = build(events)
    blob = to_bytes(state)
    assert len(blob) == 8 * len(state)
    assert from_bytes(blob) == state


@given(events_strategy, st.integers(min_value=0, max_value=45 * DAY_MS))
def test_the_unrolled_document_layout_gives_the_same_bits_as_the_general_loop(
    events: list[tuple[int, tuple[int, int, int]]], extra: int
) -> None:
    doc = Layout(counts=4, decayed=(0, 1))
    state = None
    for offset, (a, b, c) in events:
        state = add(state, doc, BASE + offset, (a, b, c, a * 1_288_490_189))
    assert state is not None
    as_of = max(BASE + o for o, _ in events) + extra
    assert totals(state, doc, as_of // DAY_MS, as_of) == _totals(state, doc, as_of // DAY_MS, as_of)
