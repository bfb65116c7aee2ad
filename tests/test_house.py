"""
The house plan (DESIGN.md), checked: the library never reaches up into tasks/ or scripts/, nothing in
the library or the benchmarks imports a script, and each file stays one readable idea (no file in
nanochat/ over 450 lines, none in scripts/ over 400).
"""

import ast
import os
import pkgutil
import subprocess
import sys

from conftest import REPO_ROOT

LIBRARY = os.path.join(REPO_ROOT, "nanochat")
MAX_LINES = 450
SCRIPTS = os.path.join(REPO_ROOT, "scripts")
MAX_SCRIPT_LINES = 400
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


def imported_packages(path):
    """(line, top-level package) of every import in a source file, those inside functions included."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, (node.module or "").split(".")[0]


def python_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".py"))


def test_no_library_source_names_tasks_or_scripts():
    # also the imports the check above cannot see: those inside functions that were not called
    for path in python_files(LIBRARY):
        for line, package in imported_packages(path):
            assert package not in ("tasks", "scripts"), f"{path}:{line} imports {package}"


def test_no_benchmark_imports_a_script():
    # a script is a program (flags, objects, loop): what a benchmark needs from it belongs in the library
    for path in python_files(os.path.join(REPO_ROOT, "bench")):
        for line, package in imported_packages(path):
            assert package != "scripts", f"{path}:{line} imports scripts; import it from nanochat/ (or run the script)"


def line_count(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def test_library_modules_stay_small():
    too_long = {path: n for path in python_files(LIBRARY) if (n := line_count(path)) > MAX_LINES}
    assert not too_long, f"split these (one idea per module, at most {MAX_LINES} lines): {too_long}"


def test_scripts_stay_small():
    # a stage is flags -> objects from nanochat/ -> loop -> save; what grows past that belongs in the library
    too_long = {path: n for path in python_files(SCRIPTS) if (n := line_count(path)) > MAX_SCRIPT_LINES}
    assert not too_long, f"move code from these into nanochat/ (a script has at most {MAX_SCRIPT_LINES} lines): {too_long}"
