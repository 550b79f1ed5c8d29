"""`python -m dataflow.run`: validate the configuration, prepare recovery, run the dataflow.

A thin wrapper over `python -m bytewax.run dataflow.flow` that takes the same flags, and:

- fails before touching Kafka if any setting is invalid (the message names the variable):
  exit status 2;
- runs the preflight checks (`dataflow.preflight`): input topics exist, Redis answers and
  authenticates, OpenSearch (when `OPENSEARCH_URL` is set) answers, authenticates and its
  aliases exist or are created, the dead-letter topic exists or is created. A failure is
  one line on stderr, `preflight failed: VARIABLE=value: what is wrong` (secrets masked),
  and exit status 3;
- with `RECOVERY_DIR` set (or `-r DIR`), creates the recovery partitions on first use
  (`RECOVERY_PARTITIONS`, default 1) and passes `-s SNAPSHOT_INTERVAL_SECONDS`
  (default 10) and `-b RECOVERY_BACKUP_INTERVAL_SECONDS` (default 0); see
  docs/operations.md for the guarantees and the trade-offs;
- on a restart, discards the snapshots a killed run left in epochs it did not finish
  (`dataflow.recovery.discard_unfinished`): Bytewax would restore them later;
- serves `/metrics` (the Bytewax dataflow API server) unless `METRICS_ENABLED=false`;
- collects garbage less often than Python's default (`GC_YOUNG_THRESHOLD`, `tune_gc`), so
  that the cost of a key does not grow with the number of keys held.

Every other flag (`-w`, `-i`, `-a`, ...) passes through to Bytewax unchanged. A pipeline that
stops on an error (`PipelineError`, e.g. a sink that cannot write) exits with status 1.

`RECOVERY_DIR` creates *all* partitions in one directory: right for one process (any `-w`),
or for several processes that share that one directory. Processes with a volume each must
each hold a disjoint share of the partitions (Bytewax silently uses one copy of a partition
held twice): set `BYTEWAX_RECOVERY_DIRECTORY` instead and create the shares as the
Kubernetes init container does (k8s/README.md).
"""

from __future__ import annotations

import gc
import logging
import os
import runpy
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dataflow import preflight, recovery, settings
from dataflow.config import Config
from dataflow.errors import ConfigError, PipelineError, PreflightError
from dataflow.logs import configure_logging

log = logging.getLogger("dataflow.run")

FLOW = "dataflow.flow:flow"


def recovery_args(env: Mapping[str, str], argv: Sequence[str]) -> list[str]:
    """The recovery flags to add, creating the partitions if the directory is new."""
    if "-r" in argv or "--recovery-directory" in argv:
        return []
    directory = settings.RECOVERY_DIR.read(env)
    if not directory:
        return []
    partitions = settings.RECOVERY_PARTITIONS.read(env)
    interval = settings.SNAPSHOT_INTERVAL_SECONDS.read(env)
    backup = settings.RECOVERY_BACKUP_INTERVAL_SECONDS.read(env)
    recovery.ensure_recovery_dir(Path(directory), partitions)
    return ["-r", directory, "-s", str(interval), "-b", str(backup)]


def recovery_directory(env: Mapping[str, str], argv: Sequence[str]) -> Path | None:
    """The recovery directory Bytewax will use: `-r`/`--recovery-directory`, else
    `RECOVERY_DIR`, else `BYTEWAX_RECOVERY_DIRECTORY`; None without recovery."""
    for i, arg in enumerate(argv):
        if arg in ("-r", "--recovery-directory") and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--recovery-directory="):
            return Path(arg.split("=", 1)[1])
    directory = settings.RECOVERY_DIR.read(env) or env.get("BYTEWAX_RECOVERY_DIRECTORY", "")
    return Path(directory) if directory else None


def tune_gc(young_threshold: int) -> None:
    """Garbage collection for a process that holds millions of keys.

    The state is mostly objects the cyclic collector does not track: strings, ints, and the
    keys' arrays (CPython tracks an `array`, but the compiled core takes its key states out
    of the collector's lists, as an array refers to nothing). The containers that hold them
    (shard dicts, dirty sets, re-statement queues, dedup sets) are walked element by element
    by every full collection, so with Python's default
    thresholds the cost of a key written grew with the number of keys held. Collections
    every `young_threshold` allocations (older generations at 20× and 100× that) make full
    collections rare; what is alive at start (modules, functions, classes) is frozen, never
    walked again. The pipeline creates few reference cycles; those it does are still
    collected, later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, 20, 100)


def port_problem(port: str) -> str | None:
    """Why the metrics server could not listen on `port` (Bytewax binds 0.0.0.0), or None."""
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"must be a port number (got {port!r})"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like the server itself: a port in TIME_WAIT from a previous run is free to reuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", int(port)))  # noqa: S104 - the address Bytewax will use
        except OSError as exc:
            return f"port {port} is not free ({exc.strerror}); set another or METRICS_ENABLED=false"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ
    try:
        config = Config.from_env(env)
        configure_logging(config.log_level, config.log_format)
        if settings.REDIS_MAX_RETRIES.is_set(env):
            log.warning(
                "REDIS_MAX_RETRIES is deprecated and ignored: the Redis sink waits for Redis "
                "however long it is away; set REDIS_OUTAGE_EXIT_SECONDS to stop after an "
                "outage that long"
            )
        searching = config.opensearch
        if searching.enabled and searching.tls and not searching.verify_certs:
            log.warning(
                "OPENSEARCH_VERIFY_CERTS is false: the OpenSearch server's certificate is not "
                "verified, anyone between this process and it can read and change what is sent "
                "(the basic-auth password included)"
            )
        extra = recovery_args(env, args)
        directory = recovery_directory(env, args)
        if directory is not None and directory.is_dir():
            recovery.discard_unfinished(directory)
        gc_threshold = settings.GC_YOUNG_THRESHOLD.read(env)
        metrics_on = settings.METRICS_ENABLED.read(env)
        port = settings.BYTEWAX_DATAFLOW_API_PORT.read(env) if metrics_on else 0
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if metrics_on:
        os.environ.setdefault("BYTEWAX_DATAFLOW_API_ENABLED", "true")
        problem = port_problem(str(port))
        if problem:
            # Bytewax's server thread would panic and the pipeline run on without /metrics.
            print(f"configuration error: BYTEWAX_DATAFLOW_API_PORT: {problem}", file=sys.stderr)  # noqa: T201
            return 2
    try:
        preflight.check(config, recovery=directory is not None)
    except PreflightError as exc:
        print(f"preflight failed: {exc}", file=sys.stderr)  # noqa: T201
        return 3
    tune_gc(gc_threshold)
    sys.argv = ["bytewax.run", FLOW, *extra, *args]
    try:
        runpy.run_module("bytewax.run", run_name="__main__", alter_sys=True)
    except PipelineError as exc:
        log.error("pipeline stopped: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
