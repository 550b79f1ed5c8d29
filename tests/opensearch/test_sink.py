"""The OpenSearch sink without OpenSearch: zero handling, the threshold, coalescing, the
bounded pending set, bulk bodies, reply classification, pacing, snapshots, and the
partition's promise that a slow or dead OpenSearch never blocks `write_batch`.

`FakeOpenSearch` applies the real NDJSON bodies to a dict the way OpenSearch would (index
replaces, update merges and nulls remove, delete of a missing doc is a 404), so what the
tests compare is what a search would see.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from opensearchpy import ConnectionError as OSConnectionError
from opensearchpy import ConnectionTimeout, TransportError

from dataflow.config import OpenSearchSettings, Secret
from dataflow.core.shard import StepResult
from dataflow.errors import IndexMappingError, RejectedError, RetryableError, SinkError
from dataflow.opensearch.sink import (
    OpenSearchBulkClient,
    OpenSearchPartition,
    OpenSearchSink,
    _translate,
)
from dataflow.opensearch.updates import (
    DOC_FEATURES,
    DocUpdate,
    IndexSpec,
    Outcome,
    Outgoing,
    Pacing,
    Router,
    bulk_body,
    bulk_lines,
    classify,
    outcomes_of,
    rank_value,
)
from dataflow.retry import Backoff
from tests.opensearch.samples import AC, DOCS, SUPPORT, acq, acq_fields, delete, fields, up
from tests.registry import sample

# --- bulk bodies and replies -------------------------------------------------------------


def test_bulk_lines_support_index_golden() -> None:
    item = Outgoing("a:b é", 1, (2.0, None, 0.047619047619047616), 1_700_000_000_000)
    assert bulk_lines(SUPPORT, item) == (
        b'{"index":{"_index":"doc-features","_id":"a:b \xc3\xa9"}}\n'
        b'{"doc_id":"a:b \xc3\xa9","popularity_7d":2.0,"ctr_30d":0.047619047619047616,'
        b'"as_of":1700000000000}\n'
    )
    assert bulk_lines(SUPPORT, Outgoing("a", 1, None, 0)) == (
        b'{"delete":{"_index":"doc-features","_id":"a"}}\n'
    )


def test_bulk_lines_ac_index_golden() -> None:
    item = Outgoing("iphone case", 1, (None, 0.047619047619047616), 5)
    assert bulk_lines(AC, item) == (
        b'{"index":{"_index":"ac-features","_id":"iphone case"}}\n'
        b'{"candidate":"iphone case","click_rate_30d":0.047619047619047616,"as_of":5}\n'
    )
    assert bulk_lines(AC, Outgoing("iphone case", 1, None, 0)) == (
        b'{"delete":{"_index":"ac-features","_id":"iphone case"}}\n'
    )


def test_bulk_lines_main_index_golden() -> None:
    item = Outgoing("a", 1, (2.0, None, 0.5), 7)
    assert bulk_lines(DOCS, item) == (
        b'{"update":{"_index":"search","_id":"a","retry_on_conflict":3}}\n'
        b'{"doc":{"popularity_7d":2.0,"popularity_30d":null,"ctr_30d":0.5,'
        b'"popularity_as_of":7}}\n'
    )
    assert bulk_lines(DOCS, Outgoing("a", 1, None, 0)) == (
        b'{"update":{"_index":"search","_id":"a","retry_on_conflict":3}}\n'
        b'{"doc":{"popularity_7d":null,"popularity_30d":null,"ctr_30d":null,'
        b'"popularity_as_of":null}}\n'
    )


def test_bulk_body_cuts_by_bytes_but_always_sends_one() -> None:
    items = [Outgoing(f"d{i}", i, (1.0, 1.0, 1.0), 1) for i in range(10)]
    one = len(bulk_lines(SUPPORT, items[0]))
    body, chunk = bulk_body(SUPPORT, items, max_bytes=3 * one + 1)
    assert len(chunk) == 3
    assert body == b"".join(bulk_lines(SUPPORT, i) for i in items[:3])
    body, chunk = bulk_body(SUPPORT, items, max_bytes=1)
    assert len(chunk) == 1
    assert body.count(b"\n") == 2


@pytest.mark.parametrize(
    ("op_", "deleting", "status", "error", "expected"),
    [
        ("index", False, 201, "", Outcome("ok")),
        ("index", False, 200, "", Outcome("ok")),
        ("index", True, 404, "", Outcome("ok")),  # delete of a missing document
        ("update", True, 404, "document_missing_exception", Outcome("ok")),
        (
            "update",
            False,
            404,
            "document_missing_exception",
            Outcome("fail", "document_missing_exception"),
        ),
        (
            "index",
            False,
            429,
            "es_rejected_execution_exception",
            Outcome("retry", "es_rejected_execution_exception"),
        ),
        (
            "index",
            False,
            503,
            "unavailable_shards_exception",
            Outcome("retry", "unavailable_shards_exception"),
        ),
        ("index", False, 500, "", Outcome("retry", "http_500")),
        (
            "update",
            False,
            409,
            "version_conflict_engine_exception",
            Outcome("retry", "version_conflict_engine_exception"),
        ),
        (
            "index",
            False,
            404,
            "index_not_found_exception",
            Outcome("retry", "index_not_found_exception"),
        ),
        (
            "index",
            True,
            404,
            "index_not_found_exception",
            Outcome("retry", "index_not_found_exception"),
        ),
        (
            "index",
            False,
            400,
            "mapper_parsing_exception",
            Outcome("fail", "mapper_parsing_exception"),
        ),
        (
            "index",
            False,
            400,
            "strict_dynamic_mapping_exception",
            Outcome("fail", "strict_dynamic_mapping_exception"),
        ),
        ("index", False, 400, "", Outcome("fail", "http_400")),
        # The security plugin refused this user or its role the write: kept for an operator.
        (
            "index",
            False,
            403,
            "security_exception",
            Outcome("retry", "security_exception"),
        ),
        ("update", False, 401, "", Outcome("retry", "http_401")),
    ],
)
def test_classify(op_: Any, deleting: bool, status: int, error: str, expected: Outcome) -> None:
    assert classify(op_, deleting, status, error) == expected


def test_outcomes_of_reads_items_in_order_and_distrusts_odd_replies() -> None:
    sent = [Outgoing("a", 1, (1.0,), 1), Outgoing("b", 2, (1.0,), 1)]
    reply = {
        "errors": True,
        "items": [
            {"index": {"status": 201}},
            {"index": {"status": 400, "error": {"type": "mapper_parsing_exception"}}},
        ],
    }
    assert outcomes_of(SUPPORT, reply, sent) == [
        Outcome("ok"),
        Outcome("fail", "mapper_parsing_exception"),
    ]
    assert outcomes_of(SUPPORT, {"errors": False, "items": [{}, {}]}, sent) == [Outcome("ok")] * 2
    odd = [Outcome("retry", "malformed_response")] * 2
    assert outcomes_of(SUPPORT, {"errors": False, "items": [{}]}, sent) == odd
    assert outcomes_of(SUPPORT, {"html": "proxy error"}, sent) == odd


def test_pacing_backs_off_exponentially_up_to_the_cap_and_resets() -> None:
    pacing = Pacing(Backoff(base=1.0, cap=8.0))
    delays = [pacing.failed(100.0) for _ in range(6)]
    for attempt, delay in enumerate(delays):
        ceiling = min(8.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert not pacing.ready(100.0 + delays[-1] - 0.01)
    assert pacing.ready(100.0 + delays[-1])
    pacing.succeeded()
    assert pacing.ready(0.0)
    assert pacing.failures == 0


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionTimeout("TIMEOUT", "read timed out", Exception()), RetryableError("timeout")),
        (OSConnectionError("N/A", "refused", Exception()), RetryableError("connection")),
        (
            TransportError(429, "x", {"error": {"type": "es_rejected_execution_exception"}}),
            RetryableError("es_rejected_execution_exception"),
        ),
        (TransportError(503, "x", {"error": {"type": "a"}}), RetryableError("a")),
        (TransportError(502, "Bad Gateway", "<html>"), RetryableError("http_502")),
        (TransportError(401, "x", {}), RetryableError("http_401")),  # fix credentials, no loss
        (
            TransportError(403, "x", {"error": {"type": "security_exception"}}),
            RetryableError("security_exception"),  # fix the role, no loss
        ),
        (
            TransportError(404, "x", {"error": {"type": "index_not_found_exception"}}),
            RetryableError("index_not_found_exception"),
        ),
        (
            TransportError(400, "x", {"error": {"type": "parse_exception"}}),
            RejectedError("parse_exception"),
        ),
        (TransportError(413, "too large", ""), RejectedError("http_413")),
    ],
)
def test_transport_errors_are_split_into_retryable_and_rejected(
    error: TransportError, expected: RetryableError | RejectedError
) -> None:
    got = _translate(error)
    assert type(got) is type(expected)
    assert got.reason == expected.reason


def test_real_client_reports_an_unreachable_cluster_as_retryable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = OpenSearchSettings(url=Secret(f"http://127.0.0.1:{port}"), timeout_seconds=1)
    client = OpenSearchBulkClient(settings)
    try:
        with pytest.raises(RetryableError, match="connection"):
            client.bulk(b'{"delete":{"_index":"x","_id":"a"}}\n', require_alias=True)
        with pytest.raises(RetryableError, match="connection"):
            client.ensure(SUPPORT)
    finally:
        client.close()


# --- the partition, with a fake OpenSearch -----------------------------------------------


class FakeOpenSearch:
    """A `BulkClient` that applies bulk bodies to `docs` per index, as OpenSearch would."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.down = False
        self.gate: threading.Event | None = None  # when set, bulk waits for it (slow cluster)
        self.item_status: Callable[[str, str], tuple[int, str] | None] = lambda index, doc: None
        self.requests = 0
        self.ensured: list[str] = []
        self.mapping_error: str | None = None
        self.closed = False

    def ensure(self, spec: IndexSpec) -> bool:
        if self.down:
            raise RetryableError("connection")
        if self.mapping_error:
            raise IndexMappingError(self.mapping_error)
        self.ensured.append(spec.target)
        self.docs.setdefault(spec.target, {})
        return spec.op == "index"

    def bulk(self, body: bytes, *, require_alias: bool) -> Mapping[str, Any]:
        if self.gate is not None:
            self.gate.wait(10)
        if self.down:
            raise RetryableError("connection")
        self.requests += 1
        lines = body.splitlines()
        items = []
        i = 0
        while i < len(lines):
            ((action, meta),) = orjson.loads(lines[i]).items()
            index = self.docs.setdefault(meta["_index"], {})
            doc_id = meta["_id"]
            forced = self.item_status(meta["_index"], doc_id)
            if action == "delete":
                i += 1
                status = 200 if index.pop(doc_id, None) is not None else 404
                items.append({action: {"status": status}})
                continue
            source = orjson.loads(lines[i + 1])
            i += 2
            if forced is not None:
                status, error = forced
                items.append({action: {"status": status, "error": {"type": error}}})
            elif action == "index":
                index[doc_id] = source
                items.append({action: {"status": 201}})
            elif doc_id not in index:
                items.append(
                    {action: {"status": 404, "error": {"type": "document_missing_exception"}}}
                )
            else:
                # Like OpenSearch: a null is kept in _source and indexes no value.
                index[doc_id] = {**index[doc_id], **source["doc"]}
                items.append({action: {"status": 200}})
        errors = any(next(iter(it.values()))["status"] >= 300 for it in items)
        return {"errors": errors, "items": items}

    def close(self) -> None:
        self.closed = True


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_partition(
    fake: FakeOpenSearch,
    clock: Callable[[], float] = time.monotonic,
    *,
    specs: tuple[IndexSpec, ...] = (SUPPORT,),
    background: bool = False,
    resume: bytes | None = None,
    **overrides: Any,
) -> OpenSearchPartition:
    settings = OpenSearchSettings(partitions=1, **overrides)
    sink = OpenSearchSink(
        settings,
        specs,
        client_factory=lambda: fake,
        backoff=Backoff(base=1.0, cap=4.0, sleep=lambda s: None),
        clock=clock,
        background=background,
    )
    return sink.build_part("opensearch", "0000", resume)


