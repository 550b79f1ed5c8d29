"""Millions of live keys end to end: build them, snapshot them, restore them, roll the day.

    .venv/bin/python bench/scale.py [--keys 10000000] [--processes 1] [--keep]
                                    [--rate 50000 --rate 0] [--no-baseline]
                                    [--redis-url URL] [--recovery-dir DIR] [--out FILE]

On the real Kafka (`make up`) and a redis-server of the benchmark's own (started on a free
port like the stack's, without persistence, and stopped at the end: `INFO commandstats`
and `used_memory` are server-wide, and the shared Redis carries other benchmarks and tests
that flush or restart it; `--redis-url` writes to another one instead), with recovery on:
a fresh recovery directory, `SNAPSHOT_INTERVAL_SECONDS=5` (`-s 5`), one worker per process
(`--processes N`: a cluster of N processes sharing the directory, figures added up).

1. Produces a stream that builds `--keys` live keys in the four families (4 partitions,
   keyed by session). Sessions, their event time spread over yesterday (UTC) so that
   nothing expires: a search impression of 10 docs, 9 of them never shown before and one of
   1 000 popular ones, for a query shared by 3 sessions (19 new doc and query-doc keys);
   every 4th session first an autocomplete impression of 5 candidates for a new query and a
   select of it (5 `ac` keys, 1 `acq` key, linked by the search); every 2nd a click (no new
   key). About 10 new keys per event; the key counts per family are exact by construction
   and checked against Redis. (The generator draws Zipf docs from a catalogue held in
   memory and query-doc pairs from fixed relevant sets: it cannot build 10M mostly-new keys.)
2. Start-up alone: the pipeline over an empty topic (process start to exit; its peak
   resident memory is the idle process's). Then, unless `--no-baseline`, the same stream
   without recovery into a second prefix (deleted after): what snapshots cost, in reading
   time and in CPU seconds (the processes' rusage; CPU time moves far less than wall time
   with the load of a shared machine).
3. Build: `python -m dataflow.run` (`KAFKA_STOP_AT_END=true`) over the stream, watched from
   outside: resident memory, `/metrics` and the keys in Redis every 0.5 s. Reports events/s
   and keys/s over the reading time (first message read to exit: start-up excluded),
   keys/s while Redis went from 10 to 30% and from 70 to 90% of the keys, peak and final
   RSS, Redis `used_memory` growth and commands per event, the recovery directory's size,
   and one snapshot of every feature shard at the end, timed in this process (our pickle
   and one SQLite transaction, as an epoch that touches every shard pays them).
4. Restore: the pipeline again on the same recovery directory with nothing new to read,
   process start to exit (Bytewax builds every restored shard: its peak RSS shows it).
5. Rollover, once per `--rate` (`RESTATE_KEYS_PER_SECOND`, 0 = unlimited; default 50 000
   and 0), each from a copy of the recovery directory as the build left it: another
   process reads 200 random documents in a loop (`FeatureReader.doc_features`), the
   pipeline tails the topic (`KAFKA_STOP_AT_END=false`: at the end of input a shard writes
   its whole queue at once) and is restored and idle when its memory stops growing; its
   resident memory then gives the bytes per live key of a process holding them. One click
   dated now (the next UTC day) is produced (the second rate's run reads it on restart),
   and the re-statement of every live key is timed until `/metrics` shows none left and
   the sink has written as many keys; Redis commands meanwhile (the reader's HGETALLs left
   out), the peak of Redis' instantaneous ops/s, and the reader's p50/p99 in the 5 s before
   (the first run: the pipeline idle; the others: the reader alone) and during.
6. Prints one table, writes bench/results/scale-<keys>.json (or `--out`), and deletes its
   topics, its Redis keys and its recovery directories unless `--keep`.

Figures at 1M and 10M keys: docs/benchmarks.md ("Ten million keys"); the 10M run with
`--no-baseline --rate 50000` took 45.6 min to build, 34 s to restore and 17.8 min to roll
the day. Before it was made it was estimated (docs/benchmarks.md says how) at 1 to 2 hours in all
(about 13 min of it the run without recovery, which `--no-baseline` skips); the pipeline
at about 3.4 GiB resident holding the keys and peaking at 5 to 6 GiB while it snapshots;
Redis at about 4.9 GiB of `used_memory`; the recovery directory about 1.8 GB (twice that
while the second rollover has its copy); this process 4 to 5 GiB while it times the full
snapshot (the pipeline is not running then). About 12 GiB at once of the machine's 24.
Run it on an otherwise quiet machine:

    .venv/bin/python bench/scale.py --keys 10000000 --processes 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchkit  # noqa: E402
from benchkit import BROKERS, DAY_MS, Pipeline  # noqa: E402

from dataflow.config import Config  # noqa: E402
from dataflow.kafka.topics import ensure_topics, produce  # noqa: E402

HEAD_DOCS = 1_000  # popular docs, re-shown at the last position of every search
HEAD_FROM = 112  # the first session that shows one (9 * 112 fresh docs exist by then)
AC_CANDIDATES = 5
SUFFIXES = ("", " case", " pro", " mini", " sale")
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Msg:
    value: bytes
    key: bytes | None


def keys_of(sessions: int) -> dict[str, int]:
    """Live keys after `sessions` sessions, per family (exact by construction)."""
    ac_sessions = -(-sessions // 4)
    return {
        "doc": 9 * sessions,
        "qd": 9 * sessions + max(0, sessions - HEAD_FROM),
        "ac": AC_CANDIDATES * ac_sessions,
        "acq": ac_sessions,
    }


def sessions_for(keys: int) -> int:
    lo, hi = 1, keys
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(keys_of(mid).values()) >= keys:
            hi = mid
        else:
            lo = mid + 1
    return lo


def doc_id(n: int) -> str:
    return f"d{n:09d}"


def session(s: int, t0: int) -> list[dict[str, Any]]:
    """The events of session `s`, starting at `t0`."""
    sid = f"s{s}"
    qn = s // 3
    query = f"query {qn}"
    docs = [doc_id(9 * s + j) for j in range(9)]
    if s >= HEAD_FROM:
        docs.append(doc_id((s * 7919) % HEAD_DOCS))
    out: list[dict[str, Any]] = []
    if s % 4 == 0:  # an autocomplete session: its query is new (qn steps by 1 or 2)
        prefix = query[:-1]
        out.append(
            {
                "event_id": f"e{s}a",
                "type": "ac_impression",
                "ts": t0,
                "session_id": sid,
                "prefix": prefix,
                "candidates": [query + suffix for suffix in SUFFIXES],
            }
        )
        out.append(
            {
                "event_id": f"e{s}b",
                "type": "ac_select",
                "ts": t0 + 1_500,
                "session_id": sid,
                "prefix": prefix,
                "candidate": query,
            }
        )
    out.append(
        {
            "event_id": f"e{s}c",
            "type": "search_impression",
            "ts": t0 + 4_000,
            "session_id": sid,
            "query": query,
            "doc_ids": docs,
        }
    )
    if s % 2:
        position = 1 + s % 9
        out.append(
            {
                "event_id": f"e{s}d",
                "type": "click",
                "ts": t0 + 15_000,
                "session_id": sid,
                "query": query,
                "doc_id": docs[position - 1],
                "position": position,
            }
        )
    return out


def stream(sessions: int, day0: int, counts: dict[str, int]) -> Iterator[Msg]:
    """Every session's events, event time spread over the day starting at `day0`."""
    spacing = (DAY_MS - 3_600_000) // max(sessions, 1)
    for s in range(sessions):
        key = f"s{s}".encode()
        for event in session(s, day0 + s * spacing):
            counts[event["type"]] = counts.get(event["type"], 0) + 1
            yield Msg(orjson.dumps(event), key)


