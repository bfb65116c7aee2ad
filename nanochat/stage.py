"""
What every training stage script (base, mid, SFT, RL) shares around its loop, so that each script
is flags -> objects -> its own loop -> save, and the loop's bookkeeping is written once:

- the flags every stage has (checkpointing, resume, stop, seed, wandb run, LRs);
- the model's architecture flags (base_train's; later stages take the checkpoint's);
- LoopState: the loop's counters and statistics, saved in a checkpoint's meta["loop"] and restored
  by --resume (each stage adds its own fields in a small subclass);
- resume_run: the latest checkpoint of a stage's folder back into model and optimizers;
- StopRequest: SIGTERM / Ctrl-C ask for a save at the next step boundary, all ranks stop at the same
  step, and the process then exits 128 + the signal, like the killed process it is;
- due() and LoopState.save_due: when a step evaluates / saves;
- StageLog: the printed line with ETA, metrics.jsonl, and wandb when --run is given.

The step itself (forward, backward, optimizer) is nanochat/training.py.
"""

import json
import math
import os
import signal
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from nanochat.checkpoint import (SOURCES, checkpoint_dir_for, find_last_step, load_checkpoint, load_model,
                                load_rank_state, rank_file, save_checkpoint)
from nanochat.common import DummyWandb, autocast_ctx, compute_cleanup, compute_init, get_base_dir, parse_dtype, print0
from nanochat.gpt import GPTConfig
from nanochat.schedule import SCALAR_BETAS, SCALAR_LR, peak_lrs

SMOOTHING = 0.9  # EMA factor of the logged loss


# -------------------------------------------------------------------------------------------------
# flags


def add_architecture_args(p):
    """base_train's flags for the optional additions (module docstring); off by default: today's architecture."""
    p.add_argument("--value-embeds", action="store_true", help="value embeddings on alternating layers, gated per "
                   "head: ResFormer's value residual (Zhou et al., arXiv 2410.17897) as modded-nanogpt uses it")
    p.add_argument("--resid-mix", action="store_true", help="per-layer learnable x = a_i x + b_i x0 before each block "
                   "(modded-nanogpt; nanochat 2026)")
    p.add_argument("--smear", action="store_true", help="gate the previous token's embedding into each token's "
                   "(modded-nanogpt's smear)")
    p.add_argument("--backout", action="store_true", help="subtract a learnable share of the mid-depth residual before "
                   "the final norm (modded-nanogpt)")
    p.add_argument("--qk-scale", type=float, default=1.0, help="q and k times this after QK-norm, the attention logits "
                   "by its square (modded-nanogpt raised its attention scale; e.g. 1.2; 1: none)")
    p.add_argument("--rope-base", type=float, default=10000.0, help="RoPE base (Su et al., arXiv 2104.09864: 10000; "
                   "larger ones, e.g. 100000, are common since; exports as rope_theta)")
    p.add_argument("--window-pattern", default="L", help="per layer, tiled: S = sliding window of --short-window keys, "
                   "L = full context; the last layer is always L (nanochat 2026: SSSL; modded-nanogpt)")
    p.add_argument("--short-window", type=int, default=0, help="keys an S layer sees (0: a quarter of --max-seq-len)")


def architecture_fields(args):
    """The GPTConfig fields add_architecture_args' flags give; a bad value is a one-line error."""
    fields = {name: getattr(args, name) for name in ("value_embeds", "resid_mix", "smear", "backout", "qk_scale",
                                                     "rope_base", "window_pattern", "short_window")}
    try:
        GPTConfig(**fields)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return fields


def add_lr_args(parser, inherit=False):
    """The LR flags (values at width 768). inherit: a post-training stage's, whose default is the input's recipe."""
    note = " (None: the input checkpoint's)" if inherit else ""
    for flag, default, what in (("--embedding-lr", 0.2, "AdamW LR of the embedding (scaled by width)"),
                                ("--unembedding-lr", 0.004, "AdamW LR of the lm_head (scaled by width)"),
                                ("--matrix-lr", 0.02, "Muon LR of the block matrices")):
        parser.add_argument(flag, type=float, default=None if inherit else default, help=what + note)


def add_loop_args(parser, stage, save_every, seed, seed_help):
    """The flags of every stage's loop: wandb run, checkpoints, resume, stop, seed."""
    parser.add_argument("--run", default=None, help="wandb run name (no wandb when unset)")
    parser.add_argument("--save-every", type=int, default=save_every, help="checkpoint every N steps (-1: end only)")
    parser.add_argument("--resume", action="store_true", help=f"continue the latest {stage} checkpoint of this tag")
    parser.add_argument("--stop-after-step", type=int, default=-1, help="save and exit at this step (schedule unchanged)")
    parser.add_argument("--seed", type=int, default=seed, help=seed_help)