def flush_all(part: OpenSearchPartition) -> None:
    while part.flush_once() != "idle":
        pass


def test_partition_sends_in_bulks_of_bulk_docs() -> None:
    fake = FakeOpenSearch()
    part = make_partition(fake, bulk_docs=3)
    part.write_batch([[up(f"d{i}", 1.0) for i in range(7)]])
    flush_all(part)
    assert fake.requests == 3
    assert set(fake.docs["doc-features"]) == {f"d{i}" for i in range(7)}
    assert fake.docs["doc-features"]["d0"] == {
        "doc_id": "d0",
        "popularity_7d": 1.0,
        "popularity_30d": 10.0,
        "ctr_30d": 0.1,
        "as_of": 1000,
    }


def test_outage_keeps_documents_pending_with_backoff_then_converges() -> None:
    fake = FakeOpenSearch()
    clock = ManualClock()
    part = make_partition(fake, clock)
    part.write_batch([[up("a", 1.0), up("b", 2.0)]])
    flush_all(part)
    retries_before = sample("search_features_sink_writes_total", sink="opensearch", result="retry")
    fake.down = True
    part.write_batch([[up("a", 5.0), up("c", 3.0)]])
    assert part.flush_once() == "retry"
    assert sample("search_features_sink_writes_total", sink="opensearch", result="retry") == (
        retries_before + 2
    )
    assert part.flush_once() == "idle"  # backing off: no request before next_at
    clock.now += 0.49
    assert part.flush_once() == "idle"  # first delay is in [0.5, 1] s
    clock.now += 0.52
    assert part.flush_once() == "retry"
    part.write_batch([[delete("b")]])
    fake.down = False
    clock.now += 10
    flush_all(part)
    assert fake.docs["doc-features"].keys() == {"a", "c"}
    assert fake.docs["doc-features"]["a"]["popularity_7d"] == 5.0
    assert len(part.outboxes["support"]) == 0


