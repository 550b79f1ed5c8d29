"""Brute-force reference model of the feature store: the test oracle.

Why this exists: the pipeline keeps incremental, sharded, snapshotted state, and the only
way to trust it is to compare it with something that has none of that. This module
recomputes the final contents of the feature store from the whole event list, straight from
``docs/contract.md`` (which wins over the upstream ``CONTRACT.md`` where they differ):

1. dedup in stream order (first copy wins, per ``(event_id, 10-minute slot)``, only while
   the slot is remembered);
2. the final clock ``C`` = largest ``ts`` of every (valid) event, and its day ``bc``;
3. every accepted event is turned into per-key *contributions* (one impression, click,
   long click or select at a ``ts``);
4. per key, the contributions inside the 30-day window at ``C`` are kept; a key with none
   is absent; every field is recomputed from scratch from the kept list.

It deliberately re-implements ``q_norm``, ``query_hash``, ``enc`` and the key formats from
the contract text instead of importing ``dataflow``: a shared bug would otherwise be
invisible. It compares event ids directly (no 64-bit digest), uses ``math.fsum`` for the
decayed sums, and favours obviousness over speed (20k events take well under a second or
two). The one thing it borrows is the numeric maximum-likelihood fit of a fitted prior
(``dataflow.core.priors.fit_beta``, checked on its own against the likelihood in
tests/core/test_priors.py); which keys, days and counts go into it are its own (4.6).

Adding a family: write a contribution rule that receives the whole accepted stream and a
fields rule, and add a ``FamilySpec`` to ``FAMILIES``. The ``acq`` family (contract 4.4) is
the example of a join: for each select it scans its session's events, with no state, no
expiry and no notion of arrival order, which is exactly what the pipeline's incremental
join (``dataflow/core/aclink.py``) must agree with within its disorder tolerance.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
import urllib.parse
import zlib
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from dataflow.core.priors import fit_beta
from dataflow.core.smoothing import Prior

__all__ = [
    "DAY_MS",
    "FAMILIES",
    "Contribution",
    "Event",
    "FamilySpec",
    "ModelParams",
    "Store",
    "ac_key",
    "acq_key",
    "as_redis_strings",
    "bucket",
    "decode_store",
    "dedup_flags",
    "diff_acq_lower_bound",
    "diff_stores",
    "doc_key",
    "enc",
    "expected_store",
    "features_at",
    "final_clock",
    "max_disorder_ms",
    "model_dedup",
    "published_prior",
    "q_norm",
    "qd_key",
    "query_hash",
    "select_families",
]

DAY_MS = 86_400_000
"""One UTC day in milliseconds: the bucket size of every window."""

WINDOW_7D = 7
WINDOW_30D = 30

ACQ_SEARCH_WINDOW_MS = 60_000
"""A select at ``t`` is searched by a search at ``t <= ts <= t + 60 s`` (both ends in)."""
ACQ_CLICK_WINDOW_MS = 1_800_000
"""A select at ``t`` is clicked by a click at ``t <= ts <= t + 30 min`` (both ends in)."""

Event = Mapping[str, Any]
"""One valid event: the JSON object of contract section 1, already validated."""

FieldValue = int | float
Store = dict[str, dict[str, FieldValue]]
"""Redis key -> hash fields, with ints as ``int`` and floats as ``float``."""

RawStore = Mapping[Any, Mapping[Any, Any]]
"""A store as read back from Redis: keys, fields and values are ``str`` or ``bytes``."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ModelParams:
    """Every knob of the contract that changes stored values, with the contract defaults.

    Kept separate from the pipeline's config object on purpose: a test states the values it
    runs the pipeline with, and the oracle is told the same values independently.
    """

    doc_alpha: float = 1
    doc_beta: float = 20
    qd_alpha: float = 1
    qd_beta: float = 20
    ac_alpha: float = 1
    ac_beta: float = 20
    acq_alpha: float = 1
    acq_beta: float = 20
    popularity_weight_click: float = 1
    popularity_weight_impression: float = 0
    popularity_weight_long_click: float = 0
    long_dwell_ms: int = 30_000
    # Contract 6b: the reference CTR of positions 1, 2, ...; the last for every later one.
    coec_reference_ctr: tuple[float, ...] = (
        0.30, 0.15, 0.10, 0.07, 0.05, 0.04, 0.03, 0.025, 0.02, 0.015,
    )  # fmt: skip
    coec_prior: float = 1.0
    half_life_ms: int = 604_800_000
    dedup_slot_ms: int = 600_000
    dedup_horizon_ms: int = 86_400_000
    # Contract 4.6: families whose prior is fitted from their keys, and the fit's knobs.
    fitted: tuple[str, ...] = ()
    fit_sample: int = 16
    fit_min_keys: int = 100
    fit_min_trials: int = 20

    def smoothing(self, family: str) -> tuple[float, float]:
        """``(alpha, beta)`` of a family; a table, so an unknown family fails loudly."""
        table = {
            "doc": (self.doc_alpha, self.doc_beta),
            "qd": (self.qd_alpha, self.qd_beta),
            "ac": (self.ac_alpha, self.ac_beta),
            "acq": (self.acq_alpha, self.acq_beta),
        }
        return table[family]


