"""
Token generation. For now: the KV cache the model's forward pass writes into.

The cache is preallocated per layer as (batch, kv_heads, max_len, head_dim) for keys and values and
grown by allocating a larger buffer and copying (never `resize_`, which scrambles the layout).
Its dtype follows the keys it is given, so fp32 on CPU and bf16 under autocast both work.
"""

import torch


class KVCache:
    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers):
        self.shape = (batch_size, num_heads, seq_len, head_dim)
        self.num_layers = num_layers
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.pos = 0

    def reset(self):
        self.pos = 0

    def get_pos(self):
        return self.pos

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
