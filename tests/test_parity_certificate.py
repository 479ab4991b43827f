"""The parity certificate of every benchharness-engine run: a sample of each task's requests answered
again by lm-eval's hf model, recorded in the manifest and the report; a difference beyond the
tolerance marks the run parity-failed (scores kept, exit status 3)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from benchharness.run.certificate import sample_documents
from benchharness.cli import PARITY_FAILED, main
from benchharness.store.verify import verify_run
from conftest import tiny_catalog, write_experiment, run_folders

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


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One harness cache for this module's runs: the suite data is prepared once."""
    return tmp_path_factory.mktemp("cache")


def _run(tmp_path: Path, tiny_model_dir: Path, cache: Path, engine: str = "benchharness", requests: int = 16) -> tuple[int, Path]:
    body = BODY.format(engine=engine, requests=requests, tasks=_rolling_task(tmp_path))
    config = write_experiment(tmp_path / "cfg", body, tiny_catalog(tiny_model_dir))
    code = main(["--cache", str(cache), "run", str(config)])
    (run,) = run_folders(config.parent / "runs")
    return code, run


def test_every_run_carries_a_parity_certificate(tmp_path: Path, tiny_model_dir: Path, cache: Path) -> None:
    code, run = _run(tmp_path, tiny_model_dir, cache)
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
    # Generation ran in the engine's decoding slots, bounded by a recorded KV-cache budget.
    batch = manifest["models"]["tiny-llama"]["batch"]
    assert batch["kv_budget_bytes"] > 0 and batch["generation"]["refill"] is True and batch["generation"]["slots"] >= 1


