"""Measurement: statistics, timers, memory, machine limits, the fixed-shape speed probe, hardware.

Principles (design.md, "Measurement principles"): warm up before timing, repeat until both a
minimum count and a minimum duration are reached, report medians and spreads, and judge speed
against limits measured on the same machine in the same run (matmul FLOP/s, memory bandwidth).

What is counted, exactly:
- Model FLOPs per token = 2 x (matmul parameters of the body + the output layer). "Matmul
  parameters" are all parameters with two or more dimensions except the input embedding table
  (a lookup, not a matmul); the output layer counts even when tied to the embedding. Norm
  weights and biases (1-D) are left out, and so are the attention score/value products (which
  grow with context): the figure is a lower bound, the usual "6N/2N" convention. For a
  mixture-of-experts model every expert is counted, not only the active ones.
- Prefill computes vocabulary logits only at the last position (`logits_to_keep=1`, as
  generation does), so a prefill of b x L tokens costs b*L*2*body + b*2*head FLOPs.
- Decode: the first generated token comes from the prefill and is reported as time to first
  token; the decode rate counts the tokens of the following `new_tokens - 1` single-token steps.
- Decode bound: one step reads every weight once (`decode_read_bytes`) and yields `batch`
  tokens, so the bound is batch x bandwidth / bytes; KV-cache reads are not in the bound.
- The matmul limit is the faster of the two fp32 CPU kernels torch offers, its BLAS
  (`torch.matmul`) and oneDNN (the linear kernel the benchharness engine uses on the CPU, see
  `engine/cpu_kernels.py`); elsewhere it is `torch.matmul`'s. Which one is recorded.
- The limits are the fastest of their timed runs (`MachineLimits.peak_flops`, `peak_bandwidth`):
  interference only slows a run down, so the maximum estimates the ceiling. The probe's own figures
  are medians, so on a busy machine efficiency reads low rather than above 1.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypeVar

import numpy as np
import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from benchharness.onednn import onednn_available, onednn_linear

T = TypeVar("T")

PHASES = ("eval", "eval_generate", "prefill", "decode", "serve", "load_cold", "load_warm")
Phase = Literal["eval", "eval_generate", "prefill", "decode", "serve", "load_cold", "load_warm"]
MIB = 1024 * 1024


# --------------------------------------------------------------------------- specs


class ProbeShape(BaseModel):
    """One probe shape: `batch` sequences of `prompt_len` tokens, then `new_tokens` generated."""

    model_config = ConfigDict(extra="forbid")

    batch: int = Field(default=4, gt=0)
    prompt_len: int = Field(default=128, gt=0)
    new_tokens: int = Field(default=32, ge=2, description="forced; >= 2 so there is a decode step after the first token")


class ServeSpec(BaseModel):
    """The serving-style scenario of the speed probe: `requests` synthetic prompts of `prompt_len`
    tokens, all arriving at once, each forced to its own output length (`new_tokens`, cycled over
    the requests), decoded by the engine's continuous batching at each `concurrency` (slots)."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(default=16, gt=0)
    prompt_len: int = Field(default=64, gt=0)
    new_tokens: list[int] = Field(default_factory=lambda: [4, 8, 16, 32], min_length=1, description="output lengths, cycled")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1, description="slots decoding at once")

    @model_validator(mode="after")
    def _positive(self) -> ServeSpec:
        if min(self.new_tokens) < 2 or min(self.concurrency) < 1:
            raise ValueError("serve.new_tokens must be >= 2 (a decode step after the first token) and serve.concurrency >= 1")
        return self


