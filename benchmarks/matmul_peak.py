"""Print this machine's measured limits: matmul FLOP/s per dtype and memory bandwidth.

    python benchmarks/matmul_peak.py [--device cpu] [--seconds 2] [--dtypes float32,bfloat16]

These are the denominators of throughput.csv's efficiency columns (benchharness.measure.limits; for fp32 on
a CPU the faster of torch.matmul and oneDNN, the kernel the engine's linear layers use). The copy
bandwidth is printed beside the read bandwidth the harness uses, to show how far apart they are.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchharness.measure.hardware import hardware_info
from benchharness.measure.limits import matmul_kernels, measure_matmul_flops, measure_memory_bandwidth
from benchharness.measure.timing import repeat_timed, summarize, synchronizer


def copy_bandwidth(device: str, nbytes: int, seconds: float) -> float:
    """Median bytes/s of a tensor copy, counting the read and the write."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timed = repeat_timed(lambda: dst.copy_(src), warmup=2, min_reps=5, min_seconds=seconds, sync=synchronizer(device))
    return summarize([2 * nbytes / t.seconds for t in timed]).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    print(json.dumps(hardware_info(), indent=2))
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        for kernel in matmul_kernels(args.device, dtype):
            started = time.perf_counter()
            s = measure_matmul_flops(args.device, dtype, min_seconds=args.seconds, kernel=kernel)
            print(f"matmul {name:<9} {kernel:<12} median {s.median / 1e9:8.1f} GFLOP/s  (min {s.min / 1e9:.1f}, "
                  f"max {s.max / 1e9:.1f}, n {s.n}, {time.perf_counter() - started:.1f} s)")
    nbytes = 256 * 1024 * 1024 if args.device == "cpu" else 2048 * 1024 * 1024
    read = measure_memory_bandwidth(args.device, nbytes=nbytes, min_seconds=args.seconds)
    print(f"read bandwidth   median {read.median / 1e9:8.1f} GB/s  (min {read.min / 1e9:.1f}, max {read.max / 1e9:.1f},"
          f" n {read.n})")
    print(f"copy bandwidth   median {copy_bandwidth(args.device, nbytes, args.seconds) / 1e9:8.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
