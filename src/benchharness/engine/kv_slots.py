"""The KV cache of a continuously refilled batch: rows of different lengths in one
left-padded transformers `DynamicCache`, so the model's own attention and masks run as
in `transformers.generate`.

Each row's tokens sit at the right end of the cache (left padding, or padding between a
shared prefix and the row's rest), so a sliding window measured in cache slots is measured
in tokens, as transformers measures it, until drafts leave gaps (below). Rows join by
writing both sides, left-padded to one width, into a new buffer (in the order the caller
gives: the engine keeps rows widest first); when rows leave, rows
from the end of the batch take their places (`fill_order`), so only those are copied;
slots that every remaining row masks are dropped from the left by narrowing the view.
Rejected prompt-lookup drafts leave masked slots between a row's tokens; the sliding layers
then keep the slots of each row's last window - 1 tokens (`keep_window_tokens`), and the
engine masks the window by tokens itself (`masks.token_masks`).

The layers keep their keys and values in buffers with spare slots on the right, and a
step writes its one new token into them: transformers' own dynamic layers concatenate
the whole cache with each new token, a copy of every layer's keys and values at every
step (on Gemma-3-270m at 49 rows x 500 slots, 140 of a 470 ms step). `keys` / `values`
are views of the filled part, of the shapes transformers' layers would hold, so the
model's attention and masks see what they see with those layers.

Only full and sliding-window attention layers are handled; other cache layer kinds
(linear attention, sparse indexers) are refused by `check_layers` before any refill,
and such models decode in batches that are not refilled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class UnsupportedCacheError(ValueError):
    """The model's cache has a layer kind whose rows cannot be joined or trimmed here."""


class SlotLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in buffers with spare slots.

    `keys` / `values` are views `buffer[:, :, start:end]`. `update` writes the new tokens at
    `end`; when the buffer is full, the filled part moves into a new one with `spare_slots`
    free. A `keys` set from outside (transformers' own `crop`, `reorder_cache`, a prefix
    expanded over rows) is taken into a new buffer at the next update."""

    # Slots a buffer keeps free on the right: a full layer is copied into a larger buffer once
    # every `spare_slots` steps instead of at every step (0: at every step, as concatenation does).
    spare_slots: int = 64

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._key_view: torch.Tensor | None = None
        self._start = 0
        self._end = 0

    def _owns_keys(self) -> bool:
        return self._buffers is not None and self.keys is self._key_view

    def _set_view(self) -> None:
        assert self._buffers is not None
        self._key_view = self._buffers[0][:, :, self._start : self._end]
        self.keys = self._key_view
        self.values = self._buffers[1][:, :, self._start : self._end]

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = int(keys.shape[-2])
        if not self._owns_keys():
            stored = self.keys if self.keys is not None and self.keys.dim() == 4 else keys[:, :, :0]
            stored_values = self.values if self.values is not None and self.values.dim() == 4 else values[:, :, :0]
            self.hold_rows([(stored, stored_values)], int(stored.shape[-2]), room=new)
        elif self._end + new > self._buffers[0].shape[-2]:  # type: ignore[index]
            self.hold_rows([(self.keys, self.values)], self._end - self._start, room=new)
        assert self._buffers is not None
        self._buffers[0][:, :, self._end : self._end + new] = keys
        self._buffers[1][:, :, self._end : self._end + new] = values
        self._end += new
        self._set_view()
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append(key_states, value_states)

    def hold_rows(
        self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int, room: int = 0, order: Sequence[int] | None = None
    ) -> None:
        """Hold the rows of every (keys, values) in `parts`, one after the other (or row `order[i]`
        of them at place i), each right-aligned in `width` slots, in new buffers with `room` +
        `spare_slots` free slots after them. The slots left of a shorter part are zeros (masked,
        but the attention reads them)."""
        for keys, _ in parts:
            if int(keys.shape[-2]) > width:
                raise ValueError(f"a cache layer holds {keys.shape[-2]} slots, more than the {width} it should")
        rows = sum(int(keys.shape[0]) for keys, _ in parts)
        capacity = width + room + self.spare_slots
        # Values may have another head size than keys (DeepSeek's multi-head latent attention).
        buffers = tuple(t.new_empty((rows, t.shape[1], capacity, t.shape[3])) for t in parts[0])
        if order is None:
            order = range(rows)
        elif sorted(order) != list(range(rows)):
            raise ValueError(f"a row order must place each of the {rows} rows once")
        places = [0] * rows  # places[source row]: where it goes
        for place, source in enumerate(order):
            places[source] = place
        row = 0
        for part in parts:
            n, length = int(part[0].shape[0]), int(part[0].shape[-2])
            # Runs of rows that stay neighbours are written as slices (a row order is mostly such runs).
            for start, stop, place in _runs(places[row : row + n]):
                for buffer, states in zip(buffers, part, strict=True):
                    buffer[place : place + stop - start, :, : width - length] = 0
                    buffer[place : place + stop - start, :, width - length : width] = states[start:stop]
            row += n
        self._buffers, self._start, self._end = buffers, 0, width
        self._set_view()

    def keep_last(self, width: int) -> None:
        """Keep only the last `width` slots (a view: nothing is copied)."""
        if self._owns_keys():
            self._start = self._end - width
            self._set_view()
        else:
            self.keys = self.keys[:, :, self.keys.shape[-2] - width :]
            self.values = self.values[:, :, self.values.shape[-2] - width :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`, in that order, within the same buffers. Rows already in place
        stay; when every row that moves comes from beyond the kept count (as `fill_order`
        arranges), only those rows are copied; otherwise the kept rows are gathered and written back."""
        if not self._owns_keys() or self.get_seq_length() == 0:
            super().batch_select_indices(indices)
            return
        assert self._buffers is not None
        sources = indices.tolist()
        kept = len(sources)
        moves = [(row, source) for row, source in enumerate(sources) if row != source]
        if all(source >= kept for _, source in moves):
            for row, source in moves:  # the source rows are dropped below, so nothing is overwritten early
                self.keys[row].copy_(self.keys[source])
                self.values[row].copy_(self.values[source])
            self._buffers = (self._buffers[0][:kept], self._buffers[1][:kept])
            self._set_view()
            return
        keys, values = self.keys.index_select(0, indices), self.values.index_select(0, indices)
        self._buffers = (self._buffers[0][:kept], self._buffers[1][:kept])
        self._set_view()
        self.keys.copy_(keys)
        self.values.copy_(values)

    def reset(self) -> None:
        self._buffers = None
        super().reset()


