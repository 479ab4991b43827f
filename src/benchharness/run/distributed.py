"""Several processes on one experiment, over torch.distributed: the process group, the few
collectives the run loop needs, and the `--processes N` launcher.

A run is distributed when a launcher started it: `accelerate launch`, `torchrun` and
`python -m torch.distributed.run` all set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Without them (WORLD_SIZE unset or 1) nothing here is used and a run is a plain
single process, exactly as before.

accelerate's `PartialState.main_process_first()` / `local_main_process_first()` do what
`main_first` does on the happy path, but when the main process raises inside the block the
others stay at their barrier until the process group's timeout (here 12 hours): bad input
found by rank 0 would hang every other rank. `main_first` and `on_main` broadcast rank 0's
failure instead, so every rank stops at once with one line. They are kept for that reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from benchharness.config.experiment import EXTERNAL_ENGINES
from benchharness.errors import ConfigError, HarnessError, SourceError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Ranks wait for each other at barriers and gathers: while rank 0 converts a model or runs the
# speed probe, or (parallel: models) while the slowest model of a round finishes. A crashed
# rank is noticed by the launcher, which stops the others, so the timeout only bounds a hang.
TIMEOUT = dt.timedelta(hours=int(os.environ.get("BENCHHARNESS_DIST_TIMEOUT_HOURS", "12")))


class RankZeroFailed(HarnessError):
    """Rank 0 failed while the others waited for it; rank 0 already printed why."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str  # this rank's device: cuda:LOCAL_RANK on GPUs, cpu otherwise

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather_tensor(self, tensor: Any) -> Any:
        """Every rank's `tensor`, stacked (0-d) or concatenated (n-d) in rank order, on every rank."""
        import torch
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def describe(self, devices: list[str], mode: str) -> dict[str, Any]:
        """The manifest's record of how the run was spread."""
        return {"world_size": self.world_size, "backend": self.backend, "parallel": mode, "rank_devices": devices}


def launched_world_size() -> int:
    """WORLD_SIZE as a launcher set it; 1 when this process was started on its own."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"environment: WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number. Fix: unset it, or start the run with accelerate launch / torchrun.") from None


def init_from_env(requested_device: str) -> DistContext | None:
    """Join the process group a launcher set up; None for a single-process run.

    Backend gloo on CPU, nccl on CUDA; each rank uses cuda:LOCAL_RANK, or the CPU.
    """
    world_size = launched_world_size()
    if world_size <= 1:
        return None
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"environment: WORLD_SIZE={world_size} but {', '.join(missing)} unset. Fix: start several processes with `benchharness run CONFIG --processes N`, accelerate launch or torchrun.")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if requested_device == "mps":
        raise ConfigError("inference.device: mps cannot be shared by several processes. Fix: run a single process, or use cpu / cuda.")
    wants_cuda = requested_device.startswith("cuda") or (requested_device == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise SourceError(f"device '{requested_device}' requested but torch sees no CUDA GPU. Fix: set inference.device: cpu (processes then share the CPU, backend gloo).")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} (local rank {local_rank}) has no GPU: this machine has {torch.cuda.device_count()}. Fix: start at most one process per GPU (--processes / --nproc_per_node / num_processes).")
        if requested_device.startswith("cuda:"):
            log.warning("inference.device %s: with several processes each rank uses its own GPU (rank %d -> cuda:%d)", requested_device, rank, local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
        torch.cuda.set_device(local_rank)
    else:
        device, backend = "cpu", "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    log.info("process %d of %d (local rank %d) on %s, backend %s", rank, world_size, local_rank, device, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, device=device)


def main_first(ctx: DistContext | None, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the first process of every other node, then on the rest:
    for work that fills a cache (data preparation, GGUF conversion) and must not race, whether
    the cache is shared by the nodes or not. Every rank leaves together.

    If rank 0 fails, the others raise RankZeroFailed instead of waiting forever.
    """
    if ctx is None:
        return fn()
    result: T | None = None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:
            ctx.broadcast(f"{type(exc).__name__}: {exc}")
            raise
    failure = ctx.broadcast(None)
    if failure is not None:
        raise RankZeroFailed(f"rank 0 failed: {failure}")
    for turn in (ctx.local_rank == 0, ctx.local_rank != 0):
        if turn and not ctx.is_main:
            result = fn()
        # Files written by `fn` are renamed into place whole, so a rank that reads them while
        # another rewrites them (same content) sees one version or the other, never half of one.
        ctx.barrier()
    return result  # type: ignore[return-value]


def shutdown(ctx: DistContext | None) -> None:
    if ctx is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def strip_processes(argv: list[str]) -> list[str]:
    """The command line without `--processes N` / `--processes=N`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: list[str], processes: int) -> int:
    """Run `benchharness <argv>` in `processes` processes on this machine under torch's own
    launcher (what `torchrun` and `accelerate launch` run); returns its exit code."""
    env = dict(os.environ)
    # torch.distributed.run would set 1 thread per process and warn; share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    command = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={processes}", "--nnodes=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{_free_port()}",
        "-m", "benchharness", *argv,
    ]
    log.info("launching %d processes: %s", processes, " ".join(command))
    return subprocess.call(command, env=env)


def on_main(ctx: DistContext | None, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only (writing the run folder, measuring the machine); every rank gets its result.

    If rank 0 fails, the others raise RankZeroFailed instead of waiting forever.
    """
    if ctx is None:
        return fn()
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:
            ctx.broadcast((False, f"{type(exc).__name__}: {exc}"))
            raise
        return ctx.broadcast((True, result))[1]
    ok, value = ctx.broadcast(None)
    if not ok:
        raise RankZeroFailed(f"rank 0 failed: {value}")
    return value


def check_parallel(experiment: Any, world_size: int) -> None:
    """Settings that cannot work with `world_size` processes, found before any process starts work."""
    if world_size <= 1:
        return
    source = experiment.source_file
    if experiment.engine in EXTERNAL_ENGINES:
        raise ConfigError(f"{source}: engine: {experiment.engine} runs as one process (vllm and sglang spread a model themselves: "
                          "gpu_engine.tensor_parallel_size / data_parallel_size). Fix: run it without --processes or a launcher.")
    if experiment.inference.device_map is not None:
        raise ConfigError(
            f"{source}: inference.device_map: {experiment.inference.device_map} spreads one model over every GPU of the machine, "
            f"so it cannot run in {world_size} processes. Fix: run it in one process (no --processes), or remove device_map."
        )
    if experiment.parallel == "data":
        small = [s.name for s in experiment.suites if s.limit is not None and s.limit < world_size]
        if small:
            # lm-eval gives a rank with no items of a task nothing to run, and the ranks fall out of step.
            raise ConfigError(f"{source}: suites: limit below the {world_size} processes for {', '.join(small)}. Fix: a limit of at least {world_size}, or fewer processes.")
    elif world_size > len(experiment.models):
        log.warning("parallel: models with %d processes but %d model(s): %d process(es) will idle", world_size, len(experiment.models), world_size - len(experiment.models))
