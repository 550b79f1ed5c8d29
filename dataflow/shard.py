"""One state shard: many feature keys, their counters and the shard's copy of the clock.

Keys are grouped into a fixed number of shards (`FEATURE_SHARDS`) by a stable hash, and
each shard is one Bytewax key. Time-driven work (re-stating every key when the clock enters
a new day, deleting keys whose 30 days are empty) then needs no per-key timer: the shard
does it when its clock moves. See docs/architecture.md for the trade-offs.

Pure: the clock is whatever the inputs say it is.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

from dataflow.counters import KeyState, add, prune
from dataflow.families import LAYOUTS, FeatureParams, Fields, Update, family_of, fields_for
from dataflow.windows import DAY_MS, RETENTION_DAYS

Write = tuple[str, Fields | None]
"""(key suffix, fields to HSET) or (key suffix, None) to DEL."""

ShardItem = int | list[Update]
"""A clock reading (epoch ms) or a batch of counter updates."""


@dataclass(slots=True)
class StepResult:
    writes: list[Write] = field(default_factory=list)
    late_updates: int = 0
    new_day: bool = False


class FeatureShard:
    """The counters of the keys in one shard, and what to write when they change."""

    __slots__ = ("clock", "keys", "params")

    def __init__(self, params: FeatureParams, clock: int = 0, keys: dict[str, KeyState] | None = None):
        self.params = params
        self.clock = clock
        self.keys: dict[str, KeyState] = {} if keys is None else keys

    # Recovery: Bytewax pickles snapshots *after* the logic may already have processed the
    # next epoch, so a snapshot must not share mutable objects with the live state. Pickling
    # here costs what Bytewax would spend anyway, and returns immutable bytes.
    def snapshot(self) -> bytes:
        return pickle.dumps((self.clock, self.keys), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, params: FeatureParams, blob: bytes) -> FeatureShard:
        clock, keys = pickle.loads(blob)  # noqa: S301 - our own recovery snapshot
        return cls(params, clock, keys)

    def step(self, items: list[ShardItem]) -> StepResult:
        """Apply clock readings and update batches in order; return the writes to make.

        Each touched key is written once, with its values after the whole step. When the
        clock enters a new day, every key is re-stated (or deleted once its 30 days are
        empty), which keeps each value a pure function of the events and the clock's day.
        """
        result = StepResult()
        start_day = self.clock // DAY_MS
        clock = self.clock
        late_before = (clock // DAY_MS) - RETENTION_DAYS  # a day <= this is late
        touched: dict[str, int] = {}
        keys = self.keys
        for item in items:
            if isinstance(item, int):
                if item > clock:
                    clock = item
                    late_before = clock // DAY_MS - RETENTION_DAYS
                continue
            for family, suffix, ts, counts in item:
                if ts > clock:
                    clock = ts
                    late_before = clock // DAY_MS - RETENTION_DAYS
                if ts // DAY_MS <= late_before:
                    result.late_updates += 1
                    continue
                state = keys.get(suffix)
                if state is None:
                    keys[suffix] = add(None, LAYOUTS[family], ts, counts)
                else:
                    add(state, LAYOUTS[family], ts, counts)
                touched[suffix] = family
        self.clock = clock
        day = clock // DAY_MS
        day_start = day * DAY_MS
        if day != start_day:
            result.new_day = True
            result.writes = self._restate_all(day, day_start)
        else:
            params = self.params
            result.writes = [
                (suffix, fields_for(family, keys[suffix], max(keys[suffix][0], day_start), params))
                for suffix, family in touched.items()
            ]
        return result

    def _restate_all(self, day: int, day_start: int) -> list[Write]:
        first_kept = day - RETENTION_DAYS + 1
        writes: list[Write] = []
        expired: list[str] = []
        params = self.params
        for suffix, state in self.keys.items():
            family = family_of(suffix)
            if prune(state, LAYOUTS[family], first_kept):
                expired.append(suffix)
                writes.append((suffix, None))
            else:
                writes.append((suffix, fields_for(family, state, max(state[0], day_start), params)))
        for suffix in expired:
            del self.keys[suffix]
        return writes

    def __len__(self) -> int:
        return len(self.keys)
