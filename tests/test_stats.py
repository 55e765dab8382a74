"""`interp.stats`: every CI in the toolkit rests on `bootstrap`, so it is checked against an exact
enumeration (n = 3: all 27 resamples) and against scipy's percentile bootstrap."""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats as sps

from interp.stats import bootstrap, bootstrap_many, normalised_effect


def _exact_quantile(dist: dict[Fraction, Fraction], q: Fraction) -> Fraction:
    """The q-quantile of a discrete distribution (smallest x with CDF(x) >= q)."""
    acc = Fraction(0)
    for x in sorted(dist):
        acc += dist[x]
        if acc >= q:
            return x
    raise AssertionError("unreachable")


def test_bootstrap_matches_the_enumerated_distribution_for_n3():
    values = [0, 1, 5]
    # every resample (with replacement) of 3 examples is one of 27 equally likely tuples
    means = Counter(Fraction(sum(t), 3) for t in itertools.product(values, repeat=3))
    dist = {m: Fraction(c, 27) for m, c in means.items()}
    # quantiles chosen away from the CDF's jumps, so the Monte-Carlo estimate converges to one value
    cdf, acc = {}, Fraction(0)
    for x in sorted(dist):
        acc += dist[x]
        cdf[x] = acc
    alpha = 0.4  # quantiles 0.2 and 0.8
    for q in (Fraction(2, 10), Fraction(8, 10)):
        assert all(abs(c - q) > Fraction(2, 100) for c in cdf.values()), "pick quantiles between jumps"
    est = bootstrap(torch.tensor(values, dtype=torch.float64), n_boot=200_000, alpha=alpha, seed=1)
    assert est.value == pytest.approx(2.0)
    assert est.low == pytest.approx(float(_exact_quantile(dist, Fraction(2, 10))), abs=1e-9)
    assert est.high == pytest.approx(float(_exact_quantile(dist, Fraction(8, 10))), abs=1e-9)
    # and the resampled means take exactly the enumerable values, with their probabilities
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.mean(-1))
        return x.mean(-1)

    bootstrap(torch.tensor(values, dtype=torch.float64), record, n_boot=60_000, seed=2)
    boots = seen[-1]
    for m, p in dist.items():
        freq = float((boots - float(m)).abs().lt(1e-9).double().mean())
        assert freq == pytest.approx(float(p), abs=4 * (float(p) * (1 - float(p)) / 60_000) ** 0.5 + 1e-4), m
    assert int(sum((boots - float(m)).abs().lt(1e-9).sum() for m in dist)) == 60_000


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_bootstrap_mean_ci_agrees_with_scipy_percentile(alpha):
    rng = np.random.default_rng(0)
    x = rng.exponential(size=40)
    B = 20_000
    ref = sps.bootstrap((x,), np.mean, n_resamples=B, confidence_level=1 - alpha, method="percentile",
                        random_state=rng).confidence_interval
    est = bootstrap(torch.from_numpy(x), n_boot=B, alpha=alpha, seed=0)
    # Monte-Carlo error of a tail quantile with B = 20000 is ~0.003 sd; allow 0.02 sd
    tol = 0.02 * x.std()
    assert est.value == pytest.approx(x.mean())
    assert abs(est.low - ref.low) < tol and abs(est.high - ref.high) < tol, (est, ref)


def test_bootstrap_paired_ratio_agrees_with_scipy():
    """2-D values resample rows together (paired), as the lenses' ratio statistics need."""
    rng = np.random.default_rng(1)
    a = rng.binomial(1, 0.7, size=60).astype(float)
    b = a + rng.binomial(1, 0.5, size=60)  # correlated with a: pairing matters
    B = 20_000
    ref = sps.bootstrap((a, b), lambda a, b, axis: a.mean(axis) / b.mean(axis), paired=True, vectorized=True,
                        n_resamples=B, method="percentile", random_state=rng).confidence_interval
    est = bootstrap(torch.from_numpy(np.stack([a, b], 1)), lambda v: v[..., 0, :].mean(-1) / v[..., 1, :].mean(-1),
                    n_boot=B, seed=0)
    assert est.value == pytest.approx(a.mean() / b.mean())
    assert abs(est.low - ref.low) < 0.01 and abs(est.high - ref.high) < 0.01, (est, ref)


def test_bootstrap_many_is_columnwise_bootstrap_with_shared_resamples():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(30, 4, generator=g, dtype=torch.float64)
    mean, lo, hi = bootstrap_many(v, n_boot=500, alpha=0.1, seed=3)
    for j in range(4):
        e = bootstrap(v[:, j], n_boot=500, alpha=0.1, seed=3)
        torch.testing.assert_close(torch.stack([mean[j], lo[j], hi[j]]),
                                   torch.tensor([e.value, e.low, e.high], dtype=torch.float64), rtol=0, atol=1e-12)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 examples"):
        bootstrap(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        bootstrap(torch.tensor([1.0, 2.0]), alpha=1.0)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_many(torch.tensor([[1.0, 2.0]]))  # one example


def test_normalised_effect_closed_form_and_zero_denominator():
    torch.testing.assert_close(normalised_effect(torch.tensor([1.0, 3.0]), 1.0, 3.0), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="expected clean and corrupted metrics to differ"):
        normalised_effect(torch.tensor([1.0]), 2.0, 2.0)
