"""The Redis sink without a server: its wire format and TTL rule (one HSET per written key,
an EXPIRE only where the key was created or re-stated after a new day), and how it waits out
a Redis that is away (the fake client fails as many times as told)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import hiredis
import pytest
import redis

from dataflow.config import RedisSettings
from dataflow.core.shard import StepResult, Write
from dataflow.errors import SinkError
from dataflow.resp import pack_del, pack_expire, pack_hset
from dataflow.retry import NO_WAIT, Backoff
from dataflow.sinks.redis import (
    IN_FLIGHT_CHUNKS,
    RedisWriter,
    SinkState,
    WriteBehind,
    coalesce,
)
from tests.fakes import FakeRedis
from tests.registry import Delta, sample


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


def test_coalesce_gathers_the_freshness_of_event_driven_writes() -> None:
    first = StepResult(writes=[("doc:a", {"as_of": "5"})], fresh=[5])
    restated = StepResult(writes=[("doc:b", {"as_of": "7"})], new_day=True)
    second = StepResult(writes=[("doc:a", {"as_of": "9"}), ("doc:c", {"as_of": "8"})], fresh=[9, 8])
    assert coalesce([first, restated, second])[2] == [5, 9, 8]


# --- Redis away ---------------------------------------------------------------------------


class Clock:
    """A monotonic clock moved only by the backoff's sleeps, which it records along with the
    `sink_up` gauge at the time (the sink is asleep: what /metrics shows meanwhile)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[tuple[float, float]] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append((seconds, sample("search_features_sink_up", sink="redis")))
        self.now += seconds


def outage_writer(
    client: FakeRedis, clock: Clock, *, exit_after: int = 0, cap: float = 5.0
) -> RedisWriter:
    settings = RedisSettings(prefix="P", outage_exit_seconds=exit_after)
    state = SinkState("redis", clock=clock)
    backoff = Backoff(base=0.05, cap=cap, sleep=clock.sleep)
    return RedisWriter(client, settings, backoff, state=state, clock=clock)  # type: ignore[arg-type]


WRITES: list[Write] = [("doc:a", {"as_of": "1"}), ("doc:b", None)]


def sink_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dataflow.sinks.redis" and r.levelno >= 30]


def test_a_long_outage_is_waited_out_the_chunk_resent_whole_and_logged_once_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = 200  # minutes of capped backoff
    client = FakeRedis([redis.ConnectionError("Connection refused")] * failures)
    clock = Clock()
    with (
        caplog.at_level(logging.DEBUG, logger="dataflow.sinks.redis"),
        Delta("search_features_sink_writes_total", sink="redis", result="retry") as retried,
        Delta("search_features_sink_writes_total", sink="redis", result="success") as ok,
        Delta("search_features_sink_writes_total", sink="redis", result="failure") as failed,
    ):
        outage_writer(client, clock).write(list(WRITES))
    assert client.attempts == failures + 1
    assert len(set(client.sent)) == 1  # the same RESP buffer every time: absolute writes
    assert client.disconnects == failures  # a failed connection is never reused
    slept = [seconds for seconds, _ in clock.sleeps]
    assert max(slept) <= 5.0 and sum(slept) > 300  # capped, and minutes long
    assert {up for _, up in clock.sleeps} == {0.0}  # down the whole time
    assert sample("search_features_sink_up", sink="redis") == 1.0
    assert (retried.value, ok.value, failed.value) == (failures * 2, 2, 0)
    down, back = sink_lines(caplog)  # one line each way, none per retry
    assert down.getMessage().startswith("redis unreachable")
    assert down.error == "Connection refused"  # type: ignore[attr-defined]
    assert back.getMessage() == "redis answers again: writes resumed"
    assert back.down_seconds == round(sum(slept), 1)  # type: ignore[attr-defined]
    assert back.failed_attempts == failures  # type: ignore[attr-defined]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == failures  # each retry only at DEBUG


def test_a_write_after_an_outage_starts_from_a_clean_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeRedis([redis.TimeoutError("slow")])
    clock = Clock()
    writer = outage_writer(client, clock)
    with caplog.at_level(logging.WARNING, logger="dataflow.sinks.redis"):
        writer.write(list(WRITES))
        writer.write(list(WRITES))  # no error: no line
        client.errors.append(redis.ConnectionError("again"))
        writer.write(list(WRITES))
    messages = [r.getMessage().split(":")[0] for r in sink_lines(caplog)]
    assert messages == ["redis unreachable", "redis answers again"] * 2
    assert [r.failed_attempts for r in sink_lines(caplog)[1::2]] == [1, 1]  # type: ignore[attr-defined]


