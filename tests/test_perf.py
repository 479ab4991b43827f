"""Tests of the measurement stage (benchharness.measure, engine.model_costs): statistics on known inputs, timers that exclude warm-up, and a probe
whose token counts equal what tiny in-process models really processed and generated.

No test asserts anything about how fast something ran.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import fields

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from benchharness.engine.model_costs import MatmulParams
from benchharness.measure.probe import THROUGHPUT_COLUMNS
from benchharness.engine.onednn import onednn_available
from benchharness.measure.limits import (
    MachineLimits, best_of, matmul_kernels, measure_machine_limits, measure_matmul_flops, measure_memory_bandwidth, rescale_efficiencies,
)
from benchharness.measure.memory import MemorySampler
from benchharness.config.speed_spec import ProbeShape, ProbeSpec
from benchharness.measure.timing import Summary, repeat_timed, summarize
from benchharness.measure.probe import ThroughputRow, eval_row, greedy_decode, load_timer, run_speed_probe, synthetic_prompt
from benchharness.engine.model_costs import decode_read_bytes, matmul_params, model_flops_per_token, weight_bytes
from benchharness.measure.hardware import hardware_info

# The throughput.csv columns as issue #5 names them, in order.
EXPECTED_COLUMNS = [
    "model", "origin", "task", "phase", "batch", "prompt_len", "new_tokens", "tokens", "seconds", "tokens_per_s",
    "tokens_per_s_min", "tokens_per_s_max", "tokens_per_s_p25", "tokens_per_s_p75", "ttft_s",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "peak_memory_mb", "achieved_flops",
    "flops_efficiency", "bandwidth_efficiency", "reps", "ttft_p90_s", "ttft_p99_s",
]

# Tiny sizes: hidden 32, 4 heads of 8, 2 KV heads, MLP 64, 2 layers, vocabulary 128.
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    # Gemma 3 mixes sliding-window and global layers; a window shorter than the probe exercises both.
    config = Gemma3TextConfig(**TINY, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(config).eval()


class FakeTokenizer:
    """What the probe uses of a tokenizer: its length and its special ids."""

    all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return 100


# --------------------------------------------------------------------------- statistics


def test_summarize_known_values() -> None:
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.min, s.max, s.p25, s.p75, s.mean, s.n) == (3.0, 1.0, 5.0, 2.0, 4.0, 3.0, 5)
    assert s.p90 == pytest.approx(4.6) and s.p99 == pytest.approx(4.96)
    assert isinstance(s, Summary) and s.to_dict()["n"] == 5


def test_summarize_even_count_and_single_value() -> None:
    s = summarize([1, 2, 3, 4])
    assert s.median == 2.5 and s.p25 == 1.75 and s.p75 == 3.25 and s.mean == 2.5
    one = summarize([7.0])
    assert (one.median, one.min, one.max, one.p25, one.p99, one.mean, one.n) == (7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 1)


def test_summarize_hundred_values() -> None:
    s = summarize(range(1, 101))
    assert s.median == 50.5 and s.p90 == pytest.approx(90.1) and s.p99 == pytest.approx(99.01) and s.n == 100


def test_summarize_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="NaN"):
        summarize([1.0, float("nan")])


# --------------------------------------------------------------------------- timers


class FakeClock:
    """Every read advances half a second; a timed call reads it twice, so it lasts exactly 0.5 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


def test_repeat_timed_excludes_warmup_and_meets_min_reps() -> None:
    calls: list[int] = []
    timed = repeat_timed(lambda: calls.append(len(calls)) or len(calls), warmup=3, min_reps=4, min_seconds=0.0,
                         clock=FakeClock())
    assert len(calls) == 3 + 4
    assert len(timed) == 4
    assert [t.value for t in timed] == [4, 5, 6, 7]  # the values of calls 4..7: warm-up calls are not in the sample
    assert all(t.seconds == pytest.approx(0.5) for t in timed)


