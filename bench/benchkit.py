"""What the benchmarks under bench/ share: Redis command counts, the pipeline's environment
and processes watched from outside (resident memory, `/metrics`), a reader-latency sampler,
and the recovery store's size and the cost of one full snapshot.

Imported by the scripts beside it (`python bench/NAME.py` puts this folder on `sys.path`).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dataflow.config import Config  # noqa: E402
from dataflow.core.shard import FeatureShard  # noqa: E402
from dataflow.kafka.segments import KafkaSegments  # noqa: E402
from dataflow.sinks.marker import marker_key  # noqa: E402

DAY_MS = 86_400_000
BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


# --- Redis -------------------------------------------------------------------------------


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far (`INFO commandstats`), e.g. {"hset": 12, "expire": 3}."""
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def commandstats(client: redis.Redis) -> int:
    """Every command Redis has run so far."""
    return sum(command_calls(client).values())


def calls_between(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Per command, the calls made between two `command_calls` readings (non-zero only)."""
    out = {name: n - before.get(name, 0) for name, n in after.items()}
    return {name: n for name, n in sorted(out.items()) if n}


def feature_keys(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Feature keys under `prefix` by family (SCAN; the store marker is no feature key)."""
    marker = marker_key(prefix).encode()
    counts: dict[str, int] = {}
    start = len(prefix) + 1
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        if key != marker:
            family = key[start:].split(b":", 1)[0].decode()
            counts[family] = counts.get(family, 0) + 1
    return counts


def delete_keys(client: redis.Redis, prefix: str) -> int:
    """UNLINK every key under `prefix` (features and marker); returns how many."""
    batch: list[bytes] = []
    deleted = 0
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) == 5_000:
            deleted += int(client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


class PrivateRedis:
    """A redis-server of our own on a free port, set up like the stack's (no persistence),
    so that its command counts and memory are this benchmark's alone and no test that
    flushes or restarts the shared Redis touches it. Stopped by `close()`."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit("the benchmark's own redis-server did not start") from None
                time.sleep(0.1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# --- Kafka -------------------------------------------------------------------------------


def delete_topics(topics: Iterable[str], brokers: str = BROKERS) -> None:
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    admin = AdminClient({"bootstrap.servers": brokers})  # held until every reply is in
    futures = admin.delete_topics(list(topics), operation_timeout=30)
    for topic, future in futures.items():
        try:
            future.result(60)
        except Exception as exc:  # noqa: BLE001 - a topic left behind is only reported
            print(f"could not delete topic {topic}: {exc}", file=sys.stderr)


# --- the pipeline's processes ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pipeline_env(topic: str, prefix: str, redis_url: str = REDIS_URL) -> dict[str, str]:
    """`python -m dataflow.run` reading `topic` to its end into `prefix`, no OpenSearch, no
    metrics, no recovery (set RECOVERY_DIR to have one)."""
    env = {
        **os.environ,
        "KAFKA_BROKERS": BROKERS,
        "KAFKA_TOPICS": topic,
        "KAFKA_DLQ_TOPIC": f"{topic}-dlq",
        "KAFKA_STOP_AT_END": "true",
        "REDIS_URL": redis_url,
        "FEATURE_PREFIX": prefix,
        "OPENSEARCH_URL": "",
        "METRICS_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("RECOVERY_DIR", None)
    return env


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a live process, in bytes; {} once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return out


def scrape(port: int, timeout: float = 2.0) -> dict[str, float] | None:
    """`/metrics` of a pipeline process, each metric summed over its labels; None if it does
    not answer (not started yet, or gone)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:  # noqa: S310 - our own process
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


class Pipeline:
    """`python -m dataflow.run` as `processes` processes of one cluster (`-i/-a`), watched
    from outside: each process's resident memory and, with `metrics`, its `/metrics` summed
    over the processes, and any `probes` (name: function), sampled every `every` seconds
    into `samples` as (seconds since start, {"rss": bytes, "hwm": bytes, metric: value,
    ...})."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        processes: int = 1,
        metrics: bool = False,
        every: float = 0.5,
        args: Sequence[str] = (),
        log: Path | None = None,
        probes: Mapping[str, Callable[[], float]] | None = None,
    ) -> None:
        self.processes = processes
        self.every = every
        self.probes = dict(probes or {})
        self.ports = [free_port() for _ in range(processes)] if metrics else []
        cluster = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.peak_rss = 0
        self.last_rss = 0
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(processes):
            penv = dict(env)
            if metrics:
                penv["METRICS_ENABLED"] = "true"
                penv["BYTEWAX_DATAFLOW_API_PORT"] = str(self.ports[i])
            cmd = [sys.executable, "-m", "dataflow.run", *args]
            if processes > 1:
                cmd += ["-i", str(i), "-a", cluster]
            out = None if log is None else open(log, "ab")  # noqa: SIM115 - the child's
            self.procs.append(
                subprocess.Popen(cmd, env=penv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                if out
                else subprocess.Popen(cmd, env=penv, cwd=ROOT)
            )
            if out:
                out.close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> dict[str, float]:
        # (no poll(): that would reap a process before `wait` reads its rusage)
        statuses = [proc_status(p.pid) for p in self.procs if p.returncode is None]
        values: dict[str, float] = {}
        if statuses and all(statuses):
            rss = sum(s["VmRSS"] for s in statuses)
            hwm = sum(s["VmHWM"] for s in statuses)
            self.last_rss = rss
            self.peak_rss = max(self.peak_rss, hwm)
            values = {"rss": rss, "hwm": hwm}
        scraped = [scrape(port) for port in self.ports]
        if scraped and all(m is not None for m in scraped):
            for metrics in scraped:
                for name, value in (metrics or {}).items():
                    values[name] = values.get(name, 0.0) + value
        if values:
            for name, probe in self.probes.items():
                with contextlib.suppress(Exception):  # a probe that fails leaves a gap
                    values[name] = probe()
            self.samples.append((time.perf_counter() - self.started, values))
        return values

    def metric(self, name: str) -> float | None:
        """The newest sampled value of a metric (summed over the processes)."""
        for _, values in reversed(self.samples):
            if name in values:
                return values[name]
        return None

    def settled(self, quiet_s: float = 3.0, tolerance: int = 4 * 1024 * 1024) -> bool:
        """Whether resident memory has moved less than `tolerance` over the last `quiet_s`
        seconds (a restoring process grows as it loads its state; the metrics cannot tell,
        as a restored shard reports its keys only once it gets an input)."""
        if not self.samples or self.samples[-1][0] < quiet_s:
            return False
        newest = self.samples[-1][0]
        recent = [v["rss"] for t, v in self.samples if t >= newest - quiet_s and "rss" in v]
        return len(recent) >= 2 and max(recent) - min(recent) < tolerance

    def wait(self) -> float:
        """Wait for every process to exit (non-zero: SystemExit); wall seconds since start.
        Sets `cpu_s` (user + system CPU seconds of the processes, all their threads) and
        `max_rss` (the processes' peak resident memories added up) from their rusage."""
        codes = []
        self.cpu_s = 0.0
        self.max_rss = 0
        for proc in self.procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            codes.append(proc.returncode)
            self.cpu_s += usage.ru_utime + usage.ru_stime
            self.max_rss += usage.ru_maxrss * 1024
        elapsed = time.perf_counter() - self.started
        self._stop.set()
        self._thread.join()
        if any(codes):
            raise SystemExit(f"a pipeline process failed: exit codes {codes}")
        return elapsed

    def stop(self, grace: float = 60.0) -> float:
        """SIGINT every process (Bytewax stops the dataflow), SIGKILL after `grace` s."""
        for proc in self.procs:
            proc.send_signal(2)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stop.set()
        self._thread.join()
        return time.perf_counter() - self.started


# --- a reader's latency meanwhile --------------------------------------------------------

READER = """
import random, sys, time
from dataflow.reader import FeatureReader
reader = FeatureReader.from_url(sys.argv[1], prefix=sys.argv[2], deadline_ms=2000)
n = int(sys.argv[3]); rnd = random.Random(5)
while True:
    ids = [f"d{rnd.randrange(n):09d}" for _ in range(200)]
    start = time.perf_counter()
    reader.doc_features(ids)
    print(f"{time.time():.3f} {(time.perf_counter() - start) * 1000:.3f}", flush=True)
    time.sleep(0.01)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


class ReaderSampler:
    """Another process calling `FeatureReader.doc_features` with 200 random ids among
    `d000000000` .. `d{n_docs - 1:09d}` in a loop, each call's wall time and latency kept."""

    def __init__(self, prefix: str, n_docs: int, redis_url: str = REDIS_URL) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, redis_url, prefix, str(n_docs)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.samples: list[tuple[float, float]] = []

    def stop(self) -> list[tuple[float, float]]:
        self.proc.terminate()
        lines = (self.proc.communicate()[0] or "").split("\n")
        self.samples = [
            (float(t), float(ms)) for t, ms in (line.split() for line in lines if line.strip())
        ]
        return self.samples

    def summary(
        self, start: float, end: float, before_s: float = 5.0, before_end: float | None = None
    ) -> dict[str, Any]:
        """p50/p99 of the calls within [start, end] and in the `before_s` seconds before
        `before_end` (default `start`); wall clock, `time.time()`."""
        until = start if before_end is None else before_end
        before = [ms for t, ms in self.samples if until - before_s <= t < until]
        during = [ms for t, ms in self.samples if start <= t <= end]
        return {
            "reader_p50_ms_before": round(statistics.median(before), 2) if before else None,
            "reader_p99_ms_before": round(percentile(before, 0.99), 2),
            "reader_p50_ms_during": round(statistics.median(during), 2) if during else None,
            "reader_p99_ms_during": round(percentile(during, 0.99), 2),
            "reader_max_ms_during": round(max(during), 2) if during else None,
            "reader_calls_during": len(during),
        }


# --- the recovery store ------------------------------------------------------------------


def store_stats(directory: Path) -> dict[str, int]:
    """The recovery store's files, rows, state keys and live snapshot bytes."""
    files = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    rows = keys = live = free_pages = page_size = max_rows_per_key = 0
    for path in sorted(directory.glob("part-*.sqlite3")):
        with contextlib.closing(sqlite3.connect(path)) as db:

            def one(sql: str, db: sqlite3.Connection = db) -> int:
                return int(db.execute(sql).fetchone()[0])

            rows += one("SELECT COUNT(*) FROM snaps")
            keys += one("SELECT COUNT(DISTINCT step_id || '/' || state_key) FROM snaps")
            live += one("SELECT COALESCE(SUM(LENGTH(ser_change)), 0) FROM snaps")
            max_rows_per_key = max(
                max_rows_per_key,
                one(
                    "SELECT COALESCE(MAX(n), 0) FROM "
                    "(SELECT COUNT(*) AS n FROM snaps GROUP BY step_id, state_key)"
                ),
            )
            free_pages += one("PRAGMA freelist_count")
            page_size = one("PRAGMA page_size")
    return {
        "files_bytes": files,
        "rows": rows,
        "state_keys": keys,
        "max_rows_per_key": max_rows_per_key,
        "live_snapshot_bytes": live,
        "free_bytes": free_pages * page_size,
    }


def full_snapshot_cost(directory: Path, config: Config) -> dict[str, float]:
    """One snapshot of every feature shard at the final state: restore, pickle, store.

    Twice: as every key's state (layout 5, what an epoch that touched every shard paid
    before the segments, and what a new base costs now), and as the running pipeline takes
    it (layout 6: the chain's references and the tail, here empty). Each is our
    `snapshot()`, Bytewax's pickle of it, and one SQLite transaction in WAL mode like
    Bytewax's (one row per shard). The restore reads the segments from KAFKA_STATE_TOPIC.
    """
    blobs: list[bytes] = []
    for path in sorted(directory.glob("part-*.sqlite3")):
        with contextlib.closing(sqlite3.connect(path)) as db:
            blobs += [
                row[0]
                for row in db.execute(
                    "SELECT ser_change FROM snaps s WHERE step_id LIKE '%.features' AND "
                    "ser_change IS NOT NULL AND snap_epoch = (SELECT MAX(snap_epoch) FROM snaps "
                    "t WHERE t.step_id = s.step_id AND t.state_key = s.state_key)"
                )
            ]
    segments = KafkaSegments(config.kafka)
    start = time.perf_counter()
    shards = [
        FeatureShard.restore(config.features, pickle.loads(b), segments=segments)  # noqa: S301
        for b in blobs
    ]
    restore_s = time.perf_counter() - start
    del blobs
    out: dict[str, float] = {"restore_seconds": round(restore_s, 3)}
    for layout, store in (("every_key", None), ("segmented", segments)):
        for shard in shards:
            shard.segments = store
        start = time.perf_counter()
        rows = [pickle.dumps(shard.snapshot()) for shard in shards]
        pickle_s = time.perf_counter() - start
        with (
            tempfile.TemporaryDirectory() as tmp,
            contextlib.closing(sqlite3.connect(Path(tmp) / "store.sqlite3")) as db,
        ):
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE snaps (k TEXT, epoch INTEGER, v BLOB, PRIMARY KEY (k, epoch))")
            start = time.perf_counter()
            with db:
                db.executemany(
                    "INSERT INTO snaps VALUES (?, 1, ?)", [(str(i), v) for i, v in enumerate(rows)]
                )
            store_s = time.perf_counter() - start
        prefix = "" if layout == "every_key" else "segmented_"
        out |= {
            f"{prefix}bytes": sum(len(r) for r in rows),
            f"{prefix}pickle_seconds": round(pickle_s, 3),
            f"{prefix}store_seconds": round(store_s, 3),
        }
    out |= {"shards": len(shards), "keys": sum(len(shard) for shard in shards)}
    return out
