"""GSM8K number extraction and scoring, HumanEval program assembly, subject macro averages: hand-made items."""

from __future__ import annotations

from decimal import Decimal

import pytest

from benchharness.scorers.hooks import (
    extract_final_number, extract_marked_number, gsm8k_process_results, humaneval_program, macro_average,
    normalize_number, subject_scores, summarize_sandbox,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1,000", "1000"), ("$5.50", "5.5"), ("-3", "-3"), ("42.", "42"), ("The answer is 7 apples", "7"), ("#### 12", "12"),
     ("−4", "-4"), ("1,234,567.0", "1234567"), ("$ 18", "18"), ("0.25", "0.25")],
)
def test_number_formats(text: str, value: str) -> None:
    assert extract_final_number(text) == Decimal(value)


def test_marked_answer_wins_over_later_numbers() -> None:
    assert extract_final_number("So 3 + 4 = 7. The answer is 7. Next, 12 more questions") == 7
    assert extract_marked_number("so it is 5") is None
    assert extract_marked_number("The answer is: **18**.") == 18
    assert extract_marked_number("#### 1,000\nThe answer is 3.") == 3  # the last marked number counts


def test_no_number() -> None:
    assert extract_final_number("I do not know.") is None
    assert normalize_number("") is None


@pytest.mark.parametrize(
    ("response", "exact", "strict"),
    [
        ("Janet has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.", 1.0, 1.0),
        ("She makes $18.00 a day", 1.0, 0.0),
        ("The answer is 18 dollars, or 1,800 cents", 1.0, 1.0),
        ("The answer is 19.", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_gsm8k_process_results(response: str, exact: float, strict: float) -> None:
    doc = {"question": "?", "answer": "... #### 18", "target": "18"}
    assert gsm8k_process_results(doc, [response]) == {"exact_match": exact, "strict_match": strict}


def test_gsm8k_thousands_target() -> None:
    doc = {"question": "?", "answer": "so #### 1,000"}
    assert gsm8k_process_results(doc, ["The answer is 1000."])["exact_match"] == 1.0


def test_humaneval_program_appends_tests_and_check() -> None:
    doc = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    program = humaneval_program(doc, "    return x + 1\n")
    scope: dict = {}
    exec(program, scope)  # a known-good program: runs without raising
    assert program.rstrip().endswith("check(f)")


def test_subject_scores_and_macro_average() -> None:
    records = [
        {"subject": "a", "metrics": {"acc": 1.0}}, {"subject": "a", "metrics": {"acc": 1.0}}, {"subject": "a", "metrics": {"acc": 0.0}},
        {"subject": "b", "metrics": {"acc": 0.0}},
    ]
    scores = subject_scores(records)
    assert scores == {"a": pytest.approx(2 / 3), "b": 0.0}
    assert macro_average(scores) == pytest.approx(1 / 3)  # micro would be 0.5
    assert macro_average({}) is None


def test_summarize_sandbox() -> None:
    iso = {"filesystem_view": True, "net_namespace": True, "pid_namespace": False, "landlock_abi": 0, "python_guard": True}
    text = summarize_sandbox([
        {"status": "passed", "category": "", "isolation": iso},
        {"status": "timeout", "category": "timeout", "isolation": iso},
        {"status": "failed", "category": "assertion", "isolation": iso},
    ])
    assert text == "failed:assertion 1, passed 1, timeout:timeout 1; isolation: fs-view+net-ns+python-guard"
