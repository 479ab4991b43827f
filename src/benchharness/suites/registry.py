"""Suite data: find it, prepare it into the data cache once, fingerprint it, render task YAMLs.

A suite is one lm-eval task or task group (`Suite.task`) over local JSONL files that the harness
prepares from a package or folder (one module per source under benchharness/suites/). Prepared
files are written in a deterministic order that makes lm-eval's `limit` a stratified subset:
round-robin over subjects in one file (MMLU), or one task per subject or language (CMMLU,
EU exams), where `limit` applies to each task. Task YAMLs under configs/tasks/ name their data as
"{data_dir}/<data>/<file>"; rendering fills in the cache folder, so the rendered folder works with
plain `lm_eval --include_path`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchharness.errors import DataError
from benchharness.files import atomic_write_text
from benchharness.suites import cmmlu, eu_exams, gsm8k, humaneval, mmlu, mmlu_hub
from benchharness.suites.common import DataSource, hub_offline_reason, stratified_order

__all__ = [
    "SUITES", "Suite", "PreparedSuite", "DataSource", "get_suite", "prepare_suite", "prepare_data", "render_tasks",
    "default_cache_dir", "stratified_order", "fingerprint_files", "check_task_data_offline",
]

log = logging.getLogger(__name__)

# Bump when a preparer's output format changes, so caches are rebuilt.
PREPARE_VERSION = 2


@dataclass(frozen=True)
class Suite:
    """A named evaluation in a config: an lm-eval task or group over one or more prepared data sources."""

    name: str
    task: str
    description: str
    data: tuple[DataSource, ...]
    metric_note: str = ""
    members: tuple[str, ...] = field(default=())  # for group suites: the suites it runs

    @property
    def items(self) -> int:
        return sum(d.items for d in self.data)

    @property
    def license(self) -> str:
        return "; ".join(dict.fromkeys(d.license for d in self.data))

    @property
    def source(self) -> str:
        return "; ".join(dict.fromkeys(d.source for d in self.data))

    def availability(self, source_dir: Path | None = None, sources: Mapping[str, Path] | None = None) -> tuple[bool, str]:
        """(available here now, where from or what is missing and how to get it)."""
        details = []
        for data in self.data:
            found = data.locate(_source_for(self, data, source_dir, sources))
            if not found.found:
                return False, f"{data.name}: {found.detail}"
            details.append(found.detail)
        return True, "; ".join(details)


@dataclass(frozen=True)
class PreparedSuite:
    name: str
    task: str
    folder: Path
    fingerprint: str
    n_items: int


def _suite(name: str, task: str, description: str, data: DataSource | tuple[DataSource, ...], note: str = "", members: tuple[str, ...] = ()) -> Suite:
    return Suite(name, task, description, data if isinstance(data, tuple) else (data,), note, members)


_MMLU_NOTE = "acc per item; the benchmark's headline is the macro average over the 57 subjects (benchharness.scorers.hooks.macro_average over samples' subject)"
_CMMLU_NOTE = "one task per subject (limit is per subject); group acc = macro average over the 67 subjects"
_EU_NOTE = "one task per language (limit is per language); group acc = macro average over the 10 languages"
_GSM_NOTE = "exact_match on the final number (flexible: last number or 'The answer is N'); strict_match needs 'The answer is N'"

SUITES: dict[str, Suite] = {
    s.name: s
    for s in [
        _suite("mmlu", "bh_mmlu", "English knowledge, 57 subjects, 4-way multiple choice, letter answers, 0-shot", mmlu.DATA, _MMLU_NOTE),
        _suite("mmlu_5shot", "bh_mmlu_5shot", "MMLU, the standard 5-shot protocol: each subject's first 5 dev questions before each question (needs cais/mmlu or a folder in its layout); limit is per subject",
               mmlu_hub.DATA, "acc over all items (lm-eval's mmlu: weight_by_size); one task per subject"),
        _suite("mmlu_cloze", "bh_mmlu_cloze", "MMLU with the answer text scored as continuation (cloze), 0-shot", mmlu.DATA, _MMLU_NOTE),
        _suite("cmmlu", "bh_cmmlu", "Chinese knowledge, 67 subjects, letter answers, 5-shot from each subject's dev split", cmmlu.DATA, _CMMLU_NOTE),
        _suite("cmmlu_cloze", "bh_cmmlu_cloze", "CMMLU with the answer text scored as continuation (cloze), 5-shot from dev", cmmlu.DATA, _CMMLU_NOTE),
        _suite("eu_exams", "bh_eu_exams", "European school exams in 10 EU languages (bg de es fr hr hu it lt pl pt), letter answers, 0-shot", eu_exams.DATA, _EU_NOTE),
        _suite("eu_exams_cloze", "bh_eu_exams_cloze", "European school exams, answer text scored as continuation (cloze), 0-shot", eu_exams.DATA, _EU_NOTE),
        _suite("gsm8k", "bh_gsm8k_cot", "Grade-school math, 8-shot chain of thought (lm-eval's inline examples), greedy", gsm8k.DATA, _GSM_NOTE),
        _suite("gsm8k_zeroshot", "bh_gsm8k_cot_zeroshot", "Grade-school math, 0-shot chain of thought (\"Let's think step by step.\"), greedy", gsm8k.DATA, _GSM_NOTE),
        _suite("humaneval", "bh_humaneval", "Python code, pass@1 with greedy decoding, programs run in the harness's sandbox", humaneval.DATA, "pass@1 (greedy, one sample per problem)"),
        _suite("humaneval_instruct", "bh_humaneval_instruct", "HumanEval for chat models (lm-eval's humaneval_instruct prompt: asked in a user turn, the answer continues the function); use with chat_template: true",
               humaneval.DATA, "pass@1 (greedy, one sample per problem)"),
        _suite("knowledge_en", "bh_knowledge_en", "Group: English knowledge (mmlu)", mmlu.DATA, _MMLU_NOTE, ("mmlu",)),
        _suite("knowledge_zh", "bh_knowledge_zh", "Group: Chinese knowledge (cmmlu)", cmmlu.DATA, _CMMLU_NOTE, ("cmmlu",)),
        _suite("knowledge_eu", "bh_knowledge_eu", "Group: European knowledge (eu_exams)", eu_exams.DATA, _EU_NOTE, ("eu_exams",)),
        _suite("math", "bh_math", "Group: gsm8k 8-shot and 0-shot chain of thought (no average across the two)", gsm8k.DATA, _GSM_NOTE, ("gsm8k", "gsm8k_zeroshot")),
        _suite("code", "bh_code", "Group: code (humaneval)", humaneval.DATA, "pass@1", ("humaneval",)),
        _suite(
            "default", "bh_default", "Group: the reference run: knowledge_en, knowledge_zh, knowledge_eu, math, code (one limit for every task)",
            (mmlu.DATA, cmmlu.DATA, eu_exams.DATA, gsm8k.DATA, humaneval.DATA), "see each member", ("knowledge_en", "knowledge_zh", "knowledge_eu", "math", "code"),
        ),
    ]
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise DataError(f"unknown suite '{name}'. Fix: use one of {', '.join(sorted(SUITES))} (see `benchharness suites`).")
    return SUITES[name]


def default_cache_dir() -> Path:
    env = os.environ.get("BENCHHARNESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "benchharness"


def fingerprint_files(paths: Iterable[Path], base: Path | None = None) -> str:
    """sha256 over each file's name (relative to `base`, else its bare name) and content, in name order."""
    digest = hashlib.sha256()
    named = sorted((str(p.relative_to(base)) if base is not None else p.name, p) for p in paths)
    for name, path in named:
        digest.update(name.encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _source_for(suite: Suite, data: DataSource, source_dir: Path | None, sources: Mapping[str, Path] | None) -> Path | None:
    # A folder named for this data source wins; `source_dir` is for single-source suites.
    if sources and data.name in sources:
        return Path(sources[data.name])
    if sources and suite.name in sources and len(suite.data) == 1:
        return Path(sources[suite.name])
    return source_dir if len(suite.data) == 1 else None


def prepare_suite(suite: Suite, data_root: Path, source_dir: Path | None = None, *, sources: Mapping[str, Path] | None = None) -> PreparedSuite:
    """Prepare every data source of `suite` under data_root/<data>/ unless an identical preparation is there already.

    source_dir: a local folder with the raw data (config `data_sources`) for a single-source suite;
    sources: data-source name -> folder, for group suites.
    """
    prepared = [prepare_data(d, data_root, _source_for(suite, d, source_dir, sources)) for d in suite.data]
    if len(prepared) == 1:
        folder, fingerprint, n_items = prepared[0]
    else:
        folder = data_root
        fingerprint = hashlib.sha256("".join(f"{d.name}:{p[1]}\n" for d, p in zip(suite.data, prepared)).encode()).hexdigest()
        n_items = sum(p[2] for p in prepared)
    return PreparedSuite(suite.name, suite.task, folder, fingerprint, n_items)


def prepare_data(data: DataSource, data_root: Path, source_dir: Path | None = None) -> tuple[Path, str, int]:
    """Prepare one data source; returns (folder, fingerprint of the prepared files, test items)."""
    located = data.locate(source_dir)
    if not located.found:
        if data.fetch is None or source_dir is not None:
            raise DataError(f"data '{data.name}': not found: {located.detail}.")
        root = data.fetch(data_root / "_raw")
        located = data.locate(root)
        if not located.found:
            raise DataError(f"data '{data.name}': downloaded data is unusable: {located.detail}.")
    root = located.root
    assert root is not None
    folder = data_root / data.name
    meta_path = folder / "meta.json"
    raw_base = root if root.is_dir() else root.parent
    raw_sha = fingerprint_files(located.files, raw_base)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        files = [folder / name for name in meta.get("files", [])]
        if meta.get("raw_sha256") == raw_sha and meta.get("version") == PREPARE_VERSION and files and all(f.is_file() for f in files):
            if fingerprint_files(files, folder) == meta["fingerprint"]:
                return folder, meta["fingerprint"], meta["n_items"]
            log.warning("data %s: prepared files in %s were modified; preparing again", data.name, folder)
    log.info("data %s: preparing from %s", data.name, root)
    built = data.build(root)
    n_items = sum(len(records) for name, records in built.items() if name.startswith("test"))
    if n_items != data.items and not data.check_items:
        log.warning("data %s: %d test items in %s (the full set has %d); runs record the count", data.name, n_items, root, data.items)
    elif n_items != data.items:
        raise DataError(f"data '{data.name}': expected {data.items} test items from {root}, found {n_items}. Fix: {data.install}.")
    for name, records in built.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    fingerprint = fingerprint_files([folder / name for name in built], folder)
    meta = {
        "data": data.name, "version": PREPARE_VERSION, "raw": str(root), "raw_sha256": raw_sha,
        "fingerprint": fingerprint, "n_items": n_items, "files": sorted(built),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))
    return folder, fingerprint, n_items


