"""
Continuous batching (batching.BatchScheduler) against the one-request Engine: every request served in a
mixed batch (different prompt lengths, arrivals mid-generation, early stops, tool calls, several rows)
gets the tokens it gets alone; seeded sampling does not depend on the neighbours; a cancelled request
frees its slots; the cache is allocated once.
"""

import threading
import time

import pytest
import torch

from conftest import shakespeare
from nanochat import batching as batching_module
from nanochat.batching import BatchScheduler
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare(100_000)
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 400)


class PositionScript(torch.nn.Module):
    """A real GPT whose next token is overridden at some absolute positions (the same for every row,
    whatever the batch), so that rows write calculator calls at known places."""

    def __init__(self, gpt, script):
        super().__init__()
        self.gpt, self.script, self.config = gpt, script, gpt.config

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None):
        positions = getattr(kv_cache, "positions", None)
        start = None if positions is not None else (0 if kv_cache is None else kv_cache.get_pos())
        logits = self.gpt(idx, kv_cache=kv_cache)
        last = positions.tolist() if positions is not None else [start + idx.size(1) - 1] * idx.size(0)
        for row, pos in enumerate(last):
            if pos + 1 in self.script:  # the token at position pos + 1 is sampled from these logits
                logits[row, -1] = -1e4
                logits[row, -1, self.script[pos + 1]] = 1e4
        return logits


