"""The OpenSearch support index on the real stack (contract §6, docs/opensearch.md).

- The index command: idempotent create behind an alias, refusal of a conflicting mapping,
  atomic swap.
- A Zipf stream through the whole pipeline: a rank_feature query orders documents as the
  generated clicks say, the index holds every document within the 5% threshold of Redis,
  zeros are left out, and the number of updates sent is a small fraction of the events.
- Main-index mode: the same fields patched into an existing search index.
- OpenSearch stopped mid-stream (slow): Redis keeps up while it is down, nothing is lost,
  and the index converges once it is back.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from bytewax.testing import run_main
from confluent_kafka import Producer
from opensearchpy import OpenSearch
from prometheus_client import REGISTRY

from dataflow.config import Config
from dataflow.errors import SinkError
from dataflow.flow import build_flow
from dataflow.opensearch.index import run as index_command
from dataflow.opensearch.updates import rank_value
from dataflow.tools.generator import GeneratedMessage, GeneratorConfig, generate

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "stack" / "stack.sh"
DAY_MS = 86_400_000
FEATURES = ("popularity_7d", "popularity_30d", "ctr_30d")
MIN_CHANGE = 0.05


# --- helpers -----------------------------------------------------------------------------


def produce(brokers: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    for value in values:
        producer.produce(topic, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0, "Kafka did not acknowledge every test message"


def flow_env(
    brokers: str, topic: str, dlq: str, prefix: str, redis_url: str, os_url: str, index: str
) -> dict[str, str]:
    return {
        "KAFKA_BROKERS": brokers,
        "KAFKA_TOPICS": topic,
        "KAFKA_DLQ_TOPIC": dlq,
        "KAFKA_STOP_AT_END": "true",
        "KAFKA_BATCH_SIZE": "100",  # small batches, as a live tail delivers them
        "FEATURE_PREFIX": prefix,
        "FEATURE_SHARDS": "16",
        "REDIS_URL": redis_url,
        "OPENSEARCH_URL": os_url,
        "OPENSEARCH_INDEX": index,
        # Never the shared default `ac-features`; `{index}*` cleans it up too.
        "OPENSEARCH_AC_INDEX": f"{index}_ac",
        "OPENSEARCH_PARTITIONS": "2",
    }


def redis_docs(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    """doc id -> hash fields of every `P:doc:*` key."""
    keys = list(client.scan_iter(match=f"{prefix}:doc:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    out = {}
    for key, raw in zip(keys, pipe.execute(), strict=True):
        doc_id = urllib.parse.unquote(key.decode().split(":", 2)[2])
        out[doc_id] = {k.decode(): v.decode() for k, v in raw.items()}
    return out


def index_docs(client: OpenSearch, index: str) -> dict[str, dict[str, Any]]:
    client.indices.refresh(index=index)
    hits = client.search(index=index, body={"query": {"match_all": {}}, "size": 10_000})
    return {hit["_id"]: hit["_source"] for hit in hits["hits"]["hits"]}


def mismatches(
    store: dict[str, dict[str, str]], index: dict[str, dict[str, Any]], fields: tuple[str, ...]
) -> list[str]:
    """Documents whose indexed features are not within the threshold of Redis's values."""
    out = []
    for doc_id, hash_fields in store.items():
        doc = index.get(doc_id)
        if doc is None:
            out.append(f"{doc_id}: not indexed")
            continue
        for name in fields:
            want = rank_value(float(hash_fields[name]))
            have = doc.get(name)
            if want is None or have is None:
                if want is not have:
                    out.append(f"{doc_id}.{name}: indexed {have}, Redis {hash_fields[name]}")
            elif abs(have - want) >= MIN_CHANGE * have:
                out.append(f"{doc_id}.{name}: indexed {have}, Redis {want}")
    out.extend(f"{doc_id}: indexed, not in Redis" for doc_id in index.keys() - store.keys())
    return out


