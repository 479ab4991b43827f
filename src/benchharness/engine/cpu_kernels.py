"""Faster fp32 CPU kernels for the engine's forwards, swapped in for the duration of each call.

What torch runs for a transformers model on a CPU leaves speed behind in two places:

- Linear layers go to the BLAS behind `torch.matmul` (MKL in the official wheels), which on
  AMD EPYC reaches 155-200 GFLOP/s on these models' shapes where oneDNN (`benchharness.engine.onednn`)
  reaches 200-228, and a decode step's small products run up to 30% faster.
- Gated MLPs (`down(act(gate(x)) * up(x))`) run the activation and the product as separate
  passes over [tokens, intermediate]; oneDNN fuses both into the gate and up products.

(torch's `rms_norm` was tried for the RMSNorm modules: on the CPU it decomposes into the same
elementwise passes, and was no faster.)

`plan_cpu_kernels` picks the modules to swap: every `nn.Linear`, and gated MLPs by exact class
(only classes whose forward is known to compute what the replacement computes); `CpuKernels.applied()` swaps their forwards
for the duration of one model call and puts the class's own back afterwards, so the model
(which lm-eval's `hf` model may share) is unchanged between the engine's calls. Only float32
inputs on the CPU take the fast path; anything else calls the module's own forward. The engine
checks once, on a probe, that the logits under these kernels match the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import GELUTanh, SiLUActivation

from benchharness.engine.onednn import onednn_available, onednn_linear, onednn_linear_times

# MLP classes whose forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
_GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP"})
_GATED_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def _linear_forward(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return own(x)
        return onednn_linear(x, module.weight, module.bias)

    return forward


def _mlp_forward(module: nn.Module, activation: str, algorithm: str) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(module).forward.__get__(module)
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return own(x)
        activated = onednn_linear(x, gate.weight, gate.bias, activation, algorithm)
        gated = onednn_linear_times(x, activated, up.weight, up.bias)  # up(x) * activated
        return onednn_linear(gated, down.weight, down.bias)

    return forward


def _mlp_activation(module: nn.Module) -> tuple[str, str] | None:
    """oneDNN's name (and algorithm) for the MLP's activation, or None if it has none."""
    act = getattr(module, "act_fn", None)
    if type(act) is GELUTanh:
        return "gelu", "tanh"
    if type(act) in (SiLUActivation, nn.SiLU):
        return "swish", ""
    return None


@dataclass
class CpuKernels:
    """The module forwards to swap in during the engine's model calls (none: torch's own kernels)."""

    description: str
    swaps: list[tuple[nn.Module, Callable]] = field(default_factory=list)
    linear: Callable[..., torch.Tensor] = torch.nn.functional.linear

    @contextmanager
    def applied(self) -> Iterator[None]:
        for module, forward in self.swaps:
            module.forward = forward  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            for module, _ in self.swaps:
                del module.forward


def plan_cpu_kernels(model: nn.Module, enabled: bool) -> CpuKernels:
    """The swaps for `model` (float32 on the CPU with oneDNN available), else torch's own kernels."""
    parameter = next(model.parameters())
    if not enabled:
        return CpuKernels(description="torch (cpu_kernels=false)")
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return CpuKernels(description=f"torch ({parameter.device.type} {str(parameter.dtype).removeprefix('torch.')})")
    if not onednn_available():
        return CpuKernels(description="torch (this torch build has no oneDNN)")
    swaps: list[tuple[nn.Module, Callable]] = []
    fused: set[str] = set()
    in_mlp: set[int] = set()
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already wrapped by someone else (accelerate's offload hooks): leave it be
        name = type(module).__name__
        activation = _mlp_activation(module) if name in _GATED_MLPS else None
        if activation is not None and all(
            type(getattr(module, p, None)) is nn.Linear for p in _GATED_MLP_LINEARS
        ):
            swaps.append((module, _mlp_forward(module, *activation)))
            in_mlp.update(id(getattr(module, p)) for p in _GATED_MLP_LINEARS)
            fused.add(f"{name}({activation[0]})")
    for module in model.modules():
        if type(module) is nn.Linear and id(module) not in in_mlp and "forward" not in module.__dict__:
            swaps.append((module, _linear_forward(module)))
    description = "onednn linear" + (f"; fused {', '.join(sorted(fused))}" if fused else "")
    return CpuKernels(description=description, swaps=swaps, linear=onednn_linear)
