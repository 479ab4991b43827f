"""The run loop: prepare suites and models, then for each model evaluate each suite and write results.

Everything that can fail on bad input (unknown suite, missing data, missing or corrupted
weights, unwritable output folder) is checked before the run folder is created, so a
failed start leaves nothing behind. Once running, every finished task is written at
once (atomically); the manifest says which are done and whether the run completed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchharness import __version__
from benchharness.catalog import ModelEntry
from benchharness.config import Experiment, SuiteSpec
from benchharness.data import PreparedSuite, Suite, get_suite, prepare_suite, render_tasks
from benchharness.errors import HarnessError
from benchharness.metered import MeteredLM
from benchharness.sources import ResolvedModel, load_model, pick_device, pick_dtype, resolve_model
from benchharness.store import SCORE_COLUMNS, THROUGHPUT_COLUMNS, RunStore

log = logging.getLogger(__name__)

# Task config fields that make up the prompt; their hash goes into the manifest.
PROMPT_FIELDS = ("description", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_config", "generation_kwargs", "filter_list", "output_type")


@dataclass(frozen=True)
class PlannedSuite:
    spec: SuiteSpec
    suite: Suite
    prepared: PreparedSuite


def new_run_id(experiment: Experiment, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{experiment.config_hash()}"


def prepare_suites(experiment: Experiment, cache_dir: Path) -> tuple[list[PlannedSuite], Path]:
    """Look up and prepare every suite, render the task YAMLs; returns the plan and the rendered task folder."""
    suites = [(spec, get_suite(spec.name)) for spec in experiment.suites]
    data_root = cache_dir / "data"
    planned = [PlannedSuite(spec, suite, prepare_suite(suite, data_root)) for spec, suite in suites]
    tasks = render_tasks(experiment.tasks_dir, data_root, cache_dir / "tasks")
    return planned, tasks


def check_output_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise HarnessError(f"output folder {folder} is not writable ({exc.strerror or exc}). Fix: pass --output DIR or set output_dir to a folder you can write.") from exc


def run_experiment(experiment: Experiment, cache_dir: Path, run_id: str | None = None) -> Path:
    """Run `experiment`; returns the run folder. Raises HarnessError on bad input before writing anything."""
    started = dt.datetime.now(dt.timezone.utc)
    run_id = run_id or new_run_id(experiment, started)
    log.info("experiment %s (%s): %d model(s) x %d suite(s)", experiment.name, experiment.config_hash(), len(experiment.models), len(experiment.suites))

    log.info("stage 1/3: preparing suite data")
    planned, tasks_dir = prepare_suites(experiment, cache_dir)
    log.info("stage 2/3: resolving model weights")
    resolved = {m.name: resolve_model(m, cache_dir) for m in experiment.models}
    device = pick_device(experiment.inference.device)
    dtype = pick_dtype(experiment.inference.dtype, device)
    check_output_writable(experiment.output_dir)

    store = RunStore(experiment.output_dir / run_id)
    store.folder.mkdir(parents=True)
    manifest = _initial_manifest(experiment, run_id, started, planned, resolved, device, dtype)
    store.write_manifest(manifest)
    score_rows: list[dict[str, Any]] = []
    speed_rows: list[dict[str, Any]] = []
    log.info("stage 3/3: evaluating -> %s", store.folder)
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's task folders takes seconds: do it once per run.
    task_manager = TaskManager(include_path=str(tasks_dir))
    status = "failed"
    try:
        pairs = tqdm(total=len(experiment.models) * len(planned), desc="model x suite", unit="task", disable=None)
        for entry in experiment.models:
            _evaluate_model(experiment, entry, resolved[entry.name], planned, task_manager, device, dtype, store, manifest, score_rows, speed_rows, pairs)
        pairs.close()
        status = "complete"
    except KeyboardInterrupt:
        status = "incomplete"
        log.error("interrupted: finished tasks are kept in %s; the run is marked incomplete", store.folder)
        raise
    finally:
        manifest["status"] = status
        manifest["volatile"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        store.write_manifest(manifest)
        _write_report(store.folder)
    log.info("done: %s", store.folder)
    return store.folder


def _evaluate_model(
    experiment: Experiment,
    entry: ModelEntry,
    resolved: ResolvedModel,
    planned: list[PlannedSuite],
    task_manager: Any,
    device: str,
    dtype: str,
    store: RunStore,
    manifest: dict[str, Any],
    score_rows: list[dict[str, Any]],
    speed_rows: list[dict[str, Any]],
    pairs: tqdm,
) -> None:
    log.info("%s (%s): loading from %s on %s, %s", entry.name, entry.origin, resolved.path, device, dtype)
    t0 = time.perf_counter()
    model, tokenizer = load_model(resolved, entry, dtype, device)
    load_seconds = time.perf_counter() - t0
    lm, batch_info = make_lm(experiment, model, tokenizer, device)
    info = manifest["models"][entry.name]
    info["batch"] = batch_info
    info["load_seconds"] = round(load_seconds, 3)
    speed_rows.append(_row(entry, task="", phase="load_warm", seconds=load_seconds))
    if resolved.converted_now:
        speed_rows.append(_row(entry, task="", phase="load_cold", seconds=resolved.prepare_seconds + load_seconds))

    metered = MeteredLM(lm, tokenizer)
    for item in planned:
        pairs.set_postfix_str(f"{entry.name} / {item.spec.name}")
        log.info("%s: suite %s (limit %s, %s-shot)", entry.name, item.spec.name, item.spec.limit, item.spec.num_fewshot or 0)
        metered.reset()
        wall = time.perf_counter()
        results = evaluate_task(metered, item.suite.task, task_manager, item.spec, experiment.seed)
        wall = time.perf_counter() - wall
        for task_name, samples in results["samples"].items():
            records = [sample_record(s) for s in samples]
            store.write_samples(entry.name, task_name, records)
            score_rows.extend(score_rows_for(entry, item.spec.name, task_name, results["results"][task_name], records, experiment.seed))
            manifest["tasks"][task_name] = {
                "suite": item.spec.name,
                "data_fingerprint": item.prepared.fingerprint,
                "prompt_hash": prompt_hash(results["configs"][task_name]),
                "num_fewshot": results.get("n-shot", {}).get(task_name),
                "limit": item.spec.limit,
                "n": len(records),
                "n_available": item.prepared.n_items,
            }
            manifest["completed"].append([entry.name, task_name])
        tokens = metered.prompt_tokens + metered.generated_tokens
        speed_rows.append(
            _row(
                entry, task=item.suite.task, phase="eval", batch=batch_info.get("batch_size"), tokens=tokens,
                seconds=round(metered.seconds, 4), tokens_per_s=round(tokens / metered.seconds, 2) if metered.seconds > 0 else None,
                peak_memory_mb=round(_peak_rss_mb(), 1),
            )
        )
        info.setdefault("eval_wall_seconds", {})[item.suite.task] = round(wall, 3)
        # Tables first, manifest last: the manifest's `completed` never names a task whose rows are missing.
        store.write_table("scores.csv", score_rows, SCORE_COLUMNS)
        store.write_table("throughput.csv", speed_rows, THROUGHPUT_COLUMNS)
        store.write_manifest(manifest)
        pairs.update(1)
    del model, lm, metered


def make_lm(experiment: Experiment, model: Any, tokenizer: Any, device: str) -> tuple[Any, dict[str, Any]]:
    """The lm-eval model for the configured engine, and how its batch size was chosen."""
    batch_size = experiment.inference.batch_size
    if experiment.engine == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        return lm, {"engine": "hf", "batch_size": batch_size, "how": "configured" if batch_size != "auto" else "lm-eval auto"}
    from benchharness.engine import BenchEngineLM

    lm = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=experiment.inference.max_batch_tokens, device=device)
    return lm, {"engine": "benchharness", **lm.batch_info}


def evaluate_task(lm: Any, task: str, task_manager: Any, spec: SuiteSpec, seed: int) -> dict[str, Any]:
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=task_manager,
        limit=spec.limit,
        num_fewshot=spec.num_fewshot,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,
    )
    if results is None:
        raise HarnessError(f"lm-eval returned no results for task {task}")
    return results


def sample_record(sample: dict[str, Any]) -> dict[str, Any]:
    """One line of samples/<model>/<task>.jsonl from an lm-eval sample."""
    doc = sample.get("doc", {})
    metrics = {m: sample[m] for m in sample.get("metrics", []) if m in sample}
    record: dict[str, Any] = {
        "doc_id": sample["doc_id"],
        "subject": doc.get("subject"),
        "prompt_hash": sample.get("prompt_hash"),
        "doc_hash": sample.get("doc_hash"),
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
    primary = "acc" if "acc" in metrics else next(iter(metrics), None)
    record["correct"] = bool(metrics[primary] >= 1.0) if primary is not None else None
    return record


def score_rows_for(entry: ModelEntry, suite: str, task: str, task_results: dict[str, Any], records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    from benchharness.stats import bootstrap_ci, mean_stderr

    rows = []
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        per_item = [float(r["metrics"][metric]) for r in records if metric in r["metrics"]]
        low, high = bootstrap_ci(per_item, seed=seed) if per_item else (None, None)
        rows.append(
            {
                "model": entry.name, "origin": entry.origin, "build": entry.build, "suite": suite, "task": task,
                "metric": metric if filt == "none" else f"{metric},{filt}", "value": float(value),
                "stderr": mean_stderr(per_item) if per_item else None, "ci_low": low, "ci_high": high, "n": len(per_item),
            }
        )
    return rows


def prompt_hash(task_config: dict[str, Any]) -> str:
    fields = {k: task_config.get(k) for k in PROMPT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row(entry: ModelEntry, **values: Any) -> dict[str, Any]:
    return {"model": entry.name, "origin": entry.origin, **values}


def _peak_rss_mb() -> float:
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write_report(folder: Path) -> None:
    try:
        from benchharness.report import write_run_report

        write_run_report(folder)
    except Exception as exc:  # the report is derived; a failure here must not lose the results
        log.error("could not write report.md for %s: %s (results are intact; rerun `benchharness report %s`)", folder, exc, folder)


def _initial_manifest(
    experiment: Experiment, run_id: str, started: dt.datetime, planned: list[PlannedSuite],
    resolved: dict[str, ResolvedModel], device: str, dtype: str,
) -> dict[str, Any]:
    models = {}
    for entry in experiment.models:
        res = resolved[entry.name]
        models[entry.name] = {
            "origin": entry.origin, "organisation": entry.organisation, "family": entry.family, "params": entry.params,
            "license": entry.license, "build": entry.build, "source": res.source, "revision": res.revision,
            "weights_sha256": res.weights_sha256, "dtype": dtype, "device": device, "engine": experiment.engine,
            "chat_template": False,
        }
    fingerprint = {
        "config_hash": experiment.config_hash(),
        "config": experiment.resolved(),
        "weights_sha256": {name: r.weights_sha256 for name, r in resolved.items()},
        "data_fingerprints": {p.spec.name: p.prepared.fingerprint for p in planned},
        "seed": experiment.seed,
        "versions": versions(),
    }
    return {
        "run_id": run_id,
        "status": "running",
        "experiment": experiment.name,
        "config_file": str(experiment.source_file),
        "config_hash": experiment.config_hash(),
        "config": experiment.resolved(),
        "fingerprint": fingerprint,
        "volatile": {"started": started.isoformat(), "finished": None, "host": socket.gethostname()},
        "models": models,
        "tasks": {},
        "completed": [],
        "versions": fingerprint["versions"],
        "hardware": hardware(),
        "command": " ".join(sys.argv),
    }


def versions() -> dict[str, str | None]:
    import lm_eval
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": getattr(lm_eval, "__version__", None),
        "benchharness": __version__,
        "benchharness_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> dict[str, Any]:
    try:
        from benchharness.perf import hardware_info

        return hardware_info()
    except ImportError:
        import os

        return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count()}
