"""
The house plan (DESIGN.md), checked: the library never reaches up into tasks/ or scripts/, and each
library module stays one readable idea (no file in nanochat/ over 450 lines).
"""

import ast
import os
import pkgutil
import subprocess
import sys

from conftest import REPO_ROOT

LIBRARY = os.path.join(REPO_ROOT, "nanochat")
MAX_LINES = 450
# programs kept as files of the package, run in a child interpreter and never imported
PROGRAMS = {"nanochat.sandbox_launcher", "nanochat.sandbox_runner"}


def library_modules(programs=False):
    names = sorted(f"nanochat.{m.name}" for m in pkgutil.iter_modules([LIBRARY]))
    return names if programs else [n for n in names if n not in PROGRAMS]


def test_importing_the_library_imports_no_tasks_or_scripts():
    # a fresh interpreter: this test process has imported tasks/ long ago through other tests
    code = ("import importlib, sys\n"
            f"for name in {library_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "up = sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'scripts'))\n"
            "print('upward:', up)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "upward: []" in r.stdout, r.stdout


def test_no_library_source_names_tasks_or_scripts():
    # also the imports the check above cannot see: those inside functions that were not called
    for name in library_modules(programs=True):
        path = os.path.join(LIBRARY, name.split(".")[1] + ".py")
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            else:
                continue
            for target in targets:
                assert target.split(".")[0] not in ("tasks", "scripts"), f"{path}:{node.lineno} imports {target}"


def test_library_modules_stay_small():
    too_long = {}
    for name in library_modules(programs=True):
        path = os.path.join(LIBRARY, name.split(".")[1] + ".py")
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            too_long[path] = n
    assert not too_long, f"split these (one idea per module, at most {MAX_LINES} lines): {too_long}"
