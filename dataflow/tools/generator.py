"""Deterministic generator of realistic search and autocomplete events (contract §1).

Used by the demo, the integration tests and the benchmarks, so it is seeded (same config,
same bytes), realistic enough to exercise every rule of the contract, and fast (pure Python,
no I/O in the generation functions).

What a stream looks like:

- A catalogue of ``n_docs`` doc ids (``d000123``, plus ~1% awkward but valid ids with ``:``,
  ``%``, spaces, unicode, a 256-byte id ...) with Zipf popularity, and ``n_queries`` queries
  (Zipf too), each with a relevant subset of docs. Queries are sometimes typed in another
  form that normalises to the same ``q_norm`` (case, spacing, full-width, NFD).
- Sessions: optionally ``ac_impression`` -> ``ac_select`` (autocomplete), then one
  ``search_impression`` of 10 docs, then 0-3 ``click``s biased to the top positions, each
  maybe followed by a ``dwell``. Everything within 30 minutes of the session start.
- Every valid event's ``ts`` is in ``[start_ms, start_ms + span_ms)``; the stream is in
  event-time order except that some events are delayed by up to ``max_disorder_ms``.
- Optional duplicates (a byte-identical re-send of a recent valid message) and broken
  messages, each tagged with the dead-letter reason the pipeline must give it (§5).

``generate`` yields exactly ``n_events`` messages. The pure functions never read the wall
clock: ``start_ms`` must be explicit (``GeneratorConfig.resolved()`` fills it from the clock
for the CLI and the demo).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import heapq
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

from dataflow.settings import KAFKA_BROKERS, KAFKA_TOPICS

__all__ = [
    "DLQ_REASONS",
    "EVENT_TYPES",
    "GeneratedMessage",
    "GeneratorConfig",
    "INVALID_KINDS",
    "generate",
    "generate_events",
    "main",
]

Event = dict[str, Any]

EVENT_TYPES = ("search_impression", "click", "dwell", "ac_impression", "ac_select")
DLQ_REASONS = ("invalid_json", "invalid_event", "unknown_type", "future_timestamp")

DAY_MS = 86_400_000
MAX_VALUE_BYTES = 65_536  # contract §1: a value over 64 KiB is invalid
SESSION_MAX_MS = 30 * 60_000  # every event of a session is within 30 min of its start
# Far-future timestamps are anchored to an absolute date, not to start_ms: the pure
# functions cannot read the wall clock, and the pipeline compares against *its* wall clock.
FUTURE_TS_FLOOR_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z

# --- session shape (tuned by eye against typical search logs; only realism depends on them)
SEARCH_RESULTS = 10
AC_ABANDON = 0.05  # a select that is never followed by a search
AC_LATE_SEARCH = 0.10  # a search more than 60 s after the select (not "searched", §4.4)
VARIANT_SHARE = 0.15  # a typed query in a non-canonical form (same q_norm)
BROWSE_SHARE = 0.01  # a search_impression without a query (missing or empty)
CLIENT_SHARE = 0.10  # sessions carrying an unknown extra field (must be ignored)
POSITION_OMITTED = 0.03  # clicks without the optional `position`
DWELL_SHARE = 0.75  # clicks followed by a dwell event
DISORDER_SHARE = 0.30  # events delayed when max_disorder_ms > 0
CLICK_COUNT_WEIGHTS = (0.45, 0.33, 0.15, 0.07)  # P(0..3 clicks)
# Position bias of clicks (rank 1 gets ~3x rank 3), from the usual eye-tracking curve.
POSITION_WEIGHTS = (0.30, 0.17, 0.12, 0.09, 0.07, 0.06, 0.05, 0.05, 0.045, 0.045)
CLICK_GAP_MU = math.log(8_000.0)  # median 8 s from result page (or last dwell) to click
CLICK_GAP_SIGMA = 0.9
DWELL_MU = math.log(15_000.0)  # median 15 s; P(dwell >= 30 s) ~ 0.26
DWELL_SIGMA = 1.1
AWKWARD_DOC_SHARE = 0.01
POPULAR_RELEVANT_SHARE = 0.4  # share of a query's relevant docs drawn by doc popularity
RANKING_POPULARITY_BOOST = 0.5  # ranking score = relevance * (popularity rank)^-boost
DUPLICATE_POOL = 256  # duplicates re-send one of the last N valid messages

_CLICK_CUM = tuple(itertools.accumulate(CLICK_COUNT_WEIGHTS))
_POSITION_CUM = tuple(itertools.accumulate(POSITION_WEIGHTS))

# Values are raw UTF-8 (not \u escapes), compact, as most producers send them, so that the
# consumer's UTF-8 handling is exercised.
_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


def _make_fast_encoder() -> Callable[[Any], str] | None:
    """The C encoder built once, or None.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs about as much
    as encoding a small event (this is the hottest call of the generator). The factory is a
    CPython internal, so it is used only if it exists and gives the same bytes as the
    public path; otherwise the public path is used.
    """
    factory = getattr(json.encoder, "c_make_encoder", None)
    if factory is None:
        return None
    try:
        enc = _json_encoder
        chunks = factory(
            None, enc.default, json.encoder.encode_basestring, None, ":", ",", False, False, True
        )

        def encode(obj: Any) -> str:
            return "".join(chunks(obj, 0))

        probe = {"a": [1, 'é\x00"', None, True], "b": {"c": -2}, "d": "🙂"}
        return encode if encode(probe) == enc.encode(probe) else None
    except Exception:  # noqa: BLE001 - any surprise from an internal API: use the public one
        return None


_encode_json: Callable[[Any], str] = _make_fast_encoder() or _json_encoder.encode


def _dumps(obj: Any) -> bytes:
    return _encode_json(obj).encode("utf-8")


def _q_norm(s: str) -> str:
    # Contract §2 q_norm; duplicated here so the generator does not depend on the pipeline.
    return " ".join(unicodedata.normalize("NFKC", s).casefold().split())


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Every field has a default; ``start_ms`` must be set to generate."""

    seed: int = 7
    n_events: int = 10_000
    n_docs: int = 5_000
    n_queries: int = 500
    # Epoch ms of the first session. None = "span_ms before now", filled by resolved(); the
    # generation functions refuse None so that they stay pure (no wall clock inside).
    start_ms: int | None = None
    span_ms: int = 3 * DAY_MS
    zipf_s: float = 1.1
    autocomplete_fraction: float = 0.4
    no_session_fraction: float = 0.05
    duplicate_fraction: float = 0.0
    invalid_fraction: float = 0.0
    max_disorder_ms: int = 0

    def __post_init__(self) -> None:
        for name in ("n_events", "max_disorder_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("n_docs", "n_queries", "span_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.start_ms is not None and self.start_ms < 0:
            raise ValueError(f"start_ms must be >= 0, got {self.start_ms}")
        if not self.zipf_s > 0:
            raise ValueError(f"zipf_s must be > 0, got {self.zipf_s}")
        for name in (
            "autocomplete_fraction",
            "no_session_fraction",
            "duplicate_fraction",
            "invalid_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.duplicate_fraction + self.invalid_fraction > 1.0:
            raise ValueError("duplicate_fraction + invalid_fraction must be <= 1")

    def resolved(self, now_ms: int | None = None) -> GeneratorConfig:
        """A copy with ``start_ms`` set to ``now - span_ms`` if it was None.

        All valid events then fall in the last ``span_ms`` before now, so none of them is
        rejected as a future timestamp by a pipeline reading them right away.
        """
        if self.start_ms is not None:
            return self
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        return replace(self, start_ms=max(0, now - self.span_ms))


@dataclass(frozen=True, slots=True)  # slots: ~25% cheaper to build, one per event
class GeneratedMessage:
    """One Kafka message: ``value`` and ``key`` as produced, plus what a test expects."""

    value: bytes
    key: bytes | None  # the session id, so that a session stays on one partition
    event: Event | None  # the parsed event for valid messages (duplicates included)
    expected_reason: str | None  # dead-letter reason (contract §5) for broken messages
    # "valid", "duplicate" (a re-send of an earlier valid message) or one of INVALID_KINDS.
    kind: str = "valid"


# -------------------------------------------------------------------------- catalogue

_BRANDS = (
    "iPhone", "Samsung", "Nike", "Adidas", "Sony", "LEGO", "IKEA", "Dyson", "Bosch", "Canon",
    "Lenovo", "Pokémon", "Müller", "Nintendo", "Logitech", "Philips", "Le Creuset",
    "Häagen-Dazs", "L'Oréal", "Dr. Martens", "AT&T", "Straße", "Xiaomi", "Zoë", "Garmin",
)  # fmt: skip
_PRODUCTS = (
    "case", "charger", "running shoes", "headphones", "laptop", "backpack", "coffee maker",
    "café table", "crème brûlée set", "water bottle", "desk lamp", "phone holder",
    "jalapeño seeds", "city map", "naïve art print", "東京 guide", "yoga mat", "usb-c cable",
    "4k tv", "air fryer", "e-reader", "rain jacket", "smart watch", "garden hose",
    "office chair", "wool socks", "gaming mouse", "baby stroller", "tent", "blender",
    "vacuum", "sunglasses", "guitar strings", "dog bed", "kettle", "100% cotton t-shirt",
)  # fmt: skip
_MODIFIERS = (
    "for kids", "waterproof", "2024", "cheap", "wireless", "black", "xl", "sale",
    "refurbished", "best", "mini", "pro", "set of 2", "near me", "organic", "size 42",
    "with case", "gift", "vintage", "50% off", "size ½", "rosé", "größe m", "fast",
)  # fmt: skip


def _fullwidth(s: str) -> str:
    # ASCII -> full-width forms (U+FF01..U+FF5E) and space -> U+3000; NFKC maps them back.
    return "".join(
        "\u3000" if c == " " else chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s
    )


def _variants(canonical: str) -> tuple[str, ...]:
    """Other spellings of a query that a user may type; all have the same q_norm."""
    words = canonical.split(" ")
    forms = (
        canonical.lower(),
        canonical.upper(),
        "  ".join(words),
        f" {canonical} ",
        _fullwidth(canonical),
        unicodedata.normalize("NFD", canonical),
        canonical.replace(" ", "\u00a0"),
        " ".join([words[0].upper(), *words[1:]]),
    )
    target = _q_norm(canonical)
    out: list[str] = []
    for form in forms:
        # Keep only real variants; the q_norm check guards against a case mapping (e.g. a
        # future word list entry) that does not round-trip through casefold.
        if form != canonical and form not in out and _q_norm(form) == target:
            out.append(form)
    return tuple(out) or (canonical,)


def _awkward_doc_id(i: int, n_docs: int) -> str:
    """A valid doc id that breaks naive key building (contract §1, §2 enc)."""
    j = (i + 1) % n_docs
    templates = (
        f"doc:é/{i}",
        f"doc %{i} 50%",
        f"sku {i}",
        f"文档:{i}",
        f"Doc/{i}?ref=a&b=c",
        f"ｄｏｃ{i}",  # full-width: used as given, never NFKC-normalised
        f"d{i}🙂",
        f"doc:{i}:{i}",
        f"%3A{i}",  # looks already percent-encoded
        f"D{j:06d}",  # differs from plain d{j:06d} only by case
        f" d{i} ",  # leading and trailing space are part of the id
        "",  # filled below: exactly 256 UTF-8 bytes, the contract's limit
    )
    k = i % len(templates)
    if k == len(templates) - 1:
        head = f"long-{i}-"
        pad = 256 - len(head.encode("utf-8"))
        # Two-byte 'é' then one-byte 'x' to land on exactly 256 bytes.
        return head + "é" * (pad // 2) + "x" * (pad % 2)
    return templates[k]


def _zipf_cum(n: int, s: float) -> list[float]:
    return list(itertools.accumulate((r + 1) ** -s for r in range(n)))


@dataclass(frozen=True)
class _Catalogue:
    docs_by_rank: tuple[str, ...]  # most popular first
    doc_cum: tuple[float, ...]
    queries: tuple[str, ...]  # canonical display form, most popular first
    query_cum: tuple[float, ...]
    relevant: tuple[tuple[str, ...], ...]  # per query, in the search engine's rank order
    prefix_index: dict[str, tuple[int, ...]]  # q_norm prefix (1-4 chars) -> query ranks
    variants: tuple[tuple[str, ...], ...]
    awkward_ids: frozenset[str]


def _make_queries(rng: random.Random, n: int) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []

    def add(q: str) -> None:
        norm = _q_norm(q)
        if norm and norm not in seen:
            seen.add(norm)
            out.append(q)

    add("iPhone case")  # the head query everyone types (and the contract's example)
    attempts = 0
    while len(out) < n and attempts < 20 * n + 1000:
        attempts += 1
        r = rng.random()
        if r < 0.40:
            q = f"{rng.choice(_BRANDS)} {rng.choice(_PRODUCTS)}"
        elif r < 0.65:
            q = rng.choice(_PRODUCTS)
        elif r < 0.85:
            q = f"{rng.choice(_PRODUCTS)} {rng.choice(_MODIFIERS)}"
        else:
            q = f"{rng.choice(_BRANDS)} {rng.choice(_PRODUCTS)} {rng.choice(_MODIFIERS)}"
        add(q)
    # Past the ~75k combinations of the word lists: numbered long-tail queries.
    k = 2
    while len(out) < n:
        add(f"{out[len(out) % 1000]} {k}")
        k += 1
    return out[:n]


@functools.lru_cache(maxsize=8)
def _catalogue(seed: int, n_docs: int, n_queries: int, zipf_s: float) -> _Catalogue:
    # Own RNG stream: the catalogue depends only on these four values, so changing
    # n_events or the noise options keeps the same docs and queries.
    rng = random.Random(f"{seed}:catalogue")
    width = max(6, len(str(n_docs - 1)))
    ids = [f"d{i:0{width}d}" for i in range(n_docs)]
    n_awkward = max(1, round(n_docs * AWKWARD_DOC_SHARE)) if n_docs >= 2 else 0
    awkward_idx = rng.sample(range(n_docs), n_awkward)
    for i in awkward_idx:
        ids[i] = _awkward_doc_id(i, n_docs)
    if len(set(ids)) != n_docs:  # pragma: no cover - a template bug, not a data issue
        raise AssertionError("doc ids are not unique")
    by_rank = ids[:]
    rng.shuffle(by_rank)
    if n_awkward and n_docs > 5:
        # One awkward id among the head, so that even a short stream carries one.
        a = by_rank.index(ids[awkward_idx[0]])
        by_rank[3], by_rank[a] = by_rank[a], by_rank[3]
    doc_cum = _zipf_cum(n_docs, zipf_s)
    total = doc_cum[-1]

    relevant: list[tuple[str, ...]] = []
    for _ in range(n_queries):
        size = min(n_docs, rng.randint(12, 40))
        picked: set[int] = set()  # popularity ranks
        # Part of each result set is drawn by popularity (popular docs are relevant to many
        # queries), the rest uniformly (the long tail each query has of its own): impressions
        # come out skewed, as in real logs, yet most of the catalogue gets seen.
        for _ in range(20 * size):
            if len(picked) >= size:
                break
            if rng.random() < POPULAR_RELEVANT_SHARE:
                picked.add(bisect.bisect(doc_cum, rng.random() * total, 0, n_docs - 1))
            else:
                picked.add(rng.randrange(n_docs))
        if len(picked) < size:  # tiny catalogues: fill with whatever is left
            for r in rng.sample(range(n_docs), n_docs):
                if len(picked) >= size:
                    break
                picked.add(r)
        # The engine's ranking: relevance (random here) boosted by popularity.
        scored = sorted(
            ((rng.random() * (r + 1) ** -RANKING_POPULARITY_BOOST, r) for r in sorted(picked)),
            reverse=True,
        )
        relevant.append(tuple(by_rank[r] for _, r in scored))

    queries = _make_queries(rng, n_queries)
    index: dict[str, list[int]] = {}
    for rank, q in enumerate(queries):
        norm = _q_norm(q)
        for length in range(1, 5):
            if length <= len(norm):
                index.setdefault(norm[:length], []).append(rank)
    return _Catalogue(
        docs_by_rank=tuple(by_rank),
        doc_cum=tuple(doc_cum),
        queries=tuple(queries),
        query_cum=tuple(_zipf_cum(n_queries, zipf_s)),
        relevant=tuple(relevant),
        prefix_index={k: tuple(v) for k, v in index.items()},
        variants=tuple(_variants(q) for q in queries),
        awkward_ids=frozenset(ids[i] for i in awkward_idx),
    )


# --------------------------------------------------------------------------- sessions


# Standard normal quantiles, for log-normal draws from a single random() call: a table
# lookup with linear interpolation is several times faster than random.lognormvariate, and
# cutting the tails at ~3.5 sigma does not matter for think and dwell times that are
# clipped anyway.
_Z_STEPS = 2048
_Z = tuple(statistics.NormalDist().inv_cdf((i + 0.5) / (_Z_STEPS + 1)) for i in range(_Z_STEPS + 1))


def _lognormal(rand: Callable[[], float], mu: float, sigma: float) -> float:
    x = rand() * _Z_STEPS
    i = int(x)
    z = _Z[i] + (_Z[i + 1] - _Z[i]) * (x - i)
    return math.exp(mu + sigma * z)


def _event_id(rng: random.Random) -> str:
    # 128 random bits as 32 hex digits (uuid.hex form), from the seeded RNG: uuid4 would
    # break determinism.
    return rng.randbytes(16).hex()


def _expected_events_per_session(config: GeneratorConfig) -> float:
    """Mean events per session, to spread the sessions over the span (roughly is enough)."""
    clicks = sum(k * w for k, w in enumerate(CLICK_COUNT_WEIGHTS))
    after_search = 1.0 + clicks * (1.0 + DWELL_SHARE)
    af = config.autocomplete_fraction
    return af * (2.0 + (1.0 - AC_ABANDON) * after_search) + (1.0 - af) * after_search


class _Sessions:
    """Produces the valid events, session by session, merged into one stream.

    Written for speed (this is the hot loop of every benchmark): ``int(random() * n)``
    instead of ``randint``/``choice`` (several times cheaper), locals instead of attributes.
    """

    def __init__(self, config: GeneratorConfig, cat: _Catalogue, start_ms: int) -> None:
        self.cfg = config
        self.cat = cat
        self.rng = random.Random(f"{config.seed}:sessions")
        self.start = start_ms
        self.end = start_ms + config.span_ms  # exclusive bound on every valid ts
        target = config.n_events * (1.0 - config.duplicate_fraction - config.invalid_fraction)
        self.remaining = target  # valid events still to be made, to pace session starts
        self.per_session = _expected_events_per_session(config)
        # Typed prefix -> query ranks completing it; q_norm is too slow to run per session.
        self.completions: dict[str, tuple[int, ...]] = {}

    def _query(self) -> int:
        cum = self.cat.query_cum
        return bisect.bisect(cum, self.rng.random() * cum[-1], 0, len(cum) - 1)

    def _typed(self, q: int) -> str:
        rand = self.rng.random
        if rand() < VARIANT_SHARE:
            forms = self.cat.variants[q]
            return forms[int(rand() * len(forms))]
        return self.cat.queries[q]

    def _candidates(self, q: int, prefix: str) -> list[str]:
        rand = self.rng.random
        completions = self.completions.get(prefix)
        if completions is None:
            completions = self.cat.prefix_index.get(_q_norm(prefix), ())
            self.completions[prefix] = completions
        want = min(3 + int(rand() * 6), len(self.cat.queries))
        ranks = [q]
        for r in completions:
            if len(ranks) >= want:
                break
            if r != q:
                ranks.append(r)
        # Few completions for this prefix: the suggester fills up with popular queries.
        for _ in range(50):
            if len(ranks) >= want:
                break
            r = self._query()
            if r not in ranks:
                ranks.append(r)
        ranks.sort()  # suggestions are shown by popularity
        queries = self.cat.queries
        return [queries[r] for r in ranks]

    def _results(self, q: int) -> list[str]:
        rand = self.rng.random
        rel = self.cat.relevant[q]
        docs = list(rel[:SEARCH_RESULTS])
        # Rankings drift a little between searches (fresh docs, personalisation).
        n_rel = len(rel)
        if n_rel > SEARCH_RESULTS and rand() < 0.3:
            for _ in range(1 + int(rand() * 2)):
                d = rel[SEARCH_RESULTS + int(rand() * (n_rel - SEARCH_RESULTS))]
                if d not in docs:
                    docs[int(rand() * len(docs))] = d
        if len(docs) > 1 and rand() < 0.3:
            i = int(rand() * (len(docs) - 1))
            docs[i], docs[i + 1] = docs[i + 1], docs[i]
        return docs

    def session(self, t0: int) -> list[tuple[int, Event]]:
        """The events of one session starting at ``t0``, in ts order."""
        rng = self.rng
        rand = rng.random
        cfg = self.cfg
        out: list[tuple[int, Event]] = []
        base: Event = {}
        if rand() >= cfg.no_session_fraction:
            base["session_id"] = "s" + rng.randbytes(8).hex()
        if rand() < CLIENT_SHARE:
            base["client"] = ("web", "ios", "android")[int(rand() * 3)]
        limit = min(t0 + SESSION_MAX_MS, self.end)
        q = self._query()

        if rand() < cfg.autocomplete_fraction:
            typed = self._typed(q)
            prefix = typed[: 1 + int(rand() * 4)]
            candidate = self.cat.queries[q]
            candidates = self._candidates(q, prefix)
            out.append(
                (
                    t0,
                    {
                        "event_id": rng.randbytes(16).hex(),
                        "type": "ac_impression",
                        "ts": t0,
                        **base,
                        "prefix": prefix,
                        "candidates": candidates,
                    },
                )
            )
            t_select = t0 + 300 + int(rand() * 4_700)
            if t_select >= limit:
                return out
            out.append(
                (
                    t_select,
                    {
                        "event_id": rng.randbytes(16).hex(),
                        "type": "ac_select",
                        "ts": t_select,
                        **base,
                        "prefix": prefix,
                        "candidate": candidate,
                    },
                )
            )
            r = rand()
            if r < AC_ABANDON:
                return out
            if r < AC_ABANDON + AC_LATE_SEARCH:
                t_search = t_select + 60_001 + int(rand() * 240_000)
            else:
                t_search = t_select + 1_000 + int(rand() * 39_000)
            # The search box holds the suggestion; the search service may still send it in
            # another form (same q_norm), which the autocomplete link must survive.
            query: str | None = self._typed(q)
        else:
            t_search = t0
            # Browsing (category pages): no query, missing or empty (contract §1).
            browse = rand() < BROWSE_SHARE
            query = ("" if rand() < 0.5 else None) if browse else self._typed(q)
        if t_search >= limit:
            return out
        qfield: Event = {} if query is None else {"query": query}
        docs = self._results(q)
        out.append(
            (
                t_search,
                {
                    "event_id": rng.randbytes(16).hex(),
                    "type": "search_impression",
                    "ts": t_search,
                    **base,
                    **qfield,
                    "doc_ids": docs,
                },
            )
        )

        n_clicks = min(bisect.bisect(_CLICK_CUM, rand() * _CLICK_CUM[-1]), 3, len(docs))
        positions: list[int] = []
        for _ in range(30):
            if len(positions) >= n_clicks:
                break
            p = 1 + bisect.bisect(_POSITION_CUM, rand() * _POSITION_CUM[-1], 0, 9)
            if p <= len(docs) and p not in positions:
                positions.append(p)
        positions.sort()  # users scan down the page
        t = t_search
        for p in positions:
            gap = int(_lognormal(rand, CLICK_GAP_MU, CLICK_GAP_SIGMA))
            t += min(max(gap, 800), 600_000)
            if t >= limit:
                break
            doc = docs[p - 1]
            click: Event = {
                "event_id": rng.randbytes(16).hex(),
                "type": "click",
                "ts": t,
                **base,
                **qfield,
                "doc_id": doc,
            }
            if rand() >= POSITION_OMITTED:
                click["position"] = p
            out.append((t, click))
            if rand() < DWELL_SHARE:
                dwell = int(_lognormal(rand, DWELL_MU, DWELL_SIGMA))
                dwell = min(max(dwell, 100), SESSION_MAX_MS)
                if t + dwell < limit:  # else the user never came back: no dwell event
                    t += dwell
                    out.append(
                        (
                            t,
                            {
                                "event_id": rng.randbytes(16).hex(),
                                "type": "dwell",
                                "ts": t,
                                **base,
                                **qfield,
                                "doc_id": doc,
                                "dwell_ms": dwell,
                            },
                        )
                    )
        return out

    def batches(self) -> Iterator[list[tuple[int, Event, bytes | None]]]:
        """Valid events, forever, as (ts, event, key) in (ts + disorder delay) order.

        Yields them in non-empty lists (one per session started) to save a generator
        round-trip per event. A heap merges the sessions: one entry per active session
        pointing at its next event, so one ``heapreplace`` per event and a heap as small as
        the number of sessions in flight.
        """
        rng = self.rng
        rand = rng.random
        max_delay = self.cfg.max_disorder_ms
        # (emission key, session number, the session's (key, ts, event) list, index, msg key)
        heap: list[tuple[int, int, list[tuple[int, int, Event]], int, bytes | None]] = []
        replace_top = heapq.heapreplace
        pop = heapq.heappop
        n_session = 0
        end = self.end
        t_next = self.start
        while True:
            # Every event still to be made has ts >= t_next, hence emission key >= t_next:
            # whatever is in the heap up to that can go out.
            ready: list[tuple[int, Event, bytes | None]] = []
            while heap and heap[0][0] <= t_next:
                _, n, items, i, key = heap[0]
                ready.append((items[i][1], items[i][2], key))
                i += 1
                if i < len(items):
                    replace_top(heap, (items[i][0], n, items, i, key))
                else:
                    pop(heap)
            if ready:
                yield ready
            events = self.session(t_next)
            self.remaining -= len(events)
            sid = events[0][1].get("session_id")
            if max_delay:
                items = [
                    (ts + 1 + int(rand() * max_delay) if rand() < DISORDER_SHARE else ts, ts, ev)
                    for ts, ev in events
                ]
                items.sort(key=_first)  # stable: equal keys keep the session's order
            else:
                items = [(ts, ts, ev) for ts, ev in events]
            n_session += 1
            heapq.heappush(
                heap, (items[0][0], n_session, items, 0, None if sid is None else sid.encode())
            )
            # Pace the sessions so the expected remaining ones fill the remaining span
            # (self-correcting if the per-session estimate is off); never past the span.
            sessions_left = max(self.remaining, 0.0) / self.per_session
            mean_gap = (end - t_next) / (sessions_left + 1.0)
            t_next = min(t_next + int(rng.expovariate(1.0) * mean_gap), end - 1)


def _first(item: tuple[int, int, Event]) -> int:
    return item[0]


# ------------------------------------------------------------------- broken messages

_Broken = tuple[bytes, str]  # (value, expected dead-letter reason)


class _Breaker:
    """Builds broken messages around the stream's current time."""

    def __init__(self, rng: random.Random, cat: _Catalogue, end_ms: int) -> None:
        self.rng = rng
        self.cat = cat
        # Past the configured span too, in case someone generates a stream beyond 2100.
        self.future_floor = max(FUTURE_TS_FLOOR_MS, end_ms + 365 * DAY_MS)

    def _doc(self) -> str:
        return self.rng.choice(self.cat.docs_by_rank[:200])

    def base(self, ts: int, etype: str | None = None) -> Event:
        """A valid event of ``etype`` (random if None), to be broken by the caller."""
        rng = self.rng
        etype = etype or rng.choice(EVENT_TYPES)
        ev: Event = {
            "event_id": _event_id(rng),
            "type": etype,
            "ts": ts,
            "session_id": f"s{rng.getrandbits(64):016x}",
        }
        q = self.cat.queries[rng.randrange(min(50, len(self.cat.queries)))]
        if etype == "search_impression":
            ev["query"] = q
            ev["doc_ids"] = [self._doc() for _ in range(SEARCH_RESULTS)]
        elif etype == "click":
            ev.update(query=q, doc_id=self._doc(), position=rng.randint(1, 10))
        elif etype == "dwell":
            ev.update(query=q, doc_id=self._doc(), dwell_ms=rng.randint(0, 60_000))
        elif etype == "ac_impression":
            ev.update(prefix=q[:2], candidates=[q, *self.cat.queries[:3]])
        else:
            ev.update(prefix=q[:2], candidate=q)
        return ev

    # Each builder returns (value, reason); the reason is what contract §5 prescribes
    # given its rule order (size, UTF-8/JSON, object, type, common fields, per type, future).

    def truncated_json(self, ts: int) -> _Broken:
        raw = _dumps(self.base(ts))
        return raw[: self.rng.randint(1, len(raw) - 1)], "invalid_json"

    def non_utf8(self, ts: int) -> _Broken:
        ev = self.base(ts, "search_impression")
        ev["query"] = "\x00MARK\x00"
        # A Latin-1 'é' (0xE9) where UTF-8 was due: the classic encoding bug.
        raw = _dumps(ev).replace(b"\\u0000MARK\\u0000", b"caf\xe9 table")
        return raw, "invalid_json"

    def empty_value(self, ts: int) -> _Broken:
        return b"", "invalid_json"

    def nan_literal(self, ts: int) -> _Broken:
        ev = self.base(ts, "dwell")
        ev["dwell_ms"] = "\x00NAN\x00"
        return _dumps(ev).replace(b'"\\u0000NAN\\u0000"', b"NaN"), "invalid_json"

    def json_array(self, ts: int) -> _Broken:
        return _dumps([self.base(ts)]), "invalid_event"

    def json_scalar(self, ts: int) -> _Broken:
        return self.rng.choice((b'"search_impression"', b"42", b"null", b"true")), "invalid_event"

    def missing_event_id(self, ts: int) -> _Broken:
        ev = self.base(ts)
        del ev["event_id"]
        return _dumps(ev), "invalid_event"

    def long_event_id(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["event_id"] = "e" * 129
        return _dumps(ev), "invalid_event"

    def missing_type(self, ts: int) -> _Broken:
        ev = self.base(ts)
        del ev["type"]
        return _dumps(ev), "invalid_event"

    def ts_string(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["ts"] = str(ts)
        return _dumps(ev), "invalid_event"

    def ts_float(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["ts"] = float(ts)  # 1700000000000.0: not an integer by the project's choice
        return _dumps(ev), "invalid_event"

    def ts_bool(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["ts"] = True
        return _dumps(ev), "invalid_event"

    def ts_negative(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["ts"] = -self.rng.randint(1, max(ts, 1))  # the contract requires 0 <= ts
        return _dumps(ev), "invalid_event"

    def unknown_type(self, ts: int) -> _Broken:
        ev = self.base(ts, "click")
        ev["type"] = self.rng.choice(("purchase", "Click", "add_to_cart", ""))
        return _dumps(ev), "unknown_type"

    def doc_id_control_char(self, ts: int) -> _Broken:
        ev = self.base(ts, self.rng.choice(("search_impression", "click")))
        bad = self._doc() + self.rng.choice(("\x07", "\n", "\x00", "\x7f", "\x85"))
        if ev["type"] == "click":
            ev["doc_id"] = bad
        else:
            ev["doc_ids"][self.rng.randrange(SEARCH_RESULTS)] = bad
        return _dumps(ev), "invalid_event"

    def doc_ids_too_many(self, ts: int) -> _Broken:
        ev = self.base(ts, "search_impression")
        ev["doc_ids"] = [f"d{i:06d}" for i in range(1001)]
        return _dumps(ev), "invalid_event"

    def doc_ids_empty(self, ts: int) -> _Broken:
        ev = self.base(ts, "search_impression")
        ev["doc_ids"] = []
        return _dumps(ev), "invalid_event"

    def doc_id_too_long(self, ts: int) -> _Broken:
        ev = self.base(ts, "click")
        ev["doc_id"] = "é" * 129  # 258 UTF-8 bytes, only 129 characters
        return _dumps(ev), "invalid_event"

    def position_zero(self, ts: int) -> _Broken:
        ev = self.base(ts, "click")
        ev["position"] = 0
        return _dumps(ev), "invalid_event"

    def dwell_ms_negative(self, ts: int) -> _Broken:
        ev = self.base(ts, "dwell")
        ev["dwell_ms"] = -self.rng.randint(1, 5_000)
        return _dumps(ev), "invalid_event"

    def candidates_too_many(self, ts: int) -> _Broken:
        ev = self.base(ts, "ac_impression")
        ev["candidates"] = [f"{ev['prefix']}{i}" for i in range(51)]
        return _dumps(ev), "invalid_event"

    def session_id_too_long(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["session_id"] = "s" * 129
        return _dumps(ev), "invalid_event"

    def oversize_value(self, ts: int) -> _Broken:
        # Otherwise a perfectly valid event: only the size makes it invalid (rule 1).
        ev = self.base(ts, "search_impression")
        ev["debug"] = "x" * (MAX_VALUE_BYTES + 100)
        return _dumps(ev), "invalid_event"

    def future_timestamp(self, ts: int) -> _Broken:
        ev = self.base(ts)
        ev["ts"] = self.future_floor + self.rng.randrange(365 * DAY_MS)
        return _dumps(ev), "future_timestamp"


INVALID_KINDS: tuple[str, ...] = (
    "truncated_json", "non_utf8", "empty_value", "nan_literal", "json_array", "json_scalar",
    "missing_event_id", "long_event_id", "missing_type", "ts_string", "ts_float", "ts_bool",
    "ts_negative", "unknown_type", "doc_id_control_char", "doc_ids_too_many", "doc_ids_empty",
    "doc_id_too_long", "position_zero", "dwell_ms_negative", "candidates_too_many",
    "session_id_too_long", "oversize_value", "future_timestamp",
)  # fmt: skip


# ------------------------------------------------------------------------ public API


def generate(config: GeneratorConfig) -> Iterator[GeneratedMessage]:
    """Exactly ``config.n_events`` messages, deterministic for a given config.

    ``config.start_ms`` must be set (see ``GeneratorConfig.resolved``).
    """
    if config.start_ms is None:
        raise ValueError("GeneratorConfig.start_ms is None: pass one, or use config.resolved()")
    cat = _catalogue(config.seed, config.n_docs, config.n_queries, config.zipf_s)
    return _generate(config, cat, config.start_ms)


def _generate(
    config: GeneratorConfig, cat: _Catalogue, start_ms: int
) -> Iterator[GeneratedMessage]:
    batches = _Sessions(config, cat, start_ms).batches()
    # Separate RNG for the noise, so that duplicates and broken messages do not reshuffle
    # the choices made for the sessions themselves.
    noise = random.Random(f"{config.seed}:noise")
    breaker = _Breaker(noise, cat, start_ms + config.span_ms)
    builders: list[Callable[[int], _Broken]] = [getattr(breaker, k) for k in INVALID_KINDS]
    p_invalid = config.invalid_fraction
    p_dup = p_invalid + config.duplicate_fraction
    pool: list[GeneratedMessage] = []
    pool_pos = 0
    last_ts = start_ms
    dumps = _dumps
    if not p_dup:
        # No noise (the common benchmark case): the same messages, without the per-message
        # draw and bookkeeping below.
        left = config.n_events
        for ready in batches:
            for _, ev, key in ready[:left]:
                yield GeneratedMessage(dumps(ev), key, ev, None)
            left -= len(ready)
            if left <= 0:
                return
        return  # pragma: no cover - batches() never ends
    batch: list[tuple[int, Event, bytes | None]] = []
    b = 0
    for _ in range(config.n_events):
        r = noise.random()
        if r < p_invalid:
            i = noise.randrange(len(builders))
            value, reason = builders[i](last_ts)
            key = f"s{noise.getrandbits(64):016x}".encode() if noise.random() < 0.9 else None
            yield GeneratedMessage(value, key, None, reason, INVALID_KINDS[i])
        elif r < p_dup and pool:
            m = pool[noise.randrange(len(pool))]
            yield GeneratedMessage(m.value, m.key, m.event, None, "duplicate")
        else:
            if b == len(batch):
                batch = next(batches)
                b = 0
            ts, ev, key = batch[b]
            b += 1
            last_ts = ts
            m = GeneratedMessage(dumps(ev), key, ev, None)
            if len(pool) < DUPLICATE_POOL:
                pool.append(m)
            else:
                pool[pool_pos] = m
                pool_pos = (pool_pos + 1) % DUPLICATE_POOL
            yield m


def generate_events(config: GeneratorConfig, *, include_duplicates: bool = True) -> list[Event]:
    """The parsed valid events of ``generate(config)``, in stream order.

    Duplicates are valid events (the pipeline drops them by ``event_id``); pass
    ``include_duplicates=False`` for the first copies only.
    """
    return [
        m.event
        for m in generate(config)
        if m.event is not None and (include_duplicates or m.kind != "duplicate")
    ]


# ------------------------------------------------------------------------------- CLI


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    # Unvalidated on purpose: a default for a flag, which the producer checks when used.
    default_brokers = KAFKA_BROKERS.text() or KAFKA_BROKERS.default
    topics = [t.strip() for t in KAFKA_TOPICS.text().split(",") if t.strip()]
    default_topic = topics[0] if topics else KAFKA_TOPICS.default
    p = argparse.ArgumentParser(
        prog="python -m dataflow.tools.generator",
        description="Generate deterministic, realistic search events (contract §1) and "
        "produce them to Kafka (default) or write them as JSON lines.",
    )
    p.add_argument("--events", type=int, default=10_000, help="messages to make (default 10000)")
    p.add_argument("--seed", type=int, default=7, help="RNG seed (default 7)")
    p.add_argument("--docs", type=int, default=5_000, help="catalogue size (default 5000)")
    p.add_argument("--queries", type=int, default=500, help="query vocabulary (default 500)")
    p.add_argument("--span-hours", type=float, default=72.0, help="event-time span (default 72)")
    p.add_argument(
        "--start-ms",
        type=int,
        default=None,
        help="event time of the first session, epoch ms (default: now minus the span)",
    )
    p.add_argument(
        "--autocomplete",
        type=_fraction,
        default=0.4,
        metavar="FRACTION",
        help="sessions starting with autocomplete (default 0.4)",
    )
    p.add_argument(
        "--no-session",
        type=_fraction,
        default=0.05,
        metavar="FRACTION",
        help="sessions without session_id (default 0.05)",
    )
    p.add_argument(
        "--duplicates",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="messages that re-send an earlier event (default 0)",
    )
    p.add_argument(
        "--invalid",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="broken messages, for the dead-letter topic (default 0)",
    )
    p.add_argument(
        "--disorder-seconds",
        type=float,
        default=0.0,
        help="delay some events by up to this much event time (default 0)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument(
        "--kafka",
        metavar="BROKERS",
        nargs="?",
        const=default_brokers,
        default=None,
        help=f"produce to Kafka (the default output; brokers default to $KAFKA_BROKERS, "
        f"now {default_brokers})",
    )
    out.add_argument("--out", metavar="FILE", help="write one value per line ('-' = stdout)")
    p.add_argument(
        "--topic",
        default=default_topic,
        help=f"Kafka topic (default: first of $KAFKA_TOPICS, now {default_topic})",
    )
    return p


def _produce(messages: Iterator[GeneratedMessage], brokers: str, topic: str) -> tuple[int, str]:
    """Produce to Kafka; returns (messages not delivered, first error)."""
    # Imported here, not at the top: the pure generator must work without Kafka installed.
    from confluent_kafka import KafkaException, Producer  # noqa: PLC0415

    reported: set[str] = set()

    def on_error(err: Any) -> None:
        text = str(err)
        if text not in reported:
            reported.add(text)
            print(f"generator: kafka: {text}", file=sys.stderr)

    conf: dict[str, Any] = {
        "bootstrap.servers": brokers,
        "linger.ms": 20,  # batch a little: throughput matters, 20 ms of latency does not
        "compression.type": "lz4",
        # An unreachable broker should fail the run within a minute, not after the
        # default five.
        "message.timeout.ms": 60_000,
        # librdkafka logs every reconnect attempt to stderr; report each distinct error
        # once through error_cb instead.
        "log_level": 2,
        "error_cb": on_error,
    }
    try:
        producer = Producer(conf)
    except KafkaException:  # librdkafka built without lz4
        conf["compression.type"] = "none"
        producer = Producer(conf)
    failed = 0
    first_error = ""

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal failed, first_error
        if err is not None:
            failed += 1
            first_error = first_error or str(err)

    for n, m in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value=m.value, key=m.key, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let librdkafka send, then retry
                producer.poll(0.05)
        if n % 1000 == 0:
            producer.poll(0)  # serve delivery callbacks now and then
    left = producer.flush(90)  # > message.timeout.ms: every message ends delivered or failed
    return left + failed, first_error or ("flush timed out" if left else "")


def _write_lines(messages: Iterator[GeneratedMessage], sink: IO[bytes]) -> None:
    for m in messages:
        sink.write(m.value + b"\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = GeneratorConfig(
            seed=args.seed,
            n_events=args.events,
            n_docs=args.docs,
            n_queries=args.queries,
            start_ms=args.start_ms,
            span_ms=max(1, round(args.span_hours * 3_600_000)),
            autocomplete_fraction=args.autocomplete,
            no_session_fraction=args.no_session,
            duplicate_fraction=args.duplicates,
            invalid_fraction=args.invalid,
            max_disorder_ms=round(args.disorder_seconds * 1000),
        ).resolved()
    except ValueError as exc:
        print(f"generator: {exc}", file=sys.stderr)
        return 2
    counts = {"valid": 0, "duplicate": 0, "invalid": 0}

    def counted() -> Iterator[GeneratedMessage]:
        for m in generate(config):
            counts[m.kind if m.kind in counts else "invalid"] += 1
            yield m

    started = time.perf_counter()
    if args.out is not None:
        dest = "stdout" if args.out == "-" else args.out
        if args.out == "-":
            try:
                _write_lines(counted(), sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BrokenPipeError:  # e.g. piped into `head`: stop quietly
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
        else:
            with open(args.out, "wb") as sink:
                _write_lines(counted(), sink)
        failed, error = 0, ""
    else:
        brokers = args.kafka or KAFKA_BROKERS.text() or KAFKA_BROKERS.default
        dest = f"kafka {brokers} topic {args.topic}"
        failed, error = _produce(counted(), brokers, args.topic)
    elapsed = time.perf_counter() - started
    total = sum(counts.values())
    rate = total / elapsed if elapsed > 0 else float("inf")
    print(
        f"generated {total} messages ({counts['valid']} valid, {counts['duplicate']} duplicate, "
        f"{counts['invalid']} invalid) -> {dest} in {elapsed:.2f} s ({rate:,.0f} events/s)"
        + (f"; {failed} NOT delivered: {error}" if failed else ""),
        file=sys.stderr,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
