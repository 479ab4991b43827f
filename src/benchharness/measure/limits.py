"""What the machine can do, measured in the same run: matmul FLOP/s and memory bandwidth.

- The matmul limit is the fastest of the fp32 CPU kernels torch offers: its BLAS
  (`torch.matmul`), oneDNN, and oneDNN on a weight packed once into its own layout (the linear
  kernel the benchharness engine uses on the CPU, see `engine/cpu_kernels.py`); elsewhere it is
  `torch.matmul`'s. Which one is recorded.
- The limits are the fastest of their timed runs (`MachineLimits.peak_flops`, `peak_bandwidth`):
  interference only slows a run down, so the maximum estimates the ceiling. The probe's own figures
  are medians, so on a busy machine efficiency reads low rather than above 1.
- A run measures them more than once (at its start and after each model, `best_of`): a shared
  machine can be slow for the few seconds of one measurement and fast while a model runs, and
  a peak measured only in a slow moment puts efficiencies above 1. Rows computed against an
  earlier, lower peak are restated against the best one (`rescale_efficiencies`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from benchharness.engine.onednn import onednn_available, onednn_linear, onednn_pack
from benchharness.measure.memory import MIB
from benchharness.measure.timing import Summary, repeat_timed, summarize, synchronizer


@dataclass(frozen=True)
class MachineLimits:
    """What the machine can do, measured in this run: the denominators of the efficiency figures."""

    device: str
    dtype: str
    matmul_flops: Summary
    memory_bandwidth: Summary
    matmul_size: int
    bandwidth_bytes: int
    matmul_kernel: str = "torch.matmul"  # the kernel whose FLOP/s are `matmul_flops`

    @property
    def peak_flops(self) -> float:
        """The ceiling for efficiency: the fastest timed run. Interference (other processes, clock
        changes) only ever slows a run down, so the maximum is the best estimate of what the machine
        can do; the median would move with the load of the moment."""
        return self.matmul_flops.max

    @property
    def peak_bandwidth(self) -> float:
        """Bytes/s ceiling, the fastest timed run, for the same reason as `peak_flops`."""
        return self.memory_bandwidth.max

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_flops": self.peak_flops, "peak_bandwidth": self.peak_bandwidth}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MachineLimits:
        """The limits `to_dict` wrote (a manifest's `limits`); extra keys are ignored."""
        return cls(
            device=str(data["device"]),
            dtype=str(data["dtype"]),
            matmul_flops=Summary(**data["matmul_flops"]),
            memory_bandwidth=Summary(**data["memory_bandwidth"]),
            matmul_size=int(data["matmul_size"]),
            bandwidth_bytes=int(data["bandwidth_bytes"]),
            matmul_kernel=str(data.get("matmul_kernel", "torch.matmul")),
        )


def best_of(earlier: MachineLimits, later: MachineLimits) -> MachineLimits:
    """Each limit from whichever of two measurements reached higher (the matmul figures with
    their kernel and size, the bandwidth with its buffer size)."""
    matmul = later if later.peak_flops > earlier.peak_flops else earlier
    bandwidth = later if later.peak_bandwidth > earlier.peak_bandwidth else earlier
    return replace(matmul, memory_bandwidth=bandwidth.memory_bandwidth, bandwidth_bytes=bandwidth.bandwidth_bytes)


def rescale_efficiencies(rows: Iterable[dict[str, Any]], before: MachineLimits, after: MachineLimits) -> None:
    """Restate throughput rows' `flops_efficiency` and `bandwidth_efficiency`, computed against
    `before`'s peaks, against `after`'s (in place). Both are achieved / peak, so the ratio of the
    peaks restates them exactly, whatever devices factor a row's peak was multiplied by."""
    factors = {
        "flops_efficiency": before.peak_flops / after.peak_flops,
        "bandwidth_efficiency": before.peak_bandwidth / after.peak_bandwidth,
    }
    for row in rows:
        for column, factor in factors.items():
            value = _number(row.get(column))
            if value is not None:
                row[column] = value * factor


def _number(value: Any) -> float | None:
    """A table cell as a float; None for an empty one (None, "", NaN: a row without that figure)."""
    if value is None or value == "":
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _default_matmul_size(device: torch.device) -> int:
    # Large enough to be compute bound, small enough for a 2-core CPU to finish one in ~0.1 s.
    return 2048 if device.type == "cpu" else 8192


def measure_matmul_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    min_seconds: float = 2.0,
    warmup: int = 2,
    min_reps: int = 5,
    kernel: str = "torch.matmul",
) -> Summary:
    """FLOP/s of square `size` x `size` matmuls (2*size^3 FLOPs each), per timed run.

    `kernel` is "torch.matmul", "onednn" (oneDNN's linear, float32 on the CPU only) or "onednn packed"
    (the same on a weight packed beforehand, as the engine's linear layers run). One timed
    run is as many matmuls as fill about 50 ms, so launch overhead on a GPU does not count.
    """
    dev = torch.device(device)
    n = size or _default_matmul_size(dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    sync = synchronizer(dev)

    if kernel == "onednn":

        def one() -> None:
            onednn_linear(a, b)

    elif kernel == "onednn packed":
        packed = onednn_pack(b)

        def one() -> None:
            onednn_linear(a, packed)

    elif kernel == "torch.matmul":
        out = torch.empty(n, n, device=dev, dtype=dtype)

        def one() -> None:
            torch.matmul(a, b, out=out)

    else:
        raise ValueError(f"unknown matmul kernel {kernel!r}: 'torch.matmul', 'onednn' or 'onednn packed'")

    for _ in range(max(warmup, 1)):
        one()
    sync()
    start = time.perf_counter()
    one()
    sync()
    inner = max(1, math.ceil(0.05 / max(time.perf_counter() - start, 1e-9)))

    def run() -> None:
        for _ in range(inner):
            one()

    with torch.inference_mode():
        timed = repeat_timed(run, warmup=0, min_reps=min_reps, min_seconds=min_seconds, sync=sync)
    return summarize([2.0 * n**3 * inner / t.seconds for t in timed])


def measure_memory_bandwidth(
    device: str | torch.device = "cpu",
    nbytes: int | None = None,
    min_seconds: float = 2.0,
    warmup: int = 2,
    min_reps: int = 5,
) -> Summary:
    """Read bandwidth in bytes/s: a sum over a float32 buffer far larger than any cache.

    Reading (not copying) is what a decode step does with the weights, so this is the fitting limit.
    """
    dev = torch.device(device)
    total = nbytes or (256 * MIB if dev.type == "cpu" else 2048 * MIB)
    buffer = torch.ones(total // 4, device=dev, dtype=torch.float32)
    sync = synchronizer(dev)
    with torch.inference_mode():
        timed = repeat_timed(lambda: buffer.sum(), warmup=warmup, min_reps=min_reps, min_seconds=min_seconds, sync=sync)
    return summarize([buffer.numel() * 4 / t.seconds for t in timed])


def measure_machine_limits(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, min_seconds: float = 2.0
) -> MachineLimits:
    """Matmul FLOP/s in the model's dtype (the fastest kernel, see `matmul_kernels`) and memory
    bandwidth, both on `device`."""
    dev = torch.device(device)
    size = _default_matmul_size(dev)
    nbytes = 256 * MIB if dev.type == "cpu" else 2048 * MIB
    measured = {
        kernel: measure_matmul_flops(dev, dtype, size=size, min_seconds=min_seconds, kernel=kernel)
        for kernel in matmul_kernels(dev, dtype)
    }
    fastest = max(measured, key=lambda kernel: measured[kernel].max)
    return MachineLimits(
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        matmul_flops=measured[fastest],
        memory_bandwidth=measure_memory_bandwidth(dev, nbytes=nbytes, min_seconds=min_seconds),
        matmul_size=size,
        bandwidth_bytes=nbytes,
        matmul_kernel=fastest,
    )


def matmul_kernels(device: str | torch.device, dtype: torch.dtype) -> list[str]:
    """The matmul kernels a model may run on: oneDNN too (plain and packed weights) for float32 on a
    CPU (when torch has it)."""
    if torch.device(device).type == "cpu" and dtype == torch.float32 and onednn_available():
        return ["torch.matmul", "onednn", "onednn packed"]
    return ["torch.matmul"]
