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
from test_engine_support import (  # noqa: F401  (one_torch_thread: a fixture)
    ARCHITECTURES,
    TEST_DEVICE,
    WINDOW,
    hflm_generated_ids,
    make_config,
    make_model,
    make_tokenizer,
    mmlu_docs,
    one_torch_thread,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from benchharness.engine import BenchEngineLM
from benchharness.engine.head import UnsupportedModelError, sliding_window
from benchharness.engine.parity import GENERATION_TIE, TOLERANCE, choice_gap, generations_agree

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]

# Every catalog entry -> the transformers class its checkpoint loads as (AutoModelForCausalLM; the
# GGUF packs as converted). A catalog entry missing here, or a class no test model has, fails
# test_every_catalog_entry_is_covered: a new entry needs its architecture tested first.
_LLAMA, _QWEN2, _MISTRAL, _PHI3 = "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM"
CATALOG_CLASSES = {
    "qwen2.5-coder-0.5b-instruct-q4km": _QWEN2, "gemma-3-270m-q4km": "Gemma3ForCausalLM", "smollm2-135m-instruct-q41": _LLAMA,
    "qwen2.5-0.5b-instruct": _QWEN2, "qwen2.5-1.5b-instruct": _QWEN2, "qwen2.5-3b-instruct": _QWEN2,
    "qwen2.5-7b-instruct": _QWEN2, "qwen2.5-14b-instruct": _QWEN2,
    "qwen3-0.6b": "Qwen3ForCausalLM", "qwen3-1.7b": "Qwen3ForCausalLM", "qwen3-4b": "Qwen3ForCausalLM",
    "qwen3-8b": "Qwen3ForCausalLM", "qwen3-14b": "Qwen3ForCausalLM",
    "deepseek-r1-distill-qwen-1.5b": _QWEN2, "deepseek-r1-distill-qwen-7b": _QWEN2, "deepseek-r1-distill-qwen-14b": _QWEN2,
    "glm-4-9b-chat": "GlmForCausalLM",  # THUDM/glm-4-9b-chat-hf
    "glm-4-9b-0414": "Glm4ForCausalLM",
    "yi-1.5-6b-chat": _LLAMA, "yi-1.5-9b-chat": _LLAMA,
    "llama-3.2-1b-instruct": _LLAMA, "llama-3.2-3b-instruct": _LLAMA, "llama-3.1-8b-instruct": _LLAMA,
    "gemma-2-2b-it": "Gemma2ForCausalLM", "gemma-2-9b-it": "Gemma2ForCausalLM",
    "gemma-3-270m": "Gemma3ForCausalLM", "gemma-3-1b-it": "Gemma3ForCausalLM",
    "gemma-3-4b-it": "Gemma3ForConditionalGeneration",  # composite Gemma3Config: decoder in text_config
    "phi-3-mini-4k-instruct": _PHI3, "phi-3.5-mini-instruct": _PHI3, "phi-4-mini-instruct": _PHI3, "phi-4": _PHI3,
    "olmo-2-1b-instruct": "Olmo2ForCausalLM", "olmo-2-7b-instruct": "Olmo2ForCausalLM",
    "mistral-7b-instruct-v0.3": _MISTRAL, "mistral-small-24b-instruct-2501": _MISTRAL,
    "ministral-8b-instruct-2410": _MISTRAL,  # as the hub ships it; transformers' own Ministral class is tested too
    "eurollm-1.7b-instruct": _LLAMA, "eurollm-9b-instruct": _LLAMA,
    "salamandra-2b-instruct": _LLAMA, "salamandra-7b-instruct": _LLAMA,
    "smollm2-135m-instruct": _LLAMA, "smollm2-360m-instruct": _LLAMA, "smollm2-1.7b-instruct": _LLAMA,
}
# Classes whose checkpoints in the catalog slide a window (or can: use_sliding_window): their test
# model must have one, shorter than the test prompts.
WINDOWED_CLASSES = {_QWEN2, "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
                    _PHI3, _MISTRAL}
