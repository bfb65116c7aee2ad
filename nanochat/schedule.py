"""
Every number of the optimizers that is decided by the recipe or changes over a run, for every
training stage, in one place:

- the peak learning rates: the flags' values at the reference width (768), scaled by
  1/sqrt(width / 768) for the AdamW groups (embedding, lm_head; not the scalars: one value per layer
  whatever the width), times the stage's share of them
  (post-training stages start from a fraction of the base run's LRs; a batch picked by the batch
  rule scales them by sqrt(batch / 2^19));
- the batch rule (base_train --total-batch-size -1): the batch from the model size, and Muon's
  weight decay scaled from its depth-12 value;
- the LR over time: linear warmup over `warmup_steps`, flat, then a linear warmdown over the last
  `warmdown_ratio` of the run to `final_lr_frac` of the peak;
- weight decay over time: the peak value, constant or decayed to 0 by a cosine over the run;
- Muon's momentum over time: a ramp from `start` to `peak` over `ramp_steps`, then, during the
  warmdown, a linear move to `warmdown` (None: stays at the peak).

A stage builds a Schedule from its flags and calls `apply(optimizers, step)` before each step; the
optimizers only ever see the values of the moment (group["lr"], group["weight_decay"],
group["momentum"]). The values depend on the step alone, so a resumed run continues exactly.
"""

import math
from dataclasses import dataclass

REFERENCE_WIDTH = 768  # the AdamW LRs were tuned at this model width
# The batch rule, from nanochat's 2026 measurements at GPU scale (d12-d26): the best batch grows as ~D^0.383 with
# the training tokens D and is 2^19 tokens at depth 12, where the LRs were tuned; LRs scale as sqrt(B / 2^19).
REFERENCE_BATCH = 2**19
REFERENCE_DEPTH = 12
BATCH_EXPONENT = 0.383
# AdamW for the architecture's scalars (gpt.GPT.param_groups 'scalars': lambdas and gates): modded-nanogpt's Adam
# group for its scalar parameters (lr 0.04, betas (0.8, 0.95), no weight decay), tuned at width 768
SCALAR_LR = 0.04
SCALAR_BETAS = (0.8, 0.95)
# the residual lambdas (--resid-mix) multiply the residual stream at every layer, so a step on them compounds through
# the depth: nanochat measured that they need ~100x less LR than the additive x0 lambdas (dev/LOG.md 2026-01-11)
RESID_LR_FRACTION = 0.01


def auto_batch_size(tokens, reference_tokens, unit):
    """The power of two nearest REFERENCE_BATCH * (tokens / reference_tokens)^BATCH_EXPONENT (reference_tokens: what
    the depth-12 model trains on under the same rule), rounded to a multiple of `unit` (one micro-batch per rank)."""
    batch = 2 ** round(math.log2(REFERENCE_BATCH * (tokens / reference_tokens) ** BATCH_EXPONENT))
    return max(unit, round(batch / unit) * unit)


def batch_lr_scale(batch):
    """The LR factor of a batch picked by the rule: sqrt(batch / REFERENCE_BATCH)."""
    return math.sqrt(batch / REFERENCE_BATCH)


def batch_weight_decay_scale(batch, tokens, reference_tokens):
    """Muon's weight decay factor for a run of `tokens` tokens at `batch` (the batch rule's) against depth 12 at
    REFERENCE_BATCH, where its value was tuned. The AdamW-style decay keeps the time scale B / (lr * decay * D)
    fixed across scales (Wang & Aitchison, arXiv 2405.13698; nanochat's 2026 rule); with lr ~ sqrt(B) that is
    decay ~ sqrt(B / REFERENCE_BATCH) * reference_tokens / tokens."""
    return math.sqrt(batch / REFERENCE_BATCH) * reference_tokens / tokens


