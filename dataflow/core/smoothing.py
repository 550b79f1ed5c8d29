"""Smoothed rates: a Beta prior so that a doc with 1 click out of 1 impression does not
outrank one with 300 out of 1000 (contract §4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Prior:
    """`(k + alpha) / (n + alpha + beta)`: alpha pseudo-successes out of alpha+beta trials."""

    alpha: float = 1.0
    beta: float = 20.0

    def rate(self, successes: float, trials: float) -> float:
        return (successes + self.alpha) / (trials + self.alpha + self.beta)

    @property
    def prior_rate(self) -> float:
        """What a key with no data reads as."""
        return self.alpha / (self.alpha + self.beta)
