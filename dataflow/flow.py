"""The Bytewax dataflow: Kafka → intake → dedup → fan-out → state shards → sinks.

```
kafka_in ─► intake ─┬─ dead letters ─────────────────────────────► dlq (Kafka)
                    ├─ events by (slot, shard) ─► dedup ─► fan_out ─► features ─┬─► redis
                    ├─ events past the dedup horizon ─────► fan_out             └─► opensearch
                    └─ clock readings ─► clock ─► new day ─────────► features
```

`python -m bytewax.run dataflow.flow` finds `flow` here, built from the environment
(`Config.from_env()`); tests call `build_flow(config, source=...)` with their own source.
The pure logic lives in `intake`, `dedup`, `families` and `shard`; the classes here only
adapt it to Bytewax's stateful operators and report metrics.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink
from confluent_kafka import OFFSET_BEGINNING

from dataflow import metrics
from dataflow.config import Config
from dataflow.core import aclink
from dataflow.core.aclink import LinkShard
from dataflow.core.deadletter import DeadLetter
from dataflow.core.dedup import SlotIds
from dataflow.core.families import FeatureParams, Update, updates_for
from dataflow.core.intake import Intake, IntakeResult
from dataflow.core.shard import FeatureShard, ShardItem, StepResult
from dataflow.core.windows import DAY_MS
from dataflow.kafka.lag import KafkaOffsets, LagTracker, LagTrackingSource
from dataflow.kafka.source import BrokerOffsets, OffsetGapCheckingSource
from dataflow.logs import configure_logging
from dataflow.opensearch import sink as opensearch
from dataflow.sinks.deadletters import DeadLetterSink
from dataflow.sinks.redis import RedisFeatureSink

log = logging.getLogger(__name__)

CLOCK_KEY = "clock"


def shard_of(suffix: str, shards: int) -> int:
    """The state shard of a feature key (stable across processes and runs)."""
    return zlib.crc32(suffix.encode("utf-8")) % shards


# --- stateful logics ---------------------------------------------------------------------


class ClockLogic(StatefulBatchLogic[int, list[tuple[str, int]], int]):
    """The global event-time clock (one key, so one worker holds it).

    When the clock enters a new UTC day it tells every state shard, so that shards whose
    own updates lag (other workers' partitions) still re-state and expire their keys.
    """

    def __init__(self, feature_shards: int, clock: int | None) -> None:
        self.feature_shards = feature_shards
        self.clock = clock or 0

    def on_batch(self, values: list[int]) -> tuple[Iterable[list[tuple[str, int]]], bool]:
        reading = max(values)
        if reading <= self.clock:
            return [], self.RETAIN
        old, self.clock = self.clock, reading
        if old // DAY_MS == reading // DAY_MS:
            return [], self.RETAIN
        return [[(str(i), reading) for i in range(self.feature_shards)]], self.RETAIN

    def snapshot(self) -> int:
        return self.clock


class DedupLogic(StatefulBatchLogic[Any, list[Any], bytes]):
    """One dedup ring entry of seen event ids; emits the first copy of each event."""

    def __init__(self, resume: bytes | None) -> None:
        self.ids = SlotIds() if resume is None else SlotIds.restore(resume)

    def on_batch(self, values: list[Any]) -> tuple[Iterable[list[Any]], bool]:
        accepted: list[Any] = []
        offered = 0
        # Oldest slot first: one epoch can hold an entry's slot and the slot 72 h newer
        # (a backfill reads days per second, several partitions interleave), and admitting
        # the newer one first would recycle the entry before the older slot's duplicates
        # are checked. Stable, so copies within a slot keep their order (first copy wins).
        for slot, pairs in sorted(values, key=_slot_of):
            offered += len(pairs)
            accepted.extend(self.ids.admit(slot, pairs))
        duplicates = offered - len(accepted)
        if duplicates:
            metrics.DROPPED.labels(reason="duplicate").inc(duplicates)
        metrics.DEDUP_IDS.report(self, len(self.ids.seen))
        return ([accepted] if accepted else []), self.RETAIN

    def snapshot(self) -> bytes:
        return self.ids.snapshot()


def _slot_of(value: tuple[int, Any]) -> int:
    return value[0]


class LinkLogic(StatefulBatchLogic[list[Any], list[Update], bytes]):
    """One shard of sessions for the autocomplete → search → click join (`dataflow.core.aclink`)."""

    def __init__(self, grace_ms: int, resume: bytes | None) -> None:
        self.join = LinkShard(grace_ms) if resume is None else LinkShard.restore(resume, grace_ms)

    def on_batch(self, values: list[list[Any]]) -> tuple[Iterable[list[Update]], bool]:
        stale = self.join.stale
        updates = self.join.step([item for batch in values for item in batch])
        if self.join.stale > stale:
            metrics.LINK_STALE.inc(self.join.stale - stale)
        metrics.LINK_SESSIONS.report(self, len(self.join))
        return ([updates] if updates else []), self.RETAIN

    def snapshot(self) -> bytes:
        return self.join.snapshot()


class ShardLogic(StatefulBatchLogic[ShardItem, StepResult, bytes]):
    """One state shard of feature keys (see `dataflow.core.shard`).

    Updates mark keys dirty; the writes go out at most every `flush_interval` (one timer
    per shard, not per key), so a hot key is written once per interval, not once per
    batch. With an interval of zero every batch is flushed at once.
    """

    def __init__(self, params: FeatureParams, flush_ms: int, resume: bytes | None) -> None:
        self.shard = (
            FeatureShard(params) if resume is None else FeatureShard.restore(params, resume)
        )
        self.flush_interval = timedelta(milliseconds=flush_ms)
        self.next_flush: datetime | None = None

    def on_batch(self, values: list[ShardItem]) -> tuple[Iterable[StepResult], bool]:
        result = self.shard.step(values)
        if result.late_updates:
            metrics.LATE_UPDATES.inc(result.late_updates)
        metrics.STATE_KEYS.report(self, len(self.shard))
        if not self.flush_interval:
            return self._flush(), self.RETAIN
        if self.next_flush is None and self.shard.pending:
            self.next_flush = datetime.now(UTC) + self.flush_interval
        return [], self.RETAIN

    def notify_at(self) -> datetime | None:
        if self.next_flush is None and self.shard.pending:  # restored with pending writes
            self.next_flush = datetime.now(UTC)
        return self.next_flush

    def on_notify(self) -> tuple[Iterable[StepResult], bool]:
        return self._flush(), self.RETAIN

    def on_eof(self) -> tuple[Iterable[StepResult], bool]:
        return self._flush(), self.RETAIN

    def _flush(self) -> list[StepResult]:
        self.next_flush = None
        if not self.shard.pending:
            return []
        result = self.shard.flush()
        if result.new_day:
            deletes = sum(1 for _, fields in result.writes if fields is None)
            metrics.EXPIRED.inc(deletes)
            metrics.RESTATED.inc(len(result.writes) - deletes)
        return [result]

    def snapshot(self) -> bytes:
        return self.shard.snapshot()


# --- stateless steps ---------------------------------------------------------------------


class IntakeStep:
    """`flat_map_batch` mapper around `Intake`: tags each output for the branches below."""

    def __init__(self, intake: Intake, lag: LagTracker | None = None) -> None:
        self.intake = intake
        self.lag = lag

    def __call__(self, items: list[Any]) -> list[tuple[str, Any]]:
        messages = [item for item in items if not isinstance(item, KafkaError)]
        if len(messages) != len(items):
            for item in items:
                if isinstance(item, KafkaError):
                    _log_consumer_error(item)
        if self.lag is not None and messages:
            # Offsets ascend within a partition, so the last one per partition wins.
            self.lag.consumed({(m.topic, m.partition): m.offset for m in messages})
        result = self.intake.route(messages)
        _count(result)
        out: list[tuple[str, Any]] = [("dlq", letter) for letter in result.dead_letters]
        out.extend(("dedup", (key, (slot, pairs))) for (key, slot), pairs in result.by_slot.items())
        if result.unchecked:
            out.append(("direct", ("unchecked", result.unchecked)))
        if result.by_slot or result.events_by_type:
            out.append(("clock", (CLOCK_KEY, result.max_ts)))
            metrics.observe_clock(result.max_ts)
        return out


def _count(result: IntakeResult) -> None:
    for (topic, partition), n in result.messages_by_partition.items():
        metrics.MESSAGES.labels(topic=topic, partition=str(partition)).inc(n)
    for kind, n in result.events_by_type.items():
        metrics.EVENTS.labels(type=kind).inc(n)
    for reason, n in result.dropped.items():
        metrics.DROPPED.labels(reason=reason).inc(n)


def by_feature_shard(updates: Iterable[Update], shards: int) -> list[tuple[str, list[Update]]]:
    """Counter updates grouped by the state shard of their key (CRC32, stable everywhere)."""
    grouped: dict[int, list[Update]] = {}
    for update in updates:
        idx = zlib.crc32(update[1].encode("utf-8")) % shards
        batch = grouped.get(idx)
        if batch is None:
            grouped[idx] = [update]
        else:
            batch.append(update)
    return [(str(idx), batch) for idx, batch in grouped.items()]


class FanOut:
    """`flat_map_batch` mapper: accepted events → counter updates grouped by state shard."""

    def __init__(self, params: FeatureParams, shards: int) -> None:
        self.params = params
        self.shards = shards

    def __call__(self, batches: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Update]]]:
        params = self.params
        return by_feature_shard(
            (u for _key, events in batches for e in events for u in updates_for(e, params)),
            self.shards,
        )


class LinkRouter:
    """`flat_map_batch` mapper: accepted events → autocomplete-link join items by session
    shard ("join"), and the `+1 select` of selects without a session by state shard
    ("count")."""

    def __init__(self, link_shards: int, feature_shards: int) -> None:
        self.link_shards = link_shards
        self.feature_shards = feature_shards

    def __call__(self, batches: list[tuple[str, list[Any]]]) -> list[tuple[str, Any]]:
        routed = aclink.route((e for _key, events in batches for e in events), self.link_shards)
        out: list[tuple[str, Any]] = [("join", kv) for kv in routed.by_shard.items()]
        out.extend(("count", kv) for kv in by_feature_shard(routed.direct, self.feature_shards))
        if routed.labels:
            by_shard: dict[str, dict[str, str]] = {}
            for suffix, text in routed.labels.items():
                shard = str(zlib.crc32(suffix.encode("utf-8")) % self.feature_shards)
                by_shard.setdefault(shard, {})[suffix] = text
            out.extend(("count", kv) for kv in by_shard.items())
        return out


class LinkFanOut:
    """`flat_map_batch` mapper: the join's increments, regrouped by state shard."""

    def __init__(self, feature_shards: int) -> None:
        self.feature_shards = feature_shards

    def __call__(self, batches: list[tuple[str, list[Update]]]) -> list[tuple[str, list[Update]]]:
        return by_feature_shard((u for _k, ups in batches for u in ups), self.feature_shards)


def _tagged(tag: str) -> Any:
    def pick(item: tuple[str, Any]) -> Any:
        return item[1] if item[0] == tag else None

    return pick


def _log_consumer_error(err: Any) -> None:
    metrics.CONSUMER_ERRORS.labels(topic=getattr(err.msg, "topic", None) or "").inc()
    log.error("kafka consumer error", extra={"error": str(err.err)})


# --- the dataflow ------------------------------------------------------------------------


def kafka_source(config: Config, lag: LagTracker | None = None) -> Source[Any]:
    """The input: every partition of `KAFKA_TOPICS`, offsets kept in recovery snapshots.
    With `lag`, the partitions this process reads are reported to it (consumer lag)."""
    source = KafkaSource(
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
    sink is added when `OPENSEARCH_URL` is set and `with_opensearch` is true."""
    flow = Dataflow(flow_id)
    lag = None
    if source is None:
        lag = LagTracker(lambda: KafkaOffsets(config.kafka))
        source = kafka_source(config, lag)
    messages = op.input("kafka_in", flow, source)

    intake = Intake(
        future_tolerance_ms=config.future_tolerance_ms,
        dedup_shards=config.dedup_shards,
        now_ms=lambda: int(time.time() * 1000),
    )
    routed = op.flat_map_batch("intake", messages, IntakeStep(intake, lag))
    dead_letters = op.filter_map("dead_letters", routed, _tagged("dlq"))
    to_dedup = op.filter_map("to_dedup", routed, _tagged("dedup"))
    readings = op.filter_map("clock_readings", routed, _tagged("clock"))
    unchecked = op.filter_map("past_dedup_horizon", routed, _tagged("direct"))

    clock = op.stateful_batch(
        "clock",
        readings,
        lambda resume: ClockLogic(config.feature_shards, resume),
    )
    day_ticks = op.flat_map("day_ticks", clock, lambda keyed: keyed[1])

    accepted = op.stateful_batch("dedup", to_dedup, DedupLogic)
    to_count = op.merge("to_count", accepted, unchecked)
    updates = op.flat_map_batch("fan_out", to_count, FanOut(config.features, config.feature_shards))

    link_routed = op.flat_map_batch(
        "link_route", to_count, LinkRouter(config.link_shards, config.feature_shards)
    )
    to_join = op.filter_map("to_join", link_routed, _tagged("join"))
    unlinked = op.filter_map("selects_without_session", link_routed, _tagged("count"))
    joined = op.stateful_batch(
        "aclink", to_join, lambda resume: LinkLogic(config.link_grace_ms, resume)
    )
    link_updates = op.flat_map_batch("link_fan_out", joined, LinkFanOut(config.feature_shards))

    shard_in = op.merge("shard_in", updates, link_updates, unlinked, day_ticks)
    results = op.stateful_batch(
        "features",
        shard_in,
        lambda resume: ShardLogic(config.features, config.flush_interval_ms, resume),
    )
    writes = op.key_rm("writes", results)

    op.output("redis", writes, redis_sink or RedisFeatureSink(config.redis))
    if with_opensearch and config.opensearch.enabled:
        opensearch.attach(writes, config.opensearch)
    op.output("dlq", dead_letters, dlq_sink or DeadLetterSink(config.kafka))
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