def test_a_refused_write_waits_for_the_role_with_a_hint_and_loses_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeOpenSearch()
    clock = ManualClock()
    part = make_partition(fake, clock)
    # OpenSearch's security plugin: the role may not write this index (per document, 403).
    fake.item_status = lambda index, doc: (403, "security_exception")
    part.write_batch([[up("a", 1.0), up("b", 2.0)]])
    with caplog.at_level("WARNING", logger="dataflow.opensearch.sink"):
        assert part.flush_once() == "retry"
    (record,) = [r for r in caplog.records if r.getMessage().startswith("OpenSearch write")]
    assert record.__dict__["reason"] == "security_exception"
    assert "grant it the sink's rights" in record.__dict__["hint"]
    assert len(part.outboxes["support"]) == 2  # pending, not dropped
    fake.item_status = lambda index, doc: None  # the role fixed
    clock.now += 10
    flush_all(part)
    assert fake.docs["doc-features"].keys() == {"a", "b"}


def test_zero_values_are_left_out_and_a_feature_dropping_to_zero_is_removed() -> None:
    fake = FakeOpenSearch()
    part = make_partition(fake)
    part.write_batch([[up("a", 0.0, 0.0, 0.05)]])
    flush_all(part)
    assert fake.docs["doc-features"]["a"] == {"doc_id": "a", "ctr_30d": 0.05, "as_of": 1000}
    part.write_batch([[up("a", 1.0, 1.0, 0.05)]])
    flush_all(part)
    part.write_batch([[up("a", 0.0, 1.0, 0.05, as_of=2000)]])  # 7-day window emptied
    flush_all(part)
    assert fake.docs["doc-features"]["a"] == {
        "doc_id": "a",
        "popularity_30d": 1.0,
        "ctr_30d": 0.05,
        "as_of": 2000,
    }


