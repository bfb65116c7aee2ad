"""
The optimizer step every training stage shares (base, mid, SFT, RL). How the optimizers' values
change over a run is nanochat/schedule.py's; what the stages share around their loops is
nanochat/stage.py's.

One step = forward/backward over a few micro-batches, then each optimizer steps once. The objective
is always a token-weighted mean over the whole step, all ranks and micro-batches together:

    loss = sum over valid target tokens t of  w_t * CE_t  /  (number of valid target tokens)

with w = 1 for pre/mid/SFT training and w = the row's advantage for RL. Targets of -1 (padding,
tokens the loss mask leaves out, tokens a tool forced) are not counted. Our optimizers average the
gradients over ranks (reduce-scatter mean), so each rank scales its summed loss by world / N:
their mean is then exactly the global objective, whatever the ranks' token counts (a 2-process run
equals a 1-process run over the same rows).
"""

import torch
import torch.distributed as dist


def all_sum(value, device):
    """
    value (a number, a list of numbers, or a tensor) summed over the ranks, as Python number(s):
    integers exactly in int64, reals in float32 (never float64 on the device: Apple MPS has none).
    """
    t = torch.as_tensor(value, device=device)
    t = t.to(torch.float32 if t.is_floating_point() else torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


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
    tokens = int(all_sum(local_tokens, device))
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
    return all_sum(step_loss, device) / tokens, tokens


def train_step(model, optimizers, micro_batches, autocast, world_size=1):
    """One optimizer step (see accumulate_gradients). A step with no valid token anywhere changes nothing."""
    loss, tokens = accumulate_gradients(model, micro_batches, autocast, world_size)
    if tokens:
        for opt in optimizers:
            opt.step()
    model.zero_grad(set_to_none=True)
    return loss, tokens
