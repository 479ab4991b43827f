"""Run folders: atomic writes, the manifest, the score/throughput tables and per-sample files.

Every file is written to a temporary name and renamed into place, so a crash or Ctrl-C
never leaves a half-written file that looks complete. The manifest's `status` says
whether a run finished ("complete") or not ("running", "incomplete", "failed").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from benchharness.files import atomic_write_text

# Counts stay integers in the CSV even where some rows leave them empty.
INTEGER_COLUMNS = {"n", "batch", "prompt_len", "new_tokens", "tokens", "reps"}


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (and may be ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_process(manifest: dict[str, Any]) -> str:
    """Where the process that last ran this run stands: "alive" (on this host, still a harness
    process), "gone" (on this host, no such process: killed by the OOM killer or SIGKILL, crashed,
    or the machine restarted), "elsewhere" (another host: this machine cannot tell) or "unknown"
    (a manifest that records no process). Only meaningful while the manifest says "running"."""
    import socket

    volatile = manifest.get("volatile") or {}
    pid, host = volatile.get("pid"), volatile.get("host")
    if pid is None or host is None:
        return "unknown"
    if host != socket.gethostname():
        return "elsewhere"
    return "alive" if process_alive(int(pid)) and _is_harness(int(pid)) else "gone"


def describe_status(manifest: dict[str, Any]) -> str:
    """The run's status in words. A run whose manifest still says "running" is one of: still going
    (its process is alive), killed or crashed (its process is gone: the OOM killer, SIGKILL, a power
    loss), or on another host, where this machine cannot tell."""
    status = str(manifest.get("status") or "unknown")
    if status != "running":
        return status
    volatile = manifest.get("volatile") or {}
    pid, host = volatile.get("pid"), volatile.get("host")
    state = run_process(manifest)
    if state == "unknown":
        return "running (or killed: this manifest records no process id)"
    if state == "elsewhere":
        return f"running on {host} as process {pid}, or killed there (this machine cannot tell)"
    if state == "alive":
        return f"running (process {pid})"
    return f"killed or crashed (process {pid} on {host} is gone; the manifest still says running)"


def _is_harness(pid: int) -> bool:
    """A live pid may have been reused by another program since the run's process died."""
    try:
        return b"benchharness" in Path(f"/proc/{pid}/cmdline").read_bytes() or pid == os.getpid()
    except OSError:
        return True  # no /proc here: trust the pid


class RunStore:
    """One run folder: results/<run_id>/."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")

    def write_table(self, name: str, rows: list[dict[str, Any]], columns: list[str]) -> Path:
        frame = pd.DataFrame(rows, columns=columns)
        for column in INTEGER_COLUMNS.intersection(columns):
            frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        path = self.folder / name
        atomic_write_text(path, frame.to_csv(index=False))
        return path

    def write_samples(self, model: str, task: str, records: list[dict[str, Any]]) -> Path:
        path = self.folder / "samples" / model / f"{task}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in records))
        return path
