"""The decoding settings of a generate_until request, as `transformers.generate` would use them
under lm-eval's `hf` model: the model's generation config with lm-eval's kwargs merged over it.

Every field `generate` applies to a decoder-only model is either applied by the engine or
refused before generation starts (GenerationSettingError names the field, its value and the
fix), never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import transformers

from benchharness.engine.generation import DecodeSettings

# Applied by the engine exactly as transformers' logits processors and warpers do.
APPLIED = {
    "seed", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens", "no_repeat_ngram_size",
    "suppress_tokens", "begin_suppress_tokens", "max_new_tokens", "eos_token_id",
}
# Fields that change nothing here: ids and bookkeeping, caching and compilation choices, outputs
# lm-eval does not read, `max_length` (lm-eval passes its own), and transforms that leave greedy
# choices and sampling distributions as they are (NaN removal, renormalization).
NO_EFFECT = {
    "_from_model_config", "transformers_version", "pad_token_id", "bos_token_id", "decoder_start_token_id", "max_length",
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "prefill_chunk_size", "continuous_batching_config", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate", "remove_invalid_values", "renormalize_logits", "low_memory",
    "is_assistant", "assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_ensemble_weight", "max_matching_ngram_size",
    "prompt_lookup_num_tokens", "speculation_type",
    # Beam-search settings: only used with num_beams > 1, which is refused.
    "length_penalty", "early_stopping",
}
# Warpers transformers applies only when sampling.
SAMPLING_ONLY = {"min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"}


class GenerationSettingError(ValueError):
    """A generation setting `hf` would apply that the engine does not; use `engine: hf`."""


def merged_generation_config(model_config: transformers.GenerationConfig | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's generation config updated with lm-eval's kwargs, as `generate` merges them."""
    merged = dict(model_config.to_dict()) if model_config is not None else {}
    merged.update({k: v for k, v in kwargs.items() if k not in ("until", "max_gen_toks")})
    return merged


def check_supported(merged: Mapping[str, Any], model_name: str) -> None:
    defaults = transformers.GenerationConfig().to_dict()
    sampling = bool(merged.get("do_sample"))
    refused = []
    for name, value in sorted(merged.items()):
        if name in APPLIED or name in NO_EFFECT or (name in SAMPLING_ONLY and not sampling):
            continue
        if value == defaults.get(name) or (name == "guidance_scale" and value in (None, 1, 1.0)):
            continue
        if name in ("encoder_repetition_penalty",) and value in (None, 1.0):
            continue
        if name in ("num_beams", "num_beam_groups", "num_return_sequences") and value in (None, 1):
            continue
        refused.append(f"{name}={value!r}")
    if refused:
        raise GenerationSettingError(
            f"{model_name}: its generation config (with the task's settings) sets {', '.join(refused)}, which "
            "transformers.generate applies and the benchharness engine does not. Fix: run this model with "
            "`engine: hf`, or clear these fields from its generation_config.json."
        )


def decode_settings(
    merged: Mapping[str, Any], max_gen_toks: int, stop_strings: tuple[str, ...], eos_token_ids: frozenset[int],
    seed: int, model_name: str,
) -> DecodeSettings:
    check_supported(merged, model_name)
    # lm-eval sets do_sample=False for temperature 0; with a positive temperature and no do_sample
    # of its own, the model's config decides, as in generate.
    do_sample = bool(merged.get("do_sample"))
    temperature = merged.get("temperature")
    top_k, top_p = merged.get("top_k"), merged.get("top_p")
    # A config max_new_tokens wins over the max_length lm-eval passes (transformers' precedence).
    max_new = merged.get("max_new_tokens") or max_gen_toks
    return DecodeSettings(
        max_new_tokens=int(max_new),
        stop_strings=stop_strings,
        eos_token_ids=eos_token_ids,
        do_sample=do_sample,
        temperature=float(temperature) if temperature else 1.0,
        top_k=int(top_k) if top_k else None,
        top_p=float(top_p) if top_p is not None else None,
        repetition_penalty=float(merged.get("repetition_penalty") or 1.0),
        min_new_tokens=int(merged.get("min_new_tokens") or 0),
        no_repeat_ngram_size=int(merged.get("no_repeat_ngram_size") or 0),
        suppress_tokens=tuple(int(t) for t in merged.get("suppress_tokens") or ()),
        begin_suppress_tokens=tuple(int(t) for t in merged.get("begin_suppress_tokens") or ()),
        seed=int(seed),
    )
