"""Per-key daily counters with forward-decayed weights, in one flat array of int64 per key.

A key's state is `[max_ts, day, c_0 .. c_{n-1}, w_0 .. w_{m-1}, day, c_0 ..., ...]`: the
newest event time it holds, then one fixed-width record per occupied UTC day in
ascending day order, with `n` counts and `m` fixed-point forward-decay sums
(`windows.forward_weight`). An `array('q')` is one object per key holding its numbers
unboxed: no int objects, nothing for the cyclic garbage collector to walk, and its bytes
are what a snapshot stores (`to_bytes`, `from_bytes`).

A day's decayed sum grows by under 2^32.2 per event, so an int64 holds about 2 billion
events of one key on one day; beyond that an update raises `OverflowError` rather than
wrap.

Everything is exact integer arithmetic, so the state is the same whatever order the
updates came in; see docs/architecture.md.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from math import exp2
from typing import TypeAlias

from dataflow.core.windows import (
    DAY_MS,
    HALF_LIFE_MS,
    WEIGHT_SCALE,
    WINDOW_7D,
    WINDOW_30D,
    forward_weight,
)

KeyState: TypeAlias = "array[int]"
"""`array("q")`: int64 items."""


def to_bytes(state: KeyState) -> bytes:
    """The state as a snapshot stores it (machine-independent: little-endian int64)."""
    return state.tobytes() if _LITTLE_ENDIAN else _swapped(state).tobytes()


def from_bytes(blob: bytes) -> KeyState:
    state = array("q")
    state.frombytes(blob)
    return state if _LITTLE_ENDIAN else _swapped(state)


def _swapped(state: KeyState) -> KeyState:
    copy = array("q", state)
    copy.byteswap()
    return copy


_LITTLE_ENDIAN = array("q", [1]).tobytes()[0] == 1

_LENGTH = struct.Struct("<I")


def pack_states(keys: dict[str, KeyState]) -> bytes:
    """Every key's state in one buffer, as a snapshot stores them (layout 5): per key, in
    the dict's order, the suffix's UTF-8 length, its UTF-8, the state's item count and its
    items, each a LEB128 varint, the items zigzag-encoded first. A day's counts take a byte
    or two, a time stamp six: 40 to 50 bytes per key where int64 items took 95, and a
    snapshot's cost is mostly the bytes its store writes. One buffer instead of a bytes
    object per key: a pickle of a dict of millions of bytes objects costs more than the
    states themselves. (The compiled core writes the same bytes: `dataflow.core.native`.)"""
    out = bytearray()
    put = _put_varint
    for suffix, state in keys.items():
        name = suffix.encode("utf-8")
        put(out, len(name))
        out += name
        put(out, len(state))
        for item in state:
            put(out, item << 1 if item >= 0 else ((-item) << 1) - 1)
    return bytes(out)


def unpack_states(blob: bytes) -> dict[str, KeyState]:
    """The inverse of `pack_states`; `ValueError` for a buffer that is not one."""
    keys: dict[str, KeyState] = {}
    get = _get_varint
    at, end = 0, len(blob)
    while at < end:
        size, at = get(blob, at)
        if end - at < size:
            raise ValueError("a truncated key-state buffer")
        suffix = str(blob[at : at + size], "utf-8")
        count, at = get(blob, at + size)
        if end - at < count:  # every item takes a byte at least
            raise ValueError("a truncated key-state buffer")
        state = array("q", [0]) * count
        for i in range(count):
            z, at = get(blob, at)
            state[i] = -(z >> 1) - 1 if z & 1 else z >> 1
        keys[suffix] = state
    return keys


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(blob: bytes, at: int) -> tuple[int, int]:
    """The unsigned varint at `at` (at most 64 bits: ten bytes, the last 0 or 1), and the
    position after it."""
    value = shift = 0
    end = len(blob)
    while True:
        if at >= end:
            raise ValueError("a truncated key-state buffer")
        byte = blob[at]
        at += 1
        if shift == 63 and byte > 1:
            raise ValueError("a malformed key-state buffer (a varint past 64 bits)")
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def unpack_states_layout_4(blob: bytes) -> dict[str, KeyState]:
    """The key states of a layout-4 snapshot: per key, the suffix's UTF-8 length (uint32 LE),
    its UTF-8, the item count (uint32 LE) and the items (`to_bytes`)."""
    keys: dict[str, KeyState] = {}
    view = memoryview(blob)
    unpack = _LENGTH.unpack_from
    at, end = 0, len(blob)
    while at < end:
        size = unpack(blob, at)[0] if end - at >= 4 else end
        if end - at - 4 < size + 4:
            raise ValueError("a truncated key-state buffer")
        suffix = str(view[at + 4 : at + 4 + size], "utf-8")
        at += 4 + size
        (count,) = unpack(blob, at)
        at += 4
        if (end - at) // 8 < count:
            raise ValueError("a truncated key-state buffer")
        keys[suffix] = from_bytes(view[at : at + 8 * count].tobytes())
        at += 8 * count
    return keys


@dataclass(frozen=True, slots=True)
class Layout:
    """How many counts a family keeps per day, and which of them also get a decayed sum."""

    counts: int
    decayed: tuple[int, ...] = ()
    width: int = field(init=False)
    """Ints per day record: the day, the counts, the decayed sums (precomputed: hot path)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", 1 + self.counts + len(self.decayed))


