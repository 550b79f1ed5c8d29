"""`python -m dataflow.tools.resync`: make every running pipeline re-write every live key.

For an operator whose Redis holds something other than what the pipeline wrote, in a way
the pipeline cannot notice by itself: a backup restored over it, the pipeline pointed at
another instance, keys deleted or edited by hand::

    python -m dataflow.tools.resync                   # re-write everything, follow it to the end
    python -m dataflow.tools.resync --timeout 600     # give up waiting after 10 minutes
    python -m dataflow.tools.resync --no-wait         # only ask for it

It reads `REDIS_URL` (with `REDIS_PASSWORD`, `REDIS_CA_FILE`) and `FEATURE_PREFIX` like the
pipeline, and deletes the prefix's marker `{FEATURE_PREFIX}:__generation__`
(`dataflow.sinks.marker`). Every pipeline process writing that prefix notices within
`STORE_CHECK_SECONDS` and re-states every live key it holds, at `RESTATE_KEYS_PER_SECOND`,
each write setting the key's TTL; a process that is stopped does it when it starts. The
command then follows the processes' status fields in the marker and prints, every few
seconds, how many keys are left and how fast they go.

Exit status:

- 0: every running process re-wrote every live key it holds (with `--no-wait`: the marker
  is deleted and the running processes were listed);
- 1: not confirmed: `--timeout` passed, or a process stopped reporting (its keys are
  re-written when it starts again);
- 2: the command could not run: a setting is invalid, or Redis does not answer;
- 3: no running pipeline writes this prefix (no status refreshed recently): the marker is
  deleted, and the pipeline re-writes every live key when it next starts.

Keys the pipeline no longer holds (deleted because their 30 days emptied) are not touched:
a restored backup that brought such keys back keeps them until their TTL runs out.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis

from dataflow.config import Config
from dataflow.errors import ConfigError
from dataflow.settings import mask_url
from dataflow.sinks.marker import REPAIRING, WHOLE, Status, marker_key
from dataflow.sinks.redis import connect

OK, NOT_CONFIRMED, CANNOT_RUN, NOTHING_RUNNING = 0, 1, 2, 3

STALE_AFTER_S = 15.0
"""A status not refreshed for this long (or for five check intervals, if longer) belongs to
no running process."""


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _count(value: float) -> str:
    return f"{round(value):,}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def statuses(client: redis.Redis, key: str) -> dict[str, Status]:
    """The status fields of the marker, by field name (unreadable ones left out)."""
    out: dict[str, Status] = {}
    raw: Mapping[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    for field, value in raw.items():
        name = field.decode("utf-8", "replace")
        if name.startswith("status:"):
            status = Status.decode(value)
            if status is not None:
                out[name] = status
    return out


def is_live(status: Status, now_ms: float) -> bool:
    return now_ms - status.written_ms < 1000 * max(STALE_AFTER_S, 5 * status.every_s)


@dataclass
class Process:
    """One pipeline process, as its status fields (one per worker) show it."""

    run: str
    where: str
    generation_before: int
    status: Status | None = None
    """Its newest status (before the marker was deleted, until it writes a newer one)."""

    @property
    def state(self) -> str:
        status = self.status
        if status is None or status.generation <= self.generation_before:
            return "waiting"
        if status.state == REPAIRING:
            return "queuing"
        if status.state == WHOLE and status.keys_left > 0:
            return "re-writing"
        return "done"


def running(found: Mapping[str, Status], now_ms: float) -> dict[str, Process]:
    """The running processes, by run token."""
    out: dict[str, Process] = {}
    for status in found.values():
        if not is_live(status, now_ms):
            continue
        known = out.get(status.run)
        if known is None:
            where = f"{status.host}:{status.pid}"
            out[status.run] = Process(status.run, where, status.generation, status)
        elif known.status is not None and status.written_ms > known.status.written_ms:
            known.status = status
    return out


class Follow:
    """Follows the processes until each is done or stopped reporting."""

    def __init__(self, processes: dict[str, Process], wall: Callable[[], float]) -> None:
        self.processes = processes
        self.wall = wall
        self.stopped: set[str] = set()
        self.last: tuple[float, int] | None = None
        self.rate: float | None = None

    def update(self, found: Mapping[str, Status]) -> None:
        now_ms = self.wall() * 1000
        for status in found.values():
            process = self.processes.get(status.run)
            if process is None:
                continue
            if process.status is None or status.written_ms > process.status.written_ms:
                process.status = status
        for run, process in self.processes.items():
            seen = process.status
            if seen is not None and not is_live(seen, now_ms) and process.state != "done":
                self.stopped.add(run)

    def finished(self) -> bool:
        return all(p.state == "done" or run in self.stopped for run, p in self.processes.items())

    def keys_left(self) -> int:
        return sum(
            p.status.keys_left
            for run, p in self.processes.items()
            if p.status is not None and run not in self.stopped and p.state != "waiting"
        )

    def line(self, prefix: str, now: float) -> str:
        left = self.keys_left()
        if self.last is not None and now > self.last[0] and left <= self.last[1]:
            current = (self.last[1] - left) / (now - self.last[0])
            self.rate = current if self.rate is None else 0.5 * current + 0.5 * self.rate
        self.last = (now, left)
        states: dict[str, int] = {}
        for run, process in self.processes.items():
            state = "stopped" if run in self.stopped else process.state
            states[state] = states.get(state, 0) + 1
        shown = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        text = (
            f"resync {prefix}: {_processes(len(self.processes))} ({shown}); "
            f"{_count(left)} keys left"
        )
        if self.rate:
            text += f", {_count(self.rate)} keys/s, about {_duration(left / self.rate)} to go"
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataflow.tools.resync",
        description="Make every pipeline process writing FEATURE_PREFIX re-write every live "
        "key (after a restored backup, a new Redis instance, keys edited by hand), and "
        "follow it to the end.",
        epilog="Exit status: 0 done, 1 not confirmed (timeout, a process stopped), 2 cannot "
        "run (settings, Redis), 3 no running pipeline (re-written at its next start).",
    )
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="seconds to wait for the end (0: no limit)"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="delete the marker and exit without following"
    )
    parser.add_argument(
        "--progress-interval", type=float, default=5.0, help="seconds between progress lines"
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    args = _parser().parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"resync: configuration error: {exc}", file=sys.stderr)
        return CANNOT_RUN
    prefix = config.redis.prefix
    client = connect(config.redis, socket_timeout=10, socket_connect_timeout=5)
    try:
        return _resync(client, prefix, args, clock=clock, wall=wall, sleep=sleep)
    except redis.RedisError as exc:
        url = mask_url(config.redis.url.get())
        print(f"resync: Redis at REDIS_URL={url} failed: {exc}", file=sys.stderr)
        return CANNOT_RUN
    finally:
        client.close()


def _resync(
    client: redis.Redis,
    prefix: str,
    args: argparse.Namespace,
    *,
    clock: Callable[[], float],
    wall: Callable[[], float],
    sleep: Callable[[float], None],
) -> int:
    key = marker_key(prefix)
    processes = running(statuses(client, key), wall() * 1000)
    client.delete(key)
    started = clock()
    if not processes:
        print(
            f"resync {prefix}: deleted {key}, but no running pipeline keeps it (no status "
            f"refreshed in the last {STALE_AFTER_S:.0f}s): the pipeline re-writes every live "
            "key when it next starts"
        )
        return NOTHING_RUNNING
    names = ", ".join(sorted(p.where for p in processes.values()))
    print(
        f"resync {prefix}: deleted {key}; running, re-writing every live key it holds: "
        f"{_processes(len(processes))} ({names})"
    )
    if args.no_wait:
        return OK
    follow = Follow(processes, wall)
    next_line = started + args.progress_interval
    while True:
        sleep(0.5)
        follow.update(statuses(client, key))
        now = clock()
        if follow.finished():
            break
        if args.timeout and now - started >= args.timeout:
            print(
                f"resync {prefix}: gave up waiting after {_duration(now - started)}: "
                f"{_count(follow.keys_left())} keys left; the pipeline keeps re-writing "
                "(search_features_keys_to_restate)",
                file=sys.stderr,
            )
            return NOT_CONFIRMED
        if now >= next_line:
            print(follow.line(prefix, now), flush=True)
            next_line = now + args.progress_interval
    took = _duration(clock() - started)
    if follow.stopped:
        gone = ", ".join(sorted(processes[run].where for run in follow.stopped))
        print(
            f"resync {prefix}: {gone} stopped reporting before it was done; it re-writes "
            "every live key it holds when it starts again",
            file=sys.stderr,
        )
        return NOT_CONFIRMED
    print(f"resync {prefix}: every live key re-written by {_processes(len(processes))} in {took}")
    return OK


if __name__ == "__main__":
    sys.exit(main())