class ProbeSpec(ProbeShape):
    """The `speed` section of an experiment: the probe's shape(s) and repetitions."""

    serve: ServeSpec | None = Field(
        default_factory=ServeSpec, description="the continuous-batching scenario (engine: benchharness); null turns it off"
    )
    extra_shapes: list[ProbeShape] = Field(default_factory=list, description="more shapes, probed after the main one")
    warmup: int = Field(default=2, ge=0, description="untimed runs before the timed ones")
    min_reps: int = Field(default=5, ge=1, description="timed runs at least")
    min_seconds: float = Field(default=3.0, ge=0, description="timed seconds at least, per phase and shape")
    seed: int = Field(default=0, description="seed of the synthetic prompt token ids")
    limits_min_seconds: float = Field(default=2.0, ge=0, description="seconds per machine-limit measurement")

    @model_validator(mode="after")
    def _distinct(self) -> ProbeSpec:
        shapes = [(s.batch, s.prompt_len, s.new_tokens) for s in self.shapes()]
        if len(set(shapes)) != len(shapes):
            raise ValueError("extra_shapes repeats a shape; list each batch/prompt_len/new_tokens once")
        return self

    def shapes(self) -> list[ProbeShape]:
        main = ProbeShape(batch=self.batch, prompt_len=self.prompt_len, new_tokens=self.new_tokens)
        return [main, *self.extra_shapes]


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """Order statistics of a sample; percentiles by linear interpolation (numpy's default)."""

    median: float
    min: float
    max: float
    p25: float
    p75: float
    p90: float
    p99: float
    mean: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, extremes, quartiles, p90, p99 and mean of `values` (at least one value)."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("summarize() needs at least one value")
    if not np.all(np.isfinite(data)):
        raise ValueError("summarize() got a NaN or infinite value")
    p25, p50, p75, p90, p99 = np.percentile(data, [25, 50, 75, 90, 99])
    return Summary(
        median=float(p50), min=float(data.min()), max=float(data.max()), p25=float(p25), p75=float(p75),
        p90=float(p90), p99=float(p99), mean=float(data.mean()), n=int(data.size),
    )


# --------------------------------------------------------------------------- timing


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A function that waits for queued device work, so a clock read after it sees the work done."""
    kind = torch.device(device).type
    if kind == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if kind == "mps":
        return torch.mps.synchronize
    return lambda: None


@dataclass(frozen=True)
class Timed:
    """One timed run: its wall time and whatever the run returned."""

    seconds: float
    value: Any


def repeat_timed(
    run: Callable[[], T],
    *,
    warmup: int,
    min_reps: int,
    min_seconds: float,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timed]:
    """Call `run` `warmup` times untimed, then time it until both `min_reps` and `min_seconds` are met.

    Only the timed calls are returned, so warm-up never reaches a statistic. `sync` runs before each
    clock read (device work is asynchronous); `clock` is a parameter so tests can drive it.
    """
    for _ in range(warmup):
        run()
    sync()
    timed: list[Timed] = []
    total = 0.0
    while len(timed) < min_reps or total < min_seconds:
        start = clock()
        value = run()
        sync()
        elapsed = clock() - start
        total += elapsed
        timed.append(Timed(seconds=elapsed, value=value))
    return timed


# --------------------------------------------------------------------------- memory


class MemorySampler:
    """Peak memory over a `with` block.

    Process RSS is sampled by a background thread every `interval_s` (plus once at enter and at
    exit, so a short block still has samples). RSS is the whole process's, model weights included,
    not a delta; `baseline_rss_mb` is the value at enter. On CUDA the allocator's peaks are reset
    at enter and read at exit.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.baseline_rss_mb: float = 0.0
        self.peak_rss_mb: float = 0.0
        self.samples: int = 0
        self.cuda_max_allocated_mb: float | None = None
        self.cuda_max_reserved_mb: float | None = None
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_memory_mb(self) -> float:
        """The figure for throughput.csv: CUDA max reserved on a GPU (the device footprint), else peak RSS."""
        if self.cuda_max_reserved_mb is not None:
            return self.cuda_max_reserved_mb
        return self.peak_rss_mb

    def _sample(self) -> None:
        rss_mb = self._process.memory_info().rss / MIB
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sample()
        self.baseline_rss_mb = self.peak_rss_mb
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="benchharness-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_max_allocated_mb = torch.cuda.max_memory_allocated(self.device) / MIB
            self.cuda_max_reserved_mb = torch.cuda.max_memory_reserved(self.device) / MIB