def peak_lrs(n_embd, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, share=1.0, scalar_lr=None):
    """Peak LR of each parameter group: {'matrix', 'embedding', 'lm_head'}, and 'scalars' when scalar_lr is given."""
    width_scale = (n_embd / REFERENCE_WIDTH) ** -0.5
    lrs = {"matrix": matrix_lr * share, "embedding": embedding_lr * width_scale * share,
           "lm_head": unembedding_lr * width_scale * share}
    if scalar_lr is not None:
        lrs["scalars"] = scalar_lr * share
    return lrs


@dataclass(frozen=True)
class Momentum:
    """Muon's momentum over a run (see the module docstring)."""
    start: float = 0.85
    peak: float = 0.95
    ramp_steps: int = 300
    warmdown: float | None = None

    @classmethod
    def constant(cls, value):
        return cls(start=value, peak=value, ramp_steps=0)


@dataclass(frozen=True)
class Schedule:
    num_iterations: int
    warmup_steps: int = 0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    weight_decay_shape: str = "constant"  # or "cosine": decayed to 0 over the run
    momentum: Momentum = Momentum()

    def __post_init__(self):
        if self.num_iterations < 1:
            raise ValueError(f"a schedule needs at least one step, got {self.num_iterations}")
        if not 0 <= self.warmdown_ratio <= 1 or not 0 <= self.final_lr_frac <= 1 or self.warmup_steps < 0:
            raise ValueError("warmdown_ratio and final_lr_frac must lie in [0, 1], warmup_steps must be >= 0")
        if self.warmup_steps + self.warmdown_steps > self.num_iterations:
            raise ValueError(f"{self.warmup_steps} warmup + {self.warmdown_steps} warmdown steps do not fit in "
                             f"{self.num_iterations} steps")
        if self.weight_decay_shape not in ("constant", "cosine"):
            raise ValueError(f"weight_decay_shape must be constant or cosine, got {self.weight_decay_shape!r}")

    @property
    def warmdown_steps(self):
        return round(self.warmdown_ratio * self.num_iterations)

    def warmdown_progress(self, step):
        """0 until the warmdown starts, then rising linearly to 1 at the last step."""
        start = self.num_iterations - self.warmdown_steps
        return 0.0 if step <= start else (step - start) / self.warmdown_steps

    def lr_multiplier(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = self.warmdown_progress(step)
        return (1 - progress) + progress * self.final_lr_frac

    def weight_decay_multiplier(self, step):
        if self.weight_decay_shape == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step / self.num_iterations, 1.0)))

    def muon_momentum(self, step):
        m = self.momentum
        frac = min(step / m.ramp_steps, 1.0) if m.ramp_steps > 0 else 1.0
        value = (1 - frac) * m.start + frac * m.peak
        if m.warmdown is not None:
            progress = self.warmdown_progress(step)
            value = (1 - progress) * value + progress * m.warmdown
        return value

    def apply(self, optimizers, step):
        """Sets every group's values for `step` from its peaks (initial_lr, initial_weight_decay: recorded when
        the optimizers were made, see record_peaks, and saved with their state). Returns the LR multiplier."""
        lrm, wdm, momentum = self.lr_multiplier(step), self.weight_decay_multiplier(step), self.muon_momentum(step)
        for opt in optimizers:
            for group in opt.param_groups:
                # checkpoints from before weight decay was scheduled hold a constant weight_decay: that is the peak
                group.setdefault("initial_weight_decay", group["weight_decay"])
                group["lr"] = group["initial_lr"] * lrm
                group["weight_decay"] = group["initial_weight_decay"] * wdm
                if "momentum" in group:  # Muon's groups
                    group["momentum"] = momentum
        return lrm