def render_tasks(tasks_dir: Path, data_root: Path, out_dir: Path) -> Path:
    """Copy the task folder (YAMLs, templates, .py helpers, subfolders) with "{data_dir}" replaced by the data cache folder.

    Files left in out_dir from an earlier rendering that no longer exist are removed, since
    lm-eval indexes every YAML under an include path and a stale one could shadow a task.
    """
    if not tasks_dir.is_dir():
        raise DataError(f"task folder {tasks_dir} not found. Fix: set tasks_dir in the experiment config.")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted: set[Path] = set()
    for path in sorted(tasks_dir.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.name.startswith("."):
            continue
        rel = path.relative_to(tasks_dir)
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        wanted.add(target)
        if path.suffix == ".py":
            atomic_write_text(target, path.read_text(encoding="utf-8"))
        else:
            atomic_write_text(target, path.read_text(encoding="utf-8").replace("{data_dir}", str(data_root)))
    for path in sorted(out_dir.rglob("*"), reverse=True):
        if path.is_file() and path not in wanted and "__pycache__" not in path.parts:
            path.unlink()
        elif path.is_dir() and path.name != "__pycache__" and not any(path.iterdir()):
            path.rmdir()
    return out_dir


# Dataset builders that read local files: a task using them needs no hub.
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}


