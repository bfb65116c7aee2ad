"""
The sandbox's launcher: started by nanochat.sandbox as the caller (root in CI) with
`python -I -S sandbox_launcher.py CONFIG_JSON`. It builds the sandbox (namespaces and mounts, or only
a subreaper in the not-isolated mode), then supervises the program: a child that drops to the sandbox
user and execs the runner (sandbox_runner.py's text), which lowers the limits and runs program.py. Only
the standard library, and nothing imported from the project: it runs before the sandbox exists, in a
bare interpreter. What it bounds and how is written down in nanochat/sandbox.py's header.

What goes back to the caller: the exit status (the program's, a signal death as 128+N), and on the
status pipe a line when something other than the program decided the outcome: "setup failed: ..."
(exit status 121, only ever before the program's code started), "memory limit: ..." (its memory
together passed the limit and everything was killed) or "supervisor failed: ..." (exit status 122,
everything killed: the program's failure, never the caller's exception).
"""

import ctypes
import json
import os
import platform
import re
import signal
import sys
import time

cfg = json.loads(sys.argv[1])
status_fd, limits = cfg["status_fd"], cfg["limits"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
KEYCTL = {"x86_64": 250, "aarch64": 219, "arm64": 219, "riscv64": 219, "ppc64le": 280, "s390x": 280}.get(platform.machine())
SETUP_FAILED, SUPERVISOR_FAILED = 121, 122
POLL_SECONDS = 0.02  # how often the supervisor sums the memory the program holds
PAGE = os.sysconf("SC_PAGE_SIZE")
state = {"started": False, "program": 0, "pid_ns": False, "workdir_dev": None, "own_netns": False}
PIPE_BOUND = SOCKET_BOUND = 0  # set in main()


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def read_number(path):
    with open(path) as f:
        return int(f.read().split()[0])


def write_sysctls(values):
    for name, value in values.items():
        with open(f"/proc/sys/{name}", "w") as f:
            f.write(value)


def ignore_signals():
    """Nothing the program can send us becomes an exception (SIGINT would raise KeyboardInterrupt) or stops us:
    every catchable signal is ignored but SIGTERM (the caller's deadline) and SIGCHLD."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGTERM):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass


def build_filesystem(workdir, uid, gid):
    """The program's view of the files: its own /proc; empty scratch folders (/tmp, /run, /dev/shm, ...:
    nothing of the host there, Unix sockets included); empty home folders and checkpoints; a private
    tmpfs of disk_mb (and at most 4096 inodes) as its working directory; everything else read-only
    (/proc too, in seal_proc, once the program's user namespace is mapped)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # shows this pid namespace only
    with open("program.py", "rb") as f:
        program = f.read()
    for path, kind in cfg["cover"]:  # outer folders first; made read-only with the rest below
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | (MS_RDONLY if kind == "hide" else 0), "size=64k,mode=0755")
    os.makedirs(workdir, exist_ok=True)  # recreated inside the empty /tmp when it lives there
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}")
    os.chdir(workdir)  # enter the fresh tmpfs (the old cwd is the host's folder underneath it)
    state["workdir_dev"] = os.stat(".").st_dev
    with open("program.py", "wb") as f:
        f.write(program)
    os.chmod("program.py", 0o644)
    for t in mount_targets():
        if t not in (workdir, "/proc"):
            read_only(t)
    writable = [t for t in mount_targets() if t not in (workdir, "/proc") and not os.statvfs(t).f_flag & MS_RDONLY]
    if writable:
        raise OSError(f"could not make {writable} read-only")


def mount_targets():
    unescape = lambda path: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)  # noqa: E731 ('\040' = space)
    with open("/proc/self/mountinfo") as f:
        return [t for t in (unescape(line.split()[4]) for line in f) if os.path.exists(t)]


def read_only(target):
    try:  # keep nosuid/nodev/noexec (a user namespace may not drop them)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | (os.statvfs(target).f_flag & 14))
    except OSError:
        pass  # e.g. a path that is no longer a mount point; checked by the callers


def seal_proc():
    read_only("/proc")
    if not os.statvfs("/proc").f_flag & MS_RDONLY:
        raise OSError("could not make /proc read-only")


