"""
Running model-written Python safely. Two tools:

1. `use_calculator(expr)` — the inference-time tool behind <|python_start|>EXPR<|python_end|>. It walks
   the expression's syntax tree with an allow-list (numbers, strings, arithmetic, comparisons, a few
   string methods such as .count, len/abs/round/min/max); it never calls eval/exec, and every
   operation is bounded before it runs (huge powers, huge string repeats are refused), so it needs
   no timer and works from any thread. Results read the way GSM8K writes them: 48/2 -> "24".
   Errors come back as text starting with "Error:", which the engine injects like any result.

2. `execute_code(program)` — a whole program (HumanEval) in a separate process:
   - wall-clock timeout (the whole process tree is killed), CPU-seconds, address-space, file-size
     and process-count limits;
   - a throwaway working directory (removed afterwards) and a scrubbed environment;
   - as root (as in CI): new network namespace (no network at all), new PID namespace (the child
     sees only its own processes; killing it kills them all), new mount namespace with the home
     directory, /home and $NANOCHAT_BASE_DIR (checkpoints) hidden under empty tmpfs mounts, and the
     program runs as the unprivileged user `nobody` — root would ignore RLIMIT_NPROC, and `nobody`
     cannot read root-owned files such as the parent's /proc/<pid>/environ;
   - not root: the same limits, but namespaces only if unprivileged user namespaces are allowed;
     without them the program runs as the current user and can read what that user can read.
"""

import ast
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# -------------------------------------------------------------------------------------------------
# 1. the calculator

MAX_EXPR_CHARS = 256
MAX_INT_BITS = 4096  # about 1,200 decimal digits
MAX_STR_CHARS = 10_000
STR_METHODS = {"count", "upper", "lower", "strip", "find", "startswith", "endswith", "replace", "split"}
FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max}


class CalculatorError(Exception):
    pass


def _check_size(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError("number too large")
    if isinstance(value, float) and math.isinf(value):
        raise CalculatorError("number too large")
    if isinstance(value, (str, list)) and len(value) > MAX_STR_CHARS:
        raise CalculatorError("result too long")
    return value


def _binop(op, a, b):
    number = (int, float)
    if isinstance(op, ast.Pow):
        if not (isinstance(a, number) and isinstance(b, number)):
            raise CalculatorError("** needs numbers")
        if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
            if b * math.log2(abs(a)) > MAX_INT_BITS:  # bound the result before computing it
                raise CalculatorError("number too large")
        if abs(b) > 10_000:
            raise CalculatorError("exponent too large")
        return a ** b
    if isinstance(op, ast.Mult) and (isinstance(a, str) or isinstance(b, str)):
        text, times = (a, b) if isinstance(a, str) else (b, a)
        if not isinstance(times, int) or isinstance(times, bool) or len(text) * max(times, 0) > MAX_STR_CHARS:
            raise CalculatorError("string repeat too long")
        return text * times
    if isinstance(op, ast.Add) and isinstance(a, str) != isinstance(b, str):
        raise CalculatorError("cannot add a string and a number")
    ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b,
           ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b}
    if type(op) not in ops:
        raise CalculatorError(f"operator {type(op).__name__} is not allowed")
    if isinstance(op, (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod)) and not (isinstance(a, number) and isinstance(b, number)):
        raise CalculatorError("arithmetic needs numbers")
    return ops[type(op)]()


COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
           ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
        return _check_size(node.value)
    if isinstance(node, ast.BinOp):
        return _check_size(_binop(node.op, _eval(node.left), _eval(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        if not isinstance(value, (int, float)):
            raise CalculatorError("unary sign needs a number")
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.Compare):
        left = _eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            if type(op) not in COMPARE:
                raise CalculatorError(f"comparison {type(op).__name__} is not allowed")
            right = _eval(comparator)
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call) and not node.keywords:
        args = [_eval(a) for a in node.args]
        if isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            if node.func.id in ("min", "max") and not args:
                raise CalculatorError(f"{node.func.id}() needs arguments")
            return _check_size(FUNCTIONS[node.func.id](*args))
        if isinstance(node.func, ast.Attribute) and node.func.attr in STR_METHODS:
            target = _eval(node.func.value)
            if not isinstance(target, str) or not all(isinstance(a, (str, int)) for a in args):
                raise CalculatorError(f".{node.func.attr}() works on strings only")
            return _check_size(getattr(target, node.func.attr)(*args))
        raise CalculatorError("only len, abs, round, min, max and a few string methods can be called")
    if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
        target, index = _eval(node.value), _eval(node.slice)
        if isinstance(target, str) and isinstance(index, int):
            return target[index]
    raise CalculatorError(f"{type(node).__name__} is not allowed")


def format_result(value):
    """GSM8K style: integers without '.0', other floats rounded to 6 decimals without trailing zeros."""
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return text if text not in ("0", "-0") else f"{value:.3g}"
    return str(value)


def use_calculator(expr):
    """Evaluate one calculator expression; returns the result as text, or 'Error: ...'."""
    import re
    if not isinstance(expr, str):
        return "Error: not an expression"
    expr = expr.strip()
    if not expr:
        return "Error: empty expression"
    if len(expr) > MAX_EXPR_CHARS:
        return f"Error: expression longer than {MAX_EXPR_CHARS} characters"
    expr = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr)  # 1,000 -> 1000 (GSM8K writes thousands that way)
    try:
        tree = ast.parse(expr, mode="eval")
        return format_result(_eval(tree))
    except ZeroDivisionError:
        return "Error: division by zero"
    except (CalculatorError, SyntaxError, TypeError, ValueError, OverflowError, IndexError, RecursionError) as e:
        return f"Error: {e}" if str(e) else f"Error: {type(e).__name__}"


