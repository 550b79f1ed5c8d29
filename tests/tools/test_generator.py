"""The event generator: deterministic, exact, contract-conforming, realistic.

The contract checks here are written from docs/contract.md §1 and §5 independently of the
pipeline's validator, so that the generator's tags can be trusted by the tests that use
them (every broken message must get exactly the reason it is tagged with).
"""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, TypeGuard

import pytest

from dataflow.tools.generator import (
    DLQ_REASONS,
    EVENT_TYPES,
    INVALID_KINDS,
    GeneratedMessage,
    GeneratorConfig,
    generate,
    generate_events,
    main,
)

START = 1_700_000_000_000  # 2023-11-14: fixed, so every test is reproducible
ROOT = Path(__file__).resolve().parents[2]


def q_norm(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


# ------------------------------------------------------------- contract (independent)


class _Reject(ValueError):
    pass


def _no_constants(name: str) -> Any:
    raise _Reject(name)  # NaN / Infinity are not JSON (project choice)


def _is_int(x: Any) -> TypeGuard[int]:
    return type(x) is int  # bool and float are not integers (project choice)


def _is_doc_id(x: Any) -> bool:
    return (
        isinstance(x, str)
        and 1 <= len(x.encode("utf-8")) <= 256
        and not any(unicodedata.category(c) == "Cc" for c in x)
    )


def _is_text(x: Any, limit: int = 1024) -> bool:
    return isinstance(x, str) and len(x) <= limit


def classify(value: bytes, now_ms: int) -> str | None:
    """The dead-letter reason for ``value`` per contract §5 rule order, None if valid."""
    if len(value) > 65_536:
        return "invalid_event"
    try:
        text = value.decode("utf-8")
        obj = json.loads(text, parse_constant=_no_constants)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "invalid_json"
    if not isinstance(obj, dict):
        return "invalid_event"
    etype = obj.get("type")
    if not isinstance(etype, str):
        return "invalid_event"
    if etype not in EVENT_TYPES:
        return "unknown_type"
    eid = obj.get("event_id")
    if not isinstance(eid, str) or not 1 <= len(eid) <= 128:
        return "invalid_event"
    ts = obj.get("ts")
    if not _is_int(ts) or ts < 0:
        return "invalid_event"
    sid = obj.get("session_id")
    if sid is not None and not _is_text(sid, 128):
        return "invalid_event"
    if etype in ("search_impression", "click", "dwell"):
        query = obj.get("query")
        if query is not None and not _is_text(query):
            return "invalid_event"
    if etype == "search_impression":
        docs = obj.get("doc_ids")
        if not isinstance(docs, list) or not 1 <= len(docs) <= 1000:
            return "invalid_event"
        if not all(_is_doc_id(d) for d in docs):
            return "invalid_event"
    elif etype in ("click", "dwell"):
        if not _is_doc_id(obj.get("doc_id")):
            return "invalid_event"
        if etype == "click" and "position" in obj:
            pos = obj["position"]
            if pos is not None and (not _is_int(pos) or pos < 1):
                return "invalid_event"
        if etype == "dwell":
            dwell = obj.get("dwell_ms")
            if not _is_int(dwell) or dwell < 0:
                return "invalid_event"
    else:
        if not _is_text(obj.get("prefix")):
            return "invalid_event"
        if etype == "ac_impression":
            cands = obj.get("candidates")
            if not isinstance(cands, list) or not 1 <= len(cands) <= 50:
                return "invalid_event"
            if not all(_is_text(c) for c in cands):
                return "invalid_event"
        elif not _is_text(obj.get("candidate")):
            return "invalid_event"
    if ts > now_ms + 600_000:
        return "future_timestamp"
    return None


# ------------------------------------------------------------------------- fixtures


def _config(**kw: Any) -> GeneratorConfig:
    base: dict[str, Any] = {"n_events": 5_000, "start_ms": START}
    base.update(kw)
    return GeneratorConfig(**base)


@pytest.fixture(scope="module")
def clean() -> list[GeneratedMessage]:
    """A stream without noise: only first copies of valid events, in event-time order."""
    return list(generate(_config(n_events=20_000)))


@pytest.fixture(scope="module")
def noisy() -> list[GeneratedMessage]:
    return list(
        generate(
            _config(
                n_events=20_000,
                duplicate_fraction=0.05,
                invalid_fraction=0.10,
                max_disorder_ms=90_000,
            )
        )
    )


def _events(msgs: list[GeneratedMessage], kinds: tuple[str, ...] = ("valid",)) -> list[Any]:
    return [m.event for m in msgs if m.kind in kinds]


# ---------------------------------------------------------------------------- tests


def test_same_seed_same_bytes_and_other_seed_other_bytes() -> None:
    cfg = _config(
        n_events=3_000, duplicate_fraction=0.05, invalid_fraction=0.05, max_disorder_ms=30_000
    )
    first = [(m.value, m.key, m.kind, m.expected_reason) for m in generate(cfg)]
    again = [(m.value, m.key, m.kind, m.expected_reason) for m in generate(cfg)]
    other = [
        (m.value, m.key, m.kind, m.expected_reason)
        for m in generate(
            _config(
                n_events=3_000,
                duplicate_fraction=0.05,
                invalid_fraction=0.05,
                max_disorder_ms=30_000,
                seed=8,
            )
        )
    ]
    assert first == again
    assert first != other


def test_determinism_does_not_depend_on_the_hash_seed() -> None:
    # Sets or dicts iterated in hash order would make the bytes vary between processes.
    code = (
        "import hashlib; from dataflow.tools.generator import GeneratorConfig, generate; "
        "h = hashlib.sha256(); "
        f"[h.update(m.value) for m in generate(GeneratorConfig(n_events=2000, start_ms={START}, "
        "invalid_fraction=0.1, duplicate_fraction=0.1))]; print(h.hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1


@pytest.mark.parametrize("n", [0, 1, 2, 17, 4_321])
def test_exactly_n_events_messages(n: int) -> None:
    cfg = _config(n_events=n, duplicate_fraction=0.2, invalid_fraction=0.2)
    assert sum(1 for _ in generate(cfg)) == n
    assert len(list(generate(_config(n_events=n)))) == n


def test_start_ms_is_required_and_resolved_from_the_clock() -> None:
    with pytest.raises(ValueError, match="start_ms"):
        generate(GeneratorConfig(n_events=1))
    cfg = GeneratorConfig(span_ms=3_600_000).resolved(now_ms=10_000_000)
    assert cfg.start_ms == 10_000_000 - 3_600_000
    assert cfg.resolved(now_ms=1) is cfg  # an explicit start is kept


@pytest.mark.parametrize(
    "bad",
    [
        {"n_events": -1},
        {"n_docs": 0},
        {"n_queries": 0},
        {"span_ms": 0},
        {"duplicate_fraction": 1.5},
        {"invalid_fraction": -0.1},
        {"duplicate_fraction": 0.6, "invalid_fraction": 0.6},
        {"zipf_s": 0.0},
    ],
)
def test_config_rejects_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GeneratorConfig(**bad)


def test_valid_messages_follow_the_contract(noisy: list[GeneratedMessage]) -> None:
    now = time.time_ns() // 1_000_000
    valid = [m for m in noisy if m.kind in ("valid", "duplicate")]
    assert len(valid) > 15_000
    for m in valid:
        assert m.expected_reason is None
        assert classify(m.value, now) is None, m.value
        assert m.event is not None
        assert m.event == json.loads(m.value)
        sid = m.event.get("session_id")
        assert m.key == (None if sid is None else sid.encode())
    assert {e["type"] for e in _events(valid, ("valid", "duplicate"))} == set(EVENT_TYPES)


def test_event_ids_are_unique_except_duplicates(noisy: list[GeneratedMessage]) -> None:
    ids = [e["event_id"] for e in _events(noisy)]
    assert len(ids) == len(set(ids))
    assert all(len(i) == 32 for i in ids)


def test_broken_messages_get_exactly_their_tagged_reason(noisy: list[GeneratedMessage]) -> None:
    now = time.time_ns() // 1_000_000
    broken = [m for m in noisy if m.kind not in ("valid", "duplicate")]
    assert broken
    for m in broken:
        assert m.event is None
        assert m.expected_reason in DLQ_REASONS
        assert m.kind in INVALID_KINDS
        assert classify(m.value, now) == m.expected_reason, (m.kind, m.value[:200])
    # Every kind shows up (24 kinds, ~2000 broken messages), hence every reason too.
    assert {m.kind for m in broken} == set(INVALID_KINDS)
    assert {m.expected_reason for m in broken} == set(DLQ_REASONS)


def test_the_pipeline_decoder_agrees_with_every_tag(noisy: list[GeneratedMessage]) -> None:
    # The tags are claims about the pipeline: check them against its own decoder too.
    from dataflow.core.events import Rejection, decode

    now = time.time_ns() // 1_000_000
    for m in noisy:
        got = decode(m.value, now_ms=now, future_tolerance_ms=600_000)
        reason = got.reason if isinstance(got, Rejection) else None
        assert reason == m.expected_reason, (m.kind, got)


def test_broken_kinds_named_in_the_brief_are_what_they_say(noisy: list[GeneratedMessage]) -> None:
    by_kind: dict[str, list[bytes]] = collections.defaultdict(list)
    for m in noisy:
        by_kind[m.kind].append(m.value)
    for v in by_kind["non_utf8"]:
        with pytest.raises(UnicodeDecodeError):
            v.decode("utf-8")
    for v in by_kind["truncated_json"]:
        with pytest.raises(ValueError):
            json.loads(v)
    assert all(isinstance(json.loads(v), list) for v in by_kind["json_array"])
    assert all("event_id" not in json.loads(v) for v in by_kind["missing_event_id"])
    assert all(len(v) > 65_536 for v in by_kind["oversize_value"])
    assert all(len(json.loads(v)["doc_ids"]) > 1000 for v in by_kind["doc_ids_too_many"])
    assert all(json.loads(v)["ts"] > 4_102_444_800_000 for v in by_kind["future_timestamp"])


def test_noise_fractions_roughly_as_configured(noisy: list[GeneratedMessage]) -> None:
    kinds = collections.Counter(m.kind for m in noisy)
    n = len(noisy)
    assert 0.04 < kinds["duplicate"] / n < 0.06
    assert 0.085 < (n - kinds["duplicate"] - kinds["valid"]) / n < 0.115


def test_duplicates_repeat_an_earlier_valid_message_a_bit_later(
    noisy: list[GeneratedMessage],
) -> None:
    first_seen: dict[bytes, int] = {}
    gaps = []
    for i, m in enumerate(noisy):
        if m.kind == "valid":
            first_seen.setdefault(m.value, i)
        elif m.kind == "duplicate":
            assert m.value in first_seen  # same payload, byte for byte, seen before
            gaps.append(i - first_seen[m.value])
    assert gaps
    assert max(gaps) < 2_000  # "a bit later": within the last few hundred valid messages


def test_no_noise_means_no_duplicates_and_no_broken(clean: list[GeneratedMessage]) -> None:
    assert {m.kind for m in clean} == {"valid"}


def test_stream_is_in_event_time_order_without_disorder(clean: list[GeneratedMessage]) -> None:
    ts = [e["ts"] for e in _events(clean)]
    assert ts == sorted(ts)


def test_disorder_is_bounded_and_present(noisy: list[GeneratedMessage]) -> None:
    worst = 0
    high = 0
    for e in _events(noisy):
        worst = max(worst, high - e["ts"])
        high = max(high, e["ts"])
    assert 0 < worst <= 90_000


def test_sessions_are_ordered_and_short(noisy: list[GeneratedMessage]) -> None:
    sessions: dict[str, list[Any]] = collections.defaultdict(list)
    for e in _events(noisy):
        if "session_id" in e:
            sessions[e["session_id"]].append(e)
    assert len(sessions) > 1_000
    for evs in sessions.values():
        ts = sorted(e["ts"] for e in evs)
        assert ts[-1] - ts[0] <= 30 * 60_000
    # With disorder off, a session's events arrive in ts order.
    seen: dict[str, int] = {}
    for m in generate(_config(n_events=5_000)):
        assert m.event is not None
        sid = m.event.get("session_id")
        if sid is not None:
            assert m.event["ts"] >= seen.get(sid, 0)
            seen[sid] = m.event["ts"]


def test_event_times_stay_in_the_span() -> None:
    cfg = _config(n_events=5_000, span_ms=6 * 3_600_000)
    ts = [e["ts"] for e in generate_events(cfg)]
    assert min(ts) >= START
    assert max(ts) < START + cfg.span_ms
    # and they are spread over it, not bunched at the start
    assert max(ts) - min(ts) > 0.9 * cfg.span_ms


def test_session_shape(clean: list[GeneratedMessage]) -> None:
    sessions: dict[str, list[Any]] = collections.defaultdict(list)
    for e in _events(clean):
        if "session_id" in e:
            sessions[e["session_id"]].append(e)
    selects = searched = 0
    for evs in sessions.values():
        types = [e["type"] for e in evs]
        if types[0] == "ac_impression" and len(evs) == 1:
            assert evs[0]["ts"] >= START + 3 * 86_400_000 - 5_000  # cut by the span's end
        elif types[0] == "ac_impression":
            imp, sel = evs[0], evs[1]
            assert sel["type"] == "ac_select"
            assert 3 <= len(imp["candidates"]) <= 8
            assert sel["candidate"] in imp["candidates"]
            assert 1 <= len(imp["prefix"]) <= 4
            assert sel["prefix"] == imp["prefix"]
            assert 300 <= sel["ts"] - imp["ts"] <= 5_000
            selects += 1
            if any(
                e["type"] == "search_impression"
                and q_norm(e["query"]) == q_norm(sel["candidate"])
                and e["ts"] - sel["ts"] <= 60_000
                for e in evs[2:]
            ):
                searched += 1
        else:
            assert types[0] == "search_impression"
        search = [e for e in evs if e["type"] == "search_impression"]
        assert len(search) <= 1
        clicks = [e for e in evs if e["type"] == "click"]
        assert len(clicks) <= 3
        if clicks:
            docs = search[0]["doc_ids"]
            assert len(docs) == 10
            for c in clicks:
                assert c.get("query") == search[0].get("query")
                if "position" in c:
                    assert docs[c["position"] - 1] == c["doc_id"]
    assert 0.30 < selects / len(sessions) < 0.50  # autocomplete_fraction 0.4
    assert 0.75 < searched / selects < 0.95  # mostly within 60 s, some later or never


def test_clicks_favour_the_top_and_dwell_is_long_tailed(clean: list[GeneratedMessage]) -> None:
    events = _events(clean)
    pos = collections.Counter(e.get("position") for e in events if e["type"] == "click")
    assert pos[1] > 2 * pos[10] > 0
    dwell = [e["dwell_ms"] for e in events if e["type"] == "dwell"]
    long_share = sum(d >= 30_000 for d in dwell) / len(dwell)
    assert 0.1 < long_share < 0.5


def test_no_session_fraction_is_honoured() -> None:
    msgs = list(generate(_config(n_events=10_000, no_session_fraction=0.2)))
    without = [m for m in msgs if m.event is not None and "session_id" not in m.event]
    assert 0.15 < len(without) / len(msgs) < 0.25
    assert all(m.key is None for m in without)


def test_doc_popularity_is_skewed(clean: list[GeneratedMessage]) -> None:
    imp = collections.Counter(
        d for e in _events(clean) if e["type"] == "search_impression" for d in e["doc_ids"]
    )
    top = sum(c for _, c in imp.most_common(5_000 // 100))
    assert top / sum(imp.values()) > 0.10
    assert len(imp) > 1_000  # yet the long tail is seen


def test_awkward_doc_ids_are_present_and_valid(clean: list[GeneratedMessage]) -> None:
    docs = {d for e in _events(clean) if e["type"] == "search_impression" for d in e["doc_ids"]}
    awkward = {d for d in docs if not (d.isascii() and d.isalnum())}
    assert len(awkward) >= 5
    assert any(":" in d for d in awkward)
    assert any("%" in d for d in awkward)
    assert any(" " in d for d in awkward)
    assert any(not d.isascii() for d in awkward)
    assert all(_is_doc_id(d) for d in docs)


def test_query_forms_vary_but_normalise_together(clean: list[GeneratedMessage]) -> None:
    forms: dict[str, set[str]] = collections.defaultdict(set)
    for e in _events(clean):
        if e["type"] == "search_impression" and e.get("query"):
            forms[q_norm(e["query"])].add(e["query"])
    head = forms["iphone case"]
    assert "iPhone case" in head
    assert len(head) >= 4  # upper case, double space, full width ...
    assert any(any(unicodedata.east_asian_width(c) == "F" for c in q) for q in head)
    assert any(not q.isascii() for forms_ in forms.values() for q in forms_)


def test_generate_events_is_the_parsed_valid_messages(noisy: list[GeneratedMessage]) -> None:
    cfg = _config(
        n_events=20_000, duplicate_fraction=0.05, invalid_fraction=0.10, max_disorder_ms=90_000
    )
    assert generate_events(cfg) == _events(noisy, ("valid", "duplicate"))
    assert generate_events(cfg, include_duplicates=False) == _events(noisy)


def test_zipf_exponent_changes_the_skew() -> None:
    def head_share(s: float) -> float:
        imp = collections.Counter(
            d
            for e in generate_events(_config(n_events=5_000, zipf_s=s))
            if e["type"] == "search_impression"
            for d in e["doc_ids"]
        )
        return sum(c for _, c in imp.most_common(50)) / sum(imp.values())

    assert head_share(1.5) > head_share(0.6)


# ------------------------------------------------------------------------------ CLI


def test_cli_writes_the_same_messages_as_the_api(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    argv = [
        "--events",
        "3000",
        "--seed",
        "3",
        "--start-ms",
        str(START),
        "--span-hours",
        "2",
        "--invalid",
        "0.05",
        "--duplicates",
        "0.05",
        "--disorder-seconds",
        "10",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    cfg = GeneratorConfig(
        seed=3,
        n_events=3000,
        start_ms=START,
        span_ms=2 * 3_600_000,
        invalid_fraction=0.05,
        duplicate_fraction=0.05,
        max_disorder_ms=10_000,
    )
    expected = b"".join(m.value + b"\n" for m in generate(cfg))
    assert out.read_bytes() == expected


def test_cli_help_runs_as_a_module() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "dataflow.tools.generator", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0
    for flag in ("--events", "--kafka", "--out", "--topic", "--disorder-seconds"):
        assert flag in res.stdout


def test_cli_stdout_and_bad_arguments() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "dataflow.tools.generator",
            "--events",
            "50",
            "--start-ms",
            str(START),
            "--out",
            "-",
        ],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert len(lines) == 50
    assert all(json.loads(line)["ts"] >= START for line in lines)
    assert b"events/s" in res.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "dataflow.tools.generator", "--invalid", "2", "--out", "-"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert bad.returncode != 0
    assert b"--invalid" in bad.stderr


def test_pure_generation_does_not_import_kafka() -> None:
    code = (
        "import sys, dataflow.tools.generator as g; "
        f"list(g.generate(g.GeneratorConfig(n_events=10, start_ms={START}))); "
        "print('confluent_kafka' in sys.modules)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == "False"


class _FakeProducer:
    instances: list[_FakeProducer] = []

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.flushed = False
        _FakeProducer.instances.append(self)

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
        self.sent.append((topic, value, key))
        on_delivery(None, None)

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        self.flushed = True
        return 0


def test_cli_produces_to_kafka_with_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", _FakeProducer)
    monkeypatch.setenv("KAFKA_BROKERS", "broker-a:9092,broker-b:9092")
    monkeypatch.setenv("KAFKA_TOPICS", "events-x, events-y")
    _FakeProducer.instances.clear()
    assert main(["--events", "500", "--start-ms", str(START)]) == 0
    (producer,) = _FakeProducer.instances
    assert producer.conf["bootstrap.servers"] == "broker-a:9092,broker-b:9092"
    assert producer.conf["linger.ms"] == 20
    assert producer.conf["compression.type"] == "lz4"  # the fake accepts it, like the wheel
    assert producer.flushed
    expected = [(m.value, m.key) for m in generate(_config(n_events=500))]
    assert [(v, k) for _, v, k in producer.sent] == expected
    assert {t for t, _, _ in producer.sent} == {"events-x"}


def test_cli_reports_undelivered_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    import confluent_kafka

    class Failing(_FakeProducer):
        def flush(self, timeout: float) -> int:
            return 7  # seven messages still queued when the timeout hit

    monkeypatch.setattr(confluent_kafka, "Producer", Failing)
    assert main(["--events", "20", "--start-ms", str(START), "--kafka", "x:1", "--topic", "t"]) == 1
    assert Failing.instances[-1].conf["bootstrap.servers"] == "x:1"


def test_generation_speed_is_not_pathological() -> None:
    # The real figure (>= 50k events/s on one core) is measured by hand and reported in the
    # docs; this only catches an accidental quadratic slowdown, with a wide margin.
    cfg = _config(n_events=20_000)
    list(generate(_config(n_events=10)))  # build the catalogue outside the timing
    started = time.process_time()
    n = sum(1 for _ in generate(cfg))
    rate = n / max(time.process_time() - started, 1e-9)
    assert rate > 5_000
    assert math.isfinite(rate)
