"""The leaderboard: one self-contained HTML page over the results store.

Models as rows (one per model and run: a model measured twice appears twice, each with its
run date, build and protocol), suites as columns (the suite's headline metric with its 95%
confidence interval), throughput from the same run, a link to each run's report. The page
sorts by any column and filters by origin, suite, run date and name with a few lines of
inline JavaScript; without JavaScript it is still the full table.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd

from benchharness.files import atomic_write_text
from benchharness.report.collect import ALPHA, N_BOOT, add_group_rows, aggregate_speed, choose_primary
from benchharness.report.published import BENCHMARK
from benchharness.scorers.stats import bootstrap_ci
from benchharness.store.results_db import connect

log = logging.getLogger(__name__)

ORIGIN_ORDER = {"CN": 0, "US": 1, "EU": 2}


def load_board(store: Path) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """(one row per model and run with a cell per suite, the suites in order, each suite's metric)."""
    con = connect(store, read_only=True)
    try:
        runs = pd.read_sql_query("SELECT * FROM runs", con)
        models = pd.read_sql_query("SELECT * FROM models", con)
        scores = pd.read_sql_query("SELECT * FROM scores", con)
        speed = pd.read_sql_query("SELECT run_id, model, phase, tokens, seconds, tokens_per_s FROM throughput "
                                  "WHERE phase IN ('eval', 'decode')", con)
        correct = pd.read_sql_query("SELECT s.run_id, s.model, t.suite, s.correct FROM samples s JOIN tasks t "
                                    "ON s.run_id = t.run_id AND s.task = t.task WHERE s.correct IS NOT NULL", con)
        published = pd.read_sql_query("SELECT * FROM published", con)
    except sqlite3.Error as exc:
        raise _store_error(store, exc) from exc
    finally:
        con.close()
    # A suite scored only per task (mmlu as bh_mmlu) gets its suite row as the report makes it.
    scores = add_group_rows(scores, keep_single_interval=True)
    scores = _fill_intervals(scores[scores["task"] == scores["suite"]].copy(), correct)
    suites = sorted(scores["suite"].dropna().unique())
    primary = {suite: choose_primary(scores.loc[scores["suite"] == suite, "metric"]) for suite in suites}
    rows = []
    for _, m in models.iterrows():
        run = runs[runs["run_id"] == m["run_id"]].iloc[0]
        mine = scores[(scores["run_id"] == m["run_id"]) & (scores["model"] == m["model"])]
        if mine.empty:
            continue
        tp = speed[(speed["run_id"] == m["run_id"]) & (speed["model"] == m["model"])]
        row: dict[str, Any] = {
            "model": m["model"], "origin": m["origin"], "build": m["build"], "params": m["params"],
            "run_id": m["run_id"], "date": str(run["started"] or "")[:10], "engine": m["engine"] or run["engine"],
            "dtype": m["dtype"], "device": m["device"],
            "chat_template": "yes" if m["chat_template"] == 1 else ("no" if m["chat_template"] == 0 else "?"),
            "report": run["report"], "eval_tokens_per_s": aggregate_speed(tp[tp["phase"] == "eval"]),
            "decode_tokens_per_s": aggregate_speed(tp[tp["phase"] == "decode"]),
        }
        theirs = published[(published["run_id"] == m["run_id"]) & (published["model"] == m["model"])]
        for suite in suites:
            cell = mine[(mine["suite"] == suite) & (mine["metric"] == primary[suite])]
            row[suite] = cell.iloc[0].to_dict() if len(cell) else None
            if row[suite] is not None:
                row[suite]["published"] = theirs[theirs["suite"] == BENCHMARK.get(suite, suite)].to_dict("records")
        rows.append(row)
    board = pd.DataFrame(rows)
    if len(board):
        board = board.assign(_o=board["origin"].map(ORIGIN_ORDER).fillna(9)).sort_values(
            ["_o", "model", "date"], ascending=[True, True, False]).drop(columns="_o")
    return board, suites, primary


def _fill_intervals(scores: pd.DataFrame, correct: pd.DataFrame) -> pd.DataFrame:
    """A suite score without an interval gets the report's: a seeded percentile bootstrap over its
    items, only where the items' mean reproduces the score (a macro average over subjects does not)."""
    groups = {key: g["correct"].to_numpy(dtype=float) for key, g in correct.groupby(["run_id", "model", "suite"])}
    for idx, row in scores.iterrows():
        if pd.notna(row["ci_low"]) and pd.notna(row["ci_high"]):
            continue
        items = groups.get((row["run_id"], row["model"], row["suite"]))
        if items is None or not len(items) or pd.isna(row["value"]) or abs(float(items.mean()) - float(row["value"])) > 1e-6:
            continue
        scores.at[idx, "ci_low"], scores.at[idx, "ci_high"] = bootstrap_ci(items, seed=0, n_boot=N_BOOT, alpha=ALPHA)
    return scores


def _store_error(store: Path, exc: Exception) -> Exception:
    from benchharness.errors import HarnessError

    return HarnessError(f"{store}: not a results store this version reads ({exc}). Fix: rebuild it with `benchharness index results/*/ --store {store}`.")


def _pct(value: float, fraction: bool) -> str:
    return f"{100 * value:.1f}" if fraction else f"{value:.3g}"


def _num(value: Any, digits: int = 1) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):,.{digits}f}"


