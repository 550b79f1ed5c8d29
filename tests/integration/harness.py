"""Helpers for tests that run the real pipeline (`python -m dataflow.run`) as a subprocess.

- `two_phase_stream` / `dump`: the stream the restart tests use, a prefix read back from
  Redis;
- `PipelineProcess`: one `python -m dataflow.run` process with its own log file, so that a
  failure shows what the pipeline said;
- `RedisProxy`: a TCP proxy between a client and Redis that watches the commands go by
  (how far the pipeline has got, in event time) and can hold a pipeline write half-way, so
  a test can SIGKILL the process while Redis has applied part of a pipeline and not the rest;
  it can also hold every reply (a Redis that stops answering) or delay them (a slow link);
- `snapshot_offsets`: the Kafka offsets the last committed recovery snapshot would resume
  from (read from Bytewax's SQLite partitions).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import redis
from confluent_kafka import Consumer, KafkaError, TopicPartition

from dataflow.sinks.marker import marker_key
from dataflow.tools.generator import GeneratedMessage, GeneratorConfig, generate
from tests.reference_model import Event, ModelParams, decode_store, published_prior

REPO = Path(__file__).resolve().parents[2]


DAY_MS = 86_400_000

FITTED_ENV = {
    "SMOOTHING_DOC_PRIOR": "fitted",
    "SMOOTHING_QD_PRIOR": "fitted",
    "SMOOTHING_AC_PRIOR": "fitted",
    "PRIOR_FIT_SAMPLE": "2",
    "PRIOR_FIT_MIN_KEYS": "10",
    "PRIOR_FIT_MIN_IMPRESSIONS": "3",
}
"""Fitted priors for the three families, on a sample and thresholds small enough for the
test streams (`two_phase_stream`) to fit them."""
FITTED = ModelParams(fitted=("doc", "qd", "ac"), fit_sample=2, fit_min_keys=10, fit_min_trials=3)
"""The reference model's side of `FITTED_ENV`."""


