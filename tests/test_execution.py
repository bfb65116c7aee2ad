"""
The calculator tool (allow-listed syntax tree, no eval, bounded, thread-safe) and the program sandbox.
Sandbox tests run twice: with namespaces (as CI runs: root with CAP_SYS_ADMIN) and in the forced
not-isolated mode (opted in: rlimits + a user id of its own + socket guard), each with the guarantees it documents.
"""

import ast
import builtins
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from nanochat import sandbox
from nanochat.calculator import use_calculator
from nanochat.sandbox import MAX_OUTPUT, execute_code, execute_many

ROOT = os.geteuid() == 0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_root = pytest.mark.skipif(not ROOT, reason="the sandbox changes user only when run as root, as CI runs")


# -------------------------------------------------------------------------------------------------
# calculator

@pytest.mark.parametrize("expr, expected", [
    ("48/2", "24"), ("7/2", "3.5"), ("2**10", "1024"), ("10/3", "3.333333"), ("0.1+0.2", "0.3"), ("1.5*4", "6"),
    ("2+3*4", "14"), ("(2+3)*4", "20"), ("2**3**2", "512"), ("-2**2", "-4"), ("-5+2", "-3"), ("17 % 5", "2"),
    ("17 // 5", "3"), ("-7 // 2", "-4"), ("2**-2", "0.25"), ("1e-9", "1e-09"),
    ("1,000*3", "3000"), ("12,500 - 2,500", "10000"), ("1,000,000/4", "250000"), ("$5", "Error: invalid syntax"),
    ('"1,234".count(",")', "1"), ("max(1, 234)", "234"),  # commas inside strings and after a space are kept
    ("3 > 2", "True"), ("1 == 2", "False"), ("1 < 2 < 3", "True"), ("3 >= 3.0", "True"),
    ('"strawberry".count("r")', "3"), ('len("hello")', "5"), ('"abc".upper()', "ABC"), ('"Hi"[::-1]', "iH"),
    ('"a b c".split()[2]', "c"), ("max(3, 9, 4)", "9"), ("abs(-3.5)", "3.5"), ("round(2.567, 2)", "2.57"),
    ("  6*7  ", "42"),
])
def test_calculator_values(expr, expected):
    assert use_calculator(expr) == expected


SENTINEL = f"/tmp/nanochat_calc_pwned_{uuid.uuid4().hex}"


@pytest.mark.parametrize("expr", [
    f"__import__('os').system('touch {SENTINEL}')",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "(lambda: 1)()",
    "[x for x in range(10)]",
    "exec('1')",
    "eval('1+1')",
    "'abc'.__class__",
    "'abc'.format(1)",
    "x + 1",
    "True + 1",
    "f'{1}'",
    "len(*'ab')",
    "9**9**9",
    "'a' * 10**10",
    "('a' * 10000).replace('a', 'aa')",
    "'a b'.split() * 10**9",
    "2**100000",
    "round(1, -10**9)",
    "(-8)**0.5",
    "1e308 * 10",
    "'%s' % 1",
    "1/0",
    "1 +",
    "1" * 300,
    "",
])
def test_calculator_refuses_and_runs_nothing(expr):
    # in a child process, so that a missing bound fails the test (after 30 s) instead of hanging it
    code = "import sys, time\nfrom nanochat.calculator import use_calculator\n" \
           "t0 = time.time()\nout = use_calculator(sys.argv[1])\nprint(round(time.time() - t0, 3), out)"
    child = subprocess.run([sys.executable, "-c", code, expr], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    seconds, out = child.stdout.rstrip("\n").split(" ", 1)
    assert out.startswith("Error:"), (expr, out, child.stderr)
    assert float(seconds) < 2.0  # bounded up front, not by a timer (generous: the attacks take minutes)
    assert not os.path.exists(SENTINEL)


def test_calculator_never_compiles_code_or_uses_signals(monkeypatch):
    # eval/exec/compile-to-bytecode and signal-based timeouts are forbidden: make them explode
    real_compile = builtins.compile

    def ast_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        assert flags & ast.PyCF_ONLY_AST, "the calculator compiled source to a code object"
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("the calculator used eval/exec or a signal")

    monkeypatch.setattr(builtins, "compile", ast_only_compile)
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, forbidden)
    for name in ("signal", "alarm", "setitimer"):
        monkeypatch.setattr(signal, name, forbidden)
    assert use_calculator("48/2") == "24" and use_calculator("'strawberry'.count('r')") == "3"
    assert use_calculator("eval('1')").startswith("Error:")


