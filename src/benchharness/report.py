"""Reports over run folders: merged long tables, statistics, markdown/HTML/CSV output, plots.

Two entry points:
- `write_run_report(run_dir)`: report.md for one run; the runner calls it at the end of
  every run (complete or not), so it is quick and writes nothing but report.md.
- `build_report(run_dirs, out_dir)`: merges any number of runs into one long table and
  writes report.md, a self-contained report.html (plots embedded), scores.csv, summary.csv,
  pairs.csv, flips.csv and the PNG plots.

A row of every table is an *entry*: one model in one run. Entries from runs whose manifest
status is not "complete" are labelled "[incomplete]" everywhere and listed in a banner,
so partial numbers are never mixed in silently.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchharness.errors import HarnessError
from benchharness import protocol
from benchharness.stats import bootstrap_ci, holm_adjust, mean_stderr, paired_test
from benchharness.store import atomic_write_text, describe_status

log = logging.getLogger(__name__)

ORIGIN_ORDER = ["CN", "US", "EU"]
# Which metric represents a suite when it reports several; first match wins. Names are
# compared on the part before lm-eval's ",filter" suffix (e.g. "exact_match,strict-match").
METRIC_PRIORITY = ["acc", "exact_match", "pass@1", "acc_norm", "f1", "em", "mc2", "bleu"]
ALPHA = 0.05
N_BOOT = 1000
INCOMPLETE_TAG = " [incomplete]"
MAX_FLIPS_SHOWN = 10


# ---------------------------------------------------------------------------------------
# Loading run folders


@dataclass
class Run:
    """One run folder as read from disk."""

    folder: Path
    run_id: str
    status: str
    manifest: dict[str, Any]
    scores: pd.DataFrame
    throughput: pd.DataFrame

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def missing_pairs(self) -> list[tuple[str, str]]:
        """(model, suite or task) pairs the run planned but did not complete.

        A suite no model has started yet has no tasks in the manifest, so it is named as a
        whole; a suite that was started names the tasks this model still lacks.
        """
        done = {(str(m), str(t)) for m, t in self.manifest.get("completed", [])}
        suite_of = {str(t): str((info or {}).get("suite") or t) for t, info in (self.manifest.get("tasks") or {}).items()}
        planned = [s.get("name") if isinstance(s, dict) else s for s in (self.manifest.get("config") or {}).get("suites", [])]
        suites = [str(s) for s in planned if s] or sorted(set(suite_of.values()))
        out: list[tuple[str, str]] = []
        for model in self.manifest.get("models") or {}:
            for suite in suites:
                tasks = [t for t, su in suite_of.items() if su == suite]
                if not any((model, t) in done for t in tasks):
                    out.append((model, suite))
                else:
                    out += [(model, t) for t in tasks if (model, t) not in done]
        return out


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def load_run(run_dir: Path) -> Run:
    """Read manifest.json, scores.csv and throughput.csv (both optional) of one run folder."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise HarnessError(f"{run_dir}: not a run folder (no manifest.json). Fix: pass folders under results/.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{manifest_path}: not valid JSON ({exc}). Fix: restore it or rerun the experiment.") from exc
    run_id = str(manifest.get("run_id") or run_dir.name)
    status = str(manifest.get("status") or "unknown")
    scores = _read_csv(run_dir / "scores.csv")
    for col in ["model", "origin", "build", "suite", "task", "metric", "value", "stderr", "ci_low", "ci_high", "n"]:
        if col not in scores.columns:
            scores[col] = np.nan
    for col in ["model", "origin", "build", "suite", "task", "metric"]:
        scores[col] = scores[col].astype("string")
    for col in ["value", "stderr", "ci_low", "ci_high", "n"]:
        scores[col] = pd.to_numeric(scores[col], errors="coerce")
    throughput = _read_csv(run_dir / "throughput.csv")
    for col in ["model", "task", "phase"]:
        if col not in throughput.columns:
            throughput[col] = pd.Series(dtype="string")
        throughput[col] = throughput[col].astype("string")
    for col in ["tokens", "seconds", "tokens_per_s", "ttft_s", "peak_memory_mb", "batch", "prompt_len", "new_tokens"]:
        if col not in throughput.columns:
            throughput[col] = np.nan
        throughput[col] = pd.to_numeric(throughput[col], errors="coerce")
    return Run(run_dir, run_id, status, manifest, scores, throughput)


def load_samples(run: Run, model: str, task: str) -> pd.DataFrame | None:
    """Per-item records of one model on one task, or None when the run has none."""
    path = run.folder / "samples" / model / f"{task}.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        return None
    frame = pd.DataFrame.from_records(records)
    if "doc_id" not in frame.columns or "correct" not in frame.columns:
        return None
    frame.insert(0, "task", task)
    for col in ["subject", "prompt_hash", "target", "pred"]:
        if col not in frame.columns:
            frame[col] = None
    # Items without a right/wrong verdict cannot enter a mean or a paired test. A task with
    # several filters may log an item once per filter: the first record stands for it.
    frame = frame[frame["correct"].notna()].drop_duplicates("doc_id", keep="first").copy()
    if frame.empty:
        return None
    frame["correct"] = frame["correct"].astype(bool).astype(float)
    return frame


# ---------------------------------------------------------------------------------------
# The report's data: every table as a DataFrame of raw values


@dataclass
class ReportData:
    runs: list[Run]
    entries: pd.DataFrame  # entry, run_id, run_status, model, origin, build + manifest model fields
    scores: pd.DataFrame  # merged long table (every metric) with run_id, run_status, entry
    summary: pd.DataFrame  # one row per (entry, suite): primary metric, CI, rank, test, speed
    suites: list[str]
    primary_metric: dict[str, str]
    pairs: pd.DataFrame  # paired tests between entries per suite
    speed: pd.DataFrame  # per entry: eval / prefill / decode tokens/s, ttft, peak memory
    probe: pd.DataFrame  # fixed-shape probe rows with entry labels
    regression: pd.DataFrame  # two runs of the same model: delta per task
    flips: pd.DataFrame  # items whose answer flipped between those runs
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def incomplete_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.complete]


def _origin_key(origin: Any) -> int:
    return ORIGIN_ORDER.index(origin) if origin in ORIGIN_ORDER else len(ORIGIN_ORDER)


def _entries(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, model) with a label that is unique across the merged runs."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        models: dict[str, dict[str, Any]] = dict(run.manifest.get("models") or {})
        # A model that has scores but is missing from the manifest still gets a row.
        for name in run.scores["model"].dropna().unique():
            models.setdefault(str(name), {})
        for name, info in models.items():
            srows = run.scores[run.scores["model"] == name]
            origin = info.get("origin") or (srows["origin"].dropna().iloc[0] if srows["origin"].notna().any() else "")
            build = info.get("build") or (srows["build"].dropna().iloc[0] if srows["build"].notna().any() else "")
            rows.append({
                "run_id": run.run_id, "run_status": run.status, "model": str(name), "origin": str(origin or ""),
                "build": str(build or ""), "organisation": info.get("organisation", ""), "family": info.get("family", ""),
                "params": info.get("params", ""), "source": _compact(info.get("source")), "dtype": info.get("dtype", ""),
                "device": info.get("device", ""), "engine": info.get("engine", ""),
                "chat_template": _yes_no(info.get("chat_template")), "batch": describe_batch(info.get("batch")),
                "weights_sha256": str(info.get("weights_sha256") or "")[:12],
            })
    frame = pd.DataFrame(rows, columns=[
        "run_id", "run_status", "model", "origin", "build", "organisation", "family", "params", "source", "dtype",
        "device", "engine", "chat_template", "batch", "weights_sha256"])
    runs_per_model = frame.groupby("model")["run_id"].transform("nunique") if len(frame) else pd.Series(dtype=int)
    labels = []
    for (_, row), count in zip(frame.iterrows(), runs_per_model):
        label = row["model"] if count == 1 else f"{row['model']} @ {row['run_id']}"
        if row["run_status"] != "complete":
            label += INCOMPLETE_TAG
        labels.append(label)
    frame.insert(0, "entry", labels)
    frame["_okey"] = frame["origin"].map(_origin_key)
    frame = frame.sort_values(["_okey", "origin", "model", "run_id"]).drop(columns="_okey").reset_index(drop=True)
    return frame


