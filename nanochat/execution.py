"""
Running model-written Python safely. Two tools:

1. `use_calculator(expr) -> str`: the inference-time tool behind <|python_start|>EXPR<|python_end|>.
   It walks the expression's syntax tree with an allow-list (int/float/str literals, + - * / // % **,
   unary +/-, comparisons, len/abs/round/min/max, a few string methods such as .count, indexing and
   slicing of strings). It never calls eval/exec/compile, and every operation is bounded *before* it
   runs (huge powers, string repeats and replaces are refused), so it needs no timer and works from
   any thread. It never raises: the result as text, GSM8K style (48/2 -> "24", 7/2 -> "3.5"), or a
   text starting with "Error:", which the engine injects like any other result.

2. `execute_code(code) -> ExecutionResult`: a whole program (HumanEval) in a separate process.
   Always: a fresh interpreter (`python -I`: no site/user paths, no PYTHON* variables) with an empty
   environment except PATH/HOME/TMPDIR/LANG; a throwaway working directory (removed afterwards);
   limits on wall time, CPU seconds, address space (memory), processes+threads, file size and core
   dumps; output capped at MAX_OUTPUT bytes per stream. A supervisor (the program's parent, which stays
   the caller) reaps and, when the program ends or times out, kills every process it started, daemons
   that called setsid() included; the call returns only after that.
   As root (CI): the program runs as `nobody` (root would ignore RLIMIT_NPROC and could read anything),
   with no_new_privs (setuid binaries grant nothing), so the parent's /proc/<pid>/environ, /root and
   other 0600/0700 files are unreadable. Where namespaces are available (root with CAP_SYS_ADMIN, or
   unprivileged user namespaces) it also gets, checked once per process by a probe run:
     - a network namespace with only a downed loopback: no TCP/UDP/abstract sockets anywhere;
     - a pid namespace (it sees only its own processes; when it ends, everything it started dies);
     - an IPC namespace and a mount namespace in which every mount is read-only except its working
       directory (a private tmpfs of disk_mb), and the home folder(s), /root, /home and
       $NANOCHAT_BASE_DIR (the checkpoints) are covered by empty tmpfs mounts.
   Without namespaces (e.g. a default Docker container) it falls back, with a one-time warning, to
   rlimits + nobody + an in-process socket guard that ctypes can bypass: then the program can still
   write into world-writable folders (/tmp, /var/tmp, /dev/shm), read world-readable files (but not
   the home or checkpoints when they are private, as /root is), see host processes and their command
   lines, and reach world-writable Unix sockets.
   Not root and no user namespaces: only the rlimits and the guard; it can read what you can read, and
   can kill its supervisor (same user) to leave processes behind.
   Concurrent sandboxes share nobody's RLIMIT_NPROC budget (it counts per user, threads included).
"""

import ast
import json
import math
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# -------------------------------------------------------------------------------------------------
# 1. the calculator

MAX_EXPR_CHARS = 256
MAX_INT_BITS = 4096  # ~1,200 decimal digits: big enough for any arithmetic a chat answer needs
MAX_SEQ_LEN = 10_000  # longest string (or list, from .split) an expression may build
FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max}
STR_METHODS = {"count", "upper", "lower", "strip", "find", "index", "startswith", "endswith", "replace", "split"}
COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
           ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}


class CalculatorError(Exception):
    pass


def _number(*values):
    return all(isinstance(v, (int, float)) for v in values)


