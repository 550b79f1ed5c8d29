"""Smoke tests of the local stack: each service does the one thing the pipeline needs from it.

When one of these fails, the pipeline's own integration tests cannot pass either; start
looking in `make status` and .stack/logs/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from opensearchpy import OpenSearch
from prometheus_client import CollectorRegistry, Gauge, start_http_server

WAIT_S = 30.0


def test_kafka_round_trip_through_a_consumer_group(
    kafka_brokers: str, topic_factory: Callable[..., str], unique_name: str
) -> None:
    topic = topic_factory(partitions=1)
    sent = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(3)]

    failures: list[KafkaError] = []
    producer = Producer({"bootstrap.servers": kafka_brokers, "acks": "all"})
    for key, value in sent:
        producer.produce(
            topic, key=key, value=value, on_delivery=lambda err, _msg: err and failures.append(err)
        )
    assert producer.flush(WAIT_S) == 0, "messages still queued after flush"
    assert failures == []

    # subscribe (not assign) so the group coordinator and __consumer_offsets, which need
    # the single-node replication settings, are exercised too.
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_brokers,
            "group.id": f"smoke-{unique_name}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        received = []
        deadline = time.monotonic() + WAIT_S
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received.append((msg.key(), msg.value()))
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()

    assert received == sent
    assert committed[0].offset == len(sent)


def test_redis_hash_round_trip(redis_client: redis.Redis, key_prefix: str) -> None:
    key = f"{key_prefix}:doc:d1"
    redis_client.hset(key, mapping={"impressions": "3", "ctr": repr(0.25)})
    redis_client.expire(key, 60)

    assert redis_client.hgetall(key) == {b"impressions": b"3", b"ctr": b"0.25"}
    assert 0 < redis_client.ttl(key) <= 60


def test_opensearch_rank_feature_orders_bulk_indexed_docs(
    opensearch_client: OpenSearch, unique_name: str
) -> None:
    index = f"smoke-{unique_name}"
    opensearch_client.indices.create(
        index=index,
        body={
            "mappings": {
                "properties": {
                    "doc_id": {"type": "keyword"},
                    "popularity": {"type": "rank_feature"},
                }
            }
        },
    )
    try:
        # The stack makes single-node indices replica-free, hence green rather than yellow.
        health = opensearch_client.cluster.health(index=index, wait_for_status="green")
        assert health["status"] == "green"

        popularity = {"a": 1.5, "b": 9.0, "c": 4.0}
        actions: list[dict[str, Any]] = []
        for doc_id, value in popularity.items():
            actions.append({"index": {"_index": index, "_id": doc_id}})
            actions.append({"doc_id": doc_id, "popularity": value})
        result = opensearch_client.bulk(body=actions)
        assert result["errors"] is False, result
        opensearch_client.indices.refresh(index=index)

        hits = opensearch_client.search(
            index=index, body={"query": {"rank_feature": {"field": "popularity"}}}
        )["hits"]["hits"]
        mapping = opensearch_client.indices.get_mapping(index=index)
    finally:
        opensearch_client.indices.delete(index=index)

    assert [hit["_id"] for hit in hits] == ["b", "c", "a"]
    assert mapping[index]["mappings"]["properties"]["popularity"]["type"] == "rank_feature"


def test_prometheus_answers_queries(prometheus_api: Callable[..., Any]) -> None:
    body = prometheus_api("/api/v1/query", query="up")

    assert body["status"] == "success"
    assert body["data"]["resultType"] == "vector"


def test_prometheus_scrapes_the_pipeline_metrics_ports(
    prometheus_api: Callable[..., Any], metrics_ports: list[int]
) -> None:
    body = prometheus_api("/api/v1/targets", state="active")
    targets = [t for t in body["data"]["activeTargets"] if t["labels"]["job"] == "search-features"]

    assert body["status"] == "success"
    assert sorted(t["scrapeUrl"] for t in targets) == sorted(
        f"http://127.0.0.1:{port}/metrics" for port in metrics_ports
    )


def test_prometheus_scrapes_a_live_metrics_endpoint(
    prometheus_query: Callable[[str], list[dict[str, Any]]],
    metrics_ports: list[int],
    unique_name: str,
) -> None:
    """Serve a metric on a free pipeline metrics port and watch Prometheus pick it up. If a
    pipeline already serves on every port, that pipeline is the live endpoint instead."""
    registry = CollectorRegistry()
    Gauge("stack_smoke_marker", "set by the stack smoke test", ["token"], registry=registry).labels(
        token=unique_name
    ).set(42)
    server = None
    port = metrics_ports[0]
    for candidate in metrics_ports:
        try:
            server, thread = start_http_server(candidate, addr="127.0.0.1", registry=registry)
        except OSError:
            continue
        port = candidate
        break
    instance = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        up: list[dict[str, Any]] = []
        marker: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            up = prometheus_query(f'up{{job="search-features", instance="{instance}"}} == 1')
            marker = prometheus_query(f'stack_smoke_marker{{token="{unique_name}"}}')
            if up and (marker or server is None):
                break
            time.sleep(0.5)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    assert up, f"Prometheus did not scrape {instance} successfully within {WAIT_S}s"
    if server is not None:
        assert [float(s["value"][1]) for s in marker] == [42.0]
