"""Cascade attention's kernel calls with a key/value head's query heads folded into one block of
query rows (`engine/cascade.py`, `_flash`) against the same calls with the heads as they are.

torch's CPU flash kernel runs one task per (row, query head, block of query tokens) and, with
grouped heads, reads the shared key/value head once per query head. Folded, the query heads
of a group run as `group x tokens` query rows of their key/value head: one read of its keys
and values, and products over a block of rows instead of one query vector. Per shape, with the
model's own head counts: ms per layer of the rows' own part (a decode step: one query token a
row; a draft step: several) and of the prefix part (every row's queries over one prefix), each
way (the fastest of `--repeats` timed batches), their ratio, whether the outputs are bit for bit
the same, and whether `_flash` folds that call (`cascade.folds_by_default`).

    python benchmarks/folded_attention.py --model-dir PATH [--shapes 40x1x300,64x1x200,16x1x500,40x3x300] [--prefix 800] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attention_heads import attention_heads  # benchmarks/, beside this script
from best_time import best_seconds

from benchharness.engine.cascade import _flash, folds_by_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (its config.json is read)")
    parser.add_argument("--shapes", default="40x1x300,64x1x200,16x1x500,40x3x300", help="ROWSxQUERIESxSLOTS,...")
    parser.add_argument("--prefix", type=int, default=800, help="shared prefix tokens (GSM8K's 8-shot one: about 800)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heads, kv_heads, dim = attention_heads(args.model_dir)
    group = heads // kv_heads
    print(f"{args.model_dir.name}: {heads} query heads over {kv_heads} key/value heads of {dim}; {torch.get_num_threads()} torch threads")
    print("| rows x queries x slots | part | as they are ms/layer | folded ms/layer | ratio | same output | folded by the engine |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            rows, tokens, slots = (int(x) for x in shape.split("x"))
            query = torch.randn(rows, heads, tokens, dim, generator=generator)
            # The rows' own part: cache views into buffers with spare slots (engine/kv_slots.py),
            # left padding that differs per row, causal within the step's tokens.
            key = torch.randn(rows, kv_heads, slots + 64, dim, generator=generator)[:, :, :slots]
            value = torch.randn(rows, kv_heads, slots + 64, dim, generator=generator)[:, :, :slots]
            seen = torch.ones(rows, 1, tokens, slots, dtype=torch.bool)
            for row in range(rows):
                seen[row, :, :, : (7 * row) % (slots // 2)] = False
            seen &= torch.arange(slots)[None, None, None, :] <= (slots - tokens + torch.arange(tokens))[None, None, :, None]
            mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))
            # The prefix part: every row's queries as one sequence over the prefix.
            prefix_query = query.transpose(0, 1).reshape(1, heads, rows * tokens, dim)
            prefix_key = torch.randn(1, kv_heads, args.prefix, dim, generator=generator)
            prefix_value = torch.randn(1, kv_heads, args.prefix, dim, generator=generator)
            parts = {
                "own": (query, key, value, mask, tokens),
                "prefix": (prefix_query, prefix_key, prefix_value, None, rows * tokens),
            }
            for part, (q, k, v, m, queries) in parts.items():
                as_they_are_s = best_seconds(lambda: _flash(q, k, v, m, None, fold=False), args.repeats)  # noqa: B023
                folded_s = best_seconds(lambda: _flash(q, k, v, m, None, fold=True), args.repeats)  # noqa: B023
                same = all(torch.equal(a, b) for a, b in zip(_flash(q, k, v, m, None, fold=False), _flash(q, k, v, m, None, fold=True), strict=True))
                engine_folds = folds_by_default(group, queries)
                print(
                    f"| {shape} | {part} | {1e3 * as_they_are_s:.2f} | {1e3 * folded_s:.2f} | {as_they_are_s / folded_s:.2f}x "
                    f"| {'yes' if same else 'no'} | {'yes' if engine_folds else 'no'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
