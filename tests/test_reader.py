"""The reader's record building, wire format and deadline plumbing, without services.

The reference for every record is `Record.parse(HGETALL reply as a mapping)`: the
field-by-field reading the reader always did. Replies here are built by hand (or by
Hypothesis) in each shape a client can hand over: RESP2 flat lists, RESP3 dicts, bytes or str.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import typing
from typing import Any

import hiredis
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow import reader as rd
from dataflow import resp
from dataflow.core import counters, keys
from dataflow.core.families import AC, ACQ, DOC, LAYOUTS, QD, FeatureParams, fields_for
from dataflow.core.smoothing import Prior
from dataflow.errors import PipelineError, ReaderError, ReaderTimeout
from dataflow.reader import (
    AutocompleteFeatures,
    AutocompleteLink,
    DocFeatures,
    FeatureReader,
    QueryDocFeatures,
    decode_rows,
)
from dataflow.resp import pack_hgetall

FAMILIES = [
    (DOC, rd._DOC, DocFeatures),
    (QD, rd._QD, QueryDocFeatures),
    (AC, rd._AC, AutocompleteFeatures),
    (ACQ, rd._ACQ, AutocompleteLink),
]
PRIOR = Prior(alpha=2.0, beta=30.0)
NOW = 1_767_225_600_000


def written_fields(family: int, seed: int) -> dict[str, str]:
    """What the pipeline writes for a key with a few events (contract encoding)."""
    rnd = random.Random(seed)
    layout = LAYOUTS[family]
    state = None
    for _ in range(rnd.randint(1, 5)):
        ts = NOW - rnd.randrange(29 * 86_400_000)
        state = counters.add(
            state, layout, ts, tuple(rnd.randint(0, 9) for _ in range(layout.counts))
        )
    assert state is not None
    return fields_for(family, state, NOW, FeatureParams())


def resp2(fields: dict[str, str], *, text: bool = False) -> list[Any]:
    """An HGETALL reply as a RESP2 client hands it over: [field, value, ...]."""
    out: list[Any] = []
    for name, value in fields.items():
        out += [name, value] if text else [name.encode(), value.encode()]
    return out


def resp3(fields: dict[str, str], *, text: bool = False) -> dict[Any, Any]:
    if text:
        return dict(fields)
    return {k.encode(): v.encode() for k, v in fields.items()}


def reference(layout: rd._Layout[Any], reply: Any) -> Any:
    """The field-by-field reading: what the reader returned before batching."""
    mapping = reply if isinstance(reply, dict) else dict(zip(reply[0::2], reply[1::2], strict=True))
    return layout.record.parse(mapping, PRIOR)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(("family", "layout", "record"), FAMILIES)
def test_the_fast_path_expects_the_writers_fields_in_the_writers_order(
    family: int, layout: rd._Layout[Any], record: type
) -> None:
    writer_order = list(written_fields(family, 1))
    assert layout.stored_str == writer_order
    assert [layout.stored_str[i] for i in layout.order] == list(layout.names)
    assert [*layout.names, "found"] == list(record._fields)  # type: ignore[attr-defined]
    hints = typing.get_type_hints(record)
    assert layout.kinds == tuple(hints[f] for f in layout.names)
    assert hints["found"] is bool


def test_records_are_named_tuples_with_the_contract_fields() -> None:
    assert DocFeatures._fields == (
        "impressions_7d", "clicks_7d", "impressions_30d", "clicks_30d", "long_clicks_30d",
        "popularity_7d", "popularity_30d", "ctr_7d", "ctr_30d", "impressions_decay",
        "clicks_decay", "ctr_decay", "expected_clicks_30d", "coec_30d", "as_of", "found",
    )  # fmt: skip
    assert not dataclasses.is_dataclass(DocFeatures)
    missing = DocFeatures.parse({}, PRIOR)
    assert missing.found is False
    assert (missing.impressions_30d, missing.clicks_decay, missing.as_of) == (0, 0.0, 0)
    assert missing.ctr_7d == missing.ctr_30d == missing.ctr_decay == PRIOR.prior_rate
    assert missing.popularity_30d == 0.0
    assert (missing.expected_clicks_30d, missing.coec_30d) == (0.0, 1.0)  # the neutral ratio


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(("family", "layout", "record"), FAMILIES)
@pytest.mark.parametrize("shape", ["resp2-bytes", "resp2-str", "resp3-bytes", "resp3-str"])
def test_written_keys_decode_as_the_field_by_field_reading(
    family: int, layout: rd._Layout[Any], record: type, shape: str
) -> None:
    make = resp2 if shape.startswith("resp2") else resp3
    text = shape.endswith("str")
    empty: Any = {} if shape.startswith("resp3") else []
    replies = [make(written_fields(family, seed), text=text) for seed in range(40)]
    replies[3] = empty
    replies[17] = empty
    records = decode_rows(layout, replies, PRIOR)
    assert records == [reference(layout, r) for r in replies]
    assert all(type(r) is record for r in records)
    assert [r.found for r in records].count(False) == 2
    for got in records:
        for name, kind in zip(layout.names, layout.kinds, strict=True):
            assert type(getattr(got, name)) is kind


@pytest.mark.parametrize("shape", ["resp2-bytes", "resp2-str", "resp3-bytes", "resp3-str"])
def test_a_batch_of_missing_keys_or_of_written_and_missing_keys_decodes_as_each_reply(
    shape: str,
) -> None:
    make = resp2 if shape.startswith("resp2") else resp3
    text = shape.endswith("str")
    empty: Any = {} if shape.startswith("resp3") else []
    for layout in (rd._DOC, rd._ACQ):
        family = DOC if layout is rd._DOC else ACQ
        only_missing = [empty] * 5
        assert decode_rows(layout, only_missing, PRIOR) == [layout.missing(PRIOR)] * 5
        mixed = [empty, make(written_fields(family, 1), text=text), empty, empty]
        mixed += [make(written_fields(family, 2), text=text), empty]
        records = decode_rows(layout, mixed, PRIOR)
        assert records == [reference(layout, r) for r in mixed]
        assert [r.found for r in records] == [False, True, False, False, True, False]


def test_missing_and_partial_keys_read_as_zero_counts_and_the_prior() -> None:
    full = written_fields(DOC, 7)
    partial = {k: v for k, v in full.items() if k not in ("popularity_7d", "ctr_decay")}
    reordered = dict(reversed(list(full.items())))
    extra = {**full, "future_field": "1"}
    only_unknown = {"something_else": "x"}
    replies = [resp2(full), [], resp2(partial), resp2(reordered), resp2(extra), resp2(only_unknown)]
    records = decode_rows(rd._DOC, replies, PRIOR)
    assert records == [reference(rd._DOC, r) for r in replies]
    assert records[1] == rd._DOC.missing(PRIOR) and not records[1].found
    assert records[2].found and records[2].popularity_7d == 0.0
    assert records[2].ctr_decay == PRIOR.prior_rate
    assert records[3] == records[4] == records[0]
    assert records[5].found and records[5].impressions_30d == 0  # a hash, though not ours


def test_values_outside_the_contract_encoding_read_as_int_and_float_would() -> None:
    base = written_fields(QD, 3)
    odd = [
        {**base, "ctr_7d": "3"},  # an integer in a float field: 3.0
        {**base, "clicks_7d": " 4 "},  # whitespace: int() accepts it, JSON too
        {**base, "ctr_30d": "1e-05", "as_of": "17"},
        {**base, "ctr_decay": "inf"},  # not JSON: that column is read with float()
        {**base, "clicks_30d": "1_000"},
    ]
    replies = [resp2(f) for f in [base, *odd]]
    records = decode_rows(rd._QD, replies, PRIOR)
    assert records == [reference(rd._QD, r) for r in replies]
    assert type(records[1].ctr_7d) is float and records[1].ctr_7d == 3.0
    assert records[4].ctr_decay == float("inf")
    assert records[5].clicks_30d == 1000


@pytest.mark.parametrize("value", ["1.5", "abc", "true", "[1]", "1,2"])
def test_a_value_an_int_field_cannot_hold_fails_as_the_field_by_field_reading_does(
    value: str,
) -> None:
    bad = {**written_fields(DOC, 5), "clicks_7d": value}
    with pytest.raises(ValueError) as reference_error:
        reference(rd._DOC, resp2(bad))
    with pytest.raises(ValueError) as batch_error:
        decode_rows(rd._DOC, [resp2(written_fields(DOC, 6)), resp2(bad)], PRIOR)
    assert str(batch_error.value) == str(reference_error.value)


_INT_TEXT = st.integers(0, 10**12).map(str)
_FLOAT_TEXT = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(0, 1).map(repr),
    _INT_TEXT,  # an integer where a float belongs reads as that float
)


@st.composite
def hashes(draw: st.DrawFn) -> dict[str, str]:
    """Any hash a key could hold: some of the fields, in any order, maybe a foreign one."""
    names = draw(st.permutations([*rd._DOC.stored_str, "extra"]))
    kept = names[: draw(st.integers(0, len(names)))]
    kinds = dict(zip(rd._DOC.names, rd._DOC.kinds, strict=True))
    return {n: draw(_INT_TEXT if kinds.get(n) is int else _FLOAT_TEXT) for n in kept}


@settings(max_examples=60)
@given(
    rows=st.lists(st.tuples(st.one_of(st.none(), hashes()), st.integers(0, 10**6)), max_size=12),
    as_dicts=st.booleans(),
)
def test_any_mix_of_replies_decodes_as_the_field_by_field_reading(
    rows: list[tuple[dict[str, str] | None, int]], as_dicts: bool
) -> None:
    """A batch holds one reply shape (one client, one protocol): lists or dicts."""
    replies: list[Any] = []
    for fields, seed in rows:
        chosen = written_fields(DOC, seed) if fields is None else fields
        replies.append(resp3(chosen) if as_dicts else resp2(chosen))
    assert decode_rows(rd._DOC, replies, PRIOR) == [reference(rd._DOC, r) for r in replies]


# --------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("prefix", ["feat", "fé"])
def test_packed_commands_parse_back_to_one_hgetall_per_key(prefix: str) -> None:
    key_list = [keys.doc_key(prefix, d) for d in ["d1", "a:b", "100%", "with space", "日本"]]
    packed = pack_hgetall(key_list)
    parser = hiredis.Reader()
    parser.feed(packed)
    commands = []
    while (command := parser.gets()) is not False:
        commands.append(command)
    assert commands == [[b"HGETALL", k.encode()] for k in key_list]


class FakeConnection:
    """Feeds canned reply bytes to a hiredis reader in small chunks, like a slow socket."""

    def __init__(self, replies: bytes, chunk: int = 7) -> None:
        self._parser = self
        self._reader = hiredis.Reader(notEnoughData=resp.NO_REPLY)
        self._data = replies
        self._chunk = chunk
        self.sent: list[bytes] = []
        self.reads = 0

    def read_from_socket(self, timeout: float | None = None) -> bool:
        if not self._data:
            time.sleep(timeout or 0)
            raise TimeoutError("nothing more to read")
        piece, self._data = self._data[: self._chunk], self._data[self._chunk :]
        self._reader.feed(piece)
        self.reads += 1
        return True

    def send_packed_command(self, data: list[bytes], check_health: bool = True) -> None:
        self.sent += data


def encode_reply(fields: dict[str, str]) -> bytes:
    out = b"*%d\r\n" % (2 * len(fields))
    for item in resp2(fields):
        out += b"$%d\r\n%s\r\n" % (len(item), item)
    return out


def test_a_conversation_writes_every_part_before_reading_and_returns_records_by_id() -> None:
    reader = FeatureReader(None, prefix="p", params=FeatureParams(doc=PRIOR))  # type: ignore[arg-type]
    docs = ["a", "b", "a", "c"]
    parts = [reader._doc_part(docs), reader._qd_part("Some Query", docs)]
    assert parts[1] is not None
    doc_fields = [written_fields(DOC, 1), {}, written_fields(DOC, 2)]
    qd_fields = [{}, written_fields(QD, 3), written_fields(QD, 4)]
    # Each part's published prior comes first: none for doc, a fitted one for qd.
    fitted = {"alpha": "2.5", "beta": "40.0", "day": "20400", "keys": "900", "source": "fitted"}
    replies = [{}, *doc_fields, fitted, *qd_fields]
    conn = FakeConnection(b"".join(encode_reply(f) for f in replies))
    seen: dict[int, Prior] = {}
    result = rd._drive_sync(conn, rd._conversation(parts, seen), time.monotonic() + 5)  # type: ignore[arg-type]
    sent = b"".join(conn.sent)
    assert sent == pack_hgetall(
        ["p:prior:doc", *(keys.doc_key("p", d) for d in "abc")]
    ) + pack_hgetall(["p:prior:qd", *(keys.qd_key("p", "Some Query", d) for d in "abc")])
    assert list(result[0]) == list(result[1]) == ["a", "b", "c"]
    assert result[0]["a"] == DocFeatures.parse(doc_fields[0], PRIOR)
    assert result[0]["b"] == DocFeatures.parse({}, PRIOR)
    assert result[1]["c"] == QueryDocFeatures.parse(qd_fields[2], Prior())
    # A missing query-document key reads with the published prior, not the configured one.
    assert result[1]["a"] == QueryDocFeatures.parse({}, Prior(2.5, 40.0))
    assert result[1]["a"].ctr_30d == 2.5 / 42.5
    assert seen == {DOC: PRIOR, QD: Prior(2.5, 40.0)}
    assert conn.reads > 10  # the replies came in pieces and were reassembled


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ([], PRIOR),
        ([b"alpha", b"3.0", b"beta", b"30.0", b"source", b"fitted"], Prior(3.0, 30.0)),
        ({"alpha": "0.5", "beta": "9.5"}, Prior(0.5, 9.5)),
        ([b"alpha", b"nan?", b"beta", b"30.0"], PRIOR),
        ([b"beta", b"30.0"], PRIOR),
        ([b"alpha", b"-1", b"beta", b"3"], PRIOR),
    ],
)
def test_a_published_prior_is_used_only_when_it_is_a_prior(reply: Any, expected: Prior) -> None:
    assert rd.published_prior(reply, PRIOR) == expected


def test_an_error_reply_becomes_a_reader_error_after_every_reply_is_read() -> None:
    reader = FeatureReader(None, prefix="p")  # type: ignore[arg-type]
    wire = (
        encode_reply({})  # no published prior
        + encode_reply(written_fields(DOC, 1))
        + b"-WRONGTYPE Operation against a key\r\n"
    )
    conn = FakeConnection(wire)
    with pytest.raises(rd._Rejected):
        rd._drive_sync(conn, rd._conversation([reader._doc_part(["x", "y"])]), time.monotonic() + 5)  # type: ignore[arg-type]


def test_the_read_gives_up_at_the_deadline() -> None:
    conn = FakeConnection(b"*2\r\n$1\r\na\r\n")  # half a reply, then silence
    start = time.monotonic()
    with pytest.raises((resp.Expired, TimeoutError)):
        resp.read_replies(conn, 1, start + 0.05)
    assert time.monotonic() - start < 0.5


def test_async_read_reassembles_replies_from_pieces() -> None:
    class AsyncFake(FakeConnection):
        async def read_from_socket(self, timeout: float | None = None) -> bool:  # type: ignore[override]
            return FakeConnection.read_from_socket(self, timeout)

    fields = [written_fields(AC, 1), written_fields(AC, 2)]
    conn = AsyncFake(b"".join(encode_reply(f) for f in fields))
    replies = asyncio.run(resp.read_replies_async(conn, 2))
    assert decode_rows(rd._AC, replies, PRIOR) == [
        AutocompleteFeatures.parse(f, PRIOR) for f in fields
    ]


def test_async_writes_go_straight_to_the_stream_writer() -> None:
    """No `send_packed_command` (it wraps each write in `asyncio.wait_for`)."""

    class Writer:
        def __init__(self) -> None:
            self.written: list[bytes] = []
            self.drained = 0

        def write(self, data: bytes) -> None:
            self.written.append(data)

        async def drain(self) -> None:
            self.drained += 1

    class Conn:
        def __init__(self) -> None:
            self._writer = Writer()

        async def send_packed_command(self, *_: Any, **__: Any) -> None:
            raise AssertionError("went through redis-py's send_packed_command")

    conn = Conn()
    asyncio.run(resp.write_async(conn, b"*1\r\n$4\r\nPING\r\n"))
    assert conn._writer.written == [b"*1\r\n$4\r\nPING\r\n"]
    assert conn._writer.drained == 1


# --------------------------------------------------------------------------- reader API


def test_an_empty_query_reads_every_pair_as_missing_without_asking_redis() -> None:
    reader = FeatureReader(None, prefix="p")  # type: ignore[arg-type]
    got = reader.query_doc_features("   ", ["a", "b", "a"])
    assert got == {
        "a": QueryDocFeatures.parse({}, Prior()),
        "b": QueryDocFeatures.parse({}, Prior()),
    }
    both = reader.ranking_features("", [])
    assert both == ({}, {})
    assert reader.doc_features([]) == {}


def test_decayed_to_brings_the_sums_to_the_read_time() -> None:
    features = DocFeatures.parse(written_fields(DOC, 9), PRIOR)
    later = features.decayed_to(features.as_of + 7 * 86_400_000, PRIOR)
    assert later.impressions_decay == pytest.approx(features.impressions_decay / 2)
    assert later.ctr_decay == PRIOR.rate(later.clicks_decay, later.impressions_decay)
    assert later.as_of == features.as_of
    assert features.decayed_to(features.as_of - 1, PRIOR) is features


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_deadline_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="deadline_ms"):
        FeatureReader(None, deadline_ms=bad)  # type: ignore[arg-type]
    reader = FeatureReader(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="deadline_ms"):
        reader.doc_features(["a"], deadline_ms=bad)


def test_reader_errors_are_pipeline_errors_that_say_what_to_do() -> None:
    error = rd._timeout("127.0.0.1:6379", 200, 50.0, "Timeout reading from socket")
    assert isinstance(error, ReaderTimeout)
    assert isinstance(error, ReaderError)
    assert isinstance(error, PipelineError)
    message = str(error)
    assert "200 keys" in message and "50 ms" in message and "127.0.0.1:6379" in message
    assert "without these features" in message and "deadline_ms" in message


def test_the_prefix_comes_from_feature_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURE_PREFIX", "feat_v2")
    assert rd.prefix_from_env() == "feat_v2"
    monkeypatch.delenv("FEATURE_PREFIX")
    assert rd.prefix_from_env() == "feat"


def test_a_reset_socket_is_a_connection_error_like_redis_pys_own() -> None:
    """The hiredis reader's socket read raises the OS error itself; `read_response` would
    have made it a `redis.ConnectionError`, which the sink retries and the reader reports."""

    class Reset(FakeConnection):
        def read_from_socket(self, timeout: float | None = None) -> bool:
            raise ConnectionResetError(104, "Connection reset by peer")

    for deadline in (None, time.monotonic() + 5):
        with pytest.raises(redis.ConnectionError, match="reset by peer"):
            resp.read_replies(Reset(b""), 1, deadline)
