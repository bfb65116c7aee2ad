"""
The sandbox against the attacks that got through before (issue 14, items 1-5): host Unix sockets,
failing open, limits that were per process instead of per sandbox, sandboxes that could reach each
other, checkpoints visible when the work dir sat under the base dir; and the next round (sections 6-10):
memory held where no process's PSS shows it, the caller's session keyring, signals to the supervisor,
programs that outlive the call, forged HumanEval passes. As the caller of the tests (root in CI) and,
where the machine allows, as an ordinary user; after each attack, nothing of the program may be left.
"""

import json
import os
import shutil
import socket
import subprocess
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


def sandbox_copy(open_dir):
    """A copy of the sandbox (standard library only) that another user can read, wherever the repo is."""
    package = os.path.join(open_dir, "lib", "nanochat_sandbox_copy")
    os.makedirs(package)
    for path in (sandbox.__file__, sandbox.LAUNCHER_PATH, sandbox.RUNNER_PATH):
        shutil.copy(path, package)
    open(os.path.join(package, "__init__.py"), "w").close()
    for root, dirs, files in os.walk(os.path.join(open_dir, "lib")):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    return os.path.join(open_dir, "lib")


def run_helper(open_dir, script, *args, as_nobody=True):
    """Run `script` (argv: the copy's folder, then args) in a fresh interpreter, as user 65534 or as the
    caller; returns the JSON of its last line. Skips where the machine cannot do it."""
    python = "/usr/bin/python3"
    if not (os.path.exists(python) and (shutil.which("setpriv") or not as_nobody)):
        pytest.skip("needs setpriv and a system-wide /usr/bin/python3 to run as another user")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    r = subprocess.run(prefix + [python, "-I", "-c", script, sandbox_copy(open_dir), *args], capture_output=True,
                       text=True, timeout=240, cwd=open_dir,
                       env={"PATH": "/usr/bin:/bin", "HOME": open_dir, "SECRET_OF_THE_CALLER": "hunter2"})
    if "cannot isolate" in r.stderr:
        pytest.skip(f"no unprivileged user namespaces here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_root
def test_as_an_ordinary_user(open_dir):
    sock = os.path.join(open_dir, "user.sock")
    server = unix_server(sock)
    try:
        out = run_helper(open_dir, AS_USER, CONNECT.format(paths=[sock]), FOUR_CHILDREN)
        assert "connected" not in out["socket"] and "refused" in out["socket"], out
        assert out["memory"] == "memory exceeded", out
        assert "Network is unreachable" in out["network"], out
        assert "hunter2" not in out["environ"], out
        assert_nothing_arrived([server])
    finally:
        server.close()


# -------------------------------------------------------------------------------------------------
# helpers for the attacks below: every program's processes carry its memory limit in their command
# line (the launcher's and the runner's JSON), so an odd limit marks them

def leftovers(memory_mb):
    """Live processes of the sandbox that ran with this memory limit (there must be none after the call)."""
    marker = f'"memory": {memory_mb * 2**20}'.encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def assert_no_leftovers(memory_mb):
    found = leftovers(memory_mb)
    for pid in found:  # tidy up before failing, so one failure does not leave a program running
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert found == [], f"processes of the program outlived the call: {found}"


def shmem_mb():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:")) // 1024


# -------------------------------------------------------------------------------------------------
# 6 (item 4). memory held outside any process's PSS counts against memory_mb: each program tries to
# hold 64 MB under a 32-39 MB limit in a place the old sum missed, with small steps that the sum of
# process memory alone never sees; it prints HELD if it got there, and KEPT if it could keep it for 3 s

HOLD_MB = 64
HOLD_PRELUDE = """import ctypes, fcntl, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
held, keep = 0, []
def fail(what):
    raise OSError(ctypes.get_errno(), what)
try:
    while held < %d * 2**20:
""" % HOLD_MB
HOLD_EPILOGUE = """
except OSError as e:
    print("stopped:", e)
print("HELD" if held >= %d * 2**20 else "only", held >> 20, flush=True)
if held >= %d * 2**20:  # (the supervisor sums every 20 ms: a moment over the limit is possible, keeping it is not)
    time.sleep(3)
    print("KEPT", flush=True)
""" % (HOLD_MB, HOLD_MB)
HOLD_STEPS = {  # the body of the loop: hold a little more, add it to `held`
    "memfd": """
        fd = os.memfd_create("hold")
        try:
            while True:
                held += os.write(fd, b"x" * 65536)
        except OSError as e:
            if e.errno != 27:  # EFBIG: this one is full, go on with the next
                raise
        keep.append(fd)
        if len(keep) == 40:  # short of RLIMIT_NOFILE: a child keeps these 40, we go on with new ones
            if os.fork() == 0:
                time.sleep(60)
            for fd in keep:
                os.close(fd)
            keep.clear()""",
    "memfd in flight": """
        if not keep:
            keep.extend(socket.socketpair())
        fd = os.memfd_create("hold")
        try:
            while True:
                held += os.write(fd, b"x" * 65536)
        except OSError as e:
            if e.errno != 27:
                raise
        socket.send_fds(keep[0], [b"x"], [fd])  # held by the message alone: in no fd table, in no process
        os.close(fd)""",
    "pipes": """
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, 2**20)  # F_SETPIPE_SZ
        except OSError:
            pass
        os.set_blocking(w, False)
        try:
            while True:
                held += os.write(w, b"x" * 65536)
        except BlockingIOError:
            pass
        os.close(w)
        keep.append(r)""",
    "socket buffers": """
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2**30)
        a.setblocking(False)
        try:
            while True:
                held += a.send(b"x" * 65536)
        except BlockingIOError:
            pass
        keep.append((a, b))""",
    "unmapped shared memory": """
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                   ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        p = libc.mmap(None, 8 * 2**20, 3, 0x21, -1, 0)  # MAP_SHARED | MAP_ANONYMOUS
        if p in (None, 2**64 - 1):
            fail("mmap")
        ctypes.memset(p, 1, 8 * 2**20)
        libc.munmap(p + 4096, 8 * 2**20 - 4096)  # one page stays mapped: the other 8 MB live on, in no PSS
        held += 8 * 2**20""",
    "SysV shared memory": """
        libc.shmat.restype, libc.shmat.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmdt.argtypes = [ctypes.c_void_p]
        sid = libc.shmget(0, 8 * 2**20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
        if sid < 0:
            fail("shmget")
        p = libc.shmat(sid, None, 0)
        ctypes.memset(p, 1, 8 * 2**20)
        libc.shmdt(p)
        held += 8 * 2**20""",
    "SysV memory in a nested namespace": """
        if not keep and libc.unshare(0x10000000 | 0x8000000) != 0:  # CLONE_NEWUSER | CLONE_NEWIPC: default limits
            fail("unshare")
        sid = libc.shmget(0, 8 * 2**20, 0o1600)
        if sid < 0:
            fail("shmget")
        keep.append(sid)
        libc.shmat.restype, libc.shmat.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmdt.argtypes = [ctypes.c_void_p]
        p = libc.shmat(sid, None, 0)
        ctypes.memset(p, 1, 8 * 2**20)
        libc.shmdt(p)
        held += 8 * 2**20""",
    "tmpfs in a nested namespace": """
        if not keep:  # (where /proc is writable: the not-isolated mode)
            uid, gid = os.getuid(), os.getgid()
            if libc.unshare(0x10000000 | 0x20000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
                fail("unshare")
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
            if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=1g") != 0:
                fail("mount tmpfs")
        with open("/tmp/f%d" % len(keep), "wb") as f:
            held += f.write(b"x" * 8 * 2**20)
        keep.append(f.name)""",
}
HOLD_CODES = {name: HOLD_PRELUDE + step.lstrip("\n") + HOLD_EPILOGUE for name, step in HOLD_STEPS.items()}
HOLD_LIMITS = {name: 32 + i for i, name in enumerate(HOLD_CODES)}  # memory_mb, one per attack (the marker)

HOLD_AS_USER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from nanochat_sandbox_copy import sandbox
out = {}
for mode, attacks in json.loads(sys.argv[2]).items():
    if mode == "isolated" and not sandbox.isolation_available()[0]:
        continue  # (no unprivileged user namespaces here)
    if mode == "not isolated":
        sandbox.isolation_available = lambda: (False, "the test asks for the not-isolated mode")
        sandbox.os.environ[sandbox.OPT_IN_ENV] = sandbox.OPT_IN_VALUE
    for name, (code, memory_mb) in attacks.items():
        r = sandbox.execute_code(code, memory_mb=memory_mb, timeout=20)
        out[mode + ": " + name] = [r.stdout, r.error, memory_mb]
print(json.dumps(out))
"""


NOT_ISOLATED_HOLDS = [name for name in HOLD_CODES if name not in ("socket buffers", "memfd in flight")]  # (socket guard)


def check_holds(results):
    for name, (stdout, error, memory_mb) in results.items():
        assert "KEPT" not in stdout, (name, stdout, error)  # refused, stopped by a limit, or killed for memory
        assert_no_leftovers(memory_mb)


def run_holds(names):
    results = {}
    for name in names:
        r = execute_code(HOLD_CODES[name], memory_mb=HOLD_LIMITS[name], timeout=20)
        results[name] = [r.stdout, r.error, HOLD_LIMITS[name]]
        assert r.stdout.startswith(("HELD", "only", "stopped")) or r.memory_exceeded, (name, r)
    return results


def test_memory_outside_processes_counts(isolated):
    before = shmem_mb()
    check_holds(run_holds(HOLD_CODES))
    assert shmem_mb() < before + HOLD_MB // 2  # nothing of it is still held


def test_memory_outside_processes_counts_not_isolated(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_available", lambda: (False, "the test asks for the not-isolated mode"))
    monkeypatch.setenv(sandbox.OPT_IN_ENV, sandbox.OPT_IN_VALUE)
    before = shmem_mb()
    check_holds(run_holds(NOT_ISOLATED_HOLDS))
    assert shmem_mb() < before + HOLD_MB // 2


@needs_root
def test_memory_outside_processes_counts_as_an_ordinary_user(open_dir):
    before = shmem_mb()
    attacks = {mode: {name: [HOLD_CODES[name], HOLD_LIMITS[name]] for name in names}
               for mode, names in (("isolated", HOLD_CODES), ("not isolated", NOT_ISOLATED_HOLDS))}
    check_holds(run_helper(open_dir, HOLD_AS_USER, json.dumps(attacks)))
    assert shmem_mb() < before + HOLD_MB // 2


# -------------------------------------------------------------------------------------------------
# 7 (item 5). the caller's session keyring stays out of reach: the program gets a fresh, empty one

KEYS = {"x86_64": (248, 250), "aarch64": (217, 219)}  # add_key, keyctl syscall numbers
READ_KEYS = """import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
keyctl = {keyctl}
buf = ctypes.create_string_buffer(4096)
def read(key):
    n = libc.syscall(keyctl, 11, ctypes.c_long(key), buf, 4096)  # KEYCTL_READ
    return buf.raw[:n].hex() if n >= 0 else "refused %d" % ctypes.get_errno()
found = libc.syscall(keyctl, 10, ctypes.c_long(-3), b"user", b"nanochat-test", 0)  # KEYCTL_SEARCH in @s
print("by id:", read({key}))
print("by search:", read(found) if found > 0 else "not found")
print("session keyring:", read(-3))  # the ids of the keys in it
"""
KEYRING_HELPER = """
import ctypes, json, os, platform, sys
sys.path.insert(0, sys.argv[1])
from nanochat_sandbox_copy import sandbox
add_key, keyctl = json.loads(sys.argv[2])[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
if libc.syscall(keyctl, 1, None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING: a session keyring of this helper's own
    print(json.dumps({"skip": "keyctl: " + os.strerror(ctypes.get_errno())}))
    sys.exit(0)
key = libc.syscall(add_key, b"user", b"nanochat-test", b"s3cret-of-the-caller", 20, ctypes.c_long(-3))
assert key > 0, os.strerror(ctypes.get_errno())
r = sandbox.execute_code(sys.argv[3].format(keyctl=keyctl, key=key))
print(json.dumps({"stdout": r.stdout, "stderr": r.stderr}))
"""


@pytest.mark.parametrize("as_nobody", [False, True], ids=["caller", "ordinary user"])
def test_the_callers_session_keyring_is_out_of_reach(isolated, open_dir, as_nobody):
    import platform
    if as_nobody and not ROOT:
        pytest.skip("running as another user needs root")
    if platform.machine() not in KEYS:
        pytest.skip(f"no keyctl syscall numbers for {platform.machine()} in this test")
    out = run_helper(open_dir, KEYRING_HELPER, json.dumps(KEYS), READ_KEYS, as_nobody=as_nobody)
    if "skip" in out:
        pytest.skip(out["skip"])
    secret = b"s3cret-of-the-caller".hex()
    assert secret not in out["stdout"] and "refused" in out["stdout"], out
    assert "by search: not found" in out["stdout"] and "session keyring: \n" in out["stdout"], out  # empty


# -------------------------------------------------------------------------------------------------
# 8 (item 6). a signal the program sends its supervisor is that program's failure, never the caller's
# exception; 9 (item 7). when the call returns nothing of the program runs, whatever it killed

SIGNALS = ["SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGPIPE", "SIGABRT",
           "SIGSEGV", "SIGIO", "SIGPWR", "SIGSTOP", "SIGKILL"]
SIGNAL_PARENT = "import os, signal, time\nos.kill(os.getppid(), signal.{sig})\ntime.sleep(0.2)\nprint('still here')"
KILL_PARENT = """import os, signal, time
if os.fork() == 0:
    os.setsid()  # a daemon: out of the program's process group and session
    time.sleep(60)
    os._exit(0)
time.sleep(0.2)
try:
    os.kill(os.getppid(), signal.SIGKILL)
    print("killed the supervisor")
except OSError as e:
    print("refused", e.errno)
time.sleep(60)
"""
SIGNALS_HELPER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from nanochat_sandbox_copy import sandbox
codes, memory_mb = json.loads(sys.argv[2])
out = {}
for mode in ("isolated", "not isolated"):
    if mode == "isolated" and not sandbox.isolation_available()[0]:
        continue  # (no unprivileged user namespaces here)
    if mode == "not isolated":
        sandbox.isolation_available = lambda: (False, "the test asks for the not-isolated mode")
        sandbox.os.environ[sandbox.OPT_IN_ENV] = sandbox.OPT_IN_VALUE
    for name, code in codes.items():
        try:
            r = sandbox.execute_code(code, timeout=3, memory_mb=memory_mb)
            out["ordinary user, %s: %s" % (mode, name)] = r.stdout + r.error
        except BaseException as e:
            out["ordinary user, %s: %s" % (mode, name)] = "exception: %s: %s" % (type(e).__name__, e)
print(json.dumps(out))
"""


def run_everywhere(codes, memory_mb, monkeypatch, open_dir):
    """Each program in both modes, as the caller (root in CI) and, where the machine allows, as an ordinary user
    (then the program may signal its supervisor: same user). {where: output + error, or the exception}."""
    out = {}
    for mode in ("isolated", "not isolated"):
        if mode == "isolated" and not sandbox.isolation_available()[0]:
            continue
        if mode == "not isolated":
            monkeypatch.setattr(sandbox, "isolation_available", lambda: (False, "the test asks for the not-isolated mode"))
            monkeypatch.setenv(sandbox.OPT_IN_ENV, sandbox.OPT_IN_VALUE)
        for name, code in codes.items():
            try:
                r = execute_code(code, timeout=3, memory_mb=memory_mb)
                out[f"caller, {mode}: {name}"] = r.stdout + r.error
            except Exception as e:
                out[f"caller, {mode}: {name}"] = f"exception: {type(e).__name__}: {e}"
    if ROOT and shutil.which("setpriv") and os.path.exists("/usr/bin/python3"):
        out.update(run_helper(open_dir, SIGNALS_HELPER, json.dumps([codes, memory_mb])))
    return out


def test_a_signal_to_the_supervisor_is_the_programs_failure(open_dir, monkeypatch):
    memory_mb = 341
    out = run_everywhere({sig: SIGNAL_PARENT.format(sig=sig) for sig in SIGNALS}, memory_mb, monkeypatch, open_dir)
    raised = {k: v for k, v in out.items() if v.startswith("exception")}
    assert raised == {}, raised
    assert_no_leftovers(memory_mb)


def test_nothing_of_the_program_outlives_the_call(open_dir, monkeypatch):
    memory_mb = 342
    out = run_everywhere({"kill the supervisor": KILL_PARENT}, memory_mb, monkeypatch, open_dir)
    assert_no_leftovers(memory_mb)  # neither the program nor its daemon, in any mode, whoever it could kill
    assert all(not v.startswith("exception") for v in out.values()), out


# -------------------------------------------------------------------------------------------------
# 10 (item 8). a HumanEval pass cannot be forged by reading the success token from the program's file,
# its __main__ module or its code's constants, and printing it (or writing it anywhere) before exiting

FORGER = '''
import os, re, sys
found = set(re.findall(r"[0-9a-f]{16,}", open("program.py").read()))
import __main__
for value in list(vars(__main__).values()):
    if isinstance(value, str):
        found.update(re.findall(r"[0-9a-f]{16,}", value))
for const in sys._getframe().f_code.co_consts:
    if isinstance(const, str):
        found.update(re.findall(r"[0-9a-f]{16,}", const))
for token in found:
    print(token, flush=True)
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.write(int(fd), (token + "\\n").encode())
        except OSError:
            pass
os._exit(0)
'''


def test_humaneval_pass_cannot_be_forged(isolated, local_data):
    from tasks.humaneval import HumanEval
    task = HumanEval(timeout=10)
    conversation = task[0]
    wrong = f"```python\n{conversation['prompt'].rstrip()}\n    return None\n{FORGER}```"
    assert task.evaluate(conversation, wrong) == 0
    assert task.evaluate(conversation, conversation["messages"][1]["content"]) == 1
