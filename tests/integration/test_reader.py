"""The reader against the real Redis: every read path equals the plain per-key reading.

The reference is one `HGETALL` per key through a plain client, parsed field by field
(`Record.parse`): what the reader returned before it was batched. Keys are written by the
pipeline's own code (`fields_for` over counters, the sink's `RedisWriter`), under the test's
own prefix. The deadline tests put `harness.RedisProxy` between the reader and Redis.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflow.config import RedisSettings
from dataflow.core import counters, keys
from dataflow.core.families import AC, ACQ, DOC, LAYOUTS, QD, FeatureParams, fields_for
from dataflow.core.smoothing import Prior
from dataflow.errors import ReaderError, ReaderTimeout
from dataflow.reader import (
    AsyncFeatureReader,
    AutocompleteFeatures,
    AutocompleteLink,
    DocFeatures,
    FeatureReader,
    QueryDocFeatures,
    RankingFeatures,
)
from dataflow.retry import NO_WAIT
from dataflow.settings import Secret
from dataflow.sinks.redis import RedisWriter
from tests.integration.harness import free_port, redis_proxy

NOW = int(time.time() * 1000)
PARAMS = FeatureParams(doc=Prior(1.0, 20.0), qd=Prior(2.0, 30.0), ac=Prior(1.0, 5.0))

# Ids that split or escape keys, unicode, spaces; and any text Hypothesis brings.
SPECIAL = ["d1", "a:b", "a%3Ab", "100%", "with space", " lead", "ü", "日本語", "a/b?c=d", "x" * 200]
IDS = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=30),
)
QUERY = st.one_of(st.sampled_from(["iPhone Case", "ＩＰＨＯＮＥ case", "a:b %", "   "]), st.text())


def fields_of(family: int, rnd: random.Random) -> dict[str, str]:
    layout = LAYOUTS[family]
    state = None
    for _ in range(rnd.randint(1, 5)):
        ts = NOW - rnd.randrange(29 * 86_400_000)
        counts = tuple(rnd.randint(0, 30) for _ in range(layout.counts))
        state = counters.add(state, layout, ts, counts)
    assert state is not None
    return fields_for(family, state, NOW, PARAMS)


def write(redis_url: str, prefix: str, writes: list[tuple[str, dict[str, str] | None]]) -> None:
    """Through the Redis sink's writer: HSET of every field and EXPIRE, as the pipeline."""
    client = redis.Redis.from_url(redis_url)
    try:
        settings_ = RedisSettings(url=Secret(redis_url), prefix=prefix, ttl_seconds=600)
        RedisWriter(client, settings_, NO_WAIT).write(writes)
    finally:
        client.close()


def reference(client: redis.Redis, key_list: list[str], record: Any, prior: Prior) -> list[Any]:
    """One HGETALL per key, parsed field by field."""
    return [record.parse(client.hgetall(k), prior) for k in key_list]


class Store:
    """A prefix with some written keys of every family, and the reference reading."""

    def __init__(self, client: redis.Redis, url: str, prefix: str) -> None:
        self.client, self.url, self.prefix = client, url, prefix

    def populate(self, seed: int, docs: list[str], query: str, typed: str) -> None:
        rnd = random.Random(seed)
        chosen = [d for d in docs if rnd.random() < 0.6]  # the rest stay missing
        writes: list[tuple[str, dict[str, str] | None]] = [
            (keys.doc_suffix(d), fields_of(DOC, rnd)) for d in chosen
        ]
        if keys.q_norm(query):
            qhash = keys.query_hash(query)
            writes += [(keys.qd_suffix(qhash, d), fields_of(QD, rnd)) for d in chosen]
        typed_norm = keys.q_norm(typed)
        for candidate in chosen:
            if typed_norm and keys.q_norm(candidate):
                suffix = keys.ac_suffix(typed_norm, keys.q_norm(candidate))
                writes.append((suffix, fields_of(AC, rnd)))
            if keys.q_norm(candidate):
                writes.append((keys.acq_suffix(keys.query_hash(candidate)), fields_of(ACQ, rnd)))
        write(self.url, self.prefix, writes)

    def expected(self, docs: list[str], query: str, typed: str) -> dict[str, dict[str, Any]]:
        unique = list(dict.fromkeys(docs))
        qd_keys = [keys.qd_key(self.prefix, query, d) for d in unique]
        qd = reference(self.client, qd_keys, QueryDocFeatures, PARAMS.qd)
        if not keys.q_norm(query):
            qd = [QueryDocFeatures.parse({}, PARAMS.qd)] * len(unique)
        p, c = self.prefix, self.client
        return {
            "doc": by_id(
                unique, reference(c, [keys.doc_key(p, d) for d in unique], DocFeatures, PARAMS.doc)
            ),
            "qd": by_id(unique, qd),
            "ac": by_id(
                unique,
                reference(
                    c, [keys.ac_key(p, typed, d) for d in unique], AutocompleteFeatures, PARAMS.ac
                ),
            ),
            "acq": by_id(
                unique,
                reference(c, [keys.acq_key(p, d) for d in unique], AutocompleteLink, PARAMS.acq),
            ),
        }


