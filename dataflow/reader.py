"""What the ranking service calls: typed, batched reads of the feature store (contract §7).

```python
from dataflow.reader import AsyncFeatureReader, FeatureReader
reader = FeatureReader.from_url("redis://localhost:6379/0")   # prefix from FEATURE_PREFIX
# TLS and an ACL user: the CA from REDIS_CA_FILE, the password from REDIS_PASSWORD (or pass them)
reader = FeatureReader.from_url("rediss://ranking@redis:6380/0", ca_file="/etc/redis-ca.pem")
reader.doc_features(["d1", "d2"])                       # {doc_id: DocFeatures}
reader.query_doc_features("iPhone case", ["d1", "d2"])   # {doc_id: QueryDocFeatures}
reader.ranking_features("iPhone case", ["d1", "d2"])     # both of the above, one round trip
reader.autocomplete_features("ip", ["iphone", "ipad"])   # {candidate: AutocompleteFeatures}
reader.autocomplete_link(["iphone", "ipad"])             # {query: AutocompleteLink}
await AsyncFeatureReader.from_url(url).doc_features(["d1"])   # the same on redis.asyncio
```

Each call is one Redis round trip, whatever the number of ids: one buffer of `HGETALL key`
commands (`dataflow.resp`) written at once, the replies read straight off the connection's
hiredis reader and converted column by column. A missing
key reads as zero counts, zero decayed sums, the prior rate `α/(α+β)` and `as_of = 0`, never
as an error. Keys come from `dataflow.core.keys`, the writer's own functions.
`decayed_to(t)` brings the decayed sums (and `ctr_decay`) to the caller's read time.

Every call has a deadline (`deadline_ms`, default 50 ms, per reader and per call): a Redis
that is slow or unreachable raises `ReaderTimeout` within it, never a hang. Latency figures,
deadline and pooling advice: docs/reader.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain, repeat
from typing import Any, Generic, NamedTuple, TypeVar, cast, get_type_hints

import orjson
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from dataflow import resp
from dataflow.config import redis_options
from dataflow.core import counters, keys
from dataflow.core.families import AC, ACQ, DOC, LAYOUTS, QD, FeatureParams, fields_for
from dataflow.core.priors import prior_suffix
from dataflow.core.smoothing import Prior
from dataflow.core.windows import decay_factor
from dataflow.errors import ReaderError, ReaderTimeout
from dataflow.settings import FEATURE_PREFIX, REDIS_CA_FILE, REDIS_PASSWORD

__all__ = [
    "DEFAULT_DEADLINE_MS",
    "AsyncFeatureReader",
    "AutocompleteFeatures",
    "AutocompleteLink",
    "DocFeatures",
    "FeatureReader",
    "QueryDocFeatures",
    "RankingFeatures",
    "decay_to",
    "prefix_from_env",
]

DEFAULT_DEADLINE_MS = 50.0
"""How long one call may take before `ReaderTimeout` (connection set-up included)."""


def prefix_from_env() -> str:
    """The feature-store version to read: `FEATURE_PREFIX`, else `feat`."""
    return FEATURE_PREFIX.read(os.environ)


def _connection_options(url: str, password: str | None, ca_file: str | None) -> dict[str, Any]:
    """The password (argument, else REDIS_PASSWORD) and, for `rediss://`, verified TLS
    against `ca_file` (argument, else REDIS_CA_FILE, else the system's CAs): the options
    the pipeline's own clients use (`dataflow.config.redis_options`)."""
    if password is None:
        password = REDIS_PASSWORD.read(os.environ).get()
    if ca_file is None:
        ca_file = REDIS_CA_FILE.read(os.environ)
    return redis_options(url, password, ca_file)


def decay_to(value: float, as_of_ms: int, read_ms: int) -> float:
    """A decayed sum computed at `as_of_ms`, brought forward to `read_ms`."""
    return value * decay_factor(as_of_ms, read_ms) if read_ms > as_of_ms else value


# --------------------------------------------------------------------------- records
#
# Records are named tuples: one object per key, built from a row of values in one C call.
# Field order is the contract's (§4), the order the writer writes the fields in.


class DocFeatures(NamedTuple):
    """`P:doc:{doc}` (contract §4.1)."""

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
    expected_clicks_30d: float
    coec_30d: float
    as_of: int
    found: bool

    def decayed_to(self, read_ms: int, prior: Prior) -> DocFeatures:
        return _decay(self, read_ms, prior)

    @classmethod
    def parse(cls, raw: Mapping[Any, Any], prior: Prior) -> DocFeatures:
        """From an `HGETALL` reply (bytes or str keys, as the client was configured)."""
        return _parse_mapping(_DOC, raw, prior)


class QueryDocFeatures(NamedTuple):
    """`P:qd:{query_hash}:{doc}` (contract §4.2)."""

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
    expected_clicks_30d: float
    coec_30d: float
    as_of: int
    found: bool

    def decayed_to(self, read_ms: int, prior: Prior) -> QueryDocFeatures:
        return _decay(self, read_ms, prior)

    @classmethod
    def parse(cls, raw: Mapping[Any, Any], prior: Prior) -> QueryDocFeatures:
        """From an `HGETALL` reply (bytes or str keys, as the client was configured)."""
        return _parse_mapping(_QD, raw, prior)


class AutocompleteFeatures(NamedTuple):
    """`P:ac:{prefix}:{candidate}` (contract §4.3)."""

    impressions_7d: int
    selects_7d: int
    impressions_30d: int
    selects_30d: int
    select_rate_7d: float
    select_rate_30d: float
    as_of: int
    found: bool

    @classmethod
    def parse(cls, raw: Mapping[Any, Any], prior: Prior) -> AutocompleteFeatures:
        """From an `HGETALL` reply (bytes or str keys, as the client was configured)."""
        return _parse_mapping(_AC, raw, prior)


class AutocompleteLink(NamedTuple):
    """`P:acq:{query_hash}` (contract §4.4)."""

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

    @classmethod
    def parse(cls, raw: Mapping[Any, Any], prior: Prior) -> AutocompleteLink:
        """From an `HGETALL` reply (bytes or str keys, as the client was configured)."""
        return _parse_mapping(_ACQ, raw, prior)


class RankingFeatures(NamedTuple):
    """What `ranking_features` returns: both families for the same documents."""

    docs: dict[str, DocFeatures]
    query_docs: dict[str, QueryDocFeatures]


_D = TypeVar("_D", DocFeatures, QueryDocFeatures)
_R = TypeVar("_R")


def _decay(features: _D, read_ms: int, prior: Prior) -> _D:
    if not features.found or read_ms <= features.as_of:
        return features
    factor = decay_factor(features.as_of, read_ms)
    impressions = features.impressions_decay * factor
    clicks = features.clicks_decay * factor
    return features._replace(
        impressions_decay=impressions,
        clicks_decay=clicks,
        ctr_decay=prior.rate(clicks, impressions),
    )


class _Layout(Generic[_R]):
    """How one family's hash becomes a record.

    `names`/`kinds`: the record's fields (without `found`) and their types, in record order.
    `stored`: the same fields in the order the writer puts them in a hash
    (`families.fields_for`), which is the order `HGETALL` returns them in: Redis keeps a
    small hash as a listpack in insertion order, and rewriting a field keeps its place.
    """

    def __init__(self, record: type[_R], family: int, prior_fields: frozenset[str]) -> None:
        hints = get_type_hints(record)
        self.record = record
        self.family = family
        self.prior_fields = prior_fields
        self.names: tuple[str, ...] = tuple(n for n in cast(Any, record)._fields if n != "found")
        self.kinds: tuple[type[int] | type[float], ...] = tuple(
            int if hints[n] is int else float for n in self.names
        )
        self.width = len(self.names)
        self.type_sets = tuple(frozenset({k}) for k in self.kinds)
        self.make = cast(Callable[[Any], _R], partial(tuple.__new__, cast(Any, record)))
        layout = LAYOUTS[family]
        empty = counters.add(None, layout, 0, (0,) * layout.counts)
        stored = tuple(fields_for(family, empty, 0, FeatureParams()))
        if sorted(stored) != sorted(self.names):
            raise AssertionError(f"{record.__name__} fields differ from the writer's {stored}")
        self.stored_str = list(stored)
        self.stored_bytes = [n.encode() for n in stored]
        self.order = tuple(stored.index(n) for n in self.names)
        """For each record field, its position in the stored order."""
        self._missing: dict[Prior, _R] = {}

    def record_of(self, row: Sequence[Any], prior: Prior, found: bool) -> _R:
        """One record from raw values in record order (None = field absent), field by field."""
        values: list[Any] = []
        for name, kind, blob in zip(self.names, self.kinds, row, strict=True):
            if blob is not None:
                values.append(kind(blob))
            elif kind is int:
                values.append(0)
            elif name in self.prior_fields:
                values.append(prior.prior_rate)
            else:
                values.append(_MISSING_FLOATS.get(name, 0.0))
        values.append(found)
        return self.make(values)

    def missing(self, prior: Prior) -> _R:
        """What a key that does not exist reads as (one shared record per prior)."""
        record = self._missing.get(prior)
        if record is None:
            record = self.record_of((None,) * self.width, prior, False)
            self._missing[prior] = record
        return record


_MISSING_FLOATS: dict[str, float] = {"coec_30d": 1.0}
"""Float fields whose value for a missing key (or field) is not 0: no clicks over no
expected clicks is the neutral ratio, `(0 + a) / (0 + a)`."""

_DOC = _Layout(DocFeatures, DOC, frozenset({"ctr_7d", "ctr_30d", "ctr_decay"}))
_QD = _Layout(QueryDocFeatures, QD, frozenset({"ctr_7d", "ctr_30d", "ctr_decay"}))
_AC = _Layout(AutocompleteFeatures, AC, frozenset({"select_rate_7d", "select_rate_30d"}))
_ACQ = _Layout(AutocompleteLink, ACQ, frozenset({"search_rate_30d", "click_rate_30d"}))


def _parse_mapping(layout: _Layout[_R], raw: Mapping[Any, Any], prior: Prior) -> _R:
    row = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    return layout.record_of([row.get(n) for n in layout.names], prior, bool(row))


# --------------------------------------------------------------------------- wire format


def decode_rows(layout: _Layout[_R], rows: Sequence[Any], prior: Prior) -> list[_R]:
    """`HGETALL` replies as records, in order: the same records as `Record.parse(reply)`.

    A reply is a flat `[field, value, …]` list (RESP2) or a dict (RESP3), of bytes or str.
    Replies that hold exactly the writer's fields in the writer's order, which is every key
    this pipeline wrote, are converted together: one `orjson` parse of all their values, a
    type check per column, one C call per record. A column that does not hold exactly the
    expected JSON type (a value outside the contract's encoding) is converted with
    `int`/`float` instead. An empty reply is a missing key (a batch of written and missing
    keys, the usual one, takes the same single pass); any other reply (some fields absent,
    unknown fields, another order) is read field by field.
    """
    if not rows:
        return []
    per_field = 1 if type(rows[0]) is dict else 2
    full_length = layout.width * per_field
    lengths = set(map(len, rows))
    if lengths == {0}:
        return [layout.missing(prior)] * len(rows)
    if lengths <= {0, full_length}:  # written keys and missing ones: the usual batch
        present = list(filter(None, rows)) if 0 in lengths else rows
        fast = _decode_same_layout(layout, present)
        if fast is not None:
            if len(present) == len(rows):
                return fast
            records = iter(fast)
            missing = layout.missing(prior)
            return [next(records) if row else missing for row in rows]
    out: list[_R] = [layout.missing(prior)] * len(rows)
    candidates = [i for i, row in enumerate(rows) if len(row) == full_length]
    decoded = _decode_same_layout(layout, [rows[i] for i in candidates]) if candidates else []
    if decoded is None:  # not all in the writer's order: find the ones that are
        names = layout.stored_bytes if _is_bytes_row(rows[candidates[0]]) else layout.stored_str
        candidates = [i for i in candidates if _names(rows[i]) == names]
        decoded = _decode_same_layout(layout, [rows[i] for i in candidates]) if candidates else []
        if decoded is None:  # pragma: no cover - the rows were just checked one by one
            raise AssertionError("rows in the writer's order failed to decode as such")
    for i, record in zip(candidates, decoded, strict=True):
        out[i] = record
    done = set(candidates)
    for i, row in enumerate(rows):
        if row and i not in done:
            mapping = row if type(row) is dict else dict(zip(row[0::2], row[1::2], strict=True))
            out[i] = _parse_mapping(layout, mapping, prior)
    return out


def _is_bytes_row(row: Any) -> bool:
    return isinstance(next(iter(row)), bytes)


def _names(row: Any) -> list[Any]:
    return list(row) if type(row) is dict else row[0::2]


def _decode_same_layout(layout: _Layout[_R], rows: Sequence[Any]) -> list[_R] | None:
    """Full replies that all list the writer's fields in the writer's order, else None."""
    count = len(rows)
    if type(rows[0]) is dict:
        names = list(chain.from_iterable(rows))
        values = list(chain.from_iterable(map(dict.values, rows)))
    else:
        flat = list(chain.from_iterable(rows))
        names = flat[0::2]
        values = flat[1::2]
    binary = isinstance(names[0], bytes)
    if names != (layout.stored_bytes if binary else layout.stored_str) * count:
        return None
    width = layout.width
    try:
        if binary:
            parsed = orjson.loads(b"[" + b",".join(values) + b"]")
        else:
            parsed = orjson.loads("[" + ",".join(values) + "]")
    except (orjson.JSONDecodeError, TypeError):
        parsed = None
    if not isinstance(parsed, list) or len(parsed) != len(values):
        parsed = None
    columns: list[list[Any]] = []
    for position, kind, wanted in zip(layout.order, layout.kinds, layout.type_sets, strict=True):
        column = parsed[position::width] if parsed is not None else None
        if column is None or set(map(type, column)) != wanted:
            column = list(map(kind, values[position::width]))
        columns.append(column)
    return list(map(layout.make, zip(*columns, repeat(True))))


# --------------------------------------------------------------------------- one call


@dataclass(frozen=True, slots=True)
class _Part:
    """One family's share of a call: the ids (distinct, in order), how to key them, and
    the prior their missing fields read as: the family's published prior (`prior_key`,
    `P:prior:{family}`, when the pipeline fits it; contract §4.6), else `prior`."""

    layout: _Layout[Any]
    ids: list[str]
    keys_of: Callable[[Sequence[str]], list[str]]
    prior: Prior
    prior_key: str | None = None


class _Rejected(Exception):
    """Redis answered a command of the call with an error reply."""


Conversation = Generator[tuple[bytes, int], list[Any], list[dict[str, Any]]]


def _pack(part: _Part) -> bytes:
    keys_ = part.keys_of(part.ids)
    return resp.pack_hgetall(keys_ if part.prior_key is None else [part.prior_key, *keys_])


def published_prior(reply: Any, configured: Prior) -> Prior:
    """The prior in a `P:prior:{family}` reply (`HGETALL`, RESP2 list or RESP3 dict), or
    `configured` when there is none (the family's prior is not fitted) or it is unusable."""
    if not reply:
        return configured
    fields = reply if isinstance(reply, dict) else dict(zip(reply[0::2], reply[1::2], strict=True))
    text = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        prior = Prior(float(text["alpha"]), float(text["beta"]))
    except (KeyError, TypeError, ValueError):
        return configured
    if not (prior.alpha >= 0 and prior.beta >= 0 and prior.alpha + prior.beta > 0):
        return configured
    return prior


def _conversation(parts: Sequence[_Part], seen: dict[int, Prior] | None = None) -> Conversation:
    """One call without its I/O: yields `(bytes to write, replies to read next)`, is sent
    those replies, and returns one `{id: record}` per part. The sync and the async reader
    drive the same conversation over their own connection. A part's published prior is
    read in the same round trip, ahead of its keys, and noted in `seen` by family.

    Every part is written before any reply is awaited, so the call is one round trip; the
    first part goes out before the second is built, so Redis starts on it meanwhile.
    """
    results: list[dict[str, Any]] = []
    yield _pack(parts[0]), 0
    for index, part in enumerate(parts):
        following = _pack(parts[index + 1]) if index + 1 < len(parts) else b""
        published = part.prior_key is not None
        rows = yield following, len(part.ids) + published
        error = _first_error(rows)
        if error is not None:
            raise _Rejected(error) from error
        prior = part.prior
        if published:
            prior = published_prior(rows[0], part.prior)
            rows = rows[1:]
            if seen is not None:
                seen[part.layout.family] = prior
        records = decode_rows(part.layout, rows, prior)
        results.append(dict(zip(part.ids, records, strict=True)))
    return results


_REPLY_TYPES = frozenset({list, dict})


def _first_error(replies: list[Any]) -> Exception | None:
    """The first error reply, if any (the hiredis reader hands them over as exceptions)."""
    if set(map(type, replies)) <= _REPLY_TYPES:
        return None
    return next((r for r in replies if isinstance(r, Exception)), None)


def _where(pool: Any) -> str:
    """host:port (or socket path) of a pool's server, for messages; never a password."""
    kwargs = getattr(pool, "connection_kwargs", {})
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


def _timeout(where: str, key_count: int, deadline_ms: float, cause: object) -> ReaderTimeout:
    return ReaderTimeout(
        f"feature read of {key_count} keys from Redis at {where} did not complete within "
        f"{deadline_ms:g} ms ({cause}); the connection was closed and the pool opens a new "
        "one on the next call. Serve this request without these features. If it keeps "
        "happening, check the server (`redis-cli --latency`, `SLOWLOG GET`) and the network, "
        "or give the reader a longer deadline_ms (docs/reader.md)."
    )


def _unavailable(where: str, cause: object) -> ReaderError:
    return ReaderError(
        f"Redis at {where} did not answer a feature read ({cause}). Serve this request "
        "without these features; check that the server runs and that the reader's URL points "
        "at it (docs/reader.md)."
    )


def _rejected(where: str, cause: object) -> ReaderError:
    return ReaderError(
        f"Redis at {where} rejected a feature read ({cause}): a key under the reader's prefix "
        "is not a hash, or the prefix belongs to something else. Check FEATURE_PREFIX."
    )


class _ReaderBase:
    """Keys and parts shared by the sync and the async reader."""

    def __init__(self, *, prefix: str, params: FeatureParams | None, deadline_ms: float) -> None:
        self.prefix = prefix
        self.params = params or FeatureParams()
        self.deadline_ms = _checked_deadline(deadline_ms)
        self.published: dict[int, Prior] = {}
        """The priors last read from `P:prior:{family}` (the configured one where none is
        published): a query without words has no query-document key to read, and reads as
        this prior."""

    def _prior_key(self, family: int) -> str:
        return f"{self.prefix}:{prior_suffix(family)}"

    def _budget(self, deadline_ms: float | None) -> float:
        return self.deadline_ms if deadline_ms is None else _checked_deadline(deadline_ms)

    def _doc_part(self, doc_ids: Sequence[str]) -> _Part:
        prefix = self.prefix
        return _Part(
            _DOC,
            list(dict.fromkeys(doc_ids)),
            partial(keys.doc_keys, prefix),
            self.params.doc,
            self._prior_key(DOC),
        )

    def _qd_part(self, query: str, doc_ids: Sequence[str]) -> _Part | None:
        """None when the normalised query is empty: no such key exists, nothing to ask."""
        normalized = keys.q_norm(query)
        if not normalized:
            return None
        qhash = keys.hash_normalized(normalized)
        keys_of = partial(keys.qd_keys, self.prefix, qhash)
        return _Part(
            _QD, list(dict.fromkeys(doc_ids)), keys_of, self.params.qd, self._prior_key(QD)
        )

    def _no_query(self, doc_ids: Sequence[str]) -> dict[str, QueryDocFeatures]:
        return dict.fromkeys(doc_ids, _QD.missing(self.published.get(QD, self.params.qd)))

    def _ac_part(self, typed: str, candidates: Sequence[str]) -> _Part:
        typed_norm = keys.q_norm(typed)
        head = f"{self.prefix}:"

        def keys_of(batch: Sequence[str]) -> list[str]:
            return [head + keys.ac_suffix(typed_norm, keys.q_norm(c)) for c in batch]

        return _Part(
            _AC, list(dict.fromkeys(candidates)), keys_of, self.params.ac, self._prior_key(AC)
        )

    def _acq_part(self, queries: Sequence[str]) -> _Part:
        prefix = self.prefix

        def keys_of(batch: Sequence[str]) -> list[str]:
            return [keys.acq_key(prefix, q) for q in batch]

        return _Part(_ACQ, list(dict.fromkeys(queries)), keys_of, self.params.acq)


def _checked_deadline(deadline_ms: float) -> float:
    if not deadline_ms > 0:
        raise ValueError(f"deadline_ms must be > 0, not {deadline_ms!r}")
    return float(deadline_ms)


class FeatureReader(_ReaderBase):
    """Batched reads of one feature-store version (`prefix`), one round trip per call.

    Thread-safe: each call borrows a connection from the client's pool and gives it back.
    Pass a client of your own to share its pool; `from_url` makes one with timeouts that fit
    the deadline.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "feat",
        params: FeatureParams | None = None,
        deadline_ms: float = DEFAULT_DEADLINE_MS,
    ) -> None:
        super().__init__(prefix=prefix, params=params, deadline_ms=deadline_ms)
        self.client = client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str | None = None,
        params: FeatureParams | None = None,
        deadline_ms: float = DEFAULT_DEADLINE_MS,
        max_connections: int | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> FeatureReader:
        """Connect to `url`; the prefix defaults to `FEATURE_PREFIX` (else `feat`), so
        switching the ranking service to a rebuilt version is one setting.

        `rediss://` is TLS, the server's certificate verified against `ca_file` (default
        `REDIS_CA_FILE`, else the system's CAs) and its name checked against the URL's host.
        The password is the URL's, else `password` (default `REDIS_PASSWORD`), for the user
        named in the URL (e.g. a read-only ACL user).

        The client's connect and socket timeouts are the deadline and it never retries (a
        retry would outlast the deadline). `max_connections` bounds the pool: one connection
        per concurrent call, unbounded by default.
        """
        chosen = prefix if prefix is not None else prefix_from_env()
        seconds = _checked_deadline(deadline_ms) / 1000.0
        client = redis.Redis.from_url(
            url,
            socket_timeout=seconds,
            socket_connect_timeout=seconds,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
            max_connections=max_connections,
            **_connection_options(url, password, ca_file),
        )
        return cls(client, prefix=chosen, params=params, deadline_ms=deadline_ms)

    def close(self) -> None:
        """Close the client's connections (a later call opens new ones)."""
        self.client.close()

    def doc_features(
        self, doc_ids: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, DocFeatures]:
        return self._call([self._doc_part(doc_ids)], deadline_ms)[0]

    def query_doc_features(
        self, query: str, doc_ids: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, QueryDocFeatures]:
        """Per (query, doc). An empty normalised query has no features: all read as missing."""
        part = self._qd_part(query, doc_ids)
        if part is None:
            return self._no_query(doc_ids)
        return self._call([part], deadline_ms)[0]

    def ranking_features(
        self, query: str, doc_ids: Sequence[str], *, deadline_ms: float | None = None
    ) -> RankingFeatures:
        """`doc_features(doc_ids)` and `query_doc_features(query, doc_ids)` in one round trip."""
        qd = self._qd_part(query, doc_ids)
        if qd is None:
            docs = self.doc_features(doc_ids, deadline_ms=deadline_ms)
            return RankingFeatures(docs, self._no_query(doc_ids))
        docs, query_docs = self._call([self._doc_part(doc_ids), qd], deadline_ms)
        return RankingFeatures(docs, query_docs)

    def autocomplete_features(
        self, prefix: str, candidates: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, AutocompleteFeatures]:
        return self._call([self._ac_part(prefix, candidates)], deadline_ms)[0]

    def autocomplete_link(
        self, queries: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, AutocompleteLink]:
        return self._call([self._acq_part(queries)], deadline_ms)[0]

    def _call(self, parts: list[_Part], deadline_ms: float | None) -> list[dict[str, Any]]:
        count = sum(len(p.ids) for p in parts)
        if not count:
            return [{} for _ in parts]
        budget = self._budget(deadline_ms)
        deadline = time.monotonic() + budget / 1000.0
        pool: Any = self.client.connection_pool
        where = _where(pool)
        try:
            conn = pool.get_connection()
        except (redis.TimeoutError, TimeoutError) as exc:
            raise _timeout(where, count, budget, exc) from exc
        except (redis.ConnectionError, OSError) as exc:
            raise _unavailable(where, exc) from exc
        try:
            return _drive_sync(conn, _conversation(parts, self.published), deadline)
        except (resp.Expired, redis.TimeoutError, TimeoutError) as exc:
            conn.disconnect()
            raise _timeout(where, count, budget, exc) from exc
        except (redis.ConnectionError, OSError) as exc:
            conn.disconnect()
            raise _unavailable(where, exc) from exc
        except (_Rejected, redis.ResponseError) as exc:
            conn.disconnect()
            raise _rejected(where, exc.__cause__ or exc) from exc
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)


