"""llama.cpp on the GGUF file as it is against the harness's engine on its dequantized fp32 weights:
the same items, one script, two runs of the harness.

Both runs evaluate the three offline packs on the same items (default: MMLU, 57 items spread one
per subject, and GSM8K zero-shot CoT, 5 items, greedy) with `benchharness run`, `--engine
benchharness` then `--engine llamacpp` (2 threads each, the machine's cores). Then, per model and
task, from the runs' own files:

- accuracy of each engine, and how many items got a different answer;
- max and mean |delta loglikelihood| per request (multiple choice: every answer option): the
  difference quantized compute makes against fp32 on the dequantized weights;
- the GSM8K generations that differ (the text, not only the score);
- speed from throughput.csv: scored tokens/s (`eval`), generated tokens/s (`eval_generate`) and
  the whole task's wall seconds from the manifest, engine against llama.cpp.

It writes a Markdown table (stdout and `--output FILE`).

    python benchmarks/llamacpp_vs_engine.py [--mmlu 57] [--gsm8k 5] [--output results/llamacpp_vs_engine.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_runs import compare, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmlu", type=int, default=57, help="MMLU items (spread over subjects)")
    parser.add_argument("--gsm8k", type=int, default=5, help="GSM8K zero-shot CoT items")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument("--work", type=Path, help="folder for the two runs (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-vs-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    engine_run = run("benchharness", work, args.mmlu, args.gsm8k)
    llama_run = run("llamacpp", work, args.mmlu, args.gsm8k, extra="llamacpp: {n_ctx: 2048, n_threads: 2}\n")
    table = compare({"benchharness": engine_run, "llamacpp": llama_run}, reference="benchharness")
    manifest = json.loads((llama_run / "manifest.json").read_text())
    build = next(iter(manifest["models"].values()))["engine_build"]
    text = (f"llama.cpp (llama-cpp-python {build['llama_cpp_python']}, {build['threads']} threads; {build['system_info']}) "
            f"on the GGUF files against the harness's engine (fp32, dequantized weights), the same items.\n"
            f"Runs: {engine_run}, {llama_run}.\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
