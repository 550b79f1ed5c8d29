"""The store marker on a real Redis (`dataflow.sinks.marker.MarkerGuard`): what the sink
concludes from it at start and while running, when it writes it back, what each check
costs, and how it reports a marker it cannot keep. The shards' side of a repair is played
by `StoreRepairs` calls (tests/test_repair.py drives the real shard logic)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from dataflow.repair import StoreRepairs
from dataflow.sinks.marker import (
    REPAIRING,
    WHOLE,
    Mark,
    MarkerGuard,
    Status,
    mark_field,
    marker_key,
    status_field,
)
from tests.registry import Delta


class CountingRedis(redis.Redis):
    """A real client that counts the commands it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: Counter[str] = Counter()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent[str(args[0]).upper()] += 1
        return super().execute_command(*args, **options)


class Part:
    """Stands for a shard or a wake-up partition (StoreRepairs holds them weakly)."""


@pytest.fixture
def client(redis_url: str) -> Iterator[CountingRedis]:
    c = CountingRedis.from_url(redis_url)
    yield c  # type: ignore[misc]
    c.close()


def guard(client: redis.Redis, prefix: str, repairs: StoreRepairs, *workers: int) -> MarkerGuard:
    g = MarkerGuard(lambda: client, prefix, repairs, 1.0)
    for worker in workers:  # registered, not started: the test runs each check itself
        g._expected[worker] = None
    return g


def marks(client: redis.Redis, prefix: str) -> dict[str, Mark | None]:
    raw: dict[bytes, bytes] = client.hgetall(marker_key(prefix))  # type: ignore[assignment]
    return {k.decode(): Mark.decode(v) for k, v in raw.items() if k.startswith(b"worker:")}


def settle(repairs: StoreRepairs, *shards: Part) -> None:
    """What the shards and a worker's wake-up do for the current generation."""
    waker = Part()
    repairs.enter(waker)
    repairs.woke(waker, repairs.generation)
    for shard in shards:
        repairs.queued(shard, repairs.generation, 10)
        repairs.saved(shard)
    repairs.leave(waker)


