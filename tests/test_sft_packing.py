"""
SFT packing (nanochat.dataloader.pack_sft_rows / best_fit_rows / conversation_batch) and the optimizer warm
start (nanochat.stage.load_optimizer_moments): best fit against a slow reference, no conversation ever cropped,
every row with a trained token, drops counted, targets by hand, no NaN loss from a conversation longer than a row;
the warm start loads the saved moments and nothing of the param groups, and refuses a source without them.
"""

import argparse
import os
import random
from collections import Counter

import pytest
import torch

from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.dataloader import best_fit_rows, conversation_batch, pack_sft_rows
from nanochat.gpt import GPT, GPTConfig
from nanochat.schedule import peak_lrs
from nanochat.stage import load_optimizer_moments, optimizer_recipe, stage_optimizers
from nanochat.training import train_step
from test_chat_cli import make_chat_checkpoint

BOS, PAD = 0, 0
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def slow_best_fit(lengths, capacity):
    """The obvious best fit: scan every row for the least free space that still holds the item."""
    rows, free = [], []
    for i, n in enumerate(lengths):
        fits = [r for r in range(len(rows)) if free[r] >= n]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
        else:
            r = len(rows)
            rows.append([])
            free.append(capacity)
        rows[r].append(i)
        free[r] -= n
    return rows


def test_best_fit_matches_the_slow_reference():
    rng = random.Random(7)
    for capacity in (8, 33, 129, 512):
        for _ in range(20):
            # many ties: a few distinct sizes, small and large
            sizes = [rng.randint(1, capacity) for _ in range(4)] + [1, capacity]
            lengths = [rng.choice(sizes) if rng.random() < 0.5 else rng.randint(1, capacity) for _ in range(300)]
            assert best_fit_rows(lengths, capacity) == slow_best_fit(lengths, capacity)
    with pytest.raises(ValueError):
        best_fit_rows([3, 9], 8)


def synthetic_conversations(count, seed, row_len):
    """(ids, mask) pairs, BOS first, with tokens unique to each conversation (100_000 * (i + 1) + j), some
    longer than a row, some with nothing to train (a mask of 1 on the BOS alone must not count)."""
    rng = random.Random(seed)
    conversations, too_long, untrained = [], set(), set()
    for i in range(count):
        kind = rng.random()
        n = rng.randint(row_len + 1, 3 * row_len) if kind < 0.08 else rng.randint(2, row_len)
        ids = [BOS] + [100_000 * (i + 1) + j for j in range(1, n)]
        mask = [0] + [int(rng.random() < 0.6) for _ in range(n - 1)]
        if 0.08 <= kind < 0.14:
            mask = [1] + [0] * (n - 1)
        elif not any(mask[1:]):
            mask[-1] = 1
        if n > row_len:
            too_long.add(i)
        elif not any(mask[1:]):
            untrained.add(i)
        conversations.append((ids, mask))
    return conversations, too_long, untrained


def test_packing_never_crops_and_every_row_trains():
    row_len = 65
    conversations, too_long, untrained = synthetic_conversations(400, seed=3, row_len=row_len)
    assert too_long and untrained
    rows, dropped = pack_sft_rows(conversations, row_len)
    assert dropped == {"too_long": len(too_long), "nothing_to_train": len(untrained)}
    # the packed conversations are exactly the input minus the dropped ones, each one whole
    expected = Counter(tuple(ids) for i, (ids, _) in enumerate(conversations) if i not in too_long | untrained)
    assert Counter(tuple(ids) for row in rows for ids, _ in row) == expected
    by_ids = {tuple(ids): mask for ids, mask in conversations}
    for row in rows:
        assert sum(len(ids) for ids, _ in row) <= row_len, "a row overflows"
        assert sum(sum(mask[1:]) for _, mask in row) >= 1, "a row without a trained token"
        assert all(by_ids[tuple(ids)] == mask for ids, mask in row), "a mask left its conversation"
    # in the batch, each row's inputs are its conversations one after the other, whole, then padding
    x, y = conversation_batch(rows, row_len, PAD)
    assert x.shape == y.shape == (len(rows), row_len - 1)
    for r, row in enumerate(rows):
        tokens = [t for ids, _ in row for t in ids]
        assert x[r].tolist() == (tokens[:-1] + [PAD] * row_len)[:row_len - 1]  # the last token is only a target
        assert (y[r] != -1).any()
    with pytest.raises(ValueError):
        conversation_batch([[([BOS] + [5] * 10, [0] + [1] * 10)]], 8, PAD)  # never cut, even if asked


def test_targets_are_each_conversations_own_shifted_ids_with_its_mask():
    a = ([BOS, 11, 12, 13, 14], [0, 1, 0, 1, 1])
    b = ([BOS, 21, 22], [1, 1, 1])  # a mask of 1 on the BOS: still never a target
    c = ([BOS, 31, 32, 33], [0, 0, 1, 1])
    rows = [[a, b], [c]]
    x, y = conversation_batch(rows, 10, pad_id=99)
    assert x.tolist() == [[BOS, 11, 12, 13, 14, BOS, 21, 99, 99],
                          [BOS, 31, 32, 99, 99, 99, 99, 99, 99]]
    assert y.tolist() == [[11, -1, 13, 14, -1, 21, 22, -1, -1],
                          [-1, 32, 33, -1, -1, -1, -1, -1, -1]]
    # the general rule on random rows: y at position p is token p + 1 when its mask is 1 and it is not a
    # conversation's first token; -1 at every BOS, boundary and padding position
    conversations, _, _ = synthetic_conversations(200, seed=5, row_len=40)
    rows, _ = pack_sft_rows(conversations, 40)
    x, y = conversation_batch(rows, 40, pad_id=99)
    for r, row in enumerate(rows):
        tokens = [t for ids, _ in row for t in ids]
        trained = [bool(m) and j > 0 for _, mask in row for j, m in enumerate(mask)]
        expected = [tokens[p + 1] if p + 1 < len(tokens) and trained[p + 1] else -1 for p in range(39)]
        assert y[r].tolist() == expected
        assert x[r, len(tokens) - 1:].eq(99).all()