DEFAULT_PARAMS = ModelParams()


# ------------------------------------------------------------------ normalisation, keys


def q_norm(s: str | None) -> str:
    """NFKC, casefold, collapse whitespace (contract section 2); ``None`` means no query."""
    if s is None:
        return ""
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


def query_hash(q: str) -> str:
    """16 hex chars of BLAKE2b-64 over the normalised query (contract section 2)."""
    return hashlib.blake2b(q_norm(q).encode("utf-8"), digest_size=8).hexdigest()


def enc(s: str) -> str:
    """Percent-encode a key component taken from input, so ``:`` can never split a key."""
    return urllib.parse.quote(s, safe="")


def doc_key(prefix: str, doc_id: str) -> str:
    """``P:doc:{enc(doc_id)}``; the doc id is used exactly as given (case and all)."""
    return f"{prefix}:doc:{enc(doc_id)}"


def qd_key(prefix: str, query: str, doc_id: str) -> str:
    """``P:qd:{query_hash(query)}:{enc(doc_id)}``."""
    return f"{prefix}:qd:{query_hash(query)}:{enc(doc_id)}"


def ac_key(prefix: str, ac_prefix: str, candidate: str) -> str:
    """``P:ac:{enc(q_norm(prefix))}:{enc(q_norm(candidate))}``."""
    return f"{prefix}:ac:{enc(q_norm(ac_prefix))}:{enc(q_norm(candidate))}"


def acq_key(prefix: str, candidate: str) -> str:
    """``P:acq:{query_hash(candidate)}``: the typed prefix is not part of it."""
    return f"{prefix}:acq:{query_hash(candidate)}"


# ------------------------------------------------------------------------------- time


def bucket(t: int) -> int:
    """UTC day of an epoch-millisecond time."""
    return t // DAY_MS


def in_window(ts: int, as_of: int, days: int) -> bool:
    """Whether ``bucket(ts)`` is in ``(bucket(as_of) - days, bucket(as_of)]``."""
    return bucket(as_of) - days < bucket(ts) <= bucket(as_of)


def final_clock(events: Iterable[Event]) -> int:
    """The clock after the whole stream: the largest ``ts`` of any valid event.

    Duplicates and late events are valid events, so they count too (contract section 3:
    valid means "not sent to the dead-letter topic").
    """
    stamps = [int(e["ts"]) for e in events]
    if not stamps:
        raise ValueError("final_clock of an empty stream: the clock has no value yet")
    return max(stamps)


# ------------------------------------------------------------------------------ dedup


def dedup_slot(ts: int, params: ModelParams = DEFAULT_PARAMS) -> int:
    """The 10-minute slot an event's id is remembered in."""
    return ts // params.dedup_slot_ms


def slot_forgotten(slot: int, clock: int, params: ModelParams = DEFAULT_PARAMS) -> bool:
    """A slot is forgotten once the clock *passes* (strictly exceeds) its end + 24 h."""
    return clock > (slot + 1) * params.dedup_slot_ms + params.dedup_horizon_ms