# --------------------------------------------------------------------------- machine limits


@dataclass(frozen=True)
class MachineLimits:
    """What the machine can do, measured in this run: the denominators of the efficiency figures."""

    device: str
    dtype: str
    matmul_flops: Summary
    memory_bandwidth: Summary
    matmul_size: int
    bandwidth_bytes: int
    matmul_kernel: str = "torch.matmul"  # the kernel whose FLOP/s are `matmul_flops`

    @property
    def peak_flops(self) -> float:
        """The ceiling for efficiency: the fastest timed run. Interference (other processes, clock
        changes) only ever slows a run down, so the maximum is the best estimate of what the machine
        can do; the median would move with the load of the moment."""
        return self.matmul_flops.max

    @property
    def peak_bandwidth(self) -> float:
        """Bytes/s ceiling, the fastest timed run, for the same reason as `peak_flops`."""
        return self.memory_bandwidth.max

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_flops": self.peak_flops, "peak_bandwidth": self.peak_bandwidth}


def _default_matmul_size(device: torch.device) -> int:
    # Large enough to be compute bound, small enough for a 2-core CPU to finish one in ~0.1 s.
    return 2048 if device.type == "cpu" else 8192


def measure_matmul_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    min_seconds: float = 2.0,
    warmup: int = 2,
    min_reps: int = 5,
    kernel: str = "torch.matmul",
) -> Summary:
    """FLOP/s of square `size` x `size` matmuls (2*size^3 FLOPs each), per timed run.

    `kernel` is "torch.matmul" or "onednn" (oneDNN's linear, float32 on the CPU only). One timed
    run is as many matmuls as fill about 50 ms, so launch overhead on a GPU does not count.
    """
    dev = torch.device(device)
    n = size or _default_matmul_size(dev)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=dev, dtype=dtype)
    sync = synchronizer(dev)

    if kernel == "onednn":

        def one() -> None:
            onednn_linear(a, b)

    elif kernel == "torch.matmul":
        out = torch.empty(n, n, device=dev, dtype=dtype)

        def one() -> None:
            torch.matmul(a, b, out=out)

    else:
        raise ValueError(f"unknown matmul kernel {kernel!r}: 'torch.matmul' or 'onednn'")

    for _ in range(max(warmup, 1)):
        one()
    sync()
    start = time.perf_counter()
    one()
    sync()
    inner = max(1, math.ceil(0.05 / max(time.perf_counter() - start, 1e-9)))

    def run() -> None:
        for _ in range(inner):
            one()

    with torch.inference_mode():
        timed = repeat_timed(run, warmup=0, min_reps=min_reps, min_seconds=min_seconds, sync=sync)
    return summarize([2.0 * n**3 * inner / t.seconds for t in timed])