def check_task_data_offline(task_config: Mapping[str, Any]) -> str | None:
    """For a stock or user lm-eval task config: None if its data can be loaded here, else a message saying how to provide it.

    Data is loadable when the task reads local files (dataset_path json/csv/... or a folder),
    when the hub may be used (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE not set), or when the
    dataset is already in the local Hugging Face datasets cache.
    """
    path = task_config.get("dataset_path")
    task = task_config.get("task", "?")
    if not path or str(path) in _LOCAL_BUILDERS or Path(str(path)).expanduser().exists():
        return None
    if _in_hf_cache(str(path)):
        return None
    reason = hub_offline_reason() or hub_unreachable_reason()
    if reason is None:
        return None
    name = task_config.get("dataset_name")
    spec = f"'{path}'" + (f" (config '{name}')" if name else "")
    load = f"datasets.load_dataset('{path}'" + (f", '{name}'" if name else "") + ")"
    return (
        f"task '{task}' needs the hub dataset {spec}, and the hub is off here ({reason}) with no cached copy. "
        f"Fix: where the hub is reachable run `python -c \"import datasets; {load}\"` and copy ~/.cache/huggingface to this machine; "
        f"or save the data as JSONL and write a task YAML with dataset_path: json and dataset_kwargs.data_files pointing at it "
        f"(see configs/tasks/bh_gsm8k_cot.yaml), in a folder named in the config's task folders."
    )


def hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """One TCP connection to the hub's host, made only when a task needs hub data that is not cached:
    without it, `datasets` would retry for half a minute before failing on a machine without internet."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    log.info("checking whether the hub (%s) is reachable", endpoint)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{endpoint} unreachable: {exc.strerror or exc}"
    return None


def _in_hf_cache(path: str) -> bool:
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()
    return (datasets_cache / path.replace("/", "___")).is_dir() or (hub_cache / f"datasets--{path.replace('/', '--')}").is_dir()

