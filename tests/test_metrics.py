"""Metrics move as they should, read back through the Prometheus registry that /metrics serves.

Counters are process-global, so every test compares a sample before and after, and uses its
own topic name where a label can tell runs apart.
"""

from __future__ import annotations

import gc
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from dataflow import metrics
from dataflow.config import Config, RedisSettings
from dataflow.core.deadletter import DeadLetter
from dataflow.core.shard import StepResult
from dataflow.errors import SinkError
from dataflow.flow import DedupLogic, build_flow
from dataflow.retry import NO_WAIT
from dataflow.sinks.deadletters import _DeadLetterPartition
from dataflow.sinks.redis import RedisWriter, _RedisPartition
from tests.fakes import FakeRedis, MemoryStore, MemoryStoreSink, kafka_messages
from tests.registry import Delta, sample

NOW = int(time.time() * 1000)
DAY = 86_400_000
# Label names with a small, bounded set of values; never a key, an id, a query or a doc.
LOW_CARDINALITY_LABELS = {
    "step", "type", "topic", "partition", "reason", "sink", "result", "kind", "outcome",
    "trigger", "family", "parameter",
}  # fmt: skip


def click(event_id: str, ts: int = NOW - 60_000, doc: str = "d1") -> bytes:
    return json.dumps(
        {"event_id": event_id, "type": "click", "ts": ts, "query": "shoes", "doc_id": doc}
    ).encode()


class _Probe(StatelessSinkPartition[Any]):
    """Writes into a MemoryStore, and reads gauges while the dataflow (and its state) is alive."""

    def __init__(self, store: MemoryStore, seen: list[dict[str, float]]) -> None:
        self.store, self.seen = store, seen

    def write_batch(self, items: list[StepResult]) -> None:
        self.store.apply(items)
        self.seen.append(
            {
                "state_keys": sample("search_features_state_keys"),
                "dedup_ids": sample("search_features_dedup_ids"),
                "clock": sample("search_features_clock_seconds"),
            }
        )


class ProbeSink(DynamicSink[StepResult]):
    def __init__(self, store: MemoryStore, seen: list[dict[str, float]]) -> None:
        self.store, self.seen = store, seen

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Probe:
        return _Probe(self.store, self.seen)


def run_flow(
    values: list[bytes], topic: str, seen: list[dict[str, float]] | None = None
) -> tuple[MemoryStore, list[DeadLetter]]:
    config = Config.from_env({"OPENSEARCH_URL": "", "FEATURE_SHARDS": "3", "DEDUP_SHARDS": "2"})
    store, dead = MemoryStore(config.redis.prefix), []
    sink: DynamicSink[StepResult] = (
        MemoryStoreSink(store) if seen is None else ProbeSink(store, seen)
    )
    flow = build_flow(
        config,
        source=TestingSource(kafka_messages(values, topic=topic)),
        redis_sink=sink,
        dlq_sink=TestingSink(dead),
    )
    run_main(flow)
    return store, dead


def fresh_topic() -> str:
    return f"metrics-{uuid.uuid4().hex[:8]}"


# --- through the dataflow ----------------------------------------------------------------


def test_a_duplicate_increments_the_duplicate_reason_and_counts_both_copies() -> None:
    topic = fresh_topic()
    with (
        Delta("search_features_events_dropped_total", reason="duplicate") as dup,
        Delta("search_features_events_total", type="click") as clicks,
        Delta("search_features_messages_total", topic=topic, partition="0") as read,
    ):
        store, dead = run_flow([click("e1"), click("e2", doc="d2"), click("e1")], topic)
    assert dup.value == 1
    assert clicks.value == 3  # consumed: the copy is a valid event, dropped after dedup
    assert read.value == 3
    assert dead == []
    assert store.hashes  # the two distinct clicks were counted


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (json.dumps({"event_id": "x", "type": "click", "ts": NOW}).encode(), "invalid_event"),
        (json.dumps({"event_id": "x", "type": "purchase", "ts": NOW}).encode(), "unknown_type"),
        (click("x", ts=NOW + 2 * DAY), "future_timestamp"),
    ],
)
def test_a_broken_message_increments_its_reason_only(payload: bytes, reason: str) -> None:
    topic = fresh_topic()
    others = [r for r in metrics.DROP_REASONS if r != reason]
    before = {r: sample("search_features_events_dropped_total", reason=r) for r in others}
    with (
        Delta("search_features_events_dropped_total", reason=reason) as dropped,
        Delta("search_features_messages_total", topic=topic, partition="0") as read,
    ):
        _, dead = run_flow([payload], topic)
    assert dropped.value == 1
    assert read.value == 1
    assert [d.reason for d in dead] == [reason]
    after = {r: sample("search_features_events_dropped_total", reason=r) for r in others}
    assert after == before


def test_an_event_older_than_the_window_is_dropped_as_late() -> None:
    with Delta("search_features_events_dropped_total", reason="late") as late:
        run_flow([click("new"), click("old", ts=NOW - 40 * DAY)], fresh_topic())
    assert late.value == 1


