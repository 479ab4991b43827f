"""The run loop: prepare suites and models, then for each model evaluate each suite and write results.

Everything that can fail on bad input (unknown suite, missing data, missing or corrupted
weights, unwritable output folder) is checked before the run folder is created, so a
failed start leaves nothing behind. Once running, every finished task is written at
once (atomically); the manifest says which are done and whether the run completed."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from benchharness.config.catalog import ModelEntry
from benchharness.config.experiment import EXTERNAL_ENGINES, Experiment, SuiteSpec
from benchharness.config.speed_spec import ProbeSpec
from benchharness.engine.model_costs import matmul_params
from benchharness.errors import HarnessError
from benchharness.files import atomic_write_text, sha256_file
from benchharness.measure.hardware import hardware_info
from benchharness.measure.limits import MachineLimits, best_of, measure_machine_limits, rescale_efficiencies
from benchharness.measure.memory import MemorySampler
from benchharness.measure.metered import MeteredLM
from benchharness.measure.probe import (
    THROUGHPUT_COLUMNS,
    DecodeBytes,
    eval_rows,
    load_timer,
    run_speed_probe,
)
from benchharness.models.sources import (
    ResolvedModel,
    load_model,
    load_skeleton,
    load_tokenizer,
    pick_device,
    pick_dtype,
)
from benchharness.run.distributed import (
    DistContext,
    check_parallel,
    main_first,
    on_main,
)
from benchharness.run.plan import (
    PlannedSuite,
    new_run_id,
    preflight,
    resumable_manifest,
)
from benchharness.store.lm_eval_results import merge as merge_lm_eval
from benchharness.store.lm_eval_results import render as render_lm_eval
from benchharness.store.lm_eval_results import results_file, suite_payload
from benchharness.store.manifest import (
    external_parity,
    fingerprint_sha256,
    initial_manifest,
    initial_parity,
)
from benchharness.store.run_folder import RunStore
from benchharness.store.score_rows import (
    SCORE_COLUMNS,
    add_protocol,
    macro_rows,
    prompt_hash,
    sample_record,
    score_rows_for,
)

log = logging.getLogger(__name__)


@dataclass
class ModelUpdate:
    """What one step of a model's evaluation adds to the run folder. It is built where the model
    ran and written by rank 0 (`_commit`), so several processes never write the same files."""

    model: str
    samples: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)  # (task, records)
    score_rows: list[dict[str, Any]] = field(default_factory=list)
    speed_rows: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # keys of manifest models.<name>
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest tasks.<task>
    completed_suite: str | None = None
    lm_eval_results: dict[str, Any] | None = None  # the suite's results in lm-eval's format (JSON-safe)


# Keys of manifest models.<name> that hold one value per task: an update adds to them.
_PER_TASK_INFO = ("eval_wall_seconds", "requests", "parity", "tokenization")


def run_experiment(experiment: Experiment, cache_dir: Path, resume: Path | None = None, dist: DistContext | None = None) -> Path:
    """Run `experiment`, or finish the unfinished run folder `resume`; returns the run folder.

    With `dist` this is one of several processes: `parallel: data` shards every task's items
    over the processes, `parallel: models` gives each process whole models. Rank 0 alone
    writes the run folder; the others compute and hand their results to it.

    Raises HarnessError on bad input before writing anything.
    """
    started = dt.datetime.now(dt.timezone.utc)
    main = dist is None or dist.is_main
    check_parallel(experiment, dist.world_size if dist else 1)
    if main:
        log.info("experiment %s (%s): %d model(s) x %d suite(s)", experiment.name, experiment.config_hash(), len(experiment.models), len(experiment.suites))
    folder = resume if resume is not None else experiment.output_dir / new_run_id(experiment, started)
    if dist is not None:
        folder = dist.broadcast(folder)  # one run_id on every rank: rank 0's clock decides
    store = RunStore(folder)

    # Rank 0 fills the caches (prepared data, converted weights) first; the others then find them there.
    planned, task_manager, resolved = main_first(dist, lambda: preflight(experiment, cache_dir, resume if main else None, writes=main))
    device = dist.device if dist is not None else pick_device(experiment.inference.device)
    dtype = pick_dtype(experiment.inference.dtype, device)
    rank_devices = dist.gather(device) if dist is not None else [device]

    score_rows: list[dict[str, Any]] = []
    speed_rows: list[dict[str, Any]] = []

    def start() -> dict[str, Any]:
        nonlocal score_rows, speed_rows
        if resume is None:
            store.folder.mkdir(parents=True)
            data_fingerprints = {p.spec.name: p.fingerprint for p in planned}
            manifest = initial_manifest(experiment, store.folder.name, started, data_fingerprints, resolved, device, dtype, hardware_info())
        else:
            manifest = resumable_manifest(store, experiment)
            _check_same_inputs(store, manifest, planned, resolved)
            manifest["volatile"]["resumed"].append(started.isoformat())
            # The process now running it, and where (an earlier one may have been killed).
            manifest["volatile"].update(host=socket.gethostname(), pid=os.getpid())
            # Tasks certified before the interruption keep their records (models.<name>.parity); the rest are certified now.
            manifest["parity"] = initial_parity(experiment)
            score_rows, speed_rows = _finished_rows(store, manifest, [p.spec.name for p in planned])
            log.info("resuming %s: %d model/suite pair(s) already done", store.folder, len(manifest["completed_suites"]))
        if dist is not None:
            manifest["distributed"] = dist.describe(rank_devices or [], experiment.parallel)
        manifest["status"] = "running"
        store.write_manifest(manifest)
        return manifest

    # Every rank needs to know which model/suite pairs are done; only rank 0 keeps the tables.
    manifest = on_main(dist, start)

    def measure_limits(earlier: MachineLimits | None, when: str) -> MachineLimits | None:
        """Measure the machine again; the run's limits are the best of every measurement so far
        (a resumed run's first part included), and rows already in throughput.csv are restated
        against them, so every row of the table has the same denominators."""
        if experiment.speed is None:
            return None
        # One process measures while the others wait, so they do not compete for the device.
        log.info("measuring this machine's matmul FLOP/s and memory bandwidth (%s, %s; %s)", device, dtype, when)
        measured = measure_machine_limits(device, getattr(torch, dtype), min_seconds=experiment.speed.limits_min_seconds)
        recorded = manifest.get("limits") or {}
        if earlier is None and recorded.get("device") == measured.device and recorded.get("dtype") == measured.dtype:
            earlier = MachineLimits.from_dict(recorded)  # a resumed run: its rows are relative to these
        best = measured if earlier is None else best_of(earlier, measured)
        measurements = [*recorded.get("measurements", []), {
            "when": when, "peak_flops": measured.peak_flops, "matmul_kernel": measured.matmul_kernel,
            "peak_bandwidth": measured.peak_bandwidth,
        }]
        manifest["limits"] = {**best.to_dict(), "measurements": measurements}
        if earlier is not None and (best.peak_flops, best.peak_bandwidth) != (earlier.peak_flops, earlier.peak_bandwidth):
            log.info("limits now %.1f GFLOP/s, %.1f GB/s (were %.1f, %.1f): throughput rows restated",
                     best.peak_flops / 1e9, best.peak_bandwidth / 1e9, earlier.peak_flops / 1e9, earlier.peak_bandwidth / 1e9)
            rescale_efficiencies(speed_rows, earlier, best)
            _record_file(store, manifest, store.write_table("throughput.csv", speed_rows, THROUGHPUT_COLUMNS))
        store.write_manifest(manifest)
        return best

    limits = on_main(dist, lambda: measure_limits(None, "start"))
    if main:
        log.info("stage 3/3: evaluating -> %s", store.folder)
    status = "failed"
    try:
        done = {tuple(pair) for pair in manifest["completed_suites"]}
        pairs = tqdm(total=len(experiment.models) * len(planned), initial=len(done), desc="model x suite", unit="suite", disable=None if main else True)

        def commit(update: ModelUpdate) -> None:
            _commit(store, manifest, update, score_rows, speed_rows)
            if update.completed_suite is not None:
                pairs.update(1)

        todo = {entry.name: [p for p in planned if (entry.name, p.spec.name) not in done] for entry in experiment.models}
        if dist is not None and experiment.parallel == "models":
            _evaluate_models_side_by_side(experiment, todo, resolved, task_manager, device, dtype, limits, store, dist, commit)
            on_main(dist, lambda: measure_limits(limits, "end"))
        else:
            for entry in experiment.models:
                if todo[entry.name]:
                    for update in _evaluate_model(experiment, entry, resolved[entry.name], todo[entry.name], task_manager, device, dtype, limits, store, dist):
                        pairs.set_postfix_str(f"{entry.name} / {update.completed_suite or 'speed probe'}")
                        commit(update)
                    # Again after each model: the next model's rows use the best peak so far.
                    limits = on_main(dist, lambda: measure_limits(limits, f"after {entry.name}"))
        pairs.close()
        status = "complete"
    except KeyboardInterrupt:
        status = "incomplete"
        if main:
            log.error("interrupted: finished tasks are kept in %s; finish it with --resume", store.folder)
        raise
    finally:
        if main:
            _finish(store, manifest, status)
    if main:
        log.info("done: %s", store.folder)
    return store.folder


def _finish(store: RunStore, manifest: dict[str, Any], status: str) -> None:
    manifest["status"] = status
    manifest["parity"] = parity_summary(manifest)
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
    if status == "complete":
        _add_to_results_store(store.folder)


def parity_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run's parity certificate from the per-task records in `models.<name>.parity`."""
    from benchharness.run.certificate import summary

    config = manifest.get("config") or {}
    if config.get("engine") == "hf":
        return {"status": "reference engine", "note": "engine: hf is lm-eval's own model: nothing to compare"}
    if config.get("engine") in EXTERNAL_ENGINES:
        return external_parity(str(config.get("engine")))
    requests = int((manifest.get("parity") or {}).get("requests_per_type", 0))
    per_model = {name: info["parity"] for name, info in manifest.get("models", {}).items() if info.get("parity")}
    if requests == 0 and not per_model:
        return {"status": "off", "note": "parity: {requests: 0}"}
    dtype = str(next((info.get("dtype") for info in manifest.get("models", {}).values() if info.get("dtype")), "float32"))
    return summary(per_model, dtype, requests)


def _evaluate_models_side_by_side(
    experiment: Experiment, todo: dict[str, list[PlannedSuite]], resolved: dict[str, ResolvedModel], task_manager: Any,
    device: str, dtype: str, limits: MachineLimits | None, store: RunStore, dist: DistContext, commit: Any,
) -> None:
    """`parallel: models`: in round k, rank r evaluates model k * W + r alone on its own device
    (no sharding); after each round rank 0 gathers the results and writes them in model order."""
    entries = [entry for entry in experiment.models if todo[entry.name]]
    world = dist.world_size
    for first in range(0, len(entries), world):
        batch = entries[first:first + world]
        mine = batch[dist.rank] if dist.rank < len(batch) else None
        updates: list[ModelUpdate] = []
        if mine is not None:
            log.info("rank %d: model %s on %s", dist.rank, mine.name, device)
            updates = list(_evaluate_model(experiment, mine, resolved[mine.name], todo[mine.name], task_manager, device, dtype, limits, store, None, alone=True))
        gathered = dist.gather(updates)
        for rank_updates in gathered or []:
            for update in rank_updates:
                commit(update)


def _commit(store: RunStore, manifest: dict[str, Any], update: ModelUpdate, score_rows: list[dict[str, Any]], speed_rows: list[dict[str, Any]]) -> None:
    """Write one update into the run folder: samples, then tables, then the manifest, which thus
    never names a suite whose rows are missing."""
    for task, records in update.samples:
        _record_file(store, manifest, store.write_samples(update.model, task, records))
    score_rows.extend(update.score_rows)
    speed_rows.extend(update.speed_rows)
    info = manifest["models"][update.model]
    for key, value in update.info.items():
        if key in _PER_TASK_INFO:
            info.setdefault(key, {}).update(value)
        else:
            info[key] = value
    for task, task_info in update.tasks.items():
        manifest["tasks"][task] = task_info
        manifest["fingerprint"]["prompt_hashes"][task] = task_info["prompt_hash"]
        manifest["completed"].append([update.model, task])
    if update.lm_eval_results is not None:
        path = results_file(store.folder, update.model, manifest["volatile"]["started"])
        written = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        atomic_write_text(path, render_lm_eval(merge_lm_eval(written, update.lm_eval_results)))
        _record_file(store, manifest, path)
    if update.completed_suite is not None:
        manifest["completed_suites"].append([update.model, update.completed_suite])
        _record_file(store, manifest, store.write_table("scores.csv", score_rows, SCORE_COLUMNS))
    _record_file(store, manifest, store.write_table("throughput.csv", speed_rows, THROUGHPUT_COLUMNS))
    store.write_manifest(manifest)


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
    dist: DistContext | None,
    alone: bool = False,
) -> Iterator[ModelUpdate]:
    """Evaluate one model on `planned`: one update per suite, then one for the speed probe.

    With `dist` every rank runs this with the same model, lm-eval gives each rank its shard
    of every task, and only rank 0 yields updates (with every rank's throughput in them).
    `alone`: one of several processes, evaluating this model by itself (parallel: models).
    """
    main = dist is None or dist.is_main
    log.info("%s (%s): loading from %s on %s, %s", entry.name, entry.origin, resolved.path, device, dtype)
    # llama.cpp, vLLM and SGLang load the weights themselves: the harness reads only the tokenizer
    # and the architecture (for the useful-FLOP counts), never a second copy of the weights.
    external = experiment.engine in EXTERNAL_ENGINES
    with load_timer("load_warm", device) as load:
        if external:
            model, tokenizer = load_skeleton(resolved, entry), load_tokenizer(resolved, entry)
            lm = make_external_lm(experiment, entry, resolved, tokenizer, dtype)
        else:
            model, tokenizer = load_model(resolved, entry, dtype, device, experiment.inference.device_map)
    load_rows = [load.row(entry.name, entry.origin).to_dict()]
    if resolved.converted_now:
        load_rows.append({**_row(entry, task=None, phase="load_cold", reps=1), "seconds": resolved.prepare_seconds + load.seconds})
    if not external:
        lm = make_lm(experiment, model, tokenizer, device, entry)
    # Only instruction-tuned models that ship a template get one; the manifest and report say which did.
    chat = experiment.chat_template and entry.instruct and getattr(tokenizer, "chat_template", None) is not None
    thinking = thinking_info(experiment, entry, tokenizer)
    model_info: dict[str, Any] = {"chat_template": chat, "load_seconds": round(load.seconds, 3), "thinking": thinking}
    params = matmul_params(model)
    # Decode bytes are the fp32 weights' and cache's: not what a quantized external engine reads.
    decode_bytes = None if external else DecodeBytes.of(model)

    metered = MeteredLM(lm, tokenizer, dist=dist)
    reference: Any = None  # lm-eval's hf model on the same weights, built when the certificate first needs it
    for item in planned:
        log.info("%s: suite %s (limit %s, few-shot %s)", entry.name, item.spec.name, item.spec.limit, "task default" if item.spec.num_fewshot is None else item.spec.num_fewshot)
        metered.reset()
        wall = time.perf_counter()
        with MemorySampler(device) as memory:
            results = evaluate_task(metered, item.task, task_manager, item.spec, experiment.seed, chat, request_cache=store.folder / "cache" / entry.name, alone=alone,
                                    max_gen_toks=generation_limit(experiment, entry, item.spec))
        wall = time.perf_counter() - wall
        counters = {**metered.counters(), "peak_memory_mb": memory.peak_memory_mb, "device": device}
        per_rank = dist.gather(counters) if dist is not None else [counters]
        if results is None or per_rank is None:
            continue  # not rank 0: its share is in rank 0's results now
        update = ModelUpdate(entry.name, speed_rows=load_rows, info=model_info, completed_suite=item.spec.name)
        load_rows, model_info = [], {}
        for task_name, samples in results["samples"].items():
            records = [sample_record(s, with_prompt=experiment.log_prompts) for s in samples]
            update.samples.append((task_name, records))
            update.score_rows.extend(score_rows_for(entry, item.spec.name, task_name, results["results"][task_name], records, experiment.seed))
            update.score_rows.extend(macro_rows(entry, item.spec.name, task_name, records))
            update.tasks[task_name] = {
                "suite": item.spec.name,
                "data_fingerprint": item.fingerprint,
                "prompt_hash": prompt_hash(results["configs"][task_name]),
                "num_fewshot": results.get("n-shot", {}).get(task_name),
                "limit": item.spec.limit,
                "n": len(records),
                "n_available": item.n_items,
                "output_type": results["configs"][task_name].get("output_type"),
                "generation_kwargs": _generation_kwargs(results["configs"][task_name]),
            }
        for group in [name for name in results["results"] if name not in results["samples"]]:
            # A group's score is lm-eval's aggregate of its tasks (the macro average where the YAML says so).
            n = sum(len(results["samples"].get(t, [])) for t in results.get("group_subtasks", {}).get(group, []))
            # The suite's own group row is named after the suite (task == suite), as the report expects.
            row_task = item.spec.name if group == item.task else group
            update.score_rows.extend(score_rows_for(entry, item.spec.name, row_task, results["results"][group], [], experiment.seed, n=n))
        # Every row carries its protocol card, read as the store and report read it from the manifest.
        add_protocol({"tasks": update.tasks, "models": {entry.name: {"chat_template": chat, "thinking": thinking}}}, update.score_rows)
        # The engine picks its batch budget on first use, so read it after the suite ran.
        update.info["batch"] = batch_info(experiment, lm)
        if experiment.engine == "llamacpp":
            from benchharness.engine.llamacpp import tokenization_check

            update.info["engine_build"] = lm.describe()
            # The GGUF's tokenizer against the transformers one, on this suite's own request texts.
            texts = [str(a[0]) + (a[1] if len(a) > 1 and isinstance(a[1], str) else "")
                     for samples in results["samples"].values() for s in samples for a in s["arguments"]]
            update.info["tokenization"] = {item.task: tokenization_check(lm, tokenizer, texts)}
        update.speed_rows.extend(eval_rows(entry, item.task, per_rank, experiment.inference.batch_size, params, limits, decode_bytes))
        update.info["eval_wall_seconds"] = {item.task: round(wall, 3)}
        update.lm_eval_results = suite_payload(results, entry.name, experiment.engine, chat, wall)
        # Requests answered by the model now (every rank; lm-eval pads short ranks with repeats),
        # and from the request cache of an interrupted attempt.
        total = sum(len(s["arguments"]) for samples in results["samples"].values() for s in samples)
        computed = sum(int(c["requests"]) for c in per_rank)
        update.info["requests"] = {item.task: {"computed": computed, "cached": max(0, total - computed)}}
        if experiment.engine == "benchharness" and experiment.parity.requests > 0:
            if reference is None:
                reference = make_reference_lm(model, tokenizer, device, reasoning_args(experiment, entry))
            update.info["parity"] = certify_tasks(reference, results, experiment, dtype, entry.name)
        yield update

    if experiment.speed is not None and external:
        log.info("%s: no fixed-shape speed probe with engine %s (it runs on the harness's torch model); "
                 "the eval rows of throughput.csv are this engine's own", entry.name, experiment.engine)
    elif experiment.speed is not None:
        # Data-parallel: rank 0 probes while the others wait, so the probe has the device to itself.
        if main:
            log.info("%s: speed probe %s", entry.name, experiment.speed.model_dump())
            with probe_kernels(experiment, model, lm).applied():
                probe = run_speed_probe(model, tokenizer, experiment.speed, device, limits=limits, model_name=entry.name, origin=entry.origin)
                probe += serve_rows(experiment.engine, experiment.speed, model, tokenizer, device, limits, entry.name, entry.origin)
            yield ModelUpdate(entry.name, speed_rows=[row.to_dict() for row in probe])
        if dist is not None:
            dist.barrier()
    if hasattr(lm, "close"):
        lm.close()
    del model, lm, metered


