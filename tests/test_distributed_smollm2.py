"""Integration (#8): SmolLM2 from the offline pack, 8 MMLU items, sharded over 2 CPU processes
with the tuned engine, equals the same run in one process item by item."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from benchharness.suites.registry import default_cache_dir
from conftest import REPO, read_jsonl, write_experiment, run_folders

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct-q41"

# A small speed probe: on rank 0 only while the other rank waits.
BODY = f"""
name: smollm2-dp
models: [{MODEL}]
suites:
  - name: mmlu
    limit: 8
inference: {{dtype: float32, device: cpu, batch_size: 8}}
output_dir: runs
speed: {{batch: 1, prompt_len: 16, new_tokens: 4, warmup: 1, min_reps: 2, min_seconds: 0, limits_min_seconds: 0}}
"""


def _run(config: Path, output: Path, *extra: str) -> Path:
    code = main(["--cache", str(default_cache_dir()), "run", str(config), "--output", str(output), *extra])
    assert code == 0
    (run,) = run_folders(output)
    return run


def test_smollm2_two_processes_equal_one(tmp_path: Path) -> None:
    config = write_experiment(tmp_path / "cfg", BODY, (REPO / "configs" / "models.yaml").read_text())
    single = _run(config, tmp_path / "single")
    sharded = _run(config, tmp_path / "sharded", "--processes", "2")
    ours = read_jsonl(sharded / f"samples/{MODEL}/bh_mmlu.jsonl")
    ref = read_jsonl(single / f"samples/{MODEL}/bh_mmlu.jsonl")
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in ref] == list(range(8))
    for a, b in zip(ours, ref):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert (a["pred"], a["correct"], a["prompt_hash"], a["doc_hash"], a["target"]) == (b["pred"], b["correct"], b["prompt_hash"], b["doc_hash"], b["target"])
    scores = pd.read_csv(sharded / "scores.csv")
    ref_scores = pd.read_csv(single / "scores.csv")
    assert scores[["task", "metric", "value", "n"]].equals(ref_scores[["task", "metric", "value", "n"]])
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["distributed"]["world_size"] == 2
    speed = pd.read_csv(sharded / "throughput.csv")
    assert {"eval", "eval_rank0", "eval_rank1", "prefill", "decode"} <= set(speed.phase)
    assert main(["verify", str(sharded)]) == 0