def dedup_flags(
    events: Iterable[Event],
    *,
    params: ModelParams = DEFAULT_PARAMS,
    partitions: Iterable[int] | None = None,
) -> list[bool]:
    """For each event in stream order, ``True`` if accepted and ``False`` if a duplicate.

    An event is a duplicate when an earlier *accepted* event has the same ``event_id`` and
    the same slot, and that slot is not forgotten at the clock of the event's partition (the
    largest ``ts`` read from that partition so far, this event included; contract §5).
    ``partitions`` gives each event's partition, in stream order; without it the stream is
    one partition, whose clock is the whole stream's. Including this event's own ``ts`` or
    not makes no difference: a ``ts`` inside a slot is always before that slot's horizon.
    Because a clock never goes back, "forgotten" is permanent for that partition, so a set
    of accepted ``(id, slot)`` pairs plus the forgotten test is exactly the rule, with no
    expiry bookkeeping. (Copies of one event read from partitions days apart in event time
    are the contract's one limit; the model does not cover them.)
    """
    stream = list(events)
    origins = [0] * len(stream) if partitions is None else list(partitions)
    if len(origins) != len(stream):
        raise ValueError(f"{len(origins)} partitions for {len(stream)} events")
    accepted: set[tuple[str, int]] = set()
    flags: list[bool] = []
    clocks: dict[int, int] = {}
    for event, origin in zip(stream, origins, strict=True):
        ts = int(event["ts"])
        clock = clocks[origin] = max(clocks.get(origin, ts), ts)
        ident = (str(event["event_id"]), dedup_slot(ts, params))
        duplicate = ident in accepted and not slot_forgotten(ident[1], clock, params)
        flags.append(not duplicate)
        if not duplicate:
            accepted.add(ident)
    return flags


def model_dedup(
    events: Iterable[Event],
    *,
    params: ModelParams = DEFAULT_PARAMS,
    partitions: Iterable[int] | None = None,
) -> list[Event]:
    """The accepted events, in stream order (see ``dedup_flags`` for the rule)."""
    stream = list(events)
    flags = dedup_flags(stream, params=params, partitions=partitions)
    return [e for e, ok in zip(stream, flags, strict=True) if ok]


# ---------------------------------------------------------------------- contributions


class Contribution(NamedTuple):
    """One unit credited to one key at one event time.

    ``kind`` is ``impression``, ``click``, ``long_click`` or ``select``, and for ``acq``
    also ``searched`` and ``clicked`` (credited at the *select's* ``ts``). Every field of a
    key is a function of its list of contributions.
    """

    family: str
    key: str
    kind: str
    ts: int
    expected: int = 0
    """For a search impression: its expected clicks, ``round(ctr_ref(position) * 2^32)``."""


ContributionRule = Callable[[Sequence[Event], str, ModelParams], Iterator[Contribution]]
"""``(accepted events, feature prefix, params) -> contributions`` of one family.

It gets the whole accepted stream, not one event, so that a family defined by joins
across events (``acq``: a select followed by a search in the same session) fits too.
"""

FieldsRule = Callable[[str, Sequence[Contribution], int, ModelParams], dict[str, FieldValue]]
"""``(family, kept contributions, as_of, params) -> fields`` without ``as_of``."""


def _distinct(items: Iterable[str]) -> list[str]:
    """Distinct items, first occurrence order (an impression counts a doc once)."""
    return list(dict.fromkeys(items))


def _expected_units(position: int, params: ModelParams) -> int:
    """Contract 6b: an impression at ``position`` (1-based) expects ``ctr_ref(position)``
    clicks, summed in units of 2^-32."""
    curve = params.coec_reference_ctr
    return round(curve[min(position, len(curve)) - 1] * 2**32)


def _search_side(event: Event, params: ModelParams) -> list[tuple[str, str, str, int]]:
    """``(kind, doc_id, normalised query, expected clicks)`` credits of one search-side
    event.

    Shared by the doc and qd families, which count the same things at different keys.
    """
    etype = event["type"]
    query = q_norm(event.get("query"))
    if etype == "search_impression":
        docs = list(event["doc_ids"])
        return [
            ("impression", doc, query, _expected_units(docs.index(doc) + 1, params))
            for doc in _distinct(docs)
        ]
    if etype == "click":
        return [("click", event["doc_id"], query, 0)]
    if etype == "dwell" and int(event["dwell_ms"]) >= params.long_dwell_ms:
        return [("long_click", event["doc_id"], query, 0)]
    return []


def doc_contributions(
    accepted: Sequence[Event], prefix: str, params: ModelParams
) -> Iterator[Contribution]:
    """Impressions, clicks and long clicks per document (contract 4.1)."""
    for event in accepted:
        for kind, doc, _query, expected in _search_side(event, params):
            yield Contribution("doc", doc_key(prefix, doc), kind, int(event["ts"]), expected)


