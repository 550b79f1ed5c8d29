"""The Redis feature-store sink: one absolute hash write per key per batch.

Within a batch, writes to the same key coalesce (the latest wins); each key becomes one
`HSET` of every field, or `DEL` once its 30 days are empty. A key's TTL is set by `EXPIRE`
when the key is created and refreshed when it is re-stated after a new day, so in the
steady state a written key costs one command. The commands of a chunk are packed as RESP
into one buffer and their replies read straight off the hiredis reader (`dataflow.resp`); a
write of many chunks sends up to `IN_FLIGHT_CHUNKS` of them ahead of the replies it has read,
so Redis executes one chunk while the next is packed and sent. Nothing is dropped, nothing
is incremented.

Redis away (connection refused, timeouts, loading after a restart): every chunk not yet
confirmed is sent again, whole and in order (every write is absolute, so a chunk applied in
part and sent again ends the same), with capped backoff (`REDIS_BACKOFF_MAX_SECONDS`), for
as long as it takes. The worker goes on until it next hands writes to its writer thread,
which is retrying (`WriteBehind`), then waits, so the pipeline reads nothing more (Bytewax
has nowhere to put it), and resumes by itself when Redis answers, from exactly where it was:
no restart, nothing lost. `/metrics` keeps being served,
`search_features_sink_up{sink="redis"}` is 0 and one log line says so; one more when writes
resume, with how long they waited (`SinkState`). With `REDIS_OUTAGE_EXIT_SECONDS` set, a
write that has kept failing that long raises `SinkError` instead, which stops the dataflow
before its epoch commits (recovery replays the writes on restart): for a supervisor that
should restart the process. A command error (`WRONGTYPE`, OOM) does not heal by retrying:
`SinkError` at once.

Redis back *without* the writes (no persistence, `FLUSHDB`, a failover, a restored backup):
the sink's marker (`dataflow.sinks.marker`, checked every `STORE_CHECK_SECONDS` and as soon
as writes resume) is gone or changed, and every live key is re-written (`dataflow.repair`).

Every worker writes what its own state shards emit, so the writes for a key always come
from one worker, in order. They are written behind the worker (`WriteBehind`): a thread of
the worker's own sends them while the worker reads and counts on, and the `redis_write`
step (`dataflow.flow.WriteLogic`) waits for them at each epoch's close, so an epoch commits
only once its writes are in Redis, as when they were written in line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable
from operator import itemgetter
from typing import Any

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow import metrics, resp
from dataflow.config import RedisSettings
from dataflow.core import native
from dataflow.core.shard import StepResult, Write
from dataflow.errors import SinkError
from dataflow.repair import StoreRepairs
from dataflow.retry import Backoff
from dataflow.sinks.marker import MarkerGuard

log = logging.getLogger(__name__)

SINK = "redis"
BEHIND_CHUNKS = 64
"""Writes that may wait for a worker's Redis writer thread, in chunks of
`REDIS_PIPELINE_KEYS`, before the worker waits for it (`WriteBehind`): 32 000 at the
default, about a second of a backfill's writes."""
IN_FLIGHT_CHUNKS = 4
"""Chunks a Redis writer sends ahead of the replies it has read (`RedisWriter._stream`)."""
BEHIND_LINGER_SECONDS = 0.005
"""How long a worker's Redis writer thread lets writes gather, when fewer than a chunk
wait, before it writes them (`WriteBehind`)."""
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def connect(settings: RedisSettings, **options: Any) -> redis.Redis:
    """A client of the feature store as `settings` describe it: REDIS_URL, REDIS_PASSWORD and,
    for `rediss://`, TLS verified against REDIS_CA_FILE (`RedisSettings.client_options`);
    `options` add redis-py's own (timeouts)."""
    return redis.Redis.from_url(settings.url.get(), **settings.client_options(), **options)


class _Everything:
    def __contains__(self, item: object) -> bool:
        return True


EVERY_KEY: Container[str] = _Everything()
"""For `RedisWriter.write`: every written key sets its TTL."""


