"""Integration on the real SmolLM2 pack: the harness equals lm-eval run directly on the same items."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from benchharness.suites.registry import default_cache_dir
from conftest import REPO, read_jsonl, run_folders

pytestmark = pytest.mark.integration

LIMIT = 12


def test_harness_matches_lm_eval_cli_on_smollm2(tmp_path: Path) -> None:
    cache = default_cache_dir()
    code = main([
        "--cache", str(cache), "run", str(REPO / "configs/experiments/default.yaml"),
        "--models", "smollm2-135m-instruct-q41", "--limit", str(LIMIT), "--output", str(tmp_path / "runs"), "--engine", "hf",
    ])
    assert code == 0
    (run,) = run_folders(tmp_path / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    model_dir = Path(next(cache.glob("models/smollm2-135m-instruct-q41-*")))
    assert manifest["models"]["smollm2-135m-instruct-q41"]["weights_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ours = read_jsonl(run / "samples/smollm2-135m-instruct-q41/bh_mmlu.jsonl")

    # lm-eval's own command line, its own model loading, on the harness's rendered task and data.
    out = tmp_path / "lm_eval_out"
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
         "--device", "cpu", "--batch_size", "8", "--tasks", "bh_mmlu", "--include_path", str(cache / "tasks"),
         "--limit", str(LIMIT), "--log_samples", "--output_path", str(out), "--seed", "1234"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (samples_file,) = list(out.rglob("samples_bh_mmlu_*.jsonl"))
    theirs = sorted(read_jsonl(samples_file), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in theirs] == [s["doc_id"] for s in ours] == list(range(LIMIT))
    for mine, ref in zip(ours, theirs):
        ref_lls = [float(r[0]) for r in ref["filtered_resps"]]  # lm-eval writes them as strings
        assert mine["loglikelihoods"] == pytest.approx(ref_lls, abs=1e-4)
        assert mine["correct"] == bool(ref["acc"])
        assert mine["prompt_hash"] == ref["prompt_hash"]
        # the prompt text and answers are lm-eval's own request arguments
        ref_args = [ref["arguments"][f"gen_args_{i}"] for i in range(len(ref["arguments"]))]
        assert mine["prompt"] == ref_args[0]["arg_0"]
        assert mine["continuations"] == [a["arg_1"] for a in ref_args]

    (results_file,) = list(out.rglob("results_*.json"))
    theirs_json = json.loads(results_file.read_text())
    ref_acc = theirs_json["results"]["bh_mmlu"]["acc,none"]
    # the run's lm-eval-format results file reads as lm-eval's own does
    (mine_file,) = list((run / "lm_eval").rglob("results_*.json"))
    mine_json = json.loads(mine_file.read_text())
    assert mine_json["results"]["bh_mmlu"]["acc,none"] == pytest.approx(ref_acc)
    assert mine_json["task_hashes"] == theirs_json["task_hashes"]  # the same documents, prompts and targets
    for key in ("n-shot", "versions", "n-samples", "higher_is_better", "group_subtasks"):
        assert mine_json[key] == theirs_json[key], key
    scores = pd.read_csv(run / "scores.csv")
    assert scores.loc[scores.metric == "acc", "value"].item() == pytest.approx(ref_acc)
