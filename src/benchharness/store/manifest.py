"""The run manifest: a stable fingerprint of what decides the results, apart from volatile facts.

`fingerprint` holds everything that decides the numbers (resolved config, weight sha256,
data fingerprints, prompt hashes, seeds, library versions, harness commit); two runs with
equal `fingerprint_sha256` should give identical per-sample results. `volatile` holds
times and the host. `files` maps each result file to its sha256, for `benchharness verify`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchharness import __version__
from benchharness.config.experiment import EXTERNAL_ENGINES, Experiment
from benchharness.models.sources import ResolvedModel


def initial_manifest(
    experiment: Experiment, run_id: str, started: dt.datetime, data_fingerprints: dict[str, str],
    resolved: dict[str, ResolvedModel], device: str, dtype: str, hardware: dict[str, Any],
) -> dict[str, Any]:
    models = {}
    for entry in experiment.models:
        res = resolved[entry.name]
        models[entry.name] = {
            "origin": entry.origin, "organisation": entry.organisation, "family": entry.family, "params": entry.params,
            "license": entry.license, "build": entry.build, "source": res.source, "revision": res.revision,
            # llama.cpp computes in the GGUF file's own quantized types, not in `inference.dtype`.
            "weights_sha256": res.weights_sha256, "dtype": "gguf" if experiment.engine == "llamacpp" else dtype,
            "device": device, "engine": experiment.engine,
            "chat_template": False,
            # What its makers published, with protocol and source: the report sets ours beside it.
            "published": [p.model_dump() for p in entry.published],
        }
    fingerprint = {
        "config_hash": experiment.config_hash(),
        "config": experiment.resolved(),
        "weights_sha256": {name: r.weights_sha256 for name, r in resolved.items()},
        "data_fingerprints": data_fingerprints,
        "prompt_hashes": {},
        "seed": experiment.seed,
        "dtype": dtype,
        "device": device,
        "versions": versions(),
    }
    return {
        "run_id": run_id,
        "status": "running",
        "experiment": experiment.name,
        "config_file": str(experiment.source_file),
        "config_hash": experiment.config_hash(),
        "config": experiment.resolved(),
        "fingerprint": fingerprint,
        "fingerprint_sha256": fingerprint_sha256(fingerprint),
        # pid and host: `report` and `verify` tell a run still going from one whose process died.
        "volatile": {"started": started.isoformat(), "finished": None, "resumed": [], "host": socket.gethostname(),
                     "pid": os.getpid(), "command": " ".join(sys.argv)},
        "parity": initial_parity(experiment),
        "models": models,
        "tasks": {},
        "completed": [],
        "completed_suites": [],
        "files": {},
        "versions": fingerprint["versions"],
        "hardware": hardware,
    }


def initial_parity(experiment: Experiment) -> dict[str, Any]:
    """The manifest's `parity` while the run is going; the runner replaces it with the certificate's summary at the end."""
    if experiment.engine == "hf":
        return {"status": "reference engine", "requests_per_type": 0}
    if experiment.engine in EXTERNAL_ENGINES:
        return external_parity(experiment.engine)
    return {"status": "pending" if experiment.parity.requests else "off", "requests_per_type": experiment.parity.requests}


def external_parity(engine: str) -> dict[str, Any]:
    """The parity record of an engine that runs its own kernels: nothing to certify against fp32."""
    return {"status": "not applicable", "requests_per_type": 0,
            "note": f"engine: {engine} runs its own kernels ({'the quantized GGUF file' if engine == 'llamacpp' else 'its own precision and kernels'}); "
                    "its results are not expected to equal the fp32 reference's"}


def fingerprint_sha256(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict[str, str | None]:
    import lm_eval
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": getattr(lm_eval, "__version__", None),
        "benchharness": __version__,
        "benchharness_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The harness's git commit, with '-dirty' when tracked files differ from it; None outside git."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