def _runs(places: Sequence[int]) -> list[tuple[int, int, int]]:
    """`(start, stop, place)` for each run of consecutive rows whose places are consecutive too."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for row in range(1, len(places) + 1):
        if row == len(places) or places[row] != places[row - 1] + 1:
            runs.append((start, row, places[start]))
            start = row
    return runs


class SlidingSlotLayer(SlotLayer, DynamicSlidingWindowLayer):
    """A sliding-window layer in buffers: it keeps the last `sliding_window - 1` slots, as
    transformers' `DynamicSlidingWindowLayer` does, and rolls by narrowing its view.

    With `holds_window_tokens` set (`hold_window_tokens`), it keeps every slot it is given until
    `keep_window_tokens` trims it: where rows have masked slots between their tokens, their last
    `sliding_window - 1` tokens can span more slots than that."""

    holds_window_tokens: bool = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record_past:
            raise UnsupportedCacheError("a sliding-window layer recording its past cannot be kept in slot buffers")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += int(key_states.shape[-2])
        # The attention sees the stored window and the new tokens; then only the last window - 1 stay.
        full_keys, full_values = self._append(key_states, value_states)
        stored = self._end - self._start
        if not self.holds_window_tokens and stored > self.sliding_window - 1:
            self.keep_last(self.sliding_window - 1)
        return full_keys, full_values


_HANDLED = (SlotLayer, SlidingSlotLayer)


def _slot_layer(layer: object) -> object:
    """The buffered layer for one of transformers' dynamic layers (others are returned as they are)."""
    if type(layer) is DynamicLayer:
        return SlotLayer()
    if type(layer) is DynamicSlidingWindowLayer:
        return SlidingSlotLayer(sliding_window=layer.sliding_window)
    return layer


def new_cache(config: object) -> DynamicCache:
    """An empty cache with the model's own layer kinds (sliding-window layers where the config
    has them), full and sliding layers kept in slot buffers."""
    cache = DynamicCache(config=config)
    cache.layers = [_slot_layer(layer) for layer in cache.layers]
    return cache


def check_layers(cache: DynamicCache) -> None:
    """Refuse layer kinds `join` and `trim` cannot handle (exact types: a subclass may keep more state)."""
    for layer in cache.layers:
        if type(layer) not in _HANDLED:
            raise UnsupportedCacheError(f"cache layer {type(layer).__name__} cannot take rows of another batch")


def fill_order(rows: int, kept: Sequence[int]) -> list[int]:
    """The order to keep the rows `kept` of `rows` in, moving fewest rows: a kept row below the
    kept count stays where it is, and each gap there takes a kept row from beyond it."""
    count = len(kept)
    beyond = [row for row in kept if row >= count]
    staying = set(kept)
    return [row if row in staying else beyond.pop() for row in range(count)]