# -------------------------------------------------------------------------------------------------
# 2. programs in a sandboxed process

@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False
    error: str = ""


NOBODY = 65534
MAX_OUTPUT = 64 * 1024

# Runs inside the sandbox before the program: limits first, then the program as __main__.
PRELUDE = """
import resource, sys
mem, cpu, nproc, fsize = map(int, sys.argv[1:5])
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
sys.argv = ["program.py"]
with open("program.py") as f:
    source = f.read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

_namespaces_ok = None
_namespaces_lock = threading.Lock()


def _can_isolate():
    """Whether `unshare` can give us network/pid/mount namespaces here (checked once)."""
    global _namespaces_ok
    with _namespaces_lock:
        if _namespaces_ok is None:
            cmd = ["unshare", "--net", "--pid", "--fork", "--mount", "--mount-proc", "true"]
            if os.geteuid() != 0:
                cmd.insert(1, "--map-root-user")
            try:
                _namespaces_ok = subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                _namespaces_ok = False
        return _namespaces_ok


def _hidden_dirs(workdir):
    """Folders the program must not read: home, /home, the checkpoints; never the sandbox's own."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    candidates = sorted({os.path.realpath(d) for d in (os.path.expanduser("~"), "/home", base)})
    out = []
    for d in candidates:
        inside_hidden = any(d.startswith(h + os.sep) for h in out)  # already covered by a parent's tmpfs
        if os.path.isdir(d) and d != "/" and not inside_hidden and not workdir.startswith(d + os.sep):
            out.append(d)
    return out


def _interpreter(hidden):
    """A Python the sandbox can still see: ours unless it lives in a hidden folder (e.g. pyenv in ~)."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate:
            real = os.path.realpath(candidate)
            if not any(real.startswith(h + os.sep) for h in hidden):
                return real
    raise OSError(f"no Python interpreter outside the hidden folders {hidden}")


def execute_code(code, timeout=5.0, memory_mb=512, max_procs=32, max_file_mb=16):
    """Run `code` as a program in the sandbox; never raises for anything the program does."""
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        root = os.geteuid() == 0
        if root:
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(os.path.join(workdir, "program.py"), NOBODY, NOBODY)
        os.chmod(workdir, 0o700)
        limits = [str(memory_mb * 2**20), str(max(1, math.ceil(timeout))), str(max_procs), str(max_file_mb * 2**20)]
        isolate = _can_isolate()
        hidden = _hidden_dirs(workdir) if isolate else []
        python = [_interpreter(hidden), "-I", "-B", "-c", PRELUDE, *limits]
        if isolate:
            hide = " && ".join(f'mount -t tmpfs -o size=1m,mode=0755 tmpfs "{d}"' for d in hidden)
            drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"] if root else []
            inner = (hide + " && " if hide else "") + 'exec "$@"'
            cmd = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
            if not root:
                cmd.append("--map-root-user")
            cmd += ["--", "/bin/sh", "-c", inner, "sandbox", *drop, *python]
        else:
            cmd = python
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        stdout, stderr, timed_out = _communicate_bounded(proc, timeout)
        stdout = stdout.decode("utf-8", errors="replace")
        stderr = stderr.decode("utf-8", errors="replace")
        memory_exceeded = "MemoryError" in stderr or (proc.returncode is not None and -proc.returncode == 9 and not timed_out)
        return ExecutionResult(success=proc.returncode == 0 and not timed_out, stdout=stdout, stderr=stderr,
                               timed_out=timed_out, memory_exceeded=memory_exceeded,
                               error="timed out" if timed_out else "")
    except OSError as e:  # the sandbox itself could not start
        return ExecutionResult(success=False, stdout="", stderr="", error=f"sandbox failed: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_tree(proc):
    try:
        os.killpg(proc.pid, 9)  # the session: unshare, and (via --kill-child / the pid namespace) everything below
    except ProcessLookupError:
        pass


def _communicate_bounded(proc, timeout):
    """Waits up to `timeout` s (then kills the tree), keeping at most MAX_OUTPUT bytes of each stream."""
    chunks = {"out": bytearray(), "err": bytearray()}

    def pump(stream, key):
        while True:
            data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not data:
                break
            if len(chunks[key]) < MAX_OUTPUT:
                chunks[key] += data[:MAX_OUTPUT - len(chunks[key])]

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_tree(proc)
        proc.wait(timeout=10)
    for t in threads:
        t.join(timeout=5)
    return bytes(chunks["out"]), bytes(chunks["err"]), timed_out


def execute_many(codes, workers=2, **kwargs):
    """Run several programs in parallel sandboxes; results in input order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: execute_code(c, **kwargs), codes))