def test_ac_index_gets_one_document_per_candidate_with_zero_selects_left_out() -> None:
    fake = FakeOpenSearch()
    part = make_partition(fake, specs=(SUPPORT, AC))
    case, ipad = acq("iphone case"), acq("ipad")
    router = Router([SUPPORT, AC], partitions=1)
    labels = {case: "iphone case", ipad: "ipad"}
    out = router(
        [
            StepResult(
                writes=[
                    (case, acq_fields(3, 0.2, as_of=7)),
                    (ipad, acq_fields(0, 0.05)),
                    ("doc:d1", fields(1.0, 2.0, 0.1)),
                ],
                labels=labels,
            )
        ]
    )
    part.write_batch([batch for _, batch in out])
    flush_all(part)
    assert fake.docs["ac-features"] == {
        "iphone case": {
            "candidate": "iphone case",
            "selects_30d": 3.0,
            "click_rate_30d": 0.2,
            "as_of": 7,
        },
        "ipad": {"candidate": "ipad", "click_rate_30d": 0.05, "as_of": 1000},
    }
    assert set(fake.docs["doc-features"]) == {"d1"}
    # The same threshold: a 4% move is skipped, a deletion by label removes the document.
    out = router([StepResult(writes=[(case, acq_fields(3, 0.208)), (ipad, None)], labels=labels)])
    part.write_batch([batch for _, batch in out])
    flush_all(part)
    assert set(fake.docs["ac-features"]) == {"iphone case"}
    assert fake.docs["ac-features"]["iphone case"]["click_rate_30d"] == 0.2
    part.close()