def cache_from_prefix(config: object, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """A cache of the model's layer kinds holding one prefix (keys/values [1, heads, length, dim]) for
    `batch` rows; a sliding layer holds the prefix's last window - 1 slots. Where the prefix is
    longer than that, the rows' rests (left-padded after it) need the engine's own masks
    (masks.token_masks), as the padding between would shift a window counted in slots."""
    cache = new_cache(config)
    check_layers(cache)
    if len(cache.layers) != len(layers):
        raise UnsupportedCacheError(f"the prefix has {len(layers)} layers, the model's cache {len(cache.layers)}")
    length = int(layers[0][0].shape[-2]) if layers else 0
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
        layer.lazy_initialization(keys, values)
        if isinstance(layer, DynamicSlidingWindowLayer):
            keep = min(length, layer.sliding_window - 1)
            keys, values = keys[:, :, length - keep :], values[:, :, length - keep :]
            layer.cumulative_length = length
        layer.keys, layer.values = keys, values  # expanded, not copied: the first update copies
    return cache


def _width(layer: DynamicLayer, slots: int) -> int:
    """How many of `slots` cache slots the layer stores: a sliding layer keeps the last window - 1,
    or more where it holds its rows' window tokens (`hold_window_tokens`) and stores more now."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        stored = int(layer.keys.shape[-2]) if layer.is_initialized else 0
        return min(slots, max(layer.sliding_window - 1, stored))
    return slots


def hold_window_tokens(cache: DynamicCache) -> None:
    """Let the sliding layers of `cache` keep every slot until `keep_window_tokens` trims them (for
    steps whose rows may leave masked slots between their tokens: rejected drafts)."""
    for layer in cache.layers:
        if isinstance(layer, SlidingSlotLayer):
            layer.holds_window_tokens = True


def window_token_slots(mask: torch.Tensor, window: int) -> int:
    """The last slots that hold every row's last `window - 1` tokens (`mask`: [rows, slots], 1 where a
    slot holds a token of the row): what a sliding layer must keep for the next step's queries."""
    if not mask.shape[0]:
        return 0
    from_right = mask.flip(-1).long().cumsum(-1)  # [rows, slots]: a row's tokens in its last 1, 2, ... slots
    needed = from_right[:, -1:].clamp(max=window - 1)  # the row's last window - 1 tokens, or all it has
    spans = (from_right < needed).sum(-1) + 1  # slots up to the first of them
    return int(spans.max())


def sliding_slots(cache: DynamicCache) -> int:
    """How many slots the sliding layers of `cache` store (the same in each), 0 if none."""
    stored = {int(layer.keys.shape[-2]) for layer in cache.layers if isinstance(layer, DynamicSlidingWindowLayer) and layer.is_initialized}
    if len(stored) > 1:
        raise UnsupportedCacheError(f"sliding layers store different slot counts: {sorted(stored)}")
    return stored.pop() if stored else 0


def keep_window_tokens(cache: DynamicCache, mask: torch.Tensor) -> None:
    """Trim each sliding layer of `cache` (whose slots are the last of `mask`'s) to the slots that
    hold every row's last window - 1 tokens."""
    spans: dict[int, int] = {}  # per window
    for layer in cache.layers:
        if isinstance(layer, DynamicSlidingWindowLayer) and layer.is_initialized:
            if layer.sliding_window not in spans:
                spans[layer.sliding_window] = window_token_slots(mask, layer.sliding_window)
            keep = spans[layer.sliding_window]
            if int(layer.keys.shape[-2]) > keep:
                layer.keep_last(keep)


def join(cache: DynamicCache, slots: int, other: DynamicCache, other_slots: int, order: Sequence[int] | None = None) -> int:
    """Append `other`'s rows to `cache` (in place); return the joined slot count.

    `slots` / `other_slots`: each cache's slot count (its attention mask's width). The shorter
    side is padded on the left (with zeros: masked, but read by the attention); the caller pads
    its attention mask the same way. Both sides are written once, into a new buffer, in the
    order `order` gives (`cache`'s rows, then `other`'s, numbered on: place i holds row
    `order[i]`; None: that order)."""
    check_layers(cache)
    check_layers(other)
    joined = max(slots, other_slots)
    for layer, incoming in zip(cache.layers, other.layers, strict=True):
        if not incoming.is_initialized and not layer.is_initialized:
            continue  # a layer that shares another's keys (KV sharing) stores nothing
        if not (incoming.is_initialized and layer.is_initialized):
            raise UnsupportedCacheError("one batch's cache layer is empty where the other's is not")
        layer.hold_rows([(layer.keys, layer.values), (incoming.keys, incoming.values)], _width(layer, joined), order=order)
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
        width = min(kept, int(layer.keys.shape[-2]))
        if int(layer.keys.shape[-2]) > width:
            layer.keep_last(width)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = kept
    return kept


def key_value_heads(text_config: object) -> tuple[int, int]:
    """The cache's key/value heads of a layer, and their size."""
    heads = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // int(text_config.num_attention_heads)
    return heads, int(head_dim)


def bytes_per_token(text_config: object, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer (sliding layers counted in full: an upper bound)."""
    heads, head_dim = key_value_heads(text_config)
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * int(text_config.num_hidden_layers) * heads * head_dim * element
