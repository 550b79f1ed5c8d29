"""What the ranking service calls: typed, batched reads of the feature store (contract §7).

```python
from dataflow.reader import FeatureReader
reader = FeatureReader.from_url("redis://localhost:6379/0")
reader.doc_features(["d1", "d2"])                       # {doc_id: DocFeatures}
reader.query_doc_features("iPhone case", ["d1", "d2"])   # {doc_id: QueryDocFeatures}
reader.autocomplete_features("ip", ["iphone", "ipad"])   # {candidate: AutocompleteFeatures}
reader.autocomplete_link(["iphone", "ipad"])             # {query: AutocompleteLink}
```

Each call is one Redis round trip (a pipeline of `HGETALL`), whatever the number of ids. A
missing key reads as zero counts, zero decayed sums, the prior rate `α/(α+β)` and
`as_of = 0`, never as an error. Keys come from `dataflow.core.keys`, the writer's own functions.
`decayed_to(t)` brings the decayed sums (and `ctr_decay`) to the caller's read time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Self, TypeVar, cast

import redis

from dataflow.core import keys
from dataflow.core.families import FeatureParams
from dataflow.core.smoothing import Prior
from dataflow.core.windows import decay_factor
from dataflow.settings import FEATURE_PREFIX

__all__ = [
    "AutocompleteFeatures",
    "AutocompleteLink",
    "DocFeatures",
    "FeatureReader",
    "QueryDocFeatures",
    "decay_to",
]


def decay_to(value: float, as_of_ms: int, read_ms: int) -> float:
    """A decayed sum computed at `as_of_ms`, brought forward to `read_ms`."""
    return value * decay_factor(as_of_ms, read_ms) if read_ms > as_of_ms else value


class _Features:
    """Parsing shared by the feature records: every field is an int or a float."""

    __slots__ = ()
    PRIOR_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls, raw: Mapping[Any, Any], prior: Prior) -> Self:
        """From an `HGETALL` reply (bytes or str keys, as the client was configured)."""
        row = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        values: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name == "found":
                continue
            blob = row.get(f.name)
            if f.type in ("int", int):
                values[f.name] = int(blob) if blob is not None else 0
            elif blob is not None:
                values[f.name] = float(blob)
            else:
                values[f.name] = prior.prior_rate if f.name in cls.PRIOR_FIELDS else 0.0
        values["found"] = bool(row)
        made: Self = cast(Any, cls)(**values)
        return made


@dataclass(frozen=True, slots=True)
class DocFeatures(_Features):
    impressions_7d: int
    clicks_7d: int
    impressions_30d: int
    clicks_30d: int
    long_clicks_30d: int
    popularity_7d: float
    popularity_30d: float
    ctr_7d: float
    ctr_30d: float
    impressions_decay: float
    clicks_decay: float
    ctr_decay: float
    as_of: int
    found: bool

    PRIOR_FIELDS: ClassVar[tuple[str, ...]] = ("ctr_7d", "ctr_30d", "ctr_decay")

    def decayed_to(self, read_ms: int, prior: Prior) -> DocFeatures:
        return _decay(self, read_ms, prior)


@dataclass(frozen=True, slots=True)
class QueryDocFeatures(_Features):
    impressions_7d: int
    clicks_7d: int
    impressions_30d: int
    clicks_30d: int
    long_clicks_30d: int
    ctr_7d: float
    ctr_30d: float
    impressions_decay: float
    clicks_decay: float
    ctr_decay: float
    as_of: int
    found: bool

    PRIOR_FIELDS: ClassVar[tuple[str, ...]] = ("ctr_7d", "ctr_30d", "ctr_decay")

    def decayed_to(self, read_ms: int, prior: Prior) -> QueryDocFeatures:
        return _decay(self, read_ms, prior)


@dataclass(frozen=True, slots=True)
class AutocompleteFeatures(_Features):
    impressions_7d: int
    selects_7d: int
    impressions_30d: int
    selects_30d: int
    select_rate_7d: float
    select_rate_30d: float
    as_of: int
    found: bool

    PRIOR_FIELDS: ClassVar[tuple[str, ...]] = ("select_rate_7d", "select_rate_30d")


@dataclass(frozen=True, slots=True)
class AutocompleteLink(_Features):
    selects_7d: int
    searched_7d: int
    clicked_7d: int
    selects_30d: int
    searched_30d: int
    clicked_30d: int
    search_rate_30d: float
    click_rate_30d: float
    as_of: int
    found: bool

    PRIOR_FIELDS: ClassVar[tuple[str, ...]] = ("search_rate_30d", "click_rate_30d")


_D = TypeVar("_D", DocFeatures, QueryDocFeatures)
_F = TypeVar("_F", bound=_Features)


def _decay(features: _D, read_ms: int, prior: Prior) -> _D:
    if not features.found or read_ms <= features.as_of:
        return features
    factor = decay_factor(features.as_of, read_ms)
    impressions = features.impressions_decay * factor
    clicks = features.clicks_decay * factor
    return replace(
        features,
        impressions_decay=impressions,
        clicks_decay=clicks,
        ctr_decay=prior.rate(clicks, impressions),
    )


class FeatureReader:
    """Batched reads of one feature-store version (`prefix`)."""

    def __init__(
        self, client: redis.Redis, *, prefix: str = "feat", params: FeatureParams | None = None
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.params = params or FeatureParams()

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str | None = None, params: FeatureParams | None = None
    ) -> FeatureReader:
        """Connect to `url`; the prefix defaults to `FEATURE_PREFIX` (else `feat`), so
        switching the ranking service to a rebuilt version is one setting."""
        chosen = prefix if prefix is not None else FEATURE_PREFIX.read(os.environ)
        return cls(redis.Redis.from_url(url), prefix=chosen, params=params)

    def doc_features(self, doc_ids: Sequence[str]) -> dict[str, DocFeatures]:
        return self._read(
            doc_ids, lambda d: keys.doc_key(self.prefix, d), DocFeatures, self.params.doc
        )

    def query_doc_features(self, query: str, doc_ids: Sequence[str]) -> dict[str, QueryDocFeatures]:
        """Per (query, doc). An empty normalised query has no features: all read as missing."""
        if not keys.q_norm(query):
            return {d: QueryDocFeatures.parse({}, self.params.qd) for d in doc_ids}
        qhash = keys.query_hash(query)
        return self._read(
            doc_ids,
            lambda d: f"{self.prefix}:{keys.qd_suffix(qhash, d)}",
            QueryDocFeatures,
            self.params.qd,
        )

    def autocomplete_features(
        self, prefix: str, candidates: Sequence[str]
    ) -> dict[str, AutocompleteFeatures]:
        return self._read(
            candidates,
            lambda c: keys.ac_key(self.prefix, prefix, c),
            AutocompleteFeatures,
            self.params.ac,
        )

    def autocomplete_link(self, queries: Sequence[str]) -> dict[str, AutocompleteLink]:
        return self._read(
            queries, lambda q: keys.acq_key(self.prefix, q), AutocompleteLink, self.params.acq
        )

    def _read(
        self,
        ids: Sequence[str],
        key_of: Callable[[str], str],
        record: type[_F],
        prior: Prior,
    ) -> dict[str, _F]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for item in unique:
            pipe.hgetall(key_of(item))
        rows = pipe.execute()
        return {item: record.parse(row, prior) for item, row in zip(unique, rows, strict=True)}
