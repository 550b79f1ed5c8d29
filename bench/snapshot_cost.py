"""What an epoch's snapshot of the feature shards costs, against the keys held and the keys
changed: every key's state in each snapshot (layout 5), or segments (layout 6).

    .venv/bin/python bench/snapshot_cost.py [--keys 1000000 4000000] [--changed 20000]
                                            [--store memory|kafka]

Drives 128 `FeatureShard`s directly (no Bytewax), as the flow feeds them: for each key
count, builds the keys (doc keys, one day held) in epochs of `--build-epoch` new keys,
snapshotting every shard at each epoch's end; then runs 10 steady epochs that each update
`--changed` random existing keys, snapshotting every shard after each. A snapshot is what
Bytewax gets: `snapshot()`, then pickled (a segmented one waits for its segments there).
Reports the CPU seconds and the bytes of the snapshots (what the recovery directory's
SQLite would write) and the bytes appended to the segment store, per build and per steady
epoch. `--store kafka` keeps the segments in `KAFKA_STATE_TOPIC` on the local broker (the
CPU then includes librdkafka's threads); `memory` in a dict. Writes
bench/results/snapshot_cost.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataflow.config import KafkaSettings  # noqa: E402
from dataflow.core.families import DOC, FeatureParams, expected_units  # noqa: E402
from dataflow.core.segments import MemorySegments, SegmentStore  # noqa: E402
from dataflow.core.shard import FeatureShard  # noqa: E402
from dataflow.kafka.segments import KafkaSegments  # noqa: E402

SHARDS = 128
DAY_MS = 86_400_000
T0 = 20_400 * DAY_MS
IMPRESSION = (1, 0, 0, expected_units(0.1))


class Counting:
    """A segment store that counts the bytes appended to the one it wraps."""

    def __init__(self, inner: SegmentStore) -> None:
        self.inner, self.appended = inner, 0

    def append(self, owner: str, payload: bytes) -> Any:
        self.appended += len(payload)
        return self.inner.append(owner, payload)

    def read(self, refs: Any) -> Any:
        return self.inner.read(refs)

    def retire(self, refs: Any) -> None:
        self.inner.retire(refs)


def epoch(shards: list[FeatureShard], keys: list[str], ts: int) -> tuple[float, int]:
    """Update `keys` (grouped by shard), flush, then snapshot every shard as Bytewax would:
    the snapshot's CPU seconds and bytes."""
    batches: list[list[Any]] = [[] for _ in shards]
    for key in keys:
        batches[zlib.crc32(key.encode()) % SHARDS].append((DOC, key, ts, IMPRESSION))
    for shard, batch in zip(shards, batches, strict=True):
        shard.step([batch])
        shard.flush()
    start = time.process_time()
    blobs = [pickle.dumps(shard.snapshot()) for shard in shards]
    return time.process_time() - start, sum(map(len, blobs))


def run(n: int, layout: str, args: argparse.Namespace) -> dict[str, Any]:
    store: Counting | None = None
    if layout == "segments":
        inner: SegmentStore = (
            MemorySegments()
            if args.store == "memory"
            else KafkaSegments(KafkaSettings(brokers=(args.brokers,)))
        )
        store = Counting(inner)
    shards = [FeatureShard(FeatureParams()) for _ in range(SHARDS)]
    if store is not None:
        for shard in shards:
            shard.use_segments(store)
    names = [f"doc:{i:09}" for i in range(n)]
    build_cpu = build_bytes = 0.0
    for start in range(0, n, args.build_epoch):
        cpu, size = epoch(shards, names[start : start + args.build_epoch], T0)
        build_cpu += cpu
        build_bytes += size
    built = store.appended if store else 0
    rng = random.Random(7)
    steady_cpu: list[float] = []
    steady_bytes: list[int] = []
    for i in range(10):
        cpu, size = epoch(shards, rng.sample(names, args.changed), T0 + 1 + i)
        steady_cpu.append(cpu)
        steady_bytes.append(size)
    steady_cpu.sort()
    steady_bytes.sort()
    return {
        "keys": n,
        "layout": layout,
        "build_snapshot_cpu_s": round(build_cpu, 2),
        "build_snapshot_mb": round(build_bytes / 1e6, 1),
        "build_store_mb": round(built / 1e6, 1),
        "steady_epoch_snapshot_cpu_ms": round(steady_cpu[5] * 1000, 1),
        "steady_epoch_snapshot_kb": round(steady_bytes[5] / 1e3, 1),
        "steady_store_kb_per_epoch": round(((store.appended if store else 0) - built) / 10e3, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--changed", type=int, default=20_000, help="keys per steady epoch")
    parser.add_argument("--build-epoch", type=int, default=100_000, help="new keys per epoch")
    parser.add_argument("--store", choices=("memory", "kafka"), default="kafka")
    parser.add_argument("--brokers", default="127.0.0.1:9092")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/snapshot_cost.json")
    args = parser.parse_args()
    rows = []
    for n in args.keys:
        for layout in ("every_key", "segments"):
            row = run(n, layout, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"changed": args.changed, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
