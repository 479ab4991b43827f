"""The small-row kernel (`engine/small_rows.py`) against oneDNN's packed kernel, on a model's own
linear shapes.

For each distinct weight shape of the model's linear layers (the output layer included), `--copies`
random weights of that shape (as many as the model has, up to 24, so each product reads its weight
cold from memory as a decode step does) are packed both ways; then, for each row count, the two
kernels multiply the same rows by every copy in turn, alternating kernel by kernel, and the best
of `--repeats` rounds is kept for each (benchmarks/best_time.py). Prints milliseconds per product,
the ratio oneDNN / small-row (above 1: the small-row kernel is faster), and the largest difference
of either from a float64 product, relative to its largest output.

    python benchmarks/small_rows.py --model-dir PATH [--rows 1,4,16,40,64,128] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
import transformers

from best_time import best_seconds  # benchmarks/, beside this script

from benchharness.engine.onednn import onednn_linear, onednn_pack
from benchharness.engine.small_rows import load_small_rows, takes_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--rows", default="1,4,16,40,64,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = load_small_rows()
    if kernel.module is None:
        raise SystemExit(f"the small-row kernel is not available here: {kernel.reason}")
    config = transformers.AutoConfig.from_pretrained(args.model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = collections.Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear))
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{args.model_dir.name}: {args.threads} threads; ms per product, oneDNN packed / small-row kernel")
    print("| weight [out, in] | copies | " + " | ".join(f"{r} rows" for r in rows) + " | max rel. error oneDNN / small-row |")
    print("|---|---|" + "---|" * len(rows) + "---|")
    generator = torch.Generator().manual_seed(0)
    for (out_features, in_features), count in sorted(shapes.items()):
        copies = min(count, 24)
        weights = [torch.randn(out_features, in_features, generator=generator) * 0.02 for _ in range(copies)]
        if not takes_weight(weights[0]):
            print(f"| {out_features}x{in_features} | {copies} | not a multiple of 16 outputs: oneDNN only |")
            continue
        dnn = [onednn_pack(w) for w in weights]
        panels = [kernel.pack(w) for w in weights]
        cells, errors = [], []
        for count_rows in rows:
            x = torch.randn(count_rows, in_features, generator=generator)

            def run_dnn(x: torch.Tensor = x) -> None:
                for packed in dnn:
                    onednn_linear(x, packed)

            def run_small(x: torch.Tensor = x) -> None:
                for panel in panels:
                    kernel.linear(x, panel, None)

            seconds = {"dnn": float("inf"), "small": float("inf")}
            for _ in range(args.repeats):  # alternating, so drift slows both alike
                for name, call in (("dnn", run_dnn), ("small", run_small)):
                    seconds[name] = min(seconds[name], best_seconds(call, 1))
            cells.append(f"{seconds['dnn'] / copies * 1e3:.2f} / {seconds['small'] / copies * 1e3:.2f} ({seconds['dnn'] / seconds['small']:.2f}x)")
            exact = x.double() @ weights[0].double().T
            scale = float(exact.abs().max())
            errors.append((
                float((onednn_linear(x, dnn[0]).double() - exact).abs().max()) / scale,
                float((kernel.linear(x, panels[0], None).double() - exact).abs().max()) / scale,
            ))
        worst = max(e[0] for e in errors), max(e[1] for e in errors)
        print(f"| {out_features}x{in_features} | {copies} | " + " | ".join(cells) + f" | {worst[0]:.1e} / {worst[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