def render(board: pd.DataFrame, suites: list[str], primary: dict[str, str], out_dir: Path, store: Path,
           generated: str) -> str:
    esc = html.escape
    fractions = {s: all(0 <= c["value"] <= 1 for c in board[s] if isinstance(c, dict)) if s in board else True for s in suites}
    head = ["<th data-type='text' data-key='model'>model</th>", "<th data-type='text'>origin</th>",
            "<th data-type='text'>build</th>", "<th data-type='text'>protocol</th>"]
    # <wbr>: long suite and metric names (gsm8k_zeroshot, exact_match) may break after an underscore
    head += [f"<th data-type='num' data-suite='{esc(s)}' title='{esc(primary[s])}'>{_breakable(s)}<br><small>{_breakable(primary[s])}"
             f"{' %' if fractions[s] else ''}</small></th>" for s in suites]
    head += ["<th data-type='num' title='tokens/s over the evaluation itself'>eval<br><small>tok/s</small></th>",
             "<th data-type='num' title='fixed-shape probe decode tokens/s'>decode<br><small>tok/s</small></th>",
             "<th data-type='text' title='start date; config hash, linking to the run report'>run</th>"]
    body = []
    for _, r in board.iterrows():
        shots = {s: c["num_fewshot"] for s in suites if isinstance((c := r.get(s)), dict)}
        template = {"yes": "chat template", "no": "no chat template"}.get(r["chat_template"], "chat template ?")
        protocol = f"{template}; {r['engine']}, {r['dtype']}, {r['device']}"
        cells = [f"<td class='name'>{esc(str(r['model']))}<br><small>{esc(str(r['params'] or ''))}</small></td>",
                 f"<td>{esc(str(r['origin']))}</td>", f"<td class='build'>{esc(str(r['build'] or ''))}</td>",
                 f"<td class='protocol'>{esc(protocol)}</td>"]
        for s in suites:
            c = r.get(s)
            if not isinstance(c, dict) or c.get("value") is None:
                cells.append("<td class='score' data-value=''>–</td>")
                continue
            ci = ""
            if c.get("ci_low") is not None and c.get("ci_high") is not None and not pd.isna(c["ci_low"]):
                ci = f"[{_pct(c['ci_low'], fractions[s])}, {_pct(c['ci_high'], fractions[s])}]"
            n = f"n={int(c['n'])}" if c.get("n") is not None and not pd.isna(c["n"]) else ""
            cells.append(f"<td class='score' data-value='{c['value']}' title='{esc(str(c.get('protocol') or ''))}'>"
                         f"<b>{_pct(c['value'], fractions[s])}</b><br><small>{esc(ci)}</small>"
                         f"<br><small>{esc(str(shots.get(s) or ''))} {esc(n)}</small>{_published(c.get('published') or [])}</td>")
        cells += [f"<td data-value='{_plain(r['eval_tokens_per_s'])}'>{_num(r['eval_tokens_per_s'])}</td>",
                  f"<td data-value='{_plain(r['decode_tokens_per_s'])}'>{_num(r['decode_tokens_per_s'])}</td>"]
        link = _link(r["report"], out_dir, store)
        # run_id = UTC start time + config hash: the hash tells runs of one day apart
        run_id = str(r["run_id"])
        label = esc(run_id.rsplit("-", 1)[-1])
        cells.append(f"<td class='run' data-value='{esc(run_id)}' title='{esc(run_id)}'>{esc(str(r['date']))}<br>"
                     + (f"<a href='{esc(link)}'>{label}</a>" if link else label) + "</td>")
        body.append(f"<tr data-origin='{esc(str(r['origin']))}' data-date='{esc(str(r['date']))}'>" + "".join(cells) + "</tr>")
    origins = sorted(board["origin"].dropna().unique(), key=lambda o: ORIGIN_ORDER.get(o, 9)) if len(board) else []
    suite_boxes = "".join(f"<label><input type='checkbox' class='suite' value='{esc(s)}' checked> {esc(s)}</label>" for s in suites)
    origin_options = "".join(f"<option>{esc(o)}</option>" for o in origins)
    n_runs = board["run_id"].nunique() if len(board) else 0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>benchharness leaderboard</title><style>{_CSS}</style></head><body>
