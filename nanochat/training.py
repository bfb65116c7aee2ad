"""
The optimizer step every training stage shares (base, mid, SFT, RL), and its schedule plumbing.

One step = forward/backward over a few micro-batches, then each optimizer steps once. The objective
is always a token-weighted mean over the whole step, all ranks and micro-batches together:

    loss = sum over valid target tokens t of  w_t * CE_t  /  (number of valid target tokens)

with w = 1 for pre/mid/SFT training and w = the row's advantage for RL. Targets of -1 (padding,
tokens the loss mask leaves out, tokens a tool forced) are not counted. Our optimizers average the
gradients over ranks (reduce-scatter mean), so each rank scales its summed loss by world / N:
their mean is then exactly the global objective, whatever the ranks' token counts (a 2-process run
equals a 1-process run over the same rows).
"""

import json
import os

import torch
import torch.distributed as dist

from nanochat.optim import Muon


def apply_schedule(optimizers, lr_multiplier, momentum=None):
    """Every group's lr = its initial_lr * lr_multiplier; Muon's momentum too when given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if momentum is not None and isinstance(opt, Muon):
                group["momentum"] = momentum


def _all_sum(value, device):
    """value (a number or a 0-d tensor) summed over the ranks, as a Python float."""
    t = torch.as_tensor(value, device=device).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def accumulate_gradients(model, micro_batches, autocast, world_size=1):
    """
    Forward/backward over micro_batches, a list of (x, y) or (x, y, weights) with x, y (B, T) long,
    y = -1 where no loss is taken, weights (B,) per row or (B, T) per token; the list may be empty
    on some ranks (RL drops rows that carry no signal). Leaves in .grad this rank's share of the
    gradient of the step objective. Returns (loss, tokens): the objective over every rank's valid
    tokens, and that count (0 when there is none anywhere: then no gradient is made).
    """
    device = micro_batches[0][0].device if micro_batches else model.get_device()
    local_tokens = sum((mb[1] != -1).sum() for mb in micro_batches)  # a tensor: one sync below, not one per batch
    tokens = int(_all_sum(local_tokens, device))
    if tokens == 0:
        return 0.0, 0
    scale = world_size / tokens
    step_loss = torch.zeros((), dtype=torch.float32, device=device)
    for mb in micro_batches:
        x, y = mb[0], mb[1]
        with autocast:
            per_token = model(x, y, loss_reduction="none")  # (B*T,), 0 where y == -1
        if len(mb) > 2 and mb[2] is not None:
            weights = mb[2]
            weights = weights[:, None].expand_as(y) if weights.dim() == 1 else weights
            per_token = per_token * weights.reshape(-1).to(per_token.dtype)
        loss_sum = per_token.sum()
        (loss_sum * scale).backward()
        step_loss += loss_sum.detach().float()
    if world_size > 1:  # a rank without rows still joins every gradient collective of the optimizers
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    return _all_sum(step_loss, device) / tokens, tokens


def train_step(model, optimizers, micro_batches, autocast, world_size=1):
    """One optimizer step (see accumulate_gradients). A step with no valid token anywhere changes nothing."""
    loss, tokens = accumulate_gradients(model, micro_batches, autocast, world_size)
    if tokens:
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)
    return loss, tokens


class MetricsLog:
    """metrics.jsonl in a checkpoint folder: one JSON object per logged step, appended by rank 0 only."""

    def __init__(self, checkpoint_dir, master=True):
        self.path = os.path.join(checkpoint_dir, "metrics.jsonl")
        self.master = master

    def append(self, record):
        if not self.master:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def eta_seconds(train_time, steps_done, steps_left):
    """Remaining time from the mean step time so far (nan before the first timed step)."""
    return train_time / steps_done * steps_left if steps_done > 0 else float("nan")


def resume_run(checkpoint_dir, model, optimizers, args, same_flags, device, rank):
    """
    Loads the latest checkpoint of checkpoint_dir (weights, this rank's optimizer state) for --resume
    and returns its saved loop state. The flags in same_flags must equal the checkpoint's: they decide
    which data each step sees, and a resume with others would silently train on a different run.
    """
    from nanochat.checkpoint import find_last_step, load_checkpoint
    try:
        step = find_last_step(checkpoint_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: nothing to resume: {e}")
    state, optim_states, _, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    saved = meta.get("flags", {})
    for flag in same_flags:
        if saved.get(flag) != getattr(args, flag):
            raise SystemExit(f"error: {checkpoint_dir} step {step} was trained with --{flag.replace('_', '-')} "
                             f"{saved.get(flag)}, this run has {getattr(args, flag)}: the data order would not "
                             f"continue; resume with the same flags or use a new --out-tag")
    model.load_state_dict(state, strict=True)
    for opt, s in zip(optimizers, optim_states):
        opt.load_state_dict(s)
    return meta["loop"]


# -------------------------------------------------------------------------------------------------
# what the post-training stages (mid, SFT, RL) share around their loops


def add_stage_args(parser, stage, init_lr_frac, seed, save_every=-1):
    """The flags every post-training stage has: output tag, wandb run, LRs, checkpointing, seed."""
    parser.add_argument("--out-tag", default=None, help=f"tag of the {stage} checkpoint (default: the input's tag)")
    parser.add_argument("--run", default=None, help="wandb run name (no wandb when unset)")
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="LR as a share of the base run's")
    parser.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (-1: end only)")
    parser.add_argument("--resume", action="store_true", help=f"continue the latest {stage} checkpoint of --out-tag")
    parser.add_argument("--stop-after-step", type=int, default=-1, help="save and exit at this step")
    parser.add_argument("--seed", type=int, default=seed, help="data order (and sampling) seed (positive)")


def parse_stage_args(parser, argv):
    args = parser.parse_args(argv)
    if args.seed <= 0:
        parser.error("--seed must be positive (seeds 1 and -1 give the same Python stream)")
    return args


def load_stage_model(args, stage, device):
    """
    (model, tokenizer, meta, checkpoint_dir): the input checkpoint (-i/--model-tag/--step) ready to
    train, and where this stage writes: <stage>_checkpoints/<--out-tag, else the input's tag>.
    """
    from nanochat.checkpoint import SOURCES, load_model
    from nanochat.common import get_base_dir
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    out_tag = args.out_tag or args.model_tag or meta.get("flags", {}).get("model_tag") or f"d{model.config.n_layer}"
    return model, tokenizer, meta, os.path.join(get_base_dir(), SOURCES[stage], out_tag)


def stage_optimizers(model, args, dtype):
    """The base run's optimizers (Muon + AdamW) at --init-lr-frac of the flags' LRs."""
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, ns_dtype=dtype)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * args.init_lr_frac
    return optimizers
