"""Logs: JSON on request, one line per notable event, never a secret."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import pytest

from dataflow import flow
from dataflow.logs import (
    LIBRARY_LOGGERS,
    BurstLog,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    librdkafka_log_level,
)

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
    libraries = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lib.level, lib.filters[:]) for lib in libraries]
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for lib, (lib_level, filters) in zip(libraries, saved, strict=True):
        lib.setLevel(lib_level)
        lib.filters[:] = filters


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
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "svc")
    built = flow._flow_from_env()
    assert built.flow_id == "search_features"
    logged = capsys.readouterr().err
    lines = logged.splitlines()
    [start] = [i for i, line in enumerate(lines) if "starting search_features" in line]
    for secret in ("redis-s3cret", "kafka-hunter2", "os-pa55", "os-other-pa55"):
        assert secret not in logged
    if fmt == "json":  # one JSON object
        config = json.loads(lines[start])["config"]
        assert config["kafka"]["topics"] == ["events"]
        assert config["redis"]["url"] == "redis://:****@cache:6379/0"  # where it goes shows
        assert config["opensearch"]["url"] == "https://admin:****@search:9200"
        assert config["kafka"]["sasl_password"] == "********"  # noqa: S105
        return
    # A short block: the line, then one indented line per section.
    block = [lines[start]]
    block += [line for line in lines[start + 1 :] if line.startswith("  ")][:5]
    assert lines[start].endswith("starting search_features")
    sections = [line.split(":", 1)[0].strip() for line in block[1:5]]
    assert sections == ["kafka", "redis", "opensearch", "features"]
    assert "  kafka: brokers=localhost:9092 topics=events " in "\n".join(block)
    assert "sasl_username=svc sasl_password=********" in block[1]
    assert " url=redis://:****@cache:6379/0 " in block[2]
    assert block[3].startswith("  opensearch: url=https://admin:****@search:9200 ")
    assert "features: doc.alpha=1.0 doc.beta=20.0 " in block[4]
    assert all(len(line) < 400 for line in block)


def test_the_text_block_leaves_out_empty_values() -> None:
    line = TextFormatter().format(
        record("starting", config={"kafka": {"topics": ["a", "b"], "sasl_username": ""},
                                   "shards": 4, "empty": {}, "none": None}, count=1)
    )  # fmt: skip
    assert line.split("\n") == [
        line.split("\n")[0],
        "  kafka: topics=a,b",
        "  shards=4",
    ]
    assert line.split("\n")[0].endswith("WARNING dataflow.test: starting count=1")


@pytest.mark.parametrize(
    ("level", "library", "librdkafka"),
    [("DEBUG", logging.DEBUG, 7), ("INFO", logging.WARNING, 4), ("ERROR", logging.ERROR, 3)],
)
def test_library_loggers_stay_at_warning_unless_debug(
    level: str, library: int, librdkafka: int, restore_logging: None
) -> None:
    configure_logging(level, "text")
    for name in LIBRARY_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == library
    assert librdkafka_log_level() == librdkafka


def test_opensearch_request_lines_are_dropped_unless_debug(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    request = "%s %s [status:%s request:%.3fs]"
    configure_logging("INFO", "text")
    configure_logging("INFO", "text")  # twice, as dataflow.run and the flow both do
    opensearch = logging.getLogger("opensearch")
    opensearch.warning(request, "GET", "http://os:9200/_alias/doc-features", 404, 0.004)
    opensearch.warning("Undecodable raw error response from server: %s", "boom")
    assert capsys.readouterr().err.count("\n") == 1  # the request line is gone, not the other
    configure_logging("DEBUG", "text")
    opensearch.info(request, "POST", "http://os:9200/_bulk", 200, 0.01)
    assert "[status:200 request:0.010s]" in capsys.readouterr().err


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