def qd_contributions(
    accepted: Sequence[Event], prefix: str, params: ModelParams
) -> Iterator[Contribution]:
    """The same per (normalised query, doc); an empty normalised query gives nothing."""
    for event in accepted:
        for kind, doc, query, expected in _search_side(event, params):
            if query:
                key = qd_key(prefix, query, doc)
                yield Contribution("qd", key, kind, int(event["ts"]), expected)


def ac_contributions(
    accepted: Sequence[Event], prefix: str, params: ModelParams
) -> Iterator[Contribution]:
    """Impressions and selects per (normalised prefix, normalised candidate) (contract 4.3).

    An empty normalised prefix or candidate contributes nothing; an impression counts each
    distinct *normalised* candidate once.
    """
    del params  # no knob changes which autocomplete contributions exist
    for event in accepted:
        etype = event["type"]
        if etype not in ("ac_impression", "ac_select"):
            continue
        ts = int(event["ts"])
        ac_prefix = q_norm(event["prefix"])
        if not ac_prefix:
            continue
        if etype == "ac_impression":
            for cand in _distinct(q_norm(c) for c in event["candidates"]):
                if cand:
                    yield Contribution("ac", ac_key(prefix, ac_prefix, cand), "impression", ts)
        else:
            cand = q_norm(event["candidate"])
            if cand:
                yield Contribution("ac", ac_key(prefix, ac_prefix, cand), "select", ts)


def _session(event: Event) -> str | None:
    """The event's session, or ``None``: missing, ``null`` and ``""`` are no session (an
    empty id cannot tell two visitors apart, so it must not join them)."""
    session = event.get("session_id")
    return session if session else None


def acq_contributions(
    accepted: Sequence[Event], prefix: str, params: ModelParams
) -> Iterator[Contribution]:
    """Selects, and which of them were searched or clicked (contract 4.4), by brute force.

    Every ``ac_select`` whose candidate normalises to a non-empty string is one select at
    its key (the typed prefix plays no part). With a session, it is *searched* when that
    session has any ``search_impression`` whose normalised query equals the normalised
    candidate at ``t <= ts <= t + 60 s``, and *clicked* likewise for a ``click`` within
    ``30 min``: once each, however many partners qualify, and one partner may serve several
    selects. Both are credited at the select's ``ts``. Dwells are not clicks.
    """
    del params  # no knob changes the link
    by_session: dict[str, list[Event]] = defaultdict(list)
    for event in accepted:
        session = _session(event)
        if session is not None:
            by_session[session].append(event)
    for event in accepted:
        if event["type"] != "ac_select":
            continue
        candidate = q_norm(event["candidate"])
        if not candidate:
            continue
        t = int(event["ts"])
        key = acq_key(prefix, candidate)
        yield Contribution("acq", key, "select", t)
        session = _session(event)
        if session is None:
            continue
        partners = by_session[session]
        if _has_partner(partners, "search_impression", candidate, t, ACQ_SEARCH_WINDOW_MS):
            yield Contribution("acq", key, "searched", t)
        if _has_partner(partners, "click", candidate, t, ACQ_CLICK_WINDOW_MS):
            yield Contribution("acq", key, "clicked", t)


def _has_partner(
    session_events: Sequence[Event], etype: str, candidate: str, t: int, window: int
) -> bool:
    return any(
        e["type"] == etype
        and q_norm(e.get("query")) == candidate
        and t <= int(e["ts"]) <= t + window
        for e in session_events
    )


# ----------------------------------------------------------------------------- fields


def window_count(kept: Sequence[Contribution], kind: str, as_of: int, days: int) -> int:
    """Number of ``kind`` contributions in the ``days``-day window at ``as_of``."""
    return sum(1 for c in kept if c.kind == kind and in_window(c.ts, as_of, days))


def decayed_sum(kept: Sequence[Contribution], kind: str, as_of: int, params: ModelParams) -> float:
    """``sum 2^(-(as_of - ts)/H)`` over the kept ``kind`` contributions, with ``fsum``.

    ``fsum`` makes this the correctly rounded sum of the per-event weights: the pipeline's
    fixed-point per-day sums must land within ``1e-9`` of it.
    """
    return math.fsum(2.0 ** (-(as_of - c.ts) / params.half_life_ms) for c in kept if c.kind == kind)


