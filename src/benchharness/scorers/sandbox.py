"""Run untrusted Python (a model's HumanEval completion) in a contained child, and check it there.

Hostile input: the program may loop, fork, allocate, write files, read secrets, open sockets,
end itself early or tamper with its own interpreter. Each program runs in its own processes
(`sandbox_child.py`), in a fresh temporary folder, with a scrubbed environment and these
layers, each applied where the system allows and reported in the result's `isolation`:

- a filesystem view (a new mount namespace and chroot): an empty root holding, read-only, only
  the Python standard library, the shared libraries its extension modules load, and the
  loader's cache, plus the working folder and /dev/null, zero, random, urandom. Nothing else
  exists for the program: not /etc, /home, /root, /proc, the harness's cache, results or configs;
- resource limits (RLIMIT_*): address space, CPU seconds, processes, file size, open files, no core;
- a wall-clock timeout, after which the whole session (and PID namespace) is killed;
- namespaces: a new network namespace (no interfaces up, so even loopback is unreachable) and
  a new PID namespace (when its init ends, every process in it dies); as root no user
  namespace is needed, and the child then drops to uid/gid 65534 (nobody) with no capability;
- Landlock (Linux >= 5.13): reads only of that same allowlist, writes only in the working
  folder, no program execution, no TCP bind/connect, no signals outside the sandbox;
- a Python audit hook that refuses sockets, process creation, ctypes and writes outside the
  folder, a second line behind the kernel's (it cannot stop native code, the kernel layers can).

A check (`run_check`) is passed only on positive evidence: the problem's check call returned
normally in a supervising process the program cannot reach, which writes the verdict to a
pipe the program never holds (see `sandbox_child`). An exit status is never a verdict.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NOBODY = 65534
CHILD = Path(__file__).with_name("sandbox_child.py")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")

# Why a sample failed, for the report: a weak model (assertion, error, exit) reads differently
# from a blocked one (timeout, limit, refused) or a harness problem (setup).
FAILURE_CATEGORIES = ("assertion", "error", "exit", "timeout", "limit", "refused", "setup")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock for the whole program
    cpu_s: int = 10  # CPU seconds per process (SIGXCPU after)
    memory_mb: int = 1024  # address space per process
    max_processes: int = 16  # RLIMIT_NPROC of the sandbox user
    file_size_mb: int = 16  # largest file it may write (stdout and stderr included)
    work_mb: int = 64  # all files in its working folder together (where the filesystem view applies)
    max_open_files: int = 64
    output_chars: int = 4000  # how much of stdout/stderr the result keeps


@dataclass(frozen=True)
class SandboxResult:
    # "passed" (a check returned normally) | "completed" (a plain program ran to its end; not
    # a verdict) | "failed" | "timeout" | "error" (the sandbox, not the program, failed)
    status: str
    reason: str  # empty when passed or completed; else the exception line, signal or limit
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)
    category: str = ""  # one of FAILURE_CATEGORIES when not passed or completed

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def completed(self) -> bool:
        return self.status in ("passed", "completed")

    def record(self) -> dict[str, Any]:
        """A compact JSON-able record for a sample file (output tails left out)."""
        data = asdict(self)
        data.pop("stdout")
        data.pop("stderr")
        return data


def run_python(source: str, limits: Limits = Limits(), python_guard: bool = True, architecture: str | None = None) -> SandboxResult:
    """Run `source` as a program in the sandbox. "completed" says it ran to its end; that is
    the program's own account and no verdict (use `run_check` to score code)."""
    return _run(source, None, None, None, limits, python_guard, architecture)


def run_check(
    program: str, checker: str, check_call: str, entry_point: str,
    limits: Limits = Limits(), python_guard: bool = True, architecture: str | None = None,
) -> SandboxResult:
    """Run `program` (untrusted: prompt + completion) in the sandbox and `checker` (trusted: the
    prompt's helpers and the tests) beside it; `check_call` (e.g. "check(add)") runs in the
    checker with `entry_point` and the program's other functions called across the boundary.
    "passed" only when `check_call` returned normally there."""
    return _run(program, checker, check_call, entry_point, limits, python_guard, architecture)