def nested_namespaces_impossible(err):
    """Root could not make a user namespace: then neither can the program (less privileged, same seccomp
    filter, chroot and security module), unless the refusal was a count that the program's user id is not at."""
    if err in (1, 22, 38, 87):  # EPERM, EINVAL, ENOSYS, EUSERS
        return True
    return err == 28 and read_number("/proc/sys/user/max_user_namespaces") == 0  # ENOSPC


def prepare_program(uid, gid, report, go):
    """In the program's own process, before any of its code: as root, a user namespace of its own (host root
    and its user id mapped by the supervisor), with its own network and IPC namespaces, in which it may create no
    user namespace and no System V IPC object; then the user id, a fresh empty session keyring, death with
    its supervisor, no_new_privs, default signal handling, and exec the runner."""
    parent = os.getppid()
    if os.getuid() == 0:
        if libc.unshare(CLONE_NEWUSER) != 0:
            err = ctypes.get_errno()
            if not nested_namespaces_impossible(err):
                raise OSError(err, f"unshare(CLONE_NEWUSER) for the program: {os.strerror(err)}")
            os.write(report, b"N")
        else:
            os.write(report, b"U")
            if os.read(go, 1) != b"G":
                raise OSError("the supervisor did not map the program's user namespace")
            check(libc.unshare(CLONE_NEWNET | CLONE_NEWIPC), "unshare(CLONE_NEWNET | CLONE_NEWIPC) for the program")
            write_sysctls({"user/max_user_namespaces": "0", "kernel/shmmni": "0", "kernel/msgmni": "0",
                           "kernel/sem": "0 0 0 0"})
    os.write(report, b"R")  # ready: the supervisor seals /proc
    if os.read(go, 1) != b"G":
        raise OSError("the supervisor did not release the program")
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if KEYCTL is None:
        raise OSError(f"no keyctl system call number known for {platform.machine()}: cannot empty the session keyring")
    if libc.syscall(KEYCTL, 1, None) < 0 and ctypes.get_errno() not in (1, 38):  # KEYCTL_JOIN_SESSION_KEYRING
        err = ctypes.get_errno()  # (EPERM, ENOSYS: keys are off or filtered here, for the program too)
        raise OSError(err, f"a fresh session keyring for the program: {os.strerror(err)}")
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")  # (after setuid, which clears it)
    if os.getppid() != parent:
        raise OSError("the supervisor died while the program was being started")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # setuid binaries grant nothing from here on
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    os.set_inheritable(status_fd, False)
    for fd in (limits["token_fd"], limits["end_fd"]):
        os.set_inheritable(fd, True)
    python = cfg["python"]
    os.execve(python, [python, "-I", "-c", cfg["runner"], json.dumps(limits)], os.environ)


def start_program(uid, gid):
    """Fork the program's process and see it through prepare_program: its failures before the exec are the
    sandbox's (setup failed); from the exec on (the report pipe closes), everything is the program's."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    program = os.fork()
    if program == 0:
        try:
            os.setpgid(0, 0)
            prepare_program(uid, gid, report_w, go_r)
        except BaseException as e:
            os.write(report_w, f"E{type(e).__name__}: {e}".encode()[:4000])
        os._exit(SETUP_FAILED)
    state["program"] = program
    for fd in (report_w, go_r, limits["token_fd"], limits["end_fd"]):
        os.close(fd)
    with os.fdopen(report_r, "rb") as report, os.fdopen(go_w, "wb", buffering=0) as go:
        step = report.read(1)
        if step == b"N":  # (root could not make one: nor can the program)
            step = report.read(1)
        if step == b"U":
            for name, first in (("uid_map", uid), ("gid_map", gid)):
                with open(f"/proc/{program}/{name}", "w") as f:
                    f.write(f"0 0 1\n{first} {first} 1\n")
            go.write(b"G")
            state["own_netns"] = True  # the program's network namespace: its sockets are all in its sockstat
            step = report.read(1)
        if step == b"R":
            if cfg["isolate"]:
                seal_proc()
            go.write(b"G")
            step = report.read(1)
        if step:  # the exec did not happen
            os.waitpid(program, 0)
            raise OSError(f"program process: {(step + report.read()).decode(errors='replace').lstrip('E')}")
    state["started"] = True


def descendants():
    """Every process below this one (orphans come to us: we are an init or a subreaper), as /proc numbers them
    (which, in the not-isolated mode's pid namespace, are the host's)."""
    me, parent = int(os.readlink("/proc/self")), {}
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


def process_memory(pid):
    """Proportional set size in bytes (shared pages split between their users, so forked copies are not counted
    twice), less the shared memory it maps when that is counted as objects below (isolated: every writable
    tmpfs is ours), plus huge pages (in no PSS); the resident size where smaps_rollup is missing."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line) if v.split()}
        shmem = kb.get("Pss_Shmem", 0) if cfg["isolate"] else 0
        return (kb["Pss"] - shmem + kb.get("Private_Hugetlb", 0) + kb.get("Shared_Hugetlb", 0)) * 1024
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


