"""GPU acceptance: the three offline packs through the harness's engine (bf16), lm-eval's hf model
(bf16, the reference) and vLLM on one CUDA GPU, the same items, in one script (`make gpu-check`).

Per model, task and engine it writes accuracy, the answers that differ from hf's, max and mean
|delta loglikelihood| against hf (MMLU options), the GSM8K generations that differ, tokens/s and
each task's wall seconds, to `<output>/gpu-check-<UTC time>.md` (and stdout). Sized to finish in
under 8 minutes on one GPU: MMLU 57 items (one per subject) and GSM8K zero-shot CoT, 16 items.

    python benchmarks/gpu_check.py [--output results] [--mmlu 57] [--gsm8k 16] [--engines benchharness,hf,vllm]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_runs import compare, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("results"))
    parser.add_argument("--mmlu", type=int, default=57)
    parser.add_argument("--gsm8k", type=int, default=16)
    parser.add_argument("--engines", default="benchharness,hf,vllm")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: torch sees no CUDA GPU on this machine. Fix: run it where there is one.")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    runs = {engine: run(engine, work, args.mmlu, args.gsm8k, dtype="bfloat16", device="cuda") for engine in engines}
    table = compare(runs, reference="hf" if "hf" in runs else engines[0])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    text = (f"# GPU check {stamp}\n\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16; engines "
            f"{', '.join(engines)} against hf on the same items (`python benchmarks/gpu_check.py`). Runs: "
            + ", ".join(str(p) for p in runs.values()) + "\n\n" + table.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"gpu-check-{stamp}.md").write_text(text)


if __name__ == "__main__":
    main()
