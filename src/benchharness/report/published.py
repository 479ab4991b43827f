"""Against published: each of our suite scores beside the scores the model's makers published.

A published number comes from the catalog (`published:` under a model), copied into the run's
manifest when the run starts, so a report reads the numbers the run was compared with. For
runs made before that, `benchharness report --published configs/models.yaml` reads them from
a catalog instead (said in the table's `published from` column).

Each row: ours (headline metric of the suite, with its 95% interval and n), the published value,
the difference in points, whether the published value lies inside our interval, and every way
the two measurements differ that the records show: shots, chat template, the build evaluated
(quantization), the variant (base or instruct), a subset of the items, the source's own protocol.
A difference outside the interval with protocol differences listed is not a discrepancy in
itself: the two numbers measure different things.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from benchharness.config.catalog import load_catalog
from benchharness.report.collect import ReportData
from benchharness.store import protocol

# The benchmark each suite measures, where it is not the suite's own name: a published HumanEval
# score is set beside both the completion and the chat protocol, and so on. (Cloze variants
# score answer texts, a format model makers do not publish, so they are not compared.)
BENCHMARK = {"mmlu_5shot": "mmlu", "humaneval_instruct": "humaneval", "gsm8k_zeroshot": "gsm8k"}

COLUMNS = ["entry", "model", "suite", "metric", "ours", "ci_low", "ci_high", "n", "published", "published_metric",
           "difference", "inside_ci", "variant", "their_protocol", "differences", "source", "table", "published_from"]


def published_entries(manifest: dict[str, Any], model: str, catalog: dict[str, list[dict[str, Any]]] | None) -> tuple[list[dict[str, Any]], str]:
    """A model's published scores: from the run's manifest, else from the given catalog."""
    info = (manifest.get("models") or {}).get(model) or {}
    if "published" in info:
        return list(info["published"] or []), "run manifest"
    if catalog is not None and model in catalog:
        return catalog[model], "catalog"
    return [], ""


def read_catalog(path: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: [p.model_dump() for p in entry.published] for name, entry in load_catalog(path).models.items()}


def against_published(data: ReportData, catalog: Path | None = None) -> pd.DataFrame:
    """One row per (entry, suite, published score) where the model has a published score on a suite it ran."""
    published = read_catalog(catalog) if catalog is not None else None
    runs = {r.run_id: r for r in data.runs}
    rows = []
    for _, s in data.summary.iterrows():
        run = runs[str(s["run_id"])]
        entries, origin = published_entries(run.manifest, str(s["model"]), published)
        for p in entries:
            if p.get("suite") != BENCHMARK.get(str(s["suite"]), s["suite"]):
                continue
            ours = _percent(s["value"])
            low, high = _percent(s["ci_low"]), _percent(s["ci_high"])
            value = float(p["value"])
            inside = "" if math.isnan(low) or math.isnan(high) else ("yes" if low <= value <= high else "no")
            rows.append({
                "entry": s["entry"], "model": s["model"], "suite": s["suite"], "metric": s["metric"],
                "ours": ours, "ci_low": low, "ci_high": high, "n": s["n"], "published": value,
                "published_metric": p.get("metric"), "difference": ours - value, "inside_ci": inside,
                "variant": p.get("variant"), "their_protocol": p.get("prompt"),
                "differences": "; ".join(differences(run.manifest, str(s["model"]), str(s["suite"]), s["n"], p)) or "none recorded",
                "source": p.get("source"), "table": p.get("table"), "published_from": origin,
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def differences(manifest: dict[str, Any], model: str, suite: str, n: Any, published: dict[str, Any]) -> list[str]:
    """How our measurement and the published one differ, as far as the two records tell."""
    out = []
    if suite != published.get("suite"):
        out.append(f"suite: ours {suite}")
    ours_shots = protocol.shots(manifest, suite, suite)
    theirs = published.get("shots")
    if theirs is None:
        out.append(f"shots: ours {ours_shots}, theirs not stated")
    elif ours_shots != f"{theirs}-shot":
        out.append(f"shots: ours {ours_shots}, theirs {theirs}-shot")
    template = protocol.chat_template(manifest, model)
    their_template = published.get("chat_template")
    if their_template is None:
        out.append("chat template: theirs not stated")
    elif template is not None and bool(template) != bool(their_template):
        out.append(f"chat template: ours {'yes' if template else 'no'}, theirs {'yes' if their_template else 'no'}")
    info = (manifest.get("models") or {}).get(model) or {}
    build = str(info.get("build") or "")
    if build and build != "full precision":
        out.append(f"build: ours {build}")
    if "base" in str(published.get("variant", "")).lower() and "base" not in build.lower():
        out.append(f"variant: theirs {published.get('variant')}")
    available = _available(manifest, suite)
    if available and not _nan(n) and int(n) < available:
        out.append(f"items: ours {int(n)} of {available}")
    return out


def _available(manifest: dict[str, Any], suite: str) -> int:
    # Tasks of one suite may share one data source (mmlu's one task) or split it (cmmlu's subjects).
    tasks = [info for info in (manifest.get("tasks") or {}).values() if info.get("suite") == suite]
    if len(tasks) == 1:
        return int(tasks[0].get("n_available") or 0)
    return sum(int(t.get("n_available") or 0) for t in tasks) if all(t.get("limit") for t in tasks) else 0


def _percent(value: Any) -> float:
    return float("nan") if _nan(value) else 100.0 * float(value)


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or bool(pd.isna(value))


def table_published(frame: pd.DataFrame) -> pd.DataFrame | None:
    """The report's display of against_published()."""
    if frame.empty:
        return None
    out = pd.DataFrame({
        "model": frame["entry"], "suite": frame["suite"],
        "ours [95% CI]": [f"{o:.1f} [{lo:.1f}, {hi:.1f}]" if not math.isnan(lo) else f"{o:.1f}"
                          for o, lo, hi in zip(frame["ours"], frame["ci_low"], frame["ci_high"])],
        "n": [str(int(n)) if not _nan(n) else "" for n in frame["n"]],
        "published": [f"{v:.1f}" for v in frame["published"]],
        "ours − published": [f"{d:+.1f}" for d in frame["difference"]],
        "inside our CI": frame["inside_ci"],
        "their model, protocol": [f"{v}; {p}" for v, p in zip(frame["variant"], frame["their_protocol"])],
        "what differs": frame["differences"],
        "source": [f"{s} ({t})" for s, t in zip(frame["source"], frame["table"])],
    })
    return out
