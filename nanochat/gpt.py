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
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 1280


def config_for_depth(depth, vocab_size, sequence_len, head_dim=128, aspect_ratio=64):
    """Model size from one knob: width = aspect_ratio * depth, rounded up to a multiple of head_dim."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    model_dim = math.ceil(aspect_ratio * depth / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=model_dim)


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
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, _ = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm, after the rotation
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        mask = None  # the keys each row may see (a slot pool: only its own length), None: all of them
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # all keys/values so far
            mask = kv_cache.key_mask
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is not None and Tq == 1:
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

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
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

    def _rotary_tables(self, seq_len, base=10000, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
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
        cos, sin = self._rotary_tables(self.cos.size(1))
        self.cos, self.sin = cos, sin

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def num_scaling_params(self):
        """The parameters the data:param ratio counts: the block matrices and the lm_head, not the embedding (a
        lookup; nanochat's 2026 scaling-law sweeps found the cleanest fits counting these, dev/LOG.md 2026-01-27)."""
        return self.num_params() - self.transformer.wte.weight.numel()

    def estimate_flops(self):
        """
        Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4; the
        embedding is a lookup, not a matmul) plus attention's scores and weighted sum,
        12 * n_layer * n_head * head_dim * seq_len (causal masking is not subtracted).
        """
        matmul_params = self.num_scaling_params()
        c = self.config
        attention = 12 * c.n_layer * c.n_head * self.head_dim * c.sequence_len
        return 6 * matmul_params + attention

    def setup_optimizers(self, lrs=None, weight_decay=0.0, muon_weight_decay=0.0, adam_betas=(0.8, 0.95), ns_dtype=None,
                         **muon_options):
        """
        Muon for the 2-D matrices inside the blocks; AdamW for the embedding and the lm_head. lrs: each
        group's peak LR ({'matrix', 'embedding', 'lm_head'}), as nanochat.schedule.peak_lrs decides them
        (its defaults for this width when None). weight_decay and adam_betas: AdamW's, one value for both
        groups or a dict by group name ({'embedding': ..., 'lm_head': ...}); muon_weight_decay and
        muon_options (orthogonalize, beta2, cautious): Muon's. ns_dtype: the dtype of Muon's orthogonalisation
        matmuls (None: bf16 on GPU, fp32 elsewhere). Returns [adamw, muon], their peaks recorded for a Schedule.
        """
        from nanochat.optim import AdamW, Muon  # optim knows nothing of the model; import at use
        from nanochat.schedule import peak_lrs, record_peaks
        lrs = lrs or peak_lrs(self.config.n_embd)
        matrix_params = list(self.transformer.h.parameters())
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        assert len(matrix_params) + len(embedding_params) + len(lm_head_params) == len(list(self.parameters()))

        def group(name, params):
            decay = weight_decay[name] if isinstance(weight_decay, dict) else weight_decay
            betas = adam_betas[name] if isinstance(adam_betas, dict) else adam_betas
            return {"params": params, "lr": lrs[name], "name": name, "betas": tuple(betas), "weight_decay": decay}
        adamw = AdamW([group("lm_head", lm_head_params), group("embedding", embedding_params)], eps=1e-10)
        muon = Muon(matrix_params, lr=lrs["matrix"], momentum=0.95, ns_dtype=ns_dtype, weight_decay=muon_weight_decay,
                    **muon_options)
        return record_peaks([adamw, muon])

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
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
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
