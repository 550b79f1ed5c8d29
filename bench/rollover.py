"""The daily re-statement at scale, on the real Redis: how long it takes, how many commands
per second it sends, and what a ranking read sees meanwhile.

    .venv/bin/python bench/rollover.py [--keys 1000000] [--rate 50000] [--rate 0]

Builds `--keys` doc keys (one day each) in 128 `FeatureShard`s and writes them through the
Redis sink's writer, then moves the clock into the next day and drives every shard's flush
once per second, as the flow's flush timers do, until every key is re-stated. Meanwhile a
second process calls `FeatureReader.doc_features` with 200 random ids in a loop. For each
`--rate` (`RESTATE_KEYS_PER_SECOND`; 0 = all at once) it prints the duration, the peak of
Redis' own instantaneous commands/s, and the reader's p50/p99 before and during. Needs
`make up`; writes bench/results/rollover.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchkit import READER, percentile  # noqa: E402

from dataflow.config import RedisSettings  # noqa: E402
from dataflow.core.families import DOC, FeatureParams, expected_units  # noqa: E402
from dataflow.core.shard import FeatureShard  # noqa: E402
from dataflow.retry import Backoff  # noqa: E402
from dataflow.settings import Secret  # noqa: E402
from dataflow.sinks.redis import RedisWriter, coalesce  # noqa: E402

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DAY_MS = 86_400_000
SHARDS = 128


def run(keys: int, rate: int, prefix: str) -> dict[str, Any]:
    params = FeatureParams()
    per_flush = None if rate == 0 else max(1, -(-rate // SHARDS))
    shards = [FeatureShard(params, restate_per_flush=per_flush) for _ in range(SHARDS)]
    now = int(time.time() * 1000)
    day0 = now - now % DAY_MS - DAY_MS  # yesterday: the rollover moves into today
    impression = (1, 0, 0, expected_units(0.1))
    for i in range(keys):
        suffix = f"doc:d{i:09d}"
        shard = shards[zlib.crc32(suffix.encode()) % SHARDS]
        shard.step([[(DOC, suffix, day0 + i % DAY_MS, impression)]])
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=30)
    writer = RedisWriter(
        client, RedisSettings(url=Secret(REDIS_URL), prefix=prefix, ttl_seconds=3600), Backoff()
    )
    for shard in shards:
        latest, ttl, _ = coalesce([shard.flush()])
        writer.write(list(latest.values()), ttl)

    reader = subprocess.Popen(  # noqa: S603 - our own code
        [sys.executable, "-c", READER, REDIS_URL, prefix, str(keys)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(5)  # reads before the rollover
    start = time.time()
    for shard in shards:
        shard.step([day0 + DAY_MS])
    peak_ops = 0
    restated = 0
    while any(shard.pending for shard in shards):
        tick = time.monotonic()
        for shard in shards:
            if shard.pending:
                result = shard.flush()
                latest, ttl, _ = coalesce([result])
                writer.write(list(latest.values()), ttl)
                restated += len(latest)
        peak_ops = max(peak_ops, int(client.info("stats")["instantaneous_ops_per_sec"]))
        if per_flush is not None:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    end = time.time()
    time.sleep(3)
    reader.terminate()
    lines = (reader.communicate()[0] or "").split("\n")
    samples = [tuple(map(float, line.split())) for line in lines if line.strip()]
    before = [ms for t, ms in samples if t < start]
    during = [ms for t, ms in samples if start <= t <= end]
    for lo in range(0, keys, 10_000):
        client.delete(*[f"{prefix}:doc:d{i:09d}" for i in range(lo, min(keys, lo + 10_000))])
    return {
        "keys": keys,
        "rate_keys_per_s": rate,
        "restated": restated,
        "duration_s": round(end - start, 1),
        "peak_redis_ops_per_s": peak_ops,
        "reader_p50_ms_before": round(statistics.median(before), 2) if before else None,
        "reader_p99_ms_before": round(percentile(before, 0.99), 2),
        "reader_p50_ms_during": round(statistics.median(during), 2) if during else None,
        "reader_p99_ms_during": round(percentile(during, 0.99), 2),
        "reader_calls_during": len(during),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, action="append")
    args = parser.parse_args()
    results = []
    for rate in args.rate or [50_000, 0]:
        result = run(args.keys, rate, f"bench_rollover_{int(time.time())}")
        results.append(result)
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    out = ROOT / "bench" / "results" / "rollover.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