def test_a_marker_missing_at_start_repairs_and_is_written_back_once_queued(
    client: CountingRedis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    repairs = StoreRepairs()
    shard = Part()
    repairs.join(shard, restored=True)
    g = guard(client, key_prefix, repairs, 0, 1)
    with (
        caplog.at_level(logging.INFO, logger="dataflow.sinks.marker"),
        Delta("search_features_store_repairs_total", trigger="start") as started,
    ):
        g.check()
    assert started.value == 1 and repairs.generation == 1
    assert repairs.due(0, restored=True) and not repairs.due(0, restored=False)
    written = marks(client, key_prefix)
    assert set(written) == {"worker:0", "worker:1"}
    assert all(m is not None and m.state == REPAIRING and m.run == g.run for m in written.values())
    [line] = [r for r in caplog.records if "marker" in r.getMessage()]
    assert line.levelno == logging.INFO  # at start it may be a new prefix: no warning
    assert "missing (worker:0,worker:1) at start" in line.getMessage()

    g.check()  # the shard has not queued yet: still repairing
    assert all(m is not None and m.state == REPAIRING for m in marks(client, key_prefix).values())
    settle(repairs, shard)
    g.check()
    assert all(m is not None and m.state == WHOLE for m in marks(client, key_prefix).values())
    status = Status.decode(client.hget(marker_key(key_prefix), status_field(1)) or b"")
    assert status is not None
    assert (status.run, status.generation, status.state) == (g.run, 1, WHOLE)
    assert status.every_s == 1.0 and status.written_ms > 0


def test_a_whole_mark_at_start_is_adopted_and_an_unfinished_one_is_not(
    client: CountingRedis, key_prefix: str
) -> None:
    key = marker_key(key_prefix)
    client.hset(key, mark_field(0), Mark("earlier", WHOLE, 1).encode())
    client.hset(key, mark_field(1), Mark("earlier", REPAIRING, 1).encode())
    repairs = StoreRepairs()
    g = guard(client, key_prefix, repairs, 0)
    g.check()
    assert repairs.generation == 0  # a run before this one kept this store whole
    assert client.hget(key, mark_field(0)) == Mark("earlier", WHOLE, 1).encode().encode()
    other = guard(client, key_prefix, repairs, 1)
    other.check()
    assert repairs.generation == 1  # stopped before its repair was safely queued


def test_a_marker_lost_while_running_is_noticed_at_the_next_check(
    client: CountingRedis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = marker_key(key_prefix)
    repairs = StoreRepairs()
    g = guard(client, key_prefix, repairs, 0)
    g.check()
    settle(repairs)
    g.check()
    g.check()
    assert repairs.generation == 1
    client.sent.clear()
    g.check()
    assert client.sent == {"HMGET": 1, "HSET": 1}  # what a check costs, all being well

    client.delete(key)  # FLUSHDB, a restart without persistence, the resync command
    with (
        caplog.at_level(logging.WARNING, logger="dataflow.sinks.marker"),
        Delta("search_features_store_repairs_total", trigger="missing") as missing,
    ):
        g.check()
    assert missing.value == 1 and repairs.generation == 2
    assert repairs.due(1, restored=False)  # while running, every shard re-states
    [line] = caplog.records
    assert line.getMessage().startswith("feature store lost data: marker worker:0 is missing")
    assert line.trigger == "missing" and line.marker == key  # type: ignore[attr-defined]

    # A status written after a loss recreates the hash, but never the mark.
    settle(repairs)
    g.check()
    client.delete(key)
    client.hset(key, status_field(0), "a status written just after the loss")
    g.check()
    assert repairs.generation == 3


def test_a_mark_holding_another_value_is_a_loss(
    client: CountingRedis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = marker_key(key_prefix)
    repairs = StoreRepairs()
    g = guard(client, key_prefix, repairs, 0)
    g.check()
    settle(repairs)
    g.check()
    ours = client.hget(key, mark_field(0))
    restored = Mark("a-backup", WHOLE, 1).encode()
    client.hset(key, mark_field(0), restored)  # what a backup taken earlier holds
    with (
        caplog.at_level(logging.WARNING, logger="dataflow.sinks.marker"),
        Delta("search_features_store_repairs_total", trigger="changed") as changed,
    ):
        g.check()
    assert changed.value == 1
    [line] = caplog.records
    assert "holds another value" in line.getMessage()
    assert line.found == {"worker:0": restored}  # type: ignore[attr-defined]
    assert line.expected == {"worker:0": ours.decode()}  # type: ignore[attr-defined,union-attr]


def test_a_marker_it_cannot_keep_is_reported_once(
    client: CountingRedis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    client.set(marker_key(key_prefix), "a string where the hash should be")
    g = guard(client, key_prefix, StoreRepairs(), 0)
    with caplog.at_level(logging.ERROR, logger="dataflow.sinks.marker"):
        for _ in range(3):
            g.check()
    [line] = caplog.records
    assert line.getMessage().startswith(
        f"cannot keep the feature store marker {marker_key(key_prefix)}"
    )
    assert "WRONGTYPE" in line.error  # type: ignore[attr-defined]


def test_the_checks_run_on_their_own_thread_while_a_partition_is_attached(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    repairs = StoreRepairs()
    g = MarkerGuard(lambda: redis.Redis.from_url(redis_url), key_prefix, repairs, 0.2)
    g.attach(3)
    try:
        deadline = time.monotonic() + 10
        while not redis_client.hexists(marker_key(key_prefix), mark_field(3)):
            assert time.monotonic() < deadline, "no check ran"
            time.sleep(0.05)
        assert repairs.status().checked and repairs.generation == 1
        settle(repairs)
        redis_client.delete(marker_key(key_prefix))
        deadline = time.monotonic() + 10
        while repairs.generation < 2:
            assert time.monotonic() < deadline, "the loss was not noticed"
            time.sleep(0.05)
    finally:
        g.detach(3)
    assert g._thread is None


class FlushingAfterRead(redis.Redis):
    """A real client whose next HMGET is followed at once by the loss of the whole marker:
    a flush landing between a check's read and its write."""

    flush_next = False

    def hmget(self, name: Any, keys: Any, *args: Any) -> Any:
        values = super().hmget(name, keys, *args)
        if self.flush_next:
            self.flush_next = False
            self.delete(name)
        return values


def test_a_loss_between_a_checks_read_and_its_write_is_not_hidden_by_the_write(
    redis_url: str, key_prefix: str
) -> None:
    c = FlushingAfterRead.from_url(redis_url)
    try:
        repairs = StoreRepairs()
        g = guard(c, key_prefix, repairs, 0)
        g.check()  # the first mark: a repair at start
        settle(repairs)
        c.flush_next = True
        g.check()  # reads the marks, loses them, writes them back as whole
        assert repairs.generation == 1
        g.check()  # the mark it wrote back is not taken for the one it expected
        assert repairs.generation == 2
        settle(repairs)
        g.check()
        g.check()  # and once written back for real, no further repair
        assert repairs.generation == 2
    finally:
        c.close()
