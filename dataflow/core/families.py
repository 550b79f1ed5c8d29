"""The feature families: which counters an event feeds (fan-out) and which fields a key's
counters become (contract §4). Pure: no I/O, no clock.

An `Update` is `(family, key_suffix, ts, counts)`. The key suffix is the Redis key without
the configurable prefix, so state does not depend on the prefix (a replay into `feat_v2`
uses the same layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from dataflow.core import keys
from dataflow.core.counters import KeyState, Layout, totals
from dataflow.core.events import AcImpression, AcSelect, Click, Dwell, Event, SearchImpression
from dataflow.core.smoothing import Prior
from dataflow.core.windows import DAY_MS

DOC: Final = 0
QD: Final = 1
AC: Final = 2
ACQ: Final = 3

FAMILY_NAMES: Final = ("doc", "qd", "ac", "acq")

# Per-day counts of each family, and which of them get a decayed sum.
LAYOUTS: Final = (
    # doc: impressions, clicks, long clicks, expected clicks (in units of 2^-32)
    Layout(counts=4, decayed=(0, 1)),
    Layout(counts=4, decayed=(0, 1)),  # qd: same as doc
    Layout(counts=2),  # ac: impressions, selects
    Layout(counts=3),  # acq: selects, searched, clicked
)

LAYOUT_TABLE: Final = tuple((layout.counts, layout.decayed) for layout in LAYOUTS)
"""`LAYOUTS` as the compiled core takes them (`dataflow.core.native`): (counts, decayed
indexes) per family."""

Update = tuple[int, str, int, tuple[int, ...]]
"""(family, key suffix, event ts, counts to add)."""

Fields = Mapping[str, str]
"""A key's fields, name to text: the dict `fields_for` returns, or the compiled core's
read-only `Fields`, equal to it and in its order (`dataflow.core.native`)."""

_CLICK: Final = (0, 1, 0, 0)
_LONG_CLICK: Final = (0, 0, 1, 0)

EXPECTED_SCALE: Final = 1 << 32
"""Expected clicks are summed as integers in units of 2^-32, so the sums are exact and the
same in any arrival order."""

DEFAULT_REFERENCE_CTR: Final = (0.30, 0.15, 0.10, 0.07, 0.05, 0.04, 0.03, 0.025, 0.02, 0.015)
"""The reference click-through rate of positions 1, 2, …; the last one holds for every
position from there on. A configured curve (`COEC_REFERENCE_CTR`), not one learned from
the stream: a learned curve would make a key's values depend on when it was computed."""
_AC_IMPRESSION: Final = (1, 0)
_AC_SELECT: Final = (0, 1)


@dataclass(frozen=True, slots=True)
class FeatureParams:
    """Smoothing per family, popularity weights and the long-dwell threshold."""

    doc: Prior = field(default_factory=Prior)
    qd: Prior = field(default_factory=Prior)
    ac: Prior = field(default_factory=Prior)
    acq: Prior = field(default_factory=Prior)
    weight_click: float = 1.0
    weight_impression: float = 0.0
    weight_long_click: float = 0.0
    long_dwell_ms: int = 30_000
    reference_ctr: tuple[float, ...] = DEFAULT_REFERENCE_CTR
    coec_prior: float = 1.0

    def __post_init__(self) -> None:
        if not self.reference_ctr or self.coec_prior <= 0:
            raise ValueError("reference_ctr needs a position and coec_prior must be positive")

    def coec(self, clicks: int, expected: float) -> float:
        """Clicks over expected clicks, smoothed towards 1: `(k + a) / (e + a)`."""
        return (clicks + self.coec_prior) / (expected + self.coec_prior)


def expected_units(ctr: float) -> int:
    """One impression's expected clicks at a reference CTR, in units of 2^-32."""
    return round(ctr * EXPECTED_SCALE)


@lru_cache(maxsize=16)
def impressions_by_position(reference_ctr: tuple[float, ...]) -> tuple[tuple[int, ...], ...]:
    """The counts of an impression at each position (index 0: position 1); the last one
    holds for every position from there on. Cached: the fan-out asks once per event."""
    return tuple((1, 0, 0, expected_units(ctr)) for ctr in reference_ctr)


def family_of(suffix: str) -> int:
    """The family of a key suffix (`doc:…`, `qd:…`, `ac:…`, `acq:…`)."""
    return _FAMILY_BY_HEAD[suffix[:3]]


# The first three characters tell the families apart ("doc", "qd:", "ac:", "acq").
_FAMILY_BY_HEAD: Final = {"doc": DOC, "qd:": QD, "ac:": AC, "acq": ACQ}


