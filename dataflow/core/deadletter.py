"""The dead-letter envelope (contract §5): what went wrong, where it came from, the bytes."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import orjson

from dataflow.core.events import Reason


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message was read: enough to find it again in Kafka."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One rejected message on its way to the dead-letter topic."""

    key: bytes
    value: bytes
    reason: Reason


def dead_letter(source: Source, payload: bytes | None, reason: Reason, detail: str) -> DeadLetter:
    """Build the envelope. The key `{topic}:{partition}:{offset}` lets a DLQ consumer drop the
    copies a replay re-sends."""
    envelope: dict[str, object] = {
        "reason": reason,
        "detail": detail,
        "topic": source.topic,
        "partition": source.partition,
        "offset": source.offset,
    }
    raw = payload or b""
    try:
        envelope["payload"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        envelope["payload_b64"] = base64.b64encode(raw).decode("ascii")
    key = f"{source.topic}:{source.partition}:{source.offset}".encode()
    return DeadLetter(key=key, value=orjson.dumps(envelope), reason=reason)