def two_phase_stream(
    seed: int, now_ms: int, *, head: int, tail: int, invalid: float = 0.01
) -> list[GeneratedMessage]:
    """A month of sparse history, then two and a half dense days with re-sent duplicates.

    The history (days -40..-12) makes the clock cross many days, re-state keys and expire
    them; the dense tail holds the duplicates. Its copies follow their original within an
    hour or two of event time, far inside the 24-hour horizon, so the reference model's
    judgement is the same whichever partition each message lands on (the Kafka producer
    places them here, unknown to the model); these tests check restarts and workers. The
    shapes where a copy's own partition clock decides are in test_arrival_patterns.py.
    """
    history = generate(
        GeneratorConfig(
            seed=seed,
            n_events=head,
            n_docs=max(50, head // 10),
            n_queries=max(10, head // 100),
            start_ms=now_ms - 40 * DAY_MS,
            span_ms=28 * DAY_MS,
            invalid_fraction=invalid,
        )
    )
    recent = generate(
        GeneratorConfig(
            seed=seed + 1,
            n_events=tail,
            n_docs=max(100, tail // 20),
            n_queries=max(20, tail // 200),
            start_ms=now_ms - 60 * DAY_MS // 24,
            span_ms=60 * DAY_MS // 24 - 60_000,
            duplicate_fraction=0.05,
            invalid_fraction=invalid,
            max_disorder_ms=120_000,
        )
    )
    return [*history, *recent]


def assert_published_priors(
    client: redis.Redis, prefix: str, events: list[Event], params: ModelParams = FITTED
) -> list[str]:
    """`P:prior:{family}` of each fitted family equals the reference model's prior for the
    day it names (fitted or the fallback, whichever the events give); returns the sources."""
    sources = []
    for family in params.fitted:
        stored = decode_store({"k": client.hgetall(f"{prefix}:prior:{family}")})["k"]
        assert stored, f"{prefix}:prior:{family} was not published"
        day = int(stored["day"])
        expected = published_prior(events, family, day, prefix=prefix, params=params)
        assert stored == expected, f"{prefix}:prior:{family} {stored} != the model's {expected}"
        sources.append(stored["source"])
    return sources


def dump(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    """Every feature hash under `prefix:` as str -> {field: value} (TTL not included; the
    pipeline's marker, `prefix:__generation__`, left out)."""
    marker = marker_key(prefix).encode()
    keys = [k for k in client.scan_iter(match=f"{prefix}:*", count=2000) if k != marker]
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return decode_store(dict(zip(keys, pipe.execute(), strict=True)))


def read_topic(brokers: str, topic: str, timeout_s: float = 60.0) -> list[tuple[bytes, bytes]]:
    """Every (key, value) in `topic`, from the start of each partition to its end."""
    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"test-read-{topic}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        open_parts = set(partitions)
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while open_parts:
            assert time.monotonic() < deadline, f"{topic}: no end of partitions {open_parts}"
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                open_parts.discard(msg.partition())
            elif error is None:
                out.append((msg.key() or b"", msg.value() or b""))
        return out
    finally:
        consumer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pipeline_env(
    *,
    brokers: str,
    topic: str,
    dlq: str,
    redis_url: str,
    prefix: str,
    recovery_dir: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of one pipeline process: reads `topic` to its end, then exits."""
    env = {
        **os.environ,
        "KAFKA_BROKERS": brokers,
        "KAFKA_TOPICS": topic,
        "KAFKA_DLQ_TOPIC": dlq,
        "KAFKA_STOP_AT_END": "true",
        "REDIS_URL": redis_url,
        "FEATURE_PREFIX": prefix,
        "OPENSEARCH_URL": "",
        "METRICS_ENABLED": "false",
        "SNAPSHOT_INTERVAL_SECONDS": "1",
        "FEATURE_SHARDS": "16",
        # Small tails: with recovery, every test's shards keep their states in segments in
        # Kafka (KAFKA_STATE_TOPIC), as a production-sized shard does.
        "SNAPSHOT_TAIL_BYTES": "1024",
        "PYTHONPATH": str(REPO),
        **extra,
    }
    if recovery_dir is not None:
        env["RECOVERY_DIR"] = str(recovery_dir)
    else:
        env.pop("RECOVERY_DIR", None)
    return env


class PipelineProcess:
    """`python -m <module> <args>` with its output in `log_path` (appended)."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        args: Iterable[str] = (),
        module: str = "dataflow.run",
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self._log.write(f"\n===== {module} {' '.join(args)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=dict(env),
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL (no clean-up of any kind runs), then the exit status."""
        self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(30)
        self._log.close()
        return code

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            self._log.close()
            raise AssertionError(
                f"pipeline did not finish within {timeout:.0f}s; log:\n{self.tail()}"
            ) from None
        self._log.close()
        return code

    def wait_ok(self, timeout: float = 180.0) -> None:
        code = self.wait(timeout)
        assert code == 0, f"pipeline exited with {code}; log:\n{self.tail()}"

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- recovery store


def snapshot_offsets(recovery_dir: Path, step: str = "search_features.kafka_in") -> dict[str, int]:
    """The offset a resume would start each Kafka partition at (`"{partition}-{topic}"`).

    Read from Bytewax's SQLite partitions the way a resume reads them: from the resume
    epoch (`dataflow.recovery.resume_point`, Bytewax 0.21's `RecoveryPart.resume_from`),
    each state key restores its newest snapshot *before* that epoch. Not the `commits`
    table: a commit (garbage collection) is written after the frontier, so a kill between
    the two resumes one epoch past what `commits` says. The state of `kafka_in` is the
    intake envelope around the Kafka source's state, the next offset to read.
    """
    import pickle

    from dataflow import recovery
    from dataflow.core import snapshots
    from dataflow.kafka.intake import LAYOUT, STEP

    if not recovery.has_partitions(recovery_dir):
        return {}
    # Only while no pipeline runs (`recovery.partitions` opens them read-write).
    with recovery.partitions(recovery_dir) as dbs:
        resume = recovery.resume_point(dbs)
        if resume.execution is None:
            return {}  # no execution ever started: a resume starts from the beginning
        newest: dict[str, tuple[int, bytes | None]] = {}
        for db in dbs:
            rows = db.execute(
                "SELECT state_key, snap_epoch, ser_change FROM snaps "
                "WHERE step_id = ? AND snap_epoch < ?",
                (step, resume.epoch),
            )
            for key, epoch, blob in rows:
                if key not in newest or epoch > newest[key][0]:
                    newest[key] = (epoch, blob)
    offsets: dict[str, int] = {}
    for key, (_, blob) in newest.items():
        if blob is not None:
            envelope = pickle.loads(blob)  # noqa: S301 - Bytewax's own snapshot
            value, _clocks = snapshots.unwrap(STEP, LAYOUT, envelope)
            if isinstance(value, int) and value >= 0:
                offsets[key] = value
    return offsets


# --------------------------------------------------------------------------- Redis proxy


def _parse_commands(buf: bytearray) -> tuple[list[tuple[bytes, list[bytes]]], int]:
    """Complete RESP commands at the start of `buf`: [(raw bytes, args)], bytes consumed.

    Clients send each command as an array of bulk strings (`*N`, then `$len` + data per
    argument); an incomplete command at the end is left for the next read.
    """
    out: list[tuple[bytes, list[bytes]]] = []
    pos = 0
    n = len(buf)
    while pos < n:
        start = pos
        if buf[pos] != ord("*"):
            raise ValueError(f"unexpected RESP from the client: {bytes(buf[pos : pos + 20])!r}")
        end = buf.find(b"\r\n", pos)
        if end < 0:
            break
        count = int(buf[pos + 1 : end])
        pos = end + 2
        args: list[bytes] = []
        complete = True
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                complete = False
                break
            length = int(buf[pos + 1 : end])
            data_end = end + 2 + length
            if data_end + 2 > n:
                complete = False
                break
            args.append(bytes(buf[end + 2 : data_end]))
            pos = data_end + 2
        if not complete:
            pos = start
            break
        out.append((bytes(buf[start:pos]), args))
    return out, pos


@dataclass
class HeldWrite:
    """A pipeline the proxy cut in two: `applied` reached Redis, `held` never will."""

    applied: list[list[bytes]]
    held: list[list[bytes]]


@dataclass
class _ProxyState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    max_as_of: int = 0
    hsets: int = 0
    generation: int = 0
    """Bumped by `reset`: connections opened before it no longer count."""
    trap_armed: bool = False
    trapped: threading.Event = field(default_factory=threading.Event)
    held: HeldWrite | None = None
    answering: threading.Event = field(default_factory=threading.Event)
    reply_delay: float = 0.0
    open_upstreams: int = 0
    """Connections to Redis not ended yet (each ends once its client has gone and Redis has
    answered everything forwarded on it)."""

    def __post_init__(self) -> None:
        self.answering.set()


class RedisProxy:
    """A TCP proxy in front of Redis that sees every command the pipeline sends.

    - `max_as_of`: the largest `as_of` written so far: how far in event time the pipeline
      has got, which lets a test kill it at a chosen point of the stream whatever the speed
      of the machine.
    - `arm_trap()`: the next read from a client that holds an `HSET` followed by more
      complete commands (part of a sink pipeline) is cut: its first half (at least that
      `HSET`) goes to Redis, the rest is held and nothing more from that connection is
      ever forwarded. The client then waits for replies that never come: its pipeline
      write is in flight, half applied, and `trapped` is set for the test to SIGKILL it.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.state = _ProxyState()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._closing = False
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="redis-proxy")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def max_as_of(self) -> int:
        with self.state.lock:
            return self.state.max_as_of

    @property
    def hsets(self) -> int:
        with self.state.lock:
            return self.state.hsets

    def arm_trap(self) -> None:
        with self.state.lock:
            self.state.trap_armed = True
            self.state.held = None
            self.state.trapped.clear()

    def stop_answering(self) -> None:
        """Hold every reply from Redis (commands still reach it): to clients, a Redis that
        stopped answering. `answer()` sends what was held and resumes."""
        self.state.answering.clear()

    def answer(self) -> None:
        self.state.answering.set()

    def delay_replies(self, seconds: float) -> None:
        """Forward each chunk of replies `seconds` after it left Redis (0: at once): one more
        round trip then costs at least `seconds` more."""
        with self.state.lock:
            self.state.reply_delay = seconds

    def reset(self) -> None:
        """Forget what earlier processes wrote (call before starting the next one)."""
        with self.state.lock:
            self.state.max_as_of = 0
            self.state.hsets = 0
            # A killed process's last commands may still be on their way through: they
            # reach Redis, but they do not say how far the next process got.
            self.state.generation += 1

    def wait_trapped(self, process: PipelineProcess, timeout: float) -> HeldWrite:
        """Wait until the armed trap caught a pipeline write of `process`."""
        deadline = time.monotonic() + timeout
        while not self.state.trapped.wait(0.01):
            assert process.alive(), (
                f"the pipeline ended before a write was trapped:\n{process.tail()}"
            )
            assert time.monotonic() < deadline, "no pipeline write came through to trap"
        held = self.state.held
        assert held is not None
        return held

    def wait_ended(self, timeout: float = 30.0) -> None:
        """Wait until every connection through the proxy has ended (call once the client
        process is dead): Redis has then executed everything that was forwarded to it."""
        deadline = time.monotonic() + timeout
        while True:
            with self.state.lock:
                if self.state.open_upstreams == 0:
                    return
            assert time.monotonic() < deadline, "connections through the proxy never ended"
            time.sleep(0.005)

    def wait_for(self, as_of: int, process: PipelineProcess, timeout: float = 120.0) -> None:
        """Return once a write with `as_of >= as_of` went through; fail if `process` ends
        first (it read the whole stream before reaching that point) or time runs out."""
        deadline = time.monotonic() + timeout
        while self.max_as_of < as_of:
            assert process.alive(), (
                f"the pipeline ended before writing as_of >= {as_of}:\n{process.tail()}"
            )
            assert time.monotonic() < deadline, f"the pipeline never wrote as_of >= {as_of}"
            time.sleep(0.002)

    def close(self) -> None:
        self._closing = True
        self.state.answering.set()
        self._server.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> RedisProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self._sockets += [client, upstream]
            with self.state.lock:
                self.state.open_upstreams += 1
                generation = self.state.generation
            threading.Thread(
                target=self._client_to_server, args=(client, upstream, generation), daemon=True
            ).start()
            threading.Thread(
                target=self._server_to_client, args=(upstream, client), daemon=True
            ).start()

    def _server_to_client(self, upstream: socket.socket, client: socket.socket) -> None:
        # Replies are stamped when they leave Redis and forwarded by a second thread, so a
        # delay or a hold never slows down reading them.
        pending: queue.SimpleQueue[tuple[bytes, float] | None] = queue.SimpleQueue()
        forwarder = threading.Thread(
            target=self._forward_replies, args=(pending, client), daemon=True
        )
        forwarder.start()
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                with self.state.lock:
                    due = time.monotonic() + self.state.reply_delay
                pending.put((data, due))
        pending.put(None)
        with contextlib.suppress(OSError):
            upstream.close()
        with self.state.lock:
            self.state.open_upstreams -= 1

    def _forward_replies(
        self, pending: queue.SimpleQueue[tuple[bytes, float] | None], client: socket.socket
    ) -> None:
        with contextlib.suppress(OSError):
            while (item := pending.get()) is not None:
                data, due = item
                self.state.answering.wait()
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)

    def _client_to_server(
        self, client: socket.socket, upstream: socket.socket, generation: int
    ) -> None:
        buf = bytearray()
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                buf += data
                commands, used = _parse_commands(buf)
                del buf[:used]
                if not commands:
                    continue
                forward = self._inspect(commands, generation)
                upstream.sendall(b"".join(raw for raw, _ in commands[:forward]))
                if forward < len(commands):
                    # Held: keep the connection open and silent until the client dies.
                    while client.recv(65536):
                        pass
                    break
        # The client is gone: end the upstream gracefully, so Redis executes everything that
        # was forwarded before it sees the end (closing with its replies unread would reset
        # the connection, and Redis would drop commands it had not read yet). The replies
        # are read to the end, then the upstream closes (`_server_to_client`).
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            client.close()

    def _inspect(self, commands: list[tuple[bytes, list[bytes]]], generation: int) -> int:
        """Record what goes by (from connections opened since the last `reset`); returns how
        many of `commands` to forward."""
        state = self.state
        with state.lock:
            forward = len(commands)
            current = generation == state.generation
            first_hset = next((i for i, (_, a) in enumerate(commands) if _is_hset(a)), None)
            if (
                current
                and state.trap_armed
                and first_hset is not None
                and first_hset + 1 < len(commands)
            ):
                # At least one HSET goes through (so Redis visibly applied part of the
                # pipeline) and at least one command stays behind.
                forward = max(first_hset + 1, len(commands) // 2)
                state.held = HeldWrite(
                    applied=[a for _, a in commands[:forward]],
                    held=[a for _, a in commands[forward:]],
                )
                state.trap_armed = False
            for _, args in commands[:forward] if current else ():
                if _is_hset(args):
                    state.hsets += 1
                    for i in range(2, len(args) - 1, 2):
                        if args[i] == b"as_of":
                            state.max_as_of = max(state.max_as_of, int(args[i + 1]))
            if state.held is not None and forward < len(commands):
                state.trapped.set()
            return forward


def _is_hset(args: list[bytes]) -> bool:
    return bool(args) and args[0].upper() == b"HSET"


@contextlib.contextmanager
def redis_proxy(redis_url: str) -> Iterator[RedisProxy]:
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    proxy = RedisProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    try:
        yield proxy
    finally:
        proxy.close()
