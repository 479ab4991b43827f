"""The package's folders are the stages of a run, and imports run one way: a stage may import
itself and the stages before it, never one after it (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "benchharness"
# In the order a run passes through them; the top-level modules at either end.
STAGES = ["errors", "files", "config", "models", "suites", "scorers", "engine", "measure", "store", "report", "run", "cli"]
TOP = {"__init__": "errors", "__main__": "cli", "errors": "errors", "files": "files", "cli": "cli"}


def stage_of(module: str) -> str:
    """benchharness.engine.lm -> engine; benchharness.cli -> cli; benchharness -> errors (the version)."""
    parts = module.split(".")
    if parts == ["benchharness"]:
        return "errors"
    head = parts[1]
    return TOP.get(head, head)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every benchharness module `path` imports, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "benchharness"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchharness" and node.level == 0:
            # `from benchharness.x import y` may name a submodule y: its stage is x's or below
            found.append((node.lineno, node.module))
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_every_module_belongs_to_a_stage() -> None:
    for path in PACKAGE.rglob("*.py"):
        assert stage_of(module_name(path)) in STAGES, f"{path}: not in a stage folder ({', '.join(STAGES)})"


def test_imports_never_run_up_the_stages() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = STAGES.index(stage_of(module_name(path)))
        for line, target in imports(path):
            theirs = STAGES.index(stage_of(target))
            if theirs > mine:
                problems.append(f"{path.relative_to(REPO)}:{line}: {STAGES[mine]} imports {target} ({STAGES[theirs]}, a later stage)")
    assert problems == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a lower stage importing a higher one is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from benchharness.report.render import build_report\n")
    assert imports(bad) == [(2, "benchharness.report.render")]
    assert STAGES.index(stage_of("benchharness.report.render")) > STAGES.index(stage_of("benchharness.engine.lm"))


def test_no_two_modules_share_a_name() -> None:
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    assert {n: p for n, p in names.items() if len(p) > 1} == {}


def test_each_stage_says_what_it_takes_and_gives() -> None:
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        if not init.parent.is_dir():
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Takes" in doc and "Gives" in doc and "Imports" in doc, f"{init}: say what the stage takes, gives and may import"
