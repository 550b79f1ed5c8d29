"""Typed events and the decoder that turns any byte string into one, or into a rejection.

Contract §1 and §5 (docs/contract.md). `decode` never raises: bad input is data. The wall
clock for the future-timestamp rule is passed in, so the decoder stays pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

import orjson

from dataflow.core import native

MAX_VALUE_BYTES: Final = 64 * 1024
MAX_EVENT_ID_CHARS: Final = 128
MAX_SESSION_ID_CHARS: Final = 128
MAX_TEXT_CHARS: Final = 1024
MAX_DOC_ID_BYTES: Final = 256
MAX_DOC_IDS: Final = 1000
MAX_CANDIDATES: Final = 50

Reason = Literal["invalid_json", "invalid_event", "unknown_type", "future_timestamp"]
REASONS: Final[tuple[Reason, ...]] = (
    "invalid_json",
    "invalid_event",
    "unknown_type",
    "future_timestamp",
)

EVENT_TYPES: Final = (
    "search_impression",
    "click",
    "dwell",
    "ac_impression",
    "ac_select",
)

# Unicode category Cc is exactly these two ranges.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class SearchImpression:
    TYPE: ClassVar[str] = "search_impression"

    event_id: str
    ts: int
    session_id: str | None
    query: str  # raw; "" when the event had none
    doc_ids: tuple[str, ...]
    origin: int = field(default=0, compare=False)
    """Not data: the Kafka partition it was read from (`intake.origin_id`)."""
    clock: int = field(default=0, compare=False)
    """Not data: its partition's clock when it was read (largest `ts` so far, itself
    included); the link join expires sessions by it."""


@dataclass(frozen=True, slots=True)
class Click:
    TYPE: ClassVar[str] = "click"

    event_id: str
    ts: int
    session_id: str | None
    query: str
    doc_id: str
    position: int | None
    origin: int = field(default=0, compare=False)
    """Not data: the Kafka partition it was read from (`intake.origin_id`)."""
    clock: int = field(default=0, compare=False)
    """Not data: its partition's clock when it was read (largest `ts` so far, itself
    included); the link join expires sessions by it."""


@dataclass(frozen=True, slots=True)
class Dwell:
    TYPE: ClassVar[str] = "dwell"

    event_id: str
    ts: int
    session_id: str | None
    query: str
    doc_id: str
    dwell_ms: int
    origin: int = field(default=0, compare=False)
    """Not data: the Kafka partition it was read from (`intake.origin_id`)."""
    clock: int = field(default=0, compare=False)
    """Not data: its partition's clock when it was read (largest `ts` so far, itself
    included); the link join expires sessions by it."""


@dataclass(frozen=True, slots=True)
class AcImpression:
    TYPE: ClassVar[str] = "ac_impression"

    event_id: str
    ts: int
    session_id: str | None
    prefix: str
    candidates: tuple[str, ...]
    origin: int = field(default=0, compare=False)
    """Not data: the Kafka partition it was read from (`intake.origin_id`)."""
    clock: int = field(default=0, compare=False)
    """Not data: its partition's clock when it was read (largest `ts` so far, itself
    included); the link join expires sessions by it."""


@dataclass(frozen=True, slots=True)
class AcSelect:
    TYPE: ClassVar[str] = "ac_select"

    event_id: str
    ts: int
    session_id: str | None
    prefix: str
    candidate: str
    origin: int = field(default=0, compare=False)
    """Not data: the Kafka partition it was read from (`intake.origin_id`)."""
    clock: int = field(default=0, compare=False)
    """Not data: its partition's clock when it was read (largest `ts` so far, itself
    included); the link join expires sessions by it."""


Event = SearchImpression | Click | Dwell | AcImpression | AcSelect


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message is not an event. `detail` names the field for a human."""

    reason: Reason
    detail: str


