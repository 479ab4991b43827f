"""The engine's small-row kernel (engine/small_rows.cpp): the products it computes, that a row's
result does not depend on the rows beside it, and where the engine takes it."""

from __future__ import annotations

import pytest
import torch
import transformers
from lm_eval.api.instance import Instance

from benchharness.engine import BenchEngineLM
from benchharness.engine.cpu_kernels import plan_cpu_kernels
from benchharness.engine.onednn import onednn_available, onednn_linear
from benchharness.engine.small_rows import MAX_ROWS, load_small_rows, takes_weight, unbuildable_reason
from test_engine_support import make_model, make_tokenizer

pytestmark = [
    pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN"),
    pytest.mark.skipif(bool(unbuildable_reason()), reason=f"the kernel cannot be built here: {unbuildable_reason()}"),
]


@pytest.fixture(scope="module")
def kernel():
    loaded = load_small_rows()
    assert loaded.module is not None, loaded.reason  # buildable here (pytestmark): it must build
    return loaded


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 40, MAX_ROWS])
@pytest.mark.parametrize("shape", [(16, 37), (48, 64), (256, 896)])
def test_products_match_float64(kernel, rows: int, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    x = torch.randn(2, rows, shape[1], generator=generator)[1]  # a view, not the start of its storage
    exact = x.double() @ weight.double().T + bias.double()
    ours = kernel.linear(x, kernel.pack(weight), bias)
    assert ours.shape == (rows, shape[0]) and ours.dtype == torch.float32
    assert float((ours.double() - exact).abs().max()) < 1e-5 * float(exact.abs().max()) * shape[1] ** 0.5
    leading = kernel.linear(x.reshape(1, rows, shape[1]), kernel.pack(weight), bias)  # [batch, tokens, in]
    assert leading.shape == (1, rows, shape[0]) and torch.equal(leading[0], ours)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 200, generator=generator)
    panels = kernel.pack(weight)
    rows = torch.randn(MAX_ROWS, 200, generator=generator)
    together = kernel.linear(rows, panels, None)
    for b in (0, 5, 6, 11, MAX_ROWS - 1):  # first, last of a block of six, in the remainder
        alone = kernel.linear(rows[b : b + 1], panels, None)[0]
        elsewhere = kernel.linear(torch.cat([rows[:3], rows[b : b + 1]]), panels, None)[3]
        assert torch.equal(alone, together[b]) and torch.equal(elsewhere, together[b]), b


def test_weights_it_does_not_take() -> None:
    assert takes_weight(torch.zeros(32, 8))
    assert not takes_weight(torch.zeros(40, 8))  # not a multiple of 16 outputs
    assert not takes_weight(torch.zeros(32, 8, dtype=torch.float64))
    assert not takes_weight(torch.zeros(32))


def test_the_engine_takes_it_up_to_max_rows_and_onednn_above(kernel) -> None:
    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    kernels = plan_cpu_kernels(model, enabled=True)
    assert f"; small-row kernel up to {MAX_ROWS} rows (" in kernels.description
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert kernels.packs.small_rows == len({id(m.weight) for m in linears})
    size = 4 * sum(w.numel() for w in {id(m.weight): m.weight for m in linears}.values())
    assert kernels.packs.panel_bytes == size and f"weights, {size / 1e9:.2f} GB more)" in kernels.description
    head = model.lm_head.weight
    panels = kernel.pack(head)
    with torch.inference_mode():
        for rows in (1, 4, MAX_ROWS):
            x = torch.randn(rows, 64)
            assert torch.equal(kernels.linear(x, head), kernel.linear(x, panels, None)), rows
        x = torch.randn(MAX_ROWS + 1, 64)
        assert torch.equal(kernels.linear(x, head), onednn_linear(x, kernels.packs.weight_for(head, x)))
    off = plan_cpu_kernels(model, enabled=True, small_rows=False)
    assert off.packs.small_rows == 0 and "; no small-row kernel (small_row_kernel=false)" in off.description
    tight = plan_cpu_kernels(model, enabled=True, pack_budget_bytes=int(1.5 * 4 * sum(
        m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear)))
    assert tight.packs.small_rows == 0 and "its copy of the weights would pass" in tight.description


def test_engine_generations_agree_with_and_without_it_and_record_it() -> None:
    model = make_model("qwen2", vocab_size=400)
    tokenizer = make_tokenizer()
    prompts = [f"Question {i}: which one is the capital of country {i * 7}?" for i in range(6)]
    requests = [
        Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    fast = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4)
    plain = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4, small_row_kernel="false")
    assert "small-row kernel up to" in fast.batch_info["cpu_kernels"]
    assert "no small-row kernel (small_row_kernel=false)" in plain.batch_info["cpu_kernels"]
    assert fast.generate_token_ids(requests) == plain.generate_token_ids(requests)
