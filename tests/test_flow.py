"""The whole dataflow (bytewax.testing.run_main, in-memory sinks) against the reference model.

The model (tests/reference_model.py) is a brute-force second implementation of
docs/contract.md; the property test drives both with random streams that have duplicates,
disorder, idle gaps of weeks, broken messages and random batch sizes.
"""

from __future__ import annotations

import json
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.config import Config
from dataflow.core.aclink import DEFAULT_GRACE_MS
from dataflow.flow import build_flow
from tests.fakes import MemoryStore, MemoryStoreSink, kafka_messages
from tests.reference_model import (
    FAMILIES,
    ModelParams,
    diff_acq_lower_bound,
    diff_stores,
    expected_store,
    fitted_prior,
    max_disorder_ms,
    model_dedup,
    select_families,
)

ALL = ("doc", "qd", "ac", "acq")
COUNTED = ("doc", "qd", "ac")  # exact whatever the disorder; acq links need the grace

DAY = 86_400_000
NOW = int(time.time() * 1000)
DOCS = ["d1", "d2", "d:3", "é 4", "d5"]
QUERIES = ["iPhone case", "IPHONE  Case", "shoes", "", "ｓｈｏｅｓ"]
CANDIDATES = ["iphone", "iPhone ", "ipad", "", "shoes"]


def make_event(rnd: random.Random, i: int, ts: int) -> dict[str, Any]:
    kind = rnd.choice(["search_impression", "click", "dwell", "ac_impression", "ac_select"])
    event: dict[str, Any] = {"event_id": f"e{i}", "type": kind, "ts": ts}
    if rnd.random() < 0.8:
        event["session_id"] = f"s{rnd.randint(0, 5)}"
    if kind == "search_impression":
        event["query"] = rnd.choice(QUERIES)
        event["doc_ids"] = [rnd.choice(DOCS) for _ in range(rnd.randint(1, 4))]
    elif kind in ("click", "dwell"):
        event["query"] = rnd.choice(QUERIES)
        event["doc_id"] = rnd.choice(DOCS)
        if kind == "dwell":
            event["dwell_ms"] = rnd.choice([500, 29_999, 30_000, 120_000])
    elif kind == "ac_impression":
        event["prefix"] = rnd.choice(["ip", " IP", "", "sh"])
        event["candidates"] = [rnd.choice(CANDIDATES) for _ in range(rnd.randint(1, 3))]
    else:
        event["prefix"] = rnd.choice(["ip", "sh", ""])
        event["candidate"] = rnd.choice(CANDIDATES)
    return event


def make_stream(
    seed: int, n: int, span_days: int, gap_days: int, jitter: int = 6 * 3_600_000
) -> list[dict[str, Any]]:
    """Events over `span_days`, a silent gap of `gap_days` in the middle, some disorder,
    and re-sent copies a little later in the stream."""
    rnd = random.Random(seed)
    start = NOW - (span_days + gap_days) * DAY
    events: list[dict[str, Any]] = []
    for i in range(n):
        ts = start + int(span_days * DAY * i / n)
        if i > n // 2:
            ts += gap_days * DAY
        ts -= rnd.randint(0, jitter) if rnd.random() < 0.3 else 0
        events.append(make_event(rnd, i, min(ts, NOW)))
    for _ in range(n // 5):  # duplicates: same payload, delivered again a bit later
        src = rnd.randrange(len(events))
        events.insert(min(len(events), src + rnd.randint(1, 30)), dict(events[src]))
    return events


def run_flow(values: list[bytes], batch_size: int, **env: str) -> tuple[MemoryStore, list[Any]]:
    config = Config.from_env({"OPENSEARCH_URL": "", "FEATURE_SHARDS": "7", **env})
    store, dead = MemoryStore(config.redis.prefix), []
    flow = build_flow(
        config,
        source=TestingSource(kafka_messages(values), batch_size=batch_size),
        redis_sink=MemoryStoreSink(store),
        dlq_sink=TestingSink(dead),
    )
    run_main(flow)
    return store, dead


def encode(events: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


@settings(max_examples=60)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 300),
    span_days=st.integers(0, 40),
    gap_days=st.sampled_from([0, 3, 8, 31]),
    batch_size=st.sampled_from([1, 7, 50, 1000]),
    flush_ms=st.sampled_from(["0", "1", "1000"]),
    restate_rate=st.sampled_from(["0", "1", "50000"]),
)
def test_flow_equals_reference_model(
    seed: int,
    n: int,
    span_days: int,
    gap_days: int,
    batch_size: int,
    flush_ms: str,
    restate_rate: str,
) -> None:
    events = make_stream(seed, n, span_days, gap_days)
    store, dead = run_flow(
        encode(events),
        batch_size,
        FEATURE_FLUSH_INTERVAL_MS=flush_ms,
        RESTATE_KEYS_PER_SECOND=restate_rate,
    )
    assert dead == []
    assert not compare(store.hashes, events), "\n".join(compare(store.hashes, events)[:20])


