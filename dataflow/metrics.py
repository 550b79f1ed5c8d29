"""Every Prometheus metric of the pipeline, in one place.

They live in the default `prometheus_client` registry, which `python -m bytewax.run` serves
on `/metrics` (port `BYTEWAX_DATAFLOW_API_PORT`, default 3030) when
`BYTEWAX_DATAFLOW_API_ENABLED` is set. Labels are low-cardinality on purpose: step, topic,
partition, type, reason, sink, result; never a key or an id. Each process of a cluster
serves its own numbers; sum them in PromQL.

Kafka consumer lag per topic/partition is `search_features_consumer_lag`, measured by
`dataflow.kafka.lag` off the hot path. Bytewax's own `bytewax_kafka_consumer_lag` is served too, but
it is only updated while the input step polls Kafka: when a sink blocks the worker it
freezes (or never appears) exactly when the lag grows. docs/observability.md lists them all.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from dataflow.core.events import EVENT_TYPES, REASONS

NAMESPACE = "search_features"

DROP_REASONS = (*REASONS, "duplicate", "late")
"""Every value of `events_dropped_total{reason}`: the dead-letter reasons, then the drops
that happen after decoding."""
SINKS = ("redis", "opensearch")
SINK_RESULTS = ("success", "failure", "retry")

EVENTS = Counter(
    "events",
    "Valid events read from Kafka, by event type.",
    ["type"],
    namespace=NAMESPACE,
)
MESSAGES = Counter(
    "messages",
    "Kafka messages read, valid or not, by topic and partition.",
    ["topic", "partition"],
    namespace=NAMESPACE,
)
DROPPED = Counter(
    "events_dropped",
    "Messages or events not counted into features, by reason "
    "(invalid_json, invalid_event, unknown_type, future_timestamp, duplicate, late).",
    ["reason"],
    namespace=NAMESPACE,
)
LATE_UPDATES = Counter(
    "late_updates",
    "Counter updates a state shard dropped because their day had left the 30-day window "
    "of the shard's clock (the per-key view of `events_dropped{reason=late}`).",
    namespace=NAMESPACE,
)
CONSUMER_ERRORS = Counter(
    "consumer_errors",
    "Errors reported by the Kafka consumer (logged; the consumer retries by itself).",
    ["topic"],
    namespace=NAMESPACE,
)
OFFSETS_SKIPPED = Counter(
    "offsets_skipped",
    "Kafka messages lost to retention before they were read: a resume from a recovery "
    "snapshot found the partition's earliest retained offset past the snapshotted one "
    "(dataflow.kafka.source); the features miss these events.",
    ["topic", "partition"],
    namespace=NAMESPACE,
)
DEAD_LETTERS = Counter(
    "dead_letters_written",
    "Envelopes written to the dead-letter topic, by result (success, failure).",
    ["result"],
    namespace=NAMESPACE,
)
SINK_WRITES = Counter(
    "sink_writes",
    "Feature writes (one per key or document) by sink and result (success, failure, retry).",
    ["sink", "result"],
    namespace=NAMESPACE,
)
SINK_UP = Gauge(
    "sink_up",
    "1 while the sink's store takes writes, 0 from a failed write until a write succeeds "
    "again: writes wait meanwhile (retried with capped backoff) and the pipeline reads "
    "nothing. By sink (redis).",
    ["sink"],
    namespace=NAMESPACE,
)
SINK_BATCH = Histogram(
    "sink_batch_size",
    "Keys or documents per flushed batch, by sink.",
    ["sink"],
    namespace=NAMESPACE,
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000),
)
SINK_FLUSH = Histogram(
    "sink_flush_seconds",
    "Time to flush one batch to a sink, retries included, by sink.",
    ["sink"],
    namespace=NAMESPACE,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FRESHNESS = Histogram(
    "freshness_seconds",
    "Event time of a key's newest event to the moment its features were written to Redis.",
    namespace=NAMESPACE,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)
CONSUMER_LAG = Gauge(
    "consumer_lag",
    "Messages in a Kafka partition not yet read by this process: the partition's end offset "
    "(high watermark, refreshed about once a second) minus the next offset to read.",
    ["topic", "partition"],
    namespace=NAMESPACE,
)
LAG_REFRESH_FAILURES = Counter(
    "consumer_lag_refresh_failures",
    "Failed attempts to read partition end offsets for the lag gauge (it keeps its last values).",
    namespace=NAMESPACE,
)
CLOCK = Gauge(
    "clock_seconds",
    "The pipeline's event-time clock: the largest valid event ts seen (Unix seconds).",
    namespace=NAMESPACE,
)
OPENSEARCH_PENDING = Gauge(
    "opensearch_pending_docs",
    "Documents waiting to be sent to OpenSearch (coalesced; bounded by OPENSEARCH_MAX_PENDING).",
    namespace=NAMESPACE,
)
OPENSEARCH_FAILURES = Counter(
    "opensearch_failures",
    "Documents OpenSearch rejected for good (not retried), by OpenSearch's error type "
    "(mapper_parsing_exception, document_missing_exception, ...).",
    ["reason"],
    namespace=NAMESPACE,
)
OPENSEARCH_UPDATES = Counter(
    "opensearch_updates",
    "Document updates that reached the OpenSearch sink, by what became of them: queued (a "
    "document became pending), coalesced (replaced a pending value), skipped (no rank feature "
    "moved by OPENSEARCH_MIN_CHANGE from what OpenSearch holds), shed_update / shed_delete "
    "(pending set full, OPENSEARCH_MAX_PENDING: not kept, or an update evicted to make room "
    "for a deletion). withdrawn: pending documents dropped before sending because they had "
    "come back within the threshold (already counted as queued or coalesced). unlabelled / "
    "invalid_id: keys skipped for want of a document id (a hashed acq key without its "
    "candidate label; an empty id or a candidate over OpenSearch's 512-byte _id limit).",
    ["outcome"],
    namespace=NAMESPACE,
)
OPENSEARCH_UPDATE_OUTCOMES = (
    "queued",
    "coalesced",
    "skipped",
    "shed_update",
    "shed_delete",
    "withdrawn",
    "unlabelled",
    "invalid_id",
)
for _outcome in OPENSEARCH_UPDATE_OUTCOMES:  # at zero, so the first shed shows in increase()
    OPENSEARCH_UPDATES.labels(outcome=_outcome)
RESTATED = Counter(
    "keys_restated",
    "Keys re-written from the re-statement queue: after the clock entered a new day (idle "
    "keys kept true), or to repair a store that lost data.",
    namespace=NAMESPACE,
)
REPAIR_TRIGGERS = ("start", "missing", "changed")
STORE_REPAIRS = Counter(
    "store_repairs",
    "Repairs of the feature store started by this process, which then re-writes every live "
    "key it holds (dataflow.sinks.marker), by trigger: start (its marker missing when the "
    "process started: a new store or prefix, or data lost while stopped), missing (the "
    "marker vanished while running: Redis emptied, FLUSHDB, a failover, "
    "dataflow.tools.resync), changed (the marker holds another value: a restored backup).",
    ["trigger"],
    namespace=NAMESPACE,
)
EXPIRED = Counter(
    "keys_expired",
    "Keys deleted because their 30-day counts all reached zero.",
    namespace=NAMESPACE,
)
SEGMENT_KINDS = ("written", "retired", "read")
STATE_SEGMENTS = Counter(
    "state_segments",
    "Segments of the feature shards' recovery state in KAFKA_STATE_TOPIC, by what happened "
    "to them: written (acknowledged by Kafka), retired (a tombstone sent), read (a restore).",
    ["kind"],
    namespace=NAMESPACE,
)
STATE_SEGMENT_BYTES = Counter(
    "state_segment_bytes",
    "Bytes of key states written to KAFKA_STATE_TOPIC in segments (before compression).",
    namespace=NAMESPACE,
)


class _SizeBoard:
    """Sizes reported by many state shards, summed into one gauge at scrape time.

    Owners are held weakly: when Bytewax drops a shard's logic (its state discarded, or the
    dataflow ended), its size leaves the total with it.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self._sizes: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        gauge = Gauge(name, documentation, namespace=NAMESPACE)
        gauge.set_function(self.total)

    def report(self, owner: object, size: int) -> None:
        with self._lock:
            self._sizes[owner] = size

    def total(self) -> float:
        with self._lock:
            return float(sum(self._sizes.values()))


