"""The speed probe's serving-style scenario: a fixed set of synthetic prompts with mixed output
lengths, all arriving at once, decoded by the engine's continuous batching at a few
concurrency levels (decoding slots). Per level: output tokens per second over the whole set,
time to first token and time per output token as median / p90 / p99 over the requests, the
figures vLLM's serving benchmarks report, next to the fixed-shape prefill/decode figures.

Outputs are forced to their lengths (no EOS, no stop strings): the scenario measures the
scheduler and the machine, not the model's wording.
"""

from __future__ import annotations

from typing import Any

import torch

from benchharness.engine.continuous import Prompt, SlotPlan, generate
from benchharness.engine.generation import DecodeSettings
from benchharness.engine.head import split_model
from benchharness.engine.kv_slots import bytes_per_token
from benchharness.measure.limits import MachineLimits
from benchharness.measure.memory import MemorySampler
from benchharness.config.speed_spec import ServeSpec
from benchharness.measure.probe import ThroughputRow, synthetic_prompt
from benchharness.engine.model_costs import matmul_params
from benchharness.measure.timing import summarize


def run_serve_probe(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ServeSpec,
    device: str | torch.device,
    *,
    seed: int = 0,
    limits: MachineLimits | None = None,
    model_name: str = "",
    origin: str = "",
) -> list[ThroughputRow]:
    """One `serve` row per concurrency level. The caller applies the engine's CPU kernels (as the
    fixed-shape probe runs under `probe_kernels`)."""
    dev = torch.device(device)
    split = split_model(model, check=False, cpu_kernels=False)
    params = matmul_params(model)
    ids = synthetic_prompt(model, tokenizer, spec.requests, spec.prompt_len, seed, dev).tolist()
    prompts = [Prompt(i, tuple(ids[i]), None, spec.new_tokens[i % len(spec.new_tokens)]) for i in range(spec.requests)]
    settings = DecodeSettings(max_new_tokens=max(spec.new_tokens), stop_strings=(), eos_token_ids=frozenset())
    per_token = bytes_per_token(split.text_config, split.dtype)
    # Untimed: one short request, so the first level does not pay for first-call setup.
    generate(split, prompts[:1], settings, SlotPlan(1, None, per_token, True), pad_token_id=0, decode=lambda _ids: "")
    rows = []
    for slots in spec.concurrency:
        plan = SlotPlan(slots=slots, kv_budget_bytes=None, kv_bytes_per_token=per_token, refill=True)
        with MemorySampler(dev) as memory:
            _, counts = generate(split, prompts, settings, plan, pad_token_id=0, decode=lambda _ids: "")
        wall = max(counts.finish_s.values())
        ttft = summarize(list(counts.first_token_s.values()))
        per_output = summarize([
            1000.0 * (counts.finish_s[p.index] - counts.first_token_s[p.index]) / (p.max_new_tokens - 1)  # type: ignore[operator]
            for p in prompts
        ])
        achieved = params.generation_flops(spec.requests * spec.prompt_len, counts.generated_tokens) / wall
        rows.append(ThroughputRow(
            model=model_name, origin=origin, task=None, phase="serve", batch=slots, prompt_len=spec.prompt_len,
            new_tokens=max(spec.new_tokens), tokens=counts.generated_tokens, seconds=wall,
            tokens_per_s=counts.generated_tokens / wall, ttft_s=ttft.median, ttft_p90_s=ttft.p90, ttft_p99_s=ttft.p99,
            latency_p50_ms=per_output.median, latency_p90_ms=per_output.p90, latency_p99_ms=per_output.p99,
            peak_memory_mb=memory.peak_memory_mb, achieved_flops=achieved,
            flops_efficiency=achieved / limits.peak_flops if limits is not None else None, reps=1,
        ))
    return rows
