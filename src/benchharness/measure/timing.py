"""Timing: order statistics of a sample, timed repetitions after warm-up, device synchronisation.

Principles (design.md, "Measurement principles"): warm up before timing, repeat until both a
minimum count and a minimum duration are reached, report medians and spreads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Summary:
    """Order statistics of a sample; percentiles by linear interpolation (numpy's default)."""

    median: float
    min: float
    max: float
    p25: float
    p75: float
    p90: float
    p99: float
    mean: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, extremes, quartiles, p90, p99 and mean of `values` (at least one value)."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("summarize() needs at least one value")
    if not np.all(np.isfinite(data)):
        raise ValueError("summarize() got a NaN or infinite value")
    p25, p50, p75, p90, p99 = np.percentile(data, [25, 50, 75, 90, 99])
    return Summary(
        median=float(p50), min=float(data.min()), max=float(data.max()), p25=float(p25), p75=float(p75),
        p90=float(p90), p99=float(p99), mean=float(data.mean()), n=int(data.size),
    )


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for queued device work, so a clock read after it sees the work done."""
    kind = torch.device(device).type
    if kind == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if kind == "mps":
        return torch.mps.synchronize
    return lambda: None


@dataclass(frozen=True)
class Timed:
    """One timed run: its wall time and whatever the run returned."""

    seconds: float
    value: Any


def repeat_timed(
    run: Callable[[], T],
    *,
    warmup: int,
    min_reps: int,
    min_seconds: float,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timed]:
    """Call `run` `warmup` times untimed, then time it until both `min_reps` and `min_seconds` are met.

    Only the timed calls are returned, so warm-up never reaches a statistic. `sync` runs before each
    clock read (device work is asynchronous); `clock` is a parameter so tests can drive it.
    """
    for _ in range(warmup):
        run()
    sync()
    timed: list[Timed] = []
    total = 0.0
    while len(timed) < min_reps or total < min_seconds:
        start = clock()
        value = run()
        sync()
        elapsed = clock() - start
        total += elapsed
        timed.append(Timed(seconds=elapsed, value=value))
    return timed