STATE_KEYS = _SizeBoard("state_keys", "Feature keys held in state by this process.")
DEDUP_IDS = _SizeBoard("dedup_ids", "Event-id digests held for dedup by this process.")
KEYS_TO_RESTATE = _SizeBoard(
    "keys_to_restate",
    "Feature keys queued for re-statement and not written yet by this process: after a new "
    "day, or to repair a store that lost data (written at RESTATE_KEYS_PER_SECOND).",
)
DEDUP_WATERMARK_LAG = Gauge(
    "dedup_watermark_lag_seconds",
    "How far the dedup watermark (the slowest partition's clock) trails the fastest partition, "
    "in event time. Ids are held this much longer than 24 hours; large while partitions are "
    "read far apart (a backfill, a stalled consumer) or one partition stopped receiving events.",
    namespace=NAMESPACE,
)
DEDUP_UNHELD_CHECKS = Counter(
    "dedup_unheld_checks",
    "Dedup checks of a slot already forgotten: a partition that joined the watermark after it "
    "had passed that slot delivered an event for it. Copies of it read elsewhere earlier "
    "cannot be recognised.",
    namespace=NAMESPACE,
)
LINK_SESSIONS = _SizeBoard(
    "link_sessions", "Sessions held by the autocomplete-link join in this process."
)
LINK_STALE = Counter(
    "link_stale_events",
    "Autocomplete-link events read more than 30 min + ACQ_LINK_GRACE_SECONDS after their own "
    "ts (a late upload, a backlog): selects still count, and links within the session's own "
    "upload are made, but a partner read earlier than that hold may have been dropped.",
    namespace=NAMESPACE,
)

