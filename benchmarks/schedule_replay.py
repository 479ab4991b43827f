"""What another admission order or slot count could save on a generate_until task: the engine's
continuous-batching schedule replayed on the outputs it generated.

A greedy row's output does not depend on which rows share its steps (`engine/continuous.py`), and
a row's prompt-lookup draft depends only on its own tokens. So once the engine has run a task, the
steps any schedule would take are known exactly: this script runs the task once (or loads the
outputs `--save` wrote), then replays the loop's admission (`continuous._admission`,
`admission_threshold`), prefill chunks (`prefill_chunk`) and drafts
(`LookupPlan.draft_length`, `NgramIndex`) for several schedules, counting decode steps, the rows
and tokens of each, and the prompt tokens prefilled. Replaying the engine's own schedule must give
the engine's own counts (checked: the script stops if it does not).

Each schedule is priced at the roofline of this machine, measured in the same run: a pass of the
body or the output layer costs the larger of its weights' bytes over the memory bandwidth and its
FLOPs over the fp32 matmul peak, a prefill forward the larger of the same for its tokens. This is
the time no kernel could beat for that schedule, so two schedules compare by it without the
machine's drift; the engine's measured seconds over its own schedule's bound are its efficiency,
printed for the whole run and for its prefill forwards and decode steps apart.
The schedules: the engine's (longest prompt first, 64 rows, admission once 1/8 of them are free),
other row counts, shortest prompt first, and the oracle order (longest output first: it needs the
outputs in advance, so it bounds what any order could do).

    python benchmarks/schedule_replay.py --model-dir PATH [--task bh_humaneval] [--limit N] [--save F | --load F]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from task_requests import generate_requests  # benchmarks/, beside this script

from benchharness.engine import BenchEngineLM, continuous, lm as engine_lm
from benchharness.engine.continuous import Prompt, _admission, admission_threshold, prefill_chunk
from benchharness.engine.model_costs import matmul_params
from benchharness.engine.prompt_lookup import LookupPlan, NgramIndex
from benchharness.measure.limits import measure_machine_limits


@dataclass(frozen=True)
class Roofline:
    """The least time a pass can take on this machine: its weights read once at the memory
    bandwidth, or its FLOPs at the matmul peak, whichever is longer."""

    body_params: int
    head_params: int
    body_bytes: int
    head_bytes: int
    peak: float  # FLOP/s
    bandwidth: float  # bytes/s

    def body(self, tokens: int) -> float:
        return max(self.body_bytes / self.bandwidth, 2.0 * self.body_params * tokens / self.peak)

    def head(self, positions: int) -> float:
        return max(self.head_bytes / self.bandwidth, 2.0 * self.head_params * positions / self.peak)


@dataclass
class Replay:
    """One schedule's counts, and its seconds at the roofline."""

    steps: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0  # at the roofline
    prefill_seconds: float = 0.0  # of it the prefill forwards
    tail_steps: int = 0  # steps of 16 rows or fewer
    tail_seconds: float = 0.0


def replay(
    prompts: list[tuple[list[int], list[int]]], order: list[int], slots: int, lookup: LookupPlan, max_new: int,
    chunk_tokens: int, roof: Roofline,
) -> Replay:
    """The continuous loop of `continuous.generate` on known outputs: (prompt, output) per request,
    admitted in `order`, `slots` rows at most. Mirrors its admission, token taking, drafts and
    output-layer passes (a pass over the running rows unless the last step's drafts made the logits)."""
    result = Replay()
    pending = [Prompt(i, tuple(prompts[i][0])) for i in order]
    running: list[dict] = []
    prefill: list[Prompt] = []  # admitted, being prefilled
    chunks: list[int] = []  # the prefill's forwards still to run: columns x rows each
    admit_at_least = admission_threshold(slots)
    logits_ready = False
    while pending or prefill or running:
        free = slots - len(running)
        if not prefill and pending and free > 0 and (free >= min(admit_at_least, len(pending)) or not running):
            prefill = _admission(pending, free, chunk_tokens)
            del pending[: len(prefill)]
            rows, width = len(prefill), max(len(p.tokens) for p in prefill)
            result.prefill_tokens += rows * width
            chunk = prefill_chunk(rows, width, chunk_tokens)
            chunks = [rows * min(chunk, width - start) for start in range(0, width, chunk)]
        if prefill:
            forward = roof.body(chunks.pop(0))
            result.seconds += forward
            result.prefill_seconds += forward
            if not chunks:
                running += [{"out": prompts[p.index][1], "n": 0, "index": NgramIndex(p.tokens)} for p in prefill]
                prefill = []
                logits_ready = False
            elif not running:
                continue
        if not running:
            continue
        if not logits_ready:
            result.seconds += roof.head(len(running))
        for row in running:
            row["index"].extend((row["out"][row["n"]],))
            row["n"] += 1
        running = [row for row in running if row["n"] < len(row["out"])]
        if not running:
            logits_ready = False
            continue
        n = len(running)
        length = lookup.draft_length(n)
        drafts = [row["index"].draft(min(length, max_new - row["n"])) if length > 0 else [] for row in running]
        width = 1 + max(len(d) for d in drafts)
        step = roof.body(n * width)
        if width > 1:
            step += roof.head(sum(1 + len(d) for d in drafts))
        logits_ready = width > 1
        result.steps += 1
        result.seconds += step
        if n <= 16:
            result.tail_steps += 1
            result.tail_seconds += step
        kept = []
        for row, draft in zip(running, drafts):
            finished = False
            for token in draft:
                if row["out"][row["n"]] != token:
                    break
                row["index"].extend((token,))
                row["n"] += 1
                if row["n"] >= len(row["out"]):
                    finished = True
                    break
            if not finished:
                kept.append(row)
        running = kept
    return result


