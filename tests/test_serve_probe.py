"""The speed probe's continuous-batching scenario: every request's forced tokens counted, one row
per concurrency level, and requests admitted into free slots in the order they arrived."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from test_engine_support import make_model, make_tokenizer, one_torch_thread  # noqa: F401  (a fixture)

from benchharness.engine.continuous import Prompt, SlotPlan, generate
from benchharness.engine.generation import DecodeSettings
from benchharness.engine.head import split_model
from benchharness.measure.limits import MachineLimits
from benchharness.config.speed_spec import ProbeSpec, ServeSpec
from benchharness.measure.timing import Summary
from benchharness.measure.probe import ThroughputRow
from benchharness.measure.serve_probe import run_serve_probe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _limits(flops: float) -> MachineLimits:
    one = Summary(median=flops, min=flops, max=flops, p25=flops, p75=flops, p90=flops, p99=flops, mean=flops, n=1)
    return MachineLimits(device="cpu", dtype="float32", matmul_flops=one, memory_bandwidth=one, matmul_size=64,
                         bandwidth_bytes=1, matmul_kernel="torch.matmul")


def test_one_row_per_level_with_every_forced_token() -> None:
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer))
    spec = ServeSpec(requests=6, prompt_len=10, new_tokens=[2, 5, 9], concurrency=[1, 3, 6])
    rows = run_serve_probe(model, tokenizer, spec, "cpu", limits=_limits(1e12), model_name="tiny", origin="EU")
    assert [r.batch for r in rows] == [1, 3, 6]
    for row in rows:
        assert isinstance(row, ThroughputRow) and row.phase == "serve"
        assert row.tokens == 2 * (2 + 5 + 9)  # no EOS and no stop: each request runs to its own length
        assert row.tokens_per_s == pytest.approx(row.tokens / row.seconds)
        assert row.ttft_s <= row.ttft_p90_s <= row.ttft_p99_s <= row.seconds
        assert 0 < row.latency_p50_ms <= row.latency_p90_ms <= row.latency_p99_ms
        assert row.flops_efficiency == pytest.approx(row.achieved_flops / 1e12)


def test_slots_are_filled_in_arrival_order_and_refilled_as_requests_finish() -> None:
    tokenizer = make_tokenizer()
    model = make_model("qwen2", len(tokenizer))
    split = split_model(model, check=False)
    prompts = [Prompt(i, tuple(range(5 + i, 17 + i)), None, n) for i, n in enumerate([3, 9, 4, 6, 2])]
    settings = DecodeSettings(max_new_tokens=9, stop_strings=(), eos_token_ids=frozenset())
    one = SlotPlan(slots=1, kv_budget_bytes=None, kv_bytes_per_token=0, refill=True)
    _, counts = generate(split, prompts, settings, one, pad_token_id=0, decode=lambda _ids: "")
    for earlier, later in zip(prompts, prompts[1:]):  # one slot: each starts after the previous finished
        assert counts.first_token_s[later.index] > counts.finish_s[earlier.index]
    two = SlotPlan(slots=2, kv_budget_bytes=None, kv_bytes_per_token=0, refill=True)
    outputs, counts = generate(split, prompts, settings, two, pad_token_id=0, decode=lambda _ids: "")
    assert counts.max_running == 2 and counts.refills == 3  # three newcomers joined a running row
    assert [len(outputs[p.index]) for p in prompts] == [3, 9, 4, 6, 2]
    # Request 2 takes the slot request 0 left (after 3 tokens) while request 1 still decodes.
    assert counts.finish_s[0] < counts.first_token_s[2] < counts.finish_s[1]
    static = SlotPlan(slots=2, kv_budget_bytes=None, kv_bytes_per_token=0, refill=False)
    same, counts = generate(split, prompts, settings, static, pad_token_id=0, decode=lambda _ids: "")
    assert same == outputs and counts.refills == 0


def test_serve_spec_is_on_by_default_and_validated() -> None:
    assert ProbeSpec().serve == ServeSpec()
    assert ProbeSpec.model_validate({"serve": None}).serve is None
    with pytest.raises(ValidationError, match="new_tokens"):
        ProbeSpec.model_validate({"serve": {"new_tokens": [1, 4]}})
    with pytest.raises(ValidationError, match="extra"):
        ProbeSpec.model_validate({"serve": {"rate": 3}})