def _record_file(store: RunStore, manifest: dict[str, Any], path: Path) -> None:
    manifest["files"][str(path.relative_to(store.folder))] = sha256_file(path)


def make_lm(experiment: Experiment, model: Any, tokenizer: Any, device: str, entry: ModelEntry | None = None) -> Any:
    """The lm-eval model for the configured engine."""
    batch_size = experiment.inference.batch_size
    if experiment.engine == "hf":
        from benchharness.engine.reference import ReferenceLM

        # lm-eval's hf model; on a CPU its `auto` batch is sized from memory (reference.py says why).
        return ReferenceLM(model, tokenizer, batch_size, device, reasoning_args(experiment, entry))
    from benchharness.engine import BenchEngineLM

    return BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=experiment.inference.max_batch_tokens, device=device,
                         seed=experiment.seed, **reasoning_args(experiment, entry))


def reasoning_args(experiment: Experiment, entry: ModelEntry | None) -> dict[str, Any]:
    """The engines' reasoning arguments (lm-eval's hf names) for a reasoning model (catalog
    `reasoning: true`): the template's thinking switch, and the markers whose blocks are stripped
    before scoring. None for other models: lm-eval's hf strips leading spaces from every output
    once it is given an end marker, which would change their answers."""
    if entry is None or not entry.reasoning:
        return {}
    spec = experiment.reasoning
    args: dict[str, Any] = {"think_start_token": spec.start, "think_end_token": spec.end}
    if spec.thinking is not None:
        args["enable_thinking"] = spec.thinking
    return args


