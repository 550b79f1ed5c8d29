"""Empirical-Bayes priors fitted from the live keys (contract §4.6). Pure: no I/O, no clock.

With `SMOOTHING_{FAMILY}_PRIOR=fitted`, a family's smoothed rates use, on UTC day `D`, a
Beta(α, β) prior fitted to its own keys instead of the configured one:

- **Which keys.** A fixed sample of the family's keys, chosen by a stable hash of the key
  (one in `PRIOR_FIT_SAMPLE`), each with its trials (impressions) and successes (clicks,
  selects) summed over the 28 days `D-29 … D-2`; keys with fewer than
  `PRIOR_FIT_MIN_IMPRESSIONS` trials are left out. (28, not 30: an event more than 30 days
  older than the clock is dropped as late, and whether it is depends on when it arrives;
  no event of these days ever is while the prior is in use.)
- **How.** The method of moments gives a start; Newton's method on the Beta-binomial
  likelihood refines it to the maximum-likelihood α, β (Minka, "Estimating a Dirichlet
  distribution", 2000; Wang et al., "Click-Through Rate Estimation for Rare Events in Online
  Advertising"). Degenerate data (too few keys, no spread between them beyond chance, a fit
  that leaves its bounds) falls back to the configured prior, and says why.
- **When.** The window ends a whole day before `D`, so the fit can wait until no event of it
  is still to come: it is made when the slowest partition's clock (the dedup watermark) has
  passed the start of day `D-1` by `PRIOR_FIT_GRACE_SECONDS`, normally a day before it is
  needed. An event of the window that arrives later than that (beyond the grace) makes the
  fit run again and, when the prior changes, the family's keys are re-stated; at the end of
  input every prior still needed is fitted on everything read. So a day's prior, and every
  value written with it, is a function of the events alone, whatever the arrival order,
  batching, worker count or restarts.

`PriorFitter` is the state of the one Bytewax key that fits; the feature shards receive its
`Fit`s and render with them (`dataflow.core.shard`).
"""

from __future__ import annotations

import math
import zlib
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from dataflow.core import snapshots
from dataflow.core.families import AC, DOC, FAMILY_NAMES, QD, Update, family_of
from dataflow.core.smoothing import Prior
from dataflow.core.windows import DAY_MS

FITTABLE: Final = (DOC, QD, AC)
"""Families whose prior can be fitted: each has one rate, successes over trials, in counts
0 (trials) and 1 (successes). `acq` has two rates over one prior and keeps the configured
one."""

WINDOW_DAYS: Final = 28
LAG_DAYS: Final = 2
"""The prior of day D is fitted on days D-29 … D-2."""
MAX_ITERATIONS: Final = 100
TOLERANCE: Final = 1e-10
"""Converged when the log-likelihood's gradient in (log α, log β) is this small per key."""
MAX_WEIGHT: Final = 1e6
"""α + β above this (keys that all share one rate) is no fit: the prior would never move."""
MIN_PARAMETER: Final = 1e-4
"""α or β below this (the likelihood running off to a rate of 0 or 1) is no fit either."""
MAX_LOG_STEP: Final = 2.0
"""The longest Newton step in log α or log β: a factor e² per iteration, so that a step
from a flat surface cannot overflow or underflow."""
LAYOUT: Final = 1


def in_sample(suffix: str, sample: int) -> bool:
    """Whether a key feeds its family's fit: one key in `sample`, by the high 16 bits of the
    CRC-32 of its suffix (the state shard takes it modulo the shard count, so the sample
    spreads over every shard)."""
    return sample == 1 or (zlib.crc32(suffix.encode("utf-8")) >> 16) % sample == 0


def window(day: int) -> tuple[int, int]:
    """The first and last day whose counts the prior of `day` is fitted on."""
    return day - LAG_DAYS - WINDOW_DAYS + 1, day - LAG_DAYS


@dataclass(frozen=True, slots=True)
class FitRules:
    """Which families are fitted, and how (`PRIOR_FIT_*`)."""

    families: frozenset[int] = frozenset()
    sample: int = 16
    min_keys: int = 100
    min_trials: int = 20
    grace_ms: int = 600_000

    def __post_init__(self) -> None:
        if not self.families <= set(FITTABLE):
            raise ValueError("only doc, qd and ac priors can be fitted")
        if self.sample < 1 or self.min_keys < 2 or self.min_trials < 1 or self.grace_ms < 0:
            raise ValueError("sample, min_keys and min_trials must be positive, grace >= 0")


