"""Intake where each partition is read: decode and route a batch inside the source partition.

Bytewax snapshots a source partition's state together with the epoch's other state, and
resumes it with the offset it read up to. Routing here, not in a step downstream, lets each
partition's clock (the largest `ts` read from it) live in that same snapshot, so the
decisions that depend on it (which events dedup checks, when the link join forgets a
session) come out the same for any batching and after a crash at any point.

Any `FixedPartitionedSource` of Kafka-like messages can be wrapped: the Kafka source in
production, `TestingSource` in tests (one partition carrying messages of many topics and
partitions, each with its own clock). Each source batch becomes one `IntakeResult`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from bytewax.connectors.kafka import KafkaError
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflow.core import snapshots
from dataflow.core.intake import Intake, IntakeResult, PartitionClocks

LAYOUT: Final = 1
STEP: Final = "kafka_in"


class IntakeSource(FixedPartitionedSource[IntakeResult, bytes]):
    """Wraps a source (same partitions): each batch is routed by `intake`, and each
    partition's clocks are snapshotted beside the inner source's state."""

    def __init__(self, inner: FixedPartitionedSource[Any, Any], intake: Intake) -> None:
        self.inner = inner
        self.intake = intake

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: bytes | None
    ) -> StatefulSourcePartition[IntakeResult, bytes]:
        inner_state: Any = None
        clocks: PartitionClocks = {}
        if resume_state is not None:
            inner_state, clocks = snapshots.unwrap(STEP, LAYOUT, resume_state)
        part = self.inner.build_part(step_id, for_part, inner_state)
        return IntakePartition(part, self.intake, clocks)


class IntakePartition(StatefulSourcePartition[IntakeResult, bytes]):
    def __init__(
        self, inner: StatefulSourcePartition[Any, Any], intake: Intake, clocks: PartitionClocks
    ) -> None:
        self.inner = inner
        self.intake = intake
        self.clocks = clocks

    def next_batch(self) -> list[IntakeResult]:
        batch = list(self.inner.next_batch())
        if not batch:
            return []
        messages = [item for item in batch if not isinstance(item, KafkaError)]
        result = self.intake.route(messages, self.clocks)
        if len(messages) != len(batch):
            result.consumer_errors = [item for item in batch if isinstance(item, KafkaError)]
        return [result]

    def next_awake(self) -> datetime | None:
        awake: datetime | None = self.inner.next_awake()
        return awake

    def snapshot(self) -> bytes:
        return snapshots.wrap(STEP, LAYOUT, (self.inner.snapshot(), dict(self.clocks)))

    def close(self) -> None:
        self.inner.close()
