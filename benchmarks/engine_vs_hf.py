"""Engine vs lm-eval's `hf` model: same tasks, same items, same process.

The tasks, over the harness's prepared data (`benchharness prepare`, done here if needed):
`mmlu`, lm-eval's MMLU prompt with letter answers, zero-shot, on the first `--limit-mmlu`
items of the harness's MMLU, which is stored round-robin over its 57 subjects (100 items:
every subject, 1-2 items each; the subjects are printed); `mc_text`, the answer text as the
continuation, on the next `--limit-mc` items in that order; `gsm8k`, zero-shot greedy
generation with stop strings on the first `--limit-gen` GSM8K test items. Two more
generation tasks are the harness's own suites as a run renders them (`bh_*` task YAML, the
same prompts, stop strings and token limits): `humaneval`, the first `--limit-humaneval`
HumanEval problems (default all 164; greedy, up to 384 new tokens, pass@1 from the sandbox),
and `gsm8k_cot`, GSM8K 8-shot chain of thought (lm-eval's gsm8k-cot prompt, up to 256 new
tokens) on the first `--limit-cot` test items. For generation the table also gives the
engine's decode steps' bytes (every weight once per step, and each running row's keys and
values) over their seconds and the memory read bandwidth measured in the same run.

lm-eval's `hf` model runs each task at every batch setting `--hf-batch-sizes` names and the
fastest counts (the table says which batch it used): by default the engine's row limit (the
engine decodes up to that many rows at once) and HFLM's own auto detection started there.
Each is lowered to what fits in memory (`--hf-memory-gb`): HFLM keeps the whole
vocabulary's logits and their log_softmax for every position of a batch, and on a CPU torch
raises no out-of-memory error it could back off from.

For each model and task it prints the wall seconds each engine spends in lm-eval's
model calls (loglikelihood / generate_until: the part the engine replaces;
simple_evaluate's total is printed too), the speedup (the engine's batch-budget probe,
run once per model, counted in the model's first task), the accuracy of each, the
largest per-sample loglikelihood difference (or, for generation, how many outputs are
identical), token efficiency (the fewest tokens the requests need over the tokens the
body computed, padding included), and the achieved useful FLOP/s while scoring (the
probe left out) over this machine's matmul FLOP/s measured in the same run: the fastest
of the fp32 kernels torch offers (its BLAS behind torch.matmul, and oneDNN, which the
engine's linear layers use on the CPU). The peak is measured right before and right
after each engine's part of each task and the higher of the two is that part's
reference: a shared or virtual machine's speed drifts by 10-30% over minutes, so a peak
taken at another moment would credit or blame the engine for the machine. The run's
highest peak (any moment) is printed as a stricter second reference. The engine runs
each task `--engine-repeats` times (default 3): the first run gives the speedup (lm-eval
`hf` runs once per batch setting), the fastest run the FLOP/s, as the peak is the fastest
of its timed runs (other load on the machine only adds time); every run must give the
first's responses.

The fewest tokens are each distinct token prefix once: the nodes of a trie over
every request's context and continuation, so a prefix that several contexts share
(the task description, few-shot examples) counts once. Useful FLOPs count each of
those tokens once through the body: its linear layers, and attention over the keys it
needs (itself and the tokens before it, within the window of a sliding-window layer;
4 x heads x head size FLOPs per key per layer, for QK^T and AV, as MFU counts
attention); and the output layer once per scored position (for generation, per
generated token, with the prompt and the output re-tokenized). Padding, masked-out
keys and repeated prefixes are the engines' overheads and do not count.

    .venv/bin/python benchmarks/engine_vs_hf.py \
        --model-dir smollm2=/path/to/smollm2 --model-dir gemma3=/path/to/gemma3 \
        --limit-mmlu 100 --limit-mc 40 --limit-gen 24
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from benchharness.suites.registry import default_cache_dir, get_suite, prepare_suite, render_tasks  # noqa: E402
from benchharness.engine import BenchEngineLM, EngineStats  # noqa: E402
from benchharness.engine.batching import TokenRequest, distinct_prefix_depths, truncate_request  # noqa: E402
from benchharness.engine.kv_slots import bytes_per_token as kv_bytes_per_token  # noqa: E402
from benchharness.measure.limits import matmul_kernels, measure_matmul_flops, measure_memory_bandwidth  # noqa: E402
from benchharness.engine.model_costs import matmul_params  # noqa: E402
from benchharness.measure.probe import DecodeBytes  # noqa: E402
from benchharness.engine.reference import row_bytes as reference_row_bytes  # noqa: E402

TASKS = ("mmlu", "mc_text", "gsm8k")  # the default set
HARNESS_TASKS = {"humaneval": "bh_humaneval", "gsm8k_cot": "bh_gsm8k_cot"}  # rendered by `benchharness prepare`
GENERATION = ("gsm8k", *HARNESS_TASKS)


@dataclass
class Row:
    model: str
    task: str
    items: int
    hf_s: float  # the fastest of the hf batch settings tried
    hf_batch: str  # the batch that run used
    hf_tries: str  # every setting tried: its seconds, or why it was left out
    engine_s: float  # scoring (or generating) only, the first run (the speedup's)
    engine_best_s: float  # the fastest of the engine's runs (the FLOP/s')
    engine_probe_s: float  # the engine's batch-budget probe: in each model's first task, else 0
    hf_score: float
    engine_score: float
    agreement: str  # max |d loglik| or identical generations
    hf_token_eff: float
    engine_token_eff: float
    hf_flops: float  # useful FLOP/s
    engine_flops: float
    hf_peak: float  # the highest kernel's FLOP/s measured right before and after hf's part
    engine_peak: float  # the same around the engine's fastest run
    engine_blas_peak: float  # torch.matmul's alone around that run, for comparison
    engine_budget: str
    attention_share: float  # of the useful FLOPs, the part that is attention
    engine_run_fracs: list[float]  # each engine run's useful FLOP/s over the peak around it
    decode_bandwidth_frac: float = float("nan")  # generation: decode steps' bytes/s over the run's read bandwidth

    @property
    def speedup(self) -> float:
        return self.hf_s / (self.engine_s + self.engine_probe_s)

    @property
    def hf_flops_frac(self) -> float:
        return self.hf_flops / self.hf_peak

    @property
    def engine_flops_frac(self) -> float:
        return self.engine_flops / self.engine_peak


def parse_model_dirs(values: list[str]) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model-dir expects NAME=PATH, got {value!r}")
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--model-dir {name}: {path} has no config.json (a transformers model folder is needed)")
        dirs[name] = Path(path)
    return dirs


def write_data(folder: Path, cache_dir: Path, limit_mmlu: int, limit_mc: int, limit_gen: int) -> dict[str, Path]:
    """The items of each task, from the harness's prepared data: MMLU is stored round-robin over
    its 57 subjects, so the first items cover every subject before any repeats. The answer-text
    items are the ones after them in that order (other items, again spread over the subjects)."""
    data_root = cache_dir / "data"
    mmlu_folder = prepare_suite(get_suite("mmlu"), data_root).folder
    gsm8k_folder = prepare_suite(get_suite("gsm8k"), data_root).folder
    docs = read_jsonl(mmlu_folder / "test.jsonl")
    chosen = {"mmlu": docs[:limit_mmlu], "mc_text": docs[limit_mmlu : limit_mmlu + limit_mc]}
    chosen["gsm8k"] = read_jsonl(gsm8k_folder / "test.jsonl")[:limit_gen]
    files = {}
    for task, rows in chosen.items():
        files[task] = folder / f"{task}.jsonl"
        files[task].write_text("".join(json.dumps(d) + "\n" for d in rows))
        if task != "gsm8k":
            print(f"{task}: {describe_subjects(rows)}")
    return files


def ensure_rendered_tasks(cache_dir: Path) -> None:
    """The harness's task YAML rendered over its prepared data, as `benchharness prepare` does (HumanEval
    and GSM8K prepared here if needed), so the harness tasks run with a run's exact prompts."""
    data_root = cache_dir / "data"
    for suite in ("humaneval", "gsm8k"):
        prepare_suite(get_suite(suite), data_root)
    render_tasks(Path(__file__).resolve().parents[1] / "configs" / "tasks", data_root, cache_dir / "tasks")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def describe_subjects(rows: list[dict]) -> str:
    """'100 items, 57 subjects (1-2 items each): abstract_algebra 2, anatomy 2, ...'"""
    counts = Counter(r["subject"] for r in rows)
    if not counts:
        return "no items"
    listed = ", ".join(f"{subject} {n}" for subject, n in sorted(counts.items()))
    low, high = min(counts.values()), max(counts.values())
    each = f"{low} item{'s' if high > 1 else ''}" if low == high else f"{low}-{high} items"
    return f"{len(rows)} items, {len(counts)} subjects ({each} each): {listed}"


