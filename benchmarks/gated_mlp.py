"""A gated MLP (`down(act(gate(x)) * up(x))`) on a model's own weights: the engine's forward
against oneDNN's fused post-ops, at the row counts of decode steps and prefills.

Three ways to run every layer's MLP on packed weights (`onednn.onednn_pack`), in turns, each
pass over all the layers in order (so each weight is read cold, as in the model):

- `engine`: what `engine/cpu_kernels.py` runs: three plain oneDNN products, the activation and
  the product applied in place on the gate product with the activation's own torch kernel;
- `post-ops`: oneDNN fuses the activation into the gate product and the product with `up(x)`
  into the up product (`_linear_pointwise` with an eltwise, then a binary "mul" post-op), the
  engine's forward before this script;
- `transformers`: the module's own forward on the same packed products (two more
  [rows, intermediate] tensors allocated, for the activation and the product).

Prints each one's GFLOP/s (the fastest of `--repeats` passes) and the engine's speed over the
other two, per row count; and whether the engine's output equals the transformers forward bit
for bit (it must: same products, same activation kernel).

    python benchmarks/gated_mlp.py --model-dir PATH [--rows 1,8,32,64,1024] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from benchharness.engine.cpu_kernels import _GATED_MLPS, _mlp_activation, _mlp_forward, PackedWeights
from benchharness.engine.onednn import onednn_available

# oneDNN's names for the activations the post-ops path fused (activation, algorithm).
_POST_OPS = {"silu": ("swish", ""), "gelu": ("gelu", "tanh")}


def post_ops_forward(module: nn.Module, activation: str, packs: PackedWeights) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP with its activation and product fused into oneDNN's gate and up products."""
    name, algorithm = _POST_OPS[activation]
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj

    def forward(x: torch.Tensor) -> torch.Tensor:
        activated = torch.ops.mkldnn._linear_pointwise(x, packs.weight_for(gate.weight, x), gate.bias, name, [], algorithm)
        gated = torch.ops.mkldnn._linear_pointwise.binary(x, activated, packs.weight_for(up.weight, x), up.bias, "mul")
        return packs.linear(gated, down.weight, down.bias)

    return forward


def transformers_forward(module: nn.Module, packs: PackedWeights) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's own forward, on the packed products."""
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    return lambda x: packs.linear(module.act_fn(packs.linear(x, gate.weight, gate.bias)) * packs.linear(x, up.weight, up.bias), down.weight, down.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--rows", default="1,4,8,16,32,48,64,128,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    mlps = [m for m in model.modules() if type(m).__name__ in _GATED_MLPS]
    activation = _mlp_activation(mlps[0]) if mlps else None
    if activation is None:
        raise SystemExit(f"{args.model_dir}: no gated MLP with an activation the engine takes in place")
    packs = PackedWeights(w for m in mlps for w in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight))
    ways = {
        "engine": [_mlp_forward(m, activation[1], packs) for m in mlps],
        "post-ops": [post_ops_forward(m, activation[0], packs) for m in mlps],
        "transformers": [transformers_forward(m, packs) for m in mlps],
    }
    hidden, intermediate = mlps[0].gate_proj.in_features, mlps[0].gate_proj.out_features
    print(f"{args.model_dir.name}: {len(mlps)} MLPs of {hidden}x{intermediate} ({activation[0]}), {torch.get_num_threads()} threads")
    print("| rows | engine GFLOP/s | post-ops GFLOP/s | transformers GFLOP/s | engine / post-ops | engine / transformers | engine = transformers bit for bit |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(args.repeats):
                for name, forwards in ways.items():
                    start = time.perf_counter()
                    for forward in forwards:
                        forward(x)
                    best[name] = min(best[name], time.perf_counter() - start)
            same = all(torch.equal(e(x), t(x)) for e, t in zip(ways["engine"], ways["transformers"], strict=True))
            flops = 2 * rows * 3 * hidden * intermediate * len(mlps)
            rate = {name: flops / seconds / 1e9 for name, seconds in best.items()}
            print(f"| {rows} | {rate['engine']:.0f} | {rate['post-ops']:.0f} | {rate['transformers']:.0f} | "
                  f"{best['post-ops'] / best['engine']:.2f} | {best['transformers'] / best['engine']:.2f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
