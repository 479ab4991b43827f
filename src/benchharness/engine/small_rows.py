"""The engine's small-row fp32 kernel (`small_rows.cpp`): products of a decode step's few rows.

oneDNN's packed kernel (`onednn.py`) pays for a weight's stream from memory and then for the
rows' FLOPs, one after the other: on Qwen2.5-0.5B's 4864x896 weights (each read cold, 2 threads,
this AMD EPYC) about 1.9 ms plus 0.06 ms a row. The kernel here streams each weight as panels of
16 output columns and prefetches the next panel while the first rows multiply the current one, so
the two overlap: on Qwen2.5-Coder-0.5B's shapes 1.2-2.9x faster at 1-16 rows, 1.2-1.5x at 40,
1.06-1.37x at 64, 0.94-1.37x at 128 (`benchmarks/small_rows.py`). The engine takes it for
products of at most `MAX_ROWS` rows and keeps oneDNN for the rest (prefills and scoring passes,
where oneDNN's blocking for large row counts is ahead).

Every output is one fused multiply-add chain over the inputs in order, so a row's result does not
depend on the other rows of the product (oneDNN's do not either, from 2 rows); it differs from
oneDNN's and MKL's sums in the last bits, as theirs differ from each other's.

The kernel is C++ with AVX2 intrinsics, compiled on first use by torch's extension builder (a
C++ compiler and ninja are needed) into the harness cache (`$BENCHHARNESS_CACHE/kernels`), and
loaded from there afterwards. `load_small_rows()` says why it is not available where it is not
(a CPU without AVX2/FMA, no compiler: `unbuildable_reason`): the engine then runs oneDNN for every product and its
description (in each run's manifest) says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("small_rows.cpp")
PANEL = 16  # output columns per packed panel (the kernel's two AVX2 registers)
# Products of up to this many rows take the kernel: a decode step's (64 rows by default). It is
# ahead of oneDNN's packed kernel up to here on these CPUs, not everywhere past (benchmarks/small_rows.py).
MAX_ROWS = 64


@dataclass(frozen=True)
class SmallRows:
    """The loaded kernel, or why there is none (`module` None)."""

    module: ModuleType | None
    reason: str = ""

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` [out, in] as the kernel's panels [out / 16, in, 16] (a new tensor)."""
        assert self.module is not None
        return self.module.pack(weight)

    def linear(self, x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ weight.T + bias` for rows `x` [..., in] and the weight's panels."""
        assert self.module is not None
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = self.module.linear(rows, panels)
        if bias is not None:
            out.add_(bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def takes_weight(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this weight: 2-d float32 on the CPU, a multiple of 16 outputs."""
    return weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.shape[0] % PANEL == 0


def _put_pip_ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; the pip package's binary is not on it
    when the virtual environment's Python runs without the environment activated."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def unbuildable_reason() -> str:
    """Why this machine cannot build or run the kernel ('' if it can): a CPU without AVX2, or no
    C++ compiler where torch's extension builder looks for one ($CXX, else `c++`)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU's vector capability is {capability}, the kernel needs AVX2 and FMA"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler to build it: `{compiler}` ($CXX, else c++) is not on PATH"
    return ""


def load_small_rows(cache_dir: Path | None = None) -> SmallRows:
    """Build (once per source version, into the harness cache) and load the kernel; where that
    cannot be done here, a `SmallRows` without it, saying why."""
    reason = unbuildable_reason()
    if reason:
        return SmallRows(None, reason)
    from benchharness.suites.registry import default_cache_dir  # here: the engine need not import the suites

    source = SOURCE.read_bytes() + Path(__file__).read_bytes()  # the flags are here
    version = hashlib.sha256(source + torch.__version__.encode()).hexdigest()[:12]
    build = (cache_dir or default_cache_dir()) / "kernels" / f"small_rows-{version}"
    build.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        _put_pip_ninja_on_path()
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return SmallRows(None, "ninja is not installed (pip install ninja) to build it")
    try:
        module = cpp_extension.load(
            name=f"benchharness_small_rows_{version}",
            sources=[str(SOURCE)],
            # -fopenmp: at::parallel_for's loop is compiled here, and runs on torch's OpenMP threads.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return SmallRows(None, f"building it failed ({first}); build folder {build}")
    return SmallRows(module)