def random_model(vocab=64, seq=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_a_conversation_longer_than_a_row_never_gives_a_nan_loss():
    model = random_model()
    with torch.no_grad():
        logits = model(torch.tensor([[BOS, 5, 6, 7]]))
    assert logits.std() > 0.1, "the test model's logits do not vary"
    row_len = 17
    # trained tokens only past the end of a row: cropped to a row, this conversation has nothing to train
    long_tail = ([BOS] + list(range(1, 30)), [0] * 20 + [1] * 10)
    short = ([BOS, 3, 4, 5, 6], [0, 0, 1, 1, 1])
    rows, dropped = pack_sft_rows([long_tail, short, long_tail], row_len)
    for r in range(len(rows)):  # every row alone, as the smallest micro-batch would see it
        x, y = conversation_batch(rows[r:r + 1], row_len, PAD)
        loss = model(x, y)
        assert torch.isfinite(loss) and loss > 0
    assert dropped["too_long"] == 2 and rows == [[short]]
    loss, tokens = train_step(model, model.setup_optimizers(), [conversation_batch(rows, row_len, PAD)], NO_AUTOCAST)
    assert tokens == 3 and loss == loss


# -------------------------------------------------------------------------------------------------
# the optimizer warm start


def stage_args(**kw):
    return argparse.Namespace(**{"source": "mid", "model_tag": None, "matrix_lr": None, "embedding_lr": None,
                                 "unembedding_lr": None, "init_lr_frac": 0.02, **kw})


def test_load_optimizer_moments_takes_the_state_and_not_the_lrs(base_dir):
    model, _ = make_chat_checkpoint(base_dir, source_dir="mid_checkpoints")  # step 5: weights only
    # the source's own optimizers (NorMuon on, so there are second moments), a few steps on random rows
    recipe = optimizer_recipe(peak_lrs(64, 0.03, 0.3, 0.005), orthogonalize="polar_express", normuon_beta2=0.9)
    source_opts, _ = stage_optimizers(model, stage_args(init_lr_frac=1.0), torch.float32, {"recipe": recipe})
    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    for _ in range(3):
        x, y = torch.randint(0, vocab, (2, 16), generator=g), torch.randint(0, vocab, (2, 16), generator=g)
        train_step(model, source_opts, [(x, y)], NO_AUTOCAST)
    save_checkpoint(os.path.join(base_dir, "mid_checkpoints", "d2"), 8, model, source_opts,
                    {"model_config": vars(model.config), "recipe": recipe})
    saved = [opt.state_dict() for opt in source_opts]

    sft_model, _, meta = load_model("mid", "cpu", phase="train")
    assert meta["step"] == 8
    args = stage_args()
    optimizers, _ = stage_optimizers(sft_model, args, torch.float32, meta)
    sft_groups = [[(g["lr"], g["initial_lr"]) for g in opt.param_groups] for opt in optimizers]
    load_optimizer_moments(optimizers, args, meta, "cpu", rank=0, world_size=1)
    keys = set()
    for opt, s in zip(optimizers, saved):
        loaded = opt.state_dict()["state"]
        assert loaded.keys() == s["state"].keys() and loaded
        for index, per_param in s["state"].items():
            for k, v in per_param.items():
                keys.add(k)
                assert torch.equal(loaded[index][k], v), (index, k)
    assert {"momentum_buffer", "second_moment", "exp_avg", "exp_avg_sq", "step"} <= keys
    assert [[(g["lr"], g["initial_lr"]) for g in opt.param_groups] for opt in optimizers] == sft_groups
    source_peak = source_opts[0].param_groups[0]["initial_lr"]
    assert optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.02 * source_peak)
    # it trains on from there
    x, y = torch.randint(0, vocab, (2, 16), generator=g), torch.randint(0, vocab, (2, 16), generator=g)
    loss, _ = train_step(sft_model, optimizers, [(x, y)], NO_AUTOCAST)
    assert loss == loss

    # a source saved by another number of processes, or for other optimizers: one clear line each
    with pytest.raises(SystemExit, match=r"^error: .*saved by 1 processes and this run has 2"):
        load_optimizer_moments(optimizers, args, meta, "cpu", rank=0, world_size=2)
    with pytest.raises(SystemExit, match=r"^error: the optimizer state of .* groups"):
        load_optimizer_moments(optimizers[::-1], args, meta, "cpu", rank=0, world_size=1)


def test_load_optimizer_moments_refuses_a_source_without_optimizer_state(base_dir):
    make_chat_checkpoint(base_dir, source_dir="mid_checkpoints")  # saved for inference: no optimizer state
    model, _, meta = load_model("mid", "cpu", phase="train")
    args = stage_args()
    optimizers, _ = stage_optimizers(model, args, torch.float32, meta)
    with pytest.raises(SystemExit, match=r"^error: .*mid_checkpoints.* step 5 has no optimizer state"):
        load_optimizer_moments(optimizers, args, meta, "cpu", rank=0, world_size=1)