def _compact(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, dict):
        return "; ".join(f"{k}={_compact(v)}" for k, v in value.items() if v not in (None, ""))
    if isinstance(value, (list, tuple)):
        return ", ".join(_compact(v) for v in value)
    return str(value)


# The engine's `budget_method` (benchharness.engine.autobatch) in words.
_BUDGET_METHODS = {"cpu-fixed": "fixed on a CPU", "cpu-overhead-fit": "fitted to timings", "cuda-oom-backoff": "largest without running out of memory",
                   "none": "configured", "not-yet-probed": "not chosen: nothing was scored"}


def describe_batch(batch: Any) -> str:
    """The manifest's `models.<name>.batch` in a few words: the batch or token budget, and how it was chosen."""
    if not isinstance(batch, dict):
        return _compact(batch)
    method, size = batch.get("budget_method"), batch.get("batch_size")
    if batch.get("engine") == "hf":
        if method == "memory-bounded":
            shapes = sorted({(int(c["batch_size"]), int(c["tokens"])) for c in batch.get("choices") or []}, key=lambda bt: -bt[1])
            available = sorted({c.get("available_gib") for c in batch.get("choices") or []} - {None})
            if not shapes:
                return "auto, memory-bounded (no batch chosen yet)"
            rows = ", ".join(f"{b} x {t} tokens" for b, t in shapes)
            share = f"{float(batch.get('memory_share', 0.5)):.0%}"
            memory = f"{available[0]:g}" if len(available) == 1 else f"{available[0]:g}-{available[-1]:g}"
            return f"auto: {rows} (memory-bounded: {share} of {memory} GiB available)"
        if method == "lm-eval-auto":
            return f"auto: {_compact(batch.get('detected')) or '?'} rows (lm-eval's probe)"
        how = batch.get("how")  # manifests written before budget_method
        return f"{size} rows ({how or 'configured'})"
    budget, rows = batch.get("token_budget"), batch.get("max_rows")
    text = f"{budget}-token budget" if budget else f"{rows} rows"
    text = f"auto: {text}" if size == "auto" else text
    words = _BUDGET_METHODS.get(str(method), str(method)) if method else ""
    details = [words] if words else []
    if budget and rows:
        details.append(f"at most {rows} rows")
    if batch.get("oom_splits"):
        details.append(f"{batch['oom_splits']} out-of-memory splits")
    return text + (f" ({', '.join(details)})" if details else "")


def _yes_no(value: Any) -> str:
    if value is None or value == "":
        return ""
    return "yes" if bool(value) else "no"


def _metric_base(metric: str) -> str:
    return str(metric).split(",")[0]


def choose_primary(metrics: pd.Series) -> str:
    """The metric that stands for a suite: by METRIC_PRIORITY, then the most common, then by name."""
    counts = metrics.value_counts()
    candidates = sorted(counts.index, key=lambda m: (-counts[m], str(m)))
    for wanted in METRIC_PRIORITY:
        for metric in candidates:
            if _metric_base(metric) == wanted:
                return str(metric)
    return str(candidates[0])


def _suite_tasks(scores: pd.DataFrame, suite: str) -> list[str]:
    """Tasks whose samples make up a suite: its subtasks, or the suite itself when it has none."""
    tasks = sorted({str(t) for t in scores.loc[scores["suite"] == suite, "task"].dropna()})
    sub = [t for t in tasks if t != suite]
    return sub if sub else [suite]


class _SampleCache:
    def __init__(self, runs: list[Run]) -> None:
        self.runs = {r.run_id: r for r in runs}
        self.cache: dict[tuple[str, str, str], pd.DataFrame | None] = {}

    def task(self, run_id: str, model: str, task: str) -> pd.DataFrame | None:
        key = (run_id, model, task)
        if key not in self.cache:
            self.cache[key] = load_samples(self.runs[run_id], model, task)
        return self.cache[key]

    def suite(self, run_id: str, model: str, tasks: list[str]) -> pd.DataFrame | None:
        frames = [f for f in (self.task(run_id, model, t) for t in tasks) if f is not None]
        if not frames:
            return None
        return pd.concat(frames, ignore_index=True).drop_duplicates(["task", "doc_id"])


def _fingerprints(run: Run, tasks: list[str]) -> tuple[str, ...]:
    info = run.manifest.get("tasks") or {}
    return tuple(str((info.get(t) or {}).get("data_fingerprint") or "") for t in tasks)


def collect(run_dirs: list[Path], seed: int = 0) -> ReportData:
    """Read and merge run folders and compute every table of the report."""
    runs = [load_run(Path(d)) for d in run_dirs]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise HarnessError(f"the same run was given twice ({', '.join(sorted({i for i in ids if ids.count(i) > 1}))}). Fix: pass each run folder once.")
    runs.sort(key=lambda r: r.run_id)  # run ids start with the UTC time, so this is oldest first
    entries = _entries(runs)
    key = entries.set_index(["run_id", "model"])["entry"]
    notes: list[str] = []

    frames = []
    for run in runs:
        s = run.scores.copy()
        s.insert(0, "run_id", run.run_id)
        s.insert(1, "run_status", run.status)
        frames.append(s)
    scores = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    scores = scores[scores["model"].notna() & scores["suite"].notna()].copy()
    scores["task"] = scores["task"].fillna(scores["suite"])
    scores = add_group_rows(scores)
    scores.insert(2, "entry", [key.get((r, m), m) for r, m in zip(scores["run_id"], scores["model"])])
    # The manifest's origin/build are the reference; fill gaps in the csv from them.
    meta = entries.set_index("entry")
    scores["origin"] = scores["origin"].fillna(scores["entry"].map(meta["origin"]))
    scores["build"] = scores["build"].fillna(scores["entry"].map(meta["build"]))
    scores["ci_source"] = np.where(scores["ci_low"].notna() & scores["ci_high"].notna(), "scores.csv", "")

    suites = sorted({str(s) for s in scores["suite"].dropna()})
    primary = {s: choose_primary(scores.loc[(scores["suite"] == s) & (scores["task"] == s), "metric"].dropna())
               if ((scores["suite"] == s) & (scores["task"] == s)).any()
               else choose_primary(scores.loc[scores["suite"] == s, "metric"].dropna()) for s in suites}
    samples = _SampleCache(runs)
    run_by_id = {r.run_id: r for r in runs}

    # Fill a missing stderr / CI from per-item correctness, but only where the items
    # reproduce the reported value: otherwise the samples measure a different metric.
    for idx, row in scores.iterrows():
        if row["ci_source"] and pd.notna(row["stderr"]):
            continue
        suite, task = str(row["suite"]), str(row["task"])
        tasks = _suite_tasks(scores[scores["run_id"] == row["run_id"]], suite) if task == suite else [task]
        frame = samples.suite(str(row["run_id"]), str(row["model"]), tasks)
        if frame is None or pd.isna(row["value"]):
            continue
        correct = frame["correct"].to_numpy(dtype=float)
        if abs(float(correct.mean()) - float(row["value"])) > 1e-6:
            continue
        if pd.isna(row["stderr"]):
            scores.at[idx, "stderr"] = mean_stderr(correct)
        if not row["ci_source"]:
            low, high = bootstrap_ci(correct, seed=seed, n_boot=N_BOOT, alpha=ALPHA)
            scores.at[idx, "ci_low"], scores.at[idx, "ci_high"] = low, high
            scores.at[idx, "ci_source"] = f"samples (bootstrap, seed {seed})"
        if pd.isna(row["n"]):
            scores.at[idx, "n"] = len(correct)

    speed = _speed(runs, entries)
    summary = _summary(scores, suites, primary, entries, speed)
    pairs = _pairs(summary, scores, suites, samples, run_by_id, seed)
    summary = _rank(summary, pairs)
    probe = _probe(runs, entries)
    regression, flips = _regression(scores, suites, primary, entries, samples, run_by_id)
    for run in runs:
        if not (run.folder / "scores.csv").is_file():
            notes.append(f"run {run.run_id} has no scores.csv")
    return ReportData(runs, entries, scores, summary, suites, primary, pairs, speed, probe, regression, flips, seed, notes)


