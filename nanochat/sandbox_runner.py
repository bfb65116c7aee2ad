"""
The first lines of the sandboxed interpreter, already as the sandbox user: lower the limits, then run
program.py as __main__. nanochat.sandbox passes this file's text to `python -I -c` (the sandbox user
may not be able to read the repository, and in the isolated mode it cannot see it), with the limits
as its one argument (JSON). Only the standard library: it runs outside the project's environment.
"""

import json
import resource
import sys

cfg = json.loads(sys.argv[1])


def lower(limit, soft, hard=None):
    """Set a limit, never above an existing hard limit (raising it would fail)."""
    old = resource.getrlimit(limit)[1]
    cap = (lambda v: v) if old == resource.RLIM_INFINITY else (lambda v: min(v, old))
    resource.setrlimit(limit, (cap(soft), cap(soft if hard is None else hard)))


lower(resource.RLIMIT_AS, cfg["memory"])  # per process; the supervisor bounds the sum
lower(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)  # SIGXCPU first, SIGKILL a second later
lower(resource.RLIMIT_FSIZE, cfg["fsize"])
lower(resource.RLIMIT_CORE, 0)
lower(resource.RLIMIT_NPROC, cfg["nproc"])  # only after the exec: execve fails if the user is already over it
if cfg["socket_guard"]:  # the not-isolated mode has no network namespace: best effort only (ctypes gets around it)
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")
    socket.socket = _socket.socket = socket.socketpair = socket.fromfd = socket.create_connection = refuse
sys.argv = ["program.py"]
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
