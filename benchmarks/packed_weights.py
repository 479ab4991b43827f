"""oneDNN's linear kernel on plain weights (reordered at every call) against weights packed once
(`engine/onednn.onednn_pack`), on a model's own linear layers, at the row counts a run uses.

For each distinct weight shape of the model (the output layer included) and each row count:
GFLOP/s of the product with the plain weight and with the packed one (the fastest of
`--repeats` timed batches of calls, interleaved so that both see the same machine), their
ratio, and whether the two outputs are bit for bit the same. Beside them, the fp32 matmul
peak measured in the same run (2048^3, each kernel, the fastest counts).

    python benchmarks/packed_weights.py --model-dir PATH [--rows 1,2,4,8,16,35,64,256,1024] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from best_time import best_seconds  # benchmarks/, beside this script

from benchharness.engine.onednn import onednn_available, onednn_linear, onednn_pack
from benchharness.measure.limits import matmul_kernels, measure_matmul_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--rows", default="1,2,4,8,16,35,64,256,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN linear kernel")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    weights: dict[tuple[int, int], torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weights.setdefault(tuple(module.weight.shape), module.weight.detach())
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{args.model_dir.name}: {torch.get_num_threads()} torch threads, weight shapes {sorted(weights)}")
    peaks = {kernel: measure_matmul_flops("cpu", torch.float32, size=2048, kernel=kernel).max for kernel in matmul_kernels("cpu", torch.float32)}
    print("matmul peak (fp32, 2048^3): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print("| weight [out, in] | rows | plain GFLOP/s | packed GFLOP/s | packed / plain | same output |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape, weight in sorted(weights.items()):
            packed = onednn_pack(weight)
            for count in rows:
                x = torch.randn(count, shape[1], generator=generator)
                flops = 2.0 * count * shape[0] * shape[1]
                plain_s = best_seconds(lambda: onednn_linear(x, weight), args.repeats)
                packed_s = best_seconds(lambda: onednn_linear(x, packed), args.repeats)
                same = torch.equal(onednn_linear(x, weight), onednn_linear(x, packed))
                print(f"| {list(shape)} | {count} | {flops / plain_s / 1e9:.0f} | {flops / packed_s / 1e9:.0f} | "
                      f"{plain_s / packed_s:.2f}x | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
