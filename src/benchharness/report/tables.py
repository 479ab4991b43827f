"""The report's tables as display frames: formatted scores, intervals, p-values and words, one function per table."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pandas as pd

from benchharness.report.collect import INCOMPLETE_TAG, ReportData, Run, origin_key
from benchharness.store import protocol
from benchharness.store.run_folder import describe_status

MAX_FLIPS_SHOWN = 10


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
        origins = sorted(sel["origin"].fillna("").unique(), key=lambda o: (origin_key(o), o))
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


def table_protocols(data: ReportData) -> pd.DataFrame | None:
    """The protocol each suite's headline score was measured under (scores.csv `protocol`), one row
    per suite and protocol with the models measured so: two numbers on different rows are
    different measurements."""
    scores = data.scores
    if "protocol" not in scores.columns:
        return None
    rows = []
    for suite in data.suites:
        sel = scores[(scores["suite"] == suite) & (scores["task"] == suite) & (scores["metric"] == data.primary_metric[suite])]
        if sel.empty:  # a one-task suite: its task's rows
            sel = scores[(scores["suite"] == suite) & (scores["metric"] == data.primary_metric[suite])]
        for text, group in sel.dropna(subset=["protocol"]).groupby("protocol", sort=True):
            rows.append({"suite": suite, "protocol": text, "models": ", ".join(sorted(dict.fromkeys(str(e) for e in group["entry"])))})
    return pd.DataFrame(rows, columns=["suite", "protocol", "models"]) if rows else None


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
                                             + _near_ties(sum(int(r.get("near_ties") or 0) for r in generated))
                                             + _skipped(sum(int(r.get("sampled_skipped") or 0) for r in generated))) if generated else "",
                "seconds": _fmt_num(seconds), "share of run": f"{100 * seconds / wall:.1f}%" if wall else "",
            })
    return pd.DataFrame(rows) if rows else None


def _near_ties(count: int) -> str:
    return f" (+{count} parting at a near-tie)" if count else ""


def _skipped(sampled: int) -> str:
    return f" ({sampled} sampled, not compared)" if sampled else ""


def tolerance_words(tolerance: dict[str, Any]) -> str:
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


# fail_<cause> metrics of code tasks (see benchharness.scorers.sandbox.FAILURE_CATEGORIES) -> report columns.
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
