"""The compiled state core against its pure-Python reference: the same states, the same
field text and the same RESP bytes, on any input (dataflow.core.native)."""

from __future__ import annotations

import gc
import json
import pickle
import struct
from array import array
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow import resp
from dataflow.config import Config
from dataflow.core import counters, events, native, windows
from dataflow.core.events import (
    EVENT_TYPES,
    AcImpression,
    AcSelect,
    Click,
    Dwell,
    Event,
    Rejection,
    SearchImpression,
    decode,
)
from dataflow.core.families import (
    AC,
    ACQ,
    DEFAULT_REFERENCE_CTR,
    DOC,
    EXPECTED_SCALE,
    LAYOUT_TABLE,
    LAYOUTS,
    QD,
    FeatureParams,
    Update,
    expected_units,
    fields_for,
    params_table,
)
from dataflow.core.shard import FeatureShard, ShardItem
from dataflow.core.smoothing import Prior
from dataflow.errors import ConfigError
from dataflow.flow import FanOut, shard_of
from dataflow.sinks.redis import EVERY_KEY
from tests.fakes import layout_4_states

BUILT = native.BUILT
DAY = windows.DAY_MS
BASE = 20_000 * DAY


def test_the_extension_is_built() -> None:
    """`pip install .` builds it (setup.py); a silent fall-back would only run slower."""
    assert BUILT is not None
    assert native.core is BUILT


def test_its_constants_are_the_contracts() -> None:
    assert BUILT is not None
    contract = {
        "DAY_MS": windows.DAY_MS,
        "HALF_LIFE_MS": windows.HALF_LIFE_MS,
        "WEIGHT_SCALE": windows.WEIGHT_SCALE,
        "EXPECTED_SCALE": float(EXPECTED_SCALE),
        "WINDOW_7D": windows.WINDOW_7D,
        "WINDOW_30D": windows.WINDOW_30D,
        "RETENTION_DAYS": windows.RETENTION_DAYS,
        "MAX_EVENT_ID_CHARS": events.MAX_EVENT_ID_CHARS,
        "MAX_SESSION_ID_CHARS": events.MAX_SESSION_ID_CHARS,
        "MAX_TEXT_CHARS": events.MAX_TEXT_CHARS,
        "MAX_DOC_ID_BYTES": events.MAX_DOC_ID_BYTES,
        "MAX_DOC_IDS": events.MAX_DOC_IDS,
        "MAX_CANDIDATES": events.MAX_CANDIDATES,
    }
    assert contract == BUILT.CONSTANTS


@contextmanager
def pure_python() -> Iterator[None]:
    native.use(False)
    try:
        yield
    finally:
        native.use(True)


# --- updates -----------------------------------------------------------------------------

SUFFIXES = {
    DOC: ["doc:a", "doc:b", "doc:%C3%A9"],
    QD: ["qd:1:a", "qd:2:a"],
    AC: ["ac:se:search", "ac:s:sea"],
    ACQ: ["acq:1:x"],
}


def counts_of(family: int) -> st.SearchStrategy[tuple[int, ...]]:
    n = LAYOUTS[family].counts
    small = st.integers(min_value=0, max_value=3)
    big = st.sampled_from([0, 1, expected_units(0.3), 2**40, 2**62])
    return st.tuples(*[st.one_of(small, big) for _ in range(n)])


@st.composite
def an_update(draw: st.DrawFn) -> Update:
    family = draw(st.sampled_from([DOC, QD, AC, ACQ]))
    suffix = draw(st.sampled_from(SUFFIXES[family]))
    # ~45 days around BASE, any millisecond: days out of order, late ones, day edges.
    ts = BASE + draw(
        st.one_of(
            st.integers(min_value=-5 * DAY, max_value=40 * DAY),
            st.sampled_from([0, DAY - 1, DAY, 31 * DAY, 31 * DAY - 1]),
        )
    )
    return family, suffix, ts, draw(counts_of(family))


