"""
Small things every stage needs: where artifacts live, where local copies of remote data live,
rank-aware printing and atomic file writes. No stage logic lives here.
"""

import datetime
import gzip
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager, nullcontext

# torch is imported inside the functions below that use it, not here: the data downloaders and the
# task loaders import this module and should not pay torch's import time (seconds) for nothing


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
    """
    A file inside $NANOCHAT_LOCAL_DATA, or its gzipped twin (name + ".gz") when only that is there,
    with an error that names the missing file.
    """
    root = local_data_dir()
    if root is None:
        raise RuntimeError("NANOCHAT_LOCAL_DATA is not set")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        if not path.endswith(".gz") and os.path.exists(path + ".gz"):
            return path + ".gz"
        raise FileNotFoundError(f"{path} is missing from NANOCHAT_LOCAL_DATA={root}")
    return path


class FetchError(RuntimeError):
    """
    Remote data that could not be fetched. Its message is one line: what, from where, why, and what
    to set instead; stages print it as `error: ...` and exit, without a traceback.
    """

    def __init__(self, what, source, reason, mirror_hint=None):
        hint = "to run offline, set NANOCHAT_LOCAL_DATA to a folder laid out like ../shared/data"
        if mirror_hint:
            hint += f" (or {mirror_hint})"
        super().__init__(f"could not fetch {what} from {source} ({reason}); {hint}")


def open_text(path):
    """A UTF-8 text handle on `path`, decompressing it when it ends in .gz."""
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


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
        # mkstemp makes the file owner-only; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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


# -------------------------------------------------------------------------------------------------
# devices, dtypes and the distributed process group


def autodetect_device_type():
    """cuda if present, else mps, else cpu: the same scripts run everywhere."""
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def is_ddp():
    """True when launched by torchrun (it sets RANK/WORLD_SIZE/LOCAL_RANK for every process)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def compute_init(device_type=None):
    """
    Seed, pick the device, and join the process group when run under torchrun (NCCL on GPUs, gloo on
    CPU; multi-node works through torchrun's own --nnodes/--rdzv flags). Returns
    (ddp, rank, local_rank, world_size, device).
    """
    import torch
    import torch.distributed as dist
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device-type cuda was asked for but torch sees no CUDA device")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # the new-style TF32 switch
    ddp = is_ddp()
    rank, local_rank, world_size = get_rank(), int(os.environ.get("LOCAL_RANK", "0")), get_world_size()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        # also for a single process under torchrun: the optimizers' collectives then run for real (NCCL
        # included), as on a node, and a 1-process run is the same code as an 8-process one
        backend = "nccl" if device_type == "cuda" else "gloo"
        # a generous timeout: rank 0 may save a large checkpoint or sample while the others wait
        timeout = datetime.timedelta(minutes=float(os.environ.get("NANOCHAT_DIST_TIMEOUT_MIN", "30")))
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None, timeout=timeout)
        dist.barrier()
        print0(f"distributed: backend {backend}, world size {world_size}")
    return ddp and world_size > 1, rank, local_rank, world_size, device


def compute_cleanup():
    """Leave the process group together: a rank that tears down while another still works (rank 0
    sampling, writing the report) can abort the job in gloo."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def limit_side_thread(device):
    """
    Called at the start of a thread other than the main one that runs the model on a CPU: one intra-op
    thread there. Such a thread's OpenMP team wakes up for every small parallel region, which made a
    decode step 3-4x slower with 2 threads than with 1 on the 2-core machine (bench/README.md, serving).
    """
    import torch
    if device.type == "cpu":
        torch.set_num_threads(1)


def autocast_ctx(device_type, dtype):
    """
    Mixed precision by autocast: weights, gradients and optimizer state stay fp32 (the master copy);
    matmuls run in `dtype` (bf16) at use. fp32 is a no-op context.
    """
    import torch
    if dtype == torch.float32 or device_type == "mps":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


_CPU_BF16_FASTER = None


def cpu_bf16_is_faster():
    """Whether this CPU multiplies bf16 matrices clearly faster than fp32 (AVX-512 BF16 / AMX do; most don't)."""
    global _CPU_BF16_FASTER
    if _CPU_BF16_FASTER is None:
        import torch
        cpu = torch.device("cpu")
        _CPU_BF16_FASTER = measure_matmul_peak(cpu, torch.bfloat16, n=1024, reps=3) > \
            1.2 * measure_matmul_peak(cpu, torch.float32, n=1024, reps=3)
    return _CPU_BF16_FASTER


def parse_dtype(name, device_type):
    """--dtype: 'auto' = bf16 on CUDA, bf16 on a CPU whose bf16 matmuls measure faster, else fp32."""
    import torch
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name == "auto":
        if device_type == "cuda" or (device_type == "cpu" and cpu_bf16_is_faster()):
            return torch.bfloat16
        return torch.float32
    if name not in names:
        raise ValueError(f"--dtype must be one of auto, {', '.join(names)}; got {name!r}")
    return names[name]


class DummyWandb:
    """Stands in for a wandb run when no --run name is given: logging goes nowhere."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def get_git_commit():
    """The checkout's commit (with '-dirty' if it has local changes), or None outside a git repo."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity).
GPU_BF16_PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
                 "rtx 4090": 165e12, "rtx 3090": 71e12}


def gpu_peak_flops(name):
    """The bf16 peak of a GPU named like torch.cuda.get_device_name() (or 'h100'), None if unknown."""
    lowered = name.lower()
    for key, flops in GPU_BF16_PEAK.items():
        if key in lowered:
            return flops
    return None


def measure_matmul_peak(device, dtype, n=2048, reps=5):
    """Measured FLOP/s of an n x n matmul in `dtype` on `device`: the ceiling MFU is reported against on CPUs."""
    import torch
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
