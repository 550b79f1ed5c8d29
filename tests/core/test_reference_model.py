"""Tests of the reference model itself, on small hand-computed examples.

Why: the model is the oracle every pipeline test trusts, so each rule of docs/contract.md
it encodes is pinned here with numbers worked out by hand, edges included (first and last
day of a window, the exact half-life, the dedup horizon to the millisecond).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reference_model import (
    DAY_MS,
    ModelParams,
    Store,
    ac_key,
    acq_key,
    as_redis_strings,
    dedup_flags,
    diff_acq_lower_bound,
    diff_stores,
    doc_key,
    enc,
    expected_store,
    features_at,
    final_clock,
    max_disorder_ms,
    model_dedup,
    q_norm,
    qd_key,
    query_hash,
    select_families,
)

H = 604_800_000
HOUR = 3_600_000
SLOT = 600_000
DAY0 = 20_000 * DAY_MS  # 2024-10-04T00:00Z: "today" in most examples (bc = 20_000)

DOC_FIELDS = {
    "impressions_7d", "clicks_7d", "impressions_30d", "clicks_30d", "long_clicks_30d",
    "popularity_7d", "popularity_30d", "ctr_7d", "ctr_30d",
    "impressions_decay", "clicks_decay", "ctr_decay", "as_of",
    "expected_clicks_30d", "coec_30d",
}  # fmt: skip
QD_FIELDS = DOC_FIELDS - {"popularity_7d", "popularity_30d"}
AC_FIELDS = {
    "impressions_7d", "selects_7d", "impressions_30d", "selects_30d",
    "select_rate_7d", "select_rate_30d", "as_of",
}  # fmt: skip
INT_FIELDS = {
    "impressions_7d", "clicks_7d", "impressions_30d", "clicks_30d", "long_clicks_30d",
    "selects_7d", "selects_30d", "as_of",
}  # fmt: skip

_ids = iter(range(10**9))


def _eid() -> str:
    return f"e{next(_ids)}"


def imp(ts: int, docs: list[str], query: Any = "shoes", eid: str | None = None) -> dict[str, Any]:
    return {"event_id": eid or _eid(), "type": "search_impression", "ts": ts,
            "query": query, "doc_ids": docs}  # fmt: skip


def click(ts: int, doc: str, query: Any = "shoes", eid: str | None = None) -> dict[str, Any]:
    return {"event_id": eid or _eid(), "type": "click", "ts": ts, "query": query,
            "doc_id": doc, "position": 1}  # fmt: skip


def dwell(ts: int, doc: str, ms: int, query: Any = "shoes") -> dict[str, Any]:
    return {"event_id": _eid(), "type": "dwell", "ts": ts, "query": query,
            "doc_id": doc, "dwell_ms": ms}  # fmt: skip


def ac_imp(ts: int, prefix: str, candidates: list[str]) -> dict[str, Any]:
    return {"event_id": _eid(), "type": "ac_impression", "ts": ts, "prefix": prefix,
            "candidates": candidates}  # fmt: skip


def ac_sel(ts: int, prefix: str, candidate: str) -> dict[str, Any]:
    return {"event_id": _eid(), "type": "ac_select", "ts": ts, "prefix": prefix,
            "candidate": candidate}  # fmt: skip


def doc(store: Store, doc_id: str) -> dict[str, int | float]:
    return store[doc_key("feat", doc_id)]


# ------------------------------------------------------------------------ basic values


def test_one_impression_and_one_click_today() -> None:
    events = [imp(DAY0 + HOUR, ["d1"]), click(DAY0 + 2 * HOUR, "d1")]
    store = expected_store(events)
    qd = qd_key("feat", "shoes", "d1")
    assert set(store) == {"feat:doc:d1", qd}
    d = store["feat:doc:d1"]
    assert set(d) == DOC_FIELDS
    assert set(store[qd]) == QD_FIELDS
    for fields in (d, store[qd]):
        assert fields["impressions_7d"] == fields["impressions_30d"] == 1
        assert fields["clicks_7d"] == fields["clicks_30d"] == 1
        assert fields["long_clicks_30d"] == 0
        assert fields["ctr_7d"] == fields["ctr_30d"] == 2 / 22
        assert fields["as_of"] == DAY0 + 2 * HOUR  # the key's newest event
        assert fields["clicks_decay"] == 1.0  # at as_of itself
        assert fields["impressions_decay"] == pytest.approx(2 ** (-HOUR / H), rel=1e-15)
        assert fields["ctr_decay"] == pytest.approx(2 / (2 ** (-HOUR / H) + 21), rel=1e-15)
    assert d["popularity_7d"] == d["popularity_30d"] == 1.0


def test_expected_clicks_follow_the_position_of_the_first_occurrence() -> None:
    params = ModelParams(coec_reference_ctr=(0.5, 0.25, 0.125), coec_prior=2.0)
    events = [
        imp(DAY0, ["a", "b", "a", "c", "d"]),  # a at 1, b at 2, c at 4 and d at 5: the last
        imp(DAY0 + HOUR, ["b"]),
        click(DAY0 + 2 * HOUR, "b"),
    ]
    store = expected_store(events, params=params)
    assert doc(store, "a")["expected_clicks_30d"] == 0.5
    assert doc(store, "b")["expected_clicks_30d"] == 0.25 + 0.5
    assert doc(store, "c")["expected_clicks_30d"] == doc(store, "d")["expected_clicks_30d"] == 0.125
    assert doc(store, "b")["coec_30d"] == (1 + 2.0) / (0.75 + 2.0)
    assert doc(store, "a")["coec_30d"] == 2.0 / 2.5  # shown first, never clicked: below 1
    # Expected clicks are summed in units of 2^-32 (exact in any order), as the pipeline does.
    odd = expected_store([imp(DAY0, ["x"])], params=ModelParams(coec_reference_ctr=(0.1,)))
    assert doc(odd, "x")["expected_clicks_30d"] == round(0.1 * 2**32) / 2**32


def test_value_types_are_int_or_float_by_field() -> None:
    events = [imp(DAY0, ["d"]), click(DAY0, "d"), ac_imp(DAY0, "a", ["ab"])]
    store = expected_store(events)
    assert len(store) == 3
    for fields in store.values():
        for name, value in fields.items():
            if name in INT_FIELDS:
                assert type(value) is int, name
            else:
                assert type(value) is float, name
    # popularity is a float even when it equals an integer count (contract 4.1 Choice)
    assert repr(doc(store, "d")["popularity_30d"]) == "1.0"


def test_key_with_only_a_long_dwell() -> None:
    store = expected_store([dwell(DAY0 + 5, "d", 30_000), dwell(DAY0 + 6, "short", 29_999)])
    assert set(store) == {"feat:doc:d", qd_key("feat", "shoes", "d")}
    for fields in store.values():
        assert fields["long_clicks_30d"] == 1
        assert fields["clicks_30d"] == fields["impressions_30d"] == 0
        assert fields["ctr_30d"] == 1 / 21  # the prior
        assert fields["impressions_decay"] == fields["clicks_decay"] == 0.0
        assert fields["as_of"] == DAY0 + 5
    assert doc(store, "d")["popularity_30d"] == 0.0  # long clicks weigh 0 by default


def test_popularity_weights_over_each_window() -> None:
    params = ModelParams(
        popularity_weight_click=1,
        popularity_weight_impression=0.5,
        popularity_weight_long_click=2.5,
    )
    events = [
        click(DAY0 - 10 * DAY_MS, "d"),  # in 30d only
        imp(DAY0, ["d"]),
        imp(DAY0 + 1, ["d"]),
        click(DAY0 + 2, "d"),
        dwell(DAY0 + 3, "d", 45_000),
    ]
    d = doc(expected_store(events, params=params), "d")
    assert d["popularity_7d"] == 1 * 1 + 0.5 * 2 + 2.5 * 1 == 4.5
    assert d["popularity_30d"] == 1 * 2 + 0.5 * 2 + 2.5 * 1 == 5.5
    assert d["clicks_7d"] == 1
    assert d["clicks_30d"] == 2


def test_smoothing_is_per_family() -> None:
    params = ModelParams(doc_alpha=2, doc_beta=8, qd_alpha=0.5, qd_beta=4.5, ac_alpha=3, ac_beta=7)
    events = [imp(DAY0, ["d"]), click(DAY0, "d"), ac_imp(DAY0, "p", ["c"])]
    store = expected_store(events, params=params)
    assert doc(store, "d")["ctr_30d"] == (1 + 2) / (1 + 2 + 8)
    assert doc(store, "d")["ctr_decay"] == (1 + 2) / (1 + 2 + 8)
    assert store[qd_key("feat", "shoes", "d")]["ctr_7d"] == (1 + 0.5) / (1 + 0.5 + 4.5)
    assert store[ac_key("feat", "p", "c")]["select_rate_7d"] == (0 + 3) / (1 + 3 + 7)


# ---------------------------------------------------------------------------- windows


def test_seven_day_window_edges() -> None:
    events = [
        imp(DAY0 - 7 * DAY_MS + DAY_MS - 1, ["old"]),  # last ms of day bc-7: out of 7d
        imp(DAY0 - 6 * DAY_MS, ["edge"]),  # first ms of day bc-6: in 7d
        imp(DAY0 + 5 * HOUR, ["clock"]),
    ]
    store = expected_store(events)
    assert doc(store, "old")["impressions_7d"] == 0
    assert doc(store, "old")["impressions_30d"] == 1
    assert doc(store, "old")["ctr_7d"] == 1 / 21
    assert doc(store, "old")["ctr_30d"] == 1 / 22
    assert doc(store, "edge")["impressions_7d"] == 1
    assert doc(store, "edge")["impressions_30d"] == 1


def test_thirty_day_window_edges() -> None:
    events = [
        imp(DAY0 - 29 * DAY_MS, ["in"]),  # first ms of day bc-29: in
        imp(DAY0 - 29 * DAY_MS - 1, ["out"]),  # last ms of day bc-30: out
        imp(DAY0 - 29 * DAY_MS - 1, ["mixed"]),
        click(DAY0 - 29 * DAY_MS, "mixed"),
        imp(DAY0 + HOUR, ["clock"]),
    ]
    store = expected_store(events)
    assert "feat:doc:out" not in store
    assert qd_key("feat", "shoes", "out") not in store
    assert doc(store, "in")["impressions_30d"] == 1
    assert doc(store, "in")["impressions_7d"] == 0
    assert doc(store, "in")["as_of"] == DAY0
    mixed = doc(store, "mixed")
    assert mixed["impressions_30d"] == 0  # the impression left the window
    assert mixed["clicks_30d"] == 1
    assert mixed["impressions_decay"] == 0.0  # left the window, so no longer in the sum
    assert mixed["clicks_decay"] == pytest.approx(2 ** (-29 / 7), rel=1e-15)


def test_everything_older_than_thirty_days_gives_an_empty_store() -> None:
    events = [imp(DAY0 - 31 * DAY_MS, ["a"]), ac_sel(DAY0 - 30 * DAY_MS, "p", "c")]
    events.append(dwell(DAY0, "a", 10))  # moves the clock, counts nothing
    assert expected_store(events) == {}


def test_as_of_is_day_start_when_the_keys_newest_event_is_older() -> None:
    events = [imp(DAY0 - 2 * DAY_MS + 5 * HOUR, ["old"]), imp(DAY0 + 3 * HOUR, ["new"])]
    store = expected_store(events)
    assert doc(store, "old")["as_of"] == DAY0
    assert doc(store, "new")["as_of"] == DAY0 + 3 * HOUR
    # the decay is taken to as_of (day start), not to the clock
    assert doc(store, "old")["impressions_decay"] == pytest.approx(
        2 ** (-(2 * DAY_MS - 5 * HOUR) / H), rel=1e-15
    )


def test_as_of_ignores_a_later_event_of_another_key_on_the_same_day() -> None:
    store = expected_store([imp(DAY0 + HOUR, ["a"]), imp(DAY0 + 9 * HOUR, ["b"])])
    assert doc(store, "a")["as_of"] == DAY0 + HOUR


# ------------------------------------------------------------------------------ decay


def test_decayed_weight_exactly_one_half_life_back_is_one_half() -> None:
    now = DAY0 + 10 * HOUR
    events = [imp(now - H, ["d"]), click(now, "d")]
    d = doc(expected_store(events), "d")
    assert d["as_of"] == now
    assert d["impressions_decay"] == 0.5
    assert d["clicks_decay"] == 1.0
    assert d["ctr_decay"] == (1.0 + 1) / (0.5 + 1 + 20)


def test_decay_half_life_measured_from_day_start_as_of() -> None:
    events = [imp(DAY0 - H, ["d"]), imp(DAY0 + 10 * HOUR, ["clock"])]
    d = doc(expected_store(events), "d")
    assert d["as_of"] == DAY0
    assert d["impressions_decay"] == 0.5
    assert d["impressions_7d"] == 0  # day bc-7 is outside the 7-day window


def test_decay_uses_the_configured_half_life() -> None:
    params = ModelParams(half_life_ms=HOUR)
    d = doc(expected_store([imp(DAY0, ["d"]), click(DAY0 + 2 * HOUR, "d")], params=params), "d")
    assert d["impressions_decay"] == 0.25


# ------------------------------------------------------------------------------ dedup


def test_duplicate_within_the_slot_is_dropped_and_first_copy_wins() -> None:
    t = DAY0 + 1_000
    events = [imp(t, ["a"], eid="x"), imp(t + 5_000, ["b"], eid="x")]
    assert dedup_flags(events) == [True, False]
    store = expected_store(events)
    assert doc(store, "a")["impressions_30d"] == 1
    assert "feat:doc:b" not in store


def test_same_id_in_another_slot_is_another_event() -> None:
    events = [imp(DAY0 + SLOT - 1, ["a"], eid="x"), imp(DAY0 + SLOT, ["a"], eid="x")]
    assert dedup_flags(events) == [True, True]
    assert doc(expected_store(events), "a")["impressions_30d"] == 2


def test_same_id_different_type_same_slot_is_a_duplicate() -> None:
    events = [imp(DAY0, ["a"], eid="x"), click(DAY0 + 1, "a", eid="x")]
    assert dedup_flags(events) == [True, False]
    assert doc(expected_store(events), "a")["clicks_30d"] == 0


def test_duplicate_after_its_slot_is_forgotten_counts_again() -> None:
    t0 = DAY0 + 1_000
    horizon = DAY0 + SLOT + DAY_MS  # (slot + 1) * 600_000 + 86_400_000
    events = [
        imp(t0, ["a"], eid="x"),
        imp(horizon, ["clock"]),  # clock == horizon: not passed yet
        imp(t0, ["a"], eid="x"),  # still a duplicate
        imp(horizon + 1, ["clock"]),  # clock passes the horizon: slot forgotten
        imp(t0, ["a"], eid="x"),  # accepted again
        imp(t0 + 1, ["a"], eid="x"),  # slot stays forgotten: accepted again
    ]
    assert dedup_flags(events) == [True, True, False, True, True, True]
    assert [e["ts"] for e in model_dedup(events)] == [t0, horizon, horizon + 1, t0, t0 + 1]
    assert doc(expected_store(events), "a")["impressions_30d"] == 3


def test_event_whose_slot_is_already_forgotten_on_arrival_is_never_a_duplicate() -> None:
    old = DAY0 - 2 * DAY_MS
    events = [imp(DAY0, ["clock"]), imp(old, ["a"], eid="x"), imp(old, ["a"], eid="x")]
    assert dedup_flags(events) == [True, True, True]
    assert doc(expected_store(events), "a")["impressions_30d"] == 2


def test_a_copy_is_judged_by_its_own_partitions_clock() -> None:
    t0 = DAY0 + 1_000
    horizon = DAY0 + SLOT + DAY_MS
    events = [
        imp(t0, ["a"], eid="x"),  # partition 0
        imp(horizon + 1, ["clock"]),  # partition 1: its clock passes the slot's horizon
        imp(t0 + 5, ["a"], eid="x"),  # partition 0, whose clock has not: still a duplicate
        imp(horizon + 1, ["clock"], eid="y"),  # partition 0 passes the horizon too
        imp(t0 + 6, ["a"], eid="x"),  # now forgotten for partition 0: counts again
    ]
    assert dedup_flags(events, partitions=[0, 1, 0, 0, 0]) == [True, True, False, True, True]
    # One partition: the stream's clock, which passed the horizon at the second event.
    assert dedup_flags(events) == [True, True, True, True, True]
    store = expected_store(events, partitions=[0, 1, 0, 0, 0])
    assert doc(store, "a")["impressions_30d"] == 2
    with pytest.raises(ValueError, match="2 partitions for 5 events"):
        dedup_flags(events, partitions=[0, 1])


def test_dedup_horizon_and_slot_are_configurable() -> None:
    params = ModelParams(dedup_slot_ms=1_000, dedup_horizon_ms=10_000)
    events = [imp(DAY0, ["a"], eid="x"), imp(DAY0 + 11_001, ["b"]), imp(DAY0 + 1, ["a"], eid="x")]
    assert dedup_flags(events, params=params) == [True, True, True]
    assert dedup_flags(events) == [True, True, False]


def test_duplicates_still_move_the_clock_but_not_as_of() -> None:
    events = [imp(DAY0 + 10, ["a"], eid="x"), imp(DAY0 + 500, ["a"], eid="x")]
    assert final_clock(events) == DAY0 + 500
    assert doc(expected_store(events), "a")["as_of"] == DAY0 + 10


# ---------------------------------------------------------------- counting and keys


def test_impression_counts_each_distinct_doc_once() -> None:
    store = expected_store([imp(DAY0, ["a", "b", "a", "A", "b"])])
    for d in ("a", "b", "A"):  # doc ids are case-sensitive
        assert doc(store, d)["impressions_30d"] == 1
        assert store[qd_key("feat", "shoes", d)]["impressions_30d"] == 1
    assert len(store) == 6


@pytest.mark.parametrize("query", ["", "   ", None, "\u3000\t", "missing"])
def test_empty_normalised_query_gives_no_query_doc_key(query: Any) -> None:
    events = [imp(DAY0, ["d"], query=query), click(DAY0 + 1, "d", query=query)]
    if query == "missing":
        for event in events:
            del event["query"]
    store = expected_store(events)
    assert set(store) == {"feat:doc:d"}
    assert doc(store, "d")["clicks_30d"] == 1


def test_unicode_queries_share_one_query_hash() -> None:
    assert q_norm("ＩＰｈｏｎｅ  Case") == "iphone case"
    assert q_norm("Straße") == "strasse"  # casefold, not lower
    assert query_hash("ＩＰｈｏｎｅ  Case") == query_hash("iphone case") == "4be0417c061d0252"
    events = [
        imp(DAY0, ["d"], query="ＩＰｈｏｎｅ  Case"),
        imp(DAY0 + 1, ["d"], query=" iphone case "),
        click(DAY0 + 2, "d", query="IPHONE\tCASE"),
        imp(DAY0 + 3, ["d"], query="iphone cases"),
    ]
    store = expected_store(events)
    key = "feat:qd:4be0417c061d0252:d"
    assert store[key]["impressions_30d"] == 2
    assert store[key]["clicks_30d"] == 1
    assert len(select_families(store, ["qd"])) == 2


def test_key_components_are_percent_encoded() -> None:
    assert enc("a:b%c") == "a%3Ab%25c"
    assert doc_key("feat", "a:b%c") == "feat:doc:a%3Ab%25c"
    assert doc_key("feat", "x/y z") == "feat:doc:x%2Fy%20z"
    assert doc_key("feat", "é") == "feat:doc:%C3%A9"
    assert doc_key("feat", "Doc_1.v-2~") == "feat:doc:Doc_1.v-2~"
    store = expected_store([imp(DAY0, ["a:b%c"], query="Shoes")])
    assert set(store) == {"feat:doc:a%3Ab%25c", "feat:qd:85e8e821bb46b71c:a%3Ab%25c"}


def test_custom_feature_prefix() -> None:
    store = expected_store([imp(DAY0, ["d"]), ac_sel(DAY0, "p", "c")], prefix="x:y")
    assert set(store) == {
        "x:y:doc:d",
        f"x:y:qd:{query_hash('shoes')}:d",
        "x:y:ac:p:c",
        f"x:y:acq:{query_hash('c')}",
    }


def test_autocomplete_counts_distinct_normalised_candidates() -> None:
    events = [
        ac_imp(DAY0, " IP", ["iPhone", "iphone ", "ＩＰａｄ", "   ", "a:b"]),
        ac_sel(DAY0 + 1, "ip", "IPHONE"),
    ]
    store = expected_store(events)
    assert set(select_families(store, ["ac"])) == {
        "feat:ac:ip:iphone",
        "feat:ac:ip:ipad",
        "feat:ac:ip:a%3Ab",
    }
    assert set(select_families(store, ["acq"])) == {acq_key("feat", "iphone")}  # the select
    phone = store["feat:ac:ip:iphone"]
    assert set(phone) == AC_FIELDS
    assert phone["impressions_7d"] == phone["impressions_30d"] == 1
    assert phone["selects_7d"] == phone["selects_30d"] == 1
    assert phone["select_rate_7d"] == phone["select_rate_30d"] == 2 / 22
    assert phone["as_of"] == DAY0 + 1
    pad = store["feat:ac:ip:ipad"]
    assert pad["selects_30d"] == 0
    assert pad["select_rate_30d"] == 1 / 22
    assert pad["as_of"] == DAY0


def test_autocomplete_with_empty_prefix_or_candidate_gives_nothing() -> None:
    events = [ac_imp(DAY0, "  ", ["x"]), ac_sel(DAY0, "", "x"), ac_sel(DAY0, "p", " ")]
    store = expected_store(events)
    assert select_families(store, ["ac"]) == {}
    # The link is keyed by the candidate alone: an empty typed prefix still selects "x",
    # while an empty candidate has no acq key at all (contract 4.4 Choice).
    assert set(store) == {acq_key("feat", "x")}
    assert store[acq_key("feat", "x")]["selects_30d"] == 1


def test_autocomplete_select_without_impression_and_window() -> None:
    events = [ac_sel(DAY0 - 8 * DAY_MS, "p", "c"), ac_imp(DAY0 + HOUR, "q", ["r"])]
    fields = expected_store(events)[ac_key("feat", "p", "c")]
    assert fields["selects_7d"] == 0
    assert fields["selects_30d"] == 1
    assert fields["select_rate_30d"] == 2 / 21
    assert fields["as_of"] == DAY0


# ------------------------------------------------------------------ small API contracts


def test_empty_stream() -> None:
    assert expected_store([]) == {}
    assert model_dedup([]) == []
    with pytest.raises(ValueError, match="empty"):
        final_clock([])


def test_expected_store_accepts_a_one_shot_iterator() -> None:
    events = [imp(DAY0, ["a"], eid="x"), imp(DAY0, ["a"], eid="x")]
    assert expected_store(iter(events)) == expected_store(events)
    assert doc(expected_store(iter(events)), "a")["impressions_30d"] == 1


def test_features_at_rejects_an_event_after_the_clock() -> None:
    with pytest.raises(ValueError, match="after the clock"):
        features_at([imp(DAY0 + 1, ["a"])], DAY0)


def test_features_at_a_later_clock_restates_and_expires() -> None:
    accepted = [imp(DAY0, ["a"]), imp(DAY0 + 20 * DAY_MS, ["b"])]
    later = features_at(accepted, DAY0 + 29 * DAY_MS + 1)
    assert doc(later, "a")["as_of"] == DAY0 + 29 * DAY_MS
    assert doc(later, "a")["impressions_decay"] == pytest.approx(2 ** (-29 / 7), rel=1e-15)
    assert "feat:doc:a" not in features_at(accepted, DAY0 + 30 * DAY_MS)


def test_as_redis_strings() -> None:
    got = as_redis_strings({"k": {"n": 3, "f": 0.1, "g": 3.0, "h": 2 / 22}})
    assert got == {"k": {"n": "3", "f": "0.1", "g": "3.0", "h": "0.09090909090909091"}}
    with pytest.raises(TypeError):
        as_redis_strings({"k": {"b": True}})


# ----------------------------------------------------------------------- diff_stores


def _sample() -> Store:
    return expected_store([imp(DAY0, ["d"]), click(DAY0 + HOUR, "d"), ac_imp(DAY0, "p", ["c"])])


def test_diff_stores_equal_for_the_written_form_str_and_bytes() -> None:
    expected = _sample()
    written = as_redis_strings(expected)
    assert diff_stores(written, expected) == []
    as_bytes = {
        k.encode(): {f.encode(): v.encode() for f, v in fields.items()}
        for k, fields in written.items()
    }
    assert diff_stores(as_bytes, expected) == []


def test_diff_stores_reports_keys_and_fields() -> None:
    expected = _sample()
    actual = as_redis_strings(expected)
    qd = qd_key("feat", "shoes", "d")
    del actual[qd]
    actual["feat:doc:ghost"] = {"as_of": "1"}
    del actual["feat:doc:d"]["ctr_7d"]
    actual["feat:doc:d"]["bogus"] = "1"
    problems = diff_stores(actual, expected)
    assert len(problems) == 4
    assert any("missing key" in p and qd in p for p in problems)
    assert any("extra key" in p and "ghost" in p for p in problems)
    assert any("missing field 'ctr_7d'" in p for p in problems)
    assert any("extra field 'bogus'" in p for p in problems)


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("impressions_30d", "2", False),
        ("impressions_30d", "1.0", False),  # ints are decimal strings
        ("as_of", str(DAY0 + HOUR + 1), False),
        ("as_of", str(DAY0 + HOUR), True),
        ("popularity_30d", "1", False),  # floats are repr(float)
        ("popularity_30d", "1.0", True),
        ("ctr_7d", repr(2 / 22 * (1 + 5e-10)), True),
        ("ctr_7d", repr(2 / 22 * (1 + 5e-9)), False),
        ("ctr_7d", "abc", False),
        ("clicks_decay", repr(1.0 - 2e-10), True),
        ("clicks_decay", repr(1.0 - 2e-9), False),
    ],
)
def test_diff_stores_value_rules(field: str, value: str, ok: bool) -> None:
    expected = _sample()
    actual = as_redis_strings(expected)
    actual["feat:doc:d"][field] = value
    problems = diff_stores(actual, expected)
    assert (problems == []) is ok, problems
    if not ok:
        assert len(problems) == 1 and field in problems[0]


def test_diff_stores_absolute_tolerance_near_zero() -> None:
    expected = {"k": {"x": 0.0}}
    assert diff_stores({"k": {"x": "1e-13"}}, expected) == []
    assert diff_stores({"k": {"x": "1e-11"}}, expected) != []
    assert diff_stores({"k": {"x": "0.0"}}, {"k": {"x": 1e-300}}, check_float_repr=True) == []


def test_select_families() -> None:
    store = _sample()
    assert set(select_families(store, ["ac"])) == {"feat:ac:p:c"}
    assert set(select_families(store, ["doc", "qd"])) == set(store) - {"feat:ac:p:c"}


# -------------------------------------------------------------------------- properties


def _random_stream(rng: random.Random, n: int) -> list[dict[str, Any]]:
    docs = [f"d{i}" for i in range(8)]
    queries = ["shoes", "SHOES ", "", "red shoes", None]
    out: list[dict[str, Any]] = []
    for _ in range(n):
        ts = DAY0 + rng.randrange(-35 * DAY_MS, DAY_MS)
        kind = rng.randrange(5)
        if kind == 0:
            out.append(imp(ts, rng.sample(docs, rng.randint(1, 4)), query=rng.choice(queries)))
        elif kind == 1:
            out.append(click(ts, rng.choice(docs), query=rng.choice(queries)))
        elif kind == 2:
            out.append(dwell(ts, rng.choice(docs), rng.choice([0, 29_999, 30_000, 90_000])))
        elif kind == 3:
            out.append(ac_imp(ts, rng.choice(["a", "A", " "]), rng.sample(["ab", "Ab", "ac"], 2)))
        else:
            out.append(ac_sel(ts, rng.choice(["a", "b"]), rng.choice(["ab", "ac"])))
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_without_duplicates_order_does_not_matter(seed: int) -> None:
    rng = random.Random(seed)
    events = _random_stream(rng, 60)
    shuffled = events[:]
    rng.shuffle(shuffled)
    assert expected_store(shuffled) == expected_store(events)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_immediate_redelivery_in_time_order_changes_nothing(seed: int) -> None:
    # In time order the clock never runs 24 h ahead of an event, so its slot is remembered
    # when the copy arrives (out of order, old copies are accepted: see the unit test above).
    rng = random.Random(seed)
    events = sorted(_random_stream(rng, 60), key=lambda e: int(e["ts"]))
    with_copies = [copy for e in events for copy in (e, dict(e))]
    assert expected_store(with_copies) == expected_store(events)
    assert len(model_dedup(with_copies)) == len(events)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_counts_never_exceed_the_brute_totals(seed: int) -> None:
    rng = random.Random(seed)
    events = _random_stream(rng, 80)
    store = expected_store(events)
    total_clicks = sum(1 for e in events if e["type"] == "click")
    for key, fields in select_families(store, ["doc"]).items():
        assert fields["clicks_7d"] <= fields["clicks_30d"] <= total_clicks, key
        assert 0 < fields["ctr_30d"] < 1
        clock = final_clock(events)
        assert (clock // DAY_MS) * DAY_MS <= fields["as_of"] <= clock


# ------------------------------------------------------------- autocomplete -> search

ACQ_FIELDS = {
    "selects_7d", "searched_7d", "clicked_7d", "selects_30d", "searched_30d",
    "clicked_30d", "search_rate_30d", "click_rate_30d", "as_of",
}  # fmt: skip


def s_sel(ts: int, candidate: str, session: Any = "s1", prefix: str = "ip") -> dict[str, Any]:
    event = ac_sel(ts, prefix, candidate)
    if session != "missing":
        event["session_id"] = session
    return event


def s_imp(ts: int, query: Any, session: Any = "s1") -> dict[str, Any]:
    return {**imp(ts, ["d"], query=query), "session_id": session}


def s_click(ts: int, query: Any, session: Any = "s1") -> dict[str, Any]:
    return {**click(ts, "d", query=query), "session_id": session}


def acq(store: Store, candidate: str) -> tuple[Any, Any, Any]:
    fields = store[acq_key("feat", candidate)]
    assert set(fields) == ACQ_FIELDS
    return fields["selects_30d"], fields["searched_30d"], fields["clicked_30d"]


@pytest.mark.parametrize(
    ("offset", "searched"),
    [(-1, 0), (0, 1), (59_000, 1), (60_000, 1), (60_001, 0), (61_000, 0)],
)
def test_acq_search_window(offset: int, searched: int) -> None:
    events = [s_sel(DAY0, "iphone"), s_imp(DAY0 + offset, "iphone")]
    assert acq(expected_store(events), "iphone") == (1, searched, 0)


@pytest.mark.parametrize(
    ("minutes_ms", "clicked"),
    [(-1, 0), (0, 1), (29 * 60_000, 1), (30 * 60_000, 1), (30 * 60_000 + 1, 0), (31 * 60_000, 0)],
)
def test_acq_click_window(minutes_ms: int, clicked: int) -> None:
    events = [s_sel(DAY0, "iphone"), s_click(DAY0 + minutes_ms, "iphone")]
    assert acq(expected_store(events), "iphone") == (1, 0, clicked)


def test_acq_fields_and_rates() -> None:
    events = [
        s_sel(DAY0, "a"),
        s_imp(DAY0 + 1_000, "a"),
        s_click(DAY0 + 60_000, "a"),
        s_sel(DAY0 - 10 * DAY_MS, "a", session="s2"),  # in 30 days, not in 7
        s_imp(DAY0 - 10 * DAY_MS + 5, "a", session="s2"),
    ]
    fields = expected_store(events)[acq_key("feat", "a")]
    assert fields == {
        "selects_7d": 1, "searched_7d": 1, "clicked_7d": 1,
        "selects_30d": 2, "searched_30d": 2, "clicked_30d": 1,
        "search_rate_30d": 3 / 23, "click_rate_30d": 2 / 23,
        # The newest *select* (DAY0), not the click at DAY0 + 60 s: the links are credited
        # at their select's ts (Choice, docs/contract.md 4.4).
        "as_of": DAY0,
    }  # fmt: skip


def test_acq_is_bucketed_by_the_select_and_as_of_follows_the_selects() -> None:
    midnight = DAY0 + DAY_MS
    events = [s_sel(midnight - 30_000, "a"), s_imp(midnight + 10_000, "a")]
    fields = expected_store(events)[acq_key("feat", "a")]
    # The clock (the search) is on the next day, so as_of is that day's start; the
    # searched count sits on the select's day, like the select.
    assert fields["as_of"] == midnight
    assert (fields["selects_30d"], fields["searched_30d"]) == (1, 1)
    later = features_at(model_dedup(events), midnight + 5 * DAY_MS)
    assert later[acq_key("feat", "a")]["searched_7d"] == 1  # select's day: 6 days ago
    later = features_at(model_dedup(events), midnight + 6 * DAY_MS)
    assert later[acq_key("feat", "a")]["searched_7d"] == 0  # select's day left; search's not


def test_acq_each_select_counts_once_each_way() -> None:
    events = [s_sel(DAY0, "a")]
    events += [s_imp(DAY0 + i, "a") for i in range(3)]
    events += [s_click(DAY0 + i, "a") for i in range(3)]
    assert acq(expected_store(events), "a") == (1, 1, 1)


def test_acq_two_selects_of_one_candidate_in_one_session() -> None:
    both = [s_sel(DAY0, "a"), s_sel(DAY0 + 30_000, "a"), s_imp(DAY0 + 50_000, "a")]
    assert acq(expected_store(both), "a") == (2, 2, 0)  # one search serves both
    one = [s_sel(DAY0, "a"), s_sel(DAY0 + 30_000, "a"), s_imp(DAY0 + 70_000, "a")]
    assert acq(expected_store(one), "a") == (2, 1, 0)


@pytest.mark.parametrize("session", ["missing", None, ""])
def test_acq_select_without_session_counts_but_never_links(session: Any) -> None:
    events = [s_sel(DAY0, "a", session), s_imp(DAY0 + 1, "a", session)]
    events.append(s_click(DAY0 + 2, "a", session))
    if session == "missing":
        for event in events:
            event.pop("session_id", None)
    assert acq(expected_store(events), "a") == (1, 0, 0)


def test_acq_links_only_within_the_exact_session_id() -> None:
    events = [s_sel(DAY0, "a", "s1"), s_imp(DAY0 + 1, "a", "S1"), s_click(DAY0 + 2, "a", "s2")]
    assert acq(expected_store(events), "a") == (1, 0, 0)


def test_acq_unicode_and_case_variants_share_the_key_and_link() -> None:
    events = [
        s_sel(DAY0, "ＩＰｈｏｎｅ  Case"),
        s_imp(DAY0 + 1_000, " iphone case "),
        s_click(DAY0 + 2_000, "IPHONE\tCASE"),
        s_sel(DAY0 + 3_000, "Straße"),
        s_imp(DAY0 + 4_000, "STRASSE"),
        s_imp(DAY0 + 5_000, "iphone cases"),  # a different query
    ]
    store = expected_store(events)
    assert acq_key("feat", "ＩＰｈｏｎｅ  Case") == "feat:acq:4be0417c061d0252"
    assert acq(store, "iphone case") == (1, 1, 1)
    assert acq(store, "strasse") == (1, 1, 0)
    assert len(select_families(store, ["acq"])) == 2


def test_acq_same_candidate_under_different_prefixes_is_one_key() -> None:
    events = [
        s_sel(DAY0, "iPhone", prefix="i"),
        s_sel(DAY0 + 1_000, "iphone", prefix="IPH"),
        s_imp(DAY0 + 10_000, "iphone"),
    ]
    store = expected_store(events)
    assert set(select_families(store, ["acq"])) == {acq_key("feat", "iphone")}
    assert acq(store, "iphone") == (2, 2, 0)
    assert len(select_families(store, ["ac"])) == 2  # the ac family keeps them apart


def test_acq_empty_candidate_has_no_key_and_dwell_is_not_a_click() -> None:
    events = [s_sel(DAY0, "  "), s_imp(DAY0 + 1, "")]
    assert select_families(expected_store(events), ["acq"]) == {}
    events = [s_sel(DAY0, "a"), {**dwell(DAY0 + 1, "d", 60_000, query="a"), "session_id": "s1"}]
    assert acq(expected_store(events), "a") == (1, 0, 0)


def test_acq_stream_order_is_irrelevant_to_the_model() -> None:
    events = [s_click(DAY0 + 20 * 60_000, "a"), s_imp(DAY0 + 30_000, "a"), s_sel(DAY0, "a")]
    assert acq(expected_store(events), "a") == (1, 1, 1)


def test_max_disorder() -> None:
    assert max_disorder_ms([]) == 0
    assert max_disorder_ms([imp(DAY0, ["a"]), imp(DAY0 + 5, ["a"])]) == 0
    events = [
        imp(DAY0 + 100, ["a"]),
        imp(DAY0, ["a"]),
        imp(DAY0 + 200, ["a"]),
        imp(DAY0 + 150, ["a"]),
    ]
    assert max_disorder_ms(events) == 100


def test_diff_acq_lower_bound() -> None:
    events = [s_sel(DAY0, "a"), s_imp(DAY0 + 1, "a"), s_click(DAY0 + 2, "a"), imp(DAY0, ["d"])]
    expected = expected_store(events)
    exact = as_redis_strings(expected)
    assert diff_acq_lower_bound(exact, expected) == []
    key = acq_key("feat", "a")
    missed = {key: {**exact[key], "searched_30d": "0", "searched_7d": "0",
                    "search_rate_30d": repr(1 / 22)}}  # fmt: skip
    assert diff_acq_lower_bound(missed, expected) == []  # other families are ignored
    invented = {key: {**exact[key], "selects_30d": "2"}}
    problems = diff_acq_lower_bound(invented, expected)
    assert any("selects_30d" in p for p in problems)
    assert any("search_rate_30d" in p for p in problems)  # no longer the ratio written
    too_many = {key: {**exact[key], "clicked_7d": "2"}}
    assert any("clicked_7d" in p for p in diff_acq_lower_bound(too_many, expected))
    assert diff_acq_lower_bound({}, expected) == [f"missing key {key!r}"]
