"""The code sandbox against hostile programs: each fails inside it, is scored failed with a reason,
and leaves the host and the test process unharmed; the program reads only what the interpreter
needs. Every layer is tested with the Python guard on and with the kernel layers alone. Network
tests target loopback only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchharness.scorers.sandbox import Limits, capabilities, interpreter_paths, run_check, run_python
from benchharness.scorers.hooks import humaneval_process_results
from conftest import REPO

FAST = Limits(timeout_s=6, cpu_s=3)
CAPS = capabilities()
KERNEL_NET = bool(CAPS.get("net_namespace") or CAPS.get("landlock_net"))
KERNEL_FS = bool(CAPS.get("filesystem_view") or CAPS.get("landlock_abi"))
GUARDS = pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])


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
    assert result.completed, result.reason


def test_clean_program_completes_and_reports_isolation() -> None:
    result = run_python("print('hello')\n", FAST)
    assert result.status == "completed" and result.stdout.strip() == "hello" and result.reason == ""
    assert not result.passed  # a plain program is never a pass: only a check gives a verdict
    assert result.isolation["ready"] and result.isolation["rlimits"]
    for layer in ("net_namespace", "pid_namespace", "mount_namespace", "filesystem_view", "landlock_abi", "python_guard"):
        assert layer in result.isolation  # said either way


def test_this_machine_gives_every_layer() -> None:
    """CI's machine (root, Linux with Landlock) applies every layer; a layer that silently stopped
    applying would otherwise only show as a weaker isolation record."""
    if os.geteuid() != 0:
        pytest.skip("as root, every layer is available on this project's machines")
    assert CAPS["filesystem_view"] and CAPS["net_namespace"] and CAPS["pid_namespace"] and CAPS["landlock_abi"] >= 1
    assert CAPS["uid"] == 65534 and CAPS["executor_uid"] == 65534
    assert CAPS["capabilities"] == "0" and CAPS["executor_capabilities"] == "0"  # nothing kept, CAP_DAC_READ_SEARCH included


def test_exception_is_failed_with_reason() -> None:
    result = run_python("def f(:\n  pass\n", FAST)
    assert result.status == "failed" and "SyntaxError" in result.reason and result.category == "error"


@GUARDS
def test_fork_bomb(guard: bool) -> None:
    marker = "bh-fork-bomb-marker"
    program = f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    before = len(_own_processes_with("sandbox_child.py"))
    result = run_python(program, FAST, python_guard=guard)
    assert not result.completed and result.reason
    assert len(_own_processes_with("sandbox_child.py")) <= before  # nothing left running
    _still_works()


def test_infinite_loop_is_stopped() -> None:
    result = run_python("while True:\n    pass\n", Limits(timeout_s=4, cpu_s=2))
    assert result.status in {"timeout", "failed"} and result.category in {"timeout", "limit"}
    _still_works()


def test_memory_hog_is_refused() -> None:
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n", FAST)
    assert result.status == "failed" and "MemoryError" in result.reason and result.category == "limit"


@GUARDS
def test_write_outside_folder(tmp_path: Path, guard: bool) -> None:
    if not guard and not KERNEL_FS:
        pytest.skip("no filesystem view and no Landlock here: only the Python guard protects the filesystem")
    os.chmod(tmp_path, 0o777)
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('pwned')\n", FAST, python_guard=guard)
    assert result.status == "failed" and result.category in {"refused", "error"}
    assert not target.exists()
    inside = run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n", FAST, python_guard=guard)
    assert inside.completed and inside.stdout.strip() == "ok"


def test_files_cannot_fill_the_disk() -> None:
    """Many files each under the file size limit: the working folder's own quota stops them."""
    if not CAPS.get("filesystem_view"):
        pytest.skip("no filesystem view here: the working folder is on disk, limited per file only")
    program = "block = b'x' * (1 << 20)\nfor i in range(10_000):\n    open(f'f{i}', 'wb').write(block)\n"
    result = run_python(program, Limits(timeout_s=30, cpu_s=20, work_mb=16), python_guard=False)
    assert result.status == "failed" and "No space left" in result.reason, result
    assert "16 MiB" in result.isolation["work_folder"]


