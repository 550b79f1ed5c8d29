"""Typed, validated configuration from environment variables.

`Config.from_env()` reads every setting once at start; a missing or malformed value raises
`ConfigError` naming the variable, so a bad deployment fails before it reads a message.
Secrets are `Secret` objects whose repr is masked; `Config.describe()` is safe to log.
The README's configuration table lists the same variables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from dataflow.core.families import FeatureParams
from dataflow.core.smoothing import Prior
from dataflow.errors import ConfigError

T = TypeVar("T")

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._\-]{1,249}$")
_INDEX_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,254}$")


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

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


@dataclass(frozen=True)
class KafkaSettings:
    brokers: tuple[str, ...] = ("localhost:9092",)
    topics: tuple[str, ...] = ("search-events",)
    dlq_topic: str = "search-events-dlq"
    batch_size: int = 1000
    stop_at_end: bool = False
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: Secret = field(default_factory=lambda: Secret(""))

    def client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by the consumer, the DLQ producer and admin calls."""
        config: dict[str, str | int | float | bool] = {"bootstrap.servers": ",".join(self.brokers)}
        if self.security_protocol != "PLAINTEXT":
            config["security.protocol"] = self.security_protocol
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get()
        return config


@dataclass(frozen=True)
class RedisSettings:
    url: Secret = field(default_factory=lambda: Secret("redis://localhost:6379/0"))
    prefix: str = "feat"
    ttl_seconds: int = 35 * 86_400
    pipeline_keys: int = 500
    max_retries: int = 8
    backoff_max_seconds: float = 5.0


