"""Engine parity on the real offline packs (SmolLM2-135M, Gemma-3-270m): the engine and lm-eval's
`hf` model (HFLM) wrap the same loaded fp32 model in one process and run the same lm-eval tasks.

- few-shot multiple choice: the harness's bh_mmlu, 2-shot, items from 6 different subjects;
- rolling loglikelihood: a perplexity task (lm-eval's wikitext form) over a few long local texts,
  at a short max_length so every text spans several rolling windows;
- greedy generation with stop strings: the harness's bh_gsm8k_cot (8-shot chain of thought),
  with its stop strings and "." (see the test).

Per request: |engine - hf| loglikelihood <= 1e-3 (fp32) and the same greedy flag; per item the
same prompt, the same answer and the same generated text; per task the same score.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from benchharness.config.catalog import load_catalog
from benchharness.suites.registry import default_cache_dir, get_suite, prepare_suite, render_tasks
from benchharness.engine import BenchEngineLM
from benchharness.engine.parity import TOLERANCE
from benchharness.models.sources import load_model, resolve_model
from conftest import REPO, read_jsonl

pytestmark = pytest.mark.integration

MODELS = ["smollm2-135m-instruct-q41", "gemma-3-270m-q4km"]
MMLU_ITEMS, MMLU_SHOTS = 6, 2  # the prepared MMLU is stored round-robin over subjects: 6 subjects
GSM8K_ITEMS, GSM8K_NEW_TOKENS = 3, 32
ROLLING_DOCS, ROLLING_ITEMS_PER_DOC, ROLLING_MAX_LENGTH = 2, 4, 128
MAX_ABS = TOLERANCE["float32"].max_abs_loglik


@dataclass(frozen=True)
class Tasks:
    folder: Path
    manager: TaskManager
    rolling_texts: list[str]
    gsm8k_until: list[str]  # bh_gsm8k_cot's own stop strings


@dataclass(frozen=True)
class Pair:
    name: str
    model: object
    tokenizer: object
    hf: HFLM
    engine: BenchEngineLM


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Tasks:
    """The harness's task YAMLs rendered over its prepared data, plus a rolling-loglikelihood task."""
    data = default_cache_dir() / "data"
    for suite in ("mmlu", "gsm8k"):
        prepare_suite(get_suite(suite), data)
    folder = render_tasks(REPO / "configs" / "tasks", data, tmp_path_factory.mktemp("tasks"))
    # Long English texts: consecutive GSM8K problems with their worked solutions.
    gsm8k = read_jsonl(data / "gsm8k" / "test.jsonl")
    texts = [
        "\n\n".join(f"{d['question']}\n{d['answer']}" for d in gsm8k[i * ROLLING_ITEMS_PER_DOC : (i + 1) * ROLLING_ITEMS_PER_DOC])
        for i in range(ROLLING_DOCS)
    ]
    (folder / "rolling.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (folder / "bh_test_rolling.yaml").write_text(
        "task: bh_test_rolling\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: '{folder / 'rolling.jsonl'}'}}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]\n"
    )
    # Only the harness's folder is indexed: indexing lm-eval's own tasks takes seconds.
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    gsm8k = manager.load("bh_gsm8k_cot")["tasks"]["bh_gsm8k_cot"]
    return Tasks(folder, manager, texts, list(gsm8k.config.generation_kwargs["until"]))


@pytest.fixture(scope="module", params=MODELS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """One pack loaded once (fp32, CPU), wrapped by both lm-eval models."""
    entry = load_catalog(REPO / "configs" / "models.yaml").get(request.param)
    model, tokenizer = load_model(resolve_model(entry, default_cache_dir()), entry, "float32", "cpu")
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    yield Pair(request.param, model, tokenizer, hf, engine)


def _evaluate(lm, tasks: Tasks, task: str, limit: int, **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], limit=limit, log_samples=True, verbosity="ERROR", task_manager=tasks.manager, **kwargs
    )


