"""One engine run of a harness generation task, for comparing two versions of the engine.

It runs `BenchEngineLM.generate_token_ids` (harness defaults, 64 rows unless `--engine-arg batch_size=N`) on a task's requests
(default `bh_gsm8k_cot`, first `--limit` items; `benchharness prepare` renders them) and prints
one JSON line: wall seconds, the decode steps' seconds, prompt tokens prefilled (a shared
prefix once), shared prefixes, decode steps, generated tokens, draft tokens kept / run, and a
hash of the generated ids (equal hashes: identical outputs), and the run's useful FLOP/s over
the fp32 matmul peak measured right before and right after it (the highest kernel at either
moment; the useful FLOPs counted as engine_vs_hf.py counts them). `--engine-arg NAME=VALUE` sets an
engine argument (`cascade_prefixes=false`: the same engine with each row's own copy of a shared
prefix), so one checkout compares two settings the same way. The engine is whichever
`benchharness` Python imports, so two checkouts compare by running this script alternately
with each one's `src` first on `PYTHONPATH`, nothing else running (one process per run: the
second run of a process would find the first's packed weights and warm allocator):

    git worktree add /tmp/old COMMIT
    for v in new old new old; do
        PYTHONPATH=$([ $v = old ] && echo /tmp/old/src || echo src) \\
            python benchmarks/engine_generation.py --model-dir PATH --label $v
    done

An engine from before the package took its present layout (beb29e8, the engine the
continuous-batching issue measured, has `benchharness/onednn.py` and no `suites` package) runs
from a copy of this `src` with that commit's engine files laid over it; the counters it does
not keep print as null:

    mkdir /tmp/hyb && cp -r src/benchharness /tmp/hyb/
    cp /tmp/old/src/benchharness/engine/*.py /tmp/hyb/benchharness/engine/
    cp /tmp/old/src/benchharness/onednn.py /tmp/hyb/benchharness/
    PYTHONPATH=/tmp/hyb:benchmarks python benchmarks/engine_generation.py --model-dir PATH --label old
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import transformers

from engine_vs_hf import UsefulFlops, kernel_peaks  # benchmarks/, beside this script
from task_requests import generate_requests

import benchharness
from benchharness.engine import BenchEngineLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--task", default="bh_gsm8k_cot")
    parser.add_argument("--limit", type=int, default=24, help="first N documents (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="the harness cache holding rendered tasks")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="an engine argument, as in lm-eval's --model_args (e.g. cascade_prefixes=false); repeatable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    requests = generate_requests(args.task, args.limit or None, args.cache)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    engine_args = dict(item.split("=", 1) for item in args.engine_arg)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, **{"batch_size": 64, **engine_args})
    peak_before = max(kernel_peaks().values())
    start = time.perf_counter()
    ids = engine.generate_token_ids(requests)
    seconds = time.perf_counter() - start
    peak = max(peak_before, *kernel_peaks().values())
    stats = engine.stats

    def counter(name: str) -> float | None:
        """One of the engine's counters; None where this engine has none by that name (an older
        engine, compared against the issue's starting point)."""
        return getattr(stats, name, None)

    decode_seconds, kept, drafted = counter("decode_seconds"), counter("accepted_drafts"), counter("draft_tokens")
    useful, _ = UsefulFlops.of(model).of_generations([engine.tok_encode(request.args[0]) for request in requests], ids)
    print(json.dumps({
        "label": args.label,
        "engine_args": engine_args,
        "engine": str(Path(benchharness.__file__).parent),
        "task": args.task,
        "requests": len(requests),
        "seconds": round(seconds, 1),
        "decode_seconds": None if decode_seconds is None else round(decode_seconds, 1),
        "prefill_tokens": counter("prefill_tokens"),
        "prefixes": counter("generate_prefixes"),
        "decode_steps": counter("decode_steps"),
        "kv_slot_reads": counter("kv_slot_reads"),
        "generated_tokens": counter("generated_tokens"),
        "drafts_kept_run": None if kept is None or drafted is None else f"{kept}/{drafted}",
        "useful_gflop": round(useful / 1e9),
        "peak_gflops": round(peak / 1e9, 1),
        "useful_of_peak": round(useful / seconds / peak, 3),
        "outputs_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12],
    }), flush=True)


if __name__ == "__main__":
    main()