def _checked(value):
    """Every intermediate result passes through here: real numbers of bounded size, short strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise CalculatorError("number too large")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalculatorError("number too large")
        return value
    if isinstance(value, (str, list)):
        if len(value) > MAX_SEQ_LEN:
            raise CalculatorError("result too long")
        return value
    raise CalculatorError("the result is not a real number" if isinstance(value, complex) else "unsupported value")


def _binop(op, a, b):
    if isinstance(op, ast.Pow):
        if not _number(a, b):
            raise CalculatorError("** needs numbers")
        # bound the result's size before computing it: 9**9**9 is refused, not attempted
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b * math.log2(abs(a)) > MAX_INT_BITS:
            raise CalculatorError("number too large")
        return a ** b  # float powers overflow (OverflowError) instead of growing
    if isinstance(op, ast.Mult) and (isinstance(a, (str, list)) or isinstance(b, (str, list))):
        seq, times = (a, b) if isinstance(a, (str, list)) else (b, a)
        if not isinstance(times, int) or isinstance(times, bool) or len(seq) * max(times, 0) > MAX_SEQ_LEN:
            raise CalculatorError("repeat too long")
        return seq * times
    if isinstance(op, ast.Add) and isinstance(a, (str, list)) and type(a) is type(b):
        return a + b  # both operands are bounded, so the sum is
    if not _number(a, b):
        raise CalculatorError("arithmetic needs numbers")
    # '%' only between numbers: string formatting ('%*d' % (10**9, 1)) could allocate without bound
    ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b,
           ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
    if type(op) not in ops:
        raise CalculatorError(f"operator {type(op).__name__} is not allowed")
    return ops[type(op)]()


def _call(node):
    if node.keywords:
        raise CalculatorError("keyword arguments are not allowed")
    args = [_eval(a) for a in node.args]  # a *starred argument is refused by _eval
    if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        name = node.func.id
        if name == "round" and len(args) == 2 and isinstance(args[1], int) and abs(args[1]) > 100:
            raise CalculatorError("round() digits out of range")  # round(1, -10**9) computes 10**10**9
        if name in ("round", "abs") and not _number(*args):
            raise CalculatorError(f"{name}() needs numbers")
        return FUNCTIONS[name](*args)
    if isinstance(node.func, ast.Attribute) and node.func.attr in STR_METHODS:
        target, method = _eval(node.func.value), node.func.attr
        if not isinstance(target, str) or not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
            raise CalculatorError(f".{method}() works on strings only")
        if method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            if len(target) + (target.count(args[0]) * len(args[1])) > MAX_SEQ_LEN:
                raise CalculatorError("result too long")
        return getattr(target, method)(*args)
    raise CalculatorError("only len, abs, round, min, max and a few string methods can be called")


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):  # not bool/None/bytes/complex
        return _checked(node.value)
    if isinstance(node, ast.BinOp):
        return _checked(_binop(node.op, _eval(node.left), _eval(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        if not _number(value):
            raise CalculatorError("a sign needs a number")
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.Compare):  # chained, short-circuiting like Python: 1 < 2 < 3
        left = _eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            if type(op) not in COMPARE:
                raise CalculatorError(f"comparison {type(op).__name__} is not allowed")
            right = _eval(comparator)
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        return _checked(_call(node))
    if isinstance(node, ast.Subscript):  # "word"[0], "word"[::-1], "a b".split()[1]
        target = _eval(node.value)
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else _eval(p) for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            index = slice(*parts)
            if not all(p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in parts):
                raise CalculatorError("slice bounds must be integers")
        else:
            index = _eval(node.slice)
            if not isinstance(index, int) or isinstance(index, bool):
                raise CalculatorError("index must be an integer")
        if not isinstance(target, (str, list)):
            raise CalculatorError("only strings can be indexed")
        return target[index]
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def format_result(value):
    """GSM8K style: integers (and integral floats) without '.0', other floats to 6 decimals without trailing zeros."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text if text not in ("0", "-0") else f"{value:.3g}"  # tiny values: keep their digits
    return str(value)  # int, bool ("True"), str (its text), list


