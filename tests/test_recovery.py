"""The recovery directory (`dataflow.recovery`): the resume point as Bytewax 0.21 computes it,
and the snapshots of unfinished epochs discarded before a restart, against real Bytewax
partitions and a real (small) Bytewax dataflow."""

from __future__ import annotations

import logging
import pickle
import sqlite3
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflow.errors import ConfigError
from dataflow.recovery import (
    FIRST_EPOCH,
    Discarded,
    ResumePoint,
    discard_unfinished,
    partitions,
    resume_point,
)


def make_dir(tmp_path: Path, count: int = 2) -> Path:
    directory = tmp_path / "recovery"
    directory.mkdir()
    init_db_dir(directory, count)  # type: ignore[no-untyped-call]
    return directory


def execute(db: sqlite3.Connection, sql: str, *rows: tuple[object, ...]) -> None:
    with db:
        db.executemany(sql, rows)


def add_execution(db: sqlite3.Connection, ex: int, workers: int, resume: int) -> None:
    execute(
        db,
        "INSERT INTO exs (ex_num, worker_count, resume_epoch) VALUES (?, ?, ?)",
        (ex, workers, resume),
    )


def add_front(db: sqlite3.Connection, ex: int, worker: int, frontier: int) -> None:
    execute(
        db,
        "INSERT INTO fronts (ex_num, worker_index, worker_frontier) VALUES (?, ?, ?)",
        (ex, worker, frontier),
    )


def add_snaps(db: sqlite3.Connection, *keyed: tuple[str, int]) -> None:
    execute(
        db,
        "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?, ?, ?, ?)",
        *((f"flow.{key}", key, epoch, pickle.dumps(epoch)) for key, epoch in keyed),
    )


def snaps(directory: Path) -> set[tuple[str, int]]:
    with partitions(directory) as dbs:
        return {
            (key, epoch)
            for db in dbs
            for key, epoch in db.execute("SELECT state_key, snap_epoch FROM snaps")
        }


# --------------------------------------------------------------------------- the resume point


def test_a_directory_no_execution_wrote_to_resumes_at_the_first_epoch(tmp_path: Path) -> None:
    directory = make_dir(tmp_path)
    with partitions(directory) as dbs:
        assert resume_point(dbs) == ResumePoint(None, FIRST_EPOCH)


def test_the_resume_epoch_is_the_slowest_workers_furthest_frontier_of_the_newest_execution(
    tmp_path: Path,
) -> None:
    directory = make_dir(tmp_path)
    with partitions(directory) as (one, two):
        add_execution(one, 0, 2, 1)
        add_front(one, 0, 0, 9)
        add_front(two, 0, 1, 9)
        add_execution(two, 1, 3, 9)  # the newest: three workers, resumed at 9
        add_front(one, 1, 0, 12)
        add_front(two, 1, 1, 11)  # worker 2 wrote no frontier: it counts as 9
        assert resume_point((one, two)) == ResumePoint(1, 9)
        add_front(one, 1, 2, 14)
        assert resume_point((one, two)) == ResumePoint(1, 11)


def test_an_execution_killed_before_any_frontier_resumes_where_it_started(tmp_path: Path) -> None:
    directory = make_dir(tmp_path)
    with partitions(directory) as (one, two):
        add_execution(one, 0, 1, 1)
        add_front(two, 0, 0, 5)
        add_execution(two, 1, 1, 5)
        assert resume_point((one, two)) == ResumePoint(1, 5)


# --------------------------------------------------------------------------- discarding


def test_snapshots_at_or_after_the_resume_epoch_are_discarded_and_the_rest_kept(
    tmp_path: Path,
) -> None:
    directory = make_dir(tmp_path)
    with partitions(directory) as (one, two):
        add_execution(one, 0, 1, 1)
        add_front(two, 0, 0, 5)
        add_execution(two, 1, 1, 5)  # killed: it wrote snapshots of epochs 5 and 6 only
        add_snaps(one, ("a", 2), ("a", 4), ("b", 5), ("c", 6))
        add_snaps(two, ("d", 3), ("d", 5), ("e", 7))
    discarded = discard_unfinished(directory)
    assert discarded is not None
    assert discarded.resume == ResumePoint(1, 5)
    assert discarded.snapshots == 4
    assert snaps(directory) == {("a", 2), ("a", 4), ("d", 3)}
    assert discard_unfinished(directory) == Discarded(ResumePoint(1, 5), 0)  # nothing left


