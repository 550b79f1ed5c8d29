"""The compiled state core: the per-event hot paths in C (`dataflow/core/_native.c`).

These loops run once per event, per counter update or per written key, and in CPython each
costs microseconds of per-object work; compiled, each costs a fraction of that:

- building a valid event from its decoded JSON (`events.decode`; every rejection is still
  decided by `events.py`);
- the fan-out of a batch of events into counter updates grouped by state shard
  (`flow.FanOut`, reference `families.updates_for` and `flow.by_feature_shard`);
- applying a batch of counter updates to a shard's keys (`FeatureShard.step`, whose Python
  loop and `counters.add` are the reference);
- rendering the keys to write as their Redis fields (`FeatureShard.flush`, reference
  `families.fields_for`), each key's as one `Fields`: a read-only mapping held as the RESP
  of its `HSET`'s field-value pairs, equal to the reference's dict and in its order, which
  the packing copies as it is (no dict and no string per field on the way to Redis);
- packing a chunk of writes as RESP (`sinks.redis`, reference `resp.pack_writes`);
- a shard's key states in one snapshot buffer and back (`counters.pack_states`,
  `counters.unpack_states`).

The Python implementations stay the reference: the compiled ones give the same states, the
same field text and the same bytes (tests/core/test_native.py holds them to it with
Hypothesis), so the choice changes speed only. A key whose window sums do not fit an int64
is rendered by the reference.

`NATIVE_CORE` chooses (`use`); with it on, a package built without its extension fails at
start naming the variable instead of running slower unnoticed. `pip install .` builds the
extension (setup.py); it needs a C compiler and Python's headers.

It imports nothing from the package, so that any core module can ask for `core`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType


def _load() -> ModuleType | None:
    try:
        from dataflow.core import _native  # noqa: PLC0415 - optional: built by setup.py
    except ImportError:  # pragma: no cover - a package installed without its extension
        return None
    return _native


BUILT: ModuleType | None = _load()
"""The extension, when the package was installed with it."""
if BUILT is not None:
    Mapping.register(BUILT.Fields)

core: ModuleType | None = BUILT
"""The compiled core in use, or None for the pure-Python one (`use`)."""


class NotBuilt(RuntimeError):
    """The compiled core was asked for, and the package was installed without it."""


def use(enabled: bool) -> None:
    """Run the compiled core (True) or the pure-Python one (False)."""
    global core  # noqa: PLW0603 - one switch for the process, set at start
    if enabled and BUILT is None:
        raise NotBuilt("the compiled core (dataflow.core._native) is not built")
    core = BUILT if enabled else None
