"""The code sandbox against hostile programs: each fails inside it, is scored failed with a reason,
and leaves the host and the test process unharmed. Network tests target loopback only."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from benchharness.sandbox import Limits, capabilities, run_python
from benchharness.scoring import humaneval_process_results

FAST = Limits(timeout_s=4, cpu_s=3)
CAPS = capabilities()
KERNEL_NET = bool(CAPS.get("net_namespace") or CAPS.get("landlock_net"))
KERNEL_FS = bool(CAPS.get("landlock_abi")) or CAPS.get("uid") not in (None, os.getuid())


def _own_processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _still_works() -> None:
    result = run_python("import math\nassert math.sqrt(16) == 4\n", FAST)
    assert result.passed, result.reason


def test_clean_program_passes_and_reports_isolation() -> None:
    result = run_python("print('hello')\n", FAST)
    assert result.passed and result.stdout.strip() == "hello" and result.reason == ""
    assert result.isolation["ready"] and result.isolation["rlimits"]
    assert "net_namespace" in result.isolation and "landlock_abi" in result.isolation  # said either way


def test_exception_is_failed_with_reason() -> None:
    result = run_python("def f(:\n  pass\n", FAST)
    assert result.status == "failed" and "SyntaxError" in result.reason


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_fork_bomb(guard: bool) -> None:
    marker = "bh-fork-bomb-marker"
    program = f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    before = len(_own_processes_with("bootstrap.py"))
    result = run_python(program, FAST, python_guard=guard)
    assert not result.passed and result.reason
    assert len(_own_processes_with("bootstrap.py")) <= before  # nothing left running
    _still_works()


def test_infinite_loop_is_stopped() -> None:
    result = run_python("while True:\n    pass\n", Limits(timeout_s=3, cpu_s=2))
    assert result.status in {"timeout", "failed"} and ("timeout" in result.reason or "CPU" in result.reason)
    _still_works()


def test_memory_hog_is_refused() -> None:
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n", FAST)
    assert result.status == "failed" and "MemoryError" in result.reason


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_write_outside_folder(tmp_path: Path, guard: bool) -> None:
    if not guard and not KERNEL_FS:
        pytest.skip("no Landlock and no privilege drop here: only the Python guard protects the filesystem")
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('pwned')\n", FAST, python_guard=guard)
    assert result.status == "failed" and "PermissionError" in result.reason
    assert not target.exists()
    inside = run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n", FAST, python_guard=guard)
    assert inside.passed and inside.stdout.strip() == "ok"


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BH_TEST_SECRET", "s3cr3t-value")
    result = run_python("import os\nprint(os.environ['BH_TEST_SECRET'])\n", FAST)
    assert result.status == "failed" and "KeyError" in result.reason and "s3cr3t" not in result.stdout
    for guard in (True, False):
        if not guard and not KERNEL_FS:
            continue
        leak = run_python(f"print(open('/proc/{os.getpid()}/environ').read())\n", FAST, python_guard=guard)
        assert leak.status == "failed" and "PermissionError" in leak.reason and "s3cr3t" not in leak.stdout
    assert os.environ["BH_TEST_SECRET"] == "s3cr3t-value"


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_network_connection_to_loopback_fails(guard: bool) -> None:
    if not guard and not KERNEL_NET:
        pytest.skip("no network namespace and no Landlock TCP rules here: only the Python guard blocks sockets")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'pwned')\n"
        result = run_python(program, FAST, python_guard=guard)
        assert result.status == "failed" and "Error" in result.reason
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_humaneval_scoring_uses_sandbox() -> None:
    doc = {"prompt": "def add(a, b):\n", "test": "def check(c):\n    assert c(2, 3) == 5\n", "entry_point": "add"}
    good = humaneval_process_results(doc, ["    return a + b\n"])
    bad = humaneval_process_results(doc, ["    return a * b\n"])
    assert good["pass@1"] == 1.0 and good["sandbox"]["status"] == "passed"
    assert bad["pass@1"] == 0.0 and bad["sandbox"]["status"] == "failed" and "AssertionError" in bad["sandbox"]["reason"]
