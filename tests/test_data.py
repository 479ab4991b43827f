"""Suite data: MMLU preparation, item counts, stratified order, stable fingerprints, rendered tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchharness.suites.registry import get_suite, prepare_suite, render_tasks, stratified_order
from benchharness.errors import DataError
from conftest import REPO, read_jsonl


def test_stratified_order_round_robins_subjects() -> None:
    records = [{"s": s, "i": i} for i, s in enumerate("aaabbc")]
    ordered = stratified_order(records, "s")
    assert [(r["s"], r["i"]) for r in ordered] == [("a", 0), ("b", 3), ("c", 5), ("a", 1), ("b", 4), ("a", 2)]


def test_mmlu_prepared_once_with_stable_fingerprint(tmp_path: Path) -> None:
    suite = get_suite("mmlu")
    first = prepare_suite(suite, tmp_path / "a")
    again = prepare_suite(suite, tmp_path / "a")
    elsewhere = prepare_suite(suite, tmp_path / "b")
    assert first.n_items == 14042
    assert first.fingerprint == again.fingerprint == elsewhere.fingerprint

    items = read_jsonl(first.folder / "test.jsonl")
    assert len(items) == 14042
    assert all(0 <= it["answer"] <= 3 and len(it["choices"]) == 4 for it in items)
    assert not any(it["question"] == "question" for it in items)  # the packaged header rows are dropped
    subjects = [it["subject"] for it in items]
    assert len(set(subjects)) == 57
    assert len(set(subjects[:57])) == 57  # any limit >= 57 covers every subject
    assert [it["id"] for it in items[:3]] == [0, 1, 2]


def test_modified_cache_is_rebuilt(tmp_path: Path) -> None:
    suite = get_suite("mmlu")
    first = prepare_suite(suite, tmp_path)
    data = first.folder / "test.jsonl"
    data.write_text(data.read_text()[:1000])
    rebuilt = prepare_suite(suite, tmp_path)
    assert rebuilt.fingerprint == first.fingerprint
    assert len(read_jsonl(data)) == 14042


def test_unknown_suite() -> None:
    with pytest.raises(DataError, match="unknown suite 'nope'.*mmlu"):
        get_suite("nope")


def test_rendered_task_points_at_prepared_data(tmp_path: Path) -> None:
    prepare_suite(get_suite("mmlu"), tmp_path / "data")
    out = render_tasks(REPO / "configs" / "tasks", tmp_path / "data", tmp_path / "tasks")
    text = (out / "bh_mmlu.yaml").read_text()
    assert "{data_dir}" not in text and f"{tmp_path / 'data'}/mmlu/test.jsonl" in text
