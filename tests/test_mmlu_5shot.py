"""MMLU 5-shot from a local folder in the hub layout (cais/mmlu), and the 0-shot fallback's label."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from benchharness.errors import DataError
from benchharness.suites.mmlu_hub import SUBJECTS
from benchharness.suites.registry import get_suite, prepare_suite
from conftest import read_jsonl, run_folders, tiny_catalog, write_experiment


def hub_layout(folder: Path, per_subject_files: bool = False, tests: int = 2, devs: int = 5) -> Path:
    """A small MMLU in cais/mmlu's layout: parquet with question, subject, choices, answer."""
    def rows(split: str, n: int) -> list[dict]:
        return [{"question": f"{split} question {i} about {s}?", "subject": s,
                 "choices": [f"{s} {split} {i} option {c}" for c in "abcd"], "answer": (i + len(s)) % 4}
                for s in SUBJECTS for i in range(n)]
    for split, n in (("test", tests), ("dev", devs), ("validation", 1)):
        frame = pd.DataFrame(rows(split, n))
        if per_subject_files:
            for subject, part in frame.groupby("subject"):
                (folder / subject).mkdir(parents=True, exist_ok=True)
                part.to_parquet(folder / subject / f"{split}-00000-of-00001.parquet")
        else:
            (folder / "all").mkdir(parents=True, exist_ok=True)
            frame.to_parquet(folder / "all" / f"{split}-00000-of-00001.parquet")
    return folder


def test_both_hub_layouts_prepare_the_same_files(tmp_path: Path) -> None:
    combined = prepare_suite(get_suite("mmlu_5shot"), tmp_path / "a", hub_layout(tmp_path / "all"))
    split = prepare_suite(get_suite("mmlu_5shot"), tmp_path / "b", hub_layout(tmp_path / "subjects", per_subject_files=True))
    assert combined.fingerprint == split.fingerprint and combined.n_items == 2 * 57
    dev = read_jsonl(combined.folder / "dev" / "anatomy.jsonl")
    assert [d["question"] for d in dev] == [f"dev question {i} about anatomy?" for i in range(5)]


def test_a_folder_without_enough_dev_questions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 5 needed"):
        prepare_suite(get_suite("mmlu_5shot"), tmp_path / "data", hub_layout(tmp_path / "short", devs=3))
    with pytest.raises(DataError, match="no dev parquet files"):
        (tmp_path / "nodev" / "all").mkdir(parents=True)
        pd.DataFrame([{"question": "q", "subject": "anatomy", "choices": list("abcd"), "answer": 0}]).to_parquet(tmp_path / "nodev" / "all" / "test-0.parquet")
        prepare_suite(get_suite("mmlu_5shot"), tmp_path / "data", tmp_path / "nodev")


def test_offline_without_a_folder_says_how_and_keeps_0_shot(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_experiment(tmp_path, "name: x\nmodels: [tiny-llama]\nsuites: [mmlu_5shot]\nspeed: null\noutput_dir: runs\n", tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data_sources: {mmlu_5shot:" in err and "cais/mmlu" in err and "0-shot" in err


@pytest.mark.integration
def test_five_shot_run_from_a_hub_layout_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = hub_layout(tmp_path / "mmlu")
    body = f"""
    name: five
    models: [tiny-llama]
    suites: [{{name: mmlu_5shot, limit: 1}}]
    data_sources: {{mmlu_5shot: {folder}}}
    inference: {{dtype: float32, device: cpu, batch_size: 4}}
    parity: {{requests: 0}}
    output_dir: runs
    speed: null
    """
    config = write_experiment(tmp_path / "cfg", body, tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = run_folders(tmp_path / "cfg" / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    subjects = [t for t in manifest["tasks"] if t.startswith("bh_mmlu_5shot_")]
    assert len(subjects) == 57 and all(manifest["tasks"][t]["num_fewshot"] == 5 for t in subjects)
    prompt = read_jsonl(run / "samples" / "tiny-llama" / "bh_mmlu_5shot_anatomy.jsonl")[0]["prompt"]
    # lm-eval's mmlu prompt: the description, the subject's first 5 dev questions with their answers, then the question.
    shots = "".join(f"dev question {i} about anatomy?\n" + "".join(f"{x}. anatomy dev {i} option {c}\n" for x, c in zip("ABCD", "abcd"))
                    + f"Answer: {'ABCD'[(i + len('anatomy')) % 4]}\n\n" for i in range(5))
    expected = ("The following are multiple choice questions (with answers) about anatomy.\n\n" + shots
                + "test question 0 about anatomy?\n" + "".join(f"{x}. anatomy test 0 option {c}\n" for x, c in zip("ABCD", "abcd")) + "Answer:")
    assert prompt == expected
    scores = pd.read_csv(run / "scores.csv")
    group = scores[(scores["task"] == "mmlu_5shot") & (scores["metric"] == "acc")]
    assert len(group) == 1 and group["num_fewshot"].item() == "5-shot" and group["n"].item() == 57
    assert group["protocol"].item() == "5-shot, no chat template, acc"
