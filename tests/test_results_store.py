"""The results store: finished runs indexed into one SQLite file, idempotently; half-written runs refused."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from benchharness.errors import HarnessError
from benchharness.store.results_db import index_runs, query
from test_report import ALL, RUN_A, RUN_B, make_run


def record_files(folder: Path) -> Path:
    """Record the folder's files in its manifest with their sha256, as the runner does."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    manifest["volatile"]["started"] = f"{folder.name[:4]}-{folder.name[4:6]}-{folder.name[6:8]}T00:00:00+00:00"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def make_indexable(root: Path, run_id: str, models: list[str], **kwargs) -> Path:
    return record_files(make_run(root, run_id, models, **kwargs))


def _dump(store: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(store)
    try:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in ("models", "tasks", "scores", "throughput", "samples")}
    finally:
        con.close()


def test_index_is_idempotent_and_answers_across_runs(tmp_path: Path) -> None:
    a = make_indexable(tmp_path / "results", RUN_A, ALL)
    b = make_indexable(tmp_path / "results", RUN_B, ["qwen-mini"])
    store = tmp_path / "results" / "runs.sqlite"
    done, refused = index_runs([a, b], store)
    assert refused == [] and [d.run_id for d in done] == [RUN_A, RUN_B]
    first = _dump(store)
    index_runs([a, b], store)  # again: the same rows, none twice
    assert _dump(store) == first

    # every score of CN models on mmlu across runs, with its protocol
    cn = query("SELECT run_id, model, value, protocol FROM scores WHERE origin = 'CN' AND suite = 'mmlu' AND task = 'mmlu' "
               "ORDER BY run_id", store)
    assert cn["run_id"].tolist() == [RUN_A, RUN_B]
    expected = pd.read_csv(a / "scores.csv").query("model == 'qwen-mini' and task == 'mmlu'")["value"].item()
    assert cn["value"].iloc[0] == pytest.approx(expected)
    assert cn["protocol"].iloc[0] == "0-shot, chat template, acc"  # qwen-mini ran with its template
    # per-sample rows keep their fingerprints; the store loads into pandas in one line
    samples = pd.read_sql("SELECT * FROM samples WHERE run_id = ?", sqlite3.connect(store), params=(RUN_A,))
    assert len(samples) == 3 * 3 * 40 and samples["prompt_hash"].str.startswith("h").all()
    tasks = query(f"SELECT task, data_fingerprint FROM tasks WHERE run_id = '{RUN_A}' ORDER BY task", store)
    assert tasks["data_fingerprint"].tolist() == ["fp-arc", "fp-mmlu_law", "fp-mmlu_math"]


def test_half_written_or_changed_runs_are_refused(tmp_path: Path) -> None:
    store = tmp_path / "runs.sqlite"
    unfinished = make_indexable(tmp_path / "results", RUN_A, ALL, status="incomplete")
    done, refused = index_runs([unfinished], store)
    assert done == [] and "status is 'incomplete', not 'complete'" in refused[0]

    changed = make_indexable(tmp_path / "other", RUN_B, ALL)
    (changed / "scores.csv").write_text((changed / "scores.csv").read_text() + "qwen-mini,CN,x,mmlu,mmlu,acc,1.0,,,,40\n")
    done, refused = index_runs([changed], store)
    assert done == [] and "scores.csv: content differs from the manifest" in refused[0]
    assert query("SELECT count(*) AS n FROM runs", store)["n"].item() == 0

    # a run that was indexed and then re-indexed after a refusal keeps its earlier rows intact
    good = make_indexable(tmp_path / "good", RUN_A, ["gemma-mini"])
    index_runs([good], store)
    before = _dump(store)
    (good / "throughput.csv").write_text("model\n")
    assert index_runs([good], store)[1] and _dump(store) == before


def test_cli_index_and_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_indexable(tmp_path / "results", RUN_A, ALL)
    b = make_run(tmp_path / "results", RUN_B, ["qwen-mini"], status="incomplete")
    assert main(["index", str(a), str(b)]) == 1  # b refused, a kept
    out, err = capsys.readouterr()
    assert f"{RUN_A}: " in out and f"{RUN_B}: not indexed" in err
    store = tmp_path / "results" / "runs.sqlite"
    assert main(["query", "SELECT model, origin FROM models ORDER BY model", "--store", str(store), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["model,origin", "gemma-mini,US", "qwen-mini,CN", "smol-mini,EU"]
    # the store is opened read-only for queries
    assert main(["query", "DELETE FROM scores", "--store", str(store)]) == 2
    assert "query failed" in capsys.readouterr().err
    assert query("SELECT count(*) AS n FROM scores", store)["n"].item() > 0
    with pytest.raises(HarnessError, match="no results store there"):
        query("SELECT 1", tmp_path / "nowhere.sqlite")


def test_a_store_of_another_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    store = tmp_path / "runs.sqlite"
    con = sqlite3.connect(store)
    con.execute("CREATE TABLE meta (key PRIMARY KEY, value)")
    con.execute("INSERT INTO meta VALUES ('schema_version', 1)")
    con.commit()
    con.close()
    with pytest.raises(HarnessError, match=r"schema 1; this version writes schema 3\. Fix: .*benchharness index"):
        index_runs([make_indexable(tmp_path / "results", RUN_A, ["qwen-mini"])], store)
