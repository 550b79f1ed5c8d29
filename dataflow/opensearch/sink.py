"""The OpenSearch sink (contract §6): rank features, coalesced and thresholded, and never in
the way of the Redis path.

`attach` adds two steps after the state shards: `opensearch_route` turns each `doc:` write
(support index, and the search index in main-index mode) and each `acq:` write (the
autocomplete index, keyed by the candidate from `StepResult.labels`) into a `DocUpdate` per
index spec (`dataflow.opensearch.updates`), grouped by sink partition,
and `opensearch` is a `FixedPartitionedSink` with `OPENSEARCH_PARTITIONS` partitions.

Each partition keeps, per index, the coalesced pending updates and the values OpenSearch
last acknowledged (`Outbox`), and both are in its recovery snapshot, so nothing pending is
lost across a restart. `write_batch` only merges updates into that state under a lock and
returns: all network I/O happens on one sender thread per partition. A slow or unreachable
OpenSearch therefore costs the Bytewax worker (and so Redis) nothing; the documents stay
pending, the sender backs off (capped, `OPENSEARCH_BACKOFF_MAX_SECONDS`) and tries again,
including while no new events arrive. Memory is bounded by `OPENSEARCH_MAX_PENDING` (see
`Outbox` for what is shed when full).

The semantics in full, with the numbers to tune, are in docs/opensearch.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Protocol

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from opensearchpy import ConnectionError as OSConnectionError
from opensearchpy import ConnectionTimeout, SerializationError, TransportError

from dataflow import metrics
from dataflow.config import OpenSearchSettings
from dataflow.core.shard import StepResult
from dataflow.errors import IndexMappingError, RejectedError, RetryableError, SinkError
from dataflow.opensearch.index import IndexAdmin, client_for
from dataflow.opensearch.updates import (
    DocUpdate,
    IndexSpec,
    OfferCounts,
    Outbox,
    Outcome,
    Pacing,
    Router,
    bulk_body,
    outcomes_of,
    partition_names,
    restore_states,
    snapshot_bytes,
    specs_for,
)
from dataflow.retry import Backoff

log = logging.getLogger(__name__)

SINK = "opensearch"
# The bulk reply is parsed on the sender thread; ask only for what `outcomes_of` reads.
_FILTER_PATH = "errors,items.*.status,items.*.error.type,items.*.error.reason"
Attempt = Literal["idle", "ok", "retry"]
# One index check at a time per process: the partitions' sender threads all start at once,
# and one creating the index while the others look is wasted work (never wrong: `ensure`
# is safe to race, which is what happens across processes).
_ENSURE_LOCK = threading.Lock()
# What an operator does about a failure that waits for them (the `hint` of the log line).
_HINTS = {
    "http_401": "OpenSearch refused the credentials: check OPENSEARCH_USERNAME and "
    "OPENSEARCH_PASSWORD (or OPENSEARCH_PASSWORD_FILE)",
    "security_exception": "the user's role lacks a right on this index (OpenSearch's "
    "security plugin, HTTP 403): grant it the sink's rights (docs/operations.md, Security)",
}
_HINTS["http_403"] = _HINTS["security_exception"]  # a HEAD request's 403 has no body


def attach(writes: Stream[StepResult], settings: OpenSearchSettings) -> None:
    """Add the OpenSearch branch to the flow, reading the state shards' writes."""
    specs = specs_for(settings)
    router = Router(specs, settings.partitions, report=_count_offers)
    routed = op.flat_map_batch("opensearch_route", writes, router)
    op.output("opensearch", routed, OpenSearchSink(settings, specs))


# --- talking to OpenSearch ---------------------------------------------------------------


class BulkClient(Protocol):
    def ensure(self, spec: IndexSpec) -> bool:
        """Make the target usable; True when it is an alias. Raises IndexMappingError or
        RetryableError."""

    def bulk(self, body: bytes, *, require_alias: bool) -> Mapping[str, Any]: ...

    def close(self) -> None: ...


