"""Statistics against values computed by hand or by scipy on small fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from benchharness.scorers.stats import bootstrap_ci, mcnemar_exact, mean_stderr, paired_bootstrap, paired_test


def test_mean_stderr_by_hand() -> None:
    # [1, 0, 1, 1]: mean 0.75, sample variance (3*0.0625 + 0.5625)/3 = 0.25, so stderr = 0.5/2.
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)


def test_mean_stderr_matches_scipy_sem() -> None:
    values = [0.2, 0.9, 0.4, 0.4, 1.0, 0.0, 0.35]
    assert mean_stderr(values) == pytest.approx(float(sps.sem(values)), rel=1e-12)


def test_mean_stderr_needs_two_values() -> None:
    assert math.isnan(mean_stderr([1.0]))
    assert math.isnan(mean_stderr([]))


def test_bootstrap_ci_is_seeded() -> None:
    data = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 5
    assert bootstrap_ci(data, seed=3) == bootstrap_ci(data, seed=3)
    assert bootstrap_ci(data, seed=3) != bootstrap_ci(data, seed=4)


def test_bootstrap_ci_constant_data_has_zero_width() -> None:
    assert bootstrap_ci([1, 1, 1, 1], seed=0) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci([], seed=0))


def test_bootstrap_ci_agrees_with_scipy_and_normal_approximation() -> None:
    # 120 right out of 400: the percentile bootstrap, scipy's percentile bootstrap and the
    # normal interval p ± 1.96·sqrt(p(1-p)/n) = 0.3 ± 0.0449 must all agree closely.
    data = np.array([1] * 120 + [0] * 280, dtype=float)
    low, high = bootstrap_ci(data, seed=0, n_boot=4000)
    ref = sps.bootstrap((data,), np.mean, n_resamples=4000, method="percentile", random_state=1).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.006)
    assert high == pytest.approx(ref.high, abs=0.006)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)
    assert low == pytest.approx(0.3 - half, abs=0.008)
    assert high == pytest.approx(0.3 + half, abs=0.008)
    assert low < 0.3 < high


def test_bootstrap_ci_alpha_widens_interval() -> None:
    data = [1, 0] * 50
    l95, h95 = bootstrap_ci(data, seed=1, alpha=0.05)
    l80, h80 = bootstrap_ci(data, seed=1, alpha=0.20)
    assert l95 <= l80 < h80 <= h95


def test_mcnemar_exact_by_hand() -> None:
    # 8 items only A got right, 2 only B, 5 both, 3 neither.
    a = [1] * 8 + [0] * 2 + [1] * 5 + [0] * 3
    b = [0] * 8 + [1] * 2 + [1] * 5 + [0] * 3
    res = mcnemar_exact(a, b)
    assert (res.only_a, res.only_b, res.n) == (8, 2, 18)
    # Two-sided exact: 2 * P(X <= 2 | X ~ Bin(10, 1/2)) = 2 * (1 + 10 + 45) / 1024.
    assert res.p_value == pytest.approx(112 / 1024)
    assert res.p_value == pytest.approx(sps.binomtest(8, 10, 0.5).pvalue)
    assert res.diff == pytest.approx(13 / 18 - 7 / 18)


def test_mcnemar_no_discordant_items_is_p_one() -> None:
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0


def test_mcnemar_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])


def test_paired_bootstrap_identical_and_shifted() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(200)
    assert paired_bootstrap(a, a, seed=0).p_value == 1.0
    noise = rng.normal(0, 0.05, 200)
    shifted = paired_bootstrap(a + 0.1, a + noise, seed=0, n_boot=2000)
    assert shifted.p_value < 0.01
    assert shifted.diff == pytest.approx(0.1 - float(noise.mean()))
    assert shifted.mean_a == pytest.approx(float(a.mean()) + 0.1)


def test_paired_bootstrap_matches_t_test_on_noise() -> None:
    # With a real but small effect, the bootstrap p-value is close to the paired t-test's.
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 1.0, 300)
    b = a + rng.normal(-0.12, 1.0, 300)
    boot = paired_bootstrap(a, b, seed=0, n_boot=4000)
    t_p = float(sps.ttest_rel(a, b).pvalue)
    assert 0.001 < t_p < 0.5
    assert boot.p_value == pytest.approx(t_p, abs=0.03)


def test_paired_test_dispatches_on_binary_outcomes() -> None:
    assert paired_test([1, 0, 1], [0, 0, 1], seed=0).test == "mcnemar-exact"
    assert paired_test([0.5, 0.0, 1.0], [0.0, 0.0, 1.0], seed=0).test == "paired-bootstrap"


def test_holm_adjustment_by_hand() -> None:
    from benchharness.scorers.stats import holm_adjust
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(adjusted[4])  # not a test: not counted in the family either
    assert holm_adjust([0.6, 0.5]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert len(holm_adjust([])) == 0


@pytest.mark.parametrize("n", [1, 2, 57, 228, 3000])
def test_scipy_bootstrap_draws_are_the_published_ones(n: int) -> None:
    """The intervals come from scipy's bootstrap now; its resamples are the ones the harness drew by
    hand before (one generator, rows of `n` indices), so every interval in results/ stays the same."""
    rng = np.random.default_rng(n)
    values = (rng.random(n) < 0.4).astype(float)
    draws = np.random.default_rng(1234)
    means = np.concatenate([values[draws.integers(0, n, size=(min(1000, 2_000_000 // n), n))].mean(axis=1)
                            for _ in range(0, 1000, min(1000, 2_000_000 // n))])[:1000]
    assert bootstrap_ci(values, seed=1234) == tuple(float(q) for q in np.quantile(means, [0.025, 0.975]))
