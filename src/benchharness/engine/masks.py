"""Attention masks the engine builds itself, in the form the model's attention takes.

transformers builds a decoder's masks from a 2-D padding mask, and measures a sliding window
in cache slots. That is the window in tokens only while each row's tokens fill its slots
without gaps. Where they do not (a rejected prompt-lookup draft leaves masked slots between
a row's tokens; left padding sits between a shared prefix and a prompt's rest), the engine
builds the 4-D masks itself from each slot's token position (`token_masks`), as
`scoring.build_attention_masks` does for packed token trees.
`model_masks` puts boolean masks in the form the model takes: one per layer type where the
decoder takes a dict, the additive float form for eager attention.
"""

from __future__ import annotations

import torch

from benchharness.engine.head import SplitModel, UnsupportedModelError

# The attention implementations that take a custom 4-D mask.
CUSTOM_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def takes_custom_masks(split: SplitModel) -> str:
    """'' if the model's attention takes the engine's own masks; else why not."""
    implementation = getattr(split.text_config, "_attn_implementation", "sdpa")
    if implementation not in CUSTOM_MASK_IMPLEMENTATIONS:
        return f"attention implementation {implementation!r} takes no custom 4D mask (sdpa or eager do)"
    other = split.layer_kinds - {"full_attention", "sliding_attention"}
    if other:
        return f"layer types {sorted(other)} have masks of their own"
    return ""


def windows_unmasked(split: SplitModel) -> str:
    """Why the engine cannot count the model's sliding windows in tokens with its own masks ('' if
    it can, or no layer slides): drafts and long shared prefixes then stay off for it."""
    return takes_custom_masks(split) if split.sliding_window is not None else ""


def model_masks(split: SplitModel, masks: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """`masks`: boolean [rows, queries, keys] per layer type ("full_attention", and
    "sliding_attention" where layers slide; True: the query sees the key). Returns the model's
    `attention_mask` argument: one 4-D mask, or a dict of them for a decoder with per-layer types."""
    why = takes_custom_masks(split)
    if why:
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: {why}; load the model with attn_implementation='sdpa' (or 'eager'), "
            "or use `engine: hf` for this model."
        )
    if not split.per_layer_masks:
        # One mask for every layer: the full one, or the windowed one where all layers slide.
        masks = {"full_attention": masks["sliding_attention" if "sliding_attention" in split.layer_kinds else "full_attention"]}
    eager = getattr(split.text_config, "_attn_implementation", "sdpa") == "eager"
    converted: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        tensor = mask.to(split.device)[:, None, :, :]
        if eager:
            minimum = torch.finfo(split.dtype).min
            tensor = torch.zeros(tensor.shape, dtype=split.dtype, device=split.device).masked_fill(~tensor, minimum)
        converted[name] = tensor
    if len(converted) == 1:
        return converted["full_attention"]
    return converted


def token_masks(split: SplitModel, mask: torch.Tensor, queries: int, sliding_keys: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The masks of a forward (a decode step, a prefill chunk) whose `queries` tokens per row are the
    last columns of `mask` ([rows, slots]: 1 where a slot holds one of the row's tokens; a row's
    padding queries see its tokens up to the last one before them, never nothing). Each query sees the row's
    tokens at its own position or before; in sliding layers, only those less than the window
    back, counted in tokens (the masked slots between them do not count). `sliding_keys`: the
    slots a sliding layer's attention sees (the last ones: what it stores, and the step's)."""
    real = mask.bool()
    positions = mask.long().cumsum(-1) - 1  # a slot's token position in its row (masked slots: unused)
    query = positions[:, -queries:, None]
    key = positions[:, None, :]
    full = real[:, None, :] & (key <= query)
    masks = {"full_attention": full}
    window = split.sliding_window
    if window is not None:
        recent = full[:, :, -sliding_keys:] & (query - key[:, :, -sliding_keys:] < window)
        masks["sliding_attention"] = recent
    return model_masks(split, masks)
