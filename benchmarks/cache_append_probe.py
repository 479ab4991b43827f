"""What the KV cache's per-step concatenation costs a decode step: the engine's step with
transformers' dynamic cache as it is (each step concatenates every layer's keys and values
with the new token's, a copy of the whole cache) against the same step with the cache update
patched to write the new token into spare slots of a preallocated buffer.

An upper bound for an in-place cache: no rows join or leave between the timed steps (the
engine's joins and leaves copy the cache either way), and the cache stays under any sliding
window (the patched update does not slide). The two variants alternate in one process,
`--pairs` times, each over a fresh cache of `--rows` x `--slots` seeded random tokens, timed
as `decode_step_cost.py` times a step; the script checks that both pick the same tokens and
prints the median step time of each.

    python benchmarks/cache_append_probe.py --model-dir PATH --rows 49 --slots 500 [--pairs 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import transformers
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from benchharness.engine.head import split_model
from decode_step_cost import decode_steps  # the script beside this one

STOCK = {DynamicLayer: DynamicLayer.update, DynamicSlidingWindowLayer: DynamicSlidingWindowLayer.update}
SPARE_SLOTS = 128


def update_in_place(layer, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Append into a buffer with spare slots; the layer's keys/values are views of its filled part."""
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length += keys.shape[-2]
    length = layer.keys.shape[-2] if layer.keys.numel() else 0
    grown = length + keys.shape[-2]
    buffers = getattr(layer, "_buffers_in_place", None)
    if buffers is None or grown > buffers[0].shape[-2]:
        shape = (keys.shape[0], keys.shape[1], grown + SPARE_SLOTS, keys.shape[3])
        buffers = (keys.new_zeros(shape), values.new_zeros(shape))
        if length:
            buffers[0][:, :, :length] = layer.keys
            buffers[1][:, :, :length] = layer.values
        layer._buffers_in_place = buffers
    buffers[0][:, :, length:grown] = keys
    buffers[1][:, :, length:grown] = values
    layer.keys, layer.values = buffers[0][:, :, :grown], buffers[1][:, :, :grown]
    return layer.keys, layer.values


def use(variant: str) -> None:
    for cls, stock in STOCK.items():
        cls.update = stock if variant == "stock" else update_in_place


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
    seconds: dict[str, list[float]] = {"stock": [], "in place": []}
    with torch.inference_mode():
        for pair in range(args.pairs):
            tokens = {}
            for variant in seconds:
                use(variant)
                step, tokens[variant] = decode_steps(split, model.config, args.rows, args.slots, args.steps)
                seconds[variant].append(step)
                print(f"pair {pair + 1}: {variant} {1e3 * step:.0f} ms a step", flush=True)
            if tokens["stock"] != tokens["in place"]:
                raise SystemExit("the two variants picked different tokens")
    use("stock")
    stock, in_place = (statistics.median(seconds[v]) for v in ("stock", "in place"))
    print(f"{args.model_dir.name}, {args.rows} rows x {args.slots} slots, {torch.get_num_threads()} threads: "
          f"stock {1e3 * stock:.0f} ms, in place {1e3 * in_place:.0f} ms a step (medians of {args.pairs}): {stock / in_place:.2f}x")


if __name__ == "__main__":
    main()