def test_the_outage_exit_limit_stops_the_write_at_its_deadline() -> None:
    client = FakeRedis([redis.ConnectionError("refused")] * 10_000)
    clock = Clock()
    with (
        Delta("search_features_sink_writes_total", sink="redis", result="failure") as failed,
        pytest.raises(SinkError, match=r"failed for 90s, REDIS_OUTAGE_EXIT_SECONDS=90"),
    ):
        outage_writer(client, clock, exit_after=90).write(list(WRITES))
    assert sum(seconds for seconds, _ in clock.sleeps) == pytest.approx(90.0)
    assert failed.value == len(WRITES)
    assert sample("search_features_sink_up", sink="redis") == 0.0  # it stops while down
    outage_writer(FakeRedis(), clock).write(list(WRITES))  # up again, for the other tests


def test_an_outage_shorter_than_the_exit_limit_is_ridden_out() -> None:
    client = FakeRedis([redis.BusyLoadingError("loading")] * 5)
    clock = Clock()
    outage_writer(client, clock, exit_after=60).write(list(WRITES))
    assert client.attempts == 6


def test_a_command_error_is_not_an_outage() -> None:
    client = FakeRedis([redis.ResponseError("WRONGTYPE")])
    clock = Clock()
    with pytest.raises(SinkError, match="WRONGTYPE"):
        outage_writer(client, clock).write(list(WRITES))
    assert client.attempts == 1 and not clock.sleeps


def test_the_backoff_stays_capped_however_many_attempts() -> None:
    backoff = Backoff(base=0.05, cap=5.0)
    assert all(2.5 <= backoff.delay(attempt) <= 5.0 for attempt in (10, 1_100, 100_000))


# --- writes behind the worker (WriteBehind) ---------------------------------------------------