def random_gpt(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=96, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would make every logit 0
            p.normal_(0, 0.3)
    return model.eval()


def prompts(tokenizer):
    texts = ["To be", "First Citizen: before we proceed any further", "O Romeo, Romeo", "Now is the winter",
             "What light through yonder window breaks? It is the east"]
    return [tokenizer.encode(t, prepend=tokenizer.get_bos_token_id()) for t in texts]


def alone(engine, prompt, **kwargs):
    columns = list(engine.generate(prompt, **kwargs))
    return [c for c, _ in columns], [f for _, f in columns]


def collect(request):
    columns = list(request)
    return [c for c, _ in columns], [f for _, f in columns]


def test_mixed_batch_equals_each_request_alone(tokenizer):
    sp = tokenizer.encode_special
    script = {20: sp("<|python_start|>"), 21: tokenizer.encode("2")[0], 22: sp("<|python_end|>"),
              34: sp("<|python_start|>"), 35: tokenizer.encode("7")[0], 36: sp("<|python_end|>")}
    model = PositionScript(random_gpt(tokenizer), script)
    engine = Engine(model, tokenizer, calculator=lambda expr: str(int(expr) * 111))
    ps = prompts(tokenizer)
    budgets = [30, 12, 40, 3, 25]  # early stops: small budgets; a long prompt ends first
    expected = [alone(engine, p, max_tokens=b, temperature=0) for p, b in zip(ps, budgets)]
    assert any(1 in sum(f, []) for _, f in expected), "the script must make some rows call the calculator"
    scheduler = BatchScheduler(engine, slots=3, max_len=96)
    # arrivals mid-generation: the first three start together, the others join as slots free up
    first = [scheduler.submit(p, max_tokens=b, temperature=0) for p, b in zip(ps[:3], budgets[:3])]
    it = iter(first[0])
    head = [next(it) for _ in range(5)]
    late = [scheduler.submit(p, max_tokens=b, temperature=0) for p, b in zip(ps[3:], budgets[3:])]
    rest = list(it)
    got = [([c for c, _ in head + rest], [f for _, f in head + rest])] + [collect(r) for r in first[1:] + late]
    for i, (want, have) in enumerate(zip(expected, got)):
        assert have == want, f"request {i} differs in the batch"
    assert scheduler.steps < sum(budgets) - len(budgets)  # requests really shared steps


def test_several_rows_and_seeded_sampling_do_not_depend_on_neighbours(tokenizer):
    engine = Engine(random_gpt(tokenizer, seed=1), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer)
    kwargs = dict(max_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    want = alone(engine, ps[1], num_samples=3, seed=7, **kwargs)
    scheduler = BatchScheduler(engine, slots=6, max_len=96)
    crowd = [scheduler.submit(p, seed=100 + i, max_tokens=16, temperature=1.3) for i, p in enumerate(ps[2:])]
    mine = scheduler.submit(ps[1], num_samples=3, seed=7, **kwargs)
    assert collect(mine) == want  # row i seeded seed + i, as the Engine does
    for r in crowd:
        collect(r)
    lonely = BatchScheduler(engine, slots=6, max_len=96)
    assert collect(lonely.submit(ps[1], num_samples=3, seed=7, **kwargs)) == want


def test_a_failing_request_ends_alone_and_its_slot_is_reset(tokenizer, monkeypatch):
    """
    One request's row gets an id far outside the vocabulary (a planted sampler bug; such an id used to stay in its
    freed slot and fail every later step that computed the slot), another's consumer raises at its third step:
    each ends with its own error, and the requests sharing their steps, and one that takes their slots after
    them, get exactly the tokens they get alone.
    """
    engine = Engine(random_gpt(tokenizer, seed=4), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer)
    want = [alone(engine, p, max_tokens=20, temperature=0) for p in ps]
    real, bad = batching_module.sample_next, 10**6

    def planted(logits, rngs, temperature=1.0, top_k=None, top_p=None):  # rows sampled at temperature 0.5 get `bad`
        ids = real(logits, rngs, temperature, top_k, top_p)
        temps = temperature if isinstance(temperature, list) else [temperature] * len(ids)
        return torch.tensor([bad if t == 0.5 else i for t, i in zip(temps, ids.tolist())])
    monkeypatch.setattr(batching_module, "sample_next", planted)
    scheduler = BatchScheduler(engine, slots=8, max_len=96)
    seen, ends = [], []

    def raising(event):
        if event is None or isinstance(event, BaseException):
            return ends.append(event)
        seen.append(event)
        if len(seen) == 3:
            raise RuntimeError("the consumer broke")
    with scheduler.cond:  # admitted together, in this order: victims in slots 0-1, the bad row in slot 2
        victims = [scheduler.submit(p, max_tokens=20, temperature=0) for p in ps[:2]]
        poisoned = scheduler.submit(ps[2], max_tokens=20, temperature=0.5, seed=1)
        broken = scheduler.submit(ps[3], max_tokens=20, temperature=0, on_event=raising)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        collect(poisoned)
    later = scheduler.submit(ps[4], max_tokens=20, temperature=0)  # into a freed slot
    assert [collect(v) for v in victims] == want[:2]
    assert collect(later) == want[4]
    assert len(seen) == 3 and len(ends) == 1 and str(ends[0]) == "the consumer broke"
    assert scheduler.free_slots() == 8
    scheduler.close()


class Slow(torch.nn.Module):
    """A model that takes 20 ms a forward: a request that is not stopped runs long enough to tell."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None):
        time.sleep(0.02)
        return self.gpt(idx, kv_cache=kv_cache)


def test_cancel_frees_the_slot_and_the_cache_is_never_reallocated(tokenizer):
    engine = Engine(Slow(random_gpt(tokenizer, seed=2)), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer)
    scheduler = BatchScheduler(engine, slots=2, max_len=96)
    a = scheduler.submit(ps[0], max_tokens=80, temperature=0)
    it = iter(a)
    next(it)
    pointers = [t.data_ptr() for t in scheduler.cache.k + scheduler.cache.v]
    it.close()  # the client went away
    deadline = time.time() + 10
    while scheduler.free_slots() < 2 and time.time() < deadline:
        time.sleep(0.01)
    # freed after a step or two, not after the 79 steps its max_tokens allowed
    assert scheduler.free_slots() == 2 and scheduler.steps < 20
    # a full pool: the third request waits for a slot, then runs to its end
    reqs = [scheduler.submit(p, max_tokens=6, temperature=0) for p in ps[1:4]]
    outs = [collect(r) for r in reqs]
    assert [len(c) for c, _ in outs] == [alone(engine, p, max_tokens=6, temperature=0)[0].__len__() for p in ps[1:4]]
    assert [t.data_ptr() for t in scheduler.cache.k + scheduler.cache.v] == pointers
    with pytest.raises(ValueError, match="cache holds"):
        scheduler.submit(list(range(96)))
    with pytest.raises(ValueError, match="num_samples"):
        scheduler.submit(ps[0], num_samples=3)


def test_concurrent_submitters_from_threads(tokenizer):
    engine = Engine(random_gpt(tokenizer, seed=3), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer) * 2
    want = [alone(engine, p, max_tokens=10, temperature=0) for p in ps]
    scheduler = BatchScheduler(engine, slots=4, max_len=96)
    got = [None] * len(ps)

    def client(i):
        got[i] = collect(scheduler.submit(ps[i], max_tokens=10, temperature=0))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_compiled_decode_step(tokenizer):
    """The compiled step computes the eager step's logits (to rounding: fused kernels add in another
    order), and a mixed batch on the compiled scheduler equals each request alone on it, exactly."""
    from nanochat.engine import KVCache
    engine = Engine(random_gpt(tokenizer, seed=4), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer)
    scheduler = BatchScheduler(engine, slots=3, max_len=96, compile="on")
    alone_runs = [collect(scheduler.submit(p, max_tokens=12, temperature=0)) for p in ps[:3]]  # one at a time
    assert scheduler.compiled is not None
    together = [collect(r) for r in [scheduler.submit(p, max_tokens=12, temperature=0) for p in ps[:3]]]
    assert together == alone_runs
    with torch.inference_mode():
        for slot, p in enumerate(ps[:3]):
            prefix = KVCache(1, scheduler.cache.shape[1], len(p), scheduler.cache.shape[3], scheduler.cache.num_layers)
            engine.model(torch.tensor([p]), kv_cache=prefix)
            scheduler.cache.load(slot, prefix, len(p))
            scheduler.feed[slot, 0] = p[-1]
        saved = [t.clone() for t in scheduler.cache.k + scheduler.cache.v]
        eager = scheduler._decode(3, 96)
        for t, v in zip(scheduler.cache.k + scheduler.cache.v, saved):
            t.copy_(v)
        compiled = scheduler.compiled(3, 96)
    assert eager.std() > 0.1 and (compiled - eager).abs().max() < 1e-3 * eager.abs().max()


def test_close_stops_the_thread_and_a_new_request_restarts_it(tokenizer):
    engine = Engine(random_gpt(tokenizer, seed=5), tokenizer, calculator=lambda e: "0")
    p = prompts(tokenizer)[0]
    scheduler = BatchScheduler(engine, slots=2, max_len=96)
    first = collect(scheduler.submit(p, max_tokens=5, temperature=0))
    thread = scheduler.thread
    scheduler.close()
    assert not thread.is_alive() and scheduler.thread is None
    assert collect(scheduler.submit(p, max_tokens=5, temperature=0)) == first
    scheduler.close()


def test_a_bf16_weights_replica_batches_like_it_runs_alone(tokenizer):
    """chat_web stores a replica's weights in bf16 when bf16 is chosen (--dtype, or auto where it measures
    faster): the scheduler's cache follows that dtype and batched replies equal the replica's replies alone."""
    from nanochat.serving import serving_model
    engine = Engine(random_gpt(tokenizer, seed=6).to(torch.bfloat16), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer)[:4]
    expected = [alone(engine, p, max_tokens=12, temperature=0) for p in ps]
    scheduler = BatchScheduler(engine, slots=4, max_len=96)
    got = [collect(r) for r in [scheduler.submit(p, max_tokens=12, temperature=0) for p in ps]]
    assert got == expected
    assert scheduler.cache.k[0].dtype == torch.bfloat16 and scheduler.steps < 4 * 12
    scheduler.close()
    fp32 = random_gpt(tokenizer, seed=6)
    assert serving_model(fp32, "bfloat16", "cpu").lm_head.weight.dtype == torch.bfloat16
    chosen = serving_model(random_gpt(tokenizer, seed=6), "auto", "cpu")  # measured: either, never a mix
    assert {p.dtype for p in chosen.parameters()} in ({torch.float32}, {torch.bfloat16})
    assert serving_model(random_gpt(tokenizer, seed=6), torch.bfloat16, "cpu").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        serving_model(fp32, "fp8", "cpu")


def test_a_call_runs_on_the_scheduler_thread_between_steps(tokenizer):
    """call(fn): fn runs on the scheduler's own thread (never beside a decode step) and its result is the request's one
    event; a failing fn ends its call alone, and the requests in flight get the tokens they get alone."""
    engine = Engine(random_gpt(tokenizer, seed=7), tokenizer, calculator=lambda e: "0")
    ps = prompts(tokenizer)
    want = [alone(engine, p, max_tokens=10, temperature=0) for p in ps[:2]]
    scheduler = BatchScheduler(engine, slots=2, max_len=96)
    reqs = [scheduler.submit(p, max_tokens=10, temperature=0) for p in ps[:2]]
    where = scheduler.call(lambda: threading.current_thread().name)
    broken = scheduler.call(lambda: 1 / 0)
    assert list(where) == ["nanochat-batch"]
    with pytest.raises(ZeroDivisionError):
        list(broken)
    assert [collect(r) for r in reqs] == want and scheduler.free_slots() == 2
    scheduler.close()
