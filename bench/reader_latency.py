"""Latency of `dataflow.reader` at serving batch sizes, against the running Redis.

    .venv/bin/python bench/reader_latency.py [--calls 300] [--runs 5] [--docs 20000]
                                             [--missing 0.1] [--with-writer]

1. Populates a fresh prefix (`bench_reader_<hex>`) through the pipeline's own code: feature
   fields from `families.fields_for` over counters built with `counters.add`, written by the
   Redis sink's `RedisWriter` (HSET of every field + EXPIRE, 500 keys per pipeline). `--docs`
   documents, their query-document keys for 3 queries, 3 typed prefixes with 60
   autocomplete candidates each, and the link keys of those candidates.
2. Measures each path `--calls` times, interleaved call by call (so load that comes and goes
   hits every path alike): 200 random documents (a `--missing` share of them never written),
   the same for query-document pairs, 50 autocomplete candidates, 50 link queries, and the
   ranking call (200 documents and their 200 query-document pairs in one round trip), on the
   sync and the async reader. Comparisons for 200 documents, each returning the same records
   (checked before measuring): the previous reader (a redis-py pipeline of `HGETALL` parsed
   per key); a server-side Lua script (one `EVALSHA_RO` that runs `HMGET` of the record's
   fields on every key and returns the whole batch as one JSON text, `LUA_ROWS`); and a
   pipeline of `HMGET` (values only, no field names) plus one `EXISTS` of every key. And
   the floor under any Python client of this key layout: the same 200 `HGETALL`s on a bare
   socket, the replies parsed by hiredis into bytes and nothing more (no records), and one
   fixed batch of them with the replies read as raw bytes up to their known length (Redis
   and the kernel alone).
3. Repeats that `--runs` times and prints, per path, the median over runs of p50 and p99
   (and the spread of p50), plus what else the machine was doing (load, CPU steal) and the
   garbage collections that ran during the timed calls. Then Redis's own share: the
   execution time of one 200-document read by the sync reader, from `INFO commandstats`
   (the `HGETALL` microseconds of 500 reads; parsing requests and writing replies are not
   in it).

`--with-writer` measures while another process rewrites the same keys at full speed (the
sink's `RedisWriter` in a loop, bounded in time and stopped when the measurement ends).
Writes bench/results/reader_latency.json. Deletes its keys at the end. Needs `make up`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import hiredis
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataflow import reader as reader_module  # noqa: E402
from dataflow import resp  # noqa: E402
from dataflow.config import RedisSettings  # noqa: E402
from dataflow.core import counters, keys  # noqa: E402
from dataflow.core.families import (  # noqa: E402
    AC,
    ACQ,
    DOC,
    LAYOUTS,
    QD,
    FeatureParams,
    Fields,
    fields_for,
)
from dataflow.core.shard import Write  # noqa: E402
from dataflow.reader import (  # noqa: E402
    AsyncFeatureReader,
    DocFeatures,
    FeatureReader,
)
from dataflow.retry import Backoff  # noqa: E402
from dataflow.settings import Secret  # noqa: E402
from dataflow.sinks.redis import RedisWriter  # noqa: E402

REDIS_URL = os.environ.get(
    "REDIS_URL", f"redis://127.0.0.1:{os.environ.get('REDIS_PORT', '6379')}/0"
)
DAY_MS = 86_400_000
QUERIES = ("iphone case", "usb c charger", "rain jacket")
TYPED = ("ip", "us", "ra")
CANDIDATES_PER_PREFIX = 60
WRITER_MAX_SECONDS = 600.0

# The server-side alternative (comparison only): one EVALSHA_RO for the whole batch. KEYS are
# the feature hashes, ARGV the record's fields in the record's order; the reply is one bulk
# string, a JSON text `[row, ...]`: a row is 0 for a key that does not exist, else the
# values (`null` for an absent field). A value outside the numbers' alphabet makes the
# script return '' and the caller read that batch with HGETALL (so the records stay exact).
LUA_ROWS = """#!lua flags=no-writes
-- search-features bench: reader rows v1
local rows = {}
local width = #ARGV
for i, key in ipairs(KEYS) do
  local values = redis.call('HMGET', key, unpack(ARGV))
  local absent = 0
  for j = 1, width do
    if not values[j] then absent = absent + 1 end
  end
  if absent == 0 then
    local row = table.concat(values, ',')
    if string.find(row, '[^%d%.eE%+%-,]') then return '' end
    rows[i] = '[' .. row .. ']'
  elseif absent == width and redis.call('EXISTS', key) == 0 then
    rows[i] = '0'
  else
    for j = 1, width do
      local value = values[j]
      if not value then
        values[j] = 'null'
      elseif string.find(value, '[^%d%.eE%+%-]') then
        return ''
      end
    end
    rows[i] = '[' .. table.concat(values, ',') .. ']'
  end
