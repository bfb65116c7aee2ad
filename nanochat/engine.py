"""
All token generation: the KV cache, one prefill then batched decode, sampling, the calculator tool,
and UTF-8-safe streaming. The chat CLI, the web server, chat evals and RL all generate through here.

    engine = Engine(model, tokenizer)
    for column, forced in engine.generate(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8):
        ...  # column[i]: row i's new token (None once the row has finished); forced[i]: 1 if the tool wrote it
    rows, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256)

How a call runs: the prompt is prefilled once (batch 1); its cache is replicated for num_samples rows;
then each step feeds one token per row. Every row samples with its own generator (seed + row), so
rows differ from their first token on, and row i of a batch equals a lone run seeded seed + i.
Rows stop at <|assistant_end|> or <|bos|>. Tool use: when a row closes <|python_start|>EXPR
<|python_end|>, the calculator evaluates EXPR and <|output_start|>RESULT<|output_end|> is forced into
that row's stream, token by token, marked forced=1 (RL masks these out of its loss).
"""

from collections import deque

import torch
import torch.nn.functional as F


class KVCache:
    """
    Keys and values per layer, preallocated as (batch, kv_heads, max_len, head_dim) and grown by
    allocating a larger buffer and copying (never `resize_`, which scrambles the layout). Its dtype
    follows the keys it is given, so fp32 on CPU and bf16 under autocast both work.
    """

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
        return other


def sample_next(logits, generators, temperature=1.0, top_k=None, top_p=None):
    """
    logits (B, V) -> (B,) token ids. temperature 0 = greedy. top_k None or 0 = no cut; top_k larger
    than the vocabulary is clamped to it. top_p (nucleus) keeps the smallest set of likeliest tokens
    whose probability reaches top_p (None or 1 = all). Each row draws from its own generator.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(generators)])


class RowState:
    """Per-row bookkeeping of the tool-use state machine."""

    def __init__(self):
        self.forced = deque()  # tokens to inject before sampling resumes
        self.in_python = False
        self.expr_tokens = []
        self.done = False


class Utf8Stream:
    """
    Turns a stream of token ids into text without ever splitting a UTF-8 character: bytes are held
    back until they form complete characters. Special tokens are dropped (they are not text).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
        self.pending = b""

    def push(self, token_id):
        """Returns the text that is complete now (possibly '')."""
        if token_id in self.special:
            return ""
        self.pending += self.tokenizer.id_to_bytes(token_id)
        # the longest prefix that decodes: at most 3 trailing bytes of an unfinished character
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                text = self.pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.pending = self.pending[cut:]
            return text
        # invalid bytes (a model can emit any byte sequence): flush them with replacement
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text

    def flush(self):
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


class Engine:
    def __init__(self, model, tokenizer, calculator=None):
        self.model = model
        self.tokenizer = tokenizer
        if calculator is None:
            from nanochat.calculator import use_calculator as calculator
        self.calculator = calculator
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _new_cache(self, batch_size, seq_len):
        c = self.model.config
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)

    def _tool_output(self, expr_tokens):
        expr = self.tokenizer.decode(expr_tokens)
        try:
            result = self.calculator(expr)
        except Exception as e:  # the tool must never take the generation down
            result = f"Error: {type(e).__name__}"
        return [self.output_start] + self.tokenizer.encode(str(result)) + [self.output_end]

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None,
                 tools=True):
        """
        Yields (column, forced): one new token per row (None for rows already finished) and 0/1 forced
        flags. tools=False: plain language-model sampling (no calculator; raw text completion).
        """
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("generate takes a non-empty list of int token ids")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        device = self.model.get_device()
        generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(num_samples)]
        budget = max_tokens if max_tokens is not None else self.model.config.sequence_len
        # one prefill of the prompt, then its cache replicated for every row
        prefill_cache = self._new_cache(1, len(tokens))
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill_cache)
        logits = logits[:, -1, :].expand(num_samples, -1)
        cache = prefill_cache.replicate(num_samples, len(tokens) + budget) if num_samples > 1 else prefill_cache
        rows = [RowState() for _ in range(num_samples)]
        for _ in range(budget):
            sampled = sample_next(logits, generators, temperature, top_k, top_p).tolist()
            column, forced = [], []
            for i, row in enumerate(rows):
                if row.done:
                    column.append(None)
                    forced.append(0)
                    continue
                is_forced = bool(row.forced)
                token = row.forced.popleft() if is_forced else sampled[i]
                column.append(token)
                forced.append(int(is_forced))
                if token in self.stop_ids and not is_forced:
                    row.done = True
                elif tools and token == self.python_start:
                    row.in_python, row.expr_tokens = True, []
                elif token == self.python_end and row.in_python:
                    row.in_python = False
                    row.forced.extend(self._tool_output(row.expr_tokens))
                elif row.in_python:
                    row.expr_tokens.append(token)
            yield column, forced
            if all(row.done for row in rows):
                return
            # finished rows keep feeding a token (their own last one) so the batch stays rectangular
            feed = [t if t is not None else self.tokenizer.get_bos_token_id() for t in column]
            logits = self.model(torch.tensor(feed, dtype=torch.long, device=device).view(-1, 1), kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, keep_stop=False, **kwargs):
        """Runs generate to the end. Returns (rows, masks): each row is prompt + new tokens (the sampled
        stop token too with keep_stop, else not), masks mark sampled tokens 1 and prompt/forced tokens 0."""
        rows = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        for column, forced in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (token, was_forced) in enumerate(zip(column, forced)):
                if token is None or (token in self.stop_ids and not was_forced and not keep_stop):
                    continue
                rows[i].append(token)
                masks[i].append(0 if was_forced else 1)
        return rows, masks
