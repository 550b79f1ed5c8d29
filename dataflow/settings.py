"""Every environment variable the package reads: one table, one row per variable.

A row (`Setting`) holds the variable's name, its default (as text, the way it would be set),
the parser that turns the text into a typed value or raises ValueError saying what is wrong,
numeric bounds where it has them, a one-line doc and whether it is secret. The rest derives
from the rows:

- `dataflow.config.Config.from_env` reads its settings through them, and the dataclasses in
  `dataflow.config` take their defaults from them;
- `dataflow.run` (recovery, snapshots, metrics), the demo, the generator's defaults and
  `FeatureReader.from_url` read their variables through them;
- README.md's configuration table is generated from them:
  `python -m dataflow.settings --markdown` prints it, `--write README.md` replaces it;
- tests/deploy checks docker-compose.yml and k8s/ against them.

`Setting.read` raises `ConfigError(variable, problem)`; a secret's value is masked there too.
Every secret row has a companion row, `<NAME>_FILE`: a file that holds the value instead (a
Kubernetes Secret or a Docker secret mounted as a file); `Setting.read` takes the value from
there when it is set, and the `Secret` remembers which of the two it came from.
This module imports nothing heavy: the event generator reads its defaults here.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

from dataflow.core.families import DEFAULT_REFERENCE_CTR
from dataflow.errors import ConfigError

T = TypeVar("T")


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks. `source` is the variable
    it was read from (`REDIS_PASSWORD` or `REDIS_PASSWORD_FILE`), for messages that say where
    to look; it is not part of the value (equality ignores it)."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "") -> None:
        self._value = value
        self.source = source

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def mask_url(url: str) -> str:
    """The URL with any password replaced by `****` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:****@{netloc}"))


def masked(text: str) -> str:
    """A secret's text as an error message may show it: a URL keeps all but its password."""
    if "://" in text:
        try:
            return mask_url(text)
        except ValueError:  # too malformed to tell the password apart: show none of it
            pass
    return "********" if text else ""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: how to read it, its default, and what it is for."""

    name: str
    default: str  # as it would be written in the environment
    parse: Callable[[str], T]  # raises ValueError saying what is wrong
    doc: str
    section: str
    values: str  # what the variable accepts, for people (the README's column)
    low: float | None = None
    high: float | None = None
    secret: bool = False

    @property
    def value(self) -> T:
        """The default, parsed."""
        return self.parse(self.default)

    @property
    def file_variable(self) -> str:
        """A secret's companion variable, the path of a file holding the value instead
        (`REDIS_PASSWORD_FILE`); empty for every other row."""
        return f"{self.name}_FILE" if self.secret else ""

    def read(self, env: Mapping[str, str] | None = None) -> T:
        """The variable from `env` (default: the process environment), else the default. A
        secret comes from the file its `_FILE` companion names when that is set (setting both
        is an error); surrounding whitespace and the final newline are dropped, as from the
        variable."""
        e = os.environ if env is None else env
        raw, source = e.get(self.name), self.name
        if self.secret:
            raw, source = self._from_file(e, raw)
        try:
            value = self.parse(self.default if raw is None else raw.strip())
        except ValueError as exc:
            shown = masked(raw) if self.secret and raw is not None else raw
            raise ConfigError(source, f"{exc} (got {shown!r})") from None
        if isinstance(value, Secret):
            return cast(T, Secret(value.get(), source))
        return value

    def _from_file(self, env: Mapping[str, str], raw: str | None) -> tuple[str | None, str]:
        """(the text, the variable it came from): the file's when `_FILE` is set."""
        variable = self.file_variable
        path = (env.get(variable) or "").strip()
        if not path:
            return raw, self.name
        if raw is not None and raw.strip():
            raise ConfigError(variable, f"{self.name} is set too; set one of the two")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(variable, f"cannot read {path!r} ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(variable, f"{path!r} is not UTF-8 text") from None
        if not text.strip():
            raise ConfigError(variable, f"{path!r} is empty")
        return text, variable

    def is_set(self, env: Mapping[str, str] | None = None) -> bool:
        """Whether the variable is in `env` (default: the process environment) at all."""
        return self.name in (os.environ if env is None else env)

    def display(self, text: str) -> str:
        """`text`, a value of this variable, as logs and errors may show it: a secret is
        masked (a URL keeps all but its password)."""
        return masked(text) if self.secret else text

    def text(self, env: Mapping[str, str] | None = None) -> str:
        """The variable as set (stripped), else the default; *not* validated, for tools
        that only pass the text on (the generator's --kafka default)."""
        raw = (os.environ if env is None else env).get(self.name)
        return self.default if raw is None else raw.strip()


_ROWS: list[Setting[Any]] = []


def _add(row: Setting[T]) -> Setting[T]:
    _ROWS.append(row)
    return row


# --- parsers ----------------------------------------------------------------------------

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")
_INDEX_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,254}$")