def compare(actual: dict[str, dict[str, str]], events: list[dict[str, Any]]) -> list[str]:
    """Exact for every family while the stream's disorder is within the link grace;
    beyond it, exact for the counted families and a lower bound for the links."""
    full = expected_store(events)
    if max_disorder_ms(model_dedup(events)) <= DEFAULT_GRACE_MS:
        return diff_stores(actual, select_families(full, ALL))
    diffs = diff_stores(select_families(actual, COUNTED), select_families(full, COUNTED))
    return diffs + diff_acq_lower_bound(actual, full)


@settings(max_examples=40)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 300),
    span_days=st.integers(0, 3),
    batch_size=st.sampled_from([1, 7, 50, 1000]),
    jitter=st.sampled_from([0, 60_000, DEFAULT_GRACE_MS // 2]),
)
def test_flow_with_autocomplete_links_equals_reference_model(
    seed: int, n: int, span_days: int, batch_size: int, jitter: int
) -> None:
    events = make_stream(seed, n, span_days, 0, jitter)
    store, _ = run_flow(encode(events), batch_size)
    diffs = compare(store.hashes, events)
    assert not diffs, "\n".join(diffs[:20])
    assert select_families(expected_store(events), ["acq"]) or n < 60  # links were exercised


def test_broken_messages_go_to_dead_letters_and_count_nothing() -> None:
    good = make_stream(1, 50, 2, 0)
    broken = [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"event_id": "x", "type": "purchase", "ts": NOW}).encode(),
        json.dumps({"event_id": "y", "type": "click", "ts": NOW + DAY, "doc_id": "d1"}).encode(),
        json.dumps({"event_id": "z", "type": "click", "ts": NOW, "doc_id": "a\x01"}).encode(),
    ]
    values = encode(good[:25]) + broken + encode(good[25:])
    store, dead = run_flow(values, 10)
    reasons = [json.loads(d.value)["reason"] for d in dead]
    assert reasons == [
        "invalid_json",
        "invalid_json",
        "invalid_event",
        "unknown_type",
        "future_timestamp",
        "invalid_event",
    ]
    offsets = [json.loads(d.value)["offset"] for d in dead]
    assert offsets == list(range(25, 31))
    assert not compare(store.hashes, good)