STRING_LITERAL = re.compile(r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def strip_thousands_commas(expr):
    """'1,000*3' -> '1000*3' (GSM8K writes numbers that way), leaving string literals alone.
    The price: 'max(1,234)' reads as max(1234); write 'max(1, 234)'."""
    parts = STRING_LITERAL.split(expr)  # odd indices are the string literals
    return "".join(p if i % 2 else THOUSANDS_COMMA.sub("", p) for i, p in enumerate(parts))


def use_calculator(expr):
    """Evaluate one calculator expression. Returns the result as text, or a text starting with 'Error:'; never raises."""
    if not isinstance(expr, str):
        return "Error: not an expression"
    expr = expr.strip()
    if not expr:
        return "Error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
    try:
        return format_result(_eval(ast.parse(strip_thousands_commas(expr), mode="eval")))
    except ZeroDivisionError:
        return "Error: division by zero"
    except SyntaxError:
        return "Error: invalid syntax"
    except Exception as e:  # CalculatorError, TypeError, OverflowError, RecursionError, MemoryError, ...
        return f"Error: {e}" if str(e) else f"Error: {type(e).__name__}"


# -------------------------------------------------------------------------------------------------
# 2. programs in a sandboxed process

@dataclass
class ExecutionResult:
    success: bool  # exited with status 0 within the limits
    stdout: str
    stderr: str
    timed_out: bool = False  # wall clock or CPU limit
    memory_exceeded: bool = False  # MemoryError, or killed by SIGKILL before the wall clock ran out
    error: str = ""  # a short summary: "timed out", "memory exceeded", "exit status 1", "killed by signal 11"


NOBODY = 65534
MAX_OUTPUT = 64 * 1024  # bytes kept per stream; the rest is read and dropped so the program never blocks
SETUP_FAILED = 121  # the launcher's exit status when it could not build the sandbox (details on the status pipe)

# Started by execute_code as the caller (root in CI) with `python -I -S -c LAUNCHER config`. It builds the
# sandbox (namespaces and mounts, or only a subreaper in the fallback), then supervises the program: a child
# that drops to the sandbox user and execs RUNNER. Any failure before that exec is written to the status
# pipe (closed on exec), so the parent can tell "the sandbox broke" from "the program failed".
LAUNCHER = r"""
import ctypes, json, os, re, signal, sys
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000

def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")

def build_filesystem(workdir, uid, gid):
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # shows this pid namespace only
    for d in cfg["hide"]:
        mount("tmpfs", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
    with open("program.py", "rb") as f:
        program = f.read()
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=0700,uid={uid},gid={gid}")
    os.chdir(workdir)  # enter the fresh tmpfs (the old cwd is the directory underneath it)
    with open("program.py", "wb") as f:
        f.write(program)
    os.chmod("program.py", 0o644)
    # everything else read-only; keep nosuid/nodev/noexec (a user namespace may not drop them)
    unescape = lambda path: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)  # '\040' is a space
    targets = [unescape(line.split()[4]) for line in open("/proc/self/mountinfo")]
    for t in targets:
        if t != workdir and os.path.exists(t):
            try:
                mount(None, t, None, MS_REMOUNT | MS_BIND | MS_RDONLY | (os.statvfs(t).f_flag & 14))
            except OSError:
                pass  # e.g. a path that is no longer a mount point; checked below
    writable = [t for t in targets if t != workdir and os.path.exists(t) and not os.statvfs(t).f_flag & MS_RDONLY]
    if writable:
        raise OSError(f"could not make {writable} read-only")

def run_program(uid, gid):  # in the program's own process: become the sandbox user, then the runner
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # setuid binaries grant nothing from here on
    os.set_inheritable(status_fd, False)
    python = cfg["python"]
    os.execve(python, [python, "-I", "-c", cfg["runner"], json.dumps(cfg["limits"])], os.environ)

def children():
    me, out = os.getpid(), []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == me:  # field 4, after "(comm)", is the ppid
                    out.append(int(p))
        except (OSError, ValueError, IndexError):
            pass
    return out

def kill_leftovers():
    # whatever the program started ends up our child once its parent dies (we are an init or a
    # subreaper): kill and reap until nothing is left, daemons that called setsid() included
    while True:
        for pid in children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.wait()
        except ChildProcessError:
            return

program = 0

def kill_program_group():  # one call, atomic with respect to fork: a fork bomb cannot outrun it
    try:
        os.killpg(program, signal.SIGKILL)
    except ProcessLookupError:
        pass

def on_term(signum, frame):  # the parent's deadline passed
    if program:
        kill_program_group()
        kill_leftovers()
    os._exit(128 + signal.SIGKILL)

def supervise(uid, gid):
    # Stay as the caller (root: the program can neither signal nor trace us); run the program as a child
    # in its own process group; reap orphans while it runs (zombies count against RLIMIT_NPROC); then
    # kill what it left behind and exit as it did.
    global program
    signal.signal(signal.SIGTERM, on_term)
    program = os.fork()
    if program == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setpgid(0, 0)
        run_program(uid, gid)
    os.close(status_fd)
    while True:
        pid = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT).si_pid  # peek: leave the program unreaped
        if pid == program:
            break
        os.waitpid(pid, 0)
    kill_program_group()  # while the program is an unreaped zombie its group id cannot be reused
    code = os.waitstatus_to_exitcode(os.waitpid(program, 0)[1])
    kill_leftovers()
    os._exit(128 - code if code < 0 else code)  # a signal death as 128+N, as shells report it

try:
    uid, gid = (cfg["user"], cfg["user"]) if os.getuid() == 0 else (os.getuid(), os.getgid())
    if cfg["isolate"]:
        me, my_gid = os.getuid(), os.getgid()
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET | (CLONE_NEWUSER if me else 0)), "unshare")
        if me:  # unprivileged: map ourselves to ourselves; the namespace's capabilities end at the exec
            for name, text in (("setgroups", "deny"), ("uid_map", f"{me} {me} 1"), ("gid_map", f"{my_gid} {my_gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        init = os.fork()
        if init:  # still in the host's pid namespace: wait, exit as the namespace's init did
            # at the deadline: kill the init; its exit kills and reaps the whole namespace before waitpid returns
            signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(init, signal.SIGKILL))
            code = os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])
            os._exit(128 - code if code < 0 else code)
        # pid 1 of the new namespace: when it exits, the kernel kills everything left in it
        build_filesystem(os.path.realpath(os.getcwd()), uid, gid)
    else:
        check(libc.prctl(36, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")  # orphans come to us, not to the host's init
    supervise(uid, gid)
except BaseException as e:
    os.write(status_fd, f"{type(e).__name__}: {e}".encode()[:4000])
    os._exit(121)  # SETUP_FAILED
"""

# The first lines of the sandboxed interpreter (as the sandbox user): limits, then the program as __main__.
RUNNER = r"""
import json, resource, sys
cfg = json.loads(sys.argv[1])
def lower(limit, soft, hard=None):  # never above an existing hard limit (raising it would fail)
    old = resource.getrlimit(limit)[1]
    cap = (lambda v: v) if old == resource.RLIM_INFINITY else (lambda v: min(v, old))
    resource.setrlimit(limit, (cap(soft), cap(soft if hard is None else hard)))
lower(resource.RLIMIT_AS, cfg["memory"])
lower(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)  # SIGXCPU first, SIGKILL a second later
lower(resource.RLIMIT_FSIZE, cfg["fsize"])
lower(resource.RLIMIT_CORE, 0)
lower(resource.RLIMIT_NPROC, cfg["nproc"])  # only after the exec: execve fails if the user is already over it
if cfg["socket_guard"]:  # no network namespace: best effort only (ctypes gets around it)
    import _socket, socket
    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    socket.socket = _socket.socket = socket.socketpair = socket.fromfd = socket.create_connection = refuse
sys.argv = ["program.py"]
with open("program.py", encoding="utf-8") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

_isolation = None  # None: not probed yet; then True/False for the rest of the process
_isolation_lock = threading.Lock()


def _hidden_dirs():
    """Folders the program must not see: home(s), /root, /home and the checkpoints (outer folders first)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    out = []
    for d in sorted({os.path.realpath(p) for p in (os.path.expanduser("~"), "/root", "/home", base)}):
        if os.path.isdir(d) and d != "/" and not any(d.startswith(h + os.sep) for h in out):
            out.append(d)
    return out


def _usable_by_sandbox(path, hidden):
    """The sandbox user can reach `path`: outside the hidden folders and (as root, for nobody) world-executable."""
    if any(path == h or path.startswith(h + os.sep) for h in hidden):
        return False
    if os.geteuid() != 0:
        return os.access(path, os.X_OK)
    try:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
        return True
    except OSError:
        return False


def _interpreter(hidden):
    """A Python the sandbox user can run: ours, unless it lives somewhere hidden or private (pyenv in /root)."""
    candidates = [sys.executable, getattr(sys, "_base_executable", None), "/usr/local/bin/python3", "/usr/bin/python3"]
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            real = os.path.realpath(candidate)
            if _usable_by_sandbox(real, hidden):
                return real
    raise RuntimeError(f"no Python interpreter the sandbox user can run (tried {candidates}, hidden {hidden}); "
                       "install one system-wide, e.g. apt-get install python3")


def _namespaces_available():
    """Probe once (thread-safe) whether the isolated sandbox can be built here; warn once if not."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            try:
                _isolation = _run("print('ok')", isolate=True, timeout=30).stdout == "ok\n"
                reason = "the probe program did not run"
            except (RuntimeError, OSError) as e:
                _isolation, reason = False, str(e)
            if not _isolation:
                print(f"nanochat.execution: namespaces unavailable ({reason}); sandboxing with rlimits"
                      f"{' and the nobody user' if os.geteuid() == 0 else ''} only", file=sys.stderr)
        return _isolation


def execute_code(code, timeout=5.0, memory_mb=512, max_procs=64, disk_mb=64):
    """
    Run `code` as a program in the sandbox (see the header for what is guaranteed). Returns an
    ExecutionResult; raises RuntimeError only when the sandbox itself cannot be built here.
    """
    return _run(code, isolate=_namespaces_available(), timeout=timeout, memory_mb=memory_mb,
                max_procs=max_procs, disk_mb=disk_mb)


def _run(code, isolate, timeout=5.0, memory_mb=512, max_procs=64, disk_mb=64):
    root = os.geteuid() == 0
    hidden = _hidden_dirs() if isolate else []
    python = _interpreter(hidden)
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    status_r, status_w = os.pipe()
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        if root:
            for path in (workdir, os.path.join(workdir, "program.py")):
                os.chown(path, NOBODY, NOBODY)
        config = {"isolate": isolate, "user": NOBODY, "python": python, "runner": RUNNER, "status_fd": status_w,
                  "hide": [d for d in hidden if not workdir.startswith(d + os.sep)], "disk_mb": disk_mb,
                  "limits": {"memory": memory_mb * 2**20, "cpu": max(1, math.ceil(timeout)), "nproc": max_procs,
                             "fsize": disk_mb * 2**20, "socket_guard": not isolate}}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        # no preexec_fn (unsafe with threads): the launcher process does the privileged setup itself
        try:
            proc = subprocess.Popen([python, "-I", "-S", "-c", LAUNCHER, json.dumps(config)], cwd=workdir, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(status_w,), start_new_session=True)
        except OSError as e:  # e.g. EAGAIN from fork under load: this program's result, not a broken sandbox
            return ExecutionResult(success=False, stdout="", stderr="", error=f"could not start: {e}")
        os.close(status_w)
        status_w = None
        stdout, stderr, timed_out = _collect(proc, timeout)
        os.set_blocking(status_r, False)
        try:
            setup_error = os.read(status_r, 4096).decode(errors="replace")
        except BlockingIOError:
            setup_error = ""
    finally:
        for fd in (status_r, status_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    if setup_error and proc.returncode == SETUP_FAILED:
        raise RuntimeError(f"could not build the sandbox: {setup_error}")
    # the supervisor reports a signal death as 128+N (as shells do); -N: the launcher itself was killed
    rc = proc.returncode
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    timed_out = timed_out or sig == signal.SIGXCPU
    memory_exceeded = rc != 0 and not timed_out and ("MemoryError" in stderr or sig == signal.SIGKILL)
    error = ("timed out" if timed_out else "memory exceeded" if memory_exceeded else
             f"killed by signal {sig}" if sig else f"exit status {rc}" if rc else "")
    return ExecutionResult(success=rc == 0 and not timed_out, stdout=stdout, stderr=stderr,
                           timed_out=timed_out, memory_exceeded=memory_exceeded, error=error)


def _exited(proc):
    """Whether the launcher has exited, without reaping it (WNOWAIT): an unreaped leader keeps its process
    group id from being reused, so the killpg below cannot hit a stranger."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _collect(proc, timeout):
    """Read both pipes until EOF, the program's exit or the deadline, keeping MAX_OUTPUT bytes of each;
    then kill the process group (leftovers too, not only on timeout). Returns (stdout, stderr, timed_out)."""
    deadline = time.monotonic() + timeout
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    exited = False
    with selectors.DefaultSelector() as selector:
        for fd in kept:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and time.monotonic() < deadline:
            exited = exited or _exited(proc)
            # after the exit only drain what is buffered: a leftover child may hold the pipes open forever
            events = selector.select(0 if exited else min(0.05, max(0.0, deadline - time.monotonic())))
            if exited and not events:
                break
            for key, _ in events:
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                buf = kept[key.fd]
                buf += data[:MAX_OUTPUT - len(buf)]
    while not exited and time.monotonic() < deadline:  # pipes closed, process not gone yet
        exited = _exited(proc) or time.sleep(0.005)
    timed_out = not (exited or _exited(proc))
    if timed_out:  # let the supervisor kill the program's whole tree (setsid() daemons too), briefly
        os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal: it would reap the leader
        grace = time.monotonic() + 2.0
        while not _exited(proc) and time.monotonic() < grace:
            time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    out, err = (bytes(kept[fd]).decode("utf-8", errors="replace") for fd in kept)
    return out, err, timed_out


def execute_many(codes, workers=2, **kwargs):
    """Run several programs in parallel sandboxes (threads, each waiting on its own process); results in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: execute_code(code, **kwargs), codes))
