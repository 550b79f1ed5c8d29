"""In-memory stand-ins for the pure-core flow tests (integration tests use the real services)."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Container, Iterable
from typing import Any

import hiredis
import redis
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow.core.shard import StepResult
from dataflow.sinks.redis import coalesce


class MemoryStore:
    """What Redis would hold after the sink's HSET/EXPIRE/DEL commands (TTL ignored)."""

    def __init__(self, prefix: str = "feat") -> None:
        self.prefix = prefix
        self.hashes: dict[str, dict[str, str]] = {}
        self.writes = 0

    def apply(self, results: Iterable[StepResult]) -> None:
        latest, _, _ = coalesce(results)
        for suffix, fields in latest.values():
            key = f"{self.prefix}:{suffix}"
            self.writes += 1
            if fields is None:
                self.hashes.pop(key, None)
            else:
                self.hashes.setdefault(key, {}).update(fields)


class MemoryStoreSink(DynamicSink[StepResult]):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
        store = self.store

        class _Part(StatelessSinkPartition[StepResult]):
            def write_batch(self, items: list[StepResult]) -> None:
                store.apply(items)

        return _Part()


def kafka_messages(
    values: Iterable[bytes], topic: str = "search-events", partition: int = 0
) -> list[KafkaSourceMessage[bytes | None, bytes]]:
    """Wrap raw values as the consumer would deliver them, with increasing offsets."""
    return [
        KafkaSourceMessage(key=None, value=v, topic=topic, partition=partition, offset=i)
        for i, v in enumerate(values)
    ]


# --- a Redis client for the sink's error paths ------------------------------------------


class FakeConnection:
    """A connection that fails as told, then answers every command (`1`, or an error reply
    for the sends the client rejects)."""

    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.replies: deque[object] = deque()

    def send_packed_command(self, data: list[bytes]) -> None:
        client = self.client
        client.attempts += 1
        client.sent.extend(data)
        if client.errors:
            error = client.errors.pop(0)
            if error is not None:  # None: this attempt goes through
                raise error
        reader = hiredis.Reader()
        for buffer in data:
            reader.feed(buffer)
        count = 0
        while reader.gets() is not False:
            count += 1
        reply = redis.ResponseError("OOM") if client.attempts in client.rejected else 1
        self.replies.extend([reply] * count)
        client.wire.append(f"send {count}")

    def read_response(self) -> object:
        self.client.wire.append("read")
        return self.replies.popleft()

    def disconnect(self) -> None:
        self.client.disconnects += 1


class FakePool:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client

    def get_connection(self) -> FakeConnection:
        return FakeConnection(self.client)

    def release(self, conn: FakeConnection) -> None:
        pass


class FakeRedis:
    """`errors`: what each send raises in turn (`None`: it goes through); `rejected`: the
    sends (counted from 1) whose commands get error replies; `wire`: each send (with its
    command count) and each reply read, in order."""

    def __init__(
        self, errors: Iterable[Exception | None] = (), rejected: Container[int] = ()
    ) -> None:
        self.errors = list(errors)
        self.rejected = rejected
        self.attempts = 0
        self.disconnects = 0
        self.sent: list[bytes] = []
        self.wire: list[str] = []
        self.connection_pool = FakePool(self)

    def close(self) -> None:
        pass


def layout_4_states(keys: dict[str, Any]) -> bytes:
    """A shard's key states as snapshot layout 4 stored them (the release before layout 5):
    per key, the suffix's UTF-8 length (uint32 LE), its UTF-8, the item count (uint32 LE)
    and the items as little-endian int64."""
    out = bytearray()
    for suffix, state in keys.items():
        name = suffix.encode("utf-8")
        out += struct.pack("<I", len(name)) + name + struct.pack("<I", len(state))
        out += struct.pack(f"<{len(state)}q", *state)
    return bytes(out)