def add_group_rows(scores: pd.DataFrame, keep_single_interval: bool = False) -> pd.DataFrame:
    """Add a suite-level row (task == suite) where a suite has only subtask rows.

    The group score is the item-weighted mean of the subtasks, as lm-eval aggregates MMLU
    (weight_by_size), so it equals the accuracy over the pooled items. Rows made here are
    marked in the `group_computed` column. `keep_single_interval`: a suite of one task keeps
    that task's stderr and interval (they are the suite's); otherwise they are left empty.
    """
    scores = scores.assign(group_computed=False)
    added = []
    for (run_id, model, suite, metric), g in scores.groupby(["run_id", "model", "suite", "metric"], sort=True):
        if (g["task"] == suite).any():
            continue
        sub = g[g["value"].notna()]
        if sub.empty:
            continue
        weights = sub["n"] if sub["n"].notna().all() and sub["n"].sum() > 0 else pd.Series(1.0, index=sub.index)
        row = sub.iloc[0].copy()
        row["task"] = suite
        row["value"] = float((sub["value"] * weights).sum() / weights.sum())
        if not (keep_single_interval and len(sub) == 1):
            row[["stderr", "ci_low", "ci_high"]] = np.nan
        row["n"] = float(sub["n"].sum()) if sub["n"].notna().all() else np.nan
        row["group_computed"] = True
        added.append(row)
    if added:
        scores = pd.concat([scores, pd.DataFrame(added)], ignore_index=True)
    return scores


def aggregate_speed(rows: pd.DataFrame) -> float:
    """Tokens per second over a set of rows: total tokens over total seconds, else the median rate."""
    tokens, seconds = rows["tokens"], rows["seconds"]
    ok = tokens.notna() & seconds.notna() & (seconds > 0)
    if ok.any():
        return float(tokens[ok].sum() / seconds[ok].sum())
    rates = rows["tokens_per_s"].dropna()
    return float(rates.median()) if len(rates) else float("nan")


