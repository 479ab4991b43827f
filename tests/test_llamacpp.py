"""engine: llamacpp on the SmolLM2 pack's GGUF file: scoring that does not depend on the other
requests, generation that equals llama.cpp's own greedy completion, tokenization checked against
transformers, a whole run through the command line, and the errors of the GPU engines.
llama-cpp-python comes from `make install-llamacpp` (`make test` runs it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lm_eval.api.instance import Instance

from benchharness.cli import main
from benchharness.config.catalog import load_catalog
from benchharness.models.sources import gguf_file, load_tokenizer, resolve_model
from benchharness.suites.registry import default_cache_dir
from conftest import REPO, run_folders, write_experiment

MODEL = "smollm2-135m-instruct-q41"


def _llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        reason = "llama-cpp-python is not installed, so engine: llamacpp was NOT tested. Fix: make install-llamacpp."
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set: this must not be skipped)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, object]:
    _llama_cpp()
    cache = default_cache_dir()
    entry = load_catalog(REPO / "configs" / "models.yaml").get(MODEL)
    resolved = resolve_model(entry, cache)
    return gguf_file(entry, cache), load_tokenizer(resolved, entry)


def _lm(smollm2: tuple[Path, object], n_ctx: int = 512):
    from benchharness.engine.llamacpp import LlamaCppLM, LlamaCppSettings

    gguf, tokenizer = smollm2
    return LlamaCppLM(gguf, tokenizer, LlamaCppSettings(n_ctx=n_ctx, n_threads=2))


CONTEXT = "Question: Which planet is known as the Red Planet?\nAnswer:"
CHOICES = [" Venus", " Mars", " Jupiter", " Saturn"]


def test_scores_do_not_depend_on_the_other_requests(smollm2: tuple[Path, object]) -> None:
    lm = _lm(smollm2)
    requests = [Instance("loglikelihood", {}, (CONTEXT, c), i) for i, c in enumerate(CHOICES)]
    others = [Instance("loglikelihood", {}, ("The capital of Italy is", " Rome"), 9)]
    together = lm.loglikelihood(others + requests[::-1] + others)[1:-1][::-1]
    alone = [lm.loglikelihood([r])[0] for r in requests]
    assert together == alone  # bit for bit: a request's context is always evaluated from scratch
    assert lm.contexts_evaluated < lm.requests_scored  # shared contexts were evaluated once per call

    # The same figure from one evaluation of the whole sequence, scored by hand.
    context, continuation = lm._encode_pair(CONTEXT, CHOICES[1])
    lm.llm.reset()
    lm.llm.eval(context + continuation)
    rows = np.asarray(lm.llm.scores[len(context) - 1: len(context) + len(continuation) - 1], dtype=np.float64)
    by_hand = float(sum(r[t] - np.logaddexp.reduce(r) for r, t in zip(rows, continuation)))
    assert alone[1][0] == pytest.approx(by_hand, abs=1e-3)
    assert all(ll < 0 for ll, _ in alone)
    lm.close()


def test_generation_is_llama_cpps_own_greedy_completion(smollm2: tuple[Path, object]) -> None:
    lm = _lm(smollm2)
    prompt = "def fibonacci(n):\n"
    ours = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["\n\n\n"], "max_gen_toks": 48}), 0)])[0]
    reference = lm.llm.create_completion(prompt, max_tokens=48, temperature=0.0, top_k=1, stop=["\n\n\n"])["choices"][0]["text"]
    assert ours == reference and len(ours) > 10
    # a stop string cuts the text before it
    cut = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["return"], "max_gen_toks": 48}), 0)])[0]
    assert "return" not in cut and reference.startswith(cut)
    with pytest.raises(Exception, match="greedily only"):
        lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "do_sample": True, "temperature": 0.7}), 0)])
    lm.close()


def test_tokenization_is_checked_against_transformers(smollm2: tuple[Path, object]) -> None:
    from benchharness.engine.llamacpp import tokenization_check

    lm = _lm(smollm2)
    _, tokenizer = smollm2
    texts = [CONTEXT + c for c in CHOICES] + ["中文 émoji 🙂 tabs\tand  spaces\n\ncode()"]
    assert tokenization_check(lm, tokenizer, texts) == {"texts": 5, "differ": 0, "first_difference": None}

    class Shifted:  # a tokenizer that disagrees: the difference is reported, with an example
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [t + 1 for t in tokenizer.encode(text, add_special_tokens=False)]

    report = tokenization_check(lm, Shifted(), texts)
    assert report["differ"] == 5 and report["first_difference"]["text"] == texts[0]
    lm.close()


BODY = f"""
name: llamacpp
models: [{MODEL}]
suites:
  - {{name: mmlu, limit: 4}}
  - {{name: gsm8k_zeroshot, limit: 1}}
engine: llamacpp
llamacpp: {{n_ctx: 1024, n_threads: 2}}
output_dir: runs
"""


def test_a_run_through_the_command_line(tmp_path: Path, smollm2: tuple[Path, object]) -> None:
    config = write_experiment(tmp_path, BODY)
    assert main(["run", str(config)]) == 0
    (run,) = run_folders(config.parent / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    info = manifest["models"][MODEL]
    assert manifest["status"] == "complete" and manifest["parity"]["status"] == "not applicable"
    assert manifest["config"]["engine"] == "llamacpp" and manifest["config"]["llamacpp"]["n_ctx"] == 1024
    assert info["engine_build"]["llama_cpp_python"] and "AVX2 = 1" in info["engine_build"]["system_info"]
    assert info["engine_build"]["threads"] == 2 and info["batch"]["engine"] == "llamacpp" and info["dtype"] == "gguf"
    assert info["tokenization"]["bh_mmlu"] == {"texts": 16, "differ": 0, "first_difference": None}
    scores = pd.read_csv(run / "scores.csv")
    assert set(scores["task"]) == {"bh_mmlu", "bh_gsm8k_cot_zeroshot"}
    assert scores["build"].str.endswith("run quantized by llama.cpp").all() and not scores["build"].str.contains("dequantized").any()
    speed = pd.read_csv(run / "throughput.csv")
    assert {"eval", "eval_generate", "load_warm"} <= set(speed["phase"]) and "prefill" not in set(speed["phase"])
    assert (speed.loc[speed.phase == "eval", "tokens_per_s"] > 0).all()
    assert main(["verify", str(run)]) == 0
    report = (run / "report.md").read_text()  # the report reads the run as for the other engines
    assert "run quantized by llama.cpp" in report and "one request at a time" in report


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_gpu_engines_say_what_is_missing_before_loading(tmp_path: Path, engine: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec(engine) is not None and torch.cuda.is_available():
        pytest.skip(f"{engine} and a GPU are here: nothing is missing (make gpu-check runs it)")
    config = write_experiment(tmp_path, BODY.replace("engine: llamacpp", f"engine: {engine}"))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"engine: {engine}" in err[0] and "Fix:" in err[0]
    assert not (config.parent / "runs").exists()  # nothing written, no model loaded


def test_llamacpp_refuses_a_model_without_a_gguf_file(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _llama_cpp()
    from conftest import tiny_catalog

    body = BODY.replace(f"models: [{MODEL}]", "models: [tiny-llama]")
    config = write_experiment(tmp_path, body, tiny_catalog(tiny_model_dir))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "engine llamacpp runs a GGUF file" in err and "Fix:" in err
    assert main(["run", str(config), "--engine", "llamacpp", "--processes", "2"]) == 2
    assert "runs as one process" in capsys.readouterr().err
