"""Faster fp32 CPU kernels for the engine's forwards, swapped in for the duration of each call.

What torch runs for a transformers model on a CPU leaves speed behind in two places:

- Linear layers go to the BLAS behind `torch.matmul` (MKL in the official wheels), which on
  AMD EPYC reaches 155-200 GFLOP/s on these models' shapes where oneDNN (`benchharness.engine.onednn`)
  reaches 200-228, and a decode step's small products run up to 30% faster.
- Gated MLPs (`down(act(gate(x)) * up(x))`) allocate two more [tokens, intermediate] tensors,
  for the activation's output and the product; the engine applies both in place on the gate
  product, with the activation's own torch kernel, so the sums are the model's bit for bit.
  (oneDNN can fuse the activation and the product into the gate and up products as post-ops;
  on Qwen2.5-Coder-0.5B's MLPs on these AMD EPYC machines the plain products ran 1.04x faster
  than that at 32-64 rows, 1.09x at 128 and 1.20x at 1024, and level below 32:
  `benchmarks/gated_mlp.py`.)
- oneDNN given a plain weight reorders it into its blocked layout at every call, a pass over
  the weight that a decode step's few rows do not amortise. The weights are packed once
  (`onednn.onednn_pack`, a second copy of them in memory, where it fits `pack_budget_bytes`):
  on Qwen2.5-0.5B's weights 1.4-2.8x faster products at 2-8 rows, 1.1-1.5x at 16-64, 3-5% at
  prefill sizes (`benchmarks/packed_weights.py`), and bit for bit the same outputs from 2 rows.
- Even packed, oneDNN reads a weight from memory and then multiplies the rows, one after the
  other; products of up to `small_rows.MAX_ROWS` rows (decode steps) run on the engine's own
  small-row kernel (`small_rows.py`), which overlaps the two: a third copy of the weights, made
  where both copies fit the budget and the kernel builds on this machine.
- transformers' SDPA attention copies the keys and values of grouped-query models once per query
  head whenever a step runs more than one token a row; `engine/attention.py` hands torch the
  grouped heads as they are, for the same outputs bit for bit.

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

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn
from transformers.activations import GELUTanh, SiLUActivation

from benchharness.engine.attention import grouped_attention
from benchharness.engine.onednn import onednn_available, onednn_linear, onednn_pack
from benchharness.engine.small_rows import MAX_ROWS, SmallRows, load_small_rows, takes_weight

# MLP classes whose forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
_GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP"})
_GATED_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# A single row stays on the plain weight: with a packed weight oneDNN runs one row through
# another code path, whose sums differ from the unpacked kernel's in the last bits.
_PACKED_MIN_ROWS = 2


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def _version(weight: torch.Tensor) -> int | None:
    """The weight's in-place version counter (None for an inference tensor, which keeps none)."""
    return None if weight.is_inference() else weight._version


@dataclass
class _Pack:
    weight: torch.Tensor  # the tensor packed (identity checked at lookup)
    version: int | None  # its version counter when packed
    packed: torch.Tensor
    panels: torch.Tensor | None  # the small-row kernel's copy (small_rows.py), where it runs


