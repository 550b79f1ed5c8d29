"""`python -m dataflow.tools.replay`: rebuild every feature into a fresh prefix, or drop an old one.

Rebuild (backfill)::

    python -m dataflow.tools.replay --prefix feat_v2 [--recovery-dir DIR] [--follow] [-- -w 2]

runs the same dataflow as `python -m dataflow.run`, from the earliest retained offset of
every partition of `KAFKA_TOPICS`, writing `feat_v2:*` while the live pipeline keeps
serving its own prefix. It has its own recovery directory (default
`.recovery/replay-<prefix>`), so it can be killed and re-run and resumes where it was, and
when it has read to the end, `RECOVERY_DIR=<that dir> FEATURE_PREFIX=feat_v2 python -m
dataflow.run` carries on from exactly there (no gap, nothing counted twice). `--follow`
does both in one go: after catching up it keeps consuming. Every few seconds it prints
Kafka messages read per second, offsets left (end offsets asked of the brokers, minus the
positions the input reports) and an ETA.

The replay writes Redis only (OpenSearch is off: the live pipeline owns its indices, also
with `--follow`) and has no metrics server unless `--metrics-port` is given (the live one
likely holds 3030).
Dead letters go to `KAFKA_DLQ_TOPIC` again, keyed `topic:partition:offset` as always, so a
consumer that drops repeated keys sees each bad message once.

Drop an old version once nothing reads it (docs/operations.md, "Replay into a new version")::

    python -m dataflow.tools.replay --drop-prefix feat          # counts the keys, deletes nothing
    python -m dataflow.tools.replay --drop-prefix feat --yes    # UNLINKs them in batches
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from confluent_kafka import KafkaException
from prometheus_client.metrics import MetricWrapperBase

from dataflow import metrics, recovery, run
from dataflow.config import Config
from dataflow.errors import ConfigError, PipelineError
from dataflow.kafka.source import POSITIONS, BrokerOffsets, Partition
from dataflow.settings import FEATURE_PREFIX
from dataflow.sinks.redis import connect

MARKER = "replay.json"
"""Written into a replay's recovery directory: which prefix and topics it rebuilds."""


# --- progress ----------------------------------------------------------------------------


@dataclass
class Progress:
    """Turns (messages read so far, offsets left) samples into a progress line.

    The rate is an exponentially weighted average over the samples (a batch that landed
    just before or after a sample would make a raw per-interval rate jump about).
    """

    prefix: str
    smoothing: float = 0.3
    started: float | None = None
    last_time: float | None = None
    last_read: float = 0.0
    rate: float | None = None
    last_left: float | None = None

    def line(self, now: float, read: float, left: float | None) -> str:
        # Once measured, a failed sample (brokers slow to answer) shows the last figure
        # rather than "unknown": the line stays steady.
        if left is None:
            left = self.last_left
        self.last_left = left
        if self.started is None or self.last_time is None:
            self.started, self.last_time, self.last_read = now, now, read
            return f"replay {self.prefix}: starting ({_count(read)} events read)"
        elapsed = now - self.last_time
        if elapsed > 0:
            current = (read - self.last_read) / elapsed
            self.rate = (
                current
                if self.rate is None
                else self.smoothing * current + (1 - self.smoothing) * self.rate
            )
        self.last_time, self.last_read = now, read
        rate = self.rate or 0.0
        if left is None:
            left_text, eta = "offsets left ?", "ETA ?"
        elif left <= 0:
            left_text, eta = "offsets left 0", "caught up"
        else:
            left_text = f"offsets left {_count(left)}"
            eta = f"ETA {_duration(left / rate)}" if rate > 0 else "ETA ?"
        return (
            f"replay {self.prefix}: {_count(read)} events read, {_count(rate)} events/s, "
            f"{left_text}, {eta}"
        )

    def done(self, now: float, read: float) -> str:
        took = now - self.started if self.started is not None else 0.0
        average = read / took if took > 0 else 0.0
        return (
            f"replay {self.prefix}: {_count(read)} events read in {_duration(took)} "
            f"({_count(average)} events/s), offsets left 0"
        )


