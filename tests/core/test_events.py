"""Decoding and validation: every byte string is an event or a rejection with a reason."""

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataflow.core.deadletter import Source, dead_letter
from dataflow.core.events import (
    REASONS,
    AcImpression,
    AcSelect,
    Click,
    Dwell,
    Rejection,
    SearchImpression,
    decode,
)

NOW = 1_790_000_000_000
TOL = 600_000


def d(obj: object) -> object:
    return decode(json.dumps(obj).encode(), now_ms=NOW, future_tolerance_ms=TOL)


def base(**extra: object) -> dict[str, object]:
    event: dict[str, object] = {"event_id": "e1", "ts": NOW - 1000, "session_id": "s"}
    event.update(extra)
    return event


def test_each_type_decodes() -> None:
    assert d(base(type="search_impression", query="q", doc_ids=["a", "b"])) == SearchImpression(
        "e1", NOW - 1000, "s", "q", ("a", "b")
    )
    assert d(base(type="click", query="q", doc_id="a", position=3)) == Click(
        "e1", NOW - 1000, "s", "q", "a", 3
    )
    assert d(base(type="dwell", doc_id="a", dwell_ms=0)) == Dwell("e1", NOW - 1000, "s", "", "a", 0)
    assert d(base(type="ac_impression", prefix="ip", candidates=["x"])) == AcImpression(
        "e1", NOW - 1000, "s", "ip", ("x",)
    )
    assert d(base(type="ac_select", prefix="ip", candidate="x")) == AcSelect(
        "e1", NOW - 1000, "s", "ip", "x"
    )


def test_optional_fields_and_extras() -> None:
    event = d({"event_id": "e", "type": "click", "ts": 5, "doc_id": "a", "query": None, "x": 1})
    assert isinstance(event, Click)
    assert event.session_id is None
    assert event.query == ""
    assert event.position is None


@pytest.mark.parametrize(
    ("value", "reason", "detail_names"),
    [
        (b"", "invalid_json", "empty"),
        (b'{"event_id": "e1", "type": "cli', "invalid_json", "JSON"),
        (b"\xff\xfe{}", "invalid_json", "UTF-8"),
        (b'{"a": NaN}', "invalid_json", "JSON"),
        (b"[1, 2]", "invalid_event", "list"),
        (b'"text"', "invalid_event", "str"),
        (b"{}", "invalid_event", "type"),
        (b'{"type": 3}', "invalid_event", "type"),
        (b'{"type": "purchase"}', "unknown_type", "purchase"),
    ],
)
def test_structural_rejections(value: bytes, reason: str, detail_names: str) -> None:
    result = decode(value, now_ms=NOW, future_tolerance_ms=TOL)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert detail_names in result.detail