def thinking_info(experiment: Experiment, entry: ModelEntry, tokenizer: Any) -> dict[str, Any]:
    """What the manifest records of a model's thinking: whether its template has the switch, what was asked."""
    if not entry.reasoning:
        return {"reasoning_model": False}
    template = getattr(tokenizer, "chat_template", None)
    return {
        "reasoning_model": True, "switch": isinstance(template, str) and "enable_thinking" in template,
        "enable_thinking": experiment.reasoning.thinking, "markers": [experiment.reasoning.start, experiment.reasoning.end],
    }


def generation_limit(experiment: Experiment, entry: ModelEntry, spec: SuiteSpec) -> int | None:
    """Tokens a generation task may write for this model: a reasoning model, unless its thinking is
    switched off, gets the reasoning room (the suite's, else the experiment's); others the suite's
    max_gen_toks (None: the task's own)."""
    if entry.reasoning and experiment.reasoning.thinking is not False:
        return spec.reasoning_max_gen_toks or experiment.reasoning.max_gen_toks
    return spec.max_gen_toks


def make_external_lm(experiment: Experiment, entry: ModelEntry, resolved: ResolvedModel, tokenizer: Any, dtype: str) -> Any:
    """The lm-eval model of an engine that loads the weights itself: llama.cpp on the GGUF file,
    or lm-eval's own vLLM / SGLang classes on the model folder."""
    reasoning = reasoning_args(experiment, entry)
    if experiment.engine == "llamacpp":
        from benchharness.engine.llamacpp import LlamaCppLM, LlamaCppSettings
        from benchharness.engine.reasoning import Markers

        spec = experiment.llamacpp
        return LlamaCppLM(Path(resolved.extra["gguf"]), tokenizer,
                          LlamaCppSettings(n_ctx=spec.n_ctx, n_threads=spec.n_threads, n_batch=spec.n_batch, seed=experiment.seed,
                                           enable_thinking=reasoning.get("enable_thinking"),
                                           reasoning=Markers(reasoning["think_start_token"], reasoning["think_end_token"]) if reasoning else None))
    from lm_eval.api.registry import get_model
    from benchharness.engine.reasoning import LM_EVAL_ARGUMENTS

    gpu = experiment.gpu_engine
    if experiment.engine == "vllm":
        return get_model("vllm")(
            pretrained=str(resolved.path), dtype=dtype, tensor_parallel_size=gpu.tensor_parallel_size,
            data_parallel_size=gpu.data_parallel_size, gpu_memory_utilization=gpu.gpu_memory_utilization,
            max_model_len=gpu.max_model_len, seed=experiment.seed, trust_remote_code=entry.trust_remote_code,
            **{k: v for k, v in reasoning.items() if k in LM_EVAL_ARGUMENTS},
        )
    return get_model("sglang")(
        pretrained=str(resolved.path), dtype=dtype, tp_size=gpu.tensor_parallel_size, dp_size=gpu.data_parallel_size,
        mem_fraction_static=gpu.gpu_memory_utilization, context_length=gpu.max_model_len, trust_remote_code=entry.trust_remote_code,
    )