def test_a_difference_beyond_the_tolerance_fails_the_run_but_keeps_its_scores(
    tmp_path: Path, tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from benchharness.engine.lm import BenchEngineLM

    honest = BenchEngineLM._loglikelihood_tokens

    def off_by_a_little(self, requests, disable_tqdm=False, **kwargs):  # an engine bug of 0.01 nats per request
        return [(ll + 0.01, greedy) for ll, greedy in honest(self, requests, disable_tqdm=disable_tqdm, **kwargs)]

    monkeypatch.setattr(BenchEngineLM, "_loglikelihood_tokens", off_by_a_little)
    code, run = _run(tmp_path, tiny_model_dir, cache)
    assert code == PARITY_FAILED == 3
    assert "parity failed" in capsys.readouterr().err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and (run / "scores.csv").is_file()  # scores kept
    assert manifest["parity"]["status"] == "failed" and manifest["parity"]["failed"] == ["tiny-llama/bh_mmlu"]
    assert manifest["parity"]["max_abs_diff"] == pytest.approx(0.01, abs=1e-3)
    report = (run / "report.md").read_text()
    assert "PARITY FAILED on tiny-llama/bh_mmlu" in report
    assert any("parity certificate failed" in line for line in verify_run(run))


@pytest.mark.parametrize("engine,requests,status", [("benchharness", 0, "off"), ("hf", 16, "reference engine")])
def test_no_certificate_when_off_or_on_the_reference(tmp_path: Path, tiny_model_dir: Path, cache: Path, engine: str, requests: int, status: str) -> None:
    code, run = _run(tmp_path, tiny_model_dir, cache, engine=engine, requests=requests)
    assert code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["parity"]["status"] == status
    assert "parity" not in manifest["models"]["tiny-llama"]
    if engine == "hf":
        # lm-eval's own model, its batch sized from memory on the CPU, per call, each choice recorded.
        batch = manifest["models"]["tiny-llama"]["batch"]
        assert batch["budget_method"] == "memory-bounded" and batch["choices"]
        assert all(1 <= c["batch_size"] <= 64 and c["tokens"] > 0 for c in batch["choices"])


def test_sampled_documents_do_not_depend_on_order_or_split() -> None:
    samples = [{"doc_id": i, "arguments": [("q", f" {c}") for c in "ABCD"]} for i in range(40)]
    chosen = [s["doc_id"] for s in sample_documents(samples, "bh_mmlu", 16, seed=1)]
    assert len(chosen) == 4  # whole documents: 4 x 4 requests
    assert [s["doc_id"] for s in sample_documents(samples[::-1], "bh_mmlu", 16, seed=1)] == chosen
    assert [s["doc_id"] for s in sample_documents(samples, "bh_mmlu", 16, seed=2)] != chosen


def test_parity_failure_exits_3_through_the_process_launcher(
    tmp_path: Path, tiny_model_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--processes N`: torch's launcher turns rank 0's exit status 3 into 1; the run's manifest tells."""
    import datetime as dt

    import benchharness.run.distributed as distributed
    from benchharness.config.experiment import load_experiment

    config = write_experiment(tmp_path / "cfg", BODY.format(engine="benchharness", requests=16, tasks=_rolling_task(tmp_path)), tiny_catalog(tiny_model_dir))
    outcome = {}

    def launched_run(argv: list[str], processes: int) -> int:  # what rank 0 leaves behind, then the launcher's status
        experiment = load_experiment(config)
        run = experiment.output_dir / f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{experiment.config_hash()}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "manifest.json").write_text(json.dumps({"status": "complete", "parity": {"status": outcome["parity"]}}))
        return 1

    monkeypatch.setattr(distributed, "launch", launched_run)
    outcome["parity"] = "failed"
    assert main(["--cache", str(cache), "run", str(config), "--processes", "2"]) == PARITY_FAILED
    outcome["parity"] = "passed"  # another failure of the processes keeps the launcher's status
    assert main(["--cache", str(cache), "run", str(config), "--processes", "2"]) == 1


def test_data_parallel_run_certifies_the_same_documents(tmp_path: Path, tiny_model_dir: Path, cache: Path) -> None:
    """2 processes (parallel: data): rank 0 certifies the samples gathered from both ranks, the
    documents a single process certifies (test_every_run_carries_a_parity_certificate)."""
    body = BODY.format(engine="benchharness", requests=16, tasks=_rolling_task(tmp_path))
    config = write_experiment(tmp_path / "cfg", body, tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(cache), "run", str(config), "--processes", "2"]) == 0
    (run,) = run_folders(config.parent / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["distributed"]["world_size"] == 2
    records = manifest["models"]["tiny-llama"]["parity"]
    assert (records["bh_mmlu"]["documents"], records["bh_mmlu"]["requests"], records["bh_mmlu"]["argmax_agree"]) == (4, 16, 4)
    assert records["bh_gsm8k_cot_zeroshot"]["identical"] == records["bh_gsm8k_cot_zeroshot"]["compared"] == 2
    assert records["my_rolling"]["compared"] == 3
    assert manifest["parity"]["status"] == "passed" and manifest["parity"]["requests"] == 21


def test_sampled_generations_are_skipped_and_counted(tiny_model_dir: Path) -> None:
    """Only greedy generations can be compared string for string; sampled ones are counted, not compared."""
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchharness.run.certificate import certify_task
    from benchharness.engine.reference import ReferenceLM

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = ReferenceLM(model, tokenizer, "auto", "cpu")
    greedy = ("Answer: A B", {"until": ["\n"], "do_sample": False, "max_gen_toks": 6})
    sampled = ("Answer: C D", {"until": ["\n"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 6})
    (expected,) = reference.generate_until([Instance("generate_until", {}, greedy, 0)], disable_tqdm=True)
    samples = [{"doc_id": 0, "arguments": [greedy], "resps": [[expected]]}, {"doc_id": 1, "arguments": [sampled], "resps": [["anything"]]}]
    record = certify_task(reference, "gen", "generate_until", samples, requests=16, seed=0, dtype="float32")
    assert (record["compared"], record["identical"], record["sampled_skipped"], record["passed"]) == (1, 1, 1, True)
    samples[0]["resps"] = [[expected + " and more"]]  # an engine that generated something else fails
    record = certify_task(reference, "gen", "generate_until", samples, requests=16, seed=0, dtype="float32")
    assert (record["identical"], record["passed"], record["differing"]) == (0, False, [0])


def _parting_texts(model, tokenizer, prompt: str, theirs: list[int], tie: float) -> tuple[int, str, str]:
    """Two texts that leave hf's tokens `theirs` at the same token `k`: there one takes the model's best
    token besides hf's, within the near-tie bound `tie`, the other a single-character token among the 50
    most likely but far from a tie. Both are hf's text up to `k` plus the token's own text (a first
    difference is all the rule reads)."""
    import torch

    prompt_ids = tokenizer(prompt)["input_ids"]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    for k in range(len(theirs)):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt_ids + theirs[:k]], device=model.device)).logits[0, -1].float()
        order = logits.argsort(descending=True).tolist()
        close = order[0] if order[0] != theirs[k] else order[1]
        prefix, hf_text, close_text = decode(theirs[:k]), decode(theirs[: k + 1]), decode(theirs[:k] + [close])
        plain = all(t.startswith(prefix) and "\ufffd" not in t and "\n" not in t[len(prefix):] for t in (hf_text, close_text))
        if not plain or hf_text.startswith(close_text) or close_text.startswith(hf_text) or close == tokenizer.eos_token_id:
            continue
        hf_logit = float(logits[theirs[k]])
        if abs(hf_logit - float(logits[close])) > tie * max(abs(hf_logit), 1.0):
            continue
        far = [t for t in order[2:50] if len(decode([t])) == 1 and decode([t]).isalpha()
               and abs(hf_logit - float(logits[t])) > 4 * tie * max(abs(hf_logit), 1.0)]
        if far:
            return k, close_text, prefix + decode([far[-1]])
    raise AssertionError("no near-tie along hf's tokens: the test needs a flatter model")


def test_half_precision_generations_may_part_from_hf_only_at_a_near_tie() -> None:
    """bf16 (the CUDA default): the engine's batches round differently from hf's, so a greedy output
    may part from hf's; the certificate accepts it where the first differing choice is a near-tie
    (engine/parity.py GENERATION_TIE) and fails it otherwise. fp32 still asks for identical text."""
    import torch
    from lm_eval.api.instance import Instance
    from test_engine_support import hflm_generated_ids, make_model, make_tokenizer, mmlu_docs

    from benchharness.engine.parity import GENERATION_TIE
    from benchharness.engine.reference import ReferenceLM
    from benchharness.run.certificate import certify_task

    tokenizer = make_tokenizer()
    # A small init range: flat next-token distributions, so bf16 near-ties lie along the output.
    model = make_model("llama", len(tokenizer), dtype=torch.bfloat16, initializer_range=0.06)
    reference = ReferenceLM(model, tokenizer, "auto", "cpu")
    prompt = mmlu_docs(1, seed=4)[0]["question"] + "\nAnswer:"
    args = (prompt, {"until": [], "do_sample": False, "max_gen_toks": 24})
    instance = Instance("generate_until", {}, args, 0)
    (theirs,) = hflm_generated_ids(reference, [instance], {tokenizer.eos_token_id})
    (hf_text,) = reference.generate_until([instance], disable_tqdm=True)
    k, close, far = _parting_texts(model, tokenizer, prompt, theirs, GENERATION_TIE["bfloat16"])

    def certify(ours: str, dtype: str) -> dict:
        samples = [{"doc_id": 0, "arguments": [args], "resps": [[ours]]}]
        return certify_task(reference, "gen", "generate_until", samples, requests=16, seed=0, dtype=dtype)

    assert certify(hf_text, "bfloat16")["passed"] and "near_ties" not in certify(hf_text, "bfloat16")
    record = certify(close, "bfloat16")
    assert (record["identical"], record["near_ties"], record["passed"], record["differing"]) == (0, 1, True, [])
    (first,) = record["first_differences"]
    assert first["near_tie"] and first["token"] == k
    assert first["logit_gap"] <= GENERATION_TIE["bfloat16"] * max(first["logit"], 1.0)
    record = certify(far, "bfloat16")
    assert (record["identical"], record["near_ties"], record["passed"], record["differing"]) == (0, 0, False, [0])
    (first,) = record["first_differences"]
    assert not first["near_tie"] and first["token"] == k
    assert first["logit_gap"] > 4 * GENERATION_TIE["bfloat16"] * max(first["logit"], 1.0)
    # fp32 (GENERATION_TIE 0): a difference fails, with no near-tie reading.
    record = certify(close, "float32")
    assert (record["passed"], record["differing"]) == (False, [0]) and "near_ties" not in record
