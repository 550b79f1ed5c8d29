"""`dataflow.run`'s start-up checks."""

import gc
import socket
from pathlib import Path

import pytest

from dataflow.run import main, port_problem, recovery_directory, tune_gc


def test_a_listening_port_is_reported_and_a_free_one_is_not() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("0.0.0.0", 0))  # noqa: S104
        taken.listen()
        port = taken.getsockname()[1]
        problem = port_problem(str(port))
        assert problem is not None and "not free" in problem
    assert port_problem(str(port)) is None  # closed again: free (even if in TIME_WAIT)


def test_a_malformed_port_is_reported() -> None:
    assert port_problem("http") == "must be a port number (got 'http')"
    assert port_problem("70000") is not None


def test_redis_max_retries_is_deprecated_with_a_warning_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setenv("REDIS_MAX_RETRIES", "3")
    monkeypatch.delenv("RECOVERY_DIR", raising=False)
    monkeypatch.setenv("METRICS_ENABLED", "true")
    monkeypatch.setenv("BYTEWAX_DATAFLOW_API_PORT", "0")  # invalid: stops before any service
    try:
        assert main([]) == 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "REDIS_MAX_RETRIES is deprecated and ignored" in err
    assert "REDIS_OUTAGE_EXIT_SECONDS" in err


def test_the_collector_runs_rarely_and_skips_what_was_alive_at_start() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(50_000)
        assert gc.get_threshold() == (50_000, 20, 100)
        assert gc.get_freeze_count() > 1_000  # modules, functions, classes of the start-up
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_bad_gc_threshold_fails_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GC_YOUNG_THRESHOLD", "10")
    assert main([]) == 2
    assert "GC_YOUNG_THRESHOLD" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, [], None),
        ({"RECOVERY_DIR": "/r/env"}, [], "/r/env"),
        ({"BYTEWAX_RECOVERY_DIRECTORY": "/r/bytewax"}, [], "/r/bytewax"),
        ({"RECOVERY_DIR": "/r/env"}, ["-w", "2", "-r", "/r/flag"], "/r/flag"),
        ({}, ["--recovery-directory", "/r/long"], "/r/long"),
        ({"BYTEWAX_RECOVERY_DIRECTORY": "/r/bytewax"}, ["--recovery-directory=/r/eq"], "/r/eq"),
    ],
)
def test_the_recovery_directory_is_the_one_bytewax_will_use(
    env: dict[str, str], argv: list[str], expected: str | None
) -> None:
    found = recovery_directory(env, argv)
    assert (str(found) if found is not None else None) == expected


def test_recovery_partitions_of_two_directories_fail_at_start_naming_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bytewax.recovery import init_db_dir

    for name, count in (("mine", 2), ("other", 3)):
        (tmp_path / name).mkdir()
        init_db_dir(tmp_path / name, count)  # type: ignore[no-untyped-call]
    (tmp_path / "other" / "part-2.sqlite3").rename(tmp_path / "mine" / "part-2.sqlite3")
    assert main(["-r", str(tmp_path / "mine")]) == 2
    assert "RECOVERY_DIR: the recovery partitions disagree" in capsys.readouterr().err
