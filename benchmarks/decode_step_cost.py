"""What one decode step costs at a given number of running rows, and what bounds it.

For each row count B, a cache of S slots is filled (B rows of up to S random tokens, left-padded
to S as in a run), then the
engine's decode step is timed as the continuous loop runs it (output layer and token choice
on each row's last hidden state, then the body on one new token per row): the median of
`--steps` steps. Beside it: the model's linear products alone at the same B (every linear
layer once, in order, through the engine's oneDNN kernel, so each weight is read cold as in
the model), with their GFLOP/s and the weights' GB/s; and this machine's fp32 matmul peak
and memory read bandwidth, measured in the same run. A step can be no faster than reading
every weight once (bandwidth) nor than its FLOPs at the peak; the table shows which bound
the rows sit near.

With `--profile-rows N`, torch's profiler then shows where a step at N rows spends its time
(the ops by their own CPU time per step: the linear kernel, attention, the rest).

    python benchmarks/decode_step_cost.py --model-dir PATH [--rows 1,4,16,64] [--slots 400] [--threads 2] [--profile-rows 25]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers

from benchharness.engine import kv_slots
from benchharness.engine.head import split_model
from benchharness.engine.onednn import onednn_available, onednn_linear
from benchharness.measure.limits import measure_machine_limits


def decode_steps(split, config, rows: int, slots: int, steps: int, profiler=None) -> tuple[float, list[int]]:
    """Median seconds of the engine's decode step at `rows` rows over a cache of `slots` slots,
    and the tokens the last step picked (the cache holds seeded random tokens, the same on every
    call). With `profiler` (a torch profiler, not started), the timed steps run inside it. The rows differ in length, as in a run: row b's first 7b mod 16
    slots are padding, so the attention takes a mask (with rows all of one length transformers
    drops the mask, and grouped-query attention takes a slower path than a run's)."""
    generator = torch.Generator().manual_seed(0)
    cache = kv_slots.new_cache(config)
    ids = torch.randint(0, 1000, (rows, slots), generator=generator)
    mask = torch.ones(rows, slots, dtype=torch.long)
    for row in range(rows):
        mask[row, : (7 * row) % 16] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = split.forward_body(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state[:, -1]
    times = []
    for step in range(steps + 1):
        if step == 1 and profiler is not None:
            profiler.start()  # after the warm-up step
        start = time.perf_counter()
        tokens = split.logits(hidden).argmax(-1)
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
        hidden = split.forward_body(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, -1:] + 1 + step,
            past_key_values=cache, use_cache=True,
        ).last_hidden_state[:, -1]
        times.append(time.perf_counter() - start)
    if profiler is not None:
        profiler.stop()
    return statistics.median(times[1:]), tokens.tolist()  # the first step warms up


def print_profile(split, config, rows: int, slots: int, steps: int) -> None:
    """Where a step's time goes: torch's profiler over `steps` steps, ops by their own CPU time per step."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU])
    step = decode_steps(split, config, rows, slots, steps, profiler)[0]
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events) / steps / 1e3
    print(f"\nprofile at {rows} rows, {slots} slots: {1e3 * step:.0f} ms a step unprofiled, {total:.0f} ms of op time profiled")
    print("| op | ms per step | share |")
    print("|---|---|---|")
    for event in events[:8]:
        ms = event.self_cpu_time_total / steps / 1e3
        print(f"| {event.key} | {ms:.0f} | {ms / total:.0%} |")


def linears_seconds(linears: list[torch.nn.Linear], rows: int) -> float:
    """Fastest of three passes over every linear layer at `rows` rows (oneDNN, weights cold between uses)."""
    inputs = {layer: torch.randn(rows, layer.in_features) for layer in linears}
    run = (lambda layer: onednn_linear(inputs[layer], layer.weight, layer.bias)) if onednn_available() else (
        lambda layer: torch.nn.functional.linear(inputs[layer], layer.weight, layer.bias))
    for layer in linears:
        run(layer)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for layer in linears:
            run(layer)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--rows", default="1,4,16,25,64")
    parser.add_argument("--slots", type=int, default=400, help="cache slots each row attends over")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile-rows", type=int, default=None, help="also profile the step at this many rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    split = split_model(model, check=False, cpu_kernels=True)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in linears)
    limits = measure_machine_limits("cpu", torch.float32, min_seconds=0.5)  # the faster fp32 kernel, and read bandwidth
    peak, bandwidth = limits.peak_flops, limits.peak_bandwidth
    print(f"{args.model_dir.name}: linear weights {weight_bytes / 1e9:.2f} GB; {torch.get_num_threads()} threads; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s; cache {args.slots} slots")
    print("| rows | decode step ms | linears alone ms | their GFLOP/s | their weight GB/s | rest of the step ms "
          "| bound: weights at bandwidth ms | bound: FLOPs at peak ms |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            step = decode_steps(split, model.config, rows, args.slots, args.steps)[0]
            alone = linears_seconds(linears, rows)
            flops = sum(2 * rows * layer.weight.numel() for layer in linears)
            print(f"| {rows} | {1e3 * step:.0f} | {1e3 * alone:.0f} | {flops / alone / 1e9:.0f} | {weight_bytes / alone / 1e9:.1f} | "
                  f"{1e3 * (step - alone):.0f} | {1e3 * weight_bytes / bandwidth:.0f} | {1e3 * flops / peak:.0f} |", flush=True)
        if args.profile_rows:
            print_profile(split, model.config, args.profile_rows, args.slots, args.steps)


if __name__ == "__main__":
    main()