def test_main_index_mode_patches_existing_documents_and_counts_missing_ones() -> None:
    fake = FakeOpenSearch()
    fake.docs["search"] = {"a": {"title": "A"}, "b": {"title": "B"}}
    part = make_partition(fake, specs=(SUPPORT, DOCS))
    missing_before = sample(
        "search_features_opensearch_failures_total", reason="document_missing_exception"
    )
    part.write_batch(
        [
            [
                up("a", 2.0, 0.0, 0.5),
                DocUpdate("docs", "a", (2.0, 0.0, 0.5), 9),
                DocUpdate("docs", "zz", (1.0, 1.0, 0.5), 9),
            ]
        ]
    )
    flush_all(part)
    assert fake.docs["search"]["a"] == {
        "title": "A",
        "popularity_7d": 2.0,
        "popularity_30d": None,  # zero: null, so no indexed value
        "ctr_30d": 0.5,
        "popularity_as_of": 9,
    }
    assert "zz" not in fake.docs["search"]
    assert (
        sample("search_features_opensearch_failures_total", reason="document_missing_exception")
        == missing_before + 1
    )
    part.write_batch([[delete("a", "docs"), delete("b", "docs"), delete("a")]])
    flush_all(part)
    cleared = dict.fromkeys((*DOC_FEATURES, "popularity_as_of"))
    assert fake.docs["search"] == {"a": {"title": "A", **cleared}, "b": {"title": "B", **cleared}}
    assert "a" not in fake.docs["doc-features"]


def test_permanent_failures_are_counted_by_reason_and_dropped() -> None:
    fake = FakeOpenSearch()
    fake.item_status = lambda index, doc: (
        (400, "mapper_parsing_exception") if doc == "bad" else None
    )
    part = make_partition(fake)
    before = sample("search_features_opensearch_failures_total", reason="mapper_parsing_exception")
    part.write_batch([[up("good", 1.0), up("bad", 1.0)]])
    flush_all(part)
    after = sample("search_features_opensearch_failures_total", reason="mapper_parsing_exception")
    assert after == before + 1
    assert set(fake.docs["doc-features"]) == {"good"}
    assert len(part.outboxes["support"]) == 0


