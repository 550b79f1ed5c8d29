"""The autocomplete index on the real Kafka, Redis and OpenSearch (contract §4.4 and §6,
docs/opensearch.md): an autocomplete-heavy generated stream goes through the whole
pipeline; Redis must hold exactly the reference model's features, and the AC index one
document per selected candidate with Redis's `selects_30d` and `click_rate_30d`, ranked
by click rate by a `rank_feature` query."""

from __future__ import annotations

import struct
import time
from typing import Any

import redis
from bytewax.testing import run_main
from opensearchpy import OpenSearch
from prometheus_client import REGISTRY

from dataflow.config import Config
from dataflow.flow import build_flow
from dataflow.tools.generator import GeneratorConfig, generate
from tests.integration.test_opensearch import delete_indices, index_docs
from tests.integration.test_pipeline import dump, produce
from tests.reference_model import acq_key, diff_stores, expected_store, q_norm, select_families

ALL = ("doc", "qd", "ac", "acq")
HOUR_MS = 3_600_000


def f32(value: float) -> float:
    """`value` as float32, the precision a rank_feature holds."""
    result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    return result


def lucene_rank(value: float) -> int:
    """What Lucene's FeatureField indexes for a value (its float32 bits without the lowest
    15, i.e. 9 significant bits): equal for two values means an equal score."""
    bits: int = struct.unpack("<I", struct.pack("<f", value))[0]
    return bits >> 15


def outcome(name: str) -> float:
    labels = {"outcome": name}
    return REGISTRY.get_sample_value("search_features_opensearch_updates_total", labels) or 0.0


def test_autocomplete_stream_gives_exact_features_and_an_ac_index_ranked_by_click_rate(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    opensearch_url: str,
    opensearch_client: OpenSearch,
    unique_name: str,
) -> None:
    doc_index, ac_index = f"it-{unique_name}-doc", f"it-{unique_name}-ac"
    # One partition: the link join is exact while the partitions feeding a join shard stay
    # within 30 min + grace of each other in event time (docs/contract.md §4.4), which a
    # multi-partition backlog read at full speed does not promise.
    topic, dlq = topic_factory(1), topic_factory(1)
    now = int(time.time() * 1000)
    messages = list(
        generate(
            GeneratorConfig(
                seed=23,
                n_events=6_000,
                n_docs=300,
                n_queries=80,
                autocomplete_fraction=0.9,
                # Dense in event time, as a live stream is: the link join tolerates bounded
                # skew between partitions (contract §4.4), not days of it.
                start_ms=now - 4 * HOUR_MS,
                span_ms=4 * HOUR_MS - 60_000,
            )
        )
    )
    produce(kafka_brokers, topic, messages)
    config = Config.from_env(
        {
            "KAFKA_BROKERS": kafka_brokers,
            "KAFKA_TOPICS": topic,
            "KAFKA_DLQ_TOPIC": dlq,
            "KAFKA_STOP_AT_END": "true",
            "KAFKA_BATCH_SIZE": "50",
            "REDIS_URL": redis_url,
            "FEATURE_PREFIX": key_prefix,
            "FEATURE_SHARDS": "16",
            "OPENSEARCH_URL": opensearch_url,
            "OPENSEARCH_INDEX": doc_index,
            "OPENSEARCH_AC_INDEX": ac_index,
            "OPENSEARCH_PARTITIONS": "2",
            # Every change is sent, so the index ends equal to Redis (not only within 5%).
            "OPENSEARCH_MIN_CHANGE": "0",
        }
    )
    skipped_before = {o: outcome(o) for o in ("unlabelled", "invalid_id")}
    try:
        run_main(build_flow(config))

        # Redis: exactly the reference model, every family.
        valid = [m.event for m in messages if m.event is not None]
        expected = select_families(expected_store(valid, prefix=key_prefix), ALL, prefix=key_prefix)
        actual = dump(redis_client, key_prefix)
        diffs = diff_stores(actual, expected)
        assert not diffs, "\n".join(diffs[:30])

        # The candidates behind the acq keys, from the events (not from the pipeline).
        by_key = {
            acq_key(key_prefix, c): c
            for e in valid
            if e["type"] == "ac_select" and (c := q_norm(e.get("candidate")))
        }
        acq = {by_key[k]: f for k, f in actual.items() if k.split(":")[1] == "acq"}
        assert len(acq) == sum(1 for k in actual if k.split(":")[1] == "acq")
        assert len(acq) >= 50, "the stream should select many candidates"
        clicked = [c for c, f in acq.items() if int(f["clicked_30d"]) > 0]
        assert len(clicked) >= 10, "the stream should link selects to clicks"

        # The AC index: behind its alias, one document per candidate, Redis's values.
        assert set(opensearch_client.indices.get_alias(name=ac_index)) == {f"{ac_index}-000001"}
        docs = index_docs(opensearch_client, ac_index)
        assert set(docs) == set(acq)
        for candidate, doc in docs.items():
            hash_fields = acq[candidate]
            assert doc["candidate"] == candidate
            assert doc["as_of"] == int(hash_fields["as_of"])
            assert f32(doc["click_rate_30d"]) == f32(float(hash_fields["click_rate_30d"]))
            selects = int(hash_fields["selects_30d"])
            assert selects > 0  # a live key always has a select in 30 days
            assert f32(doc["selects_30d"]) == f32(selects)
        assert outcome("unlabelled") == skipped_before["unlabelled"]
        assert outcome("invalid_id") == skipped_before["invalid_id"]

        # Ranked by click rate: every candidate matches (the rate is never zero), in
        # descending Redis click_rate_30d, up to rank_feature's 9 significant bits.
        rates = {c: float(f["click_rate_30d"]) for c, f in acq.items()}
        result = opensearch_client.search(
            index=ac_index,
            body={
                "size": 10_000,
                "track_total_hits": True,
                "query": {
                    "rank_feature": {"field": "click_rate_30d", "saturation": {"pivot": 0.1}}
                },
            },
        )
        ranked = [hit["_id"] for hit in result["hits"]["hits"]]
        assert result["hits"]["total"]["value"] == len(acq) == len(ranked)
        order = [lucene_rank(rates[c]) for c in ranked]
        assert order == sorted(order, reverse=True), [(c, rates[c]) for c in ranked[:20]]
        assert rates[ranked[0]] >= max(rates.values()) * (1 - 2**-8)
        assert len(set(order)) >= 5, "the stream should give a spread of click rates"

        # The suggestion service's query (docs/opensearch.md): its candidates by id, boosted.
        mine = sorted(acq, key=lambda c: rates[c])[:: max(1, len(acq) // 6)][:6]
        result = opensearch_client.search(
            index=ac_index,
            body={
                "query": {
                    "bool": {
                        "filter": {"ids": {"values": [*mine, "never selected"]}},
                        "should": {
                            "rank_feature": {
                                "field": "click_rate_30d",
                                "saturation": {"pivot": 0.1},
                            }
                        },
                    }
                }
            },
        )
        got = [hit["_id"] for hit in result["hits"]["hits"]]
        assert set(got) == set(mine)
        assert [lucene_rank(rates[c]) for c in got] == sorted(
            (lucene_rank(rates[c]) for c in mine), reverse=True
        )
    finally:
        delete_indices(opensearch_client, f"it-{unique_name}-*")