def smoothed(k: float, n: float, alpha: float, beta: float) -> float:
    """``(k + alpha) / (n + alpha + beta)``: a rate that is the prior when nothing is seen."""
    return float((k + alpha) / (n + alpha + beta))


def _popularity(clicks: int, impressions: int, long_clicks: int, params: ModelParams) -> float:
    """Weighted sum, always a float (contract 4.1 Choice: weights may be fractional)."""
    return float(
        params.popularity_weight_click * clicks
        + params.popularity_weight_impression * impressions
        + params.popularity_weight_long_click * long_clicks
    )


def click_fields(
    family: str, kept: Sequence[Contribution], as_of: int, params: ModelParams
) -> dict[str, FieldValue]:
    """Fields shared by ``doc`` and ``qd``; ``doc`` also gets the popularity pair."""
    alpha, beta = params.smoothing(family)
    imp7 = window_count(kept, "impression", as_of, WINDOW_7D)
    clk7 = window_count(kept, "click", as_of, WINDOW_7D)
    long7 = window_count(kept, "long_click", as_of, WINDOW_7D)
    imp30 = window_count(kept, "impression", as_of, WINDOW_30D)
    clk30 = window_count(kept, "click", as_of, WINDOW_30D)
    long30 = window_count(kept, "long_click", as_of, WINDOW_30D)
    imp_decay = decayed_sum(kept, "impression", as_of, params)
    clk_decay = decayed_sum(kept, "click", as_of, params)
    fields: dict[str, FieldValue] = {
        "impressions_7d": imp7,
        "clicks_7d": clk7,
        "impressions_30d": imp30,
        "clicks_30d": clk30,
        "long_clicks_30d": long30,
        "ctr_7d": smoothed(clk7, imp7, alpha, beta),
        "ctr_30d": smoothed(clk30, imp30, alpha, beta),
        "impressions_decay": imp_decay,
        "clicks_decay": clk_decay,
        "ctr_decay": smoothed(clk_decay, imp_decay, alpha, beta),
    }
    if family == "doc":
        fields["popularity_7d"] = _popularity(clk7, imp7, long7, params)
        fields["popularity_30d"] = _popularity(clk30, imp30, long30, params)
    # Contract 6b: expected clicks over the 30-day window, and clicks over them, smoothed.
    expected30 = sum(c.expected for c in kept if in_window(c.ts, as_of, WINDOW_30D)) / 2**32
    fields["expected_clicks_30d"] = expected30
    fields["coec_30d"] = (clk30 + params.coec_prior) / (expected30 + params.coec_prior)
    return fields


def ac_fields(
    family: str, kept: Sequence[Contribution], as_of: int, params: ModelParams
) -> dict[str, FieldValue]:
    """Autocomplete candidate fields (contract 4.3)."""
    alpha, beta = params.smoothing(family)
    imp7 = window_count(kept, "impression", as_of, WINDOW_7D)
    sel7 = window_count(kept, "select", as_of, WINDOW_7D)
    imp30 = window_count(kept, "impression", as_of, WINDOW_30D)
    sel30 = window_count(kept, "select", as_of, WINDOW_30D)
    return {
        "impressions_7d": imp7,
        "selects_7d": sel7,
        "impressions_30d": imp30,
        "selects_30d": sel30,
        "select_rate_7d": smoothed(sel7, imp7, alpha, beta),
        "select_rate_30d": smoothed(sel30, imp30, alpha, beta),
    }


def acq_fields(
    family: str, kept: Sequence[Contribution], as_of: int, params: ModelParams
) -> dict[str, FieldValue]:
    """Autocomplete-to-search link fields (contract 4.4); rates are smoothed over selects."""
    alpha, beta = params.smoothing(family)
    counts = {
        (kind, days): window_count(kept, kind, as_of, days)
        for kind in ("select", "searched", "clicked")
        for days in (WINDOW_7D, WINDOW_30D)
    }
    sel30 = counts["select", WINDOW_30D]
    return {
        "selects_7d": counts["select", WINDOW_7D],
        "searched_7d": counts["searched", WINDOW_7D],
        "clicked_7d": counts["clicked", WINDOW_7D],
        "selects_30d": sel30,
        "searched_30d": counts["searched", WINDOW_30D],
        "clicked_30d": counts["clicked", WINDOW_30D],
        "search_rate_30d": smoothed(counts["searched", WINDOW_30D], sel30, alpha, beta),
        "click_rate_30d": smoothed(counts["clicked", WINDOW_30D], sel30, alpha, beta),
    }


