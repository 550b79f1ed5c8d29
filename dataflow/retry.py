"""Capped exponential backoff, as an object so tests can set every wait to zero."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Waits `base · 2^attempt` seconds, capped at `cap`, with full jitter."""

    base: float = 0.05
    cap: float = 5.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def delay(self, attempt: int) -> float:
        # The exponent is capped: a writer that waits out a long outage counts thousands of
        # attempts, and 2**1100 no longer converts to a float.
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 64)))
        return random.uniform(ceiling / 2, ceiling) if ceiling > 0 else 0.0  # noqa: S311

    def wait(self, attempt: int, *, at_most: float | None = None) -> None:
        """Sleep the delay of `attempt`, or `at_most` seconds if that is shorter."""
        seconds = self.delay(attempt)
        if at_most is not None:
            seconds = min(seconds, max(0.0, at_most))
        if seconds > 0:
            self.sleep(seconds)


NO_WAIT = Backoff(base=0.0, cap=0.0)
"""For tests: retry immediately."""