def _run(
    program: str, checker: str | None, check_call: str | None, entry_point: str | None,
    limits: Limits, python_guard: bool, architecture: str | None,
) -> SandboxResult:
    root = Path(tempfile.mkdtemp(prefix="bh-sandbox-"))
    work, view = root / "work", root / "fs"
    work.mkdir()
    view.mkdir()
    try:
        as_root = os.geteuid() == 0
        os.chmod(root, 0o755)
        os.chmod(view, 0o755)
        (work / "program.py").write_text(program, encoding="utf-8")
        os.chmod(work / "program.py", 0o644)
        checker_path = None
        if checker is not None:
            # Readable by the launcher only; the program's processes never see this folder.
            checker_path = root / "checker.py"
            checker_path.write_text(checker, encoding="utf-8")
            os.chmod(checker_path, 0o600)
        if as_root:
            os.chown(work, NOBODY, NOBODY)
            os.chown(work / "program.py", NOBODY, NOBODY)
        os.chmod(work, 0o700)
        read_paths, hidden_paths = interpreter_paths()
        status_read, status_write = os.pipe()
        config = {
            "work": str(work), "program": str(work / "program.py"), "fs_root": str(view), "status_fd": status_write,
            "checker": str(checker_path) if checker_path else None, "check_call": check_call, "entry_point": entry_point,
            "drop_to": NOBODY, "python_guard": python_guard, "architecture": architecture or platform.machine(),
            "cpu_s": limits.cpu_s, "memory": limits.memory_mb << 20, "nproc": limits.max_processes,
            "fsize": limits.file_size_mb << 20, "nofile": limits.max_open_files, "work_bytes": limits.work_mb << 20,
            "read_paths": read_paths, "hidden_paths": hidden_paths, "devices": [d for d in DEVICES if os.path.exists(d)],
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8", "TZ": "UTC",
               "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        out_path, err_path = root / "stdout", root / "stderr"
        started = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", str(CHILD), json.dumps(config)],
                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    pass_fds=(status_write,), start_new_session=True, close_fds=True,
                )
            finally:
                os.close(status_write)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_session(proc)
        seconds = time.perf_counter() - started
        isolation, verdict = _read_status(status_read)
        stdout = _tail(out_path, limits.output_chars)
        stderr = _tail(err_path, limits.output_chars)
        return _result(proc.returncode, timed_out, seconds, stdout, stderr, isolation, verdict, limits)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def interpreter_paths() -> tuple[list[str], list[str]]:
    """What the interpreter reads once running: its standard library (with the compiled
    extension modules) and the shared libraries those load; and the third-party package folders
    inside the standard library's folder, which the view hides. Fixed for the life of the
    process, so computed once."""
    stdlib = sysconfig.get_path("stdlib")
    folders = {stdlib, sysconfig.get_path("platstdlib")}
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload and os.path.isdir(dynload):
        folders.add(dynload)
    zipped = os.path.join(sys.base_prefix, "lib", f"python{sys.version_info.major}{sys.version_info.minor}.zip")
    files = {zipped} if os.path.isfile(zipped) else set()
    files |= _shared_libraries([os.path.realpath(sys.executable), *_extension_modules(folders)])
    if os.path.isfile("/etc/ld.so.cache"):
        files.add("/etc/ld.so.cache")
    folders = {f for f in folders if f and os.path.isdir(f)}
    # A folder inside another listed one is already visible.
    top = sorted(f for f in folders if not any(f != g and f.startswith(g.rstrip("/") + "/") for g in folders))
    paths = top + sorted(f for f in files if not any(f.startswith(g.rstrip("/") + "/") for g in top))
    hidden = sorted(os.path.join(folder, name) for folder in top for name in ("site-packages", "dist-packages")
                    if os.path.isdir(os.path.join(folder, name)))
    return paths, hidden


def _extension_modules(folders: set[str]) -> list[str]:
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "test", "__pycache__")]
            found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".so"))
    return sorted(found)


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def _shared_libraries(binaries: list[str]) -> set[str]:
    """The shared libraries `binaries` load, as the dynamic loader names them (by `ldd`)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise RuntimeError("the sandbox needs `ldd` (glibc's libc-bin) to find the libraries Python's extension modules load")
    found: set[str] = set()
    for start in range(0, len(binaries), 64):
        out = subprocess.run([ldd, *binaries[start:start + 64]], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            match = _LDD_LINE.match(line)
            if match and os.path.exists(match.group(1)):
                found.add(match.group(1))
    return found


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    # The child leads its own session: SIGKILL to the group ends it and anything it forked
    # (in a PID namespace, killing its init ends the rest as well).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    # SIGKILL reaches a PID namespace's other processes asynchronously: wait (briefly) until
    # the group is empty, so the caller never sees a sandbox still running.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)


def _read_status(fd: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The supervisor's two lines: the isolation record, then the verdict (absent if it died)."""
    chunks = []
    try:
        while block := os.read(fd, 65536):
            chunks.append(block)
    finally:
        os.close(fd)
    isolation: dict[str, Any] = {}
    verdict = None
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            return {"error": "unreadable isolation status"}, None
        if isinstance(message, dict) and "verdict" in message:
            verdict = message["verdict"]
        elif isinstance(message, dict):
            isolation = message
    return isolation, verdict


def _tail(path: Path, chars: int) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - chars * 4))
        return fh.read().decode("utf-8", errors="replace")[-chars:]


def _result(
    returncode: int | None, timed_out: bool, seconds: float, stdout: str, stderr: str,
    isolation: dict[str, Any], verdict: dict[str, Any] | None, limits: Limits,
) -> SandboxResult:
    def make(status: str, category: str, reason: str) -> SandboxResult:
        return SandboxResult(status, reason, returncode, round(seconds, 3), stdout, stderr, isolation, category)

    if not isolation.get("ready") and not timed_out:
        why = isolation.get("error") or _last_line(stderr) or "no status from the child"
        return make("error", "setup", f"sandbox setup failed: {why}")
    if isinstance(verdict, dict) and verdict.get("status") in ("passed", "completed", "failed", "error"):
        return make(str(verdict["status"]), str(verdict.get("category") or ""), str(verdict.get("reason") or ""))
    if timed_out:
        return make("timeout", "timeout", f"timeout: still running after {limits.timeout_s:g} s wall clock; killed")
    # No verdict: the supervisor itself ended (its limits, or a kill from outside).
    if returncode is not None and returncode > 128:
        sig = signal.Signals(returncode - 128) if returncode - 128 in set(signal.Signals) else None
        if sig is signal.SIGXCPU or sig is signal.SIGKILL:
            return make("failed", "limit", f"the checker was killed by {sig.name} (CPU time limit, {limits.cpu_s} s)")
        return make("failed", "error", f"the checker was killed by {sig.name if sig else returncode - 128}")
    return make("error", "setup", f"no verdict from the checker (exit status {returncode}): {_last_line(stderr)}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def capabilities() -> dict[str, Any]:
    """Which isolation layers this machine gives, measured by running a trivial program."""
    return run_python("pass\n", Limits(timeout_s=20)).isolation
