"""Tiny real models and tokenizers, built in-process, for the engine tests (no test here).

Models come from real transformers configs (Llama, Qwen2, Gemma 3 with sliding-window
layers and final-logit softcapping) with a fixed seed; the tokenizer is a byte-level
BPE trained on a small corpus, in a plain variant and one that adds BOS like Gemma's.

`BENCHHARNESS_TEST_DEVICE=cuda` puts the models on that device (default cpu), so that the
engine's parity tests can be run on a GPU machine as they are (`pytest tests/test_engine_continuous.py`
there); the engine follows the device its model is on.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_WORDS = (
    "the a an of to in is was for on that with as by at from it this be are or which not have has "
    "number question answer true false value sum product prime group field ring order element "
    "paris london berlin rome madrid river mountain sea city country capital water fire earth air "
    "cat dog bird fish tree house car road book school teacher student apple bread milk cheese "
    "one two three four five six seven eight nine ten hundred thousand plus minus times equals "
    "john mary sells buys eggs dollars each day how many much total left more less than"
).split()


def _corpus(n_lines: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        numbers = [str(rng.randint(0, 999)) for _ in range(rng.randint(0, 2))]
        line = " ".join(words + numbers)
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ":"]))
    lines += ["Question: what is it?\nA. one\nB. two\nC. three\nD. four\nAnswer: A B C D"] * 20
    return lines


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def make_tokenizer(add_bos: bool = False, vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; with `add_bos` it prepends <bos> like Gemma's tokenizer."""
    tok = Tokenizer.from_str(_tokenizer_json(vocab_size))
    if add_bos:
        bos_id = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


# Sliding window of the test models that have one: far shorter than the test prompts.
WINDOW = 8


def _config(arch: str, common: dict) -> transformers.PretrainedConfig:
    """The real transformers config class of each architecture the catalog names, tiny."""
    window = dict(sliding_window=WINDOW)
    if arch == "llama":  # Llama 3.x, Yi, EuroLLM, Salamandra, SmolLM2
        return transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **common)
    if arch == "qwen2-sliding":  # Qwen2.5 / DeepSeek-R1-Distill-Qwen with use_sliding_window
        return transformers.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, max_window_layers=1, **window, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(num_hidden_layers=3, head_dim=16, use_sliding_window=True, max_window_layers=1, **window, **common)
    if arch == "mistral":  # every layer slides (Mistral 7B v0.1, Ministral as the hub ships it)
        return transformers.MistralConfig(num_hidden_layers=2, head_dim=16, **window, **common)
    if arch == "ministral":  # per-layer types
        return transformers.MinistralConfig(num_hidden_layers=3, head_dim=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **window, **common)
    if arch == "gemma2":
        return transformers.Gemma2Config(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                                         attn_logit_softcapping=50.0, **window, **common)
    if arch == "gemma3":
        # Sliding window much shorter than the test prompts, softcapped logits: both must be reproduced.
        return transformers.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=6, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common,
        )
    if arch == "gemma3-composite":  # Gemma 3 at 4B and up: an image-text model whose decoder is in text_config
        text = dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"], **window, **common)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
        return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                         boi_token_index=3, eoi_token_index=3, image_token_index=3)
    if arch == "phi3":  # Phi-3, Phi-3.5, Phi-4 (mini: partial rotary)
        return transformers.Phi3Config(num_hidden_layers=2, partial_rotary_factor=0.75, **window, **common)
    if arch == "olmo2":
        return transformers.Olmo2Config(num_hidden_layers=2, **common)
    if arch == "glm":  # glm-4-9b-chat-hf
        return transformers.GlmConfig(num_hidden_layers=2, head_dim=16, **common)
    if arch == "glm4":  # GLM-4-9B-0414
        return transformers.Glm4Config(num_hidden_layers=2, head_dim=16, **common)
    raise ValueError(f"unknown arch {arch!r}")


def make_config(arch: str, vocab_size: int, max_positions: int = 512, initializer_range: float = 0.2) -> transformers.PretrainedConfig:
    """The tiny config of `arch` (hidden 64, 2-3 layers, 4 heads over 2 key-value heads)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    return _config(arch, common)


ARCHITECTURES = ("llama", "qwen2", "qwen2-sliding", "qwen3", "mistral", "ministral", "gemma2", "gemma3", "gemma3-composite",
                 "phi3", "olmo2", "glm", "glm4")


# Where the tiny models live: cpu unless the environment names another device.
TEST_DEVICE = torch.device(os.environ.get("BENCHHARNESS_TEST_DEVICE", "cpu"))


def make_model(arch: str, vocab_size: int, seed: int = 0, max_positions: int = 512, dtype: torch.dtype = torch.float32,
               initializer_range: float = 0.2) -> transformers.PreTrainedModel:
    """A 2-3-layer model of the given architecture, on TEST_DEVICE, SDPA attention, seeded weights.

    A large init range makes the next-token distributions peaked, so greedy choices
    are clear-cut and parity checks compare real decisions, not float ties (a small one
    makes them flat, with near-ties, as the half-precision generation test wants).
    """
    config = make_config(arch, vocab_size, max_positions, initializer_range)
    # SDPA where the architecture has it (as transformers chooses by default); Gemma 2 (attention
    # logit softcapping) runs eager attention, which takes the engine's masks as additive ones.
    attention = "eager" if arch == "gemma2" else "sdpa"
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    model.generation_config = transformers.GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return model.to(dtype).to(TEST_DEVICE).eval()


@pytest.fixture
def one_torch_thread():
    """Tiny models on one torch thread: their matrices are too small to share between threads, and
    on a busy 2-core machine the thread pool's handovers made these tests 5-20x slower. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hflm_generated_ids(hflm, requests: list, eos_token_ids: set[int]) -> list[list[int]]:
    """lm-eval's hf model's new tokens for generate_until requests, as its batches produced them
    (each cut after its first EOS: hf pads finished rows until the batch ends)."""
    from benchharness.engine.reference import recorded_generations

    with recorded_generations(hflm, eos_token_ids) as by_prompt:
        hflm.generate_until(requests)
    prompts = [hflm.tok_batch_encode([req.args[0]])[0][0].tolist() for req in requests]
    return [by_prompt[tuple(prompt)] for prompt in prompts]


def mmlu_docs(n: int = 6, seed: int = 0) -> list[dict]:
    """MMLU-shaped documents (question, four choices, answer letter)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        question = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))).capitalize() + "?"
        choices = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        docs.append({"question": question, "choices": choices, "answer": rng.randint(0, 3)})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def mmlu_task(data_file: Path, name: str = "engine_mmlu_letters") -> dict:
    """lm-eval's stock MMLU prompt: single-token answers ' A'..' D'."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }


def text_choice_task(data_file: Path, name: str = "engine_mc_text") -> dict:
    """Multiple choice scored on the answer text: multi-token continuations."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question.strip()}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def generation_task(data_file: Path, name: str = "engine_gen", max_gen_toks: int = 24) -> dict:
    """GSM8K-style generation: greedy until a stop string or the token limit."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["Question:", "\n\n", "?"], "do_sample": False, "max_gen_toks": max_gen_toks},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
