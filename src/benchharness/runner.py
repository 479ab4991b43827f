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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from benchharness.catalog import ModelEntry
from benchharness.config import Experiment, SuiteSpec
from benchharness.data import SUITES, check_task_data_offline, prepare_suite, render_tasks
from benchharness.errors import HarnessError
from benchharness.manifest import fingerprint_sha256, initial_manifest
from benchharness.metered import MeteredLM
from benchharness.scoring import macro_average, subject_scores
from benchharness.perf import MachineLimits, MemorySampler, hardware_info, load_timer, measure_machine_limits, model_flops_per_token, run_speed_probe
from benchharness.sources import ResolvedModel, load_model, pick_device, pick_dtype, resolve_model, sha256_file
from benchharness.store import SCORE_COLUMNS, THROUGHPUT_COLUMNS, RunStore

log = logging.getLogger(__name__)

# Task config fields that make up the prompt; their hash goes into the manifest.
PROMPT_FIELDS = ("description", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_config", "generation_kwargs", "filter_list", "output_type")


@dataclass(frozen=True)
class PlannedSuite:
    """A suite to run: a harness suite over prepared data, or a stock/user lm-eval task or group."""

    spec: SuiteSpec
    task: str
    fingerprint: str | None  # of the prepared data; None for tasks whose data the harness does not prepare
    n_items: int | None


def new_run_id(experiment: Experiment, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{experiment.config_hash()}"


def plan_suites(experiment: Experiment, cache_dir: Path) -> tuple[list[PlannedSuite], Any]:
    """Prepare the harness's suites, render the task YAMLs, check the other tasks exist and have data.

    Returns the plan and the lm-eval TaskManager that knows every task in it.
    """
    from lm_eval.tasks import TaskManager

    data_root = cache_dir / "data"
    planned: list[PlannedSuite] = []
    stock: list[SuiteSpec] = []
    for spec in experiment.suites:
        if spec.name in SUITES:
            prepared = prepare_suite(SUITES[spec.name], data_root, sources=experiment.data_sources)
            planned.append(PlannedSuite(spec, prepared.task, prepared.fingerprint, prepared.n_items))
        else:
            stock.append(spec)
            planned.append(PlannedSuite(spec, spec.name, None, None))
    tasks_dir = render_tasks(experiment.tasks_dir, data_root, cache_dir / "tasks")
    # Indexing lm-eval's task folders takes seconds: do it once per run.
    manager = TaskManager(include_path=[str(tasks_dir), *map(str, experiment.include_paths)])
    for spec in stock:
        if spec.name not in manager.all_tasks:
            raise HarnessError(
                f"{experiment.source_file}: suites: unknown suite '{spec.name}': neither a harness suite ({', '.join(SUITES)}) "
                "nor an lm-eval task or group. Fix: check the name (`benchharness suites`, `lm_eval ls tasks`) or add its YAML folder to include_paths."
            )
        # Read the raw YAML configs: building lm-eval's Task objects would already load (download) the data.
        for config in raw_task_configs(manager, spec.name):
            problem = check_task_data_offline(config)
            if problem:
                raise HarnessError(f"{experiment.source_file}: suites: {problem}")
    return planned, manager


def raw_task_configs(manager: Any, name: str) -> list[dict[str, Any]]:
    """The unprocessed configs of the leaf tasks behind a task, group or tag name in lm-eval's index."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None:
        return []
    if entry.kind == Kind.TAG:
        return [cfg for other in manager.task_index.values() if name in other.tags for cfg in raw_task_configs(manager, other.name)]
    config = entry.cfg or (load_yaml(entry.yaml_path, resolve_func=False, recursive=True) if entry.yaml_path else {})
    if entry.kind != Kind.GROUP:
        return [{"task": name, **config}]
    children = config.get("task", [])
    out: list[dict[str, Any]] = []
    for child in children if isinstance(children, list) else [children]:
        if isinstance(child, str):
            out += raw_task_configs(manager, child)
        elif isinstance(child, dict) and "dataset_path" in child:
            out.append(child)
        elif isinstance(child, dict) and isinstance(child.get("task"), str):
            out += raw_task_configs(manager, child["task"])
    return out


def check_output_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{time.time_ns()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise HarnessError(f"output folder {folder} is not writable ({exc.strerror or exc}). Fix: pass --output DIR or set output_dir to a folder you can write.") from exc


def find_resumable(output_dir: Path, config_hash: str) -> Path:
    """The newest run folder in `output_dir` made from the same config that did not complete."""
    candidates = []
    for manifest_path in sorted(output_dir.glob(f"*-{config_hash}/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") != "complete":
            candidates.append(manifest_path.parent)
    if not candidates:
        raise HarnessError(f"--resume: no unfinished run of this config (hash {config_hash}) in {output_dir}. Fix: run without --resume, or pass the run folder: --resume results/<run_id>.")
    return candidates[-1]


def run_experiment(experiment: Experiment, cache_dir: Path, resume: Path | None = None) -> Path:
    """Run `experiment`, or finish the unfinished run folder `resume`; returns the run folder.

    Raises HarnessError on bad input before writing anything.
    """
    started = dt.datetime.now(dt.timezone.utc)
    log.info("experiment %s (%s): %d model(s) x %d suite(s)", experiment.name, experiment.config_hash(), len(experiment.models), len(experiment.suites))
    store = RunStore(resume if resume is not None else experiment.output_dir / new_run_id(experiment, started))
    previous = _resumable_manifest(store, experiment) if resume is not None else None

    log.info("stage 1/3: preparing suite data")
    planned, task_manager = plan_suites(experiment, cache_dir)
    log.info("stage 2/3: resolving model weights")
    resolved = {m.name: resolve_model(m, cache_dir) for m in experiment.models}
    device = pick_device(experiment.inference.device)
    dtype = pick_dtype(experiment.inference.dtype, device)
    check_output_writable(store.folder.parent)

    if previous is None:
        store.folder.mkdir(parents=True)
        data_fingerprints = {p.spec.name: p.fingerprint for p in planned}
        manifest = initial_manifest(experiment, store.folder.name, started, data_fingerprints, resolved, device, dtype, hardware_info())
        score_rows: list[dict[str, Any]] = []
        speed_rows: list[dict[str, Any]] = []
    else:
        manifest = previous
        _check_same_inputs(store, manifest, planned, resolved)
        manifest["volatile"]["resumed"].append(started.isoformat())
        score_rows, speed_rows = _finished_rows(store, manifest, [p.spec.name for p in planned])
        log.info("resuming %s: %d model/suite pair(s) already done", store.folder, len(manifest["completed_suites"]))
    manifest["status"] = "running"
    store.write_manifest(manifest)

    limits = None
    if experiment.speed is not None:
        log.info("measuring this machine's matmul FLOP/s and memory bandwidth (%s, %s)", device, dtype)
        limits = measure_machine_limits(device, getattr(torch, dtype), min_seconds=experiment.speed.limits_min_seconds)
        manifest["limits"] = limits.to_dict()
    log.info("stage 3/3: evaluating -> %s", store.folder)
    status = "failed"
    try:
        done = {tuple(pair) for pair in manifest["completed_suites"]}
        pairs = tqdm(total=len(experiment.models) * len(planned), initial=len(done), desc="model x suite", unit="suite", disable=None)
        for entry in experiment.models:
            todo = [p for p in planned if (entry.name, p.spec.name) not in done]
            if todo:
                _evaluate_model(experiment, entry, resolved[entry.name], todo, task_manager, device, dtype, limits, store, manifest, score_rows, speed_rows, pairs)
        pairs.close()
        status = "complete"
    except KeyboardInterrupt:
        status = "incomplete"
        log.error("interrupted: finished tasks are kept in %s; finish it with --resume", store.folder)
        raise
    finally:
        manifest["status"] = status
        manifest["volatile"]["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        manifest["fingerprint_sha256"] = fingerprint_sha256(manifest["fingerprint"])
        try:
            store.write_manifest(manifest)
        except HarnessError as exc:
            if status == "complete":
                raise
            # The run already failed; its manifest still says "running", never "complete".
            log.error("could not record status '%s' in the manifest: %s", status, exc)
        _write_report(store.folder)
    log.info("done: %s", store.folder)
    return store.folder


def _resumable_manifest(store: RunStore, experiment: Experiment) -> dict[str, Any]:
    if not store.manifest_path.is_file():
        raise HarnessError(f"--resume {store.folder}: no manifest.json there. Fix: pass a run folder under results/.")
    manifest = store.read_manifest()
    if manifest.get("config_hash") != experiment.config_hash():
        raise HarnessError(
            f"--resume {store.folder}: that run was made from config hash {manifest.get('config_hash')}, this config (with its overrides) has {experiment.config_hash()}. "
            "Fix: resume with the same config file and command-line overrides."
        )
    if manifest.get("status") == "complete":
        raise HarnessError(f"--resume {store.folder}: that run is already complete. Fix: start a new run without --resume.")
    return manifest


def _check_same_inputs(store: RunStore, manifest: dict[str, Any], planned: list[PlannedSuite], resolved: dict[str, ResolvedModel]) -> None:
    """A resumed run must see the same weights and data as its first part, or its tables would mix two runs."""
    recorded = manifest["fingerprint"]
    for name, res in resolved.items():
        if recorded["weights_sha256"].get(name) != res.weights_sha256:
            raise HarnessError(f"--resume {store.folder}: the weights of {name} changed since the run started. Fix: start a new run.")
    for item in planned:
        if recorded["data_fingerprints"].get(item.spec.name) != item.fingerprint:
            raise HarnessError(f"--resume {store.folder}: the data of suite {item.spec.name} changed since the run started. Fix: start a new run.")


def _finished_rows(store: RunStore, manifest: dict[str, Any], suites: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of the tables that belong to finished model/suite pairs; the rest is recomputed."""
    done = {tuple(pair) for pair in manifest["completed_suites"]}
    # Load and probe rows (no task) belong to a model; it is loaded again unless all its suites are done.
    finished_models = {m for m in manifest["models"] if all((m, s) in done for s in suites)}

    def keep(path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            return []
        frame = pd.read_csv(path, dtype=object, keep_default_na=False)
        rows = frame.to_dict("records")
        return [{k: (None if v == "" else v) for k, v in r.items()} for r in rows]

    suite_of_task = {task: info["suite"] for task, info in manifest["tasks"].items()}
    scores = [r for r in keep(store.folder / "scores.csv") if (r["model"], r["suite"]) in done]
    speeds = [
        r for r in keep(store.folder / "throughput.csv")
        if (r["model"], suite_of_task.get(r["task"] or "", "")) in done or (not r["task"] and r["model"] in finished_models)
    ]
    return scores, speeds


def _evaluate_model(
    experiment: Experiment,
    entry: ModelEntry,
    resolved: ResolvedModel,
    planned: list[PlannedSuite],
    task_manager: Any,
    device: str,
    dtype: str,
    limits: MachineLimits | None,
    store: RunStore,
    manifest: dict[str, Any],
    score_rows: list[dict[str, Any]],
    speed_rows: list[dict[str, Any]],
    pairs: tqdm,
) -> None:
    log.info("%s (%s): loading from %s on %s, %s", entry.name, entry.origin, resolved.path, device, dtype)
    with load_timer("load_warm", device) as load:
        model, tokenizer = load_model(resolved, entry, dtype, device)
    speed_rows.append(load.row(entry.name, entry.origin).to_dict())
    if resolved.converted_now:
        speed_rows.append({**_row(entry, task=None, phase="load_cold", reps=1), "seconds": resolved.prepare_seconds + load.seconds})
    lm = make_lm(experiment, model, tokenizer, device)
    info = manifest["models"][entry.name]
    # Only instruction-tuned models that ship a template get one; the manifest and report say which did.
    chat = experiment.chat_template and entry.instruct and getattr(tokenizer, "chat_template", None) is not None
    info["chat_template"] = chat
    info["load_seconds"] = round(load.seconds, 3)
    flops_per_token = model_flops_per_token(model)

    metered = MeteredLM(lm, tokenizer)
    for item in planned:
        pairs.set_postfix_str(f"{entry.name} / {item.spec.name}")
        log.info("%s: suite %s (limit %s, few-shot %s)", entry.name, item.spec.name, item.spec.limit, "task default" if item.spec.num_fewshot is None else item.spec.num_fewshot)
        metered.reset()
        wall = time.perf_counter()
        with MemorySampler(device) as memory:
            results = evaluate_task(metered, item.task, task_manager, item.spec, experiment.seed, chat, request_cache=store.folder / "cache" / entry.name)
        wall = time.perf_counter() - wall
        for task_name, samples in results["samples"].items():
            records = [sample_record(s) for s in samples]
            _record_file(store, manifest, store.write_samples(entry.name, task_name, records))
            score_rows.extend(score_rows_for(entry, item.spec.name, task_name, results["results"][task_name], records, experiment.seed))
            score_rows.extend(macro_rows(entry, item.spec.name, task_name, records))
            task_prompt_hash = prompt_hash(results["configs"][task_name])
            manifest["tasks"][task_name] = {
                "suite": item.spec.name,
                "data_fingerprint": item.fingerprint,
                "prompt_hash": task_prompt_hash,
                "num_fewshot": results.get("n-shot", {}).get(task_name),
                "limit": item.spec.limit,
                "n": len(records),
                "n_available": item.n_items,
            }
            manifest["fingerprint"]["prompt_hashes"][task_name] = task_prompt_hash
            manifest["completed"].append([entry.name, task_name])
        for group in [name for name in results["results"] if name not in results["samples"]]:
            # A group's score is lm-eval's aggregate of its tasks (the macro average where the YAML says so).
            n = sum(len(results["samples"].get(t, [])) for t in results.get("group_subtasks", {}).get(group, []))
            score_rows.extend(score_rows_for(entry, item.spec.name, group, results["results"][group], [], experiment.seed, n=n))
        # The engine picks its batch budget on first use, so read it after the suite ran.
        info["batch"] = batch_info(experiment, lm)
        speed_rows.extend(_eval_rows(entry, item.task, metered, experiment.inference.batch_size, memory.peak_memory_mb, flops_per_token, limits))
        info.setdefault("eval_wall_seconds", {})[item.task] = round(wall, 3)
        # Requests answered by the model now, and from the request cache of an interrupted attempt.
        total = sum(len(s["arguments"]) for samples in results["samples"].values() for s in samples)
        info.setdefault("requests", {})[item.task] = {"computed": metered.requests, "cached": total - metered.requests}
        manifest["completed_suites"].append([entry.name, item.spec.name])
        # Tables first, manifest last: the manifest never names a suite whose rows are missing.
        _record_file(store, manifest, store.write_table("scores.csv", score_rows, SCORE_COLUMNS))
        _record_file(store, manifest, store.write_table("throughput.csv", speed_rows, THROUGHPUT_COLUMNS))
        store.write_manifest(manifest)
        pairs.update(1)

    if experiment.speed is not None:
        log.info("%s: speed probe %s", entry.name, experiment.speed.model_dump())
        probe = run_speed_probe(model, tokenizer, experiment.speed, device, limits=limits, model_name=entry.name, origin=entry.origin)
        speed_rows.extend(row.to_dict() for row in probe)
        _record_file(store, manifest, store.write_table("throughput.csv", speed_rows, THROUGHPUT_COLUMNS))
        store.write_manifest(manifest)
    del model, lm, metered


def _eval_rows(
    entry: ModelEntry, task: str, metered: MeteredLM, batch_size: int | str, peak_mb: float,
    flops_per_token: float, limits: MachineLimits | None,
) -> list[dict[str, Any]]:
    """Throughput of the evaluation itself: tokens scored per second, and tokens generated per second."""
    rows = []
    for phase, tokens, seconds in (
        ("eval", metered.prompt_tokens, metered.score_seconds),
        ("eval_generate", metered.generated_tokens, metered.generate_seconds),
    ):
        if tokens == 0 or seconds <= 0:
            continue
        rate = tokens / seconds
        achieved = flops_per_token * rate
        rows.append({
            # With batch_size auto the chosen budget is in the manifest (models.<name>.batch), not a single number.
            **_row(entry, task=task, phase=phase, batch=batch_size if isinstance(batch_size, int) else None, tokens=tokens, reps=1),
            "seconds": round(seconds, 4), "tokens_per_s": round(rate, 2), "peak_memory_mb": round(peak_mb, 1),
            "achieved_flops": achieved, "flops_efficiency": achieved / limits.peak_flops if limits else None,
        })
    return rows


def _record_file(store: RunStore, manifest: dict[str, Any], path: Path) -> None:
    manifest["files"][str(path.relative_to(store.folder))] = sha256_file(path)


def make_lm(experiment: Experiment, model: Any, tokenizer: Any, device: str) -> Any:
    """The lm-eval model for the configured engine."""
    batch_size = experiment.inference.batch_size
    if experiment.engine == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    from benchharness.engine import BenchEngineLM

    return BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=experiment.inference.max_batch_tokens, device=device)


def batch_info(experiment: Experiment, lm: Any) -> dict[str, Any]:
    """How the batch size was chosen, for the manifest."""
    if experiment.engine == "hf":
        size = experiment.inference.batch_size
        return {"engine": "hf", "batch_size": getattr(lm, "batch_size", size), "how": "lm-eval auto" if size == "auto" else "configured"}
    return {"engine": "benchharness", **lm.batch_info}


def evaluate_task(lm: Any, task: str, task_manager: Any, spec: SuiteSpec, seed: int, chat_template: bool = False, request_cache: Path | None = None) -> dict[str, Any]:
    """One suite through lm-eval. `request_cache` (a path prefix) keeps every answered request in
    SQLite as it is computed, so a resumed run skips what an interrupted one finished."""
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
        apply_chat_template=chat_template,
        use_cache=str(request_cache) if request_cache is not None else None,
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
    primary = "acc" if "acc" in metrics else next(iter(metrics), None)
    record["correct"] = bool(metrics[primary] >= 1.0) if primary is not None else None
    return record


def score_rows_for(
    entry: ModelEntry, suite: str, task: str, task_results: dict[str, Any], records: list[dict[str, Any]], seed: int, n: int | None = None,
) -> list[dict[str, Any]]:
    """scores.csv rows of one task: stderr and a seeded bootstrap CI from the per-item values.

    Without records (a group), stderr is lm-eval's pooled one and the CI is left empty.
    """
    from benchharness.stats import bootstrap_ci, mean_stderr

    rows = []
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        # A task with several filters (e.g. GSM8K's answer extractors) logs each item once per filter.
        per_item = [float(r["metrics"][metric]) for r in records if metric in r["metrics"] and r.get("filter", "none") == filt]
        low, high = bootstrap_ci(per_item, seed=seed) if per_item else (None, None)
        pooled = task_results.get(f"{metric}_stderr,{filt}")
        stderr = mean_stderr(per_item) if per_item else (float(pooled) if isinstance(pooled, (int, float)) else None)
        rows.append(
            {
                "model": entry.name, "origin": entry.origin, "build": entry.build, "suite": suite, "task": task,
                "metric": metric if filt == "none" else f"{metric},{filt}", "value": float(value),
                "stderr": stderr, "ci_low": low, "ci_high": high, "n": len(per_item) if per_item else n,
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


def prompt_hash(task_config: dict[str, Any]) -> str:
    fields = {k: task_config.get(k) for k in PROMPT_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row(entry: ModelEntry, **values: Any) -> dict[str, Any]:
    return {"model": entry.name, "origin": entry.origin, **values}


def _write_report(folder: Path) -> None:
    try:
        from benchharness.report import write_run_report

        write_run_report(folder)
    except Exception as exc:  # the report is derived; a failure here must not lose the results
        log.error("could not write report.md for %s: %s (results are intact; rerun `benchharness report %s`)", folder, exc, folder)
