"""Every suite's data preparation (item counts, order, fingerprint stability), its task YAMLs, the
CMMLU source rules, the offline check for stock tasks, and one tiny-model run over the new suites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchharness.suites.registry import SUITES, check_task_data_offline, get_suite, prepare_suite, render_tasks
from benchharness.errors import DataError
from benchharness.suites import cmmlu, eu_exams, task_yamls
from conftest import REPO, SHARED_DATA, read_jsonl, tiny_catalog, write_experiment, run_folders

CMMLU_DIR = SHARED_DATA / "cmmlu"
needs_cmmlu = pytest.mark.skipif(not CMMLU_DIR.is_dir(), reason=f"CMMLU not at {CMMLU_DIR}")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(cmmlu.ENV_VAR, raising=False)


@pytest.mark.parametrize(("name", "files", "items"), [("gsm8k", 1, 1319), ("humaneval", 1, 164), ("eu_exams", 10, 11464)])
def test_package_suites_prepare_with_stable_fingerprints(tmp_path: Path, name: str, files: int, items: int) -> None:
    suite = get_suite(name)
    first = prepare_suite(suite, tmp_path / "a")
    again = prepare_suite(suite, tmp_path / "a")
    elsewhere = prepare_suite(suite, tmp_path / "b")
    assert first.n_items == items == suite.items
    assert first.fingerprint == again.fingerprint == elsewhere.fingerprint
    assert len(list((first.folder).rglob("*.jsonl"))) == files


def test_gsm8k_records(tmp_path: Path) -> None:
    items = read_jsonl(prepare_suite(get_suite("gsm8k"), tmp_path).folder / "test.jsonl")
    assert items[0]["target"] == "18" and items[0]["id"] == 0
    assert all(it["target"].lstrip("-").replace(".", "").isdigit() for it in items)


def test_eu_exams_records(tmp_path: Path) -> None:
    folder = prepare_suite(get_suite("eu_exams"), tmp_path).folder
    counts = {p.stem: len(read_jsonl(p)) for p in (folder / "test").glob("*.jsonl")}
    assert counts == eu_exams.ITEMS
    assert {"de", "fr", "it", "es", "pl", "pt"} <= set(counts)
    for code in ("de", "pl"):
        items = read_jsonl(folder / "test" / f"{code}.jsonl")
        assert [it["id"] for it in items[:3]] == [0, 1, 2]
        assert all(3 <= len(it["choices"]) <= 5 and 0 <= it["answer"] < len(it["choices"]) for it in items)
        assert all(it["letters"] == list("ABCDE"[: len(it["choices"])]) for it in items)
        assert not any(it["question"].endswith("Answer:") or "\nA. " in it["choices"][-1] for it in items)


def test_eu_exams_prompt_parser() -> None:
    text = "Welche Aussage stimmt?\nA. erste\nB. zweite\nAnswer:"
    assert eu_exams.parse_prompt(text) == ("Welche Aussage stimmt?", ["erste", "zweite"])
    # Statements labelled A./B. inside the question: the last complete block is the options.
    nested = "Given:\nA. x > 1\nB. y < 2\nWhich holds?\nA. only A\nB. only B\nC. both\nAnswer:"
    assert eu_exams.parse_prompt(nested) == ("Given:\nA. x > 1\nB. y < 2\nWhich holds?", ["only A", "only B", "both"])
    with pytest.raises(ValueError):
        eu_exams.parse_prompt("No options here\nAnswer:")


@needs_cmmlu
def test_cmmlu_from_folder_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = get_suite("cmmlu")
    assert suite.availability()[0] is False
    first = prepare_suite(suite, tmp_path / "a", source_dir=CMMLU_DIR)
    monkeypatch.setenv(cmmlu.ENV_VAR, str(CMMLU_DIR))
    assert suite.availability()[0] is True
    again = prepare_suite(suite, tmp_path / "b")
    assert first.n_items == again.n_items == 11582 and first.fingerprint == again.fingerprint
    tests = sorted((first.folder / "test").glob("*.jsonl"))
    devs = sorted((first.folder / "dev").glob("*.jsonl"))
    assert len(tests) == len(devs) == 67
    assert all(len(read_jsonl(p)) == 5 for p in devs)
    item = read_jsonl(first.folder / "test" / "agronomy.jsonl")[0]
    assert item["answer"] == 1 and item["subject_name"] == "农学" and len(item["choices"]) == 4
    assert not any(str(CMMLU_DIR) in str(p) for p in first.folder.rglob("*"))  # prepared in the cache, not linked


def test_cmmlu_missing_fails_fast_offline(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="haonan-li/cmmlu.*data_sources.*BENCHHARNESS_CMMLU_DIR"):
        prepare_suite(get_suite("cmmlu"), tmp_path / "data")
    with pytest.raises(DataError, match="not found"):
        prepare_suite(get_suite("cmmlu"), tmp_path / "data", source_dir=tmp_path / "nowhere")


def test_generated_task_yamls_are_committed() -> None:
    for rel, text in task_yamls.generated_files().items():
        assert (REPO / "configs" / "tasks" / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: run python -m benchharness.suites.task_yamls configs/tasks"


def test_every_suite_task_loads_in_lm_eval(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    out = render_tasks(REPO / "configs" / "tasks", tmp_path / "data", tmp_path / "tasks")
    assert (out / "bh_hooks.py").is_file() and (out / "cmmlu" / "_bh_cmmlu_template_yaml").is_file()
    assert "{data_dir}" not in (out / "eu_exams" / "bh_eu_exams_de.yaml").read_text()
    manager = TaskManager(include_path=str(out))
    for suite in SUITES.values():
        assert suite.task in manager.all_tasks, suite.name
    (tmp_path / "tasks" / "stale.yaml").write_text("task: stale\n")
    render_tasks(REPO / "configs" / "tasks", tmp_path / "data", tmp_path / "tasks")
    assert not (tmp_path / "tasks" / "stale.yaml").exists()


def test_check_task_data_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert check_task_data_offline({"task": "bh_mmlu", "dataset_path": "json"}) is None
    message = check_task_data_offline({"task": "arc_easy", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy"})
    assert message and "allenai/ai2_arc" in message and "ARC-Easy" in message and "dataset_path: json" in message
    (tmp_path / "hf" / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)
    assert check_task_data_offline({"task": "arc_easy", "dataset_path": "allenai/ai2_arc"}) is None
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    # Without the offline switches the hub's host is tried once: a listening local stand-in
    # counts as reachable, a closed port as unreachable.
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert check_task_data_offline({"task": "x", "dataset_path": "someone/else"}) is None
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    message = check_task_data_offline({"task": "x", "dataset_path": "someone/else"})
    assert message and "unreachable" in message and "someone/else" in message


@pytest.mark.integration
@needs_cmmlu
def test_tiny_model_runs_new_suites(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchharness.cli import main

    monkeypatch.setenv(cmmlu.ENV_VAR, str(CMMLU_DIR))
    body = """
    name: suites
    models: [tiny-llama]
    suites:
      - {name: mmlu_cloze, limit: 2}
      - {name: knowledge_zh, limit: 1}
      - {name: eu_exams_cloze, limit: 1}
      - {name: gsm8k_zeroshot, limit: 1}
      - {name: humaneval, limit: 1}
    engine: hf
    inference: {dtype: float32, device: cpu, batch_size: 4}
    seed: 3
    output_dir: runs
    """
    config = write_experiment(tmp_path / "cfg", body, tiny_catalog(tiny_model_dir))
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = run_folders(tmp_path / "cfg" / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    done = {task for _, task in manifest["completed"]}
    assert {"bh_mmlu_cloze", "bh_cmmlu_agronomy", "bh_eu_exams_cloze_de", "bh_gsm8k_cot_zeroshot", "bh_humaneval"} <= done
    assert len([t for t in done if t.startswith("bh_cmmlu_")]) == 67
    assert manifest["tasks"]["bh_cmmlu_arts"]["num_fewshot"] == 5
    sample = read_jsonl(run / "samples" / "tiny-llama" / "bh_humaneval.jsonl")[0]
    assert sample["metrics"]["pass@1"] == 0.0 and sample["metrics"]["sandbox"]["status"] in {"failed", "timeout"}
    assert sample["metrics"]["sandbox"]["reason"]
