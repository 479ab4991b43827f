"""generate_until: identical greedy outputs to lm-eval's HFLM, stops, and seeded sampling."""

from __future__ import annotations

import collections
import os

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_engine_support import make_model, make_tokenizer, mmlu_docs, one_torch_thread  # noqa: F401  (a fixture)

from benchharness.engine import BenchEngineLM
from benchharness.engine import lm as lm_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 16


def _requests(gen_kwargs: dict, n: int = 7) -> list[Instance]:
    docs = mmlu_docs(n, seed=3)
    # prompts of clearly different lengths, so batches need left padding
    prompts = [d["question"] * (1 + i % 3) + "\nAnswer:" for i, d in enumerate(docs)]
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]


def _frequent_token(model, tokenizer) -> int:
    """A token the greedy model emits often, but not first: as EOS it ends sequences at different steps."""
    free = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).generate_until(
        _requests({"until": [], "do_sample": False, "max_gen_toks": MAX_NEW})
    )
    counts = collections.Counter()
    for text in free:
        ids = tokenizer.encode(text, add_special_tokens=False)
        counts.update(set(ids[1:]))
    return counts.most_common(1)[0][0]


def _stop_string_from(outputs: list[str]) -> str:
    """Two printable ASCII characters from inside a reference output, so the stop really fires.

    (Random tiny models emit partial UTF-8 bytes too; a stop string made of a replacement
    character would match text that only exists while a character is incomplete.)
    """
    for text in sorted(outputs, key=len, reverse=True):
        for start in range(len(text) // 3, len(text) - 1):
            window = text[start : start + 2]
            if window.isascii() and window.isprintable() and window.strip():
                return window
    raise AssertionError(f"no printable stop string candidate in {outputs!r}")


@pytest.mark.parametrize("arch,add_bos", [("llama", False), ("qwen2", False), ("gemma3", True)])
def test_greedy_generation_matches_hflm_with_stops_and_eos(arch, add_bos):
    tokenizer = make_tokenizer(add_bos=add_bos)
    model = make_model(arch, len(tokenizer))
    # Make sequences finish early and at different steps: EOS is a token the model often produces.
    model.generation_config.eos_token_id = _frequent_token(model, tokenizer)
    free = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(
        _requests({"until": [], "do_sample": False, "max_gen_toks": MAX_NEW})
    )
    stop = _stop_string_from(free)
    requests = _requests({"until": [stop, "\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW})
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    ours = engine.generate_until(requests)
    assert ours == reference
    # Some sequences stopped before the token limit (EOS or stop string) and left the batch.
    assert engine.stats.generated_tokens < len(requests) * MAX_NEW
    assert engine.stats.decode_steps <= MAX_NEW
    # Batch 1 gives the same text.
    assert BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=1).generate_until(requests) == reference


def test_greedy_generation_applies_the_models_repetition_penalty_like_transformers():
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=1)
    model.generation_config.repetition_penalty = 1.5
    requests = _requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW}, n=4)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2).generate_until(requests)
    assert BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests) == reference
    model.generation_config.repetition_penalty = 1.0
    assert BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests) != reference


def test_token_limit_is_per_request_group():
    tokenizer = make_tokenizer()
    model = make_model("qwen2", len(tokenizer))
    short = _requests({"until": [], "do_sample": False, "max_gen_toks": 3}, n=2)
    long = _requests({"until": [], "do_sample": False, "max_gen_toks": 9}, n=2)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer)
    engine.generate_until(short + long)
    assert engine.stats.generated_tokens == 2 * 3 + 2 * 9  # EOS never produced: every sequence runs to its limit


def test_seeded_sampling_is_reproducible_and_batch_invariant():
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    kwargs = {"until": [], "do_sample": True, "temperature": 3.0, "max_gen_toks": MAX_NEW}
    requests = _requests(kwargs)
    first = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", seed=7).generate_until(requests)
    again = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=1, seed=7).generate_until(requests)
    other = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", seed=8).generate_until(requests)
    greedy = BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(
        _requests({"until": [], "do_sample": False, "max_gen_toks": MAX_NEW})
    )
    assert first == again
    assert first != other
    assert first != greedy


def _few_shot_requests(gen_kwargs: dict, n: int = 6) -> list[Instance]:
    shots = "".join(d["question"] + "\nAnswer: " + d["choices"][0] + "\n\n" for d in mmlu_docs(3, seed=5))
    docs = mmlu_docs(n, seed=6)
    prompts = [shots + d["question"] * (1 + i % 2) + "\nAnswer:" for i, d in enumerate(docs)]
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("arch,shares", [("llama", True), ("qwen2", True), ("gemma3", True), ("mistral", True), ("gemma3", False)])
def test_prompts_sharing_few_shot_examples_run_them_once_with_hflms_outputs(arch, shares, monkeypatch):
    tokenizer = make_tokenizer()
    model = make_model(arch, len(tokenizer))
    model.generation_config.eos_token_id = _frequent_token(model, tokenizer)  # rows leave the batch early
    requests = _few_shot_requests({"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW})
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)
    if not shares:
        # Sliding windows whose masks the engine cannot build (say, flash attention on a GPU) share
        # no prefix longer than the window (6 here for Gemma; 8 for Mistral, every layer sliding).
        monkeypatch.setattr(lm_module, "windows_unmasked", lambda split: "no custom masks")
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    assert engine.generate_until(requests) == reference
    assert engine.stats.generate_prefixes == (1 if shares else 0)
    unshared = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", share_prefixes=False)
    assert unshared.generate_until(requests) == reference
    if shares:
        # The prefix runs once and each prompt's rest at most padded to the longest rest (the
        # engine may leave one token of the common prefix to the rests); unshared, every prompt
        # runs whole.
        lengths = [len(engine.tok_encode(r.args[0])) for r in requests]
        common = len(os.path.commonprefix([engine.tok_encode(r.args[0]) for r in requests]))
        assert unshared.stats.prefill_tokens >= sum(lengths)
        assert engine.stats.prefill_tokens <= (common - 1) + len(requests) * (max(lengths) - common + 1)
    sampled = _few_shot_requests({"until": [], "do_sample": True, "temperature": 3.0, "max_gen_toks": MAX_NEW})
    assert BenchEngineLM(model=model, tokenizer=tokenizer, seed=3).generate_until(sampled) == BenchEngineLM(
        model=model, tokenizer=tokenizer, seed=3, share_prefixes=False
    ).generate_until(sampled)
