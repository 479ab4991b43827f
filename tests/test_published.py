"""Published scores: every catalog entry names its source and protocol, and the report sets our
score beside it (difference, inside our interval, what differs between the two measurements)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchharness.cli import main
from benchharness.config.catalog import load_catalog
from benchharness.errors import ConfigError
from benchharness.suites.registry import SUITES
from conftest import REPO, run_folders, tiny_catalog, write_experiment

METRIC = {"mmlu": "acc", "cmmlu": "acc", "gsm8k": "exact_match", "humaneval": "pass@1"}


def test_every_published_score_names_its_source_and_protocol() -> None:
    catalog = load_catalog(REPO / "configs" / "models.yaml")
    entries = [(name, p) for name, entry in catalog.models.items() for p in entry.published]
    assert len(entries) >= 100  # the researched set: 113 scores over 33 models
    for name, p in entries:
        where = f"{name}: {p.suite} {p.value}"
        assert p.suite in SUITES, where
        assert p.metric == METRIC[p.suite], where
        assert p.source.startswith("https://"), where
        assert p.table.strip() and p.prompt.strip() and p.variant.strip(), where
        # Read, not guessed: the quoted row of the source holds the number.
        assert any(form in p.quote for form in (f"{p.value:g}", f"{p.value:.1f}", f"{p.value:.2f}", f"{p.value / 100:.3f}")), where  # 0.848 as a fraction
    # The Chinese, US and European models all have some.
    origins = {catalog.models[name].origin for name, _ in entries}
    assert origins == {"CN", "US", "EU"}


def test_a_published_score_without_its_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("""
models:
  - name: m
    origin: CN
    organisation: o
    family: f
    params: 1B
    license: x
    sources: [{hub: o/m}]
    published:
      - {suite: mmlu, value: 50.0, metric: acc, shots: 5, chat_template: false, prompt: 5-shot, variant: M, table: T1, quote: "50.0"}
""")
    with pytest.raises(ConfigError) as err:
        load_catalog(path)
    assert "published" in str(err.value) and "source" in str(err.value) and str(path) in str(err.value)


PUBLISHED = """
        published:
          - suite: mmlu
            value: {value}
            metric: acc
            shots: 5
            chat_template: true
            prompt: 5-shot, chat
            variant: Tiny-Llama (base)
            source: https://example.org/tiny-card
            table: Table 1
            quote: "MMLU | {value}"
"""

BODY = """
name: published
models: [tiny-llama]
suites: [{name: mmlu, limit: 6}]
engine: hf
inference: {dtype: float32, device: cpu, batch_size: 4}
output_dir: runs
speed: null
"""


def _run(tmp_path: Path, tiny_model_dir: Path, value: float) -> Path:
    catalog = tiny_catalog(tiny_model_dir) + PUBLISHED.format(value=value)
    config = write_experiment(tmp_path, BODY, catalog)
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = run_folders(config.parent / "runs")
    return run


def test_report_sets_ours_beside_published(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = _run(tmp_path, tiny_model_dir, 99.5)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["models"]["tiny-llama"]["published"][0]["value"] == 99.5
    assert main(["report", str(run), "--output", str(tmp_path / "report")]) == 0
    table = pd.read_csv(tmp_path / "report" / "published.csv")
    (row,) = table.to_dict("records")
    scores = pd.read_csv(run / "scores.csv")
    ours = scores[(scores["task"] == "bh_mmlu") & (scores["metric"] == "acc")]["value"].item() * 100
    assert row["ours"] == pytest.approx(ours) and row["published"] == 99.5
    assert row["difference"] == pytest.approx(ours - 99.5)
    assert row["inside_ci"] == ("yes" if row["ci_low"] <= 99.5 <= row["ci_high"] else "no") == "no"
    # Every way the two differ that the records show.
    assert "shots: ours 0-shot, theirs 5-shot" in row["differences"]
    assert "chat template: ours no, theirs yes" in row["differences"]
    assert "variant: theirs Tiny-Llama (base)" in row["differences"]
    assert "items: ours 6 of 14042" in row["differences"]
    assert row["published_from"] == "run manifest"
    for name in ("report.md", "report.html"):
        text = (tmp_path / "report" / name).read_text()
        assert "Against published" in text and "https://example.org/tiny-card" in text
    assert "Against published" in (run / "report.md").read_text()
    # Every headline score's protocol, in the report too.
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Protocols" in report and "| mmlu | 0-shot, no chat template, acc | tiny-llama |" in report
    # The results store keeps them (the run was added when it completed), and the leaderboard shows them.
    store = run.parent / "runs.sqlite"
    from benchharness.store.results_db import query

    stored = query("SELECT model, suite, value, variant, source_table FROM published", store).to_dict("records")
    assert stored == [{"model": "tiny-llama", "suite": "mmlu", "value": 99.5, "variant": "Tiny-Llama (base)", "source_table": "Table 1"}]
    assert main(["leaderboard", "--store", str(store), "--output", str(tmp_path / "board")]) == 0
    page = (tmp_path / "board" / "leaderboard.html").read_text()
    assert "published 99.5" in page and "https://example.org/tiny-card" in page


def test_older_runs_read_published_scores_from_a_catalog(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = _run(tmp_path, tiny_model_dir, 10.0)
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["models"]["tiny-llama"]["published"]  # as a run made before they were recorded
    manifest_path.write_text(json.dumps(manifest))
    assert main(["report", str(run), "--output", str(tmp_path / "plain")]) == 0
    assert pd.read_csv(tmp_path / "plain" / "published.csv").empty
    assert "Against published" not in (tmp_path / "plain" / "report.md").read_text()
    catalog = tmp_path / "models.yaml"  # written by write_experiment, with the published entry
    assert main(["report", str(run), "--output", str(tmp_path / "withcat"), "--published", str(catalog)]) == 0
    (row,) = pd.read_csv(tmp_path / "withcat" / "published.csv").to_dict("records")
    assert row["published"] == 10.0 and row["published_from"] == "catalog"
    assert main(["report", str(run), "--published", str(tmp_path / "missing.yaml")]) == 2