def _samples(out: dict, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def _same_items(engine: list[dict], hf: list[dict], n: int) -> None:
    assert [s["doc_id"] for s in engine] == [s["doc_id"] for s in hf] == list(range(n))
    for ours, ref in zip(engine, hf, strict=True):
        assert ours["prompt_hash"] == ref["prompt_hash"]


def test_few_shot_multiple_choice_matches_hf(pair: Pair, tasks: Tasks) -> None:
    kwargs = {"num_fewshot": MMLU_SHOTS, "fewshot_random_seed": 1234}
    hf_out = _evaluate(pair.hf, tasks, "bh_mmlu", MMLU_ITEMS, **kwargs)
    engine_out = _evaluate(pair.engine, tasks, "bh_mmlu", MMLU_ITEMS, **kwargs)
    hf_samples, engine_samples = _samples(hf_out, "bh_mmlu"), _samples(engine_out, "bh_mmlu")
    _same_items(engine_samples, hf_samples, MMLU_ITEMS)
    assert len({s["doc"]["subject"] for s in hf_samples}) == MMLU_ITEMS
    assert all(s["arguments"][0][0].count("\nAnswer:") == MMLU_SHOTS + 1 for s in hf_samples)
    for ours, ref in zip(engine_samples, hf_samples, strict=True):
        ours_ll = [float(r[0][0]) for r in ours["resps"]]
        ref_ll = [float(r[0][0]) for r in ref["resps"]]
        assert ours_ll == pytest.approx(ref_ll, abs=MAX_ABS), f"doc {ref['doc_id']}"
        assert [r[0][1] for r in ours["resps"]] == [r[0][1] for r in ref["resps"]]
        assert ours_ll.index(max(ours_ll)) == ref_ll.index(max(ref_ll))
        assert ours["acc"] == ref["acc"]
    assert engine_out["results"]["bh_mmlu"]["acc,none"] == hf_out["results"]["bh_mmlu"]["acc,none"]


def test_rolling_loglikelihood_matches_hf(pair: Pair, tasks: Tasks) -> None:
    # A short max_length for both: each text is scored in several windows (the texts are 3-4 times longer).
    hf = HFLM(pretrained=pair.model, tokenizer=pair.tokenizer, batch_size=2, max_length=ROLLING_MAX_LENGTH)
    # (The pair's engine has run the construction checks on this model already.)
    engine = BenchEngineLM(
        model=pair.model, tokenizer=pair.tokenizer, batch_size="auto", max_length=ROLLING_MAX_LENGTH, check_model=False
    )
    lengths = [len(engine.tok_encode(text)) for text in tasks.rolling_texts]
    assert min(lengths) > 2 * ROLLING_MAX_LENGTH, lengths
    hf_out = _evaluate(hf, tasks, "bh_test_rolling", ROLLING_DOCS)
    engine_out = _evaluate(engine, tasks, "bh_test_rolling", ROLLING_DOCS)
    hf_samples, engine_samples = _samples(hf_out, "bh_test_rolling"), _samples(engine_out, "bh_test_rolling")
    _same_items(engine_samples, hf_samples, ROLLING_DOCS)
    for ours, ref in zip(engine_samples, hf_samples, strict=True):
        ours_ll, ref_ll = float(ours["resps"][0][0]), float(ref["resps"][0][0])
        assert ref_ll < -100  # a whole text's loglikelihood, summed over its windows
        assert ours_ll == pytest.approx(ref_ll, abs=MAX_ABS), f"doc {ref['doc_id']}"
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert engine_out["results"]["bh_test_rolling"][metric] == pytest.approx(
            hf_out["results"]["bh_test_rolling"][metric], rel=1e-5
        )


def test_greedy_generation_with_stop_strings_matches_hf(pair: Pair, tasks: Tasks) -> None:
    # The task's stop strings ("Q:", end-of-turn markers) end an answer only once it is complete,
    # which these small models seldom reach within a few dozen tokens; "." (inside a token as
    # often as not) also ends each output, at a different step per row, so stops are exercised.
    until = [*tasks.gsm8k_until, "."]
    kwargs = {"gen_kwargs": {"max_gen_toks": GSM8K_NEW_TOKENS, "until": until}}
    hf_out = _evaluate(pair.hf, tasks, "bh_gsm8k_cot", GSM8K_ITEMS, **kwargs)
    engine_out = _evaluate(pair.engine, tasks, "bh_gsm8k_cot", GSM8K_ITEMS, **kwargs)
    hf_samples, engine_samples = _samples(hf_out, "bh_gsm8k_cot"), _samples(engine_out, "bh_gsm8k_cot")
    _same_items(engine_samples, hf_samples, GSM8K_ITEMS)
    assert all(s["arguments"][0][1]["until"] == until for s in hf_samples)
    outputs = [s["resps"][0][0] for s in engine_samples]
    assert outputs == [s["resps"][0][0] for s in hf_samples]
    lengths = [len(pair.tokenizer(out, add_special_tokens=False)["input_ids"]) for out in outputs]
    assert all(lengths) and len(set(lengths)) > 1, outputs  # rows ended at different steps ...
    assert min(lengths) < GSM8K_NEW_TOKENS - 8, outputs  # ... some well before the token limit
    for metric in ("exact_match,none", "strict_match,none"):
        assert engine_out["results"]["bh_gsm8k_cot"][metric] == hf_out["results"]["bh_gsm8k_cot"][metric]
