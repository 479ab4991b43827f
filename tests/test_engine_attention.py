"""Grouped-query SDPA without key/value copies (engine/attention.py): the same logits as
transformers' own SDPA, bit for bit, on every architecture the catalog names; and the attention
registry as it was after the block."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from benchharness.engine import kv_slots
from benchharness.engine.attention import grouped_attention, row_grouped_sdpa, row_groups
from test_engine_support import ARCHITECTURES, TEST_DEVICE, make_model

pytestmark = pytest.mark.skipif(TEST_DEVICE.type != "cpu", reason="the grouped path is taken on the CPU only")


def _grouped_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for each torch SDPA call, whether it was given grouped heads (enable_gqa)."""
    calls: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(bool(kwargs.get("enable_gqa", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def _logits_of_a_padded_prefill_and_a_draft_step(model: torch.nn.Module) -> torch.Tensor:
    """Logits of three left-padded prompts, then of a 3-token step per row on their cache: the
    multi-token, masked shapes the engine's prefills and draft steps run."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (3, 11), generator=generator).to(TEST_DEVICE)
    mask = torch.ones(3, 11, dtype=torch.long, device=TEST_DEVICE)
    mask[1, :4] = 0
    mask[2, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = kv_slots.new_cache(model.config)
    first = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
    step = torch.randint(4, 300, (3, 3), generator=generator).to(TEST_DEVICE)
    mask = torch.cat([mask, torch.ones_like(mask[:, :3])], dim=1)
    positions = positions[:, -1:] + 1 + torch.arange(3, device=TEST_DEVICE)
    second = model(input_ids=step, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
    return torch.cat([first, second], dim=1)


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "gemma2"])  # Gemma 2 runs eager attention
def test_grouped_sdpa_gives_transformers_sdpa_logits_bit_for_bit(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(arch, vocab_size=300)
    calls = _grouped_calls(monkeypatch)
    with torch.inference_mode():
        reference = _logits_of_a_padded_prefill_and_a_draft_step(model)
        assert calls and not any(calls)  # transformers' own path: keys and values repeated
        calls.clear()
        with grouped_attention() as swapped:
            assert swapped
            ours = _logits_of_a_padded_prefill_and_a_draft_step(model)
    assert calls and all(calls), "every attention call should have taken the grouped heads"
    assert torch.equal(ours, reference), float((ours - reference).abs().max())


def test_the_attention_registry_is_put_back_and_a_foreign_sdpa_left_alone() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with grouped_attention():
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
            raise RuntimeError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward

    def foreign(*args: object, **kwargs: object) -> None:
        raise AssertionError("not called here")

    ALL_ATTENTION_FUNCTIONS["sdpa"] = foreign  # someone's own override
    try:
        with grouped_attention() as swapped:
            assert not swapped and ALL_ATTENTION_FUNCTIONS["sdpa"] is foreign
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is foreign
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def test_row_groups_keep_neighbours_of_similar_width_together():
    assert row_groups([0, 0, 0, 0], call_cost_slots=10) == [(0, 4, 0)]  # no padding: one group
    # widest first, as the engine keeps rows: one group per width
    assert row_groups([0, 0, 100, 100, 100, 300, 300], call_cost_slots=50) == [(0, 2, 0), (2, 5, 100), (5, 7, 300)]
    # slots read beyond a row's own cost less than a call: the rows stay together
    assert row_groups([0, 5, 10, 12], call_cost_slots=50) == [(0, 4, 0)]
    # a narrow row among wide ones: its own group only where that saves more than a call costs
    assert row_groups([0, 400, 0], call_cost_slots=500) == [(0, 3, 0)]
    assert row_groups([0, 400, 0], call_cost_slots=100) == [(0, 1, 0), (1, 2, 400), (2, 3, 0)]
    assert row_groups([30, 20, 10], call_cost_slots=0) == [(0, 1, 30), (1, 2, 20), (2, 3, 10)]


@pytest.mark.parametrize("query_tokens", [1, 3])  # a decode step; a draft step's tokens
def test_a_left_padded_batch_attends_in_row_groups_to_the_slots_its_rows_see(query_tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose padding differs a lot are attended in groups, each reading the cache from its rows'
    first visible slot: the same attention as transformers' SDPA over the whole width, up to float
    rounding (the kernel's sums run over other spans)."""
    generator = torch.Generator().manual_seed(0)
    slots, kv_heads, groups, dim = 700, 2, 7, 64  # Qwen2.5-0.5B's heads: one call costs 256 slots
    first = [0, 0, 400, 400, 400, 690]
    rows = len(first)
    query = torch.randn(rows, kv_heads * groups, query_tokens, dim, generator=generator)
    key = torch.randn(rows, kv_heads, slots, dim, generator=generator)
    value = torch.randn(rows, kv_heads, slots, dim, generator=generator)
    seen = torch.arange(slots)[None, :] >= torch.tensor(first)[:, None]
    causal = torch.arange(slots)[None, :] <= slots - query_tokens + torch.arange(query_tokens)[:, None]
    mask = seen[:, None, None, :] & causal[None, None]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = groups, True
    with torch.inference_mode():
        reference, _ = sdpa_attention_forward(module, query, key, value, mask)
        widths: list[int] = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def recording(q: torch.Tensor, k: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            widths.append(int(k.shape[2]))
            return sdpa(q, k, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        ours, _ = row_grouped_sdpa(module, query, key, value, mask)
    assert widths == [700, 300, 10]
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
