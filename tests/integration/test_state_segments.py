"""The segment store of the feature state on the real Kafka (`dataflow.kafka.segments`):
segments written, read back by offset from another store, retired with tombstones; a
topic that would delete by age refused; a segment the topic lacks named as missing."""

import os

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from prometheus_client import REGISTRY

from dataflow.config import KafkaSettings
from dataflow.core.segments import Ref
from dataflow.core.shard import FeatureShard
from dataflow.core.snapshots import Deferred
from dataflow.errors import SegmentError, SegmentMissingError
from dataflow.kafka.segments import CHUNK_BYTES, KafkaSegments
from dataflow.settings import Secret
from tests.core.test_segments import PARAMS, through_bytewax
from tests.core.test_shard import BASE, upd
from tests.integration.conftest import SecuredKafka, TopicFactory

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(kafka_brokers: str, unique_name: str, _session_topics: list[str]) -> KafkaSettings:
    """A state topic no other test uses, which the store creates itself (deleted at the end
    of the session like the factory's topics)."""
    name = f"state-{unique_name}"
    _session_topics.append(name)
    return KafkaSettings(brokers=(kafka_brokers,), state_topic=name)


def test_segments_round_trip_in_chunks_through_a_compacted_topic(
    settings: KafkaSettings, kafka_brokers: str
) -> None:
    store = KafkaSegments(settings)
    written = REGISTRY.get_sample_value("search_features_state_segments_total", {"kind": "written"})
    small, large = b"tail", os.urandom(2 * CHUNK_BYTES + 7)
    refs = [store.append("features/a", small).ref(), store.append("features/a", large).ref()]
    assert len(refs[1].offsets) == 3 and refs[0].partition == refs[1].partition
    assert KafkaSegments(settings).read(refs) == [small, large]  # a process of its own
    after = REGISTRY.get_sample_value("search_features_state_segments_total", {"kind": "written"})
    assert after == written + 2

    admin = AdminClient({"bootstrap.servers": kafka_brokers})
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.state_topic)
    configs = admin.describe_configs([resource])[resource].result(30)
    assert configs["cleanup.policy"].value == "compact"
    assert int(configs["min.compaction.lag.ms"].value) >= 3_600_000


def test_retired_segments_get_a_tombstone_per_chunk(settings: KafkaSettings) -> None:
    store = KafkaSegments(settings)
    ref = store.append("features/b", os.urandom(CHUNK_BYTES + 1)).ref()
    store.retire([ref])
    store.append("features/b", b"after").ref()  # flushes the tombstones before it
    consumer = Consumer({**settings.client_config(), "group.id": "t", "enable.partition.eof": True})
    consumer.assign([TopicPartition(settings.state_topic, ref.partition, 0)])
    seen = []
    while (msg := consumer.poll(10)) is not None and msg.error() is None:
        seen.append((msg.key(), msg.value() is None))
    consumer.close()
    keys = [f"{ref.segment}#{i}".encode() for i in range(2)]
    assert [(k, True) for k in keys] == [s for s in seen if s[1]]
    with pytest.raises(SegmentMissingError, match="replay"):
        store.read([Ref(ref.segment, ref.partition, (ref.offsets[-1] + 1,))])  # a tombstone


def test_a_state_topic_that_deletes_by_age_is_refused(
    kafka_brokers: str, topic_factory: TopicFactory
) -> None:
    name = topic_factory(prefix="state-delete")  # the broker's default: cleanup.policy=delete
    store = KafkaSegments(KafkaSettings(brokers=(kafka_brokers,), state_topic=name))
    with pytest.raises(SegmentError, match=f"KAFKA_STATE_TOPIC={name}: .*'compact'"):
        store.append("features/c", b"x")


def test_a_shard_snapshot_waits_for_its_segment_and_restores_from_kafka(
    settings: KafkaSettings,
) -> None:
    store = KafkaSegments(settings)
    shard = FeatureShard(PARAMS)
    shard.use_segments(store, tail_bytes=1024)
    shard.step([[upd(1, f"doc:{i:06}", BASE, (1, 0, 0)) for i in range(5_000)]])
    snapshot = shard.snapshot()
    assert isinstance(snapshot, Deferred)  # the base is still on its way
    blob = through_bytewax(snapshot)
    again = FeatureShard.restore(PARAMS, blob, segments=KafkaSegments(settings), tail_bytes=1024)
    assert list(again.keys.items()) == list(shard.keys.items())


def test_the_pipeline_user_keeps_segments_on_the_secured_kafka_within_its_acls(
    secured_kafka: SecuredKafka, unique_name: str, _secured_topics: list[str]
) -> None:
    """SASL_SSL as `search-features`, whose ACLs allow `search-features-state*` only."""
    name = f"search-features-state-{unique_name}"
    _secured_topics.append(name)
    settings = KafkaSettings(
        brokers=(secured_kafka.brokers,),
        state_topic=name,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="search-features",
        sasl_password=Secret(secured_kafka.passwords["search-features"]),
        ssl_ca_location=secured_kafka.ca_file,
    )
    payload = os.urandom(CHUNK_BYTES + 3)
    ref = KafkaSegments(settings).append("features/s", payload).ref()
    assert KafkaSegments(settings).read([ref]) == [payload]
