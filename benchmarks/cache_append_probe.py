"""What copying the KV cache at every step costs a decode step: the engine's step with its
slot buffers (each step writes the new token into spare slots) against the same step with
the buffers given no spare slots, so that every step copies every layer's keys and values
into a new buffer with the new token's, as transformers' own dynamic cache layers do (they
concatenate).

The decode step alone: no rows join or leave between the timed steps (the engine's joins and
leaves move rows either way). The two variants alternate in one process, `--pairs` times,
each over a fresh cache of `--rows` x `--slots` seeded random tokens, timed as
`decode_step_cost.py` times a step; the script checks that both pick the same tokens and
prints the median step time of each. `benchmarks/continuous_vs_static.py --modes
continuous,copying` compares the two over a whole task.

    python benchmarks/cache_append_probe.py --model-dir PATH --rows 49 --slots 500 [--pairs 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import transformers

from benchharness.engine.head import split_model
from benchharness.engine.kv_slots import SlotLayer
from decode_step_cost import decode_steps  # the script beside this one

SPARE_SLOTS = SlotLayer.spare_slots


def use(variant: str) -> None:
    SlotLayer.spare_slots = 0 if variant == "copying" else SPARE_SLOTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=49)
    parser.add_argument("--slots", type=int, default=500)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    split = split_model(model, check=False, cpu_kernels=True)
    seconds: dict[str, list[float]] = {"copying": [], "in place": []}
    with torch.inference_mode():
        for pair in range(args.pairs):
            tokens = {}
            for variant in seconds:
                use(variant)
                step, tokens[variant] = decode_steps(split, model.config, args.rows, args.slots, args.steps)
                seconds[variant].append(step)
                print(f"pair {pair + 1}: {variant} {1e3 * step:.0f} ms a step", flush=True)
            if tokens["copying"] != tokens["in place"]:
                raise SystemExit("the two variants picked different tokens")
    use("in place")
    copying, in_place = (statistics.median(seconds[v]) for v in ("copying", "in place"))
    print(f"{args.model_dir.name}, {args.rows} rows x {args.slots} slots, {torch.get_num_threads()} threads: "
          f"copying {1e3 * copying:.0f} ms, in place {1e3 * in_place:.0f} ms a step (medians of {args.pairs}): {copying / in_place:.2f}x")


if __name__ == "__main__":
    main()
