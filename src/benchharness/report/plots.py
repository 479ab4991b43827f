"""PNG plots for the report (matplotlib, Agg backend: no display needed).

Input is the report's summary table: one row per (entry, suite) with value, ci_low,
ci_high, origin, run_status and the entry's throughput columns.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never try to open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

ORIGIN_ORDER = ["CN", "US", "EU"]
ORIGIN_COLORS = {"CN": "#d62728", "US": "#1f77b4", "EU": "#2ca02c"}
OTHER_COLOR = "#7f7f7f"
DPI = 110


def _color(origin: str) -> str:
    return ORIGIN_COLORS.get(origin, OTHER_COLOR)


def _origin_key(origin: str) -> int:
    return ORIGIN_ORDER.index(origin) if origin in ORIGIN_ORDER else len(ORIGIN_ORDER)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "suite"


def _errors(rows: pd.DataFrame) -> np.ndarray | None:
    """Asymmetric error bars from the CI; None when no row has one."""
    low, high, val = rows["ci_low"].astype(float), rows["ci_high"].astype(float), rows["value"].astype(float)
    if low.isna().all() or high.isna().all():
        return None
    lower = (val - low).clip(lower=0).fillna(0).to_numpy()
    upper = (high - val).clip(lower=0).fillna(0).to_numpy()
    return np.vstack([lower, upper])


def plot_suite_bars(summary: pd.DataFrame, suite: str, path: Path) -> Path:
    """Bars of one suite's scores, grouped by origin (CN, US, EU, others), with 95% CI whiskers."""
    fig = suite_bars_figure(summary, suite)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def suite_bars_figure(summary: pd.DataFrame, suite: str) -> Figure:
    """The figure behind plot_suite_bars; its first axes holds one bar per entry, left to right.

    Entries from incomplete runs are hatched so they are never read as final numbers.
    """
    rows = summary[summary["suite"] == suite].copy()
    rows["origin"] = rows["origin"].fillna("?").astype(str)
    rows["_okey"] = rows["origin"].map(_origin_key)
    rows = rows.sort_values(["_okey", "origin", "value"], ascending=[True, True, False]).reset_index(drop=True)
    metric = str(rows["metric"].iloc[0]) if len(rows) else ""

    # A gap between origin groups makes the grouping visible without extra ink.
    xs, x, prev = [], 0.0, None
    for origin in rows["origin"]:
        if prev is not None and origin != prev:
            x += 0.6
        xs.append(x)
        x += 1.0
        prev = origin
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2.0), 4.2))
    incomplete = (rows["run_status"] != "complete").to_numpy() if "run_status" in rows else np.zeros(len(rows), bool)
    bars = ax.bar(xs, rows["value"].astype(float), color=[_color(o) for o in rows["origin"]], edgecolor="black",
                  linewidth=0.6, yerr=_errors(rows), capsize=4, error_kw={"elinewidth": 1.0})
    for bar, inc in zip(bars, incomplete):
        if inc:
            bar.set_hatch("//")
    ax.set_xticks(xs)
    ax.set_xticklabels(rows["entry"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    if len(rows) and rows["value"].between(0, 1).all():
        ax.set_ylim(0, 1)
    ax.set_title(f"{suite}: {metric} by origin (95% CI)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_color(o)) for o in dict.fromkeys(rows["origin"])]
    labels = list(dict.fromkeys(rows["origin"]))
    if incomplete.any():
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch="//"))
        labels.append("incomplete run")
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_score_vs_throughput(summary: pd.DataFrame, path: Path) -> Path | None:
    """Score against evaluation throughput, one panel per suite; None when no entry has a speed."""
    fig = score_vs_throughput_figure(summary)
    if fig is None:
        return None
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def score_vs_throughput_figure(summary: pd.DataFrame) -> Figure | None:
    """The figure behind plot_score_vs_throughput: one axes per suite (sorted by name)."""
    if "eval_tokens_per_s" not in summary or summary["eval_tokens_per_s"].notna().sum() == 0:
        return None
    suites = sorted(summary["suite"].unique())
    cols = min(3, len(suites))
    nrows = int(np.ceil(len(suites) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    for ax, suite in zip(axes.flat, suites):
        rows = summary[(summary["suite"] == suite) & summary["eval_tokens_per_s"].notna()]
        origins = rows["origin"].fillna("?").astype(str)
        for origin in sorted(origins.unique(), key=lambda o: (_origin_key(o), o)):
            g = rows[origins == origin]
            done = (g["run_status"] == "complete") if "run_status" in g else pd.Series(True, index=g.index)
            for complete, part in ((True, g[done]), (False, g[~done])):
                if part.empty:
                    continue
                # Hollow markers for entries from incomplete runs, like the hatched bars.
                ax.errorbar(part["eval_tokens_per_s"], part["value"], yerr=_errors(part), fmt="o", color=_color(origin),
                            mfc=_color(origin) if complete else "white", capsize=3,
                            label=origin if complete else f"{origin} (incomplete run)")
            for _, r in g.iterrows():
                ax.annotate(str(r["entry"]), (r["eval_tokens_per_s"], r["value"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        speeds = rows["eval_tokens_per_s"]
        if len(speeds) and speeds.min() > 0 and speeds.max() / speeds.min() > 20:
            ax.set_xscale("log")  # models of very different size: a linear axis squeezes the small ones
        ax.set_title(suite)
        ax.set_xlabel("evaluation tokens/s")
        ax.set_ylabel(str(rows["metric"].iloc[0]) if len(rows) else "score")
        ax.grid(alpha=0.3)
        if len(rows):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(suites):]:
        ax.set_visible(False)
    fig.suptitle("Score against throughput (same run)")
    fig.tight_layout()
    return fig


def write_plots(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """All plots of the report into out_dir; returns the PNG paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if summary.empty:
        return paths
    for suite in sorted(summary["suite"].unique()):
        paths.append(plot_suite_bars(summary, suite, out_dir / f"scores_{_slug(str(suite))}.png"))
    scatter = plot_score_vs_throughput(summary, out_dir / "score_vs_throughput.png")
    if scatter is not None:
        paths.append(scatter)
    return paths
