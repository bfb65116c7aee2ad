"""
Pretraining batches: documents stream from the shards, are tokenized in batches (BOS prepended to
each), and are packed into (B, T) inputs/targets, each rank reading its own row groups.

Packing is best-fit and BOS-aligned: every row starts at a document's BOS, and is filled by
repeatedly placing the longest remaining document that still fits; when none fits, the shortest
remaining document is cropped to fill the row, and its cropped tail is dropped (never continued
in another row without its BOS). The share of tokens dropped this way is reported in the state.

Exact resume with a small state: documents are packed in *chunks* (consecutive row groups of this
rank, enough tokens for `chunk_rows` rows), each packed independently of the others. The state is
the dataset position just before the chunk began plus the number of rows already taken from it;
resuming re-reads that chunk, re-packs it (deterministically), skips those rows and goes on, so a
resumed run sees exactly the tokens the uninterrupted run would have seen.
"""

import bisect

import torch

from nanochat.dataset import iter_batches


def pack_plan(lengths, row_len):
    """
    Best-fit packing of documents of the given lengths into rows of exactly row_len tokens.
    Returns (plan, cropped): plan[r] lists the (document index, tokens taken) pieces of row r in
    order; a document is always taken from its start (so every row starts with a BOS). The leftover
    documents that cannot fill a last whole row are dropped (counted as cropped): a chunk never
    leaves a partial row behind.
    """
    # (length, index) kept sorted: the longest fitting doc is found by bisection
    remaining = sorted((n, i) for i, n in enumerate(lengths) if n > 0)
    total_left = sum(n for n, _ in remaining)
    plan, cropped = [], 0
    while total_left >= row_len:
        row, space = [], row_len
        while space > 0:
            k = bisect.bisect_right(remaining, (space, len(lengths))) - 1
            if k >= 0:  # the longest doc that fits whole
                n, i = remaining.pop(k)
                row.append((i, n))
                space -= n
            else:  # nothing fits: crop the shortest doc to fill the row
                n, i = remaining.pop(0)
                row.append((i, space))
                cropped += n - space
                space = 0
            total_left -= n
        plan.append(row)
    cropped += total_left
    return plan, cropped


def pack_rows(docs, row_len):
    """Token lists (each starting with BOS) packed best-fit into rows of row_len: (rows, cropped tokens)."""
    plan, cropped = pack_plan([len(d) for d in docs], row_len)
    return [[t for i, n in row for t in docs[i][:n]] for row in plan], cropped


def pack_conversations(docs, masks, row_len):
    """pack_rows for rendered conversations: the loss masks travel with their tokens. (rows, masks, cropped)"""
    if len(docs) != len(masks) or any(len(d) != len(m) for d, m in zip(docs, masks)):
        raise ValueError("every document needs a mask of its own length")
    plan, cropped = pack_plan([len(d) for d in docs], row_len)
    rows = [[t for i, n in row for t in docs[i][:n]] for row in plan]
    row_masks = [[m for i, n in row for m in masks[i][:n]] for row in plan]
    return rows, row_masks, cropped


def sft_batch(conversations, pad_id, max_len, device="cpu"):
    """
    One rendered conversation per row, for supervised fine-tuning: conversations are (ids, mask)
    pairs; rows are cut to max_len + 1 tokens and right-padded to the longest. Returns (x, y,
    truncated): x (B, L) inputs, y (B, L) next-token targets with -1 wherever the mask is 0 (user
    turns, tool outputs, BOS) and on padding, and how many conversations were cut.
    """
    cut = [(ids[:max_len + 1], mask[:max_len + 1]) for ids, mask in conversations]
    truncated = sum(len(ids) > max_len + 1 for ids, _ in conversations)
    width = max(len(ids) for ids, _ in cut) - 1
    x = torch.full((len(cut), width), pad_id, dtype=torch.long)
    y = torch.full((len(cut), width), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(cut):
        ids_t = torch.tensor(ids, dtype=torch.long)
        targets = ids_t[1:].clone()
        targets[torch.tensor(mask[1:], dtype=torch.bool).logical_not()] = -1
        x[r, :len(ids) - 1] = ids_t[:-1]
        y[r, :len(ids) - 1] = targets
    return x.to(device), y.to(device), truncated


class DataLoader:
    """
    Iterates (inputs, targets, state): inputs/targets (B, T) long tensors on `device`; state is the
    position *after* this batch (pass it back as `resume_state` to continue from the next batch).

        loader = DataLoader(tokenizer, B, T, "train", device, rank=r, world_size=W)
        for x, y, state in loader: ...
    """

    def __init__(self, tokenizer, B, T, split, device="cpu", rank=0, world_size=1, resume_state=None,
                 chunk_rows=None, tokenizer_threads=4, loop=True):
        self.tokenizer = tokenizer
        self.B, self.T = B, T
        self.split = split
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        # Chunks big enough that best-fit has choices, small enough to re-pack quickly on resume.
        self.chunk_rows = chunk_rows or max(4 * B, 64)
        self.threads = tokenizer_threads
        self.loop = loop
        self.state = dict(resume_state) if resume_state else {"chunk_start": None, "rows_taken": 0}
        self.stats = {"tokens_packed": 0, "tokens_cropped": 0}

    def _chunks(self):
        """Yields (chunk_start, rows) for this rank, from the resume position on."""
        bos = self.tokenizer.get_bos_token_id()
        row_len = self.T + 1
        target_tokens = self.chunk_rows * row_len
        chunk_start = self.state["chunk_start"]
        docs, n_tokens = [], 0
        batches = iter_batches(self.split, rank=self.rank, world_size=self.world_size, start=chunk_start,
                               loop=self.loop)
        for texts, position in batches:
            for ids in self.tokenizer.encode(texts, prepend=bos, num_threads=self.threads):
                docs.append(ids)
                n_tokens += len(ids)
            if n_tokens >= target_tokens:
                rows, cropped = pack_rows(docs, row_len)
                self.stats["tokens_packed"] += len(rows) * row_len
                self.stats["tokens_cropped"] += cropped
                yield chunk_start, rows
                chunk_start, docs, n_tokens = position, [], 0
        if docs:  # the end of a single pass (loop=False): pack what is left
            rows, cropped = pack_rows(docs, row_len)
            self.stats["tokens_packed"] += len(rows) * row_len
            self.stats["tokens_cropped"] += cropped
            yield chunk_start, rows

    def cropped_fraction(self):
        """Share of the tokenized tokens that packing dropped (so far, this rank)."""
        total = self.stats["tokens_packed"] + self.stats["tokens_cropped"]
        return self.stats["tokens_cropped"] / max(total, 1)

    def __iter__(self):
        use_cuda = self.device.type == "cuda"
        skip = self.state["rows_taken"]
        pending = []  # rows of the current batch, possibly from two chunks
        for chunk_start, rows in self._chunks():
            for taken in range(skip, len(rows)):
                pending.append(rows[taken])
                if len(pending) == self.B:
                    self.state = {"chunk_start": chunk_start, "rows_taken": taken + 1}
                    batch = torch.tensor(pending, dtype=torch.long)
                    pending = []
                    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
                    if use_cuda:  # pinned host memory lets the copy overlap with compute
                        inputs, targets = inputs.pin_memory(), targets.pin_memory()
                    inputs = inputs.to(self.device, non_blocking=use_cuda)
                    targets = targets.to(self.device, non_blocking=use_cuda)
                    yield inputs, targets, dict(self.state)
            skip = 0
        # a single pass that ends mid-batch drops the partial batch (loop=False only)