def record_peaks(optimizers):
    """Remember each group's lr and weight_decay as given at construction: the peaks the schedule scales."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"], group["initial_weight_decay"] = group["lr"], group["weight_decay"]
    return optimizers


# -------------------------------------------------------------------------------------------------
# base_train's recipe flags: every default with its source. "2026": the values of nanochat's 2026 GPU-scale tuning
# (d12-d26, 8xH100) and of the papers named; bench.recipe measures each piece at CPU scale (bench/README.md).


def add_recipe_args(p):
    """The pretraining recipe's flags (base_train): AdamW's groups, Muon, and the schedules over the run."""
    for group in ("embedding", "unembedding"):  # AdamW's groups each have their own betas and decay
        name = group.replace("unembedding", "lm_head")
        p.add_argument(f"--{group}-betas", type=float, nargs=2, default=[0.8, 0.95], metavar=("BETA1", "BETA2"),
                       help=f"AdamW betas of the {name}")
        p.add_argument(f"--{group}-weight-decay", type=float, default=0.0, help=f"AdamW weight decay of the {name}")
    p.add_argument("--scalar-lr", type=float, default=SCALAR_LR, help="AdamW LR of the architecture's scalars and "
                   "gates (--resid-mix, --smear, --backout, --value-embeds; modded-nanogpt's; not decayed; the residual "
                   "lambdas of --resid-mix at RESID_LR_FRACTION of it)")
    p.add_argument("--scalar-betas", type=float, nargs=2, default=list(SCALAR_BETAS), metavar=("BETA1", "BETA2"),
                   help="AdamW betas of the scalars")
    p.add_argument("--muon-weight-decay", type=float, default=0.2,  # 2026: 0.2 at d12 (arXiv 2510.12402's decay)
                   help="Muon's decoupled weight decay (block matrices); with the batch rule, the value at depth 12, "
                        "scaled to this run (batch_weight_decay_scale)")
    p.add_argument("--no-cautious", dest="cautious", action="store_false",  # cautious: arXiv 2510.12402
                   help="Muon's weight decay everywhere, not only where the update shares the weight's sign")
    p.add_argument("--weight-decay-schedule", default="cosine", choices=["constant", "cosine"],  # 2026: cosine to 0
                   help="weight decay over the run: constant, or a cosine to 0")
    p.add_argument("--orthogonalize", default="polar_express", choices=["newton_schulz", "polar_express"],
                   help="Muon's orthogonalisation (Polar Express: Amsel et al., arXiv 2505.16932)")
    p.add_argument("--normuon-beta2", type=float, default=0.9,  # 2026: 0.9 (NorMuon, arXiv 2510.05491)
                   help="NorMuon's per-neuron normalisation (0: off)")
    p.add_argument("--momentum", type=float, nargs=3, default=[0.85, 0.97, 400], metavar=("START", "PEAK", "STEPS"),
                   help="Muon's momentum: ramped from START to PEAK over STEPS steps (2026: 0.85 -> 0.97 over 400)")
    p.add_argument("--momentum-warmdown", type=float, default=0.90,  # 2026: 0.90
                   help="Muon's momentum moves linearly to this value during the LR warmdown (PEAK: it stays there)")
    p.add_argument("--warmup-steps", type=int, default=40,  # 2026: ~40 steps
                   help="steps of linear LR warmup (fewer when the run is too short for it and the warmdown)")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="share of steps of linear LR warmdown (2026: 0.65)")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end, as a share of the peak (2026: 5%%)")


def base_schedule(args, num_iterations):
    """The Schedule of add_recipe_args' flags for a run of num_iterations steps: the warmup shortened to what the
    warmdown leaves of a short run (a few-step test run keeps the default flags); a bad value is a one-line error."""
    warmdown = round(args.warmdown_ratio * num_iterations)
    warmup = max(0, min(args.warmup_steps, num_iterations - warmdown))
    start, peak, ramp = args.momentum
    try:
        return Schedule(num_iterations, warmup, args.warmdown_ratio, args.final_lr_frac, args.weight_decay_schedule,
                        Momentum(start, peak, int(ramp), args.momentum_warmdown))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
