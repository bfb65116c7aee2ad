"""
The sandbox's launcher: started by nanochat.sandbox as the caller (root in CI) with
`python -I -S sandbox_launcher.py CONFIG_JSON`. It builds the sandbox (namespaces and mounts, or
only a subreaper in the not-isolated mode), then supervises the program: a child that drops to the
sandbox user and execs the runner (sandbox_runner.py's text), which lowers the limits and runs
program.py. Only the standard library, and nothing imported from the project: it runs before the
sandbox exists, in a bare interpreter.

What goes back to the caller: the exit status (the program's, a signal death as 128+N), and on the
status pipe a line when something other than the program decided the outcome: the sandbox could not
be built (exit status 121), or the program's processes together passed the memory limit and were
killed ("memory limit: ...").
"""

import ctypes
import json
import os
import re
import signal
import sys
import time

cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
SETUP_FAILED = 121
POLL_SECONDS = 0.02  # how often the supervisor sums the memory of the program's processes
PAGE = os.sysconf("SC_PAGE_SIZE")


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def build_filesystem(workdir, uid, gid):
    """The program's view of the files: its own /proc; empty scratch folders (/tmp, /run, /dev/shm, ...:
    nothing of the host there, Unix sockets included); empty home folders and checkpoints; a private
    tmpfs of disk_mb as its working directory; everything else read-only."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # shows this pid namespace only
    with open("program.py", "rb") as f:
        program = f.read()
    for path, kind in cfg["cover"]:  # outer folders first; made read-only with the rest below
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | (MS_RDONLY if kind == "hide" else 0), "size=64k,mode=0755")
    os.makedirs(workdir, exist_ok=True)  # recreated inside the empty /tmp when it lives there
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_mb']}m,mode=0700,uid={uid},gid={gid}")
    os.chdir(workdir)  # enter the fresh tmpfs (the old cwd is the host's folder underneath it)
    with open("program.py", "wb") as f:
        f.write(program)
    os.chmod("program.py", 0o644)
    # everything else read-only; keep nosuid/nodev/noexec (a user namespace may not drop them)
    unescape = lambda path: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)  # noqa: E731 ('\040' = space)
    with open("/proc/self/mountinfo") as f:
        targets = [unescape(line.split()[4]) for line in f]
    for t in targets:
        if t != workdir and os.path.exists(t):
            try:
                mount(None, t, None, MS_REMOUNT | MS_BIND | MS_RDONLY | (os.statvfs(t).f_flag & 14))
            except OSError:
                pass  # e.g. a path that is no longer a mount point; checked below
    writable = [t for t in targets if t != workdir and os.path.exists(t) and not os.statvfs(t).f_flag & MS_RDONLY]
    if writable:
        raise OSError(f"could not make {writable} read-only")


def run_program(uid, gid):
    """In the program's own process: become the sandbox user, then exec the runner."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    check(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # setuid binaries grant nothing from here on
    os.set_inheritable(status_fd, False)
    python = cfg["python"]
    os.execve(python, [python, "-I", "-c", cfg["runner"], json.dumps(cfg["limits"])], os.environ)


def descendants():
    """Every process below this one (orphans come to us: we are an init or a subreaper)."""
    me, parent = os.getpid(), {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parent[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
        except (OSError, ValueError, IndexError):
            pass
    out, frontier = [], [me]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        out += frontier
    return out


def memory_of(pid):
    """Proportional set size in bytes (shared pages split between their users, so forked copies are not
    counted twice); the resident size where smaps_rollup is missing."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def kill_leftovers():
    """Kill and reap until nothing is left below us, daemons that called setsid() included."""
    while True:
        for pid in descendants():
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


def on_term(signum, frame):  # the caller's deadline passed
    if program:
        kill_program_group()
        kill_leftovers()
    os._exit(128 + signal.SIGKILL)


def supervise(uid, gid):
    """Stay as the caller (root: the program can neither signal nor trace us); run the program as a child in
    its own process group; reap orphans while it runs (zombies count against RLIMIT_NPROC) and sum the memory
    of everything it started; then kill what it left behind and exit as it did."""
    global program
    signal.signal(signal.SIGTERM, on_term)
    program = os.fork()
    if program == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setpgid(0, 0)
        run_program(uid, gid)
    limit = cfg["memory_total"]
    while True:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG)  # peek: leave the program unreaped
        if info is None:
            used = sum(memory_of(pid) for pid in descendants())
            if used > limit:
                kill_program_group()
                kill_leftovers()
                os.write(status_fd, f"memory limit: its processes used {used / 2**20:.0f} MB together, "
                                    f"over {limit / 2**20:.0f} MB".encode())
                os._exit(128 + signal.SIGKILL)
            time.sleep(POLL_SECONDS)
            continue
        if info.si_pid == program:
            break
        os.waitpid(info.si_pid, 0)
    kill_program_group()  # while the program is an unreaped zombie its group id cannot be reused
    code = os.waitstatus_to_exitcode(os.waitpid(program, 0)[1])
    kill_leftovers()
    os._exit(128 - code if code < 0 else code)  # a signal death as 128+N, as shells report it


def main():
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


try:
    main()
except BaseException as e:
    os.write(status_fd, f"{type(e).__name__}: {e}".encode()[:4000])
    os._exit(SETUP_FAILED)
