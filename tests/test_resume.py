"""Resilience: a run killed midway resumes to the same results without recomputing finished work;
Ctrl-C marks a run incomplete; verify notices tampering."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchharness.cli import main
from conftest import read_jsonl, tiny_catalog, write_experiment

LIMIT = 400
# Batch 1: lm-eval's hf model pads a batch to its longest request, so a resumed run, which
# regroups the requests left, would compute some requests in other matrix shapes than a
# straight run (last-bit differences); and one request per forward pass keeps an idle
# machine from finishing the run before a signal lands.
BODY = f"""
name: resume
models: [tiny-llama]
suites:
  - name: mmlu
    limit: {LIMIT}
engine: hf
inference: {{dtype: float32, device: cpu, batch_size: 1}}
seed: 5
output_dir: runs
speed: null
"""


def _start(config: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchharness", "--cache", str(cache), "run", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _cached_rows(runs: Path) -> int:
    dbs = list(runs.glob("*/cache/*.db"))
    if not dbs:
        return 0
    try:
        with sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True, timeout=0.1) as db:
            return db.execute("select count(*) from unnamed").fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_for(condition, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run to make progress"
        time.sleep(0.05)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = tiny_catalog(tiny_model_dir)
    config = write_experiment(tmp_path / "killed", BODY, catalog)
    runs = config.parent / "runs"
    proc = _start(config, tmp_path / "cache")
    _wait_for(lambda: _cached_rows(runs) >= 200, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = list(runs.iterdir())
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"  # never looks complete
    assert not (run / "scores.csv").exists()
    done_before = _cached_rows(runs)

    assert main(["--cache", str(tmp_path / "cache"), "run", str(config), "--resume"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["volatile"]["resumed"]) == 1
    counts = manifest["models"]["tiny-llama"]["requests"]["bh_mmlu"]
    assert counts["cached"] >= done_before >= 200  # what the killed run finished was not recomputed
    assert counts["computed"] + counts["cached"] == 4 * LIMIT

    reference = write_experiment(tmp_path / "straight", BODY, catalog)
    assert main(["--cache", str(tmp_path / "cache"), "run", str(reference)]) == 0
    (straight,) = list((reference.parent / "runs").iterdir())
    resumed_samples = read_jsonl(run / "samples/tiny-llama/bh_mmlu.jsonl")
    straight_samples = read_jsonl(straight / "samples/tiny-llama/bh_mmlu.jsonl")
    assert len(resumed_samples) == len(straight_samples) == LIMIT
    for resumed, plain in zip(resumed_samples, straight_samples, strict=True):
        # Every field equal; loglikelihoods to float noise (the killed and the resumed process
        # each ran part of the requests, the straight run all of them).
        assert resumed["loglikelihoods"] == pytest.approx(plain["loglikelihoods"], abs=1e-5)
        assert {**resumed, "loglikelihoods": None} == {**plain, "loglikelihoods": None}
    assert (run / "scores.csv").read_text() == (straight / "scores.csv").read_text()
    assert main(["verify", str(run)]) == 0


def test_ctrl_c_marks_the_run_incomplete(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = write_experiment(tmp_path, BODY, tiny_catalog(tiny_model_dir))
    runs = config.parent / "runs"
    proc = _start(config, tmp_path / "cache")
    _wait_for(lambda: _cached_rows(runs) >= 20, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"exit code {proc.returncode}: {err[-1000:]}"
    (run,) = list(runs.iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert "incomplete" in (run / "report.md").read_text().lower()
    assert main(["verify", str(run)]) == 1


def test_resume_refuses_another_config(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tiny_catalog(tiny_model_dir)
    config = write_experiment(tmp_path, BODY.replace(f"limit: {LIMIT}", "limit: 3"), catalog)
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = list((config.parent / "runs").iterdir())
    code = main(["--cache", str(tmp_path / "cache"), "run", str(config), "--limit", "4", "--resume", str(run)])
    assert code == 2 and "config hash" in capsys.readouterr().err
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config), "--resume", str(run)]) == 2
    assert "already complete" in capsys.readouterr().err


def test_verify_reports_a_changed_file(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_experiment(tmp_path, BODY.replace(f"limit: {LIMIT}", "limit: 3"), tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = list((config.parent / "runs").iterdir())
    samples = run / "samples/tiny-llama/bh_mmlu.jsonl"
    samples.write_text(samples.read_text().replace('"correct": false', '"correct": true', 1))
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "samples/tiny-llama/bh_mmlu.jsonl: content differs" in out
