"""Continuous batching against static batches: the same engine, the same generate_until
requests, refill on and off, alternating (A/B/A/...), in one process. With `--modes
continuous,copying`, the engine's KV slot buffers against the same engine copying its cache
into a new buffer at every step (what transformers' own cache layers do: they concatenate
every layer's keys and values with the new token's). With `--modes continuous,no-lookup`, the
engine as it is against the same engine without prompt-lookup drafts (`prompt_lookup_tokens=0`).

The requests are a harness task's (default `bh_humaneval`: HumanEval's 164 prompts, greedy,
up to 384 new tokens), built by lm-eval from the harness's rendered tasks (`benchharness
prepare` makes them). Static batches: up to `--rows` prompts are admitted together and the
batch decodes until its last row finishes (rows leave as they finish), then the next batch;
continuous: a finished row's slot is refilled from the queue. Per run it prints the wall
seconds of generate_until, generated tokens per second, decode steps, mean running rows per
step, and whether the outputs equal the first run's.

    python benchmarks/continuous_vs_static.py --model-dir PATH [--task bh_humaneval] [--limit N] [--rounds 2]
        [--modes continuous,static|continuous,copying|continuous,no-lookup]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from task_requests import generate_requests  # benchmarks/, beside this script

from benchharness.engine import BenchEngineLM
from benchharness.engine.kv_slots import SlotLayer

MODES = ("continuous", "static", "copying", "no-lookup")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--task", default="bh_humaneval")
    parser.add_argument("--limit", type=int, default=None, help="first N documents (default: all)")
    parser.add_argument("--rows", type=int, default=64, help="decoding rows (slots) at once")
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="the harness cache holding rendered tasks")
    parser.add_argument("--modes", default="continuous,static",
                        help=f"two of {', '.join(MODES)} (copying: continuous, the KV cache copied at every step; "
                        "no-lookup: continuous without prompt-lookup drafts)")
    parser.add_argument("--lookup-tokens", type=int, default=None, help="the engine's prompt_lookup_tokens (default: its own)")
    parser.add_argument("--lookup-step-tokens", type=int, default=None, help="the engine's lookup_step_tokens (default: its own)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if len(modes) != 2 or not set(modes) <= set(MODES):
        parser.error(f"--modes takes two of {', '.join(MODES)}, got {args.modes!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    requests = generate_requests(args.task, args.limit, args.cache)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    lookup = {name: value for name, value in (("prompt_lookup_tokens", args.lookup_tokens),
                                               ("lookup_step_tokens", args.lookup_step_tokens)) if value is not None}
    engines = {
        mode: BenchEngineLM(
            model=model, tokenizer=tokenizer, batch_size=args.rows, continuous_batching=mode != "static",
            **({"prompt_lookup_tokens": 0} if mode == "no-lookup" else lookup),
        )
        for mode in modes
    }
    spare_slots = SlotLayer.spare_slots
    print(f"{args.task}: {len(requests)} requests, {args.rows} rows, {torch.get_num_threads()} torch threads")
    print("| run | mode | seconds | decode s | generated tokens | tokens/s | decode steps | mean rows per step | admissions | "
          "steps with drafts | draft tokens kept / run | same outputs as run 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    first: list[str] | None = None
    totals: dict[str, list[float]] = {name: [] for name in engines}
    run = 0
    for _ in range(args.rounds):
        for name, engine in engines.items():
            run += 1
            engine.reset_stats()
            SlotLayer.spare_slots = 0 if name == "copying" else spare_slots
            start = time.perf_counter()
            outputs = engine.generate_until(requests, disable_tqdm=True)
            seconds = time.perf_counter() - start
            first = first if first is not None else outputs
            stats = engine.stats
            totals[name].append(seconds)
            print(
                f"| {run} | {name} | {seconds:.1f} | {stats.decode_seconds:.1f} | {stats.generated_tokens} | {stats.generated_tokens / seconds:.1f} | "
                f"{stats.decode_steps} | {stats.decode_rows / max(1, stats.decode_steps):.1f} | {stats.generate_batches} | "
                f"{stats.draft_steps} | {stats.accepted_drafts} / {stats.draft_tokens} | {outputs == first} |",
                flush=True,
            )
    SlotLayer.spare_slots = spare_slots
    best = {name: min(values) for name, values in totals.items()}
    new, reference = modes
    print(f"fastest: {new} {best[new]:.1f} s, {reference} {best[reference]:.1f} s: "
          f"{reference} / {new} = {best[reference] / best[new]:.2f}x")


if __name__ == "__main__":
    main()
