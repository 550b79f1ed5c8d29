"""The Redis sink's wire format and its TTL rule, without a server: one HSET per written
key, an EXPIRE only where the key was created or re-stated after a new day."""

from __future__ import annotations

from typing import Any

import hiredis

from dataflow.config import RedisSettings
from dataflow.core.shard import StepResult
from dataflow.resp import pack_del, pack_expire, pack_hset
from dataflow.retry import NO_WAIT
from dataflow.sinks.redis import RedisWriter, coalesce
from tests.fakes import FakeRedis


def commands(data: bytes) -> list[list[bytes]]:
    """RESP commands are arrays of bulk strings: hiredis parses them like replies."""
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (command := reader.gets()) is not False:
        out.append(command)
    return out


def test_commands_are_resp_byte_for_byte() -> None:
    assert pack_hset("P:doc:a", {"clicks_7d": "3", "ctr_7d": "0.5"}).encode() == (
        b"*6\r\n$4\r\nHSET\r\n$7\r\nP:doc:a\r\n"
        b"$9\r\nclicks_7d\r\n$1\r\n3\r\n$6\r\nctr_7d\r\n$3\r\n0.5\r\n"
    )
    assert pack_expire("P:doc:a", 3024000).encode() == (
        b"*3\r\n$6\r\nEXPIRE\r\n$7\r\nP:doc:a\r\n$7\r\n3024000\r\n"
    )
    assert pack_del("P:doc:%C3%A9").encode() == b"*2\r\n$3\r\nDEL\r\n$12\r\nP:doc:%C3%A9\r\n"


def test_a_chunk_is_one_buffer_with_an_expire_only_where_the_ttl_is_due() -> None:
    client = FakeRedis()
    settings = RedisSettings(prefix="P", ttl_seconds=600)
    writer = RedisWriter(client, settings, NO_WAIT)  # type: ignore[arg-type]
    fields = {"impressions_7d": "2", "as_of": "1000"}
    writer.write([("doc:a", fields), ("doc:b", fields), ("doc:c", None)], ttl={"doc:a"})
    [sent] = client.sent
    assert commands(sent) == [
        [b"HSET", b"P:doc:a", b"impressions_7d", b"2", b"as_of", b"1000"],
        [b"EXPIRE", b"P:doc:a", b"600"],
        [b"HSET", b"P:doc:b", b"impressions_7d", b"2", b"as_of", b"1000"],
        [b"DEL", b"P:doc:c"],
    ]
    # Without a TTL set, every written key gets one (tools and benchmarks write that way).
    writer.write([("doc:d", fields)])
    assert commands(client.sent[1])[1] == [b"EXPIRE", b"P:doc:d", b"600"]


def test_chunks_follow_the_pipeline_size() -> None:
    client = FakeRedis()
    writer = RedisWriter(client, RedisSettings(pipeline_keys=2), NO_WAIT)  # type: ignore[arg-type]
    writer.write([(f"doc:{i}", {"as_of": "1"}) for i in range(5)], ttl=set())
    assert [len(commands(data)) for data in client.sent] == [2, 2, 1]


def test_coalesce_sets_the_ttl_of_created_and_restated_keys_only() -> None:
    fields: dict[str, Any] = {"as_of": "1"}
    event_driven = StepResult(
        writes=[("doc:old", fields), ("doc:new", fields)], created={"doc:new"}
    )
    later = StepResult(writes=[("doc:new", {"as_of": "2"}), ("doc:old", fields)])
    restated = StepResult(writes=[("doc:idle", fields), ("doc:gone", None)], new_day=True)
    latest, ttl, _ = coalesce([event_driven, later, restated])
    assert set(latest) == {"doc:old", "doc:new", "doc:idle", "doc:gone"}
    assert latest["doc:new"] == ("doc:new", {"as_of": "2"})
    assert ttl >= {"doc:new", "doc:idle"}
    assert "doc:old" not in ttl