items_strategy = st.lists(
    st.one_of(
        st.lists(an_update(), max_size=12),
        st.integers(min_value=BASE - DAY, max_value=BASE + 45 * DAY),  # clock readings
    ),
    max_size=10,
)


def run_shard(items: list[ShardItem], params: FeatureParams) -> tuple[object, ...]:
    """Step and flush: everything the shard shows (states as bytes)."""
    shard = FeatureShard(params)
    outcome: list[object] = []
    for item in items:
        try:
            result = shard.step([item])
        except OverflowError:
            return ("overflow",)  # the flow stops: what is left half-applied does not count
        outcome.append(result.late_updates)
        outcome.append(sorted(shard.dirty))
        outcome.append(sorted(shard.created))
        flushed = shard.flush()
        outcome.append([(s, None if f is None else list(f.items())) for s, f in flushed.writes])
        outcome.append(flushed.fresh)
    outcome.append(shard.clock)
    outcome.append({s: counters.to_bytes(v) for s, v in shard.keys.items()})
    return tuple(outcome)


priors_strategy = st.builds(
    Prior,
    st.floats(min_value=1e-4, max_value=1e4),
    st.floats(min_value=1e-4, max_value=1e4),
)
params_strategy = st.builds(
    FeatureParams,
    doc=priors_strategy,
    qd=priors_strategy,
    ac=priors_strategy,
    acq=priors_strategy,
    weight_click=st.floats(min_value=0, max_value=10),
    weight_impression=st.floats(min_value=0, max_value=1),
    weight_long_click=st.floats(min_value=0, max_value=10),
    coec_prior=st.floats(min_value=1e-3, max_value=1e3),
)


@settings(max_examples=300, deadline=None)
@given(items_strategy, params_strategy)
def test_a_shard_steps_and_flushes_the_same_compiled_or_not(
    items: list[ShardItem], params: FeatureParams
) -> None:
    compiled = run_shard(items, params)
    with pure_python():
        reference = run_shard(items, params)
    assert compiled == reference


PARAMS_DEFAULT = FeatureParams()


def test_compiled_key_states_are_not_walked_by_the_cyclic_collector() -> None:
    """A key's state refers to nothing, so the compiled core keeps it out of the collector's
    lists: with millions of keys held, collections cost what the event batches allocate."""
    assert BUILT is not None
    shard = FeatureShard(PARAMS_DEFAULT)
    shard.step([[(DOC, "doc:a", BASE, (1, 0, 0, 0)), (QD, "qd:h:a", BASE, (1, 0, 0, 0))]])
    shard.step([[(DOC, "doc:a", BASE + DAY, (0, 1, 0, 0))]])  # a second day: a record inserted
    new = BUILT.add(None, LAYOUT_TABLE, AC, BASE, (1, 0))
    restored = BUILT.unpack_states(BUILT.pack_states(shard.keys))
    states = [*shard.keys.values(), new, *restored.values()]
    assert len(states) == 5
    assert not any(gc.is_tracked(state) for state in states)
    assert gc.is_tracked(counters.add(None, LAYOUTS[AC], BASE, (1, 0)))  # the reference's


@settings(max_examples=300, deadline=None)
@given(st.lists(an_update(), min_size=1, max_size=30))
def test_add_gives_the_references_state_byte_for_byte(updates: list[Update]) -> None:
    assert BUILT is not None
    compiled: dict[str, array[int]] = {}
    reference: dict[str, array[int]] = {}
    for family, suffix, ts, counts in updates:
        layout = LAYOUTS[family]
        try:
            expected = counters.add(reference.get(suffix), layout, ts, counts)
        except OverflowError:
            with pytest.raises(OverflowError):
                BUILT.add(compiled.get(suffix), LAYOUT_TABLE, family, ts, counts)
            return
        reference[suffix] = expected
        compiled[suffix] = BUILT.add(compiled.get(suffix), LAYOUT_TABLE, family, ts, counts)
        assert compiled[suffix].tobytes() == reference[suffix].tobytes()


