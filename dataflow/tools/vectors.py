"""`python -m dataflow.tools.vectors [--write docs/feature-store-vectors.json]`: test vectors
for feature-store readers written in other languages.

The file holds, computed by the pipeline's own code:

- `queries`: awkward queries, their normalised form (`q_norm`) and `query_hash`;
- `keys`: the exact Redis key of every family for awkward ids and texts (unicode,
  full-width, `:`, `%`, spaces, empty query, long ids), as text and as UTF-8 hex;
- `features`: small event sequences and the exact hash of every key they write, at the
  `as_of` the hash carries (the newest event of the sequence sets the clock);
- `decay`: a decayed field brought forward to a read time, as a reader does;
- `missing`: what a reader returns for a key that does not exist (prior defaults).

`tests/tools/test_vectors.py` asserts that the file equals what this module computes and that
the feature hashes equal the reference model's, so a reader in Java or Go that reproduces
the file reads the store exactly (docs/contract.md, "Reading from other languages").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from dataflow.core import aclink, counters, keys
from dataflow.core.counters import KeyState
from dataflow.core.events import Event, Rejection, decode
from dataflow.core.families import (
    AC,
    ACQ,
    DOC,
    LAYOUTS,
    QD,
    FeatureParams,
    fields_for,
    updates_for,
)
from dataflow.core.shard import FeatureShard
from dataflow.core.windows import DAY_MS, HALF_LIFE_MS, decay_factor

PREFIX: Final = "feat"
T0: Final = 20_787 * DAY_MS + 9 * 3_600_000  # 2026-11-30 09:00 UTC
MIN: Final = 60_000

QUERIES: Final = [
    "iphone case",
    "  iPhone\tCASE\n",
    "ＩＰｈｏｎｅ　Ｃａｓｅ",
    "Straße",
    "ﬁlm noir",
    "é vs e\u0301",
    "",
    "a:b%c",
]

DOC_IDS: Final = [
    "d1",
    "a:b",
    "50%",
    "with space",
    "é",
    "ＡＢＣ",
    "Doc-1_x.y~z",
    "d/" + "x" * 250,
]


def _query_vectors() -> list[dict[str, str]]:
    return [
        {"query": q, "normalized": keys.q_norm(q), "query_hash": keys.query_hash(q)}
        for q in QUERIES
    ]


def _key(family: str, key: str, **inputs: str) -> dict[str, str]:
    return {"family": family, **inputs, "key": key, "key_utf8_hex": key.encode().hex()}


def _key_vectors() -> list[dict[str, str]]:
    out = [_key("doc", keys.doc_key(PREFIX, d), doc_id=d) for d in DOC_IDS]
    out += [
        _key("qd", keys.qd_key(PREFIX, q, d), query=q, doc_id=d)
        for q, d in [("iphone case", "d1"), ("ＩＰｈｏｎｅ　Ｃａｓｅ", "a:b"), ("a:b%c", "50%")]
    ]
    out += [
        _key("ac", keys.ac_key(PREFIX, p, c), prefix=p, candidate=c)
        for p, c in [
            ("ip", "iPhone  Case"),
            (" IP ", "ｉｐａｄ"),
            ("a:b", "c%d"),
            ("str", "Straße"),
        ]
    ]
    out += [_key("acq", keys.acq_key(PREFIX, c), candidate=c) for c in ["iPhone Case", "Straße"]]
    return out


def _event(kind: str, i: int, minutes: int, **fields: Any) -> dict[str, Any]:
    return {"event_id": f"{kind}-{i}", "type": kind, "ts": T0 + minutes * MIN, **fields}


SEQUENCES: Final[list[tuple[str, list[dict[str, Any]]]]] = [
    (
        "a search, a click at position 2, a long dwell",
        [
            _event("search_impression", 1, 0, query="iPhone Case", doc_ids=["d1", "a:b", "d1"]),
            _event("click", 2, 1, query="iPhone Case", doc_id="a:b", position=2),
            _event("dwell", 3, 3, query="iPhone Case", doc_id="a:b", dwell_ms=45_000),
        ],
    ),
    (
        "impressions spread over 10 days: 7-day and 30-day windows and decay differ",
        [
            _event("search_impression", 10 + day, day * 24 * 60, query="", doc_ids=["é"])
            for day in range(10)
        ]
        + [_event("click", 20, 9 * 24 * 60 + 5, query="", doc_id="é")],
    ),
    (
        "autocomplete: a select searched and clicked within its windows",
        [
            _event("ac_impression", 30, 0, session_id="s1", prefix="ip",
                   candidates=["iPhone Case", "ipad"]),
            _event("ac_select", 31, 0, session_id="s1", prefix="ip", candidate="iPhone Case"),
            _event("search_impression", 32, 0, session_id="s1", query="iphone case",
                   doc_ids=["d1"]),
            _event("click", 33, 10, session_id="s1", query="iphone case", doc_id="d1"),
        ],
    ),
]  # fmt: skip


def hashes(raw: Sequence[dict[str, Any]], params: FeatureParams | None = None) -> dict[str, Any]:
    """Every hash the pipeline stores for these events (distinct ids, in order), through the
    pipeline's own decoding, fan-out, link join and state shard."""
    params = params or FeatureParams()
    events: list[Event] = []
    clock = 0
    for r in raw:
        decoded = decode(
            orjson.dumps(r), now_ms=T0 + 30 * DAY_MS, future_tolerance_ms=0, clock=clock
        )
        if isinstance(decoded, Rejection):
            raise ValueError(f"{r}: {decoded.detail}")
        clock = decoded.clock
        events.append(decoded)
    shard = FeatureShard(params)
    shard.step([[u for e in events for u in updates_for(e, params)]])
    routed = aclink.route(events, 1)
    join = aclink.LinkShard()
    links = [u for items in routed.by_shard.values() for u in join.step(items)]
    shard.step([links + routed.direct])
    writes = shard.flush(everything=True).writes
    return {f"{PREFIX}:{k}": dict(v) for k, v in writes if v is not None}


def _decay_vector() -> dict[str, Any]:
    as_of, read = T0, T0 + 3 * DAY_MS + 5 * 3_600_000
    value = 12.5
    return {
        "value": value,
        "as_of": as_of,
        "read_ms": read,
        "half_life_ms": HALF_LIFE_MS,
        "decayed": value * decay_factor(as_of, read),
        "rule": "value * 2 ** (-(read_ms - as_of) / half_life_ms)",
    }


def _missing() -> dict[str, Any]:
    """The fields a reader returns for a missing key: zero counts, zero decayed sums, the
    prior rate α/(α+β) with the default priors, as_of 0."""
    params = FeatureParams()
    out: dict[str, Any] = {}
    for family, name in ((DOC, "doc"), (QD, "qd"), (AC, "ac"), (ACQ, "acq")):
        out[name] = fields_for(family, _empty(family), 0, params)
    return out


def _empty(family: int) -> KeyState:
    layout = LAYOUTS[family]
    return counters.add(None, layout, 0, (0,) * layout.counts)


def build() -> dict[str, Any]:
    return {
        "about": (
            "Test vectors of the search-features Redis feature store (docs/contract.md). "
            "Keys are UTF-8; integers are decimal strings, floats Python repr strings."
        ),
        "prefix": PREFIX,
        "queries": _query_vectors(),
        "keys": _key_vectors(),
        "features": [
            {"name": name, "events": events, "hashes": hashes(events)} for name, events in SEQUENCES
        ],
        "decay": _decay_vector(),
        "missing": _missing(),
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the vectors to this file")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        args.write.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