end
return '[' .. table.concat(rows, ',') .. ']'
"""


def pack_command(*args: str) -> bytes:
    """One command as RESP (UTF-8 arguments)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


# --------------------------------------------------------------------------- population


def feature_fields(family: int, rnd: random.Random, now_ms: int, params: FeatureParams) -> Fields:
    """The hash the pipeline would write for a key with a few random events this month."""
    layout = LAYOUTS[family]
    state = None
    for _ in range(rnd.randint(1, 8)):
        ts = now_ms - rnd.randrange(29 * DAY_MS)
        counts = tuple(rnd.randint(0, 40) for _ in range(layout.counts))
        state = counters.add(state, layout, ts, counts)
    assert state is not None
    return fields_for(family, state, now_ms, params)


def candidates_of(typed: str) -> list[str]:
    return [f"{typed}{word} {n}" for n, word in enumerate(["hone", "ad", "od"] * 20)][
        :CANDIDATES_PER_PREFIX
    ]


def bench_writes(docs: list[str], params: FeatureParams) -> list[Write]:
    rnd = random.Random(11)
    now = int(time.time() * 1000)
    writes: list[Write] = [
        (keys.doc_suffix(d), feature_fields(DOC, rnd, now, params)) for d in docs
    ]
    for query in QUERIES:
        qhash = keys.query_hash(query)
        writes += [(keys.qd_suffix(qhash, d), feature_fields(QD, rnd, now, params)) for d in docs]
    for typed in TYPED:
        for candidate in candidates_of(typed):
            suffix = keys.ac_suffix(keys.q_norm(typed), keys.q_norm(candidate))
            writes.append((suffix, feature_fields(AC, rnd, now, params)))
            qhash = keys.query_hash(candidate)
            writes.append((keys.acq_suffix(qhash), feature_fields(ACQ, rnd, now, params)))
    return writes


def writer_for(url: str, prefix: str) -> RedisWriter:
    client = redis.Redis.from_url(url, socket_timeout=10)
    settings = RedisSettings(url=Secret(url), prefix=prefix, ttl_seconds=3600)
    return RedisWriter(client, settings, Backoff())


def writer_loop(url: str, prefix: str, docs: int, seconds: float) -> None:
    """The competing writer: rewrites the bench's keys at full speed until SIGTERM, for at
    most `seconds`; then prints how many keys it wrote and how fast."""
    writes = bench_writes([f"doc{i}" for i in range(docs)], FeatureParams())
    writer = writer_for(url, prefix)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    deadline = started + min(seconds, WRITER_MAX_SECONDS)
    written = 0
    while not stopping and time.monotonic() < deadline:
        for start in range(0, len(writes), writer.chunk):
            writer.write(writes[start : start + writer.chunk])
            written += min(writer.chunk, len(writes) - start)
            if stopping or time.monotonic() >= deadline:
                break
    elapsed = time.monotonic() - started
    print(f"{written} keys in {elapsed:.0f}s ({written / elapsed:,.0f} keys/s, HSET + EXPIRE each)")


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=2000):
        batch.append(key)
        if len(batch) == 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


# --------------------------------------------------------------------------- paths