@dataclass(slots=True)
class Totals:
    """Window sums of one key at one `as_of`."""

    last_7d: list[int]
    last_30d: list[int]
    decayed: list[float]


def add(state: KeyState | None, layout: Layout, ts: int, counts: tuple[int, ...]) -> KeyState:
    """Add one event's counts at `ts`; returns the (possibly new) state."""
    day = ts // 86_400_000
    width = layout.width
    if state is None:
        fresh = [ts, day, *counts]
        if layout.decayed:
            weight = forward_weight(ts)
            fresh.extend(counts[i] * weight for i in layout.decayed)
        return array("q", fresh)

    state[0] = max(state[0], ts)
    # Search from the newest day: almost every update lands on one of the last few days.
    pos = len(state) - width
    while pos >= 1 and state[pos] > day:
        pos -= width
    if pos >= 1 and state[pos] == day:
        # Most counts of an update are zero (an impression, or a click): touch only the rest.
        pos += 1
        for i, n in enumerate(counts):
            if n:
                state[pos + i] += n
        decayed = layout.decayed
        if decayed:
            weight = 0
            base = pos + layout.counts
            for j, i in enumerate(decayed):
                n = counts[i]
                if n:
                    weight = weight or forward_weight(ts)
                    state[base + j] += n * weight
        return state

    record = array("q", [day, *counts])
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
    """Window sums at `as_of` (whose day is `as_of_day`), and the decayed sums.

    The decayed sums are added in ascending day order, exactly as `windows.decayed_sum`
    does, so the result is the same bits (this is the hot path of every write).
    """
    if layout.counts == 4 and len(layout.decayed) == 2:
        return _totals_4_2(state, as_of_day, as_of_ms)
    return _totals(state, layout, as_of_day, as_of_ms)


def _totals(state: KeyState, layout: Layout, as_of_day: int, as_of_ms: int) -> Totals:
    width = layout.width
    n = layout.counts
    m = len(layout.decayed)
    last_7d = [0] * n
    last_30d = [0] * n
    decayed = [0.0] * m
    first_30d = as_of_day - WINDOW_30D
    first_7d = as_of_day - WINDOW_7D
    for pos in range(1, len(state), width):
        day = state[pos]
        if day <= first_30d or day > as_of_day:
            continue
        base = pos + 1
        if day > first_7d:
            for i in range(n):
                value = state[base + i]
                last_30d[i] += value
                last_7d[i] += value
        else:
            for i in range(n):
                last_30d[i] += state[base + i]
        if m:
            factor = exp2(-(as_of_ms - day * DAY_MS) / HALF_LIFE_MS) / WEIGHT_SCALE
            for j in range(m):
                weight_sum = state[base + n + j]
                if weight_sum:
                    decayed[j] += weight_sum * factor
    return Totals(last_7d, last_30d, decayed)


def _totals_4_2(state: KeyState, as_of_day: int, as_of_ms: int) -> Totals:
    """`totals` unrolled for the document and query-document layout (4 counts, 2 decayed):
    the same additions in the same order, so the same bits, in about half the time."""
    a7 = b7 = c7 = e7 = a30 = b30 = c30 = e30 = 0
    d0 = d1 = 0.0
    first_30d = as_of_day - WINDOW_30D
    first_7d = as_of_day - WINDOW_7D
    for pos in range(1, len(state), 7):
        day = state[pos]
        if day <= first_30d or day > as_of_day:
            continue
        a, b, c, e, w0, w1 = state[pos + 1 : pos + 7]
        a30 += a
        b30 += b
        c30 += c
        e30 += e
        if day > first_7d:
            a7 += a
            b7 += b
            c7 += c
            e7 += e
        if w0 or w1:
            factor = exp2(-(as_of_ms - day * DAY_MS) / HALF_LIFE_MS) / WEIGHT_SCALE
            if w0:
                d0 += w0 * factor
            if w1:
                d1 += w1 * factor
    return Totals([a7, b7, c7, e7], [a30, b30, c30, e30], [d0, d1])
