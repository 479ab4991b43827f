"""Cascade attention: rows that share a prefix attend to one copy of its keys and values.

Few-shot generation (GSM8K's 8-shot chain of thought: an 800-token prefix before each
question) keeps a copy of the shared prefix in every running row's cache: each join writes
it once more per row, and each decode step's attention reads it once per row, in every
layer. Qwen2.5-Coder-0.5B on 128 such items spent 44 s of 254 in attention and 15 s in
copies (the row joins alone 9.7 s).

Here a row's cache holds only its own tokens (the rest of its prompt, then its output) and
the prefix's keys and values stay as the prefix run left them, once. A layer's attention runs
in two parts, each with its log-sum-exp: the rows' queries over their own cache (masked as
before), and all the group's queries together over the prefix (one product that reads it
once; in a sliding-window layer each query sees the prefix tokens within its window). The two
softmax-weighted sums merge by their log-sum-exps, which is the attention over prefix and rest
together: the same value up to float rounding, as FlashAttention's split-key sums and vLLM's
cascade attention compute it.

`SharedPrefixes` is handed to the model's forward as a keyword argument, which transformers
passes to every layer's attention function; the engine's attention functions
(attention.grouped_sdpa, row_grouped_sdpa) take it there, and each layer records that it did,
so a model whose attention never saw it fails loudly (`check_taken`) instead of attending to
its own tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from benchharness.engine.head import SplitModel

# The keyword the engine's attention functions find the prefixes under.
KWARG = "benchharness_shared_prefixes"
# Query rows a key/value head's folded block needs before `_flash` folds the heads of a group.
FOLD_MIN_QUERIES = 4


@dataclass
class PrefixGroup:
    """One shared prefix (keys and values per layer, [1, key/value heads, length, head dim]) and the
    batch rows that follow it (None: every row)."""

    layers: Sequence[tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor | None

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[-2])


@dataclass
class SharedPrefixes:
    """The prefixes of one forward's rows, and each query token's position (a sliding layer's
    window reaches back into the prefix by position)."""

    groups: list[PrefixGroup]
    positions: torch.Tensor  # [rows, query tokens]
    taken: set[int] = field(default_factory=set)  # layer indices whose attention took the prefixes

    def check_taken(self) -> None:
        """Raise unless every layer (of the prefixes' layers) took the prefixes."""
        missing = sorted(set(range(len(self.groups[0].layers))) - self.taken)
        if missing:
            raise RuntimeError(
                f"layers {missing} attended without their rows' shared prefix (their attention did not take the "
                f"{KWARG!r} argument): the engine's cascade attention cannot run this model"
            )


def cascade_reason(split: SplitModel) -> str:
    """'' if the engine can run `split`'s rows against a shared prefix held once; else why not."""
    config = split.text_config
    if not split.skips_padding:
        return "the engine's CPU attention is off, or the model's attention is not 'sdpa'"
    if split.device.type != "cpu":
        return f"the log-sum-exp attention kernel used here is torch's CPU one (device {split.device.type})"
    other = split.layer_kinds - {"full_attention", "sliding_attention"}
    if other:
        return f"layer types {sorted(other)}"
    for name in ("attn_logit_softcapping", "num_kv_shared_layers"):
        if getattr(config, name, None):
            return f"{name}={getattr(config, name)}"
    return ""


def folds_by_default(group: int, queries: int) -> bool:
    """Whether `_flash` folds the `group` query heads of a key/value head, `queries` query tokens
    each, into one block (where the mask and the causal flag allow it)."""
    return group > 1 and group * queries >= FOLD_MIN_QUERIES


def _flash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    causal: bool = False,
    fold: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention (what SDPA runs on the CPU), with grouped key/value heads as
    they are: ([rows, heads, queries, dim], log-sum-exp [rows, heads, queries]). `mask`: additive,
    one for all heads ([rows, 1, queries, keys]) or None.

    The query heads of a key/value head run as one head of `group x queries` query rows: the
    kernel then reads each key/value block once per key/value head, not once per query head, and
    a decode step's one query token a row becomes a block of rows (its products a small matrix
    product, not a vector one). Only where that block has `FOLD_MIN_QUERIES` rows or more (below,
    the matrix products ran slower than the vector ones: benchmarks/folded_attention.py), and not
    where the kernel applies a causal rule by query index. `fold`: True or False to fold or not
    wherever folding can apply (benchmarks/folded_attention.py times both ways)."""
    rows, heads, tokens, dim = query.shape
    kv_heads = int(key.shape[1])
    group = heads // kv_heads
    if fold is None:
        fold = folds_by_default(group, tokens)
    if not fold or causal or group == 1 or (mask is not None and mask.shape[1] != 1):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
    # Head h is key/value head h // group (transformers' repeat_kv): heads are [kv head, group] in order.
    folded = query.reshape(rows, kv_heads, group * tokens, dim)
    if mask is not None and tokens > 1:
        mask = mask.expand(mask.shape[0], group, tokens, mask.shape[-1]).reshape(mask.shape[0], 1, group * tokens, mask.shape[-1])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(folded, key, value, 0.0, False, attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, tokens, dim), lse.reshape(rows, heads, tokens)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: seen) as the additive one the flash kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float | None, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' attention over their own cache and its log-sum-exp. A query that sees no slot (left
    padding) gets zeros and log-sum-exp 0 from the kernel; its output is never used."""
    return _flash(query, key, value, None if mask is None else additive(mask, query.dtype), scaling, causal)


