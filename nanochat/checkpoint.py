"""
Checkpoints: save, find, verify and load model weights, optimizer state, data position and metadata.

A step's files, in <base_dir>/<stage>_checkpoints/<model_tag>/:
    model_{step:06d}.safetensors   weights (rank 0): fp32, CPU, contiguous, keys without torch.compile's
                                   `_orig_mod.` prefix
    rank{r}_{step:06d}.pt          each rank's optimizer state (its shards) + data position (+ RNG state)
    meta_{step:06d}.json           written LAST: step, model config, world size, tokenizer fingerprint,
                                   git commit, the caller's fields, and the sha256 of every other file

A step exists only when its meta file does, and every file is checked against its hash before use,
so a crash mid-save (or a file damaged later) is never loaded as valid; the error names the file.
Nothing loaded can run code: safetensors, json, and torch.load(weights_only=True).
"""

import hashlib
import io
import json
import os
import re
from dataclasses import asdict, is_dataclass

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nanochat.common import atomic_write, get_base_dir, get_git_commit, print0
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer

# -i/--source -> the folder under the base dir, and the stage script that fills it
SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
           "rl": "chatrl_checkpoints"}
PRODUCERS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft",
             "rl": "scripts.chat_rl"}
META_RE = re.compile(r"meta_(\d{6,})\.json")  # temp files (".meta_….json.xyz.tmp") never match


def _dist_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _write(path, data):
    """Atomically write bytes (temp + fsync + rename); returns their sha256 for the meta file."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return _sha256(data)


def model_file(step):
    return f"model_{step:06d}.safetensors"


def rank_file(rank, step):
    return f"rank{rank}_{step:06d}.pt"


def meta_file(step):
    return f"meta_{step:06d}.json"


def _unwrap(model):
    # DDP hides the model behind .module (keys "module.…"); torch.compile's prefix is handled on the keys
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def clean_state_dict(model):
    """The model's weights on CPU, contiguous, with torch.compile's prefix removed (removeprefix, never lstrip)."""
    return {k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous()
            for k, v in _unwrap(model).state_dict().items()}


def save_checkpoint(checkpoint_dir, step, model, optimizers, meta, dataloader_state=None, rank=None,
                    rng_state=None):
    """
    Every rank calls this (it is collective under torch.distributed). Rank 0 writes the weights, each
    rank its own optimizer/data file (none for an inference-only save: no optimizers, no data state),
    then, once every rank's file is on disk, rank 0 writes meta with all files' hashes. `meta` holds the
    caller's fields (model_config, flags, val_bpb, ...); model_config defaults to model.config.
    Returns the meta path.
    """
    r, world = _dist_world()
    rank = r if rank is None else rank
    os.makedirs(checkpoint_dir, exist_ok=True)
    meta_path = os.path.join(checkpoint_dir, meta_file(step))
    if rank == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # re-saving a step: it must not look complete while its files are replaced
    if world > 1:
        dist.barrier()
    hashes = {}
    if rank == 0:
        name = model_file(step)
        hashes[name] = _write(os.path.join(checkpoint_dir, name), save_safetensors(clean_state_dict(model)))
    if optimizers or dataloader_state is not None or rng_state is not None:
        buffer = io.BytesIO()
        torch.save({"optimizers": [opt.state_dict() for opt in (optimizers or [])],
                    "dataloader": dataloader_state, "rng": rng_state}, buffer)
        name = rank_file(rank, step)
        hashes[name] = _write(os.path.join(checkpoint_dir, name), buffer.getvalue())
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, hashes)  # also the barrier: every rank's file is on disk
        hashes = {k: v for h in gathered for k, v in h.items()}
    if rank == 0:
        full = dict(meta)
        if "model_config" not in full and is_dataclass(getattr(_unwrap(model), "config", None)):
            full["model_config"] = asdict(_unwrap(model).config)
        if "model_config" not in full:
            raise ValueError("save_checkpoint needs meta['model_config'] (the GPTConfig fields) to rebuild the model")
        if not full.get("tokenizer"):  # a caller may pass the fingerprint to spare loading the tokenizer
            from nanochat.tokenizer import get_tokenizer
            full["tokenizer"] = get_tokenizer().fingerprint()
        full.update(step=step, world_size=world, git_commit=get_git_commit(), files=hashes)
        with atomic_write(meta_path, "w") as f:
            json.dump(full, f, indent=2, default=str)  # default=str: flags may hold paths and the like
    if world > 1:
        dist.barrier()  # nobody goes on (or exits) before the step is complete
    return meta_path


def find_last_step(checkpoint_dir):
    """The highest step whose meta file exists (a step without meta was never completed)."""
    steps = []
    if os.path.isdir(checkpoint_dir):
        steps = [int(m.group(1)) for m in map(META_RE.fullmatch, os.listdir(checkpoint_dir)) if m]
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir} (no meta_<step>.json file)")
    return max(steps)


def find_largest_model_tag(checkpoints_dir):
    """Default tag: the deepest 'd<N>' model, else the most recently written folder."""
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise FileNotFoundError(f"no model folders in {checkpoints_dir}")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def _read_verified(checkpoint_dir, name, meta):
    """A file's bytes, read once and checked against the hash its meta file recorded."""
    path = os.path.join(checkpoint_dir, name)
    expected = meta.get("files", {}).get(name)
    if expected is None:
        raise ValueError(f"checkpoint file {path} is not listed in {meta_file(meta['step'])}: that step was saved "
                         f"without it (an inference-only save has no rank files)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    with open(path, "rb") as f:
        data = f.read()
    if _sha256(data) != expected:
        raise ValueError(f"checkpoint file {path} is corrupt or truncated (its sha256 differs from the one "
                         f"in {meta_file(meta['step'])})")
    return data


def load_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, meta_file(step))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no complete checkpoint at step {step}: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"checkpoint meta file {path} is corrupt: {e}") from e