def by_id(ids: list[str], records: list[Any]) -> dict[str, Any]:
    return dict(zip(ids, records, strict=True))


def read_sync(reader: FeatureReader, docs: list[str], query: str, typed: str) -> dict[str, Any]:
    ranking = reader.ranking_features(query, docs)
    return {
        "doc": reader.doc_features(docs),
        "qd": reader.query_doc_features(query, docs),
        "ac": reader.autocomplete_features(typed, docs),
        "acq": reader.autocomplete_link(docs),
        "ranking": ranking,
    }


async def read_async(
    url: str, prefix: str, docs: list[str], query: str, typed: str
) -> dict[str, Any]:
    reader = AsyncFeatureReader.from_url(url, prefix=prefix, params=PARAMS, deadline_ms=5000)
    try:
        ranking, doc, qd, ac, acq = await asyncio.gather(
            reader.ranking_features(query, docs),
            reader.doc_features(docs),
            reader.query_doc_features(query, docs),
            reader.autocomplete_features(typed, docs),
            reader.autocomplete_link(docs),
        )
    finally:
        await reader.aclose()
    return {"doc": doc, "qd": qd, "ac": ac, "acq": acq, "ranking": ranking}


def check(got: dict[str, Any], want: dict[str, dict[str, Any]]) -> None:
    for family in ("doc", "qd", "ac", "acq"):
        assert got[family] == want[family], family
        assert list(got[family]) == list(want[family]), f"{family}: order of ids"
    assert got["ranking"] == RankingFeatures(want["doc"], want["qd"])


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    docs=st.lists(IDS, min_size=1, max_size=40),
    query=QUERY,
    typed=st.sampled_from(["ip", "a:", "日", " "]),
    seed=st.integers(0, 2**32),
)
def test_every_read_path_equals_the_per_key_reading(
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    docs: list[str],
    query: str,
    typed: str,
    seed: int,
) -> None:
    store = Store(redis_client, redis_url, key_prefix)
    store.populate(seed, docs, query, typed)
    docs = [*docs, *docs[:3], "never-written"]  # repeats and a missing key
    want = store.expected(docs, query, typed)

    sync = FeatureReader.from_url(redis_url, prefix=key_prefix, params=PARAMS, deadline_ms=5000)
    try:
        check(read_sync(sync, docs, query, typed), want)
    finally:
        sync.close()
    check(asyncio.run(read_async(redis_url, key_prefix, docs, query, typed)), want)


