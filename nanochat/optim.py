"""
The optimizers: AdamW (embedding, lm_head) and Muon (every 2-D matrix in the blocks).

Each is ONE implementation that is also the distributed one. Training does not wrap the model in
DDP: after backward, each optimizer averages the gradients across ranks itself, with a
reduce-scatter, so that every rank only updates (and keeps state for) its own share of the work,
then all-gathers the updated parameters. With one process the collectives are identities and the
same code runs. Because the averaging happens inside `step`, anything that inspects gradients
(clipping, norms) must do so in here, after the reduction, never on local gradients.

- AdamW shards each parameter along dim 0 (ZeRO-2 style): rank r owns rows [r*n/W, (r+1)*n/W).
  A parameter whose dim 0 does not divide by the world size is not sharded: every rank averages
  the whole gradient and updates the whole parameter (same result, more work).
- Muon shards whole matrices: of each group of W same-shaped matrices, rank r orthogonalises the
  r-th. Its update is the orthogonalisation of the Nesterov momentum (Newton-Schulz, or Polar
  Express), optionally normalised per neuron (NorMuon), with optional cautious weight decay; every
  piece of state (momentum, second moments) lives with the matrix's owner rank and is checkpointed
  with the optimizer's state.

The optimizers take the values of the moment (lr, momentum, weight_decay in each group); how those
change over a run is decided outside (the schedules below).
"""

import functools
import math

import numpy as np
import torch
import torch.distributed as dist


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_scatter_mean(inputs):
    """inputs: a list of W tensors (one per rank's share). Returns this rank's share, averaged over ranks."""
    rank, world = _world()
    if not dist.is_available() or not dist.is_initialized():
        return inputs[0]
    if dist.get_backend() == "nccl":
        out = torch.empty_like(inputs[rank])
        dist.reduce_scatter(out, inputs, op=dist.ReduceOp.SUM)
    else:
        # gloo has no reduce_scatter: an all_reduce of the stack, keeping our share, is the same sum
        stacked = torch.stack(inputs)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        out = stacked[rank]
    return out.div_(world)


def _all_gather_into(outputs, local):
    """outputs: a list of W tensors to fill with every rank's `local` (ours included)."""
    _, world = _world()
    if not dist.is_available() or not dist.is_initialized():
        if outputs[0] is not local:
            outputs[0].copy_(local)
        return
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    for out, g in zip(outputs, gathered):
        out.copy_(g)


