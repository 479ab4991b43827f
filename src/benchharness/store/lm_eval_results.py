"""The run's results in lm-eval's own format: what `lm_eval --output_path` writes, one file per model.

lm-eval writes `<output_path>/<model_name_sanitized>/results_<date>.json` holding the dict
`simple_evaluate` returned (results, groups, configs, versions, n-shot, higher_is_better,
n-samples, ...), plus `task_hashes` and its general-config fields. A harness run evaluates
suite by suite, so each finished suite is merged into the model's one file; tools that read
lm-eval results read `<run>/lm_eval/<model>/results_<run start>.json` as they read lm-eval's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Top-level keys of lm-eval's results that map task (or group) names to values: merged per suite.
PER_TASK_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "task_hashes")


def results_file(run_folder: Path, model: str, started_iso: str) -> Path:
    """Where lm-eval would write this model's results: its sanitized name, the start time as its date id."""
    from lm_eval.utils import sanitize_model_name

    date_id = started_iso.replace("+00:00", "").replace(":", "-")
    return run_folder / "lm_eval" / sanitize_model_name(model) / f"results_{date_id}.json"


def suite_payload(results: dict[str, Any], model: str, engine: str, chat_template: bool, seconds: float) -> dict[str, Any]:
    """lm-eval's results dict of one suite, JSON-safe as lm-eval dumps it, with the fields its
    tracker adds: `task_hashes` (over each sample's doc, prompt and target hashes) and model naming."""
    from lm_eval.utils import handle_non_serializable, hash_string, sanitize_model_name

    payload = {key: value for key, value in results.items() if key != "samples"}
    payload["task_hashes"] = {
        task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))
        for task, samples in (results.get("samples") or {}).items()
    }
    payload.update(model_source=engine, model_name=model, model_name_sanitized=sanitize_model_name(model),
                   chat_template=chat_template, total_evaluation_time_seconds=str(seconds))
    return json.loads(json.dumps(payload, default=handle_non_serializable, ensure_ascii=False))


def merge(existing: dict[str, Any] | None, payload: dict[str, Any]) -> dict[str, Any]:
    """`existing` (the suites written so far) with one more suite's payload: per-task maps are
    united, the evaluation time summed, every other field (config, versions of the code) the newest."""
    if not existing:
        return payload
    merged = {**existing, **{k: v for k, v in payload.items() if k not in PER_TASK_KEYS}}
    for key in PER_TASK_KEYS:
        merged[key] = {**(existing.get(key) or {}), **(payload.get(key) or {})}
    merged["total_evaluation_time_seconds"] = str(
        float(existing.get("total_evaluation_time_seconds") or 0) + float(payload.get("total_evaluation_time_seconds") or 0))
    return merged


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