@dataclass(frozen=True)
class FamilySpec:
    """How one key family is derived: which contributions exist, and what they make."""

    name: str
    contributions: ContributionRule
    fields: FieldsRule


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("doc", doc_contributions, click_fields),
    FamilySpec("qd", qd_contributions, click_fields),
    FamilySpec("ac", ac_contributions, ac_fields),
    FamilySpec("acq", acq_contributions, acq_fields),
)


# ------------------------------------------------------------------------------ store


# ---------------------------------------------------------------------- fitted priors

_SUCCESS_KIND = {"doc": "click", "qd": "click", "ac": "select"}


def in_fit_sample(suffix: str, sample: int) -> bool:
    """Contract 4.6: a key feeds its family's fit when the high 16 bits of the CRC-32 of its
    suffix are 0 modulo the sample size."""
    return sample == 1 or (zlib.crc32(suffix.encode("utf-8")) >> 16) % sample == 0


def fit_pairs(
    family: str,
    by_key: Mapping[str, Sequence[Contribution]],
    day: int,
    prefix: str,
    params: ModelParams = DEFAULT_PARAMS,
) -> list[tuple[int, int]]:
    """``(successes, trials)`` of each sampled key over days ``day-29 .. day-2``."""
    first, last = day - 29, day - 2
    pairs = []
    for key, contribs in by_key.items():
        if not in_fit_sample(key[len(prefix) + 1 :], params.fit_sample):
            continue
        inside = [c for c in contribs if first <= bucket(c.ts) <= last]
        trials = sum(1 for c in inside if c.kind == "impression")
        successes = sum(1 for c in inside if c.kind == _SUCCESS_KIND[family])
        if trials or successes:
            pairs.append((successes, trials))
    return pairs


def fitted_prior(
    family: str,
    by_key: Mapping[str, Sequence[Contribution]],
    day: int,
    prefix: str,
    params: ModelParams = DEFAULT_PARAMS,
) -> tuple[float, float]:
    """The prior of ``family`` in force on ``day``: the maximum-likelihood Beta of the sampled
    keys (the numeric fit is the pipeline's ``fit_beta``, checked on its own in
    tests/core/test_priors.py), or the configured one when the fit falls back."""
    alpha, beta = params.smoothing(family)
    fit_alpha, fit_beta_, _, reason = fit_beta(
        fit_pairs(family, by_key, day, prefix, params),
        Prior(alpha, beta),
        min_keys=params.fit_min_keys,
        min_trials=params.fit_min_trials,
    )
    return (alpha, beta) if reason else (fit_alpha, fit_beta_)


def published_prior(
    events: Iterable[Event],
    family: str,
    day: int,
    *,
    prefix: str = "feat",
    params: ModelParams = DEFAULT_PARAMS,
    partitions: Iterable[int] | None = None,
) -> dict[str, str]:
    """`P:prior:{family}` as the pipeline publishes the prior of ``day`` (contract 4.6)."""
    stream = list(events)
    accepted = model_dedup(stream, params=params, partitions=partitions)
    spec = next(s for s in FAMILIES if s.name == family)
    by_key: dict[str, list[Contribution]] = defaultdict(list)
    for contrib in spec.contributions(accepted, prefix, params):
        by_key[contrib.key].append(contrib)
    alpha, beta = params.smoothing(family)
    fit_alpha, fit_beta_, keys, reason = fit_beta(
        fit_pairs(family, by_key, day, prefix, params),
        Prior(alpha, beta),
        min_keys=params.fit_min_keys,
        min_trials=params.fit_min_trials,
    )
    return {
        "alpha": repr(float(fit_alpha)),
        "beta": repr(float(fit_beta_)),
        "day": str(day),
        "keys": str(keys),
        "source": "fixed" if reason else "fitted",
        "reason": reason,
    }