class PackedWeights:
    """Packed copies of linear weights, looked up by the weight tensor itself: oneDNN's layout,
    and, with `small_rows`, the small-row kernel's panels (`small_rows.py`) for products of at most
    `small_rows.MAX_ROWS` rows.

    The copies are made once, when the kernels are planned; a weight changed in place later (a
    merged adapter, a test perturbing it) has a new version counter, and is packed again at its
    next use, so a product never runs on stale weights."""

    def __init__(self, weights: Iterable[torch.Tensor] = (), small_rows: SmallRows | None = None) -> None:
        self._packs: dict[int, _Pack] = {}
        self._small = small_rows if small_rows is not None and small_rows.module is not None else None
        for weight in weights:
            self._pack(weight)

    def _pack(self, weight: torch.Tensor) -> _Pack:
        panels = self._small.pack(weight) if self._small is not None and takes_weight(weight) else None
        pack = _Pack(weight, _version(weight), onednn_pack(weight), panels)
        self._packs[id(weight)] = pack
        return pack

    def __len__(self) -> int:
        return len(self._packs)

    @property
    def small_rows(self) -> int:
        """Weights the small-row kernel takes."""
        return sum(p.panels is not None for p in self._packs.values())

    @property
    def panel_bytes(self) -> int:
        """Memory the small-row kernel's copies take."""
        return sum(p.panels.numel() * p.panels.element_size() for p in self._packs.values() if p.panels is not None)

    def _current(self, weight: torch.Tensor) -> _Pack | None:
        pack = self._packs.get(id(weight))
        if pack is None or pack.weight is not weight:
            return None
        if _version(weight) != pack.version:
            pack = self._pack(weight)
        return pack

    def weight_for(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The oneDNN-packed copy of `weight` for a product with `x`, or `weight` itself (not packed
        here, or a single row)."""
        if x.numel() < _PACKED_MIN_ROWS * x.shape[-1]:
            return weight
        pack = self._current(weight)
        return weight if pack is None else pack.packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ weight.T + bias`: the small-row kernel for up to `MAX_ROWS` rows where it has the
        weight (it records no autograd graph: not while autograd records), else `onednn_linear` on
        the packed copy of `weight` where there is one."""
        if self._small is not None and x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled():
            pack = self._current(weight)
            if pack is not None and pack.panels is not None:
                return self._small.linear(x, pack.panels, bias)
        return onednn_linear(x, self.weight_for(weight, x), bias)


def _linear_forward(module: nn.Linear, packs: PackedWeights) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return own(x)
        return packs.linear(x, module.weight, module.bias)

    return forward


def _mlp_forward(module: nn.Module, activate_: Callable[[torch.Tensor], object], packs: PackedWeights) -> Callable[[torch.Tensor], torch.Tensor]:
    own = type(module).forward.__get__(module)
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _fast(x):
            return own(x)
        hidden = packs.linear(x, gate.weight, gate.bias)
        if torch.is_grad_enabled():  # autograd keeps the gate product: no in-place ops on it
            hidden = module.act_fn(hidden) * packs.linear(x, up.weight, up.bias)
        else:
            activate_(hidden)  # in place: act(gate(x)), with the activation module's own kernel
            hidden.mul_(packs.linear(x, up.weight, up.bias))  # act(gate(x)) * up(x), bit for bit
        return packs.linear(hidden, down.weight, down.bias)

    return forward


def _silu_(x: torch.Tensor) -> object:
    return nn.functional.silu(x, inplace=True)


def _gelu_tanh_(x: torch.Tensor) -> object:
    return torch.ops.aten.gelu_(x, approximate="tanh")


def _is_torch_gelu_tanh(function: object) -> bool:
    return (
        isinstance(function, functools.partial)
        and function.func is nn.functional.gelu
        and not function.args
        and function.keywords == {"approximate": "tanh"}
    )


def _mlp_activation(module: nn.Module) -> tuple[str, Callable[[torch.Tensor], object]] | None:
    """The MLP's activation (its name, and an in-place form computing what its module computes), or
    None if it has none known here. GELUTanh computes in Python where asked (`use_gelu_tanh_python`):
    only its torch kernel form is taken."""
    act = getattr(module, "act_fn", None)
    if type(act) is GELUTanh and _is_torch_gelu_tanh(getattr(act, "act", None)):
        return "gelu", _gelu_tanh_
    if type(act) in (SiLUActivation, nn.SiLU):
        return "silu", _silu_
    return None


@dataclass
class CpuKernels:
    """The module forwards to swap in during the engine's model calls (none: torch's own kernels)."""

    description: str
    swaps: list[tuple[nn.Module, Callable]] = field(default_factory=list)
    linear: Callable[..., torch.Tensor] = torch.nn.functional.linear
    packs: PackedWeights = field(default_factory=PackedWeights)
    attention: bool = False  # grouped-query SDPA without key/value copies (attention.py)

    @contextmanager
    def applied(self, skip_padding: bool = False) -> Iterator[None]:
        """The kernels swapped in for the length of the block; `skip_padding`: a decode step's rows
        attend in groups that skip their left padding (attention.row_grouped_sdpa)."""
        for module, forward in self.swaps:
            module.forward = forward  # an instance attribute shadows the class's forward
        try:
            if self.attention:
                with grouped_attention(skip_padding):
                    yield
            else:
                yield
        finally:
            for module, _ in self.swaps:
                del module.forward


def default_pack_budget() -> int:
    """Memory the packed weights may take: a quarter of this machine's (from the total, not what is
    free now, so whether weights are packed does not depend on other jobs)."""
    return int(psutil.virtual_memory().total * 0.25)


def _small_rows(wanted: bool, size: int, budget: int) -> tuple[SmallRows | None, str]:
    """The small-row kernel for weights whose two packed copies take `size` bytes, or why not."""
    if not wanted:
        return None, "small_row_kernel=false"
    if size > budget:
        return None, f"its copy of the weights would pass the {budget / 1e9:.2f} GB the packed weights may take"
    kernel = load_small_rows()
    return kernel, kernel.reason


def plan_cpu_kernels(
    model: nn.Module, enabled: bool, pack_budget_bytes: int | None = None, small_rows: bool = True
) -> CpuKernels:
    """The swaps for `model` (float32 on the CPU with oneDNN available), else torch's own kernels.
    The linear weights are packed when their copy fits `pack_budget_bytes` (None: `default_pack_budget()`);
    with `small_rows`, also into the small-row kernel's panels (small_rows.py) where both copies fit
    and the kernel builds here."""
    parameter = next(model.parameters())
    if not enabled:
        return CpuKernels(description="torch (cpu_kernels=false)")
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return CpuKernels(description=f"torch ({parameter.device.type} {str(parameter.dtype).removeprefix('torch.')})")
    if not onednn_available():
        return CpuKernels(description="torch (this torch build has no oneDNN)")
    mlps: list[tuple[nn.Module, tuple[str, Callable[[torch.Tensor], object]]]] = []
    in_place: set[str] = set()
    in_mlp: set[int] = set()
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already wrapped by someone else (accelerate's offload hooks): leave it be
        name = type(module).__name__
        activation = _mlp_activation(module) if name in _GATED_MLPS else None
        if activation is not None and all(
            type(getattr(module, p, None)) is nn.Linear for p in _GATED_MLP_LINEARS
        ):
            mlps.append((module, activation))
            in_mlp.update(id(getattr(module, p)) for p in _GATED_MLP_LINEARS)
            in_place.add(f"{name}({activation[0]})")
    linears = [
        module for module in model.modules()
        if type(module) is nn.Linear and id(module) not in in_mlp and "forward" not in module.__dict__
    ]
    weights = {id(m.weight): m.weight for m in linears}
    weights.update((id(getattr(m, p).weight), getattr(m, p).weight) for m, _ in mlps for p in _GATED_MLP_LINEARS)
    packable = [w for w in weights.values() if _fast(w)]
    size = sum(w.numel() * w.element_size() for w in packable)
    budget = default_pack_budget() if pack_budget_bytes is None else pack_budget_bytes
    if size <= budget:
        kernel, small = _small_rows(small_rows, 2 * size, budget)
        packs = PackedWeights(packable, kernel)
        packing = f"packed weights ({size / 1e9:.2f} GB)"
        if packs.small_rows:
            packing += f"; small-row kernel up to {MAX_ROWS} rows ({packs.small_rows} weights, {packs.panel_bytes / 1e9:.2f} GB more)"
        else:
            packing += f"; no small-row kernel ({small or 'no weight has a multiple of 16 outputs'})"
    else:
        packs = PackedWeights()
        packing = f"weights not packed (their copy, {size / 1e9:.2f} GB, exceeds the {budget / 1e9:.2f} GB it may take)"
    swaps: list[tuple[nn.Module, Callable]] = [(m, _mlp_forward(m, activation[1], packs)) for m, activation in mlps]
    swaps.extend((m, _linear_forward(m, packs)) for m in linears)
    description = "onednn linear" + (f"; in-place {', '.join(sorted(in_place))}" if in_place else "") + f"; {packing}"
    description += "; sdpa on grouped key/value heads"
    return CpuKernels(description=description, swaps=swaps, linear=packs.linear, packs=packs, attention=True)