# --- rendering ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(an_update(), min_size=1, max_size=30),
    st.integers(min_value=BASE, max_value=BASE + 70 * DAY),
    params_strategy,
)
def test_fields_are_the_references_text_in_the_references_order(
    updates: list[Update], as_of: int, params: FeatureParams
) -> None:
    assert BUILT is not None
    states: dict[str, array[int]] = {}
    for family, suffix, ts, counts in updates:
        try:
            states[suffix] = counters.add(states.get(suffix), LAYOUTS[family], ts, counts)
        except OverflowError:
            break
    family_by_suffix = {suffix: family for family, suffix, _, _ in updates}
    table = params_table(params)
    for suffix, state in states.items():
        family = family_by_suffix[suffix]
        expected = fields_for(family, state, as_of, params)
        got = BUILT.fields_for(
            family,
            state,
            as_of,
            LAYOUT_TABLE,
            table,
            partial(fields_for, params=params),
        )
        assert list(got.items()) == list(expected.items())
        # What goes to Redis: the same bytes as the reference's dict packed by the reference.
        packed = BUILT.pack_writes("feat", [(suffix, got)], EVERY_KEY, 60)
        assert packed == resp.pack_writes("feat", [(suffix, expected)], EVERY_KEY, 60)
        assert pickle.loads(pickle.dumps(got)) == expected


def test_rendered_fields_read_as_the_dict_they_equal() -> None:
    """`Fields` is what the flush hands to the sinks: a read-only mapping of the reference's
    names and text, in its order; it pickles as that dict."""
    assert BUILT is not None
    state = counters.add(None, LAYOUTS[DOC], BASE, (3, 1, 0, expected_units(0.5)))
    params = FeatureParams()
    expected = fields_for(DOC, state, BASE, params)
    got = BUILT.fields_for(DOC, state, BASE, LAYOUT_TABLE, params_table(params), fields_for)
    assert type(got) is BUILT.Fields
    assert isinstance(got, Mapping)
    assert len(got) == len(expected) == 15
    assert list(got) == list(got.keys()) == list(expected)
    assert got.values() == list(expected.values())
    assert got["impressions_7d"] == "3"
    assert got["as_of"] == str(BASE)
    assert "clicks_7d" in got
    assert "selects_7d" not in got
    assert 7 not in got
    assert "\ud800" not in got  # no UTF-8 form: absent, as from a dict
    assert got.get("\ud800") is None
    with pytest.raises(KeyError):
        got["selects_7d"]
    assert got.get("selects_7d") is None
    assert got.get("selects_7d", "0") == "0"
    assert got.get("clicks_7d") == "1"
    assert dict(got) == expected
    assert got == expected
    assert expected == got
    assert got != {**expected, "as_of": "0"}
    assert got != {k: v for k, v in expected.items() if k != "as_of"}
    assert got != list(expected.items())
    twin = BUILT.fields_for(DOC, state, BASE, LAYOUT_TABLE, params_table(params), fields_for)
    assert got == twin
    assert got != BUILT.fields_for(
        DOC, state, BASE + DAY, LAYOUT_TABLE, params_table(params), fields_for
    )
    assert repr(got) == f"Fields({expected!r})"
    assert type(pickle.loads(pickle.dumps(got))) is dict
    with pytest.raises(TypeError):
        hash(got)
    with pytest.raises(TypeError):
        got["as_of"] = "0"  # type: ignore[index]
    pairs = b"".join(
        f"${len(k)}\r\n{k}\r\n${len(v)}\r\n{v}\r\n".encode() for k, v in expected.items()
    )
    assert got.resp() == pairs


