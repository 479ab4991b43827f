"""SDPA attention for grouped-query models without a copy of the keys and values per query head.

transformers' SDPA path (`integrations/sdpa_attention.py`) repeats each key/value head once per
query head of its group (`repeat_kv`) whenever more than one query token runs with a mask: a
copy of the layer's whole cache (7 copies on Qwen2.5-0.5B: 14 query heads, 2 key/value heads),
written in every layer of every prefill chunk, scoring pass and draft step. torch's CPU SDPA
kernel takes the grouped heads as they are (`enable_gqa=True`) and computes, bit for bit, what
it computes on the repeated ones (tests/test_engine_attention.py checks). With Qwen2.5-0.5B's
heads, the attention of an 8-row draft step (3 tokens a row, 450 cache slots) takes about 1 ms a
layer this way against 2.2-12 ms with the copies (`benchmarks/gqa_attention.py`, alone: the
copies' cost depends on how the allocator reuses their memory); inside the model the whole
step went from 220 to 173 ms.

`grouped_sdpa` is swapped in for transformers' "sdpa" entry by `CpuKernels.applied()` for the
length of one engine call (the attention registry's own per-instance override, removed
afterwards). It hands every other case to transformers' own function: one query token
(transformers already folds the group into the query there), no grouped heads, tensors off
the CPU, and the options this path does not reproduce (position biases, paged caches, softcaps).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

def _takes_grouped_heads(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    return (
        getattr(module, "num_key_value_groups", 1) > 1
        and query.shape[2] > 1
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
        and kwargs.get("cache") is None
        and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False)
    )


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with grouped key/value heads passed to torch as they are."""
    if not _takes_grouped_heads(module, query, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # As `sdpa_attention_forward` decides it, for more than one query token.
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = attention_mask is None and bool(is_causal)
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


@contextmanager
def grouped_attention() -> Iterator[bool]:
    """For the length of the block, the "sdpa" attention of every transformers model is `grouped_sdpa`
    (yields True), unless someone replaced transformers' own function already (yields False: left as is)."""
    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward:
        yield False
        return
    ALL_ATTENTION_FUNCTIONS["sdpa"] = grouped_sdpa  # the instance's local override
    try:
        yield True
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
