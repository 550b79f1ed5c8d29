"""Logs: JSON on request, one line per notable event, never a secret."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import pytest

from dataflow import flow
from dataflow.logs import BurstLog, JsonFormatter, TextFormatter, configure_logging

SECRETS = {
    "REDIS_URL": "redis://:redis-s3cret@cache:6379/0",
    "KAFKA_SASL_PASSWORD": "kafka-hunter2",
    "OPENSEARCH_URL": "https://admin:os-pa55@search:9200",
    "OPENSEARCH_PASSWORD": "os-other-pa55",
}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("dataflow.test", logging.WARNING, __file__, 1, message, None, None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_the_extra_fields() -> None:
    line = JsonFormatter().format(record("dead letters written", count=3, reasons=["x"]))
    assert "\n" not in line
    payload = json.loads(line)
    assert payload["message"] == "dead letters written"
    assert payload["level"] == "WARNING"
    assert payload["logger"] == "dataflow.test"
    assert (payload["count"], payload["reasons"]) == (3, ["x"])
    assert payload["ts"].endswith("+00:00")


def test_text_lines_append_the_extra_fields() -> None:
    line = TextFormatter().format(record("redis write failed, retrying", attempt=2))
    assert line.endswith("WARNING dataflow.test: redis write failed, retrying attempt=2")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_start_line_shows_the_config_with_every_secret_masked(
    fmt: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    for name, value in {**SECRETS, "LOG_FORMAT": fmt, "KAFKA_TOPICS": "events"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    built = flow._flow_from_env()
    assert built.flow_id == "search_features"
    logged = capsys.readouterr().err
    [line] = [line for line in logged.splitlines() if "starting search_features" in line]
    for secret in ("redis-s3cret", "kafka-hunter2", "os-pa55", "os-other-pa55"):
        assert secret not in logged
    assert "redis://:****@cache:6379/0" in line  # where it goes is still visible
    if fmt == "json":
        config = json.loads(line)["config"]
        assert config["kafka"]["topics"] == ["events"]
        assert config["opensearch"]["url"] == "https://admin:****@search:9200"


def test_configure_logging_writes_json_to_stderr(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", "json")
    logging.getLogger("dataflow.x").info("hello", extra={"n": 1})
    logging.getLogger("dataflow.x").debug("not at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_logs_its_start_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    burst = BurstLog(logging.getLogger("dataflow.test"), "dead letters written",
                     kinds_field="reasons", interval=30, clock=clock)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dataflow.test"):
        assert burst.add(2, ["invalid_json"])  # a burst starts: logged at once
        for _ in range(50):  # then one batch a second
            clock.now += 1
            burst.add(1, ["unknown_type"])
        burst.flush()
        burst.flush()  # nothing left: no line
    lines = [(r.count, r.reasons, r.window_seconds) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [
        (2, ["invalid_json"], 0.0),
        (30, ["unknown_type"], 29.0),  # the 30th second: a summary of the last 30 batches
        (20, ["unknown_type"], 19.0),  # the rest, at flush
    ]


def test_a_summary_comes_by_itself_after_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    burst = BurstLog(logging.getLogger("dataflow.test"), "dead letters written", interval=0.2)
    with caplog.at_level(logging.WARNING, logger="dataflow.test"):
        burst.add(1, ["a"])
        assert not burst.add(4, ["b"])  # counted, not logged yet
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [r.count for r in caplog.records] == [1, 4]  # type: ignore[attr-defined]
