"""Peak memory over a block of work: process RSS sampled in the background, CUDA allocator peaks."""

from __future__ import annotations

import threading

import psutil
import torch

MIB = 1024 * 1024


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
