"""The fixed-shape speed probe and the rows of throughput.csv.

What is counted, exactly:
- Prefill computes vocabulary logits only at the last position (`logits_to_keep=1`, as
  generation does), so a prefill of b x L tokens costs b*L*2*body + b*2*head FLOPs.
- Decode: the first generated token comes from the prefill and is reported as time to first
  token; the decode rate counts the tokens of the following `new_tokens - 1` single-token steps.
- Efficiency: achieved FLOP/s over the machine's measured peak (`measure/limits.py`); model
  FLOPs and decode bytes as `engine/model_costs.py` counts them.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch

from benchharness.config.catalog import ModelEntry
from benchharness.config.speed_spec import ProbeSpec
from benchharness.engine.kv_slots import bytes_per_token as kv_bytes_per_token
from benchharness.engine.model_costs import (
    MatmulParams,
    decode_read_bytes,
    matmul_params,
)
from benchharness.measure.limits import MachineLimits
from benchharness.measure.memory import MemorySampler
from benchharness.measure.timing import Summary, repeat_timed, summarize, synchronizer

PHASES = ("eval", "eval_generate", "prefill", "decode", "serve", "load_cold", "load_warm")


Phase = Literal["eval", "eval_generate", "prefill", "decode", "serve", "load_cold", "load_warm"]


@dataclass
class ThroughputRow:
    """One row of throughput.csv; field order is the column order. Missing values are None.

    Per phase: `tokens` and `seconds` are totals over the timed runs (`reps` of them);
    `tokens_per_s` is the median of the per-run rates and min/max/p25/p75 their spread.
    eval: tokens scored by the evaluation (forwarded context + continuation); eval_generate:
    tokens the evaluation generated. prefill: batch x prompt_len per run. decode: batch x
    (new_tokens - 1) per run (the first token is in ttft_s); latency_*: one step's time.
    serve: the continuous-batching scenario at `batch` slots: every request's tokens over the
    wall time; ttft_s / ttft_p90_s / ttft_p99_s over the requests (from their common arrival),
    latency_*: time per output token after the first, over the requests. load_*: seconds only.
    """

    model: str
    origin: str
    task: str | None
    phase: str
    batch: int | None = None
    prompt_len: int | None = None
    new_tokens: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_min: float | None = None
    tokens_per_s_max: float | None = None
    tokens_per_s_p25: float | None = None
    tokens_per_s_p75: float | None = None
    ttft_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    peak_memory_mb: float | None = None
    achieved_flops: float | None = None
    flops_efficiency: float | None = None
    bandwidth_efficiency: float | None = None
    reps: int | None = None
    ttft_p90_s: float | None = None  # serve: time to first token over the requests (ttft_s is the median)
    ttft_p99_s: float | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r} is not one of {', '.join(PHASES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


THROUGHPUT_COLUMNS = [f.name for f in fields(ThroughputRow)]


def _rate_fields(rates: Summary) -> dict[str, float]:
    return {
        "tokens_per_s": rates.median, "tokens_per_s_min": rates.min, "tokens_per_s_max": rates.max,
        "tokens_per_s_p25": rates.p25, "tokens_per_s_p75": rates.p75,
    }


def eval_row(
    *,
    model: str,
    origin: str,
    task: str,
    batch_tokens: Sequence[int],
    batch_seconds: Sequence[float],
    generated: bool = False,
    peak_memory_mb: float | None = None,
    flops_per_token: float | None = None,
    limits: MachineLimits | None = None,
) -> ThroughputRow:
    """The evaluation's own throughput for one task, from per-batch token counts and wall times.

    `generated=False`: tokens scored (phase "eval"); `generated=True`: tokens generated
    ("eval_generate"). `tokens_per_s` is total tokens / total seconds; the spread is over batches.
    """
    if len(batch_tokens) != len(batch_seconds) or not batch_tokens:
        raise ValueError("eval_row() needs one token count per batch time, and at least one batch")
    tokens, seconds = int(sum(batch_tokens)), float(sum(batch_seconds))
    spread = summarize([n / s for n, s in zip(batch_tokens, batch_seconds, strict=True) if s > 0] or [0.0])
    rate = tokens / seconds if seconds > 0 else 0.0
    achieved = flops_per_token * rate if flops_per_token is not None else None
    efficiency = achieved / limits.peak_flops if achieved is not None and limits is not None else None
    return ThroughputRow(
        model=model, origin=origin, task=task, phase="eval_generate" if generated else "eval",
        tokens=tokens, seconds=seconds, **{**_rate_fields(spread), "tokens_per_s": rate},
        peak_memory_mb=peak_memory_mb, achieved_flops=achieved, flops_efficiency=efficiency, reps=len(batch_tokens),
    )


@dataclass
class LoadTiming:
    """Filled in when a `load_timer` block ends."""

    phase: str
    seconds: float = 0.0
    peak_memory_mb: float = 0.0

    def row(self, model: str, origin: str) -> ThroughputRow:
        return ThroughputRow(
            model=model, origin=origin, task=None, phase=self.phase, seconds=self.seconds,
            peak_memory_mb=self.peak_memory_mb, reps=1,
        )


@contextlib.contextmanager
def load_timer(phase: Literal["load_cold", "load_warm"], device: str | torch.device = "cpu") -> Iterator[LoadTiming]:
    """Time a model load and its peak memory: `with load_timer("load_cold", dev) as t: model = load(...)`.

    "Cold" is a load from the source (download or GGUF conversion included); "warm" a reload from
    the harness's cache. Loads are one-off, so this is one timed run, no warm-up.
    """
    if phase not in ("load_cold", "load_warm"):
        raise ValueError(f"load_timer phase must be load_cold or load_warm, not {phase!r}")
    timing = LoadTiming(phase=phase)
    sync = synchronizer(device)
    with MemorySampler(device) as memory:
        start = time.perf_counter()
        yield timing
        sync()
        timing.seconds = time.perf_counter() - start
    timing.peak_memory_mb = memory.peak_memory_mb


@dataclass(frozen=True)
class DecodeRun:
    """One forced-length greedy generation: the tokens and where the time went."""

    generated: torch.Tensor  # (batch, new_tokens)
    ttft_s: float
    step_seconds: list[float] = field(default_factory=list)  # new_tokens - 1 single-token steps

    @property
    def decode_seconds(self) -> float:
        return float(sum(self.step_seconds))


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    # Logits at the last position only, as generation computes them, where the model allows it.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def synthetic_prompt(
    model: torch.nn.Module, tokenizer: Any, batch: int, prompt_len: int, seed: int, device: str | torch.device
) -> torch.Tensor:
    """Token ids drawn uniformly (seeded) from the vocabulary, special tokens left out."""
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    allowed = torch.ones(vocab, dtype=torch.bool)
    special = [i for i in getattr(tokenizer, "all_special_ids", []) or [] if 0 <= i < vocab]
    allowed[special] = False
    pool = allowed.nonzero().squeeze(1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.randint(0, pool.numel(), (batch, prompt_len), generator=gen)
    return pool[picks].to(device)


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module, input_ids: torch.Tensor, new_tokens: int, sync: Callable[[], None] = lambda: None
) -> DecodeRun:
    """Generate exactly `new_tokens` tokens per row, greedily, with a KV cache; EOS does not stop it.

    Time to first token covers the prefill and the first token's choice; each later step is timed alone.
    """
    kwargs = _forward_kwargs(model)
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, **kwargs)
    token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    sync()
    ttft = time.perf_counter() - start
    past = out.past_key_values
    tokens = [token]
    steps: list[float] = []
    for _ in range(new_tokens - 1):
        step_start = time.perf_counter()
        out = model(input_ids=token, past_key_values=past, use_cache=True, **kwargs)
        token = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        past = out.past_key_values
        sync()
        steps.append(time.perf_counter() - step_start)
        tokens.append(token)
    return DecodeRun(generated=torch.cat(tokens, dim=1), ttft_s=ttft, step_seconds=steps)


def _efficiency(achieved_flops: float, limits: MachineLimits | None) -> float | None:
    return None if limits is None else achieved_flops / limits.peak_flops


def _probe_prefill(
    model: torch.nn.Module, ids: torch.Tensor, spec: ProbeSpec, device: torch.device,
    params: MatmulParams, limits: MachineLimits | None, name: str, origin: str,
) -> ThroughputRow:
    batch, prompt_len = ids.shape
    kwargs = _forward_kwargs(model)
    sync = synchronizer(device)
    head_positions = batch if kwargs else batch * prompt_len
    flops_per_run = 2.0 * (params.body * batch * prompt_len + params.head * head_positions)

    def run() -> None:
        model(input_ids=ids, use_cache=True, **kwargs)

    with MemorySampler(device) as memory, torch.inference_mode():
        timed = repeat_timed(run, warmup=spec.warmup, min_reps=spec.min_reps, min_seconds=spec.min_seconds, sync=sync)
    tokens_per_run = batch * prompt_len
    rates = summarize([tokens_per_run / t.seconds for t in timed])
    achieved = summarize([flops_per_run / t.seconds for t in timed]).median
    return ThroughputRow(
        model=name, origin=origin, task=None, phase="prefill", batch=batch, prompt_len=prompt_len,
        tokens=tokens_per_run * len(timed), seconds=sum(t.seconds for t in timed), **_rate_fields(rates),
        peak_memory_mb=memory.peak_memory_mb, achieved_flops=achieved, flops_efficiency=_efficiency(achieved, limits),
        reps=len(timed),
    )


def _probe_decode(
    model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, spec: ProbeSpec, device: torch.device,
    params: MatmulParams, read_bytes: int, limits: MachineLimits | None, name: str, origin: str,
) -> ThroughputRow:
    batch, prompt_len = ids.shape
    sync = synchronizer(device)
    with MemorySampler(device) as memory:
        timed = repeat_timed(
            lambda: greedy_decode(model, ids, new_tokens, sync),
            warmup=spec.warmup, min_reps=spec.min_reps, min_seconds=spec.min_seconds, sync=sync,
        )
    runs: list[DecodeRun] = [t.value for t in timed]
    tokens_per_run = batch * (new_tokens - 1)
    rates = summarize([tokens_per_run / r.decode_seconds for r in runs])
    latency = summarize([s * 1000.0 for r in runs for s in r.step_seconds])
    achieved = params.flops_per_token * rates.median
    bandwidth_eff = None
    if limits is not None and read_bytes > 0:
        bound = batch * limits.peak_bandwidth / read_bytes
        bandwidth_eff = rates.median / bound
    return ThroughputRow(
        model=name, origin=origin, task=None, phase="decode", batch=batch, prompt_len=prompt_len,
        new_tokens=new_tokens, tokens=tokens_per_run * len(runs), seconds=sum(r.decode_seconds for r in runs),
        **_rate_fields(rates), ttft_s=summarize([r.ttft_s for r in runs]).median,
        latency_p50_ms=latency.median, latency_p90_ms=latency.p90, latency_p99_ms=latency.p99,
        peak_memory_mb=memory.peak_memory_mb, achieved_flops=achieved, flops_efficiency=_efficiency(achieved, limits),
        bandwidth_efficiency=bandwidth_eff, reps=len(runs),
    )


def run_speed_probe(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ProbeSpec,
    device: str | torch.device,
    *,
    limits: MachineLimits | None = None,
    model_name: str = "",
    origin: str = "",
) -> list[ThroughputRow]:
    """The fixed-shape probe: per shape, a prefill row and a decode row.

    `model` must already be on `device`. Without `limits` the efficiency columns stay None.
    """
    dev = torch.device(device)
    params = matmul_params(model)
    read_bytes = decode_read_bytes(model)
    was_training = model.training
    model.eval()
    rows: list[ThroughputRow] = []
    try:
        for shape in spec.shapes():
            ids = synthetic_prompt(model, tokenizer, shape.batch, shape.prompt_len, spec.seed, dev)
            rows.append(_probe_prefill(model, ids, spec, dev, params, limits, model_name, origin))
            rows.append(
                _probe_decode(model, ids, shape.new_tokens, spec, dev, params, read_bytes, limits, model_name, origin)
            )
    finally:
        model.train(was_training)
    return rows


def format_rows(rows: Sequence[ThroughputRow]) -> str:
    """A compact text table of the main figures, for the `speed` command's output."""
    header = f"{'phase':<14}{'batch':>6}{'prompt':>7}{'new':>5}{'tok/s':>10}{'p25-p75':>18}{'ttft s':>8}" \
             f"{'p50 ms':>8}{'p99 ms':>8}{'peak MB':>9}{'flop eff':>9}{'bw eff':>8}{'reps':>5}"
    lines = [header]

    def fmt(value: float | int | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        spread = "-" if r.tokens_per_s_p25 is None else f"{r.tokens_per_s_p25:.1f}-{r.tokens_per_s_p75:.1f}"
        lines.append(
            f"{r.phase:<14}{fmt(r.batch, 'd'):>6}{fmt(r.prompt_len, 'd'):>7}{fmt(r.new_tokens, 'd'):>5}"
            f"{fmt(r.tokens_per_s, '.1f'):>10}{spread:>18}{fmt(r.ttft_s, '.3f'):>8}{fmt(r.latency_p50_ms, '.1f'):>8}"
            f"{fmt(r.latency_p99_ms, '.1f'):>8}{fmt(r.peak_memory_mb, '.0f'):>9}{fmt(r.flops_efficiency, '.2f'):>9}"
            f"{fmt(r.bandwidth_efficiency, '.2f'):>8}{fmt(r.reps, 'd'):>5}"
        )
    return "\n".join(lines)


# The evaluation's own throughput rows (phases eval and eval_generate), from the metered model's counters.


@dataclass(frozen=True)
class DecodeBytes:
    """What one decode step reads: every weight once, and each running row's keys and values."""

    weights: int
    kv_per_token: int  # one cache slot of one row, every layer

    @classmethod
    def of(cls, model: torch.nn.Module) -> DecodeBytes:
        """A model's weights as a decode step reads them, and its keys and values per cache slot, in its dtype."""
        return cls(
            weights=decode_read_bytes(model),
            kv_per_token=kv_bytes_per_token(model.config.get_text_config(), next(model.parameters()).dtype),
        )

    def read(self, steps: int, kv_slot_reads: int) -> int:
        """Bytes `steps` decode steps read, whose running rows read `kv_slot_reads` cache slots in all."""
        return steps * self.weights + kv_slot_reads * self.kv_per_token


def eval_rows(
    entry: ModelEntry, task: str, per_rank: list[dict[str, Any]], batch_size: int | str,
    params: MatmulParams, limits: MachineLimits | None, decode_bytes: DecodeBytes | None = None,
) -> list[dict[str, Any]]:
    """Throughput of the evaluation itself: tokens scored per second, and tokens generated per second.

    `eval` / `eval_generate` are the whole evaluation: every rank's tokens over the seconds of
    the slowest rank (ranks run at the same time). With several ranks, `eval_rank<N>` /
    `eval_generate_rank<N>` rows give rank N's own figures (the report reads `eval`).
    `achieved_flops` counts useful work only: the model body over every needed token and the
    output layer where a token is scored or generated. For `eval_generate` with the engine,
    `bandwidth_efficiency` is the decode steps' bytes (every weight per step, plus each running
    row's cached keys and values, padding slots included) over their own seconds, over the
    in-run memory bandwidth.
    """
    # With batch_size auto the chosen budget is in the manifest (models.<name>.batch), not a single number.
    batch = batch_size if isinstance(batch_size, int) else None
    # Ranks on one shared device (the CPU) share its peak; ranks on their own GPUs add theirs up.
    devices = len({c["device"] for c in per_rank})

    def useful_flops(phase: str, c: dict[str, Any]) -> float:
        if phase.startswith("eval_generate"):
            return params.generation_flops(int(c["generate_prompt_tokens"]), int(c["generated_tokens"]))
        return 2.0 * (params.body * int(c["prompt_tokens"]) + params.head * int(c["scored_tokens"]))

    def row(phase: str, tokens: int, seconds: float, flops: float, peak_mb: float, peak_flops: float | None) -> dict[str, Any]:
        rate = tokens / seconds
        achieved = flops / seconds
        return {
            "model": entry.name, "origin": entry.origin, "task": task, "phase": phase, "batch": batch, "tokens": tokens, "reps": 1,
            "seconds": round(seconds, 4), "tokens_per_s": round(rate, 2), "peak_memory_mb": round(peak_mb, 1),
            "achieved_flops": achieved, "flops_efficiency": achieved / peak_flops if peak_flops else None,
        }

    rows = []
    for phase, tokens_key, seconds_key in (("eval", "prompt_tokens", "score_seconds"), ("eval_generate", "generated_tokens", "generate_seconds")):
        tokens = sum(int(c[tokens_key]) for c in per_rank)
        seconds = max(float(c[seconds_key]) for c in per_rank)
        if tokens == 0 or seconds <= 0:
            continue
        peak = max(float(c["peak_memory_mb"]) for c in per_rank)
        flops = sum(useful_flops(phase, c) for c in per_rank)
        rows.append(row(phase, tokens, seconds, flops, peak, limits.peak_flops * devices if limits else None))
        decode_seconds = max(float(c.get("decode_seconds", 0.0)) for c in per_rank)
        if phase == "eval_generate" and decode_bytes is not None and limits is not None and decode_seconds > 0:
            read = sum(decode_bytes.read(int(c["decode_steps"]), int(c["decode_kv_slot_reads"])) for c in per_rank)
            rows[-1]["bandwidth_efficiency"] = read / decode_seconds / (limits.peak_bandwidth * devices)
        if len(per_rank) > 1:
            for rank, c in enumerate(per_rank):
                if c[tokens_key] and c[seconds_key] > 0:
                    rows.append(row(f"{phase}_rank{rank}", int(c[tokens_key]), float(c[seconds_key]), useful_flops(phase, c), float(c["peak_memory_mb"]), limits.peak_flops if limits else None))
    return rows