@dataclass(frozen=True, slots=True)
class Fit:
    """The prior of `family` in force on UTC day `day` (days since the epoch).

    `fitted` False: the configured prior, because `reason`. `keys`: the keys the fit used.
    """

    family: int
    day: int
    alpha: float
    beta: float
    keys: int
    fitted: bool
    reason: str = ""

    @property
    def prior(self) -> Prior:
        return Prior(self.alpha, self.beta)

    def fields(self) -> dict[str, str]:
        """The published hash `P:prior:{family}` (contract §4.6)."""
        return {
            "alpha": repr(self.alpha),
            "beta": repr(self.beta),
            "day": str(self.day),
            "keys": str(self.keys),
            "source": "fitted" if self.fitted else "fixed",
            "reason": self.reason,
        }


def prior_suffix(family: int) -> str:
    """The key suffix a family's prior is published at: `prior:doc`."""
    return f"prior:{FAMILY_NAMES[family]}"


# ------------------------------------------------------------------------------ the fit


def digamma(x: float) -> float:
    """ψ(x) for x > 0: the recurrence up to 10, then the asymptotic series (error < 1e-12)."""
    result = 0.0
    while x < 10.0:
        result -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    series = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f * (1 / 132)))))
    return result + math.log(x) - 0.5 / x - series


def trigamma(x: float) -> float:
    """ψ'(x) for x > 0: the recurrence up to 10, then the asymptotic series."""
    result = 0.0
    while x < 10.0:
        result += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    series = 1 / x + f / 2 + f / x * (1 / 6 - f * (1 / 30 - f * (1 / 42 - f * (1 / 30))))
    return result + series


class _Likelihood:
    """The Beta-binomial log-likelihood of the keys (constant terms left out), its gradient
    and Hessian in (α, β). Each sum runs over the distinct values, in sorted order."""

    def __init__(self, kept: list[tuple[int, int]]) -> None:
        self.successes = sorted(Counter(s for s, _ in kept).items())
        self.failures = sorted(Counter(n - s for s, n in kept).items())
        self.trials = sorted(Counter(n for _, n in kept).items())
        self.keys = len(kept)

    def value(self, a: float, b: float) -> float:
        lg, k = math.lgamma, self.keys
        return (
            math.fsum(c * lg(s + a) for s, c in self.successes)
            + math.fsum(c * lg(f + b) for f, c in self.failures)
            - math.fsum(c * lg(n + a + b) for n, c in self.trials)
            + k * (lg(a + b) - lg(a) - lg(b))
        )

    def derivatives(self, a: float, b: float) -> tuple[float, float, float, float, float]:
        """(∂a, ∂b, ∂²a, ∂²b, ∂a∂b)."""
        k, t = self.keys, a + b
        pa = math.fsum(c * digamma(s + a) for s, c in self.successes) - k * digamma(a)
        pb = math.fsum(c * digamma(f + b) for f, c in self.failures) - k * digamma(b)
        pt = math.fsum(c * digamma(n + t) for n, c in self.trials) - k * digamma(t)
        qa = math.fsum(c * trigamma(s + a) for s, c in self.successes) - k * trigamma(a)
        qb = math.fsum(c * trigamma(f + b) for f, c in self.failures) - k * trigamma(b)
        qt = math.fsum(c * trigamma(n + t) for n, c in self.trials) - k * trigamma(t)
        return pa - pt, pb - pt, qa - qt, qb - qt, -qt


