"""The HTML report opens in a real browser: headless Chromium loads it, decodes the images
and lays out the tables. Chromium comes from scripts/install-chromium.sh (`make test` runs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from benchharness.report.render import build_report
from test_report import ALL, RUN_A, RUN_B, make_run

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Injected into a copy of the report only: reports what the browser actually rendered.
PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const result = {
    tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('table tr').length,
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    widths: imgs.map(i => i.naturalWidth),
    banners: document.querySelectorAll('.banner').length,
    bodyHeight: document.body.scrollHeight,
  };
  const pre = document.createElement('pre');
  pre.id = 'probe-result';
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    reason = ("headless Chromium is not installed, so the HTML report was NOT checked in a browser. "
              "Fix: run scripts/install-chromium.sh (as root) or `make test`.")
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI is set: this must not be skipped)")
    warnings.warn(reason)
    pytest.skip(reason)


def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    a = make_run(tmp_path / "results", RUN_A, ALL)
    b = make_run(tmp_path / "results", RUN_B, ["qwen-mini"], status="incomplete", skip={("qwen-mini", "arc")})
    paths = build_report([a, b], tmp_path / "report")
    html_text = paths.html.read_text()
    # self-contained: no file or network references, every image a data URI
    assert "<script" not in html_text
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html_text)
    assert len(srcs) == len(paths.plots) >= 3
    assert all(s.startswith("data:image/png;base64,") for s in srcs)

    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html_text.replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert match, f"the page did not finish loading in Chromium; stderr: {proc.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"'))

    expected_tables = html_text.count("<table")
    assert expected_tables >= 8  # runs, scores, origin, 2 rankings, pairs, regression, models, probe, subtasks
    assert result["tables"] == expected_tables
    assert result["rows"] > 30
    # every plot decoded by the browser as a real image
    assert result["images"] == len(paths.plots)
    assert result["decoded"] == result["images"]
    assert all(w > 100 for w in result["widths"])
    assert result["banners"] == 1  # the incomplete run
    assert result["bodyHeight"] > 1000
    # the rendered DOM carries the tables' content
    assert "qwen-mini @ " + RUN_B + " [incomplete]" in proc.stdout
    assert "Q4_K_M GGUF dequantized to fp32; Coder-Instruct variant" in proc.stdout


WIDTH_PROBE = """
<script>
window.addEventListener('load', () => {
  const tables = Array.from(document.querySelectorAll('table'));
  const result = {page: document.documentElement.scrollWidth, window: window.innerWidth,
                  main: tables[1].getBoundingClientRect().width, details: document.querySelectorAll('details').length};
  const pre = document.createElement('pre'); pre.id = 'probe-result'; pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def test_html_report_fits_a_laptop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine suites with long names, two runs of the same model: the page and its main table fit 1366 px."""
    import test_report

    suites = {name: [name] for name in ("cmmlu", "eu_exams", "eu_exams_cloze", "gsm8k", "gsm8k_zeroshot",
                                        "humaneval", "mmlu", "mmlu_cloze", "arc")}
    monkeypatch.setattr(test_report, "SUITES", suites)
    chromium = _chromium()
    a = make_run(tmp_path / "results", RUN_A, ALL)
    b = make_run(tmp_path / "results", RUN_B, ["qwen-mini"])
    paths = build_report([a, b], tmp_path / "report")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(paths.html.read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1366,768",
         "--hide-scrollbars", "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stderr[-2000:]
    seen = json.loads(match.group(1).replace("&quot;", '"'))
    assert seen["window"] == 1366
    assert seen["page"] <= seen["window"]  # no sideways scrolling of the page
    assert seen["main"] <= seen["window"]  # the scores table itself is fully visible
    assert seen["details"] == 1