def _secret_file(folder: Path, name: str) -> tuple[Path, str]:
    """A world-readable file: only the sandbox's allowlist keeps the program from it."""
    secret = f"bh-secret-{name}-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    path = folder / f"{name}.txt"
    path.write_text(secret)
    os.chmod(path, 0o644)
    return path, secret


def _read_targets(tmp_path: Path) -> dict[str, tuple[str, str | None]]:
    """What a program must not read, by category: path -> secret it must not print (None: any content)."""
    from benchharness.suites.registry import default_cache_dir

    targets: dict[str, tuple[str, str | None]] = {}
    if Path("/etc/shadow").exists():
        targets["root-only file"] = ("/etc/shadow", None)
    targets["system configuration"] = ("/etc/passwd", None)
    home, secret = _secret_file(tmp_path / "home" / "someone", "home")
    targets["another user's home"] = (str(home), secret)
    targets["root's home"] = (str(Path("/root/.bashrc") if Path("/root/.bashrc").exists() else Path.home()), None)
    targets["the harness's configs"] = (str(REPO / "configs" / "models.yaml"), "qwen2.5-coder-0.5b-instruct-q4km")
    targets["the harness's source"] = (str(REPO / "src" / "benchharness" / "scorers" / "sandbox.py"), "interpreter_paths")
    results, secret = _secret_file(tmp_path / "results" / "run", "scores")
    targets["results"] = (str(results), secret)
    cache = default_cache_dir()
    cache_files = sorted(cache.glob("*/*")) if cache.exists() else []
    if cache_files:
        targets["the harness's cache"] = (str(cache_files[0]), None)
    targets["the parent's environment"] = (f"/proc/{os.getpid()}/environ", "BH_TEST_SECRET")
    targets["another process's command line"] = (f"/proc/{os.getppid()}/cmdline", None)
    return targets


