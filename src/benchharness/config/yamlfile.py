"""Reading YAML files into validated pydantic specs, with errors that name file, key and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from benchharness.errors import ConfigError

SpecT = TypeVar("SpecT", bound=BaseModel)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """Parse `path` as a YAML mapping; `what` names the kind of file in errors."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found. Fix: check the path (relative paths are taken from the current folder).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}. Fix: correct the YAML syntax there.") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping of keys to values, got {type(data).__name__}. Fix: see configs/ for examples.")
    return data


def format_validation_error(path: Path, exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: file, dotted key path, what is wrong and how to fix it."""
    lines = []
    for err in exc.errors():
        loc = prefix + _dotted(err["loc"]) if prefix else _dotted(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"{path}: {loc}: unknown key. Fix: remove it or correct its spelling (see README, 'Config keys').")
        elif kind == "missing":
            lines.append(f"{path}: {loc}: required key is missing. Fix: add it.")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            lines.append(f"{path}: {loc}: {err['msg']}{shown}. Fix: change the value of '{loc}'.")
    return "\n".join(lines)


def validate(path: Path, data: Any, spec: type[SpecT], prefix: str = "") -> SpecT:
    """Validate `data` (read from `path`) as `spec`; `prefix` is the key path of `data` inside the file."""
    try:
        return spec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc, prefix)) from exc


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic adds union-branch names such as 'str' or 'SuiteSpec' to the location; skip them.
            if part in {"str", "int", "function-after[_check(), str]"} or (isinstance(part, str) and part[:1].isupper()):
                continue
            out += f".{part}" if out else str(part)
    return out or "(top level)"
