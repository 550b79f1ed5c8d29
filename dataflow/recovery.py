"""The Bytewax recovery directory: creating it, what a restart resumes from, and discarding
the snapshots of epochs that no execution finished.

Bytewax 0.21 keeps recovery state in SQLite partitions (`part-<i>.sqlite3`). Each
execution writes, at the close of every epoch, the snapshot of each state key activated in
that epoch (`snaps`), then each worker's frontier (`fronts`). A restart resumes from the
*resume epoch*: over the workers of the newest execution, the smallest of each worker's
furthest frontier (or the execution's own resume epoch for a worker that wrote none); each
state key restores its newest snapshot *before* that epoch.

A process killed after writing some snapshots of an epoch, but before its frontier passed
it, leaves those snapshots behind, at epochs the next execution runs again. Bytewax does not
remove them: the next execution overwrites only the keys it activates in the same epoch,
and epochs are cut by wall-clock time, so it may well activate other keys (a dedup entry of
a later time slot that the killed run had reached, a session shard that saw no event this
time). Once the next execution's frontier passes that epoch, a later restart restores the
killed run's snapshot for such a key, which holds events from beyond the offsets the restart
reads from: the dedup entry drops them as duplicates, and their counts are lost.

So before Bytewax starts, `discard_unfinished` deletes every snapshot at or after the resume
epoch: none of them is restored by this execution, and every one of them was written by an
execution that did not finish its epoch. That needs the frontiers of every worker, so every
partition: with a share of the partitions (a volume per process) the resume epoch is not
known here, and nothing is deleted (the warning says so).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dataflow.errors import ConfigError

log = logging.getLogger(__name__)

PARTITION_GLOB = "part-*.sqlite3"
FIRST_EPOCH = 1
"""The resume epoch of a directory no execution has written to (Bytewax 0.21: epoch 0
carries the initial routing messages)."""
BUSY_TIMEOUT_MS = 5_000


def has_partitions(directory: Path) -> bool:
    """Whether `directory` holds recovery partitions (`part-<i>.sqlite3`)."""
    return directory.is_dir() and any(directory.glob(PARTITION_GLOB))


def ensure_recovery_dir(directory: Path, partitions: int) -> None:
    """Create `partitions` empty recovery partitions unless the directory already has some."""
    # Imported here: the Rust extension is only needed once a recovery directory is used.
    from bytewax.recovery import init_db_dir  # noqa: PLC0415

    if has_partitions(directory):
        return
    directory.mkdir(parents=True, exist_ok=True)
    init_db_dir(directory, partitions)  # type: ignore[no-untyped-call]
    log.info("created recovery partitions", extra={"dir": str(directory), "count": partitions})


@dataclass(frozen=True)
class ResumePoint:
    execution: int | None
    """The newest execution (`exs.ex_num`), None when none has started."""
    epoch: int
    """The epoch the next execution starts at; snapshots before it are restored."""


@dataclass(frozen=True)
class Discarded:
    resume: ResumePoint
    snapshots: int
    """Snapshots deleted: at or after the resume epoch."""


@contextmanager
def partitions(directory: Path) -> Iterator[list[sqlite3.Connection]]:
    """Every SQLite file of `directory`, open read-write (as Bytewax opens them: every
    `*.sqlite3`). Read-write on purpose: after a SIGKILL the WAL index needs recovering
    before its newest frames are visible, which a read-only connection cannot do."""
    dbs: list[sqlite3.Connection] = []
    try:
        for path in sorted(directory.glob("*.sqlite3")):
            db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
            dbs.append(db)
        yield dbs
    finally:
        for db in dbs:
            db.close()


def held_partitions(dbs: Sequence[sqlite3.Connection]) -> tuple[set[int], int | None]:
    """The partition indexes these files hold, and the partition count they record."""
    held: set[int] = set()
    counts: set[int] = set()
    for db in dbs:
        for index, count in db.execute("SELECT part_index, part_count FROM parts"):
            held.add(int(index))
            counts.add(int(count))
    if len(counts) > 1:
        raise ConfigError(
            "RECOVERY_DIR",
            f"the recovery partitions disagree on their count ({sorted(counts)}): they come "
            "from different recovery directories; rebuild into a new prefix with "
            "`python -m dataflow.tools.replay` and a new directory (docs/operations.md, "
            "'Replay into a new version')",
        )
    return held, next(iter(counts), None)


def resume_point(dbs: Sequence[sqlite3.Connection]) -> ResumePoint:
    """Where Bytewax 0.21 resumes, from every partition's progress tables (the query of
    `RecoveryPart.resume_from`)."""
    executions = {
        int(ex): (int(workers), int(epoch))
        for db in dbs
        for ex, workers, epoch in db.execute("SELECT ex_num, worker_count, resume_epoch FROM exs")
    }
    if not executions:
        return ResumePoint(None, FIRST_EPOCH)
    newest = max(executions)
    workers, start = executions[newest]
    furthest = dict.fromkeys(range(workers), start)
    for db in dbs:
        rows = db.execute(
            "SELECT worker_index, worker_frontier FROM fronts WHERE ex_num = ?", (newest,)
        )
        for worker, frontier in rows:
            furthest[int(worker)] = max(furthest.get(int(worker), start), int(frontier))
    return ResumePoint(newest, min(furthest.values()))


def discard_unfinished(directory: Path) -> Discarded | None:
    """Delete the snapshots no restart may restore (see the module doc); None when the
    directory does not hold every partition, so the resume epoch is not known here."""
    try:
        return _discard_unfinished(directory)
    except sqlite3.Error as exc:
        raise ConfigError(
            "RECOVERY_DIR",
            f"cannot prepare the recovery partitions in {directory} ({exc}): is another "
            "pipeline process using them, or is it not a Bytewax recovery directory?",
        ) from exc


def _discard_unfinished(directory: Path) -> Discarded | None:
    with partitions(directory) as dbs:
        if not dbs:
            return None
        held, count = held_partitions(dbs)
        if count is None or held != set(range(count)):
            log.warning(
                "this process holds %s of %s recovery partitions: snapshots that a killed "
                "execution left in epochs it did not finish cannot be found here and are "
                "left to Bytewax (docs/operations.md, 'Known limits')",
                len(held),
                count,
                extra={"dir": str(directory)},
            )
            return None
        resume = resume_point(dbs)
        deleted = 0
        for db in dbs:
            with db:  # one transaction per partition
                cursor = db.execute("DELETE FROM snaps WHERE snap_epoch >= ?", (resume.epoch,))
                deleted += max(cursor.rowcount, 0)
    discarded = Discarded(resume, deleted)
    if deleted:
        log.info(
            "discarded %s recovery snapshots of epochs a killed execution did not finish",
            deleted,
            extra={"dir": str(directory), "resume_epoch": resume.epoch, "snapshots": deleted},
        )
    return discarded
