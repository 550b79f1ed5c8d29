"""Event-time buckets, windows and forward decay: the time maths of contract §3.

Time is always passed in (epoch milliseconds); nothing here reads a clock.
"""

from __future__ import annotations

import math

DAY_MS = 86_400_000
"""A bucket is one UTC day."""

WINDOW_7D = 7
WINDOW_30D = 30
RETENTION_DAYS = WINDOW_30D
"""State holds the buckets of the longest window; anything older is late."""

HALF_LIFE_MS = 7 * DAY_MS
"""Half-life of the decayed sums."""

WEIGHT_SCALE_BITS = 32
"""Decay weights are fixed-point integers with this many fractional bits, so per-day sums
are exact and independent of the order events arrive in (float addition is not)."""

WEIGHT_SCALE = float(1 << WEIGHT_SCALE_BITS)


def bucket(ts_ms: int) -> int:
    """The UTC day number of an epoch-millisecond timestamp."""
    return ts_ms // DAY_MS


def day_start(day: int) -> int:
    """Epoch milliseconds at the start of UTC day `day`."""
    return day * DAY_MS


def in_window(event_day: int, as_of_day: int, days: int) -> bool:
    """Whether a bucket lies in the `days`-day window `(as_of_day - days, as_of_day]`."""
    return as_of_day - days < event_day <= as_of_day


def is_late(event_day: int, clock_day: int) -> bool:
    """An update that can never again be inside the 30-day window of the clock."""
    return event_day <= clock_day - RETENTION_DAYS


def forward_weight(ts_ms: int) -> int:
    """Fixed-point `2^((ts - day_start)/H)`: the event's weight relative to its own day.

    In [2^32, 2^32 · 2^(1/7)), so a day's sum stays small and exact as a Python int.
    """
    offset = ts_ms - (ts_ms // DAY_MS) * DAY_MS
    return round(math.exp2(offset / HALF_LIFE_MS) * WEIGHT_SCALE)


def decayed_sum(day_weights: list[tuple[int, int]], as_of_ms: int) -> float:
    """`Σ 2^(-(as_of - ts)/H)` from per-day fixed-point forward sums.

    `day_weights` holds `(day, Σ forward_weight(ts))` pairs in ascending day order; the
    result is the same bit pattern for the same pairs, whatever order the events came in.
    """
    total = 0.0
    for day, weight_sum in day_weights:
        if weight_sum:
            age = as_of_ms - day * DAY_MS
            total += weight_sum * (math.exp2(-age / HALF_LIFE_MS) / WEIGHT_SCALE)
    return total


def decay_factor(from_ms: int, to_ms: int) -> float:
    """Multiplier that brings a decayed sum computed at `from_ms` to `to_ms`."""
    return math.exp2(-(to_ms - from_ms) / HALF_LIFE_MS)
