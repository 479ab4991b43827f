"""Prompt-lookup draft policies replayed over a task's real outputs: decode steps and step tokens.

The engine generates the task once without drafts (greedy outputs are the same with any draft
policy: drafts only decide how many tokens a step yields); then each policy is replayed over
those outputs with the engine's slot pool (`--rows` slots, refilled longest prompt first), its
n-gram lookup and its step cap (rows x (1 + draft) <= `--step-tokens`); a freed slot takes the
next prompt before the next step (the engine's admissions, a prefill between steps, can take a
few steps more: compare the policies with each other, not with the engine's count). Since every row's next
tokens are known, each draft's fate is too: a row keeps its draft up to the first token that
differs from its output. Printed per policy: decode steps, tokens the steps ran (rows x width,
summed: what a step's cost grows with), draft tokens run and kept.

Policies: `none`; `fixed N` (up to N draft tokens a row, the engine's `prompt_lookup_tokens`);
`adaptive N-M` (starting at N, +2 after a step whose draft was all kept, -1 after one with a
rejection, between 1 and M: transformers' assisted-generation schedule, per row).

    python benchmarks/draft_replay.py --model-dir PATH [--task bh_humaneval] [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from task_requests import generate_requests  # benchmarks/, beside this script

from benchharness.engine import BenchEngineLM
from benchharness.engine.prompt_lookup import NgramIndex


@dataclass
class Policy:
    name: str
    start: int
    most: int
    adaptive: bool = False


@dataclass
class _Row:
    index: NgramIndex
    output: list[int]
    done: int
    budget: int


def replay(prompts: list[list[int]], outputs: list[list[int]], policy: Policy, rows: int, step_tokens: int) -> dict[str, int]:
    queue = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    running: list[_Row] = []
    totals = {"steps": 0, "step tokens": 0, "draft tokens": 0, "kept": 0}
    while queue or running:
        while queue and len(running) < rows:
            i = queue.pop(0)
            if outputs[i]:
                running.append(_Row(NgramIndex(prompts[i]), outputs[i], 0, policy.start))
        room = max(0, min(policy.most, step_tokens // max(1, len(running)) - 1))
        lengths = [max(0, min(room, row.budget, len(row.output) - row.done - 1)) for row in running]
        totals["steps"] += 1
        totals["step tokens"] += len(running) * (1 + max(lengths, default=0))
        for row, length in zip(running, lengths, strict=True):
            row.index.extend(row.output[row.done : row.done + 1])  # the step's own token
            row.done += 1
            draft = row.index.draft(length)
            kept = 0
            while kept < len(draft) and row.output[row.done + kept] == draft[kept]:
                kept += 1
            row.index.extend(row.output[row.done : row.done + kept])
            row.done += kept
            totals["draft tokens"] += len(draft)
            totals["kept"] += kept
            if draft and policy.adaptive:
                row.budget = min(policy.most, row.budget + 2) if kept == len(draft) else max(1, row.budget - 1)
        running = [row for row in running if row.done < len(row.output)]
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--task", default="bh_humaneval")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--step-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    requests = generate_requests(args.task, args.limit)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=args.rows, prompt_lookup_tokens=0)
    outputs = engine.generate_token_ids(requests)
    prompts = [engine._encode_prompt(r.args[0], engine.max_length) for r in requests]
    policies = [Policy("none", 0, 0), Policy("fixed 4 (the default)", 4, 4), Policy("fixed 8", 8, 8),
                Policy("adaptive 4-16", 4, 16, adaptive=True), Policy("adaptive 2-23", 2, 23, adaptive=True)]
    print(f"{args.task}: {len(requests)} requests, {sum(map(len, outputs))} generated tokens, engine {engine.stats.decode_steps} "
          f"decode steps; {args.rows} rows, step cap {args.step_tokens} tokens")
    print("| policy | decode steps | step tokens | draft tokens kept / run |")
    print("| --- | --- | --- | --- |")
    for policy in policies:
        totals = replay(prompts, outputs, policy, args.rows, args.step_tokens)
        print(f"| {policy.name} | {totals['steps']} | {totals['step tokens']} | {totals['kept']} / {totals['draft tokens']} |")


if __name__ == "__main__":
    main()
