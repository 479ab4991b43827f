"""The report as Markdown and as one self-contained HTML page, and the `report` command's entry points."""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchharness.errors import HarnessError
from benchharness.files import atomic_write_text
from benchharness.report.collect import N_BOOT, ReportData, collect
from benchharness.report.published import against_published, table_published
from benchharness.report.tables import (
    banner_lines,
    table_code_outcomes,
    table_main,
    table_models,
    table_origin,
    table_pairs,
    table_parity,
    table_probe,
    table_protocols,
    table_provenance,
    table_ranking,
    table_regression,
    table_runs,
    table_subtasks,
    tolerance_words,
)

log = logging.getLogger(__name__)


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
    protocols = table_protocols(data)
    if protocols is not None:
        sections.append(Section("Protocols", "How each suite's headline score was measured (shots, chat template, thinking "
                                "switch, generation settings, metric and filter), as every row of scores.csv carries it. Scores "
                                "on different rows here are different measurements.", [("", protocols)]))
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
    published = table_published(data.published)
    if published is not None:
        sections.append(Section(
            "Against published",
            "Our score on each suite beside the scores the model's makers published (catalog `published:`, with the "
            "source and the table it was read from). `what differs` lists every way the two measurements differ that the "
            "records show (shots, chat template, the build we evaluated, base or instruct variant, a subset of the items); "
            "a published value outside our interval with differences listed is two protocols disagreeing, not an error "
            "in itself. Scores in percent.",
            [("", published)]))
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
        tolerances = sorted({tolerance_words((r.manifest.get("parity") or {}).get("tolerance")) for r in data.runs
                             if (r.manifest.get("parity") or {}).get("tolerance")})
        sections.append(Section(
            "Parity certificate",
            "In every run of the benchharness engine a deterministic sample of each task's requests (whole documents, "
            "`parity: {requests: N}` per model, task and request type) is answered again by lm-eval's own `hf` model on the "
            "same weights in the same process and compared with the answers the scores were computed from: the largest "
            "loglikelihood difference, whether the chosen answer is the same (a document whose two best hf scores are within "
            "the tolerance counts either way), and whether greedy generations are identical (in bf16/fp16 one may part from hf's "
            "at a near-tie of the model's own choice, engine/parity.py). Tolerance: "
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


def write_run_report(run_dir: Path, seed: int = 0) -> Path:
    """Write run_dir/report.md for one run (tables only, no plots) and return its path."""
    run_dir = Path(run_dir)
    data = collect([run_dir], seed=seed)
    data.published = against_published(data)
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


def build_report(run_dirs: list[Path], out_dir: Path | None = None, seed: int = 0, published: Path | None = None) -> ReportPaths:
    """Merge runs and write report.md, report.html, scores.csv, summary.csv, pairs.csv, flips.csv, published.csv and plots.

    `published`: a catalog to read published scores from for runs whose manifest has none (older runs)."""
    from benchharness.report import plots  # matplotlib is only needed here

    if not run_dirs:
        raise HarnessError("no run folders given. Fix: pass one or more folders under results/.")
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir) if out_dir is not None else default_output_dir(run_dirs)
    if (out_dir / "manifest.json").is_file():
        # A run folder's own scores.csv must never be replaced by the merged table.
        raise HarnessError(f"{out_dir} is a run folder; writing the report there would overwrite its scores.csv. "
                           f"Fix: pass --output {out_dir / 'report'} (or leave --output out).")
    data = collect(run_dirs, seed=seed)
    data.published = against_published(data, published)
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
    atomic_write_text(out_dir / "published.csv", data.published.to_csv(index=False))
    atomic_write_text(paths.markdown, render_markdown(data, title, [(c, p.name) for c, p in images]))
    atomic_write_text(paths.html, render_html(data, title, images))
    log.info("report written to %s", out_dir)
    return paths
