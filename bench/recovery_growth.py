"""Size of the Bytewax recovery store under heavy key churn, and what snapshots cost.

    .venv/bin/python bench/recovery_growth.py [--days 42] [--keys-per-day 28000]
                                              [--shards 128] [--epoch 1] [--baseline]

Why: Bytewax keeps a row per state key in its SQLite recovery partitions, and a key whose
logic is discarded leaves a tombstone row forever. The pipeline never discards: feature
keys live inside a fixed set of `FEATURE_SHARDS` state shards, dedup in a fixed ring. This
bench checks that claim under the worst churn for it: every event brings brand-new doc ids
(10 docs x {doc, qd} = 20 new feature keys per search impression), over more than 30 days
of event time so that keys are created and expire all along (1M+ distinct keys with the
defaults).

It runs the real flow in-process (`bytewax.testing.run_main`, `TestingSource` with an EOF
after each day of event time, a counting sink instead of Redis) with recovery on, and after
each day prints: distinct keys created so far, keys live in state, keys expired, recovery
rows, live snapshot bytes, SQLite file bytes (db + WAL), free pages, and the CPU seconds of
that day with the share spent pickling shard snapshots. `--baseline` runs the same input
without recovery first, for the total snapshot overhead. Writes bench/results/
recovery_growth.json. Needs no services.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchkit import full_snapshot_cost, store_stats  # noqa: E402

from dataflow import flow as flow_module  # noqa: E402
from dataflow import metrics  # noqa: E402
from dataflow.config import Config  # noqa: E402
from dataflow.core import snapshots  # noqa: E402
from dataflow.core.shard import FeatureShard, StepResult  # noqa: E402
from dataflow.kafka.segments import KafkaSegments  # noqa: E402

DAY_MS = 86_400_000
DOCS_PER_EVENT = 10


class CountingSink(DynamicSink[StepResult]):
    """Counts key writes; the recovery store is what is measured, not Redis."""

    def __init__(self) -> None:
        self.writes = 0

    def build(self, step_id: str, worker_index: int, worker_count: int) -> Any:
        sink = self

        class _Part(StatelessSinkPartition[StepResult]):
            def write_batch(self, items: list[StepResult]) -> None:
                sink.writes += sum(len(item.writes) for item in items)

        return _Part()


def day_events(day: int, start_ms: int, per_day: int) -> Iterator[bytes]:
    """`per_day` search impressions spread over one day, each with 10 new doc ids."""
    for i in range(per_day):
        ts = start_ms + day * DAY_MS + (i * DAY_MS) // per_day
        docs = [f"d{day}-{i}-{j}" for j in range(DOCS_PER_EVENT)]
        event = {
            "event_id": f"e{day}-{i}",
            "type": "search_impression",
            "ts": ts,
            "session_id": f"s{i % 1000}",
            "query": f"q{i % 500}",
            "doc_ids": docs,
        }
        yield json.dumps(event).encode()


def stream(days: int, per_day: int, start_ms: int, eof_each_day: bool) -> list[Any]:
    items: list[Any] = []
    offset = 0
    for day in range(days):
        for value in day_events(day, start_ms, per_day):
            items.append(
                KafkaSourceMessage(key=None, value=value, topic="churn", partition=0, offset=offset)
            )
            offset += 1
        if eof_each_day:
            items.append(TestingSource.EOF())
    return items


class SnapshotTimer:
    """Wraps the shards' and dedup entries' `snapshot` to add up their CPU time and bytes."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.bytes = 0
        self.calls = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        originals = {cls: cls.snapshot for cls in (flow_module.ShardLogic, flow_module.DedupLogic)}
        timer = self

        def wrap(original: Any) -> Any:
            def snapshot(logic: Any) -> Any:
                start = time.process_time()
                blob = snapshots.settled(original(logic))  # waits for a shard's segments
                timer.seconds += time.process_time() - start
                timer.bytes += len(blob)
                timer.calls += 1
                return blob

            return snapshot

        for cls, original in originals.items():
            cls.snapshot = wrap(original)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for cls, original in originals.items():
                cls.snapshot = original  # type: ignore[method-assign]


def run(
    config: Config, items: list[Any], epoch: float, recovery: Path | None, sink: CountingSink
) -> None:
    built = flow_module.build_flow(
        config,
        source=TestingSource(items, batch_size=1000),
        redis_sink=sink,
        dlq_sink=TestingSink([]),
        with_opensearch=False,
    )
    run_main(
        built,
        epoch_interval=timedelta(seconds=epoch),
        recovery_config=RecoveryConfig(str(recovery)) if recovery else None,
    )


def live_feature_keys(directory: Path, config: Config) -> int:
    """Feature keys held in the newest snapshot of every state shard."""
    total = 0
    for path in sorted(directory.glob("part-*.sqlite3")):
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = db.execute(
                "SELECT ser_change FROM snaps s WHERE step_id LIKE '%.features' AND snap_epoch = "
                "(SELECT MAX(snap_epoch) FROM snaps t WHERE t.step_id = s.step_id "
                "AND t.state_key = s.state_key)"
            ).fetchall()
        for (blob,) in rows:
            if blob is not None:
                shard_bytes = pickle.loads(blob)  # noqa: S301 - our own recovery store
                shard = FeatureShard.restore(
                    config.features, shard_bytes, segments=KafkaSegments(config.kafka)
                )
                total += len(shard)
    return total


