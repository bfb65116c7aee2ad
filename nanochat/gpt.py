"""
The GPT: a decoder-only Transformer, and nothing else.

Architecture (the one transformers' `NanoChatForCausalLM` implements, so checkpoints can be exported):
- token embedding, then RMSNorm (no learnable parameters anywhere in the norms)
- rotary position embeddings (precomputed, cached, extended on demand), then QK-norm
- grouped-query attention (n_kv_head <= n_head) through scaled_dot_product_attention
- MLP with ReLU² (relu(x)**2), no biases anywhere
- RMSNorm before an untied lm_head; logits soft-capped with tanh (computed in fp32)
- vocabulary padded to a multiple of 64 (tensor-core friendly, and shardable across ranks);
  padding logits are cut off before the loss or sampling so they can never be predicted
- output projections initialised to zero, all initialisation in one `init_weights`, which also
  works after construction on the meta device

Optional additions (GPTConfig fields, base_train flags; every default is the architecture above, bit for
bit, with no extra work; only rope_base can be exported, see hf_format):
- value_embeds: ResFormer's value residual (arXiv 2410.17897) as value embeddings: on alternating layers,
  the last included, a second token embedding is added to the values through a per-kv-head gate
  3 * sigmoid(W x[:12]) (W zero-initialised: gate 1.5)
- resid_mix: before block i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the block stack's input)
- smear: x[t] += smear_lambda * sigmoid(smear_gate . x[t, :12]) * x[t-1] on the normalised embeddings; a
  KV cache carries each row's last token so decoding smears like the full forward
- backout: backout_lambda times the residual entering block n_layer // 2 is subtracted before the final norm
- qk_scale: q and k times this after QK-norm; rope_base: RoPE's base
- window_pattern: per layer (tiled, the last layer always full) S: a sliding window of short_window keys,
  L: the whole context; masked per row by position in training, prefill and cached decoding alike (SDPA with
  the mask; a compiled training forward on CUDA runs FlexAttention instead, which skips the masked blocks)
(ideas from modded-nanogpt's speedrun records and nanochat's 2026 logs; our own code.) resid_mix, smear and
backout start neutral (resid 1, x0 0, smear 0, backout 0): on a fresh model they change nothing.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

LOGIT_SOFTCAP = 15.0
GATE_CHANNELS = 12  # the value-embedding and smear gates read the first 12 channels of their input
# device types whose compiled training forward runs sliding windows through FlexAttention (fused, block-sparse: a
# window of T/4 does ~1/4 of the attention work); SDPA with a bool mask elsewhere (CUDA: no flash kernel for it)
FLEX_DEVICES = ("cuda",)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 1280
    # the optional additions (module docstring); the defaults are the architecture above
    value_embeds: bool = False
    resid_mix: bool = False
    smear: bool = False
    backout: bool = False
    qk_scale: float = 1.0
    rope_base: float = 10000.0
    window_pattern: str = "L"  # S: short_window keys, L: all; tiled over the layers, the last one always L
    short_window: int = 0  # 0: sequence_len // 4

    def __post_init__(self):
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern must be a string of S and L, got {self.window_pattern!r}")
        if self.short_window < 0 or not self.qk_scale > 0 or not self.rope_base > 1:
            raise ValueError(f"short_window must be >= 0, qk_scale > 0 and rope_base > 1, got {self.short_window}, "
                             f"{self.qk_scale}, {self.rope_base}")


def config_for_depth(depth, vocab_size, sequence_len, head_dim=128, aspect_ratio=64, **architecture):
    """Model size from one knob: width = aspect_ratio * depth, rounded up to a multiple of head_dim.
    architecture: the optional GPTConfig fields (stage.architecture_fields)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    model_dim = math.ceil(aspect_ratio * depth / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=model_dim, **architecture)


