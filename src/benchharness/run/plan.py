"""Before anything is written: prepare the suites' data and task YAMLs, check every task and model, find a run to resume.

Everything that can fail on bad input (unknown suite, missing data, missing or corrupted
weights, unwritable output folder) is checked here, before the run folder is created, so a
failed start leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from benchharness.config.experiment import Experiment, SuiteSpec
from benchharness.suites.registry import SUITES, check_task_data_offline, prepare_suite, render_tasks
from benchharness.errors import ConfigError, HarnessError
from benchharness.models.sources import ResolvedModel, gguf_file, resolve_model
from benchharness.store.run_folder import RunStore, run_process

log = logging.getLogger(__name__)


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
    # Indexing lm-eval's task folders takes seconds: do it once per run, and index lm-eval's own
    # ~27,000 task YAMLs (tens of seconds) only when a suite is in none of the harness's or the
    # experiment's folders.
    paths = [str(tasks_dir), *map(str, experiment.include_paths)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(spec.name not in manager.all_tasks for spec in stock):
        manager = TaskManager(include_path=paths)
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


def preflight(experiment: Experiment, cache_dir: Path, resume: Path | None = None, writes: bool = True) -> tuple[list[PlannedSuite], Any, dict[str, ResolvedModel]]:
    """Every check on input that needs no run folder: suites and their data (prepared into the
    cache), model weights (resolved, converted into the cache), the output folder, a resumed run.

    Raises HarnessError naming the problem; `--processes N` calls it before launching anything.
    `writes`: this process writes the run folder (rank 0), so check the output folder too.
    """
    if resume is not None:
        resumable_manifest(RunStore(resume), experiment)
    check_engine(experiment)
    log.info("stage 1/3: preparing suite data")
    planned, task_manager = plan_suites(experiment, cache_dir)
    log.info("stage 2/3: resolving model weights")
    resolved = {m.name: resolve_model(m, cache_dir) for m in experiment.models}
    if experiment.engine == "llamacpp":
        for entry in experiment.models:  # the GGUF file itself, verified, for llama.cpp to run
            resolved[entry.name].extra["gguf"] = str(gguf_file(entry, cache_dir))
    if writes:
        check_output_writable(resume.parent if resume is not None else experiment.output_dir)
    return planned, task_manager, resolved


def check_engine(experiment: Experiment) -> None:
    """The chosen engine can run here: its package is installed (and for the GPU engines, a GPU
    is present); said in one line before any data is prepared or model loaded."""
    import importlib.util

    engine = experiment.engine
    if engine == "llamacpp":
        from benchharness.engine.llamacpp import import_llama_cpp

        import_llama_cpp()
    elif engine in ("vllm", "sglang"):
        import torch

        if importlib.util.find_spec(engine) is None:
            raise ConfigError(f"{experiment.source_file}: engine: {engine}: the {engine} package is not installed here. "
                              f"Fix: `pip install -e '.[{engine}]'` on a machine with an NVIDIA GPU, or choose engine: benchharness.")
        if not torch.cuda.is_available():
            raise ConfigError(f"{experiment.source_file}: engine: {engine} needs a CUDA GPU and torch sees none on this machine. "
                              "Fix: run it where there is one, or choose engine: benchharness (CPU or GPU) or llamacpp (GGUF on a CPU).")


def resumable_manifest(store: RunStore, experiment: Experiment) -> dict[str, Any]:
    """The manifest of the run `--resume` names, if this config may finish it."""
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
    # A run killed by the system still says "running"; one whose process is alive must not get a second writer.
    pid = (manifest.get("volatile") or {}).get("pid")
    if manifest.get("status") == "running" and run_process(manifest) == "alive" and pid != os.getpid():
        raise HarnessError(f"--resume {store.folder}: that run is still going (process {pid} on this host). Fix: wait for it, or stop it first.")
    return manifest