def add_stage_args(parser, stage, init_lr_frac, seed, save_every=-1):
    """The flags every post-training stage (mid, SFT, RL) has: output tag, LRs, the loop's flags."""
    parser.add_argument("--out-tag", default=None, help=f"tag of the {stage} checkpoint (default: the input's tag)")
    add_lr_args(parser, inherit=True)
    parser.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="LR as a share of the base run's")
    add_loop_args(parser, stage, save_every, seed, "data order (and sampling) seed (positive)")


def parse_stage_args(parser, argv):
    args = parser.parse_args(argv)
    if args.seed <= 0:
        parser.error("--seed must be positive (seeds 1 and -1 give the same Python stream)")
    return args


def init_stage(args):
    """(ddp, rank, world_size, device, dtype, autocast) from --device-type and --dtype; prints the flags."""
    ddp, rank, _, world_size, device = compute_init(args.device_type)
    dtype = parse_dtype(args.dtype, device.type)
    print0(f"flags: {vars(args)}")
    return ddp, rank, world_size, device, dtype, autocast_ctx(device.type, dtype)


# -------------------------------------------------------------------------------------------------
# the post-training stages' model and optimizers


def load_stage_model(args, stage, device):
    """
    (model, tokenizer, meta, checkpoint_dir): the input checkpoint (-i/--model-tag/--step) ready to
    train, and where this stage writes: <stage>_checkpoints/<--out-tag, else the input's tag>.
    """
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    out_tag = args.out_tag or args.model_tag or meta.get("flags", {}).get("model_tag") or f"d{model.config.n_layer}"
    return model, tokenizer, meta, os.path.join(get_base_dir(), SOURCES[stage], out_tag)


def betas_per_group(adam_betas):
    """{'embedding': [b1, b2], 'lm_head': [b1, b2] (, 'scalars': ...)} from a pair per group, or from one pair for
    both (recipes recorded before the groups had their own)."""
    if not isinstance(adam_betas, dict):
        adam_betas = {"embedding": adam_betas, "lm_head": adam_betas}
    return {name: list(betas) for name, betas in adam_betas.items()}


def optimizer_recipe(lrs, orthogonalize="newton_schulz", normuon_beta2=None, adam_betas=(0.8, 0.95)):
    """What a checkpoint records of how it was trained, for the stages after it: the peak LRs (after width and batch
    scaling) and the optimizers' settings (adam_betas: see betas_per_group)."""
    return {"lrs": dict(lrs), "orthogonalize": orthogonalize, "normuon_beta2": normuon_beta2,
            "adam_betas": betas_per_group(adam_betas)}


def stage_optimizers(model, args, dtype, meta):
    """
    A post-training stage's optimizers: the input checkpoint's recipe (its peak LRs, Muon's orthogonalisation and
    NorMuon, AdamW's betas; no weight decay), an LR flag that is given replacing its group's, all at
    --init-lr-frac. Checkpoints from before recipes were recorded count as today's defaults. Returns
    (optimizers, recipe); the recipe goes into this stage's checkpoints, so the next stage inherits it too.
    """
    recipe = meta.get("recipe")
    if recipe is None:  # a checkpoint that records none: the defaults, and the scalars' where the model has them
        scalars = "scalars" in model.param_groups()
        recipe = optimizer_recipe(peak_lrs(model.config.n_embd, scalar_lr=SCALAR_LR if scalars else None))
        if scalars:
            recipe["adam_betas"]["scalars"] = list(SCALAR_BETAS)
    given = {"matrix": args.matrix_lr, "embedding": args.embedding_lr, "lm_head": args.unembedding_lr}
    flagged = peak_lrs(model.config.n_embd, *(v or 0.0 for v in given.values()))
    # the recipe's other groups (the architecture's 'scalars') keep their LR: no flag of this stage sets them
    recipe = dict(recipe, lrs={**recipe["lrs"], **{k: flagged[k] for k, v in given.items() if v is not None}},
                  adam_betas=betas_per_group(recipe["adam_betas"]))
    optimizers = model.setup_optimizers({k: v * args.init_lr_frac for k, v in recipe["lrs"].items()},
                                        adam_betas=recipe["adam_betas"], ns_dtype=dtype,
                                        orthogonalize=recipe["orthogonalize"], beta2=recipe["normuon_beta2"])
    return optimizers, recipe


