"""The engine as an lm-eval model: registration, construction from an argument string,
and whole-task parity with lm-eval's `hf` model through `simple_evaluate`."""

from __future__ import annotations

import functools
import logging

import lm_eval
import pytest
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from test_engine_support import (  # noqa: F401  (one_torch_thread: a fixture)
    TEST_DEVICE,
    generation_task,
    make_model,
    make_tokenizer,
    mmlu_docs,
    mmlu_task,
    one_torch_thread,
    text_choice_task,
    write_jsonl,
)

import benchharness.engine  # noqa: F401  (registers "benchharness")
from benchharness.engine import BenchEngineLM
from benchharness.engine.autobatch import CPU_TOKEN_BUDGET

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=1)
def _task_manager() -> TaskManager:
    # Indexing lm-eval's task folder takes seconds: do it once for the module.
    return TaskManager()


def _evaluate(lm, task: dict) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], log_samples=True, verbosity="ERROR", task_manager=_task_manager()
    )


def _per_sample(out: dict, name: str) -> dict[int, list]:
    return {s["doc_id"]: s["resps"] for s in out["samples"][name]}


@pytest.mark.parametrize("arch,add_bos", [("llama", False), ("gemma3", True)])
@pytest.mark.parametrize("kind", ["letters", "text"])
def test_multiple_choice_task_matches_hf(tmp_path, arch, add_bos, kind):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    data = write_jsonl(tmp_path / "mc.jsonl", mmlu_docs(8, seed=5))
    task = mmlu_task(data) if kind == "letters" else text_choice_task(data)
    name = task["task"]

    reference = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), task)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    ours = _evaluate(engine, task)

    for metric in ("acc,none", "acc_norm,none"):
        if metric in reference["results"][name]:
            assert ours["results"][name][metric] == reference["results"][name][metric]
    ref_samples, our_samples = _per_sample(reference, name), _per_sample(ours, name)
    assert ref_samples.keys() == our_samples.keys() and len(ref_samples) == 8
    for doc_id, responses in ref_samples.items():
        for ref, got in zip(responses, our_samples[doc_id], strict=True):
            assert abs(ref[0][0] - got[0][0]) < 1e-3
            assert ref[0][1] == got[0][1]
    if TEST_DEVICE.type == "cpu":  # a GPU takes the largest budget that fits
        assert engine.batch_info["budget_method"] == "cpu-fixed"
        assert engine.batch_info["token_budget"] == CPU_TOKEN_BUDGET


def test_generation_task_matches_hf(tmp_path):
    tokenizer = make_tokenizer(add_bos=True)
    model = make_model("gemma3", len(tokenizer), seed=2)
    data = write_jsonl(tmp_path / "gen.jsonl", mmlu_docs(6, seed=6))
    task = generation_task(data)
    reference = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), task)
    ours = _evaluate(BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto"), task)
    assert _per_sample(ours, task["task"]) == _per_sample(reference, task["task"])
    assert ours["results"][task["task"]] == reference["results"][task["task"]]


def test_registered_and_built_from_an_argument_string(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model("qwen2", len(tokenizer))
    folder = tmp_path / "tiny-qwen2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    cls = get_model("benchharness")
    assert cls is BenchEngineLM
    lm = cls.create_from_arg_string(
        f"pretrained={folder},dtype=float32,device=cpu,batch_size=auto",
        {"batch_size": None, "max_batch_size": None, "device": None},
    )
    assert isinstance(lm, BenchEngineLM)
    assert lm.batch_info["batch_size"] == "auto"
    # Loaded from disk it scores like the in-memory model.
    in_memory = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2)
    data = write_jsonl(tmp_path / "mc.jsonl", mmlu_docs(4, seed=7))
    task = mmlu_task(data)
    from_disk = _per_sample(_evaluate(lm, task), task["task"])
    direct = _per_sample(_evaluate(in_memory, task), task["task"])
    for doc_id, responses in direct.items():
        for a, b in zip(responses, from_disk[doc_id], strict=True):
            assert abs(a[0][0] - b[0][0]) < 1e-4


def test_model_on_another_device_is_refused():
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match="device"):
        BenchEngineLM(model=model, tokenizer=tokenizer, device="meta")
