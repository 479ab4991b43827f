"""oneDNN's fp32 linear kernel, which torch ships beside its BLAS.

On the CPU, `torch.matmul` and `nn.Linear` call the BLAS torch was built with (MKL in the
official wheels); oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's
CPU backend emits) is a second fp32 kernel. On AMD EPYC it is 10-40% faster on transformer
shapes. The engine runs its linear layers on it (`engine/cpu_kernels.py`), so the machine
limits measure both (`measure.limits.measure_machine_limits`).

Called with a plain weight, the kernel reorders the weight into its blocked layout at every
call: a pass over the weight that costs as much as the product itself when few rows multiply
it (a decode step). `onednn_pack` does that reorder once; the kernel then takes the packed
weight as it is, and computes the same sums: bit for bit the same output for two or more
rows (a single row takes another code path, whose sums differ in the last bits).
"""

from __future__ import annotations

import torch


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.nn.functional.linear(x, weight, bias)` through oneDNN (float32 CPU tensors)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# The row count oneDNN is told to expect when it picks the packed layout. Any hint from 8 up
# gives the same layout speed from 4 rows to 1024 on these CPUs (benchmarks/packed_weights.py).
_PACK_ROWS_HINT = 64


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in], float32 on the CPU) in oneDNN's blocked layout: a new tensor of the same
    size, which `onednn_linear` takes in place of the weight."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT)