def make_reference_lm(model: Any, tokenizer: Any, device: str, reasoning: dict[str, Any] | None = None) -> Any:
    """lm-eval's own `hf` model over the already loaded weights: the parity certificate's reference,
    with a batch that fits memory (`auto`: lm-eval's probe on a GPU, memory-bounded on a CPU)."""
    from benchharness.engine.reference import ReferenceLM

    return ReferenceLM(model, tokenizer, "auto", device, reasoning)


def certify_tasks(reference: Any, results: dict[str, Any], experiment: Experiment, dtype: str, model_name: str) -> dict[str, dict[str, Any]]:
    """The parity certificate of each task of a suite (certificate.py)."""
    from benchharness.run.certificate import certify_task

    records = {}
    for task_name, samples in results["samples"].items():
        output_type = results["configs"][task_name]["output_type"]
        made = len(reference.batch_choices)
        record = certify_task(reference, task_name, output_type, samples, experiment.parity.requests, experiment.seed, dtype)
        # The reference's batches (memory-bounded on a CPU), so its memory use can be read back.
        record["reference_batch"] = [choice["batch_size"] for choice in reference.batch_choices[made:]] or reference.batch_size
        records[task_name] = record
        detail = (f"max |diff| {record['max_abs_diff']:.2g}" if "max_abs_diff" in record
                  else f"{record.get('identical', 0)}/{record.get('compared', 0)} generations identical")
        level = logging.INFO if record["passed"] else logging.ERROR
        log.log(level, "%s: parity %s on %s: %d requests, %s, %.1f s", model_name, "passed" if record["passed"] else "FAILED",
                task_name, record["requests"], detail, record["seconds"])
    return records


