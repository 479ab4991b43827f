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

A decode step's rows differ in width by hundreds of slots (a long prompt with many tokens
generated beside short newcomers), and every row's attention reads the widest row's slots, its
own left padding masked: on a HumanEval run of Qwen2.5-Coder-0.5B at 64 rows the rows' own
tokens fill 39% of the cache width. For decode steps (`forward_body(skip_padding=True)`),
`row_grouped_sdpa` attends runs of neighbouring rows of similar width in one call each, from
their own first visible slot (`row_groups`; the engine keeps rows widest first, so a few groups
cover the batch): that run read 48% of the slots it read before, the attention alone of such
steps takes 1.4-1.6x less time at 32-64 rows (`benchmarks/padded_attention.py`), and the run's
decode steps took 76-79 s against 81 (two runs each, alternating). The result is the
same attention up to float rounding (the kernel's sums run over other spans), which is why
prefills and scoring passes, left-padded batches of similar lengths, do not take it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from benchharness.engine import cascade

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


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """transformers' SDPA attention, with grouped key/value heads passed to torch as they are
    where `_takes_grouped_heads`; the output is [batch, query tokens, heads, head dim]."""
    if not _takes_grouped_heads(module, query, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )[0]
    is_causal, key, value = _causal_keys(module, query, key, value, attention_mask, is_causal)
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous()


def _causal_keys(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool | None
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Whether the kernel runs causal, and the keys and values it runs on, as `sdpa_attention_forward`
    decides them: causal where no mask is given and more than one query token runs."""
    q_length = query.shape[2]
    causal = q_length > 1 and attention_mask is None
    causal = causal and bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    return causal, key, value


def row_groups(first_visible: list[int], call_cost_slots: int) -> list[tuple[int, int, int]]:
    """Consecutive rows grouped so that each group's attention reads only the cache slots from its
    rows' first visible one on: `(first row, end row, first slot)` per group.

    `first_visible[b]`: the first slot row b's queries see (its left padding ends there);
    `call_cost_slots`: what one more attention call costs, in slots read by one row. A group
    takes the next row until the slots its rows read beyond their own (all from the group's
    first slot) would cost more than a call. Rows of similar width as neighbours (the engine
    keeps them widest first) make few groups; a single group reads from the batch's first
    visible slot."""
    groups: list[tuple[int, int, int]] = []
    start, first, waste = 0, first_visible[0], 0
    for row in range(1, len(first_visible)):
        mine = first_visible[row]
        widened = min(first, mine)
        more = waste + (row - start) * (first - widened) + (mine - widened)
        if more <= call_cost_slots:
            first, waste = widened, more
        else:
            groups.append((start, row, first))
            start, first, waste = row, mine, 0
    groups.append((start, len(first_visible), first))
    return groups


def call_cost_slots(kv_heads: int, head_dim: int) -> int:
    """What one more attention call costs, in slots of one row: about 40 us on the CPU against about
    0.09 us a slot for Qwen2.5-0.5B's 2 key/value heads of 64 dims (2 threads), taken a little
    lower, as a row group also reads fewer padded slots; benchmarks/padded_attention.py measures
    the grouping this gives."""
    return max(16, 32768 // (kv_heads * head_dim))


def first_visible(visible: torch.Tensor) -> list[int]:
    """Per row of a [rows, slots] mask (nonzero: seen), its first seen slot (0 if none): where the
    row's left padding ends."""
    return visible.to(torch.uint8).argmax(dim=1).tolist()


def slots_read(first_visible: list[int], slots: int, kv_heads: int, head_dim: int) -> int:
    """Cache slots the row groups of one decode step read, summed over its rows (`row_groups`, at
    the call cost of these heads)."""
    groups = row_groups(first_visible, call_cost_slots(kv_heads, head_dim))
    return sum((end - start) * (slots - first) for start, end, first in groups)


def _padded_rows(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> list[tuple[int, int, int]] | None:
    """The row groups (`row_groups`) of a masked, left-padded batch on the CPU; None where the
    whole batch in one call is what there is to do (nothing to skip, or a case not handled here)."""
    if (
        attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.dim() != 4
        or query.device.type != "cpu"
        or query.shape[0] < 2
        or attention_mask.shape[0] != query.shape[0]
        or attention_mask.shape[-1] != key.shape[2]
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
    ):
        return None
    visible = attention_mask.any(dim=2).any(dim=1)  # [rows, slots]: slots some query of the row sees
    groups = row_groups(first_visible(visible), call_cost_slots(int(key.shape[1]), int(key.shape[3])))
    if len(groups) == 1 and groups[0][2] == 0:
        return None
    return groups


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
    """transformers' SDPA attention with grouped key/value heads passed to torch as they are (and
    over the rows' shared prefixes too, where the engine passes them: cascade.py)."""
    prefixes = kwargs.pop(cascade.KWARG, None)
    if prefixes is not None:
        return _cascade(module, query, key, value, attention_mask, scaling, is_causal, kwargs, prefixes, skip_padding=False), None
    return _attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs), None


def row_grouped_sdpa(
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
    """`grouped_sdpa`, with the rows of a left-padded batch in groups that skip the padding
    (`row_groups`). The same attention up to float rounding: the kernel's sums run over other
    spans, so the engine uses it for decode steps only (`grouped_attention`), where it pays."""
    prefixes = kwargs.pop(cascade.KWARG, None)
    if prefixes is not None:
        return _cascade(module, query, key, value, attention_mask, scaling, is_causal, kwargs, prefixes, skip_padding=True), None
    groups = _padded_rows(query, key, attention_mask, kwargs)
    if groups is None:
        return _attend(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs), None
    assert attention_mask is not None
    parts = [
        _attend(
            module,
            query[start:end],
            key[start:end, :, first:],
            value[start:end, :, first:],
            attention_mask[start:end, :, :, first:],
            dropout,
            scaling,
            is_causal,
            kwargs,
        )
        for start, end, first in groups
    ]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), None


def _cascade(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
    prefixes: cascade.SharedPrefixes,
    skip_padding: bool,
) -> torch.Tensor:
    """The attention over the rows' own slots (in row groups that skip padding, with `skip_padding`)
    merged with their shared prefixes' (cascade.py); [batch, query tokens, heads, head dim]."""
    unsupported = [name for name in ("position_bias", "cache", "softcap", "s_aux") if kwargs.get(name) is not None]
    if kwargs.get("output_attentions"):
        unsupported.append("output_attentions")
    if query.device.type != "cpu" or unsupported or (attention_mask is not None and attention_mask.dtype != torch.bool):
        raise NotImplementedError(
            f"cascade attention takes boolean masks on the CPU without {unsupported or 'extra options'} "
            f"(device {query.device.type}, mask {None if attention_mask is None else attention_mask.dtype})"
        )
    causal, key, value = _causal_keys(module, query, key, value, attention_mask, is_causal)
    groups = _padded_rows(query, key, attention_mask, kwargs) if skip_padding else None
    if groups is None:
        out, lse = cascade.attend_with_lse(query, key, value, attention_mask, scaling, causal)
    else:
        assert attention_mask is not None
        parts = [
            cascade.attend_with_lse(query[s:e], key[s:e, :, f:], value[s:e, :, f:], attention_mask[s:e, :, :, f:], scaling, False)
            for s, e, f in groups
        ]
        out, lse = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    out = cascade.merge_prefixes(module, query, out, lse, prefixes, scaling, window)
    return out.transpose(1, 2).contiguous()


@contextmanager
def grouped_attention(skip_padding: bool = False) -> Iterator[bool]:
    """For the length of the block, the "sdpa" attention of every transformers model is `grouped_sdpa`
    (`row_grouped_sdpa` with `skip_padding`; yields True), unless someone replaced transformers' own
    function already (yields False: left as is). The engine skips padding in its decode steps only:
    their rows' widths differ by hundreds of slots, which prefills and scoring passes (left-padded
    batches of similar lengths) do not, and those keep their results bit for bit."""
    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward:
        yield False
        return
    ALL_ATTENTION_FUNCTIONS["sdpa"] = row_grouped_sdpa if skip_padding else grouped_sdpa  # the instance's local override
    try:
        yield True
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