def _translate(exc: TransportError) -> RetryableError | RejectedError:
    if isinstance(exc, ConnectionTimeout):
        return RetryableError("timeout")
    if isinstance(exc, OSConnectionError):
        return RetryableError("connection")
    status = exc.status_code if isinstance(exc.status_code, int) else 0
    info = exc.info
    error = info.get("error") if isinstance(info, dict) else None
    reason = str(error.get("type")) if isinstance(error, dict) else f"http_{status}"
    # 401/403: credentials or permissions, fixed by an operator without losing anything;
    # 408/409/429/5xx: the cluster is busy or partly unavailable.
    if status in (401, 403, 408, 409, 429) or status >= 500 or status == 0:
        return RetryableError(reason)
    if reason == "index_not_found_exception":
        return RetryableError(reason)
    return RejectedError(reason)


class OpenSearchBulkClient:
    """`BulkClient` over opensearch-py (which never retries by itself here)."""

    def __init__(self, settings: OpenSearchSettings) -> None:
        self.client = client_for(settings)
        self.admin = IndexAdmin(self.client)

    def ensure(self, spec: IndexSpec) -> bool:
        try:
            # The support index is ours to create; the search index is only checked.
            target = self.admin.ensure(spec) if spec.op == "index" else self.admin.verify(spec)
        except TransportError as exc:
            error = _translate(exc)
            if isinstance(error, RejectedError):
                raise IndexMappingError(
                    f"OpenSearch refused to set up {spec.target} ({error.reason}): {exc}"
                ) from exc
            raise error from exc
        except SerializationError as exc:
            raise RetryableError("malformed_response") from exc
        return target.kind == "alias"

    def bulk(self, body: bytes, *, require_alias: bool) -> Mapping[str, Any]:
        params = {"filter_path": _FILTER_PATH}
        if require_alias:
            # If the alias vanishes, fail the items instead of letting OpenSearch auto-create
            # an index with dynamic (non rank_feature) mappings under its name.
            params["require_alias"] = "true"
        try:
            response: Mapping[str, Any] = self.client.bulk(body=body, params=params)
        except TransportError as exc:
            raise _translate(exc) from exc
        except SerializationError as exc:
            # Not JSON (a proxy's error page?): nothing is known, so nothing is dropped.
            raise RetryableError("malformed_response") from exc
        return response

    def close(self) -> None:
        self.client.close()


# --- one sink partition ------------------------------------------------------------------


