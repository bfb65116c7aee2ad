"""
Bits per byte: the model's loss in a unit that does not depend on the tokenizer; and the plain mean
loss per target token (SFT's masked val loss).

bpb = (sum over target tokens of the loss in nats) / (ln 2 * sum of those tokens' UTF-8 byte lengths)

Special tokens (byte length 0 in token_bytes) and ignored targets (-1) count in neither sum, so two
models with different vocabularies are compared on the same bytes of text.

An evaluation reads its batches at most once: it stops at `max_steps` or when the batches run out,
whichever comes first, so a small val split is never counted twice. With several ranks, every rank
stops at the same step (the first rank to run out decides), so their collectives stay paired.

No float64 on the device (Apple MPS has none): per-batch sums are float32, summed pairwise at the
end; byte and token counts are int64.
"""

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _next_on_every_rank(batch_iter, distributed, device):
    """The next batch, or None once this rank's batches or any other rank's have run out."""
    batch = next(batch_iter, None)
    if distributed:  # one tiny collective per eval step: every rank learns whether all of them still have data
        more = torch.tensor(int(batch is not None), device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MIN)
        if not more.item():
            return None
    return batch


@torch.no_grad()
def evaluate_bpb(model, batches, max_steps, token_bytes, autocast=None):
    """
    model: a GPT (uncompiled is best: eval shapes differ from training's). batches: an iterable of
    (inputs, targets, ...) tuples, read at most once, at most max_steps of them. token_bytes: long
    tensor [vocab] on the model's device. Returns (bpb, tokens): bits per byte, and how many target
    tokens were evaluated, both over every rank (every rank gets the same numbers).
    """
    autocast = autocast or nullcontext()
    device = model.get_device()
    distributed = _world_size() > 1
    step_nats = []  # float32 0-d tensors, one per step: no sync with the host inside the loop
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    total_tokens = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(max_steps):
        batch = _next_on_every_rank(batch_iter, distributed, device)
        if batch is None:
            break
        inputs, targets = batch[:2]
        with autocast:
            loss = model(inputs, targets, loss_reduction="none")  # (B*T,), 0 where target == -1
        targets = targets.reshape(-1)
        valid = targets >= 0
        n_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], torch.zeros_like(targets))
        step_nats.append((loss.float() * (n_bytes > 0)).sum())
        total_bytes += n_bytes.sum()
        total_tokens += valid.sum()
    total_nats = torch.stack(step_nats).sum() if step_nats else torch.zeros((), dtype=torch.float32, device=device)
    if distributed:
        for t in (total_nats, total_bytes, total_tokens):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    n_bytes, tokens = total_bytes.item(), total_tokens.item()
    bpb = float("inf") if n_bytes == 0 else total_nats.item() / (math.log(2) * n_bytes)
    return bpb, tokens


@torch.no_grad()
def evaluate_loss(model, batches, autocast=None):
    """
    The mean loss per target token (targets of -1 left out) over (inputs, targets, ...) batches,
    summed over every rank first; ranks may hold different numbers of batches (no collective runs
    until the end). Returns (loss, tokens).
    """
    autocast = autocast or nullcontext()
    device = model.get_device()
    batch_nats = []
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        inputs, targets = batch[:2]
        with autocast:
            batch_nats.append(model(inputs, targets, loss_reduction="none").float().sum())
        tokens += (targets != -1).sum()
    nats = torch.stack(batch_nats).sum() if batch_nats else torch.zeros((), dtype=torch.float32, device=device)
    if _world_size() > 1:
        dist.all_reduce(nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    n = tokens.item()
    return nats.item() / max(n, 1), n