SHARED_MAPPING = re.compile(r"^(\S+) \S{3}s \S+ ([0-9a-f]+):([0-9a-f]+) (\d+) +(.*)$", re.M)


def objects_held(pid, seen):
    """Bytes of the memory objects that process `pid` reaches and that no PSS shows, each counted once (`seen`):
    shared memory files (memfd, shared anonymous memory, deleted files) through its fds or mappings, at their
    allocated size (st_blocks), or at the most they can hold where their size cannot be read (an ordinary user
    may not stat /proc/PID/map_files): RLIMIT_FSIZE for files, RLIMIT_AS for shared anonymous memory;
    every pipe at pipe-max-size; every socket at SOCKET_BOUND unless its network namespace's count is used."""
    total = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            link = os.readlink(path)
            if link.startswith("pipe:") or (link.startswith("socket:") and not state["own_netns"]):
                key, size = link, PIPE_BOUND if link.startswith("pipe:") else SOCKET_BOUND
            elif link.startswith("/memfd:") or link.endswith(" (deleted)"):
                st = os.stat(path)
                key, size = (st.st_dev, st.st_ino), 0 if st.st_dev == state["workdir_dev"] else st.st_blocks * 512
            else:
                continue
        except (FileNotFoundError, ProcessLookupError):
            continue
        if key not in seen:
            seen.add(key)
            total += size
    try:
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return total
    for m in SHARED_MAPPING.finditer(maps):
        span, major, minor, inode, name = m.groups()
        key = (os.makedev(int(major, 16), int(minor, 16)), int(inode))
        anonymous = name.startswith("/dev/zero")
        if key in seen or key[0] == state["workdir_dev"] or name.startswith("/SYSV") or not (
                anonymous or name.startswith("/memfd:") or name.endswith(" (deleted)")):
            continue  # (System V segments: counted from /proc/sysvipc, or forbidden)
        seen.add(key)
        try:
            total += os.stat(f"/proc/{pid}/map_files/{span}").st_blocks * 512
        except PermissionError:
            total += limits["memory"] if anonymous else limits["fsize"]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def namespace_memory(pids):
    """What the program's namespaces hold: its work dir's tmpfs; System V IPC objects (when the supervisor
    shares the program's IPC namespace: in the others there may be none); its sockets, at SOCKET_BOUND each
    (all of them, those in flight in messages too, when it has a network namespace of its own)."""
    total = 0
    if state["workdir_dev"] is not None:
        st = os.statvfs(".")
        total += (st.f_blocks - st.f_bfree) * st.f_frsize
    if state["pid_ns"]:  # (then we share its IPC namespace, or its own one forbids them)
        for kind, columns in (("shm", {"rss": 1, "swap": 1}), ("msg", {"cbytes": 1, "qnum": 64}), ("sem", {"nsems": 64})):
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = [line.split() for line in f]
            total += sum(int(row[header.index(c)]) * scale for row in rows for c, scale in columns.items())
    if state["own_netns"] and pids:
        for pid in pids:
            try:
                with open(f"/proc/{pid}/net/sockstat") as f:
                    total += int(f.readline().split()[2]) * SOCKET_BOUND  # "sockets: used N"
                break
            except (FileNotFoundError, ProcessLookupError):
                continue
    return total


def memory_in_use():
    pids, seen = descendants(), set()
    return namespace_memory(pids) + sum(process_memory(pid) + objects_held(pid, seen) for pid in pids)


def kill_leftovers():
    """Kill and reap until nothing is left below us, daemons that called setsid() included."""
    while True:
        if state["pid_ns"]:  # as the namespace's init: everything but ourselves
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for pid in descendants():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.wait()
        except ChildProcessError:
            return


