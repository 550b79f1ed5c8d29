"""Fitted priors (dataflow.core.priors): the numeric fit against the likelihood it maximises,
its fallbacks, and the fitter's rules for when a day's prior is made and made again."""

from __future__ import annotations

import math
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.core.families import AC, DOC, QD, FeatureParams
from dataflow.core.priors import (
    MAX_WEIGHT,
    MIN_PARAMETER,
    Fit,
    FitRules,
    PriorFitter,
    digamma,
    fit_beta,
    in_sample,
    prior_suffix,
    trigamma,
    window,
)
from dataflow.core.shard import FeatureShard
from dataflow.core.smoothing import Prior
from dataflow.core.windows import DAY_MS

FIXED = Prior(1.0, 20.0)
DAY = 20_400  # a UTC day number


def beta_binomial(seed: int, keys: int, a: float, b: float) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    pairs = []
    for _ in range(keys):
        p, n = rnd.betavariate(a, b), rnd.randint(20, 400)
        pairs.append((sum(rnd.random() < p for _ in range(n)), n))
    return pairs


def log_likelihood(pairs: list[tuple[int, int]], a: float, b: float) -> float:
    """The Beta-binomial log-likelihood, written out directly (binomial coefficients left
    out: they do not depend on α, β)."""
    lb = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.fsum(
        math.lgamma(s + a) + math.lgamma(n - s + b) - math.lgamma(n + a + b) - lb for s, n in pairs
    )


@pytest.mark.parametrize("x", [1e-3, 0.3, 1.0, 2.5, 9.999, 10.0, 17.0, 1e4])
def test_digamma_and_trigamma_are_the_derivatives_of_lgamma(x: float) -> None:
    h = 1e-5 * max(x, 1e-2)
    slope = (math.lgamma(x + h) - math.lgamma(x - h)) / (2 * h)
    curve = (digamma(x + h) - digamma(x - h)) / (2 * h)
    assert digamma(x) == pytest.approx(slope, rel=1e-6, abs=1e-6)
    assert trigamma(x) == pytest.approx(curve, rel=1e-5)
    assert digamma(1.0) == pytest.approx(-0.5772156649015329, abs=1e-12)  # -γ
    assert trigamma(1.0) == pytest.approx(math.pi**2 / 6, abs=1e-12)


def test_the_fit_recovers_the_prior_the_keys_were_drawn_from() -> None:
    pairs = beta_binomial(1, 3_000, 2.0, 40.0)
    alpha, beta, keys, reason = fit_beta(pairs, FIXED, min_keys=100, min_trials=20)
    assert reason == ""
    assert keys == 3_000
    assert alpha / (alpha + beta) == pytest.approx(2 / 42, rel=0.05)
    assert alpha + beta == pytest.approx(42, rel=0.25)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    a=st.floats(0.3, 20),
    b=st.floats(2, 300),
    keys=st.integers(150, 800),
)
def test_the_fit_is_the_maximum_of_the_likelihood(seed: int, a: float, b: float, keys: int) -> None:
    pairs = beta_binomial(seed, keys, a, b)
    alpha, beta, _, reason = fit_beta(pairs, FIXED, min_keys=100, min_trials=20)
    if reason:  # degenerate draws fall back to the fixed prior, and say so
        assert (alpha, beta) == (FIXED.alpha, FIXED.beta)
        return
    best = log_likelihood(pairs, alpha, beta)
    for da, db in [(1.01, 1), (0.99, 1), (1, 1.01), (1, 0.99), (1.01, 1.01), (0.99, 0.99)]:
        assert log_likelihood(pairs, alpha * da, beta * db) <= best + 1e-9
    # The same keys in another order give the same bits.
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    assert fit_beta(shuffled, FIXED, min_keys=100, min_trials=20)[:2] == (alpha, beta)


def test_degenerate_data_falls_back_to_the_configured_prior_and_says_why() -> None:
    few = fit_beta([(1, 50)] * 99, FIXED, min_keys=100, min_trials=20)
    assert few == (1.0, 20.0, 99, "99 keys with 20+ impressions")
    thin = fit_beta([(1, 5)] * 500, FIXED, min_keys=100, min_trials=20)
    assert thin[2:] == (0, "0 keys with 20+ impressions")
    same = fit_beta([(3, 60)] * 300, FIXED, min_keys=100, min_trials=20)
    assert same == (1.0, 20.0, 300, "every key has the same rate")
    never = fit_beta([(0, 60)] * 300, FIXED, min_keys=100, min_trials=20)
    assert never[3] == "every key has the same rate"
    # Every key at one true rate: the spread is chance alone.
    rnd = random.Random(4)
    chance = [(sum(rnd.random() < 0.1 for _ in range(200)), 200) for _ in range(400)]
    alpha, beta, _, reason = fit_beta(chance, FIXED, min_keys=100, min_trials=20)
    assert reason == "no spread beyond chance between keys"
    assert (alpha, beta) == (1.0, 20.0)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.integers(1, 5_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
        min_size=2,
        max_size=40,
    )
)
def test_any_handful_of_keys_gives_a_bounded_prior_or_the_fixed_one(
    pairs: list[tuple[int, int]],
) -> None:
    # Few keys, rates of 0 and 1, one huge key among tiny ones: the likelihood can be flat or
    # run off to an edge, and the fit must neither raise nor publish nonsense.
    alpha, beta, keys, reason = fit_beta(pairs, FIXED, min_keys=2, min_trials=1)
    assert keys == len(pairs)
    if reason:
        assert (alpha, beta) == (FIXED.alpha, FIXED.beta)
    else:
        assert min(alpha, beta) >= MIN_PARAMETER
        assert alpha + beta <= MAX_WEIGHT