@GUARDS
def test_reads_are_limited_to_what_python_needs(tmp_path: Path, guard: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not guard and not KERNEL_FS:
        pytest.skip("no filesystem view and no Landlock here")
    monkeypatch.setenv("BH_TEST_SECRET", "s3cr3t-value")
    for category, (path, secret) in _read_targets(tmp_path).items():
        program = (
            "import os\n"
            f"p = {path!r}\n"
            "data = os.listdir(p) if os.path.isdir(p) else open(p, 'rb').read()\n"
            "print('READ', repr(data)[:2000])\n"
        )
        result = run_python(program, FAST, python_guard=guard)
        assert result.status == "failed", (category, path, result)
        assert "READ" not in result.stdout and (secret is None or secret not in result.stdout), (category, result.stdout)
    # Third-party packages (the harness, torch, ...) are not there: their folders are empty.
    listing = run_python("import os, sys\nprint([p for d in sys.path if os.path.isdir(d) for p in os.listdir(d) if 'packages' in d])\n"
                         f"print(os.listdir({str(Path(json.__file__).parents[1] / 'site-packages')!r}))\n", FAST, python_guard=guard)
    assert listing.completed and listing.stdout.split() == ["[]", "[]"], listing
    assert run_python("import benchharness\n", FAST, python_guard=guard).category == "error"
    # What the interpreter needs is there: the standard library, its extension modules and the
    # libraries they load (hashlib -> libcrypto, ctypes -> libffi, sqlite3, decimal, zlib).
    needed = (
        "import hashlib, ctypes, sqlite3, decimal, zlib, json, re, math, random, collections, itertools, heapq, fractions\n"
        "assert hashlib.md5(b'x').hexdigest() == '9dd4e461268c8034f5c8564e155c67a6'\n"
        "print(len(open(json.__file__).read()) > 0, sqlite3.connect(':memory:').execute('select 1').fetchone())\n"
    )
    result = run_python(needed, FAST, python_guard=guard)
    assert result.completed and result.stdout.split() == ["True", "(1,)"], result


def test_the_view_holds_only_the_allowlist() -> None:
    paths, hidden = interpreter_paths()
    assert any(p.endswith(f"python{sys.version_info.major}.{sys.version_info.minor}") for p in paths)  # the standard library
    assert not any(p == "/etc" or p.startswith(("/home", "/proc")) for p in paths)
    assert all(p in ("/etc/ld.so.cache",) or not p.startswith("/etc/") for p in paths)
    assert all(Path(h).name in ("site-packages", "dist-packages") for h in hidden)
    program = "import os\nprint(sorted(os.listdir('/')))\n"
    result = run_python(program, FAST, python_guard=False)
    if CAPS.get("landlock_abi"):
        assert result.category == "refused"  # not even the root folder can be listed
    else:
        assert result.completed and "etc" not in result.stdout and "home" not in result.stdout


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BH_TEST_SECRET", "s3cr3t-value")
    result = run_python("import os\nprint(os.environ['BH_TEST_SECRET'])\n", FAST)
    assert result.status == "failed" and "KeyError" in result.reason and "s3cr3t" not in result.stdout
    assert os.environ["BH_TEST_SECRET"] == "s3cr3t-value"


@GUARDS
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
        assert result.status == "failed" and "Error" in result.reason and result.category in {"refused", "error"}
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_unknown_architecture_refuses_landlock_and_says_so() -> None:
    """Landlock is called by system call number: on an architecture whose numbers the sandbox
    does not know, it refuses that layer (never guessing a number) and records why."""
    result = run_python("print('ran')\n", FAST, python_guard=False, architecture="vax")
    assert result.isolation["architecture"] == "vax"
    assert result.isolation["landlock_abi"] == 0 and not result.isolation["landlock_net"]
    assert any("landlock refused" in e and "'vax'" in e for e in result.isolation["errors"])
    # The other layers still hold; reads stay limited by the filesystem view.
    if CAPS.get("filesystem_view"):
        leak = run_python("print(open('/etc/passwd').read())\n", FAST, python_guard=False, architecture="vax")
        assert leak.status == "failed" and "root:" not in leak.stdout


def test_checker_is_out_of_the_programs_reach() -> None:
    """The verdict comes from the checker process; the program's answers cross as plain data."""
    checker = "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n    assert candidate((2, 1)) == (1, 2)\n"
    right = run_check("def sort(xs):\n    return type(xs)(sorted(xs))\n", checker, "check(sort)", "sort")
    assert right.passed, right
    tuple_for_list = run_check("def sort(xs):\n    return tuple(sorted(xs))\n", checker, "check(sort)", "sort")
    assert tuple_for_list.category == "assertion"  # types survive the crossing: (1, 2, 3) != [1, 2, 3]
    missing = run_check("def other(xs):\n    return xs\n", checker, "check(sort)", "sort")
    assert missing.status == "failed" and "does not define sort" in missing.reason


def test_unprivileged_caller_gets_a_user_namespace(tmp_path: Path) -> None:
    """Run by a user without privileges (uid 65534, the system's own Python): the layers come
    from a user namespace instead, and no capability is left to the program."""
    system_python, setpriv = Path("/usr/bin/python3"), shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not system_python.exists():
        pytest.skip("needs root (to become another user), setpriv and a system Python")
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "from benchharness.scorers.sandbox import run_check, run_python\n"
        "r = run_check('def add(a, b):\\n    return a + b\\n', 'def check(c):\\n    assert c(1, 2) == 3\\n', 'check(add)', 'add', python_guard=False)\n"
        "leak = run_python('print(open(\"/etc/passwd\").read())', python_guard=False)\n"
        "print(json.dumps([r.status, r.isolation, leak.status, leak.stdout]))\n"
    )
    out = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(system_python), "-c", script],
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "TMPDIR": "/tmp"}, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    status, isolation, leak_status, leak_stdout = json.loads(out.stdout.strip().splitlines()[-1])
    assert status == "passed" and isolation["ready"]
    if isolation["user_namespace"]:
        assert isolation["filesystem_view"] and isolation["capabilities"] == "0" and isolation["executor_capabilities"] == "0"
        assert leak_status == "failed" and "root:" not in leak_stdout


def test_humaneval_scoring_uses_sandbox() -> None:
    doc = {"prompt": "def add(a, b):\n", "test": "def check(c):\n    assert c(2, 3) == 5\n", "entry_point": "add"}
    good = humaneval_process_results(doc, ["    return a + b\n"])
    bad = humaneval_process_results(doc, ["    return a * b\n"])
    assert good["pass@1"] == 1.0 and good["sandbox"]["status"] == "passed"
    assert bad["pass@1"] == 0.0 and bad["sandbox"]["status"] == "failed" and bad["sandbox"]["category"] == "assertion"
