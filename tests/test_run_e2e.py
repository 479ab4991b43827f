"""End to end through the CLI on a tiny model built in-process: the run folder and its tables."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from conftest import read_jsonl, tiny_catalog, write_experiment, run_folders

BODY = """
name: tiny
models: [tiny-llama]
suites:
  - name: mmlu
    limit: 6
engine: hf
inference: {dtype: float32, device: cpu, batch_size: 4}
seed: 3
output_dir: runs
speed: {batch: 2, prompt_len: 8, new_tokens: 4, warmup: 1, min_reps: 2, min_seconds: 0, limits_min_seconds: 0}
"""


def _run(tmp_path: Path, body: str, catalog: str, *extra: str) -> tuple[int, Path]:
    config = write_experiment(tmp_path / "cfg", body, catalog)
    code = main(["--cache", str(tmp_path / "cache"), "run", str(config), *extra])
    return code, tmp_path / "cfg" / "runs"


def test_tiny_run_writes_complete_tables(tmp_path: Path, tiny_model_dir: Path) -> None:
    code, runs = _run(tmp_path, BODY, tiny_catalog(tiny_model_dir))
    assert code == 0
    (run,) = run_folders(runs)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["completed"] == [["tiny-llama", "bh_mmlu"]]
    assert manifest["tasks"]["bh_mmlu"]["n"] == 6 and len(manifest["tasks"]["bh_mmlu"]["data_fingerprint"]) == 64
    assert manifest["models"]["tiny-llama"]["weights_sha256"]
    assert run.name.endswith(manifest["config_hash"])

    samples = read_jsonl(run / "samples" / "tiny-llama" / "bh_mmlu.jsonl")
    assert [s["doc_id"] for s in samples] == list(range(6))
    assert len({s["subject"] for s in samples}) == 6  # stratified: six different subjects
    from lm_eval.utils import hash_string
    for s in samples:
        assert len(s["loglikelihoods"]) == 4
        assert s["correct"] == (s["pred"] == s["target"])
        # the text the model was given, beside lm-eval's hash of it, and the four answers scored
        assert hash_string(s["prompt"]) == s["prompt_hash"] and s["prompt"].rstrip().endswith("Answer:")
        assert len(s["continuations"]) == 4 and s["continuations"][0].strip() == "A"

    scores = pd.read_csv(run / "scores.csv")
    acc = scores[(scores.metric == "acc")].iloc[0]
    assert acc.origin == "EU" and acc.n == 6
    assert acc.value == pytest.approx(sum(s["correct"] for s in samples) / 6)
    assert acc.ci_low <= acc.value <= acc.ci_high

    speed = pd.read_csv(run / "throughput.csv")
    evals = speed[speed.phase == "eval"].iloc[0]
    assert evals.tokens > 6 * 4 and evals.tokens_per_s > 0 and evals.batch == 4
    assert evals.achieved_flops > 0 and evals.peak_memory_mb > 0
    assert 0 < evals.flops_efficiency < 1  # useful work only, against the measured peak
    prefill = speed[speed.phase == "prefill"].iloc[0]
    assert prefill.tokens == prefill.reps * 2 * 8  # batch x prompt_len per timed run
    assert set(speed.phase) >= {"load_warm", "eval", "prefill", "decode"}
    assert manifest["limits"]["matmul_flops"]["median"] > 0
    # measured at the start and after the model; the run's peak is the higher of the two
    measured = manifest["limits"]["measurements"]
    assert [m["when"] for m in measured] == ["start", "after tiny-llama"]
    assert manifest["limits"]["peak_flops"] == max(m["peak_flops"] for m in measured)
    assert manifest["models"]["tiny-llama"]["requests"]["bh_mmlu"] == {"computed": 24, "cached": 0}
    assert (run / "report.md").is_file()
    assert main(["verify", str(run)]) == 0

    # lm-eval's own results format, where lm-eval's --output_path would put it, read by lm-eval's helpers
    from lm_eval.utils import get_latest_filename, get_results_filenames, make_table
    files = [str(p) for p in run.rglob("*.json") if p.name != "manifest.json"]
    latest = Path(get_latest_filename(get_results_filenames(files)))
    assert latest.parent == run / "lm_eval" / "tiny-llama" and str(latest.relative_to(run)) in manifest["files"]
    theirs = json.loads(latest.read_text())
    assert theirs["results"]["bh_mmlu"]["acc,none"] == pytest.approx(acc.value)
    assert theirs["n-samples"]["bh_mmlu"]["effective"] == 6 and theirs["model_name"] == "tiny-llama"
    assert len(theirs["task_hashes"]["bh_mmlu"]) == 64 and "bh_mmlu" in theirs["configs"]
    assert "bh_mmlu" in make_table(theirs)

    # the finished run joined the results store beside it, with its protocol on every score
    from benchharness.store.results_db import query
    stored = query("SELECT * FROM scores", runs / "runs.sqlite")
    assert len(stored) == len(scores) and set(stored["run_id"]) == {run.name}
    assert "0-shot, no chat template, acc" in set(stored["protocol"])
    assert all(p.startswith("0-shot, no chat template, acc") for p in stored["protocol"])
    assert query("SELECT count(*) AS n FROM samples", runs / "runs.sqlite")["n"].item() == 6


def test_rows_are_restated_against_the_best_limits_of_the_run(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine measured slow at the start and faster after the model (a shared machine): the
    run's limits are the faster measurement's, and the rows computed before it are restated."""
    from benchharness.measure.limits import MachineLimits
    from benchharness.measure.timing import summarize
    from benchharness.run import runner

    def limits(flops: float, bandwidth: float) -> MachineLimits:
        return MachineLimits(device="cpu", dtype="float32", matmul_flops=summarize([flops / 2, flops]),
                             memory_bandwidth=summarize([bandwidth]), matmul_size=8, bandwidth_bytes=8)

    measurements = iter([limits(1e9, 4e9), limits(4e9, 1e9)])  # matmul faster later, bandwidth slower
    monkeypatch.setattr(runner, "measure_machine_limits", lambda *args, **kwargs: next(measurements))
    code, runs = _run(tmp_path, BODY, tiny_catalog(tiny_model_dir))
    assert code == 0
    (run,) = run_folders(runs)
    manifest = json.loads((run / "manifest.json").read_text())
    recorded = manifest["limits"]
    assert (recorded["peak_flops"], recorded["peak_bandwidth"]) == (4e9, 4e9)  # the best of each
    assert [(m["when"], m["peak_flops"], m["peak_bandwidth"]) for m in recorded["measurements"]] == [
        ("start", 1e9, 4e9), ("after tiny-llama", 4e9, 1e9)]
    speed = pd.read_csv(run / "throughput.csv")
    rated = speed[speed.flops_efficiency.notna()]
    assert set(rated.phase) >= {"eval", "prefill", "decode"}  # computed against the start's 1e9
    assert list(rated.flops_efficiency) == pytest.approx(list(rated.achieved_flops / 4e9))
    # the bandwidth peak did not rise: the decode row's share is against the start's 4e9, unrestated
    import transformers
    from benchharness.engine.model_costs import decode_read_bytes
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32")
    decode = speed[speed.phase == "decode"].iloc[0]
    bound = decode.batch * 4e9 / decode_read_bytes(model)  # tokens/s if every step only read the weights
    assert decode.bandwidth_efficiency == pytest.approx(decode.tokens_per_s / bound)