def fit_beta(
    pairs: Iterable[tuple[int, int]], fixed: Prior, *, min_keys: int, min_trials: int
) -> tuple[float, float, int, str]:
    """Beta(α, β) by maximum likelihood on `(successes, trials)` per key: `(α, β, keys,
    reason)`; on degenerate data `fixed` and a reason. Successes above the trials (clicks
    without a counted impression) count as the trials.

    The method of moments (with each key's binomial noise taken out of the spread) gives
    the start; Newton's method on the Beta-binomial log-likelihood in (log α, log β), damped
    where the surface is not concave and each step halved until the likelihood rises,
    refines it until the gradient vanishes (Minka 2000). Minka's fixed-point iteration
    reaches the same point but takes thousands of steps when α + β is large. Deterministic:
    the same keys give the same bits, in any order.
    """
    kept = [(min(s, n), n) for s, n in pairs if n >= min_trials]
    keys = len(kept)
    if keys < min_keys:
        return fixed.alpha, fixed.beta, keys, f"{keys} keys with {min_trials}+ impressions"
    kept.sort()
    rates = [s / n for s, n in kept]
    mean = math.fsum(rates) / keys
    variance = math.fsum((r - mean) ** 2 for r in rates) / (keys - 1)
    if variance <= 0.0 or not 0.0 < mean < 1.0:
        return fixed.alpha, fixed.beta, keys, "every key has the same rate"
    noise = math.fsum(mean * (1 - mean) / n for _, n in kept) / keys
    spread = variance - noise
    if spread <= 0.0:
        return fixed.alpha, fixed.beta, keys, "no spread beyond chance between keys"
    weight = min(max(mean * (1 - mean) / spread - 1, 1e-3), MAX_WEIGHT)
    a, b = mean * weight, (1 - mean) * weight
    model = _Likelihood(kept)
    current = model.value(a, b)
    for _ in range(MAX_ITERATIONS):
        ga, gb, haa, hbb, hab = model.derivatives(a, b)
        # Newton on (log α, log β): positive by construction, and better scaled.
        gu, gv = a * ga, b * gb
        if abs(gu) + abs(gv) <= TOLERANCE * keys:
            break
        huu, hvv, huv = a * a * haa + a * ga, b * b * hbb + b * gb, a * b * hab
        damping = 0.0
        while True:  # damped until the step goes uphill (Levenberg-Marquardt)
            p, q = huu - damping, hvv - damping
            det = p * q - huv * huv
            if p < 0.0 and det > 0.0:
                break
            damping = max(2.0 * damping, 1e-9 * (abs(huu) + abs(hvv) + 1.0))
        du, dv = -(q * gu - huv * gv) / det, -(p * gv - huv * gu) / det
        if not (math.isfinite(du) and math.isfinite(dv)):
            break
        scale = min(1.0, MAX_LOG_STEP / max(abs(du), abs(dv), 1e-300))
        for _ in range(60):
            na, nb = a * math.exp(scale * du), b * math.exp(scale * dv)
            if na > 0.0 and nb > 0.0:
                value = model.value(na, nb)
                if value >= current:
                    break
            scale /= 2.0
        else:
            break  # no step rises: at the maximum, to rounding
        a, b, current = na, nb, value
        if a + b > MAX_WEIGHT:
            return fixed.alpha, fixed.beta, keys, "no spread beyond chance between keys"
    if min(a, b) < MIN_PARAMETER:
        return fixed.alpha, fixed.beta, keys, "the fit runs off to a rate of 0 or 1"
    return a, b, keys, ""


# --------------------------------------------------------------------------- the fitter