def _count(value: float) -> str:
    return f"{int(round(value)):,}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _sum_samples(metric: MetricWrapperBase, suffix: str) -> float | None:
    """Sum of a metric's samples whose name ends with `suffix`; None if it has none."""
    total, found = 0.0, False
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                total += sample.value
                found = True
    return total if found else None


class ProgressSampler:
    """(Kafka messages read by this process, offsets left to the end of its partitions).

    Offsets left: the end offsets of the partitions this process reads, asked of the
    brokers at each sample, minus the next offset each will read (`source.POSITIONS`);
    None before the first partition is assigned or when the brokers do not answer.
    """

    def __init__(self, offsets: Callable[[Iterable[Partition]], dict[Partition, int]]) -> None:
        self.offsets = offsets

    def __call__(self) -> tuple[float, float | None]:
        read = _sum_samples(metrics.MESSAGES, "_total") or 0.0
        positions = POSITIONS.snapshot()
        if not positions:
            return read, None
        try:
            ends = self.offsets(positions)
        except (KafkaException, TimeoutError):
            return read, None  # the next sample asks again; progress is not worth a stop
        left = sum(max(0, ends[part] - nxt) for part, nxt in positions.items() if part in ends)
        return read, float(left)


class ProgressPrinter:
    """A daemon thread printing a progress line every `interval` seconds."""

    def __init__(
        self,
        prefix: str,
        interval: float,
        sample: Callable[[], tuple[float, float | None]],
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.progress = Progress(prefix)
        self.interval = interval
        self.sample = sample
        self.out = out or (lambda text: print(text, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="replay-progress")

    def start(self) -> None:
        self._thread.start()

    def stop(self, finished: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if not finished:
            self.print_once()
            return
        # The partitions are closed by now, so there is no lag left to read: say so.
        read, _ = self.sample()
        self.out(self.progress.done(time.monotonic(), read))

    def print_once(self) -> None:
        read, left = self.sample()
        self.out(self.progress.line(time.monotonic(), read, left))

    def _run(self) -> None:
        self.print_once()
        while not self._stop.wait(self.interval):
            self.print_once()


# --- safety checks -----------------------------------------------------------------------


def prepare_recovery_dir(directory: Path, prefix: str, topics: Sequence[str]) -> bool:
    """Check or create the replay marker; True when resuming an earlier replay.

    A replay must never resume from another pipeline's snapshots (the live one's would make
    it continue the live state into the new prefix, skipping history), nor from a replay
    of another prefix or other topics.
    """
    marker = directory / MARKER
    wanted = {"prefix": prefix, "topics": list(topics)}
    has_parts = recovery.has_partitions(directory)
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in wanted} != wanted:
            raise PipelineError(
                f"{directory} holds a replay of {recorded.get('prefix')!r} from topics "
                f"{recorded.get('topics')}, not of {prefix!r} from {list(topics)}; pick "
                "another --recovery-dir (or delete this one to start over)"
            )
        return has_parts
    if has_parts:
        raise PipelineError(
            f"{directory} holds recovery partitions that no replay wrote (the live "
            "pipeline's?); a replay needs a recovery directory of its own: pick another "
            "--recovery-dir"
        )
    directory.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**wanted, "created_unix": int(time.time())}) + "\n")
    return False


def prefix_is_empty(client: redis.Redis, prefix: str) -> bool:
    for _ in client.scan_iter(match=f"{prefix}:*", count=1000):
        return False
    return True


def drop_prefix(client: redis.Redis, prefix: str, *, batch: int = 1000) -> int:
    """UNLINK every key under `prefix:` in batches (non-blocking for Redis); the count."""
    dropped = 0
    keys: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=batch):
        keys.append(key)
        if len(keys) >= batch:
            dropped += int(client.unlink(*keys))
            keys = []
    if keys:
        dropped += int(client.unlink(*keys))
    return dropped


