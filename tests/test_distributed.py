"""Scale out (#8): runs in 2 processes on the CPU (gloo), through the real command line, must
write what a single process writes, item by item."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from benchharness.run.distributed import strip_processes
from benchharness.measure.metered import merge_in_doc_order
from conftest import build_tiny_model, read_jsonl, tiny_catalog, write_experiment, run_folders

BODY = """
name: tiny-dp
models: [tiny-llama, tiny-llama-b]
suites:
  - name: mmlu
    limit: 7
engine: hf
inference: {dtype: float32, device: cpu, batch_size: 4}
seed: 3
output_dir: runs
speed: null
"""

MODELS = ["tiny-llama", "tiny-llama-b"]


def two_model_catalog(a: Path, b: Path) -> str:
    first = tiny_catalog(a).rstrip()
    second = tiny_catalog(b).split("models:\n", 1)[1].replace("name: tiny-llama", "name: tiny-llama-b")
    return first + "\n" + second


def run_cli(folder: Path, body: str, catalog: str, *extra: str) -> Path:
    config = write_experiment(folder / "cfg", body, catalog)
    assert main(["--cache", str(folder.parent / "cache"), "run", str(config), *extra]) == 0
    (run,) = run_folders(folder / "cfg" / "runs")  # one run folder, however many processes
    return run


def run_accelerate(folder: Path, body: str, catalog: str) -> Path:
    """`accelerate launch --multi_gpu --num_processes 2 -m benchharness run CONFIG` (it runs on CPUs too, with gloo)."""
    config = write_experiment(folder / "cfg", body, catalog)
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "benchharness", "--cache", str(folder.parent / "cache"), "run", str(config)],
        check=True, timeout=600,
    )
    (run,) = run_folders(folder / "cfg" / "runs")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """The same experiment in one process, in 2 data-parallel processes (--processes and accelerate launch)
    and in 2 processes of one model each."""
    root = tmp_path_factory.mktemp("dist")
    catalog = two_model_catalog(tiny_model_dir, build_tiny_model(root / "tiny-b", seed=1))
    return {
        "single": run_cli(root / "single", BODY, catalog),
        "data": run_cli(root / "data", BODY, catalog, "--processes", "2"),
        "models": run_cli(root / "models", BODY + "parallel: models\n", catalog, "--processes", "2"),
        "accelerate": run_accelerate(root / "accelerate", BODY, catalog),
    }


def assert_same_samples(ours: Path, ref: Path) -> None:
    for model in MODELS:
        mine = read_jsonl(ours / "samples" / model / "bh_mmlu.jsonl")
        theirs = read_jsonl(ref / "samples" / model / "bh_mmlu.jsonl")
        assert [s["doc_id"] for s in mine] == list(range(7))
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            # Batches differ between the runs, so fp32 sums may differ in the last bits; nothing else may.
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-5)
            assert {k: v for k, v in a.items() if k != "loglikelihoods"} == {k: v for k, v in b.items() if k != "loglikelihoods"}


def assert_same_scores(ours: Path, ref: Path) -> None:
    a, b = pd.read_csv(ours / "scores.csv"), pd.read_csv(ref / "scores.csv")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("how", ["data", "models", "accelerate"])
def test_two_processes_equal_one_process(runs: dict[str, Path], how: str) -> None:
    run, ref = runs[how], runs["single"]
    mode = "models" if how == "models" else "data"
    assert_same_samples(run, ref)
    assert_same_scores(run, ref)
    manifest, ref_manifest = (json.loads((r / "manifest.json").read_text()) for r in (run, ref))
    assert manifest["status"] == "complete"
    assert manifest["config_hash"] == ref_manifest["config_hash"]  # `parallel` does not change results
    assert manifest["completed_suites"] == ref_manifest["completed_suites"]
    assert manifest["fingerprint"]["prompt_hashes"] == ref_manifest["fingerprint"]["prompt_hashes"]
    assert manifest["distributed"] == {"world_size": 2, "backend": "gloo", "parallel": mode, "rank_devices": ["cpu", "cpu"]}
    assert "distributed" not in ref_manifest
    assert main(["verify", str(run)]) == 0


def test_data_parallel_throughput_per_rank_and_total(runs: dict[str, Path]) -> None:
    speed = pd.read_csv(runs["data"] / "throughput.csv")
    for model in MODELS:
        mine = speed[speed.model == model].set_index("phase")
        assert {"load_warm", "eval", "eval_rank0", "eval_rank1"} <= set(mine.index)
        total, r0, r1 = mine.loc["eval"], mine.loc["eval_rank0"], mine.loc["eval_rank1"]
        # Every rank's tokens, over the time of the slowest rank.
        assert total.tokens == r0.tokens + r1.tokens
        assert total.seconds == max(r0.seconds, r1.seconds)
        assert total.tokens_per_s == pytest.approx(total.tokens / total.seconds, rel=1e-2)  # seconds are rounded in the CSV
    manifest = json.loads((runs["data"] / "manifest.json").read_text())
    requests = manifest["models"]["tiny-llama"]["requests"]["bh_mmlu"]
    assert requests["computed"] >= 7 * 4  # lm-eval pads the shorter shard with repeats
    # The single-process table has no per-rank rows.
    assert not pd.read_csv(runs["single"] / "throughput.csv").phase.str.contains("_rank").any()


def test_request_caches_are_per_rank(runs: dict[str, Path]) -> None:
    caches = sorted(p.name for p in (runs["data"] / "cache").iterdir())
    assert caches == sorted(f"{m}_rank{r}.db" for m in MODELS for r in (0, 1))
    # One model per process: each model's whole cache, named as in a single-process run.
    assert sorted(p.name for p in (runs["models"] / "cache").iterdir()) == sorted(f"{m}_rank0.db" for m in MODELS)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("limit: 7", "limit: 1"), "limit below the 2 processes"),
        (("batch_size: 4}", "batch_size: 4, device_map: auto}"), "cannot run in 2 processes"),
        (("name: mmlu", "name: no_such_suite"), "unknown suite 'no_such_suite'"),
    ],
)
def test_bad_input_is_refused_before_launching(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], expected: str) -> None:
    config = write_experiment(tmp_path / "cfg", BODY.replace(*change).replace("tiny-llama, tiny-llama-b", "tiny-llama"), tiny_catalog(tiny_model_dir))
    code = main(["--cache", str(tmp_path / "cache"), "run", str(config), "--processes", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("benchharness: error:") and expected in err[0]
    assert not (tmp_path / "cfg" / "runs").exists() or list((tmp_path / "cfg" / "runs").iterdir()) == []


def test_processes_must_be_positive(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_experiment(tmp_path / "cfg", BODY.replace("tiny-llama, tiny-llama-b", "tiny-llama"), tiny_catalog(tiny_model_dir))
    assert main(["run", str(config), "--processes", "0"]) == 2
    assert "--processes 0" in capsys.readouterr().err


def test_strip_processes() -> None:
    assert strip_processes(["--cache", "c", "run", "x.yaml", "--processes", "4", "--limit", "3"]) == ["--cache", "c", "run", "x.yaml", "--limit", "3"]
    assert strip_processes(["run", "x.yaml", "--processes=2"]) == ["run", "x.yaml"]


def test_merge_restores_document_order() -> None:
    # 5 documents over 2 ranks: rank 0 holds 0, 2, 4 and rank 1 holds 1, 3 (lm-eval's islice sharding),
    # with two filters logged one after the other.
    def sample(doc: int, filt: str) -> dict:
        return {"doc_id": doc, "filter": filt}

    rank0 = {"t": [sample(d, f) for f in ("a", "b") for d in (0, 2, 4)]}
    rank1 = {"t": [sample(d, f) for f in ("a", "b") for d in (1, 3)]}
    merged = merge_in_doc_order([rank0, rank1])
    assert merged["t"] == [sample(d, f) for f in ("a", "b") for d in range(5)]
    metrics = merge_in_doc_order([{"t": {("acc", "a"): [0.0, 0.2, 0.4]}}, {"t": {("acc", "a"): [0.1, 0.3]}}])
    assert metrics == {"t": {("acc", "a"): [0.0, 0.1, 0.2, 0.3, 0.4]}}


def test_device_map_auto_loads_without_moving(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from benchharness.config.catalog import ModelEntry, normalise_sources
    from benchharness.models.sources import ResolvedModel, load_model

    pytest.importorskip("accelerate")
    entry = ModelEntry.model_validate(normalise_sources({
        "name": "tiny-llama", "origin": "EU", "organisation": "test", "family": "Llama", "params": "40K", "license": "Apache-2.0",
        "sources": [{"local": str(tiny_model_dir)}],
    }))
    resolved = ResolvedModel(name="tiny-llama", path=tiny_model_dir, source={}, weights_sha256=None, revision=None)
    plain, tokenizer = load_model(resolved, entry, "float32", "cpu")
    calls: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        model = original(*args, **kwargs)
        monkeypatch.setattr(model, "to", lambda *a, **k: pytest.fail("a device_map model must not be moved"))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    spread, _ = load_model(resolved, entry, "float32", "cpu", device_map="auto")
    assert calls[0]["device_map"] == "auto"  # accelerate places the layers while loading
    ids = tokenizer("Answer: A B C D", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.allclose(plain(ids).logits, spread(ids).logits, atol=1e-6)