def test_calculator_from_many_threads():
    barrier = threading.Barrier(8)
    results = [None] * 8

    def work(i):
        barrier.wait()  # all 8 evaluate at the same moment
        results[i] = [use_calculator(f"{i}*{i}+{j}") for j in range(200)] + [use_calculator("9**9**9")]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(8):
        assert results[i][:200] == [str(i * i + j) for j in range(200)]
        assert results[i][200].startswith("Error:")


# -------------------------------------------------------------------------------------------------
# sandbox

@pytest.fixture(params=["namespaces", "fallback"])
def mode(request, monkeypatch):
    if request.param == "namespaces":
        if not sandbox.isolation_available()[0]:
            pytest.skip("namespaces are unavailable here (neither CAP_SYS_ADMIN nor unprivileged user namespaces)")
    else:  # the weak mode, which runs only when asked for
        monkeypatch.setattr(sandbox, "isolation_available", lambda: (False, "the test asks for the not-isolated mode"))
        monkeypatch.setenv(sandbox.OPT_IN_ENV, sandbox.OPT_IN_VALUE)
    return request.param


@pytest.fixture
def open_dir():
    """A folder in /tmp that everyone may enter (unlike pytest's 0700 tmp_path), so that only the
    permissions of the files inside protect them."""
    path = tempfile.mkdtemp(prefix="nanochat-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sandbox_processes(marker):
    """Live processes of a sandbox, recognised by an unusual memory limit in their command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_success_and_failure(mode):
    ok = execute_code("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert ok.success and ok.stdout == "hello 42\n" and ok.stderr == "warn\n" and ok.error == ""
    assert not ok.timed_out and not ok.memory_exceeded
    bad = execute_code("def f():\n    raise ValueError('boom')\nprint('before')\nf()")
    assert not bad.success and bad.stdout == "before\n" and not bad.timed_out and not bad.memory_exceeded
    assert "Traceback" in bad.stderr and "ValueError: boom" in bad.stderr and 'program.py", line 4' in bad.stderr
    assert not execute_code("import sys\nsys.exit(3)").success


def test_infinite_loop_times_out(mode):
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=1.5)
    assert r.timed_out and not r.success and not r.memory_exceeded and r.error == "timed out"
    assert time.time() - t0 < 1.5 + 10


def test_cpu_limit_counts_as_timeout_not_memory(mode):
    # RLIMIT_CPU counts every thread, so it can fire before the wall clock; it must read as a timeout.
    # The program lowers its own soft limit to 1 s so that this happens however busy the machine is.
    code = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, resource.getrlimit(resource.RLIMIT_CPU)[1]))\n" \
           "while True:\n    pass"
    t0 = time.time()
    r = execute_code(code, timeout=30)
    assert r.timed_out and not r.memory_exceeded and not r.success
    assert time.time() - t0 < 25  # it was the CPU limit, not the wall clock


def test_memory_limit(mode):
    r = execute_code("b = bytearray(4 * 1024**3)\nprint('allocated')")
    assert not r.success and r.memory_exceeded and not r.timed_out and "allocated" not in r.stdout
    assert execute_code("b = bytearray(64 * 1024**2)\nprint(len(b))").stdout == f"{64 * 1024**2}\n"


def test_output_is_bounded(mode):
    r = execute_code("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", timeout=1.5)
    assert r.timed_out and 0 < len(r.stdout) <= MAX_OUTPUT


@needs_root
def test_runs_unprivileged(mode):
    code = "import os\nprint(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())\n" \
           "print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0].split()[1])\n" \
           "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('setuid refused')"
    r = execute_code(code)
    uid, euid, gid, groups = r.stdout.splitlines()[0].split(" ", 3)
    assert int(uid) == int(euid) == int(gid) >= sandbox.UID_BASE and groups == "[]", r  # a user id of its own
    assert r.stdout.splitlines()[1:] == ["1", "setuid refused"], r
    assert execute_code(code).stdout.split()[0] != uid  # the next sandbox gets another one


@needs_root
@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()",
    # catches the errors and detaches: escapes process-group kills; the supervisor must still find it
    "import os\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass",
])
def test_fork_bomb_is_contained(mode, bomb):
    memory_mb = 333  # marks this run's processes: their command lines carry 333 * 2**20
    marker = str(memory_mb * 2**20).encode()
    t0 = time.time()
    r = execute_code(bomb, timeout=2, memory_mb=memory_mb)
    assert not r.success and time.time() - t0 < 2 + 15
    assert r.timed_out or "Resource temporarily unavailable" in r.stderr  # it hit RLIMIT_NPROC
    assert sandbox_processes(marker) == []  # nothing left behind, immediately
    assert execute_code("print('still fine')").stdout == "still fine\n"


@needs_root
def test_daemon_is_killed_when_the_program_ends(mode):
    memory_mb = 334
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(120)\nprint('parent done')"
    t0 = time.time()
    r = execute_code(code, timeout=20, memory_mb=memory_mb)
    assert r.success and r.stdout == "parent done\n" and not r.timed_out
    assert time.time() - t0 < 15  # the daemon holding the pipes does not stretch the call to the timeout
    assert sandbox_processes(str(memory_mb * 2**20).encode()) == []


@needs_root
def test_cannot_write_outside_its_directory(mode, open_dir, tmp_path):
    victims = [os.path.join(open_dir, "victim.txt"), str(tmp_path / "victim.txt")]
    for path in victims:
        with open(path, "w") as f:
            f.write("original")
        os.chmod(path, 0o644)  # root-owned, world-readable
    code = "import os\nfor p in %r:\n    try:\n        open(p, 'w').write('pwned')\n        print('wrote', p)\n" \
           "    except OSError as e:\n        print('refused', type(e).__name__)\n" % victims
    r = execute_code(code)
    assert "wrote" not in r.stdout and r.stdout.count("refused") == 2, r
    for path in victims:
        assert open(path).read() == "original"
    r = execute_code("open('/etc/nanochat_pwned', 'w').write('x')")
    assert not r.success and not os.path.exists("/etc/nanochat_pwned")
    # its own throwaway directory, and tempfile (TMPDIR points there), work
    r = execute_code("import tempfile\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n"
                     "with tempfile.NamedTemporaryFile() as f:\n    print(f.name.startswith(tempfile.gettempdir()))")
    assert r.success and r.stdout == "ok\nTrue\n", r


@needs_root
def test_namespaces_make_everything_else_read_only(open_dir, monkeypatch):
    if not sandbox.isolation_available()[0]:
        pytest.skip("namespaces are unavailable here")
    shared = os.path.join(open_dir, "world_writable.txt")
    with open(shared, "w") as f:
        f.write("original")
    os.chmod(shared, 0o666)  # permissions would allow it: only the read-only mount stops the write
    new_file = f"/tmp/nanochat_sandbox_new_{uuid.uuid4().hex}"
    code = f"for p in ({shared!r}, {new_file!r}, '/dev/shm/x', '/var/tmp/x'):\n    try:\n" \
           f"        open(p, 'w').write('pwned')\n        print('wrote', p)\n    except OSError as e:\n" \
           f"        print(e.errno)"
    r = execute_code(code)
    # the host's /tmp file is not even there (an empty /tmp); the empty scratch folders are read-only
    assert "wrote" not in r.stdout and r.stdout.split() == ["2", "30", "30", "30"], r  # ENOENT, EROFS x 3
    assert open(shared).read() == "original" and not os.path.exists(new_file)


def test_no_network(mode):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        r = execute_code(code)
        assert not r.success and "connected" not in r.stdout and r.stderr
        server.settimeout(1.0)  # a connection that had been made would wait in the backlog
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@needs_root
def test_no_parent_secrets_home_or_checkpoints(mode, open_dir, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", secret)
    base = os.path.join(open_dir, "nanochat_base")  # a checkpoint folder everyone may enter...
    os.makedirs(os.path.join(base, "base_checkpoints"))
    private = os.path.join(base, "base_checkpoints", "model.pt")  # ...holding a private file
    with open(private, "w") as f:
        f.write(secret)
    os.chmod(private, 0o600)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    probes = {
        "environ": "import os\nprint(dict(os.environ))",
        "parent environ": "import os\nprint(open('/proc/%d/environ' % os.getppid(), 'rb').read())",
        "test process environ": f"print(open('/proc/{os.getpid()}/environ', 'rb').read())",
        "every environ": "import os\nfor p in os.listdir('/proc'):\n    try:\n"
                         "        print(open('/proc/%s/environ' % p, 'rb').read())\n    except OSError:\n        pass",
        "checkpoint": f"print(open({private!r}).read())",
        "home": "import os\nprint(os.listdir('/root'))\nprint(open('/root/.bash_history').read())",
    }
    for name, code in probes.items():
        r = execute_code(code)
        assert secret not in r.stdout and secret not in r.stderr, name
    r = execute_code("import os\nprint(sorted(os.environ))")
    assert r.success and set(ast.literal_eval(r.stdout)) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"}, r.stdout
    if mode == "namespaces":  # the home and checkpoint folders are not even visible
        r = execute_code(f"import os\nprint(os.listdir('/root'), os.path.isdir({base!r}) and os.listdir({base!r}))")
        assert r.stdout in ("[] []\n", "[] False\n"), r  # empty folders in their place (or, in /tmp, not there)
    assert open(private).read() == secret  # the host's files are unharmed


def test_throwaway_directory_is_removed(mode):
    r = execute_code("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = r.stdout.strip()
    assert r.success and os.path.basename(workdir).startswith("nanochat-sandbox-")
    assert not os.path.exists(workdir)
    r = execute_code("import os\nprint(os.listdir('.'))")
    assert r.stdout == "['program.py']\n"  # a fresh directory each time: nothing from the last run


def test_parallel_runs_do_not_mix(mode):
    codes = [f"import time\nfor k in range(5):\n    print({i}, k, flush=True)\n    time.sleep(0.02)" for i in range(8)]
    results = execute_many(codes, workers=8)
    assert all(r.success for r in results)
    assert [r.stdout for r in results] == ["".join(f"{i} {k}\n" for k in range(5)) for i in range(8)]


def test_namespaces_are_used_where_the_kernel_allows_them():
    # a broken isolated path would otherwise only show up as skipped tests and a warning
    flags = 0x20000 | 0x20000000 | 0x40000000 | (0 if ROOT else 0x10000000)  # mount, pid, net (+ user)
    code = f"import ctypes, sys\nsys.exit(ctypes.CDLL(None, use_errno=True).unshare({flags}))"
    if subprocess.run([sys.executable, "-c", code], timeout=30).returncode != 0:
        pytest.skip("this kernel/container refuses the namespaces (no CAP_SYS_ADMIN or user namespaces)")
    assert sandbox.isolation_available() == (True, "")


def test_a_broken_sandbox_raises_instead_of_failing_the_program(monkeypatch):
    if not sandbox.isolation_available()[0]:
        pytest.skip("namespaces are unavailable here")
    # the program's own exit status 121 (the launcher's setup-failure code) is just a failed program
    r = execute_code("import os\nos._exit(121)")
    assert not r.success and r.error == "exit status 121"
    # a sandbox that cannot be built (here: a folder to hide that does not exist) is an error, loudly
    monkeypatch.setattr(sandbox, "_hidden_dirs", lambda: ["/nanochat/does/not/exist"])
    with pytest.raises(RuntimeError, match="could not build the sandbox"):
        execute_code("print('hello')")


def test_completed_only_when_the_code_ran_to_its_end(mode):
    """`completed` is what HumanEval's pass needs: exit status 0 alone is also what sys.exit(0) or os._exit(0)
    before the tests give."""
    cases = {"print('done')": True, "import sys\nsys.exit(0)": False, "import os\nos._exit(0)": False,
             "raise ValueError('boom')": False, "import sys\nsys.stdout.write('x' * 200000)": True}
    for code, completed in cases.items():
        r = execute_code(code)
        assert r.completed == completed, (code, r)