def test_per_item_429_keeps_only_those_documents_and_backs_off() -> None:
    fake = FakeOpenSearch()
    clock = ManualClock()
    busy = {"b"}
    fake.item_status = lambda index, doc: (
        (429, "es_rejected_execution_exception") if doc in busy else None
    )
    part = make_partition(fake, clock)
    part.write_batch([[up("a", 1.0), up("b", 1.0)]])
    assert part.flush_once() == "retry"
    assert list(part.outboxes["support"].pending) == ["b"]
    assert part.flush_once() == "idle"
    busy.clear()
    clock.now += 5
    flush_all(part)
    assert set(fake.docs["doc-features"]) == {"a", "b"}


def test_whole_request_rejection_drops_the_chunk_with_its_reason() -> None:
    class Rejecting(FakeOpenSearch):
        def bulk(self, body: bytes, *, require_alias: bool) -> Mapping[str, Any]:
            raise RejectedError("illegal_argument_exception")

    fake = Rejecting()
    part = make_partition(fake)
    before = sample(
        "search_features_opensearch_failures_total", reason="illegal_argument_exception"
    )
    part.write_batch([[up("a", 1.0), up("b", 1.0)]])
    assert part.flush_once() == "ok"
    assert len(part.outboxes["support"]) == 0
    after = sample("search_features_opensearch_failures_total", reason="illegal_argument_exception")
    assert after == before + 2


def test_index_not_found_makes_the_sink_check_the_index_again() -> None:
    fake = FakeOpenSearch()
    clock = ManualClock()
    part = make_partition(fake, clock)
    part.write_batch([[up("a", 1.0)]])
    flush_all(part)
    assert fake.ensured == ["doc-features"]
    fake.item_status = lambda index, doc: (404, "index_not_found_exception")
    part.write_batch([[up("b", 1.0)]])
    assert part.flush_once() == "retry"
    fake.item_status = lambda index, doc: None
    clock.now += 5
    flush_all(part)
    assert fake.ensured == ["doc-features", "doc-features"]
    assert "b" in fake.docs["doc-features"]


def test_mapping_conflict_stops_the_dataflow_at_the_next_batch() -> None:
    fake = FakeOpenSearch()
    fake.mapping_error = "popularity_7d is mapped as float, needs rank_feature"
    part = make_partition(fake)
    part.write_batch([[up("a", 1.0)]])
    part.flush_once()
    with pytest.raises(SinkError, match="mapped as float"):
        part.write_batch([[up("b", 1.0)]])
    assert part.flush_once() == "idle"  # the sender stops trying
    part.close()  # never raises (Bytewax would abort the process), only logs
    assert fake.closed


def test_pending_gauge_and_update_outcome_counters() -> None:
    fake = FakeOpenSearch()
    gauge = "search_features_opensearch_pending_docs"
    before = sample(gauge)

    def outcomes() -> dict[str, float]:
        return {
            o: sample("search_features_opensearch_updates_total", outcome=o)
            for o in ("queued", "coalesced", "skipped", "shed_update", "shed_delete", "withdrawn")
        }

    start = outcomes()
    part = make_partition(fake, max_pending=3)
    part.write_batch([[up("a", 1.0), up("b", 1.0), up("c", 1.0), up("d", 1.0), up("a", 2.0)]])
    assert sample(gauge) == before + 3
    flush_all(part)
    assert sample(gauge) == before
    part.write_batch([[up("a", 2.01), up("b", 9.0)], [up("b", 1.01), delete("d")]])
    flush_all(part)
    delta = {o: n - start[o] for o, n in outcomes().items()}
    assert delta == {
        "queued": 5,  # a, b, c, then b and d again
        "coalesced": 2,  # a, then b
        "skipped": 1,  # a at 2.01
        "shed_update": 1,  # d while full
        "shed_delete": 0,
        "withdrawn": 1,  # b back at 1.01 before it was sent
    }
    part.close()
    assert fake.closed