# -------------------------------------------------------------------------------------------------
# the loop's state, and resuming it


def eta_seconds(train_time, steps_done, steps_left):
    """Remaining time from the mean step time so far (nan before the first timed step)."""
    return train_time / steps_done * steps_left if steps_done > 0 else float("nan")


@dataclass
class LoopState:
    """
    The loop's state between steps: a checkpoint stores it as meta["loop"] and --resume restores it,
    so a resumed run logs what the uninterrupted one would have. A stage adds its own fields (val
    loss, rewards, ...) in a subclass. train_time leaves out the first step of each process: it
    carries compilation and warm-up, and would make the ETA wrong for the whole run.
    """
    step: int = 0  # optimizer steps done; step s trains on the s-th batch
    train_time: float = 0.0  # seconds spent in timed steps
    smooth_loss: float = 0.0  # EMA of the step loss, not bias-corrected

    def __post_init__(self):
        self.start_step = self.step  # where this process began (not a field: not saved)

    @classmethod
    def from_dict(cls, saved):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def to_dict(self):
        return asdict(self)

    @property
    def timed(self):
        """Whether the last step counted toward train_time (not this process's first)."""
        return self.step - self.start_step > 1

    def end_step(self, loss, dt):
        """Counts one finished step of `dt` seconds; returns the bias-corrected smoothed loss."""
        if not math.isfinite(loss):
            raise SystemExit(f"error: loss is {loss} at step {self.step}; lower the LRs or check the data")
        self.step += 1
        if self.timed:
            self.train_time += dt
        self.smooth_loss = SMOOTHING * self.smooth_loss + (1 - SMOOTHING) * loss
        return self.smooth_loss / (1 - SMOOTHING ** self.step)

    def eta(self, num_iterations):
        return eta_seconds(self.train_time, self.step - self.start_step - 1, num_iterations - self.step)

    def save_due(self, last, stopping, save_every):
        """Save at the end, on a stop and every save_every steps, but not where this process started (on disk)."""
        return self.step != self.start_step and (last or stopping or due(save_every, self.step))


def due(every, step):
    """Whether an every-N-steps action (eval, save, sample) falls on this step; N <= 0: never."""
    return every > 0 and step % every == 0


