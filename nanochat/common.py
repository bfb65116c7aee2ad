"""
Small things every stage needs: where artifacts live, where local copies of remote data live,
rank-aware printing and atomic file writes. No stage logic lives here.
"""

import os
import tempfile
from contextlib import contextmanager


def get_base_dir():
    """Root of all artifacts (shards, tokenizer, checkpoints, report): $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_rank():
    return int(os.environ.get("RANK", "0"))


def get_world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def print0(*args, **kwargs):
    """print() on rank 0 only, so a torchrun job prints each line once."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def local_data_dir():
    """The folder named by $NANOCHAT_LOCAL_DATA (laid out like shared/data), or None when unset."""
    path = os.environ.get("NANOCHAT_LOCAL_DATA")
    if not path:
        return None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"NANOCHAT_LOCAL_DATA={path} is not a folder; point it at a copy laid out like shared/data")
    return path


def local_data_file(*parts):
    """A file inside $NANOCHAT_LOCAL_DATA, with an error that names the missing file."""
    root = local_data_dir()
    if root is None:
        raise RuntimeError("NANOCHAT_LOCAL_DATA is not set")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from NANOCHAT_LOCAL_DATA={root}")
    return path


@contextmanager
def atomic_write(path, mode="wb"):
    """
    Open a temp file next to `path`; on a clean exit fsync it and rename it over `path`.
    A crash at any point leaves either the old file or no file, never a half-written one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # fsync the directory so the rename itself survives a power loss
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