<h1>benchharness leaderboard</h1>
<p class="note">{len(board)} model runs from {n_runs} run(s) in <code>{esc(str(store))}</code>, generated {esc(generated)}.
Each cell: the suite's headline metric (percent where it is a fraction), its 95% confidence interval (from the run, else
a seeded bootstrap over its items; none for a macro average over subjects or languages), the protocol (shots, n) and,
where the model's makers published a score on the suite, that score (hover for its variant, protocol and source; they
were measured under their own protocol). Rows of the same model from different runs, builds or protocols are different measurements. Click a
column to sort; the run links open each run's report.</p>
<form id="filters">
<label>origin <select id="origin"><option value="">all</option>{origin_options}</select></label>
<label>model <input id="name" type="search" placeholder="name contains"></label>
<label>run from <input id="from" type="date"></label> <label>to <input id="to" type="date"></label>
<span class="suites">suites: {suite_boxes}</span>
</form>
<div class="wrap"><table id="board"><thead><tr>{''.join(head)}</tr></thead>
<tbody>{''.join(body)}</tbody></table></div>
<p class="note" id="shown"></p>
<script>{_JS}</script>
</body></html>
"""


def _published(entries: list[dict[str, Any]]) -> str:
    """The scores the model's makers published on this suite, under ours: the values, and in the
    title each one's variant, protocol and source (the run report's "Against published" has the rest)."""
    if not entries:
        return ""
    esc = html.escape
    values = " / ".join(f"{float(p['value']):.1f}" for p in entries)
    detail = "\n".join(f"{float(p['value']):.1f}: {p['variant']}; {p['prompt']}; {p['source']} ({p['source_table']})" for p in entries)
    return f"<br><small class='pub' title='{esc(detail)}'>published {esc(values)}</small>"


def _breakable(name: str) -> str:
    return html.escape(name).replace("_", "_<wbr>")


def _plain(value: Any) -> str:
    return "" if value is None or pd.isna(value) else repr(float(value))


def _link(report: Any, out_dir: Path, store: Path) -> str | None:
    """The run's report, relative to the page (the store records it relative to its own folder)."""
    if not report:
        return None
    path = Path(str(report))
    target = path if path.is_absolute() else store.parent / path
    return Path(os.path.relpath(target.resolve(), out_dir.resolve())).as_posix()


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1rem auto;max-width:1600px;padding:0 1rem;color:#222}
h1{font-size:1.4rem;margin:0.5rem 0}
.note{color:#555;font-size:0.85rem;max-width:70rem}
form{display:flex;flex-wrap:wrap;gap:0.5rem 1rem;align-items:center;font-size:0.85rem;margin:0.75rem 0}
.suites label{margin-right:0.5rem;white-space:nowrap}
.wrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:0.8rem}
th,td{border:1px solid #ddd;padding:0.2rem 0.35rem;text-align:left;vertical-align:top}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0;user-select:none}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
td.score{text-align:right;white-space:nowrap}
td.build{max-width:12rem;font-size:0.75rem;color:#444}
td.protocol{max-width:8rem;font-size:0.75rem;color:#444}
td.name{font-weight:600;min-width:8rem;max-width:16rem;overflow-wrap:anywhere}
small{color:#666}
tr:nth-child(even) td{background:#fafafa}
"""

# Sorting: by a column's data-value (numbers) or text; filtering: origin, name, run date range, suites shown.
_JS = """
(function(){
  const table=document.getElementById('board'), tbody=table.tBodies[0];
  const heads=Array.from(table.tHead.rows[0].cells);
  function cellValue(row,i,type){const c=row.cells[i];
    if(type==='num'){const v=c.getAttribute('data-value');return v===''||v===null?NaN:parseFloat(v);}
    return (c.getAttribute('data-value')||c.textContent).toLowerCase();}
  heads.forEach((th,i)=>th.addEventListener('click',()=>{
    const type=th.getAttribute('data-type'), asc=!th.classList.contains('desc')&&th.classList.contains('asc')?false:
      (th.classList.contains('desc')?true:type!=='num');
    heads.forEach(h=>h.classList.remove('asc','desc'));th.classList.add(asc?'asc':'desc');
    const rows=Array.from(tbody.rows);
    rows.sort((a,b)=>{const x=cellValue(a,i,type),y=cellValue(b,i,type);
      if(type==='num'){if(isNaN(x)&&isNaN(y))return 0;if(isNaN(x))return 1;if(isNaN(y))return -1;return asc?x-y:y-x;}
      return asc?x.localeCompare(y):y.localeCompare(x);});
    rows.forEach(r=>tbody.appendChild(r));}));
  const origin=document.getElementById('origin'), name=document.getElementById('name'),
        from=document.getElementById('from'), to=document.getElementById('to'),
        boxes=Array.from(document.querySelectorAll('input.suite')), shown=document.getElementById('shown');
  function apply(){
    let n=0;
    Array.from(tbody.rows).forEach(r=>{const d=r.getAttribute('data-date');
      const ok=(!origin.value||r.getAttribute('data-origin')===origin.value)
        &&(!name.value||r.cells[0].textContent.toLowerCase().includes(name.value.toLowerCase()))
        &&(!from.value||d>=from.value)&&(!to.value||d<=to.value);
      r.style.display=ok?'':'none';if(ok)n++;});
    const hidden=new Set(boxes.filter(b=>!b.checked).map(b=>b.value));
    heads.forEach((th,i)=>{const s=th.getAttribute('data-suite');if(s===null)return;
      const show=!hidden.has(s);th.style.display=show?'':'none';
      Array.from(tbody.rows).forEach(r=>{r.cells[i].style.display=show?'':'none';});});
    shown.textContent=n+' of '+tbody.rows.length+' rows shown';
  }
  [origin,name,from,to].forEach(e=>e.addEventListener('input',apply));
  boxes.forEach(b=>b.addEventListener('change',apply));
  apply();
})();
"""


def write_leaderboard(store: Path, out_dir: Path | None = None) -> Path:
    """Write leaderboard.html over `store`; returns its path."""
    store = Path(store)
    out_dir = Path(out_dir) if out_dir is not None else store.parent / "leaderboard"
    board, suites, primary = load_board(store)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path = out_dir / "leaderboard.html"
    atomic_write_text(path, render(board, suites, primary, out_dir, store, generated))
    log.info("leaderboard of %d model runs written to %s", len(board), path)
    return path