def task_config(task: str, data_file: Path | None, max_gen_toks: int) -> dict | str:
    """The task to run: a config for the tasks written here, a rendered harness task's name for the others."""
    if task in HARNESS_TASKS:
        return HARNESS_TASKS[task]
    assert data_file is not None
    base = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
    }
    if task == "mmlu":  # lm-eval's stock MMLU prompt, zero-shot: single-token answers
        return base | {
            "task": "bench_mmlu",
            "output_type": "multiple_choice",
            "description": "The following are multiple choice questions (with answers) about {{subject_name}}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    if task == "mc_text":  # the answer text is the continuation: multi-token
        return base | {
            "task": "bench_mc_text",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question.strip()}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    if task == "gsm8k":
        return base | {
            "task": "bench_gsm8k",
            "output_type": "generate_until",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer.split('####')[-1].strip()}}",
            "generation_kwargs": {
                "until": ["Question:", "</s>", "<|im_end|>", "\n\n"],
                "do_sample": False,
                "max_gen_toks": max_gen_toks,
            },
            "filter_list": [
                {
                    "name": "flexible-extract",
                    "filter": [
                        {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                        {"function": "take_first"},
                    ],
                }
            ],
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_punctuation": True}
            ],
        }
    raise ValueError(task)


class TokenCounter:
    """Counts the tokens a model's body computes, padding included."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.body_tokens = 0
        self._hooks = [model.base_model.register_forward_pre_hook(self._on_body, with_kwargs=True)]

    def _on_body(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.body_tokens += ids.numel()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def kernel_peaks() -> dict[str, float]:
    """Each fp32 matmul kernel's FLOP/s on the CPU now (the fastest of its timed runs)."""
    return {
        kernel: measure_matmul_flops("cpu", torch.float32, min_seconds=0.5, kernel=kernel).max
        for kernel in matmul_kernels("cpu", torch.float32)
    }


