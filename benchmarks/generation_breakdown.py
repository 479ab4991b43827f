"""Where a generate_until task's time goes in the engine's continuous-batching loop.

Runs a harness task's generate_until requests (default `bh_humaneval`: HumanEval's 164
prompts, greedy, up to 384 new tokens) once through the engine, with timers around its
parts: the prefill forwards of admitted prompts, the output layer of the decode steps,
joining prefilled rows into the running cache, rows leaving it (index selection), and the
stop-string checks. Decode seconds are the engine's own counter (output layer, token
choice and body of every decode step). Prints each part's seconds and calls, the decode
steps, mean running rows per step, and the prompt tokens prefilled (padding included)
against the prompts' own tokens.

    python benchmarks/generation_breakdown.py --model-dir PATH [--task bh_humaneval] [--limit N] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from task_requests import generate_requests  # benchmarks/, beside this script

from benchharness.engine import BenchEngineLM, continuous, kv_slots
from benchharness.engine.head import SplitModel


class Timers:
    """Seconds and calls per part, from wrappers put around functions for the length of the run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._restore: list[tuple[Any, str, Callable[..., Any]]] = []

    def wrap(self, owner: Any, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                self.calls[part] += 1

        self._restore.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--task", default="bh_humaneval")
    parser.add_argument("--limit", type=int, default=None, help="first N documents (default: all)")
    parser.add_argument("--rows", default="auto", help="decoding rows (the engine's batch_size; auto: 64)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="the harness cache holding rendered tasks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    requests = generate_requests(args.task, args.limit, args.cache)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    rows = args.rows if args.rows == "auto" else int(args.rows)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=rows)
    prompt_tokens = sum(len(engine.tok_encode(r.args[0])) for r in requests)

    timers = Timers()
    timers.wrap(continuous._Prefill, "step", "prefill forwards")
    timers.wrap(SplitModel, "logits", "output layer (decode)")
    timers.wrap(kv_slots, "join", "join rows into the cache")
    timers.wrap(DynamicCache, "batch_select_indices", "rows leave the cache")
    timers.wrap(continuous, "stops_answer", "stop-string checks")
    try:
        start = time.perf_counter()
        engine.generate_until(requests, disable_tqdm=True)
        total = time.perf_counter() - start
    finally:
        timers.restore()
    stats = engine.stats
    print(f"{args.task}: {len(requests)} requests, {torch.get_num_threads()} torch threads, {args.model_dir.name}")
    print(
        f"generate_until {total:.1f} s; decode steps {stats.decode_seconds:.1f} s over {stats.decode_steps} steps "
        f"({1e3 * stats.decode_seconds / max(1, stats.decode_steps):.0f} ms each, "
        f"{stats.decode_rows / max(1, stats.decode_steps):.1f} running rows on average); "
        f"{stats.generated_tokens} tokens generated"
    )
    print(f"prompt tokens prefilled {stats.prefill_tokens} (padding included) for {prompt_tokens} prompt tokens, "
          f"in {stats.generate_batches} admissions")
    for part, seconds in timers.seconds.items():
        print(f"  {part}: {seconds:.1f} s over {timers.calls[part]} calls")


if __name__ == "__main__":
    main()
