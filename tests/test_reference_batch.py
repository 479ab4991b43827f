"""lm-eval's hf model as the harness builds it (benchharness.engine.reference): on a CPU, `batch_size: auto`
is sized from the memory available for the longest row lm-eval batches, never lm-eval's own probe
(64 rows, which the OOM killer ends on a CPU), and its answers are lm-eval's own."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from benchharness.engine.reference import MEMORY_SHARE, ReferenceLM, memory_bounded_batch, row_bytes

Memory = namedtuple("Memory", "available")


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32"), AutoTokenizer.from_pretrained(folder)


def _requests() -> list[Instance]:
    question = "Find the degree for the given field extension over Q. Statement 1 | Statement 2 |"
    return [Instance("loglikelihood", {}, (question * (1 + i % 3), f" {c}"), i) for i, c in enumerate("ABCDAB")]


def test_batch_fits_the_share_of_available_memory(tiny_model_dir: Path) -> None:
    model, _ = _load(tiny_model_dir)
    need = row_bytes(model, 100)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert need >= 100 * 3 * vocab * 4  # three fp32 copies of every position's logits at least
    assert memory_bounded_batch(model, 100, available=int(10 * need / MEMORY_SHARE), most=64)["batch_size"] == 10
    assert memory_bounded_batch(model, 100, available=need, most=64)["batch_size"] == 1  # never below one row
    assert memory_bounded_batch(model, 100, available=10**15, most=64)["batch_size"] == 64  # lm-eval's largest


def test_auto_on_cpu_sizes_the_longest_row_and_answers_like_hflm(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    model, tokenizer = _load(tiny_model_dir)
    requests = _requests()
    probe = ReferenceLM(model, tokenizer, 1, "cpu")
    # The tokens of lm-eval's longest row: context + continuation, less the last (predicted) token.
    longest = max(len(sum(probe._encode_pair(*r.args), [])) - 1 for r in requests)
    # Memory for exactly 2 of the longest rows: lm-eval's probe would have tried 64.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(int(2 * row_bytes(model, longest) / MEMORY_SHARE) + 1))
    lm = ReferenceLM(model, tokenizer, "auto", "cpu")
    ours = lm.loglikelihood(requests, disable_tqdm=True)
    (choice,) = lm.batch_choices
    assert choice["batch_size"] == 2 and choice["tokens"] == longest
    assert lm.batch_info()["budget_method"] == "memory-bounded"
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in plain]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in plain], abs=1e-5)


def test_generation_is_sized_for_its_longest_prompt_and_new_tokens(tiny_model_dir: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    lm = ReferenceLM(model, tokenizer, "auto", "cpu")
    prompts = ["Answer: A B C D", "Which of the following is true? Statement 1 | Statement 2 | True, False" * 2]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "do_sample": False, "max_gen_toks": 5}), i) for i, p in enumerate(prompts)]
    outputs = lm.generate_until(requests, disable_tqdm=True)
    (choice,) = lm.batch_choices
    assert choice["tokens"] == max(len(lm.tok_encode(p)) for p in prompts) + 5  # not the model's 2048-token context
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(requests, disable_tqdm=True)
    assert outputs == plain


def test_a_number_or_a_gpu_keeps_lm_evals_own_choice(tiny_model_dir: Path) -> None:
    model, tokenizer = _load(tiny_model_dir)
    lm = ReferenceLM(model, tokenizer, 3, "cpu")
    lm.loglikelihood(_requests(), disable_tqdm=True)
    assert lm.batch_choices == [] and lm.batch_info() == {"engine": "hf", "batch_size": 3, "budget_method": "configured"}


def test_recorded_hf_outputs_end_at_the_config_or_the_tokenizer_eos_and_the_recorder_is_removed() -> None:
    import transformers
    from test_engine_support import make_model, make_tokenizer

    from benchharness.engine.reference import recorded_generations, stop_token_ids

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    model.generation_config.eos_token_id = [5, 7]
    assert stop_token_ids(model, tokenizer) == {5, 7, tokenizer.eos_token_id}
    model.generation_config = transformers.GenerationConfig()  # no EOS configured: the tokenizer's alone
    assert stop_token_ids(model, tokenizer) == {tokenizer.eos_token_id}

    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["one two three four", "the cat sells eggs"]
    requests = [Instance("generate_until", {}, (p, {"until": [], "do_sample": False, "max_gen_toks": 8}), i)
                for i, p in enumerate(prompts)]
    with recorded_generations(hflm, frozenset()) as everything:
        texts = hflm.generate_until(requests)
    assert "_model_generate" not in hflm.__dict__  # the recorder is gone after the block
    assert set(everything) == {tuple(hflm.tok_encode(p)) for p in prompts}
    for prompt, text in zip(prompts, texts, strict=True):
        tokens = everything[tuple(hflm.tok_encode(prompt))]
        assert len(tokens) == 8 and tokenizer.decode(tokens) == text
        # Cut after the first stop id: with the first generated token as one, that token alone.
        with recorded_generations(hflm, frozenset({tokens[0]})) as cut:
            hflm.generate_until([requests[prompts.index(prompt)]])
        assert cut[tuple(hflm.tok_encode(prompt))] == tokens[:1]
