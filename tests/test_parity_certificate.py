"""The parity certificate of every benchharness-engine run: a sample of each task's requests answered
again by lm-eval's hf model, recorded in the manifest and the report; a difference beyond the
tolerance marks the run parity-failed (scores kept, exit status 3)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from benchharness.certificate import sample_documents
from benchharness.cli import PARITY_FAILED, main
from conftest import tiny_catalog, write_experiment

BODY = """
name: certified
models: [tiny-llama]
suites:
  - {{name: mmlu, limit: 6}}
  - {{name: gsm8k_zeroshot, limit: 2}}
  - {{name: my_rolling, limit: 3}}
engine: {engine}
inference: {{dtype: float32, device: cpu, batch_size: auto}}
parity: {{requests: {requests}}}
seed: 3
output_dir: runs
speed: null
include_paths: [{tasks}]
"""


def _rolling_task(tmp_path: Path) -> Path:
    """A perplexity task over a few local texts (lm-eval's loglikelihood_rolling)."""
    tasks = tmp_path / "my_tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "texts.jsonl"
    texts = ["Find the degree for the given field extension over Q. " * 6, "Statement 1 | Statement 2 | True, False. " * 5,
             "Answer: A B C D. " * 8]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tasks / "rolling.yaml").write_text(textwrap.dedent(f"""
        task: my_rolling
        dataset_path: json
        dataset_kwargs: {{data_files: {{test: "{data}"}}}}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list: [{{metric: word_perplexity}}]
    """))
    return tasks


def _run(tmp_path: Path, tiny_model_dir: Path, engine: str = "benchharness", requests: int = 16) -> tuple[int, Path]:
    body = BODY.format(engine=engine, requests=requests, tasks=_rolling_task(tmp_path))
    config = write_experiment(tmp_path / "cfg", body, tiny_catalog(tiny_model_dir))
    code = main(["--cache", str(tmp_path / "cache"), "run", str(config)])
    (run,) = list((config.parent / "runs").iterdir())
    return code, run


def test_every_run_carries_a_parity_certificate(tmp_path: Path, tiny_model_dir: Path) -> None:
    code, run = _run(tmp_path, tiny_model_dir)
    assert code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    records = manifest["models"]["tiny-llama"]["parity"]
    assert set(records) == {"bh_mmlu", "bh_gsm8k_cot_zeroshot", "my_rolling"}
    mmlu, gsm8k, rolling = records["bh_mmlu"], records["bh_gsm8k_cot_zeroshot"], records["my_rolling"]
    # Whole documents until 16 requests: 4 MMLU items of 4 choices each, all agreeing.
    assert mmlu["type"] == "loglikelihood" and mmlu["documents"] == 4 and mmlu["requests"] == 16
    assert mmlu["max_abs_diff"] < 1e-3 and mmlu["argmax_agree"] == mmlu["argmax_documents"] == 4 and mmlu["greedy_agree"] == 16
    assert gsm8k["type"] == "generate_until" and gsm8k["identical"] == gsm8k["compared"] == 2
    assert rolling["type"] == "loglikelihood_rolling" and rolling["compared"] == 3 and rolling["max_abs_diff"] < 1e-3
    assert all(r["passed"] and r["seconds"] >= 0 for r in records.values())
    parity = manifest["parity"]
    assert parity["status"] == "passed" and parity["requests"] == 16 + 2 + 3 and parity["tolerance"]["max_abs_loglik"] == 1e-3
    report = (run / "report.md").read_text()
    section = report.split("## Parity certificate", 1)[1].split("\n## ", 1)[0]
    assert "| tiny-llama | passed | 3 | 21 |" in section and "2/2" in section and "4/4" in section
    assert main(["verify", str(run)]) == 0


def test_a_difference_beyond_the_tolerance_fails_the_run_but_keeps_its_scores(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from benchharness.engine.lm import BenchEngineLM

    honest = BenchEngineLM._loglikelihood_tokens

    def off_by_a_little(self, requests, disable_tqdm=False, **kwargs):  # an engine bug of 0.01 nats per request
        return [(ll + 0.01, greedy) for ll, greedy in honest(self, requests, disable_tqdm=disable_tqdm, **kwargs)]

    monkeypatch.setattr(BenchEngineLM, "_loglikelihood_tokens", off_by_a_little)
    code, run = _run(tmp_path, tiny_model_dir)
    assert code == PARITY_FAILED == 3
    assert "parity failed" in capsys.readouterr().err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and (run / "scores.csv").is_file()  # scores kept
    assert manifest["parity"]["status"] == "failed" and manifest["parity"]["failed"] == ["tiny-llama/bh_mmlu"]
    assert manifest["parity"]["max_abs_diff"] == pytest.approx(0.01, abs=1e-3)
    report = (run / "report.md").read_text()
    assert "PARITY FAILED on tiny-llama/bh_mmlu" in report
    assert any("parity certificate failed" in line for line in __import__("benchharness.verify", fromlist=["x"]).verify_run(run))


@pytest.mark.parametrize("engine,requests,status", [("benchharness", 0, "off"), ("hf", 16, "reference engine")])
def test_no_certificate_when_off_or_on_the_reference(tmp_path: Path, tiny_model_dir: Path, engine: str, requests: int, status: str) -> None:
    code, run = _run(tmp_path, tiny_model_dir, engine=engine, requests=requests)
    assert code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["parity"]["status"] == status
    assert "parity" not in manifest["models"]["tiny-llama"]


def test_sampled_documents_do_not_depend_on_order_or_split() -> None:
    samples = [{"doc_id": i, "arguments": [("q", f" {c}") for c in "ABCD"]} for i in range(40)]
    chosen = [s["doc_id"] for s in sample_documents(samples, "bh_mmlu", 16, seed=1)]
    assert len(chosen) == 4  # whole documents: 4 x 4 requests
    assert [s["doc_id"] for s in sample_documents(samples[::-1], "bh_mmlu", 16, seed=1)] == chosen
    assert [s["doc_id"] for s in sample_documents(samples, "bh_mmlu", 16, seed=2)] != chosen