def test_a_flat_likelihood_takes_bounded_steps() -> None:
    # Two keys whose Newton step once overflowed `exp` at the first iteration.
    for pairs in ([(3, 25), (19, 21)], [(1, 1), (12, 100)]):
        alpha, beta, _, reason = fit_beta(pairs, FIXED, min_keys=2, min_trials=1)
        assert math.isfinite(alpha) and math.isfinite(beta)
        assert reason or min(alpha, beta) >= MIN_PARAMETER


def test_clicks_beyond_impressions_count_as_the_impressions() -> None:
    pairs = beta_binomial(2, 400, 2.0, 30.0)
    capped = fit_beta([*pairs, (90, 60)], FIXED, min_keys=100, min_trials=20)
    assert capped == fit_beta([*pairs, (60, 60)], FIXED, min_keys=100, min_trials=20)


def test_the_sample_is_a_stable_hash_independent_of_the_state_shard() -> None:
    suffixes = [f"doc:d{i}" for i in range(20_000)]
    picked = [s for s in suffixes if in_sample(s, 16)]
    assert 1_000 < len(picked) < 1_500
    assert all(in_sample(s, 1) for s in suffixes[:10])
    # Contract 4.6 pins the hash: the CRC-32's high 16 bits, modulo the sample size.
    assert [s for s in suffixes[:500] if in_sample(s, 16)] == [
        s for s in suffixes[:500] if (zlib.crc32(s.encode()) >> 16) % 16 == 0
    ]
    shards = {zlib.crc32(s.encode()) % 128 for s in picked}
    assert len(shards) == 128  # spread over every state shard
    assert prior_suffix(QD) == "prior:qd"


def test_windows_end_two_days_before_the_day_they_serve() -> None:
    assert window(DAY) == (DAY - 29, DAY - 2)


# ------------------------------------------------------------------------------ fitter


def rules(**kw: int) -> FitRules:
    base = {"sample": 1, "min_keys": 3, "min_trials": 2, "grace_ms": 600_000}
    return FitRules(families=frozenset({DOC}), **{**base, **kw})


def spread_updates(day: int) -> list[tuple[int, str, int, tuple[int, ...]]]:
    """Five doc keys with 10 impressions each and 0..4 clicks on `day`."""
    ts = day * DAY_MS + 3_600_000
    out = []
    for k in range(5):
        out += [(DOC, f"doc:k{k}", ts, (1, 0, 0, 0))] * 10
        out += [(DOC, f"doc:k{k}", ts, (0, 1, 0, 0))] * k
    return out


def test_a_days_prior_is_made_once_every_partition_is_past_its_window_by_the_grace() -> None:
    fitter = PriorFitter(rules(), {DOC: FIXED})
    fitter.observe(spread_updates(DAY - 5))
    # Partition 1 has reached day DAY-1 + grace, partition 2 only the start of DAY-1.
    fitter.read_clocks([(1, (DAY - 1) * DAY_MS + 600_001), (2, (DAY - 1) * DAY_MS)])
    fitter.close_epoch()
    assert [f.day for f in fitter.take()] == [DAY - 1]  # today; DAY is not closable yet
    fitter.read_clocks([(2, (DAY - 1) * DAY_MS + 600_001)])
    fitter.close_epoch()
    (fit,) = fitter.take()
    assert (fit.day, fit.fitted, fit.keys) == (DAY, True, 5)
    fitter.close_epoch()
    assert fitter.take() == []  # made once


def test_counts_that_reach_a_made_window_late_make_the_fit_again() -> None:
    fitter = PriorFitter(rules(), {DOC: FIXED})
    fitter.observe(spread_updates(DAY - 5))
    fitter.read_clocks([(1, DAY * DAY_MS + 1)])
    fitter.close_epoch()
    first = {f.day: f for f in fitter.take()}
    assert set(first) == {DAY}
    # A late upload of day DAY-3 (inside the window of DAY): the fit is made again.
    late = [(DOC, "doc:k0", (DAY - 3) * DAY_MS, (0, 1, 0, 0))] * 9
    fitter.observe(late)
    fitter.close_epoch()
    (again,) = fitter.take()
    assert again.day == DAY and again != first[DAY]
    # The same counts for a day outside every window in use change nothing.
    fitter.observe([(DOC, "doc:k1", (DAY - 40) * DAY_MS, (0, 1, 0, 0))])
    fitter.close_epoch()
    assert fitter.take() == []


