"""Logging set-up: human-readable lines, or one JSON object per line (`LOG_FORMAT=json`).

Call sites pass structured context with `extra={...}`; the JSON formatter emits it as
fields, the text formatter appends it as `key=value`, and a mapping (the configuration at
start) as a short indented block under the line, one line per section. Secrets never reach
a log call: configuration is logged through `Config.describe()`, which masks them.

One line per notable event, not per message or per batch: what repeats every batch (dead
letters) goes through `BurstLog`, which summarises a burst in a line or two.

Libraries stay quiet unless `LOG_LEVEL=DEBUG`: their loggers (`LIBRARY_LOGGERS`) are set
to WARNING, opensearch-py's line per HTTP request is dropped (failed ones included: the
sinks and the preflight report the failures that matter, once each), and librdkafka, which
prints to stderr by itself, gets the matching `log_level` through
`KafkaSettings.client_config()` (`librdkafka_log_level`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`; a mapping-valued field (the configuration)
    follows as an indented block, one line per section."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        flat = {k: v for k, v in extras.items() if not isinstance(v, Mapping)}
        if flat:
            line += " " + " ".join(f"{k}={v}" for k, v in flat.items())
        for value in extras.values():
            if isinstance(value, Mapping):
                line += "".join(f"\n  {text}" for text in block(value))
        return line


def block(mapping: Mapping[str, object]) -> list[str]:
    """A nested mapping as short lines: `section: key=value ...` for each mapping inside
    (deeper levels joined with dots), then the loose values on one line. Empty values are
    left out; lists are comma-joined."""
    loose = " ".join(_pairs("", {k: v for k, v in mapping.items() if not isinstance(v, Mapping)}))
    sections = {k: _pairs("", v) for k, v in mapping.items() if isinstance(v, Mapping)}
    lines = [f"{key}: {' '.join(pairs)}" for key, pairs in sections.items() if pairs]
    return [*lines, loose] if loose else lines


def _pairs(prefix: str, mapping: Mapping[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.extend(_pairs(f"{prefix}{key}.", value))
        elif isinstance(value, list | tuple):
            if value:
                out.append(f"{prefix}{key}={','.join(map(str, value))}")
        elif value not in ("", None):
            out.append(f"{prefix}{key}={value}")
    return out


LIBRARY_LOGGERS = ("opensearch", "urllib3", "elastic_transport", "kafka")
"""Loggers of the libraries under the sinks: WARNING unless `LOG_LEVEL=DEBUG`."""

# opensearch-py logs every request with this format: INFO when it succeeds, WARNING (with a
# traceback for a refused connection) when it fails.
_REQUEST_LINE = "%s %s [status:%s request:%.3fs]"


class _NoRequestLines(logging.Filter):
    """Drops opensearch-py's line per HTTP request."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _REQUEST_LINE


_SYSLOG_LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def librdkafka_log_level() -> int:
    """librdkafka's `log_level` (syslog numbering) for the `kafka` logger's level: 4
    (warnings and worse) unless `LOG_LEVEL=DEBUG` configured it lower."""
    level = logging.getLogger("kafka").getEffectiveLevel()
    return next((v for k, v in sorted(_SYSLOG_LEVELS.items()) if level <= k), 2)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    debug = root.level <= logging.DEBUG
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.setLevel(logging.NOTSET if debug else max(logging.WARNING, root.level))
        for old in [f for f in library.filters if isinstance(f, _NoRequestLines)]:
            library.removeFilter(old)
        if not debug:
            library.addFilter(_NoRequestLines())


class BurstLog:
    """At most one log line per `interval` seconds for an event that comes in bursts.

    The first occurrence after a quiet `interval` is logged at once (a burst starts); the
    ones after it are counted, and one summary line (count, distinct kinds, window) follows
    `interval` seconds after the previous line, from a timer, or at `flush()` (call it on
    close). The exact numbers are in the metrics; the log says when, and what kind.
    """

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        kinds_field: str = "kinds",
        interval: float = 30.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.message = message
        self.kinds_field = kinds_field
        self.interval = interval
        self.level = level
        self.clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._kinds: set[str] = set()
        self._since: float | None = None
        self._last_line: float | None = None
        self._timer: threading.Timer | None = None

    def add(self, count: int, kinds: Iterable[str] = ()) -> bool:
        """Record `count` occurrences; returns whether a line was logged now."""
        with self._lock:
            now = self.clock()
            if self._since is None:
                self._since = now
            self._count += count
            self._kinds.update(kinds)
            if self._last_line is None or now - self._last_line >= self.interval:
                self._emit(now)
                return True
            if self._timer is None:
                self._timer = threading.Timer(
                    self.interval - (now - self._last_line), self._summarise
                )
                self._timer.daemon = True
                self._timer.start()
            return False

    def flush(self) -> None:
        """Log whatever was counted since the last line, now."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._count:
                self._emit(self.clock())

    def _summarise(self) -> None:
        with self._lock:
            self._timer = None
            if self._count:
                self._emit(self.clock())

    def _emit(self, now: float) -> None:
        since = now if self._since is None else self._since
        self.logger.log(
            self.level,
            self.message,
            extra={
                "count": self._count,
                self.kinds_field: sorted(self._kinds),
                "window_seconds": round(now - since, 3),
            },
        )
        self._count = 0
        self._kinds = set()
        self._since = None
        self._last_line = now
