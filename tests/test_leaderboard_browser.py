"""The leaderboard page in headless Chromium: it loads without console errors, sorting and
filtering work, it fits a laptop's width, and a screenshot is kept as a test artefact
(test-artifacts/leaderboard.png, or $BENCHHARNESS_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from benchharness.report.leaderboard import load_board, write_leaderboard
from benchharness.store.results_db import index_runs
from conftest import REPO
from test_report import ALL, RUN_A, RUN_B, correctness
from test_report_browser import CHROMIUM_FLAGS, _chromium
from test_results_store import make_indexable

LAPTOP = (1366, 768)

# Runs first (in <head>): records errors, then drives the page as a user would and reports what it saw.
PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
const __consoleError = console.error;
console.error = (...a) => { window.__errors.push(a.map(String).join(' ')); __consoleError(...a); };
window.addEventListener('load', () => {
  const table = document.getElementById('board');
  const heads = Array.from(table.tHead.rows[0].cells);
  const names = () => Array.from(table.tBodies[0].rows).filter(r => r.style.display !== 'none')
                        .map(r => r.cells[0].firstChild.textContent.trim() + '@' + r.getAttribute('data-date'));
  const col = heads.findIndex(h => h.getAttribute('data-suite') === 'mmlu');
  const result = {initial: names(), width: document.documentElement.scrollWidth, bodyText: document.body.innerText.length};
  heads[col].click();
  result.sortedFirst = names();
  result.mmluSortedValues = Array.from(table.tBodies[0].rows).map(r => r.cells[col].getAttribute('data-value'));
  heads[col].click();
  result.sortedSecond = names();
  const origin = document.getElementById('origin');
  origin.value = 'CN'; origin.dispatchEvent(new Event('input'));
  result.onlyCN = names();
  origin.value = ''; origin.dispatchEvent(new Event('input'));
  const from = document.getElementById('from');
  from.value = '2025-01-02'; from.dispatchEvent(new Event('input'));
  result.fromJan2 = names();
  from.value = ''; from.dispatchEvent(new Event('input'));
  const box = Array.from(document.querySelectorAll('input.suite')).find(b => b.value === 'arc');
  box.checked = false; box.dispatchEvent(new Event('change'));
  const arc = heads.findIndex(h => h.getAttribute('data-suite') === 'arc');
  result.arcHidden = heads[arc].style.display === 'none' && table.tBodies[0].rows[0].cells[arc].style.display === 'none';
  result.links = Array.from(document.querySelectorAll('td.run a')).map(a => a.getAttribute('href'));
  result.errors = window.__errors;
  const pre = document.createElement('pre'); pre.id = 'probe-result'; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def _artifacts() -> Path:
    folder = Path(os.environ.get("BENCHHARNESS_TEST_ARTIFACTS", REPO / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_leaderboard_sorts_filters_and_fits_a_laptop(tmp_path: Path) -> None:
    chromium = _chromium()
    results = tmp_path / "results"
    a = make_indexable(results, RUN_A, ALL)
    again = {(m, t): correctness(m, t, seed_offset=1) for m in ("qwen-mini", "gemma-mini") for t in ("mmlu_math", "mmlu_law", "arc")}
    b = make_indexable(results, RUN_B, ["qwen-mini", "gemma-mini"], correct=again)
    for run in (a, b):
        (run / "report.md").write_text("# report\n")
    store = results / "runs.sqlite"
    assert index_runs([a, b], store)[1] == []
    page = write_leaderboard(store)
    assert page == results / "leaderboard" / "leaderboard.html"
    text = page.read_text()
    assert "src=" not in text and "href='http" not in text  # self-contained

    board, suites, primary = load_board(store)
    assert suites == ["arc", "mmlu"] and primary == {"arc": "acc", "mmlu": "acc"}
    assert len(board) == 5  # one row per model and run
    mmlu = {f"{r['model']}@{r['run_id']}": r["mmlu"]["value"] for _, r in board.iterrows()}

    probe_page = page.with_name("probe.html")
    probe_page.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
                           "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the page did not finish loading; stderr: {proc.stderr[-2000:]}"
    seen = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))

    assert seen["errors"] == []
    assert "Uncaught" not in proc.stderr
    assert seen["width"] <= LAPTOP[0]  # nothing wider than the window: the page fits a laptop
    assert len(seen["initial"]) == 5
    # sorting: first click highest mmlu first, second click the reverse
    values = [float(v) for v in seen["mmluSortedValues"]]
    assert values == sorted(values, reverse=True)
    assert seen["sortedSecond"] == list(reversed(seen["sortedFirst"]))
    # filtering by origin, by run date, and hiding a suite's column
    assert {n.split("@")[0] for n in seen["onlyCN"]} == {"qwen-mini"} and len(seen["onlyCN"]) == 2
    assert len(seen["fromJan2"]) == 2 and all(n.endswith("@2025-01-02") for n in seen["fromJan2"])
    assert seen["arcHidden"] is True
    # links to each run's report, relative to the page
    assert sorted(set(seen["links"])) == [f"../{RUN_A}/report.md", f"../{RUN_B}/report.md"]
    best = max(mmlu, key=mmlu.get)
    assert seen["sortedFirst"][0].split("@")[0] == best.split("@")[0]

    shot = _artifacts() / "leaderboard.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
                    "--hide-scrollbars", f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_leaderboard_intervals_are_the_reports(tmp_path: Path) -> None:
    """Cells without an interval in scores.csv get the report's bootstrap interval over the same items."""
    from benchharness.report.collect import collect

    a = make_indexable(tmp_path / "results", RUN_A, ALL)
    store = tmp_path / "results" / "runs.sqlite"
    index_runs([a], store)
    board, suites, _ = load_board(store)
    summary = collect([a]).summary.set_index(["model", "suite"])
    for _, row in board.iterrows():
        for suite in suites:
            cell = row[suite]
            assert cell["ci_low"] == summary.loc[(row["model"], suite), "ci_low"]
            assert cell["ci_high"] == summary.loc[(row["model"], suite), "ci_high"]
            assert cell["ci_low"] < cell["value"] < cell["ci_high"]


WIDTH_PROBE = """
<script>
window.addEventListener('load', () => {
  const result = {page: document.documentElement.scrollWidth, window: window.innerWidth,
                  table: document.getElementById('board').getBoundingClientRect().width};
  const pre = document.createElement('pre'); pre.id = 'probe-result'; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def test_leaderboard_with_nine_suites_fits_a_laptop(tmp_path: Path, monkeypatch) -> None:
    import test_report

    monkeypatch.setattr(test_report, "SUITES", {name: [name] for name in (
        "cmmlu", "eu_exams", "eu_exams_cloze", "gsm8k", "gsm8k_zeroshot", "humaneval", "mmlu", "mmlu_cloze", "arc")})
    chromium = _chromium()
    results = tmp_path / "results"
    runs = [make_indexable(results, RUN_A, ALL), make_indexable(results, RUN_B, ["qwen-mini"])]
    index_runs(runs, results / "runs.sqlite")
    page = write_leaderboard(results / "runs.sqlite")
    probe_page = page.with_name("probe.html")
    probe_page.write_text(page.read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
                           "--hide-scrollbars", "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stderr[-2000:]
    seen = json.loads(match.group(1).replace("&quot;", '"'))
    assert seen["window"] == LAPTOP[0] and seen["page"] <= seen["window"] and seen["table"] <= seen["window"]
