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


def thinking(manifest: dict[str, Any], model: str) -> str | None:
    """"thinking on" / "thinking off" where the run set a template's thinking switch, else None."""
    info = ((manifest.get("models") or {}).get(model) or {}).get("thinking") or {}
    if info.get("enable_thinking") is None or not info.get("switch"):
        return None
    return "thinking on" if info["enable_thinking"] else "thinking off"


def generation(manifest: dict[str, Any], suite: str, task: str) -> str | None:
    """"greedy, up to 384 tokens" for a generation task (its suite's tasks for a group row); None for scored tasks."""
    tasks = manifest.get("tasks") or {}
    infos = [tasks[task]] if task in tasks else [i for i in tasks.values() if i.get("suite") == suite]
    texts = {_generation_text(i.get("generation_kwargs")) for i in infos}
    texts.discard(None)
    if not texts:
        return None
    return texts.pop() if len(texts) == 1 else "mixed generation settings"


def _generation_text(kwargs: dict[str, Any] | None) -> str | None:
    if not kwargs:
        return None
    sampled = bool(kwargs.get("do_sample")) or float(kwargs.get("temperature") or 0.0) > 0.0
    how = f"sampled at temperature {kwargs.get('temperature')}" if sampled else "greedy"
    limit = kwargs.get("max_gen_toks")
    return f"{how}, up to {limit} tokens" if limit else how


def describe(manifest: dict[str, Any], model: str, suite: str, task: str, metric: str) -> str:
    """One line, e.g. "5-shot, no chat template, acc" or "0-shot, chat template, thinking off, greedy, up to 384 tokens, pass@1"."""
    template = chat_template(manifest, model)
    words = "chat template" if template else ("no chat template" if template is False else "chat template ?")
    parts = [shots(manifest, suite, task), words, thinking(manifest, model), generation(manifest, suite, task), metric]
    return ", ".join(p for p in parts if p)