def features_at(
    accepted: Sequence[Event],
    clock: int,
    *,
    prefix: str = "feat",
    params: ModelParams = DEFAULT_PARAMS,
    families: Sequence[FamilySpec] = FAMILIES,
) -> Store:
    """The store as a pure function of (accepted events, clock), per docs/contract.md 3.

    Per key: keep the contributions whose day is inside the 30-day window of the clock's
    day; no kept contribution means no key; otherwise
    ``as_of = max(newest kept ts, start of the clock's day)`` and every field is computed
    from the kept list at that ``as_of``.
    """
    bc = bucket(clock)
    day_start = bc * DAY_MS
    store: Store = {}
    for spec in families:
        by_key: dict[str, list[Contribution]] = defaultdict(list)
        for contrib in spec.contributions(accepted, prefix, params):
            if contrib.ts > clock:
                raise ValueError(f"event at ts={contrib.ts} is after the clock {clock}")
            by_key[contrib.key].append(contrib)
        family_params = params
        if spec.name in params.fitted:
            alpha, beta = fitted_prior(spec.name, by_key, bc, prefix, params)
            family_params = replace(
                params, **{f"{spec.name}_alpha": alpha, f"{spec.name}_beta": beta}
            )
        for key, contribs in by_key.items():
            kept = [c for c in contribs if bucket(c.ts) > bc - WINDOW_30D]
            if not kept:
                continue
            newest = max(c.ts for c in kept)
            as_of = max(newest, day_start)
            fields = spec.fields(spec.name, kept, as_of, family_params)
            fields["as_of"] = as_of
            store[key] = fields
    return store


def expected_store(
    events: Iterable[Event],
    *,
    prefix: str = "feat",
    params: ModelParams = DEFAULT_PARAMS,
    partitions: Iterable[int] | None = None,
) -> Store:
    """The final store after the whole stream of valid events (in stream order), read from
    `partitions` (each event's Kafka partition; default: one partition)."""
    stream = list(events)
    if not stream:
        return {}
    accepted = model_dedup(stream, params=params, partitions=partitions)
    return features_at(accepted, final_clock(stream), prefix=prefix, params=params)


def as_redis_strings(store: Mapping[str, Mapping[str, FieldValue]]) -> dict[str, dict[str, str]]:
    """The stored representation: ints as ``str(int)``, floats as ``repr(float)``."""
    out: dict[str, dict[str, str]] = {}
    for key, fields in store.items():
        out[key] = {}
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{key} {name}: unexpected value {value!r}")
            out[key][name] = str(value) if isinstance(value, int) else repr(value)
    return out


# ------------------------------------------------------------------------- comparison


def _text(x: str | bytes) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def decode_store(actual: RawStore) -> dict[str, dict[str, str]]:
    """Decode a store read from Redis (``bytes`` or ``str`` everywhere) to ``str``."""
    return {
        _text(key): {_text(f): _text(v) for f, v in fields.items()}
        for key, fields in actual.items()
    }


def select_families(
    store: Mapping[str, Mapping[str, Any]], families: Collection[str], *, prefix: str = "feat"
) -> dict[str, dict[str, Any]]:
    """The keys of the given families only, e.g. to compare ``acq`` by its own rule."""
    heads = tuple(f"{prefix}:{family}:" for family in families)
    return {key: dict(fields) for key, fields in store.items() if key.startswith(heads)}


def diff_stores(
    actual: RawStore,
    expected: Mapping[str, Mapping[str, FieldValue]],
    rel_tol: float = 1e-9,
    *,
    abs_tol: float = 1e-12,
    check_float_repr: bool = True,
) -> list[str]:
    """Human-readable differences between a store read back and the model; empty if equal.

    Ints (``as_of`` included) must be written exactly as ``str(int)``. Floats must be
    within ``rel_tol`` (or ``abs_tol``, for sums that are practically zero) and, with
    ``check_float_repr``, spelled as ``repr(float)`` so ``"3"`` for a float field is caught.
    """
    got = decode_store(actual)
    problems: list[str] = []
    for key in sorted(expected.keys() - got.keys()):
        problems.append(f"missing key {key!r}")
    for key in sorted(got.keys() - expected.keys()):
        problems.append(f"extra key {key!r}: {got[key]!r}")
    for key in sorted(expected.keys() & got.keys()):
        want, have = expected[key], got[key]
        for name in sorted(want.keys() - have.keys()):
            problems.append(f"{key!r}: missing field {name!r} (expected {want[name]!r})")
        for name in sorted(have.keys() - want.keys()):
            problems.append(f"{key!r}: extra field {name!r} = {have[name]!r}")
        for name in sorted(want.keys() & have.keys()):
            problem = _diff_value(want[name], have[name], rel_tol, abs_tol, check_float_repr)
            if problem:
                problems.append(f"{key!r} {name}: {problem}")
    return problems


