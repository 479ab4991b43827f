"""Greedy generation on a GPU: the engine (continuous batching, prompt-lookup drafts on and off)
against lm-eval's `hf` model on a task's generate_until requests, in bf16 and fp32, in one process.

Per task and dtype it prints, for lm-eval `hf` (`--hf-batch` rows) and each engine setting: wall
seconds of generate_until, generated tokens per second (the engine's token count), decode steps,
draft tokens kept / run, the outputs identical to `hf`'s, and where an output differs whether the
first differing token is a near-tie by the half-precision rule of `engine/parity.py` (in fp32
every output must be identical); a list names each differing output and how. Both sides run a few requests first, so CUDA's first-call
costs are not timed. A markdown copy goes to `--output`.

The requests come from the harness's rendered tasks (`benchharness prepare`), or from a JSON
file that `--dump-requests` writes on a machine that has them, for a GPU machine without the
data stack. The model: a converted folder (`benchharness fetch NAME` prints it) or a GGUF
file, dequantized as `benchharness fetch` does.

    python benchmarks/gpu_generation_check.py --dump-requests reqs.json [--tasks bh_humaneval,bh_gsm8k_cot] [--limit-cot 64]
    python benchmarks/gpu_generation_check.py (--model-dir PATH | --gguf FILE) [--requests reqs.json]
        [--dtypes bfloat16,float32] [--hf-batch 64] [--lookup-step-tokens 24,256] [--output FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from benchharness.engine import BenchEngineLM
from benchharness.engine.parity import choice_gap, near_tie
from benchharness.engine.reference import recorded_generations, stop_token_ids

WARMUP_REQUESTS = 4


def task_requests(tasks: list[str], limits: dict[str, int | None]) -> dict[str, list[Instance]]:
    from task_requests import generate_requests  # benchmarks/, beside this script; needs lm-eval's task stack

    return {task: generate_requests(task, limits.get(task)) for task in tasks}


def dump(requests: dict[str, list[Instance]], path: Path) -> None:
    payload = {task: [{"context": r.args[0], "gen_kwargs": r.args[1], "doc_id": r.doc_id} for r in reqs]
               for task, reqs in requests.items()}
    path.write_text(json.dumps(payload))


def load(path: Path) -> dict[str, list[Instance]]:
    payload = json.loads(path.read_text())
    return {task: [Instance("generate_until", {}, (r["context"], r["gen_kwargs"]), i) for i, r in enumerate(rows)]
            for task, rows in payload.items()}


def load_model(model_dir: Path | None, gguf: Path | None) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """fp32 weights on the CPU: from a converted folder, or dequantized from a GGUF file as `benchharness fetch` does."""
    if model_dir is not None:
        return (transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                transformers.AutoTokenizer.from_pretrained(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    return model, transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def check(model, tokenizer, requests: list[Instance], dtype: str, hf_batch: int, step_caps: list[int],
          details: list[str]) -> list[dict]:
    """One table's rows; each output that differs from hf's adds a line to `details`."""
    eos = stop_token_ids(model, tokenizer)
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=hf_batch)
    hflm.generate_until(requests[:WARMUP_REQUESTS], disable_tqdm=True)
    device = next(model.parameters()).device
    with recorded_generations(hflm, eos) as theirs_ids:
        theirs, hf_seconds = timed(lambda: hflm.generate_until(requests, disable_tqdm=True), device)
    rows = [{"engine": f"lm-eval hf, batch {hf_batch}", "seconds": hf_seconds, "identical": len(requests)}]
    settings = [("engine, no drafts", {"prompt_lookup_tokens": 0})]
    settings += [(f"engine, drafts (step cap {cap})", {"lookup_step_tokens": cap}) for cap in step_caps]
    for name, kwargs in settings:
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", **kwargs)
        engine.generate_until(requests[:WARMUP_REQUESTS], disable_tqdm=True)
        engine.reset_stats()
        # The timed run's own tokens (a second run of only the differing requests would batch them
        # differently, and in bf16 could give other tokens): generate_until decodes these.
        recorded: list[list[list[int]]] = []
        token_ids = engine.generate_token_ids
        engine.generate_token_ids = lambda reqs, disable_tqdm=True: recorded.append(token_ids(reqs, disable_tqdm)) or recorded[-1]
        ours, seconds = timed(lambda: engine.generate_until(requests, disable_tqdm=True), device)
        (ids,) = recorded
        stats = engine.stats
        row = {"engine": name, "seconds": seconds, "tokens": stats.generated_tokens, "tokens/s": stats.generated_tokens / seconds,
               "decode steps": stats.decode_steps, "rows per step": stats.decode_rows / max(1, stats.decode_steps),
               "drafts kept / run": f"{stats.accepted_drafts} / {stats.draft_tokens}",
               "identical": sum(a == b for a, b in zip(ours, theirs, strict=True))}
        differing = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
        if differing:
            kinds = {"near-tie": 0, "not a near-tie": 0, "same tokens": 0, "not recorded": 0}
            for i in differing:
                prompt = engine._encode_prompt(requests[i].args[0], engine.max_length)
                if tuple(prompt) not in theirs_ids:  # hf encoded this prompt otherwise
                    kinds["not recorded"] += 1
                    details.append(f"{name}, request {i}: hf's tokens for this prompt were not recorded")
                    continue
                mine, hf = ids[i], theirs_ids[tuple(prompt)]
                gap = choice_gap(model, prompt, mine, hf)
                if gap is None:  # one token list begins the other: the texts part at a stop string or EOS
                    kinds["same tokens"] += 1
                    details.append(f"{name}, request {i}: one output begins the other (engine {len(mine)} tokens, "
                                   f"hf {len(hf)}; engine ends {mine[-3:]}, hf at that point {hf[len(mine) - 3:len(mine) + 1]})")
                    continue
                index, difference, scale = gap
                kind = "near-tie" if near_tie(difference, scale, dtype) else "not a near-tie"
                kinds[kind] += 1
                details.append(f"{name}, request {i}: token {index}, engine {mine[index]} / hf {hf[index]}, "
                               f"logit gap {difference:.3g} at |logit| {scale:.3g}: {kind}")
            row["differing"] = ", ".join(f"{count} {kind}" for kind, count in kinds.items() if count)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--requests", type=Path, help="a JSON file from --dump-requests (else the rendered tasks)")
    parser.add_argument("--dump-requests", type=Path, help="write the tasks' requests to this JSON file and stop")
    parser.add_argument("--tasks", default="bh_humaneval,bh_gsm8k_cot")
    parser.add_argument("--limit-cot", type=int, default=64, help="GSM8K 8-shot CoT items (HumanEval: all 164)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--hf-batch", type=int, default=64)
    parser.add_argument("--lookup-step-tokens", default="24,256", help="the engine's draft step caps to run")
    parser.add_argument("--limit", type=int, help="first N requests of each task (a quick try)")
    parser.add_argument("--device", default="cuda", help="cuda (the point of this check); cpu for a quick try of the script")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if args.dump_requests:
        dump(task_requests(tasks, {"bh_gsm8k_cot": args.limit_cot}), args.dump_requests)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_generation_check: torch sees no CUDA GPU. Fix: run it on a machine with one.")
    if (args.model_dir is None) == (args.gguf is None):
        parser.error("give one of --model-dir and --gguf")
    requests = load(args.requests) if args.requests else task_requests(tasks, {"bh_gsm8k_cot": args.limit_cot})
    requests = {task: reqs[: args.limit] for task, reqs in requests.items() if task in tasks}
    weights, tokenizer = load_model(args.model_dir, args.gguf)
    caps = [int(c) for c in args.lookup_step_tokens.split(",") if c]
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    lines = [f"{where}, torch {torch.__version__}, transformers {transformers.__version__}; "
             f"model {args.model_dir or args.gguf.name}"]
    for dtype in args.dtypes.split(","):
        # From the fp32 weights each time (a bf16 copy cast back would not be the fp32 model).
        model = copy.deepcopy(weights).to(getattr(torch, dtype)).to(args.device).eval()
        for task, reqs in requests.items():
            details: list[str] = []
            rows = check(model, tokenizer, reqs, dtype, args.hf_batch, caps, details)
            columns = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", f"**{task}**, {len(reqs)} requests, {dtype}:", "",
                      "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            for row in rows:
                cells = [f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
                lines.append("| " + " | ".join(cells) + " |")
            if details:
                lines += ["", "Outputs that differ from hf's, at the first differing token (near-tie: engine/parity.py's rule):", ""]
                lines += [f"- {line}" for line in details]
            print("\n".join(lines[-len(rows) - 4 - len(details) - (3 if details else 0):]), flush=True)
            if args.output:  # after each table: a run cut short keeps what it finished
                args.output.write_text("\n".join(lines) + "\n")
        del model
    if args.device.startswith("cuda"):
        lines.append(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(lines[-1])
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
