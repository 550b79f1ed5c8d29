"""Per-key daily counters with forward-decayed weights, in one flat list of ints per key.

A key's state is `[max_ts, day, c_0 .. c_{n-1}, w_0 .. w_{m-1}, day, c_0 ..., ...]`: the
newest event time it holds, then one fixed-width record per occupied UTC day in
ascending day order, with `n` counts and `m` fixed-point forward-decay sums
(`windows.forward_weight`). A flat list of small ints is the most compact plain-Python
layout (one object per key, no per-day objects) and pickles fast for snapshots.

Everything is exact integer arithmetic, so the state is the same whatever order the
updates came in; see docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataflow.windows import WINDOW_7D, WINDOW_30D, decayed_sum, forward_weight

KeyState = list[int]


@dataclass(frozen=True, slots=True)
class Layout:
    """How many counts a family keeps per day, and which of them also get a decayed sum."""

    counts: int
    decayed: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return 1 + self.counts + len(self.decayed)


@dataclass(slots=True)
class Totals:
    """Window sums of one key at one `as_of`."""

    last_7d: list[int]
    last_30d: list[int]
    decayed: list[float]


def add(state: KeyState | None, layout: Layout, ts: int, counts: tuple[int, ...]) -> KeyState:
    """Add one event's counts at `ts`; returns the (possibly new) state list."""
    day = ts // 86_400_000
    width = layout.width
    if state is None:
        record = [day, *counts]
        if layout.decayed:
            weight = forward_weight(ts)
            record.extend(counts[i] * weight for i in layout.decayed)
        return [ts, *record]

    state[0] = max(state[0], ts)
    # Search from the newest day: almost every update lands on one of the last few days.
    pos = len(state) - width
    while pos >= 1 and state[pos] > day:
        pos -= width
    if pos >= 1 and state[pos] == day:
        for i in range(layout.counts):
            state[pos + 1 + i] += counts[i]
        if layout.decayed:
            weight = forward_weight(ts)
            base = pos + 1 + layout.counts
            for j, i in enumerate(layout.decayed):
                state[base + j] += counts[i] * weight
        return state

    record = [day, *counts]
    if layout.decayed:
        weight = forward_weight(ts)
        record.extend(counts[i] * weight for i in layout.decayed)
    insert_at = pos + width if pos >= 1 else 1
    state[insert_at:insert_at] = record
    return state


def prune(state: KeyState, layout: Layout, first_kept_day: int) -> bool:
    """Drop the days before `first_kept_day`; True when nothing is left (delete the key)."""
    width = layout.width
    pos = 1
    while pos < len(state) and state[pos] < first_kept_day:
        pos += width
    if pos > 1:
        del state[1:pos]
    return len(state) == 1


def totals(state: KeyState, layout: Layout, as_of_day: int, as_of_ms: int) -> Totals:
    """Window sums at `as_of` (whose day is `as_of_day`), and the decayed sums."""
    width = layout.width
    n = layout.counts
    last_7d = [0] * n
    last_30d = [0] * n
    decayed_pairs: list[list[tuple[int, int]]] = [[] for _ in layout.decayed]
    for pos in range(1, len(state), width):
        day = state[pos]
        age = as_of_day - day
        if age < 0 or age >= WINDOW_30D:
            continue
        for i in range(n):
            last_30d[i] += state[pos + 1 + i]
        if age < WINDOW_7D:
            for i in range(n):
                last_7d[i] += state[pos + 1 + i]
        for j in range(len(layout.decayed)):
            decayed_pairs[j].append((day, state[pos + 1 + n + j]))
    return Totals(last_7d, last_30d, [decayed_sum(p, as_of_ms) for p in decayed_pairs])
