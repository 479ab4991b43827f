"""Cascade attention (engine/cascade.py): rows' attention over their own slots merged with their
shared prefix's, read once per group, equals the attention over prefix and own slots together;
and a model whose attention never takes the prefix is refused, not run on the rows' tokens alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_engine_support import TEST_DEVICE, make_model

from benchharness.engine import cascade
from benchharness.engine.continuous import Prompt, _Prefill
from benchharness.engine.head import split_model
from benchharness.engine.scoring import PrefixState, run_prefix

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="cascade attention runs on the CPU only")

HEADS, KV_HEADS, DIM = 4, 2, 8


def _prefix(length: int, generator: torch.Generator) -> PrefixState:
    keys = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
    values = torch.randn(1, KV_HEADS, length, DIM, generator=generator)
    return PrefixState(length=length, layers=[(keys, values)])


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("tokens", [1, 3])  # a decode step; a draft step's tokens
def test_merged_parts_equal_the_attention_over_prefix_and_own_slots(window: int | None, tokens: int) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = _prefix(20, generator), _prefix(5, generator)
    row_prefixes = [a, b, a, None]  # rows 0 and 2 share a prefix, row 3 has none
    rows, slots = len(row_prefixes), 9
    own = [9, 4, 6, 3]  # each row's own tokens, right-aligned in its slots (left padding before)
    query = torch.randn(rows, HEADS, tokens, DIM, generator=generator)
    keys = torch.randn(rows, KV_HEADS, slots, DIM, generator=generator)
    values = torch.randn(rows, KV_HEADS, slots, DIM, generator=generator)
    # The query tokens are each row's last `tokens` slots; positions count the prefix's tokens first.
    slot_positions, query_positions, own_mask = [], [], []
    for r in range(rows):
        base = row_prefixes[r].length if row_prefixes[r] is not None else 0
        real = torch.arange(slots) >= slots - own[r]
        position = (real.long().cumsum(0) - 1).clamp(min=0) + base
        slot_positions.append(position)
        query_positions.append(position[-tokens:])
        seen = real[None, :] & (position[None, :] <= position[-tokens:, None])
        if window is not None:
            seen &= position[-tokens:, None] - position[None, :] < window
        own_mask.append(seen)
    mask = torch.stack(own_mask)[:, None]  # [rows, 1, tokens, slots]
    positions = torch.stack(query_positions)

    out, lse = cascade.attend_with_lse(query, keys, values, mask, None, False)
    prefixes = cascade.group_rows(row_prefixes, positions)
    assert prefixes is not None and len(prefixes.groups) == 2
    merged = cascade.merge_prefixes(SimpleNamespace(layer_idx=0), query, out, lse, prefixes, None, window)
    prefixes.check_taken()

    for r in range(rows):
        prefix = row_prefixes[r]
        row_keys, row_values, row_mask = keys[r : r + 1], values[r : r + 1], mask[r : r + 1]
        if prefix is not None:
            prefix_keys, prefix_values = prefix.layers[0]
            seen = torch.ones(tokens, prefix.length, dtype=torch.bool)
            if window is not None:
                seen = positions[r][:, None] - torch.arange(prefix.length)[None, :] < window
            row_keys, row_values = torch.cat([prefix_keys, row_keys], 2), torch.cat([prefix_values, row_values], 2)
            row_mask = torch.cat([seen[None, None], row_mask], -1)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[r : r + 1], row_keys, row_values, attn_mask=row_mask, enable_gqa=True
        )
        torch.testing.assert_close(merged[r : r + 1], expected, atol=1e-5, rtol=1e-5)
    if window is not None:  # some queries' windows end after their prefix, some cut into it
        seen = [
            min(prefix.length, max(0, prefix.length - (int(q) - window + 1)))
            for prefix, row in zip(row_prefixes, positions, strict=True) if prefix is not None for q in row
        ]
        assert 0 in seen and any(0 < n < 20 for n in seen)


def _prompts(split, window_prefix: int = 40) -> list[Prompt]:
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(3, 400, (window_prefix,), generator=generator).tolist()
    rests = [torch.randint(3, 400, (n,), generator=generator).tolist() for n in (25, 3, 10)]
    prefix = run_prefix(split, shared)
    return [Prompt(i, tuple(shared + rest), prefix) for i, rest in enumerate(rests)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
@pytest.mark.parametrize("chunk_tokens", [1024, 12])
def test_a_prefill_against_a_prefix_held_once_gives_each_prompt_its_own_states(arch: str, chunk_tokens: int) -> None:
    """Rests of 3-25 tokens after a 40-token prefix (gemma3 and mistral: windows of 6-8, so most of
    the prefix is out of their sliding layers' reach): each row's last hidden state is the one the
    model gives the prompt alone, while the cache holds the rests only."""
    split = split_model(make_model(arch, 400))
    assert cascade.cascade_reason(split) == ""
    prompts = _prompts(split)
    prefill = _Prefill(split, prompts, pad_token_id=0, chunk_tokens=chunk_tokens, windowed=True, cascades=True)
    with torch.inference_mode():  # as the engine's generate runs
        while not prefill.done:
            prefill.step()
    assert prefill.hidden is not None
    assert prefill.mask.shape[1] == 25  # the longest rest: no prefix columns
    with torch.inference_mode():
        for b, prompt in enumerate(prompts):
            alone = split.forward_body(input_ids=torch.tensor([prompt.tokens])).last_hidden_state[0, -1]
            torch.testing.assert_close(prefill.hidden[b], alone, atol=2e-4, rtol=2e-4)


def test_a_model_whose_attention_never_takes_the_prefix_is_refused() -> None:
    split = split_model(make_model("llama", 400), cpu_kernels=False)  # transformers' own SDPA: it ignores the prefix
    assert "CPU attention is off" in cascade.cascade_reason(split)
    prefill = _Prefill(split, _prompts(split), pad_token_id=0, chunk_tokens=1024, cascades=True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="attended without their rows' shared prefix"):
        prefill.step()


def test_gemma2s_softcapped_attention_keeps_its_prefix_copies() -> None:
    split = split_model(make_model("gemma2", 400))
    assert cascade.cascade_reason(split) != ""


@pytest.mark.parametrize("fold", [None, True, False])  # the engine's rule, folded, as they are
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 1), (14, 2), (4, 4)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_flash_with_grouped_heads_folded_equals_sdpa(heads: int, kv_heads: int, tokens: int, fold: bool | None) -> None:
    # `_flash` runs a key/value head's query heads as one block of rows where the block is big
    # enough (folds_by_default); the outputs and log-sum-exps must be those of each head attending alone.
    generator = torch.Generator().manual_seed(1)
    rows, slots, dim = 5, 11, 8
    query = torch.randn(rows, heads, tokens, dim, generator=generator)
    keys = torch.randn(rows, kv_heads, slots, dim, generator=generator)
    values = torch.randn(rows, kv_heads, slots, dim, generator=generator)
    seen = torch.rand(rows, 1, tokens, slots, generator=generator) > 0.4
    seen[..., -1] = True  # every query sees a slot
    out, lse = cascade._flash(query, keys, values, cascade.additive(seen, query.dtype), None, fold=fold)
    group = heads // kv_heads
    full_keys, full_values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=seen)
    scores = (query @ full_keys.transpose(-1, -2)) / dim**0.5
    expected_lse = torch.logsumexp(scores.masked_fill(~seen, float("-inf")), dim=-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
