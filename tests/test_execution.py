"""The calculator tool (allow-listed syntax tree, no eval) and the program sandbox (run as root, as CI does)."""

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from nanochat.execution import execute_code, execute_many, use_calculator

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the full sandbox (namespaces, dropping to nobody) is tested as root, as CI runs")


# -------------------------------------------------------------------------------------------------
# calculator

@pytest.mark.parametrize("expr, expected", [
    ("48/2", "24"), ("7/2", "3.5"), ("2**10", "1024"), ("10/3", "3.333333"), ("0.1+0.2", "0.3"),
    ("2+3*4", "14"), ("(2+3)*4", "20"), ("-5+2", "-3"), ("17 % 5", "2"), ("17 // 5", "3"),
    ("1,000*3", "3000"), ("12,500 - 2,500", "10000"), ("3 > 2", "True"), ("1 == 2", "False"),
    ('"strawberry".count("r")', "3"), ('len("hello")', "5"), ('"abc".upper()', "ABC"), ("max(3, 9, 4)", "9"),
    ("round(2.567, 2)", "2.57"), ("1.5*4", "6"),
])
def test_calculator_values(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch /tmp/nanochat_pwned')",
    "().__class__.__bases__[0].__subclasses__()",
    "open('/etc/passwd').read()",
    "(lambda: 1)()",
    "[x for x in range(10)]",
    "exec('1')",
    "eval('1+1')",
    "'abc'.__class__",
    "x + 1",
    "9**9**9",
    "'a' * 10**10",
    "2**100000",
    "1/0",
    "1 +",
    "1" * 300,
    "",
])
def test_calculator_refuses_and_runs_nothing(expr):
    if os.path.exists("/tmp/nanochat_pwned"):
        os.remove("/tmp/nanochat_pwned")
    t0 = time.time()
    out = use_calculator(expr)
    assert out.startswith("Error:"), (expr, out)
    assert time.time() - t0 < 1.0  # bounded up front, not by a timer
    assert not os.path.exists("/tmp/nanochat_pwned")


def test_calculator_from_many_threads():
    results = [None] * 16

    def work(i):
        results[i] = use_calculator(f"{i}*{i}+1")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [str(i * i + 1) for i in range(16)]


# -------------------------------------------------------------------------------------------------
# sandbox

def test_success_and_failure():
    ok = execute_code("print('hello', 6 * 7)")
    assert ok.success and ok.stdout == "hello 42\n" and not ok.timed_out
    bad = execute_code("def f():\n    raise ValueError('boom')\nf()")
    assert not bad.success and "ValueError: boom" in bad.stderr and not bad.timed_out


def test_infinite_loop_times_out():
    t0 = time.time()
    r = execute_code("while True:\n    pass", timeout=1.5)
    assert r.timed_out and not r.success
    assert time.time() - t0 < 15


def test_memory_limit():
    r = execute_code("b = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not r.success and r.memory_exceeded and "allocated" not in r.stdout


def test_output_is_bounded():
    r = execute_code("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", timeout=1.5)
    assert r.timed_out and len(r.stdout) <= 64 * 1024


def count_nobody_processes():
    out = subprocess.run(["ps", "-eo", "user="], capture_output=True, text=True).stdout.split()
    return sum(1 for u in out if u == "nobody")


@needs_root
def test_fork_bomb_is_contained():
    before = count_nobody_processes()
    r = execute_code("import os\nwhile True:\n    os.fork()", timeout=3)
    assert not r.success
    time.sleep(1)
    assert count_nobody_processes() <= before  # nothing left behind (a previous test's may still be exiting)
    assert execute_code("print('still fine')").stdout == "still fine\n"


@needs_root
def test_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("original")
    os.chmod(tmp_path, 0o755)
    code = f"open({str(target)!r}, 'w').write('pwned')\n"
    r = execute_code(code)
    assert not r.success and ("PermissionError" in r.stderr or "FileNotFoundError" in r.stderr)
    assert target.read_text() == "original"
    r = execute_code("open('/etc/nanochat_pwned', 'w').write('x')")
    assert not r.success and not os.path.exists("/etc/nanochat_pwned")
    r = execute_code("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())")
    assert r.success and r.stdout == "ok\n"  # its own throwaway directory is writable


@needs_root
def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    r = execute_code(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
    assert not r.success and "connected" not in r.stdout
    with pytest.raises(socket.timeout):
        server.accept()  # the server saw no connection
    server.close()


@needs_root
def test_no_parent_secrets_home_or_checkpoints(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", secret)
    base = tmp_path / "nanochat_base"
    (base / "base_checkpoints").mkdir(parents=True)
    (base / "base_checkpoints" / "meta.json").write_text(secret)
    os.chmod(tmp_path, 0o755)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    probes = {
        "environ": "import os\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))",
        "parent environ": f"print(open('/proc/{os.getpid()}/environ', 'rb').read())",
        "ppid environ": "import os\nprint(open('/proc/%d/environ' % os.getppid(), 'rb').read())",
        "checkpoint": f"print(open({str(base / 'base_checkpoints' / 'meta.json')!r}).read())",
        "home": "import os\nprint(os.listdir(os.path.expanduser('~root')))",
    }
    for name, code in probes.items():
        r = execute_code(code)
        assert secret not in r.stdout, name
    home = execute_code("import os\nprint(sorted(os.listdir('/root')))")
    assert home.stdout.strip() in ("[]", "") , home  # hidden behind an empty tmpfs (or unreadable)
    assert os.path.exists(base / "base_checkpoints" / "meta.json")  # the host's files are unharmed


def test_parallel_runs_do_not_mix():
    codes = [f"import time\ntime.sleep(0.2)\nprint({i} * 1000)" for i in range(8)]
    results = execute_many(codes, workers=4)
    assert [r.stdout for r in results] == [f"{i * 1000}\n" for i in range(8)]
    assert all(r.success for r in results)