@dataclass(frozen=True)
class UsefulFlops:
    """The FLOPs a set of token sequences minimally needs (see the module's docstring)."""

    body_params: int  # weights of the body's matmuls (`engine.model_costs.matmul_params`)
    head_params: int  # weights of the output layer
    pair_flops: int  # per query-key pair per layer: 2 x 2 x heads x head size (QK^T and AV)
    windows: tuple[int | None, ...]  # per layer: its sliding window, or None for full attention

    @classmethod
    def of(cls, model: torch.nn.Module) -> UsefulFlops:
        config = model.config
        params = matmul_params(model)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * int(config.num_hidden_layers)
        windows = tuple(int(config.sliding_window) if kind == "sliding_attention" else None for kind in layer_types)
        return cls(params.body, params.head, 4 * heads * head_dim, windows)

    def of_generations(self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]) -> tuple[float, float]:
        """(useful FLOPs, attention part) of generating each of `outputs` (token ids) after its prompt:
        every distinct prefix token once through the body, every output token through the output layer."""
        depths = distinct_prefix_depths([*p, *o[:-1]] for p, o in zip(prompts, outputs, strict=True))
        return self.count(depths, sum(len(o) for o in outputs))

    def count(self, depths: Sequence[int], output_rows: int) -> tuple[float, float]:
        """(useful FLOPs, the attention part of them) for trie nodes at `depths` (each one token
        through the body, attending to `depth` keys) and `output_rows` positions through the output layer."""
        keys = np.asarray(depths, dtype=np.float64)
        pairs = sum(float((np.minimum(keys, window) if window else keys).sum()) for window in self.windows)
        attention = self.pair_flops * pairs
        return 2 * self.body_params * len(keys) + attention + 2 * self.head_params * output_rows, attention