class OpenSearchPartition(StatefulSinkPartition[list[DocUpdate], bytes]):
    """Pending state per index, fed by the worker thread and drained by a sender thread."""

    def __init__(
        self,
        name: str,
        outboxes: dict[str, Outbox],
        client: BulkClient,
        settings: OpenSearchSettings,
        backoff: Backoff,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.outboxes = outboxes
        self.specs = {spec_name: outbox.spec for spec_name, outbox in outboxes.items()}
        self.client = client
        self.settings = settings
        self.backoff = backoff
        self.clock = clock
        self.pacing = {spec_name: Pacing(backoff) for spec_name in outboxes}
        self.require_alias: dict[str, bool] = {}  # per spec, once its target was checked
        self.fatal: BaseException | None = None
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.turn = 0
        self.reported = 0  # this partition's share of the pending gauge

    # Worker thread -----------------------------------------------------------------------

    def write_batch(self, values: list[list[DocUpdate]]) -> None:
        self._raise_if_stopped()
        counts = OfferCounts()
        with self.lock:
            if len(self.outboxes) == 1:
                (outbox,) = self.outboxes.values()
                outbox.offer((u for updates in values for u in updates), counts)
            else:
                by_spec: dict[str, list[DocUpdate]] = {}
                for updates in values:
                    for update in updates:
                        by_spec.setdefault(update.spec, []).append(update)
                for spec_name, spec_updates in by_spec.items():
                    self.outboxes[spec_name].offer(spec_updates, counts)
            self.report_pending()
            self.lock.notify()
        _count_offers(counts)

    def snapshot(self) -> bytes:
        with self.lock:
            return snapshot_bytes(self.outboxes)

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join()  # at most one request in flight, bounded by its timeout
        # The input is finished (close only runs then): a bounded, blocking drain is fine.
        self.drain()
        with self.lock:
            left = sum(len(outbox) for outbox in self.outboxes.values())
            metrics.OPENSEARCH_PENDING.dec(self.reported)
            self.reported = 0
        self.client.close()
        # Never raise here: Bytewax calls close while dropping the partition, where an
        # exception aborts the whole process (no traceback, no clean shutdown).
        if self.fatal is not None:
            log.error(
                "OpenSearch sink closed without writing: %s",
                self.fatal,
                extra={"partition": self.name, "pending": left},
            )
        elif left:
            log.warning(
                "OpenSearch sink closing with documents still pending; with recovery enabled "
                "they are in the last snapshot and the next run sends them",
                extra={"partition": self.name, "pending": left},
            )

    def _raise_if_stopped(self) -> None:
        if self.fatal is not None:
            raise SinkError(
                f"the OpenSearch sink stopped: {self.fatal}. Nothing was lost (pending "
                "documents are in the recovery snapshot); fix the cause and restart."
            ) from self.fatal

    # Sender thread -----------------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"opensearch-sink-{self.name}", daemon=True
        )
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping:
                    wait = self._due_in(self.clock())
                    if wait is not None and wait <= 0:
                        break
                    self.lock.wait(wait)
                if self.stopping:
                    return
            try:
                self.flush_once()
            except Exception as exc:
                # A bug, not an OpenSearch problem: stop sending and fail the dataflow at its
                # next batch, loudly, rather than leave documents stuck without a word.
                log.exception("OpenSearch sender failed", extra={"partition": self.name})
                self.fatal = exc
                return
            if self.fatal is not None:
                return

    def drain(self) -> None:
        """Send everything pending, waiting out backoffs; gives up after
        `OPENSEARCH_MAX_RETRIES` consecutive failed attempts (the docs stay pending)."""
        failures = 0
        while self.fatal is None:
            with self.lock:
                wait = self._due_in(self.clock())
            if wait is None:
                return
            if wait > 0:
                self.backoff.sleep(wait)
            attempt = self.flush_once()
            if attempt == "retry":
                failures += 1
                if failures > self.settings.max_retries:
                    return
            elif attempt == "ok":
                failures = 0

    def flush_once(self) -> Attempt:
        """One bulk request for the next index with something due (round robin)."""
        now = self.clock()
        with self.lock:
            spec_name = self._next_due(now)
        if spec_name is None:
            return "idle"
        spec = self.specs[spec_name]
        if spec_name not in self.require_alias:
            try:
                with _ENSURE_LOCK:
                    self.require_alias[spec_name] = self.client.ensure(spec)
            except IndexMappingError as exc:
                log.error("OpenSearch index unusable: %s", exc, extra={"index": spec.target})
                self.fatal = exc
                return "retry"
            except RetryableError as exc:
                self._failed(spec, exc.reason, 0)
                return "retry"
        counts = OfferCounts()
        with self.lock:
            chosen = self.outboxes[spec_name].select(self.settings.bulk_docs, counts)
            self.report_pending()
        _count_offers(counts)
        if not chosen:
            return "ok"
        body, chunk = bulk_body(spec, chosen, self.settings.bulk_bytes)
        stop = metrics.timed(SINK)
        try:
            response = self.client.bulk(body, require_alias=self.require_alias[spec_name])
            outcomes = outcomes_of(spec, response, chunk)
        except RetryableError as exc:
            outcomes = [Outcome("retry", exc.reason)] * len(chunk)
        except RejectedError as exc:
            outcomes = [Outcome("fail", exc.reason)] * len(chunk)
        stop()
        metrics.SINK_BATCH.labels(sink=SINK).observe(len(chunk))
        with self.lock:
            settled = self.outboxes[spec_name].settle(chunk, outcomes)
            if settled.index_missing:
                self.require_alias.pop(spec_name, None)  # re-check (re-create) first
            was_failing = self.pacing[spec_name].failures
            if not settled.retry:
                self.pacing[spec_name].succeeded()
            self.report_pending()
        metrics.SINK_WRITES.labels(sink=SINK, result="success").inc(settled.ok)
        for reason, n in settled.failed.items():
            metrics.SINK_WRITES.labels(sink=SINK, result="failure").inc(n)
            metrics.OPENSEARCH_FAILURES.labels(reason=reason).inc(n)
        if settled.failed:
            log.error(
                "OpenSearch rejected documents for good (dropped; their next value is sent "
                "in full)",
                extra={
                    "index": spec.target,
                    "reasons": dict(settled.failed),
                    "example_ids": settled.examples,
                },
            )
        if settled.retry:
            reason = next(o.reason for o in outcomes if o.result == "retry")
            self._failed(spec, reason, settled.retry)
            return "retry"
        if was_failing:
            log.info(
                "OpenSearch writes succeed again",
                extra={"index": spec.target, "after_failures": was_failing},
            )
        return "ok"

    # Helpers (callers hold the lock where noted) -----------------------------------------

    def _failed(self, spec: IndexSpec, reason: str, docs: int) -> None:
        metrics.SINK_WRITES.labels(sink=SINK, result="retry").inc(docs)
        with self.lock:
            pacing = self.pacing[spec.name]
            delay = pacing.failed(self.clock())
            pending = len(self.outboxes[spec.name])
        level = logging.ERROR if pacing.failures > self.settings.max_retries else logging.WARNING
        extra: dict[str, object] = {
            "index": spec.target,
            "reason": reason,
            "attempt": pacing.failures,
            "retry_in_s": round(delay, 2),
            "pending": pending,
        }
        hint = _HINTS.get(reason)
        if hint is not None:
            extra["hint"] = hint
        log.log(
            level,
            "OpenSearch write failed; documents stay pending and are retried (Redis is "
            "not affected)",
            extra=extra,
        )

    def _due_in(self, now: float) -> float | None:
        """Seconds until some index may be attempted (0: now); None: nothing pending.
        Caller holds the lock."""
        if self.fatal is not None:
            return None
        soonest: float | None = None
        for spec_name, outbox in self.outboxes.items():
            if len(outbox):
                wait = max(0.0, self.pacing[spec_name].next_at - now)
                soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    def _next_due(self, now: float) -> str | None:
        """Caller holds the lock."""
        if self.fatal is not None:
            return None
        names = list(self.outboxes)
        for i in range(len(names)):
            spec_name = names[(self.turn + i) % len(names)]
            if len(self.outboxes[spec_name]) and self.pacing[spec_name].ready(now):
                self.turn = (self.turn + i + 1) % len(names)
                return spec_name
        return None

    def report_pending(self) -> None:
        """Caller holds the lock."""
        total = sum(len(outbox) for outbox in self.outboxes.values())
        metrics.OPENSEARCH_PENDING.inc(total - self.reported)
        self.reported = total