class Paths:
    """Every measured path as a callable over one random batch."""

    def __init__(self, url: str, prefix: str, docs: list[str], missing: float) -> None:
        self.url = url
        self.prefix = prefix
        self.docs = docs
        self.missing = missing
        self.rnd = random.Random(5)
        self.sync = FeatureReader.from_url(url, prefix=prefix, deadline_ms=1000)
        self.async_reader = AsyncFeatureReader.from_url(url, prefix=prefix, deadline_ms=1000)
        self.previous_client = redis.Redis.from_url(url)  # what the previous from_url built
        self.raw_client = redis.Redis.from_url(url, protocol=2)  # the comparisons' connection
        self.lua_sha = self.raw_client.script_load(LUA_ROWS)
        self.params = FeatureParams()
        address = self.raw_client.connection_pool.connection_kwargs
        self.sock = socket.create_connection((address["host"], address["port"]))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fixed: tuple[bytes, int] | None = None
        if address.get("db"):
            self.sock.sendall(pack_command("SELECT", str(address["db"])))
            self.sock.recv(64)

    def doc_batch(self, n: int = 200) -> list[str]:
        unknown = round(n * self.missing)
        return self.rnd.sample(self.docs, n - unknown) + [
            f"never-{uuid.uuid4().hex[:10]}" for _ in range(unknown)
        ]

    def ac_batch(self) -> tuple[str, list[str]]:
        typed = self.rnd.choice(TYPED)
        return typed, self.rnd.sample(candidates_of(typed), 50)

    def link_batch(self) -> list[str]:
        pool = [c for t in TYPED for c in candidates_of(t)]
        return self.rnd.sample(pool, 45) + [f"never seen {n}" for n in range(5)]

    def previous(self, doc_ids: list[str]) -> dict[str, DocFeatures]:
        """The previous reader: a redis-py pipeline of HGETALL, each reply parsed by name."""
        unique = list(dict.fromkeys(doc_ids))
        pipe = self.previous_client.pipeline(transaction=False)
        for doc_id in unique:
            pipe.hgetall(keys.doc_key(self.prefix, doc_id))
        rows = pipe.execute()
        return {
            d: DocFeatures.parse(row, self.params.doc) for d, row in zip(unique, rows, strict=True)
        }

    def _round_trip(self, data: bytes, replies: int) -> list[Any]:
        pool: Any = self.raw_client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([data], check_health=False)
            return resp.read_replies(conn, replies)
        finally:
            pool.release(conn)

    def lua(self, doc_ids: list[str]) -> dict[str, DocFeatures]:
        """One EVALSHA_RO running LUA_ROWS, the JSON reply decoded column by column."""
        layout = reader_module._DOC
        unique = list(dict.fromkeys(doc_ids))
        key_list = keys.doc_keys(self.prefix, unique)
        args = ["EVALSHA_RO", self.lua_sha, str(len(key_list)), *key_list, *layout.names]
        (reply,) = self._round_trip(pack_command(*args), 1)
        rows = orjson.loads(reply) if reply else None
        present = [row for row in rows if row != 0] if rows else []
        if rows is None or any(len(row) != layout.width for row in present):
            return self.sync.doc_features(unique)  # values outside the numbers' alphabet
        values = list(chain.from_iterable(present))
        width = layout.width
        columns = []
        for position, kind in enumerate(layout.kinds):
            column = values[position::width]
            kinds = set(map(type, column))
            if kind is float and int in kinds and kinds <= {int, float}:
                column = [float(v) for v in column]
            elif kinds and kinds != {kind}:  # null (a partial hash) or a non-contract value
                return self.sync.doc_features(unique)
            columns.append(column)
        records = iter(map(layout.make, zip(*columns, repeat(True))))
        missing = layout.missing(self.params.doc)
        return dict(zip(unique, [next(records) if row else missing for row in rows], strict=True))

    def hmget(self, doc_ids: list[str]) -> dict[str, DocFeatures]:
        """A pipeline of HMGET (the record's fields in the record's order) and one EXISTS of
        every key: as many keys exist as rows hold values, else it reads with HGETALL."""
        layout = reader_module._DOC
        unique = list(dict.fromkeys(doc_ids))
        key_list = keys.doc_keys(self.prefix, unique)
        fields = "".join(f"${len(n)}\r\n{n}\r\n" for n in layout.names)
        head = f"*{2 + layout.width}\r\n$5\r\nHMGET\r\n$"
        text = "".join([f"{head}{len(k)}\r\n{k}\r\n{fields}" for k in key_list])
        data = text.encode() + pack_command("EXISTS", *key_list)
        rows = self._round_trip(data, len(key_list) + 1)
        existing = rows.pop()
        present = [row for row in rows if row[0] is not None]
        flat = list(chain.from_iterable(present))
        if existing != len(present) or None in flat:
            return self.sync.doc_features(unique)  # a partial or foreign hash: not measured
        parsed = orjson.loads(b"[" + b",".join(flat) + b"]")
        width = layout.width
        columns = [parsed[p::width] for p in range(width)]
        if any(set(map(type, c)) - {k} for c, k in zip(columns, layout.kinds, strict=True)):
            return self.sync.doc_features(unique)
        records = iter(map(layout.make, zip(*columns, repeat(True))))
        missing = layout.missing(self.params.doc)
        out = [next(records) if row[0] is not None else missing for row in rows]
        return dict(zip(unique, out, strict=True))

    def floor(self, doc_ids: list[str]) -> list[Any]:
        """The same `HGETALL`s on a bare socket, the replies parsed by hiredis and nothing
        more: what Redis, the kernel and the reply parser cost, with no records built."""
        key_list = keys.doc_keys(self.prefix, list(dict.fromkeys(doc_ids)))
        self.sock.sendall(resp.pack_hgetall(key_list))
        reader = hiredis.Reader()
        replies: list[Any] = []
        while len(replies) < len(key_list):
            reader.feed(self.sock.recv(1 << 20))
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        return replies

    def floor_unparsed(self) -> int:
        """One fixed batch of 200 documents on a bare socket, the replies read as bytes up
        to their known length, not parsed: Redis and the kernel alone."""
        if self.fixed is None:
            batch = keys.doc_keys(self.prefix, list(dict.fromkeys(self.doc_batch())))
            data = resp.pack_hgetall(batch)
            self.sock.sendall(data)
            reader, got, size = hiredis.Reader(), 0, 0
            while got < len(batch):
                chunk = self.sock.recv(1 << 20)
                reader.feed(chunk)
                size += len(chunk)
                while reader.gets() is not False:
                    got += 1
            self.fixed = (data, size)
        data, size = self.fixed
        self.sock.sendall(data)
        left = size
        while left:
            left -= len(self.sock.recv(min(left, 1 << 20)))
        return size

    def redis_ms_per_read(self, reads: int = 500) -> float:
        """Redis's execution time of one 200-document read by the sync reader."""

        def hgetall_usec() -> float:
            stats = self.raw_client.info("commandstats").get("cmdstat_hgetall", {})
            return float(stats.get("usec", 0))

        before = hgetall_usec()
        for _ in range(reads):
            self.sync.doc_features(self.doc_batch())
        return (hgetall_usec() - before) / reads / 1000.0

    def check(self) -> None:
        """Every 200-document path returns the same records (before anything is timed)."""
        batch = self.doc_batch()
        want = self.sync.doc_features(batch)
        assert self.previous(batch) == want, "previous"
        assert self.lua(batch) == want, "lua"
        assert self.hmget(batch) == want, "hmget"
        assert asyncio.run(self._async_docs(batch)) == want, "async"
        assert len(self.floor(batch)) == len(want), "floor"

    async def _async_docs(self, batch: list[str]) -> dict[str, DocFeatures]:
        reader = AsyncFeatureReader.from_url(self.url, prefix=self.prefix, deadline_ms=1000)
        try:
            return await reader.doc_features(batch)
        finally:
            await reader.aclose()

    def table(self) -> list[tuple[str, str, int, Callable[[], Any]]]:
        """(path, family, ids, call) for every row; async calls return awaitables."""
        s, a = self.sync, self.async_reader
        query = QUERIES[0]
        return [
            ("previous (pipeline of HGETALL)", "doc", 200, lambda: self.previous(self.doc_batch())),
            ("lua: EVALSHA_RO, HMGET->JSON", "doc", 200, lambda: self.lua(self.doc_batch())),
            ("pipeline of HMGET + EXISTS", "doc", 200, lambda: self.hmget(self.doc_batch())),
            ("floor: socket + hiredis only", "doc", 200, lambda: self.floor(self.doc_batch())),
            ("floor: socket, bytes unparsed", "doc", 200, self.floor_unparsed),
            ("sync", "doc", 200, lambda: s.doc_features(self.doc_batch())),
            ("sync", "qd", 200, lambda: s.query_doc_features(query, self.doc_batch())),
            ("sync", "ac", 50, lambda: s.autocomplete_features(*self.ac_batch())),
            ("sync", "acq", 50, lambda: s.autocomplete_link(self.link_batch())),
            (
                "sync ranking_features",
                "doc+qd",
                400,
                lambda: s.ranking_features(query, self.doc_batch()),
            ),
            ("async", "doc", 200, lambda: a.doc_features(self.doc_batch())),
            ("async", "qd", 200, lambda: a.query_doc_features(query, self.doc_batch())),
            ("async", "ac", 50, lambda: a.autocomplete_features(*self.ac_batch())),
            ("async", "acq", 50, lambda: a.autocomplete_link(self.link_batch())),
            (
                "async ranking_features",
                "doc+qd",
                400,
                lambda: a.ranking_features(query, self.doc_batch()),
            ),
        ]