# --- the command -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataflow.tools.replay",
        description="Rebuild every feature from the earliest retained Kafka offsets into a "
        "fresh prefix while the live pipeline keeps serving its own; or drop an old prefix.",
        epilog="Arguments after `--` go to Bytewax unchanged (-w N, -i/-a). Every other "
        "setting comes from the environment, as for `python -m dataflow.run`.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prefix", help="the new version's key prefix, e.g. feat_v2")
    mode.add_argument("--drop-prefix", metavar="PREFIX", help="delete every PREFIX:* key")
    parser.add_argument(
        "--recovery-dir",
        type=Path,
        help="the replay's own recovery directory (default .recovery/replay-<prefix>)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep consuming after catching up (become the new version's live pipeline)",
    )
    parser.add_argument(
        "--progress-interval", type=float, default=5.0, help="seconds between progress lines"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics on this port (default: no server)"
    )
    parser.add_argument("--yes", action="store_true", help="with --drop-prefix: really delete")
    parser.add_argument("bytewax_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _checked_prefix(flag: str, value: str) -> str:
    try:
        return FEATURE_PREFIX.parse(value)
    except ValueError as exc:
        raise ConfigError(flag, f"{exc} (got {value!r})") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env()
        if args.drop_prefix is not None:
            return _drop(config, _checked_prefix("--drop-prefix", args.drop_prefix), args.yes)
        return _replay(config, _checked_prefix("--prefix", args.prefix), args)
    except PipelineError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2


def _drop(config: Config, prefix: str, yes: bool) -> int:
    if prefix == config.redis.prefix:
        raise PipelineError(
            f"FEATURE_PREFIX is {prefix!r} here: that is the version this environment serves. "
            "Switch readers and the pipeline to the new prefix first, then drop the old one "
            "from an environment that points at the new one"
        )
    client = connect(config.redis)
    if not yes:
        count = sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
        print(f"{count} keys under {prefix}:* would be deleted; add --yes to delete them")
        return 0
    started = time.monotonic()
    dropped = drop_prefix(client, prefix)
    print(f"deleted {dropped} keys under {prefix}:* in {time.monotonic() - started:.1f}s")
    return 0


def _replay(config: Config, prefix: str, args: argparse.Namespace) -> int:
    if prefix == config.redis.prefix:
        raise PipelineError(
            f"--prefix {prefix!r} is the FEATURE_PREFIX this environment serves; a replay "
            "writes a fresh version next to it (e.g. --prefix feat_v2)"
        )
    directory: Path = args.recovery_dir or Path(".recovery") / f"replay-{prefix}"
    resuming = prepare_recovery_dir(directory, prefix, config.kafka.topics)
    client = connect(config.redis)
    if not resuming and not prefix_is_empty(client, prefix):
        raise PipelineError(
            f"Redis already holds keys under {prefix}:* and {directory} holds no replay of "
            f"it: a rebuild must start from an empty prefix (drop it with --drop-prefix "
            f"{prefix} --yes, or pick another prefix)"
        )
    client.close()

    overrides = {
        "FEATURE_PREFIX": prefix,
        "RECOVERY_DIR": str(directory),
        "KAFKA_STOP_AT_END": "false" if args.follow else "true",
        # The live pipeline owns the OpenSearch indices; a rebuild must not write into them.
        "OPENSEARCH_URL": "",
        "METRICS_ENABLED": "false" if args.metrics_port is None else "true",
    }
    if args.metrics_port is not None:
        overrides["BYTEWAX_DATAFLOW_API_PORT"] = str(args.metrics_port)
    os.environ.update(overrides)
    extra = [a for a in args.bytewax_args if a != "--"]
    print(
        f"replay {prefix}: {'resuming' if resuming else 'starting'} from "
        f"{'the snapshot in' if resuming else 'the earliest retained offsets, recovery in'} "
        f"{directory}; topics {','.join(config.kafka.topics)}",
        file=sys.stderr,
        flush=True,
    )
    ends = BrokerOffsets(config.kafka)
    sampler = ProgressSampler(lambda parts: ends.fetch(parts, latest=True))
    printer = ProgressPrinter(prefix, args.progress_interval, sampler)
    printer.start()
    started = time.monotonic()
    code = 1
    try:
        code = run.main(extra)
    finally:
        printer.stop(finished=code == 0 and not args.follow)
    if code == 0 and not args.follow:
        print(
            f"replay {prefix}: read to the end in {time.monotonic() - started:.1f}s. Next: "
            f"RECOVERY_DIR={directory} FEATURE_PREFIX={prefix} python -m dataflow.run "
            f"keeps {prefix} live from here; then point readers at FEATURE_PREFIX={prefix} "
            "(docs/operations.md)",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