class Gate:
    """A write function that records what it is given and waits for `open` to return."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.open = threading.Event()
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, results: list[StepResult]) -> None:
        self.open.wait(5)
        self.calls.append([s for r in results for s, _ in r.writes])
        if self.fail is not None:
            raise self.fail


def result(*suffixes: str) -> StepResult:
    return StepResult(writes=[(s, {"f": "1"}) for s in suffixes])


def test_writes_behind_return_at_once_and_drain_waits_for_them() -> None:
    gate = Gate()
    behind = WriteBehind(gate, limit=100, name="test-writer")
    behind.put([result("a")])  # returns though the write is held
    behind.put([result("b"), result("c")])
    behind.put([StepResult()])  # nothing to write: not handed over
    assert gate.calls == []
    done = threading.Event()
    threading.Thread(target=lambda: (behind.drain(), done.set())).start()
    assert not done.wait(0.1)  # drain waits for the held write
    gate.open.set()
    assert done.wait(5)
    # In order; what waited while the first write was held went in one write.
    assert gate.calls in ([["a"], ["b", "c"]], [["a", "b", "c"]])
    behind.close()


def test_a_full_write_behind_buffer_makes_the_worker_wait() -> None:
    gate = Gate()
    behind = WriteBehind(gate, limit=2, name="test-writer")
    behind.put([result("a")])  # taken by the thread, held
    time.sleep(0.05)
    behind.put([result("b", "c")])  # two waiting: the limit
    put = threading.Event()
    threading.Thread(target=lambda: (behind.put([result("d")]), put.set())).start()
    assert not put.wait(0.1)
    gate.open.set()
    assert put.wait(5)
    behind.drain()
    assert [s for call in gate.calls for s in call] == ["a", "b", "c", "d"]
    behind.close()


def test_while_the_writes_fail_the_worker_waits_with_room_in_the_buffer() -> None:
    gate = Gate()
    down = threading.Event()  # the writer's retries: Redis away
    behind = WriteBehind(gate, limit=100, name="test-writer", stalled=down.is_set)
    behind.put([result("a")])  # taken by the thread, held
    time.sleep(0.05)
    behind.put([result("b")])  # room, and the write is not failing: returns
    down.set()
    put = threading.Event()
    threading.Thread(target=lambda: (behind.put([result("c")]), put.set())).start()
    assert not put.wait(0.1)  # room for 99 writes, but Redis is away: the worker waits
    down.clear()
    gate.open.set()  # the write goes through
    assert put.wait(5)
    behind.drain()
    assert [s for call in gate.calls for s in call] == ["a", "b", "c"]
    behind.close()


def test_a_failed_write_behind_stops_the_worker_once() -> None:
    gate = Gate(fail=SinkError("Redis rejected a feature write: WRONGTYPE"))
    gate.open.set()
    behind = WriteBehind(gate, limit=100, name="test-writer")
    behind.put([result("a")])
    with pytest.raises(SinkError, match="WRONGTYPE"):
        behind.drain()
    with pytest.raises(SinkError, match="WRONGTYPE"):
        behind.put([result("b")])
    behind.close()  # the worker was told: closing does not raise it again
    other = WriteBehind(Gate(fail=ValueError("surprise")), limit=100, name="test-writer")
    other._write.open.set()  # type: ignore[attr-defined]
    other.put([result("a")])
    with pytest.raises(SinkError, match="writer thread failed.*surprise"):
        other.close()  # never told before: close says it


def test_writes_behind_gather_until_a_chunk_waits_the_linger_passes_or_a_drain() -> None:
    gate = Gate()
    gate.open.set()
    behind = WriteBehind(gate, limit=100, name="test-writer", batch=3, linger=0.3)
    behind.put([result("a")])
    behind.put([result("b")])
    time.sleep(0.1)
    assert gate.calls == []  # fewer than a chunk, the linger not over
    behind.put([result("c")])  # a chunk's worth: written at once
    deadline = time.monotonic() + 5
    while not gate.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.calls == [["a", "b", "c"]]
    behind.put([result("d")])
    start = time.monotonic()
    behind.drain()  # does not wait for the linger
    assert time.monotonic() - start < 0.25
    behind.put([result("e")])
    time.sleep(0.5)  # the linger over: written without a drain
    assert gate.calls == [["a", "b", "c"], ["d"], ["e"]]
    behind.close()


# --- chunks in flight ---------------------------------------------------------------------


def chunked_writer(client: FakeRedis, clock: Clock) -> RedisWriter:
    settings = RedisSettings(prefix="P", pipeline_keys=2)
    state = SinkState("redis", clock=clock)
    backoff = Backoff(base=0.05, cap=5.0, sleep=clock.sleep)
    return RedisWriter(client, settings, backoff, state=state, clock=clock)  # type: ignore[arg-type]


NINE: list[Write] = [(f"doc:{i}", {"as_of": str(i)}) for i in range(9)]


def keys_sent(client: FakeRedis) -> list[bytes]:
    return [c[1] for data in client.sent for c in commands(data)]


def test_chunks_go_out_ahead_of_their_replies_in_order_on_one_connection() -> None:
    assert IN_FLIGHT_CHUNKS == 4
    client = FakeRedis()
    with Delta("search_features_sink_writes_total", sink="redis", result="success") as ok:
        chunked_writer(client, Clock()).write(list(NINE), ttl=set())
    assert keys_sent(client) == [f"P:doc:{i}".encode() for i in range(9)]
    # Five chunks: four go out before a reply is read, the fifth once the first is read.
    sends = ["send 2"] * 4
    assert client.wire == [*sends, "read", "read", "send 1", *["read"] * 7]
    assert client.attempts == 5 and client.disconnects == 0
    assert ok.value == 9


def test_a_connection_lost_with_chunks_in_flight_resends_the_unconfirmed_in_order() -> None:
    # The third chunk's send fails; the first two were sent but their replies never read:
    # all of them go again, one at a time and in order (absolute writes: a repeat is
    # harmless, and the last write of a key stays the last).
    client = FakeRedis([None, None, redis.ConnectionError("reset")])
    clock = Clock()
    writer = chunked_writer(client, clock)
    with Delta("search_features_sink_writes_total", sink="redis", result="retry") as retried:
        writer.write(list(NINE), ttl=set())
    resent = [[c[1] for c in commands(data)] for data in client.sent[3:]]
    assert resent == [[b"P:doc:%d" % i for i in range(j, min(j + 2, 9))] for j in (0, 2, 4, 6, 8)]
    assert retried.value == 9 and client.disconnects == 1
    assert writer.recoveries == 1  # Redis answered again: the store marker gets checked
    assert sample("search_features_sink_up", sink="redis") == 1.0


def test_chunks_confirmed_before_a_failure_are_not_sent_again() -> None:
    # Six chunks: the first is confirmed once four are out, the second once the fifth is;
    # the sixth's send fails, so the third chunk on go again.
    client = FakeRedis([None] * 5 + [redis.ConnectionError("reset")])
    writer = chunked_writer(client, Clock())
    writer.write([(f"doc:{i}", {"as_of": "1"}) for i in range(12)], ttl=set())
    resent = [c[1] for data in client.sent[6:] for c in commands(data)]
    assert resent == [b"P:doc:%d" % i for i in range(4, 12)]


def test_an_error_reply_with_chunks_in_flight_is_not_an_outage() -> None:
    client = FakeRedis(rejected={2})
    clock = Clock()
    with (
        Delta("search_features_sink_writes_total", sink="redis", result="failure") as failed,
        pytest.raises(SinkError, match="2 of 2 commands failed: OOM"),
    ):
        chunked_writer(client, clock).write(list(NINE), ttl=set())
    assert client.attempts == 5 and not clock.sleeps and client.disconnects == 1
    assert failed.value == 2


def test_a_refused_connection_before_chunks_go_out_is_an_outage_ridden_out() -> None:
    client = FakeRedis()
    refusals = [redis.ConnectionError("refused")] * 3
    get_connection = client.connection_pool.get_connection

    def refusing() -> Any:
        if refusals:
            raise refusals.pop()
        return get_connection()

    client.connection_pool.get_connection = refusing  # type: ignore[method-assign]
    clock = Clock()
    writer = chunked_writer(client, clock)
    writer.write(list(NINE), ttl=set())
    assert keys_sent(client) == [f"P:doc:{i}".encode() for i in range(9)]
    assert len(clock.sleeps) == 2 and writer.recoveries == 1
