"""The replay command's pure parts: the progress line and the recovery-directory guard."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from bytewax.recovery import init_db_dir

from dataflow.errors import PipelineError
from dataflow.kafka import source
from dataflow.tools.replay import (
    MARKER,
    Progress,
    ProgressPrinter,
    ProgressSampler,
    main,
    prepare_recovery_dir,
)


def test_progress_line_has_rate_offsets_left_and_eta() -> None:
    progress = Progress("feat_v2", smoothing=1.0)
    assert "starting" in progress.line(100.0, 0, None)
    line = progress.line(102.0, 20_000, 50_000)
    assert line == (
        "replay feat_v2: 20,000 events read, 10,000 events/s, offsets left 50,000, ETA 0:00:05"
    )
    assert progress.line(104.0, 40_000, 10_000).endswith("offsets left 10,000, ETA 0:00:01")
    # A sample the brokers did not answer keeps the last figure.
    assert progress.line(105.0, 50_000, None).endswith("offsets left 10,000, ETA 0:00:01")
    assert progress.line(106.0, 60_000, 0).endswith("offsets left 0, caught up")


def test_progress_before_the_first_lag_reading_says_it_does_not_know() -> None:
    progress = Progress("feat_v2")
    progress.line(0.0, 0, None)
    assert progress.line(1.0, 500, None).endswith("offsets left ?, ETA ?")


def test_progress_rate_is_smoothed() -> None:
    progress = Progress("v2", smoothing=0.5)
    progress.line(0.0, 0, 10)
    progress.line(1.0, 1_000, 10)  # 1000/s
    line = progress.line(2.0, 1_000, 7_000)  # 0/s now: smoothed to 500/s, not 0
    assert "500 events/s" in line and "ETA 0:00:14" in line


def test_progress_printer_reports_the_end() -> None:
    lines: list[str] = []
    samples = iter([(0.0, 100.0), (3_000.0, None)])
    printer = ProgressPrinter("v2", 3600, sample=lambda: next(samples), out=lines.append)
    printer.start()
    printer.stop(finished=True)
    assert "starting" in lines[0]
    assert (
        lines[-1].startswith("replay v2: 3,000 events read in ") and "offsets left 0" in lines[-1]
    )


def test_offsets_left_are_end_offsets_minus_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    positions = source.Positions()
    monkeypatch.setattr("dataflow.tools.replay.POSITIONS", positions)
    asked: list[set[tuple[str, int]]] = []

    def ends(parts: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        asked.append(set(parts))
        return {("t", 0): 100, ("t", 1): 50}

    sampler = ProgressSampler(ends)
    assert sampler()[1] is None  # nothing assigned yet: not asked
    assert asked == []
    positions.set("t", 0, 40)
    positions.set("t", 1, 60)  # a stale end offset never makes it negative
    assert sampler()[1] == 60
    assert asked == [{("t", 0), ("t", 1)}]


def test_fresh_directory_gets_a_marker_and_is_not_a_resume(tmp_path: Path) -> None:
    directory = tmp_path / "replay"
    assert prepare_recovery_dir(directory, "feat_v2", ["events"]) is False
    marker = json.loads((directory / MARKER).read_text())
    assert (marker["prefix"], marker["topics"]) == ("feat_v2", ["events"])
    # Partitions made by the first run: the next run of the same replay resumes.
    init_db_dir(directory, 1)
    assert prepare_recovery_dir(directory, "feat_v2", ["events"]) is True


def test_another_pipelines_recovery_directory_is_refused(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)  # e.g. the live pipeline's snapshots: no replay marker
    with pytest.raises(PipelineError, match="no replay wrote"):
        prepare_recovery_dir(tmp_path, "feat_v2", ["events"])


def test_a_replay_of_another_prefix_or_topic_is_refused(tmp_path: Path) -> None:
    prepare_recovery_dir(tmp_path, "feat_v2", ["events"])
    with pytest.raises(PipelineError, match="holds a replay of 'feat_v2'"):
        prepare_recovery_dir(tmp_path, "feat_v3", ["events"])
    with pytest.raises(PipelineError, match="from topics"):
        prepare_recovery_dir(tmp_path, "feat_v2", ["other"])


def test_replaying_into_the_served_prefix_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("FEATURE_PREFIX", "feat")
    assert main(["--prefix", "feat", "--recovery-dir", str(tmp_path / "r")]) == 2
    assert "is the FEATURE_PREFIX this environment serves" in capsys.readouterr().err
    assert main(["--drop-prefix", "feat"]) == 2
    assert "that is the version this environment serves" in capsys.readouterr().err
    assert main(["--prefix", "bad:prefix"]) == 2
    assert "--prefix" in capsys.readouterr().err