def _drive_sync(conn: Any, talk: Conversation, deadline: float) -> list[dict[str, Any]]:
    out, count = next(talk)
    while True:
        if out:
            conn.send_packed_command([out], check_health=False)
        try:
            out, count = talk.send(resp.read_replies(conn, count, deadline))
        except StopIteration as done:
            result: list[dict[str, Any]] = done.value
            return result


class AsyncFeatureReader(_ReaderBase):
    """`FeatureReader` on `redis.asyncio`: the same methods (awaited), the same results.

    Safe for concurrent tasks: each call borrows a connection from the client's pool.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = "feat",
        params: FeatureParams | None = None,
        deadline_ms: float = DEFAULT_DEADLINE_MS,
    ) -> None:
        super().__init__(prefix=prefix, params=params, deadline_ms=deadline_ms)
        self.client = client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str | None = None,
        params: FeatureParams | None = None,
        deadline_ms: float = DEFAULT_DEADLINE_MS,
        max_connections: int | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> AsyncFeatureReader:
        """As `FeatureReader.from_url`; the deadline is kept with `asyncio.timeout`."""
        chosen = prefix if prefix is not None else prefix_from_env()
        client = redis.asyncio.Redis.from_url(
            url,
            retry=AsyncRetry(NoBackoff(), 0),
            protocol=2,
            max_connections=max_connections,
            **_connection_options(url, password, ca_file),
        )
        return cls(client, prefix=chosen, params=params, deadline_ms=deadline_ms)

    async def aclose(self) -> None:
        """Close the client's connections (a later call opens new ones)."""
        await self.client.aclose()

    async def doc_features(
        self, doc_ids: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, DocFeatures]:
        return (await self._call([self._doc_part(doc_ids)], deadline_ms))[0]

    async def query_doc_features(
        self, query: str, doc_ids: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, QueryDocFeatures]:
        part = self._qd_part(query, doc_ids)
        if part is None:
            return self._no_query(doc_ids)
        return (await self._call([part], deadline_ms))[0]

    async def ranking_features(
        self, query: str, doc_ids: Sequence[str], *, deadline_ms: float | None = None
    ) -> RankingFeatures:
        qd = self._qd_part(query, doc_ids)
        if qd is None:
            docs = await self.doc_features(doc_ids, deadline_ms=deadline_ms)
            return RankingFeatures(docs, self._no_query(doc_ids))
        docs, query_docs = await self._call([self._doc_part(doc_ids), qd], deadline_ms)
        return RankingFeatures(docs, query_docs)

    async def autocomplete_features(
        self, prefix: str, candidates: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, AutocompleteFeatures]:
        return (await self._call([self._ac_part(prefix, candidates)], deadline_ms))[0]

    async def autocomplete_link(
        self, queries: Sequence[str], *, deadline_ms: float | None = None
    ) -> dict[str, AutocompleteLink]:
        return (await self._call([self._acq_part(queries)], deadline_ms))[0]

    async def _call(self, parts: list[_Part], deadline_ms: float | None) -> list[dict[str, Any]]:
        count = sum(len(p.ids) for p in parts)
        if not count:
            return [{} for _ in parts]
        budget = self._budget(deadline_ms)
        pool: Any = self.client.connection_pool
        where = _where(pool)
        conn: Any = None
        try:
            async with asyncio.timeout(budget / 1000.0):
                conn = await pool.get_connection()
                return await _drive_async(conn, _conversation(parts, self.published))
        except (TimeoutError, redis.TimeoutError) as exc:
            await _drop(conn)
            raise _timeout(where, count, budget, str(exc) or "deadline passed") from exc
        except (redis.ConnectionError, OSError) as exc:
            await _drop(conn)
            raise _unavailable(where, exc) from exc
        except (_Rejected, redis.ResponseError) as exc:
            await _drop(conn)
            raise _rejected(where, exc.__cause__ or exc) from exc
        except BaseException:
            await _drop(conn)
            raise
        finally:
            if conn is not None:
                await pool.release(conn)


async def _drop(conn: Any) -> None:
    """Close a connection that may still have replies in flight."""
    if conn is not None:
        await conn.disconnect(nowait=True)


async def _drive_async(conn: Any, talk: Conversation) -> list[dict[str, Any]]:
    out, count = next(talk)
    while True:
        if out:
            await resp.write_async(conn, out)
        try:
            out, count = talk.send(await resp.read_replies_async(conn, count))
        except StopIteration as done:
            result: list[dict[str, Any]] = done.value
            return result
