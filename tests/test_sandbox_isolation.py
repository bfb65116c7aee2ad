"""
The sandbox against the attacks that got through before (issue 14, items 1-5): host Unix sockets,
failing open, limits that were per process instead of per sandbox, sandboxes that could reach each
other, checkpoints visible when the work dir sat under the base dir. As the caller of the tests (root
in CI) and, where the machine allows, as an ordinary user.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from nanochat import sandbox
from nanochat.sandbox import SandboxUnavailable, execute_code

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="as an ordinary user the sandbox cannot change user")


@pytest.fixture
def isolated():
    if not sandbox.isolation_available()[0]:
        pytest.skip(f"namespaces are unavailable here: {sandbox.isolation_available()[1]}")


@pytest.fixture
def open_dir():
    """A folder in /tmp that everyone may enter and write (unlike pytest's 0700 tmp_path)."""
    path = tempfile.mkdtemp(prefix="nanochat-hostile-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_server(path):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)  # anyone may connect: only the sandbox's own view of the files stops it
    server.listen(4)
    server.settimeout(0.5)
    return server


CONNECT = """import socket, sys
for path in sys.argv[1:] or {paths!r}:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(b"PAYLOAD")
        print("connected", path)
    except OSError as e:
        print("refused", path, e.errno)
"""


def assert_nothing_arrived(servers):
    for server in servers:
        with pytest.raises(socket.timeout):
            conn, _ = server.accept()
            conn.close()


# -------------------------------------------------------------------------------------------------
# 1. host Unix sockets by path

def test_host_unix_sockets_are_out_of_reach(isolated, open_dir):
    paths = [os.path.join(open_dir, "host.sock")]
    if ROOT and os.path.isdir("/run"):
        paths.append(f"/run/nanochat-test-{uuid.uuid4().hex[:8]}.sock")
    servers = [unix_server(p) for p in paths]
    try:
        r = execute_code(CONNECT.format(paths=paths))
        assert r.success and "connected" not in r.stdout and r.stdout.count("refused") == len(paths), r
        assert_nothing_arrived(servers)
        r = execute_code("import os\nprint(os.listdir('/tmp'), os.listdir('/dev/shm'), os.listdir('/run'))")
        assert r.stdout.startswith("[") and "nanochat-hostile" not in r.stdout and ".sock" not in r.stdout, r
    finally:
        for server, path in zip(servers, paths):
            server.close()
            os.unlink(path)


# -------------------------------------------------------------------------------------------------
# 2. fail closed: no silent weak mode, no cached failure

def test_refuses_without_namespaces_unless_asked(monkeypatch):
    calls = []

    def failing_probe():
        calls.append(1)
        raise SandboxUnavailable("unshare: Operation not permitted")
    monkeypatch.setattr(sandbox, "_probe", failing_probe)
    monkeypatch.setattr(sandbox, "_probe_ok", False)
    monkeypatch.delenv(sandbox.OPT_IN_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match=r"Operation not permitted.*NANOCHAT_SANDBOX=not-isolated"):
        execute_code("print('ran')")
    with pytest.raises(SandboxUnavailable):
        execute_code("print('ran')")
    assert len(calls) == 2  # a failed probe is not remembered: the second call probed again
    monkeypatch.setenv(sandbox.OPT_IN_ENV, "yes")  # only the exact opt-in value counts
    with pytest.raises(SandboxUnavailable):
        execute_code("print('ran')")
    monkeypatch.setenv(sandbox.OPT_IN_ENV, sandbox.OPT_IN_VALUE)
    r = execute_code("print('ran')")
    assert r.success and r.stdout == "ran\n"


def test_a_probe_that_fails_once_does_not_disable_isolation(isolated, monkeypatch):
    real = sandbox._probe
    state = {"n": 0}

    def flaky_probe():
        state["n"] += 1
        if state["n"] == 1:
            raise SandboxUnavailable("transient failure")
        real()
    monkeypatch.setattr(sandbox, "_probe", flaky_probe)
    monkeypatch.setattr(sandbox, "_probe_ok", False)
    monkeypatch.delenv(sandbox.OPT_IN_ENV, raising=False)
    with pytest.raises(SandboxUnavailable):
        execute_code("print(1)")
    # the next call probes again, succeeds, and runs isolated: no network at all
    r = execute_code("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert not r.success and "Network is unreachable" in r.stderr, r


# -------------------------------------------------------------------------------------------------
# 3. limits for the whole sandbox, and kills reported as what they were

FOUR_CHILDREN = """import os, time
pids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(60 * 2**20)  # 60 MB each: under the limit alone, 240 MB together
        for j in range(0, len(block), 4096):
            block[j] = 1
        time.sleep(3)
        os._exit(0)
    pids.append(pid)
for pid in pids:
    os.waitpid(pid, 0)
print("all done")
"""


def test_memory_limit_bounds_all_processes_together(isolated):
    r = execute_code(FOUR_CHILDREN, memory_mb=100, timeout=20)
    assert not r.success and r.memory_exceeded and not r.timed_out and r.error == "memory exceeded", r
    assert "all done" not in r.stdout and "memory limit" in r.stderr
    alone = execute_code(FOUR_CHILDREN.replace("range(4)", "range(1)"), memory_mb=100, timeout=20)
    assert alone.success and alone.stdout == "all done\n", alone


def test_a_kill_is_not_reported_as_memory():
    r = execute_code("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not r.success and not r.memory_exceeded and r.error == "killed by signal 9", r


def test_disk_limit_bounds_all_files_together(isolated):
    code = ("import errno\nfor i in range(4):\n    try:\n        open(f'f{i}', 'wb').write(b'x' * 600_000)\n"
            "        print('wrote', i)\n    except OSError as e:\n        print('full', i, e.errno == errno.ENOSPC)\n")
    r = execute_code(code, disk_mb=1)
    assert r.stdout.splitlines()[:1] == ["wrote 0"] and "full 1 True" in r.stdout and "wrote 2" not in r.stdout, r
    for place in ("/tmp/x", "/var/tmp/x", "/dev/shm/x", "/run/x"):  # and nowhere else to write
        r = execute_code(f"open({place!r}, 'wb').write(b'x')")
        assert not r.success and ("Read-only" in r.stderr or "No such file" in r.stderr), (place, r)


@needs_root
def test_each_sandbox_has_its_own_process_budget():
    """RLIMIT_NPROC counts per user: each sandbox has a user id of its own, so a neighbour's processes
    do not use up its budget."""
    code = ("import os, time\nkids = []\nfor i in range(12):\n    pid = os.fork()\n    if pid == 0:\n"
            "        time.sleep(1.5)\n        os._exit(0)\n    kids.append(pid)\nfor pid in kids:\n"
            "    os.waitpid(pid, 0)\nprint('forked', len(kids))")
    results = sandbox.execute_many([code] * 2, workers=2, max_procs=16, timeout=20)
    assert [r.stdout for r in results] == ["forked 12\n"] * 2, results


@needs_root
def test_sandboxes_cannot_read_or_kill_each_other(open_dir, monkeypatch):
    """Even the opted-in not-isolated mode: two sandboxes run as different users."""
    monkeypatch.setattr(sandbox, "isolation_available", lambda: (False, "the test asks for the not-isolated mode"))
    monkeypatch.setenv(sandbox.OPT_IN_ENV, sandbox.OPT_IN_VALUE)
    beacon = os.path.join(open_dir, "a.json")
    first = ("import json, os, time\nopen('secret.txt', 'w').write('s3cret')\nos.chmod('secret.txt', 0o644)\n"
             f"json.dump({{'cwd': os.getcwd(), 'pid': os.getpid()}}, open({beacon!r}, 'w'))\n"
             "time.sleep(4)\nprint('survived')")
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("a", execute_code(first, timeout=20)))
    thread.start()
    deadline = time.time() + 10
    while not os.path.exists(beacon) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    a = json.load(open(beacon))
    second = (f"import os, signal\ntry:\n    print(open({a['cwd'] + '/secret.txt'!r}).read())\nexcept OSError as e:\n"
              f"    print('read refused', e.errno)\ntry:\n    os.kill({a['pid']}, signal.SIGKILL)\n    print('killed')\n"
              "except OSError as e:\n    print('kill refused', e.errno)")
    b = execute_code(second)
    thread.join(30)
    assert "s3cret" not in b.stdout and "read refused" in b.stdout and "kill refused" in b.stdout, b
    assert box["a"].success and box["a"].stdout == "survived\n", box["a"]


# -------------------------------------------------------------------------------------------------
# 4. the checkpoints stay hidden wherever the work dir would go

def test_base_dir_is_hidden_even_when_the_temp_dir_is_inside_it(isolated, open_dir, monkeypatch):
    base = os.path.join(open_dir, "nanochat_base")
    os.makedirs(os.path.join(base, "base_checkpoints", "d2"))
    with open(os.path.join(base, "base_checkpoints", "d2", "model.safetensors"), "w") as f:
        f.write("weights")
    os.chmod(os.path.join(base, "base_checkpoints", "d2", "model.safetensors"), 0o644)
    os.makedirs(os.path.join(base, "tmp"))
    os.chmod(os.path.join(base, "tmp"), 0o777)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    monkeypatch.setattr(tempfile, "tempdir", os.path.join(base, "tmp"))  # TMPDIR under the base dir
    r = execute_code(f"import os\nprint(os.getcwd())\nprint(os.path.exists({base + '/base_checkpoints'!r}))\n"
                     f"print(sorted(os.listdir({base!r})) if os.path.isdir({base!r}) else 'absent')")
    cwd, exists, listing = r.stdout.splitlines()
    assert not cwd.startswith(base) and exists == "False" and "base_checkpoints" not in listing, r


# -------------------------------------------------------------------------------------------------
# 5. the launcher is a real file, and it is what runs

def test_the_launcher_and_runner_are_files_that_run():
    for path in (sandbox.LAUNCHER_PATH, sandbox.RUNNER_PATH):
        compile(open(path, encoding="utf-8").read(), path, "exec")
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", execute_code("import time\ntime.sleep(2)\nprint('ok')")))
    thread.start()
    found, deadline = False, time.time() + 10
    while not found and time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                found = found or sandbox.LAUNCHER_PATH.encode() in open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                pass
        time.sleep(0.05)
    thread.join(30)
    assert found and box["r"].stdout == "ok\n"


# -------------------------------------------------------------------------------------------------
# the same attacks from an ordinary user (unprivileged user namespaces)

AS_USER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from nanochat_sandbox_copy import sandbox
results = {}
results["socket"] = sandbox.execute_code(sys.argv[2]).stdout
results["memory"] = sandbox.execute_code(sys.argv[3], memory_mb=100, timeout=20).error
results["network"] = sandbox.execute_code("import socket\\nsocket.create_connection(('127.0.0.1', 9), timeout=1)").stderr
results["environ"] = sandbox.execute_code("import os\\nprint(open('/proc/%d/environ' % os.getppid(), 'rb').read())").stdout
print(json.dumps(results))
"""


@needs_root
def test_as_an_ordinary_user(open_dir):
    python = "/usr/bin/python3"
    if not (shutil.which("setpriv") and os.path.exists(python)):
        pytest.skip("needs setpriv and a system-wide /usr/bin/python3 to run as another user")
    # a copy of the sandbox (standard library only) that the other user can read, wherever the repo is
    package = os.path.join(open_dir, "lib", "nanochat_sandbox_copy")
    os.makedirs(package)
    for path in (sandbox.__file__, sandbox.LAUNCHER_PATH, sandbox.RUNNER_PATH):
        shutil.copy(path, package)
    open(os.path.join(package, "__init__.py"), "w").close()
    for root, dirs, files in os.walk(os.path.join(open_dir, "lib")):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    sock = os.path.join(open_dir, "user.sock")
    server = unix_server(sock)
    try:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", AS_USER,
                            os.path.join(open_dir, "lib"), CONNECT.format(paths=[sock]), FOUR_CHILDREN],
                           capture_output=True, text=True, timeout=120, cwd=open_dir,
                           env={"PATH": "/usr/bin:/bin", "HOME": open_dir, "SECRET_OF_THE_CALLER": "hunter2"})
        if "cannot isolate" in r.stderr:
            pytest.skip(f"no unprivileged user namespaces here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert "connected" not in out["socket"] and "refused" in out["socket"], out
        assert out["memory"] == "memory exceeded", out
        assert "Network is unreachable" in out["network"], out
        assert "hunter2" not in out["environ"], out
        assert_nothing_arrived([server])
    finally:
        server.close()