@dataclass
class EvalRun:
    wall_s: float  # simple_evaluate's total
    inside_s: float  # seconds inside the model's request methods
    out: dict  # simple_evaluate's results
    token_requests: list[TokenRequest]  # what loglikelihood scored, as token ids
    generations: list[tuple[str, str]]  # (prompt, output) of each generate_until request


def run_eval(lm, task: dict | str, limit: int | None, task_manager: TaskManager) -> EvalRun:
    inside = [0.0]
    token_requests: list[TokenRequest] = []
    generations: list[tuple[str, str]] = []
    originals = {name: getattr(lm, name) for name in ("loglikelihood", "generate_until", "_loglikelihood_tokens")}

    def timed(method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start

        return call

    def loglikelihood_tokens(requests, *args, **kwargs):
        first = len(token_requests)
        token_requests.extend(TokenRequest(first + i, tuple(c), tuple(t)) for i, (_, c, t) in enumerate(requests))
        return originals["_loglikelihood_tokens"](requests, *args, **kwargs)

    def generate_until(requests, *args, **kwargs):
        outputs = timed(originals["generate_until"])(requests, *args, **kwargs)
        generations.extend((request.args[0], output) for request, output in zip(requests, outputs, strict=True))
        return outputs

    lm.loglikelihood = timed(originals["loglikelihood"])
    lm.generate_until = generate_until
    lm._loglikelihood_tokens = loglikelihood_tokens
    try:
        start = time.perf_counter()
        out = simple_evaluate(
            model=lm, tasks=[task], limit=limit, log_samples=True, verbosity="WARNING", task_manager=task_manager
        )
        wall = time.perf_counter() - start
    finally:
        for name in originals:
            delattr(lm, name)  # back to the class methods
    return EvalRun(wall, inside[0], out, token_requests, generations)


@dataclass(frozen=True)
class HfBatch:
    """One batch setting of lm-eval's hf model to try on a task."""

    label: str  # as printed: "64", or "auto"
    batch_size: int | str  # given to HFLM
    max_batch_size: int  # where HFLM's auto detection starts (it halves on out-of-memory)
    note: str  # why it is below what was asked, or ""


def hf_batches(
    wanted: Sequence[str], engine_rows: int, row_bytes: float, probe_row_bytes: float, budget_bytes: float
) -> tuple[list[HfBatch], list[str]]:
    """The hf batch settings to try, each at most what fits in `budget_bytes`, and the ones left out (why).

    `wanted`: integers, "engine" (the engine's row limit) and "auto" (HFLM's own detection, started
    at the engine's row limit). `row_bytes`: the memory one row of an hf batch needs on this task
    (for scoring, its logits and their log_softmax over the whole vocabulary at every position of
    the longest sequence); `probe_row_bytes`: the same for HFLM's auto probe (for generation, a
    forward over its max_length). On a CPU torch raises no out-of-memory error that HFLM could back
    off from: the process is killed, so a batch that does not fit is never tried.
    """
    fits = int(budget_bytes // row_bytes)
    tries: list[HfBatch] = []
    left_out: list[str] = []
    for item in wanted:
        if item == "auto":
            start = min(engine_rows, int(budget_bytes // probe_row_bytes))
            if start < 1:
                left_out.append(f"auto (its probe needs {probe_row_bytes / 1e9:.0f} GB a row)")
                continue
            note = "" if start == engine_rows else f"probing from {start}: {engine_rows} rows do not fit"
            setting = HfBatch("auto", "auto", start, note)
        else:
            asked = engine_rows if item == "engine" else int(item)
            size = min(asked, fits)
            if size < 1:
                left_out.append(f"{asked} (one row needs {row_bytes / 1e9:.0f} GB)")
                continue
            note = "" if size == asked else f"{asked} rows do not fit"
            setting = HfBatch(str(size), size, size, note)
        if all((t.batch_size, t.max_batch_size) != (setting.batch_size, setting.max_batch_size) for t in tries):
            tries.append(setting)
    return tries, left_out


def hf_row_bytes(model: torch.nn.Module, longest: int, generation: bool) -> float:
    """Memory of one row of an hf batch whose longest sequence has `longest` tokens (fp32)."""
    if not generation:  # logits at every position (three copies alive), as the harness's engine: hf sizes it
        return float(reference_row_bytes(model, longest))
    # Generation: the key-value cache, the prefill's widest activations, logits at the last position.
    config = model.config.get_text_config()
    vocab = int(config.vocab_size)
    width = max(int(getattr(config, "intermediate_size", 0) or 0), int(config.hidden_size))
    cache = kv_bytes_per_token(config, torch.float32) * longest
    return cache + 4 * (3 * longest * width + 4 * vocab)


def max_gen_toks_of(run: EvalRun, name: str, default: int) -> int:
    """The task's own token limit as lm-eval ran it (a harness task sets its own), else `default`."""
    kwargs = run.out.get("configs", {}).get(name, {}).get("generation_kwargs") or {}
    return int(kwargs.get("max_gen_toks", default))


def longest_sequence(run: EvalRun, engine: BenchEngineLM, max_gen_toks: int) -> int:
    """Tokens in the longest sequence of the task (from the engine's run): what bounds an hf batch's memory."""
    if run.generations:
        return max(len(engine.tok_encode(prompt)) for prompt, _ in run.generations) + max_gen_toks
    truncated = (truncate_request(r, engine.max_length) for r in run.token_requests)
    return max(len(t.context) + len(t.continuation) for t in truncated)


def detected_batch(printed: str) -> str:
    """The batch HFLM's auto detection chose, from what it printed."""
    found = re.findall(r"Determined [Ll]argest batch size: (\d+)", printed)
    return found[-1] if found else "?"


def useful_flops(
    flops: UsefulFlops, run: EvalRun, engine: BenchEngineLM, stats: EngineStats
) -> tuple[float, float]:
    """(useful FLOPs, attention part) of what the engine's run (with these stats) computed, from its requests."""
    if run.generations:
        prompts = [engine.tok_encode(prompt) for prompt, _ in run.generations]
        outputs = [engine.tokenizer(output, add_special_tokens=False)["input_ids"] for _, output in run.generations]
        return flops.of_generations(prompts, outputs)
    truncated = [truncate_request(r, engine.max_length) for r in run.token_requests]
    depths = distinct_prefix_depths(r.context + r.continuation[:-1] for r in truncated)
    if len(depths) != stats.score_min_tokens:
        raise RuntimeError(f"{len(depths)} distinct prefix tokens here, {stats.score_min_tokens} in the engine")
    return flops.count(depths, stats.score_output_rows)


def metric_of(out: dict, name: str) -> float:
    result = out["results"][name]
    for key in ("acc,none", "exact_match,flexible-extract", "exact_match,none", "pass@1,none"):
        if key in result:
            return float(result[key])
    raise KeyError(f"no known metric in {sorted(result)}")


def same_responses(first: dict, second: dict, name: str) -> bool:
    """Whether two runs' samples hold identical responses (the engine is deterministic)."""
    responses = [{s["doc_id"]: s["resps"] for s in out["samples"][name]} for out in (first, second)]
    return responses[0] == responses[1]


def compare_samples(task: str, hf_out: dict, engine_out: dict, name: str) -> str:
    hf_samples = {s["doc_id"]: s for s in hf_out["samples"][name]}
    engine_samples = {s["doc_id"]: s for s in engine_out["samples"][name]}
    if task in GENERATION:
        same = sum(hf_samples[d]["resps"] == engine_samples[d]["resps"] for d in hf_samples)
        return f"{same}/{len(hf_samples)} identical"
    diff = 0.0
    for doc_id, sample in hf_samples.items():
        for a, b in zip(sample["resps"], engine_samples[doc_id]["resps"], strict=True):
            diff = max(diff, abs(float(a[0][0]) - float(b[0][0])))
    return f"{diff:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", action="append", default=[], help="NAME=PATH of a transformers folder")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit-mmlu", type=int, default=100)
    parser.add_argument("--limit-mc", type=int, default=40)
    parser.add_argument("--limit-gen", type=int, default=16)
    parser.add_argument("--limit-humaneval", type=int, default=None, help="HumanEval problems (default: all 164)")
    parser.add_argument("--limit-cot", type=int, default=24, help="GSM8K items for the 8-shot chain-of-thought task")
    parser.add_argument("--max-gen-toks", type=int, default=96)
    parser.add_argument(
        "--hf-batch-sizes",
        default="engine,auto",
        help="lm-eval hf batch settings tried on each task, the fastest counts: integers, 'engine' (the engine's "
        "row limit) and 'auto' (HFLM's own detection, from the engine's row limit down); each at most what fits "
        "in --hf-memory-gb",
    )
    parser.add_argument(
        "--hf-memory-gb", type=float, help="memory an hf batch may take (default: half the memory available at start)"
    )
    parser.add_argument("--engine-batch-size", default="auto")
    parser.add_argument(
        "--engine-repeats",
        type=int,
        default=3,
        help="engine runs per task: the first gives the speedup (lm-eval hf runs once per batch setting), the fastest the FLOP/s",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--cache", type=Path, help="the harness's cache, for the prepared data (default: the harness's)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()

    model_dirs = parse_model_dirs(args.model_dir)
    if not model_dirs:
        raise SystemExit("name at least one model: --model-dir NAME=PATH")
    tasks = [t for t in args.tasks.split(",") if t]
    hf_wanted = [b.strip() for b in args.hf_batch_sizes.split(",") if b.strip()]
    for item in hf_wanted:
        if item not in ("engine", "auto") and not item.isdigit():
            raise SystemExit(f"--hf-batch-sizes: {item!r} is not an integer, 'engine' or 'auto'")
    budget = (args.hf_memory_gb * 1e9) if args.hf_memory_gb else psutil.virtual_memory().available / 2
    for task in tasks:
        if task not in TASKS and task not in HARNESS_TASKS:
            raise SystemExit(f"--tasks: unknown task {task!r}; known: {', '.join((*TASKS, *HARNESS_TASKS))}")
    limits = {"mmlu": args.limit_mmlu, "mc_text": args.limit_mc, "gsm8k": args.limit_gen,
              "humaneval": args.limit_humaneval, "gsm8k_cot": args.limit_cot}
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    peaks: dict[str, list[float]] = {kernel: [] for kernel in matmul_kernels("cpu", torch.float32)}

    def measure_peaks() -> dict[str, float]:
        """Each kernel's FLOP/s now (also kept in `peaks`)."""
        now = kernel_peaks()
        for kernel, value in now.items():
            peaks[kernel].append(value)
        return now

    def run_peak() -> float:
        return max(max(values) for values in peaks.values())

    latest = measure_peaks()
    print(
        "matmul peak (fp32, 2048^3): "
        + ", ".join(f"{kernel} {value / 1e9:.1f} GFLOP/s" for kernel, value in latest.items())
        + f"; torch threads {torch.get_num_threads()}; hf batches may take {budget / 1e9:.1f} GB"
    )
    bandwidths: list[float] = []  # memory read bandwidth (bytes/s), measured around each generation task
    rows: list[Row] = []
    cache_dir = args.cache or default_cache_dir()
    if any(task in HARNESS_TASKS for task in tasks):
        ensure_rendered_tasks(cache_dir)
        task_manager = TaskManager(include_path=str(cache_dir / "tasks"))
    else:
        task_manager = TaskManager()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_data(Path(tmp), cache_dir, args.limit_mmlu, args.limit_mc, args.limit_gen)
        for model_name, path in model_dirs.items():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            flops = UsefulFlops.of(model)
            batch_size = args.engine_batch_size if args.engine_batch_size == "auto" else int(args.engine_batch_size)
            engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
            engine_rows = int(engine.batch_info["max_rows"])
            hf_max_length = HFLM(pretrained=model, tokenizer=tokenizer).max_length
            with torch.no_grad():  # warm-up: thread pool, allocator
                model(input_ids=torch.ones((2, 32), dtype=torch.long))
            # The budget probe runs once per model, before its first request: timed apart, so that
            # the speedup of the model's first task includes it and the FLOP/s while scoring do not.
            start = time.perf_counter()
            engine.token_budget()
            probe_s = time.perf_counter() - start
            print(
                f"{model_name}: engine budget {engine.batch_info['token_budget']} tokens, at most {engine_rows} rows, "
                f"from a {probe_s:.2f} s probe"
            )
            for task in tasks:
                config = task_config(task, files.get(task), args.max_gen_toks)
                name = config if isinstance(config, str) else config["task"]
                generation = task in GENERATION
                if generation:
                    bandwidths.append(measure_memory_bandwidth("cpu", min_seconds=0.5).max)
                # The engine first: its requests give the task's longest sequence, which bounds the
                # memory of an hf batch. (seconds, peaks before, peaks after) of each engine run;
                # the first is the speedup's.
                engine_runs: list[tuple[float, dict[str, float], dict[str, float]]] = []
                for repeat in range(args.engine_repeats):
                    before = latest
                    engine.reset_stats()
                    run = run_eval(engine, config, limits[task], task_manager)
                    latest = measure_peaks()
                    engine_runs.append((run.inside_s, before, latest))
                    if repeat == 0:
                        engine_run, stats = run, engine.stats
                    elif not same_responses(engine_run.out, run.out, name):
                        print(f"  warning: {model_name}/{task}: engine run {repeat + 1} differs from the first")
                best_s, best_before, best_after = min(engine_runs, key=lambda r: r[0])

                # lm-eval hf at each batch setting that fits; the fastest counts.
                longest = longest_sequence(engine_run, engine, max_gen_toks_of(engine_run, name, args.max_gen_toks))
                probe_length = hf_max_length if generation else longest  # HFLM's auto probe for generation: max_length
                settings, left_out = hf_batches(
                    hf_wanted,
                    engine_rows,
                    hf_row_bytes(model, longest, generation),
                    hf_row_bytes(model, probe_length, False),
                    budget,
                )
                hf_runs: list[tuple[str, EvalRun, int, dict[str, float], dict[str, float]]] = []
                tried = [f"left out {why}" for why in left_out]
                for setting in settings:
                    hf = HFLM(
                        pretrained=model,
                        tokenizer=tokenizer,
                        batch_size=setting.batch_size,
                        max_batch_size=setting.max_batch_size,
                    )
                    counter = TokenCounter(model)
                    before = latest
                    printed = io.StringIO()
                    with contextlib.redirect_stdout(printed):  # HFLM prints the batch its auto detection chose
                        hf_run = run_eval(hf, config, limits[task], task_manager)
                    counter.close()
                    latest = measure_peaks()
                    used = setting.label if setting.batch_size != "auto" else f"auto: {detected_batch(printed.getvalue())}"
                    hf_runs.append((used, hf_run, counter.body_tokens, before, latest))
                    agreement = compare_samples(task, hf_run.out, engine_run.out, name)
                    tried.append(
                        f"{used}: {hf_run.inside_s:.1f} s" + (f" ({setting.note})" if setting.note else "")
                        + f", vs engine {agreement}"
                    )
                    del hf
                if not hf_runs:
                    raise SystemExit(f"{model_name}/{task}: no hf batch setting fits: {'; '.join(tried)}")
                hf_batch, hf_run, hf_tokens, hf_before, hf_after = min(hf_runs, key=lambda r: r[1].inside_s)

                useful, attention = useful_flops(flops, engine_run, engine, stats)
                print(
                    f"  {model_name}/{task}: longest sequence {longest} tokens; hf tried {'; '.join(tried)}; "
                    f"simple_evaluate wall hf {hf_run.wall_s:.1f}s engine {engine_run.wall_s:.1f}s; "
                    f"engine {engine.batch_info['budget_method']} budget {engine.batch_info['token_budget']}, "
                    f"{stats}; useful {useful / 1e9:.0f} GFLOP ({attention / useful:.1%} attention)"
                )
                decode_bandwidth = float("nan")
                if generation:
                    engine_eff = hf_eff = float("nan")
                    bandwidths.append(measure_memory_bandwidth("cpu", min_seconds=0.5).max)
                    read = DecodeBytes.of(model).read(stats.decode_steps, stats.kv_slot_reads)
                    decode_bandwidth = read / max(stats.decode_seconds, 1e-9) / max(bandwidths[-2:])
                else:
                    engine_eff = stats.score_min_tokens / max(1, stats.score_padded_tokens)
                    hf_eff = stats.score_min_tokens / max(1, hf_tokens)
                hf_s, engine_s = hf_run.inside_s, engine_run.inside_s
                hf_out, engine_out = hf_run.out, engine_run.out
                rows.append(
                    Row(
                        model=model_name,
                        task=task,
                        items=len(engine_run.out["samples"][name]),
                        hf_s=hf_s,
                        hf_batch=hf_batch,
                        hf_tries="; ".join(tried),
                        engine_s=engine_s,
                        engine_best_s=best_s,
                        engine_probe_s=probe_s,
                        hf_score=metric_of(hf_out, name),
                        engine_score=metric_of(engine_out, name),
                        agreement=compare_samples(task, hf_out, engine_out, name),
                        hf_token_eff=hf_eff,
                        engine_token_eff=engine_eff,
                        hf_flops=useful / hf_s,
                        engine_flops=useful / best_s,
                        hf_peak=max(*hf_before.values(), *hf_after.values()),
                        engine_peak=max(*best_before.values(), *best_after.values()),
                        engine_blas_peak=max(best_before["torch.matmul"], best_after["torch.matmul"]),
                        engine_budget=str(engine.batch_info["token_budget"]),
                        attention_share=attention / useful,
                        decode_bandwidth_frac=decode_bandwidth,
                        engine_run_fracs=[
                            useful / seconds / max(*before.values(), *after.values())
                            for seconds, before, after in engine_runs
                        ],
                    )
                )
                probe_s = 0.0
                print_row(rows[-1], run_peak(), header=len(rows) == 1)
                sys.stdout.flush()
            del engine, model

    print()
    for kernel, values in peaks.items():
        print(
            f"matmul peak over the run, {kernel}: max {max(values) / 1e9:.1f}, "
            f"median {statistics.median(values) / 1e9:.1f} GFLOP/s"
        )
    print_table(rows, run_peak())
    if args.json:
        records = [
            {
                **row.__dict__,
                "speedup": row.speedup,
                "hf_flops_frac": row.hf_flops_frac,
                "engine_flops_frac": row.engine_flops_frac,
            }
            for row in rows
        ]
        args.json.write_text(json.dumps({"run_peak": run_peak(), "peaks": peaks, "rows": records}, indent=2))


def _fmt(value: float, pattern: str) -> str:
    return "-" if value != value else format(value, pattern)  # NaN -> "-"


def table_line(row: Row, run_peak: float) -> str:
    return (
        f"| {row.model} | {row.task} | {row.items} | {row.hf_s:.1f} | {row.hf_batch} | {row.engine_s + row.engine_probe_s:.1f} | "
        f"{row.engine_best_s:.1f} | "
        f"{row.speedup:.2f}x | {row.hf_score:.3f} | {row.engine_score:.3f} | {row.agreement} | "
        f"{_fmt(row.hf_token_eff, '.2f')} | {_fmt(row.engine_token_eff, '.2f')} | "
        f"{row.hf_flops_frac:.0%} | {row.engine_flops_frac:.0%} ({row.engine_flops / row.engine_blas_peak:.0%}) "
        f"[{row.engine_flops / run_peak:.0%}] | {_fmt(row.decode_bandwidth_frac, '.0%')} | {row.engine_peak / 1e9:.0f} | "
        f"{row.engine_budget} |"
    )


HEADER = (
    "| model | task | items | hf s | hf batch | engine s | engine best s | speedup | hf score | engine score | agreement "
    "| hf token eff | engine token eff | hf useful FLOP/s / peak "
    "| engine useful FLOP/s / peak (/ torch.matmul's) [/ run's highest] | engine decode bytes/s / bandwidth "
    "| engine's peak GFLOP/s | engine budget |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def print_row(row: Row, run_peak: float, header: bool) -> None:
    if header:
        print(HEADER)
    print(table_line(row, run_peak))


def print_table(rows: list[Row], run_peak: float) -> None:
    print(HEADER)
    for row in rows:
        print(table_line(row, run_peak))


if __name__ == "__main__":
    main()