def test_clock_and_state_keys_are_reported_while_the_flow_runs() -> None:
    seen: list[dict[str, float]] = []
    ts = [NOW - 120_000, NOW - 60_000, NOW - 90_000]
    values = [click(f"s{i}", ts=t, doc=f"d{i}") for i, t in enumerate(ts)]
    store, _ = run_flow(values, fresh_topic(), seen)
    assert seen, "the sink never wrote"
    assert seen[-1]["clock"] == max(ts) / 1000
    # Every key written is held in a state shard, which is alive while its writes land.
    assert seen[-1]["state_keys"] >= len(store.hashes) > 0


def test_dedup_size_is_reported_and_leaves_with_its_logic() -> None:
    before = sample("search_features_dedup_ids")
    logic = DedupLogic(None)
    logic.on_batch([(7, 0, [(1, "a"), (2, "b"), (1, "a")])])
    assert sample("search_features_dedup_ids") == before + 2
    del logic
    gc.collect()
    assert sample("search_features_dedup_ids") == before


# --- the Redis sink ------------------------------------------------------------------------


def writer(client: FakeRedis, outage_exit_seconds: int = 0) -> RedisWriter:
    settings = RedisSettings(outage_exit_seconds=outage_exit_seconds)
    clock = iter(range(0, 10**6, 10))  # ten seconds more at every reading
    return RedisWriter(client, settings, NO_WAIT, clock=lambda: next(clock))  # type: ignore[arg-type]


WRITES = [("doc:d1", {"as_of": str(NOW - 5_000), "clicks": "1"}), ("doc:d2", None)]


def test_a_redis_outage_past_the_exit_limit_counts_one_failure() -> None:
    client = FakeRedis([redis.ConnectionError("down")] * 10)
    with (
        Delta("search_features_sink_writes_total", sink="redis", result="failure") as failed,
        Delta("search_features_sink_writes_total", sink="redis", result="retry") as retried,
        Delta("search_features_sink_writes_total", sink="redis", result="success") as ok,
        pytest.raises(SinkError, match="REDIS_OUTAGE_EXIT_SECONDS=20"),
    ):
        writer(client, outage_exit_seconds=20).write(list(WRITES))  # type: ignore[arg-type]
    assert client.attempts == 3  # failing at 0 s, 10 s, 20 s: the limit
    assert failed.value == len(WRITES)
    assert retried.value == 3 * len(WRITES)
    assert ok.value == 0
    writer(FakeRedis()).write(list(WRITES))  # type: ignore[arg-type]  # back up, for the next


def test_a_rejected_redis_command_fails_without_retrying() -> None:
    client = FakeRedis([redis.ResponseError("WRONGTYPE")])
    with (
        Delta("search_features_sink_writes_total", sink="redis", result="failure") as failed,
        Delta("search_features_sink_writes_total", sink="redis", result="retry") as retried,
        pytest.raises(SinkError, match="WRONGTYPE"),
    ):
        writer(client).write(list(WRITES))  # type: ignore[arg-type]
    assert (failed.value, retried.value, client.attempts) == (len(WRITES), 0, 1)


def test_a_retried_redis_write_counts_retry_then_success() -> None:
    client = FakeRedis([redis.TimeoutError("slow")])
    with (
        Delta("search_features_sink_writes_total", sink="redis", result="retry") as retried,
        Delta("search_features_sink_writes_total", sink="redis", result="success") as ok,
        Delta("search_features_sink_writes_total", sink="redis", result="failure") as failed,
    ):
        writer(client).write(list(WRITES))  # type: ignore[arg-type]
    assert (retried.value, ok.value, failed.value) == (len(WRITES), len(WRITES), 0)


def test_a_redis_flush_records_batch_size_latency_and_freshness() -> None:
    part = _RedisPartition(writer(FakeRedis()))
    now = int(time.time() * 1000)
    event_driven = StepResult(writes=[("doc:d1", {"as_of": str(now - 5_000)})], fresh=[now - 5_000])
    coalesced = StepResult(
        writes=[("doc:d1", {"as_of": str(now - 4_000)}), ("doc:d2", None)], fresh=[now - 4_000]
    )
    new_day = StepResult(writes=[("doc:d3", {"as_of": str(now - 9 * DAY)})], new_day=True)
    with (
        Delta("search_features_sink_batch_size_count", sink="redis") as batches,
        Delta("search_features_sink_batch_size_sum", sink="redis") as keys,
        Delta("search_features_sink_flush_seconds_count", sink="redis") as flushes,
        Delta("search_features_freshness_seconds_count") as fresh,
        Delta("search_features_freshness_seconds_bucket", le="10.0") as within_10s,
        Delta("search_features_sink_writes_total", sink="redis", result="success") as ok,
    ):
        part.write_batch([event_driven, coalesced, new_day])
    assert batches.value == 1
    assert keys.value == 3  # d1 coalesced, d2 deleted, d3 restated
    assert flushes.value == 1
    # Two event-driven writes of fields (not the delete, not the new-day restatement), both
    # a few seconds old.
    assert fresh.value == 2
    assert within_10s.value == 2
    assert ok.value == 3


