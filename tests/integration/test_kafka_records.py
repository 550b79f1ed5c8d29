"""The pipeline's Kafka partitions on the real broker (`dataflow.kafka.source.RecordSource`):
every message as a `KafkaRecord` of its topic, partition, offset and value, in order; the
offset to resume from in the snapshot; a resume from a snapshot; the end of a partition."""

import pytest
from bytewax.connectors.kafka import KafkaSource
from confluent_kafka import OFFSET_BEGINNING, Producer

from dataflow.kafka.source import KafkaRecord, RecordPartition, RecordSource
from tests.integration.conftest import TopicFactory

pytestmark = pytest.mark.integration


def read_all(part: RecordPartition) -> list[KafkaRecord]:
    out: list[KafkaRecord] = []
    while True:
        try:
            out.extend(part.next_batch())
        except StopIteration:
            return out


def test_records_are_the_messages_and_resume_where_the_snapshot_says(
    kafka_brokers: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_brokers})
    values = [f'{{"n": {i}}}'.encode() for i in range(25)] + [None]
    for value in values:
        producer.produce(topic, value=value, partition=1)
    assert producer.flush(30) == 0

    def source(batch_size: int) -> RecordSource:
        return RecordSource(
            [kafka_brokers], [topic], tail=False, starting_offset=OFFSET_BEGINNING,
            batch_size=batch_size,
        )  # fmt: skip

    assert isinstance(source(10), KafkaSource)
    assert sorted(source(10).list_parts()) == [f"0-{topic}", f"1-{topic}"]
    part = source(10).build_part("kafka_in", f"1-{topic}", None)
    records = read_all(part)  # batches of at most 10, some empty while the fetch waits
    assert records == [KafkaRecord(topic, 1, i, value) for i, value in enumerate(values)]
    assert all(type(r) is KafkaRecord for r in records)
    assert part.snapshot() == len(values)
    part.close()

    resumed = source(7).build_part("kafka_in", f"1-{topic}", 20)
    assert [r.offset for r in read_all(resumed)] == list(range(20, len(values)))
    assert resumed.snapshot() == len(values)
    resumed.close()

    empty = source(7).build_part("kafka_in", f"0-{topic}", None)
    assert read_all(empty) == []
    empty.close()
