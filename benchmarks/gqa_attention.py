"""The attention of grouped-query models with more than one query token a row: transformers'
SDPA path (keys and values repeated per query head, `repeat_kv`) against torch's SDPA on the
grouped heads as they are (`enable_gqa=True`, what `engine/attention.py` runs), at the shapes
of a run's draft steps and prefills.

Per shape (rows, query tokens a row, cache slots), with the model's own head counts: ms per
layer of each path (the fastest of `--repeats` timed batches, the two interleaved), their ratio,
and whether the outputs are bit for bit the same. The mask is a run's: left padding that
differs per row, causal within the step's tokens.

    python benchmarks/gqa_attention.py --model-dir PATH [--shapes 8x3x450,4x5x500,12x2x450,8x128x128,1x1024x1024] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import repeat_kv

from attention_heads import attention_heads  # benchmarks/, beside this script
from best_time import best_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (its config.json is read)")
    parser.add_argument("--shapes", default="8x3x450,4x5x500,12x2x450,8x128x128,1x1024x1024", help="ROWSxQUERIESxSLOTS,...")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heads, kv_heads, dim = attention_heads(args.model_dir)
    groups = heads // kv_heads
    print(f"{args.model_dir.name}: {heads} query heads over {kv_heads} key/value heads of {dim}; {torch.get_num_threads()} torch threads")
    print("| rows x queries x slots | repeated kv ms/layer | grouped ms/layer | repeated / grouped | same output |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            rows, queries, slots = (int(x) for x in shape.split("x"))
            # Cache views into buffers with spare slots, as engine/kv_slots.py holds them.
            key = torch.randn(rows, kv_heads, slots + 64, dim, generator=generator)[:, :, :slots]
            value = torch.randn(rows, kv_heads, slots + 64, dim, generator=generator)[:, :, :slots]
            query = torch.randn(rows, heads, queries, dim, generator=generator)
            mask = torch.ones(rows, 1, queries, slots, dtype=torch.bool)
            for row in range(rows):
                mask[row, :, :, : (7 * row) % 16] = False
            mask &= torch.arange(slots)[None, None, None, :] <= (slots - queries + torch.arange(queries))[None, None, :, None]

            def repeated() -> torch.Tensor:
                return sdpa(query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask)

            def grouped() -> torch.Tensor:
                return sdpa(query, key, value, attn_mask=mask, enable_gqa=True)

            repeated_s = best_seconds(repeated, args.repeats)
            grouped_s = best_seconds(grouped, args.repeats)
            same = torch.equal(repeated(), grouped())
            print(f"| {shape} | {1e3 * repeated_s:.2f} | {1e3 * grouped_s:.2f} | {repeated_s / grouped_s:.2f}x | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
