"""
The KV caches generation runs on. KVCache: one batch of sequences that advance together (a prompt's
prefill, then its rows), grown by reallocation. SlotCache: a fixed pool of sequences of different
lengths for continuous batching (batching.BatchScheduler), allocated once.

Both show the model the same interface, so GPT.forward never asks which one it has:
new_positions(T, device) -> (the positions of the T new tokens, (rows or 1, T); one past the largest),
insert_kv(layer, k, v) -> every key and value the new tokens attend over, and key_mask: a bool mask
(rows, 1, 1, keys) of the keys each row may see, or None when every key is visible (causality among
the new tokens themselves is the attention's business). Keys sit at their positions (key j: position j),
so a sliding-window layer masks by position alike in both. previous_tokens(idx) -> the token each row
fed just before idx (-1 at a sequence's start), recording idx: the smear's previous token, asked only by
a model that smears, and carried through prefill, decode, forced tool tokens and slot loading alike.
"""

import torch


class KVCache:
    """
    Keys and values per layer, preallocated as (batch, kv_heads, max_len, head_dim) and grown by
    allocating a larger buffer and copying (never `resize_`, which scrambles the layout). Its dtype
    follows the keys it is given, so fp32 on CPU and bf16 under autocast both work.
    """

    key_mask = None  # the rows advance together: every cached key is visible to every row

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.shape = (batch_size, num_heads, seq_len, head_dim)
        self.num_layers = num_layers
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.pos = 0
        self.last_token = None  # (batch,) the last token fed (for the smear), None before the first

    def reset(self):
        self.pos = 0
        self.last_token = None

    def get_pos(self):
        return self.pos

    def new_positions(self, num_new, device):
        start = self.get_pos()
        return torch.arange(start, start + num_new, device=device)[None], start + num_new

    def previous_tokens(self, idx):
        before = self.last_token if self.last_token is not None else idx.new_full((idx.size(0),), -1)
        self.last_token = idx[:, -1].clone()
        return before

    def _grow(self, layer_idx, needed, like):
        B, H, T, D = self.shape
        capacity = T if self.k[layer_idx] is None else self.k[layer_idx].size(2)
        if self.k[layer_idx] is not None and needed <= capacity:
            return
        new_len = max(capacity, needed)
        if self.k[layer_idx] is not None:
            new_len = max(new_len, 2 * capacity)
        k = torch.empty(B, H, new_len, D, dtype=like.dtype, device=like.device)
        v = torch.empty_like(k)
        if self.k[layer_idx] is not None:
            k[:, :, :self.pos] = self.k[layer_idx][:, :, :self.pos]
            v[:, :, :self.pos] = self.v[layer_idx][:, :, :self.pos]
        self.k[layer_idx], self.v[layer_idx] = k, v

    def insert_kv(self, layer_idx, k, v):
        """Appends this step's keys/values (B, H, T_new, D) for one layer; returns all of them so far.
        The position advances after the last layer has written."""
        t_new = k.size(2)
        end = self.pos + t_new
        self._grow(layer_idx, end, k)
        self.k[layer_idx][:, :, self.pos:end] = k
        self.v[layer_idx][:, :, self.pos:end] = v
        keys, values = self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return keys, values

    def replicate(self, batch_size, seq_len=None):
        """A new cache of `batch_size` rows, each holding a copy of this (batch 1) cache's prefix."""
        B, H, T, D = self.shape
        if B != 1:
            raise ValueError("only a batch-1 cache (one prefilled prompt) can be replicated")
        other = KVCache(batch_size, H, max(seq_len or T, self.pos), D, self.num_layers)
        for i in range(self.num_layers):
            if self.k[i] is None:
                continue
            other._grow(i, other.shape[2], self.k[i])
            other.k[i][:, :, :self.pos] = self.k[i][:, :, :self.pos]
            other.v[i][:, :, :self.pos] = self.v[i][:, :, :self.pos]
        other.pos = self.pos
        if self.last_token is not None:
            other.last_token = self.last_token.expand(batch_size).clone()
        return other


class SlotCache:
    """
    Keys and values for a fixed pool of `slots` sequences of up to max_len positions, allocated once
    (never per request) with a per-slot length. In a decode step the first n slots feed one token each
    at its own position and attend over the first `span` positions: `positions` (n,) and `key_mask`
    (n, 1, 1, span: each row's own length) are what GPT.forward and the attention read. n and span come
    in a few bucketed sizes (the caller's choice), so a compiled step has a few shapes; reading only `span`
    positions of every row, not max_len, is what keeps a batch of short replies cheap.
    """

    def __init__(self, slots, num_heads, max_len, head_dim, num_layers, device):
        self.shape = (slots, num_heads, max_len, head_dim)
        self.num_layers = num_layers
        self.k, self.v = [None] * num_layers, [None] * num_layers  # allocated on the first load (dtype known then)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        # every slot's tokens by position, for the smear: a step reads the one before its own position and writes
        # its own, so running one step twice (a compiled step's warm-up) changes nothing
        self.tokens = torch.zeros(slots, max_len, dtype=torch.long, device=device)
        self.rows = torch.arange(slots, device=device)
        self.span = torch.arange(max_len, device=device)
        self.begin_step()  # positions and key_mask exist from the start (a compiled step then traces once)

    def load(self, slot, prefix, length):
        """Copy a batch-1 KVCache's first `length` positions into `slot`."""
        for i in range(self.num_layers):
            if self.k[i] is None:
                self.k[i] = torch.zeros(self.shape, dtype=prefix.k[i].dtype, device=prefix.k[i].device)
                self.v[i] = torch.zeros_like(self.k[i])
            self.k[i][slot, :, :length] = prefix.k[i][0, :, :length]
            self.v[i][slot, :, :length] = prefix.v[i][0, :, :length]
        if prefix.last_token is not None:
            self.tokens[slot, length - 1] = prefix.last_token[0]
        self.lengths[slot] = length

    def begin_step(self, n=None, span=None):
        """A step over the first n slots (default all) and `span` positions (default max_len; more than any
        occupied slot's length): each writes its new token at its length (clamped: a free slot's writes land
        in space no one reads)."""
        self.n, self.width = n, span = n or self.shape[0], span or self.shape[2]
        self.positions = self.lengths[:n].clamp(max=span - 1)
        self.key_mask = (self.span[None, :span] <= self.positions[:, None]).view(n, 1, 1, span)

    def new_positions(self, num_new, device):
        """One new token per row, at the row's own length; every position is below the span."""
        if num_new != 1:
            raise ValueError(f"a slot pool step feeds one token per row, got {num_new}")
        return self.positions[:, None], self.width

    def previous_tokens(self, idx):
        rows, positions = self.rows[:self.n], self.positions
        before = torch.where(positions > 0, self.tokens[rows, (positions - 1).clamp(min=0)], -1)
        self.tokens[rows, positions] = idx[:, 0]
        return before

    def insert_kv(self, layer_idx, k, v):
        """k, v (n, H, 1, D): written at each slot's position. Returns the n slots' keys and values."""
        n, span = self.n, self.width
        self.k[layer_idx][self.rows[:n], :, self.positions] = k[:, :, 0]
        self.v[layer_idx][self.rows[:n], :, self.positions] = v[:, :, 0]
        return self.k[layer_idx][:n, :, :span], self.v[layer_idx][:n, :, :span]
