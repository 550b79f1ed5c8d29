"""The Redis wire protocol, for the two hot paths that talk to Redis: the feature writes and
the reader.

redis-py builds every command argument by argument in Python and parses every reply through
several Python layers. Both paths send hundreds of commands at a time of a shape known in
advance, so they write RESP themselves into one buffer and read the replies straight off the
connection's hiredis reader. The connections, pools, timeouts and errors stay redis-py's.
"""

from __future__ import annotations

import time
from collections.abc import Container, Mapping, Sequence
from typing import Any

import redis

try:  # redis-py's marker for "no complete reply buffered yet" (hiredis parser)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as NO_REPLY
except ImportError:  # pragma: no cover - another redis-py layout: replies go through read_response
    NO_REPLY = None


class Expired(Exception):
    """A deadline passed while replies were still due."""


def pack_hgetall(key_list: Sequence[str]) -> bytes:
    """RESP of one `HGETALL key` per key, in one buffer (a pipeline on the wire)."""
    text = "".join([f"*2\r\n$7\r\nHGETALL\r\n${len(k)}\r\n{k}\r\n" for k in key_list])
    data = text.encode()
    if len(data) == len(text):  # all ASCII (keys are percent-encoded): the lengths hold
        return data
    return b"".join(
        b"*2\r\n$7\r\nHGETALL\r\n$%d\r\n%s\r\n" % (len(k), k) for k in map(str.encode, key_list)
    )


def pack_hset(key: str, fields: Mapping[str, str]) -> str:
    """`HSET key field value …` as RESP text (lengths in characters: ASCII text only)."""
    heads = _FIELD_HEADS
    parts = [f"*{2 + 2 * len(fields)}\r\n$4\r\nHSET\r\n${len(key)}\r\n{key}\r\n"]
    for name, value in fields.items():
        head = heads.get(name)
        if head is None:
            head = heads[name] = f"${len(name)}\r\n{name}\r\n"
        parts.append(f"{head}${len(value)}\r\n{value}\r\n")
    return "".join(parts)


_FIELD_HEADS: dict[str, str] = {}
"""`$len\r\nname\r\n` of each field name seen (a few dozen names in all)."""


def pack_writes(
    prefix: str,
    writes: Sequence[tuple[str, Mapping[str, str] | None]],
    ttl: Container[str],
    seconds: int,
) -> tuple[bytes, int]:
    """A chunk of feature writes as one RESP buffer, and how many replies it asks for:
    `HSET <prefix>:<suffix> field value …` per (suffix, fields), followed by
    `EXPIRE key seconds` when the suffix is in `ttl`, and `DEL key` per (suffix, None).
    Keys are percent-encoded and values are numbers: the text is ASCII. (The compiled core
    packs the same bytes: `dataflow.core.native`.)"""
    text: list[str] = []
    for suffix, fields in writes:
        key = f"{prefix}:{suffix}"
        if fields is None:
            text.append(pack_del(key))
        else:
            text.append(pack_hset(key, fields))
            if suffix in ttl:
                text.append(pack_expire(key, seconds))
    return "".join(text).encode("ascii"), len(text)


def pack_expire(key: str, seconds: int) -> str:
    """`EXPIRE key seconds` as RESP text (ASCII keys only)."""
    ttl = str(seconds)
    return f"*3\r\n$6\r\nEXPIRE\r\n${len(key)}\r\n{key}\r\n${len(ttl)}\r\n{ttl}\r\n"


def pack_del(key: str) -> str:
    """`DEL key` as RESP text (ASCII keys only)."""
    return f"*2\r\n$3\r\nDEL\r\n${len(key)}\r\n{key}\r\n"


def is_push(reply: object) -> bool:
    """A RESP3 push message (client tracking, maintenance notices): not a reply of ours."""
    return type(reply).__name__ == "PushNotification"


def read_replies(conn: Any, count: int, deadline: float | None = None) -> list[Any]:
    """`count` replies off `conn`: straight from its hiredis reader when it has one (no
    per-reply Python layers), else through `read_response`. With a `deadline`
    (`time.monotonic()`), every socket read waits at most what is left of it. Error replies
    come back as exception objects, in their place."""
    replies: list[Any] = []
    if not count:
        return replies
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    fill = getattr(parser, "read_from_socket", None)
    append = replies.append
    monotonic = time.monotonic
    if NO_REPLY is None or reader is None or fill is None:
        for _ in range(count):
            if deadline is None:
                append(conn.read_response())
                continue
            left = deadline - monotonic()
            if left <= 0:
                raise Expired("deadline passed")
            append(conn.read_response(timeout=left))
        return replies
    gets = reader.gets
    try:
        while len(replies) < count:
            reply = gets()
            if reply is NO_REPLY:
                if deadline is None:
                    fill()
                    continue
                left = deadline - monotonic()
                if left <= 0:
                    raise Expired("deadline passed")
                fill(timeout=left)
            elif type(reply) is list or not is_push(reply):
                append(reply)
    except TimeoutError:
        raise
    except OSError as exc:  # a reset or broken socket: what `read_response` would raise
        raise redis.ConnectionError(f"Error while reading from Redis: {exc}") from exc
    return replies


async def write_async(conn: Any, data: bytes) -> None:
    """Write `data` on a `redis.asyncio` connection: straight to its stream writer when it
    has one. redis-py wraps every write in `asyncio.wait_for` when the connection has a
    socket timeout (its default is 5 s), which costs a task and a turn of the event loop
    per write; the caller bounds the whole call in time instead."""
    writer = getattr(conn, "_writer", None)
    if writer is None:  # pragma: no cover - another redis-py layout
        await conn.send_packed_command(data, check_health=False)
        return
    writer.write(data)
    await writer.drain()


async def read_replies_async(conn: Any, count: int) -> list[Any]:
    """`read_replies` on a `redis.asyncio` connection (the caller bounds it in time)."""
    replies: list[Any] = []
    if not count:
        return replies
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    fill = getattr(parser, "read_from_socket", None)
    append = replies.append
    if NO_REPLY is None or reader is None or fill is None:
        for _ in range(count):
            append(await conn.read_response())
        return replies
    gets = reader.gets
    while len(replies) < count:
        reply = gets()
        if reply is NO_REPLY:
            await fill()
        elif type(reply) is list or not is_push(reply):
            append(reply)
    return replies