def delete_indices(client: OpenSearch, pattern: str) -> None:
    client.indices.delete(index=pattern, ignore_unavailable=True, expand_wildcards="all")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the index command -------------------------------------------------------------------


def test_index_command_creates_idempotently_refuses_conflicts_and_swaps(
    opensearch_url: str, opensearch_client: OpenSearch, unique_name: str
) -> None:
    alias, ac = f"it-{unique_name}", f"it-{unique_name}_ac"
    env = {"OPENSEARCH_URL": opensearch_url, "OPENSEARCH_INDEX": alias, "OPENSEARCH_AC_INDEX": ac}
    try:
        code, out = index_command(["create"], env)
        assert code == 0, out
        assert out["support"] == {"name": alias, "kind": "alias", "indices": [f"{alias}-000001"]}
        assert out["ac"] == {"name": ac, "kind": "alias", "indices": [f"{ac}-000001"]}
        ac_mapping = opensearch_client.indices.get_mapping(index=f"{ac}-000001")
        assert ac_mapping[f"{ac}-000001"]["mappings"] == {
            "dynamic": "strict",
            "properties": {
                "candidate": {"type": "keyword"},
                "selects_30d": {"type": "rank_feature"},
                "click_rate_30d": {"type": "rank_feature"},
                "as_of": {"type": "date", "format": "epoch_millis"},
            },
        }
        mapping = opensearch_client.indices.get_mapping(index=f"{alias}-000001")
        props = mapping[f"{alias}-000001"]["mappings"]["properties"]
        assert {name: props[name]["type"] for name in (*FEATURES, "as_of", "doc_id")} == {
            "popularity_7d": "rank_feature",
            "popularity_30d": "rank_feature",
            "ctr_30d": "rank_feature",
            "as_of": "date",
            "doc_id": "keyword",
        }
        assert index_command(["create"], env) == (0, out)  # idempotent

        code, new = index_command(["create", "--new"], env)
        assert (code, new["created"]) == (0, f"{alias}-000002")
        opensearch_client.index(
            index=new["created"], id="x", body={"doc_id": "x", "popularity_7d": 3.0}, refresh=True
        )
        code, swapped = index_command(["swap", new["created"]], env)
        assert (code, swapped["removed_from"]) == (0, [f"{alias}-000001"])
        assert set(opensearch_client.indices.get_alias(name=alias)) == {f"{alias}-000002"}
        assert opensearch_client.get(index=alias, id="x")["found"]

        # The AC index rebuilds the same way; swap finds the alias from the index's name.
        code, new_ac = index_command(["create", "--new", "--alias", "ac"], env)
        assert (code, new_ac["created"], new_ac["alias"]) == (0, f"{ac}-000002", ac)
        code, swapped = index_command(["swap", new_ac["created"]], env)
        assert (code, swapped["alias"], swapped["removed_from"]) == (0, ac, [f"{ac}-000001"])
        assert set(opensearch_client.indices.get_alias(name=ac)) == {f"{ac}-000002"}
        assert set(opensearch_client.indices.get_alias(name=alias)) == {f"{alias}-000002"}
        code, err = index_command(["swap", new_ac["created"], "--alias", "support"], env)
        assert code == 1  # the AC mapping is not the support index's
        assert "doc_id is not mapped" in err["error"]

        # A conflicting existing index is refused, naming the field and the fix.
        bad = f"{alias}-bad"
        opensearch_client.indices.create(
            index=bad, body={"mappings": {"properties": {"popularity_7d": {"type": "float"}}}}
        )
        code, err = index_command(["create"], {**env, "OPENSEARCH_INDEX": bad})
        assert code == 1
        assert "popularity_7d is mapped as float, needs rank_feature" in err["error"]
        code, err = index_command(["swap", bad], env)
        assert code == 1
        assert "popularity_7d" in err["error"]
        assert set(opensearch_client.indices.get_alias(name=alias)) == {f"{alias}-000002"}

        # The module runs as a command and reports through its exit code.
        proc = subprocess.run(
            [sys.executable, "-m", "dataflow.opensearch.index", "status"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["support"]["kind"] == "alias"
        assert status["support"]["indices"] == [
            {"index": f"{alias}-000002", "docs": 1, "missing": [], "conflicts": []}
        ]
        assert status["ac"]["indices"] == [
            {"index": f"{ac}-000002", "docs": 0, "missing": [], "conflicts": []}
        ]
    finally:
        delete_indices(opensearch_client, f"{alias}*")


# --- a Zipf stream through the pipeline --------------------------------------------------


@dataclass
class ZipfRun:
    prefix: str
    index: str
    messages: list[GeneratedMessage]
    events: int
    sent: float  # documents acknowledged, both indices (the sink's metric)
    doc_sent: float  # of which to the document index (its own indexing stats)
    outcomes: dict[str, float]  # opensearch_updates_total by outcome, during the run
    seconds: float

    @property
    def received(self) -> float:
        """Document updates that reached the sink."""
        return self.outcomes["queued"] + self.outcomes["coalesced"] + self.outcomes["skipped"]


@dataclass
class ZipfTopic:
    brokers: str
    topic: str
    messages: list[GeneratedMessage]


@pytest.fixture(scope="module")
def zipf_topic(kafka_brokers: str, kafka_admin: Any) -> Iterator[ZipfTopic]:
    """A Zipf stream (30 000 events, 500 documents, 3 days) in a topic of its own."""
    from confluent_kafka.admin import NewTopic

    topic = f"os-z{os.urandom(4).hex()}"
    kafka_admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(60)
    now = int(time.time() * 1000)
    config = GeneratorConfig(
        seed=5,
        n_events=30_000,
        n_docs=500,
        n_queries=100,
        start_ms=now - 3 * DAY_MS,
        span_ms=3 * DAY_MS - 60_000,
    )
    messages = list(generate(config))
    produce(kafka_brokers, topic, [m.value for m in messages])
    yield ZipfTopic(kafka_brokers, topic, messages)
    kafka_admin.delete_topics([topic])


def run_zipf(
    stream: ZipfTopic,
    redis_url: str,
    opensearch_url: str,
    opensearch_client: OpenSearch,
    overrides: dict[str, str],
) -> ZipfRun:
    token = f"z{os.urandom(4).hex()}"
    prefix, index = f"it_{token}", f"it-{token}"
    dlq = f"{stream.topic}-dlq-{token}"

    def outcomes() -> dict[str, float]:
        return {
            o: metric("search_features_opensearch_updates_total", outcome=o)
            for o in ("queued", "coalesced", "skipped", "shed_update", "shed_delete", "withdrawn")
        }

    sent = metric("search_features_sink_writes_total", sink="opensearch", result="success")
    before = outcomes()
    started = time.monotonic()
    env = flow_env(stream.brokers, stream.topic, dlq, prefix, redis_url, opensearch_url, index)
    run_main(build_flow(Config.from_env({**env, **overrides})))
    return ZipfRun(
        prefix,
        index,
        stream.messages,
        events=len(stream.messages),
        sent=metric("search_features_sink_writes_total", sink="opensearch", result="success")
        - sent,
        # The sink's metrics cover the autocomplete index too (the stream has selects); the
        # write amplification of the document index is read from that index.
        doc_sent=sum(
            stats["primaries"]["indexing"]["index_total"]
            + stats["primaries"]["indexing"]["delete_total"]
            for stats in opensearch_client.indices.stats(index=index, metric="indexing")[
                "indices"
            ].values()
        ),
        outcomes={o: n - before[o] for o, n in outcomes().items()},
        seconds=time.monotonic() - started,
    )


def cleanup(run: ZipfRun, redis_url: str, opensearch_client: OpenSearch) -> None:
    delete_indices(opensearch_client, f"{run.index}*")
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{run.prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


@pytest.fixture(scope="module")
def zipf_run(
    zipf_topic: ZipfTopic, redis_url: str, opensearch_url: str, opensearch_client: OpenSearch
) -> Iterator[ZipfRun]:
    """The pipeline over the Zipf stream with every 100-event batch written out (no shard
    flush interval): the most updates the sink can be offered, the hardest case for both
    convergence and write amplification. Shared by the tests that inspect the result."""
    run = run_zipf(
        zipf_topic, redis_url, opensearch_url, opensearch_client, {"FEATURE_FLUSH_INTERVAL_MS": "0"}
    )
    yield run
    cleanup(run, redis_url, opensearch_client)


def expected_clicks(messages: list[GeneratedMessage]) -> collections.Counter[str]:
    """popularity_30d as the stream implies it: clicks per doc (default weights, 3 days)."""
    return collections.Counter(
        m.event["doc_id"] for m in messages if m.event is not None and m.event["type"] == "click"
    )


def test_rank_feature_query_orders_documents_by_the_streams_popularity(
    zipf_run: ZipfRun, opensearch_client: OpenSearch
) -> None:
    clicks = expected_clicks(zipf_run.messages)
    opensearch_client.indices.refresh(index=zipf_run.index)
    result = opensearch_client.search(
        index=zipf_run.index,
        body={
            "size": 30,
            "query": {"rank_feature": {"field": "popularity_30d", "saturation": {"pivot": 10}}},
            "track_total_hits": True,
        },
    )
    ranked = [hit["_id"] for hit in result["hits"]["hits"]]
    # Only documents with a click have the feature (zero is left out, and so never matches).
    assert result["hits"]["total"]["value"] == len(clicks)
    truth = sorted(clicks.values(), reverse=True)
    assert clicks[ranked[0]] >= truth[0] * 0.9
    # Indexed values are within 5% of the truth and rank_feature keeps 9 significant bits,
    # so a document may only precede one with a truly higher count by that much.
    for before, after in zip(ranked, ranked[1:], strict=False):
        assert clicks[before] >= clicks[after] * 0.9, (before, after)
    assert min(clicks[d] for d in ranked[:10]) >= truth[9] * 0.9
    # log and sigmoid order the same way (both increasing in the value).
    for function in ({"log": {"scaling_factor": 1}}, {"sigmoid": {"pivot": 10, "exponent": 0.6}}):
        other = opensearch_client.search(
            index=zipf_run.index,
            body={"size": 10, "query": {"rank_feature": {"field": "popularity_30d", **function}}},
        )
        top = [hit["_id"] for hit in other["hits"]["hits"]]
        assert min(clicks[d] for d in top) >= truth[9] * 0.9


def test_index_holds_every_document_within_the_threshold_of_redis(
    zipf_run: ZipfRun, opensearch_client: OpenSearch, redis_client: redis.Redis
) -> None:
    store = redis_docs(redis_client, zipf_run.prefix)
    index = index_docs(opensearch_client, zipf_run.index)
    assert len(store) > 300
    problems = mismatches(store, index, FEATURES)
    assert not problems, problems[:20]
    zero = [d for d, f in store.items() if float(f["popularity_30d"]) == 0.0]
    assert zero, "the stream should leave some documents without clicks"
    assert all("popularity_30d" not in index[d] for d in zero)
    assert all(index[d]["doc_id"] == d for d in index)


def report(label: str, run: ZipfRun) -> str:
    got = run.outcomes
    return (
        f"\n{label}: {run.events} events -> {run.received:.0f} document updates reached the "
        f"sink ({got['coalesced']:.0f} coalesced while pending, {got['skipped']:.0f} skipped "
        f"and {got['withdrawn']:.0f} withdrawn by the threshold) -> {run.sent:.0f} documents "
        f"sent ({run.doc_sent:.0f} to the document index); document index sent/events = "
        f"{run.doc_sent / run.events:.3f}, sent/updates = {run.sent / run.received:.3f}; "
        f"pipeline run {run.seconds:.1f}s"
    )


def test_updates_sent_are_a_small_fraction_of_the_events(
    zipf_run: ZipfRun,
    zipf_topic: ZipfTopic,
    redis_url: str,
    opensearch_url: str,
    opensearch_client: OpenSearch,
) -> None:
    # The same stream with the default shard flush interval (1 s) as well: a backlog read
    # in seconds coalesces far more per key than a live stream would, so it flatters.
    default = run_zipf(zipf_topic, redis_url, opensearch_url, opensearch_client, {})
    cleanup(default, redis_url, opensearch_client)
    print(report("every batch written", zipf_run) + report("default flush", default))  # noqa: T201
    for run in (zipf_run, default):
        got = run.outcomes
        assert got["shed_update"] == got["shed_delete"] == 0
        assert run.sent <= got["queued"] + got["coalesced"] - got["withdrawn"]
    # The threshold (with coalescing) keeps the sink to a fraction of what it is offered...
    assert zipf_run.sent < 0.4 * zipf_run.received
    # ...and so the document index to a fraction of the events, even when every batch is
    # written out.
    for run in (zipf_run, default):
        assert 0 < run.doc_sent <= run.sent
    assert zipf_run.doc_sent < 0.4 * zipf_run.events
    assert default.doc_sent < 0.1 * default.events


# --- main-index mode ---------------------------------------------------------------------


def test_main_index_mode_patches_the_search_index_itself(
    kafka_brokers: str,
    topic_factory: Any,
    redis_url: str,
    key_prefix: str,
    opensearch_url: str,
    opensearch_client: OpenSearch,
    unique_name: str,
) -> None:
    search, support = f"it-{unique_name}-search", f"it-{unique_name}-support"
    try:
        opensearch_client.indices.create(
            index=search, body={"mappings": {"properties": {"title": {"type": "text"}}}}
        )
        for doc_id in ("hot", "warm", "cold"):
            opensearch_client.index(index=search, id=doc_id, body={"title": f"{doc_id} doc"})
        env = {
            "OPENSEARCH_URL": opensearch_url,
            "OPENSEARCH_INDEX": support,
            "OPENSEARCH_DOCS_INDEX": search,
        }
        code, out = index_command(["create"], env)  # adds the fields to the search index
        assert code == 0, out
        props = opensearch_client.indices.get_mapping(index=search)[search]["mappings"]
        assert props["properties"]["popularity_30d"] == {"type": "rank_feature"}

        now = int(time.time() * 1000)
        events: list[dict[str, Any]] = [
            {
                "event_id": f"i{i}",
                "type": "search_impression",
                "ts": now - 60_000 + i,
                "query": "q",
                "doc_ids": ["hot", "warm", "cold", "not-in-search"],
            }
            for i in range(10)
        ]
        clicks = {"hot": 6, "warm": 2, "not-in-search": 1}
        events += [
            {"event_id": f"c-{d}-{i}", "type": "click", "ts": now - 30_000 + i, "doc_id": d}
            for d, n in clicks.items()
            for i in range(n)
        ]
        topic, dlq = topic_factory(1), topic_factory(1)
        produce(kafka_brokers, topic, [json.dumps(e).encode() for e in events])
        missing = metric(
            "search_features_opensearch_failures_total", reason="document_missing_exception"
        )
        config = Config.from_env(
            {
                **flow_env(
                    kafka_brokers, topic, dlq, key_prefix, redis_url, opensearch_url, support
                ),
                "OPENSEARCH_DOCS_INDEX": search,
            }
        )
        run_main(build_flow(config))

        opensearch_client.indices.refresh(index=search)
        docs = {
            d: opensearch_client.get(index=search, id=d)["_source"] for d in ("hot", "warm", "cold")
        }
        assert docs["hot"]["title"] == "hot doc"  # a partial update keeps the owner's fields
        assert (docs["hot"]["popularity_30d"], docs["warm"]["popularity_30d"]) == (6.0, 2.0)
        assert docs["cold"]["popularity_30d"] is None  # zero: null in _source...
        unranked = opensearch_client.search(
            index=search, body={"query": {"exists": {"field": "popularity_30d"}}}
        )
        assert {h["_id"] for h in unranked["hits"]["hits"]} == {"hot", "warm"}  # ...not indexed
        assert docs["cold"]["ctr_30d"] == pytest.approx(1 / 31)
        assert all(doc["popularity_as_of"] >= now - 60_000 for doc in docs.values())
        assert not opensearch_client.exists(index=search, id="not-in-search")
        assert (
            metric("search_features_opensearch_failures_total", reason="document_missing_exception")
            == missing + 1
        )
        ranked = opensearch_client.search(
            index=search,
            body={
                "query": {
                    "bool": {
                        "must": {"match": {"title": "doc"}},
                        "should": {
                            "rank_feature": {
                                "field": "popularity_30d",
                                "log": {"scaling_factor": 1},
                            }
                        },
                    }
                }
            },
        )
        assert [hit["_id"] for hit in ranked["hits"]["hits"]] == ["hot", "warm", "cold"]
        # The support index got all four documents.
        assert set(index_docs(opensearch_client, support)) == {
            "hot",
            "warm",
            "cold",
            "not-in-search",
        }
    finally:
        delete_indices(opensearch_client, f"it-{unique_name}-*")


def test_the_sink_refuses_a_conflicting_mapping(
    kafka_brokers: str,
    topic_factory: Any,
    redis_url: str,
    key_prefix: str,
    opensearch_url: str,
    opensearch_client: OpenSearch,
    unique_name: str,
) -> None:
    index = f"it-{unique_name}-float"
    try:
        opensearch_client.indices.create(
            index=index, body={"mappings": {"properties": {"popularity_7d": {"type": "float"}}}}
        )
        topic, dlq = topic_factory(1), topic_factory(1)
        now = int(time.time() * 1000)
        messages = generate(
            GeneratorConfig(seed=3, n_events=3_000, n_docs=200, start_ms=now - DAY_MS)
        )
        produce(kafka_brokers, topic, [m.value for m in messages])
        env = flow_env(kafka_brokers, topic, dlq, key_prefix, redis_url, opensearch_url, index)
        # Many small batches, so the sink sees batches after its first index check.
        config = Config.from_env(
            {**env, "KAFKA_BATCH_SIZE": "10", "FEATURE_FLUSH_INTERVAL_MS": "0"}
        )
        with pytest.raises(Exception) as info:  # noqa: PT011 - Bytewax wraps it; checked below
            run_main(build_flow(config))
        chain = []
        error: BaseException | None = info.value
        while error is not None:
            chain.append(error)
            error = error.__cause__
        sink_errors = [e for e in chain if isinstance(e, SinkError)]
        assert sink_errors, chain
        assert "popularity_7d is mapped as float, needs rank_feature" in str(sink_errors[0])
        assert opensearch_client.count(index=index)["count"] == 0
    finally:
        delete_indices(opensearch_client, f"{index}*")


# --- OpenSearch stopped mid-stream -------------------------------------------------------


def stack(*args: str) -> None:
    proc = subprocess.run(
        [str(STACK), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"stack.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def opensearch_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_cluster/health", timeout=2) as resp:  # noqa: S310
            return json.loads(resp.read()).get("status") in ("green", "yellow")
    except OSError:
        return False


def total_clicks(client: redis.Redis, prefix: str) -> int:
    return sum(int(f.get("clicks_30d", "0")) for f in redis_docs(client, prefix).values())


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Poll until `predicate()` is true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.mark.slow
def test_opensearch_outage_never_slows_redis_and_the_index_converges(
    kafka_brokers: str,
    topic_factory: Any,
    redis_client: redis.Redis,
    redis_url: str,
    key_prefix: str,
    opensearch_url: str,
    opensearch_client: OpenSearch,
    unique_name: str,
    tmp_path: Path,
) -> None:
    index = f"it-{unique_name}-outage"
    topic, dlq = topic_factory(1), topic_factory(1)
    now = int(time.time() * 1000)
    stream = list(
        generate(
            GeneratorConfig(
                seed=9, n_events=12_000, n_docs=400, start_ms=now - DAY_MS, span_ms=DAY_MS - 60_000
            )
        )
    )
    chunks = [stream[i : i + 2_000] for i in range(0, len(stream), 2_000)]
    clicks_so_far = 0

    def produce_chunk(chunk: list[GeneratedMessage]) -> float:
        """Produce, then return how long Redis took to reflect every click in it."""
        nonlocal clicks_so_far
        produce(kafka_brokers, topic, [m.value for m in chunk])
        clicks_so_far += sum(1 for m in chunk if m.event and m.event["type"] == "click")
        target = clicks_so_far
        return wait_for(
            lambda: total_clicks(redis_client, key_prefix) == target, 30, "Redis to catch up"
        )

    port = free_port()
    env = {
        **os.environ,
        **flow_env(kafka_brokers, topic, dlq, key_prefix, redis_url, opensearch_url, index),
        "KAFKA_STOP_AT_END": "false",
        "OPENSEARCH_BACKOFF_MAX_SECONDS": "2",
        "OPENSEARCH_TIMEOUT_SECONDS": "2",
        "BYTEWAX_DATAFLOW_API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    log_path = tmp_path / "pipeline.log"
    with log_path.open("w") as log_file:
        pipeline = subprocess.Popen(  # noqa: S603 - our own module
            [sys.executable, "-m", "dataflow.run"],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    pending = "search_features_opensearch_pending_docs"
    try:
        lag_before = produce_chunk(chunks[0])
        wait_for(
            lambda: (
                not mismatches(
                    redis_docs(redis_client, key_prefix),
                    index_docs(opensearch_client, index),
                    FEATURES,
                )
            ),
            30,
            "the index to match Redis before the outage",
        )

        stack("stop", "opensearch")
        assert not opensearch_up(opensearch_url)
        lags_down = [produce_chunk(chunk) for chunk in chunks[1:4]]
        pending_down = scrape(port, pending)
        assert pending_down is not None and pending_down > 0

        # Restart in the background and keep producing while it boots (the JVM start is
        # the heaviest moment for a 2-core machine).
        restarted = threading.Thread(target=stack, args=("start", "opensearch"))
        restarted.start()
        lags_booting = [produce_chunk(chunk) for chunk in chunks[4:]]
        restarted.join()
        assert opensearch_up(opensearch_url)
        back = time.monotonic()
        convergence = wait_for(
            lambda: (
                not mismatches(
                    redis_docs(redis_client, key_prefix),
                    index_docs(opensearch_client, index),
                    FEATURES,
                )
            ),
            60,
            "the index to converge after the restart",
        )
        drained = wait_for(lambda: scrape(port, pending) == 0, 30, "the pending set to drain")
        assert pipeline.poll() is None, log_path.read_text()[-3000:]
        print(  # noqa: T201 - the figures the docs quote (run with -s to see them)
            f"\nRedis catch-up per 2000-event chunk: before {lag_before:.1f}s, OpenSearch down "
            f"{[round(x, 1) for x in lags_down]}s, while it boots "
            f"{[round(x, 1) for x in lags_booting]}s; pending while down {pending_down:.0f}; "
            f"index converged {convergence:.1f}s after OpenSearch was healthy "
            f"(pending drained {time.monotonic() - back:.1f}s, {drained:.1f}s)"
        )
        # Redis kept up: no chunk took much longer than before the outage.
        assert max(lags_down + lags_booting) < max(10.0, 5 * lag_before)
    finally:
        if not opensearch_up(opensearch_url):
            stack("start", "opensearch")
        pipeline.terminate()
        try:
            pipeline.wait(15)
        except subprocess.TimeoutExpired:
            pipeline.kill()
            pipeline.wait(15)
        delete_indices(opensearch_client, f"{index}*")
