"""
Generation for one prompt and its samples: one prefill then batched decode over a KV cache, sampling,
the calculator tool, and UTF-8-safe streaming. The chat CLI, chat evals and RL generate through here;
the web server through batching.BatchScheduler, which uses the same pieces.

    engine = Engine(model, tokenizer)
    for column, forced in engine.generate(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8):
        ...  # column[i]: row i's new token (None once the row has finished); forced[i]: 1 if the tool wrote it
    rows, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256)

How a call runs: the prompt is prefilled once (batch 1); its cache is replicated for num_samples rows;
then each step feeds one token per row. Every row samples with its own random stream (seed + row), so
rows differ from their first token on, and row i of a batch equals a lone run seeded seed + i.
Rows stop at <|assistant_end|> or <|bos|>. Tool use: when a row closes <|python_start|>EXPR
<|python_end|>, the calculator evaluates EXPR and <|output_start|>RESULT<|output_end|> is forced into
that row's stream, token by token, marked forced=1 (RL masks these out of its loss).

Serving many requests at once is batching.BatchScheduler's job: it runs the same prefill (Engine.prefill)
and the same tool-use state machine (RowState + Engine.next_token) over a shared pool of cache slots.
"""

from collections import deque

import torch

from nanochat.calculator import use_calculator
from nanochat.kv_cache import KVCache  # noqa: F401 (part of this module's interface: tests and benches build one)
from nanochat.sampling import row_rngs, sample_next


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
        self.calculator = calculator or use_calculator
        special = tokenizer.encode_special
        self.stop_ids = {special("<|assistant_end|>"), special("<|bos|>")}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.pad_id = tokenizer.get_bos_token_id()  # what a finished row feeds, so that a batch stays rectangular

    def prefill(self, tokens):
        """One forward over a prompt (a list of ids): (the logits that follow it (1, vocab), its batch-1 KVCache)."""
        c = self.model.config
        cache = KVCache(1, c.n_kv_head, len(tokens), c.n_embd // c.n_head, c.n_layer)
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=self.model.get_device()), kv_cache=cache)
        return logits[:, -1, :], cache

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
        rngs = row_rngs(seed, num_samples)
        budget = max_tokens if max_tokens is not None else self.model.config.sequence_len
        # one prefill of the prompt, then its cache replicated for every row
        logits, prefill_cache = self.prefill(tokens)
        logits = logits.expand(num_samples, -1)
        cache = prefill_cache.replicate(num_samples, len(tokens) + budget) if num_samples > 1 else prefill_cache
        rows = [RowState() for _ in range(num_samples)]
        for _ in range(budget):
            sampled = sample_next(logits, rngs, temperature, top_k, top_p).tolist()
            column, forced = [], []
            for row, token in zip(rows, sampled):
                token, was_forced = self.next_token(row, token, tools)
                column.append(token)
                forced.append(was_forced)
            yield column, forced
            if all(row.done for row in rows):
                return
            # finished rows keep feeding a token (pad_id) so the batch stays rectangular
            feed = [t if t is not None else self.pad_id for t in column]
            logits = self.model(torch.tensor(feed, dtype=torch.long, device=device).view(-1, 1), kv_cache=cache)[:, -1, :]

    def next_token(self, row, sampled, tools=True):
        """
        One row's next token: a forced tool-output token if any is queued, else the sampled one; updates
        the row's tool-use state (a closed python block queues its result). Returns (token, forced 0/1),
        (None, 0) for a finished row.
        """
        if row.done:
            return None, 0
        is_forced = bool(row.forced)
        token = row.forced.popleft() if is_forced else sampled
        if token in self.stop_ids and not is_forced:
            row.done = True
        elif tools and token == self.python_start:
            row.in_python, row.expr_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            row.forced.extend(self._tool_output(row.expr_tokens))
        elif row.in_python:
            row.expr_tokens.append(token)
        return token, int(is_forced)

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