def rollover_event(token: str) -> Msg:
    """A click dated now, on keys that exist: the clock enters the next day, no new key."""
    event = {
        "event_id": f"rollover-{token}",
        "type": "click",
        "ts": int(time.time() * 1000),
        "session_id": "s1",
        "query": "query 0",
        "doc_id": doc_id(0),
        "position": 1,
    }
    return Msg(orjson.dumps(event), b"s1")


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used (user + system, all its threads)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def rate_between(samples: list[tuple[float, dict[str, float]]], lo: float, hi: float) -> float:
    """Keys/s while the keys in Redis went from `lo` to `hi` (what is written, not what is
    read: a shard renders and writes its new keys at its next flush)."""
    t_lo = t_hi = None
    for t, values in samples:
        held = values.get("redis_keys", 0.0)
        if t_lo is None and held >= lo:
            t_lo, k_lo = t, held
        if held >= hi:
            t_hi, k_hi = t, held
            break
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return 0.0
    return (k_hi - k_lo) / (t_hi - t_lo)


def reading_window(run: Pipeline, wall: float) -> float:
    """Seconds from the first message read (the first `/metrics` sample showing one, taken
    every `run.every` s) to the exit of the last process: the run without its start-up."""
    first = next((t for t, v in run.samples if v.get("search_features_messages_total")), None)
    return wall - (first if first is not None else 0.0) + run.every / 2


