"""The KV cache of a continuously refilled batch: rows of different lengths in one
left-padded transformers `DynamicCache`, so the model's own attention and masks run as
in `transformers.generate`.

Each row's tokens sit contiguously at the right end of the cache (left padding only,
or padding between a shared prefix and the row's rest), so a sliding window measured
in cache slots is measured in tokens, as transformers measures it. Rows join by
concatenation on the batch axis after left-padding the shorter side; rows leave by
index selection; slots that every remaining row masks are dropped from the left.

Only transformers' dynamic layers (full and sliding-window) are handled; other cache
layer kinds (linear attention, sparse indexers) are refused by `check_layers` before
any refill, and such models decode in batches that are not refilled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

_HANDLED = (DynamicLayer, DynamicSlidingWindowLayer)


class UnsupportedCacheError(ValueError):
    """The model's cache has a layer kind whose rows cannot be joined or trimmed here."""


def new_cache(config: object) -> DynamicCache:
    """An empty cache with the model's own layer kinds (sliding-window layers where the config has them)."""
    return DynamicCache(config=config)


def check_layers(cache: DynamicCache) -> None:
    """Refuse layer kinds `join` and `trim` cannot handle (exact types: a subclass may keep more state)."""
    for layer in cache.layers:
        if type(layer) not in _HANDLED:
            raise UnsupportedCacheError(f"cache layer {type(layer).__name__} cannot take rows of another batch")


def cache_from_prefix(config: object, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """A cache of the model's layer kinds holding one prefix (keys/values [1, heads, length, dim]) for
    `batch` rows. The prefix must be shorter than any sliding window (the caller shares prefixes only then)."""
    cache = new_cache(config)
    check_layers(cache)
    if len(cache.layers) != len(layers):
        raise UnsupportedCacheError(f"the prefix has {len(layers)} layers, the model's cache {len(cache.layers)}")
    length = int(layers[0][0].shape[-2]) if layers else 0
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
        layer.lazy_initialization(keys, values)
        if isinstance(layer, DynamicSlidingWindowLayer):
            if length >= layer.sliding_window:
                raise UnsupportedCacheError("a shared prefix must be shorter than the sliding window")
            layer.cumulative_length = length
        layer.keys, layer.values = keys, values  # expanded, not copied: the first update copies
    return cache


def _width(layer: DynamicLayer, slots: int) -> int:
    """How many of `slots` cache slots the layer stores (a sliding layer keeps the last window - 1)."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(slots, layer.sliding_window - 1)
    return slots


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - int(tensor.shape[-2])
    if missing < 0:
        raise ValueError(f"a cache layer holds {tensor.shape[-2]} slots, more than the {width} it should")
    return F.pad(tensor, (0, 0, missing, 0)) if missing else tensor


def join(cache: DynamicCache, slots: int, other: DynamicCache, other_slots: int) -> int:
    """Append `other`'s rows to `cache` (in place); return the joined slot count.

    `slots` / `other_slots`: each cache's slot count (its attention mask's width). The shorter
    side is padded on the left; the caller pads its attention mask the same way."""
    check_layers(cache)
    check_layers(other)
    joined = max(slots, other_slots)
    for layer, incoming in zip(cache.layers, other.layers, strict=True):
        if not incoming.is_initialized and not layer.is_initialized:
            continue  # a layer that shares another's keys (KV sharing) stores nothing
        if not (incoming.is_initialized and layer.is_initialized):
            raise UnsupportedCacheError("one batch's cache layer is empty where the other's is not")
        width = _width(layer, joined)
        layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(incoming.keys, width)], dim=0)
        layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(incoming.values, width)], dim=0)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = joined
    return joined


def trim(cache: DynamicCache, slots: int, drop: int) -> int:
    """Drop the first `drop` slots (masked for every row) from `cache`; return the new slot count."""
    if drop <= 0:
        return slots
    kept = slots - drop
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        width = _width(layer, kept)
        layer.keys = layer.keys[:, :, layer.keys.shape[-2] - width :]
        layer.values = layer.values[:, :, layer.values.shape[-2] - width :]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = kept
    return kept


def bytes_per_token(text_config: object, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer (sliding layers counted in full: an upper bound)."""
    layers = int(text_config.num_hidden_layers)
    heads = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // int(text_config.num_attention_heads)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * heads * int(head_dim) * element