def merge_prefixes(
    module: torch.nn.Module,
    query: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prefixes: SharedPrefixes,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """`out` ([rows, heads, queries, dim], the attention over the rows' own slots, log-sum-exp `lse`)
    merged with each group's attention over its prefix: the attention over both."""
    layer = int(module.layer_idx)
    prefixes.taken.add(layer)
    for group in prefixes.groups:
        keys, values = group.layers[layer]
        mine = query if group.rows is None else query.index_select(0, group.rows)
        rows, heads, tokens, dim = mine.shape
        # Every row of the group in one product: the prefix is read once.
        folded = mine.transpose(0, 1).reshape(1, heads, rows * tokens, dim)
        mask, seen = None, None
        if sliding_window is not None:
            positions = prefixes.positions if group.rows is None else prefixes.positions.index_select(0, group.rows)
            positions = positions.reshape(rows * tokens, 1)
            # As transformers' sliding masks: a query at q sees keys at k > q - window.
            visible = torch.arange(group.length, device=positions.device)[None, :] > positions - sliding_window
            mask = additive(visible[None, None], query.dtype)
            seen = visible.any(dim=-1).reshape(1, 1, rows * tokens)
        prefix_out, prefix_lse = _flash(folded, keys, values, mask, scaling)
        if seen is not None:  # a query whose window ends after the prefix takes nothing from it
            prefix_lse = prefix_lse.masked_fill(~seen, float("-inf"))
        prefix_out = prefix_out.reshape(heads, rows, tokens, dim).transpose(0, 1)
        prefix_lse = prefix_lse.reshape(heads, rows, tokens).transpose(0, 1)
        own_out = out if group.rows is None else out.index_select(0, group.rows)
        own_lse = lse if group.rows is None else lse.index_select(0, group.rows)
        both = torch.logaddexp(own_lse, prefix_lse)
        merged = own_out * torch.exp(own_lse - both)[..., None] + prefix_out * torch.exp(prefix_lse - both)[..., None]
        out = merged if group.rows is None else out.index_copy(0, group.rows, merged)
    return out


def group_rows(prefixes: Sequence[Any], positions: torch.Tensor) -> SharedPrefixes | None:
    """The prefix groups of a batch whose row b follows `prefixes[b]` (an object with `.layers`, the
    same object for rows that share it; None: no prefix); None where no row has one."""
    members: dict[int, tuple[Any, list[int]]] = {}
    for row, prefix in enumerate(prefixes):
        if prefix is not None:
            members.setdefault(id(prefix), (prefix, []))[1].append(row)
    if not members:
        return None
    groups = []
    for prefix, rows in members.values():
        index = None if len(rows) == len(prefixes) else torch.tensor(rows, dtype=torch.long, device=positions.device)
        groups.append(PrefixGroup(prefix.layers, index))
    return SharedPrefixes(groups, positions)