def test_snapshot_of_a_partition_resumes_pending_and_last_sent() -> None:
    fake = FakeOpenSearch()
    part = make_partition(fake)
    part.write_batch([[up("a", 100.0)]])
    flush_all(part)
    fake.down = True
    part.write_batch([[up("b", 1.0)]])
    part.flush_once()
    blob = part.snapshot()
    assert isinstance(blob, bytes)
    fake2 = FakeOpenSearch()
    resumed = make_partition(fake2, resume=blob)
    resumed.write_batch([[up("a", 101.0)]])  # within 5% of what OpenSearch holds: skipped
    flush_all(resumed)
    assert set(fake2.docs["doc-features"]) == {"b"}


def test_close_drains_and_gives_up_after_max_retries_when_down() -> None:
    fake = FakeOpenSearch()
    part = make_partition(fake)
    part.write_batch([[up("a", 1.0)]])
    part.close()
    assert "a" in fake.docs["doc-features"]

    down = FakeOpenSearch()
    down.down = True
    clock = ManualClock()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    settings = OpenSearchSettings(partitions=1, max_retries=3)
    sink = OpenSearchSink(
        settings,
        (SUPPORT,),
        client_factory=lambda: down,
        backoff=Backoff(base=1.0, cap=4.0, sleep=sleep),
        clock=clock,
        background=False,
    )
    gauge = sample("search_features_opensearch_pending_docs")
    part = sink.build_part("opensearch", "0000", None)
    part.write_batch([[up("a", 1.0)]])
    part.close()
    assert len(sleeps) == 3  # 4 attempts: the first, then 3 retries after backoff
    assert 0.5 <= sleeps[0] <= 1.0 and 2.0 <= sleeps[2] <= 4.0
    assert len(part.outboxes["support"]) == 1
    assert sample("search_features_opensearch_pending_docs") == gauge


