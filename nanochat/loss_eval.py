"""
Bits per byte: the model's loss in a unit that does not depend on the tokenizer.

bpb = (sum over target tokens of the loss in nats) / (ln 2 * sum of those tokens' UTF-8 byte lengths)

Special tokens (byte length 0 in token_bytes) and ignored targets (-1) count in neither sum, so two
models with different vocabularies are compared on the same bytes of text.
"""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, autocast=None):
    """
    model: a GPT (uncompiled is best: eval shapes differ from training's). batches: an iterator of
    (inputs, targets, ...) tuples; `steps` of them are used. token_bytes: long tensor [vocab] on the
    model's device. Sums are all-reduced when a process group is up, so every rank gets the same bpb.
    """
    autocast = autocast or nullcontext()
    device = model.get_device()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batch_iter)[:2]
        with autocast:
            loss = model(inputs, targets, loss_reduction="none")  # (B*T,), 0 where target == -1
        targets = targets.reshape(-1)
        valid = targets >= 0
        n_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets))
        counted = n_bytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += n_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