@pytest.mark.parametrize(
    "options",
    [{"protocol": 3}, {"protocol": 3, "decode_responses": True}, {"decode_responses": True}],
    ids=["resp3", "resp3-str", "resp2-str"],
)
def test_a_callers_own_client_reads_the_same_whatever_its_protocol(
    redis_client: redis.Redis, redis_url: str, key_prefix: str, options: dict[str, Any]
) -> None:
    docs = [f"doc{i}" for i in range(150)] + SPECIAL
    store = Store(redis_client, redis_url, key_prefix)
    store.populate(3, docs, "iPhone Case", "ip")
    want = store.expected(docs, "iPhone Case", "ip")
    client = redis.Redis.from_url(redis_url, **options)
    try:
        reader = FeatureReader(client, prefix=key_prefix, params=PARAMS, deadline_ms=5000)
        check(read_sync(reader, docs, "iPhone Case", "ip"), want)
    finally:
        client.close()

    async def run() -> dict[str, Any]:
        aclient = redis.asyncio.Redis.from_url(redis_url, **options)
        try:
            reader = AsyncFeatureReader(aclient, prefix=key_prefix, params=PARAMS, deadline_ms=5000)
            ranking = await reader.ranking_features("iPhone Case", docs)
            return {
                "doc": await reader.doc_features(docs),
                "qd": await reader.query_doc_features("iPhone Case", docs),
                "ac": await reader.autocomplete_features("ip", docs),
                "acq": await reader.autocomplete_link(docs),
                "ranking": ranking,
            }
        finally:
            await aclient.aclose()

    check(asyncio.run(run()), want)


