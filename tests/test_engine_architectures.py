"""Engine parity on every architecture the catalog names: a tiny random model of each real
transformers config class (with a sliding window where the family has one) gives lm-eval's
HFLM's scores on few-shot multiple choice whose shared prefix is longer than the window, on
rolling loglikelihood longer than the window, and its greedy outputs with prefix sharing.
Remote-code architectures are checked at construction and refused when the engine's path differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_engine_support import ARCHITECTURES, WINDOW, make_model, make_tokenizer, mmlu_docs

from benchharness.engine import BenchEngineLM
from benchharness.engine.head import UnsupportedModelError
from benchharness.engine.parity import TOLERANCE

REPO = Path(__file__).resolve().parents[1]

# Catalog family -> the test architectures that stand for it (transformers config classes).
FAMILY_ARCHITECTURES = {
    "Qwen2.5-Coder": ["qwen2"], "Qwen2.5": ["qwen2", "qwen2-sliding"], "Qwen3": ["qwen3"],
    "DeepSeek-R1-Distill": ["qwen2", "qwen2-sliding"], "GLM-4": ["glm", "glm4"], "Yi-1.5": ["llama"],
    "Llama 3.2": ["llama"], "Llama 3.1": ["llama"], "Gemma 2": ["gemma2"], "Gemma 3": ["gemma3", "gemma3-composite"],
    "Phi-3": ["phi3"], "Phi-3.5": ["phi3"], "Phi-4": ["phi3"], "OLMo 2": ["olmo2"], "Mistral": ["mistral"],
    "Mistral Small": ["mistral"], "Ministral": ["ministral", "mistral"], "EuroLLM": ["llama"],
    "Salamandra": ["llama"], "SmolLM2": ["llama"],
}
# Families whose code comes from the hub (trust_remote_code): covered by the construction check.
REMOTE_CODE_FAMILIES = {"InternLM3", "InternLM2.5", "MiniCPM4", "Teuken"}
BOS_FIRST = {"gemma2", "gemma3", "gemma3-composite"}  # tokenizers that add BOS, as Gemma's do


def test_every_catalog_family_is_covered() -> None:
    catalog = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())["models"]
    native = {m["family"] for m in catalog if not m.get("trust_remote_code")}
    remote = {m["family"] for m in catalog if m.get("trust_remote_code")}
    assert native - set(FAMILY_ARCHITECTURES) == set(), "a catalog family with no architecture test: add it here"
    assert remote == REMOTE_CODE_FAMILIES
    assert {a for archs in FAMILY_ARCHITECTURES.values() for a in archs} == set(ARCHITECTURES)


def _shots() -> str:
    return "".join(d["question"] + "\nAnswer: " + d["choices"][d["answer"]] + "\n\n" for d in mmlu_docs(3, seed=7))


def _few_shot_requests() -> list[Instance]:
    requests = []
    for i, doc in enumerate(mmlu_docs(5, seed=2)):
        for cont in (" A", " B", " C", " D"):
            requests.append(Instance("loglikelihood", {}, (_shots() + doc["question"] + "\nAnswer:", cont), i))
        for choice in doc["choices"][:2]:
            requests.append(Instance("loglikelihood", {}, (_shots() + "Q: " + doc["question"] + "\nA:", " " + choice), i))
    return requests


def _max_diff(a: list, b: list) -> float:
    return max(abs((x[0] if isinstance(x, tuple) else x) - (y[0] if isinstance(y, tuple) else y)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_matches_hflm(arch: str) -> None:
    tokenizer = make_tokenizer(add_bos=arch in BOS_FIRST)
    model = make_model(arch, len(tokenizer))
    tolerance = TOLERANCE["float32"]

    # Few-shot multiple choice: the shared few-shot prefix (far longer than the window) runs once.
    requests = _few_shot_requests()
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(requests)
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=128)
    ours = engine.loglikelihood(requests)
    assert engine.stats.score_prefixes >= 1
    assert _max_diff(reference, ours) < tolerance.max_abs_loglik
    assert [r[1] for r in reference] == [o[1] for o in ours]
    if engine._split.sliding_window is not None:
        assert engine._split.sliding_window <= WINDOW < len(tokenizer(_shots())["input_ids"])

    # Rolling loglikelihood over texts many windows long.
    texts = [" ".join(d["question"] for d in mmlu_docs(4, seed=s)) for s in range(3)]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ref_rolling = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=32).loglikelihood_rolling(rolling)
    our_rolling = BenchEngineLM(model=model, tokenizer=tokenizer, max_length=32).loglikelihood_rolling(rolling)
    assert _max_diff(ref_rolling, our_rolling) < tolerance.max_abs_loglik

    # Greedy generation from prompts that share few-shot examples.
    prompts = [_shots() + d["question"] + "\nAnswer:" for d in mmlu_docs(4, seed=9)]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    ref_text = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).generate_until(gen)
    generator = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4)
    assert generator.generate_until(gen) == ref_text
    if generator._split.sliding_window is None:
        assert generator.stats.generate_prefixes >= 1  # (windowed models never share: a window counts cache slots)


def test_composite_gemma3_reads_its_decoder_config() -> None:
    tokenizer = make_tokenizer(add_bos=True)
    model = make_model("gemma3-composite", len(tokenizer))
    assert getattr(model.config, "layer_types", None) is None  # the top-level config has no layer types...
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    assert engine._split.sliding_window == WINDOW  # ...the engine reads them from the text config
    assert engine._split.layer_kinds == {"sliding_attention", "full_attention"}


class _DecoderIgnoringMasks(transformers.LlamaModel):
    """A decoder as remote code may be: it drops explicit positions and custom 4D masks."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=None, **kwargs)


