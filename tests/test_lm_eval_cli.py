"""lm-eval's own command line runs the benchharness engine: `benchharness lm-eval run --model benchharness ...`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchharness.cli import _split_lm_eval
from benchharness.errors import HarnessError
from benchharness.engine.lm_eval_cli import engine_arguments
from conftest import read_jsonl


def _task(folder: Path) -> Path:
    """A tiny multiple-choice task YAML over local data, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "capitals.jsonl"
    rows = [{"q": f"Which city is capital number {i}?", "choices": ["Paris", "Rome", "Statement 1"], "gold": i % 3} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "capitals.yaml").write_text(textwrap.dedent(f"""
        task: cli_capitals
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: "{data}"}}}}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: gold
        metric_list: [{{metric: acc}}]
    """))
    return folder


def test_lm_eval_cli_runs_the_engine(tmp_path: Path, tiny_model_dir: Path) -> None:
    cache = tmp_path / "cache"
    _task(cache / "tasks")  # where `benchharness prepare` renders the harness's tasks
    out = tmp_path / "out"
    # No --include_path, --device or --batch_size: the cache's task folder, cpu and auto are used.
    ours = subprocess.run(
        [sys.executable, "-m", "benchharness", "--cache", str(cache), "lm-eval", "run", "--model", "benchharness",
         "--model_args", f"pretrained={tiny_model_dir},dtype=float32", "--tasks", "cli_capitals",
         "--output_path", str(out), "--log_samples", "--seed", "3"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert f"tasks included from {cache / 'tasks'}" in ours.stderr
    (results_file,) = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "benchharness"
    assert results["config"]["batch_size"] == "auto"
    (samples_file,) = list(out.rglob("samples_cli_capitals_*.jsonl"))
    samples = sorted(read_jsonl(samples_file), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(6))

    # The same task through lm-eval's own hf model on the same folder: the same per-sample
    # loglikelihoods (lm-eval writes them as strings) and the same accuracy.
    import lm_eval
    from lm_eval.tasks import TaskManager

    reference = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", device="cpu", batch_size=4,
        tasks=["cli_capitals"], log_samples=True, verbosity="ERROR", random_seed=3, numpy_random_seed=3,
        torch_random_seed=3, fewshot_random_seed=3,
        task_manager=TaskManager(include_path=str(cache / "tasks"), include_defaults=False),  # indexing lm-eval's own tasks takes seconds
    )
    ref_samples = sorted(reference["samples"]["cli_capitals"], key=lambda s: s["doc_id"])
    for mine, ref in zip(samples, ref_samples, strict=True):
        assert mine["prompt_hash"] == ref["prompt_hash"]
        for a, b in zip(mine["filtered_resps"], ref["filtered_resps"], strict=True):
            assert float(a[0]) == pytest.approx(float(b[0]), abs=1e-3)
            assert str(a[1]) == str(b[1])  # is_greedy
        assert mine["acc"] == ref["acc"]
    assert results["results"]["cli_capitals"]["acc,none"] == reference["results"]["cli_capitals"]["acc,none"]


def test_help_and_errors_pass_through(tmp_path: Path) -> None:
    from benchharness.cli import main

    assert main(["--cache", str(tmp_path), "lm-eval", "run", "--help"]) == 0
    assert main(["--cache", str(tmp_path), "lm-eval", "run", "--no-such-flag"]) == 2  # lm-eval's argparse error


def test_arguments_after_lm_eval_are_lm_evals() -> None:
    assert _split_lm_eval(["-q", "--cache", "/c", "lm-eval", "--model", "hf", "-q"]) == (["-q", "--cache", "/c", "lm-eval"], ["--model", "hf", "-q"])
    assert _split_lm_eval(["--cache=/c", "lm-eval", "run", "--help"]) == (["--cache=/c", "lm-eval"], ["run", "--help"])
    assert _split_lm_eval(["run", "cfg.yaml", "--limit", "2"]) == (["run", "cfg.yaml", "--limit", "2"], [])


def _namespace(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"model_args": None, "device": None, "max_batch_size": None} | kwargs)


def test_engine_arguments_from_flags_model_args_or_engine_defaults() -> None:
    named = _namespace(model_args={"pretrained": "/m", "device": "cpu", "batch_size": 8})
    engine_arguments(named)
    assert (named.device, named.batch_size, named.model_args) == ("cpu", 8, {"pretrained": "/m"})
    flagged = _namespace(model_args={"pretrained": "/m"}, device="cpu", batch_size="4")
    engine_arguments(flagged)
    assert (flagged.device, flagged.batch_size) == ("cpu", "4")
    bare = _namespace(model_args={"pretrained": "/m"})
    engine_arguments(bare)
    assert bare.batch_size == "auto" and bare.device in ("cpu", "cuda")
    with pytest.raises(HarnessError, match="--device cuda:0 and --model_args device=cpu disagree"):
        engine_arguments(_namespace(model_args={"device": "cpu"}, device="cuda:0"))
