"""Run untrusted Python (a model's HumanEval completion) in a contained child process.

Hostile input: the program may loop, fork, allocate, write files, read secrets or open sockets.
Each program runs in its own process, in a fresh temporary folder, with a scrubbed environment
and these layers, each applied where the system allows and reported in the result:

- resource limits (RLIMIT_*): address space, CPU seconds, processes, file size, open files, no core;
- a wall-clock timeout, after which the whole session (and PID namespace) is killed;
- namespaces: a new network namespace (no interfaces up, so even loopback is unreachable) and a
  new PID namespace (when its first process ends, every process it forked dies), via unshare(2);
  as root that needs no user namespace, and the child then drops to uid/gid 65534 (nobody);
- Landlock (Linux >= 5.13): writes only inside the temporary folder, reads only of the Python
  installation and system folders (not /proc, so not the parent's environ), no TCP bind/connect,
  no signals to processes outside the sandbox;
- a Python audit hook that refuses sockets, process creation, ctypes and file writes outside the
  folder, a second line behind the kernel's (it cannot stop native code, the kernel layers can).

The result says which layers were in force (`isolation`), so a run on a machine without
namespaces or Landlock records that its network and filesystem isolation were weaker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock for the whole program
    cpu_s: int = 10  # CPU seconds (SIGXCPU after)
    memory_mb: int = 1024  # address space
    max_processes: int = 16  # RLIMIT_NPROC of the sandbox user
    file_size_mb: int = 16  # largest file it may write (stdout and stderr included)
    max_open_files: int = 64
    output_chars: int = 4000  # how much of stdout/stderr the result keeps


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "error"
    reason: str  # empty when passed; else the exception line, signal or limit that ended it
    returncode: int | None
    seconds: float
    stdout: str = ""
    stderr: str = ""
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def record(self) -> dict[str, Any]:
        """A compact JSON-able record for a sample file (output tails left out)."""
        data = asdict(self)
        data.pop("stdout")
        data.pop("stderr")
        return data


def run_python(source: str, limits: Limits = Limits(), python_guard: bool = True) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; exit status 0 is "passed"."""
    root = Path(tempfile.mkdtemp(prefix="bh-sandbox-"))
    work = root / "work"
    work.mkdir()
    try:
        (work / "program.py").write_text(source, encoding="utf-8")
        bootstrap = root / "bootstrap.py"
        bootstrap.write_text(_BOOTSTRAP, encoding="utf-8")
        as_root = os.geteuid() == 0
        os.chmod(root, 0o755)
        for path in (bootstrap, work / "program.py"):
            os.chmod(path, 0o644)
        if as_root:
            # The child drops to nobody; only its folder is writable to it.
            os.chown(work, NOBODY, NOBODY)
            os.chown(work / "program.py", NOBODY, NOBODY)
        os.chmod(work, 0o700)
        status_read, status_write = os.pipe()
        config = {
            "work": str(work), "program": str(work / "program.py"), "status_fd": status_write,
            "drop_to": NOBODY if as_root else None, "python_guard": python_guard,
            "cpu_s": limits.cpu_s, "memory": limits.memory_mb << 20, "nproc": limits.max_processes,
            "fsize": limits.file_size_mb << 20, "nofile": limits.max_open_files,
            "read_paths": _read_paths(),
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        out_path, err_path = root / "stdout", root / "stderr"
        started = time.perf_counter()
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", str(bootstrap), json.dumps(config)],
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
        isolation = _read_status(status_read)
        stdout = _tail(out_path, limits.output_chars)
        stderr = _tail(err_path, limits.output_chars)
        return _result(proc.returncode, timed_out, seconds, stdout, stderr, isolation, limits)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    # The child leads its own session: SIGKILL to the group ends it and anything it forked
    # (in a PID namespace, killing its first process ends the rest as well).
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


def _read_status(fd: int) -> dict[str, Any]:
    chunks = []
    try:
        while block := os.read(fd, 65536):
            chunks.append(block)
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks).decode() or "{}")
    except ValueError:
        return {"error": "unreadable isolation status"}


def _tail(path: Path, chars: int) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - chars * 4))
        return fh.read().decode("utf-8", errors="replace")[-chars:]


