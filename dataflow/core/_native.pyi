"""Types of the compiled state core (`_native.c`; `dataflow.core.native` says what it does)."""

from array import array
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

_Layouts = tuple[tuple[int, tuple[int, ...]], ...]
_Update = tuple[int, str, int, tuple[int, ...]]
_Fields = dict[str, str]
_Event = Any

CONSTANTS: dict[str, int | float]

def add(
    state: array[int] | None, layouts: _Layouts, family: int, ts: int, counts: Sequence[int]
) -> array[int]: ...
def apply(
    updates: Sequence[_Update],
    keys: dict[str, array[int]],
    dirty: set[str],
    created: set[str],
    deleted: set[str],
    layouts: _Layouts,
    clock: int,
    late_before: int,
) -> tuple[int, int, int]: ...
def fields_for(
    family: int,
    state: array[int],
    as_of: int,
    layouts: _Layouts,
    cparams: tuple[float, ...],
    fallback: Callable[[int, array[int], int], _Fields],
) -> _Fields: ...
def render(
    keys: dict[str, array[int]],
    suffixes: Iterable[str],
    day_start: int,
    layouts: _Layouts,
    cparams: tuple[float, ...],
    fallback: Callable[[int, array[int], int], _Fields],
    writes: list[tuple[str, _Fields | None]],
) -> None: ...
def pack_writes(
    prefix: str,
    writes: Sequence[tuple[str, Mapping[str, str] | None]],
    ttl: Container[str],
    seconds: int,
) -> tuple[bytes, int]: ...
def float_repr(value: float) -> str: ...
def fan_out(
    events: Iterable[object],
    shards: int,
    impression_type: type,
    by_position: tuple[tuple[int, ...], ...],
    qhash_of: Callable[[str], str | None],
    enc: Callable[[str], str],
    updates_for: Callable[[object], list[_Update]],
) -> list[tuple[str, list[_Update]]]: ...
def shard_of(suffix: str, shards: int) -> int: ...
def event_from(
    obj: dict[str, object], origin: int, clock: int, latest_ts: int, types: tuple[type, ...]
) -> _Event | None: ...
def pack_states(keys: dict[str, array[int]]) -> bytes: ...
def unpack_states(blob: bytes) -> dict[str, array[int]]: ...
def unpack_states_layout_4(blob: bytes) -> dict[str, array[int]]: ...