def test_keys_the_writer_did_not_write_in_full_still_read_field_by_field(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    full = fields_of(DOC, random.Random(1))
    hashes = {
        "partial": {k: v for k, v in full.items() if not k.startswith("popularity")},
        "reordered": dict(reversed(list(full.items()))),
        "extra": {**full, "future_field": "7"},
        "int-in-float": {**full, "ctr_30d": "1"},
        "foreign": {"owner": "someone else"},
    }
    for doc_id, mapping in hashes.items():
        redis_client.hset(keys.doc_key(key_prefix, doc_id), mapping=mapping)  # type: ignore[arg-type]
    write(redis_url, key_prefix, [(keys.doc_suffix("written"), full)])
    docs = [*hashes, "written", "missing"]
    reader = FeatureReader.from_url(redis_url, prefix=key_prefix, params=PARAMS)
    try:
        got = reader.doc_features(docs)
    finally:
        reader.close()
    want = reference(
        redis_client, [keys.doc_key(key_prefix, d) for d in docs], DocFeatures, PARAMS.doc
    )
    assert list(got.values()) == want
    assert got["reordered"] == got["extra"] == got["written"]
    assert got["foreign"].found and not got["missing"].found


def test_a_key_that_is_not_a_hash_is_a_reader_error(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    redis_client.set(keys.doc_key(key_prefix, "oops"), "1")
    reader = FeatureReader.from_url(redis_url, prefix=key_prefix)
    try:
        with pytest.raises(ReaderError, match="WRONGTYPE"):
            reader.doc_features(["a", "oops", "b"])
        assert reader.doc_features(["a"])["a"].found is False  # the pool recovered
    finally:
        reader.close()


# --------------------------------------------------------------------------- deadline


def timed(call: Any) -> tuple[BaseException | None, float]:
    start = time.monotonic()
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed back to the test
        return exc, time.monotonic() - start
    return None, time.monotonic() - start


# Scheduling slack on a shared two-core machine: the error must come within the deadline
# plus this, and not before the deadline.
SLACK_S = 0.15


def test_a_redis_that_stops_answering_gives_a_timeout_within_the_deadline(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    write(redis_url, key_prefix, [(keys.doc_suffix("d1"), fields_of(DOC, random.Random(2)))])
    with redis_proxy(redis_url) as proxy:
        reader = FeatureReader.from_url(proxy.url, prefix=key_prefix, deadline_ms=80)
        try:
            assert reader.doc_features(["d1"])["d1"].found  # connected, answering
            proxy.stop_answering()
            error, elapsed = timed(lambda: reader.ranking_features("q", ["d1", "d2"]))
            assert isinstance(error, ReaderTimeout), error
            assert 0.08 * 0.9 <= elapsed <= 0.08 + SLACK_S
            assert "within 80 ms" in str(error) and "4 keys" in str(error)
            # A shorter deadline for one call, on a fresh connection.
            error, elapsed = timed(lambda: reader.doc_features(["d1"], deadline_ms=30))
            assert isinstance(error, ReaderTimeout), error
            assert elapsed <= 0.03 + SLACK_S
            proxy.answer()
            assert reader.doc_features(["d1"])["d1"].found  # the pool reconnects
        finally:
            proxy.answer()
            reader.close()


def test_the_async_reader_keeps_its_deadline_too(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    write(redis_url, key_prefix, [(keys.doc_suffix("d1"), fields_of(DOC, random.Random(2)))])

    async def scenario(proxy_url: str, proxy: Any) -> None:
        reader = AsyncFeatureReader.from_url(proxy_url, prefix=key_prefix, deadline_ms=80)
        try:
            assert (await reader.doc_features(["d1"]))["d1"].found
            proxy.stop_answering()
            start = time.monotonic()
            with pytest.raises(ReaderTimeout, match="within 80 ms"):
                await reader.ranking_features("q", ["d1", "d2"])
            assert time.monotonic() - start <= 0.08 + SLACK_S
            proxy.answer()
            assert (await reader.doc_features(["d1"]))["d1"].found
        finally:
            proxy.answer()
            await reader.aclose()

    with redis_proxy(redis_url) as proxy:
        asyncio.run(scenario(proxy.url, proxy))


def test_nothing_listening_is_a_reader_error_at_once() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    sync = FeatureReader.from_url(url, deadline_ms=2000)
    error, elapsed = timed(lambda: sync.doc_features(["d1"]))
    assert isinstance(error, ReaderError) and not isinstance(error, ReaderTimeout), error
    assert "did not answer" in str(error) and elapsed < 1.0

    async def run() -> None:
        reader = AsyncFeatureReader.from_url(url, deadline_ms=2000)
        with pytest.raises(ReaderError, match="did not answer"):
            await reader.doc_features(["d1"])
        await reader.aclose()

    asyncio.run(run())


def test_each_call_is_one_round_trip(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """Through a link that delays every reply by 60 ms, a call of 400 keys over two
    families takes one delay, not two: everything was written before any reply was read."""
    docs = [f"doc{i}" for i in range(200)]
    store = Store(redis_client, redis_url, key_prefix)
    store.populate(4, docs, "iPhone Case", "ip")
    delay = 0.06
    with redis_proxy(redis_url) as proxy:
        reader = FeatureReader.from_url(proxy.url, prefix=key_prefix, deadline_ms=5000)
        try:
            reader.doc_features(["warm-up"])  # connect first
            proxy.delay_replies(delay)
            for call in (
                lambda: reader.ranking_features("iPhone Case", docs),
                lambda: reader.doc_features(docs),
            ):
                error, elapsed = timed(call)
                assert error is None, error
                assert delay <= elapsed < 2 * delay, elapsed
        finally:
            reader.close()


def test_missing_keys_read_with_the_published_prior_of_a_fitted_family(
    redis_client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """`P:prior:{family}` (contract §4.6) is read in the same round trip; where it exists,
    missing keys of that family read its rate, the others keep the configured prior."""
    docs = ["present", "missing"]
    rnd = random.Random(5)
    qhash = keys.query_hash("iPhone Case")
    write(
        redis_url,
        key_prefix,
        [
            (keys.doc_suffix("present"), fields_of(DOC, rnd)),
            (keys.qd_suffix(qhash, "present"), fields_of(QD, rnd)),
        ],
    )
    published = {"alpha": "3.0", "beta": "27.0", "day": "20400", "keys": "512"}
    redis_client.hset(f"{key_prefix}:prior:qd", mapping={**published, "source": "fitted"})
    sync = FeatureReader.from_url(redis_url, prefix=key_prefix)
    async_reader = AsyncFeatureReader.from_url(redis_url, prefix=key_prefix)

    async def read_async() -> Any:
        try:
            return await async_reader.ranking_features("iPhone Case", docs)
        finally:
            await async_reader.aclose()

    try:
        for both in (sync.ranking_features("iPhone Case", docs), asyncio.run(read_async())):
            assert both.query_docs["missing"].ctr_30d == 3.0 / 30.0  # the published prior
            assert both.query_docs["missing"].found is False
            assert both.docs["missing"].ctr_30d == 1.0 / 21.0  # doc: none published
            assert both.query_docs["present"].found is True
        # A query without words has no key to read: the prior this reader last saw.
        assert sync.query_doc_features("  ", docs)["missing"].ctr_30d == 3.0 / 30.0
    finally:
        sync.close()
        redis_client.delete(f"{key_prefix}:prior:qd")