PRIOR_FAMILIES = ("doc", "qd", "ac")
PRIOR = Gauge(
    "prior",
    "The newest prior sent for a family whose prior is fitted (SMOOTHING_{FAMILY}_PRIOR="
    "fitted), by parameter (alpha, beta) and the day it is in force from (day, days since "
    "1970-01-01); the configured one when the fit fell back.",
    ["family", "parameter"],
    namespace=NAMESPACE,
)
PRIOR_FITS = Counter(
    "prior_fits",
    "Priors fitted for a family, by result: fitted, or fallback (too few keys with enough "
    "impressions, or no spread between them beyond chance: the configured prior is used).",
    ["family", "result"],
    namespace=NAMESPACE,
)


def observe_clock(clock_ms: int) -> None:
    CLOCK.set(clock_ms / 1000.0)


def observe_fresh(now_ms: float, as_of: Sequence[int], histogram: Histogram = FRESHNESS) -> None:
    """Observe the freshness of keys written at `now_ms` whose newest events are `as_of`:
    `max(0, now_ms - t) / 1000` seconds each, with the counts and sum that observing them
    one by one gives (`tests/test_metrics.py` holds it to that), in one pass: each bucket's
    count and the sum are added to once, not once per key (a lock each), so a writer of tens
    of thousands of keys a second does not spend its time, and the worker's turns with the
    interpreter, there. The `as_of` are sorted once; a key is at most `b` seconds old when
    `t >= now_ms - 1000 * b`, so no float is made per key."""
    if not as_of:
        return
    ordered = sorted(as_of)
    n = len(ordered)
    # prometheus_client has no bulk observe. Its Histogram keeps a value per bucket
    # (`_buckets`; an amount counts in the first whose upper bound is >= it) and the sum.
    parts: Any = histogram
    below = 0
    for index, bound in enumerate(parts._upper_bounds):
        at_most = n if bound == math.inf else n - bisect_left(ordered, now_ms - 1000.0 * bound)
        if at_most > below:
            parts._buckets[index].inc(at_most - below)
            below = at_most
    past = bisect_left(ordered, now_ms)  # the keys with events before now
    if past:
        whole = int(now_ms)
        total_ms = (past * whole - sum(ordered[:past])) + past * (now_ms - whole)
        parts._sum.inc(total_ms / 1000.0)


def timed(sink: str) -> Callable[[], float]:
    """Start a flush timer for `sink`; call the result to record and return the seconds."""
    start = time.perf_counter()

    def stop() -> float:
        elapsed = time.perf_counter() - start
        SINK_FLUSH.labels(sink=sink).observe(elapsed)
        return elapsed

    return stop


def _declare_label_values() -> None:
    """Create every known label combination at zero.

    A series that appears for the first time at 1 has no earlier sample to differ from, so
    `rate()`/`increase()` miss that first increment: the first Redis failure would never
    fire an alert. Declared series start at 0 and every increment counts.
    """
    for kind in EVENT_TYPES:
        EVENTS.labels(type=kind)
    for reason in DROP_REASONS:
        DROPPED.labels(reason=reason)
    for result in ("success", "failure"):
        DEAD_LETTERS.labels(result=result)
    for family in PRIOR_FAMILIES:
        for result in ("fitted", "fallback"):
            PRIOR_FITS.labels(family=family, result=result)
    for trigger in REPAIR_TRIGGERS:
        STORE_REPAIRS.labels(trigger=trigger)
    for kind in SEGMENT_KINDS:
        STATE_SEGMENTS.labels(kind=kind)
    for sink in SINKS:
        SINK_BATCH.labels(sink=sink)
        SINK_FLUSH.labels(sink=sink)
        for result in SINK_RESULTS:
            SINK_WRITES.labels(sink=sink, result=result)


_declare_label_values()
