"""The rows of scores.csv and the records of samples/*.jsonl, built from lm-eval's results, with the columns they fill."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

from benchharness.config.catalog import ModelEntry
from benchharness.store import protocol
from benchharness.scorers.hooks import macro_average, subject_scores


SCORE_COLUMNS = ["model", "origin", "build", "suite", "task", "metric", "value", "stderr", "ci_low", "ci_high", "n",
                 "num_fewshot", "chat_template", "protocol"]

# Task config fields that make up the prompt; their hash goes into the manifest.
PROMPT_FIELDS = ("description", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_config", "generation_kwargs", "filter_list", "output_type")


def sample_record(sample: dict[str, Any], with_prompt: bool = True) -> dict[str, Any]:
    """One line of samples/<model>/<task>.jsonl from an lm-eval sample.

    With `with_prompt`, the text the model was given is kept beside its hash, as lm-eval's
    `--log_samples` keeps it: `prompt` (the rendered context, chat template applied where it
    was), `continuations` (the answers scored, for loglikelihood requests); `prompts` where one
    document's requests had different contexts. Off (`log_prompts: false`) for private data.
    """
    doc = sample.get("doc", {})
    metrics = {m: sample[m] for m in sample.get("metrics", []) if m in sample}
    record: dict[str, Any] = {
        "doc_id": sample["doc_id"],
        "subject": doc.get("subject"),
        "prompt_hash": sample.get("prompt_hash"),
        "doc_hash": sample.get("doc_hash"),
        "filter": sample.get("filter", "none"),
        "target": sample.get("target"),
        "metrics": metrics,
    }
    filtered = sample.get("filtered_resps", [])
    if filtered and isinstance(filtered[0], (list, tuple)) and len(filtered[0]) == 2 and isinstance(filtered[0][0], float):
        lls = [float(r[0]) for r in filtered]
        record["loglikelihoods"] = lls
        record["pred"] = max(range(len(lls)), key=lls.__getitem__)
    else:
        record["response"] = filtered[0] if filtered else None
        record["pred"] = record["response"]
    if with_prompt:
        record.update(prompt_text(sample.get("arguments") or []))
    primary = "acc" if "acc" in metrics else next(iter(metrics), None)
    # Right or wrong only for per-item scores; perplexities log (loglikelihood, length) pairs.
    value = metrics.get(primary) if primary is not None else None
    record["correct"] = bool(value >= 1.0) if isinstance(value, (int, float)) else None
    return record


def prompt_text(arguments: list[Any]) -> dict[str, Any]:
    """The prompt fields of a sample record from its requests' arguments: (context, continuation)
    for loglikelihood, (context, generation settings) for generation, (text,) for rolling."""
    contexts = [str(a[0]) for a in arguments if isinstance(a, (list, tuple)) and a]
    out: dict[str, Any] = {}
    if contexts:
        if all(c == contexts[0] for c in contexts):
            out["prompt"] = contexts[0]
        else:
            out["prompts"] = contexts
    continuations = [a[1] for a in arguments if isinstance(a, (list, tuple)) and len(a) > 1 and isinstance(a[1], str)]
    if continuations:
        out["continuations"] = continuations
    return out


def score_rows_for(
    entry: ModelEntry, suite: str, task: str, task_results: dict[str, Any], records: list[dict[str, Any]], seed: int, n: int | None = None,
) -> list[dict[str, Any]]:
    """scores.csv rows of one task: stderr and a seeded bootstrap CI from the per-item values.

    Without records (a group), stderr is lm-eval's pooled one and the CI is left empty.
    """
    from benchharness.scorers.stats import bootstrap_ci, mean_stderr

    rows = []
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        # A task with several filters (e.g. GSM8K's answer extractors) logs each item once per filter.
        logged = [r["metrics"][metric] for r in records if metric in r["metrics"] and r.get("filter", "none") == filt]
        # Corpus-level metrics (perplexities) log a pair per item, not a score: no per-item interval.
        per_item = [float(v) for v in logged if isinstance(v, (int, float))] if all(isinstance(v, (int, float)) for v in logged) else []
        low, high = bootstrap_ci(per_item, seed=seed) if per_item else (None, None)
        pooled = task_results.get(f"{metric}_stderr,{filt}")
        stderr = mean_stderr(per_item) if per_item else (float(pooled) if isinstance(pooled, (int, float)) else None)
        rows.append(
            {
                "model": entry.name, "origin": entry.origin, "build": entry.build, "suite": suite, "task": task,
                "metric": metric if filt == "none" else f"{metric},{filt}", "value": float(value),
                "stderr": stderr, "ci_low": low, "ci_high": high, "n": len(per_item) if per_item else (len(logged) or n),
            }
        )
    return rows


def macro_rows(entry: ModelEntry, suite: str, task: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`acc_macro`: the mean over subjects of per-subject accuracy (MMLU's headline), for tasks whose items have subjects."""
    scores = subject_scores(records, metric="acc")
    if len(scores) < 2:
        return []
    return [{
        "model": entry.name, "origin": entry.origin, "build": entry.build, "suite": suite, "task": task,
        "metric": "acc_macro", "value": macro_average(scores), "stderr": None, "ci_low": None, "ci_high": None, "n": len(records),
    }]


PROTOCOL_COLUMNS = ("num_fewshot", "chat_template", "protocol")


def add_protocol(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Fill each row's protocol card (shots, chat template, and the one-line protocol: thinking,
    generation settings, metric and filter) from a manifest's `tasks` and `models` records."""
    for row in rows:
        row["num_fewshot"] = protocol.shots(manifest, row["suite"], row["task"])
        row["chat_template"] = protocol.chat_template(manifest, row["model"])
        row["protocol"] = protocol.describe(manifest, row["model"], row["suite"], row["task"], row["metric"])


def set_protocol_columns(manifest: dict[str, Any], scores: pd.DataFrame) -> None:
    """The same cards as columns of a scores table (in place): for runs written before scores.csv carried them."""
    cards = scores.to_dict("records")
    add_protocol(manifest, cards)
    for column in PROTOCOL_COLUMNS:
        scores[column] = [card[column] for card in cards]


def prompt_hash(task_config: dict[str, Any]) -> str:
    fields = {k: task_config.get(k) for k in PROMPT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
