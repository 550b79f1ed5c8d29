"""The Bytewax dataflow, top to bottom as it runs.

```
kafka_in: decode and route where each partition is read (partition clocks in its snapshot)
 ├─ dead letters ───────────────────────────────────────────────────────► dlq (Kafka)
 ├─ partition clocks ─┬─► clock ─► day ticks ───────────────────────────────┐
 │                    └─► dedup_watermark ─► forgets ─┐                     │
 ├─ events to check ──────────────────────────────────┴─► dedup ─┐          │
 └─ events past the dedup horizon ───────────────────────────────┴─► accepted
accepted ─┬─► fan_out ─► counter updates ─┬──────────────────────► features ─┬─► redis
          │                                └─► prior_fit ─► priors ─►  (fitted) └─► opensearch
          │             partition clocks ─────► prior_fit   └─► P:prior:{family} ─► redis
          └─► link_route ─┬─► aclink (join by session) ─► increments ─► features
                          ├─► selects without a session ──────────────► features
                          └─► candidate labels ───────────────────────► features
```

`python -m bytewax.run dataflow.flow` finds `flow` here, built from the environment
(`Config.from_env()`); tests call `build_flow(config, source=...)` with their own source.
The logic lives in `dataflow.core`; the classes here only adapt it to Bytewax's stateful
operators and report metrics. Each stage is a function returning its named streams.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import DynamicSource, Source, StatelessSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink
from confluent_kafka import OFFSET_BEGINNING

from dataflow import metrics
from dataflow.config import Config
from dataflow.core import aclink, keys, native, snapshots
from dataflow.core.aclink import LinkItem, LinkShard
from dataflow.core.deadletter import DeadLetter
from dataflow.core.dedup import DedupEntry, Forget, Watermark
from dataflow.core.events import Event, SearchImpression
from dataflow.core.families import (
    AC,
    DOC,
    FAMILY_NAMES,
    QD,
    FeatureParams,
    Update,
    impressions_by_position,
    qhash_or_none,
    updates_for,
)
from dataflow.core.intake import Intake, IntakeResult
from dataflow.core.priors import Fit, FitRules, PriorFitter, in_sample, prior_suffix
from dataflow.core.segments import SegmentStore
from dataflow.core.shard import TAIL_BYTES, FeatureShard, ShardItem, StepResult
from dataflow.core.windows import DAY_MS
from dataflow.kafka.intake import IntakeSource
from dataflow.kafka.lag import KafkaOffsets, LagTracker, LagTrackingSource
from dataflow.kafka.segments import KafkaSegments
from dataflow.kafka.source import BrokerOffsets, OffsetGapCheckingSource, RecordSource
from dataflow.logs import configure_logging
from dataflow.opensearch import sink as opensearch
from dataflow.repair import StoreRepairs
from dataflow.sinks.deadletters import DeadLetterSink
from dataflow.sinks.redis import RedisFeatureSink, WriteBehind

log = logging.getLogger(__name__)

CLOCK_KEY = "clock"
PRIORS_KEY = "priors"
WATERMARK_KEY = "watermark"
UNCHECKED_KEY = "unchecked"
CLOCK_LAYOUT = 1
WRITE_LAYOUT = 1

Keyed = tuple[str, Any]
DedupItem = tuple[int, int, list[tuple[int, Event]]] | Forget
"""(slot, origin, [(id digest, event), ...]) to check, or a forget from the watermark."""


def shard_of(suffix: str, shards: int) -> int:
    """The state shard of a feature key (stable across processes and runs)."""
    return zlib.crc32(suffix.encode("utf-8")) % shards


def by_feature_shard(updates: Iterable[Update], shards: int) -> list[tuple[str, list[Update]]]:
    """Counter updates grouped by the state shard of their key."""
    grouped: dict[int, list[Update]] = {}
    for update in updates:
        family, suffix, ts, counts = update
        idx = shard_of(suffix, shards)
        batch = grouped.get(idx)
        if batch is None:
            grouped[idx] = [update]
        else:
            batch.append(update)
    return [(str(idx), batch) for idx, batch in grouped.items()]


# --- stateful logics ---------------------------------------------------------------------


class ClockLogic(StatefulBatchLogic[dict[int, int], list[tuple[str, int]], bytes]):
    """The global event-time clock (one key, so one worker holds it).

    When the clock enters a new UTC day it tells every state shard, so that shards whose
    own updates lag (other workers' partitions) still re-state and expire their keys.
    """

    def __init__(self, feature_shards: int, resume: bytes | None) -> None:
        self.feature_shards = feature_shards
        self.clock: int = 0 if resume is None else snapshots.unwrap("clock", CLOCK_LAYOUT, resume)

    def on_batch(
        self, values: list[dict[int, int]]
    ) -> tuple[Iterable[list[tuple[str, int]]], bool]:
        reading = max(max(clocks.values()) for clocks in values)
        metrics.observe_clock(max(reading, self.clock))  # never a slower partition's dip
        if reading <= self.clock:
            return [], self.RETAIN
        old, self.clock = self.clock, reading
        if old // DAY_MS == reading // DAY_MS:
            return [], self.RETAIN
        return [[(str(i), reading) for i in range(self.feature_shards)]], self.RETAIN

    def snapshot(self) -> bytes:
        return snapshots.wrap("clock", CLOCK_LAYOUT, self.clock)


class WatermarkLogic(StatefulBatchLogic[dict[int, int], list[tuple[str, Forget]], bytes]):
    """The dedup watermark (one key): the slowest partition's clock, and the forgets it
    sends the dedup ring entries when it passes a slot's horizon (`dataflow.core.dedup`)."""

    def __init__(self, dedup_shards: int, resume: bytes | None) -> None:
        self.dedup_shards = dedup_shards
        self.mark = Watermark() if resume is None else Watermark.restore(resume)

    def on_batch(
        self, values: list[dict[int, int]]
    ) -> tuple[Iterable[list[tuple[str, Forget]]], bool]:
        forgets = self.mark.advance(
            (kv for clocks in values for kv in clocks.items()), self.dedup_shards
        )
        clocks = self.mark.clocks.values()
        metrics.DEDUP_WATERMARK_LAG.set((max(clocks) - min(clocks)) / 1000.0)
        return ([forgets] if forgets else []), self.RETAIN

    def snapshot(self) -> bytes:
        return self.mark.snapshot()


class DedupLogic(StatefulBatchLogic[DedupItem, list[Event], bytes]):
    """One dedup ring entry of seen event ids; emits the first copy of each event."""

    def __init__(self, resume: bytes | None) -> None:
        self.entry = DedupEntry() if resume is None else DedupEntry.restore(resume)

    def on_batch(self, values: list[DedupItem]) -> tuple[Iterable[list[Event]], bool]:
        accepted: list[Event] = []
        offered = 0
        unheld = self.entry.unheld
        for value in values:
            if isinstance(value, Forget):
                self.entry.forget(value)
                continue
            slot, origin, pairs = value
            offered += len(pairs)
            accepted.extend(self.entry.admit(slot, pairs, origin))
        duplicates = offered - len(accepted)
        if duplicates:
            metrics.DROPPED.labels(reason="duplicate").inc(duplicates)
        if self.entry.unheld > unheld:
            metrics.DEDUP_UNHELD_CHECKS.inc(self.entry.unheld - unheld)
        metrics.DEDUP_IDS.report(self, self.entry.held())
        return ([accepted] if accepted else []), self.RETAIN

    def snapshot(self) -> bytes:
        # The epoch closes here: the watermark's forgets of this epoch take effect now.
        blob = self.entry.snapshot()
        metrics.DEDUP_IDS.report(self, self.entry.held())
        return blob


class LinkLogic(StatefulBatchLogic[list[LinkItem], list[Update], bytes]):
    """One shard of sessions for the autocomplete → search → click join
    (`dataflow.core.aclink`)."""

    def __init__(self, grace_ms: int, resume: bytes | None) -> None:
        self.join = LinkShard(grace_ms) if resume is None else LinkShard.restore(resume, grace_ms)

    def on_batch(self, values: list[list[LinkItem]]) -> tuple[Iterable[list[Update]], bool]:
        stale = self.join.stale
        updates = self.join.step(item for batch in values for item in batch)
        if self.join.stale > stale:
            metrics.LINK_STALE.inc(self.join.stale - stale)
        metrics.LINK_SESSIONS.report(self, len(self.join))
        return ([updates] if updates else []), self.RETAIN

    def snapshot(self) -> bytes:
        # The epoch closes here: what can no longer link is dropped now.
        blob = self.join.snapshot()
        metrics.LINK_SESSIONS.report(self, len(self.join))
        return blob


@dataclass(slots=True)
class FitBatch:
    """What the prior fit sends: the fits for the feature shards, and the newest fit of
    each family, to publish at `P:prior:{family}`."""

    fits: list[Fit]
    published: list[Fit]


class PriorFitLogic(StatefulBatchLogic[list[Update] | dict[int, int], FitBatch, bytes]):
    """The prior fit (one key): the sampled keys' counts and the partition clocks in, the
    fitted priors out (`dataflow.core.priors`).

    The fits due are made when an epoch closes (in `snapshot()`), so that every update read
    before the clocks moved is counted, and sent at the next activation; at the end of input
    every prior still needed is fitted. When the store lost data (`repairs`), the published
    priors are written again.
    """

    def __init__(
        self,
        fitter: PriorFitter,
        repairs: StoreRepairs | None,
    ) -> None:
        self.fitter = fitter
        self.repairs = repairs
        self.repaired = 0 if repairs is None else repairs.generation

    def on_batch(self, values: list[list[Update] | dict[int, int]]) -> tuple[list[FitBatch], bool]:
        fitter = self.fitter
        for value in values:
            if isinstance(value, dict):
                fitter.read_clocks(value.items())
            else:
                fitter.observe(value)
        return self._send(), self.RETAIN

    def notify_at(self) -> datetime | None:
        return datetime.now(UTC) if self.fitter.ready else None

    def on_notify(self) -> tuple[list[FitBatch], bool]:
        return self._send(), self.RETAIN

    def on_eof(self) -> tuple[list[FitBatch], bool]:
        self.fitter.close_epoch(everything=True)
        return self._send(), self.RETAIN

    def _send(self) -> list[FitBatch]:
        fits = self.fitter.take()
        republish = self.repairs is not None and self.repairs.generation != self.repaired
        if republish and self.repairs is not None:
            self.repaired = self.repairs.generation
        if not fits and not republish:
            return []
        for fit in fits:
            result = "fitted" if fit.fitted else "fallback"
            metrics.PRIOR_FITS.labels(family=FAMILY_NAMES[fit.family], result=result).inc()
        newest = self.fitter.newest()
        for fit in newest:
            name = FAMILY_NAMES[fit.family]
            metrics.PRIOR.labels(family=name, parameter="alpha").set(fit.alpha)
            metrics.PRIOR.labels(family=name, parameter="beta").set(fit.beta)
            metrics.PRIOR.labels(family=name, parameter="day").set(fit.day)
        return [FitBatch(fits, newest)]

    def snapshot(self) -> bytes:
        # The epoch closes here: every update read before the clocks moved is in.
        self.fitter.close_epoch()
        return self.fitter.snapshot()


@dataclass(frozen=True, slots=True)
class Wake:
    """Sent to every feature shard by `store_checks` when the store lost data: look at the
    store's generation (`dataflow.repair`). Carries nothing else."""


WAKE = Wake()


class ShardLogic(StatefulBatchLogic[ShardItem | Wake, StepResult, bytes]):
    """One state shard of feature keys (see `dataflow.core.shard`).

    Updates mark keys dirty; the writes go out at most every `flush_interval` (one timer
    per shard, not per key), so a hot key is written once per interval, not once per
    batch. With an interval of zero every batch is flushed at once. After a new day, each
    flush also re-states its share of `RESTATE_KEYS_PER_SECOND`, and the timer stays set
    until every key is re-stated.

    With `repairs` (the Redis sink checks its marker), every activation first looks at the
    store's generation: when it moved (the store lost data), every live key is queued for
    re-statement like after a new day (`FeatureShard.restate_all`), and the flush timer
    re-states it at the same rate without waiting for events. Idle shards are woken by
    `store_checks` (`Wake`).
    """

    def __init__(
        self,
        params: FeatureParams,
        flush_ms: int,
        restate_per_flush: int | None,
        resume: bytes | None,
        repairs: StoreRepairs | None = None,
        *,
        fitted: frozenset[int] = frozenset(),
        segments: SegmentStore | None = None,
        tail_bytes: int = TAIL_BYTES,
    ) -> None:
        if resume is None:
            self.shard = FeatureShard(params, restate_per_flush=restate_per_flush, fitted=fitted)
            if segments is not None:
                self.shard.use_segments(segments, tail_bytes=tail_bytes)
        else:
            self.shard = FeatureShard.restore(
                params, resume, restate_per_flush, fitted, segments, tail_bytes=tail_bytes
            )
        self.flush_interval = timedelta(milliseconds=flush_ms)
        self.next_flush: datetime | None = None
        self.repairs = repairs
        self.restored = resume is not None
        self.repaired = 0 if repairs is None else repairs.join(self, restored=self.restored)
        metrics.KEYS_TO_RESTATE.report(self, self.shard.restate_left)

    def _repair(self) -> None:
        """Queue every live key if the store lost data since this shard last looked."""
        repairs = self.repairs
        if repairs is None or repairs.generation == self.repaired:
            return
        generation = repairs.generation
        due = repairs.due(self.repaired, restored=self.restored)
        queued = self.shard.restate_all() if due else 0
        self.repaired = generation
        repairs.queued(self, generation, queued)
        metrics.KEYS_TO_RESTATE.report(self, self.shard.restate_left)

    def on_batch(self, values: list[ShardItem | Wake]) -> tuple[Iterable[StepResult], bool]:
        self._repair()
        items = [v for v in values if not isinstance(v, Wake)]
        result = self.shard.step(items) if items else StepResult()
        if result.late_updates:
            metrics.LATE_UPDATES.inc(result.late_updates)
        if result.new_day:
            metrics.KEYS_TO_RESTATE.report(self, self.shard.restate_left)
        metrics.STATE_KEYS.report(self, len(self.shard))
        if not self.flush_interval:
            return self._flush(everything=True), self.RETAIN
        if self.next_flush is None and self.shard.pending:
            self.next_flush = datetime.now(UTC) + self.flush_interval
        return [], self.RETAIN

    def notify_at(self) -> datetime | None:
        if self.next_flush is None and self.shard.pending:  # restored with pending writes
            self.next_flush = datetime.now(UTC)
        return self.next_flush

    def on_notify(self) -> tuple[Iterable[StepResult], bool]:
        self._repair()
        return self._flush(), self.RETAIN

    def on_eof(self) -> tuple[Iterable[StepResult], bool]:
        self._repair()
        return self._flush(everything=True), self.RETAIN

    def _flush(self, *, everything: bool = False) -> list[StepResult]:
        self.next_flush = None
        if not self.shard.pending:
            return []
        result = self.shard.flush(everything=everything)
        if self.shard.pending:  # re-statements left: the next share after the interval
            self.next_flush = datetime.now(UTC) + self.flush_interval
        deletes = sum(1 for _, fields in result.writes if fields is None)
        metrics.EXPIRED.inc(deletes)
        if result.new_day:
            metrics.RESTATED.inc(len(result.writes) - deletes)
        metrics.KEYS_TO_RESTATE.report(self, self.shard.restate_left)
        return [result]

    def snapshot(self) -> bytes:
        # With a segment store, a `snapshots.Deferred` when the snapshot refers to segments
        # still in flight: Bytewax pickles it as the bytes, once they are durable.
        blob = cast(bytes, self.shard.snapshot())
        if self.repairs is not None:
            self.repairs.saved(self)  # a queued repair is in this snapshot
        return blob


class WriteLogic(StatefulBatchLogic[StepResult, None, bytes]):
    """Hands a feature shard's writes (or the fitted priors') to its worker's Redis writer
    (`sinks.redis.WriteBehind`), which writes them while the worker goes on reading and
    counting. At each epoch's close, Bytewax takes this step's snapshot before the epoch
    commits, and the snapshot waits until every write handed over is in Redis: an epoch
    that a restart resumes after has all its writes stored, as when they were written in
    line. Keyed like the shards, so it runs on the shard's worker. Holds no state."""

    def __init__(self, behind: WriteBehind) -> None:
        self.behind = behind

    def on_batch(self, values: list[StepResult]) -> tuple[Iterable[None], bool]:
        self.behind.put(values)
        return [], self.RETAIN

    def on_eof(self) -> tuple[Iterable[None], bool]:
        self.behind.drain()
        return [], self.RETAIN

    def snapshot(self) -> bytes:
        self.behind.drain()
        return snapshots.wrap("redis_write", WRITE_LAYOUT, None)


# --- stateless steps ---------------------------------------------------------------------


class IntakeReport:
    """`map` over each intake result: count it, log consumer errors, feed the lag gauge."""

    def __init__(self, lag: LagTracker | None = None) -> None:
        self.lag = lag

    def __call__(self, result: IntakeResult) -> IntakeResult:
        for err in result.consumer_errors:
            _log_consumer_error(err)
        if self.lag is not None and result.last_offsets:
            self.lag.consumed(result.last_offsets)
        for (topic, partition), n in result.messages_by_partition.items():
            metrics.MESSAGES.labels(topic=topic, partition=str(partition)).inc(n)
        for kind, n in result.events_by_type.items():
            metrics.EVENTS.labels(type=kind).inc(n)
        for reason, n in result.dropped.items():
            metrics.DROPPED.labels(reason=reason).inc(n)
        return result


def _to_check(result: IntakeResult) -> list[tuple[str, DedupItem]]:
    return [(key, (slot, origin, pairs)) for (key, slot, origin), pairs in result.by_slot.items()]


def _past_horizon(result: IntakeResult) -> Keyed | None:
    return (UNCHECKED_KEY, result.unchecked) if result.unchecked else None


def _partition_clocks(result: IntakeResult) -> dict[int, int] | None:
    return result.partition_clocks or None


class FanOut:
    """`flat_map_batch` mapper: accepted events → counter updates grouped by state shard."""

    def __init__(self, params: FeatureParams, shards: int) -> None:
        self.params = params
        self.shards = shards
        self.by_position = impressions_by_position(params.reference_ctr)
        self.updates_for = partial(updates_for, params=params)

    def __call__(self, batches: list[tuple[str, list[Event]]]) -> list[tuple[str, list[Update]]]:
        params = self.params
        compiled = native.core
        if compiled is not None:  # the same updates, in the same order (tests/core/test_native)
            grouped: list[tuple[str, list[Update]]] = compiled.fan_out(
                (e for _key, events in batches for e in events),
                self.shards,
                SearchImpression,
                self.by_position,
                qhash_or_none,
                keys.enc,
                self.updates_for,
            )
            return grouped
        return by_feature_shard(
            (u for _key, events in batches for e in events for u in updates_for(e, params)),
            self.shards,
        )


class PriorSample:
    """`flat_map_batch` mapper: the counter updates of the keys that feed the prior fit
    (fitted families, the sampled keys)."""

    def __init__(self, rules: FitRules) -> None:
        self.families = rules.families
        self.sample = rules.sample

    def __call__(self, batches: list[tuple[str, list[Update]]]) -> list[tuple[str, list[Update]]]:
        families, sample = self.families, self.sample
        picked = [
            u for _k, ups in batches for u in ups if u[0] in families and in_sample(u[1], sample)
        ]
        return [(PRIORS_KEY, picked)] if picked else []


class LinkRouter:
    """`map_batch` mapper: accepted events → what the autocomplete link needs of them."""

    def __init__(self, link_shards: int) -> None:
        self.link_shards = link_shards

    def __call__(self, batches: list[tuple[str, list[Event]]]) -> list[aclink.LinkRoute]:
        events = (e for _key, events in batches for e in events)
        return [aclink.route(events, self.link_shards)]


class LinkFanOut:
    """`flat_map_batch` mapper: the join's increments, regrouped by state shard."""

    def __init__(self, feature_shards: int) -> None:
        self.feature_shards = feature_shards

    def __call__(self, batches: list[tuple[str, list[Update]]]) -> list[tuple[str, list[Update]]]:
        return by_feature_shard((u for _k, ups in batches for u in ups), self.feature_shards)


class StoreWakeSource(DynamicSource[tuple[str, Wake]]):
    """`store_checks`: one partition per worker, which sends a `Wake` to every feature shard
    when the store's generation moves (the Redis sink found that Redis lost data), so that
    idle shards re-state their keys without waiting for an event (`dataflow.repair`). It
    looks every `POLL`; nothing is sent otherwise.

    In a run that stops at the end of its input (`KAFKA_STOP_AT_END`, or a source given to
    `build_flow`) it stops once the sink has checked its marker and no repair waits for a
    shard, rather than keep the dataflow running: a loss noticed after that is repaired by
    the shards that see events, and the marker stays `repairing` until the next start
    repairs the rest.
    """

    POLL = timedelta(milliseconds=500)

    def __init__(self, repairs: StoreRepairs, feature_shards: int, *, stop_at_end: bool) -> None:
        self.repairs = repairs
        self.feature_shards = feature_shards
        self.stop_at_end = stop_at_end

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WakePartition:
        return _WakePartition(self.repairs, self.feature_shards, self.stop_at_end)


class _WakePartition(StatelessSourcePartition[tuple[str, Wake]]):
    def __init__(self, repairs: StoreRepairs, feature_shards: int, stop_at_end: bool) -> None:
        self.repairs = repairs
        self.feature_shards = feature_shards
        self.stop_at_end = stop_at_end
        self.woken = -1
        repairs.enter(self)

    def next_batch(self) -> list[tuple[str, Wake]]:
        generation = self.repairs.generation
        if generation != self.woken:
            self.woken = generation
            self.repairs.woke(self, generation)
            if generation:
                return [(str(i), WAKE) for i in range(self.feature_shards)]
        elif self.stop_at_end:
            status = self.repairs.status()
            if status.checked and status.settled:
                self.repairs.leave(self)
                raise StopIteration
        return []

    def next_awake(self) -> datetime | None:
        return datetime.now(UTC) + StoreWakeSource.POLL

    def close(self) -> None:
        self.repairs.leave(self)


def _log_consumer_error(err: Any) -> None:
    metrics.CONSUMER_ERRORS.labels(topic=getattr(err.msg, "topic", None) or "").inc()
    log.error("kafka consumer error", extra={"error": str(err.err)})


# --- the stages --------------------------------------------------------------------------


@dataclass(frozen=True)
class IntakeOut:
    dead_letters: Stream[DeadLetter]
    to_check: Stream[tuple[str, DedupItem]]
    """Events to dedup, keyed by ring entry."""
    past_horizon: Stream[Keyed]
    """Events whose partition's clock is past the dedup horizon: accepted unchecked."""
    partition_clocks: Stream[dict[int, int]]
    """Per batch: origin id -> that partition's clock."""


def intake(
    flow: Dataflow, source: Source[Any], config: Config, lag: LagTracker | None
) -> IntakeOut:
    """Kafka in: decode and route every batch where its partition is read."""
    router = Intake(
        future_tolerance_ms=config.future_tolerance_ms,
        dedup_shards=config.dedup_shards,
        now_ms=lambda: int(time.time() * 1000),
    )
    results = op.input("kafka_in", flow, IntakeSource(source, router))  # type: ignore[arg-type]
    reported = op.map("intake", results, IntakeReport(lag))
    return IntakeOut(
        dead_letters=op.flat_map("dead_letters", reported, lambda r: r.dead_letters),
        to_check=op.flat_map("to_dedup", reported, _to_check),
        past_horizon=op.filter_map("past_dedup_horizon", reported, _past_horizon),
        partition_clocks=op.filter_map("partition_clocks", reported, _partition_clocks),
    )


def clock(clocks: Stream[dict[int, int]], config: Config) -> Stream[tuple[str, int]]:
    """The global clock; emits a reading for every state shard when a new day starts."""
    keyed = op.key_on("clock_readings", clocks, lambda _: CLOCK_KEY)
    ticks = op.stateful_batch(
        "clock", keyed, lambda resume: ClockLogic(config.feature_shards, resume)
    )
    return op.flat_map("day_ticks", ticks, lambda keyed: keyed[1])


def dedup(into: IntakeOut, config: Config) -> Stream[Keyed]:
    """First copies of the checked events, merged with the unchecked ones: every event
    that counts, keyed by where it came from."""
    keyed = op.key_on("watermark_readings", into.partition_clocks, lambda _: WATERMARK_KEY)
    marks = op.stateful_batch(
        "dedup_watermark", keyed, lambda resume: WatermarkLogic(config.dedup_shards, resume)
    )
    forgets = op.flat_map("forgets", marks, lambda keyed: keyed[1])
    checked = op.stateful_batch(
        "dedup", op.merge("to_dedup_and_forgets", into.to_check, forgets), DedupLogic
    )
    return op.merge("to_count", checked, into.past_horizon)


@dataclass(frozen=True)
class LinkOut:
    increments: Stream[tuple[str, list[Update]]]
    """`acq` increments from the session join, by state shard."""
    without_session: Stream[tuple[str, list[Update]]]
    """`+1 select` of selects that have no session, by state shard."""
    labels: Stream[tuple[str, dict[str, str]]]
    """`acq` key suffix → the candidate text it counts, by state shard."""


def link(accepted: Stream[Keyed], config: Config) -> LinkOut:
    """The autocomplete → search → click link."""
    routes = op.flat_map_batch("link_route", accepted, LinkRouter(config.link_shards))
    to_join = op.flat_map("to_join", routes, lambda r: r.by_shard.items())
    joined = op.stateful_batch(
        "aclink", to_join, lambda resume: LinkLogic(config.link_grace_ms, resume)
    )
    shards = config.feature_shards
    return LinkOut(
        increments=op.flat_map_batch("link_fan_out", joined, LinkFanOut(shards)),
        without_session=op.flat_map(
            "selects_without_session", routes, lambda r: by_feature_shard(r.direct, shards)
        ),
        labels=op.flat_map("candidate_labels", routes, lambda r: _labels_by_shard(r, shards)),
    )


def _labels_by_shard(route: aclink.LinkRoute, shards: int) -> list[tuple[str, dict[str, str]]]:
    by_shard: dict[str, dict[str, str]] = {}
    for suffix, text in route.labels.items():
        by_shard.setdefault(str(shard_of(suffix, shards)), {})[suffix] = text
    return list(by_shard.items())


@dataclass(frozen=True)
class PriorsOut:
    to_shards: Stream[tuple[str, Fit]]
    """Every fit, to every state shard."""
    writes: Stream[StepResult]
    """The newest fit of each family, as the write of `P:prior:{family}`."""


def priors(
    updates: Stream[tuple[str, list[Update]]],
    clocks: Stream[dict[int, int]],
    config: Config,
    repairs: StoreRepairs | None,
) -> PriorsOut:
    """The priors fitted from the keys of the families that ask for it."""
    rules = config.priors
    sampled = op.flat_map_batch("prior_sample", updates, PriorSample(rules))
    readings = op.key_on("prior_clock_readings", clocks, lambda _: PRIORS_KEY)
    fixed = {DOC: config.features.doc, QD: config.features.qd, AC: config.features.ac}

    def build(resume: bytes | None) -> PriorFitLogic:
        fitter = (
            PriorFitter(rules, fixed)
            if resume is None
            else PriorFitter.restore(rules, fixed, resume)
        )
        return PriorFitLogic(fitter, repairs)

    fit_in: Stream[tuple[str, list[Update] | dict[int, int]]] = op.merge(
        "prior_fit_in", sampled, readings
    )
    fits = op.stateful_batch("prior_fit", fit_in, build)
    batches = op.key_rm("prior_fits", fits)
    shards = config.feature_shards
    return PriorsOut(
        to_shards=op.flat_map(
            "prior_to_shards",
            batches,
            lambda b: [(str(i), fit) for fit in b.fits for i in range(shards)],
        ),
        writes=op.map(
            "prior_writes",
            batches,
            lambda b: StepResult(
                writes=[(prior_suffix(f.family), f.fields()) for f in b.published]
            ),
        ),
    )


def features(
    updates: Stream[tuple[str, list[Update]]],
    linked: LinkOut,
    day_ticks: Stream[tuple[str, int]],
    config: Config,
    *,
    repairs: StoreRepairs | None = None,
    wakes: Stream[tuple[str, Wake]] | None = None,
    fits: Stream[tuple[str, Fit]] | None = None,
) -> Stream[tuple[str, StepResult]]:
    """The state shards: counters per key; the writes they flush, keyed by shard. With
    `repairs`, they re-state every key when the store lost data, woken by `wakes`; with
    `fits`, fitted families render with the prior fitted for the day."""
    streams: list[Stream[Any]] = [
        updates, linked.increments, linked.without_session, linked.labels, day_ticks
    ]  # fmt: skip
    if wakes is not None:
        streams.append(wakes)
    if fits is not None:
        streams.append(fits)
    shard_in: Stream[tuple[str, ShardItem | Wake]] = op.merge("shard_in", *streams)
    per_flush = restate_per_flush(config)
    # Only used once a snapshot is taken (with recovery) or restored: it connects then.
    segments = KafkaSegments(config.kafka)
    results = op.stateful_batch(
        "features",
        shard_in,
        lambda resume: ShardLogic(
            config.features,
            config.flush_interval_ms,
            per_flush,
            resume,
            repairs,
            fitted=config.priors.families,
            segments=segments,
            tail_bytes=config.snapshot_tail_bytes,
        ),
    )
    return results


def redis_writes(
    writes: Stream[tuple[str, StepResult]],
    prior_writes: Stream[StepResult] | None,
    sink: Sink[StepResult],
) -> None:
    """The feature store's writes. Into a `RedisFeatureSink` they go behind the worker
    (`WriteLogic`, a step keyed like the shards, on the shard's worker), and the sink's
    partitions, one per worker, own the writers (the empty stream into it is only there to
    have Bytewax build them); into any other sink, in line."""
    if prior_writes is not None:
        writes = op.merge("redis_writes", writes, op.key_on("prior_key", prior_writes, _prior))
    if not isinstance(sink, RedisFeatureSink):
        op.output("redis", op.key_rm("unkeyed", writes), sink)
        return
    done = op.stateful_batch("redis_write", writes, lambda _: WriteLogic(sink.behind_here()))
    nothing: Stream[Any] = op.key_rm("nothing", done)
    op.output("redis", nothing, sink)


def _prior(_: StepResult) -> str:
    return PRIORS_KEY


def restate_per_flush(config: Config) -> int | None:
    """Each shard's share of `RESTATE_KEYS_PER_SECOND` per flush interval (None: no limit)."""
    rate, interval_ms = config.restate_keys_per_second, config.flush_interval_ms
    if not rate or not interval_ms:
        return None
    return max(1, -(-rate * interval_ms // (1000 * config.feature_shards)))


# --- the dataflow ------------------------------------------------------------------------


def kafka_source(config: Config, lag: LagTracker | None = None) -> Source[Any]:
    """The input: every partition of `KAFKA_TOPICS`, offsets kept in recovery snapshots.
    With `lag`, the partitions this process reads are reported to it (consumer lag)."""
    source = RecordSource(
        brokers=list(config.kafka.brokers),
        topics=list(config.kafka.topics),
        tail=not config.kafka.stop_at_end,
        starting_offset=OFFSET_BEGINNING,
        # A snapshotted offset that retention has deleted must rewind to the earliest
        # retained offset, never silently jump to the end.
        add_config={
            **{k: str(v) for k, v in config.kafka.client_config().items()},
            "auto.offset.reset": "earliest",
        },
        batch_size=config.kafka.batch_size,
        raise_on_errors=False,
    )
    # The earliest reset above keeps what retention left; the wrapper logs and counts what
    # it took (search_features_offsets_skipped_total).
    checked = OffsetGapCheckingSource(source, BrokerOffsets(config.kafka))
    return checked if lag is None else LagTrackingSource(checked, lag)


def build_flow(
    config: Config,
    *,
    source: Source[Any] | None = None,
    redis_sink: Sink[StepResult] | None = None,
    dlq_sink: Sink[DeadLetter] | None = None,
    with_opensearch: bool = True,
    flow_id: str = "search_features",
) -> Dataflow:
    """Wire the dataflow. Sinks default to the real ones built from `config`; the OpenSearch
    sink is added when `OPENSEARCH_URL` is set and `with_opensearch` is true. A `source`
    given here is taken to end (tests): the `store_checks` input then ends too."""
    native.use(config.native_core)
    flow = Dataflow(flow_id)
    lag = None
    finite = source is not None or config.kafka.stop_at_end  # a given source is a test's
    if source is None:
        lag = LagTracker(lambda: KafkaOffsets(config.kafka))
        source = kafka_source(config, lag)

    into = intake(flow, source, config, lag)
    day_ticks = clock(into.partition_clocks, config)
    accepted = dedup(into, config)
    updates = op.flat_map_batch("fan_out", accepted, FanOut(config.features, config.feature_shards))
    redis = redis_sink or RedisFeatureSink(config.redis)
    # The Redis sink raises `repairs` when Redis lost what it wrote (dataflow.repair).
    repairs = redis.repairs if isinstance(redis, RedisFeatureSink) else None
    wakes = None
    if repairs is not None:
        waker = StoreWakeSource(repairs, config.feature_shards, stop_at_end=finite)
        wakes = op.input("store_checks", flow, waker)
    fitted = (
        priors(updates, into.partition_clocks, config, repairs) if config.priors.families else None
    )
    results = features(
        updates,
        link(accepted, config),
        day_ticks,
        config,
        repairs=repairs,
        wakes=wakes,
        fits=None if fitted is None else fitted.to_shards,
    )

    redis_writes(results, None if fitted is None else fitted.writes, redis)
    if with_opensearch and config.opensearch.enabled:
        opensearch.attach(op.key_rm("writes", results), config.opensearch)
    op.output("dlq", into.dead_letters, dlq_sink or DeadLetterSink(config.kafka))
    return flow


def _flow_from_env() -> Dataflow:
    config = Config.from_env()
    configure_logging(config.log_level, config.log_format)
    log.info("starting search_features", extra={"config": config.describe()})
    return build_flow(config)


def __getattr__(name: str) -> Dataflow:
    # `python -m bytewax.run dataflow.flow` looks up `flow`; building it lazily keeps
    # `import dataflow.flow` free of side effects for tests and tools.
    if name == "flow":
        return _flow_from_env()
    raise AttributeError(name)