@given(
    st.lists(st.integers(min_value=-(10**7), max_value=10**7), max_size=300),
    st.floats(min_value=0, max_value=1),
)
def test_observe_fresh_counts_what_observing_each_keys_age_counts(
    offsets: list[int], fraction: float
) -> None:
    """Ages from an hour ahead (clock skew: age 0) to a few hours behind, around bounds."""
    registry = CollectorRegistry()
    now_ms = 1_790_000_000_000 + fraction
    bounds = metrics.FRESHNESS._upper_bounds[:-1]
    as_of = [int(now_ms - 1000 * b) + d for b in bounds for d in (-1, 0, 1)] + [
        int(now_ms) + offset for offset in offsets
    ]
    one_by_one = Histogram("one", "", buckets=bounds, registry=registry)
    at_once = Histogram("many", "", buckets=bounds, registry=registry)
    for t in as_of:
        one_by_one.observe(max(0.0, (now_ms - t) / 1000.0))
    metrics.observe_fresh(now_ms, as_of, at_once)
    [one], [many] = ([m for m in registry.collect() if m.name == name] for name in ("one", "many"))
    expected = {s.name[3:] + str(s.labels): s.value for s in one.samples if "created" not in s.name}
    got = {s.name[4:] + str(s.labels): s.value for s in many.samples if "created" not in s.name}
    assert got.pop("_sum{}") == pytest.approx(expected.pop("_sum{}"), rel=1e-12, abs=1e-9)
    assert got == expected


def test_timed_observes_the_flush_and_returns_its_seconds() -> None:
    with Delta("search_features_sink_flush_seconds_count", sink="opensearch") as count:
        stop = metrics.timed("opensearch")
        elapsed = stop()
    assert count.value == 1
    assert 0 <= elapsed < 5


# --- the dead-letter sink ------------------------------------------------------------------


class FakeProducer:
    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.pending: list[Callable[[Any, Any], None]] = []

    def produce(
        self, topic: str, value: bytes, key: bytes, on_delivery: Callable[[Any, Any], None]
    ) -> None:
        self.pending.append(on_delivery)

    def flush(self, timeout: float) -> int:
        for callback in self.pending:
            callback(self.error, None)
        self.pending.clear()
        return 0


LETTERS = [DeadLetter(b"t:0:1", b"{}", "invalid_json"), DeadLetter(b"t:0:2", b"{}", "unknown_type")]


def test_dead_letters_count_success_and_failure() -> None:
    with Delta("search_features_dead_letters_written_total", result="success") as ok:
        _DeadLetterPartition(FakeProducer(), "dlq").write_batch(LETTERS)  # type: ignore[arg-type]
    assert ok.value == 2
    with (
        Delta("search_features_dead_letters_written_total", result="failure") as failed,
        pytest.raises(SinkError, match="dead-letter topic"),
    ):
        part = _DeadLetterPartition(FakeProducer("broker down"), "dlq")  # type: ignore[arg-type]
        part.write_batch(LETTERS)
    assert failed.value == 2


# --- names and exposure ------------------------------------------------------------------


def _our_families() -> Iterator[Metric]:
    for family in REGISTRY.collect():
        if family.name.startswith(metrics.NAMESPACE + "_"):
            yield family


def test_every_metric_follows_prometheus_naming_with_low_cardinality_labels() -> None:
    families = list(_our_families())
    assert len(families) >= 15
    for family in families:
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        assert labels <= LOW_CARDINALITY_LABELS, (family.name, labels)
        if family.type == "counter":  # exposed as <name>_total
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_size")), family.name


def test_known_label_values_exist_at_zero_before_anything_happens() -> None:
    # So that rate()/increase() catch the very first failure (see metrics._declare_label_values).
    for reason in ("invalid_json", "invalid_event", "unknown_type", "future_timestamp"):
        assert (
            REGISTRY.get_sample_value("search_features_events_dropped_total", {"reason": reason})
            is not None
        )
    for sink in ("redis", "opensearch"):
        for result in ("success", "failure", "retry"):
            labels = {"sink": sink, "result": result}
            value = REGISTRY.get_sample_value("search_features_sink_writes_total", labels)
            assert value is not None, labels
    assert metrics.DROP_REASONS == (
        "invalid_json", "invalid_event", "unknown_type", "future_timestamp", "duplicate", "late"
    )  # fmt: skip


def test_the_exposition_serves_our_metrics_and_bytewax_lag() -> None:
    text = generate_latest(REGISTRY).decode()
    for name in (
        "search_features_events_total",
        "search_features_events_dropped_total",
        "search_features_sink_writes_total",
        "search_features_freshness_seconds_bucket",
        "search_features_clock_seconds",
        "search_features_state_keys",
        "search_features_dedup_ids",
        "# TYPE search_features_consumer_lag gauge",
        "# TYPE bytewax_kafka_consumer_lag gauge",
    ):
        assert name in text, name
