"""The one envelope every stateful step's recovery state travels in.

Bytewax stores whatever a step's `snapshot()` returns and hands it back to the step's
builder on resume. A layout change in one of those states would otherwise surface as an
unpacking error deep in a restore. Every state is therefore wrapped with its step name and
a layout version, and `unwrap` refuses anything else with an error that says what to do.

Bytewax pickles a snapshot *after* the logic may have processed more items, so `wrap`
returns immutable bytes: the state can never be shared with the live objects. A state that
refers to writes still in flight (a feature shard's new segments, `dataflow.core.segments`)
is returned as a `Deferred`: Bytewax pickles every snapshot of an epoch after the stateful
steps have handed them all over, so the writes of all shards travel together and the first
pickle waits for them once, and never before they are durable.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, Final

from dataflow.errors import RecoveryFormatError

MAGIC: Final = "search-features/state"


def wrap(step: str, version: int, state: Any) -> bytes:
    """The recovery bytes of `state`, written by layout `version` of `step`."""
    return pickle.dumps((MAGIC, step, version, state), protocol=pickle.HIGHEST_PROTOCOL)


class Deferred:
    """Snapshot bytes that can be made only once writes in flight are durable: `finish`
    waits for them and returns the bytes. Pickled, it is those bytes (a restore is handed
    `bytes`, as for any other snapshot); `settle` gives them without pickling."""

    __slots__ = ("_blob", "_finish")

    def __init__(self, finish: Callable[[], bytes]) -> None:
        self._finish = finish
        self._blob: bytes | None = None

    def settle(self) -> bytes:
        if self._blob is None:
            self._blob = self._finish()
        return self._blob

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (self.settle(),)


def settled(snapshot: bytes | Deferred) -> bytes:
    """The bytes of a snapshot, waiting for what a `Deferred` one waits for."""
    return snapshot if isinstance(snapshot, bytes) else snapshot.settle()


def unwrap(step: str, version: int, blob: Any) -> Any:
    """The state inside `blob`, which must be `step`'s state at layout `version`."""
    return unwrap_layouts(step, (version,), blob)[1]


def unwrap_layouts(step: str, versions: tuple[int, ...], blob: Any) -> tuple[int, Any]:
    """`(layout, state)` of `blob`, which must be `step`'s state at one of `versions` (the
    current layout first: it is the one an error names)."""
    version = versions[0]
    found: object = "none (a layout from before versioned recovery state)"
    if isinstance(blob, bytes):
        try:
            envelope = pickle.loads(blob)  # noqa: S301 - our own recovery store
        except Exception:  # noqa: BLE001 - any undecodable blob gets the same clear error
            envelope = None
        if isinstance(envelope, tuple) and len(envelope) == 4 and envelope[0] == MAGIC:
            _, found_step, found, state = envelope
            if found_step == step and found in versions:
                return found, state
            if found_step != step:
                found = f"{found} of step {found_step!r}"
    raise RecoveryFormatError(step, found, version)
