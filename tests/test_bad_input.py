"""Bad input at run time: a full disk and a missing data folder give one clear error and leave
nothing half-written that looks complete."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from benchharness import files
from benchharness.cli import main
from conftest import tiny_catalog, write_experiment, run_folders

BODY = """
name: bad
models: [tiny-llama]
suites:
  - name: mmlu
    limit: 3
engine: hf
inference: {dtype: float32, device: cpu, batch_size: 4}
output_dir: runs
speed: null
"""


def test_full_disk_mid_run(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_experiment(tmp_path, BODY, tiny_catalog(tiny_model_dir))
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: object, **kwargs: object):
        handle = real_fdopen(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "samples" in name or "scores" in name:  # the first result files fail; the manifest still writes
            def write(_text: str) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    code = main(["--cache", str(tmp_path / "cache"), "run", str(config)])
    err = capsys.readouterr().err
    assert code == 2
    assert "could not write" in err and "bh_mmlu.jsonl" in err and "No space left on device" in err and "--resume" in err
    (run,) = run_folders(config.parent / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["completed"] == []
    leftovers = [p.name for p in run.rglob("*") if p.is_file() and p.suffix in {".jsonl", ".csv", ".tmp"}]
    assert leftovers == []  # no half-written samples, tables or temporary files


def test_missing_data_folder(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = BODY.replace("name: mmlu\n    limit: 3", "name: cmmlu\n    limit: 1") + "data_sources: {cmmlu: no/such/folder}\n"
    config = write_experiment(tmp_path, body, tiny_catalog(tiny_model_dir))
    code = main(["--cache", str(tmp_path / "cache"), "run", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("benchharness: error:")
    assert "no/such/folder" in err and "cmmlu" in err
    assert not (config.parent / "runs").exists()