def test_engine_run_probes_the_serving_scenario(tmp_path: Path, tiny_model_dir: Path) -> None:
    serve = "serve: {requests: 4, prompt_len: 6, new_tokens: [2, 5], concurrency: [1, 4]}"
    body = (
        BODY.replace("engine: hf", "engine: benchharness")
        .replace("limits_min_seconds: 0}", f"limits_min_seconds: 0, {serve}}}")
        .replace("    limit: 6\n", "    limit: 6\n  - {name: gsm8k_zeroshot, limit: 2}\n")
    )
    code, runs = _run(tmp_path, body, tiny_catalog(tiny_model_dir))
    assert code == 0
    (run,) = run_folders(runs)
    speed = pd.read_csv(run / "throughput.csv")
    # Generation's decode steps: their bytes (weights + cached keys and values) against the in-run bandwidth.
    generated = speed[speed.phase == "eval_generate"].iloc[0]
    assert generated.bandwidth_efficiency > 0 and generated.flops_efficiency > 0
    serving = speed[speed.phase == "serve"]
    assert serving.batch.tolist() == [1, 4]
    assert serving.tokens.tolist() == [2 * (2 + 5)] * 2  # every request to its forced length
    assert (serving.ttft_s <= serving.ttft_p99_s).all() and (serving.latency_p50_ms > 0).all()
    probe = (run / "report.md").read_text().split("## Speed probe", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"\|\s*serve\s*\|", probe)) == 2
    # both suites merged into the model's one lm-eval results file
    (results_json,) = list((run / "lm_eval" / "tiny-llama").glob("results_*.json"))
    assert set(json.loads(results_json.read_text())["results"]) == {"bh_mmlu", "bh_gsm8k_cot_zeroshot"}
    assert main(["verify", str(run)]) == 0