def measure_memory_bandwidth(
    device: str | torch.device = "cpu",
    nbytes: int | None = None,
    min_seconds: float = 2.0,
    warmup: int = 2,
    min_reps: int = 5,
) -> Summary:
    """Read bandwidth in bytes/s: a sum over a float32 buffer far larger than any cache.

    Reading (not copying) is what a decode step does with the weights, so this is the fitting limit.
    """
    dev = torch.device(device)
    total = nbytes or (256 * MIB if dev.type == "cpu" else 2048 * MIB)
    buffer = torch.ones(total // 4, device=dev, dtype=torch.float32)
    sync = synchronizer(dev)
    with torch.inference_mode():
        timed = repeat_timed(lambda: buffer.sum(), warmup=warmup, min_reps=min_reps, min_seconds=min_seconds, sync=sync)
    return summarize([buffer.numel() * 4 / t.seconds for t in timed])


def measure_machine_limits(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, min_seconds: float = 2.0
) -> MachineLimits:
    """Matmul FLOP/s in the model's dtype (the fastest kernel, see `matmul_kernels`) and memory
    bandwidth, both on `device`."""
    dev = torch.device(device)
    size = _default_matmul_size(dev)
    nbytes = 256 * MIB if dev.type == "cpu" else 2048 * MIB
    measured = {
        kernel: measure_matmul_flops(dev, dtype, size=size, min_seconds=min_seconds, kernel=kernel)
        for kernel in matmul_kernels(dev, dtype)
    }
    fastest = max(measured, key=lambda kernel: measured[kernel].max)
    return MachineLimits(
        device=str(dev),
        dtype=str(dtype).removeprefix("torch."),
        matmul_flops=measured[fastest],
        memory_bandwidth=measure_memory_bandwidth(dev, nbytes=nbytes, min_seconds=min_seconds),
        matmul_size=size,
        bandwidth_bytes=nbytes,
        matmul_kernel=fastest,
    )


def matmul_kernels(device: str | torch.device, dtype: torch.dtype) -> list[str]:
    """The matmul kernels a model may run on: oneDNN too for float32 on a CPU (when torch has it)."""
    if torch.device(device).type == "cpu" and dtype == torch.float32 and onednn_available():
        return ["torch.matmul", "onednn"]
    return ["torch.matmul"]


# --------------------------------------------------------------------------- model arithmetic


@dataclass(frozen=True)
class MatmulParams:
    """Parameters that take part in matmuls: the body and the output layer (see the module docstring)."""

    body: int
    head: int

    @property
    def flops_per_token(self) -> float:
        return 2.0 * (self.body + self.head)

    def generation_flops(self, prompt_tokens: int, generated_tokens: int) -> float:
        """Useful FLOPs of generation: each prompt token once through the body, each generated
        token through the body and the output layer."""
        return 2.0 * (self.body * prompt_tokens + (self.body + self.head) * generated_tokens)


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    # parameters() already deduplicates tied tensors by identity.
    return list(model.parameters())


def _input_embedding_ids(model: torch.nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter) and getter() is not None:
        ids.add(id(getter().weight))
    return ids


def _output_weight(model: torch.nn.Module) -> torch.Tensor | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return None if head is None else head.weight


def matmul_params(model: torch.nn.Module) -> MatmulParams:
    """Count the body's matmul parameters and the output layer's (tied or not)."""
    embedding_ids = _input_embedding_ids(model)
    head = _output_weight(model)
    head_id = None if head is None else id(head)
    body = sum(
        p.numel() for p in _unique_parameters(model) if p.dim() >= 2 and id(p) not in embedding_ids and id(p) != head_id
    )
    return MatmulParams(body=body, head=0 if head is None else head.numel())


def model_flops_per_token(model: torch.nn.Module) -> float:
    """2 x (body matmul parameters + output layer parameters): forward FLOPs per token with logits."""
    return matmul_params(model).flops_per_token


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all (unique) parameters: what the weights occupy in memory."""
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model))


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every weight except an untied input embedding table (a row lookup)."""
    head = _output_weight(model)
    skip = _input_embedding_ids(model) - ({id(head)} if head is not None else set())
    return sum(p.numel() * p.element_size() for p in _unique_parameters(model) if id(p) not in skip)


# --------------------------------------------------------------------------- throughput rows


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


# --------------------------------------------------------------------------- load timing


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


# --------------------------------------------------------------------------- the speed probe


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


# --------------------------------------------------------------------------- hardware


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    # The flags that decide CPU matmul speed per dtype (fp32 FMA, bf16, AMX).
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def hardware_info() -> dict[str, Any]:
    """The machine, for the manifest: CPU, cores, memory, GPU(s), torch threads and versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "cpu_cores_usable": usable,
        "memory_total_gb": round(psutil.virtual_memory().total / 1024**3, 2),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_version": torch.version.cuda,
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {"index": index, "name": props.name, "memory_gb": round(props.total_memory / 1024**3, 2),
                 "capability": f"{props.major}.{props.minor}"}
            )
    return info