class _Invalid(Exception):
    """Internal: unwinds validation to the single place that builds the Rejection."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def decode(
    value: bytes | None,
    *,
    now_ms: int,
    future_tolerance_ms: int,
    origin: int = 0,
    clock: int = 0,
) -> Event | Rejection:
    """Decode and validate one Kafka message value.

    Rule order (docs/contract.md §5): size, JSON, object, type, common fields, per-type
    fields, future timestamp.
    """
    if value is None or len(value) == 0:
        return Rejection("invalid_json", "empty message value")
    if len(value) > MAX_VALUE_BYTES:
        return Rejection(
            "invalid_event", f"value is {len(value)} bytes, over the {MAX_VALUE_BYTES} limit"
        )
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Rejection("invalid_json", f"not a UTF-8 JSON document: {exc}")
    if not isinstance(obj, dict):
        return Rejection("invalid_event", f"value is a JSON {type(obj).__name__}, not an object")
    compiled = native.core
    if compiled is not None:
        # A valid event of the common shape, built in C; the rest (every rejection) is
        # decided below, with the messages of the rules.
        fast: Event | None = compiled.event_from(
            obj, origin, clock, now_ms + future_tolerance_ms, _TYPES
        )
        if fast is not None:
            return fast

    kind = obj.get("type")
    if not isinstance(kind, str):
        return Rejection("invalid_event", "type: required string is missing or not a string")
    builder = _BUILDERS.get(kind)
    if builder is None:
        return Rejection("unknown_type", f"type: {kind[:64]!r} is not one of {EVENT_TYPES}")

    try:
        event = builder(obj, origin, clock)
    except _Invalid as exc:
        return Rejection("invalid_event", exc.detail)

    if event.ts > now_ms + future_tolerance_ms:
        return Rejection(
            "future_timestamp",
            f"ts: {event.ts} is {event.ts - now_ms} ms ahead of the wall clock "
            f"(tolerance {future_tolerance_ms} ms)",
        )
    return event


# Field validators. Each raises _Invalid with a message that starts with the field name.


def _common(obj: dict[str, Any]) -> tuple[str, int, str | None]:
    event_id = obj.get("event_id")
    if not isinstance(event_id, str) or not 1 <= len(event_id) <= MAX_EVENT_ID_CHARS:
        raise _Invalid(f"event_id: required string of 1..{MAX_EVENT_ID_CHARS} characters")
    ts = obj.get("ts")
    if type(ts) is not int:  # bool is an int subclass; 1.0 is a float: both rejected
        raise _Invalid("ts: required integer (epoch milliseconds)")
    if ts < 0:
        raise _Invalid("ts: must not be negative")
    session_id = obj.get("session_id")
    if session_id is not None and (
        not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_CHARS
    ):
        raise _Invalid(f"session_id: optional string of at most {MAX_SESSION_ID_CHARS} characters")
    return event_id, ts, session_id


def _text(obj: dict[str, Any], field: str, *, required: bool) -> str:
    value = obj.get(field)
    if value is None:
        if required:
            raise _Invalid(f"{field}: required string is missing")
        return ""
    if not isinstance(value, str):
        raise _Invalid(f"{field}: must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise _Invalid(f"{field}: longer than {MAX_TEXT_CHARS} characters")
    return value


def _doc_id(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{field}: doc id must be a string")
    size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_DOC_ID_BYTES:
        raise _Invalid(f"{field}: doc id must be 1..{MAX_DOC_ID_BYTES} UTF-8 bytes")
    if _CONTROL.search(value):
        raise _Invalid(f"{field}: doc id contains a control character")
    return value


def _int_at_least(obj: dict[str, Any], field: str, minimum: int) -> int:
    value = obj.get(field)
    if type(value) is not int or value < minimum:
        raise _Invalid(f"{field}: required integer >= {minimum}")
    return value


def _string_list(obj: dict[str, Any], field: str, max_items: int) -> list[Any]:
    value = obj.get(field)
    if not isinstance(value, list) or not 1 <= len(value) <= max_items:
        raise _Invalid(f"{field}: required list of 1..{max_items} items")
    return value


def _search_impression(obj: dict[str, Any], origin: int, clock: int) -> SearchImpression:
    event_id, ts, session_id = _common(obj)
    query = _text(obj, "query", required=False)
    raw = _string_list(obj, "doc_ids", MAX_DOC_IDS)
    doc_ids = tuple(_doc_id(d, f"doc_ids[{i}]") for i, d in enumerate(raw))
    return SearchImpression(event_id, ts, session_id, query, doc_ids, origin, max(clock, ts))


def _click(obj: dict[str, Any], origin: int, clock: int) -> Click:
    event_id, ts, session_id = _common(obj)
    query = _text(obj, "query", required=False)
    doc_id = _doc_id(obj.get("doc_id"), "doc_id")
    position = obj.get("position")
    if position is not None and (type(position) is not int or position < 1):
        raise _Invalid("position: optional integer >= 1")
    return Click(event_id, ts, session_id, query, doc_id, position, origin, max(clock, ts))


def _dwell(obj: dict[str, Any], origin: int, clock: int) -> Dwell:
    event_id, ts, session_id = _common(obj)
    query = _text(obj, "query", required=False)
    doc_id = _doc_id(obj.get("doc_id"), "doc_id")
    dwell_ms = _int_at_least(obj, "dwell_ms", 0)
    return Dwell(event_id, ts, session_id, query, doc_id, dwell_ms, origin, max(clock, ts))


def _ac_impression(obj: dict[str, Any], origin: int, clock: int) -> AcImpression:
    event_id, ts, session_id = _common(obj)
    prefix = _text(obj, "prefix", required=True)
    raw = _string_list(obj, "candidates", MAX_CANDIDATES)
    for i, candidate in enumerate(raw):
        if not isinstance(candidate, str) or len(candidate) > MAX_TEXT_CHARS:
            raise _Invalid(f"candidates[{i}]: string of at most {MAX_TEXT_CHARS} characters")
    return AcImpression(event_id, ts, session_id, prefix, tuple(raw), origin, max(clock, ts))


def _ac_select(obj: dict[str, Any], origin: int, clock: int) -> AcSelect:
    event_id, ts, session_id = _common(obj)
    prefix = _text(obj, "prefix", required=True)
    candidate = _text(obj, "candidate", required=True)
    return AcSelect(event_id, ts, session_id, prefix, candidate, origin, max(clock, ts))


_TYPES: Final = (SearchImpression, Click, Dwell, AcImpression, AcSelect)
"""The event classes in `EVENT_TYPES` order (the compiled builder's table)."""

_BUILDERS: Final[dict[str, Callable[[dict[str, Any], int, int], Event]]] = {
    "search_impression": _search_impression,
    "click": _click,
    "dwell": _dwell,
    "ac_impression": _ac_impression,
    "ac_select": _ac_select,
}
