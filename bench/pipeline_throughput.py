"""Throughput and memory of the full pipeline on the real services, against a Python ceiling.

    .venv/bin/python bench/pipeline_throughput.py [--events 200000] [--docs 50000]
                                                  [--processes N] [--set NAME=VALUE ...]

1. Produces N generated events (Zipf docs, sessions, 7 days of event time) to a fresh topic.
2. The ceiling: a plain confluent-kafka consumer loop that only decodes JSON and counts
   impressions and clicks per doc in a dict.
3. The pipeline: `python -m dataflow.run` (one worker, Redis sink, no OpenSearch) over the
   same topic to its end, timed from start to exit (start-up included, reported apart).

Reports events/s for both and their ratio, Redis commands per event (INFO commandstats),
the pipeline's peak resident memory and the live keys it ended with. Prints one table and
writes bench/results/pipeline_throughput.json. Needs `make up`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchkit import commandstats, free_port  # noqa: E402

from dataflow.config import Config  # noqa: E402
from dataflow.kafka.topics import ensure_topics, produce  # noqa: E402
from dataflow.sinks.marker import marker_key  # noqa: E402
from dataflow.tools.generator import GeneratorConfig, generate  # noqa: E402

DAY_MS = 86_400_000
BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def produce_stream(topic: str, n_events: int, n_docs: int) -> int:
    now = int(time.time() * 1000)
    config = GeneratorConfig(
        seed=3,
        n_events=n_events,
        n_docs=n_docs,
        n_queries=2_000,
        start_ms=now - 7 * DAY_MS,
        span_ms=7 * DAY_MS - 60_000,
        duplicate_fraction=0.01,
        max_disorder_ms=60_000,
    )
    return produce(BROKERS, topic, generate(config), timeout_s=120)


def ceiling(topic: str, partitions: int, expected: int) -> float:
    """Decode-and-count loop: the most a single Python process does with these messages."""
    consumer = Consumer(
        {
            "bootstrap.servers": BROKERS,
            "group.id": "bench-ceiling",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    counts: dict[str, list[int]] = {}
    seen = eof = 0
    start = time.perf_counter()
    while eof < partitions:
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is not None:
                eof += 1
                continue
            seen += 1
            try:
                event = orjson.loads(msg.value())
            except orjson.JSONDecodeError:
                continue
            kind = event.get("type")
            if kind == "search_impression":
                for doc in event.get("doc_ids", ()):
                    counts.setdefault(doc, [0, 0])[0] += 1
            elif kind == "click":
                counts.setdefault(event.get("doc_id"), [0, 0])[1] += 1
    elapsed = time.perf_counter() - start
    consumer.close()
    assert seen == expected, (seen, expected)
    return elapsed


SERVICES = ("redis", "kafka")
"""Stack services whose CPU a run reports (their pids in `.stack/run/`)."""


def service_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by each stack service running from this tree's `make up`."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name in SERVICES:
        try:
            pid = (ROOT / ".stack" / "run" / f"{name}.pid").read_text().strip()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return out


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cores_used(before: dict[str, float], wall_s: float, pipeline_cpu_s: float) -> dict[str, float]:
    """CPU of a run in cores (CPU seconds per wall second): the pipeline and each service."""
    after = service_cpu_s()
    cores = {"pipeline": pipeline_cpu_s / wall_s}
    cores.update({name: (after[name] - before[name]) / wall_s for name in after if name in before})
    return {name: round(value, 2) for name, value in cores.items()}


def run_cluster(env: dict[str, str], processes: int) -> float:
    """The same run as `processes` processes of one cluster (`-i/-a`); wall seconds."""
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    start = time.perf_counter()
    procs = [
        subprocess.Popen(  # noqa: S603 - our own module
            [sys.executable, "-m", "dataflow.run", "-i", str(i), "-a", addresses], env=env
        )
        for i in range(processes)
    ]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"a pipeline process failed: exit codes {codes}")
    return time.perf_counter() - start


def pipeline_env(topic: str, prefix: str, settings: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "KAFKA_BROKERS": BROKERS,
        "KAFKA_TOPICS": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}-dlq",
        "KAFKA_STOP_AT_END": "true",
        "REDIS_URL": REDIS_URL,
        "FEATURE_PREFIX": prefix,
        "OPENSEARCH_URL": "",
        "METRICS_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
        **(settings or {}),
    }
    env.pop("RECOVERY_DIR", None)
    return env


def run_pipeline(
    topic: str, prefix: str, settings: dict[str, str] | None = None
) -> tuple[float, float, int, int, dict[str, float]]:
    env = pipeline_env(topic, prefix, settings)
    start = time.perf_counter()
    # Start-up alone: the same command on an empty topic.
    empty = f"{topic}-empty"
    ensure_topics(Config.from_env(env).kafka, [empty], partitions=1)
    subprocess.run(
        [sys.executable, "-m", "dataflow.run"], env={**env, "KAFKA_TOPICS": empty}, check=True
    )
    startup = time.perf_counter() - start
    idle_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cpu_before, services_before = children_cpu_s(), service_cpu_s()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dataflow.run"], env=env, check=True)
    elapsed = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cores = cores_used(services_before, elapsed, children_cpu_s() - cpu_before)
    return elapsed, startup, idle_kib, max(peak_kib, idle_kib), cores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also run the same topic as a cluster of this many processes, into its own "
        "prefix, and report its events/s and the ratio to one process",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the pipeline (repeatable), e.g. SMOOTHING_QD_PRIOR=fitted to "
        "measure what a feature costs",
    )
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)

    token = f"bench{int(time.time())}"
    topic, prefix = f"{token}-events", f"bench_{token}"
    config = Config.from_env({"KAFKA_BROKERS": BROKERS})
    ensure_topics(config.kafka, [topic, f"{topic}-dlq"], partitions=args.partitions)
    t0 = time.perf_counter()
    produced = produce_stream(topic, args.events, args.docs)
    produce_s = time.perf_counter() - t0

    ceiling_s = ceiling(topic, args.partitions, produced)

    client = redis.Redis.from_url(REDIS_URL)
    calls_before = commandstats(client)
    elapsed, startup, idle_kib, peak_kib, cores = run_pipeline(topic, prefix, settings)
    calls = commandstats(client) - calls_before
    marker = marker_key(prefix).encode()  # the store marker is no feature key
    live_keys = sum(1 for k in client.scan_iter(match=f"{prefix}:*", count=5000) if k != marker)
    steady = max(elapsed - startup, 1e-9)

    result = {
        "settings": " ".join(args.set) or "defaults",
        "events": produced,
        "partitions": args.partitions,
        "produce_s": round(produce_s, 2),
        "ceiling_events_per_s": round(produced / ceiling_s),
        "pipeline_s": round(elapsed, 2),
        "pipeline_startup_s": round(startup, 2),
        "pipeline_events_per_s": round(produced / steady),
        "pipeline_events_per_s_incl_startup": round(produced / elapsed),
        "ratio_to_ceiling": round((produced / steady) / (produced / ceiling_s), 3),
        "redis_commands": calls,
        "redis_commands_per_event": round(calls / produced, 3),
        "live_keys": live_keys,
        "idle_rss_mib": round(idle_kib / 1024, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        # What the live keys (and their dedup ids, in flight batches) add to an idle process.
        "rss_mib_per_100k_keys": round(
            (peak_kib - idle_kib) / 1024 / max(live_keys, 1) * 100_000, 1
        ),
    }
    # Cores busy during the run (start-up included): on a small machine the pipeline, Redis
    # and Kafka share them, which bounds what more processes can add.
    result.update({f"cores_{name}": value for name, value in cores.items()})
    if args.processes > 1:
        n = args.processes
        env = pipeline_env(topic, f"{prefix}_x{n}", settings)
        cpu_before, services_before = children_cpu_s(), service_cpu_s()
        wall_s = run_cluster(env, n)
        cluster_cores = cores_used(services_before, wall_s, children_cpu_s() - cpu_before)
        cluster_s = max(wall_s - startup, 1e-9)
        result[f"pipeline_events_per_s_{n}_processes"] = round(produced / cluster_s)
        result[f"scale_out_{n}_processes"] = round(steady / cluster_s, 2)
        result.update({f"cores_{name}_{n}_processes": v for name, v in cluster_cores.items()})
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
