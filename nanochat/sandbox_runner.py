"""
The first lines of the sandboxed interpreter, already as the sandbox user: lower the limits, then run
program.py as __main__. nanochat.sandbox passes this file's text to `python -I -c` (the sandbox user
may not be able to read the repository, and in the isolated mode it cannot see it), with the limits
as its one argument (JSON). Only the standard library: it runs outside the project's environment.

When the program's code returns (no exception, no exit), the runner writes the completion token on the
end pipe: the token came on its own pipe, read and closed before the program's first line, so it is in
none of the program's file, its __main__ module, its code's constants, its argv, environment or fds.
It is still in this process (this function's frame, its memory): in-process evidence, never proof
against a program that inspects its interpreter (see nanochat/sandbox.py's header).
"""

import json
import os
import resource
import sys
import types


def lower(limit, soft, hard=None):
    """Set a limit, never above an existing hard limit (raising it would fail)."""
    old = resource.getrlimit(limit)[1]
    cap = (lambda v: v) if old == resource.RLIM_INFINITY else (lambda v: min(v, old))
    resource.setrlimit(limit, (cap(soft), cap(soft if hard is None else hard)))


def main(cfg):
    lower(resource.RLIMIT_AS, cfg["memory"])  # per process; the supervisor bounds the sum
    lower(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)  # SIGXCPU first, SIGKILL a second later
    lower(resource.RLIMIT_FSIZE, cfg["fsize"])  # also every memfd (and so the ones in flight in messages)
    lower(resource.RLIMIT_NOFILE, cfg["nofile"])  # also how many fds may be in flight in messages at once
    lower(resource.RLIMIT_MSGQUEUE, 0)  # POSIX message queues: memory in no process
    lower(resource.RLIMIT_MEMLOCK, 0)  # locked and secret memory (memfd_secret)
    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_NPROC, cfg["nproc"])  # only after the exec: execve fails if the user is already over it
    if cfg["socket_guard"]:  # the not-isolated mode may have no network namespace: best effort (ctypes gets around it)
        import _socket
        import socket

        def refuse(*args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")
        socket.socket = _socket.socket = socket.socketpair = socket.fromfd = socket.create_connection = refuse
    token = os.read(cfg["token_fd"], 256)
    os.close(cfg["token_fd"])
    program = types.ModuleType("__main__")  # a module of its own: nothing of ours (or of the token) in its globals
    sys.modules["__main__"] = program
    sys.argv = ["program.py"]
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    main_process = os.getpid()
    exec(code, program.__dict__)
    if os.getpid() == main_process:  # (a forked child that ran on to the end is not the program's end)
        os.write(cfg["end_fd"], token)


main(json.loads(sys.argv[1]))
