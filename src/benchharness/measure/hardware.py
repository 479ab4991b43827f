"""Facts about the machine for the manifest: CPU model and flags, cores, memory, accelerators."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil
import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    # The flags that decide CPU matmul speed per dtype (fp32 FMA, bf16, AMX).
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def hardware_info() -> dict[str, Any]:
    """The machine, for the manifest: CPU, cores, memory, GPU(s), torch threads and versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "cpu_cores_usable": usable,
        "memory_total_gb": round(psutil.virtual_memory().total / 1024**3, 2),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {"index": index, "name": props.name, "memory_gb": round(props.total_memory / 1024**3, 2),
                 "capability": f"{props.major}.{props.minor}"}
            )
    return info