@dataclass(slots=True)
class PriorFitter:
    """The fit step's state: the sampled keys' daily counts, the partition clocks, and which
    priors were sent.

    `observe` takes sampled updates, `read_clocks` partition clocks; `close_epoch` (when
    the epoch closes, so that every update read before the clocks moved is in) fits what is
    due; `take` hands out the fits to send; `finish` fits every prior still needed at the
    end of input.
    """

    rules: FitRules
    fixed: Mapping[int, Prior]
    counts: dict[str, array[int]] = field(default_factory=dict)
    """Sampled key suffix -> [day, trials, successes, day, trials, successes, …]."""
    clocks: dict[int, int] = field(default_factory=dict)
    sent: dict[int, dict[int, Fit]] = field(default_factory=dict)
    """Family -> day -> the fit sent for it (days from the clock's day on)."""
    stale: set[int] = field(default_factory=set)
    """Days whose window received counts after their fit was sent."""
    ready: list[Fit] = field(default_factory=list)
    """Fits made at the last epoch close, not sent yet."""
    pruned: int = -1
    """The clock's day when the counts were last pruned."""

    @property
    def clock_day(self) -> int | None:
        return max(self.clocks.values()) // DAY_MS if self.clocks else None

    def closable(self) -> int | None:
        """The newest day whose window every partition has read past, by the grace."""
        if not self.clocks:
            return None
        watermark = min(self.clocks.values())
        return (watermark - self.rules.grace_ms - 1) // DAY_MS + 1

    def observe(self, updates: Iterable[Update]) -> None:
        counts = self.counts
        sent_days = [d for days in self.sent.values() for d in days]
        newest_sent = max(sent_days, default=None)
        for _family, suffix, ts, (trials, successes, *_) in updates:
            day = ts // DAY_MS
            row = counts.get(suffix)
            if row is None:
                counts[suffix] = array("q", (day, trials, successes))
            else:
                for i in range(len(row) - 3, -1, -3):
                    if row[i] == day:
                        row[i + 1] += trials
                        row[i + 2] += successes
                        break
                else:
                    row.extend((day, trials, successes))
            if newest_sent is not None and day + LAG_DAYS <= newest_sent:
                self.stale.update(d for d in sent_days if window(d)[0] <= day <= window(d)[1])

    def read_clocks(self, readings: Iterable[tuple[int, int]]) -> None:
        clocks = self.clocks
        for origin, clock in readings:
            if clock > clocks.get(origin, -1):
                clocks[origin] = clock

    def pairs(self, family: int, day: int) -> list[tuple[int, int]]:
        """`(successes, trials)` of each sampled key of `family` over the window of `day`."""
        first, last = window(day)
        out: list[tuple[int, int]] = []
        for suffix, row in self.counts.items():
            if family_of(suffix) != family:
                continue
            trials = successes = 0
            for i in range(0, len(row), 3):
                if first <= row[i] <= last:
                    trials += row[i + 1]
                    successes += row[i + 2]
            if trials or successes:
                out.append((successes, trials))
        return out

    def fit(self, family: int, day: int) -> Fit:
        rules = self.rules
        alpha, beta, keys, reason = fit_beta(
            self.pairs(family, day),
            self.fixed[family],
            min_keys=rules.min_keys,
            min_trials=rules.min_trials,
        )
        return Fit(family, day, alpha, beta, keys, not reason, reason)

    def close_epoch(self, *, everything: bool = False) -> None:
        """Fit the priors that are due: every day from the clock's day to the newest
        closable one that has none yet, and days whose window received counts after their
        fit was made. With `everything` (the end of input) the clock's day too, even if not
        closable: everything there is to read has been read. A fit is sent when it differs
        from the one sent for that day."""
        today = self.clock_day
        if today is None:
            return
        newest = self.closable()
        if newest is None or (everything and newest < today):
            newest = today
        stale = {d for d in self.stale if d >= today}
        self.stale.clear()
        for family in sorted(self.rules.families):
            sent = self.sent.setdefault(family, {})
            for day in sorted(set(range(today, newest + 1)) | stale):
                if day in sent and day not in stale:
                    continue
                fit = self.fit(family, day)
                if sent.get(day) != fit:
                    sent[day] = fit
                    self.ready.append(fit)
            for day in [d for d in sent if d < today]:
                del sent[day]
        if self.pruned != today:
            self._prune(today)

    def _prune(self, today: int) -> None:
        """Drop the counts no window from `today` on needs."""
        first = window(today)[0]
        for suffix in list(self.counts):
            row = self.counts[suffix]
            kept = [x for i in range(0, len(row), 3) if row[i] >= first for x in row[i : i + 3]]
            if not kept:
                del self.counts[suffix]
            elif len(kept) != len(row):
                self.counts[suffix] = array("q", kept)
        self.pruned = today

    def newest(self) -> list[Fit]:
        """The fit of the latest day sent, per family: what `P:prior:{family}` shows."""
        return [days[max(days)] for _, days in sorted(self.sent.items()) if days]

    def take(self) -> list[Fit]:
        ready, self.ready = self.ready, []
        return ready

    def snapshot(self) -> bytes:
        state = (
            {suffix: row.tobytes() for suffix, row in self.counts.items()},
            self.clocks,
            self.sent,
            self.stale,
            self.ready,
            self.pruned,
        )
        return snapshots.wrap("prior_fit", LAYOUT, state)

    @classmethod
    def restore(cls, rules: FitRules, fixed: Mapping[int, Prior], blob: bytes) -> PriorFitter:
        packed, clocks, sent, stale, ready, pruned = snapshots.unwrap("prior_fit", LAYOUT, blob)
        counts = {}
        for suffix, raw in packed.items():
            row = array("q")
            row.frombytes(raw)
            counts[suffix] = row
        return cls(rules, fixed, counts, clocks, sent, stale, ready, pruned)