def _any_text(text: str) -> str:
    return text


def _broker(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("each broker must be host:port")
    return text


def _topic(text: str) -> str:
    if not _TOPIC_RE.match(text):
        raise ValueError("a Kafka topic name is 1..249 of [A-Za-z0-9._-]")
    return text


def _prefix(text: str) -> str:
    if not _PREFIX_RE.match(text):
        raise ValueError("a key prefix is 1..64 of [A-Za-z0-9_.-] (no ':')")
    return text


def _redis_url(text: str) -> str:
    if urlsplit(text).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return text


def _http_url_or_empty(text: str) -> str:
    if text and (urlsplit(text).scheme not in ("http", "https") or not urlsplit(text).netloc):
        raise ValueError("must be an http:// or https:// URL, or empty to disable")
    return text


def _index(text: str) -> str:
    if not _INDEX_RE.match(text):
        raise ValueError("an index name is lowercase [a-z0-9._-], not starting with - . or _")
    return text


def _index_or_empty(text: str) -> str:
    return _index(text) if text else text


def _rate(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{text} is not a rate in (0, 1]")
    return text


def _number_text(value: float) -> str:
    """A bound for people: digits grouped, no `.0` on whole numbers."""
    if isinstance(value, int) or value.is_integer():
        return f"{int(value):,}"
    return f"{value:,}"


# --- kinds of row -----------------------------------------------------------------------


def _text(
    section: str,
    name: str,
    default: str,
    doc: str,
    *,
    check: Callable[[str], str] = _any_text,
    values: str = "text",
) -> Setting[str]:
    return _add(Setting(name, default, check, doc, section, values))


def _secret(
    section: str,
    name: str,
    default: str,
    doc: str,
    *,
    check: Callable[[str], str] = _any_text,
    values: str = "text",
) -> Setting[Secret]:
    def parse(text: str) -> Secret:
        return Secret(check(text))

    return _add(Setting(name, default, parse, doc, section, values, secret=True))


def _file_of(row: Setting[Secret]) -> Setting[str]:
    """The `_FILE` companion of a secret row (`Setting.read` of the secret reads it)."""
    doc = (
        f"A file holding {row.name} instead (a mounted Kubernetes or Docker secret); "
        "setting both is an error."
    )
    return _add(
        Setting(row.file_variable, "", _any_text, doc, row.section, "a file path, or empty")
    )


def _list(
    section: str, name: str, default: str, doc: str, *, check: Callable[[str], str], values: str
) -> Setting[tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(check(part.strip()) for part in text.split(",") if part.strip())
        if not items:
            raise ValueError("needs at least one comma-separated value")
        return items

    return _add(Setting(name, default, parse, doc, section, values))


def _integer(
    section: str, name: str, default: int, bounds: tuple[int, int], doc: str
) -> Setting[int]:
    low, high = bounds

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("must be a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    values = f"whole number, {_number_text(low)} to {_number_text(high)}"
    return _add(Setting(name, str(default), parse, doc, section, values, low, high))


def _number(
    section: str, name: str, default: float, bounds: tuple[float, float], doc: str
) -> Setting[float]:
    low, high = bounds

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number") from None
        if not low <= value <= high:  # also rejects NaN
            raise ValueError(f"must be between {low} and {high}")
        return value

    values = f"number, {_number_text(low)} to {_number_text(high)}"
    return _add(Setting(name, repr(default), parse, doc, section, values, low, high))


def _flag(section: str, name: str, default: bool, doc: str) -> Setting[bool]:
    def parse(text: str) -> bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("must be true or false")

    text = "true" if default else "false"
    return _add(Setting(name, text, parse, doc, section, "`true` or `false`"))


def _choice(
    section: str, name: str, default: str, options: tuple[str, ...], doc: str
) -> Setting[str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    values = ", ".join(f"`{option}`" for option in options)
    return _add(Setting(name, default, parse, doc, section, values))


def _prior(section: str, family: str, what: str) -> tuple[Setting[float], Setting[float]]:
    alpha = _number(
        section, f"SMOOTHING_{family}_ALPHA", 1.0, (0.0, 1e9), f"Smoothing prior α of {what}."
    )
    beta = _number(
        section,
        f"SMOOTHING_{family}_BETA",
        20.0,
        (0.0, 1e9),
        f"Smoothing prior β of {what} (α + β must be positive).",
    )
    return alpha, beta


# --- the table --------------------------------------------------------------------------
# Sections order the README table; `Config.from_env` reads every row outside the last two.

KAFKA = "Kafka input and dead letters"
REDIS = "Redis feature store"
FEATURES = "Features"
STATE = "State layout (fixed for the life of a recovery directory)"
OPENSEARCH = "OpenSearch rank_feature indices"
LOGGING = "Logging"
RUN = "Recovery and metrics (`dataflow.run`)"
DEMO = "Demo (`make run`)"

KAFKA_BROKERS = _list(
    KAFKA,
    "KAFKA_BROKERS",
    "localhost:9092",
    "Brokers to bootstrap from.",
    check=_broker,
    values="`host:port`, comma-separated",
)
KAFKA_TOPICS = _list(
    KAFKA,
    "KAFKA_TOPICS",
    "search-events",
    "Input topics.",
    check=_topic,
    values="topic names, comma-separated",
)
KAFKA_DLQ_TOPIC = _text(
    KAFKA,
    "KAFKA_DLQ_TOPIC",
    "search-events-dlq",
    "Dead-letter topic (must not be an input topic).",
    check=_topic,
    values="a topic name",
)
KAFKA_STATE_TOPIC = _text(
    KAFKA,
    "KAFKA_STATE_TOPIC",
    "search-features-state",
    "Compacted topic that holds the feature shards' recovery segments, created on first "
    "use (only with recovery; docs/operations.md, 'Recovery state').",
    check=_topic,
    values="a topic name",
)
KAFKA_BATCH_SIZE = _integer(
    KAFKA, "KAFKA_BATCH_SIZE", 1000, (1, 100_000), "Messages per consumer poll per partition."
)
KAFKA_STOP_AT_END = _flag(
    KAFKA,
    "KAFKA_STOP_AT_END",
    False,
    "Stop at the end of the topics (backfills, tests, the demo).",
)
KAFKA_SECURITY_PROTOCOL = _choice(
    KAFKA,
    "KAFKA_SECURITY_PROTOCOL",
    "PLAINTEXT",
    ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "librdkafka `security.protocol` of every Kafka client.",
)
KAFKA_SASL_MECHANISM = _text(
    KAFKA, "KAFKA_SASL_MECHANISM", "", "SASL mechanism (e.g. `SCRAM-SHA-512`); empty: no SASL."
)
KAFKA_SASL_USERNAME = _text(KAFKA, "KAFKA_SASL_USERNAME", "", "SASL user name.")
KAFKA_SASL_PASSWORD = _secret(KAFKA, "KAFKA_SASL_PASSWORD", "", "SASL password.")
KAFKA_SASL_PASSWORD_FILE = _file_of(KAFKA_SASL_PASSWORD)
KAFKA_SSL_CA_LOCATION = _text(
    KAFKA,
    "KAFKA_SSL_CA_LOCATION",
    "",
    "CA certificates (PEM) that sign the brokers' certificates, for `SSL` and `SASL_SSL`; "
    "empty: the system's trusted CAs. The broker's name must be on its certificate.",
    values="a file path, or empty",
)

REDIS_URL = _secret(
    REDIS,
    "REDIS_URL",
    "redis://localhost:6379/0",
    "The feature store.",
    check=_redis_url,
    values="`redis://`, `rediss://` or `unix://` URL",
)
REDIS_URL_FILE = _file_of(REDIS_URL)
REDIS_PASSWORD = _secret(
    REDIS,
    "REDIS_PASSWORD",
    "",
    "Password of the user named in REDIS_URL when the URL holds none (then the URL is no "
    "secret); empty: the URL's own password, if any.",
)
REDIS_PASSWORD_FILE = _file_of(REDIS_PASSWORD)
REDIS_CA_FILE = _text(
    REDIS,
    "REDIS_CA_FILE",
    "",
    "CA certificates (PEM) that sign the server certificate of a `rediss://` REDIS_URL; "
    "empty: the system's trusted CAs. The server's name in the URL must be on its certificate.",
    values="a file path, or empty",
)
FEATURE_PREFIX = _text(
    REDIS,
    "FEATURE_PREFIX",
    "feat",
    "Key prefix, i.e. the feature-store version (`feat_v2` for a rebuild); "
    "also the prefix `FeatureReader.from_url` reads.",
    check=_prefix,
    values="1 to 64 of `A-Za-z0-9_.-`",
)
FEATURE_TTL_SECONDS = _integer(
    REDIS,
    "FEATURE_TTL_SECONDS",
    35 * 86_400,
    (86_400, 10 * 365 * 86_400),
    "TTL of every key: set when it is created, refreshed by its daily re-statement "
    "(the default is 35 days).",
)
REDIS_PIPELINE_KEYS = _integer(
    REDIS, "REDIS_PIPELINE_KEYS", 500, (1, 100_000), "Keys per Redis pipeline round trip."
)
# Deprecated: a count of retries stopped the pipeline within seconds of a Redis restart.
# Still validated (a deployment that sets it keeps starting), otherwise ignored; dataflow.run
# logs a warning when it is set.
REDIS_MAX_RETRIES = _integer(
    REDIS,
    "REDIS_MAX_RETRIES",
    8,
    (0, 1000),
    "Deprecated and ignored (a warning at start when set): the sink no longer gives up after "
    "a number of retries; it waits for Redis, see REDIS_OUTAGE_EXIT_SECONDS.",
)
REDIS_BACKOFF_MAX_SECONDS = _number(
    REDIS,
    "REDIS_BACKOFF_MAX_SECONDS",
    5.0,
    (0.0, 600.0),
    "Longest wait between two retries of a Redis write.",
)
REDIS_OUTAGE_EXIT_SECONDS = _integer(
    REDIS,
    "REDIS_OUTAGE_EXIT_SECONDS",
    0,
    (0, 7 * 86_400),
    "How long a Redis write may keep failing before the pipeline stops (exit status 1) for a "
    "supervisor to restart it; 0: never, the pipeline waits for Redis and resumes by itself.",
)
FEATURE_FLUSH_INTERVAL_MS = _integer(
    REDIS,
    "FEATURE_FLUSH_INTERVAL_MS",
    1000,
    (0, 600_000),
    "How often a shard writes its changed keys (0: after every batch).",
)
RESTATE_KEYS_PER_SECOND = _integer(
    REDIS,
    "RESTATE_KEYS_PER_SECOND",
    50_000,
    (0, 100_000_000),
    "How fast the keys are re-stated after a new day or to repair a store that lost data, "
    "in all shards together (0: all at once; ignored when FEATURE_FLUSH_INTERVAL_MS is 0).",
)
STORE_CHECK_SECONDS = _number(
    REDIS,
    "STORE_CHECK_SECONDS",
    2.0,
    (0.0, 3_600.0),
    "How often the Redis sink checks its marker (`FEATURE_PREFIX:__generation__`); when Redis "
    "has lost it, every live key is re-written (docs/operations.md, 'A Redis that comes back "
    "empty'). 0: no marker, no check, no repair.",
)

SMOOTHING_DOC_ALPHA, SMOOTHING_DOC_BETA = _prior(FEATURES, "DOC", "document CTRs")
SMOOTHING_QD_ALPHA, SMOOTHING_QD_BETA = _prior(FEATURES, "QD", "query-document CTRs")
SMOOTHING_AC_ALPHA, SMOOTHING_AC_BETA = _prior(FEATURES, "AC", "autocomplete select rates")
SMOOTHING_ACQ_ALPHA, SMOOTHING_ACQ_BETA = _prior(FEATURES, "ACQ", "autocomplete-link rates")
SMOOTHING_DOC_PRIOR, SMOOTHING_QD_PRIOR, SMOOTHING_AC_PRIOR = (
    _choice(
        FEATURES,
        f"SMOOTHING_{family}_PRIOR",
        "fixed",
        ("fixed", "fitted"),
        f"The prior of {what}: `fixed` (the α, β above) or `fitted` each day from the "
        "family's own keys (docs/contract.md §4.6; the α, β above stay the fallback).",
    )
    for family, what in (
        ("DOC", "document CTRs"),
        ("QD", "query-document CTRs"),
        ("AC", "autocomplete select rates"),
    )
)
PRIOR_FIT_SAMPLE = _integer(
    FEATURES,
    "PRIOR_FIT_SAMPLE",
    16,
    (1, 4_096),
    "A fitted prior is fitted on one key in this many of its family (a stable hash).",
)
PRIOR_FIT_MIN_KEYS = _integer(
    FEATURES,
    "PRIOR_FIT_MIN_KEYS",
    100,
    (2, 1_000_000_000),
    "Fewer sampled keys with enough impressions than this: the fixed prior is used.",
)
PRIOR_FIT_MIN_IMPRESSIONS = _integer(
    FEATURES,
    "PRIOR_FIT_MIN_IMPRESSIONS",
    20,
    (1, 1_000_000_000),
    "A key takes part in a fit with at least this many impressions in the fit's 30 days.",
)
PRIOR_FIT_GRACE_SECONDS = _integer(
    FEATURES,
    "PRIOR_FIT_GRACE_SECONDS",
    600,
    (0, 86_400),
    "How far past a fit's window every partition must have read before the fit is made.",
)
POPULARITY_WEIGHT_CLICK = _number(
    FEATURES, "POPULARITY_WEIGHT_CLICK", 1.0, (0.0, 1e6), "Popularity weight of a click."
)
POPULARITY_WEIGHT_IMPRESSION = _number(
    FEATURES, "POPULARITY_WEIGHT_IMPRESSION", 0.0, (0.0, 1e6), "Popularity weight of an impression."
)
POPULARITY_WEIGHT_LONG_CLICK = _number(
    FEATURES, "POPULARITY_WEIGHT_LONG_CLICK", 0.0, (0.0, 1e6), "Popularity weight of a long click."
)
LONG_DWELL_MS = _integer(
    FEATURES,
    "LONG_DWELL_MS",
    30_000,
    (0, 86_400_000),
    "A dwell at least this long is a long click.",
)
COEC_REFERENCE_CTR = _list(
    FEATURES,
    "COEC_REFERENCE_CTR",
    ",".join(repr(ctr) for ctr in DEFAULT_REFERENCE_CTR),
    "Reference CTR of result positions 1, 2, …, for expected clicks and COEC; the last value "
    "holds for every position from there on.",
    check=_rate,
    values="rates in (0, 1], comma-separated",
)
COEC_PRIOR = _number(
    FEATURES,
    "COEC_PRIOR",
    1.0,
    (0.001, 1e6),
    "Smoothing of coec_30d = (clicks + COEC_PRIOR) / (expected clicks + COEC_PRIOR).",
)
FUTURE_TOLERANCE_SECONDS = _integer(
    FEATURES,
    "FUTURE_TOLERANCE_SECONDS",
    600,
    (0, 7 * 86_400),
    "Events further ahead of the wall clock are dead-lettered.",
)
ACQ_LINK_GRACE_SECONDS = _integer(
    FEATURES,
    "ACQ_LINK_GRACE_SECONDS",
    600,
    (0, 86_400),
    "How late a search or click may reach the autocomplete-link join and still link.",
)
NATIVE_CORE = _flag(
    FEATURES,
    "NATIVE_CORE",
    True,
    "Apply updates, render keys and pack Redis writes in the compiled core (the same bytes "
    "as the pure-Python one, several times faster); false runs the pure-Python core.",
)
SNAPSHOT_TAIL_BYTES = _integer(
    FEATURES,
    "SNAPSHOT_TAIL_BYTES",
    65_536,
    (0, 64 * 1024 * 1024),
    "Changed key states a feature shard's snapshot keeps inline before it writes them to "
    "KAFKA_STATE_TOPIC as a segment: what every snapshot may rewrite, against how many "
    "segments a restore reads.",
)

LINK_SHARDS = _integer(
    STATE, "LINK_SHARDS", 64, (1, 65_536), "Session shards of the autocomplete-link join."
)
FEATURE_SHARDS = _integer(STATE, "FEATURE_SHARDS", 128, (1, 65_536), "Feature state shards.")
DEDUP_SHARDS = _integer(STATE, "DEDUP_SHARDS", 16, (1, 4096), "Dedup shards per slot.")

OPENSEARCH_URL = _secret(
    OPENSEARCH,
    "OPENSEARCH_URL",
    "http://localhost:9200",
    "The support-index cluster; empty disables the sink.",
    check=_http_url_or_empty,
    values="`http://` or `https://` URL, or empty",
)
OPENSEARCH_URL_FILE = _file_of(OPENSEARCH_URL)
OPENSEARCH_INDEX = _text(
    OPENSEARCH,
    "OPENSEARCH_INDEX",
    "doc-features",
    "Document popularity index (an alias).",
    check=_index,
    values="an index name",
)
OPENSEARCH_AC_INDEX = _text(
    OPENSEARCH,
    "OPENSEARCH_AC_INDEX",
    "ac-features",
    "Autocomplete candidate index.",
    check=_index,
    values="an index name",
)
OPENSEARCH_DOCS_INDEX = _text(
    OPENSEARCH,
    "OPENSEARCH_DOCS_INDEX",
    "",
    "Optional: also update the popularity fields on the search index itself.",
    check=_index_or_empty,
    values="an index name, or empty",
)
OPENSEARCH_USERNAME = _text(OPENSEARCH, "OPENSEARCH_USERNAME", "", "Basic-auth user.")
OPENSEARCH_PASSWORD = _secret(OPENSEARCH, "OPENSEARCH_PASSWORD", "", "Basic-auth password.")
OPENSEARCH_PASSWORD_FILE = _file_of(OPENSEARCH_PASSWORD)
OPENSEARCH_CA_FILE = _text(
    OPENSEARCH,
    "OPENSEARCH_CA_FILE",
    "",
    "CA certificates (PEM) that sign the certificate of an `https://` OPENSEARCH_URL; empty: "
    "opensearch-py's default bundle (certifi). The server's name in the URL must be on it.",
    values="a file path, or empty",
)
OPENSEARCH_VERIFY_CERTS = _flag(
    OPENSEARCH,
    "OPENSEARCH_VERIFY_CERTS",
    True,
    "Verify the certificate and the name of an `https://` OPENSEARCH_URL; `false` only for a "
    "throw-away cluster (a WARNING at start says so).",
)
OPENSEARCH_MIN_CHANGE = _number(
    OPENSEARCH,
    "OPENSEARCH_MIN_CHANGE",
    0.05,
    (0.0, 10.0),
    "Relative change that makes a document worth re-sending.",
)
OPENSEARCH_BULK_DOCS = _integer(
    OPENSEARCH, "OPENSEARCH_BULK_DOCS", 500, (1, 100_000), "Documents per bulk request."
)
OPENSEARCH_BULK_BYTES = _integer(
    OPENSEARCH,
    "OPENSEARCH_BULK_BYTES",
    5 * 1024 * 1024,
    (1024, 100 * 1024 * 1024),
    "Bytes per bulk request (the default is 5 MiB).",
)
OPENSEARCH_MAX_PENDING = _integer(
    OPENSEARCH,
    "OPENSEARCH_MAX_PENDING",
    1_000_000,
    (1, 100_000_000),
    "Pending documents kept while OpenSearch is away.",
)
OPENSEARCH_PARTITIONS = _integer(
    OPENSEARCH, "OPENSEARCH_PARTITIONS", 4, (1, 1024), "Sink partitions (parallel writers)."
)
OPENSEARCH_TIMEOUT_SECONDS = _number(
    OPENSEARCH, "OPENSEARCH_TIMEOUT_SECONDS", 10.0, (0.1, 600.0), "Request timeout."
)
OPENSEARCH_MAX_RETRIES = _integer(
    OPENSEARCH,
    "OPENSEARCH_MAX_RETRIES",
    5,
    (0, 1000),
    "Retries of a failed bulk request before the pipeline stops for recovery.",
)
OPENSEARCH_BACKOFF_MAX_SECONDS = _number(
    OPENSEARCH,
    "OPENSEARCH_BACKOFF_MAX_SECONDS",
    30.0,
    (0.0, 3600.0),
    "Longest wait between two retries of a bulk request.",
)

LOG_LEVEL = _choice(
    LOGGING, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), "Lowest level logged."
)
LOG_FORMAT = _choice(
    LOGGING, "LOG_FORMAT", "text", ("text", "json"), "`json`: one JSON object per line."
)

RECOVERY_DIR = _text(
    RUN,
    "RECOVERY_DIR",
    "",
    "Recovery directory, partitions created on first use; empty runs without recovery "
    "(`make run` uses `.recovery/demo`).",
    values="a directory, or empty",
)
RECOVERY_PARTITIONS = _integer(
    RUN, "RECOVERY_PARTITIONS", 1, (1, 1024), "Recovery partitions created on first use."
)
SNAPSHOT_INTERVAL_SECONDS = _integer(
    RUN,
    "SNAPSHOT_INTERVAL_SECONDS",
    10,
    (1, 3600),
    "Epoch length (`-s`): snapshot work against replay length.",
)
# 0 deletes superseded snapshots at once; set it to how often the recovery directory is
# backed up, so a backup never references a deleted snapshot.
RECOVERY_BACKUP_INTERVAL_SECONDS = _integer(
    RUN,
    "RECOVERY_BACKUP_INTERVAL_SECONDS",
    0,
    (0, 7 * 86_400),
    "How long Bytewax keeps superseded snapshots (`-b`); match the backup interval.",
)
METRICS_ENABLED = _flag(
    RUN, "METRICS_ENABLED", True, "Serve `/metrics` (the Bytewax dataflow API server)."
)
# Bytewax's own variable: its server reads it too, with the same default.
BYTEWAX_DATAFLOW_API_PORT = _integer(
    RUN,
    "BYTEWAX_DATAFLOW_API_PORT",
    3030,
    (1, 65_535),
    "Port of `/metrics` (Bytewax's setting, checked to be free before the run).",
)

# Python's default (700) runs a young collection every 700 container allocations, and with
# them full collections whose cost grows with the live state: every set, list and dict of
# the state shards is walked element by element. Measured: docs/benchmarks.md ("Garbage
# collection").
GC_YOUNG_THRESHOLD = _integer(
    RUN,
    "GC_YOUNG_THRESHOLD",
    50_000,
    (100, 10_000_000),
    "Allocations between young garbage collections (Python's default: 700); older "
    "generations at 20× and 100× that.",
)
DEMO_EVENTS = _integer(
    DEMO, "DEMO_EVENTS", 20_000, (0, 100_000_000), "Generated events the demo produces per run."
)

SETTINGS: tuple[Setting[Any], ...] = tuple(_ROWS)
BY_NAME: Mapping[str, Setting[Any]] = {row.name: row for row in SETTINGS}


# --- the README table -------------------------------------------------------------------

README_BEGIN = (
    "<!-- generated from dataflow/settings.py by `python -m dataflow.settings --write "
    "README.md`; edit the table there, not here -->"
)
README_END = "<!-- end of the generated settings table -->"


def markdown() -> str:
    """README.md's configuration table: a bold row per section, a row per variable."""
    lines = ["| variable | default | values | meaning |", "|---|---|---|---|"]
    section = ""
    for row in SETTINGS:
        if row.section != section:
            section = row.section
            lines.append(f"| **{section}** | | | |")
        default = f"`{row.default}`" if row.default else "empty"
        doc = f"{row.doc} Secret: masked in logs and errors." if row.secret else row.doc
        lines.append(f"| `{row.name}` | {default} | {row.values} | {doc} |")
    return "\n".join(lines) + "\n"


def with_table(readme: str) -> str:
    """`readme` with the text between the two markers replaced by `markdown()`."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"no {README_BEGIN!r} ... {README_END!r} block to replace")
    head = readme[: begin + len(README_BEGIN)]
    return f"{head}\n{markdown()}{readme[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dataflow.settings",
        description="The environment variables the pipeline reads (dataflow/settings.py).",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--markdown", action="store_true", help="print the README table")
    mode.add_argument(
        "--write", metavar="README", type=Path, help="replace the generated table in README"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    path: Path = args.write
    try:
        path.write_text(with_table(path.read_text()))
    except (OSError, ValueError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
