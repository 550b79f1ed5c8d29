"""Consumer lag: our own gauge from the brokers' end offsets and the positions intake reports."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from bytewax.connectors.kafka import KafkaError as BytewaxKafkaError
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from prometheus_client import REGISTRY

from dataflow.core.intake import Intake
from dataflow.flow import IntakeReport
from dataflow.kafka.intake import IntakePartition
from dataflow.kafka.lag import LagTracker, LagTrackingSource, Partition
from tests.fakes import kafka_messages
from tests.registry import Delta, sample

NOW = int(time.time() * 1000)


def click(event_id: str, ts: int = NOW - 60_000, doc: str = "d1") -> bytes:
    return json.dumps(
        {"event_id": event_id, "type": "click", "ts": ts, "query": "shoes", "doc_id": doc}
    ).encode()


class _Batch(StatefulSourcePartition[Any, Any]):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def next_batch(self) -> list[Any]:
        items, self.items = self.items, []
        return items

    def snapshot(self) -> None:
        return None


def read(items: list[Any]) -> Any:
    """One batch through the intake source partition, as the flow reads it."""
    intake = Intake(future_tolerance_ms=0, dedup_shards=1, now_ms=lambda: NOW)
    [result] = IntakePartition(_Batch(items), intake, {}).next_batch()
    return result


# --- consumer lag --------------------------------------------------------------------------


class FakeOffsets:
    def __init__(self, ends: dict[Partition, int], starts: dict[Partition, int]) -> None:
        self.ends, self.starts = ends, starts
        self.asked: list[tuple[list[Partition], list[Partition]]] = []
        self.fail = False

    def fetch(
        self, ends_of: Sequence[Partition], starts_of: Sequence[Partition]
    ) -> tuple[dict[Partition, int], dict[Partition, int]]:
        self.asked.append((list(ends_of), list(starts_of)))
        if self.fail:
            raise RuntimeError("no broker")
        return (
            {p: self.ends[p] for p in ends_of if p in self.ends},
            {p: self.starts[p] for p in starts_of if p in self.starts},
        )

    def close(self) -> None:
        pass


def lag_of(topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "search_features_consumer_lag", {"topic": topic, "partition": str(partition)}
    )


@pytest.fixture
def lag_topic() -> str:
    return f"lag-{uuid.uuid4().hex[:8]}"


def test_lag_is_end_offset_minus_next_offset(lag_topic: str) -> None:
    t = lag_topic
    offsets = FakeOffsets(ends={(t, 0): 100, (t, 1): 50, (t, 2): 7}, starts={(t, 0): 20})
    tracker = LagTracker(lambda: offsets, background=False)
    tracker.assigned(t, 0, None)  # from the beginning: the earliest retained offset
    tracker.assigned(t, 1, 30)  # resumed from a snapshot
    tracker.assigned(t, 2, 3)
    assert tracker.refresh() == {(t, 0): 80, (t, 1): 20, (t, 2): 4}
    assert offsets.asked[-1][1] == [(t, 0)]  # start offsets only where the position is unknown
    assert (lag_of(t, 0), lag_of(t, 1)) == (80, 20)

    tracker.consumed({(t, 0): 99, (t, 1): 39, (t, 2): 9})  # last offsets seen by intake
    assert tracker.refresh() == {(t, 0): 0, (t, 1): 10, (t, 2): 0}  # end lags the position: 0
    assert offsets.asked[-1][1] == []
    assert (lag_of(t, 0), lag_of(t, 1), lag_of(t, 2)) == (0, 10, 0)

    tracker.released(t, 1)
    assert lag_of(t, 1) is None  # no stale series for a partition this process gave up
    assert lag_of(t, 0) == 0


def test_intake_step_reports_the_last_offset_per_partition(lag_topic: str) -> None:
    t = lag_topic
    tracker = LagTracker(lambda: FakeOffsets({}, {}), background=False)
    batch: list[Any] = [
        *kafka_messages([click("a"), click("b")], topic=t, partition=0),
        *kafka_messages([click("c"), b"{bad"], topic=t, partition=1),
    ]
    IntakeReport(tracker)(read(batch))
    assert tracker.positions() == {(t, 0): 2, (t, 1): 2}


def test_a_kafka_error_item_is_counted_and_not_taken_for_a_position(lag_topic: str) -> None:
    t = lag_topic
    tracker = LagTracker(lambda: FakeOffsets({}, {}), background=False)
    [message] = kafka_messages([click("a")], topic=t, partition=0)
    error = BytewaxKafkaError(err="broker transport failure", msg=message)
    with Delta("search_features_consumer_errors_total", topic=t) as errors:
        IntakeReport(tracker)(read([error]))
    assert errors.value == 1
    assert tracker.positions() == {}


def test_the_lag_thread_keeps_measuring_and_counts_failures(lag_topic: str) -> None:
    t = lag_topic
    offsets = FakeOffsets(ends={(t, 0): 10}, starts={})
    tracker = LagTracker(lambda: offsets, interval=0.01)
    tracker.assigned(t, 0, 4)  # starts the thread
    threads = [th for th in threading.enumerate() if th.name == "search-features-lag"]
    assert threads, "no lag thread started"
    try:
        wait_for(lambda: lag_of(t, 0) == 6, "the thread never set the lag")
        offsets.ends[(t, 0)] = 25  # produced more, consumed nothing: the lag grows
        wait_for(lambda: lag_of(t, 0) == 21, "the lag did not follow the end offset")
        before = sample("search_features_consumer_lag_refresh_failures_total")
        offsets.fail = True
        wait_for(
            lambda: sample("search_features_consumer_lag_refresh_failures_total") > before,
            "a failing refresh was not counted",
        )
        assert lag_of(t, 0) == 21  # keeps its last value
    finally:
        tracker.released(t, 0)
    assert not any(th.is_alive() for th in threads)  # the last release stops the thread


def wait_for(condition: Callable[[], bool], message: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{message} within {timeout}s")
        time.sleep(0.01)


class _Part(StatefulSourcePartition[int, int]):
    def __init__(self) -> None:
        self.closed = False

    def next_batch(self) -> list[int]:
        return [1]

    def snapshot(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class _Source(FixedPartitionedSource[int, int]):
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.built: list[_Part] = []

    def list_parts(self) -> list[str]:
        return [f"0-{self.topic}", f"1-{self.topic}"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Part:
        self.built.append(_Part())
        return self.built[-1]


def test_the_tracking_source_reports_assignment_and_release(lag_topic: str) -> None:
    tracker = LagTracker(lambda: FakeOffsets({}, {}), background=False)
    inner = _Source(lag_topic)
    source = LagTrackingSource(inner, tracker)
    assert source.list_parts() == inner.list_parts()
    part = source.build_part("kafka_in", f"1-{lag_topic}", 42)
    assert tracker.positions() == {(lag_topic, 1): 42}
    assert list(part.next_batch()) == [1]
    part.close()
    assert inner.built[0].closed
    assert tracker.positions() == {}
