"""Statistics for scores: standard error, seeded bootstrap confidence intervals, paired tests.

Everything here is a pure function of its inputs and a seed, so a report built twice from
the same runs shows the same intervals and p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def mean_stderr(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean: sample standard deviation (ddof=1) over sqrt(n).

    This is the same estimator lm-eval reports as `*_stderr`. With fewer than two
    values there is no spread to estimate, so the result is NaN rather than a false 0.
    """
    arr = _as_array(values)
    n = arr.size
    if n < 2:
        return float("nan")
    return float(arr.std(ddof=1) / math.sqrt(n))


def bootstrap_ci(
    correct: Sequence[float] | np.ndarray, seed: int, n_boot: int = 1000, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval (default 95%) of the mean of `correct`.

    scipy's `bootstrap` resamples the items with replacement `n_boot` times with a generator
    seeded by `seed`, so the interval is reproducible. Returns (nan, nan) for an empty input.
    """
    arr = _as_array(correct)
    if arr.size == 0:
        return float("nan"), float("nan")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    low, high = np.quantile(_bootstrap_means(arr, seed, n_boot), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _bootstrap_means(arr: np.ndarray, seed: int, n_boot: int) -> np.ndarray:
    """The means of `n_boot` resamples of `arr`: scipy's bootstrap distribution of the mean.

    Resamples are drawn in batches so a 14k-item suite with 10k resamples stays within a few MB;
    the batch size only groups the draws of one generator, so the resamples are those of one draw.
    """
    if arr.size == 1:  # scipy wants two items; every resample of one item is that item
        return np.full(n_boot, float(arr[0]))
    batch = max(1, 2_000_000 // max(arr.size, 1))
    result = sps.bootstrap((arr,), np.mean, n_resamples=n_boot, method="percentile", vectorized=True, axis=-1,
                           batch=batch, rng=np.random.default_rng(seed))
    return np.asarray(result.bootstrap_distribution, dtype=float)


@dataclass(frozen=True)
class PairedResult:
    """Outcome of a paired comparison of two systems on the same items (a minus b)."""

    test: str  # "mcnemar-exact" or "paired-bootstrap"
    n: int  # number of paired items
    mean_a: float
    mean_b: float
    diff: float  # mean_a - mean_b
    p_value: float
    only_a: int = 0  # items a got right and b got wrong (McNemar only)
    only_b: int = 0  # items b got right and a got wrong (McNemar only)


def mcnemar_exact(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> PairedResult:
    """Exact (binomial) McNemar test on paired right/wrong outcomes.

    Only discordant items carry information: under the null hypothesis that both systems
    are equally accurate, the items only `a` got right are Binomial(discordant, 1/2).
    The exact form is used because small suites often have few discordant items, where
    the chi-square approximation is poor.
    """
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be 1-D and equally long, got {a.shape} and {b.shape}")
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(sps.binomtest(only_a, discordant, 0.5).pvalue)
    n = int(a.size)
    mean_a = float(a.mean()) if n else float("nan")
    mean_b = float(b.mean()) if n else float("nan")
    return PairedResult("mcnemar-exact", n, mean_a, mean_b, mean_a - mean_b, min(1.0, p), only_a, only_b)


def paired_bootstrap(
    values_a: Sequence[float] | np.ndarray,
    values_b: Sequence[float] | np.ndarray,
    seed: int,
    n_boot: int = 1000,
) -> PairedResult:
    """Two-sided paired bootstrap test of mean(a) - mean(b) for per-item scores of any kind.

    Items are resampled jointly (keeping each pair together). The p-value is the share of
    resampled differences, shifted to be centred on zero (the null), that are at least as
    far from zero as the observed difference; the +1 terms keep it from being exactly 0.
    """
    a = _as_array(values_a)
    b = _as_array(values_b)
    if a.shape != b.shape:
        raise ValueError(f"paired values must be equally long, got {a.size} and {b.size}")
    n = int(a.size)
    if n == 0:
        nan = float("nan")
        return PairedResult("paired-bootstrap", 0, nan, nan, nan, nan)
    d = a - b
    observed = float(d.mean())
    boot = _bootstrap_means(d, seed, n_boot)
    extreme = int(np.sum(np.abs(boot - observed) >= abs(observed) - 1e-12))
    p = (extreme + 1) / (n_boot + 1)
    return PairedResult("paired-bootstrap", n, float(a.mean()), float(b.mean()), observed, min(1.0, p))


def paired_test(values_a: Sequence[float], values_b: Sequence[float], seed: int, n_boot: int = 1000) -> PairedResult:
    """McNemar when both systems' per-item outcomes are right/wrong, else a paired bootstrap."""
    a = _as_array(values_a)
    b = _as_array(values_b)
    binary = bool(np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b, (0.0, 1.0))))
    if binary:
        return mcnemar_exact(a.astype(bool), b.astype(bool))
    return paired_bootstrap(a, b, seed=seed, n_boot=n_boot)


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values over one family of tests (NaN entries are not tests).

    Comparing an adjusted value with alpha controls the chance of any false "significant" in the
    family at alpha (Holm 1979); it is uniformly more powerful than Bonferroni and needs no
    independence between the tests, which pairwise comparisons on shared items do not have.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out
