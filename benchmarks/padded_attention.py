"""The attention of a decode step whose rows' widths differ: transformers' SDPA over the whole
cache width (every row reads the widest row's slots, its own left padding masked) against the
engine's row groups (`engine/attention.row_grouped_sdpa`: runs of neighbouring rows of similar
width, each group reading from its rows' first visible slot on).

Per shape (rows, cache slots, the share of them the rows' own tokens fill), with the model's own
head counts and one query token a row: row i of n is (1 - i/n)^k of the whole width wide, k set
so the widths fill that share (a few wide rows, many narrow ones, as in a HumanEval run: 39% on
Qwen2.5-Coder at 64 rows), widest first as the engine keeps them (`continuous._join`), and once
more shuffled (what the groups make of rows in no order). Each call reads one of `--layers`
separate caches in turn, so that keys and values come from memory as in a model's forward, not
from the processor's cache. Columns: ms per layer of each (the fastest of `--repeats` timed
batches), the groups made, and the largest difference from the whole-width output (float
rounding: the kernel's sums run over other spans).

    python benchmarks/padded_attention.py --model-dir PATH [--shapes 64x480x0.39,32x480x0.39,64x600x0.6,8x450x0.5] [--layers 24] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from benchharness.engine.attention import _padded_rows, row_grouped_sdpa, slots_read
from attention_heads import attention_heads  # benchmarks/, beside this script
from best_time import best_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (its config.json is read)")
    parser.add_argument("--shapes", default="64x480x0.39,32x480x0.39,64x600x0.6,8x450x0.5", help="ROWSxSLOTSxFILLED,...")
    parser.add_argument("--layers", type=int, default=24, help="separate caches the calls take in turn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heads, kv_heads, dim = attention_heads(args.model_dir)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    print(f"{args.model_dir.name}: {heads} query heads over {kv_heads} key/value heads of {dim}; {torch.get_num_threads()} torch threads")
    print("| rows x slots x filled | slots read by the groups | whole width ms/layer | row groups ms/layer (groups) | whole / groups | shuffled rows ms/layer (groups) | largest difference |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            rows_text, slots_text, filled_text = shape.split("x")
            rows, slots, filled = int(rows_text), int(slots_text), float(filled_text)
            # Cache views into buffers with spare slots, as engine/kv_slots.py holds them.
            caches = [
                (
                    torch.randn(rows, kv_heads, slots + 64, dim, generator=generator)[:, :, :slots],
                    torch.randn(rows, kv_heads, slots + 64, dim, generator=generator)[:, :, :slots],
                )
                for _ in range(args.layers)
            ]
            query = torch.randn(rows, heads, 1, dim, generator=generator)
            share = (1 - torch.arange(rows, dtype=torch.float64) / rows) ** (1 / filled - 1)
            widths = (share * slots).round().long().clamp(min=1)
            first = slots - widths
            sorted_mask = (torch.arange(slots)[None, :] >= first[:, None])[:, None, None, :]
            shuffled_mask = sorted_mask[torch.randperm(rows, generator=generator)]
            turn = [0]

            def layer() -> tuple[torch.Tensor, torch.Tensor]:
                turn[0] = (turn[0] + 1) % len(caches)
                return caches[turn[0]]

            def whole() -> torch.Tensor:
                return sdpa_attention_forward(module, query, *layer(), sorted_mask)[0]

            def grouped(mask: torch.Tensor) -> torch.Tensor:
                return row_grouped_sdpa(module, query, *layer(), mask)[0]

            whole_s = best_seconds(whole, args.repeats)
            sorted_s = best_seconds(lambda: grouped(sorted_mask), args.repeats)
            shuffled_s = best_seconds(lambda: grouped(shuffled_mask), args.repeats)
            key = caches[0][0]
            groups = _padded_rows(query, key, sorted_mask, {}) or [(0, rows, 0)]
            shuffled_groups = len(_padded_rows(query, key, shuffled_mask, {}) or [()])
            turn[0] = len(caches) - 1  # both on the first cache
            ours = grouped(sorted_mask)
            turn[0] = len(caches) - 1
            difference = float((ours - whole()).abs().max())
            read = slots_read(first.tolist(), slots, kv_heads, dim)
            print(
                f"| {shape} | {read / (rows * slots):.0%} | {1e3 * whole_s:.2f} | {1e3 * sorted_s:.2f} ({len(groups)}) | "
                f"{whole_s / sorted_s:.2f}x | {1e3 * shuffled_s:.2f} ({shuffled_groups}) | {difference:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
