"""
Sampling the next token of many rows at once: per-row temperature, top_k and top_p, and a seeded
random stream per row (row_rngs), so a row's token never depends on the rows beside it. The Engine
and continuous batching (batching.BatchScheduler) both sample through sample_next.

Whatever the parameters and logits (a temperature of 1e-40, logits with inf or NaN), the id returned is
inside the vocabulary: in a shared batch one row's bad id would break every row beside it.
"""

import random

import torch
import torch.nn.functional as F

# Temperatures below this are greedy: logits are divided by T only after the row's maximum is subtracted,
# so no T overflows, and at T = 1e-4 a logit gap of 0.01 already weighs e^-100 (no float32 difference).
MIN_TEMPERATURE = 1e-4


def sample_next(logits, rngs, temperature=1.0, top_k=None, top_p=None):
    """
    logits (B, V) -> (B,) token ids, every row sampled in the same few batched ops. temperature, top_k and
    top_p are one value for all rows or one per row. temperature 0 = greedy. top_k None or 0 = no cut;
    larger than the vocabulary is clamped to it. top_p (nucleus) keeps the smallest set of likeliest
    tokens whose probability reaches top_p (None or 1 = all). rngs: one random.Random per row (None for a
    greedy row); each sampled row draws one uniform number from its own and picks the token where it
    falls in the row's cumulative distribution. Every op works row by row, so a row's token depends only
    on its own logits, settings and rng, never on the other rows (continuous batching relies on it).
    """
    B, V = logits.shape
    temps, ks, ps = (_per_row(v, B, name) for v, name in ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p")))
    if any(t is None or not t >= 0 for t in temps):  # `not >=`: NaN too
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    temps = [0.0 if t < MIN_TEMPERATURE else t for t in temps]
    logits = logits.float().nan_to_num(nan=float("-inf"))  # a NaN logit is never a token's best or its draw
    greedy = logits.argmax(dim=-1)
    if all(t == 0 for t in temps):
        return greedy
    device = logits.device
    # shifted so that each row's largest logit is 0 before dividing: every value stays finite or -inf
    shift = logits.amax(dim=-1, keepdim=True).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    x = (logits - shift) / torch.tensor([t if t > 0 else 1.0 for t in temps], device=device)[:, None]
    x = x.nan_to_num(nan=0.0, neginf=float("-inf"))  # inf - inf: a row of several +inf logits, all likeliest
    ks = [min(k, V) if k else V for k in ks]
    if min(ks) < V:  # cut each row below its k-th largest logit (ties stay); rows without a cut keep all
        kmax = max(k for k in ks if k < V)
        top = torch.topk(x, kmax, dim=-1).values
        kth = top.gather(1, torch.tensor([min(k, kmax) - 1 for k in ks], device=device)[:, None])
        kth = kth.masked_fill(torch.tensor([k == V for k in ks], device=device)[:, None], float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = F.softmax(x, dim=-1)
    if any(p is not None and p < 1.0 for p in ps):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p (the first token always stays); rows
        # without top_p get an unreachable bound, so their probabilities come back unchanged
        bound = torch.tensor([p if p is not None and p < 1.0 else float("inf") for p in ps], device=device)[:, None]
        sorted_probs = sorted_probs.masked_fill((sorted_probs.cumsum(dim=-1) - sorted_probs) >= bound, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.tensor([rng.random() if t > 0 else 0.0 for rng, t in zip(rngs, temps)], device=device)
    # the first token whose cumulative probability passes u * total; a u that rounds to 1 in float32 lands
    # on the last token with any probability (the first to reach the total), never on a cut one after it
    drawn = torch.minimum(torch.searchsorted(cdf, (u[:, None] * total).contiguous(), right=True),
                          torch.searchsorted(cdf, total)).view(B)
    # a row with nothing to draw from (every logit -inf or NaN, a total that is not a positive number)
    # and a greedy row take the argmax; the clamp is the last guard of the vocabulary's bounds
    fallback = ~(total.view(B) > 0) | ~torch.isfinite(total.view(B)) | torch.tensor([t == 0 for t in temps], device=device)
    return torch.where(fallback, greedy, drawn).clamp_(0, V - 1)


def _per_row(value, rows, name):
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ValueError(f"{name}: {len(value)} values for {rows} rows")
        return list(value)
    return [value] * rows


def row_rngs(seed, rows):
    """The per-row random streams of sample_next: row i is seeded seed + i (a lone run seeded seed + i equals it).
    random.Random(-s) is random.Random(s), so seeds are mapped one-to-one onto non-negative ints first."""
    return [random.Random(2 * s if s >= 0 else -2 * s - 1) for s in range(seed, seed + rows)]