def test_a_key_whose_sums_overflow_an_int64_is_rendered_by_the_reference() -> None:
    assert BUILT is not None
    # Expected clicks (not decayed) of 2^62 units a day: 2^64 in 30 days.
    state = counters.add(None, LAYOUTS[DOC], BASE, (1, 0, 0, 2**62))
    for day in (1, 2, 3):
        counters.add(state, LAYOUTS[DOC], BASE + day * DAY, (1, 0, 0, 2**62))
    as_of = BASE + 4 * DAY
    params = FeatureParams()
    expected = fields_for(DOC, state, as_of, params)
    assert float(expected["expected_clicks_30d"]) == 2.0**32  # 2^64 units: past an int64
    calls: list[int] = []

    def reference(family: int, state: array[int], as_of: int) -> dict[str, str]:
        calls.append(family)
        return fields_for(family, state, as_of, params)

    table = params_table(params)
    got = BUILT.fields_for(DOC, state, as_of, LAYOUT_TABLE, table, reference)
    assert got == expected
    assert calls == [DOC]


def test_special_floats_are_written_as_python_writes_them() -> None:
    """repr's shortest round-trip text, 'inf' and 'nan' included."""
    assert BUILT is not None
    state = counters.add(None, LAYOUTS[AC], BASE, (3, 1))
    for prior in (Prior(1e-300, 1e-300), Prior(0.1, 0.2), Prior(1e300, 1e300)):
        params = FeatureParams(ac=prior)
        got = BUILT.fields_for(AC, state, BASE, LAYOUT_TABLE, params_table(params), fields_for)
        assert got == fields_for(AC, state, BASE, params)
    assert fields_for(AC, state, BASE, FeatureParams(ac=Prior(0.1, 0.2)))["select_rate_7d"] == repr(
        (1 + 0.1) / (3 + 0.1 + 0.2)
    )


# --- packing -----------------------------------------------------------------------------

ascii_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
writes_strategy = st.lists(
    st.tuples(
        ascii_text,
        st.one_of(st.none(), st.dictionaries(ascii_text, ascii_text, min_size=1, max_size=5)),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(
    ascii_text,
    writes_strategy,
    st.one_of(st.just(EVERY_KEY), st.sets(ascii_text)),
    st.integers(min_value=1, max_value=10**9),
)
def test_packed_writes_are_the_references_bytes(
    prefix: str, writes: list[tuple[str, dict[str, str] | None]], ttl: object, seconds: int
) -> None:
    assert BUILT is not None
    if isinstance(ttl, set) and writes:
        ttl.add(writes[0][0])  # at least one key with its TTL
    expected = resp.pack_writes(prefix, writes, ttl, seconds)  # type: ignore[arg-type]
    assert BUILT.pack_writes(prefix, writes, ttl, seconds) == expected


def test_a_write_that_is_not_text_is_refused_not_mangled() -> None:
    assert BUILT is not None
    with pytest.raises(TypeError):
        BUILT.pack_writes("feat", [("doc:a", {"clicks_7d": 3})], EVERY_KEY, 60)
    with pytest.raises(TypeError):
        BUILT.pack_writes("feat", [("doc:a",)], EVERY_KEY, 60)


# --- the switch --------------------------------------------------------------------------


def test_native_core_false_runs_the_pure_python_core() -> None:
    from bytewax.testing import TestingSink, TestingSource  # noqa: PLC0415

    from dataflow.flow import build_flow  # noqa: PLC0415 - imports Bytewax

    out: list[object] = []
    build_flow(
        Config(native_core=False),
        source=TestingSource([]),
        redis_sink=TestingSink(out),
        dlq_sink=TestingSink(out),
        with_opensearch=False,
    )
    try:
        assert native.core is None
    finally:
        native.use(True)


def test_native_core_true_without_the_extension_fails_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "BUILT", None)
    with pytest.raises(ConfigError, match="NATIVE_CORE") as caught:
        Config.from_env({"NATIVE_CORE": "true"})
    assert "pip install ." in str(caught.value)
    assert Config.from_env({"NATIVE_CORE": "false"}).native_core is False
    with pytest.raises(native.NotBuilt):
        native.use(True)


# --- float text --------------------------------------------------------------------------

EDGES = [
    0.0,
    -0.0,
    1.0,
    0.1,
    1 / 3,
    0.30000000000000004,
    1e-4,  # the last fixed-notation power below 1
    1e-5,  # the first in exponent notation
    9.999999999999999e-5,
    1e15,
    1e16,  # exponent notation from here
    9999999999999998.0,
    2.0**53,
    2.0**53 + 2,
    1e22,
    1e23,
    5e-324,  # the smallest subnormal
    2.2250738585072014e-308,  # the smallest normal
    1.7976931348623157e308,
    -1.5e-7,
    123456.789,
    float("inf"),
    float("-inf"),
    float("nan"),
]


@pytest.mark.parametrize("value", EDGES, ids=repr)
def test_floats_are_written_as_repr_writes_them_at_the_edges(value: float) -> None:
    assert BUILT is not None
    assert BUILT.float_repr(value) == repr(value)


@settings(max_examples=3000, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True))
def test_any_float_is_written_as_repr_writes_it(value: float) -> None:
    assert BUILT is not None
    assert BUILT.float_repr(value) == repr(value)


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_any_bit_pattern_is_written_as_repr_writes_it(bits: int) -> None:
    assert BUILT is not None
    value = struct.unpack("<d", struct.pack("<Q", bits))[0]
    assert BUILT.float_repr(value) == repr(value)


