"""The resume check of `dataflow.kafka.source`: messages lost to retention are counted, holes in
the offset sequence that lose nothing (transaction markers, compaction) are not."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pytest
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflow import metrics
from dataflow.kafka.source import (
    GapCheckingPartition,
    KafkaRecord,
    OffsetGapCheckingSource,
    Positions,
    RecordPartition,
)

TOPIC = "events"


class FakePartition(StatefulSourcePartition[Any, Any]):
    def __init__(self, batches: list[list[Any]], resume: int | None) -> None:
        self.batches = batches
        self.offset = resume
        self.closed = False

    def next_batch(self) -> Iterable[Any]:
        return self.batches.pop(0) if self.batches else []

    def snapshot(self) -> Any:
        return self.offset

    def close(self) -> None:
        self.closed = True


class FakeSource(FixedPartitionedSource[Any, Any]):
    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches

    def list_parts(self) -> list[str]:
        return [f"0-{TOPIC}", f"1-{TOPIC}"]

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> FakePartition:
        return FakePartition(list(self.batches), resume_state)


def msg(offset: int, partition: int = 0) -> KafkaSourceMessage[bytes, bytes]:
    return KafkaSourceMessage(
        key=None, value=b"{}", topic=TOPIC, partition=partition, offset=offset
    )


def skipped(partition: int = 0) -> float:
    value = metrics.OFFSETS_SKIPPED.labels(topic=TOPIC, partition=str(partition))._value.get()
    return float(value)


def build(
    batches: list[list[Any]], resume: Any, earliest: list[int | None], partition: int = 0
) -> tuple[StatefulSourcePartition[Any, Any], list[tuple[str, int]]]:
    asked: list[tuple[str, int]] = []
    answers = iter(earliest)

    def earliest_offset(topic: str, part: int) -> int | None:
        asked.append((topic, part))
        return next(answers)

    source = OffsetGapCheckingSource(FakeSource(batches), earliest_offset)
    return source.build_part("kafka_in", f"{partition}-{TOPIC}", resume), asked


def drain(part: StatefulSourcePartition[Any, Any], batches: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(batches):
        out.extend(part.next_batch())
    return out


@pytest.mark.parametrize("resume", [None, -2])  # no snapshot, or one taken before any read
def test_a_partition_without_a_resume_offset_is_not_checked(resume: int | None) -> None:
    before = skipped(0)
    part, asked = build([[msg(500)]], resume, [100])  # 100..499 compacted: not a loss
    assert [m.offset for m in drain(part, 1)] == [500]
    assert asked == [(TOPIC, 0)]  # once, for its starting position
    assert skipped(0) == before


def test_positions_follow_every_partition() -> None:
    positions = Positions()

    def earliest(topic: str, partition: int) -> int | None:
        return {0: 7, 1: 0}[partition]

    fresh = GapCheckingPartition(
        FakePartition([[msg(7), msg(9)]], None), TOPIC, 0, None, earliest, positions=positions
    )
    resumed = GapCheckingPartition(
        FakePartition([[], [msg(41, 1)]], 40), TOPIC, 1, 40, earliest, positions=positions
    )
    assert positions.snapshot() == {(TOPIC, 0): 7, (TOPIC, 1): 40}
    fresh.next_batch()
    resumed.next_batch()  # an empty batch moves nothing
    assert positions.snapshot() == {(TOPIC, 0): 10, (TOPIC, 1): 40}
    resumed.next_batch()
    assert positions.snapshot() == {(TOPIC, 0): 10, (TOPIC, 1): 42}


def test_retention_past_the_snapshot_is_counted_at_build(caplog: pytest.LogCaptureFixture) -> None:
    before = skipped(0)
    with caplog.at_level(logging.ERROR, logger="dataflow.kafka.source"):
        part, asked = build([[msg(150), msg(151)]], 100, [150], partition=0)
    assert skipped(0) - before == 50
    assert asked == [(TOPIC, 0)]
    assert "lost to retention" in caplog.text
    # Read on as usual, and the first message does not count the same gap again.
    assert [m.offset for m in drain(part, 2)] == [150, 151]
    assert skipped(0) - before == 50
    assert asked == [(TOPIC, 0)]


def test_a_partition_with_nothing_left_to_read_still_reports_its_loss() -> None:
    before = skipped(1)
    part, _ = build([], 10, [40], partition=1)
    assert list(part.next_batch()) == []
    assert skipped(1) - before == 30


def test_retention_between_build_and_first_fetch_is_counted_on_the_first_message() -> None:
    before = skipped(0)
    # At build the earliest offset is still 100; by the first fetch retention took 100..129
    # and the consumer was reset to 130.
    part, asked = build([[], [msg(130), msg(131)]], 100, [100, 130])
    assert drain(part, 2)
    assert skipped(0) - before == 30
    assert len(asked) == 2


def test_a_transaction_marker_after_the_snapshot_is_not_a_loss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = skipped(0)
    # Offset 100 is a commit marker: the first message is 101, but 100 is still retained.
    with caplog.at_level(logging.ERROR, logger="dataflow.kafka.source"):
        part, _ = build([[msg(101)]], 100, [0, 0])
        drain(part, 1)
    assert skipped(0) == before
    assert "lost" not in caplog.text


def test_gap_measured_up_to_the_earliest_offset_not_the_first_message() -> None:
    before = skipped(0)
    # Retention took 100..119; 120..124 are compacted away: only 20 were lost to retention.
    part, _ = build([[msg(125)]], 100, [100, 120])
    drain(part, 1)
    assert skipped(0) - before == 20


def test_unknown_earliest_offset_falls_back_to_the_first_message() -> None:
    before = skipped(0)
    part, _ = build([[msg(107)]], 100, [None, None])
    drain(part, 1)
    assert skipped(0) - before == 7


def test_a_reset_below_the_snapshot_is_a_warning_not_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = skipped(0)
    with caplog.at_level(logging.WARNING, logger="dataflow.kafka.source"):
        part, _ = build([[msg(0), msg(1)]], 5_000, [0])
        drain(part, 1)
    assert skipped(0) == before
    assert "re-created or truncated" in caplog.text


def test_a_consumer_error_carries_the_offset_to_check() -> None:
    before = skipped(0)
    error = KafkaError(err=None, msg=msg(112))  # type: ignore[arg-type]
    part, _ = build([[error, msg(113)]], 100, [0, 110])
    drain(part, 1)
    assert skipped(0) - before == 10


def test_snapshot_and_close_go_to_the_kafka_partition() -> None:
    part, _ = build([[msg(100)]], 100, [0])
    assert isinstance(part, GapCheckingPartition)
    assert part.snapshot() == 100
    part.close()
    inner = part.inner
    assert isinstance(inner, FakePartition) and inner.closed


# --- KafkaRecord partitions ----------------------------------------------------------------


class FakeError:
    def __init__(self, code: int) -> None:
        self._code = code

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return f"error {self._code}"


class FakeMessage:
    """What confluent-kafka's consumer returns."""

    def __init__(self, offset: int, value: bytes | None = b"{}", error: int | None = None) -> None:
        self._offset, self._value = offset, value
        self._error = None if error is None else FakeError(error)

    def error(self) -> FakeError | None:
        return self._error

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 3

    def key(self) -> bytes | None:
        return None

    def headers(self) -> None:
        return None

    def latency(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


class FakeConsumer:
    def __init__(self, batches: list[list[FakeMessage]]) -> None:
        self.batches = batches

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        return self.batches.pop(0) if self.batches else []


class FakeBytewaxPartition:
    """The attributes of Bytewax 0.21's `_KafkaSourcePartition` that `RecordPartition` reads."""

    def __init__(self, batches: list[list[FakeMessage]], raise_on_errors: bool = False) -> None:
        self._consumer = FakeConsumer(batches)
        self._batch_size = 1000
        self._eof = False
        self._raise_on_errors = raise_on_errors
        self._topic = TOPIC
        self._offset = 7
        self.closed = False

    def snapshot(self) -> int:
        return self._offset

    def next_awake(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


EOF_CODE = -191  # librdkafka's _PARTITION_EOF


def test_a_record_partition_reads_as_bytewax_reads_with_a_record_per_message() -> None:
    inner = FakeBytewaxPartition(
        [
            [FakeMessage(7), FakeMessage(8, None)],
            [FakeMessage(9, error=42), FakeMessage(10)],
            [FakeMessage(11), FakeMessage(12, error=EOF_CODE), FakeMessage(13)],
        ]
    )
    part = RecordPartition(inner)
    assert part.next_batch() == [(TOPIC, 3, 7, b"{}"), (TOPIC, 3, 8, None)]
    assert part.snapshot() == 9  # resumes after the last message read
    errored, after = part.next_batch()
    assert isinstance(errored, KafkaError) and str(errored.err) == "error 42"
    assert errored.msg.offset == 9 and errored.msg.partition == 3  # Bytewax's message
    assert isinstance(after, KafkaRecord) and after.offset == 10 and after.value == b"{}"
    assert part.snapshot() == 11
    assert part.next_batch() == [KafkaRecord(TOPIC, 3, 11, b"{}")]  # the end: 13 never read
    assert part.snapshot() == 12
    with pytest.raises(StopIteration):
        part.next_batch()
    assert part.next_awake() is None
    part.close()
    assert inner.closed


def test_a_record_partition_raises_a_consumer_error_when_told_to() -> None:
    part = RecordPartition(FakeBytewaxPartition([[FakeMessage(7, error=42)]], raise_on_errors=True))
    with pytest.raises(RuntimeError, match="error 42"):
        part.next_batch()


def test_the_gap_check_reads_a_records_offset() -> None:
    """As `test_retention_between_build_and_first_fetch_is_counted_on_the_first_message`,
    with the pipeline's records."""
    before = skipped(0)
    part, _ = build([[], [KafkaRecord(TOPIC, 0, 130, b"{}")]], 100, [100, 130])
    assert drain(part, 2)
    assert skipped(0) - before == 30
