"""
Checkpoints: save, find, verify and load model weights, optimizer state, data position and metadata.

A step's files, in <checkpoints>/<model_tag>/:
    model_{step:06d}.safetensors   weights (rank 0), keys without torch.compile's `_orig_mod.` prefix
    rank{r}_{step:06d}.pt          each rank's optimizer state shards + its dataloader position
    meta_{step:06d}.json           written LAST: config, step, flags, world size, tokenizer fingerprint,
                                   git commit, and the sha256 of every other file of the step

A step exists only when its meta file does, and each file is checked against its hash before use,
so a crash mid-save (or a corrupted file) is never loaded as valid; the error names the file.
Nothing loaded can run code: safetensors, json, and torch.load(weights_only=True).
"""

import hashlib
import json
import os
import re

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nanochat.common import atomic_write, get_base_dir, get_git_commit, print0

SOURCES = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
           "rl": "chatrl_checkpoints"}
PRODUCERS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft",
             "rl": "scripts.chat_rl"}
META_RE = re.compile(r"meta_(\d{6})\.json")


def _dist_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _write(path, data):
    with atomic_write(path, "wb") as f:
        f.write(data)
    return _sha256(data)


def clean_state_dict(model):
    """The model's weights on CPU, contiguous, with torch.compile's prefix removed (removeprefix, never lstrip)."""
    return {k.removeprefix("_orig_mod."): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(checkpoint_dir, step, model, optimizers, meta, dataloader_state=None, rank=None):
    """
    Every rank calls this. Rank 0 writes the weights, each rank its own optimizer/data file, then
    (after all ranks are done) rank 0 writes meta with all files' hashes. Returns the meta path.
    """
    r, world = _dist_world()
    rank = r if rank is None else rank
    os.makedirs(checkpoint_dir, exist_ok=True)
    hashes = {}
    if rank == 0:
        name = f"model_{step:06d}.safetensors"
        hashes[name] = _write(os.path.join(checkpoint_dir, name), save_safetensors(clean_state_dict(model)))
    if optimizers or dataloader_state is not None:
        import io
        buffer = io.BytesIO()
        torch.save({"optimizers": [opt.state_dict() for opt in (optimizers or [])],
                    "dataloader": dataloader_state}, buffer)
        name = f"rank{rank}_{step:06d}.pt"
        hashes[name] = _write(os.path.join(checkpoint_dir, name), buffer.getvalue())
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, hashes)  # also the barrier: every rank's file is on disk
        hashes = {k: v for h in gathered for k, v in h.items()}
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if rank == 0:
        from nanochat.tokenizer import get_tokenizer
        fingerprint = meta.get("tokenizer") or get_tokenizer().fingerprint()
        full = dict(meta, step=step, world_size=world, tokenizer=fingerprint, git_commit=get_git_commit(),
                    files=hashes)
        with atomic_write(meta_path, "w") as f:
            json.dump(full, f, indent=2, default=str)
    if world > 1:
        dist.barrier()  # nobody goes on (or exits) before the step is complete
    return meta_path


def find_last_step(checkpoint_dir):
    """The highest step whose meta file exists (a step without meta was never completed)."""
    steps = []
    if os.path.isdir(checkpoint_dir):
        steps = [int(m.group(1)) for m in map(META_RE.fullmatch, os.listdir(checkpoint_dir)) if m]
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
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
    path = os.path.join(checkpoint_dir, name)
    expected = meta.get("files", {}).get(name)
    if expected is None:
        raise ValueError(f"checkpoint file {path} is not listed in its meta file; the checkpoint is incomplete")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    with open(path, "rb") as f:
        data = f.read()
    if _sha256(data) != expected:
        raise ValueError(f"checkpoint file {path} is corrupt or truncated (sha256 differs from its meta file)")
    return data


def load_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at step {step}: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"checkpoint meta file {path} is corrupt: {e}") from e


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=None):
    """Returns (model_state, optimizer_states or None, dataloader_state or None, meta), every file verified."""
    r, world = _dist_world()
    rank = r if rank is None else rank
    meta = load_meta(checkpoint_dir, step)
    data = _read_verified(checkpoint_dir, f"model_{step:06d}.safetensors", meta)
    model_state = {k: v.to(device) for k, v in load_safetensors(data).items()}
    optimizer_states = dataloader_state = None
    if load_optimizer:
        if meta.get("world_size") != world:
            raise ValueError(f"checkpoint {checkpoint_dir} step {step} was saved by {meta.get('world_size')} "
                             f"processes and this run has {world}: resuming needs the same world size "
                             f"(each rank holds its own optimizer shard and data position)")
        import io
        blob = _read_verified(checkpoint_dir, f"rank{rank}_{step:06d}.pt", meta)
        state = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
        optimizer_states, dataloader_state = state["optimizers"], state["dataloader"]
    return model_state, optimizer_states, dataloader_state, meta


def build_model(checkpoint_dir, step, device, phase="eval"):
    """(model, tokenizer, meta) from a checkpoint; fp32 weights; the tokenizer must be the one it was trained with."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    device = torch.device(device)
    model_state, _, _, meta = load_checkpoint(checkpoint_dir, step, device)
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # buffers (rotary tables) get their real values; weights are overwritten below
    model.load_state_dict({k: v.float() for k, v in model_state.items()}, strict=True)
    model.eval() if phase == "eval" else model.train()
    tokenizer = get_tokenizer()
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if tokenizer.fingerprint() != meta.get("tokenizer"):
        raise ValueError(f"the checkpoint {meta_path} was trained with tokenizer {meta.get('tokenizer')}, but "
                         f"{os.path.join(get_base_dir(), 'tokenizer')} holds tokenizer {tokenizer.fingerprint()}; "
                         f"restore the original tokenizer or retrain the model")
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.get_vocab_size()} != model vocab {config.vocab_size} ({meta_path})")
    return model, tokenizer, meta


def checkpoint_dir_for(source, model_tag=None):
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
        raise FileNotFoundError(f"no checkpoint folder {checkpoint_dir} (model tag {model_tag!r})")
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