def test_a_share_of_the_partitions_is_left_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = make_dir(tmp_path, count=2)
    with partitions(directory) as (one, _):
        add_execution(one, 0, 1, 1)
        add_snaps(one, ("a", 3))
    (directory / "part-1.sqlite3").unlink()  # the other process's volume holds it
    with caplog.at_level(logging.WARNING, logger="dataflow.recovery"):
        assert discard_unfinished(directory) is None
    assert snaps(directory) == {("a", 3)}
    assert "holds 1 of 2 recovery partitions" in caplog.text


def test_partitions_of_two_directories_fail_naming_the_setting(tmp_path: Path) -> None:
    directory = make_dir(tmp_path, count=2)
    other = tmp_path / "other"
    other.mkdir()
    init_db_dir(other, 3)  # type: ignore[no-untyped-call]
    (directory / "part-1.sqlite3").unlink()
    (other / "part-2.sqlite3").rename(directory / "part-2.sqlite3")
    with pytest.raises(ConfigError, match=r"^RECOVERY_DIR: .*disagree on their count"):
        discard_unfinished(directory)


# --------------------------------------------------------------------------- with Bytewax


def counting_flow(items: list[object], out: list[tuple[str, int]]) -> Dataflow:
    def count(total: int | None, _item: str) -> tuple[int, int]:
        total = (total or 0) + 1
        return total, total

    flow = Dataflow("flow")
    keyed = op.key_on("key", op.input("inp", flow, TestingSource(items)), lambda k: k)
    op.output("out", op.stateful_map("count", keyed, count), TestingSink(out))
    return flow


@pytest.mark.parametrize("discard", [False, True], ids=["as-bytewax-leaves-it", "discarded"])
def test_a_killed_runs_snapshot_of_an_unfinished_epoch_is_restored_later_unless_discarded(
    tmp_path: Path, discard: bool
) -> None:
    """Bytewax 0.21 restores, two restarts later, a snapshot a killed execution wrote in an
    epoch the next execution ran again without touching that key; discarding before the
    restart keeps only what the finished epochs hold."""
    directory = make_dir(tmp_path, count=1)
    config = RecoveryConfig(str(directory))
    items: list[object] = ["a", TestingSource.EOF(), *["a"] * 6, TestingSource.EOF(), "b"]
    out: list[tuple[str, int]] = []

    def run() -> None:
        run_main(counting_flow(items, out), epoch_interval=timedelta(0), recovery_config=config)

    run()  # the first execution counts one "a" and ends
    with partitions(directory) as (db,):
        start = resume_point([db])
        assert start.execution is not None
        (step,) = db.execute("SELECT step_id FROM snaps WHERE state_key = 'a'").fetchone()
        # What a second execution leaves when killed after writing the snapshots of its
        # second epoch, before its frontier passed it: it had counted "b" 100 times.
        add_execution(db, start.execution + 1, 1, start.epoch)
        execute(
            db,
            "INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) VALUES (?, ?, ?, ?)",
            (step, "b", start.epoch + 1, pickle.dumps(100)),
        )
    if discard:
        assert discard_unfinished(directory) is not None
    run()  # the restart counts six more "a" over several epochs, none of them "b"
    with partitions(directory) as (db,):
        assert resume_point([db]).epoch > start.epoch + 1, "the restart passed that epoch"
    run()  # the next restart reads "b"
    assert out[-1] == ("b", 1 if discard else 101)
    assert [n for key, n in out if key == "a"] == [1, 2, 3, 4, 5, 6, 7]


def test_a_file_that_is_no_recovery_partition_fails_naming_the_setting(tmp_path: Path) -> None:
    directory = make_dir(tmp_path, count=1)
    sqlite3.connect(directory / "notes.sqlite3").close()
    with pytest.raises(ConfigError, match=r"^RECOVERY_DIR: cannot prepare .*no such table"):
        discard_unfinished(directory)