def test_repeat_timed_runs_until_min_seconds() -> None:
    calls = 0

    def run() -> None:
        nonlocal calls
        calls += 1

    timed = repeat_timed(run, warmup=2, min_reps=2, min_seconds=3.2, clock=FakeClock())
    # 0.5 s per call: 7 timed calls reach 3.5 s >= 3.2 s; 6 reach only 3.0 s.
    assert len(timed) == 7
    assert calls == 2 + 7


# --------------------------------------------------------------------------- spec


def test_probe_spec_defaults_and_validation() -> None:
    spec = ProbeSpec()
    assert (spec.batch, spec.prompt_len, spec.new_tokens, spec.warmup, spec.min_reps, spec.min_seconds) == (
        4, 128, 32, 2, 5, 3.0)
    assert spec.shapes() == [ProbeShape(batch=4, prompt_len=128, new_tokens=32)]
    spec = ProbeSpec.model_validate({"batch": 1, "extra_shapes": [{"batch": 8, "prompt_len": 64, "new_tokens": 16}]})
    assert [(s.batch, s.prompt_len) for s in spec.shapes()] == [(1, 128), (8, 64)]
    with pytest.raises(ValidationError, match="extra"):
        ProbeSpec.model_validate({"batch_size": 4})
    with pytest.raises(ValidationError):
        ProbeSpec(new_tokens=1)
    with pytest.raises(ValidationError, match="repeats"):
        ProbeSpec(extra_shapes=[ProbeShape()])


# --------------------------------------------------------------------------- model arithmetic


def test_flop_and_byte_counts_untied() -> None:
    model = tiny_llama(tie=False)
    # Per layer: q 32x32 + k 32x16 + v 32x16 + o 32x32 = 3072; MLP 3 x 32x64 = 6144.
    body = 2 * (3072 + 6144)
    head = 128 * 32
    norms = 2 * 2 * 32 + 32
    assert matmul_params(model) == MatmulParams(body=body, head=head)
    assert model_flops_per_token(model) == 2.0 * (body + head)
    assert weight_bytes(model) == 4 * (body + head + 128 * 32 + norms)  # the input embedding is in memory...
    assert decode_read_bytes(model) == 4 * (body + head + norms)  # ...but a decode step reads only its rows


def test_flop_and_byte_counts_tied() -> None:
    model = tiny_llama(tie=True)
    body, head, norms = 2 * (3072 + 6144), 128 * 32, 2 * 2 * 32 + 32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The tied table is one tensor in memory, and the output layer still costs a matmul per token.
    assert model_flops_per_token(model) == 2.0 * (body + head)
    assert weight_bytes(model) == 4 * (body + head + norms)
    assert decode_read_bytes(model) == weight_bytes(model)