# Entries whose code comes from the hub (trust_remote_code: InternLM2/3, MiniCPM4, Teuken): their
# code cannot be fetched here; the construction check (engine/path_check.py) runs the engine's own
# path against their forward at load time and refuses them when the two differ.
REMOTE_CODE_ENTRIES = {"internlm3-8b-instruct", "internlm2.5-7b-chat", "minicpm4-0.5b", "minicpm4-8b", "teuken-7b-instruct"}
BOS_FIRST = {"gemma2", "gemma3", "gemma3-composite"}  # tokenizers that add BOS, as Gemma's do


def _class_name(arch: str) -> str:
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(make_config(arch, 64))].__name__


def test_every_catalog_entry_is_covered() -> None:
    catalog = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())["models"]
    native = {m["name"] for m in catalog if not m.get("trust_remote_code")}
    assert native ^ set(CATALOG_CLASSES) == set(), "catalog entries and CATALOG_CLASSES differ: map each entry to its class"
    assert {m["name"] for m in catalog if m.get("trust_remote_code")} == REMOTE_CODE_ENTRIES
    tested = {_class_name(arch) for arch in ARCHITECTURES}
    assert set(CATALOG_CLASSES.values()) - tested == set(), "a catalog class with no test model in ARCHITECTURES"
    assert tested - set(CATALOG_CLASSES.values()) == {"MinistralForCausalLM"}  # no test without a catalog reason
    windowed = {_class_name(arch) for arch in ARCHITECTURES if sliding_window(make_config(arch, 64).get_text_config())}
    assert WINDOWED_CLASSES - windowed == set(), "a windowed catalog class whose test model has no window"


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


class _CarelessDecoder(transformers.LlamaModel):
    """A decoder as remote code may be: it drops what `drops` names (custom 4D masks, explicit
    positions, the cache it is given)."""

    drops: frozenset[str] = frozenset()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if "masks" in self.drops and attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = None
        if "positions" in self.drops:
            position_ids = None
        if "cache" in self.drops and past_key_values is not None:
            past_key_values = transformers.DynamicCache()
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, **kwargs)


def _careless_model(drops: frozenset[str], base: transformers.LlamaForCausalLM) -> transformers.LlamaForCausalLM:
    decoder = type("Decoder", (_CarelessDecoder,), {"drops": drops})

    class CarelessLlama(transformers.LlamaForCausalLM):
        def __init__(self, config: transformers.LlamaConfig) -> None:
            super().__init__(config)
            self.model = decoder(config)

    model = CarelessLlama(base.config).eval()
    model.load_state_dict(base.state_dict())
    return model.to(base.device)


@pytest.mark.parametrize("drops,dtype", [({"masks"}, torch.float32), ({"positions"}, torch.float32), ({"cache"}, torch.float32),
                                         ({"masks", "positions"}, torch.float32), ({"masks"}, torch.bfloat16), ({"positions"}, torch.bfloat16)])
def test_a_model_that_ignores_the_engines_inputs_is_refused(drops: set[str], dtype: torch.dtype) -> None:
    tokenizer = make_tokenizer()
    model = _careless_model(frozenset(drops), make_model("llama", len(tokenizer))).to(dtype)
    assert not type(model).__module__.startswith("transformers.")  # treated as remote code: the long probe
    # Its plain forward is still the model's: only the engine's path differs.
    ids = torch.tensor([tokenizer("the cat sells eggs")["input_ids"]], device=model.device)
    assert torch.allclose(model(input_ids=ids).logits, make_model("llama", len(tokenizer), dtype=dtype)(input_ids=ids).logits)
    with pytest.raises(UnsupportedModelError, match="engine's path .*Use `engine: hf`"):
        BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")


class _RemoteStyleMistral(transformers.MistralForCausalLM):
    """Remote code that does what transformers' models do: passes the construction check."""