def test_write_batch_never_waits_for_a_slow_opensearch() -> None:
    """The sender thread owns the network: a bulk that hangs must not hold up the worker."""
    fake = FakeOpenSearch()
    fake.gate = threading.Event()
    part = make_partition(fake, background=True)
    try:
        part.write_batch([[up("a", 1.0)]])
        deadline = time.monotonic() + 5
        while fake.gate is not None and not fake.ensured and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        for i in range(200):
            part.write_batch([[up(f"d{i}", 1.0)]])
        assert time.monotonic() - started < 0.5  # the bulk in flight waits up to 10 s
        assert len(part.outboxes["support"]) == 201
        fake.gate.set()
        deadline = time.monotonic() + 5
        while len(part.outboxes["support"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(fake.docs["doc-features"]) == 201
    finally:
        fake.gate.set()
        part.close()


def test_sender_thread_retries_on_its_own_without_new_batches() -> None:
    fake = FakeOpenSearch()
    fake.down = True
    settings = OpenSearchSettings(partitions=1)
    sink = OpenSearchSink(
        settings, (SUPPORT,), client_factory=lambda: fake, backoff=Backoff(base=0.01, cap=0.05)
    )
    part = sink.build_part("opensearch", "0000", None)
    try:
        part.write_batch([[up("a", 1.0)]])
        time.sleep(0.2)
        assert "a" not in fake.docs.get("doc-features", {})
        fake.down = False
        deadline = time.monotonic() + 5
        while "a" not in fake.docs.get("doc-features", {}) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "a" in fake.docs["doc-features"]
    finally:
        part.close()


def test_the_sink_inside_a_bytewax_flow_routes_and_writes_every_document() -> None:
    fake = FakeOpenSearch()
    settings = OpenSearchSettings(partitions=3, min_change=0.0)
    specs = (SUPPORT,)
    sink = OpenSearchSink(
        settings, specs, client_factory=lambda: fake, backoff=Backoff(base=0.0, cap=0.0)
    )
    results = [
        StepResult(
            writes=[(f"doc:d{i}", fields(float(i + step), 1.0, 0.1, as_of=step)) for i in range(20)]
        )
        for step in range(1, 4)
    ]
    flow = Dataflow("opensearch_unit")
    writes = op.input("in", flow, TestingSource(results))
    routed = op.flat_map_batch("route", writes, Router(specs, settings.partitions))
    op.output("opensearch", routed, sink)
    run_main(flow)
    assert {d: doc["popularity_7d"] for d, doc in fake.docs["doc-features"].items()} == {
        f"d{i}": float(i + 3) for i in range(20)
    }


def test_pending_documents_survive_a_crash_in_the_recovery_snapshot(tmp_path: Path) -> None:
    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    source = TestingSource(
        [
            StepResult(writes=[("doc:early", fields(1.0, 1.0, 0.1))]),
            StepResult(writes=[("doc:second", fields(2.0, 2.0, 0.1))]),
            TestingSource.ABORT(),
            StepResult(writes=[("doc:late", fields(3.0, 3.0, 0.1))]),
        ]
    )
    settings = OpenSearchSettings(partitions=2)
    down, up_again = FakeOpenSearch(), FakeOpenSearch()
    down.down = True
    for fake in (down, up_again):
        flow = Dataflow("opensearch_recovery")
        writes = op.input("in", flow, source)
        routed = op.flat_map_batch("route", writes, Router((SUPPORT,), settings.partitions))
        sink = OpenSearchSink(
            settings,
            (SUPPORT,),
            client_factory=lambda fake=fake: fake,  # type: ignore[misc]
            backoff=Backoff(base=0.0, cap=0.0),
            background=False,
        )
        op.output("opensearch", routed, sink)
        run_main(
            flow, epoch_interval=timedelta(seconds=0), recovery_config=RecoveryConfig(str(recovery))
        )
    assert "doc-features" not in down.docs  # nothing got through the first run...
    # ...and the second run resumed after the crash: `early` was not replayed by the source,
    # it came back from the sink's snapshot.
    assert set(up_again.docs["doc-features"]) == {"early", "second", "late"}


# --- convergence, against a brute-force model --------------------------------------------

DOC_IDS = ["a", "b", "c"]
value = st.sampled_from([0.0, 1e-40, 1.0, 1.04, 1.06, 2.0, 10.0, 10.4, 10.6, 1e6])
step = st.one_of(
    st.tuples(st.just("update"), st.sampled_from(DOC_IDS), value, value),
    st.tuples(st.just("delete"), st.sampled_from(DOC_IDS)),
    st.tuples(st.just("flush"), st.sampled_from(["ok", "down", "busy"])),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, max_size=40), min_change=st.sampled_from([0.0, 0.05, 0.5]))
def test_the_index_converges_to_the_latest_values_within_the_threshold(
    steps: list[tuple[Any, ...]], min_change: float
) -> None:
    fake = FakeOpenSearch()
    clock = ManualClock()
    part = make_partition(fake, clock, min_change=min_change)
    latest: dict[str, tuple[float, float] | None] = {}
    for s in steps:
        if s[0] == "update":
            part.write_batch([[DocUpdate("support", s[1], (s[2], s[3], 0.1), 1)]])
            latest[s[1]] = (s[2], s[3])
        elif s[0] == "delete":
            part.write_batch([[delete(s[1])]])
            latest[s[1]] = None
        else:
            fake.down = s[1] == "down"
            fake.item_status = (
                (lambda index, doc: (429, "es_rejected_execution_exception"))
                if s[1] == "busy"
                else (lambda index, doc: None)
            )
            clock.now += 10
            part.flush_once()
    fake.down = False
    fake.item_status = lambda index, doc: None
    clock.now += 100
    flush_all(part)
    index = fake.docs.get("doc-features", {})
    for doc_id in DOC_IDS:
        want = latest.get(doc_id)
        if want is None:
            assert doc_id not in index
            continue
        have = index[doc_id]
        for name, v in zip(("popularity_7d", "popularity_30d"), want, strict=True):
            expected = rank_value(v)
            if expected is None:
                assert name not in have  # zero (or tiny) is never indexed
            else:
                # Within the threshold of the latest value, relative to what is indexed.
                assert abs(have[name] - expected) < min_change * have[name] or (
                    have[name] == expected
                )
