"""Loglikelihood scoring of packed token-tree rows.

One forward of the model body per batch of rows, with a 4D attention mask in which
each token sees its tree ancestors only; then the output layer and log-softmax on
the scored nodes only (for single-token answers: one row of logits per context).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from benchharness.engine.batching import PackedRow
from benchharness.engine.head import SplitModel, UnsupportedModelError

# Cap on the logits materialized at once (elements), so a 262k vocabulary never
# needs a [scored rows x vocab] tensor larger than ~256 MB in fp32.
_MAX_LOGIT_ELEMENTS = 1 << 26


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
    split: SplitModel, rows: Sequence[PackedRow], length: int
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4D mask(s) for a right-padded batch of rows, in the form the model's attention expects.

    Models with sliding-window layers (Gemma 3, Qwen2 with sliding windows) get one
    mask per layer type; the sliding one also hides keys `window` or more positions back,
    as transformers' `sliding_window_overlay` does.
    """
    batch = len(rows)
    full = np.zeros((batch, length, length), dtype=bool)
    positions = np.zeros((batch, length), dtype=np.int64)
    for b, row in enumerate(rows):
        n = len(row)
        full[b, :n, :n] = ancestor_mask(row.parents)
        positions[b, :n] = row.positions
        # Padding queries see themselves only: a fully masked row would give NaN in SDPA.
        pad = np.arange(n, length)
        full[b, pad, pad] = True

    masks = {"full_attention": full}
    layer_types = set(getattr(split.config, "layer_types", None) or [])
    if "sliding_attention" in layer_types:
        window = int(split.config.sliding_window)
        distance = positions[:, :, None] - positions[:, None, :]
        sliding = full & (distance < window)
        masks["sliding_attention"] = sliding
    other = layer_types - set(masks)
    if other:
        raise UnsupportedModelError(
            f"{type(split.model).__name__}: layer types {sorted(other)} are not supported by the engine's "
            "tree attention; use `engine: hf` for this model."
        )

    implementation = getattr(split.config, "_attn_implementation", "sdpa")
    converted: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        tensor = torch.from_numpy(mask).to(split.device)[:, None, :, :]
        if implementation == "sdpa":
            converted[name] = tensor
        elif implementation == "eager":
            minimum = torch.finfo(split.dtype).min
            converted[name] = torch.zeros(tensor.shape, dtype=split.dtype, device=split.device).masked_fill(
                ~tensor, minimum
            )
        else:
            raise UnsupportedModelError(
                f"attention implementation {implementation!r} takes no custom 4D mask; load the model with "
                "attn_implementation='sdpa' (or 'eager') to use the benchharness engine."
            )
    if len(converted) == 1:
        return converted["full_attention"]
    return converted


def _is_chain(row: PackedRow) -> bool:
    return all(parent == index - 1 for index, parent in enumerate(row.parents))


@torch.inference_mode()
def score_rows(
    split: SplitModel, rows: Sequence[PackedRow], pad_token_id: int
) -> tuple[dict[int, tuple[float, bool]], BatchCounts]:
    """Run one batch of rows; return {request index: (loglikelihood, is_greedy)} and its costs."""
    length = max(len(row) for row in rows)
    device = split.device
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row.tokens, dtype=torch.long)
        position_ids[b, : len(row)] = torch.tensor(row.positions, dtype=torch.long)
    if all(_is_chain(row) for row in rows):
        # Plain causal rows (single-token answers, rolling windows): a 2D padding mask lets
        # transformers build its own causal masks (or none at all), the cheapest path.
        mask: torch.Tensor | dict[str, torch.Tensor] = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            mask[b, : len(row)] = 1
        mask = mask.to(device)
    else:
        mask = build_attention_masks(split, rows, length)

    hidden = split.body(
        input_ids=input_ids.to(device),
        attention_mask=mask,
        position_ids=position_ids.to(device),
        use_cache=False,
    ).last_hidden_state  # [rows, length, hidden]

    # Unique scored nodes across the batch, as flat indices into [rows * length].
    flat_index_of: dict[int, int] = {}
    pairs: list[tuple[int, int, int]] = []  # (request index, unique node slot, target token)
    for b, row in enumerate(rows):
        for scored in row.scored:
            for node, target in zip(scored.nodes, scored.targets, strict=True):
                flat = b * length + node
                slot = flat_index_of.setdefault(flat, len(flat_index_of))
                pairs.append((scored.index, slot, target))

    flat_nodes = torch.tensor(list(flat_index_of), dtype=torch.long, device=device)
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_nodes)  # [nodes, hidden]
    slots = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)
    targets = torch.tensor([p[2] for p in pairs], dtype=torch.long, device=device)

    vocab = int(split.output_layer.weight.shape[0])
    chunk = max(1, _MAX_LOGIT_ELEMENTS // vocab)
    pair_logprob = torch.zeros(len(pairs), dtype=torch.float32, device=device)
    argmax_parts: list[torch.Tensor] = []
    for start in range(0, selected.shape[0], chunk):
        log_probs = split.log_probs(selected[start : start + chunk])  # [chunk, vocab] fp32
        argmax_parts.append(log_probs.argmax(dim=-1))
        # Take what the pairs need from this chunk, then let the chunk go.
        in_chunk = (slots >= start) & (slots < start + log_probs.shape[0])
        local = (slots[in_chunk] - start)
        pair_logprob[in_chunk] = log_probs[local, targets[in_chunk]]
    node_argmax = torch.cat(argmax_parts)
    pair_greedy = node_argmax[slots] == targets

    results: dict[int, tuple[float, bool]] = {}
    logprob_list = pair_logprob.tolist()
    greedy_list = pair_greedy.tolist()
    for (request_index, _, _), logprob, greedy in zip(pairs, logprob_list, greedy_list, strict=True):
        total, all_greedy = results.get(request_index, (0.0, True))
        results[request_index] = (total + logprob, all_greedy and greedy)

    counts = BatchCounts(
        rows=len(rows),
        padded_tokens=len(rows) * length,
        row_tokens=sum(len(row) for row in rows),
        scored_nodes=len(flat_index_of),
    )
    return results, counts
