"""
Shared test fixtures: the repo root, the suite's own data, the optional full copy, and an isolated base dir.

The suite reads `tests/data/` (committed: small real rows, laid out like shared/data; see its
README.md), so a fresh clone passes on its own. A few tests need the full data: they take the
`large_data` fixture, which points at $NANOCHAT_LOCAL_DATA (when set before pytest starts) or at
../shared/data beside the checkout, and skips with its reason when neither exists. Select just
those with `-m large_data`.
"""

import json
import os

import pytest

from nanochat.common import open_text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_DATA = os.path.join(REPO_ROOT, "tests", "data")
_SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
LARGE_DATA = os.environ.get("NANOCHAT_LOCAL_DATA") or (_SHARED if os.path.isdir(_SHARED) else None)
# the suite is hermetic: a test that wants local data names it; nothing leaks in from the shell
for _name in ("NANOCHAT_LOCAL_DATA", "NANOCHAT_DATA_URL"):
    os.environ.pop(_name, None)


def data_path(*parts):
    """A file of tests/data (gzipped twin accepted, like the loaders do)."""
    path = os.path.join(TEST_DATA, *parts)
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing (tests/data is committed; see tests/data/README.md)")
    return path


def read_text(*parts, max_chars=None):
    """The text of a tests/data file (decompressed), or its first max_chars characters."""
    with open_text(data_path(*parts)) as f:
        return f.read(max_chars)


def shakespeare(max_chars=None):
    return read_text("pretrain", "tinyshakespeare", "input.txt", max_chars=max_chars)


def wiki_articles():
    """The Wikipedia articles of tests/data (one jsonl record {"text"} each)."""
    return [json.loads(line)["text"] for line in read_text("pretrain", "wiki_demo", "wiki_demo.jsonl").splitlines()]


def wait_for_server(process, port, timeout=120):
    """Until a `python -m scripts.chat_web` subprocess answers /health on 127.0.0.1:port (or fails loudly)."""
    import time
    import urllib.request
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.3)


def pytest_configure(config):
    config.addinivalue_line("markers", "large_data: needs the full data copy ($NANOCHAT_LOCAL_DATA or ../shared/data)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "large_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.large_data)


@pytest.fixture(scope="session")
def large_data():
    if LARGE_DATA is None:
        pytest.skip("needs the full data copy: set NANOCHAT_LOCAL_DATA to a folder laid out like shared/data "
                    f"(none at {_SHARED})")
    if not os.path.isdir(LARGE_DATA):
        pytest.fail(f"NANOCHAT_LOCAL_DATA={LARGE_DATA} is not a folder")
    return LARGE_DATA


@pytest.fixture
def local_data(monkeypatch):
    """NANOCHAT_LOCAL_DATA=tests/data for this test (the task loaders, CORE, speedrun read it)."""
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", TEST_DATA)
    return TEST_DATA


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh $NANOCHAT_BASE_DIR for one test, so tests never touch ~/.cache/nanochat."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path
