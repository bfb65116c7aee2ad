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
  r-th. Its update is the Newton-Schulz orthogonalisation of the Nesterov momentum.
"""

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
def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """
    An approximately orthogonal matrix with G's singular vectors (U V^T of G = U S V^T), by a quintic
    Newton-Schulz iteration whose coefficients are tuned to push every singular value into roughly
    [0.7, 1.2] in 5 steps rather than to converge exactly (Jordan et al., Muon). dtype: bf16 by default
    on GPU (and asked for on CPUs with fast bf16): the iteration is self-correcting, so low precision
    costs nothing; fp32 by default elsewhere.
    """
    assert G.ndim >= 2
    a, b, c = 3.4445, -4.7750, 2.0315
    if dtype is None:
        dtype = torch.bfloat16 if G.device.type == "cuda" or G.dtype == torch.bfloat16 else torch.float32
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    # scale so the spectral norm is at most 1 (the Frobenius norm bounds it)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """
    MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices: SGD with Nesterov momentum
    whose update is replaced by its nearest (semi-)orthogonal matrix, scaled by sqrt(max(1, rows/cols))
    so that its RMS does not depend on the matrix's aspect ratio.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ns_dtype=None):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only takes 2-D parameters; use AdamW for the rest")
        # one group per shape, so that W same-shaped matrices can be reduce-scattered as a stack
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # None: bf16 on GPU, fp32 elsewhere (see zeropower_via_newtonschulz5)

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
                    g = zeropower_via_newtonschulz5(g, steps=group["ns_steps"], dtype=self.ns_dtype)
                    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    local = p.float().add_(g.float(), alpha=-group["lr"] * scale).to(p.dtype)
                else:
                    local = torch.zeros_like(chunk[0])
                outputs = [p.data for p in chunk] + [torch.empty_like(chunk[0]) for _ in range(world - len(chunk))]
                _all_gather_into(outputs, local)


# -------------------------------------------------------------------------------------------------
# schedules (every training stage uses these; tests check their values at start, middle and end)


def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """
    Trapezoid: linear warmup from ~0 to 1 over the first warmup_ratio of the steps, flat at 1, then a
    linear warmdown to final_lr_frac over the last warmdown_ratio of the steps.
    """
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 at the start of the warmdown, 0 at the end
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300):
    """Muon's momentum ramps from `start` to `end` over the first ramp_steps steps."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end
