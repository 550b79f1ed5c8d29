"""The dead-letter sink: rejected messages, as JSON envelopes, to `KAFKA_DLQ_TOPIC`.

Each batch is produced and flushed before `write_batch` returns, and every delivery
report is checked: if any envelope is not acknowledged, `SinkError` stops the dataflow
before the epoch commits, so the bad messages are re-read and re-sent on restart. The topic
is therefore at-least-once; the message key `{topic}:{partition}:{offset}` identifies
copies.
"""

from __future__ import annotations

import logging

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, Message, Producer

from dataflow import metrics
from dataflow.config import KafkaSettings
from dataflow.core.deadletter import DeadLetter
from dataflow.errors import SinkError
from dataflow.logs import BurstLog

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 60.0


class _DeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, producer: Producer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        # Bad input often comes in runs: a line when a burst starts, then a summary at most
        # every 30 s, instead of a line per batch.
        self.burst = BurstLog(log, "dead letters written", kinds_field="reasons")

    def write_batch(self, items: list[DeadLetter]) -> None:
        if not items:
            return
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in items:
            while True:
                try:
                    self.producer.produce(
                        self.topic, value=letter.value, key=letter.key, on_delivery=on_delivery
                    )
                    break
                except BufferError:
                    self.producer.poll(0.1)  # local queue full: let deliveries drain
        remaining = self.producer.flush(FLUSH_TIMEOUT_S)
        if remaining or failures:
            metrics.DEAD_LETTERS.labels(result="failure").inc(len(items))
            raise SinkError(
                f"dead-letter topic {self.topic!r}: {len(failures)} failed, {remaining} "
                f"undelivered after {FLUSH_TIMEOUT_S:.0f}s (first error: "
                f"{failures[0] if failures else 'timeout'}); stopping so recovery re-sends them"
            )
        metrics.DEAD_LETTERS.labels(result="success").inc(len(items))
        self.burst.add(len(items), {i.reason for i in items})

    def close(self) -> None:
        self.producer.flush(FLUSH_TIMEOUT_S)
        self.burst.flush()


class DeadLetterSink(DynamicSink[DeadLetter]):
    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DeadLetterPartition:
        config = self.settings.producer_config(
            {"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
        )
        return _DeadLetterPartition(Producer(config), self.settings.dlq_topic)