# --- fan-out -----------------------------------------------------------------------------

ids = st.one_of(
    st.sampled_from(["d1", "d2", "D-3.x_~", "a b", "x:y", "é", "𝔘", "%41", ""]),
    st.text(max_size=6),
)
queries = st.one_of(
    st.sampled_from(["", "  ", "Shoes", "shoes ", "ＳＨＯＥＳ", "a:b"]), st.text(max_size=6)
)
times = st.integers(min_value=BASE, max_value=BASE + 3 * DAY)


@st.composite
def an_event(draw: st.DrawFn) -> Event:
    kind = draw(st.sampled_from(["impression", "click", "dwell", "ac_impression", "ac_select"]))
    common = ("e", draw(times), None)
    if kind == "impression":
        doc_ids = tuple(draw(st.lists(ids, max_size=14)))  # past the reference CTR curve
        return SearchImpression(*common, draw(queries), doc_ids)
    if kind == "click":
        return Click(*common, draw(queries), draw(ids), draw(st.none() | st.integers(1, 20)))
    if kind == "dwell":
        return Dwell(*common, draw(queries), draw(ids), draw(st.integers(0, 60_000)))
    if kind == "ac_impression":
        return AcImpression(*common, draw(queries), tuple(draw(st.lists(queries, max_size=5))))
    return AcSelect(*common, draw(queries), draw(queries))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.lists(an_event(), max_size=8), max_size=4),
    st.sampled_from([1, 7, 128, 65_536]),
    st.sampled_from([DEFAULT_REFERENCE_CTR, (0.5,), (0.3, 0.2)]),
)
def test_fan_out_gives_the_references_updates_in_its_order(
    batches: list[list[Event]], shards: int, reference_ctr: tuple[float, ...]
) -> None:
    fan_out = FanOut(FeatureParams(reference_ctr=reference_ctr), shards)
    keyed = [(str(i), events) for i, events in enumerate(batches)]
    compiled = fan_out(keyed)
    with pure_python():
        reference = fan_out(keyed)
    assert compiled == reference
    assert all(type(update[1]) is str for _, updates in compiled for update in updates)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from([1, 3, 128, 65_536, 2**24]))
def test_shard_of_is_the_flows(suffix: str, shards: int) -> None:
    assert BUILT is not None
    assert BUILT.shard_of(suffix, shards) == shard_of(suffix, shards)


# --- decoding ----------------------------------------------------------------------------

NOW = BASE + 10 * DAY
TOLERANCE = 600_000

