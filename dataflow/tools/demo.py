"""`make run`: demo events into Kafka, the pipeline over them, features out.

1. creates the topics (4 partitions) if they are missing;
2. produces `DEMO_EVENTS` (default 20 000) generated events covering the last three days:
   Zipf-popular docs, autocomplete → search → click sessions, 2% re-sent duplicates and 1%
   broken messages;
3. runs `python -m dataflow.run` with recovery in `.recovery/demo` until it has read to the
   end of the topic (`KAFKA_STOP_AT_END=true`), so a second `make run` resumes from the
   snapshot and only reads the new events;
4. prints the most popular documents, one query's per-document CTRs and autocomplete
   rates, read back through `dataflow.reader.FeatureReader`.

Every setting of the pipeline (`KAFKA_*`, `REDIS_URL`, `FEATURE_PREFIX`, ...) applies.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

from opensearchpy import OpenSearchException

from dataflow import settings
from dataflow.config import Config
from dataflow.core import keys
from dataflow.kafka.topics import end_offsets, ensure_topics, produce
from dataflow.opensearch.index import client_for
from dataflow.reader import FeatureReader
from dataflow.sinks.redis import connect
from dataflow.tools.generator import GeneratedMessage, GeneratorConfig, generate

DAY_MS = 86_400_000
# Unlike `dataflow.run`, the demo keeps a recovery directory unless RECOVERY_DIR names one:
# a second `make run` resumes from the snapshot.
DEMO_RECOVERY_DIR = ".recovery/demo"


def main() -> int:
    config = Config.from_env()
    topic = config.kafka.topics[0]
    brokers = ",".join(config.kafka.brokers)
    n_events = settings.DEMO_EVENTS.read()
    recovery_dir = settings.RECOVERY_DIR.read() or DEMO_RECOVERY_DIR

    ensure_topics(config.kafka, [*config.kafka.topics, config.kafka.dlq_topic], partitions=4)
    now = int(time.time() * 1000)
    generator = GeneratorConfig(
        seed=now % 1_000_000,  # new ids on every run; the pipeline counts each run's events
        n_events=n_events,
        n_docs=2_000,
        n_queries=200,
        start_ms=now - 3 * DAY_MS,
        span_ms=3 * DAY_MS - 60_000,
        duplicate_fraction=0.02,
        invalid_fraction=0.01,
        max_disorder_ms=120_000,
    )
    messages = list(generate(generator))
    started = time.monotonic()
    produced = produce(brokers, topic, messages)
    print(f"produced {produced} messages to {topic!r} in {time.monotonic() - started:.1f}s")

    env = {**os.environ, "KAFKA_STOP_AT_END": "true", "RECOVERY_DIR": recovery_dir}
    print(f"running the pipeline (recovery in {recovery_dir}) ...", flush=True)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "dataflow.run"], env=env, check=False)  # noqa: S603
    if run.returncode != 0:
        print(f"demo: the pipeline exited with status {run.returncode}; see its messages above")
        return run.returncode
    print(f"pipeline caught up in {time.monotonic() - started:.1f}s\n")

    show_features(config, messages)
    if config.opensearch.enabled:
        show_opensearch(config)
    dlq = sum(end_offsets(config.kafka, config.kafka.dlq_topic).values())
    print(f"\ndead-letter topic {config.kafka.dlq_topic!r} holds {dlq} envelopes in total")
    return 0


def show_features(config: Config, messages: list[GeneratedMessage]) -> None:
    client = connect(config.redis)
    reader = FeatureReader(client, prefix=config.redis.prefix, params=config.features)
    prefix = f"{config.redis.prefix}:doc:"
    doc_ids = [
        keys.dec(k.decode()[len(prefix) :]) for k in client.scan_iter(f"{prefix}*", count=1000)
    ]
    docs = reader.doc_features(doc_ids)
    top = sorted(docs.items(), key=lambda kv: kv[1].popularity_30d, reverse=True)[:10]
    print(f"{len(docs)} documents have features; the ten most popular (30 days):")
    print(f"  {'doc_id':<14}{'impr_30d':>9}{'clicks_30d':>11}{'ctr_30d':>9}{'ctr_decay':>10}")
    for doc_id, f in top:
        print(
            f"  {doc_id[:13]:<14}{f.impressions_30d:>9}{f.clicks_30d:>11}"
            f"{f.ctr_30d:>9.4f}{f.ctr_decay:>10.4f}"
        )

    events = [m.event for m in messages if m.event is not None]
    queries = collections.Counter(
        keys.q_norm(e["query"])
        for e in events
        if e["type"] == "search_impression" and e.get("query")
    )
    if queries:
        query = queries.most_common(1)[0][0]
        shown = [
            e["doc_ids"]
            for e in events
            if e["type"] == "search_impression" and keys.q_norm(e.get("query") or "") == query
        ][-1][:5]
        print(f"\nquery {query!r} (hash {keys.query_hash(query)}): per-document CTR")
        for doc_id, qd in reader.query_doc_features(query, shown).items():
            print(
                f"  {doc_id[:13]:<14} impressions_30d={qd.impressions_30d:<5} "
                f"clicks_30d={qd.clicks_30d:<4} ctr_30d={qd.ctr_30d:.4f}"
            )
    impressions = [e for e in events if e["type"] == "ac_impression"]
    if impressions:
        typed, candidates = impressions[-1]["prefix"], impressions[-1]["candidates"]
        print(f"\nautocomplete prefix {typed!r}: select rates")
        for candidate, ac in reader.autocomplete_features(typed, candidates).items():
            print(
                f"  {candidate[:30]:<31} impressions_30d={ac.impressions_30d:<4} "
                f"selects_30d={ac.selects_30d:<4} select_rate_30d={ac.select_rate_30d:.4f}"
            )


def show_opensearch(config: Config) -> None:
    """What ranking and suggestions see: `rank_feature` queries on the two support indices."""
    settings = config.opensearch
    client = client_for(settings)
    try:
        client.indices.refresh(index=f"{settings.index},{settings.ac_index}")
        docs = client.search(
            index=settings.index,
            body={"size": 5, "query": {"rank_feature": {"field": "popularity_30d"}}},
        )["hits"]["hits"]
        ac = client.search(
            index=settings.ac_index,
            body={"size": 5, "query": {"rank_feature": {"field": "click_rate_30d"}}},
        )["hits"]["hits"]
    except OpenSearchException as exc:
        print(f"\nOpenSearch support indices not readable yet: {exc}")
        return
    finally:
        client.close()
    print(f"\nOpenSearch {settings.index!r}: rank_feature(popularity_30d), top 5")
    for hit in docs:
        src = hit["_source"]
        print(
            f"  {hit['_id'][:13]:<14} popularity_30d={src.get('popularity_30d', 0):<8g} "
            f"ctr_30d={src.get('ctr_30d', 0):.4f}"
        )
    print(f"OpenSearch {settings.ac_index!r}: rank_feature(click_rate_30d), top 5")
    for hit in ac:
        src = hit["_source"]
        print(
            f"  {hit['_id'][:30]:<31} click_rate_30d={src.get('click_rate_30d', 0):.4f} "
            f"selects_30d={src.get('selects_30d', 0):g}"
        )


if __name__ == "__main__":
    sys.exit(main())
