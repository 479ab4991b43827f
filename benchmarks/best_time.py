"""The fastest of several timed batches of calls: for kernel benchmarks that compare two ways
of computing one thing on a machine whose speed drifts (interference only slows a batch down)."""

from __future__ import annotations

import time
from collections.abc import Callable

from benchharness.measure.timing import repeat_timed


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """Seconds per call: the fastest of `repeats` timed batches of calls (about 0.2 s each)."""
    call()
    start = time.perf_counter()
    call()
    inner = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))

    def batch() -> None:
        for _ in range(inner):
            call()

    return min(t.seconds for t in repeat_timed(batch, warmup=0, min_reps=repeats, min_seconds=0.0)) / inner