def probe_kernels(experiment: Experiment, model: Any, lm: Any = None) -> Any:
    """The kernels the speed probe runs the model with: the benchharness engine's fp32 CPU
    kernels (engine/cpu_kernels.py) when that is the engine, so the probe measures the model as
    the run computes it (the engine `lm`'s own where given: its packed weights are not packed a
    second time); torch's own under `engine: hf`."""
    from benchharness.engine.cpu_kernels import plan_cpu_kernels

    if experiment.engine == "benchharness" and hasattr(lm, "kernels"):
        return lm.kernels
    return plan_cpu_kernels(model, enabled=experiment.engine == "benchharness")


def serve_rows(
    engine: str, probe: ProbeSpec, model: Any, tokenizer: Any, device: str, limits: MachineLimits | None, name: str, origin: str
) -> list[Any]:
    """The probe's continuous-batching scenario (`probe.serve`), for the benchharness engine only:
    it measures the engine's own scheduler."""
    if probe.serve is None or engine != "benchharness":
        return []
    from benchharness.measure.serve_probe import run_serve_probe

    log.info("%s: serving scenario %s", name, probe.serve.model_dump())
    return run_serve_probe(model, tokenizer, probe.serve, device, seed=probe.seed, limits=limits, model_name=name, origin=origin)