any_text = st.one_of(
    st.sampled_from(["", "a", "doc-1", "x" * 128, "x" * 129, "y" * 1024, "y" * 1025, "\x7f", "é"]),
    st.text(max_size=8),
    st.text(st.characters(max_codepoint=0x7F), min_size=255, max_size=258),
)
any_int = st.one_of(
    st.sampled_from([0, 1, -1, NOW, NOW + TOLERANCE, NOW + TOLERANCE + 1, 2**63, 2**64]),
    st.integers(min_value=0, max_value=NOW + 2 * TOLERANCE),
)
any_value = st.one_of(
    st.none(), st.booleans(), any_text, any_int, st.floats(allow_nan=False, width=32), st.just([])
)


@st.composite
def a_message(draw: st.DrawFn) -> dict[str, object]:
    """Mostly well-formed events, each field sometimes replaced by anything, or missing."""
    kind = draw(st.sampled_from([*EVENT_TYPES, "other"]))
    fields: dict[str, object] = {
        "type": kind,
        "event_id": draw(any_text),
        "ts": draw(any_int),
        "session_id": draw(st.none() | any_text),
        "query": draw(st.none() | any_text),
        "doc_ids": draw(st.lists(any_text, max_size=4)),
        "doc_id": draw(any_text),
        "position": draw(st.none() | any_int),
        "dwell_ms": draw(any_int),
        "prefix": draw(st.none() | any_text),
        "candidates": draw(st.lists(st.none() | any_text, max_size=4)),
        "candidate": draw(st.none() | any_text),
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
        if draw(st.booleans()):
            fields.pop(name, None)
        else:
            fields[name] = draw(any_value)
    return fields


def decoded_fields(value: object) -> object:
    """Everything a decoded event carries, `origin` and `clock` included (not compared by
    the events' own equality)."""
    if isinstance(value, Rejection):
        return value
    return (type(value), *(getattr(value, name) for name in type(value).__slots__))


@settings(max_examples=1500, deadline=None)
@given(a_message(), st.integers(min_value=0, max_value=2**32), any_int)
def test_decode_gives_the_references_event_or_rejection(
    message: dict[str, object], origin: int, clock: int
) -> None:
    value = json.dumps(message).encode()

    def run() -> object:
        return decoded_fields(
            decode(value, now_ms=NOW, future_tolerance_ms=TOLERANCE, origin=origin, clock=clock)
        )

    compiled = run()
    with pure_python():
        reference = run()
    assert compiled == reference


def test_valid_events_of_the_common_shape_are_built_by_the_compiled_core() -> None:
    assert BUILT is not None
    types = (SearchImpression, Click, Dwell, AcImpression, AcSelect)
    common = {"event_id": "e1", "ts": NOW, "session_id": "s"}
    messages = [
        {"type": "search_impression", **common, "query": "q", "doc_ids": ["a", "b"]},
        {"type": "click", **common, "doc_id": "a", "position": 2},
        {"type": "dwell", **common, "query": "q", "doc_id": "a", "dwell_ms": 31_000},
        {"type": "ac_impression", **common, "prefix": "sh", "candidates": ["shoes", "shirt"]},
        {"type": "ac_select", **common, "prefix": "sh", "candidate": "shoes"},
    ]
    for message in messages:
        event = BUILT.event_from(message, 7, NOW - 1, NOW + TOLERANCE, types)
        assert event is not None, message
        assert (event.origin, event.clock) == (7, NOW)
    # Not ASCII: events.py measures the UTF-8 bytes of a doc id.
    unusual = {"type": "click", **common, "doc_id": "é"}
    assert BUILT.event_from(unusual, 7, 0, NOW + TOLERANCE, types) is None


@settings(max_examples=100, deadline=None)
@given(items_strategy, items_strategy)
def test_a_snapshot_taken_by_one_core_resumes_in_the_other(
    first: list[ShardItem], then: list[ShardItem]
) -> None:
    """NATIVE_CORE may change across a restart on the same recovery directory."""
    params = FeatureParams()

    def run(switch_after_first: bool) -> tuple[object, ...]:
        shard = FeatureShard(params)
        try:
            for item in first:
                shard.step([item])
            blob = shard.snapshot()
            native.use(not switch_after_first)
            resumed = FeatureShard.restore(params, blob)
            for item in then:
                resumed.step([item])
        except OverflowError:
            return ("overflow",)
        finally:
            native.use(True)
        writes = resumed.flush(everything=True).writes
        states = {s: counters.to_bytes(v) for s, v in resumed.keys.items()}
        return resumed.clock, states, list(writes)

    assert run(switch_after_first=True) == run(switch_after_first=False)


# --- snapshot buffers --------------------------------------------------------------------

states_strategy = st.dictionaries(
    st.text(max_size=12),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=15).map(
        lambda items: array("q", items)
    ),
    max_size=20,
)