def test_remote_code_that_takes_the_engines_inputs_passes_the_long_check() -> None:
    tokenizer = make_tokenizer()
    base = make_model("mistral", len(tokenizer))
    model = _RemoteStyleMistral(base.config).eval()
    model.load_state_dict(base.state_dict())
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


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16), ("mistral", torch.bfloat16),
                                        ("gemma3", torch.bfloat16), ("qwen2", torch.float16)])
def test_half_precision_greedy_generation_follows_the_stated_rule(arch: str, dtype: torch.dtype) -> None:
    """In bf16/fp16 the engine's and hf's batches round differently, so greedy outputs may part at a
    near-tie (engine/parity.py GENERATION_TIE). A peaked model gives identical outputs; a flat one (small
    init: near-ties) may part, but only at a near-tie; a choice far from a tie breaks the rule."""
    tokenizer = make_tokenizer(add_bos=arch in BOS_FIRST)
    name = str(dtype).removeprefix("torch.")
    prompts = [_shots() + d["question"] + "\nAnswer:" for d in mmlu_docs(10, seed=9)]
    requests = [Instance("generate_until", {}, (p, {"until": [], "do_sample": False, "max_gen_toks": 12}), i) for i, p in enumerate(prompts)]
    for init in (0.2, 0.06):
        model = make_model(arch, len(tokenizer), dtype=dtype, initializer_range=init)
        theirs = hflm_generated_ids(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), requests, {tokenizer.eos_token_id})
        # Without prompt-lookup drafts, and with them: a draft is checked in a wider forward, whose
        # half-precision rounding differs again, so drafted outputs are held to the tie rule only.
        engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4, prompt_lookup_tokens=0)
        ours = engine.generate_token_ids(requests)
        drafted = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4, lookup_step_tokens=1000)
        for outputs in (ours, drafted.generate_token_ids(requests)):
            assert all(len(o) > 0 for o in outputs)
            for request, a, b in zip(requests, outputs, theirs, strict=True):
                prompt = engine._encode_prompt(request.args[0], engine.max_length)
                assert generations_agree(model, prompt, a, b, name), (init, choice_gap(model, prompt, a, b))
        if init == 0.2 and TEST_DEVICE.type == "cpu":
            # On a CPU a peaked model's outputs are identical; on an H200 (cuBLAS bf16 products) one
            # of the ten parted, for Llama and for Qwen2, at a near-tie the rule above allows. Gemma 3's
            # few-shot prefix (longer than its window of 6) runs once and the rests after it, in other
            # shapes than hf's prompts: in bf16 one of the ten parts there, at such a near-tie; run
            # whole, its prompts give hf's outputs.
            whole = ours
            if arch == "gemma3":
                unshared = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4, prompt_lookup_tokens=0, share_prefixes=False)
                whole = unshared.generate_token_ids(requests)
            assert whole == theirs
    # Not vacuous: the least likely first token instead of hf's is no near-tie.
    prompt = engine._encode_prompt(requests[0].args[0], engine.max_length)
    with torch.inference_mode():
        unlikely = int(model(input_ids=torch.tensor([prompt], device=model.device)).logits[0, -1].argmin())
    assert not generations_agree(model, prompt, [unlikely], theirs[0], name)
    assert GENERATION_TIE["float32"] == 0.0  # fp32: identical outputs (test_engine_matches_hflm)


def test_a_model_that_overflows_its_dtype_is_refused_as_such() -> None:
    """Gemma in float16 overflows (NaN scores): refused with that reason, not as a masking fault."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), dtype=torch.float16)
    with torch.no_grad():
        model.model.norm.weight.fill_(6e4)  # the final hidden states, times 6e4: logits beyond float16
    with pytest.raises(UnsupportedModelError, match="non-finite loglikelihoods in float16.*bfloat16 or float32"):
        BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto")
