"""Plots: the PNGs are real images, bars are grouped by origin with CI whiskers, incomplete runs hatched."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from benchharness.report.plots import ORIGIN_COLORS, score_vs_throughput_figure, suite_bars_figure, write_plots


def _summary(with_speed: bool = True) -> pd.DataFrame:
    rows = [
        # entry, origin, value, ci_low, ci_high, status, tokens/s
        ("eu-a", "EU", 0.40, 0.30, 0.50, "complete", 1000.0),
        ("us-a", "US", 0.55, 0.50, 0.62, "complete", 500.0),
        ("cn-b", "CN", 0.60, 0.52, 0.70, "incomplete", 200.0),
        ("cn-a", "CN", 0.70, 0.65, 0.75, "complete", 250.0),
    ]
    frame = pd.DataFrame([{"entry": e, "model": e, "origin": o, "suite": "arc", "metric": "acc", "value": v,
                           "ci_low": lo, "ci_high": hi, "run_status": st, "eval_tokens_per_s": sp}
                          for e, o, v, lo, hi, st, sp in rows])
    frame = pd.concat([frame, frame.assign(suite="mmlu", value=frame["value"] - 0.1, ci_low=np.nan, ci_high=np.nan)])
    if not with_speed:
        frame["eval_tokens_per_s"] = np.nan
    return frame.reset_index(drop=True)


def test_bars_grouped_by_origin_with_ci_and_hatched_incomplete() -> None:
    fig = suite_bars_figure(_summary(), "arc")
    ax = fig.axes[0]
    bars = ax.patches[:4]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["cn-a", "cn-b", "us-a", "eu-a"]  # CN, US, EU; best first within an origin
    assert [b.get_height() for b in bars] == pytest.approx([0.70, 0.60, 0.55, 0.40])
    assert [to_hex(b.get_facecolor()) for b in bars] == [ORIGIN_COLORS[o] for o in ["CN", "CN", "US", "EU"]]
    assert [b.get_hatch() for b in bars] == [None, "//", None, None]
    # a gap separates the origin groups
    xs = [b.get_x() + b.get_width() / 2 for b in bars]
    assert xs[1] - xs[0] == pytest.approx(1.0) and xs[2] - xs[1] > 1.0
    # the whiskers span the confidence intervals
    segments = ax.collections[0].get_segments()
    spans = sorted((round(float(s[0][1]), 6), round(float(s[1][1]), 6)) for s in segments)
    assert spans == sorted([(0.65, 0.75), (0.52, 0.70), (0.50, 0.62), (0.30, 0.50)])
    assert "incomplete run" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)


def test_bars_without_ci_have_no_whiskers() -> None:
    fig = suite_bars_figure(_summary(), "mmlu")
    assert len(fig.axes[0].collections) == 0
    plt.close(fig)


def test_score_vs_throughput_points() -> None:
    fig = score_vs_throughput_figure(_summary())
    assert fig is not None
    arc = fig.axes[0]
    assert arc.get_title() == "arc"
    # each errorbar container's first line is the data points of one origin
    points = sorted((float(x), float(y)) for c in arc.containers for x, y in c.lines[0].get_xydata())
    assert points == sorted([(1000.0, 0.40), (500.0, 0.55), (200.0, 0.60), (250.0, 0.70)])
    labels = [t.get_text() for t in arc.get_legend().get_texts()]
    assert labels == ["CN", "CN (incomplete run)", "US", "EU"]
    plt.close(fig)
    assert score_vs_throughput_figure(_summary(with_speed=False)) is None


def test_write_plots_writes_valid_pngs(tmp_path: Path) -> None:
    paths = write_plots(_summary(), tmp_path)
    assert [p.name for p in paths] == ["scores_arc.png", "scores_mmlu.png", "score_vs_throughput.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # not a blank canvas
    assert [p.name for p in write_plots(_summary(with_speed=False), tmp_path / "nospeed")] == [
        "scores_arc.png", "scores_mmlu.png"]
    assert write_plots(_summary().iloc[0:0], tmp_path / "empty") == []
