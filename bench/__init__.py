"""
Benchmarks (not tests): each prints a short table of ratios measured in one run (bench/README.md).

They read real data from a full local copy: $NANOCHAT_LOCAL_DATA, else ../shared/data beside the
checkout. The small ones also run on the suite's tests/data (a note says so: fewer items, same code).
"""

import os
import sys

from nanochat.common import open_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
TEST_DATA = os.path.join(REPO_ROOT, "tests", "data")


def data_dir(small_ok=False):
    """The data folder a benchmark reads; tests/data only where small_ok, else a clear exit."""
    path = os.environ.get("NANOCHAT_LOCAL_DATA") or (SHARED if os.path.isdir(SHARED) else None)
    if path:
        return path
    if small_ok:
        print(f"note: no full data copy (NANOCHAT_LOCAL_DATA or {SHARED}); measuring on the small tests/data")
        return TEST_DATA
    sys.exit(f"error: this benchmark needs a full data copy: set NANOCHAT_LOCAL_DATA to a folder laid out like "
             f"shared/data (none at {SHARED})")


def read_text(root, *parts):
    """A text file under root, or its gzipped twin."""
    path = os.path.join(root, *parts)
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    with open_text(path) as f:
        return f.read()
