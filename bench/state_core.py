"""Cost of the state core at a given number of live keys: per update, per key written,
memory per key, snapshot and restore, and the day rollover.

    .venv/bin/python bench/state_core.py [--keys 1000000] [--family doc|mixed]
                                         [--shards 128] [--batch 1000] [--gc-threshold N]

Drives `FeatureShard`s directly (no Kafka, Redis or Bytewax), so the figures are the core's
alone, comparable across key counts: only the number of distinct doc and query-doc ids
changes. Phases, each timed:

1. build: every update creates a key (doc keys, or half doc and half query-doc keys with
   `--family mixed`), one day of event time, grouped into shards as the flow groups them;
   resident memory per live key is the process RSS growth over the build (the key strings,
   the dicts and the counters) divided by the keys.
2. steady: as many updates again on the same keys (Zipf-free: uniform over the keys), then
   flush, rendering every dirty key's fields: cost per update and per key written.
3. snapshot: every shard's `snapshot()` (bytes), total size; restore: `FeatureShard.restore`.
4. rollover: a clock reading of the next day re-states every key; then flush. Between the
   two, every shard's snapshot with every key queued for re-statement (what each epoch of a
   rollover in progress writes).

Garbage collection as the pipeline runs it (`--gc-threshold`, default `GC_YOUNG_THRESHOLD`'s;
0 for Python's own). Prints one table, writes bench/results/state_core-<keys>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataflow import settings  # noqa: E402
from dataflow.core import native  # noqa: E402
from dataflow.core.families import DOC, QD, FeatureParams, Update, expected_units  # noqa: E402
from dataflow.core.shard import FeatureShard  # noqa: E402
from dataflow.run import tune_gc  # noqa: E402

DAY_MS = 86_400_000
T0 = 20_400 * DAY_MS
IMPRESSION = (1, 0, 0, expected_units(0.1))  # an impression at position 3
IMPRESSION_AND_CLICK = (1, 1, 0, expected_units(0.1))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def key_of(i: int, mixed: bool) -> tuple[int, str]:
    """The i-th key, named as the fan-out names it: a new string object each time."""
    if mixed and i % 2:
        return QD, f"qd:{zlib.crc32(str(i // 64).encode()):016x}:d{i:09d}"
    return DOC, f"doc:d{i:09d}"


def feed(
    shards: list[FeatureShard],
    order: list[int],
    *,
    mixed: bool,
    ts0: int,
    batch: int,
    rnd: random.Random,
) -> float:
    """All updates in batches of `batch`, each batch grouped by shard; returns seconds."""
    n_shards = len(shards)
    start = time.perf_counter()
    for lo in range(0, len(order), batch):
        grouped: dict[int, list[Update]] = {}
        for family, suffix in (key_of(i, mixed) for i in order[lo : lo + batch]):
            ts = ts0 + rnd.randrange(3_600_000)
            counts = IMPRESSION if rnd.random() < 0.9 else IMPRESSION_AND_CLICK
            grouped.setdefault(zlib.crc32(suffix.encode()) % n_shards, []).append(
                (family, suffix, ts, counts)
            )
        for idx, updates in grouped.items():
            shards[idx].step([updates])
    return time.perf_counter() - start


def flush_all(shards: list[FeatureShard]) -> tuple[float, int]:
    start = time.perf_counter()
    written = sum(len(shard.flush().writes) for shard in shards)
    return time.perf_counter() - start, written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--family", choices=["doc", "mixed"], default="doc")
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=int(settings.GC_YOUNG_THRESHOLD.default),
        help="the garbage collection the pipeline runs with (GC_YOUNG_THRESHOLD, "
        "`dataflow.run.tune_gc`); 0: Python's default",
    )
    parser.add_argument(
        "--pure-python",
        action="store_true",
        help="run the pure-Python core (NATIVE_CORE=false) instead of the compiled one",
    )
    args = parser.parse_args()
    native.use(not args.pure_python)
    if args.gc_threshold:
        tune_gc(args.gc_threshold)
    rnd = random.Random(7)
    params = FeatureParams()
    mixed = args.family == "mixed"
    order = list(range(args.keys))
    shards = [FeatureShard(params) for _ in range(args.shards)]
    gc.collect()
    rss0 = rss_bytes()
    build_s = feed(shards, order, mixed=mixed, ts0=T0, batch=args.batch, rnd=rnd)
    first_flush_s, _ = flush_all(shards)
    gc.collect()
    rss1 = rss_bytes()
    live = sum(len(s) for s in shards)
    rnd.shuffle(order)
    steady_s = feed(shards, order, mixed=mixed, ts0=T0 + 3_600_000, batch=args.batch, rnd=rnd)
    steady_flush_s, written = flush_all(shards)

    start = time.perf_counter()
    blobs = [s.snapshot() for s in shards]
    snapshot_s = time.perf_counter() - start
    snapshot_bytes = sum(len(b) for b in blobs)
    del shards
    gc.collect()
    start = time.perf_counter()
    shards = [FeatureShard.restore(params, b) for b in blobs]
    restore_s = time.perf_counter() - start
    del blobs

    start = time.perf_counter()
    for shard in shards:
        shard.step([T0 + DAY_MS])
    rollover_step_s = time.perf_counter() - start
    start = time.perf_counter()
    queued_bytes = sum(len(s.snapshot()) for s in shards)
    queued_snapshot_s = time.perf_counter() - start
    rollover_flush_s, restated = flush_all(shards)

    result: dict[str, Any] = {
        "live_keys": live,
        "build_updates_per_s": round(args.keys / build_s),
        "build_with_first_flush_keys_per_s": round(args.keys / (build_s + first_flush_s)),
        "rss_bytes_per_key": round((rss1 - rss0) / live),
        "steady_us_per_update": round(steady_s / args.keys * 1e6, 2),
        "steady_us_per_key_written": round(steady_flush_s / written * 1e6, 2),
        "snapshot_s": round(snapshot_s, 2),
        "snapshot_bytes_per_key": round(snapshot_bytes / live),
        "restore_s": round(restore_s, 2),
        "snapshot_every_key_queued_s": round(queued_snapshot_s, 2),
        "snapshot_every_key_queued_bytes_per_key": round(queued_bytes / live),
        "rollover_s": round(rollover_step_s + rollover_flush_s, 2),
        "rollover_keys_restated": restated,
    }
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")
    out = ROOT / "bench" / "results" / f"state_core-{args.family}-{args.keys}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
