"""The token budget per forward pass (`batch_size: auto`).

- CPU: a fixed budget (`CPU_TOKEN_BUDGET`), the same on every machine and at any load, so that
  which requests share a forward, and the float noise of each score, never depend on how busy
  the machine was. Memory is rarely the limit on a CPU; the fixed cost of each forward is, and
  at 1024 tokens it is a few percent for the models this harness runs on CPUs (measured with
  `probe_cpu_budget`, which a run can still ask for with `max_batch_tokens=probe`: 256-1024 gave
  the same speed).
- CUDA: start high and halve on out-of-memory with a worst-case-shaped forward (deterministic
  for a given GPU, model and free memory); the scoring loop also halves again if a real batch
  runs out of memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from benchharness.engine.head import SplitModel

CPU_TOKEN_BUDGET = 1024
_CPU_PROBE_ROW_TOKENS = 16
_CPU_PROBE_ROWS = (1, 4)
_CPU_PROBE_REPEATS = 2
_CPU_OVERHEAD_SHARE = 0.05
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


def _body_forward(split: SplitModel, rows: int, length: int, output_layer: bool) -> None:
    vocab = int(split.output_layer.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=generator).to(split.device)
    with torch.inference_mode():
        hidden = split.forward_body(input_ids=ids, use_cache=False).last_hidden_state
        if output_layer:  # memory: one row of logits per sequence, as scoring may hold
            split.log_probs(hidden[:, -1])


def probe_cpu_budget(split: SplitModel) -> BudgetChoice:
    """Fit forward time as `fixed + per_token * tokens` from two small shapes, then take the
    smallest power-of-two budget at which the fixed per-forward cost (Python, kernel launches,
    small-matrix inefficiency) is at most 5% of a forward. Costs ~200 tokens of compute."""
    # The body only: the output layer runs apart, on the scored rows of many batches at once.
    _body_forward(split, 1, _CPU_PROBE_ROW_TOKENS, output_layer=False)  # warm-up: allocator, thread pool, kernels
    probes: list[dict[str, float]] = []
    for rows in _CPU_PROBE_ROWS:
        best = float("inf")
        for _ in range(_CPU_PROBE_REPEATS):  # min of repeats: other load on the machine only adds time
            start = time.perf_counter()
            _body_forward(split, rows, _CPU_PROBE_ROW_TOKENS, output_layer=False)
            best = min(best, time.perf_counter() - start)
        probes.append({"tokens": float(rows * _CPU_PROBE_ROW_TOKENS), "seconds": best})
    (n1, t1), (n2, t2) = ((p["tokens"], p["seconds"]) for p in probes)
    per_token = max((t2 - t1) / (n2 - n1), 1e-9)
    fixed = max(t1 - per_token * n1, 0.0)
    needed = fixed * (1 - _CPU_OVERHEAD_SHARE) / (_CPU_OVERHEAD_SHARE * per_token)
    budget = _CPU_MIN_BUDGET
    while budget < needed and budget < _CPU_MAX_BUDGET:
        budget *= 2
    probes.append({"fixed_seconds": fixed, "seconds_per_token": per_token})
    return BudgetChoice(token_budget=budget, method="cpu-overhead-fit", probes=probes)


def probe_cuda_budget(split: SplitModel, max_length: int) -> BudgetChoice:
    """Halve from a large budget until a worst-case forward fits in GPU memory."""
    length = min(max_length, _CUDA_PROBE_LENGTH)
    budget = _CUDA_START_BUDGET
    probes: list[dict[str, float]] = []
    while budget >= length:
        try:
            _body_forward(split, max(1, budget // length), length, output_layer=True)
            probes.append({"tokens": float(budget), "fits": 1.0})
            torch.cuda.empty_cache()
            return BudgetChoice(token_budget=budget, method="cuda-oom-backoff", probes=probes)
        except torch.OutOfMemoryError:
            probes.append({"tokens": float(budget), "fits": 0.0})
            torch.cuda.empty_cache()
            budget //= 2
    return BudgetChoice(token_budget=length, method="cuda-oom-backoff", probes=probes)


def find_token_budget(split: SplitModel, max_length: int, probe: bool = False) -> BudgetChoice:
    """CUDA: out-of-memory backoff. CPU: the fixed budget, or the timing probe when asked for
    (`max_batch_tokens=probe`); then batches, and the float noise of each score, follow the load."""
    if split.device.type == "cuda":
        return probe_cuda_budget(split, max_length)
    if probe:
        return probe_cpu_budget(split)
    return BudgetChoice(token_budget=CPU_TOKEN_BUDGET, method="cpu-fixed")