def resume_run(state_class, checkpoint_dir, model, optimizers, args, same_flags, device, rank):
    """
    Loads the latest checkpoint of checkpoint_dir (weights, this rank's optimizer state) for --resume.
    Returns (loop state, the checkpoint's dataloader state or None). The flags in same_flags must
    equal the checkpoint's: they decide which data each step sees, and a resume with others would
    silently train on a different run.
    """
    try:
        step = find_last_step(checkpoint_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: nothing to resume: {e}")
    state, optim_states, dataloader_state, meta = load_checkpoint(checkpoint_dir, step, device,
                                                                  load_optimizer=True, rank=rank)
    if GPTConfig(**meta["model_config"]) != model.config:  # fields added since a checkpoint take their defaults
        raise SystemExit(f"error: checkpoint {checkpoint_dir} step {step} has config {meta['model_config']}, "
                         f"these flags make {vars(model.config)}")
    saved = meta.get("flags", {})
    for flag in same_flags:
        if saved.get(flag) != getattr(args, flag):
            raise SystemExit(f"error: {checkpoint_dir} step {step} was trained with --{flag.replace('_', '-')} "
                             f"{saved.get(flag)}, this run has {getattr(args, flag)}: the data order would not "
                             f"continue; resume with the same flags or use a new --out-tag")
    model.load_state_dict(state, strict=True)
    for opt, s in zip(optimizers, optim_states):
        opt.load_state_dict(s)
    print0(f"resumed from {checkpoint_dir} step {step}")
    return state_class.from_dict(meta["loop"]), dataloader_state


def load_optimizer_moments(optimizers, args, meta, device, rank, world_size):
    """
    A warm start from the input checkpoint's optimizer state (meta: the checkpoint load_stage_model loaded): this
    rank's per-parameter state (Muon's momentum and NorMuon's second moments, AdamW's moments and step counts)
    goes into `optimizers`, whose param groups (lr, initial_lr, betas, weight decay) stay this stage's, so the
    schedule runs from this stage's peaks. The input must have been saved with optimizer state, by as many ranks
    as this run has (each rank holds its own shard), for optimizers of the same layout; else a one-line error.
    """
    source_dir, step = checkpoint_dir_for(args.source, args.model_tag), meta["step"]
    where = f"{source_dir} step {step}"
    if rank_file(rank, step) not in meta.get("files", {}):
        raise SystemExit(f"error: {where} has no optimizer state (saved for inference only); drop --load-optimizer")
    if meta.get("world_size") != world_size:
        raise SystemExit(f"error: {where} was saved by {meta.get('world_size')} processes and this run has "
                         f"{world_size}: each rank loads its own optimizer shard; launch with --nproc_per_node="
                         f"{meta.get('world_size')} or drop --load-optimizer")
    try:
        saved = load_rank_state(source_dir, step, device, rank, meta)["optimizers"]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    layout = [[len(g["params"]) for g in opt.param_groups] for opt in optimizers]
    saved_layout = [[len(g["params"]) for g in s["param_groups"]] for s in saved]
    if saved_layout != layout:
        raise SystemExit(f"error: the optimizer state of {where} has groups of {saved_layout} parameters, this "
                         f"model's optimizers {layout}; drop --load-optimizer")
    # the model is the checkpoint's own, so with the same ranks and groups every state tensor fits its parameter;
    # torch maps the state by position and casts it to each parameter's device; the groups given are our own
    for opt, s in zip(optimizers, saved):
        opt.load_state_dict({"state": s["state"], "param_groups": opt.state_dict()["param_groups"]})
    print0(f"optimizer state from {where} (moments only; LRs are this stage's)")


def save_stage(checkpoint_dir, state, model, optimizers, args, meta, dataloader_state=None):
    """A checkpoint at state.step: model_config, flags and the loop state in meta, plus the stage's own fields."""
    meta = {"model_config": vars(model.config), "flags": vars(args), "loop": state.to_dict(), **meta}
    save_checkpoint(checkpoint_dir, state.step, model, optimizers, meta, dataloader_state=dataloader_state)
    print0(f"saved checkpoint {checkpoint_dir} step {state.step}")


# -------------------------------------------------------------------------------------------------
# stopping on a signal


class StopRequest:
    """
    SIGTERM (a scheduler's preemption, `kill`) and SIGINT (Ctrl-C) do not kill the run: they ask the
    loop to save at the next step boundary and stop. A second signal acts at once, unsaved.
    """

    def __init__(self, device):
        self.device = device
        self.signal = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum
        print0(f"received signal {signum}: will save a checkpoint after this step and exit")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, step, stop_after_step):
        """Whether the loop stops at this step: --stop-after-step reached, or a signal on any rank."""
        stopping = step == stop_after_step or self.signal is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # a signal may reach ranks at different steps
            flag = torch.tensor(int(stopping), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
        return stopping

    def finish(self, state, num_iterations, log):
        """After the loop: wandb and the process group closed; a run a signal stopped early exits 128 + signal."""
        finished = state.step == num_iterations
        if not finished:
            print0(f"stopped at step {state.step} (resume with --resume)")
        log.finish()
        compute_cleanup()
        if self.signal is not None and not finished:
            # saved and stopped early: exit like a killed process, so pipelines do not mark the stage done
            raise SystemExit(128 + self.signal)


# -------------------------------------------------------------------------------------------------
# logging


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


class StageLog:
    """A stage's log: one printed line per logged step (rank 0), metrics.jsonl, and wandb when --run is set."""

    def __init__(self, checkpoint_dir, args, project, master):
        self.metrics = MetricsLog(checkpoint_dir, master)
        self.wandb = DummyWandb()
        if args.run and master:
            import wandb  # here, not at the top: optional, and slow to import
            self.wandb = wandb.init(project=project, name=args.run, config=vars(args))

    def step(self, state, num_iterations, line, record, charts):
        """A trained step: 'step s/N (p%) | line | elapsed | ETA'; record (+ timing) to metrics.jsonl; charts to wandb."""
        eta = state.eta(num_iterations)
        print0(f"step {state.step:05d}/{num_iterations:05d} ({100 * state.step / num_iterations:.1f}%) | {line} | "
               f"elapsed {state.train_time / 60:.1f} m | ETA {eta / 60:.1f} m")
        self.metrics.append({"step": state.step, **record, "elapsed_s": state.train_time, "eta_s": eta})
        self.wandb.log({"step": state.step, **charts})

    def eval(self, step, line, record, charts):
        """An evaluation at `step`: 'step s | line'; record to metrics.jsonl; charts to wandb."""
        print0(f"step {step:05d} | {line}")
        self.metrics.append({"step": step, **record})
        self.wandb.log({"step": step, **charts})

    def finish(self):
        self.wandb.finish()