def _result(returncode: int | None, timed_out: bool, seconds: float, stdout: str, stderr: str, isolation: dict[str, Any], limits: Limits) -> SandboxResult:
    def make(status: str, reason: str) -> SandboxResult:
        return SandboxResult(status, reason, returncode, round(seconds, 3), stdout, stderr, isolation)

    if timed_out:
        return make("timeout", f"timeout: still running after {limits.timeout_s:g} s wall clock; killed")
    if not isolation.get("ready"):
        return make("error", f"sandbox setup failed: {isolation.get('error') or _last_line(stderr) or 'no status from the child'}")
    if returncode == 0:
        return make("passed", "")
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode)
        why = {
            signal.SIGXCPU: f"CPU time limit ({limits.cpu_s} s)", signal.SIGXFSZ: f"file size limit ({limits.file_size_mb} MiB)",
            # As a PID namespace's init the program ignores SIGXCPU, so the CPU limit ends it with SIGKILL.
            signal.SIGKILL: f"killed (SIGKILL): CPU time limit ({limits.cpu_s} s) or out of memory", signal.SIGSEGV: "crashed (SIGSEGV)",
        }.get(sig, f"killed by {sig.name}")
        return make("failed", why)
    return make("failed", _last_line(stderr) or f"exit status {returncode}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _read_paths() -> list[str]:
    """Folders the program may read: the Python installation and system folders, not /proc or home."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, *(p for p in sys.path if p), "/usr", "/lib", "/lib64", "/bin", "/etc"}
    return sorted(p for p in candidates if os.path.isdir(p) and not p.startswith("/proc"))


def capabilities() -> dict[str, Any]:
    """Which isolation layers this machine gives, measured by running a trivial program."""
    return run_python("pass\n", Limits(timeout_s=20)).isolation


# The child's first code: applies every layer, reports what held on the status pipe, closes it,
# then runs the program. Kept free of harness imports: it runs under `python -I`.
_BOOTSTRAP = r'''
import ctypes, json, os, resource, sys

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
cfg = json.loads(sys.argv[1])
status = {"ready": False, "errors": []}
libc = ctypes.CDLL(None, use_errno=True)


def fail(msg):
    status["error"] = msg
    os.write(cfg["status_fd"], json.dumps(status).encode())
    os._exit(70)


def unshare(flags):
    if libc.unshare(flags) != 0:
        return os.strerror(ctypes.get_errno())
    return None


# 1. Namespaces. Without root, a user namespace is what permits the others.
base = 0 if os.geteuid() == 0 else CLONE_NEWUSER
err = unshare(base | CLONE_NEWNET | CLONE_NEWPID)
status["net_namespace"] = status["pid_namespace"] = err is None
if err is not None:
    status["errors"].append(f"unshare(net+pid): {err}")
    err = unshare(base | CLONE_NEWNET)
    status["net_namespace"] = err is None
    if err is not None:
        status["errors"].append(f"unshare(net): {err}")
status["user_namespace"] = bool(base) and status["net_namespace"]

# 2. In a new PID namespace the next child is its init: run the program there; this process
#    only relays the exit status. When init ends, the kernel kills all it left behind.
if status["pid_namespace"]:
    pid = os.fork()
    if pid > 0:
        os.close(cfg["status_fd"])
        _, code = os.waitpid(pid, 0)
        if os.WIFSIGNALED(code):
            os.kill(os.getpid(), os.WTERMSIG(code))
        os._exit(os.waitstatus_to_exitcode(code) if not os.WIFSIGNALED(code) else 1)

# 3. Drop root: the program runs as nobody, which owns nothing but its folder (and which the
#    kernel holds to RLIMIT_NPROC, unlike root). It keeps one capability, CAP_DAC_READ_SEARCH,
#    so it can still import from a Python installed under a private home such as /root/.pyenv;
#    Landlock then narrows reads to the Python and system folders.
class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


if cfg["drop_to"] is not None:
    try:
        if libc.prctl(8, 1, 0, 0, 0) != 0:  # PR_SET_KEEPCAPS: keep permitted capabilities across setuid
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
        os.setgroups([])
        os.setgid(cfg["drop_to"])
        os.setuid(cfg["drop_to"])
        keep = 1 << 2  # CAP_DAC_READ_SEARCH
        caps = (CapData * 2)(CapData(keep, keep, 0), CapData(0, 0, 0))
        if libc.syscall(126, ctypes.byref(CapHeader(0x20080522, 0)), caps) != 0:  # capset, version 3
            raise OSError(ctypes.get_errno(), "capset")
        status["uid"] = os.getuid()
        status["capabilities"] = "CAP_DAC_READ_SEARCH"
    except OSError as exc:
        fail(f"could not drop to uid {cfg['drop_to']}: {exc}")
else:
    status["uid"] = os.getuid()

# 4. Resource limits.
try:
    for name, value in (("RLIMIT_AS", cfg["memory"]), ("RLIMIT_CPU", cfg["cpu_s"]), ("RLIMIT_NPROC", cfg["nproc"]),
                        ("RLIMIT_FSIZE", cfg["fsize"]), ("RLIMIT_NOFILE", cfg["nofile"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    status["rlimits"] = True
except (ValueError, OSError) as exc:
    fail(f"setrlimit: {exc}")


# 5. Landlock: filesystem (read allowlist, writes only in the folder), TCP and signal scopes.
def landlock():
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0, f"landlock unavailable: {os.strerror(ctypes.get_errno())}"
    READ_FILE, READ_DIR, WRITE_FILE, TRUNCATE, IOCTL_DEV = 1 << 2, 1 << 3, 1 << 1, 1 << 14, 1 << 15
    write_dir = WRITE_FILE | sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
    if abi >= 2:
        write_dir |= 1 << 13  # refer
    if abi >= 3:
        write_dir |= TRUNCATE
    if abi >= 5:
        write_dir |= IOCTL_DEV
    handled_fs = READ_FILE | READ_DIR | write_dir
    file_rights = READ_FILE | WRITE_FILE | (TRUNCATE if abi >= 3 else 0)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = RulesetAttr(handled_fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: bind+connect TCP; scope: abstract unix, signal
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return 0, f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}"

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            rule = PathBeneath(rights if os.path.isdir(path) else rights & file_rights, fd)
            if syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                status["errors"].append(f"landlock rule {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    for path in cfg["read_paths"]:
        allow(path, READ_FILE | READ_DIR)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        allow(dev, READ_FILE | WRITE_FILE)
    allow(cfg["work"], READ_FILE | READ_DIR | write_dir)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required to self-restrict
        return 0, f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}"
    if syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        return 0, f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}"
    os.close(ruleset)
    return abi, None


abi, err = landlock()
status["landlock_abi"] = abi
status["landlock_net"] = abi >= 4
status["landlock_signals"] = abi >= 6
if err:
    status["errors"].append(err)


# 6. Python-level guard.
def guard():
    work = os.path.realpath(cfg["work"]) + os.sep
    blocked_always = {
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "os.system", "os.fork", "os.forkpty",
        "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen",
        "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "pty.spawn", "os.setuid",
    }
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink", "os.truncate", "shutil.rmtree", "os.utime"}

    def inside(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(work)
        except (TypeError, ValueError):
            return False

    def hook(event, args):
        if event in blocked_always:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args:
            path, mode, flags = (list(args) + [None, None])[:3]
            if isinstance(path, int):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {os.fsdecode(path)} is not allowed (only inside the working folder)")
            if os.fsdecode(path).startswith("/proc/") and not os.fsdecode(path).startswith("/proc/self/"):
                raise PermissionError(f"sandbox: reading {os.fsdecode(path)} is not allowed")
        elif event in path_events and args and not isinstance(args[0], int) and not inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the working folder is not allowed")

    sys.addaudithook(hook)


os.chdir(cfg["work"])
with open(cfg["program"], encoding="utf-8") as fh:
    source = fh.read()
status["python_guard"] = bool(cfg["python_guard"])
status["ready"] = True
os.write(cfg["status_fd"], json.dumps(status).encode())
os.close(cfg["status_fd"])
if cfg["python_guard"]:
    guard()
program = cfg["program"]
del cfg, libc
# Compiled only now: a syntax error is the program's failure, not the sandbox's.
exec(compile(source, program, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''