def batch_info(experiment: Experiment, lm: Any) -> dict[str, Any]:
    """How the batch size was chosen, for the manifest."""
    if experiment.engine == "hf":
        return lm.batch_info()
    if experiment.engine == "llamacpp":
        return {"engine": "llamacpp", "batch_size": 1, "budget_method": "none", "n_batch": lm.settings.n_batch,
                "how": "one request at a time; requests sharing a context scored after one evaluation of it"}
    if experiment.engine in EXTERNAL_ENGINES:
        return {"engine": experiment.engine, "batch_size": "auto", "budget_method": "none", "how": f"{experiment.engine}'s own scheduler"}
    return {"engine": "benchharness", **lm.batch_info}


def evaluate_task(
    lm: Any, task: str, task_manager: Any, spec: SuiteSpec, seed: int, chat_template: bool = False, request_cache: Path | None = None, alone: bool = False,
    max_gen_toks: int | None = None,
) -> dict[str, Any] | None:
    """One suite through lm-eval. `request_cache` (a path prefix) keeps every answered request in
    SQLite as it is computed, so a resumed run skips what an interrupted one finished.

    Sharded over several processes, lm-eval returns the gathered results on rank 0 and None elsewhere.
    `alone`: a process of a launched group that evaluates the whole task itself (parallel: models).
    `max_gen_toks`: replaces the generation tasks' own limit (lm-eval's gen_kwargs; scored tasks keep theirs).
    """

    # lm-eval returns results only where LOCAL_RANK is 0 (and names the request cache after it):
    # a process evaluating on its own is, for lm-eval, local rank 0.
    saved = os.environ.get("LOCAL_RANK")
    if alone:
        os.environ["LOCAL_RANK"] = "0"
    try:
        results = _simple_evaluate(lm, task, task_manager, spec, seed, chat_template, request_cache, max_gen_toks)
    finally:
        if alone:
            if saved is None:
                os.environ.pop("LOCAL_RANK", None)
            else:
                os.environ["LOCAL_RANK"] = saved
    if results is None and lm.rank == 0:
        raise HarnessError(f"lm-eval returned no results for task {task}")
    return results