def layer_windows(config):
    """Per layer, how many of the latest keys (its own included) a query sees; None: every earlier one."""
    short = config.short_window or max(1, config.sequence_len // 4)
    pattern = config.window_pattern
    return [None if i == config.n_layer - 1 or pattern[i % len(pattern)] == "L" else short
            for i in range(config.n_layer)]


def has_value_embed(config, layer_idx):
    """Value embeddings on alternating layers, counted from the last."""
    return config.value_embeds and (config.n_layer - 1 - layer_idx) % 2 == 0


def window_mask(positions, num_keys, window):
    """(rows, 1, T, num_keys) bool: the key at position j is visible to a query at position p iff p - window < j <= p.
    positions: (rows or 1, T) the queries' positions; keys are at positions 0..num_keys-1 (every cache's layout)."""
    keys = torch.arange(num_keys, device=positions.device)
    p = positions[:, :, None]
    return ((keys <= p) & (keys > p - window))[:, None]


def flex_window_mask(T, window, device):
    """window_mask's rule as FlexAttention's block mask over T queries and T keys (a training forward)."""
    return create_block_mask(lambda b, h, q, k: (k <= q) & (k > q - window), None, None, T, T, device=device)


def norm(x):
    # RMSNorm without a learnable scale
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """x: (B, T, H, D). Rotates the pair (x[i], x[i + D/2]) by the position's angle for frequency i."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # fp32 tables would promote bf16 activations to fp32
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
        if config.n_kv_head > config.n_head or config.n_head % config.n_kv_head != 0:
            raise ValueError(f"n_kv_head={config.n_kv_head} must divide n_head={config.n_head}")
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # a plain Parameter, not an nn.Linear: code that swaps the blocks' Linears (fp8) must not touch a 12-wide gate
        has_ve = has_value_embed(config, layer_idx)
        self.ve_gate = nn.Parameter(torch.empty(self.n_kv_head, GATE_CHANNELS)) if has_ve else None

    def forward(self, x, cos_sin, kv_cache, window=None, value_embed=None):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:  # the value residual, gated per kv head by this token's input
            gate = 3 * torch.sigmoid(F.linear(x[..., :GATE_CHANNELS], self.ve_gate))
            v = v + (gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.head_dim)).to(v.dtype)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm, after the rotation
        if self.qk_scale != 1.0:  # unit-RMS q and k make the logits' scale a constant: this sets it
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = None  # the keys each row may see (a slot pool: only its own length), None: all of them
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # all keys/values so far
            mask = kv_cache.key_mask
        if window is not None:  # a sliding-window layer: its mask (causality included) and the cache's
            mask = window if mask is None else window & mask
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head
        if isinstance(window, BlockMask):  # FLEX_DEVICES' compiled training forward
            y = flex_attention(q, k, v, block_mask=window, enable_gqa=gqa)
        elif kv_cache is not None and Tq == 1:
            # decode: one new token per row sees its cached keys. Two small matmuls beat the fused
            # kernel here (it is tiled for long queries); query heads are grouped by their kv head.
            Hkv, G = self.n_kv_head, self.n_head // self.n_kv_head
            qg = q.view(B, Hkv, G, self.head_dim)
            scores = (qg @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, Hkv, G, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = (scores.float().softmax(dim=-1).to(v.dtype) @ v).view(B, self.n_head, 1, self.head_dim)
        elif Tq == Tk and mask is None:  # training, or a prefill from an empty cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: the whole prefix (the keys the mask allows), causal within the chunk
            allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if mask is None else allowed & mask,
                                               enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache, window=None, value_embed=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, window, value_embed)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        if (config.value_embeds or config.smear) and config.n_embd < GATE_CHANNELS:
            raise ValueError(f"value_embeds and smear gates read {GATE_CHANNELS} channels; n_embd is {config.n_embd}")
        self.padded_vocab_size = math.ceil(config.vocab_size / 64) * 64
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(self.padded_vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        # Rotary tables for 10x the training length, so sampling past it works; extended on demand.
        # Not saved in checkpoints (persistent=False): they are a pure function of the config.
        self.head_dim = config.n_embd // config.n_head
        cos, sin = self._rotary_tables(config.sequence_len * 10)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # the optional additions: nothing at all is created for a field that is off
        self.windows = layer_windows(config)
        kv_dim = config.n_kv_head * self.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(self.padded_vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embed(config, i)})
        scalar = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731 (1-D: AdamW shards along dim 0)
        self.resid_lambdas = scalar(config.n_layer) if config.resid_mix else None
        self.x0_lambdas = scalar(config.n_layer) if config.resid_mix else None
        self.smear_gate = scalar(1, GATE_CHANNELS) if config.smear else None
        self.smear_lambda = scalar(1) if config.smear else None
        self.backout_lambda = scalar(1) if config.backout else None

    def _rotary_tables(self, seq_len, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        base = self.config.rope_base
        inv_freq = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)
        # (1, T, 1, D/2): broadcasts over batch and heads of (B, T, H, D/2)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Every parameter and buffer gets its real value here (so meta-device construction works)."""
        n_embd = self.config.n_embd
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        # uniform with the std of 1/sqrt(fan_in): sqrt(3) * n_embd^-0.5 bounds
        bound = math.sqrt(3) * n_embd ** -0.5
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                torch.nn.init.uniform_(linear.weight, -bound, bound)
            # residual-branch outputs start at zero: every block begins as the identity
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                torch.nn.init.zeros_(block.attn.ve_gate)  # gate 3 * sigmoid(0) = 1.5
        # value embeddings like a row of c_v's weights (std n_embd^-0.5): a small start next to v (RMS ~1)
        for table in self.value_embeds.values():
            torch.nn.init.uniform_(table.weight, -bound, bound)
        # the lambdas start neutral: the block stack, the embedding and the output are today's at step 0
        for p, value in ((self.resid_lambdas, 1.0), (self.x0_lambdas, 0.0), (self.smear_gate, 0.0),
                         (self.smear_lambda, 0.0), (self.backout_lambda, 0.0)):
            if p is not None:
                p.fill_(value)
        cos, sin = self._rotary_tables(self.cos.size(1))
        self.cos, self.sin = cos, sin

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self):
        """The parameters the data:param ratio counts: the block matrices and the lm_head (and the few scalars and
        gates), not the embeddings (lookups; nanochat's 2026 scaling-law sweeps found the cleanest fits counting
        these, dev/LOG.md 2026-01-27): neither the token embedding nor the value embeddings."""
        lookups = self.transformer.wte.weight.numel() + sum(p.numel() for p in self.value_embeds.parameters())
        return self.num_params() - lookups

    def estimate_flops(self):
        """
        Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4; the
        embeddings are lookups, not matmuls) plus attention's scores and weighted sum,
        12 * n_head * head_dim * (keys per query) per layer: seq_len for a full layer (causal
        masking is not subtracted), min(window, seq_len) for a sliding-window one.
        """
        matmul_params = self.num_scaling_params()
        c = self.config
        keys = sum(c.sequence_len if w is None else min(w, c.sequence_len) for w in self.windows)
        attention = 12 * c.n_head * self.head_dim * keys
        return 6 * matmul_params + attention

    def param_groups(self):
        """Each optimizer group's parameters: 'matrix' (Muon: the blocks' matrices), 'embedding' (the token and
        value embeddings), 'lm_head', and 'scalars' (the lambdas and the gates) when the model has any."""
        gates = [b.attn.ve_gate for b in self.transformer.h if b.attn.ve_gate is not None]
        scalars = [p for p in (self.resid_lambdas, self.x0_lambdas, self.smear_gate, self.smear_lambda,
                               self.backout_lambda) if p is not None] + gates
        groups = {"matrix": [p for p in self.transformer.h.parameters() if not any(p is g for g in gates)],
                  "embedding": list(self.transformer.wte.parameters()) + list(self.value_embeds.parameters()),
                  "lm_head": list(self.lm_head.parameters())}
        if scalars:
            groups["scalars"] = scalars
        assert sum(map(len, groups.values())) == len(list(self.parameters()))
        return groups

    def setup_optimizers(self, lrs=None, weight_decay=0.0, muon_weight_decay=0.0, adam_betas=(0.8, 0.95), ns_dtype=None,
                         **muon_options):
        """
        Muon for the 2-D matrices inside the blocks; AdamW for the embeddings and the lm_head, and for the scalars
        when the model has any (see param_groups). lrs: each group's peak LR ({'matrix', 'embedding', 'lm_head'},
        'scalars' too for a model that has them), as nanochat.schedule.peak_lrs decides them (its defaults for
        this width when None). weight_decay and adam_betas: AdamW's, one value for every group or a dict by group
        name ({'embedding': ..., 'lm_head': ..., 'scalars': ...}); the scalars are never decayed (weight decay
        would pull the residual lambdas to 0), and the residual lambdas (a product through every layer) train in an
        AdamW group of their own, 'resid_lambdas', at RESID_LR_FRACTION of the scalars' LR. muon_weight_decay and
        muon_options (orthogonalize, beta2, cautious): Muon's. ns_dtype: the dtype of Muon's orthogonalisation
        matmuls (None: bf16 on GPU, fp32 elsewhere). Returns [adamw, muon], their peaks recorded for a Schedule.
        """
        from nanochat.optim import AdamW, Muon  # optim knows nothing of the model; import at use
        from nanochat.schedule import RESID_LR_FRACTION, SCALAR_LR, peak_lrs, record_peaks
        lrs = lrs or peak_lrs(self.config.n_embd, scalar_lr=SCALAR_LR)
        params = self.param_groups()
        adam_names = [name for name in ("lm_head", "embedding", "scalars") if name in params]
        missing = [name for name in adam_names if name not in lrs or isinstance(adam_betas, dict) and name not in adam_betas]
        if missing:
            raise ValueError(f"this model's optimizer groups {adam_names} need an LR and betas each; none given for "
                             f"{missing} (nanochat.schedule.peak_lrs(..., scalar_lr=...) gives the scalars' LR)")

        def group(name):
            decay = 0.0 if name == "scalars" else weight_decay[name] if isinstance(weight_decay, dict) else weight_decay
            betas = adam_betas[name] if isinstance(adam_betas, dict) else adam_betas
            return {"params": params[name], "lr": lrs[name], "name": name, "betas": tuple(betas), "weight_decay": decay}
        groups = [group(name) for name in adam_names]
        if self.resid_lambdas is not None:  # the multiplicative residual lambdas: their own group at a fraction of the LR
            scalars = groups[adam_names.index("scalars")]
            scalars["params"] = [p for p in scalars["params"] if p is not self.resid_lambdas]
            groups.append(dict(scalars, params=[self.resid_lambdas], lr=scalars["lr"] * RESID_LR_FRACTION,
                               name="resid_lambdas"))
        adamw = AdamW(groups, eps=1e-10)
        muon = Muon(params["matrix"], lr=lrs["matrix"], momentum=0.95, ns_dtype=ns_dtype, weight_decay=muon_weight_decay,
                    **muon_options)
        return record_peaks([adamw, muon])

    def _smear(self, x, idx, kv_cache):
        """x[t] += smear_lambda * sigmoid(smear_gate . x[t, :12]) * x[t-1] (x: the normalised embeddings). A
        sequence's first token has no previous one; with a cache, the one before the new tokens is the cache's."""
        if kv_cache is None:
            first = x.new_zeros(x.size(0), 1, x.size(2))
        else:
            before = kv_cache.previous_tokens(idx)  # (rows,), -1 where the new tokens start a sequence
            first = (norm(self.transformer.wte(before.clamp(min=0))) * (before >= 0)[:, None])[:, None]
        previous = torch.cat([first.to(x.dtype), x[:, :-1]], dim=1)
        gate = torch.sigmoid(F.linear(x[..., :GATE_CHANNELS], self.smear_gate))  # (B, T, 1)
        return x + self.smear_lambda * gate * previous

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        idx (B, T) token ids. With targets (B, T; -1 = ignore): the cross-entropy loss, averaged
        (loss_reduction="mean") or per token ("none", shape (B*T,)). Without: logits (B, T, vocab).
        With a kv_cache, idx continues the cached sequence (prefill a prompt, or decode one token).
        """
        B, T = idx.size()
        # the new tokens' positions: 0..T-1 without a cache; with one, the cache says (each row its own, in a slot pool)
        positions, end = (None, T) if kv_cache is None else kv_cache.new_positions(T, idx.device)
        if end > self.cos.size(1):
            # normal tensors even when grown during sampling (inference tensors could not be used by a
            # later training forward, e.g. RL training right after its rollouts)
            with torch.inference_mode(False), torch.no_grad():
                cos, sin = self._rotary_tables(max(2 * self.cos.size(1), end), device=idx.device)
            self.cos, self.sin = cos, sin
        if positions is None:
            cos_sin = self.cos[:, :T], self.sin[:, :T]
        else:  # (rows, T, 1, D/2): gathered per row
            cos_sin = self.cos[0, positions], self.sin[0, positions]
        windows = {}  # window size -> its mask over this call's keys (end of them), built once for its layers
        flex = positions is None and idx.device.type in FLEX_DEVICES and torch.compiler.is_compiling()
        for w in set(self.windows) - {None}:
            windows[w] = (flex_window_mask(T, w, idx.device) if flex else
                          window_mask(torch.arange(T, device=idx.device)[None] if positions is None else positions, end, w))
        x = norm(self.transformer.wte(idx))
        if self.smear_lambda is not None:
            x = self._smear(x, idx, kv_cache)
        x0 = x
        for i, block in enumerate(self.transformer.h):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if i == self.config.n_layer // 2:
                x_mid = x  # for the backout
            value_embed = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos_sin, kv_cache, windows.get(self.windows[i]), value_embed)
        if self.backout_lambda is not None:
            x = x - self.backout_lambda * x_mid
        x = norm(x)
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        # soft-cap in fp32: tanh in bf16 loses the small differences between large logits
        logits = logits.float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """
        The plain reference sampler: no KV cache, the whole sequence re-run for every token. Slow
        on purpose: the engine's cached decoding is tested against it. Yields token ids.
        """
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("generate takes a non-empty list of token ids")
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                values, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits = logits.masked_fill(logits < values[:, [-1]], float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
