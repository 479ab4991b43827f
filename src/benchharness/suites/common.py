"""What every suite's preparation shares: the data-source description and stratified ordering."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchharness.errors import DataError
from benchharness.models.sources import package_dir

Records = list[dict[str, Any]]
# Prepared files of one data source: path relative to its folder -> records, in final order.
PreparedFiles = dict[str, Records]


@dataclass(frozen=True)
class Located:
    """Where raw data was found: `root` (a file or folder) and the files that make it up, or why not."""

    root: Path | None
    files: tuple[Path, ...] = ()
    detail: str = ""

    @property
    def found(self) -> bool:
        return self.root is not None


@dataclass(frozen=True)
class DataSource:
    """One body of raw data and how to prepare it into `data_root/<name>/`.

    `locate(source_dir)` finds the raw data (source_dir: a folder the user named, or None);
    `build(root)` turns it into prepared files; `fetch(cache_dir)` (optional) downloads it
    where it is not local, returning the same kind of root that `locate` finds.
    Item counts are the records in prepared files whose path starts with "test".
    """

    name: str
    items: int
    source: str
    license: str
    install: str
    locate: Callable[[Path | None], Located]
    build: Callable[[Path], PreparedFiles]
    fetch: Callable[[Path], Path] | None = None
    notes: tuple[str, ...] = field(default=())
    # False: a folder the user names may hold another number of items (its build checks the
    # structure instead); the count found is logged and recorded, never silently taken as complete.
    check_items: bool = True


def package_file(package: str, inner: str, install: str) -> Callable[[Path | None], Located]:
    """A `locate` for a file inside an installed package (source_dir, if given, replaces the package folder)."""

    def locate(source_dir: Path | None) -> Located:
        base = source_dir if source_dir is not None else package_dir(package)
        if base is None:
            return Located(None, (), f"package '{package}' not installed; install: {install}")
        path = base / inner if source_dir is None else _inner_in(source_dir, inner)
        if not path.is_file():
            return Located(None, (), f"{path} not found; install: {install}")
        return Located(path, (path,), str(path))

    return locate


def _inner_in(folder: Path, inner: str) -> Path:
    # A user-named folder may hold the file at the package's inner path or just by its name.
    nested = folder / inner
    return nested if nested.is_file() else folder / Path(inner).name


def stratified_order(records: Sequence[dict[str, Any]], key: str) -> Records:
    """Round-robin over `key` values (sorted), keeping source order within each value.

    The first N records of the result are then a stratified subset: every subject appears
    once before any appears twice.
    """
    groups: dict[str, Records] = defaultdict(list)
    for record in records:
        groups[str(record[key])].append(record)
    ordered: Records = []
    queues = [groups[k] for k in sorted(groups)]
    depth = max((len(q) for q in queues), default=0)
    for i in range(depth):
        ordered.extend(q[i] for q in queues if i < len(q))
    return ordered


def number_ids(records: Records) -> Records:
    for i, record in enumerate(records):
        record["id"] = i
    return records


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used now, or None if it may be reachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return f"{var} is set"
    return None


def hub_snapshot(suite: str, dataset: str, patterns: list[str], how_to: str) -> Path:
    """Download the files of a hub dataset matching `patterns` (once, into the hub cache); the
    snapshot folder. Offline, or on any hub failure: a DataError saying what was tried and `how_to`."""
    reason = hub_offline_reason()
    if reason is not None:
        raise DataError(f"suite '{suite}': no local data and the hub is off ({reason}), so the hub dataset {dataset} cannot be downloaded. Fix: {how_to}.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=dataset, repo_type="dataset", allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:  # any network or hub failure: say what was tried and how to provide the data
        raise DataError(f"suite '{suite}': could not download the hub dataset {dataset} ({type(exc).__name__}: {exc}). Fix: {how_to}.") from exc


def read_jsonl(path: Path) -> Records:
    # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