@dataclass(frozen=True)
class OpenSearchSettings:
    url: Secret = field(default_factory=lambda: Secret("http://localhost:9200"))
    index: str = "doc-features"
    ac_index: str = "ac-features"
    docs_index: str = ""
    username: str = ""
    password: Secret = field(default_factory=lambda: Secret(""))
    min_change: float = 0.05
    bulk_docs: int = 500
    bulk_bytes: int = 5 * 1024 * 1024
    max_pending: int = 1_000_000
    partitions: int = 4
    timeout_seconds: float = 10.0
    max_retries: int = 5
    backoff_max_seconds: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class Config:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    opensearch: OpenSearchSettings = field(default_factory=OpenSearchSettings)
    features: FeatureParams = field(default_factory=FeatureParams)
    future_tolerance_ms: int = 600_000
    flush_interval_ms: int = 1000
    link_grace_ms: int = 600_000
    link_shards: int = 64
    feature_shards: int = 128
    dedup_shards: int = 16
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read and validate every setting; raises ConfigError naming the variable."""
        r = _Reader(os.environ if env is None else env)
        kafka = KafkaSettings(
            brokers=r.strings("KAFKA_BROKERS", "localhost:9092", _broker),
            topics=r.strings("KAFKA_TOPICS", "search-events", _topic),
            dlq_topic=r.get("KAFKA_DLQ_TOPIC", "search-events-dlq", _topic),
            batch_size=r.integer("KAFKA_BATCH_SIZE", 1000, 1, 100_000),
            stop_at_end=r.flag("KAFKA_STOP_AT_END", False),
            security_protocol=r.choice(
                "KAFKA_SECURITY_PROTOCOL",
                "PLAINTEXT",
                ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
            ),
            sasl_mechanism=r.get("KAFKA_SASL_MECHANISM", "", str),
            sasl_username=r.get("KAFKA_SASL_USERNAME", "", str),
            sasl_password=Secret(r.get("KAFKA_SASL_PASSWORD", "", str)),
        )
        if kafka.dlq_topic in kafka.topics:
            raise ConfigError("KAFKA_DLQ_TOPIC", "must not be one of KAFKA_TOPICS (a loop)")
        redis = RedisSettings(
            url=Secret(r.get("REDIS_URL", "redis://localhost:6379/0", _redis_url)),
            prefix=r.get("FEATURE_PREFIX", "feat", _prefix),
            ttl_seconds=r.integer("FEATURE_TTL_SECONDS", 35 * 86_400, 86_400, 10 * 365 * 86_400),
            pipeline_keys=r.integer("REDIS_PIPELINE_KEYS", 500, 1, 100_000),
            max_retries=r.integer("REDIS_MAX_RETRIES", 8, 0, 1000),
            backoff_max_seconds=r.number("REDIS_BACKOFF_MAX_SECONDS", 5.0, 0.0, 600.0),
        )
        opensearch = OpenSearchSettings(
            url=Secret(r.get("OPENSEARCH_URL", "http://localhost:9200", _http_url_or_empty)),
            index=r.get("OPENSEARCH_INDEX", "doc-features", _index),
            ac_index=r.get("OPENSEARCH_AC_INDEX", "ac-features", _index),
            docs_index=r.get("OPENSEARCH_DOCS_INDEX", "", _index_or_empty),
            username=r.get("OPENSEARCH_USERNAME", "", str),
            password=Secret(r.get("OPENSEARCH_PASSWORD", "", str)),
            min_change=r.number("OPENSEARCH_MIN_CHANGE", 0.05, 0.0, 10.0),
            bulk_docs=r.integer("OPENSEARCH_BULK_DOCS", 500, 1, 100_000),
            bulk_bytes=r.integer("OPENSEARCH_BULK_BYTES", 5 * 1024 * 1024, 1024, 100 * 1024 * 1024),
            max_pending=r.integer("OPENSEARCH_MAX_PENDING", 1_000_000, 1, 100_000_000),
            partitions=r.integer("OPENSEARCH_PARTITIONS", 4, 1, 1024),
            timeout_seconds=r.number("OPENSEARCH_TIMEOUT_SECONDS", 10.0, 0.1, 600.0),
            max_retries=r.integer("OPENSEARCH_MAX_RETRIES", 5, 0, 1000),
            backoff_max_seconds=r.number("OPENSEARCH_BACKOFF_MAX_SECONDS", 30.0, 0.0, 3600.0),
        )
        features = FeatureParams(
            doc=r.prior("DOC"),
            qd=r.prior("QD"),
            ac=r.prior("AC"),
            acq=r.prior("ACQ"),
            weight_click=r.number("POPULARITY_WEIGHT_CLICK", 1.0, 0.0, 1e6),
            weight_impression=r.number("POPULARITY_WEIGHT_IMPRESSION", 0.0, 0.0, 1e6),
            weight_long_click=r.number("POPULARITY_WEIGHT_LONG_CLICK", 0.0, 0.0, 1e6),
            long_dwell_ms=r.integer("LONG_DWELL_MS", 30_000, 0, 86_400_000),
        )
        return cls(
            kafka=kafka,
            redis=redis,
            opensearch=opensearch,
            features=features,
            future_tolerance_ms=1000 * r.integer("FUTURE_TOLERANCE_SECONDS", 600, 0, 7 * 86_400),
            flush_interval_ms=r.integer("FEATURE_FLUSH_INTERVAL_MS", 1000, 0, 600_000),
            link_grace_ms=1000 * r.integer("ACQ_LINK_GRACE_SECONDS", 600, 0, 86_400),
            link_shards=r.integer("LINK_SHARDS", 64, 1, 65_536),
            feature_shards=r.integer("FEATURE_SHARDS", 128, 1, 65_536),
            dedup_shards=r.integer("DEDUP_SHARDS", 16, 1, 4096),
            log_level=r.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=r.choice("LOG_FORMAT", "text", ("text", "json")),
        )

    def describe(self) -> dict[str, Any]:
        """Every setting as plain data, secrets masked: what the start-up log line shows."""
        described: dict[str, Any] = _describe(self)
        return described


def _describe(obj: Any) -> Any:
    if isinstance(obj, Secret):
        return mask_url(obj.get()) if "://" in obj.get() else repr(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _describe(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_describe(v) for v in obj]
    return obj


class _Reader:
    """Reads one variable at a time and turns any parse problem into a ConfigError."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None else value.strip()

    def get(self, name: str, default: str, parse: Callable[[str], T]) -> T:
        raw = self._raw(name)
        try:
            return parse(default if raw is None else raw)
        except ValueError as exc:
            raise ConfigError(name, f"{exc} (got {raw!r})") from None

    def strings(self, name: str, default: str, parse: Callable[[str], str]) -> tuple[str, ...]:
        def parse_list(text: str) -> tuple[str, ...]:
            items = tuple(parse(part.strip()) for part in text.split(",") if part.strip())
            if not items:
                raise ValueError("needs at least one comma-separated value")
            return items

        return self.get(name, default, parse_list)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        def parse(text: str) -> int:
            try:
                value = int(text)
            except ValueError:
                raise ValueError("must be a whole number") from None
            if not low <= value <= high:
                raise ValueError(f"must be between {low} and {high}")
            return value

        return self.get(name, str(default), parse)

    def number(self, name: str, default: float, low: float, high: float) -> float:
        def parse(text: str) -> float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError("must be a number") from None
            if not low <= value <= high:  # also rejects NaN
                raise ValueError(f"must be between {low} and {high}")
            return value

        return self.get(name, repr(default), parse)

    def flag(self, name: str, default: bool) -> bool:
        def parse(text: str) -> bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("must be true or false")

        return self.get(name, "true" if default else "false", parse)

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        def parse(text: str) -> str:
            if text not in options:
                raise ValueError(f"must be one of {', '.join(options)}")
            return text

        return self.get(name, default, parse)

    def prior(self, family: str) -> Prior:
        alpha = self.number(f"SMOOTHING_{family}_ALPHA", 1.0, 0.0, 1e9)
        beta = self.number(f"SMOOTHING_{family}_BETA", 20.0, 0.0, 1e9)
        if alpha + beta <= 0:
            raise ConfigError(f"SMOOTHING_{family}_BETA", "alpha + beta must be positive")
        return Prior(alpha, beta)


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
