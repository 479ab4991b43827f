"""Helpers for the benchmark scripts that compare engines through whole harness runs: write an
experiment for the offline packs, run it with one engine, read a run's samples and speed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from benchharness.cli import main as harness

MODELS = ["qwen2.5-coder-0.5b-instruct-q4km", "gemma-3-270m-q4km", "smollm2-135m-instruct-q41"]
REPO = Path(__file__).resolve().parents[1]


def run(engine: str, out: Path, mmlu: int, gsm8k: int, dtype: str = "float32", device: str = "cpu", extra: str = "") -> Path:
    """`benchharness run` of the three packs on MMLU (`mmlu` items spread over subjects) and GSM8K
    zero-shot (`gsm8k` items) with `engine`; returns the run folder."""
    label = f"{engine}-{dtype}"
    config = out / f"{label}.yaml"
    config.write_text(
        f"name: engines\ncatalog: {REPO / 'configs' / 'models.yaml'}\ntasks_dir: {REPO / 'configs' / 'tasks'}\n"
        f"models: {json.dumps(MODELS)}\nsuites:\n  - {{name: mmlu, limit: {mmlu}}}\n  - {{name: gsm8k_zeroshot, limit: {gsm8k}}}\n"
        f"engine: {engine}\ninference: {{dtype: {dtype}, device: {device}}}\n{extra}"
        f"speed: null\nparity: {{requests: 0}}\noutput_dir: {out / label}\n")
    code = harness(["-q", "run", str(config)])
    if code != 0:
        raise SystemExit(f"benchharness run --engine {engine} exited {code}")
    (folder,) = [p for p in (out / label).iterdir() if p.is_dir()]
    return folder


def samples(folder: Path, model: str, task: str) -> list[dict]:
    path = folder / "samples" / model / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare(runs: dict[str, Path], reference: str) -> pd.DataFrame:
    """Per model, task and engine: accuracy, answers that differ from `reference`'s, max and mean
    |delta loglikelihood| against it (scoring tasks), tokens/s and the task's wall seconds."""
    rows = []
    for model in MODELS:
        for task in ("bh_mmlu", "bh_gsm8k_cot_zeroshot"):
            ref = {(s["doc_id"], s.get("filter")): s for s in samples(runs[reference], model, task)}
            for engine, folder in runs.items():
                mine = samples(folder, model, task)
                pairs = [(ref[(s["doc_id"], s.get("filter"))], s) for s in mine]
                assert len(pairs) == len(ref), (engine, model, task)
                row = {"model": model, "task": task, "engine": engine, "items": len({s["doc_id"] for s in mine}),
                       "acc": sum(bool(s["correct"]) for _, s in pairs) / len(pairs)}
                if "loglikelihoods" in mine[0]:
                    deltas = [abs(p - q) for r, s in pairs for p, q in zip(r["loglikelihoods"], s["loglikelihoods"])]
                    row["answers differ"] = sum(r["pred"] != s["pred"] for r, s in pairs)
                    row["max |d loglik|"] = max(deltas)
                    row["mean |d loglik|"] = sum(deltas) / len(deltas)
                else:
                    row["answers differ"] = sum(r["response"] != s["response"] for r, s in pairs)
                tp = pd.read_csv(folder / "throughput.csv")
                sel = tp[(tp["model"] == model) & (tp["task"] == task) & (tp["phase"] == ("eval" if task == "bh_mmlu" else "eval_generate"))]
                row["tok/s"] = float(sel["tokens"].sum() / sel["seconds"].sum()) if len(sel) else float("nan")
                row["task s"] = json.loads((folder / "manifest.json").read_text())["models"][model]["eval_wall_seconds"][task]
                rows.append(row)
    return pd.DataFrame(rows)