def timed_run(
    env: dict[str, str], processes: int, client: redis.Redis | None = None
) -> tuple[float, float, Pipeline]:
    """Wall seconds, reading seconds (`reading_window`) and the watched run (with `client`,
    the keys in that Redis sampled too: only this benchmark's own Redis)."""
    probes = {"redis_keys": lambda: float(client.dbsize())} if client is not None else None
    run = Pipeline(env, processes=processes, metrics=True, every=0.5, probes=probes)
    wall = run.wait()
    return wall, reading_window(run, wall), run


def build(
    env: dict[str, str], processes: int, live: int, client: redis.Redis, own: bool
) -> dict[str, Any]:
    calls0 = benchkit.command_calls(client)
    mem0 = used_memory(client)
    redis_cpu0 = redis_cpu_s(client)
    wall, reading, run = timed_run(env, processes, client if own else None)
    redis_cpu = redis_cpu_s(client) - redis_cpu0
    calls = benchkit.calls_between(calls0, benchkit.command_calls(client))
    mem1 = used_memory(client)
    return {
        "wall_s": wall,
        "reading_s": reading,
        "cpu_s": round(run.cpu_s, 1),
        # Only this build's when the Redis is the benchmark's own (no other clients).
        "redis_cpu_s": round(redis_cpu, 1) if own else None,
        "peak_rss": max(run.peak_rss, run.max_rss),
        "last_rss": run.last_rss,
        "commands": sum(calls.values()),
        "commands_by_name": calls,
        "redis_used_memory_growth": mem1 - mem0,
        "keys_per_s_10_30": rate_between(run.samples, 0.1 * live, 0.3 * live),
        "keys_per_s_70_90": rate_between(run.samples, 0.7 * live, 0.9 * live),
        # (seconds, messages read, keys held, keys in Redis, resident MiB), every second
        "timeline": [
            (
                round(t, 1),
                int(v.get("search_features_messages_total", 0)),
                int(v.get("search_features_state_keys", 0)),
                int(v.get("redis_keys", 0)),
                round(v.get("rss", 0) / MIB),
            )
            for t, v in run.samples[::2]
        ],
    }


def restore(env: dict[str, str], processes: int, client: redis.Redis) -> dict[str, Any]:
    calls0 = benchkit.command_calls(client)
    run = Pipeline(env, processes=processes, every=0.1)
    wall = run.wait()
    calls = benchkit.calls_between(calls0, benchkit.command_calls(client))
    return {
        "restore_s": round(wall, 2),
        "restore_cpu_s": round(run.cpu_s, 2),
        "restore_peak_rss_mib": round(max(run.peak_rss, run.max_rss) / MIB),
        "restore_hset_calls": calls.get("hset", 0),
    }