def _diff_value(
    want: FieldValue, have: str, rel_tol: float, abs_tol: float, check_float_repr: bool
) -> str | None:
    """One field's difference, or ``None``."""
    if isinstance(want, int) and not isinstance(want, bool):
        if have != str(want):
            return f"expected int {want}, got {have!r}"
        return None
    try:
        value = float(have)
    except ValueError:
        return f"expected float {want!r}, got non-number {have!r}"
    if check_float_repr and repr(value) != have:
        return f"got {have!r}, which is not repr(float) (that would be {value!r})"
    if not math.isclose(value, want, rel_tol=rel_tol, abs_tol=abs_tol):
        return f"expected {want!r}, got {have!r} (rel err {_rel_err(value, want):.3g})"
    return None


def _rel_err(value: float, want: float) -> float:
    return abs(value - want) / max(abs(want), abs(value), 1e-300)


# ------------------------------------------------------------- acq beyond the tolerance


def max_disorder_ms(events: Iterable[Event]) -> int:
    """How far behind the largest earlier ``ts`` the latest-arriving event came, in stream
    order (0 for a stream in time order).

    The pipeline's link join is exact when every link event reaches it at most its grace
    (``dataflow.core.aclink.DEFAULT_GRACE_MS``) behind the clock, so a test may demand exact
    ``acq`` values when this is within the grace, and only ``diff_acq_lower_bound`` beyond.
    """
    worst = 0
    clock: int | None = None
    for event in events:
        ts = int(event["ts"])
        if clock is not None:
            worst = max(worst, clock - ts)
        clock = ts if clock is None else max(clock, ts)
    return worst


_ACQ_BOUNDED = ("searched_7d", "clicked_7d", "searched_30d", "clicked_30d")
_ACQ_EXACT = ("selects_7d", "selects_30d", "as_of")
_ACQ_RATES = (("search_rate_30d", "searched_30d"), ("click_rate_30d", "clicked_30d"))


def diff_acq_lower_bound(
    actual: RawStore,
    expected: Mapping[str, Mapping[str, FieldValue]],
    *,
    prefix: str = "feat",
    params: ModelParams = DEFAULT_PARAMS,
) -> list[str]:
    """What the ``acq`` family must still satisfy when arrival disorder exceeded the link's
    tolerance: the same keys, exact selects and ``as_of``, searched and clicked counts
    between 0 and the model's (a link is never invented, only possibly missed), and rates
    that are the smoothed ratios of the counts actually written. Other families are ignored.
    """
    got = select_families(decode_store(actual), ["acq"], prefix=prefix)
    want = select_families(expected, ["acq"], prefix=prefix)
    alpha, beta = params.smoothing("acq")
    problems = [f"missing key {key!r}" for key in sorted(want.keys() - got.keys())]
    problems += [f"extra key {key!r}" for key in sorted(got.keys() - want.keys())]
    for key in sorted(want.keys() & got.keys()):
        have, exp = got[key], want[key]
        if set(have) != set(exp):
            problems.append(f"{key!r}: fields {sorted(have)} != {sorted(exp)}")
            continue
        for name in _ACQ_EXACT:
            if have[name] != str(exp[name]):
                problems.append(f"{key!r} {name}: expected {exp[name]}, got {have[name]!r}")
        for name in _ACQ_BOUNDED:
            if not have[name].isdigit() or int(have[name]) > int(exp[name]):
                problems.append(f"{key!r} {name}: expected 0..{exp[name]}, got {have[name]!r}")
        selects = int(have["selects_30d"]) if have["selects_30d"].isdigit() else 0
        for rate, count in _ACQ_RATES:
            k = int(have[count]) if have[count].isdigit() else 0
            problem = _diff_value(smoothed(k, selects, alpha, beta), have[rate], 1e-9, 0.0, True)
            if problem:
                problems.append(f"{key!r} {rate}: {problem}")
    return problems
