"""Every generation-config field that transformers.generate applies under lm-eval's hf model is
applied by the engine with the same outputs, or refused before generation with a clear error;
and the experiment's seed reaches the engine."""

from __future__ import annotations

import collections

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_engine_support import make_model, make_tokenizer, mmlu_docs, one_torch_thread  # noqa: F401  (a fixture)

from benchharness.engine import BenchEngineLM
from benchharness.engine.decode_settings import GenerationSettingError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_NEW = 14
GREEDY = {"until": ["\n\n"], "do_sample": False, "max_gen_toks": MAX_NEW}


def _requests(gen_kwargs: dict, n: int = 5) -> list[Instance]:
    docs = mmlu_docs(n, seed=3)
    prompts = [d["question"] * (1 + i % 2) + "\nAnswer:" for i, d in enumerate(docs)]
    return [Instance("generate_until", {}, (p, dict(gen_kwargs)), i) for i, p in enumerate(prompts)]


def _generated_ids(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1]:].tolist()


def _setting(field: str, model, tokenizer) -> object:
    """A value of `field` that changes this model's greedy outputs."""
    first = _generated_ids(model, tokenizer, _requests(GREEDY)[0].args[0])
    common = [t for t, _ in collections.Counter(first).most_common(2)]
    return {
        "no_repeat_ngram_size": 3,
        "suppress_tokens": common,
        "begin_suppress_tokens": [first[0]],
        "repetition_penalty": 1.3,
        "max_new_tokens": 5,
        "min_new_tokens": 8,
    }[field]


@pytest.mark.parametrize("field", ["no_repeat_ngram_size", "suppress_tokens", "begin_suppress_tokens", "repetition_penalty",
                                   "max_new_tokens", "min_new_tokens"])
def test_applied_settings_give_hflms_outputs(field: str) -> None:
    tokenizer = make_tokenizer()
    # Gemma 3's tiny model repeats itself (n-grams to forbid); the Llama one does not.
    model = make_model("gemma3" if field == "no_repeat_ngram_size" else "llama", len(tokenizer), seed=0 if field == "no_repeat_ngram_size" else 1)
    if field == "min_new_tokens":
        # EOS is the model's second greedy token, so without min_new_tokens the first sequence ends at
        # once (the tokenizer's own EOS stays one: where the two differ, hf's batched rows run on past
        # the tokenizer's EOS text until the whole batch stops, an artifact of lm-eval's batch-level stop).
        second = _generated_ids(model, tokenizer, _requests(GREEDY)[0].args[0])[1]
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, second]
    value = _setting(field, model, tokenizer)
    requests = _requests(GREEDY)
    baseline = BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests)
    setattr(model.generation_config, field, value)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(requests)
    batched = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)
    ours = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size="auto").generate_until(requests)
    assert ours == reference == batched
    assert ours != baseline  # the setting matters for this model: the test would see it ignored


@pytest.mark.parametrize("field,value", [
    ("min_length", 30), ("bad_words_ids", [[5]]), ("sequence_bias", {(5,): -10.0}), ("num_beams", 2),
    ("forced_eos_token_id", 1), ("exponential_decay_length_penalty", (2, 1.5)), ("encoder_repetition_penalty", 1.2),
    ("guidance_scale", 1.5), ("stop_strings", ["cat"]), ("penalty_alpha", 0.6), ("forced_bos_token_id", 5),
    ("diversity_penalty", 0.5), ("max_time", 5.0),
])
def test_settings_the_engine_does_not_apply_are_refused(field: str, value: object) -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=1)
    setattr(model.generation_config, field, value)
    with pytest.raises(GenerationSettingError, match=f"{field}=.*engine: hf"):
        BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(_requests(GREEDY, n=2))


def test_sampling_only_warpers_are_refused_when_sampling_and_ignored_when_greedy() -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=1)
    warpers = {"typical_p": 0.5, "min_p": 0.1, "epsilon_cutoff": 3e-4, "eta_cutoff": 3e-4, "top_p": 0.5, "temperature": 0.3}
    for name, value in warpers.items():
        setattr(model.generation_config, name, value)
    requests = _requests(GREEDY, n=2)
    assert BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests) == HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=1).generate_until(requests)
    sampled = _requests({"until": [], "do_sample": True, "temperature": 2.0, "max_gen_toks": 4}, n=2)
    with pytest.raises(GenerationSettingError, match="epsilon_cutoff=0.0003, eta_cutoff=0.0003, min_p=0.1, typical_p=0.5"):
        BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(sampled)


def test_settings_without_effect_here_give_hflms_outputs() -> None:
    """Fields generate reads that change nothing for lm-eval's decoder-only greedy requests: beam-only
    settings, renormalization (greedy choices and sampling distributions stay), the config max_length
    (lm-eval passes its own), NaN removal."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=1)
    requests = _requests(GREEDY, n=3)
    baseline = BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests)
    for name, value in {"length_penalty": 2.0, "early_stopping": True, "renormalize_logits": True, "max_length": 7,
                        "remove_invalid_values": True}.items():
        setattr(model.generation_config, name, value)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).generate_until(requests)
    assert BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(requests) == reference == baseline


def test_model_config_sampling_defaults_apply_when_the_task_samples() -> None:
    """A task that samples without its own top_k gets the model's (as generate merges them)."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=1)
    sampled = _requests({"until": [], "do_sample": True, "temperature": 2.0, "max_gen_toks": 8})
    free = BenchEngineLM(model=model, tokenizer=tokenizer, seed=5).generate_until(sampled)
    model.generation_config.top_k = 1  # top-1 sampling is greedy
    top1 = BenchEngineLM(model=model, tokenizer=tokenizer, seed=5).generate_until(sampled)
    greedy = BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(
        _requests({"until": [], "do_sample": False, "max_gen_toks": 8}))
    assert top1 == greedy != free


def test_the_experiments_seed_reaches_the_engine(tmp_path) -> None:
    from benchharness.config.experiment import Experiment, InferenceSpec
    from benchharness.run.runner import make_lm

    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    sampled = _requests({"until": [], "do_sample": True, "temperature": 3.0, "max_gen_toks": 8})
    outputs = {}
    for seed in (11, 11, 12):
        experiment = Experiment.model_construct(engine="benchharness", seed=seed, inference=InferenceSpec(dtype="float32", device="cpu"))
        lm = make_lm(experiment, model, tokenizer, "cpu")
        assert lm.seed == seed
        outputs.setdefault(seed, []).append(lm.generate_until(sampled))
    assert outputs[11][0] == outputs[11][1] != outputs[12][0]


def test_a_tasks_max_length_is_refused() -> None:
    """lm-eval's hf model hands a task's `max_length` to generate as prompt + output length of its
    padded batch, so its outputs would depend on batching: refused, naming max_gen_toks instead."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=1)
    with pytest.raises(GenerationSettingError, match="max_length=40.*max_gen_toks"):
        BenchEngineLM(model=model, tokenizer=tokenizer).generate_until(_requests(GREEDY | {"max_length": 40}, n=2))