def test_oversized_value_is_invalid_event() -> None:
    value = json.dumps(base(type="click", doc_id="a", pad="x" * 70_000)).encode()
    result = decode(value, now_ms=NOW, future_tolerance_ms=TOL)
    assert isinstance(result, Rejection)
    assert (result.reason, "65536" in result.detail) == ("invalid_event", True)


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (base(type="click", doc_id="a", event_id=""), "event_id"),
        (base(type="click", doc_id="a", event_id="x" * 129), "event_id"),
        (base(type="click", doc_id="a", event_id=7), "event_id"),
        (base(type="click", doc_id="a", ts="123"), "ts"),
        (base(type="click", doc_id="a", ts=1.0), "ts"),
        (base(type="click", doc_id="a", ts=True), "ts"),
        (base(type="click", doc_id="a", ts=-1), "ts"),
        (base(type="click", doc_id="a", session_id="s" * 129), "session_id"),
        (base(type="click", doc_id="a", session_id=5), "session_id"),
        (base(type="click", doc_id="a", query="q" * 1025), "query"),
        (base(type="click", doc_id="a", query=["q"]), "query"),
        (base(type="click"), "doc_id"),
        (base(type="click", doc_id=""), "doc_id"),
        (base(type="click", doc_id="é" * 129), "doc_id"),  # 258 UTF-8 bytes
        (base(type="click", doc_id="a\x00b"), "doc_id"),
        (base(type="click", doc_id="a\x85b"), "doc_id"),  # C1 control
        (base(type="click", doc_id="a", position=0), "position"),
        (base(type="click", doc_id="a", position=True), "position"),
        (base(type="dwell", doc_id="a", dwell_ms=-1), "dwell_ms"),
        (base(type="dwell", doc_id="a"), "dwell_ms"),
        (base(type="search_impression", doc_ids=[]), "doc_ids"),
        (base(type="search_impression", doc_ids=["d"] * 1001), "doc_ids"),
        (base(type="search_impression", doc_ids="d1"), "doc_ids"),
        (base(type="search_impression", doc_ids=["ok", "bad\n"]), "doc_ids[1]"),
        (base(type="ac_impression", candidates=["x"]), "prefix"),
        (base(type="ac_impression", prefix="p", candidates=[]), "candidates"),
        (base(type="ac_impression", prefix="p", candidates=["x"] * 51), "candidates"),
        (base(type="ac_impression", prefix="p", candidates=["x", 5]), "candidates[1]"),
        (base(type="ac_select", prefix="p"), "candidate"),
    ],
)
def test_field_rejections_name_the_field(event: dict[str, object], field: str) -> None:
    result = d(event)
    assert isinstance(result, Rejection), result
    assert result.reason == "invalid_event"
    assert result.detail.startswith(field)


def test_doc_id_limits_are_bytes_not_characters() -> None:
    assert isinstance(d(base(type="click", doc_id="é" * 128)), Click)  # 256 bytes
    assert isinstance(d(base(type="click", doc_id="x" * 256)), Click)


def test_future_timestamp() -> None:
    ok = d(base(type="click", doc_id="a", ts=NOW + TOL))
    late_clock = d(base(type="click", doc_id="a", ts=NOW + TOL + 1))
    assert isinstance(ok, Click)
    assert isinstance(late_clock, Rejection)
    assert late_clock.reason == "future_timestamp"
    assert late_clock.detail.startswith("ts")


def test_rule_order_type_before_fields() -> None:
    result = d({"type": "nope", "ts": "bad"})
    assert isinstance(result, Rejection)
    assert result.reason == "unknown_type"


@given(st.binary(max_size=300))
def test_any_bytes_decode_without_raising(value: bytes) -> None:
    result = decode(value, now_ms=NOW, future_tolerance_ms=TOL)
    if isinstance(result, Rejection):
        assert result.reason in REASONS
        assert result.detail


@given(
    st.dictionaries(
        st.sampled_from(["event_id", "type", "ts", "doc_id", "doc_ids", "query", "session_id"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=20),
            st.lists(st.text(max_size=5), max_size=3),
        ),
    )
)
def test_any_json_object_decodes_without_raising(obj: dict[str, object]) -> None:
    result = decode(json.dumps(obj).encode(), now_ms=NOW, future_tolerance_ms=TOL)
    assert isinstance(
        result, Rejection | SearchImpression | Click | Dwell | AcImpression | AcSelect
    )


def test_dead_letter_envelope_utf8_and_binary() -> None:
    letter = dead_letter(Source("t", 2, 41), b'{"x":', "invalid_json", "truncated")
    body = json.loads(letter.value)
    assert body == {
        "reason": "invalid_json",
        "detail": "truncated",
        "topic": "t",
        "partition": 2,
        "offset": 41,
        "payload": '{"x":',
    }
    assert letter.key == b"t:2:41"
    binary = json.loads(dead_letter(Source("t", 0, 1), b"\xff\x00", "invalid_json", "x").value)
    assert "payload" not in binary
    assert base64.b64decode(binary["payload_b64"]) == b"\xff\x00"
