"""Finding the token budget per forward pass (`batch_size: auto`), by measurement.

- CUDA: start high and halve on out-of-memory with a worst-case-shaped forward;
  the scoring loop also halves again if a real batch runs out of memory.
- CPU: memory is rarely the limit; throughput is. Time body forwards of growing
  size and take the smallest budget whose tokens/s is within a few percent of the
  best seen (bigger batches then only add padding and latency).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from benchharness.engine.head import SplitModel

_CPU_PROBE_ROW_TOKENS = 64
_CPU_PROBE_SECONDS = 4.0
_CPU_GAIN_THRESHOLD = 0.05
_CPU_MIN_BUDGET = 256
_CPU_MAX_BUDGET = 8192
_CUDA_START_BUDGET = 65536
_CUDA_PROBE_LENGTH = 2048


@dataclass
class BudgetChoice:
    """The chosen budget and how it was found (goes into the run manifest)."""

    token_budget: int
    method: str
    probes: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _body_forward(split: SplitModel, rows: int, length: int) -> None:
    vocab = int(split.output_layer.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=generator).to(split.device)
    with torch.no_grad():
        hidden = split.body(input_ids=ids, use_cache=False).last_hidden_state
        split.log_probs(hidden[:, -1])  # the output layer on one row per sequence, as scoring does


def probe_cpu_budget(split: SplitModel) -> BudgetChoice:
    """Time forwards of 1, 2, 4, ... rows of 64 tokens until throughput stops improving."""
    _body_forward(split, 1, _CPU_PROBE_ROW_TOKENS)  # warm-up: allocator, thread pool, kernels
    probes: list[dict[str, float]] = []
    spent = 0.0
    rows = 1
    while rows * _CPU_PROBE_ROW_TOKENS <= _CPU_MAX_BUDGET:
        start = time.perf_counter()
        _body_forward(split, rows, _CPU_PROBE_ROW_TOKENS)
        seconds = time.perf_counter() - start
        spent += seconds
        tokens = rows * _CPU_PROBE_ROW_TOKENS
        probes.append({"tokens": float(tokens), "seconds": seconds, "tokens_per_s": tokens / seconds})
        if len(probes) >= 2 and probes[-1]["tokens_per_s"] < probes[-2]["tokens_per_s"] * (1 + _CPU_GAIN_THRESHOLD):
            break
        if spent > _CPU_PROBE_SECONDS:
            break
        rows *= 2
    best = max(p["tokens_per_s"] for p in probes)
    good_enough = [p for p in probes if p["tokens_per_s"] >= best * (1 - _CPU_GAIN_THRESHOLD)]
    budget = max(_CPU_MIN_BUDGET, int(min(p["tokens"] for p in good_enough)))
    return BudgetChoice(token_budget=budget, method="cpu-throughput-probe", probes=probes)


def probe_cuda_budget(split: SplitModel, max_length: int) -> BudgetChoice:
    """Halve from a large budget until a worst-case forward fits in GPU memory."""
    length = min(max_length, _CUDA_PROBE_LENGTH)
    budget = _CUDA_START_BUDGET
    probes: list[dict[str, float]] = []
    while budget >= length:
        try:
            _body_forward(split, max(1, budget // length), length)
            probes.append({"tokens": float(budget), "fits": 1.0})
            torch.cuda.empty_cache()
            return BudgetChoice(token_budget=budget, method="cuda-oom-backoff", probes=probes)
        except torch.OutOfMemoryError:
            probes.append({"tokens": float(budget), "fits": 0.0})
            torch.cuda.empty_cache()
            budget //= 2
    return BudgetChoice(token_budget=length, method="cuda-oom-backoff", probes=probes)


def find_token_budget(split: SplitModel, max_length: int) -> BudgetChoice:
    if split.device.type == "cuda":
        return probe_cuda_budget(split, max_length)
    return probe_cpu_budget(split)


def measure_matmul_flops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul FLOP/s (best of `repeats` square products), the limit efficiency is measured against."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