def _simple_evaluate(
    lm: Any, task: str, task_manager: Any, spec: SuiteSpec, seed: int, chat_template: bool, request_cache: Path | None, max_gen_toks: int | None = None,
) -> dict[str, Any] | None:
    import lm_eval

    return lm_eval.simple_evaluate(
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
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks is not None else None,
    )


def _generation_kwargs(task_config: dict[str, Any]) -> dict[str, Any] | None:
    """A generation task's settings as lm-eval ran it (the protocol card reads them); None for scored tasks."""
    if task_config.get("output_type") != "generate_until":
        return None
    return json.loads(json.dumps(task_config.get("generation_kwargs") or {}, default=str))


def _row(entry: ModelEntry, **values: Any) -> dict[str, Any]:
    return {"model": entry.name, "origin": entry.origin, **values}


def _add_to_results_store(folder: Path) -> None:
    """A complete run joins the results store beside it (results/runs.sqlite)."""
    from benchharness.store.results_db import default_store, index_runs

    store = default_store(folder.parent)
    try:
        done, refused = index_runs([folder], store)
    except Exception as exc:  # the store is derived; a failure here must not lose the results
        log.error("could not add %s to the results store %s: %s (results are intact; run `benchharness index %s`)", folder, store, exc, folder)
        return
    for line in refused:
        log.error("%s", line)
    if done:
        log.info("added to the results store %s (%d score rows)", store, done[0].scores)


def _write_report(folder: Path) -> None:
    try:
        from benchharness.report.render import write_run_report

        write_run_report(folder)
    except Exception as exc:  # the report is derived; a failure here must not lose the results
        log.error("could not write report.md for %s: %s (results are intact; rerun `benchharness report %s`)", folder, exc, folder)
