"""`benchharness verify`: re-check a run folder against its manifest and say what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from benchharness.store.manifest import fingerprint_sha256
from benchharness.files import sha256_file
from benchharness.store.run_folder import describe_status


def verify_run(folder: Path) -> list[str]:
    """Problems found, one line each; an empty list means the run is intact and complete."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return [f"{manifest_path}: missing; not a run folder"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return [f"{manifest_path}: not valid JSON ({exc})"]

    problems = []
    if manifest.get("status") != "complete":
        problems.append(f"status is '{describe_status(manifest)}', not 'complete': finish it with `benchharness run CONFIG --resume {folder}`")
    parity = manifest.get("parity") or {}
    if parity.get("status") == "failed":
        problems.append(f"parity certificate failed on {', '.join(parity.get('failed', []))}: the engine's results differ from lm-eval's hf model beyond the tolerance")
    if manifest.get("fingerprint_sha256") != fingerprint_sha256(manifest.get("fingerprint", {})):
        problems.append("manifest: fingerprint_sha256 does not match the fingerprint it describes (edited by hand?)")

    recorded: dict[str, str] = manifest.get("files", {})
    for rel, expected in sorted(recorded.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel}: content differs from the manifest (sha256 {sha256_file(path)[:12]}, recorded {expected[:12]})")
    for path in sorted((folder / "samples").rglob("*.jsonl")) if (folder / "samples").is_dir() else []:
        rel = str(path.relative_to(folder))
        if rel not in recorded:
            problems.append(f"{rel}: not in the manifest")
    problems += _scores_match_samples(folder)
    return problems


def _scores_match_samples(folder: Path) -> list[str]:
    """Every per-task score in scores.csv equals the mean of its per-sample values."""
    scores_path = folder / "scores.csv"
    if not scores_path.is_file():
        return []
    problems = []
    for row in pd.read_csv(scores_path).itertuples():
        samples = folder / "samples" / str(row.model) / f"{row.task}.jsonl"
        if not samples.is_file():
            continue
        lines = [json.loads(line) for line in samples.read_text(encoding="utf-8").split("\n") if line.strip()]
        metric, _, filt = str(row.metric).partition(",")
        logged = [r["metrics"][metric] for r in lines if metric in r.get("metrics", {}) and r.get("filter", "none") == (filt or "none")]
        # Corpus-level metrics (perplexities) log pairs, not per-item scores: their mean is not the score.
        if not logged or not all(isinstance(v, (int, float)) for v in logged):
            continue
        values = [float(v) for v in logged]
        mean = sum(values) / len(values)
        if abs(mean - float(row.value)) > 1e-9 or len(values) != int(row.n):
            problems.append(f"scores.csv: {row.model}/{row.task}/{row.metric} = {row.value} (n={row.n}) but its samples give {mean} (n={len(values)})")
    return problems