def rollover(
    env: dict[str, str],
    *,
    processes: int,
    rate: int,
    live: int,
    n_docs: int,
    prefix: str,
    topic: str,
    token: str,
    client: redis.Redis,
    redis_url: str,
    produce_event: bool,
    restore_s: float,
    log: Path,
) -> dict[str, Any]:
    """One re-statement of every live key, timed from outside (see the module doc)."""
    env = {**env, "KAFKA_STOP_AT_END": "false", "RESTATE_KEYS_PER_SECOND": str(rate)}
    reader = benchkit.ReaderSampler(prefix, n_docs, redis_url)
    time.sleep(5)  # the reader alone first (a run whose event is already read has no idle)
    calls0 = benchkit.command_calls(client)  # (the restore adds only the marker checks)
    run = Pipeline(env, processes=processes, metrics=True, every=0.2, log=log)
    ready_by = time.monotonic() + 600 + live / 20_000
    # Restored: at least as long as the restore run took, and memory no longer growing.
    while time.perf_counter() - run.started < restore_s or not run.settled():
        if time.monotonic() > ready_by or any(p.poll() is not None for p in run.procs):
            run.stop()
            reader.stop()
            raise SystemExit(f"the rollover pipeline did not settle: see {log}")
        time.sleep(0.2)
    ready_s = time.perf_counter() - run.started
    settled_rss = run.last_rss
    start: float | None = None
    # What a restart itself re-wrote (keys pending in the snapshot) is not the rollover's.
    restated0 = written0 = 0.0
    if produce_event:
        time.sleep(5)  # reads with the pipeline restored and idle
        restated0 = run.metric("search_features_keys_restated_total") or 0.0
        written0 = run.metric("search_features_sink_writes_total") or 0.0
        calls0 = benchkit.command_calls(client)
        start = time.time()
        produce(BROKERS, topic, [rollover_event(token)])
    peak_ops = 0
    # Generous: at 10M keys a snapshot of every shard outlasts the epoch (docs/benchmarks.md).
    deadline = time.monotonic() + 600 + live / 2_000
    while True:
        time.sleep(0.2)
        peak_ops = max(peak_ops, int(client.info("stats")["instantaneous_ops_per_sec"]))
        left = run.metric("search_features_keys_to_restate") or 0
        restated = (run.metric("search_features_keys_restated_total") or 0) - restated0
        written = (run.metric("search_features_sink_writes_total") or 0) - written0
        # Every re-stated key written by the sink (the process's only writes here).
        if restated and not left and written >= restated:
            break
        if time.monotonic() > deadline:
            run.stop()
            reader.stop()
            raise SystemExit(f"the re-statement did not finish: {left:.0f} keys left; see {log}")
    end = time.time()
    calls = benchkit.calls_between(calls0, benchkit.command_calls(client))
    if start is None:  # the event was read on restart: the first sample showing the queue
        first = next(
            t
            for t, v in run.samples
            if v.get("search_features_keys_to_restate")
            or v.get("search_features_keys_restated_total")
        )
        start = run.started_wall + first
    time.sleep(2)
    run.stop()
    reader.stop()
    pipeline_calls = sum(n for name, n in calls.items() if name != "hgetall")
    return {
        "rate_keys_per_s": rate,
        "restated": int(restated),
        "sink_writes": int(written),
        "duration_s": round(end - start, 1),
        "restated_keys_per_s": round(restated / max(end - start, 1e-9)),
        "redis_commands": pipeline_calls,
        "redis_commands_per_key": round(pipeline_calls / max(restated, 1), 3),
        "commands_by_name": {k: v for k, v in calls.items() if k != "hgetall"},
        "peak_redis_ops_per_s": peak_ops,
        "restored_after_s": round(ready_s, 1),
        "settled_rss_mib": round(settled_rss / MIB),
        "settled_rss": settled_rss,
        **reader.summary(start, end, before_end=None if produce_event else run.started_wall),
    }