def _speed(runs: list[Run], entries: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for run in runs:
        tp = run.throughput
        for _, e in entries[entries["run_id"] == run.run_id].iterrows():
            mine = tp[tp["model"] == e["model"]]
            ttft = mine.loc[mine["phase"].isin(["prefill", "decode"]), "ttft_s"].dropna()
            rows.append({
                "entry": e["entry"],
                "eval_tokens_per_s": aggregate_speed(mine[mine["phase"] == "eval"]),
                "prefill_tokens_per_s": aggregate_speed(mine[mine["phase"] == "prefill"]),
                "decode_tokens_per_s": aggregate_speed(mine[mine["phase"] == "decode"]),
                "ttft_s": float(ttft.median()) if len(ttft) else float("nan"),
                "peak_memory_mb": float(mine["peak_memory_mb"].max()) if mine["peak_memory_mb"].notna().any() else float("nan"),
            })
    return pd.DataFrame(rows, columns=["entry", "eval_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_memory_mb"])


def _probe(runs: list[Run], entries: pd.DataFrame) -> pd.DataFrame:
    key = entries.set_index(["run_id", "model"])["entry"]
    frames = []
    for run in runs:
        tp = run.throughput[run.throughput["phase"].isin(["prefill", "decode", "serve"])].copy()
        if tp.empty:
            continue
        tp.insert(0, "entry", [key.get((run.run_id, m), m) for m in tp["model"]])
        frames.append(tp)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _summary(scores: pd.DataFrame, suites: list[str], primary: dict[str, str], entries: pd.DataFrame,
             speed: pd.DataFrame) -> pd.DataFrame:
    """One row per (entry, suite) for the suite's primary metric, with the suite's eval speed."""
    rows = []
    for suite in suites:
        sel = scores[(scores["suite"] == suite) & (scores["task"] == suite) & (scores["metric"] == primary[suite])]
        for _, r in sel.iterrows():
            rows.append({c: r[c] for c in ["run_id", "run_status", "entry", "model", "origin", "build", "suite", "metric",
                                          "value", "stderr", "ci_low", "ci_high", "n", "ci_source"]})
    summary = pd.DataFrame(rows, columns=["run_id", "run_status", "entry", "model", "origin", "build", "suite", "metric",
                                          "value", "stderr", "ci_low", "ci_high", "n", "ci_source"])
    summary = summary.drop_duplicates(["entry", "suite"])
    return summary.merge(speed, on="entry", how="left")


def _pairs(summary: pd.DataFrame, scores: pd.DataFrame, suites: list[str], samples: _SampleCache,
           run_by_id: dict[str, Run], seed: int) -> pd.DataFrame:
    """A paired test for every two entries with per-item results on the same items of a suite."""
    rows = []
    for suite in suites:
        sel = summary[summary["suite"] == suite].sort_values("value", ascending=False)
        items: dict[str, tuple[pd.DataFrame, tuple[str, ...]]] = {}
        for _, r in sel.iterrows():
            tasks = _suite_tasks(scores[scores["run_id"] == r["run_id"]], suite)
            frame = samples.suite(r["run_id"], r["model"], tasks)
            if frame is not None:
                items[r["entry"]] = (frame, _fingerprints(run_by_id[r["run_id"]], tasks))
        names = [e for e in sel["entry"] if e in items]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                fa, pa = items[a]
                fb, pb = items[b]
                if pa != pb and all(pa) and all(pb):
                    continue  # different data behind the same task names: not the same items
                joined = fa[["task", "doc_id", "correct"]].merge(fb[["task", "doc_id", "correct"]], on=["task", "doc_id"],
                                                                 suffixes=("_a", "_b"))
                if joined.empty:
                    continue
                res = paired_test(joined["correct_a"].to_numpy(), joined["correct_b"].to_numpy(), seed=seed, n_boot=N_BOOT)
                rows.append({"suite": suite, "entry_a": a, "entry_b": b, "n_items": res.n, "mean_a": res.mean_a,
                             "mean_b": res.mean_b, "diff": res.diff, "only_a": res.only_a, "only_b": res.only_b,
                             "test": res.test, "p_value": res.p_value})
    pairs = pd.DataFrame(rows, columns=["suite", "entry_a", "entry_b", "n_items", "mean_a", "mean_b", "diff", "only_a",
                                        "only_b", "test", "p_value"])
    # Every pairwise test of the report is one family: Holm's adjustment keeps the chance of any
    # false "significant" among them at ALPHA. The raw p-value stays beside it.
    pairs["p_holm"] = holm_adjust(pairs["p_value"].to_numpy(float)) if len(pairs) else pd.Series(dtype=float)
    pairs["significant"] = pairs["p_holm"] < ALPHA
    pairs["significant_uncorrected"] = pairs["p_value"] < ALPHA
    return pairs


def _pair_lookup(pairs: pd.DataFrame, suite: str, a: str, b: str) -> pd.Series | None:
    sel = pairs[(pairs["suite"] == suite) & (((pairs["entry_a"] == a) & (pairs["entry_b"] == b))
                                             | ((pairs["entry_a"] == b) & (pairs["entry_b"] == a)))]
    return None if sel.empty else sel.iloc[0]


def _rank(summary: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Rank entries per suite and test each against the one ranked just above it."""
    out = []
    for suite, group in summary.groupby("suite", sort=True):
        group = group.sort_values(["value", "entry"], ascending=[False, True]).copy()
        group["rank"] = group["value"].rank(method="min", ascending=False).astype("Int64")
        p_above: list[float] = []
        vs_above: list[str] = []
        prev: str | None = None
        for entry in group["entry"]:
            if prev is None:
                p_above.append(float("nan"))
                vs_above.append("")
            else:
                pair = _pair_lookup(pairs, str(suite), prev, entry)
                if pair is None:
                    p_above.append(float("nan"))
                    vs_above.append("not tested (no paired items)")
                else:
                    p_above.append(float(pair["p_holm"]))
                    vs_above.append("significant" if pair["significant"] else "not significant")
            prev = entry
        group["p_vs_above"] = p_above
        group["vs_above"] = vs_above
        out.append(group)
    if not out:
        return summary.assign(rank=pd.Series(dtype="Int64"), p_vs_above=np.nan, vs_above="")
    return pd.concat(out, ignore_index=True)


def _regression(scores: pd.DataFrame, suites: list[str], primary: dict[str, str], entries: pd.DataFrame,
                samples: _SampleCache, run_by_id: dict[str, Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Consecutive runs of the same model side by side: delta per task and the items that flipped."""
    reg_rows: list[dict[str, Any]] = []
    flip_frames: list[pd.DataFrame] = []
    for model, group in entries.groupby("model", sort=True):
        group = group.sort_values("run_id")
        if len(group) < 2:
            continue
        ordered = list(group.itertuples(index=False))
        for old, new in zip(ordered, ordered[1:]):
            so = scores[scores["entry"] == old.entry]
            sn = scores[scores["entry"] == new.entry]
            for suite in suites:
                metric = primary[suite]
                a = so[(so["suite"] == suite) & (so["metric"] == metric)].set_index("task")
                b = sn[(sn["suite"] == suite) & (sn["metric"] == metric)].set_index("task")
                for task in sorted(set(a.index) & set(b.index), key=lambda t: (t != suite, t)):
                    va, vb = float(a.loc[task, "value"]), float(b.loc[task, "value"])
                    row: dict[str, Any] = {
                        "model": model, "run_a": old.run_id, "run_b": new.run_id, "suite": suite, "task": task,
                        "metric": metric, "value_a": va, "value_b": vb, "delta": vb - va, "n_paired": np.nan,
                        "right_to_wrong": np.nan, "wrong_to_right": np.nan, "prompt_changed": np.nan, "p_value": np.nan}
                    tasks = _suite_tasks(so, suite) if task == suite else [task]
                    fa = samples.suite(old.run_id, model, tasks)
                    fb = samples.suite(new.run_id, model, tasks)
                    if fa is not None and fb is not None:
                        j = fa.merge(fb, on=["task", "doc_id"], suffixes=("_a", "_b"))
                        if not j.empty:
                            ca, cb = j["correct_a"].astype(bool), j["correct_b"].astype(bool)
                            res = paired_test(ca.to_numpy(float), cb.to_numpy(float), seed=0)
                            changed = j["prompt_hash_a"].notna() & (j["prompt_hash_a"] != j["prompt_hash_b"])
                            row.update(n_paired=len(j), right_to_wrong=int((ca & ~cb).sum()),
                                       wrong_to_right=int((~ca & cb).sum()), prompt_changed=int(changed.sum()),
                                       p_value=res.p_value)
                            if task != suite or tasks == [suite]:
                                flipped = j[ca != cb]
                                if not flipped.empty:
                                    flip_frames.append(pd.DataFrame({
                                        "model": model, "run_a": old.run_id, "run_b": new.run_id, "suite": suite,
                                        "task": flipped["task"], "doc_id": flipped["doc_id"],
                                        "subject": flipped["subject_a"], "target": flipped["target_a"],
                                        "pred_a": flipped["pred_a"], "pred_b": flipped["pred_b"],
                                        "correct_a": flipped["correct_a"].astype(bool),
                                        "correct_b": flipped["correct_b"].astype(bool),
                                        "prompt_changed": changed[ca != cb].to_numpy()}))
                    reg_rows.append(row)
    regression = pd.DataFrame(reg_rows, columns=[
        "model", "run_a", "run_b", "suite", "task", "metric", "value_a", "value_b", "delta", "n_paired",
        "right_to_wrong", "wrong_to_right", "prompt_changed", "p_value"])
    # The regression tests are their own family (same model, consecutive runs), adjusted the same way.
    regression["p_holm"] = holm_adjust(regression["p_value"].to_numpy(float)) if len(regression) else pd.Series(dtype=float)
    flips = pd.concat(flip_frames, ignore_index=True) if flip_frames else pd.DataFrame(columns=[
        "model", "run_a", "run_b", "suite", "task", "doc_id", "subject", "target", "pred_a", "pred_b", "correct_a",
        "correct_b", "prompt_changed"])
    return regression, flips


# ---------------------------------------------------------------------------------------
# Display tables (formatted strings)


def _is_fraction(values: pd.Series) -> bool:
    v = values.dropna()
    return len(v) > 0 and bool(((v >= 0) & (v <= 1)).all())


def _fmt_score(value: float, pct: bool) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{100 * value:.1f}" if pct else f"{value:.3f}"


def _fmt_num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return ""
    value = float(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _fmt_p(p: Any) -> str:
    if p is None or pd.isna(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _shots(data: ReportData, run_id: str, suite: str) -> str:
    run = next((r for r in data.runs if r.run_id == run_id), None)
    return protocol.shots(run.manifest, suite, suite) if run is not None else "shots ?"


def _suite_shots(data: ReportData, suite: str) -> set[str]:
    """The shots a suite was run with across the report's entries (one value: the same protocol for all)."""
    return {_shots(data, str(r), suite) for r in data.summary.loc[data.summary["suite"] == suite, "run_id"]}


def _suite_header(data: ReportData, suite: str) -> str:
    """The suite with its protocol: metric, % where it is a fraction, and the shots when every entry had the same."""
    pct = _is_fraction(data.summary.loc[data.summary["suite"] == suite, "value"])
    shots = _suite_shots(data, suite)
    same = f", {next(iter(shots))}" if len(shots) == 1 else ""
    return f"{suite} ({data.primary_metric[suite]}{', %' if pct else ''}{same})"


def _when(stamp: Any) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS' (UTC in the manifest)."""
    text = str(stamp or "")
    return text[:19].replace("T", " ") if len(text) >= 19 and text[10] == "T" else text


def table_runs(data: ReportData) -> pd.DataFrame:
    rows = []
    for run in data.runs:
        vol = run.manifest.get("volatile") or {}
        missing = run.missing_pairs()
        rows.append({"run": run.run_id, "status": describe_status(run.manifest), "experiment": run.manifest.get("experiment", ""),
                     "config hash": run.manifest.get("config_hash", ""), "started": _when(vol.get("started")),
                     "finished": _when(vol.get("finished")), "host": vol.get("host", ""),
                     "models": len(run.manifest.get("models") or {}), "tasks": len(run.manifest.get("tasks") or {}),
                     "missing (model, suite/task)": len(missing) if not run.complete else ""})
    return pd.DataFrame(rows)


def table_main(data: ReportData) -> pd.DataFrame:
    """Models × suites grouped by origin, with build, mean over suites and throughput beside."""
    rows = []
    for _, e in data.entries.iterrows():
        mine = data.summary[data.summary["entry"] == e["entry"]].set_index("suite")
        row: dict[str, str] = {"origin": e["origin"], "model": e["entry"], "build": e["build"],
                               "chat template": e["chat_template"]}
        vals = []
        for suite in data.suites:
            pct = _is_fraction(data.summary.loc[data.summary["suite"] == suite, "value"])
            if suite in mine.index:
                r = mine.loc[suite]
                vals.append(float(r["value"]))
                cell = _fmt_score(r["value"], pct)
                if pd.notna(r["stderr"]):
                    cell += f" ± {_fmt_score(r['stderr'], pct)}"
                if len(_suite_shots(data, suite)) > 1:  # protocols differ within the column: say which
                    cell += f" ({_shots(data, str(r['run_id']), suite)})"
                row[_suite_header(data, suite)] = cell
            else:
                row[_suite_header(data, suite)] = ""
        # A mean over a different set of suites would not compare, so only full rows get one.
        all_pct = all(_is_fraction(data.summary.loc[data.summary["suite"] == s, "value"]) for s in data.suites)
        row["mean"] = _fmt_score(float(np.mean(vals)), all_pct) if vals and len(vals) == len(data.suites) else ""
        sp = data.speed[data.speed["entry"] == e["entry"]]
        s = sp.iloc[0] if len(sp) else pd.Series(dtype=float)
        row["eval tok/s"] = _fmt_num(s.get("eval_tokens_per_s"))
        row["prefill tok/s"] = _fmt_num(s.get("prefill_tokens_per_s"))
        row["decode tok/s"] = _fmt_num(s.get("decode_tokens_per_s"))
        row["TTFT s"] = _fmt_num(s.get("ttft_s"), 3)
        row["peak MB"] = _fmt_num(s.get("peak_memory_mb"), 0)
        rows.append(row)
    frame = pd.DataFrame(rows)
    # Drop throughput columns that no run filled, rather than showing empty ones.
    for col in ["eval tok/s", "prefill tok/s", "decode tok/s", "TTFT s", "peak MB"]:
        if col in frame and (frame[col] == "").all():
            frame = frame.drop(columns=col)
    return frame


def latest_per_model(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, suite): from the newest complete run, else the newest run (flagged incomplete).

    A model measured in several runs must count once in origin means, not once per run.
    """
    ordered = summary.assign(_complete=summary["run_status"] == "complete").sort_values(["_complete", "run_id"])
    return ordered.drop_duplicates(["model", "suite"], keep="last").drop(columns="_complete")


def table_origin(data: ReportData) -> pd.DataFrame:
    """Per suite and origin: number of models, mean and best score, each model counted once."""
    rows = []
    per_model = latest_per_model(data.summary)
    for suite in data.suites:
        sel = per_model[per_model["suite"] == suite]
        pct = _is_fraction(sel["value"])
        origins = sorted(sel["origin"].fillna("").unique(), key=lambda o: (_origin_key(o), o))
        for origin in origins:
            g = sel[sel["origin"].fillna("") == origin]
            best = g.sort_values("value", ascending=False).iloc[0]
            incomplete = int((g["run_status"] != "complete").sum())
            rows.append({"suite": _suite_header(data, suite), "origin": origin or "?", "models": len(g),
                         "mean": _fmt_score(g["value"].mean(), pct), "best": _fmt_score(best["value"], pct),
                         "best model": best["entry"],
                         "note": f"{incomplete} from incomplete runs" if incomplete else ""})
    frame = pd.DataFrame(rows)
    if len(frame) and (frame["note"] == "").all():
        frame = frame.drop(columns="note")
    return frame


def table_ranking(data: ReportData, suite: str) -> pd.DataFrame:
    sel = data.summary[data.summary["suite"] == suite].sort_values(["rank", "entry"])
    pct = _is_fraction(sel["value"])
    rows = []
    for _, r in sel.iterrows():
        ci = ""
        if pd.notna(r["ci_low"]) and pd.notna(r["ci_high"]):
            ci = f"[{_fmt_score(r['ci_low'], pct)}, {_fmt_score(r['ci_high'], pct)}]"
        mark = r["vs_above"]
        rows.append({"rank": str(r["rank"]) + (" (n.s.)" if mark == "not significant" else ""), "model": r["entry"],
                     "origin": r["origin"], "score": _fmt_score(r["value"], pct),
                     "stderr": _fmt_score(r["stderr"], pct), "95% CI": ci, "n": _fmt_num(r["n"], 0),
                     "p vs. above (Holm)": _fmt_p(r["p_vs_above"]), "difference to the one above": mark})
    return pd.DataFrame(rows)


def table_pairs(data: ReportData) -> pd.DataFrame:
    rows = []
    for _, r in data.pairs.iterrows():
        pct = _is_fraction(data.summary.loc[data.summary["suite"] == r["suite"], "value"])
        rows.append({"suite": r["suite"], "model A": r["entry_a"], "model B": r["entry_b"], "items": int(r["n_items"]),
                     "A": _fmt_score(r["mean_a"], pct), "B": _fmt_score(r["mean_b"], pct),
                     "A − B": _fmt_score(r["diff"], pct),
                     "only A right": int(r["only_a"]) if r["test"] == "mcnemar-exact" else "",
                     "only B right": int(r["only_b"]) if r["test"] == "mcnemar-exact" else "",
                     "test": r["test"], "p": _fmt_p(r["p_value"]), "p (Holm)": _fmt_p(r["p_holm"]),
                     "significant (Holm p<0.05)": "yes" if r["significant"] else "no"})
    return pd.DataFrame(rows)


def table_models(data: ReportData) -> pd.DataFrame:
    """What each model is and how it ran (the short facts; sources and batches are in table_provenance)."""
    cols = {"entry": "model", "origin": "origin", "organisation": "organisation", "family": "family",
            "params": "params", "build": "build", "dtype": "dtype", "device": "device", "engine": "engine",
            "chat_template": "chat template"}
    return _nonempty(data.entries[list(cols)].rename(columns=cols))


def table_provenance(data: ReportData) -> pd.DataFrame:
    """Where each model's weights came from and how its batches were chosen: long text, for the details section."""
    cols = {"entry": "model", "source": "source", "weights_sha256": "weights sha256", "batch": "batch"}
    return _nonempty(data.entries[list(cols)].rename(columns=cols))


def _nonempty(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.astype(str).replace({"nan": "", "None": ""})
    keep = [c for c in frame.columns if c in ("model", "origin") or (frame[c] != "").any()]
    return frame[keep]


def table_subtasks(data: ReportData, suite: str) -> pd.DataFrame | None:
    """Subtasks (rows) × entries (columns) for a suite that has subtasks."""
    metric = data.primary_metric[suite]
    sel = data.scores[(data.scores["suite"] == suite) & (data.scores["task"] != suite) & (data.scores["metric"] == metric)]
    if sel.empty:
        return None
    pct = _is_fraction(sel["value"])
    wide = sel.pivot_table(index="task", columns="entry", values="value", aggfunc="first")
    order = [e for e in data.entries["entry"] if e in wide.columns]
    wide = wide[order].map(lambda v: _fmt_score(v, pct)).reset_index()
    return wide.rename(columns={"task": f"{suite} task ({metric}{', %' if pct else ''})"})


def table_parity(data: ReportData) -> pd.DataFrame | None:
    """The parity certificate of each run: per model, what was re-answered by lm-eval's hf model and how close."""
    rows = []
    for run in data.runs:
        parity = run.manifest.get("parity") or {}
        models = run.manifest.get("models") or {}
        if not any((info or {}).get("parity") for info in models.values()):
            if parity.get("status") in ("reference engine", "off"):
                rows.append({"run": run.run_id, "model": "(all)", "status": parity["status"]})
            continue
        wall = _run_seconds(run)
        for model, info in models.items():
            records = list(((info or {}).get("parity") or {}).values())
            if not records:
                continue
            diffs = [r["max_abs_diff"] for r in records if "max_abs_diff" in r]
            generated = [r for r in records if r.get("type") == "generate_until"]
            seconds = sum(float(r.get("seconds") or 0.0) for r in records)
            docs = sum(int(r.get("argmax_documents") or 0) for r in records)
            rows.append({
                "run": run.run_id, "model": model,
                "status": "passed" if all(r.get("passed") for r in records) else "FAILED: " + ", ".join(
                    t for t, r in (info.get("parity") or {}).items() if not r.get("passed")),
                "tasks": len(records), "requests": sum(int(r.get("requests") or 0) for r in records),
                "max |Δ loglik|": f"{max(diffs):.1e}" if diffs else "",
                "same answer": f"{sum(int(r.get('argmax_agree') or 0) for r in records)}/{docs}" if docs else "",
                "greedy outputs identical": (f"{sum(int(r.get('identical') or 0) for r in generated)}/"
                                             f"{sum(int(r.get('compared') or 0) for r in generated)}"
                                             + _skipped(sum(int(r.get("sampled_skipped") or 0) for r in generated))) if generated else "",
                "seconds": _fmt_num(seconds), "share of run": f"{100 * seconds / wall:.1f}%" if wall else "",
            })
    return pd.DataFrame(rows) if rows else None


def _skipped(sampled: int) -> str:
    return f" ({sampled} sampled, not compared)" if sampled else ""


def _tolerance_words(tolerance: dict[str, Any]) -> str:
    """{"dtype": "bfloat16", "max_abs_loglik": 0.05, "relative": 0.012} -> "bfloat16: 0.05 + 1.2% of |loglik|"."""
    text = f"{tolerance.get('dtype')}: {float(tolerance.get('max_abs_loglik') or 0):g}"
    relative = float(tolerance.get("relative") or 0)
    return text + (f" + {100 * relative:g}% of |loglik|" if relative else "")


def _run_seconds(run: Run) -> float | None:
    vol = run.manifest.get("volatile") or {}
    try:
        started = dt.datetime.fromisoformat(str(vol["started"]))
        finished = dt.datetime.fromisoformat(str(vol["finished"]))
    except (KeyError, TypeError, ValueError):
        return None
    return (finished - started).total_seconds() or None


# fail_<cause> metrics of code tasks (see benchharness.sandbox.FAILURE_CATEGORIES) -> report columns.
CODE_OUTCOMES = {"assertion": "failed: assertion", "error": "failed: error", "exit": "failed: early exit",
                 "timeout": "timeout", "limit": "limit (CPU, memory, files)", "refused": "refused by the sandbox",
                 "setup": "sandbox setup error"}


def table_code_outcomes(data: ReportData) -> pd.DataFrame | None:
    """How the samples of code tasks ended, in counts per model and task: a weak model (assertions,
    errors) reads differently from a blocked one (timeouts, limits, refusals)."""
    scores = data.scores[~data.scores["group_computed"].fillna(False).astype(bool)] if "group_computed" in data.scores else data.scores
    metrics = scores["metric"].astype(str)
    sel = scores[metrics.str.startswith("fail_")]
    if sel.empty:
        return None
    rows = []
    for entry in data.entries["entry"]:
        for task, group in sel[sel["entry"] == entry].groupby("task", sort=True):
            n = int(group["n"].max())
            counts = {str(m)[len("fail_"):]: int(round(float(v) * n)) for m, v in zip(group["metric"], group["value"])}
            passed = scores[(scores["entry"] == entry) & (scores["task"] == task) & (metrics == "pass@1")]
            row: dict[str, Any] = {"model": entry, "task": task, "n": n,
                                   "passed": int(round(float(passed["value"].iloc[0]) * n)) if len(passed) else ""}
            row.update({label: counts.get(cause, "") for cause, label in CODE_OUTCOMES.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def table_probe(data: ReportData) -> pd.DataFrame | None:
    if data.probe.empty:
        return None
    rows = []
    for _, r in data.probe.iterrows():
        rows.append({"model": r["entry"], "phase": r["phase"], "batch": _fmt_num(r.get("batch"), 0),
                     "prompt len": _fmt_num(r.get("prompt_len"), 0), "new tokens": _fmt_num(r.get("new_tokens"), 0),
                     "tok/s (median)": _fmt_num(r.get("tokens_per_s")),
                     "tok/s p25–p75": (f"{_fmt_num(r.get('tokens_per_s_p25'))}–{_fmt_num(r.get('tokens_per_s_p75'))}"
                                       if pd.notna(r.get("tokens_per_s_p25")) else ""),
                     "TTFT s": _fmt_num(r.get("ttft_s"), 3),
                     "TTFT p90 / p99 s": (f"{_fmt_num(r.get('ttft_p90_s'), 3)} / {_fmt_num(r.get('ttft_p99_s'), 3)}"
                                          if pd.notna(r.get("ttft_p90_s")) else ""),
                     "ms per output token p50 / p90 / p99": (
                         f"{_fmt_num(r.get('latency_p50_ms'), 1)} / {_fmt_num(r.get('latency_p90_ms'), 1)} / {_fmt_num(r.get('latency_p99_ms'), 1)}"
                         if r.get("phase") == "serve" else ""),
                     "peak MB": _fmt_num(r.get("peak_memory_mb"), 0),
                     "FLOP efficiency": _fmt_num(r.get("flops_efficiency"), 3), "reps": _fmt_num(r.get("reps"), 0)})
    frame = pd.DataFrame(rows)
    keep = [c for c in frame.columns if c in ("model", "phase") or (frame[c] != "").any()]
    return frame[keep]


def _run_label(data: ReportData, run_id: str) -> str:
    run = next(r for r in data.runs if r.run_id == run_id)
    return run_id if run.complete else run_id + INCOMPLETE_TAG


def table_regression(data: ReportData) -> pd.DataFrame | None:
    if data.regression.empty:
        return None
    rows = []
    for _, r in data.regression.iterrows():
        pct = _is_fraction(pd.Series([r["value_a"], r["value_b"]]))
        flips = data.flips[(data.flips["model"] == r["model"]) & (data.flips["run_a"] == r["run_a"])
                           & (data.flips["run_b"] == r["run_b"]) & (data.flips["task"] == r["task"])]
        shown = ", ".join(str(d) for d in flips["doc_id"].head(MAX_FLIPS_SHOWN))
        if len(flips) > MAX_FLIPS_SHOWN:
            shown += f", … ({len(flips)} in flips.csv)"
        rows.append({"model": r["model"], "run A": _run_label(data, r["run_a"]), "run B": _run_label(data, r["run_b"]),
                     "task": r["task"],
                     "A": _fmt_score(r["value_a"], pct), "B": _fmt_score(r["value_b"], pct),
                     "delta": ("+" if r["delta"] > 0 else "") + _fmt_score(r["delta"], pct),
                     "right→wrong": _fmt_num(r["right_to_wrong"], 0), "wrong→right": _fmt_num(r["wrong_to_right"], 0),
                     "p": _fmt_p(r["p_value"]), "p (Holm)": _fmt_p(r["p_holm"]),
                     "prompt changed": _fmt_num(r["prompt_changed"], 0),
                     "flipped doc_ids": shown})
    return pd.DataFrame(rows)


def banner_lines(data: ReportData) -> list[str]:
    """Warnings for runs that are not complete; shown at the top of every report."""
    lines = []
    for run in data.runs:
        parity = run.manifest.get("parity") or {}
        if parity.get("status") == "failed":
            lines.append(f"Run {run.run_id}: PARITY FAILED on {', '.join(parity.get('failed', []))}: the benchharness engine's "
                         "results differ from lm-eval's hf model beyond the tolerance (see 'Parity certificate'); its scores "
                         "are shown but not certified.")
    for run in data.incomplete_runs():
        missing = run.missing_pairs()
        state = describe_status(run.manifest)
        detail = f" ({state})" if state != run.status else ""
        text = f"Run {run.run_id} is {run.status.upper()}{detail}, not complete: its rows are marked '{INCOMPLETE_TAG.strip()}'"
        if missing:
            shown = ", ".join(f"{m}/{t}" for m, t in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            text += f"; missing {len(missing)} (model, suite/task) pairs: {shown}{more}"
        lines.append(text + ".")
    return lines


# ---------------------------------------------------------------------------------------
# Rendering


def _md_cell(value: Any) -> str:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    if frame is None or frame.empty:
        return "_(no rows)_\n"
    header = "| " + " | ".join(_md_cell(c) for c in frame.columns) + " |"
    sep = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, sep, *body]) + "\n"


@dataclass
class Section:
    title: str
    intro: str = ""
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (caption, table)
    details: bool = False  # long provenance: folded away in the HTML report, last in both


def _sections(data: ReportData) -> list[Section]:
    sections = [Section("Runs", "", [("", table_runs(data))])]
    sections.append(Section(
        "Scores by model and suite",
        "Grouped by origin. Scores are the suite's group score (± standard error; where the run wrote only "
        "subtask rows, the item-weighted mean of its subtasks); `mean` is the unweighted mean "
        "over suites, shown only for models with every suite. Throughput is measured in the same run: `eval tok/s` "
        "over the evaluation itself, prefill/decode from the fixed-shape probe. `build` says which weights produced "
        "the score (quantization, variant).",
        [("", table_main(data))]))
    sections.append(Section("Origin summary", "Per suite and origin: number of models, mean and best score. A model "
                            "measured in several runs counts once, from its newest complete run.",
                            [("", table_origin(data))]))
    sections.append(Section(
        "Ranking per suite",
        f"95% confidence intervals are percentile bootstraps over items ({N_BOOT} resamples, seed {data.seed}) "
        "unless scores.csv already carried them. `p vs. above (Holm)` is a paired test (exact McNemar on right/wrong items, "
        "else a paired bootstrap) against the model ranked just above on the same items, Holm-adjusted over all "
        f"{len(data.pairs)} pairwise tests of this report (see Paired comparisons); a difference with adjusted p ≥ 0.05 "
        "is marked `(n.s.)`.",
        [(s, table_ranking(data, s)) for s in data.suites]))
    if not data.pairs.empty:
        sections.append(Section("Paired comparisons", "Every two models with per-item results on the same items. "
                                f"`p` is each test's own p-value; `p (Holm)` is adjusted for the {len(data.pairs)} tests of "
                                "this table taken together (Holm's step-down method), so `significant` holds for the family: "
                                "the chance that any of them is a false positive is at most 5%.",
                                [("", table_pairs(data))]))
    reg = table_regression(data)
    if reg is not None:
        sections.append(Section(
            "Regression: the same model across runs",
            "Consecutive runs of the same model side by side (B is the newer run). `right→wrong` / `wrong→right` count "
            "items whose answer flipped; `prompt changed` counts paired items whose prompt hash differs; p is a paired "
            "test on the flips, `p (Holm)` the same adjusted over this table's "
            f"{int(data.regression['p_value'].notna().sum())} tests. Every flipped item is in flips.csv.",
            [("", reg)]))
    sections.append(Section("Models", "What each model is and how it ran; where its weights came from and how its "
                            "batches were chosen are under Details.", [("", table_models(data))]))
    probe = table_probe(data)
    if probe is not None:
        sections.append(Section("Speed probe", "Fixed-shape prefill/decode measurements (median over reps). `serve` rows: "
                                "the continuous-batching scenario, every request arriving at once, `batch` = decoding slots; "
                                "TTFT over the requests (median, p90, p99), time per output token after the first.",
                                [("", probe)]))
    parity = table_parity(data)
    if parity is not None:
        tolerances = sorted({_tolerance_words((r.manifest.get("parity") or {}).get("tolerance")) for r in data.runs
                             if (r.manifest.get("parity") or {}).get("tolerance")})
        sections.append(Section(
            "Parity certificate",
            "In every run of the benchharness engine a deterministic sample of each task's requests (whole documents, "
            "`parity: {requests: N}` per model, task and request type) is answered again by lm-eval's own `hf` model on the "
            "same weights in the same process and compared with the answers the scores were computed from: the largest "
            "loglikelihood difference, whether the chosen answer is the same (a document whose two best hf scores are within "
            "the tolerance counts either way), and whether greedy generations are identical. Tolerance: "
            + ("; ".join(tolerances) if tolerances else "none recorded") + ". `share of run` is the certificate's seconds over "
            "the run's wall time.",
            [("", parity)]))
    outcomes = table_code_outcomes(data)
    if outcomes is not None:
        sections.append(Section(
            "Code execution outcomes",
            "How each code sample ended, in counts. A sample passes only when the problem's tests returned normally "
            "in the sandbox's checker, a process the program cannot reach; an exit status is never a pass. It fails by "
            "an assertion of the tests, by an error (an exception in the program, or an answer that is not plain data), "
            "by an early exit (an exit call, a signal, the process ending mid-check), by the wall-clock timeout or a "
            "resource limit, or by an operation the sandbox refused (files, network, processes). A setup error is the "
            "harness's failure, not the model's.",
            [("", outcomes)]))
    subs = [(s, t) for s in data.suites if (t := table_subtasks(data, s)) is not None]
    if subs:
        sections.append(Section("Subtasks", "Scores of each subtask of the suites that have them.", subs))
    sections.append(Section("Details: sources and batches", "Where each model's weights came from (source, the "
                            "first 12 hex digits of their sha256) and how the engine chose its batches.",
                            [("", table_provenance(data))], details=True))
    return sections


def render_markdown(data: ReportData, title: str, images: list[tuple[str, str]] | None = None) -> str:
    """The report as markdown; `images` are (caption, relative path) pairs."""
    out = [f"# {title}", ""]
    for line in banner_lines(data):
        out += [f"> **WARNING:** {line}", ""]
    for note in data.notes:
        out += [f"> Note: {note}", ""]
    for section in _sections(data):
        out += [f"## {section.title}", ""]
        if section.intro:
            out += [section.intro, ""]
        for caption, table in section.tables:
            if caption:
                out += [f"### {caption}", ""]
            out += [md_table(table)]
    if images:
        out += ["## Plots", ""]
        for caption, rel in images:
            out += [f"![{caption}]({rel})", ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;max-width:1400px;padding:0 1rem;color:#222}
h1{font-size:1.5rem;word-break:break-word}
.wrap{overflow-x:auto;max-width:100%;margin:0.5rem 0 1.5rem}
table{border-collapse:collapse;font-size:0.8rem}
th,td{border:1px solid #ccc;padding:0.2rem 0.4rem;text-align:left;vertical-align:top}
td{max-width:16rem;overflow-wrap:break-word}
details summary{cursor:pointer}details summary h2{display:inline}
th{background:#f3f3f3}
tr:nth-child(even) td{background:#fafafa}
.banner{background:#fff3cd;border:2px solid #c77c00;padding:0.75rem 1rem;margin:1rem 0;font-weight:600}
.note{color:#555}
figure{margin:1rem 0}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


def _html_table(table: pd.DataFrame) -> str:
    """pandas' HTML table, with headers broken before their parenthesis so narrow columns stay narrow."""
    text = table.to_html(index=False, escape=True, na_rep="", border=0)
    text = re.sub(r"(<th>[^<(]+?) (\()", r"\1<br>\2", text)
    # Long names (gsm8k_zeroshot, exact_match) may break after an underscore.
    return re.sub(r"<th>(.*?)</th>", lambda m: "<th>" + m.group(1).replace("_", "_<wbr>") + "</th>", text)


def render_html(data: ReportData, title: str, images: list[tuple[str, Path]] | None = None) -> str:
    """One self-contained HTML file: inline CSS, PNGs embedded as base64 data URIs, no scripts."""
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for line in banner_lines(data):
        out.append(f'<div class="banner incomplete">WARNING: {esc(line)}</div>')
    for note in data.notes:
        out.append(f'<p class="note">Note: {esc(note)}</p>')
    for section in _sections(data):
        if section.details:
            out.append(f"<details><summary><h2>{esc(section.title)}</h2></summary>")
        else:
            out.append(f"<h2>{esc(section.title)}</h2>")
        if section.intro:
            # The intros are written for markdown: render their `code` spans as <code>.
            out.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(section.intro)) + "</p>")
        for caption, table in section.tables:
            if caption:
                out.append(f"<h3>{esc(caption)}</h3>")
            if table is None or table.empty:
                out.append("<p><em>(no rows)</em></p>")
            else:
                # A wide table scrolls inside its own box; the page keeps the window's width.
                out.append('<div class="wrap">' + _html_table(table) + "</div>")
        if section.details:
            out.append("</details>")
    if images:
        out.append("<h2>Plots</h2>")
        for caption, path in images:
            b64 = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Entry points


def write_run_report(run_dir: Path, seed: int = 0) -> Path:
    """Write run_dir/report.md for one run (tables only, no plots) and return its path."""
    run_dir = Path(run_dir)
    data = collect([run_dir], seed=seed)
    run = data.runs[0]
    title = f"benchharness run {run.run_id}" + (f" — {run.manifest['experiment']}" if run.manifest.get("experiment") else "")
    path = run_dir / "report.md"
    atomic_write_text(path, render_markdown(data, title))
    return path


@dataclass(frozen=True)
class ReportPaths:
    out_dir: Path
    markdown: Path
    html: Path
    scores: Path
    summary: Path
    pairs: Path
    flips: Path
    plots: tuple[Path, ...]

    def __str__(self) -> str:
        return str(self.html)


def default_output_dir(run_dirs: list[Path]) -> Path:
    """A single run's report goes in run_dir/report/; a merged one in results/report-<UTC time>/."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(run_dirs[0]).resolve().parent / f"report-{stamp}"


def build_report(run_dirs: list[Path], out_dir: Path | None = None, seed: int = 0) -> ReportPaths:
    """Merge runs and write report.md, report.html, scores.csv, summary.csv, pairs.csv, flips.csv and plots."""
    from benchharness import plots  # matplotlib is only needed here

    if not run_dirs:
        raise HarnessError("no run folders given. Fix: pass one or more folders under results/.")
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(run_dirs)
    if (out_dir / "manifest.json").is_file():
        # A run folder's own scores.csv must never be replaced by the merged table.
        raise HarnessError(f"{out_dir} is a run folder; writing the report there would overwrite its scores.csv. "
                           f"Fix: pass --output {out_dir / 'report'} (or leave --output out).")
    data = collect(run_dirs, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = "benchharness report: " + ", ".join(r.run_id for r in data.runs)

    plot_paths = plots.write_plots(data.summary, out_dir)
    images = [(p.stem.replace("_", " "), p) for p in plot_paths]

    paths = ReportPaths(out_dir=out_dir, markdown=out_dir / "report.md", html=out_dir / "report.html",
                        scores=out_dir / "scores.csv", summary=out_dir / "summary.csv", pairs=out_dir / "pairs.csv",
                        flips=out_dir / "flips.csv", plots=tuple(plot_paths))
    atomic_write_text(paths.scores, data.scores.to_csv(index=False))
    atomic_write_text(paths.summary, data.summary.to_csv(index=False))
    atomic_write_text(paths.pairs, data.pairs.to_csv(index=False))
    atomic_write_text(paths.flips, data.flips.to_csv(index=False))
    atomic_write_text(paths.markdown, render_markdown(data, title, [(c, p.name) for c, p in images]))
    atomic_write_text(paths.html, render_html(data, title, images))
    log.info("report written to %s", out_dir)
    return paths
