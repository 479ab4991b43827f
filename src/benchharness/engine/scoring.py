"""Loglikelihood scoring of packed token-tree rows.

One forward of the model body per batch of rows, with a 4D attention mask in which
each token sees its tree ancestors only. The hidden states of the scored nodes are
queued, and the output layer runs on the queue once it holds enough rows (or at the
end): its weight (672 MB for Gemma 3's 262k vocabulary in fp32) is then read once per
few hundred scored rows instead of once per body forward, where a handful of MMLU
answers would leave the product memory-bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from benchharness.engine.batching import PackedRow
from benchharness.engine.head import SplitModel
from benchharness.engine.masks import model_masks

# Scored rows per pass over the output layer (its weight is read once per pass),
# vocabulary entries per output-layer product (256 x 4096 fp32 logits: 4 MB), and rows
# per log_softmax (16 x 262k fp32 logits: 16 MB, within a CPU's last-level cache).
_HEAD_ROWS = 256
_VOCAB_BLOCK = 4096
_SOFTMAX_ROWS = 16


@dataclass
class BatchCounts:
    """What one batch cost, for efficiency figures."""

    rows: int
    padded_tokens: int  # rows x padded length: what the body computed
    row_tokens: int  # tokens actually in the rows
    scored_nodes: int  # rows through the output layer


def ancestor_mask(parents: Sequence[int]) -> np.ndarray:
    """[n, n] bool: entry (q, k) is True when token k is q itself or one of its ancestors."""
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for q, parent in enumerate(parents):
        if parent >= 0:
            # Parents always precede children, so the parent's row is final already.
            mask[q, : q] = mask[parent, : q]
        mask[q, q] = True
    return mask


def build_attention_masks(
    split: SplitModel, rows: Sequence[PackedRow], length: int, prefix_length: int = 0
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4D mask(s) for a right-padded batch of rows, in the form the model's attention expects.

    With a prefix (keys and values of `prefix_length` tokens already in the cache, at
    positions 0..prefix_length-1), every query also sees all of the prefix.
    Models with sliding-window layers (Gemma 3, Qwen2 with sliding windows) get one
    mask per layer type; the sliding one also hides keys `window` or more positions back,
    as transformers' `sliding_window_overlay` does.
    """
    batch = len(rows)
    full = np.zeros((batch, length, prefix_length + length), dtype=bool)
    full[:, :, :prefix_length] = True
    query_positions = np.zeros((batch, length), dtype=np.int64)
    for b, row in enumerate(rows):
        n = len(row)
        full[b, :n, prefix_length : prefix_length + n] = ancestor_mask(row.parents)
        query_positions[b, :n] = row.positions
        # Padding queries see themselves only: a fully masked row would give NaN in SDPA.
        pad = np.arange(n, length)
        full[b, pad, prefix_length + pad] = True
    key_positions = np.concatenate(
        [np.broadcast_to(np.arange(prefix_length), (batch, prefix_length)), query_positions], axis=1
    )

    masks = {"full_attention": full}
    if split.sliding_window is not None:
        distance = query_positions[:, :, None] - key_positions[:, None, :]
        masks["sliding_attention"] = full & (distance < split.sliding_window)
    return model_masks(split, {name: torch.from_numpy(mask) for name, mask in masks.items()})


def _is_chain(row: PackedRow) -> bool:
    return all(parent == index - 1 for index, parent in enumerate(row.parents))


@dataclass
class BodyOutput:
    """What one body forward leaves for the output layer."""

    hidden: torch.Tensor  # [unique scored nodes, hidden]
    pairs: list[tuple[int, int, int]]  # (request index, row of `hidden`, target token)
    counts: BatchCounts


@dataclass
class PrefixState:
    """A group's shared prefix after one forward: its keys and values per layer ([1, heads, length, dim])."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    def cache_for(self, batch: int) -> DynamicCache:
        """A cache holding the prefix for each of `batch` rows. The prefix is expanded, not
        copied: the cache copies it once when it takes it, and the model appends to that."""
        return DynamicCache(
            ddp_cache_data=[
                (keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)) for keys, values in self.layers
            ]
        )


@torch.inference_mode()
def run_prefix(split: SplitModel, prefix: Sequence[int]) -> PrefixState:
    """Run a shared prefix once, keeping its keys and values."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=split.device)
    # A cache of full layers (no config): sliding-window layers keep every key too, and the
    # masks built for the rows that follow hide what the window excludes.
    cache = DynamicCache()
    split.forward_body(
        input_ids=ids,
        position_ids=torch.arange(len(prefix), device=split.device)[None],
        past_key_values=cache,
        use_cache=True,
    )
    return PrefixState(length=len(prefix), layers=[(keys, values) for keys, values, *_ in cache])