def expired() -> int:
    return int(metrics.EXPIRED._value.get())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=42)
    parser.add_argument("--keys-per-day", type=int, default=28_000)
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--epoch", type=float, default=1.0, help="snapshot interval, seconds")
    parser.add_argument("--baseline", action="store_true", help="also run without recovery")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/recovery_growth.json")
    args = parser.parse_args()

    per_day = max(1, args.keys_per_day // (2 * DOCS_PER_EVENT))
    now = int(time.time() * 1000)
    start_ms = (now // DAY_MS - args.days) * DAY_MS
    config = Config.from_env(
        {"OPENSEARCH_URL": "", "FEATURE_SHARDS": str(args.shards), "LOG_LEVEL": "WARNING"}
    )

    baseline_cpu = None
    if args.baseline:
        started = time.process_time()
        run(config, stream(args.days, per_day, start_ms, False), args.epoch, None, CountingSink())
        baseline_cpu = time.process_time() - started

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="recovery-growth-") as tmp:
        recovery = Path(tmp)
        init_db_dir(recovery, 1)
        items = stream(args.days, per_day, start_ms, True)
        sink = CountingSink()
        timer = SnapshotTimer()
        header = (
            f"{'day':>4} {'keys made':>10} {'live':>9} {'expired':>9} {'rows':>6} "
            f"{'max/key':>7} {'snap MB':>8} {'file MB':>8} {'free MB':>8} {'cpu s':>6} "
            f"{'pickle s':>8}"
        )
        print(header)
        total_cpu = 0.0
        expired_before = expired()
        with timer.installed():
            for day in range(args.days):
                cpu0, pickle0 = time.process_time(), timer.seconds
                run(config, items, args.epoch, recovery, sink)
                cpu = time.process_time() - cpu0
                total_cpu += cpu
                stats = store_stats(recovery)
                row = {
                    "day": day + 1,
                    "keys_created": (day + 1) * per_day * DOCS_PER_EVENT * 2,
                    "live_keys": live_feature_keys(recovery, config),
                    "expired": expired() - expired_before,
                    **stats,
                    "cpu_seconds": round(cpu, 2),
                    "pickle_seconds": round(timer.seconds - pickle0, 2),
                }
                rows.append(row)
                print(
                    f"{row['day']:>4} {row['keys_created']:>10,} {row['live_keys']:>9,} "
                    f"{row['expired']:>9,} {row['rows']:>6,} {row['max_rows_per_key']:>7} "
                    f"{row['live_snapshot_bytes'] / 1e6:>8.1f} {row['files_bytes'] / 1e6:>8.1f} "
                    f"{row['free_bytes'] / 1e6:>8.1f} {cpu:>6.1f} {row['pickle_seconds']:>8.2f}",
                    flush=True,
                )
        full = full_snapshot_cost(recovery, config)
    peak = max(rows, key=lambda r: r["files_bytes"])
    summary = {
        "days": args.days,
        "keys_per_day": per_day * DOCS_PER_EVENT * 2,
        "distinct_keys": rows[-1]["keys_created"],
        "shards": args.shards,
        "epoch_seconds": args.epoch,
        "peak_file_bytes": peak["files_bytes"],
        "peak_file_day": peak["day"],
        "final_file_bytes": rows[-1]["files_bytes"],
        "peak_live_keys": max(r["live_keys"] for r in rows),
        "state_keys_final": rows[-1]["state_keys"],
        "snapshot_calls": timer.calls,
        "pickled_bytes_total": timer.bytes,
        "pickle_cpu_seconds": round(timer.seconds, 2),
        "cpu_seconds_with_recovery": round(total_cpu, 2),
        "cpu_seconds_without_recovery": None if baseline_cpu is None else round(baseline_cpu, 2),
        "sink_writes": sink.writes,
        "full_snapshot": full,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"\n{summary['distinct_keys']:,} distinct feature keys over {args.days} days; "
        f"recovery store peaked at {peak['files_bytes'] / 1e6:.1f} MB on day {peak['day']} "
        f"({summary['peak_live_keys']:,} live keys) and ended at "
        f"{rows[-1]['files_bytes'] / 1e6:.1f} MB with {rows[-1]['state_keys']:,} state keys; "
        f"pickling snapshots took {timer.seconds:.1f} of {total_cpu:.1f} CPU s"
        + (f" (no-recovery run: {baseline_cpu:.1f} CPU s)" if baseline_cpu is not None else "")
    )
    print(
        f"one snapshot of all {full['shards']} feature shards ({full['keys']:,} keys, "
        f"{full['bytes'] / 1e6:.1f} MB): pickle {full['pickle_seconds']:.2f} s, "
        f"SQLite write {full['store_seconds']:.2f} s (restore on start: "
        f"{full['restore_seconds']:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
