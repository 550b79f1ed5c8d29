"""The Redis sink on a real Redis: packed commands land as redis-py would send them, a key's
TTL is set at creation and kept by later writes, an error reply stops the epoch, and a run
costs one command per written key plus one EXPIRE per created key."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflow.config import Config, RedisSettings
from dataflow.errors import SinkError
from dataflow.flow import build_flow
from dataflow.retry import NO_WAIT
from dataflow.sinks.redis import RedisFeatureSink, RedisWriter
from tests.fakes import kafka_messages


def writer(client: redis.Redis, prefix: str, ttl: int = 600) -> RedisWriter:
    return RedisWriter(client, RedisSettings(prefix=prefix, ttl_seconds=ttl), NO_WAIT)


def test_the_ttl_is_set_at_creation_and_kept_by_later_writes(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    w = writer(redis_client, key_prefix)
    w.write([("doc:a", {"clicks_7d": "1", "as_of": "10"}), ("doc:%C3%A9", {"as_of": "1"})])
    assert redis_client.hgetall(f"{key_prefix}:doc:a") == {b"clicks_7d": b"1", b"as_of": b"10"}
    assert 590 < redis_client.ttl(f"{key_prefix}:doc:a") <= 600
    redis_client.expire(f"{key_prefix}:doc:a", 100)
    w.write([("doc:a", {"clicks_7d": "2", "as_of": "20"})], ttl=set())
    assert redis_client.hget(f"{key_prefix}:doc:a", "clicks_7d") == b"2"
    assert 0 < redis_client.ttl(f"{key_prefix}:doc:a") <= 100  # not refreshed
    w.write([("doc:a", None)], ttl=set())
    assert not redis_client.exists(f"{key_prefix}:doc:a")


def test_an_error_reply_stops_the_write_and_leaves_the_connection_usable(
    redis_client: redis.Redis, key_prefix: str
) -> None:
    redis_client.set(f"{key_prefix}:doc:str", "not a hash")
    w = writer(redis_client, key_prefix)
    with pytest.raises(SinkError, match="WRONGTYPE"):
        w.write([("doc:ok", {"as_of": "1"}), ("doc:str", {"as_of": "1"})])
    # The other command of the chunk landed, and the next write works.
    assert redis_client.hget(f"{key_prefix}:doc:ok", "as_of") == b"1"
    w.write([("doc:next", {"as_of": "2"})])
    assert redis_client.hget(f"{key_prefix}:doc:next", "as_of") == b"2"


def commandstats(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def test_a_run_costs_one_hset_per_write_and_one_expire_per_created_key(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    now = int(time.time() * 1000)
    day_start = now - now % 86_400_000
    raw: list[Any] = [
        f'{{"event_id":"e{i}","type":"click","ts":{day_start + i},"query":"q","doc_id":"d{i % 5}"}}'
        for i in range(50)
    ]
    config = Config.from_env(
        {
            "REDIS_URL": redis_url,
            "FEATURE_PREFIX": key_prefix,
            "FEATURE_FLUSH_INTERVAL_MS": "0",
            # No marker: its own commands are counted in tests/integration/test_store_marker.py
            "STORE_CHECK_SECONDS": "0",
        }
    )
    before = commandstats(redis_client)
    flow = build_flow(
        config,
        source=TestingSource(kafka_messages([r.encode() for r in raw]), batch_size=10),
        redis_sink=RedisFeatureSink(config.redis),
        dlq_sink=TestingSink([]),
        with_opensearch=False,
    )
    run_main(flow)
    after = commandstats(redis_client)
    hsets = after.get("hset", 0) - before.get("hset", 0)
    expires = after.get("expire", 0) - before.get("expire", 0)
    keys = list(redis_client.scan_iter(match=f"{key_prefix}:*"))
    assert len(keys) == 10  # five docs, five query-doc pairs
    assert expires == len(keys)  # once each, at creation
    # Every key is written after each of the five batches, or fewer times when the writer
    # thread takes several batches at once (`WriteBehind` coalesces them): never more, and
    # always all ten keys together.
    assert hsets in range(10, 5 * 10 + 1, 10)
    assert all(redis_client.ttl(k) > 0 for k in keys)
