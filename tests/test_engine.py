"""The engine: KV-cached decoding vs the no-cache reference, row independence, tool use, UTF-8 streaming."""

import math
import os
import random

import pytest
import torch

from conftest import shakespeare
from nanochat.engine import Engine, KVCache, Utf8Stream
from nanochat.sampling import MIN_TEMPERATURE, row_rngs, sample_next
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare(200_000)
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 400)


def random_model(vocab_size, seed=0, n_kv_head=2):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would make every logit 0
            p.normal_(0, 0.3)
    model.eval()
    return model


def no_tool(expr):
    raise AssertionError(f"the calculator was not expected to run ({expr!r})")


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_greedy_with_cache_equals_reference_without_cache(tokenizer, n_kv_head):
    model = random_model(tokenizer.get_vocab_size(), n_kv_head=n_kv_head)
    prompt = tokenizer.encode("To be, or not to be", prepend="<|bos|>")
    with torch.no_grad():
        assert model(torch.tensor([prompt])).std() > 0.1  # the logits vary
    reference = list(model.generate(prompt, max_tokens=40, temperature=0))
    specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    if any(t in specials for t in reference):  # keep the tool/stop logic out of this comparison
        reference = reference[:min(i for i, t in enumerate(reference) if t in specials)]
    assert len(reference) >= 20
    rows, _ = Engine(model, tokenizer, calculator=no_tool).generate_batch(prompt, max_tokens=len(reference), temperature=0)
    assert rows[0][len(prompt):] == reference


def test_planted_cache_offset_bug_is_caught(tokenizer, monkeypatch):
    """Negative control: the comparison above must notice a cache whose position is off by one."""
    model = random_model(tokenizer.get_vocab_size())
    prompt = tokenizer.encode("To be, or not to be", prepend="<|bos|>")
    reference = list(model.generate(prompt, max_tokens=20, temperature=0))
    monkeypatch.setattr(KVCache, "get_pos", lambda self: max(self.pos - 1, 0))
    rows, _ = Engine(model, tokenizer, calculator=lambda e: "0").generate_batch(prompt, max_tokens=20, temperature=0)
    assert rows[0][len(prompt):] != reference


def test_cached_logits_match_full_forward(tokenizer):
    model = random_model(tokenizer.get_vocab_size())
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(1, 2, 4, 16, 2)  # deliberately small: it must grow by copying
        prefill = model(ids[:, :10], kv_cache=cache)
        steps = [model(ids[:, t:t + 1], kv_cache=cache) for t in range(10, 30)]
    cached = torch.cat([prefill] + steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)  # fp32; summation order differs


def test_rows_from_one_prefill_equal_separate_runs(tokenizer):
    model = random_model(tokenizer.get_vocab_size(), seed=3)
    engine = Engine(model, tokenizer, calculator=lambda e: "0")
    prompt = tokenizer.encode("Once upon a time", prepend="<|bos|>")
    rows, masks = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=100)
    for i in range(4):
        alone, alone_masks = engine.generate_batch(prompt, num_samples=1, max_tokens=12, temperature=1.0, seed=100 + i)
        assert rows[i] == alone[0] and masks[i] == alone_masks[0]
    # rows differ from the first token on (each samples its own first token from the shared prefill)
    firsts, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=1, temperature=1.0, seed=7)
    assert len({r[len(prompt)] for r in firsts}) > 1
    # and the same seed reproduces the same rows
    again, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=100)
    assert again == rows


def test_sampling_edge_cases():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    g = row_rngs(0, 1)
    assert sample_next(logits, g, temperature=0).tolist() == [1]
    assert sample_next(logits, g, temperature=1.0, top_k=1).tolist() == [1]  # top-1 = greedy
    for top_k in (0, None, 4, 1000):  # 0/None = no cut; larger than the vocabulary is clamped
        assert 0 <= sample_next(logits, g, temperature=1.0, top_k=top_k).item() < 4
    with pytest.raises(ValueError):
        sample_next(logits, g, temperature=-1)
    # top_p: probabilities ~ [0.006, 0.930, 0.017, 0.046]; 0.5 keeps only the likeliest, 0.95 the top two
    draws = {sample_next(logits, g, temperature=1.0, top_p=0.5).item() for _ in range(50)}
    assert draws == {1}
    draws = {sample_next(logits, g, temperature=1.0, top_p=0.95).item() for _ in range(400)}
    assert draws == {1, 3}