def coalesce(batches: Iterable[StepResult]) -> tuple[dict[str, Write], set[str], list[int]]:
    """Latest write per key suffix, the suffixes whose write sets the TTL, and the `as_of`
    of event-driven writes (freshness)."""
    latest: dict[str, Write] = {}
    ttl: set[str] = set()
    fresh_as_of: list[int] = []
    suffix = itemgetter(0)
    for batch in batches:
        writes = batch.writes
        ttl.update(batch.created if not batch.new_day else map(suffix, writes))
        latest.update(zip(map(suffix, writes), writes, strict=True))
        fresh_as_of += batch.fresh
    return latest, ttl, fresh_as_of


class SinkState:
    """Whether a sink's store takes writes, for this process (its writers, one per worker,
    share it): down from a failed write until a write succeeds again.

    It keeps `search_features_sink_up{sink}` and logs one line when the sink goes down and
    one when it is back up, with how long it was down and how many attempts failed: never a
    line per retry.
    """

    def __init__(self, sink: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._failed = 0
        metrics.SINK_UP.labels(sink=sink).set(1)

    @property
    def down(self) -> bool:
        with self._lock:
            return self._down_since is not None

    def failed(self, error: Exception) -> None:
        """A write attempt failed and will be retried."""
        with self._lock:
            self._failed += 1
            if self._down_since is not None:
                return
            self._down_since = self.clock()
        metrics.SINK_UP.labels(sink=self.sink).set(0)
        log.warning(
            "%s unreachable: writes wait and are retried, the pipeline reads nothing until "
            "it answers",
            self.sink,
            extra={"sink": self.sink, "error": str(error)},
        )

    def succeeded(self) -> None:
        """A write went through."""
        with self._lock:
            if self._down_since is None:
                return
            down_for = self.clock() - self._down_since
            failed, self._failed, self._down_since = self._failed, 0, None
        metrics.SINK_UP.labels(sink=self.sink).set(1)
        log.warning(
            "%s answers again: writes resumed",
            self.sink,
            extra={
                "sink": self.sink,
                "down_seconds": round(down_for, 1),
                "failed_attempts": failed,
            },
        )


STATE = SinkState(SINK)
"""This process's Redis sink (every `RedisWriter` reports to it unless given another)."""


class RedisWriter:
    """Writes coalesced feature hashes; shared by the sink partition and the replay tool."""

    def __init__(
        self,
        client: redis.Redis,
        settings: RedisSettings,
        backoff: Backoff,
        *,
        state: SinkState = STATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = settings.prefix
        self.ttl = settings.ttl_seconds
        self.chunk = settings.pipeline_keys
        self.outage_exit_seconds = settings.outage_exit_seconds
        self.backoff = backoff
        self.state = state
        self.clock = clock
        self.recoveries = 0
        """Chunks that went through after failed attempts: Redis answered again."""

    def write(self, writes: list[Write], ttl: Container[str] = EVERY_KEY) -> None:
        """Write `writes` (absolute values, in order); the keys whose suffix is in `ttl`
        also get their TTL set. Many chunks are streamed (`_stream`); what a failure leaves
        unconfirmed is sent again in order, chunk by chunk, with retries (`_write_chunk`)."""
        chunks = [writes[start : start + self.chunk] for start in range(0, len(writes), self.chunk)]
        done, failed = 0, False
        if len(chunks) > 1 and not self.state.down:
            done = self._stream(chunks, ttl)
            failed = done < len(chunks)
        for chunk in chunks[done:]:
            self._write_chunk(chunk, ttl, failed=failed)
            failed = False

    def _stream(self, chunks: list[list[Write]], ttl: Container[str]) -> int:
        """Send `chunks` on one connection, up to `IN_FLIGHT_CHUNKS` ahead of the replies
        read, so Redis executes a chunk while this thread packs and sends the next. Returns
        how many chunks, from the first, are confirmed: all, or those before the connection
        failed. Every write is absolute and the rest is sent again in the same order, so a
        chunk applied in part (or a later chunk applied whole) ends the same. A rejected
        command is `SinkError`, as in `_write_chunk`."""
        pool: Any = self.client.connection_pool  # redis-py's connection API is untyped
        try:
            conn = pool.get_connection()
        except _RETRYABLE as exc:
            self._unconfirmed(chunks, exc)
            return 0
        sent: deque[tuple[int, int]] = deque()  # (writes, replies) of each unread chunk
        done = 0
        try:
            for chunk in chunks:
                data, replies = self._pack(chunk, ttl)
                conn.send_packed_command([data])
                sent.append((len(chunk), replies))
                if len(sent) >= IN_FLIGHT_CHUNKS:
                    self._confirm(conn, *sent.popleft())
                    done += 1
            while sent:
                self._confirm(conn, *sent.popleft())
                done += 1
        except _RETRYABLE as exc:
            conn.disconnect()  # replies are left unread on it
            self._unconfirmed(chunks[done:], exc)
        except BaseException:
            # Replies are left unread on it: never hand this connection out again.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return done

    def _confirm(self, conn: Any, writes: int, replies: int) -> None:
        """Read a streamed chunk's replies."""
        errors = [r for r in resp.read_replies(conn, replies) if isinstance(r, Exception)]
        if errors:
            metrics.SINK_WRITES.labels(sink=SINK, result="failure").inc(writes)
            raise SinkError(
                f"Redis rejected a feature write: {len(errors)} of {replies} commands failed: "
                f"{errors[0]}"
            )
        metrics.SINK_WRITES.labels(sink=SINK, result="success").inc(writes)
        self.state.succeeded()

    def _unconfirmed(self, chunks: list[list[Write]], exc: Exception) -> None:
        """A stream failed with `chunks` unconfirmed: they will be retried."""
        metrics.SINK_WRITES.labels(sink=SINK, result="retry").inc(sum(map(len, chunks)))
        self.state.failed(exc)

    def _pack(self, writes: list[Write], ttl: Container[str]) -> tuple[bytes, int]:
        """The chunk as one RESP buffer, and how many replies it asks for."""
        compiled = native.core
        if compiled is not None:
            packed: tuple[bytes, int] = compiled.pack_writes(self.prefix, writes, ttl, self.ttl)
            return packed
        return resp.pack_writes(self.prefix, writes, ttl, self.ttl)

    def _send(self, data: bytes, replies: int) -> None:
        pool: Any = self.client.connection_pool  # redis-py's connection API is untyped
        conn = pool.get_connection()
        try:
            conn.send_packed_command([data])
            errors = [r for r in resp.read_replies(conn, replies) if isinstance(r, Exception)]
        except BaseException:
            # Replies may be left unread on it: never hand this connection out again.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if errors:
            raise redis.ResponseError(f"{len(errors)} of {replies} commands failed: {errors[0]}")

    def _write_chunk(self, writes: list[Write], ttl: Container[str], failed: bool = False) -> None:
        """Send one chunk until Redis takes it (`failed`: an attempt already failed)."""
        data, replies = self._pack(writes, ttl)
        attempt = 0
        failing_since: float | None = None
        while True:
            try:
                self._send(data, replies)
            except _RETRYABLE as exc:
                now = self.clock()
                failing_since = now if failing_since is None else failing_since
                metrics.SINK_WRITES.labels(sink=SINK, result="retry").inc(len(writes))
                self.state.failed(exc)
                limit = self.outage_exit_seconds
                if limit and now - failing_since >= limit:
                    metrics.SINK_WRITES.labels(sink=SINK, result="failure").inc(len(writes))
                    raise SinkError(
                        f"Redis writes failed for {now - failing_since:.0f}s, "
                        f"REDIS_OUTAGE_EXIT_SECONDS={limit} ({exc}); stopping so a restart "
                        "resumes from the last snapshot. Check REDIS_URL and the server."
                    ) from exc
                log.debug(
                    "redis write failed, retrying",
                    extra={"attempt": attempt + 1, "keys": len(writes), "error": str(exc)},
                )
                # With an exit deadline, the last attempt is made at the deadline.
                left = limit - (now - failing_since) if limit else None
                self.backoff.wait(attempt, at_most=left)
                attempt += 1
                continue
            except redis.ResponseError as exc:
                # A command error (wrong type at a key, OOM, ...) does not heal by retrying.
                metrics.SINK_WRITES.labels(sink=SINK, result="failure").inc(len(writes))
                raise SinkError(f"Redis rejected a feature write: {exc}") from exc
            metrics.SINK_WRITES.labels(sink=SINK, result="success").inc(len(writes))
            self.state.succeeded()
            if attempt or failed:
                self.recoveries += 1
            return


class WriteBehind:
    """One worker's Redis writes, made by a thread of their own while the worker goes on.

    `put` hands results over and returns at once, unless `limit` writes already wait for the
    thread (then it waits until the thread takes them: the worker slows to what Redis takes,
    as when it wrote in line). The limit holds about a flush interval's writes of a busy
    worker, so that a flush's burst of writes goes behind while the worker reads and counts
    on, instead of holding the worker until Redis has taken all but the last few chunks.

    The thread takes everything waiting at once, once a chunk's worth waits (`batch` writes)
    or `linger` seconds after the first result, or at once when drained; so the results of
    many shards and activations coalesce into one write per key, and a worker whose shards
    each flush a few keys does not wake the thread (and take turns with it for the
    interpreter) once per shard. `drain` returns once everything handed over is in Redis,
    and raises what the thread raised (`SinkError`: the pipeline stops before its epoch
    commits, as with an in-line write). While Redis is away the thread retries as
    `RedisWriter` does (`stalled` says so), and `drain` and `put` wait, however much room is
    left: the worker reads nothing more from its next hand-over on.
    """

    def __init__(
        self,
        write: Callable[[list[StepResult]], None],
        limit: int,
        name: str,
        *,
        batch: int = 1,
        linger: float = 0.0,
        stalled: Callable[[], bool] = lambda: False,
    ) -> None:
        self._write = write
        self.limit = limit
        self.stalled = stalled
        """Whether the thread's writes are failing and being retried (Redis away)."""
        self.batch = batch
        self.linger = linger
        self._draining = 0
        self._cond = threading.Condition()
        self._waiting: list[StepResult] = []
        self._waiting_writes = 0
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._told = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, results: list[StepResult]) -> None:
        count = sum(len(r.writes) for r in results)
        if not count:
            return
        with self._cond:
            while (
                self._waiting_writes >= self.limit or (self._busy and self.stalled())
            ) and self._error is None:
                self._cond.wait()
            self._raise()
            first = not self._waiting
            self._waiting += results
            self._waiting_writes += count
            if first or self._waiting_writes >= self.batch:
                self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every result handed over is written."""
        with self._cond:
            self._draining += 1
            self._cond.notify_all()
            try:
                while (self._waiting or self._busy) and self._error is None:
                    self._cond.wait()
            finally:
                self._draining -= 1
            self._raise()

    def close(self) -> None:
        """Write what waits, then stop the thread; raise what it raised, unless the worker
        was told already."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            if not self._told:
                self._raise()

    def _raise(self) -> None:
        error = self._error
        if error is None:
            return
        self._told = True
        if isinstance(error, SinkError):
            raise SinkError(str(error)) from error
        raise SinkError(f"the Redis writer thread failed: {error!r}") from error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                deadline = time.monotonic() + self.linger
                while (
                    self._waiting_writes < self.batch
                    and not (self._draining or self._closed)
                    and (left := deadline - time.monotonic()) > 0
                ):
                    self._cond.wait(left)
                batch, self._waiting, self._waiting_writes = self._waiting, [], 0
                self._busy = True
                self._cond.notify_all()  # a `put` waiting for room
            try:
                self._write(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the worker by `_raise`
                if not isinstance(exc, SinkError):
                    log.exception("the Redis writer thread failed")
                with self._cond:
                    self._error, self._busy = exc, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._cond.notify_all()


class _RedisPartition(StatelessSinkPartition[StepResult]):
    def __init__(
        self,
        writer: RedisWriter,
        guard: MarkerGuard | None = None,
        worker: int = 0,
        *,
        behind: int = 0,
    ) -> None:
        self.writer = writer
        self.guard = guard
        self.worker = worker
        self.behind = (
            WriteBehind(
                self.write,
                BEHIND_CHUNKS * behind,
                f"redis-writer-{worker}",
                batch=behind,
                linger=BEHIND_LINGER_SECONDS,
                stalled=lambda: writer.state.down,
            )
            if behind
            else None
        )
        """With `behind` (a chunk's keys), the writes handed to `behind.put` are made by a
        thread, up to `BEHIND_CHUNKS` chunks waiting; `write_batch` still writes in line."""

    def write_batch(self, items: list[StepResult]) -> None:
        """Write `items` before returning (after whatever was handed to `behind`)."""
        if self.behind is not None:
            self.behind.drain()
        self.write(items)

    def write(self, items: list[StepResult]) -> None:
        latest, ttl, fresh_as_of = coalesce(items)
        if not latest:
            return
        stop = metrics.timed(SINK)
        recoveries = self.writer.recoveries
        self.writer.write(list(latest.values()), ttl)
        stop()
        if self.guard is not None and self.writer.recoveries != recoveries:
            self.guard.poke()  # Redis answers again: did it come back with our writes?
        metrics.SINK_BATCH.labels(sink=SINK).observe(len(latest))
        metrics.observe_fresh(time.time() * 1000.0, fresh_as_of)

    def close(self) -> None:
        try:
            if self.behind is not None:
                self.behind.close()
        finally:
            if self.guard is not None:
                self.guard.detach(self.worker)
            self.writer.client.close()


class RedisFeatureSink(DynamicSink[StepResult]):
    """Bytewax sink of the shards' `StepResult`s into the Redis feature store.

    With `STORE_CHECK_SECONDS` above 0 it keeps the store's marker (`dataflow.sinks.marker`)
    for the workers whose partitions run in this process, and raises `repairs` when Redis
    lost what it wrote; `build_flow` hands `repairs` to the feature shards, which re-state
    every live key (`dataflow.repair`).
    """

    def __init__(self, settings: RedisSettings, backoff: Backoff | None = None) -> None:
        self.settings = settings
        self.backoff = backoff or Backoff(cap=settings.backoff_max_seconds)
        self.repairs: StoreRepairs | None = None
        self.guard: MarkerGuard | None = None
        self._lock = threading.Lock()
        self._behind: dict[int, WriteBehind] = {}
        """The writer of each worker of this process, by the id of the worker's thread."""
        if settings.check_seconds > 0:
            self.repairs = StoreRepairs()
            self.guard = MarkerGuard(
                lambda: connect(settings, socket_timeout=5, socket_connect_timeout=5),
                settings.prefix,
                self.repairs,
                settings.check_seconds,
            )

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RedisPartition:
        client = connect(self.settings, socket_timeout=10, socket_connect_timeout=5)
        if self.guard is not None:
            self.guard.attach(worker_index)
        writer = RedisWriter(client, self.settings, self.backoff)
        part = _RedisPartition(writer, self.guard, worker_index, behind=self.settings.pipeline_keys)
        if part.behind is not None:
            with self._lock:
                self._behind[threading.get_ident()] = part.behind
        return part

    def behind_here(self) -> WriteBehind:
        """The `WriteBehind` of the worker running in this thread (Bytewax builds a worker's
        sink partition in the worker's thread, before its steps run). By thread id, not a
        `threading.local`: a Bytewax worker thread is not a Python thread, and its Python
        thread state (and what a `threading.local` keeps in it) may not last."""
        with self._lock:
            behind = self._behind.get(threading.get_ident())
        if behind is None:
            raise RuntimeError("the Redis sink partition of this worker is not built yet")
        return behind