class AdamW(torch.optim.Optimizer):
    """AdamW with torch.optim.AdamW's exact update, sharded along dim 0 across ranks."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        rank, world = _world()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                shardable = p.size(0) % world == 0
                if shardable:
                    rows = p.size(0) // world
                    grad = _reduce_scatter_mean(list(p.grad.split(rows)))
                    param = p[rank * rows:(rank + 1) * rows]
                else:
                    grad = p.grad
                    if world > 1:
                        grad = p.grad.clone()
                        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                        grad.div_(world)
                    param = p
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                t = state["step"].item()
                grad = grad.float()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # torch's form: eps is added to the bias-corrected sqrt(v), and the first moment's
                # correction goes into the step size
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(group["eps"])
                step_size = group["lr"] / (1 - beta1 ** t)
                update = param.float().mul(1 - group["lr"] * group["weight_decay"]).addcdiv_(m, denom, value=-step_size)
                param.copy_(update)
                if shardable and world > 1:
                    _all_gather_into(list(p.data.split(rows)), param.clone())


@torch.no_grad()
def _odd_quintic_iterations(G, coefficients, dtype):
    """X <- a X + b (X X^T) X + c (X X^T)^2 X for each (a, b, c), from G scaled to spectral norm <= 1: every
    singular value s goes through s -> a s + b s^3 + c s^5, the singular vectors stay G's."""
    assert G.ndim >= 2
    if dtype is None:
        dtype = torch.bfloat16 if G.device.type == "cuda" or G.dtype == torch.bfloat16 else torch.float32
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # X X^T on the smaller side
        X = X.mT
    # scale so the spectral norm is at most 1 (the Frobenius norm bounds it)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """
    An approximately orthogonal matrix with G's singular vectors (U V^T of G = U S V^T), by a quintic
    Newton-Schulz iteration whose coefficients are tuned to push every singular value into roughly
    [0.7, 1.2] in 5 steps rather than to converge exactly (Jordan et al., Muon). dtype: bf16 by default
    on GPU (and asked for on CPUs with fast bf16): the iteration is self-correcting, so low precision
    costs nothing; fp32 by default elsewhere.
    """
    return _odd_quintic_iterations(G, [(3.4445, -4.7750, 2.0315)] * steps, dtype)


def _minimax_quintic(lo, hi):
    """
    The odd quintic p(x) = a x + b x^3 + c x^5 closest to 1 on [lo, hi] in the max norm. By the
    equioscillation theorem the best one reaches 1 - E, 1 + E, 1 - E, 1 + E at lo, its interior maximum
    q, its interior minimum r, and hi; Remez exchange: solve for (a, b, c, E) at the four points, move
    q and r to the new p's extrema (the roots of p'), repeat until E stops changing.
    """
    if hi - lo <= 1e-6 * hi:  # a point: the quintic with p(hi) = 1 and p' = p'' = 0 there
        return 15 / (8 * hi), -10 / (8 * hi ** 3), 3 / (8 * hi ** 5)
    q, r, E = lo + (hi - lo) / 4, lo + 3 * (hi - lo) / 4, math.inf
    for _ in range(100):
        points = ((lo, 1.0), (q, -1.0), (r, 1.0), (hi, -1.0))  # p(x) + sign * E = 1
        a, b, c, new_E = np.linalg.solve(np.array([[x, x ** 3, x ** 5, sign] for x, sign in points]), np.ones(4))
        root = math.sqrt(9 * b * b - 20 * a * c)  # p'(x) = a + 3b x^2 + 5c x^4 = 0, a quadratic in x^2
        q, r = sorted(math.sqrt((-3 * b + sign * root) / (10 * c)) for sign in (-1.0, 1.0))
        converged, E = abs(new_E - E) < 1e-15, new_E
        if converged:
            break
    return float(a), float(b), float(c)


@functools.lru_cache(maxsize=None)
def polar_express_coefficients(steps=5, lo=1e-3, cushion=0.02407327424182761, safety=0.02):
    """
    Polar Express (Amsel et al. 2025, arXiv 2505.16932): one odd quintic per iteration, each the minimax
    approximation of 1 on the interval where the singular values are at that point, so the worst case
    improves as fast as a degree-5 step allows. Start: singular values in [lo, 1] after scaling by the
    Frobenius norm. Each polynomial is made for [max(lo, cushion * hi), hi * (1 + safety)]: the cushion
    (the paper's value) keeps early polynomials from being tuned to tiny values at the others' expense, the
    safety factor lets values that rounding (bf16) pushed a little past the bound land in the band too;
    the polynomial is then rescaled so that lo and the top map symmetrically around 1. Returns
    (coefficients, (lo, hi)): the final band that every singular value in [lo, 1] ends in.
    """
    hi, coefficients = 1.0, []
    for _ in range(steps):
        top = hi * (1 + safety)
        a, b, c = _minimax_quintic(max(lo, cushion * top), top)
        quintic = lambda x: a * x + b * x ** 3 + c * x ** 5  # noqa: E731
        k = 2 / (quintic(lo) + quintic(top))  # p's maximum on [lo, top] is 1 + E, reached at top (equioscillation)
        coefficients.append((a * k, b * k, c * k))
        lo, hi = k * quintic(lo), 2 - k * quintic(lo)
    return tuple(coefficients), (lo, hi)


def polar_express(G, steps=5, dtype=None):
    """G's polar factor U V^T, approximately: Polar Express's `steps` quintics (same cost as Newton-Schulz)."""
    return _odd_quintic_iterations(G, polar_express_coefficients(steps)[0], dtype)


def normuon_scale(update, second_moment, beta2, eps=1e-10):
    """
    NorMuon (arXiv 2510.05491): the orthogonalised update divided per neuron by the root of a running mean
    of its squares, kept along the smaller side (per row when rows <= cols, else per column; updated in
    place), then rescaled to the update's own Frobenius norm, so only the balance between neurons changes.
    """
    per_row = update.size(-2) <= update.size(-1)
    second_moment.lerp_(update.float().square().mean(dim=-1 if per_row else -2, keepdim=True), 1 - beta2)
    scaled = update.float() / (second_moment.sqrt() + eps)
    return scaled * (update.float().norm() / (scaled.norm() + eps))


ORTHOGONALIZERS = {"newton_schulz": zeropower_via_newtonschulz5, "polar_express": polar_express}


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices: SGD with Nesterov momentum
    whose update is replaced by its nearest (semi-)orthogonal matrix, scaled by sqrt(max(1, rows/cols))
    so that its RMS does not depend on the matrix's aspect ratio.
    orthogonalize: "newton_schulz" (Muon's fixed quintic) or "polar_express" (per-step minimax quintics).
    beta2: NorMuon's per-neuron normalisation with this decay of the second moment (None: off).
    weight_decay: decoupled decay (p -= lr * weight_decay * p); cautious: only where the update and the
    weight have the same sign, i.e. where the step already shrinks the weight (arXiv 2510.12402).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None,
                 orthogonalize="newton_schulz", beta2=None, weight_decay=0.0, cautious=True):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only takes 2-D parameters; use AdamW for the rest")
        if orthogonalize not in ORTHOGONALIZERS:
            raise ValueError(f"orthogonalize must be one of {sorted(ORTHOGONALIZERS)}, got {orthogonalize!r}")
        # one group per shape, so that W same-shaped matrices can be reduce-scattered as a stack
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, beta2=beta2,
                                      weight_decay=weight_decay, cautious=cautious))
        self.ns_dtype = ns_dtype  # None: bf16 on GPU, fp32 elsewhere (see zeropower_via_newtonschulz5)
        self.orthogonalize = ORTHOGONALIZERS[orthogonalize]

    @torch.no_grad()
    def step(self):
        rank, world = _world()
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world):
                chunk = params[base:base + world]
                # pad the last chunk with zeros so every rank takes part in every collective
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
                grads += [torch.zeros_like(chunk[0])] * (world - len(chunk))
                grad = _reduce_scatter_mean(grads)
                if rank < len(chunk):
                    p = chunk[rank]
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
                    buf = state["momentum_buffer"]
                    buf.lerp_(grad.float(), 1 - group["momentum"])
                    g = torch.lerp(grad.float(), buf, group["momentum"]) if group["nesterov"] else buf
                    g = self.orthogonalize(g, steps=group["ns_steps"], dtype=self.ns_dtype).float()
                    if group["beta2"] is not None:
                        if "second_moment" not in state:
                            rows, cols = p.shape
                            state["second_moment"] = torch.zeros((rows, 1) if rows <= cols else (1, cols),
                                                                 dtype=torch.float32, device=p.device)
                        g = normuon_scale(g, state["second_moment"], group["beta2"])
                    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    weight = p.float()
                    if group["weight_decay"]:
                        decay = weight * group["weight_decay"]
                        if group["cautious"]:  # the step moves the weight by -g: decay only where g shares its sign
                            decay = decay * ((g * weight) > 0)
                        weight.sub_(decay, alpha=group["lr"])
                    local = weight.add_(g, alpha=-group["lr"] * scale).to(p.dtype)
                else:
                    local = torch.zeros_like(chunk[0])
                outputs = [p.data for p in chunk] + [torch.empty_like(chunk[0]) for _ in range(world - len(chunk))]
                _all_gather_into(outputs, local)
