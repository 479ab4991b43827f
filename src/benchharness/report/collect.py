"""Read run folders and compute what the report shows: the merged score table, summaries per model and suite, paired tests and ranks, regressions between runs, speed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchharness.config.experiment import EXTERNAL_ENGINES
from benchharness.errors import HarnessError
from benchharness.store.score_rows import set_protocol_columns
from benchharness.scorers.stats import (
    bootstrap_ci,
    holm_adjust,
    mean_stderr,
    paired_test,
)

ORIGIN_ORDER = ["CN", "US", "EU"]


# Which metric represents a suite when it reports several; first match wins. Names are
# compared on the part before lm-eval's ",filter" suffix (e.g. "exact_match,strict-match").
METRIC_PRIORITY = ["acc", "exact_match", "pass@1", "acc_norm", "f1", "em", "mc2", "bleu"]


ALPHA = 0.05


N_BOOT = 1000


INCOMPLETE_TAG = " [incomplete]"


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
    if len(scores) and "protocol" not in scores.columns:
        set_protocol_columns(manifest, scores)  # a run written before scores.csv carried protocol cards
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
    published: pd.DataFrame = field(default_factory=pd.DataFrame)  # against published (report/published.py)

    def incomplete_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.complete]


def origin_key(origin: Any) -> int:
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
    frame["_okey"] = frame["origin"].map(origin_key)
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
    if batch.get("engine") in EXTERNAL_ENGINES:
        return str(batch.get("how") or batch.get("engine"))
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