@settings(max_examples=400, deadline=None)
@given(states_strategy)
def test_key_states_pack_to_the_references_bytes_and_back(keys: dict[str, array[int]]) -> None:
    assert BUILT is not None
    packed = counters.pack_states(keys)
    assert BUILT.pack_states(keys) == packed
    for unpacked in (BUILT.unpack_states(packed), counters.unpack_states(packed)):
        assert list(unpacked) == list(keys)  # the dict's order too
        assert all(unpacked[s].typecode == "q" for s in unpacked)
        assert {s: v.tobytes() for s, v in unpacked.items()} == {
            s: v.tobytes() for s, v in keys.items()
        }


@settings(max_examples=200, deadline=None)
@given(states_strategy)
def test_layout_4_key_states_still_unpack_in_both_cores(keys: dict[str, array[int]]) -> None:
    assert BUILT is not None
    packed = layout_4_states(keys)
    for unpacked in (BUILT.unpack_states_layout_4(packed), counters.unpack_states_layout_4(packed)):
        assert list(unpacked) == list(keys)
        assert {s: v.tobytes() for s, v in unpacked.items()} == {
            s: v.tobytes() for s, v in keys.items()
        }


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), states_strategy.map(counters.pack_states)), st.data())
def test_any_bytes_unpack_alike_in_both_cores(blob: bytes, data: st.DataObject) -> None:
    """Arbitrary or damaged buffers: the same keys, or a ValueError, from both cores."""
    assert BUILT is not None
    if blob and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([data.draw(st.integers(0, 255))]) + blob[at + 1 :]
    results = []
    for unpack in (BUILT.unpack_states, counters.unpack_states):
        try:
            results.append({s: v.tobytes() for s, v in unpack(blob).items()})
        except ValueError as exc:  # a UnicodeDecodeError is one
            results.append(type(exc) if isinstance(exc, UnicodeDecodeError) else str(exc))
    assert results[0] == results[1]


def test_a_varint_past_64_bits_is_refused_in_both_cores() -> None:
    assert BUILT is not None
    big = b"\x01a\x01" + b"\xff" * 9 + b"\x01"  # 2^64 - 1 as an item: still 64 bits
    for unpack in (BUILT.unpack_states, counters.unpack_states):
        assert unpack(big)["a"].tolist() == [-(2**63)]
        with pytest.raises(ValueError, match="past 64 bits"):
            unpack(b"\x01a\x01" + b"\xff" * 9 + b"\x02")
        with pytest.raises(ValueError, match="truncated"):
            unpack(b"\x01a\x05\x00")  # five items announced, one there


@settings(max_examples=200, deadline=None)
@given(states_strategy.filter(bool), st.data())
def test_a_truncated_state_buffer_is_an_error_in_both_cores(
    keys: dict[str, array[int]], data: st.DataObject
) -> None:
    assert BUILT is not None
    packed = counters.pack_states(keys)
    cut = data.draw(st.integers(min_value=1, max_value=len(packed) - 1))
    for unpack in (BUILT.unpack_states, counters.unpack_states):
        try:
            unpacked = unpack(packed[:cut])
        except ValueError:
            continue
        # A cut that falls between two keys leaves a shorter, well-formed buffer.
        assert counters.pack_states(unpacked) == packed[:cut]