@torch.inference_mode()
def run_body(
    split: SplitModel, rows: Sequence[PackedRow], pad_token_id: int, prefix: PrefixState | None = None
) -> BodyOutput:
    """Run one batch of rows through the body (after `prefix`, if given); keep the hidden
    states of the scored nodes only."""
    length = max(len(row) for row in rows)
    device = split.device
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row.tokens, dtype=torch.long)
        position_ids[b, : len(row)] = torch.tensor(row.positions, dtype=torch.long)
    past = None
    if prefix is not None:
        mask: torch.Tensor | dict[str, torch.Tensor] = build_attention_masks(split, rows, length, prefix.length)
        past = prefix.cache_for(len(rows))
    elif all(_is_chain(row) for row in rows):
        # Plain causal rows (single-token answers, rolling windows): a 2D padding mask lets
        # transformers build its own causal masks (or none at all), the cheapest path.
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            mask[b, : len(row)] = 1
        mask = mask.to(device)
    else:
        mask = build_attention_masks(split, rows, length)

    hidden = split.forward_body(
        input_ids=input_ids.to(device),
        attention_mask=mask,
        position_ids=position_ids.to(device),
        past_key_values=past,
        use_cache=past is not None,
    ).last_hidden_state  # [rows, length, hidden]

    # Unique scored nodes across the batch, as flat indices into [rows * length].
    flat_index_of: dict[int, int] = {}
    pairs: list[tuple[int, int, int]] = []
    for b, row in enumerate(rows):
        for scored in row.scored:
            for node, target in zip(scored.nodes, scored.targets, strict=True):
                flat = b * length + node
                slot = flat_index_of.setdefault(flat, len(flat_index_of))
                pairs.append((scored.index, slot, target))
    flat_nodes = torch.tensor(list(flat_index_of), dtype=torch.long, device=device)
    # A copy, so the batch's activations can be freed while the rows wait for the output layer.
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_nodes)
    counts = BatchCounts(
        rows=len(rows),
        padded_tokens=len(rows) * length,
        row_tokens=sum(len(row) for row in rows),
        scored_nodes=len(flat_index_of),
    )
    return BodyOutput(hidden=selected, pairs=pairs, counts=counts)


class HeadBuffers:
    """Logits and log-probabilities memory for `score_nodes`, allocated once and reused by
    every pass: a fresh [256, vocab] fp32 block (268 MB for Gemma 3) is faulted in from the OS
    page by page on each pass, which cost 10-20% of the output layer's time."""

    def __init__(self, split: SplitModel, device: torch.device) -> None:
        vocab = int(split.output_layer.weight.shape[0])
        self.logits = torch.empty((_HEAD_ROWS, vocab), dtype=torch.float32, device=device)
        self.log_probs = torch.empty((_SOFTMAX_ROWS, vocab), dtype=torch.float32, device=device)


@torch.inference_mode()
def score_nodes(
    split: SplitModel,
    hidden: torch.Tensor,
    slots: torch.Tensor,
    targets: torch.Tensor,
    buffers: HeadBuffers | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets[i]` after node `slots[i]` (fp32), and whether it is the argmax.

    Up to `_HEAD_ROWS` rows go through the output layer together, one vocabulary block
    at a time, so its weight is read once for them all; log_softmax then runs on a few
    rows at a time, whose logits stay in cache. The values are those of log_softmax over
    the whole vocabulary, as lm-eval's `hf` model computes them (an online log-sum-exp
    would be more exact, but would differ from it by up to 6e-5 per token on a 262k vocabulary).
    """
    device = hidden.device
    vocab = int(split.output_layer.weight.shape[0])
    if buffers is None:
        buffers = HeadBuffers(split, device)
    pair_logprob = torch.empty(len(slots), dtype=torch.float32, device=device)
    pair_greedy = torch.empty(len(slots), dtype=torch.bool, device=device)
    for row_start in range(0, hidden.shape[0], _HEAD_ROWS):
        rows = hidden[row_start : row_start + _HEAD_ROWS]
        logits = buffers.logits[: rows.shape[0]]
        for start in range(0, vocab, _VOCAB_BLOCK):
            logits[:, start : start + _VOCAB_BLOCK] = split.logits_slice(rows, start, start + _VOCAB_BLOCK)
        for sub_start in range(0, rows.shape[0], _SOFTMAX_ROWS):
            chunk = logits[sub_start : sub_start + _SOFTMAX_ROWS]
            log_probs = torch.log_softmax(chunk, dim=-1, out=buffers.log_probs[: chunk.shape[0]])
            first = row_start + sub_start
            in_chunk = (slots >= first) & (slots < first + log_probs.shape[0])
            local = slots[in_chunk] - first
            local_targets = targets[in_chunk]
            pair_logprob[in_chunk] = log_probs[local, local_targets]
            pair_greedy[in_chunk] = log_probs.argmax(dim=-1)[local] == local_targets
    return pair_logprob, pair_greedy


class HeadQueue:
    """Scored hidden states waiting for the output layer; `flush` scores them all."""

    def __init__(self, split: SplitModel) -> None:
        self._split = split
        self._hidden: list[torch.Tensor] = []
        self._pairs: list[tuple[int, int, int]] = []
        self._rows = 0
        self._buffers: HeadBuffers | None = None  # allocated at the first flush, reused by the next

    @property
    def full(self) -> bool:
        return self._rows >= _HEAD_ROWS

    def add(self, body: BodyOutput) -> None:
        offset = self._rows
        self._hidden.append(body.hidden)
        self._pairs.extend((request, slot + offset, target) for request, slot, target in body.pairs)
        self._rows += body.hidden.shape[0]

    def flush(self, results: dict[int, tuple[float, bool]]) -> None:
        """Score the queued rows into `results` ({request index: (loglikelihood, is greedy)})."""
        if not self._pairs:
            return
        device = self._split.device
        hidden = torch.cat(self._hidden)
        slots = torch.tensor([p[1] for p in self._pairs], dtype=torch.long, device=device)
        targets = torch.tensor([p[2] for p in self._pairs], dtype=torch.long, device=device)
        if self._buffers is None:
            self._buffers = HeadBuffers(self._split, device)
        logprobs, greedy = score_nodes(self._split, hidden, slots, targets, self._buffers)
        for (request_index, _, _), logprob, is_greedy in zip(
            self._pairs, logprobs.tolist(), greedy.tolist(), strict=True
        ):
            total, all_greedy = results.get(request_index, (0.0, True))
            results[request_index] = (total + logprob, all_greedy and is_greedy)
        self._hidden, self._pairs, self._rows = [], [], 0