def load_rank_state(checkpoint_dir, step, device, rank=None, meta=None):
    """This rank's {"optimizers", "dataloader", "rng"}; the world size must be the one that saved it."""
    r, world = _dist_world()
    rank = r if rank is None else rank
    meta = meta or load_meta(checkpoint_dir, step)
    if meta.get("world_size") != world:
        raise ValueError(f"checkpoint {checkpoint_dir} step {step} was saved by {meta.get('world_size')} processes "
                         f"and this run has {world}: resuming optimizer state needs the same world size (each "
                         f"rank holds its own optimizer shard and data position); launch with "
                         f"--nproc_per_node={meta.get('world_size')} or load the weights alone")
    blob = _read_verified(checkpoint_dir, rank_file(rank, step), meta)
    return torch.load(io.BytesIO(blob), map_location=device, weights_only=True)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=None):
    """
    Returns (model_state, optimizer_states or None, dataloader_state or None, meta), every file verified.
    rank: whose optimizer file to read (default: this process's rank, 0 without torch.distributed).
    """
    meta = load_meta(checkpoint_dir, step)
    data = _read_verified(checkpoint_dir, model_file(step), meta)
    model_state = {k: v.to(device) for k, v in load_safetensors(data).items()}
    optimizer_states = dataloader_state = None
    if load_optimizer:
        state = load_rank_state(checkpoint_dir, step, device, rank, meta)
        optimizer_states, dataloader_state = state["optimizers"], state["dataloader"]
    return model_state, optimizer_states, dataloader_state, meta


def build_model(checkpoint_dir, step, device, phase="eval"):
    """(model, tokenizer, meta) from a checkpoint; fp32 weights; the tokenizer must be the one it was trained with."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    device = torch.device(device)
    meta_path = os.path.join(checkpoint_dir, meta_file(step))
    meta = load_meta(checkpoint_dir, step)
    # the tokenizer first: a mismatch is the likelier mistake, and cheaper to find than reading the weights
    tokenizer = get_tokenizer()
    if tokenizer.fingerprint() != meta.get("tokenizer"):
        raise ValueError(f"the checkpoint {meta_path} was trained with tokenizer {meta.get('tokenizer')}, but "
                         f"{os.path.join(get_base_dir(), 'tokenizer')} holds tokenizer {tokenizer.fingerprint()}; "
                         f"restore the original tokenizer or retrain the model")
    config = GPTConfig(**meta["model_config"])
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {config.vocab_size} ({meta_path})")
    model_state, _, _, meta = load_checkpoint(checkpoint_dir, step, device)
    with torch.device("meta"):  # no memory, no init work: every value is set below
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) get their real values; weights are overwritten below
    model.load_state_dict({k: v.float() for k, v in model_state.items()}, strict=True)
    model.eval() if phase == "eval" else model.train()
    return model, tokenizer, meta


def checkpoint_dir_for(source, model_tag=None):
    """<base_dir>/<stage>_checkpoints/<model_tag>, the tag defaulting to the largest model of that stage."""
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; choose one of {', '.join(SOURCES)}")
    root = os.path.join(get_base_dir(), SOURCES[source])
    if not os.path.isdir(root) or not os.listdir(root):
        raise FileNotFoundError(f"no {source} checkpoints in {root}; run `python -m {PRODUCERS[source]}` first")
    return os.path.join(root, model_tag or find_largest_model_tag(root))


def load_model(source, device, phase="eval", model_tag=None, step=None):
    """Load a model by stage: source in base|mid|sft|rl, default tag = largest, default step = last."""
    checkpoint_dir = checkpoint_dir_for(source, model_tag)
    if not os.path.isdir(checkpoint_dir):
        root = os.path.dirname(checkpoint_dir)
        raise FileNotFoundError(f"no checkpoint folder {checkpoint_dir} (model tag {model_tag!r}); "
                                f"tags in {root}: {', '.join(sorted(os.listdir(root)))}")
    step = find_last_step(checkpoint_dir) if step is None else step
    print0(f"loading {checkpoint_dir} step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def add_checkpoint_args(parser, default_source="base"):
    """The flags every checkpoint-loading script shares: which checkpoint, and where/how to run it."""
    parser.add_argument("-i", "--source", default=default_source, choices=list(SOURCES), help="which stage's checkpoint")
    parser.add_argument("--model-tag", default=None, help="default: the largest model of that stage")
    parser.add_argument("--step", type=int, default=None, help="default: the last step")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    parser.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
