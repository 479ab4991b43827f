"""The engine's fp32 CPU kernels (oneDNN linear layers, gated MLPs with their activation in place):
same logits as the model's own forward, for every MLP class they take, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from benchharness.engine import BenchEngineLM
from benchharness.engine.batching import TokenRequest
from benchharness.engine.cpu_kernels import _GATED_MLPS, plan_cpu_kernels
from benchharness.engine.head import split_model
from benchharness.engine.onednn import onednn_available, onednn_linear
from test_engine_support import make_model, make_tokenizer

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")

_COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=256,
    initializer_range=0.2,
)

# One tiny model per architecture whose MLP class the kernels take (and its activation).
_CONFIGS = {
    "LlamaMLP": lambda: transformers.LlamaConfig(**_COMMON),
    "MistralMLP": lambda: transformers.MistralConfig(**_COMMON),
    "Qwen2MLP": lambda: transformers.Qwen2Config(**_COMMON),
    "Qwen3MLP": lambda: transformers.Qwen3Config(head_dim=16, **_COMMON),
    "GemmaMLP": lambda: transformers.GemmaConfig(head_dim=16, hidden_activation="gelu_pytorch_tanh", **_COMMON),
    "Gemma2MLP": lambda: transformers.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, **_COMMON),
    "Gemma3MLP": lambda: transformers.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, **_COMMON),
}


def _model(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    attention = "eager" if config.model_type == "gemma2" else "sdpa"  # Gemma 2 has no SDPA path
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def test_every_gated_mlp_class_is_covered_here() -> None:
    assert set(_CONFIGS) == set(_GATED_MLPS)


@pytest.mark.parametrize("mlp_class", sorted(_CONFIGS))
def test_kernels_reproduce_the_models_logits(mlp_class: str) -> None:
    model = _model(_CONFIGS[mlp_class]())
    mlps = [m for m in model.modules() if type(m).__name__ == mlp_class]
    assert len(mlps) == 2, f"the config should build {mlp_class}"
    split = split_model(model)  # checks the logits itself too, at the engine's tolerance
    assert f"in-place {mlp_class}(" in split.kernels.description
    swapped = {id(module) for module, _ in split.kernels.swaps}
    assert all(id(m) in swapped for m in mlps)
    # Every other linear layer goes through oneDNN; the MLPs' own run inside the MLP's forward.
    in_mlps = {id(linear) for m in mlps for linear in (m.gate_proj, m.up_proj, m.down_proj)}
    others = [m for m in model.modules() if type(m) is nn.Linear and id(m) not in in_mlps]
    assert others and all(id(m) in swapped for m in others)

    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
        ours = split.logits(split.forward_body(input_ids=ids).last_hidden_state)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4), float((ours - reference).abs().max())
    # Between calls the model runs its own forwards again.
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("mlp_class", ["Qwen2MLP", "Gemma3MLP"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_the_mlp_computes_the_modules_own_activation_and_product_bit_for_bit(mlp_class: str, rows: int) -> None:
    """In place or not, the activation and the product are the module's own: the swapped forward
    gives exactly `down(act_fn(gate(x)) * up(x))` on the same packed products."""
    model = _model(_CONFIGS[mlp_class]())
    kernels = plan_cpu_kernels(model, enabled=True)
    mlp = next(m for m in model.modules() if type(m).__name__ == mlp_class)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) * 3
    link = kernels.packs.linear
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    with torch.inference_mode():
        reference = link(mlp.act_fn(link(x, gate.weight, gate.bias)) * link(x, up.weight, up.bias), down.weight, down.bias)
        with kernels.applied():
            ours = mlp(x)
    with kernels.applied():  # autograd recording, on [batch, tokens, hidden] as in the model: out of place
        tracked = mlp(x[None].clone().requires_grad_())
    # The products under autograd (oneDNN's: the small-row kernel records no graph), same formula.
    with torch.enable_grad():
        recorded = link(mlp.act_fn(link(x, gate.weight, gate.bias)) * link(x, up.weight, up.bias), down.weight, down.bias)
    assert tracked.requires_grad
    assert torch.equal(ours, reference) and torch.equal(tracked.detach()[0], recorded.detach())


def test_an_activation_computed_in_python_keeps_the_modules_own_mlp() -> None:
    from transformers.activations import GELUTanh

    model = _model(_CONFIGS["Gemma3MLP"]())
    for layer in model.model.layers:
        layer.mlp.act_fn = GELUTanh(use_gelu_tanh_python=True)
    kernels = plan_cpu_kernels(model, enabled=True)
    assert "in-place" not in kernels.description
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert {id(m) for m, _ in kernels.swaps} == {id(m) for m in linears}


def test_other_activations_keep_their_mlp_but_get_onednn_linears() -> None:
    model = _model(transformers.LlamaConfig(hidden_act="relu", **_COMMON))
    kernels = plan_cpu_kernels(model, enabled=True)
    assert kernels.description.startswith("onednn linear; packed weights (")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert {id(m) for m, _ in kernels.swaps} == {id(m) for m in linears}
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = model(input_ids=ids).logits
        with kernels.applied():
            ours = model(input_ids=ids).logits
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_kernels_apply_to_float32_cpu_models_only_and_when_enabled() -> None:
    model = _model(transformers.LlamaConfig(**_COMMON))
    assert plan_cpu_kernels(model, enabled=False).swaps == []
    assert plan_cpu_kernels(model, enabled=False).description == "torch (cpu_kernels=false)"
    bf16 = plan_cpu_kernels(model.to(torch.bfloat16), enabled=True)
    assert bf16.swaps == [] and bf16.description == "torch (cpu bfloat16)"


def test_swapped_forwards_are_put_back_after_an_error_and_foreign_wrappers_are_left_alone() -> None:
    model = _model(transformers.LlamaConfig(**_COMMON))
    wrapped = model.model.layers[0].self_attn.q_proj
    wrapped.forward = lambda x: nn.Linear.forward(wrapped, x)  # as accelerate's hooks wrap a module
    kernels = plan_cpu_kernels(model, enabled=True)
    assert id(wrapped) not in {id(m) for m, _ in kernels.swaps}
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.applied():
            assert "forward" in model.model.layers[0].mlp.__dict__
            raise RuntimeError("boom")
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert "forward" in wrapped.__dict__  # still the foreign wrapper


def test_non_float32_inputs_take_the_modules_own_forward() -> None:
    linear = nn.Linear(8, 4).to(torch.float64)
    kernels = plan_cpu_kernels(nn.Sequential(nn.Linear(8, 4), linear), enabled=True)
    x = torch.randn(3, 8, dtype=torch.float64)
    with kernels.applied():
        out = linear(x)  # oneDNN's fp32 kernel would refuse float64
    assert out.dtype == torch.float64 and torch.equal(out, nn.Linear.forward(linear, x))


@pytest.mark.parametrize("mlp_class", ["Qwen2MLP", "Gemma3MLP"])
def test_packed_weights_give_the_unpacked_kernels_outputs_bit_for_bit(mlp_class: str) -> None:
    model = _model(_CONFIGS[mlp_class]())
    packed = plan_cpu_kernels(model, enabled=True, small_rows=False)  # oneDNN at every row count
    plain = plan_cpu_kernels(model, enabled=True, pack_budget_bytes=0)
    weights = {id(m.weight) for m in model.modules() if type(m) is nn.Linear}
    assert len(packed.packs) == len(weights) and len(plain.packs) == 0
    assert "; packed weights (" in packed.description
    assert "; weights not packed (their copy, " in plain.description and "exceeds the 0.00 GB" in plain.description
    head = model.lm_head.weight
    rows = torch.randn(3, head.shape[1])
    assert packed.packs.weight_for(head, rows) is not head  # several rows: the packed copy
    assert packed.packs.weight_for(head, rows[:1]) is head  # one row: the plain weight
    for shape in ((3, 17), (1, 1), (4, 1), (1, 9)):  # prefill, one row alone, decode rows, one prompt
        ids = torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            outputs = []
            for kernels in (packed, plain):
                with kernels.applied():
                    hidden = model.model(input_ids=ids).last_hidden_state
                outputs.append(kernels.linear(hidden, head))
        assert torch.equal(outputs[0], outputs[1]), shape


def test_a_weight_changed_in_place_after_packing_is_packed_again() -> None:
    model = _model(transformers.LlamaConfig(**_COMMON))
    kernels = plan_cpu_kernels(model, enabled=True)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # a merged adapter, say
        model.model.layers[1].self_attn.o_proj.weight.add_(0.1)
        reference = model(input_ids=ids).logits
        with kernels.applied():
            ours = model(input_ids=ids).logits
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4), float((ours - reference).abs().max())


def test_onednn_linear_matches_torch_linear() -> None:
    x, weight, bias = torch.randn(5, 7, 32), torch.randn(48, 32), torch.randn(48)
    assert torch.allclose(onednn_linear(x, weight, bias), nn.functional.linear(x, weight, bias), atol=1e-5)


def test_engine_scores_agree_with_and_without_the_kernels_and_record_them() -> None:
    model = make_model("gemma3", vocab_size=400)
    tokenizer = make_tokenizer(add_bos=True)
    requests = [
        TokenRequest(index=i, context=tuple(tokenizer.encode(f"Question {i}: which one is the capital?")),
                     continuation=tuple(tokenizer.encode(f" answer {c}", add_special_tokens=False)))
        for i, c in enumerate(["one", "two", "paris", "london berlin"])
    ]
    fast = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4)
    plain = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=4, cpu_kernels="false")
    assert fast.batch_info["cpu_kernels"].startswith("onednn linear; in-place Gemma3MLP(gelu); packed weights (")
    assert plain.batch_info["cpu_kernels"] == "torch (cpu_kernels=false)"
    ours, theirs = fast.score_token_requests(requests), plain.score_token_requests(requests)
    for i in ours:
        assert abs(ours[i][0] - theirs[i][0]) < 1e-4 and ours[i][1] == theirs[i][1]


def test_speed_probe_runs_with_the_configured_engines_kernels() -> None:
    from pathlib import Path

    from benchharness.config.experiment import Overrides, load_experiment
    from benchharness.run.runner import probe_kernels

    default = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "default.yaml"
    model = _model(transformers.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, **_COMMON))
    ours = probe_kernels(load_experiment(default, Overrides(engine="benchharness")), model)
    reference = probe_kernels(load_experiment(default, Overrides(engine="hf")), model)
    assert ours.description.startswith("onednn linear; in-place Gemma3MLP(gelu); packed weights (") and ours.swaps
    assert reference.swaps == [] and reference.description == "torch (cpu_kernels=false)"
    # With the run's engine at hand, the probe takes its kernels: the weights are not packed twice.
    engine = BenchEngineLM(model=model, tokenizer=make_tokenizer(), batch_size=4)
    experiment = load_experiment(default, Overrides(engine="benchharness"))
    assert probe_kernels(experiment, model, engine) is engine.kernels