# --------------------------------------------------------------------------- decoding and prompts


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_greedy_decode_forces_length_and_matches_generate(arch: str) -> None:
    model = tiny_model(arch)
    ids = synthetic_prompt(model, None, batch=2, prompt_len=6, seed=3, device="cpu")
    run = greedy_decode(model, ids, new_tokens=7)
    assert run.generated.shape == (2, 7)
    assert len(run.step_seconds) == 6
    # The KV-cache loop is plain greedy decoding: recomputing the whole sequence each step, without a
    # cache, picks the same tokens. (generate() with min_new_tokens is no reference: it masks EOS.)
    sequence = ids
    with torch.inference_mode():
        for _ in range(7):
            logits = model(input_ids=sequence, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(run.generated, sequence[:, 6:], rtol=0, atol=0)


def test_greedy_decode_does_not_stop_at_eos() -> None:
    model = tiny_llama()
    ids = synthetic_prompt(model, None, batch=1, prompt_len=5, seed=0, device="cpu")
    first = greedy_decode(model, ids, new_tokens=2).generated[0, 0].item()
    model.generation_config.eos_token_id = first  # the first token is EOS now; the probe must go on anyway
    model.config.eos_token_id = first
    assert greedy_decode(model, ids, new_tokens=9).generated.shape == (1, 9)


def test_synthetic_prompt_is_seeded_in_vocab_and_skips_special_ids() -> None:
    model = tiny_llama()
    a = synthetic_prompt(model, FakeTokenizer(), batch=3, prompt_len=50, seed=11, device="cpu")
    b = synthetic_prompt(model, FakeTokenizer(), batch=3, prompt_len=50, seed=11, device="cpu")
    c = synthetic_prompt(model, FakeTokenizer(), batch=3, prompt_len=50, seed=12, device="cpu")
    assert a.shape == (3, 50) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 3 and int(a.max()) < 100  # special ids 0-2 out; tokenizer length 100 < embedding 128


# --------------------------------------------------------------------------- the probe


class ForwardCounter:
    """Records the input_ids shape of every forward call of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    def count(self, shape: tuple[int, ...]) -> int:
        return sum(1 for s in self.shapes if s == shape)


def fake_limits(flops: float = 1e9, bandwidth: float = 1e8) -> MachineLimits:
    # The medians are half the maxima, so a test sees which one the efficiency uses.
    return MachineLimits(device="cpu", dtype="float32", matmul_flops=summarize([flops / 4, flops / 2, flops]),
                         memory_bandwidth=summarize([bandwidth / 2, bandwidth]), matmul_size=1, bandwidth_bytes=1)


def test_limits_take_the_best_of_two_measurements_and_restate_rows() -> None:
    slow_matmul, slow_memory = fake_limits(flops=1e9, bandwidth=2e8), fake_limits(flops=2e9, bandwidth=1e8)
    best = best_of(slow_matmul, slow_memory)
    assert (best.peak_flops, best.peak_bandwidth) == (2e9, 2e8)
    assert (best_of(slow_memory, slow_matmul).peak_flops, best_of(slow_memory, slow_matmul).peak_bandwidth) == (2e9, 2e8)
    assert MachineLimits.from_dict({**best.to_dict(), "measurements": []}) == best
    rows = [
        {"flops_efficiency": 0.8, "bandwidth_efficiency": 0.5},
        {"flops_efficiency": "0.4", "bandwidth_efficiency": float("nan")},  # as read back from a CSV
        {"flops_efficiency": None, "bandwidth_efficiency": ""},  # a row without these figures
    ]
    rescale_efficiencies(rows, slow_matmul, best)  # rows computed against 1e9 / 2e8
    assert rows[0] == {"flops_efficiency": pytest.approx(0.4), "bandwidth_efficiency": pytest.approx(0.5)}
    assert rows[1]["flops_efficiency"] == pytest.approx(0.2) and math.isnan(rows[1]["bandwidth_efficiency"])
    assert rows[2] == {"flops_efficiency": None, "bandwidth_efficiency": ""}
    rescale_efficiencies(rows, slow_memory, best)  # 2e9 / 1e8 against 2e9 / 2e8: bandwidth halves
    assert rows[0] == {"flops_efficiency": pytest.approx(0.4), "bandwidth_efficiency": pytest.approx(0.25)}


def test_probe_token_counts_equal_what_the_model_processed() -> None:
    model = tiny_llama()
    spec = ProbeSpec(batch=3, prompt_len=10, new_tokens=5, warmup=2, min_reps=4, min_seconds=0.0)
    counter = ForwardCounter(model)
    prefill, decode = run_speed_probe(model, FakeTokenizer(), spec, "cpu", model_name="tiny", origin="EU")
    counter.handle.remove()

    assert (prefill.phase, decode.phase) == ("prefill", "decode")
    assert prefill.reps == 4 and decode.reps == 4  # min_seconds 0: exactly min_reps timed runs
    # Forwards over the full prompt: every prefill run and every decode run's first step, warm-up included.
    assert counter.count((3, 10)) == (spec.warmup + prefill.reps) + (spec.warmup + decode.reps)
    # Single-token decode steps: new_tokens - 1 per generation.
    assert counter.count((3, 1)) == (spec.warmup + decode.reps) * (spec.new_tokens - 1)
    assert len(counter.shapes) == counter.count((3, 10)) + counter.count((3, 1))
    # The rows count the timed runs' tokens only.
    assert prefill.tokens == prefill.reps * 3 * 10
    assert decode.tokens == decode.reps * 3 * (5 - 1)
    assert (prefill.batch, prefill.prompt_len, prefill.new_tokens) == (3, 10, None)
    assert (decode.batch, decode.prompt_len, decode.new_tokens) == (3, 10, 5)
    assert prefill.model == "tiny" and decode.origin == "EU" and decode.task is None


def test_probe_spread_latency_memory_and_no_limits() -> None:
    model = tiny_llama()
    spec = ProbeSpec(batch=2, prompt_len=8, new_tokens=4, warmup=1, min_reps=3, min_seconds=0.0)
    for row in run_speed_probe(model, None, spec, "cpu"):
        assert row.tokens_per_s_min <= row.tokens_per_s_p25 <= row.tokens_per_s <= row.tokens_per_s_p75
        assert row.tokens_per_s_p75 <= row.tokens_per_s_max
        assert row.seconds > 0 and row.peak_memory_mb > 0
        assert row.flops_efficiency is None and row.bandwidth_efficiency is None  # no limits given
        assert row.achieved_flops > 0
    decode = run_speed_probe(model, None, spec, "cpu")[1]
    assert 0 < decode.ttft_s and 0 < decode.latency_p50_ms <= decode.latency_p90_ms <= decode.latency_p99_ms


def test_probe_extra_shapes_give_a_row_pair_each() -> None:
    model = tiny_llama()
    spec = ProbeSpec(batch=1, prompt_len=4, new_tokens=2, warmup=0, min_reps=1, min_seconds=0.0,
                     extra_shapes=[ProbeShape(batch=2, prompt_len=6, new_tokens=3)])
    rows = run_speed_probe(model, None, spec, "cpu")
    assert [(r.phase, r.batch, r.prompt_len, r.tokens) for r in rows] == [
        ("prefill", 1, 4, 4), ("decode", 1, 4, 1), ("prefill", 2, 6, 12), ("decode", 2, 6, 4)]


def test_probe_efficiency_against_given_limits() -> None:
    model = tiny_llama()
    limits = fake_limits(flops=1e9, bandwidth=1e8)
    assert (limits.peak_flops, limits.peak_bandwidth) == (1e9, 1e8)
    spec = ProbeSpec(batch=2, prompt_len=8, new_tokens=3, warmup=0, min_reps=2, min_seconds=0.0)
    prefill, decode = run_speed_probe(model, None, spec, "cpu", limits=limits)
    assert prefill.flops_efficiency == pytest.approx(prefill.achieved_flops / 1e9)
    assert decode.achieved_flops == pytest.approx(model_flops_per_token(model) * decode.tokens_per_s)
    assert decode.flops_efficiency == pytest.approx(decode.achieved_flops / 1e9)
    # One step reads the weights once and yields `batch` tokens.
    bound = 2 * 1e8 / decode_read_bytes(model)
    assert decode.bandwidth_efficiency == pytest.approx(decode.tokens_per_s / bound)
    assert prefill.bandwidth_efficiency is None


def test_probe_restores_training_mode() -> None:
    model = tiny_llama().train()
    run_speed_probe(model, None, ProbeSpec(batch=1, prompt_len=3, new_tokens=2, warmup=0, min_reps=1,
                                           min_seconds=0.0), "cpu")
    assert model.training


# --------------------------------------------------------------------------- rows


def test_row_fields_are_the_throughput_columns() -> None:
    assert [f.name for f in fields(ThroughputRow)] == EXPECTED_COLUMNS
    assert THROUGHPUT_COLUMNS == EXPECTED_COLUMNS
    row = ThroughputRow(model="m", origin="CN", task=None, phase="decode", tokens=4)
    assert list(row.to_dict()) == EXPECTED_COLUMNS
    assert row.to_dict()["seconds"] is None
    with pytest.raises(ValueError, match="phase"):
        ThroughputRow(model="m", origin="CN", task=None, phase="warmup")


def test_row_fields_match_the_store() -> None:
    """The results store's throughput table has throughput.csv's columns, after the run id."""
    from benchharness.store.results_db import STORE_THROUGHPUT_COLUMNS
    assert STORE_THROUGHPUT_COLUMNS == ["run_id", *EXPECTED_COLUMNS]


def test_eval_row_known_values() -> None:
    limits = fake_limits(flops=1e6)
    row = eval_row(model="m", origin="US", task="mmlu", batch_tokens=[100, 200, 300], batch_seconds=[1.0, 1.0, 2.0],
                   flops_per_token=1000.0, limits=limits, peak_memory_mb=12.0)
    assert (row.phase, row.tokens, row.seconds, row.reps) == ("eval", 600, 4.0, 3)
    assert row.tokens_per_s == 150.0  # total over total
    assert (row.tokens_per_s_min, row.tokens_per_s_max) == (100.0, 200.0)  # per-batch rates 100, 200, 150
    assert row.achieved_flops == 150_000.0 and row.flops_efficiency == 0.15
    generated = eval_row(model="m", origin="US", task="gsm8k", batch_tokens=[10], batch_seconds=[2.0], generated=True)
    assert generated.phase == "eval_generate" and generated.tokens_per_s == 5.0 and generated.flops_efficiency is None
    with pytest.raises(ValueError):
        eval_row(model="m", origin="US", task="t", batch_tokens=[1], batch_seconds=[])


# --------------------------------------------------------------------------- memory, load, limits, hardware


def test_memory_sampler_sees_an_allocation() -> None:
    with MemorySampler("cpu", interval_s=0.005) as memory:
        block = np.ones(256 * 1024 * 1024 // 8)  # 256 MiB, touched
        # Keep it alive until the sampling thread has run twice: on a busy machine it may not
        # get the GIL while numpy fills and sums the block.
        seen = memory.samples
        deadline = time.monotonic() + 10
        while memory.samples < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        del block
    assert memory.samples >= 2
    assert memory.peak_rss_mb >= memory.baseline_rss_mb + 200
    assert memory.peak_memory_mb == memory.peak_rss_mb
    assert memory.cuda_max_allocated_mb is None and memory.cuda_max_reserved_mb is None


def test_load_timer_fills_a_row() -> None:
    with load_timer("load_warm") as timing:
        model = tiny_llama()
    assert model is not None and timing.seconds > 0 and timing.peak_memory_mb > 0
    row = timing.row("tiny", "EU")
    assert (row.phase, row.seconds, row.reps, row.tokens) == ("load_warm", timing.seconds, 1, None)
    with pytest.raises(ValueError, match="load_cold or load_warm"):
        with load_timer("prefill"):  # type: ignore[arg-type]
            pass


def test_machine_limit_measurements_return_summaries() -> None:
    flops = measure_matmul_flops("cpu", torch.float32, size=64, min_seconds=0.0, warmup=1, min_reps=3)
    bandwidth = measure_memory_bandwidth("cpu", nbytes=1024 * 1024, min_seconds=0.0, warmup=1, min_reps=3)
    for summary in (flops, bandwidth):
        assert summary.n == 3 and 0 < summary.min <= summary.median <= summary.max
    with pytest.raises(ValueError, match="unknown matmul kernel"):
        measure_matmul_flops("cpu", torch.float32, size=64, min_seconds=0.0, kernel="cublas")


def test_machine_limits_take_the_fastest_matmul_kernel() -> None:
    kernels = matmul_kernels("cpu", torch.float32)
    assert kernels[0] == "torch.matmul"
    assert ("onednn" in kernels) == ("onednn packed" in kernels) == onednn_available()
    assert matmul_kernels("cpu", torch.bfloat16) == ["torch.matmul"]
    if onednn_available():
        for kernel in ("onednn", "onednn packed"):
            onednn = measure_matmul_flops("cpu", torch.float32, size=64, min_seconds=0.0, min_reps=3, kernel=kernel)
            assert onednn.n == 3 and onednn.min > 0
    limits = measure_machine_limits("cpu", torch.float32, min_seconds=0.0)
    assert limits.matmul_kernel in kernels and limits.to_dict()["matmul_kernel"] == limits.matmul_kernel


def test_hardware_info_is_json_ready() -> None:
    info = hardware_info()
    for key in ("cpu_model", "cpu_cores_logical", "cpu_cores_usable", "memory_total_gb", "torch_threads", "gpus"):
        assert key in info
    assert info["torch_threads"] == torch.get_num_threads()
    json.dumps(info)
