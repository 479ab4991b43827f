"""`benchharness speed`: the fixed-shape speed probe alone, for every model of a config."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from benchharness.config.experiment import Experiment
from benchharness.config.speed_spec import ProbeSpec
from benchharness.measure.probe import format_rows, run_speed_probe
from benchharness.measure.limits import measure_machine_limits
from benchharness.run.runner import probe_kernels, serve_rows
from benchharness.models.sources import load_model, pick_device, pick_dtype, resolve_model

log = logging.getLogger(__name__)


def run_speed_only(experiment: Experiment, cache_dir: Path) -> str:
    """Probe each model (config key `speed`, defaults if it is null); returns the printed table."""
    spec = experiment.speed or ProbeSpec()
    device = pick_device(experiment.inference.device)
    dtype = pick_dtype(experiment.inference.dtype, device)
    resolved = {m.name: resolve_model(m, cache_dir) for m in experiment.models}
    log.info("measuring this machine's matmul FLOP/s and memory bandwidth (%s, %s)", device, dtype)
    limits = measure_machine_limits(device, getattr(torch, dtype), min_seconds=spec.limits_min_seconds)
    lines = [
        f"device {device}, dtype {dtype}: matmul {limits.peak_flops / 1e9:.1f} GFLOP/s, "
        f"memory read bandwidth {limits.peak_bandwidth / 1e9:.1f} GB/s (fastest of the timed runs)"
    ]
    for entry in experiment.models:
        model, tokenizer = load_model(resolved[entry.name], entry, dtype, device, experiment.inference.device_map)
        log.info("%s: speed probe %s", entry.name, spec.model_dump())
        with probe_kernels(experiment, model).applied():
            rows = run_speed_probe(model, tokenizer, spec, device, limits=limits, model_name=entry.name, origin=entry.origin)
            rows += serve_rows(experiment.engine, spec, model, tokenizer, device, limits, entry.name, entry.origin)
        lines += ["", f"{entry.name} ({entry.origin}, {entry.build})", format_rows(rows)]
        del model
    return "\n".join(lines)