def test_idle_key_is_restated_when_the_day_changes() -> None:
    day0 = (NOW // DAY - 10) * DAY
    events = [
        {"event_id": "a", "type": "click", "ts": day0 + 1_000, "doc_id": "idle"},
        {"event_id": "b", "type": "click", "ts": day0 + 8 * DAY + 5, "doc_id": "busy"},
    ]
    store, _ = run_flow(encode(events), 1)
    idle = store.hashes["feat:doc:idle"]
    assert idle["as_of"] == str(day0 + 8 * DAY)  # re-stated at the new day, not left stale
    assert idle["clicks_7d"] == "0"  # day0 left the 7-day window at day 7
    assert idle["clicks_30d"] == "1"


def test_key_is_deleted_when_its_30_days_are_empty() -> None:
    day0 = (NOW // DAY - 40) * DAY
    events = [
        {"event_id": "a", "type": "click", "ts": day0, "doc_id": "gone"},
        {"event_id": "b", "type": "click", "ts": day0 + 35 * DAY, "doc_id": "kept"},
    ]
    store, _ = run_flow(encode(events), 1)
    assert "feat:doc:gone" not in store.hashes
    assert "feat:doc:kept" in store.hashes


def test_prefix_is_configurable() -> None:
    events = [{"event_id": "a", "type": "click", "ts": NOW - 5, "doc_id": "d1", "query": "q"}]
    store, _ = run_flow(encode(events), 1, FEATURE_PREFIX="feat_v2")
    assert set(store.hashes) == {"feat_v2:doc:d1", f"feat_v2:qd:{_qh('q')}:d1"}


def _qh(query: str) -> str:
    from dataflow.core.keys import query_hash

    return query_hash(query)


def test_abort_and_resume_from_recovery_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    events = make_stream(7, 400, 35, 3)
    values = encode(events)
    uninterrupted, _ = run_flow(values, 25)

    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    items: list[Any] = list(kafka_messages(values))
    for cut in (90, 230, 330):  # crash three times mid-stream
        items.insert(cut, TestingSource.ABORT())
    source = TestingSource(items, batch_size=25)
    store, dead = MemoryStore(), []
    config = Config.from_env({"OPENSEARCH_URL": "", "FEATURE_SHARDS": "7"})
    for _ in range(4):
        flow = build_flow(
            config, source=source, redis_sink=MemoryStoreSink(store), dlq_sink=TestingSink(dead)
        )
        run_main(
            flow,
            epoch_interval=timedelta(seconds=0),
            recovery_config=RecoveryConfig(str(recovery)),
        )
    assert store.hashes == uninterrupted.hashes


# --------------------------------------------------------------------------- fitted priors

FITTED_ENV = {
    "SMOOTHING_DOC_PRIOR": "fitted",
    "SMOOTHING_QD_PRIOR": "fitted",
    "SMOOTHING_AC_PRIOR": "fitted",
    "PRIOR_FIT_SAMPLE": "1",
    "PRIOR_FIT_MIN_KEYS": "5",
    "PRIOR_FIT_MIN_IMPRESSIONS": "3",
}
FITTED = ModelParams(fitted=("doc", "qd", "ac"), fit_sample=1, fit_min_keys=5, fit_min_trials=3)


def rated_stream(seed: int, n: int, days: int, docs: int = 40) -> list[dict[str, Any]]:
    """Impressions of one doc each, clicked at the doc's own rate (drawn from a Beta), and
    autocomplete impressions and selects the same way, over `days` days ending now."""
    rnd = random.Random(seed)
    ctr = [rnd.betavariate(2, 12) for _ in range(docs)]
    start = NOW - days * DAY
    events: list[dict[str, Any]] = []
    for i in range(n):
        ts = start + int(days * DAY * i / n)
        d = rnd.randrange(docs)
        query = QUERIES[d % 3]
        if rnd.random() < 0.7:
            events.append(
                {
                    "event_id": f"i{i}",
                    "type": "search_impression",
                    "ts": ts,
                    "query": query,
                    "doc_ids": [f"doc{d}"],
                }  # fmt: skip
            )
            if rnd.random() < ctr[d]:
                events.append(
                    {
                        "event_id": f"c{i}",
                        "type": "click",
                        "ts": ts + 1,
                        "query": query,
                        "doc_id": f"doc{d}",
                    }  # fmt: skip
                )
        else:
            candidate = f"cand{d}"
            events.append(
                {
                    "event_id": f"a{i}",
                    "type": "ac_impression",
                    "ts": ts,
                    "prefix": "ca",
                    "candidates": [candidate],
                }  # fmt: skip
            )
            if rnd.random() < ctr[d]:
                events.append(
                    {
                        "event_id": f"s{i}",
                        "type": "ac_select",
                        "ts": ts + 1,
                        "prefix": "ca",
                        "candidate": candidate,
                    }  # fmt: skip
                )
    return events


def split_priors(
    store: dict[str, dict[str, str]],
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(feature keys, published priors)."""
    priors = {k: v for k, v in store.items() if k.startswith("feat:prior:")}
    return {k: v for k, v in store.items() if k not in priors}, priors


def test_fitted_priors_are_the_models_and_move_the_rates() -> None:
    events = rated_stream(3, 6_000, 12)
    store, dead = run_flow(encode(events), 200, **FITTED_ENV)
    assert dead == []
    features, published = split_priors(store.hashes)
    expected = expected_store(events, params=FITTED)
    diffs = diff_stores(select_families(features, COUNTED), select_families(expected, COUNTED))
    assert not diffs, "\n".join(diffs[:20])
    # Every family fitted (not the fallback), and the rates differ from the fixed prior's.
    assert {k: v["source"] for k, v in published.items()} == {
        "feat:prior:doc": "fitted", "feat:prior:qd": "fitted", "feat:prior:ac": "fitted"
    }  # fmt: skip
    fixed = expected_store(events)
    key = next(k for k in expected if k.startswith("feat:doc:"))
    assert expected[key]["ctr_30d"] != fixed[key]["ctr_30d"]
    # The published prior is the model's for the day it names.
    by_key: dict[str, list[Any]] = {}
    for spec in FAMILIES:
        if spec.name != "doc":
            continue
        for c in spec.contributions(model_dedup(events), "feat", FITTED):
            by_key.setdefault(c.key, []).append(c)
    day = int(published["feat:prior:doc"]["day"])
    alpha, beta = fitted_prior("doc", by_key, day, "feat", FITTED)
    assert float(published["feat:prior:doc"]["alpha"]) == alpha
    assert float(published["feat:prior:doc"]["beta"]) == beta


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 3_000),
    days=st.integers(0, 40),
    batch_size=st.sampled_from([1, 50, 1000]),
    flush_ms=st.sampled_from(["0", "1000"]),
    shuffle=st.booleans(),
)
def test_fitted_priors_equal_the_model_in_any_batching_and_order(
    seed: int, n: int, days: int, batch_size: int, flush_ms: str, shuffle: bool
) -> None:
    events = rated_stream(seed, n, days)
    if shuffle:  # disorder far beyond the fit's grace: fits are made again when it shows
        random.Random(seed).shuffle(events)
    store, _ = run_flow(
        encode(events), batch_size, FEATURE_FLUSH_INTERVAL_MS=flush_ms, **FITTED_ENV
    )
    features, _ = split_priors(store.hashes)
    expected = expected_store(events, params=FITTED)
    diffs = diff_stores(select_families(features, COUNTED), select_families(expected, COUNTED))
    assert not diffs, "\n".join(diffs[:20])


def test_fitted_priors_through_crashes_give_the_uninterrupted_result(tmp_path: Path) -> None:
    events = rated_stream(11, 3_000, 20)
    values = encode(events)
    uninterrupted, _ = run_flow(values, 100, **FITTED_ENV)
    assert uninterrupted.hashes["feat:prior:doc"]["source"] == "fitted"

    recovery = tmp_path / "recovery"
    recovery.mkdir()
    init_db_dir(recovery, 1)
    items: list[Any] = list(kafka_messages(values))
    for cut in (700, 1_900, 2_600):  # crash three times mid-stream, days apart
        items.insert(cut, TestingSource.ABORT())
    source = TestingSource(items, batch_size=100)
    store: MemoryStore = MemoryStore()
    config = Config.from_env({"OPENSEARCH_URL": "", "FEATURE_SHARDS": "7", **FITTED_ENV})
    for _ in range(4):
        flow = build_flow(
            config, source=source, redis_sink=MemoryStoreSink(store), dlq_sink=TestingSink([])
        )
        run_main(
            flow,
            epoch_interval=timedelta(seconds=0),
            recovery_config=RecoveryConfig(str(recovery)),
        )
    assert store.hashes == uninterrupted.hashes