def record(engine: BenchEngineLM, requests: list) -> dict:
    """Run `requests` (one generate_until task, prompts without a shared prefix) through `engine`;
    return its prompts in queue order with their outputs, the schedule's settings and the engine's
    counts, for `replay`."""
    captured: dict = {}
    generate = engine_lm.generate

    def recording(split, prompts, settings, plan, **kwargs):  # type: ignore[no-untyped-def]
        if captured:
            raise SystemExit("the requests decode in more than one group (different generation settings); replay one task")
        if any(p.prefix is not None for p in prompts):
            raise SystemExit("this task's prompts share a prefix; the replay does not model prefix groups")
        found, counts = generate(split, prompts, settings, plan, **kwargs)
        lookup = kwargs["lookup"]
        captured.update(
            prompts=[[list(p.tokens), found[p.index]] for p in prompts],
            slots=plan.slots, max_new=settings.max_new_tokens, chunk_tokens=kwargs["chunk_tokens"],
            lookup=[lookup.draft_tokens, lookup.step_tokens] if lookup is not None else [0, 0],
            steps=counts.decode_steps, prefill_tokens=counts.prefill_tokens, decode_seconds=counts.decode_seconds,
        )
        return found, counts

    prefill_seconds = 0.0
    prefill_step = continuous._Prefill.step

    def timed_prefill(self: continuous._Prefill) -> None:
        nonlocal prefill_seconds
        started = time.perf_counter()
        prefill_step(self)
        prefill_seconds += time.perf_counter() - started

    engine_lm.generate = recording
    continuous._Prefill.step = timed_prefill  # type: ignore[method-assign]
    start = time.perf_counter()
    try:
        engine.generate_until(requests, disable_tqdm=True)
    finally:
        engine_lm.generate = generate
        continuous._Prefill.step = prefill_step  # type: ignore[method-assign]
    return {**captured, "seconds": time.perf_counter() - start, "prefill_seconds": prefill_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a converted model folder (`benchharness fetch NAME`)")
    parser.add_argument("--task", default="bh_humaneval")
    parser.add_argument("--limit", type=int, default=None, help="first N documents (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, default=None, help="write the run's prompts, outputs and counts here")
    parser.add_argument("--load", type=Path, default=None, help="replay the outputs --save wrote (no engine run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    if args.load:
        run = json.loads(args.load.read_text())
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
        run = record(BenchEngineLM(model=model, tokenizer=tokenizer), generate_requests(args.task, args.limit))
        if args.save:
            args.save.write_text(json.dumps(run))

    params = matmul_params(model)
    limits = measure_machine_limits("cpu", torch.float32)
    roof = Roofline(
        params.body, params.head, 4 * params.body, 4 * params.head, limits.peak_flops, limits.peak_bandwidth
    )
    prompts = [(p, o) for p, o in run["prompts"]]
    lookup = LookupPlan(*run["lookup"])
    engine_order = list(range(len(prompts)))  # the engine's queue order, as recorded

    def play(order: list[int], slots: int) -> Replay:
        return replay(prompts, order, slots, lookup, run["max_new"], run["chunk_tokens"], roof)

    own = play(engine_order, run["slots"])
    if (own.steps, own.prefill_tokens) != (run["steps"], run["prefill_tokens"]):
        raise SystemExit(f"replay gives {own.steps} steps / {own.prefill_tokens} prefill tokens, the engine counted "
                         f"{run['steps']} / {run['prefill_tokens']}: the replay no longer mirrors continuous.generate")
    by_length = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][0]))
    oracle = sorted(range(len(prompts)), key=lambda i: -len(prompts[i][1]))
    print(f"{args.task}: {len(prompts)} requests, {sum(len(o) for _, o in prompts)} tokens generated, longest "
          f"{max(len(o) for _, o in prompts)}; peak {roof.peak / 1e9:.0f} GFLOP/s, bandwidth {roof.bandwidth / 1e9:.1f} GB/s")
    if "seconds" in run:
        decode_roof = own.seconds - own.prefill_seconds
        print(f"engine run: {run['seconds']:.1f} s against {own.seconds:.1f} s at the roofline of its own schedule "
              f"({own.seconds / run['seconds']:.0%}): prefill forwards {run['prefill_seconds']:.1f} s against "
              f"{own.prefill_seconds:.1f} ({own.prefill_seconds / run['prefill_seconds']:.0%}), decode steps (output layer "
              f"included) {run['decode_seconds']:.1f} s against {decode_roof:.1f} ({decode_roof / run['decode_seconds']:.0%}), "
              f"of it the steps of <= 16 rows {own.tail_seconds:.1f}")
    print("| schedule | decode steps | steps of <= 16 rows | prompt tokens prefilled | roofline s | of it the <= 16-row steps |")
    print("|---|---|---|---|---|---|")
    schedules = [(f"engine's ({run['slots']} rows, longest prompt first)", engine_order, run["slots"])]
    schedules += [(f"{slots} rows, longest prompt first", by_length, slots) for slots in (32, 48, 96, 128, 256)]
    schedules += [(f"{run['slots']} rows, shortest prompt first", by_length[::-1], run["slots"])]
    schedules += [(f"{slots} rows, oracle (longest output first)", oracle, slots) for slots in (run["slots"], 128)]
    for name, order, slots in schedules:
        r = own if order is engine_order else play(order, slots)
        print(f"| {name} | {r.steps} | {r.tail_steps} | {r.prefill_tokens} | {r.seconds:.1f} | {r.tail_seconds:.1f} |")


if __name__ == "__main__":
    main()