Row = tuple[str, str, int, Callable[[], Any]]


class GcWatch:
    """The garbage collections that run while it is installed: count and longest, per
    generation."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.longest_ms = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self.count[generation] += 1
        took = (time.perf_counter() - self._started) * 1000.0
        self.longest_ms[generation] = max(self.longest_ms[generation], took)

    def summary(self) -> str:
        return ", ".join(
            f"gen{g} {n}" + (f" (longest {ms:.2f} ms)" if n else "")
            for g, (n, ms) in enumerate(zip(self.count, self.longest_ms, strict=True))
        )


async def measure(
    rows: list[Row], calls: int, runs: int, gc_watch: GcWatch
) -> list[list[list[float]]]:
    """Milliseconds per call, per run and row; the rows take turns call by call.

    Each call draws its random batch inside the timed span (a few microseconds); the async
    rows are timed around the await (the event loop runs nothing else)."""
    for row in rows:  # warm-up: connections open, scripts and code paths hot
        for _ in range(5):
            result = row[3]()
            if isinstance(result, Awaitable):
                await result
    gc.callbacks.append(gc_watch)
    try:
        return await _measure(rows, calls, runs)
    finally:
        gc.callbacks.remove(gc_watch)


async def _measure(rows: list[Row], calls: int, runs: int) -> list[list[list[float]]]:
    out = []
    for run in range(runs):
        samples: list[list[float]] = [[] for _ in rows]
        for _ in range(calls):
            for index, (_, _, _, call) in enumerate(rows):
                start = time.perf_counter()
                result = call()
                if isinstance(result, Awaitable):
                    await result
                samples[index].append((time.perf_counter() - start) * 1000.0)
        out.append(samples)
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return out


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies since boot, from /proc/stat (0, 1 where there is none)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0, 1
    values = [int(v) for v in fields]
    return (values[7] if len(values) > 7 else 0), sum(values)


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=REDIS_URL)
    parser.add_argument("--calls", type=int, default=300, help="calls per path per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--docs", type=int, default=20_000, help="documents populated")
    parser.add_argument("--missing", type=float, default=0.1, help="share of unknown doc ids")
    parser.add_argument("--with-writer", action="store_true", help="measure under a writer")
    parser.add_argument("--keep", action="store_true", help="keep the populated keys")
    parser.add_argument(
        "--writer-loop", nargs=2, metavar=("PREFIX", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.writer_loop:
        writer_loop(args.url, args.writer_loop[0], args.docs, float(args.writer_loop[1]))
        return 0

    client = redis.Redis.from_url(args.url)
    prefix = f"bench_reader_{uuid.uuid4().hex[:8]}"
    docs = [f"doc{i}" for i in range(args.docs)]
    started = time.perf_counter()
    writes = bench_writes(docs, FeatureParams())
    writer_for(args.url, prefix).write(writes)
    print(f"populated {len(writes)} keys under {prefix}: in {time.perf_counter() - started:.1f}s")

    writer: subprocess.Popen[str] | None = None
    try:
        if args.with_writer:
            budget = 60.0 + args.runs * args.calls * 0.05
            writer = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--url",
                    args.url,
                    "--docs",
                    str(args.docs),
                    "--writer-loop",
                    prefix,
                    str(budget),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)  # let it reach full speed
        paths = Paths(args.url, prefix, docs, args.missing)
        paths.check()
        rows = paths.table()
        per_run: list[list[tuple[float, float]]] = []
        steal0, total0 = cpu_steal()
        load0 = os.getloadavg()
        gc_watch = GcWatch()
        for samples in asyncio.run(measure(rows, args.calls, args.runs, gc_watch)):
            stats = []
            for values in samples:
                values.sort()
                stats.append((statistics.median(values), quantile(values, 0.99)))
            per_run.append(stats)
        redis_ms = paths.redis_ms_per_read()
        steal1, total1 = cpu_steal()
        load1 = os.getloadavg()
        written = None
        if writer is not None:
            writer.terminate()  # its SIGTERM handler ends the loop and reports
            out, _ = writer.communicate(timeout=60)
            written = out.strip() or None
            writer = None
    finally:
        if writer is not None:
            writer.kill()
            writer.wait(30)
        if not args.keep:
            delete_prefix(client, prefix)

    steal = 100.0 * (steal1 - steal0) / max(1, total1 - total0)
    info = client.info("server")
    header = (
        f"redis {info['redis_version']}, redis-py {redis.__version__}, hiredis "
        f"{hiredis.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"load {load0[0]:.2f} -> {load1[0]:.2f}, CPU steal {steal:.0f}%"
        + ("; a writer rewrote the keys meanwhile" if args.with_writer else "")
    )
    print(header)
    print(f"garbage collections during the timed calls: {gc_watch.summary()}")
    print(f"{args.runs} runs x {args.calls} calls per path; median over runs (p50 range)")
    print(f"{'path':<32}{'family':<8}{'ids':>5}{'p50 ms':>9}{'p99 ms':>9}   p50 range")
    result_rows = []
    for index, (path, family, ids, _) in enumerate(rows):
        p50s = [run[index][0] for run in per_run]
        p99s = [run[index][1] for run in per_run]
        p50, p99 = statistics.median(p50s), statistics.median(p99s)
        print(
            f"{path:<32}{family:<8}{ids:>5}{p50:>9.2f}{p99:>9.2f}   {min(p50s):.2f}-{max(p50s):.2f}"
        )
        result_rows.append(
            {
                "path": path,
                "family": family,
                "ids": ids,
                "p50_ms": p50,
                "p99_ms": p99,
                "p50_runs": p50s,
                "p99_runs": p99s,
            }
        )
    print(
        f"Redis executing one 200-document read (sync reader, INFO commandstats): {redis_ms:.2f} ms"
    )
    if written:
        print(f"competing writer: {written}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = "reader_latency_writer.json" if args.with_writer else "reader_latency.json"
    (results / name).write_text(
        json.dumps(
            {
                "header": header,
                "gc": gc_watch.summary(),
                "args": vars(args),
                "rows": result_rows,
                "redis_ms_per_200_docs": redis_ms,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