def test_sampling_never_leaves_the_vocabulary():
    """Degenerate distributions (a temperature far below 1, huge/inf/NaN logits) fall back to the argmax; an id
    equal to the vocabulary size (what an overflowing `logits / T` used to give) must never come back."""
    torch.manual_seed(0)
    V, normal = 448, torch.randn(1, 448) * 3
    rows = {
        "T=1e-40": (normal, 1e-40), "T=1e-300": (normal, 1e-300), "T just above MIN_TEMPERATURE": (normal, 2 * MIN_TEMPERATURE),
        "huge logits": (normal * 1e37, 0.5), "one +inf": (normal.index_fill(1, torch.tensor([7]), float("inf")), 1.0),
        "all -inf": (torch.full((1, V), float("-inf")), 1.0), "NaN row": (torch.full((1, V), float("nan")), 1.0),
        "one NaN": (normal.index_fill(1, torch.tensor([3]), float("nan")), 1e-40),
    }
    logits = torch.cat([x for x, _ in rows.values()])
    temps = [t for _, t in rows.values()]
    for top_k, top_p in ((None, None), (50, None), (None, 0.9), (0, 0.5)):
        for seed in range(20):
            ids = sample_next(logits, row_rngs(seed, len(rows)), temps, top_k, top_p).tolist()
            assert all(0 <= i < V for i in ids), dict(zip(rows, ids))
            greedy = normal.argmax().item()
            assert ids[0] == ids[1] == ids[2] == greedy  # below (or barely above) MIN_TEMPERATURE: the argmax
            assert ids[3] == greedy and ids[4] == 7  # the largest logit wins; +inf is the likeliest
            assert ids[7] == greedy  # a NaN logit is never picked
    # the same settings one row at a time give the same ids: a degenerate row changes nothing beside it
    for i, (x, t) in enumerate(rows.values()):
        assert sample_next(x, row_rngs(i, 1), t).tolist() == sample_next(logits, row_rngs(0, len(rows)), temps).tolist()[i:i + 1]
    with pytest.raises(ValueError):
        sample_next(normal, row_rngs(0, 1), temperature=float("nan"))


def reference_distribution(logits, temperature, top_k=None, top_p=None):
    """The distribution sample_next should draw from, computed in plain Python from its definition."""
    x = [v / temperature for v in logits]
    if top_k:
        kth = sorted(x, reverse=True)[min(top_k, len(x)) - 1]
        x = [v if v >= kth else float("-inf") for v in x]
    z = sum(math.exp(v) for v in x)
    probs = [math.exp(v) / z for v in x]
    if top_p is not None and top_p < 1:
        order, seen, keep = sorted(range(len(x)), key=lambda i: -probs[i]), 0.0, set()
        for i in order:
            if seen >= top_p:
                break
            keep.add(i)
            seen += probs[i]
        probs = [p if i in keep else 0.0 for i, p in enumerate(probs)]
        probs = [p / sum(probs) for p in probs]
    return probs


def test_batched_sampler_rows_match_alone_and_the_reference_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    # one row per setting, all sampled in one call: greedy, top_k, top_p, both, plain
    settings = [(0.0, None, None), (0.7, 3, None), (1.3, None, 0.8), (1.0, 5, 0.6), (1.0, None, None)]
    temps, ks, ps = (list(v) for v in zip(*settings))
    batch_rngs = [random.Random(10 + i) for i in range(len(settings))]
    lone_rngs = [random.Random(10 + i) for i in range(len(settings))]
    counts = [[0] * 12 for _ in settings]
    draws = 4000
    for _ in range(draws):
        together = sample_next(logits.expand(len(settings), -1), batch_rngs, temps, ks, ps).tolist()
        for i, (t, k, p) in enumerate(settings):  # the same row alone, its rng in the same state
            assert sample_next(logits, [lone_rngs[i]], t, k, p).item() == together[i]
            counts[i][together[i]] += 1
    assert counts[0][logits.argmax().item()] == draws  # greedy
    for i, (t, k, p) in enumerate(settings[1:], start=1):
        want = reference_distribution(logits[0].tolist(), t, k, p)
        for token, (c, q) in enumerate(zip(counts[i], want)):
            if q == 0:
                assert c == 0, f"row {i} drew token {token}, which its settings exclude"
            else:  # 5 standard deviations of a binomial count
                assert abs(c / draws - q) <= 5 * math.sqrt(q * (1 - q) / draws) + 1e-9, (i, token, c / draws, q)
    with pytest.raises(ValueError):
        sample_next(logits.expand(2, -1), row_rngs(0, 2), [1.0], None, None)  # one value for two rows
    # seeds never collide (Python's random.Random(-1) is random.Random(1)): rows -2..2 all differ
    streams = [tuple(r.random() for _ in range(3)) for r in row_rngs(-2, 5)]
    assert len(set(streams)) == 5
    # a draw at the very top of [0, 1) (it rounds to 1.0 in float32) still lands on an allowed token
    top = type("Top", (), {"random": lambda self: 1 - 2 ** -30})()
    best = logits[0].topk(2).indices.tolist()
    assert sample_next(logits, [top], 1.0, top_k=2).item() == sorted(best)[-1]
    assert sample_next(logits, [top], 1.0, top_p=1e-6).item() == best[0]


