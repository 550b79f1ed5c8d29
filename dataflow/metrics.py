"""Every Prometheus metric of the pipeline, in one place.

They live in the default `prometheus_client` registry, which `python -m bytewax.run` serves
on `/metrics` (port `BYTEWAX_DATAFLOW_API_PORT`, default 3030) when
`BYTEWAX_DATAFLOW_API_ENABLED` is set. Labels are low-cardinality on purpose: step, topic,
partition, type, reason, sink, result; never a key or an id. Each process of a cluster
serves its own numbers; sum them in PromQL.

Kafka consumer lag per topic/partition is Bytewax's own gauge `bytewax_kafka_consumer_lag`,
updated from librdkafka statistics every second.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "search_features"

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
DEAD_LETTERS = Counter(
    "dead_letters_written",
    "Envelopes written to the dead-letter topic, by result (success, failure).",
    ["result"],
    namespace=NAMESPACE,
)
SINK_WRITES = Counter(
    "sink_writes",
    "Feature writes (one per key or document) by sink and result "
    "(success, failure, retry).",
    ["sink", "result"],
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
CLOCK = Gauge(
    "clock_seconds",
    "The pipeline's event-time clock: the largest valid event ts seen (Unix seconds).",
    namespace=NAMESPACE,
)
OPENSEARCH_PENDING = Gauge(
    "opensearch_pending_docs",
    "Documents waiting to be sent to OpenSearch (coalesced; bounded by "
    "OPENSEARCH_MAX_PENDING).",
    namespace=NAMESPACE,
)
RESTATED = Counter(
    "keys_restated",
    "Keys re-written because the clock entered a new day (idle keys kept true).",
    namespace=NAMESPACE,
)
EXPIRED = Counter(
    "keys_expired",
    "Keys deleted because their 30-day counts all reached zero.",
    namespace=NAMESPACE,
)


class _SizeBoard:
    """Sizes reported by many state shards, summed into one gauge at scrape time."""

    def __init__(self, name: str, documentation: str) -> None:
        self._sizes: dict[object, int] = {}
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


def observe_clock(clock_ms: int) -> None:
    CLOCK.set(clock_ms / 1000.0)


def timed(sink: str) -> Callable[[], float]:
    """Start a flush timer for `sink`; call the result to record and return the seconds."""
    import time

    start = time.perf_counter()

    def stop() -> float:
        elapsed = time.perf_counter() - start
        SINK_FLUSH.labels(sink=sink).observe(elapsed)
        return elapsed

    return stop