def updates_for(event: Event, params: FeatureParams) -> list[Update]:
    """The counter updates one accepted event makes (contract §4 counting rules)."""
    ts = event.ts
    if isinstance(event, SearchImpression):
        qhash = qhash_or_none(event.query)
        out: list[Update] = []
        by_position = impressions_by_position(params.reference_ctr)
        last = len(by_position) - 1
        seen: set[str] = set()
        # Each distinct doc once, at the position of its first occurrence.
        for index, doc_id in enumerate(event.doc_ids):
            if doc_id in seen:
                continue
            seen.add(doc_id)
            counts = by_position[index if index < last else last]
            out.append((DOC, keys.doc_suffix(doc_id), ts, counts))
            if qhash is not None:
                out.append((QD, keys.qd_suffix(qhash, doc_id), ts, counts))
        return out
    if isinstance(event, Click):
        return _doc_and_qd(event.query, event.doc_id, ts, _CLICK)
    if isinstance(event, Dwell):
        if event.dwell_ms < params.long_dwell_ms:
            return []
        return _doc_and_qd(event.query, event.doc_id, ts, _LONG_CLICK)
    if isinstance(event, AcImpression):
        prefix = keys.q_norm(event.prefix)
        if not prefix:
            return []
        candidates = dict.fromkeys(keys.q_norm(c) for c in event.candidates)
        return [(AC, keys.ac_suffix(prefix, c), ts, _AC_IMPRESSION) for c in candidates if c]
    if isinstance(event, AcSelect):
        prefix = keys.q_norm(event.prefix)
        candidate = keys.q_norm(event.candidate)
        if not prefix or not candidate:
            return []
        return [(AC, keys.ac_suffix(prefix, candidate), ts, _AC_SELECT)]
    raise TypeError(f"not an event: {event!r}")  # unreachable for decoded events


def qhash_or_none(query: str) -> str | None:
    """The query hash of a raw query, or None for a query that normalises to nothing (no
    query-document update then)."""
    normalized = keys.q_norm(query) if query else ""
    return keys.hash_normalized(normalized) if normalized else None


def _doc_and_qd(query: str, doc_id: str, ts: int, counts: tuple[int, ...]) -> list[Update]:
    out: list[Update] = [(DOC, keys.doc_suffix(doc_id), ts, counts)]
    qhash = qhash_or_none(query)
    if qhash is not None:
        out.append((QD, keys.qd_suffix(qhash, doc_id), ts, counts))
    return out


def fields_for(family: int, state: KeyState, as_of: int, params: FeatureParams) -> Fields:
    """The Redis hash fields of one key at `as_of` (ints as decimal, floats as repr)."""
    t = totals(state, LAYOUTS[family], as_of // DAY_MS, as_of)
    if family in (DOC, QD):
        prior = params.doc if family == DOC else params.qd
        imp7, clk7, long7, _ = t.last_7d
        imp30, clk30, long30, expected_units30 = t.last_30d
        imp_decay, clk_decay = t.decayed
        expected30 = expected_units30 / EXPECTED_SCALE
        out = {
            "impressions_7d": str(imp7),
            "clicks_7d": str(clk7),
            "impressions_30d": str(imp30),
            "clicks_30d": str(clk30),
            "long_clicks_30d": str(long30),
            "ctr_7d": repr(prior.rate(clk7, imp7)),
            "ctr_30d": repr(prior.rate(clk30, imp30)),
            "impressions_decay": repr(imp_decay),
            "clicks_decay": repr(clk_decay),
            "ctr_decay": repr(prior.rate(clk_decay, imp_decay)),
            "as_of": str(as_of),
        }
        if family == DOC:
            out["popularity_7d"] = repr(popularity(params, imp7, clk7, long7))
            out["popularity_30d"] = repr(popularity(params, imp30, clk30, long30))
        out["expected_clicks_30d"] = repr(expected30)
        out["coec_30d"] = repr(params.coec(clk30, expected30))
        return out
    if family == AC:
        imp7, sel7 = t.last_7d
        imp30, sel30 = t.last_30d
        return {
            "impressions_7d": str(imp7),
            "selects_7d": str(sel7),
            "impressions_30d": str(imp30),
            "selects_30d": str(sel30),
            "select_rate_7d": repr(params.ac.rate(sel7, imp7)),
            "select_rate_30d": repr(params.ac.rate(sel30, imp30)),
            "as_of": str(as_of),
        }
    sel7, searched7, clicked7 = t.last_7d
    sel30, searched30, clicked30 = t.last_30d
    return {
        "selects_7d": str(sel7),
        "searched_7d": str(searched7),
        "clicked_7d": str(clicked7),
        "selects_30d": str(sel30),
        "searched_30d": str(searched30),
        "clicked_30d": str(clicked30),
        "search_rate_30d": repr(params.acq.rate(searched30, sel30)),
        "click_rate_30d": repr(params.acq.rate(clicked30, sel30)),
        "as_of": str(as_of),
    }


def popularity(params: FeatureParams, impressions: int, clicks: int, long_clicks: int) -> float:
    """The weighted popularity sum (always a float; weights may be fractional)."""
    return float(
        params.weight_click * clicks
        + params.weight_impression * impressions
        + params.weight_long_click * long_clicks
    )


def params_table(params: FeatureParams) -> tuple[float, ...]:
    """`params` as the compiled renderer takes them (`dataflow.core.native`): α and β of
    doc, qd, ac and acq, the three popularity weights and the COEC prior, as floats."""
    return (
        float(params.doc.alpha),
        float(params.doc.beta),
        float(params.qd.alpha),
        float(params.qd.beta),
        float(params.ac.alpha),
        float(params.ac.beta),
        float(params.acq.alpha),
        float(params.acq.beta),
        float(params.weight_click),
        float(params.weight_impression),
        float(params.weight_long_click),
        float(params.coec_prior),
    )
