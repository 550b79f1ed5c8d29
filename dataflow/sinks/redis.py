"""The Redis feature-store sink: one absolute hash write per key per batch.

Within a batch, writes to the same key coalesce (the latest wins); each key becomes
`HSET` of every field plus `EXPIRE`, or `DEL` once its 30 days are empty, sent through a
non-transactional pipeline in chunks. Connection errors and timeouts are retried with capped
backoff; when retries run out `SinkError` stops the dataflow before its epoch commits, so
recovery replays the writes. Nothing is dropped, nothing is incremented.

A `DynamicSink`: every worker writes what its own state shards emit, so the writes for a
key always come from one worker, in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflow import metrics
from dataflow.config import RedisSettings
from dataflow.core.shard import StepResult, Write
from dataflow.errors import SinkError
from dataflow.retry import Backoff

log = logging.getLogger(__name__)

SINK = "redis"
_RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def coalesce(batches: Iterable[StepResult]) -> tuple[dict[str, Write], list[int]]:
    """Latest write per key suffix, and the `as_of` of event-driven writes (freshness)."""
    latest: dict[str, Write] = {}
    fresh_as_of: list[int] = []
    for batch in batches:
        for write in batch.writes:
            latest[write[0]] = write
            if not batch.new_day and write[1] is not None:
                fresh_as_of.append(int(write[1]["as_of"]))
    return latest, fresh_as_of


class RedisWriter:
    """Writes coalesced feature hashes; shared by the sink partition and the replay tool."""

    def __init__(self, client: redis.Redis, settings: RedisSettings, backoff: Backoff) -> None:
        self.client = client
        self.prefix = settings.prefix
        self.ttl = settings.ttl_seconds
        self.chunk = settings.pipeline_keys
        self.max_retries = settings.max_retries
        self.backoff = backoff

    def write(self, writes: list[Write]) -> None:
        for start in range(0, len(writes), self.chunk):
            self._write_chunk(writes[start : start + self.chunk])

    def _write_chunk(self, writes: list[Write]) -> None:
        attempt = 0
        while True:
            pipe = self.client.pipeline(transaction=False)
            for suffix, fields in writes:
                key = f"{self.prefix}:{suffix}"
                if fields is None:
                    pipe.delete(key)
                else:
                    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                    pipe.expire(key, self.ttl)
            try:
                pipe.execute()
            except _RETRYABLE as exc:
                metrics.SINK_WRITES.labels(sink=SINK, result="retry").inc(len(writes))
                if attempt >= self.max_retries:
                    metrics.SINK_WRITES.labels(sink=SINK, result="failure").inc(len(writes))
                    raise SinkError(
                        f"Redis write failed after {attempt + 1} attempts ({exc}); stopping so "
                        "recovery replays from the last snapshot. Check REDIS_URL and the "
                        "server, then restart."
                    ) from exc
                log.warning(
                    "redis write failed, retrying",
                    extra={"attempt": attempt + 1, "keys": len(writes), "error": str(exc)},
                )
                self.backoff.wait(attempt)
                attempt += 1
                continue
            except redis.ResponseError as exc:
                # A command error (wrong type at a key, OOM, ...) does not heal by retrying.
                metrics.SINK_WRITES.labels(sink=SINK, result="failure").inc(len(writes))
                raise SinkError(f"Redis rejected a feature write: {exc}") from exc
            metrics.SINK_WRITES.labels(sink=SINK, result="success").inc(len(writes))
            return


class _RedisPartition(StatelessSinkPartition[StepResult]):
    def __init__(self, writer: RedisWriter) -> None:
        self.writer = writer

    def write_batch(self, items: list[StepResult]) -> None:
        latest, fresh_as_of = coalesce(items)
        if not latest:
            return
        stop = metrics.timed(SINK)
        self.writer.write(list(latest.values()))
        stop()
        metrics.SINK_BATCH.labels(sink=SINK).observe(len(latest))
        now_ms = time.time() * 1000.0
        for as_of in fresh_as_of:
            metrics.FRESHNESS.observe(max(0.0, (now_ms - as_of) / 1000.0))

    def close(self) -> None:
        self.writer.client.close()


class RedisFeatureSink(DynamicSink[StepResult]):
    """Bytewax sink of the shards' `StepResult`s into the Redis feature store."""

    def __init__(self, settings: RedisSettings, backoff: Backoff | None = None) -> None:
        self.settings = settings
        self.backoff = backoff or Backoff(cap=settings.backoff_max_seconds)

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _RedisPartition:
        client = redis.Redis.from_url(
            self.settings.url.get(), socket_timeout=10, socket_connect_timeout=5
        )
        return _RedisPartition(RedisWriter(client, self.settings, self.backoff))
