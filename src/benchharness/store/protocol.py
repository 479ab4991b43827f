"""The protocol a score was measured under, read from its run's manifest: shots, chat template, metric.

Two numbers measured under different protocols (5-shot against 0-shot, with and without a chat
template) are different measurements; the report, the store and the leaderboard show this text
beside every score so they are never read as one.
"""

from __future__ import annotations

from typing import Any


def shots(manifest: dict[str, Any], suite: str, task: str) -> str:
    """"5-shot" for a task, or for a suite's group row the shots of its tasks ("mixed" when they differ)."""
    tasks = manifest.get("tasks") or {}
    if task in tasks:
        values = {tasks[task].get("num_fewshot")}
    else:  # the suite's group row (or a subgroup): every task of the suite
        values = {info.get("num_fewshot") for info in tasks.values() if info.get("suite") == suite}
    values.discard(None)
    if not values:
        return "shots ?"
    if len(values) > 1:
        return "mixed shots (" + ", ".join(str(v) for v in sorted(values)) + ")"
    return f"{values.pop()}-shot"


def chat_template(manifest: dict[str, Any], model: str) -> bool | None:
    info = (manifest.get("models") or {}).get(model) or {}
    value = info.get("chat_template")
    return bool(value) if value is not None else None


def describe(manifest: dict[str, Any], model: str, suite: str, task: str, metric: str) -> str:
    """One line, e.g. "5-shot, no chat template, acc"."""
    template = chat_template(manifest, model)
    words = "chat template" if template else ("no chat template" if template is False else "chat template ?")
    return f"{shots(manifest, suite, task)}, {words}, {metric}"