def test_at_the_end_of_input_the_clocks_day_is_fitted_even_if_not_closable() -> None:
    fitter = PriorFitter(rules(), {DOC: FIXED})
    fitter.observe(spread_updates(DAY - 4))
    # Today is DAY, but partition 2 has not read past the start of DAY-1 by the grace.
    fitter.read_clocks([(1, DAY * DAY_MS + 5), (2, (DAY - 1) * DAY_MS + 5)])
    fitter.close_epoch()
    assert fitter.take() == []
    fitter.close_epoch(everything=True)
    assert [(f.day, f.fitted) for f in fitter.take()] == [(DAY, True)]


def test_the_fitter_survives_a_snapshot_and_restore() -> None:
    fitter = PriorFitter(rules(), {DOC: FIXED})
    fitter.observe(spread_updates(DAY - 4))
    fitter.read_clocks([(1, DAY * DAY_MS + 700_000)])
    fitter.close_epoch()  # made, not yet sent
    restored = PriorFitter.restore(rules(), {DOC: FIXED}, fitter.snapshot())
    assert restored.take() == fitter.take()
    assert restored.pairs(DOC, DAY) == fitter.pairs(DOC, DAY)
    assert restored.newest() == fitter.newest()


# ------------------------------------------------------------------------------ shards


def shard_with_key(fitted: bool) -> FeatureShard:
    shard = FeatureShard(FeatureParams(), fitted=frozenset({DOC}) if fitted else frozenset())
    shard.step([DAY * DAY_MS + 10, [(DOC, "doc:a", DAY * DAY_MS + 10, (1, 0, 0, 0))]])
    return shard


def test_a_shard_renders_with_the_prior_of_its_clocks_day() -> None:
    shard = shard_with_key(fitted=True)
    shard.step([Fit(DOC, DAY, 2.0, 8.0, 10, True)])
    (write,) = shard.flush().writes
    assert write[1] is not None and write[1]["ctr_30d"] == repr((0 + 2.0) / (1 + 10.0))
    # Not fitted: the configured prior, whatever arrives.
    fixed = shard_with_key(fitted=False)
    fixed.step([Fit(DOC, DAY, 2.0, 8.0, 10, True)])
    (write,) = fixed.flush().writes
    assert write[1] is not None and write[1]["ctr_30d"] == repr((0 + 1.0) / (1 + 21.0))


def test_keys_written_before_their_days_prior_arrived_are_restated_when_it_does() -> None:
    shard = shard_with_key(fitted=True)
    (write,) = shard.flush().writes  # no prior yet: the configured one, for now
    assert write[1] is not None and write[1]["ctr_30d"] == repr(1.0 / 22.0)
    shard.step([Fit(DOC, DAY + 1, 3.0, 3.0, 9, True)])  # tomorrow's: nothing to re-state
    assert not shard.pending
    shard.step([Fit(DOC, DAY, 2.0, 8.0, 10, True)])
    (write,) = shard.flush().writes
    assert write[1] is not None and write[1]["ctr_30d"] == repr(2.0 / 11.0)
    shard.step([Fit(DOC, DAY, 2.0, 8.0, 10, True)])  # the same prior again: nothing
    assert not shard.pending
    shard.step([Fit(DOC, DAY, 4.0, 8.0, 12, True)])  # made again, differently: re-state
    (write,) = shard.flush().writes
    assert write[1] is not None and write[1]["ctr_30d"] == repr(4.0 / 13.0)
    # The next day uses the prior sent for it.
    shard.step([(DAY + 1) * DAY_MS])
    writes = shard.flush().writes
    assert writes[0][1] is not None and writes[0][1]["ctr_30d"] == repr(3.0 / 7.0)


def test_a_shard_snapshot_keeps_its_priors_and_reads_the_previous_layout() -> None:
    shard = shard_with_key(fitted=True)
    shard.step([Fit(DOC, DAY, 2.0, 8.0, 10, True)])
    again = FeatureShard.restore(FeatureParams(), shard.snapshot(), fitted=frozenset({DOC}))
    assert again.priors == {DOC: {DAY: Prior(2.0, 8.0)}}
    # Layout 2, written before fitted priors: the same keys, no priors.
    from dataflow.core import counters, snapshots  # noqa: PLC0415

    state = snapshots.unwrap_layouts("features", (5,), shard.snapshot())[1][:7]
    keys = {s: counters.to_bytes(v) for s, v in counters.unpack_states(state[1]).items()}
    old = snapshots.wrap("features", 2, (state[0], keys, *state[2:]))
    restored = FeatureShard.restore(FeatureParams(), old)
    assert set(restored.keys) == {"doc:a"} and restored.priors == {}


def test_fit_rules_refuse_families_without_one_rate() -> None:
    with pytest.raises(ValueError, match="doc, qd and ac"):
        FitRules(families=frozenset({3}))
    assert FitRules(families=frozenset({DOC, QD, AC})).sample == 16