class _IgnoresPositions(transformers.LlamaForCausalLM):
    def __init__(self, config: transformers.LlamaConfig) -> None:
        super().__init__(config)
        self.model = _DecoderIgnoringMasks(config)


class _RemoteStyleMistral(transformers.MistralForCausalLM):
    """Remote code that does what transformers' models do: passes the construction check."""


@pytest.mark.parametrize("cls", [_IgnoresPositions, _RemoteStyleMistral])
def test_remote_code_is_checked_on_the_engines_path(cls: type) -> None:
    assert not cls.__module__.startswith("transformers.")  # treated as remote code: the long probe
    tokenizer = make_tokenizer()
    base = make_model("llama" if cls is _IgnoresPositions else "mistral", len(tokenizer))
    model = cls(base.config).eval()
    model.load_state_dict(base.state_dict())
    if cls is _IgnoresPositions:
        with pytest.raises(UnsupportedModelError, match="engine: hf"):
            BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
    else:
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
        assert engine.path_check["prefix_tokens"] > WINDOW and engine.path_check["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16), ("gemma3", torch.bfloat16), ("mistral", torch.float16)])
def test_half_precision_matches_hflm_within_the_stated_tolerance(arch: str, dtype: torch.dtype) -> None:
    """In bf16 lm-eval's hf model log-softmaxes and sums in bf16 while the engine does so in fp32,
    and different batch shapes round differently: the two agree within the bf16 tolerance the
    runtime certificate uses, and on the chosen answer wherever hf's margin is beyond it."""
    tokenizer = make_tokenizer(add_bos=arch in BOS_FIRST)
    model = make_model(arch, len(tokenizer), dtype=dtype)
    tolerance = TOLERANCE[str(dtype).removeprefix("torch.")]
    requests = _few_shot_requests()
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, dtype=dtype).loglikelihood(requests)
    ours = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=128).loglikelihood(requests)
    for ref, got in zip(reference, ours, strict=True):
        assert abs(ref[0] - got[0]) <= tolerance.bound(ref[0]), (ref, got)
    # The chosen letter per document agrees unless hf's own top two are within the tolerance.
    for doc in range(len(requests) // 6):
        letters = slice(doc * 6, doc * 6 + 4)
        ref_scores = [r[0] for r in reference[letters]]
        our_scores = [o[0] for o in ours[letters]]
        top, second = sorted(ref_scores, reverse=True)[:2]
        if top - second > 2 * tolerance.bound(top):
            assert max(range(4), key=ref_scores.__getitem__) == max(range(4), key=our_scores.__getitem__)
