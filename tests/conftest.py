"""Shared test fixtures: the repo root, the real data in ../shared/data, and an isolated base dir."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


@pytest.fixture
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"real test data not found at {SHARED_DATA} (the tests read shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh $NANOCHAT_BASE_DIR for one test, so tests never touch ~/.cache/nanochat."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path