def test_same_config_twice_gives_identical_samples(tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = tiny_catalog(tiny_model_dir)
    assert _run(tmp_path / "a", BODY, catalog)[0] == 0
    assert _run(tmp_path / "b", BODY, catalog)[0] == 0
    (a,) = run_folders(tmp_path / "a" / "cfg" / "runs")
    (b,) = run_folders(tmp_path / "b" / "cfg" / "runs")
    assert read_jsonl(a / "samples/tiny-llama/bh_mmlu.jsonl") == read_jsonl(b / "samples/tiny-llama/bh_mmlu.jsonl")
    assert (a / "scores.csv").read_text() == (b / "scores.csv").read_text()

    # Prompt text off (private data): the same run otherwise, the same config hash, hashes kept.
    assert _run(tmp_path / "c", BODY, catalog, "--set", "log_prompts=false")[0] == 0
    (c,) = run_folders(tmp_path / "c" / "cfg" / "runs")
    assert c.name.split("-")[-1] == a.name.split("-")[-1]
    private = read_jsonl(c / "samples/tiny-llama/bh_mmlu.jsonl")
    assert all("prompt" not in s and "continuations" not in s and s["prompt_hash"] for s in private)
    assert private == [{k: v for k, v in s.items() if k not in ("prompt", "continuations")}
                       for s in read_jsonl(a / "samples/tiny-llama/bh_mmlu.jsonl")]


@pytest.mark.parametrize(
    ("body_change", "catalog_change", "expected"),
    [
        (("name: mmlu", "name: no_such_suite"), None, "unknown suite 'no_such_suite'"),
        (("tiny-llama]", "missing-model]"), None, "unknown model 'missing-model'"),
        (None, ("- local: ", "- gguf: /nonexistent/file.gguf\n            sha256: " + "b" * 64 + "\n          - local: /nonexistent"), "is not available on this machine"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], body_change, catalog_change, expected: str) -> None:
    body = BODY.replace(*body_change) if body_change else BODY
    catalog = tiny_catalog(tiny_model_dir)
    if catalog_change:
        catalog = catalog.replace(*catalog_change)
    code, runs = _run(tmp_path, body, catalog)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("benchharness: error:") and expected in err
    assert not runs.exists() or list(runs.iterdir()) == []


def test_corrupted_gguf_is_refused_before_any_result(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    catalog = tiny_catalog(tiny_model_dir).replace(f"- local: {tiny_model_dir}", f"- gguf: {bad}\n            sha256: {'a' * 64}")
    code, runs = _run(tmp_path, BODY, catalog)
    assert code == 2 and "sha256 mismatch" in capsys.readouterr().err
    assert not runs.exists()


def test_unwritable_output_folder(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    code, _ = _run(tmp_path, BODY, tiny_catalog(tiny_model_dir), "--output", str(blocker / "runs"))
    assert code == 2 and "not writable" in capsys.readouterr().err


def test_bad_command_line_override(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, runs = _run(tmp_path, BODY, tiny_catalog(tiny_model_dir), "--limit", "0")
    assert code == 2 and "--limit" in capsys.readouterr().err
    assert not runs.exists()


def test_engines_agree_on_the_tiny_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    catalog = tiny_catalog(tiny_model_dir)
    assert _run(tmp_path / "hf", BODY, catalog)[0] == 0
    assert _run(tmp_path / "bh", BODY.replace("engine: hf", "engine: benchharness").replace("batch_size: 4", "batch_size: auto"), catalog)[0] == 0
    (hf,) = run_folders(tmp_path / "hf" / "cfg" / "runs")
    (bh,) = run_folders(tmp_path / "bh" / "cfg" / "runs")
    ref = read_jsonl(hf / "samples/tiny-llama/bh_mmlu.jsonl")
    ours = read_jsonl(bh / "samples/tiny-llama/bh_mmlu.jsonl")
    assert [s["pred"] for s in ours] == [s["pred"] for s in ref]
    for a, b in zip(ours, ref):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
    manifest = json.loads((bh / "manifest.json").read_text())
    assert manifest["models"]["tiny-llama"]["batch"]["engine"] == "benchharness"
