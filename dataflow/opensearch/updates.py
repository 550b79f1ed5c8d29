"""What the OpenSearch sink sends, and when (contract §6). Pure: no I/O, no clock.

The sink (`dataflow.opensearch.sink`) is a thin I/O shell around the pieces here:

- `IndexSpec`: one target index — which key family feeds it, how a key suffix (or, for a
  hashed key, its label) becomes a document id, which hash fields become `rank_feature`
  fields, and whether the sink owns the whole document (`index`) or patches someone else's
  (`update`). The autocomplete index is a second owned spec: it shares the batching,
  threshold and retry code.
- `Router`: the state shards' `StepResult`s → `DocUpdate`s grouped by sink partition.
- `rank_value` / `changed_enough`: zero handling and the change threshold.
- `Outbox`: per spec and partition, the coalesced pending updates (bounded) and the values
  OpenSearch last acknowledged; it picks what to send and settles the bulk response.
- `bulk_body` / `outcomes_of`: the `_bulk` NDJSON for a chunk, and how each item's answer
  is classified (done, retry later, or failed for good with OpenSearch's reason).
- `Pacing`: when the next attempt may start after failures (capped exponential backoff).
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple
from urllib.parse import unquote

import orjson

from dataflow.config import OpenSearchSettings
from dataflow.core import snapshots
from dataflow.core.shard import StepResult
from dataflow.retry import Backoff

# Lucene's FeatureField (behind `rank_feature`) takes only positive *normal* float32 values:
# OpenSearch rejects a document with 0, a negative, a subnormal (< 2^-126) or an infinite
# value (mapper_parsing_exception), so such a value must never reach a bulk body.
FLOAT32_MIN_NORMAL: Final = 1.1754943508222875e-38
FLOAT32_MAX: Final = 3.4028234663852886e38

DOC_FEATURES: Final = ("popularity_7d", "popularity_30d", "ctr_30d")
AC_FEATURES: Final = ("selects_30d", "click_rate_30d")
MAX_ID_BYTES: Final = 512
"""OpenSearch refuses a longer `_id`, and fails the *whole* bulk request with it."""

Op = Literal["index", "update"]
Values = tuple[float | None, ...]
"""Rank-feature values as indexed: a positive float, or None for "no value" (zero)."""


def rank_value(value: float) -> float | None:
    """The value to index for one rank feature; None means "leave the field out".

    Zero, negative and tiny values (below the smallest normal float32, 1.18e-38) become None.
    Why that is exact rather than an approximation: a document without the field does not
    match the `rank_feature` clause, so it adds 0 to the score, which is what saturation
    `S/(S+pivot)` and sigmoid `S^a/(S^a+pivot^a)` give at S = 0, and what log
    `log(scaling_factor + S)` gives with `scaling_factor` 1. A floor such as 1e-6 instead
    would make every zero document match and score a little. Values above the float32 range
    (never reached by counts) are clamped so a document is never rejected as infinite.
    """
    if not value >= FLOAT32_MIN_NORMAL:  # `not >=` so NaN is "no value" too
        return None
    return min(value, FLOAT32_MAX)


def rank_values(values: Iterable[float]) -> Values:
    return tuple(rank_value(v) for v in values)


def changed_enough(old: Values | None, new: Values, min_change: float) -> bool:
    """Whether `new` must be sent when OpenSearch holds `old` (None: holds nothing known).

    Sent when the document is new, when any feature crossed to or from zero, or when any
    feature moved by at least `min_change` relative to the indexed value. `min_change = 0`
    sends every change (but still not an identical value). `as_of` alone never triggers a
    send: the daily re-statement of every key would otherwise rewrite the whole index daily.
    """
    if old is None:
        return True
    for before, after in zip(old, new, strict=True):
        if before is None or after is None:
            if before is not after:
                return True
        elif after != before and abs(after - before) >= min_change * before:
            return True
    return False


# --- what to send where ------------------------------------------------------------------


def _percent_decoded(rest: str) -> str | None:
    return unquote(rest) or None


def _text_id(label: str) -> str | None:
    """A label as a document id: None (skip the key) when empty or over `MAX_ID_BYTES`.

    A candidate may have up to 1024 characters (contract §1), and one `_id` over 512 bytes
    makes OpenSearch refuse the whole bulk request, which would drop the other documents.
    """
    if not label or len(label.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return None
    return label


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """One target index of the sink.

    `family` is the key family read (a suffix `"{family}:{rest}"`); `doc_id(rest)` gives the
    document `_id` (None skips the key). With `id_from_label`, the key holds only a hash of
    the text the document is about (`acq`), so `doc_id` is applied to the suffix's label
    (`StepResult.labels`) instead; a key without a label is skipped (and counted by the
    `Router`). `features` are hash fields indexed as `rank_feature` under the same names;
    `time_field` carries the hash's `as_of` (epoch ms) as a date.

    `op="index"`: the sink owns the whole document (the support index). A write replaces it
    with `id_field`, the features (zeros left out) and `time_field`; a deleted key deletes it.
    `op="update"`: a partial update of a document someone else owns (the search index
    itself). Zeros and deleted keys set the fields to null, which removes them from the index.
    """

    name: str
    target: str
    family: str
    features: tuple[str, ...]
    op: Op = "index"
    id_field: str | None = "doc_id"
    time_field: str = "as_of"
    doc_id: Callable[[str], str | None] = _percent_decoded
    id_from_label: bool = False

    def update_for(self, source: str, fields: Mapping[str, str] | None) -> DocUpdate | None:
        """The update for one written (or deleted, `fields` None) key; `source` is the key
        suffix after the family, or its label with `id_from_label`."""
        doc_id = self.doc_id(source)
        if doc_id is None:
            return None
        if fields is None:
            return DocUpdate(self.name, doc_id, None, 0)
        values = tuple(float(fields[name]) for name in self.features)
        return DocUpdate(self.name, doc_id, values, int(fields["as_of"]))


def specs_for(settings: OpenSearchSettings) -> tuple[IndexSpec, ...]:
    """The support index, the autocomplete index, plus the search index itself in
    main-index mode. The owned (`op="index"`) specs come first, the support index first."""
    specs = [
        IndexSpec("support", settings.index, "doc", DOC_FEATURES),
        # One document per normalised candidate: the `acq` key is `acq:{query_hash}`, so
        # the candidate comes from the key's label.
        IndexSpec(
            "ac",
            settings.ac_index,
            "acq",
            AC_FEATURES,
            id_field="candidate",
            doc_id=_text_id,
            id_from_label=True,
        ),
    ]
    if settings.docs_index:
        # `popularity_as_of`, not `as_of`: the search index is shared, so the date field is
        # named after what it dates.
        specs.append(
            IndexSpec(
                "docs",
                settings.docs_index,
                "doc",
                DOC_FEATURES,
                op="update",
                id_field=None,
                time_field="popularity_as_of",
            )
        )
    return tuple(specs)


class DocUpdate(NamedTuple):
    """The latest values of one document for one spec (`values` None: the key was deleted)."""

    spec: str
    doc_id: str
    values: tuple[float, ...] | None
    as_of: int


def partition_names(partitions: int) -> list[str]:
    """Sink partition keys; zero-padded so their sorted order is their number."""
    return [f"{i:04d}" for i in range(partitions)]


class Router:
    """`flat_map_batch` mapper: `StepResult`s → `(partition key, [DocUpdate, ...])`.

    A document always lands in the same partition (a stable hash of its key suffix), so its
    updates are coalesced in one place and stay in order. One item per partition per batch
    keeps the exchange between workers cheap.

    Keys that give no document are skipped; `report` (the sink's metrics) gets the counts
    of those: `unlabelled` (an `id_from_label` spec's key without a label) and `invalid_id`
    (the spec's `doc_id` refused the key: empty, or a candidate over 512 bytes).
    """

    def __init__(
        self,
        specs: Iterable[IndexSpec],
        partitions: int,
        report: Callable[[OfferCounts], None] | None = None,
    ) -> None:
        self.by_family: dict[str, list[IndexSpec]] = {}
        for spec in specs:
            self.by_family.setdefault(spec.family, []).append(spec)
        self.names = partition_names(partitions)
        self.report = report

    def __call__(self, results: list[StepResult]) -> list[tuple[str, list[DocUpdate]]]:
        by_part: dict[int, list[DocUpdate]] = {}
        count = len(self.names)
        unlabelled = invalid = 0
        for result in results:
            labels = result.labels
            for suffix, fields in result.writes:
                family, _, rest = suffix.partition(":")
                specs = self.by_family.get(family)
                if specs is None:
                    continue
                part = zlib.crc32(suffix.encode("utf-8")) % count
                for spec in specs:
                    if spec.id_from_label:
                        label = labels.get(suffix)
                        if label is None:
                            unlabelled += 1
                            continue
                        update = spec.update_for(label, fields)
                    else:
                        update = spec.update_for(rest, fields)
                    if update is None:
                        invalid += 1
                    else:
                        by_part.setdefault(part, []).append(update)
        if (unlabelled or invalid) and self.report is not None:
            self.report(OfferCounts(unlabelled=unlabelled, invalid_id=invalid))
        return [(self.names[part], updates) for part, updates in by_part.items()]


# --- the pending set ---------------------------------------------------------------------


class Pending(NamedTuple):
    values: tuple[float, ...] | None
    as_of: int
    seq: int  # which offer this is, so a reply only settles the version that was sent


class Outgoing(NamedTuple):
    """One document of a bulk request: what was sent (`sent` None: a deletion)."""

    doc_id: str
    seq: int
    sent: Values | None
    as_of: int


@dataclass
class OfferCounts:
    """What became of the updates offered (the names of `opensearch_updates_total`)."""

    queued: int = 0  # a document became pending
    coalesced: int = 0  # replaced the value of a pending document
    skipped: int = 0  # within the threshold of what OpenSearch holds
    shed_update: int = 0  # pending set full (or evicted to make room for a deletion)
    shed_delete: int = 0
    withdrawn: int = 0  # pending, then back within the threshold before it was sent
    unlabelled: int = 0  # (Router) a key of a label-keyed index without its label: skipped
    invalid_id: int = 0  # (Router) no usable document id (empty, or over 512 bytes): skipped


class Outcome(NamedTuple):
    result: Literal["ok", "retry", "fail"]
    reason: str = ""  # OpenSearch's error type for retry and fail


OK: Final = Outcome("ok")


@dataclass
class SettleCounts:
    ok: int = 0
    retry: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    index_missing: bool = False
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one doc id, for the log


def _pack(values: Values) -> bytes:
    # float32 is what rank_feature stores anyway; 12 bytes instead of a ~140-byte tuple per
    # document makes `last_sent` cheap enough to keep for every live document.
    return struct.pack(f"<{len(values)}f", *(0.0 if v is None else v for v in values))


def _unpack(blob: bytes) -> Values:
    return tuple(None if v == 0.0 else v for v in struct.unpack(f"<{len(blob) // 4}f", blob))


OutboxState = tuple[str, list[tuple[str, tuple[float, ...] | None, int]], dict[str, bytes]]


class Outbox:
    """The pending updates of one spec in one sink partition, and what OpenSearch holds.

    `pending` maps doc id → the newest value not yet acknowledged, in the order documents
    first became pending (so the oldest goes first and a hot document cannot starve the
    rest). It holds at most `capacity` documents. `last_sent` maps doc id → the values
    OpenSearch acknowledged (float32-packed), the base of the change threshold; an absent
    entry means "unknown", and the next value is sent whatever it is.

    When `pending` is full, an update of a document that is not already pending is shed: it
    is not queued, and the document's `last_sent` is forgotten so that its next write is sent
    unconditionally. Every live key is re-stated at least once a day (contract §3), so a shed
    update heals within a day of event time. A deletion never heals that way, so a deletion
    arriving when full takes the place of the newest pending update instead (which is shed);
    only when everything pending is a deletion is the deletion itself shed.

    Not thread-safe: the sink partition calls it under its lock.
    """

    def __init__(
        self,
        spec: IndexSpec,
        min_change: float,
        capacity: int,
        pending: dict[str, Pending] | None = None,
        last_sent: dict[str, bytes] | None = None,
    ) -> None:
        self.spec = spec
        self.min_change = min_change
        self.capacity = capacity
        self.pending: dict[str, Pending] = {} if pending is None else pending
        self.last_sent: dict[str, bytes] = {} if last_sent is None else last_sent
        self.seq = 0

    def __len__(self) -> int:
        return len(self.pending)

    def _known(self, doc_id: str) -> Values | None:
        blob = self.last_sent.get(doc_id)
        return None if blob is None else _unpack(blob)

    def offer(self, updates: Iterable[DocUpdate], counts: OfferCounts) -> None:
        """Coalesce updates into `pending` (the latest value of a document wins)."""
        pending = self.pending
        for update in updates:
            doc_id = update.doc_id
            values = update.values
            # A document already pending is always replaced, never dropped here: it may be
            # in flight, and what OpenSearch will hold is only known when the reply comes
            # (`select` checks the threshold again against that).
            if (
                values is not None
                and doc_id not in pending
                and not changed_enough(self._known(doc_id), rank_values(values), self.min_change)
            ):
                counts.skipped += 1
                continue
            self.seq += 1
            entry = Pending(values, update.as_of, self.seq)
            if doc_id in pending:
                pending[doc_id] = entry
                counts.coalesced += 1
            elif len(pending) < self.capacity:
                pending[doc_id] = entry
                counts.queued += 1
            elif values is not None:
                self.last_sent.pop(doc_id, None)
                counts.shed_update += 1
            elif self._evict_newest_update():
                pending[doc_id] = entry
                counts.queued += 1
                counts.shed_update += 1
            else:
                counts.shed_delete += 1

    def _evict_newest_update(self) -> bool:
        for doc_id in reversed(self.pending):
            if self.pending[doc_id].values is not None:
                del self.pending[doc_id]
                self.last_sent.pop(doc_id, None)
                return True
        return False

    def select(self, limit: int, counts: OfferCounts) -> list[Outgoing]:
        """Up to `limit` documents to send now, oldest first.

        The threshold is checked again: what OpenSearch holds may have moved since the
        update was queued (an earlier value was acknowledged meanwhile).
        """
        out: list[Outgoing] = []
        stale: list[str] = []
        for doc_id, entry in self.pending.items():
            if entry.values is None:
                out.append(Outgoing(doc_id, entry.seq, None, entry.as_of))
            else:
                sent = rank_values(entry.values)
                if not changed_enough(self._known(doc_id), sent, self.min_change):
                    stale.append(doc_id)
                    continue
                out.append(Outgoing(doc_id, entry.seq, sent, entry.as_of))
            if len(out) >= limit:
                break
        for doc_id in stale:
            del self.pending[doc_id]
        counts.withdrawn += len(stale)
        return out

    def settle(self, sent: list[Outgoing], outcomes: list[Outcome]) -> SettleCounts:
        """Apply OpenSearch's answer for each document of a request."""
        counts = SettleCounts()
        for item, outcome in zip(sent, outcomes, strict=True):
            if outcome.result == "retry":
                counts.retry += 1
                if outcome.reason == "index_not_found_exception":
                    counts.index_missing = True
                continue
            current = self.pending.get(item.doc_id)
            if current is not None and current.seq == item.seq:
                del self.pending[item.doc_id]
            if outcome.result == "ok":
                counts.ok += 1
                if item.sent is None:
                    self.last_sent.pop(item.doc_id, None)
                else:
                    self.last_sent[item.doc_id] = _pack(item.sent)
            else:
                # Dropped (retrying cannot help); what OpenSearch holds is unknown now, so
                # the document's next value is sent whatever its size.
                self.last_sent.pop(item.doc_id, None)
                counts.failed[outcome.reason] += 1
                counts.examples.setdefault(outcome.reason, item.doc_id)
        return counts

    def state(self) -> OutboxState:
        """Plain data for a snapshot (the target, pending in order, last_sent)."""
        pending = [(doc_id, e.values, e.as_of) for doc_id, e in self.pending.items()]
        return self.spec.target, pending, dict(self.last_sent)

    @classmethod
    def restore(
        cls, spec: IndexSpec, min_change: float, capacity: int, state: OutboxState
    ) -> Outbox:
        target, pending_list, last_sent = state
        if target != spec.target:
            # Pointed at another index since the snapshot: the pending values are still the
            # latest and go to the new target, but what the old one held says nothing.
            last_sent = {}
        pending = {
            doc_id: Pending(values, as_of, seq)
            for seq, (doc_id, values, as_of) in enumerate(pending_list, start=1)
        }
        outbox = cls(spec, min_change, capacity, pending, dict(last_sent))
        outbox.seq = len(pending_list)
        return outbox


SNAPSHOT_VERSION: Final = 2
"""Version of the sink partitions' recovery layout (`dataflow.core.snapshots`)."""


def snapshot_bytes(outboxes: Mapping[str, Outbox]) -> bytes:
    """Immutable bytes: Bytewax pickles a snapshot later, after more batches may have run."""
    states = {name: outbox.state() for name, outbox in outboxes.items()}
    return snapshots.wrap("opensearch", SNAPSHOT_VERSION, states)


def restore_states(blob: bytes) -> dict[str, Any]:
    return dict(snapshots.unwrap("opensearch", SNAPSHOT_VERSION, blob))


# --- the _bulk request and its answer ----------------------------------------------------


def bulk_lines(spec: IndexSpec, item: Outgoing) -> bytes:
    """The NDJSON lines of one document (action line, and source line unless a delete)."""
    meta: dict[str, Any] = {"_index": spec.target, "_id": item.doc_id}
    if spec.op == "index":
        if item.sent is None:
            return orjson.dumps({"delete": meta}) + b"\n"
        source: dict[str, Any] = {}
        if spec.id_field is not None:
            source[spec.id_field] = item.doc_id
        for name, value in zip(spec.features, item.sent, strict=True):
            if value is not None:
                source[name] = value
        source[spec.time_field] = item.as_of
        return orjson.dumps({"index": meta}) + b"\n" + orjson.dumps(source) + b"\n"
    # A partial update of someone else's document; on a version conflict with their own
    # writes, OpenSearch re-applies it a few times before reporting 409.
    meta["retry_on_conflict"] = 3
    if item.sent is None:
        doc: dict[str, Any] = dict.fromkeys(spec.features)
        doc[spec.time_field] = None
    else:
        doc = dict(zip(spec.features, item.sent, strict=True))
        doc[spec.time_field] = item.as_of
    return orjson.dumps({"update": meta}) + b"\n" + orjson.dumps({"doc": doc}) + b"\n"


def bulk_body(
    spec: IndexSpec, items: list[Outgoing], max_bytes: int
) -> tuple[bytes, list[Outgoing]]:
    """The request body and the documents in it: as many of `items` as fit in `max_bytes`
    (always at least one, so an oversized document cannot block the rest forever)."""
    parts: list[bytes] = []
    size = 0
    for item in items:
        lines = bulk_lines(spec, item)
        if parts and size + len(lines) > max_bytes:
            break
        parts.append(lines)
        size += len(lines)
    return b"".join(parts), items[: len(parts)]


def classify(op: Op, deleting: bool, status: int, error_type: str) -> Outcome:
    """One bulk item's answer: done, retry later, or failed for good (with the reason)."""
    if 200 <= status < 300:
        return OK
    if status == 404 and deleting and error_type != "index_not_found_exception":
        return OK  # already gone (delete: not_found; update: document_missing_exception)
    if status in (401, 403, 409, 429) or status >= 500:
        # 429: the cluster pushes back; 5xx: a shard is unavailable or failing; 409: the
        # owner of the document kept writing it through our retry_on_conflict attempts;
        # 401/403: the security plugin refused the user or its role this write (a
        # `security_exception`), which an operator fixes without anything being lost.
        return Outcome("retry", error_type or f"http_{status}")
    if error_type == "index_not_found_exception":
        # The alias or index disappeared: keep the document and let the sink re-check the
        # index (re-creating the support index) before the next attempt.
        return Outcome("retry", error_type)
    return Outcome("fail", error_type or f"http_{status}")


def outcomes_of(
    spec: IndexSpec, response: Mapping[str, Any], sent: list[Outgoing]
) -> list[Outcome]:
    """Each document's outcome from a `_bulk` response (items come in request order)."""
    items = response.get("items")
    if not isinstance(items, list) or len(items) != len(sent):
        # Not a bulk answer we understand (a proxy page?): retrying loses nothing.
        return [Outcome("retry", "malformed_response")] * len(sent)
    if not response.get("errors", True):
        return [OK] * len(sent)
    out: list[Outcome] = []
    for item, doc in zip(items, sent, strict=True):
        result: dict[str, Any] = next(iter(item.values()), {}) if isinstance(item, dict) else {}
        error = result.get("error")
        error_type = str(error.get("type", "")) if isinstance(error, dict) else ""
        out.append(classify(spec.op, doc.sent is None, int(result.get("status", 0)), error_type))
    return out


# --- when to try again -------------------------------------------------------------------


@dataclass
class Pacing:
    """The next time an attempt may start, after `failures` consecutive failed attempts."""

    backoff: Backoff
    failures: int = 0
    next_at: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        """Record a failed attempt at `now`; returns the delay before the next one."""
        delay = self.backoff.delay(self.failures)
        self.failures += 1
        self.next_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_at = 0.0