def _count_offers(counts: OfferCounts) -> None:
    for outcome in metrics.OPENSEARCH_UPDATE_OUTCOMES:
        n = getattr(counts, outcome)
        if n:
            metrics.OPENSEARCH_UPDATES.labels(outcome=outcome).inc(n)


# --- the sink ----------------------------------------------------------------------------


class OpenSearchSink(FixedPartitionedSink[list[DocUpdate], bytes]):
    """`OPENSEARCH_PARTITIONS` partitions; `Router` names the partition in each item's key.

    `client_factory`, `backoff`, `clock` and `background` are for tests (a fake client,
    no waiting, a manual clock, no sender thread).
    """

    def __init__(
        self,
        settings: OpenSearchSettings,
        specs: Iterable[IndexSpec] | None = None,
        *,
        client_factory: Callable[[], BulkClient] | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self.settings = settings
        self.specs = tuple(specs_for(settings) if specs is None else specs)
        self.client_factory = client_factory or (lambda: OpenSearchBulkClient(settings))
        self.backoff = backoff or Backoff(base=0.25, cap=settings.backoff_max_seconds)
        self.clock = clock
        self.background = background

    def list_parts(self) -> list[str]:
        return partition_names(self.settings.partitions)

    def part_fn(self, item_key: str) -> int:
        return int(item_key)

    def build_part(
        self, step_id: str, for_part: str, resume_state: bytes | None
    ) -> OpenSearchPartition:
        states = {} if resume_state is None else restore_states(resume_state)
        settings = self.settings
        # OPENSEARCH_MAX_PENDING bounds each index across all partitions.
        capacity = max(1, -(-settings.max_pending // settings.partitions))
        outboxes: dict[str, Outbox] = {}
        for spec in self.specs:
            state = states.pop(spec.name, None)
            outboxes[spec.name] = (
                Outbox(spec, settings.min_change, capacity)
                if state is None
                else Outbox.restore(spec, settings.min_change, capacity, state)
            )
        if states:
            log.warning(
                "dropping OpenSearch sink state of indices no longer configured",
                extra={"partition": for_part, "specs": sorted(states)},
            )
        part = OpenSearchPartition(
            for_part, outboxes, self.client_factory(), settings, self.backoff, clock=self.clock
        )
        with part.lock:
            part.report_pending()
        if self.background:
            part.start()
        return part