class ScriptedModel(torch.nn.Module):
    """
    A stub LM: before <|output_end|> has been seen it emits `head` token by token; after it, `tail`.
    It keeps the KV cache honest (one insert per step) so the engine's bookkeeping is exercised.
    """

    def __init__(self, vocab_size, head, tail, output_end):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.head, self.tail, self.output_end = head, tail, output_end
        self.history = []
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.anchor.device

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if kv_cache is not None:
            kv_cache.insert_kv(0, torch.zeros(B, 1, T, 8), torch.zeros(B, 1, T, 8))
        if T > 1:
            self.history = idx[0].tolist()
            self.prompt_len = T
        else:
            self.history.append(idx[0, 0].item())
        generated = self.history[self.prompt_len:]
        if self.output_end in generated:
            k = len(generated) - generated.index(self.output_end) - 1
            nxt = self.tail[min(k, len(self.tail) - 1)]
        else:
            nxt = self.head[min(len(generated), len(self.head) - 1)]
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        logits[:, -1, nxt] = 10.0
        return logits


def test_tool_use_injects_calculator_output(tokenizer):
    sp = tokenizer.encode_special
    expr = tokenizer.encode("1+2")
    answer = tokenizer.encode(" so 3.")
    head = [sp("<|python_start|>"), *expr, sp("<|python_end|>")]
    tail = [*answer, sp("<|assistant_end|>")]
    model = ScriptedModel(tokenizer.get_vocab_size(), head, tail, sp("<|output_end|>"))
    seen = []

    def calculator(e):
        seen.append(e)
        return str(eval(e, {"__builtins__": {}}))  # test stub on a fixed expression; the real tool never evals

    prompt = [tokenizer.get_bos_token_id(), sp("<|user_start|>")] + tokenizer.encode("1+2?") + [sp("<|user_end|>"), sp("<|assistant_start|>")]
    rows, masks = Engine(model, tokenizer, calculator=calculator).generate_batch(prompt, max_tokens=40, temperature=0)
    injected = [sp("<|output_start|>")] + tokenizer.encode("3") + [sp("<|output_end|>")]
    assert seen == ["1+2"]
    assert rows[0][len(prompt):] == head + injected + answer
    assert masks[0][len(prompt):] == [1] * len(head) + [0] * len(injected) + [1] * len(answer)


def test_tool_error_is_injected_as_text(tokenizer):
    from nanochat.calculator import use_calculator
    sp = tokenizer.encode_special
    head = [sp("<|python_start|>"), *tokenizer.encode("1/0"), sp("<|python_end|>")]
    tail = [sp("<|assistant_end|>")]
    model = ScriptedModel(tokenizer.get_vocab_size(), head, tail, sp("<|output_end|>"))
    prompt = [tokenizer.get_bos_token_id(), sp("<|assistant_start|>")]
    rows, masks = Engine(model, tokenizer).generate_batch(prompt, max_tokens=60, temperature=0)
    out = rows[0][len(prompt) + len(head):]
    assert out[0] == sp("<|output_start|>") and out[-1] == sp("<|output_end|>")
    text = tokenizer.decode(out[1:-1])
    assert text == use_calculator("1/0") and "error" in text.lower()


def test_streamed_text_never_splits_characters(tokenizer):
    text = "Hi 😀 你好, naïve ∑ 🙂!"
    ranks = tokenizer.get_mergeable_ranks()
    byte_ids = [ranks[bytes([b])] for b in text.encode("utf-8")]  # one byte per token: splits every multi-byte char
    script = byte_ids + [tokenizer.encode_special("<|assistant_end|>")]
    model = ScriptedModel(tokenizer.get_vocab_size(), script, script[-1:], output_end=-1)  # no tool call
    prompt = [tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_start|>")]
    stream, pieces = Utf8Stream(tokenizer), []
    for column, _ in Engine(model, tokenizer, calculator=no_tool).generate(prompt, max_tokens=100, temperature=0):
        if column[0] is not None:
            pieces.append(stream.push(column[0]))
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(byte_ids)  # some tokens were held back, not decoded alone
