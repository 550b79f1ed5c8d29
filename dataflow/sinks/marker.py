"""The store's generation marker: how the Redis sink notices that Redis lost its writes.

Beside the feature keys, the pipeline keeps one hash, `{FEATURE_PREFIX}:__generation__`
(`marker_key`). No feature key can take that name: every feature key starts with a family
head (`P:doc:`, `P:qd:`, `P:ac:`, `P:acq:`) and readers build nothing else
(docs/contract.md, "The store kept whole"). Its fields, one pair per worker of every
running pipeline process:

- `worker:{k}`: the mark of worker `k`, as JSON: the process's random run token, `state`
  (`whole`, or `repairing` from the moment a loss is noticed until the repair is safely
  queued) and `written_ms`, when it was written. Written when the sink starts if it is
  missing, and when a repair starts and is queued; otherwise only read.
- `status:{k}`: what the process is doing, as JSON, rewritten at every check: run token,
  host, pid, repair generation, state, keys left to re-state, `written_ms`, the check
  interval. `python -m dataflow.tools.resync` follows a repair through these.

`MarkerGuard` (one per Redis sink, so one per process) checks the marks of the workers
whose sink partitions run in this process every `STORE_CHECK_SECONDS` (one `HMGET`, then
one `HSET` of the status) and at once when Redis answers again after an outage:

- at start, a mark that is missing, or still `repairing` (a run stopped before its repair
  was safely queued), means the store does not hold what this worker's shards hold: a new
  store or prefix, or data lost while the pipeline was stopped (trigger `start`); a mark
  present is adopted;
- while running, a mark that is gone (trigger `missing`: Redis restarted empty, `FLUSHDB`,
  a failover to an empty replica, `python -m dataflow.tools.resync`) or holds another value
  (trigger `changed`: a restored backup, another writer) means the store lost data.

Then it raises a new generation in `dataflow.repair.StoreRepairs`, writes the process's
marks as `repairing`, and once every shard of the process has queued its keys and had a
snapshot taken with the queue in it (`StoreRepairs.status().settled`) writes them back as
`whole`. It logs the loss, the repair's progress at most every `PROGRESS_SECONDS`, and its
end; `search_features_store_repairs_total{trigger}` counts the repairs.

Only the status is written at every check; a mark is written only as said above. So a
write racing a loss never puts a mark back by accident: the status recreates the hash, and
the next check still finds the mark missing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from dataflow import metrics
from dataflow.repair import StoreRepairs

log = logging.getLogger(__name__)

MARKER_NAME = "__generation__"
WHOLE = "whole"
REPAIRING = "repairing"
_GONE = "\x00gone"
"""What a mark is expected to be after the hash was seen losing fields: never a real value,
so the next check counts a loss."""
PROGRESS_SECONDS = 10.0
"""At most one progress line per this many seconds while a repair re-states keys."""


def marker_key(prefix: str) -> str:
    """The marker of the feature store under `prefix` (never a feature key's name)."""
    return f"{prefix}:{MARKER_NAME}"


def mark_field(worker: int) -> str:
    return f"worker:{worker}"


def status_field(worker: int) -> str:
    return f"status:{worker}"


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True)
class Mark:
    """The value of `worker:{k}`."""

    run: str
    state: str
    written_ms: int

    def encode(self) -> str:
        return _json(asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> Mark | None:
        """The mark, or None when the text is not one (another writer's value)."""
        try:
            value = json.loads(text)
            return cls(str(value["run"]), str(value["state"]), int(value["written_ms"]))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Status:
    """The value of `status:{k}`: what the process running worker `k` is doing."""

    run: str
    host: str
    pid: int
    generation: int
    """Repairs this process has started (0: none since it started)."""
    state: str
    """`repairing` until the repair of `generation` is safely queued, then `whole`."""
    keys_left: int
    """Keys this process has queued for re-statement and not written yet (a new day's
    re-statement included)."""
    written_ms: int
    every_s: float
    """The check interval: a status older than a few of these belongs to no running
    process."""

    def encode(self) -> str:
        return _json(asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> Status | None:
        try:
            value = json.loads(text)
            return cls(
                run=str(value["run"]),
                host=str(value["host"]),
                pid=int(value["pid"]),
                generation=int(value["generation"]),
                state=str(value["state"]),
                keys_left=int(value["keys_left"]),
                written_ms=int(value["written_ms"]),
                every_s=float(value["every_s"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


def _whole(text: str) -> bool:
    mark = Mark.decode(text)
    return mark is not None and mark.state == WHOLE


def _text(value: bytes | str | None) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@dataclass
class _Repair:
    generation: int
    trigger: str
    started: float
    written_back: bool = False
    keys_queued: int = 0
    last_line: float = 0.0
    """When the last progress line was due (the start, at first)."""
    sample: tuple[float, int] | None = None
    """(when, keys left) the rate of the next progress line is measured from."""

    @property
    def level(self) -> int:
        """A repair at start with nothing to re-write is routine (a new prefix)."""
        return logging.WARNING if self.keys_queued or self.trigger != "start" else logging.INFO


class MarkerGuard:
    """Keeps and checks the marks of this process's workers (see the module doc)."""

    def __init__(
        self,
        connect: Callable[[], redis.Redis],
        prefix: str,
        repairs: StoreRepairs,
        every_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.connect = connect
        self.key = marker_key(prefix)
        self.repairs = repairs
        self.every_s = every_s
        self.clock = clock
        self.wall = wall
        self.run = uuid.uuid4().hex[:16]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._expected: dict[int, str | None] = {}
        """Worker -> the mark last written or adopted; None until its first check."""
        self._attached: dict[int, int] = {}
        self._repair: _Repair | None = None
        self._client: redis.Redis | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._last_error: str | None = None

    # --- life cycle ------------------------------------------------------------------------

    def attach(self, worker: int) -> None:
        """The sink partition of `worker` runs in this process: check its mark (the first
        attach starts the checks)."""
        with self._lock:
            self._attached[worker] = self._attached.get(worker, 0) + 1
            self._expected.setdefault(worker, None)
            start = self._thread is None
            if start:
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="store-marker", daemon=True)
        if start and self._thread is not None:
            self._thread.start()
        self._poke.set()

    def detach(self, worker: int) -> None:
        """The sink partition of `worker` closed; the last one stops the checks."""
        with self._lock:
            left = self._attached.get(worker, 0) - 1
            if left > 0:
                self._attached[worker] = left
                return
            self._attached.pop(worker, None)
            self._expected.pop(worker, None)
            thread = self._thread if not self._attached else None
            if thread is not None:
                self._thread = None
        if thread is not None:
            self._stop.set()
            self._poke.set()
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    def poke(self) -> None:
        """Check now (Redis answers again after an outage)."""
        self._poke.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poke.clear()
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the checks must outlive a surprise
                self._error(f"the feature store marker check {self.key} failed: {exc!r}", exc)
            self._poke.wait(self.every_s)
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- one check -------------------------------------------------------------------------

    def check(self) -> None:
        """One round: read the marks, act on a loss, advance a repair, write the status.
        Redis being away only postpones it (the sink reports outages)."""
        try:
            if self._client is None:
                self._client = self.connect()
            self._check(self._client)
        except redis.ResponseError as exc:
            # A command error does not heal by itself (an ACL without HMGET or HSET, the
            # marker's name taken by a value of another type): say so, once.
            self._error(f"cannot keep the feature store marker {self.key}: {exc}", exc)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            log.debug("store marker check postponed", extra={"error": str(exc)})
        else:
            self._last_error = None

    def _error(self, message: str, exc: Exception) -> None:
        if message != self._last_error:
            log.error(
                "%s; a store that loses data is not noticed meanwhile",
                message,
                extra={"error": str(exc)},
            )
        self._last_error = message

    def _check(self, client: redis.Redis) -> None:
        with self._lock:
            expected = dict(self._expected)
        if not expected:
            return
        workers = sorted(expected)
        names = [mark_field(w) for w in workers] + [status_field(w) for w in workers]
        read = [_text(v) for v in client.hmget(self.key, names)]
        there = {name for name, value in zip(names, read, strict=True) if value is not None}
        found = read[: len(workers)]
        lost: dict[int, str | None] = {}
        adopted: dict[int, str] = {}
        for worker, value in zip(workers, found, strict=True):
            want = expected[worker]
            if want is not None:
                if value != want:
                    lost[worker] = value
            elif value is None or not _whole(value):  # the first check of this mark
                lost[worker] = value
            else:
                adopted[worker] = value
        now_ms = int(self.wall() * 1000)
        writes: dict[str, str] = {}
        if lost:
            self._start_repair(lost, expected, now_ms, writes)
        else:
            with self._lock:
                for worker, value in adopted.items():
                    if worker in self._expected:
                        self._expected[worker] = value
            if self._repair is not None:
                self._advance(self._repair, now_ms, writes)
        repair = self._repair
        status = self.repairs.status()
        state = REPAIRING if repair is not None and not repair.written_back else WHOLE
        keys_left = int(metrics.KEYS_TO_RESTATE.total())
        with self._lock:
            attached = list(self._expected)
        for worker in attached:
            writes[status_field(worker)] = Status(
                run=self.run,
                host=self.host,
                pid=self.pid,
                generation=status.generation,
                state=state,
                keys_left=keys_left,
                written_ms=now_ms,
                every_s=self.every_s,
            ).encode()
        # HSET answers how many fields it created. Every field read above must still be
        # there: more new fields than that means the hash lost them between the read and this
        # write (a flush, a failover), which the write would otherwise hide by putting the
        # marks back. The next check then sees a loss.
        created = int(client.hset(self.key, mapping=writes))  # type: ignore[arg-type]
        if created > sum(1 for name in writes if name not in there):
            with self._lock:
                for worker in self._expected:
                    self._expected[worker] = _GONE
        self.repairs.checked()

    def _set_marks(self, state: str, now_ms: int, writes: dict[str, str]) -> None:
        """Every mark of this process becomes `state` (added to `writes`)."""
        mark = Mark(self.run, state, now_ms).encode()
        with self._lock:
            for worker in self._expected:
                self._expected[worker] = mark
                writes[mark_field(worker)] = mark

    def _start_repair(
        self,
        lost: Mapping[int, str | None],
        expected: Mapping[int, str | None],
        now_ms: int,
        writes: dict[str, str],
    ) -> None:
        trigger = self._trigger(lost, expected)
        generation = self.repairs.lost(at_start=trigger == "start")
        metrics.STORE_REPAIRS.labels(trigger=trigger).inc()
        self._log_loss(trigger, generation, lost, expected)
        now = self.clock()
        self._repair = _Repair(generation, trigger, started=now, last_line=now)
        self._set_marks(REPAIRING, now_ms, writes)

    def _advance(self, repair: _Repair, now_ms: int, writes: dict[str, str]) -> None:
        """Write the marks back once the repair is safely queued; report progress."""
        keys_left = int(metrics.KEYS_TO_RESTATE.total())
        if not repair.written_back:
            status = self.repairs.status()
            if status.generation == repair.generation and status.settled:
                self._set_marks(WHOLE, now_ms, writes)
                repair.written_back = True
                repair.keys_queued = status.keys_queued
                repair.sample = (self.clock(), keys_left)
                self._log_queued(repair, status.shards, keys_left)
        self._progress(repair, keys_left)

    @staticmethod
    def _trigger(lost: Mapping[int, str | None], expected: Mapping[int, str | None]) -> str:
        if all(expected[w] is None for w in lost):
            return "start"
        if any(value is None for w, value in lost.items() if expected[w] is not None):
            return "missing"
        return "changed"

    def _log_loss(
        self,
        trigger: str,
        generation: int,
        lost: Mapping[int, str | None],
        expected: Mapping[int, str | None],
    ) -> None:
        fields = ",".join(mark_field(w) for w in sorted(lost))
        found = {mark_field(w): v for w, v in sorted(lost.items()) if v is not None}
        extra: dict[str, Any] = {
            "trigger": trigger,
            "marker": self.key,
            "fields": fields,
            "generation": generation,
        }
        if found:
            extra["found"] = found
        if trigger == "start":
            log.info(
                "feature store marker %s (%s) at start: a new store or prefix, or data lost "
                "while the pipeline was stopped; re-writing every live key of this process",
                "missing" if not found else "left by an unfinished repair",
                fields,
                extra=extra,
            )
            return
        if trigger == "changed":
            extra["expected"] = {mark_field(w): expected[w] for w in sorted(lost)}
        log.warning(
            "feature store lost data: marker %s %s; re-writing every live key of this "
            "process at RESTATE_KEYS_PER_SECOND",
            fields,
            "is missing" if trigger == "missing" else "holds another value",
            extra=extra,
        )

    def _log_queued(self, repair: _Repair, shards: int, keys_left: int) -> None:
        if not repair.keys_queued:
            return  # the "done" line follows at once
        log.log(
            repair.level,
            "store repair queued: %s keys of %s shards to re-write, marker written back",
            f"{repair.keys_queued:,}",
            shards,
            extra={
                "generation": repair.generation,
                "keys_queued": repair.keys_queued,
                "keys_left": keys_left,
            },
        )

    def _progress(self, repair: _Repair, keys_left: int) -> None:
        now = self.clock()
        if repair.written_back and (keys_left == 0 or not repair.keys_queued):
            took = now - repair.started
            log.log(
                repair.level,
                "store repair done: %s keys re-written in %.1fs",
                f"{repair.keys_queued:,}",
                took,
                extra={
                    "generation": repair.generation,
                    "keys": repair.keys_queued,
                    "seconds": round(took, 1),
                },
            )
            self._repair = None
            return
        if now - repair.last_line < PROGRESS_SECONDS:
            return
        rate = None
        if repair.sample is not None and now > repair.sample[0]:
            rate = max(0.0, (repair.sample[1] - keys_left) / (now - repair.sample[0]))
        extra: dict[str, Any] = {"generation": repair.generation, "keys_left": keys_left}
        text = f"store repair: {keys_left:,} keys left to re-write"
        if rate is not None:
            extra["keys_per_second"] = round(rate)
            text += f", {rate:,.0f} keys/s"
            if rate > 0:
                text += f", about {keys_left / rate:.0f}s to go"
        if not repair.written_back:
            text += " (queuing: marker written back once every shard has queued its keys)"
        log.info(text, extra=extra)
        repair.last_line = now
        if repair.written_back:
            repair.sample = (now, keys_left)
