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

Conversations for SFT are packed differently, because a cropped conversation teaches a cut answer:
pack_sft_rows places whole conversations best-fit into rows of T + 1 tokens and drops (and counts) the
ones that cannot fit or have nothing to train; conversation_batch turns such rows into (x, y) with the
loss mask applied and the row's end padded. The pretraining packer above crops; this one never does.
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


def best_fit_rows(lengths, capacity):
    """
    Online best-fit packing of items (in the given order) into rows of `capacity` tokens: each item goes
    into the open row with the least free space that still holds it (the earliest such row on a tie),
    else into a new row; every row stays open to the end. Returns the rows (lists of item indices, rows
    in the order they were opened, items in the order they came). Every length must lie in [1, capacity].
    """
    free = []  # (free space, row index) of the rows with space left, sorted: the best fit is a bisection away
    rows = []
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        k = bisect.bisect_left(free, (n, -1))  # the first row with room for n; on equal room the earliest
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if space > n:
            bisect.insort(free, (space - n, r))
    return rows


def pack_sft_rows(conversations, row_len):
    """
    Rendered conversations ((ids, mask) pairs, BOS first) packed whole, best-fit, into rows of at most
    row_len tokens, in the order given (the caller's seeded shuffle). Nothing is ever cropped: a
    conversation longer than a row is dropped, and so is one with nothing to train (mask 0 after its
    first token), so every row holds at least one trained token. Returns (rows, dropped): rows as lists
    of (ids, mask) pairs; dropped = {"too_long": n, "nothing_to_train": m}.
    """
    kept, dropped = [], {"too_long": 0, "nothing_to_train": 0}
    for ids, mask in conversations:
        if len(ids) != len(mask):
            raise ValueError(f"a conversation of {len(ids)} tokens has a mask of {len(mask)}")
        if len(ids) > row_len:
            dropped["too_long"] += 1
        elif not any(mask[1:]):
            dropped["nothing_to_train"] += 1
        else:
            kept.append((ids, mask))
    plan = best_fit_rows([len(ids) for ids, _ in kept], row_len)
    return [[kept[i] for i in row] for row in plan], dropped


def conversation_batch(rows, row_len, pad_id, device="cpu"):
    """
    Rows of whole conversations ((ids, mask) pairs, at most row_len tokens a row) as (x, y), both
    (len(rows), row_len - 1): x = row[:-1], y = row[1:], the row right-padded to row_len with pad_id.
    A target is -1 wherever its token's mask is 0 (user turns, tool outputs), at each conversation's
    first token (its BOS: nothing predicts the next conversation from the previous one) and on the
    padding. A row longer than row_len is an error, never cut.
    """
    width = row_len - 1
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        ids = [t for conv_ids, _ in row for t in conv_ids]
        if len(ids) > row_len:
            raise ValueError(f"row {r} holds {len(ids)} tokens, more than a row's {row_len}")
        targets = [t if m and j > 0 else -1 for conv_ids, mask in row for j, (t, m) in enumerate(zip(conv_ids, mask))]
        n = max(len(ids) - 1, 0)
        x[r, :n] = torch.tensor(ids[:-1], dtype=torch.long)
        y[r, :n] = torch.tensor(targets[1:], dtype=torch.long)
    return x.to(device), y.to(device)


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