def stop_program():  # killpg first: one call, atomic with respect to fork, so a fork bomb cannot outrun it
    if state["program"]:
        try:
            os.killpg(state["program"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_leftovers()


def on_term(signum, frame):  # the caller's deadline passed
    stop_program()
    os._exit(128 + signal.SIGKILL)


def supervise(uid, gid):
    """Stay as the caller (root: the program can neither signal nor trace us; an ordinary user: we are its pid
    namespace's init, which it cannot kill, and not dumpable, so it cannot trace us or open our fds); run the
    program as a child in its own process group; reap orphans while it runs (zombies count against
    RLIMIT_NPROC) and sum the memory it holds; then kill what it left behind and exit as it did."""
    signal.signal(signal.SIGTERM, on_term)
    start_program(uid, gid)
    program, limit = state["program"], cfg["memory_total"]
    while True:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | os.WNOHANG)  # peek: leave the program unreaped
        if info is None:
            used = memory_in_use()
            if used > limit:
                stop_program()
                os.write(status_fd, f"memory limit: it held {used / 2**20:.0f} MB together, "
                                    f"over {limit / 2**20:.0f} MB".encode())
                os._exit(128 + signal.SIGKILL)
            time.sleep(POLL_SECONDS)
            continue
        if info.si_pid == program:
            break
        os.waitpid(info.si_pid, 0)
    try:
        os.killpg(program, signal.SIGKILL)  # while the program is an unreaped zombie its group id cannot be reused
    except ProcessLookupError:
        pass
    code = os.waitstatus_to_exitcode(os.waitpid(program, 0)[1])
    kill_leftovers()
    os._exit(128 - code if code < 0 else code)  # a signal death as 128+N, as shells report it


def main():
    global PIPE_BOUND, SOCKET_BOUND
    ignore_signals()
    # a pipe holds at most pipe-max-size bytes (unprivileged), a socket its send buffer (2 x wmem_max, plus one
    # message) and, for the inet and netlink kinds, its receive buffer (2 x rmem_max)
    PIPE_BOUND = read_number("/proc/sys/fs/pipe-max-size")
    SOCKET_BOUND = 4 * read_number("/proc/sys/net/core/wmem_max") + 2 * read_number("/proc/sys/net/core/rmem_max")
    root = os.getuid() == 0
    uid, gid = (cfg["user"], cfg["user"]) if root else (os.getuid(), os.getgid())
    if cfg["isolate"]:
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
        check(libc.unshare(flags | (0 if root else CLONE_NEWUSER)), "unshare")
        state["pid_ns"] = state["own_netns"] = True
    elif not root:  # where the kernel allows: a pid namespace, so that the program (our user) cannot kill us
        state["pid_ns"] = state["own_netns"] = libc.unshare(CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET) == 0
    if state["pid_ns"] and not root:  # map ourselves to ourselves; forbid nested user namespaces (tmpfs, IPC: memory)
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        write_sysctls({"user/max_user_namespaces": "0"})
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")  # no tracing, no /proc/PID/fd for our user
    if state["pid_ns"]:
        init = os.fork()
        if init:  # still in the caller's pid namespace: wait, exit as the namespace's init did
            for fd in (limits["token_fd"], limits["end_fd"]):
                os.close(fd)
            # at the deadline: kill the init; its exit kills and reaps the whole namespace before waitpid returns
            signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(init, signal.SIGKILL))
            code = os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])
            os._exit(128 - code if code < 0 else code)
        if cfg["isolate"]:  # pid 1 of the new namespace: when it exits, the kernel kills everything left in it
            build_filesystem(os.path.realpath(os.getcwd()), uid, gid)
    else:
        check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")  # orphans come to us
    supervise(uid, gid)


try:
    main()
except BaseException as e:
    if state["started"]:  # from here on a failure is the program's result, never the caller's exception
        try:
            stop_program()
        finally:
            os.write(status_fd, f"supervisor failed: {type(e).__name__}: {e}".encode()[:4000])
            os._exit(SUPERVISOR_FAILED)
    os.write(status_fd, f"setup failed: {type(e).__name__}: {e}".encode()[:4000])
    os._exit(SETUP_FAILED)
