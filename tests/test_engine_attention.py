"""Grouped-query SDPA without key/value copies (engine/attention.py): the same logits as
transformers' own SDPA, bit for bit, on every architecture the catalog names; and the attention
registry as it was after the block."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from benchharness.engine import kv_slots
from benchharness.engine.attention import grouped_attention
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