def table(result: dict[str, Any]) -> list[tuple[str, str]]:
    b, r = result["build"], result["restore"]
    rows = [
        ("live keys (doc / qd / ac / acq)", "{:,} ({doc:,} / {qd:,} / {ac:,} / {acq:,})"),
        ("events", f"{result['stream']['events']:,}"),
        ("build: events/s (start-up excluded)", f"{b['events_per_s']:,}"),
        ("build: keys/s (start-up excluded)", f"{b['keys_per_s']:,}"),
        (
            "build: keys/s at 10-30% / 70-90% of the keys",
            f"{b['keys_per_s_10_30']:,} / {b['keys_per_s_70_90']:,}",
        ),
        ("start-up (empty topic, start to exit)", f"{result['startup_s']} s"),
        (
            "RSS idle / build peak / build final",
            f"{b['idle_rss_mib']} / {b['peak_rss_mib']} / {b['final_rss_mib']} MiB",
        ),
        ("RSS bytes per live key (build final - idle)", f"{b['rss_bytes_per_key']}"),
        (
            "RSS restored and idle (bytes per live key)",
            f"{b['restored_rss_mib']} MiB ({b['restored_rss_bytes_per_key']})",
        ),
        (
            "Redis used_memory growth",
            f"{b['redis_used_memory_growth_mib']} MiB ({b['redis_bytes_per_key']} B/key)",
        ),
        (
            "Redis commands per event / per key",
            f"{b['redis_commands_per_event']} / {b['redis_commands_per_key']}",
        ),
        *(
            [
                (
                    "Redis CPU during the build (share of its reading time)",
                    f"{b['redis_cpu_s']} s ({b['redis_cpu_s'] / b['reading_s']:.0%})",
                )
            ]
            if b.get("redis_cpu_s") is not None
            else []
        ),
        (
            "recovery dir after the build",
            f"{b['recovery_dir_mib']} MiB "
            f"(live snapshots {b['snapshot_live_mib']} MiB, "
            f"{b['snapshot_bytes_per_key']} B/key)",
        ),
        (
            "every key's state in one snapshot (pickle + SQLite; layout 5, or a new base)",
            f"{b['full_snapshot_s']} s",
        ),
        (
            "the same shards' snapshot as the pipeline takes it (references + tail)",
            f"{b['segmented_snapshot_s']} s, {b['full_snapshot']['segmented_bytes']:,} bytes",
        ),
    ]
    if "baseline_reading_s" in b:
        rows += [
            (
                "build reading time: recovery on / off",
                f"{b['reading_s']} / {b['baseline_reading_s']} s ({b['snapshot_overhead']:+.0%})",
            ),
            (
                "build CPU: recovery on / off",
                f"{b['cpu_s']} / {b['baseline_cpu_s']} s "
                f"(snapshots {b['snapshot_cpu_share']:.0%} of the CPU)",
            ),
        ]
    rows += [
        ("restore: start to exit", f"{r['restore_s']} s"),
        ("restore: peak RSS", f"{r['restore_peak_rss_mib']} MiB"),
    ]
    for ro in result["rollover"]:
        label = (
            f"rollover at {ro['rate_keys_per_s']:,} keys/s"
            if ro["rate_keys_per_s"]
            else ("rollover unlimited")
        )
        rows += [
            (f"{label}: duration", f"{ro['duration_s']} s ({ro['restated_keys_per_s']:,} keys/s)"),
            (
                f"{label}: Redis commands (per key)",
                f"{ro['redis_commands']:,} ({ro['redis_commands_per_key']})",
            ),
            (
                f"{label}: reader p50/p99 before, during",
                f"{ro['reader_p50_ms_before']}/{ro['reader_p99_ms_before']} ms, "
                f"{ro['reader_p50_ms_during']}/{ro['reader_p99_ms_during']} ms",
            ),
        ]
    keys = result["live_keys"]
    rows[0] = (rows[0][0], rows[0][1].format(sum(keys.values()), **keys))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--snapshot-interval", type=int, default=5, help="seconds (-s)")
    parser.add_argument(
        "--rate",
        type=int,
        action="append",
        help="RESTATE_KEYS_PER_SECOND of a rollover run (0: unlimited); default 50000 and 0",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without recovery")
    parser.add_argument("--recovery-dir", type=Path, help="parent of the recovery directories")
    parser.add_argument(
        "--redis-url",
        help="the Redis to write to (its command counts and memory are read server-wide); "
        "default: a redis-server of the benchmark's own, started and stopped by it",
    )
    parser.add_argument("--keep", action="store_true", help="keep topics, keys and recovery dirs")
    parser.add_argument("--out", type=Path, help="default: bench/results/scale-<keys>.json")
    args = parser.parse_args()
    rates = args.rate or [50_000, 0]

    token = f"scale{int(time.time())}"
    topic, prefix = f"{token}-events", f"bench_{token}"
    empty = f"{token}-empty"
    topics = [topic, f"{topic}-dlq", empty, f"{empty}-dlq"]
    config = Config.from_env({"KAFKA_BROKERS": BROKERS})
    ensure_topics(config.kafka, [topic, f"{topic}-dlq"], partitions=args.partitions)
    ensure_topics(config.kafka, [empty, f"{empty}-dlq"], partitions=1)
    work = Path(tempfile.mkdtemp(prefix=f"{token}-", dir=args.recovery_dir))
    recovery = work / "recovery"
    own = None if args.redis_url else benchkit.PrivateRedis(work)
    redis_url = args.redis_url if own is None else own.url
    client = redis.Redis.from_url(redis_url, socket_timeout=120)
    result: dict[str, Any] = {
        "args": {**vars(args), "recovery_dir": str(work), "redis": "own" if own else redis_url}
    }
    try:
        now = int(time.time() * 1000)
        day0 = now - now % DAY_MS - DAY_MS  # yesterday, UTC: the rollover enters today
        sessions = sessions_for(args.keys)
        expected = keys_of(sessions)
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        events = produce(BROKERS, topic, stream(sessions, day0, counts), timeout_s=300)
        result["stream"] = {
            "sessions": sessions,
            "events": events,
            "events_by_type": counts,
            "expected_keys": expected,
            "produce_s": round(time.perf_counter() - t0, 1),
        }
        print(f"produced {events:,} events for {sum(expected.values()):,} keys", flush=True)

        base_env = benchkit.pipeline_env(topic, prefix, redis_url)
        start_env = {**base_env, "KAFKA_TOPICS": empty, "KAFKA_DLQ_TOPIC": f"{empty}-dlq"}
        idle = Pipeline(start_env, processes=args.processes)
        startup = idle.wait()
        result["startup_s"] = round(startup, 2)

        baseline = None
        if not args.no_baseline:
            base_prefix = f"{prefix}_norecovery"
            _, baseline, base_run = timed_run(
                {**base_env, "FEATURE_PREFIX": base_prefix}, args.processes
            )
            baseline_cpu = base_run.cpu_s
            print(f"without recovery: {baseline:.1f} s reading", flush=True)
            benchkit.delete_keys(client, base_prefix)

        env = {
            **base_env,
            "RECOVERY_DIR": str(recovery),
            "RECOVERY_PARTITIONS": str(args.processes),
            "SNAPSHOT_INTERVAL_SECONDS": str(args.snapshot_interval),
        }
        live_expected = sum(expected.values())
        b = build(env, args.processes, live_expected, client, own is not None)
        print(f"built in {b['wall_s']:.1f} s ({b['reading_s']:.1f} s reading)", flush=True)
        found = benchkit.feature_keys(client, prefix)
        live = {family: found.pop(family, 0) for family in expected}
        result["live_keys"] = live
        if found:  # e.g. published priors: not feature keys of the four families
            result["other_keys"] = found
        if live != expected:
            print(f"WARNING: Redis holds {live}, the stream should make {expected}", flush=True)
        n_live = sum(live.values())
        steady = b["reading_s"]
        store = benchkit.store_stats(recovery)
        full = benchkit.full_snapshot_cost(recovery, Config.from_env({}))
        b.update(
            {
                "wall_s": round(b["wall_s"], 1),
                "reading_s": round(steady, 1),
                "events_per_s": round(events / steady),
                "keys_per_s": round(n_live / steady),
                "keys_per_s_10_30": round(b["keys_per_s_10_30"]),
                "keys_per_s_70_90": round(b["keys_per_s_70_90"]),
                "idle_rss_mib": round(idle.max_rss / MIB),
                "peak_rss_mib": round(b.pop("peak_rss") / MIB),
                "final_rss_mib": round(b["last_rss"] / MIB),
                "rss_bytes_per_key": round((b.pop("last_rss") - idle.max_rss) / n_live),
                "redis_used_memory_growth_mib": round(b["redis_used_memory_growth"] / MIB),
                "redis_bytes_per_key": round(b.pop("redis_used_memory_growth") / n_live),
                "redis_commands_per_event": round(b["commands"] / events, 3),
                "redis_commands_per_key": round(b["commands"] / n_live, 3),
                "recovery_dir_mib": round(dir_bytes(recovery) / MIB),
                "snapshot_live_mib": round(store["live_snapshot_bytes"] / MIB),
                "snapshot_bytes_per_key": round(store["live_snapshot_bytes"] / n_live),
                "recovery_store": store,
                "full_snapshot": full,
                "full_snapshot_s": round(full["pickle_seconds"] + full["store_seconds"], 2),
                "segmented_snapshot_s": round(
                    full["segmented_pickle_seconds"] + full["segmented_store_seconds"], 3
                ),
            }
        )
        if baseline is not None:
            b["baseline_reading_s"] = round(baseline, 1)
            b["snapshot_overhead"] = round(steady / baseline - 1, 3)
            b["baseline_cpu_s"] = round(baseline_cpu, 1)
            b["snapshot_cpu_s"] = round(b["cpu_s"] - baseline_cpu, 1)
            b["snapshot_cpu_share"] = round(1 - baseline_cpu / b["cpu_s"], 3)
        result["build"] = b

        result["restore"] = restore(env, args.processes, client)
        print(f"restored in {result['restore']['restore_s']} s", flush=True)

        before_rollover = work / "before-rollover"
        if len(rates) > 1:  # every rate starts from the state the build left
            shutil.copytree(recovery, before_rollover)
        result["rollover"] = []
        for i, rate in enumerate(rates):
            directory = recovery if i == 0 else work / f"rollover-{i}"
            if i == len(rates) - 1 and i:  # the last copy needed: no copy of it
                before_rollover.rename(directory)
            elif i:
                shutil.copytree(before_rollover, directory)
            ro = rollover(
                {**env, "RECOVERY_DIR": str(directory)},
                processes=args.processes,
                rate=rate,
                live=n_live,
                n_docs=9 * sessions,
                prefix=prefix,
                topic=topic,
                token=token,
                client=client,
                redis_url=redis_url,
                produce_event=i == 0,
                restore_s=result["restore"]["restore_s"],
                log=work / f"rollover-{i}.log",
            )
            result["rollover"].append(ro)
            print(f"rollover at {rate}: {ro['duration_s']} s", flush=True)
            if i:
                shutil.rmtree(directory)
        settled = result["rollover"][0].pop("settled_rss")
        for ro in result["rollover"][1:]:
            ro.pop("settled_rss")
        b["restored_rss_mib"] = round(settled / MIB)
        b["restored_rss_bytes_per_key"] = round((settled - idle.max_rss) / n_live)
        result["load_average"] = os.getloadavg()
    finally:
        if args.keep:
            print(f"kept: topics {topics}, prefix {prefix} at {redis_url}, {work}")
        else:
            benchkit.delete_topics(topics)
            if own is None:
                benchkit.delete_keys(client, prefix)
                benchkit.delete_keys(client, f"{prefix}_norecovery")
            shutil.rmtree(work, ignore_errors=True)
        if own is not None and not args.keep:
            own.close()

    rows = table(result)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = args.out or ROOT / "bench" / "results" / f"scale-{args.keys}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
