"""
The optional architecture fields of GPTConfig (issue #22) against slow references: every field off is the
model as it was before they existed, bit for bit (tests/data/gpt_reference); meta-device construction gives
the documented initial values; the sliding-window mask equals one built with loops; with every field on,
KV-cached decoding (the Engine: prefill, decode, replicated rows, tokens the calculator forces; the
BatchScheduler: rows at different lengths in a slot pool) equals the no-cache forward; the optimizer groups;
base_train resumes exactly and 2 gloo ranks equal 1 process; export refuses what transformers cannot compute.
"""

import argparse
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, shakespeare
from nanochat.batching import BatchScheduler
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, layer_windows, window_mask
from nanochat.kv_cache import KVCache, SlotCache
from nanochat.stage import add_architecture_args, architecture_fields
from nanochat.tokenizer import RustBPETokenizer
from test_train import TINY, env_base, metrics, run_train  # noqa: F401 (env_base: shards + tokenizer, a fixture)

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpt_reference", "gpt_reference.pt")
ALL = dict(value_embeds=True, resid_mix=True, smear=True, backout=True, qk_scale=1.2, rope_base=100000.0,
           window_pattern="SL", short_window=6)
ARCH_FLAGS = ["--value-embeds", "--resid-mix", "--smear", "--backout", "--qk-scale", "1.2", "--rope-base", "100000",
              "--window-pattern", "SL"]  # base_train's --short-window default: a quarter of --max-seq-len 64


def reference_model():
    """The model of tests/data/gpt_reference (its README): today's defaults, every projection re-drawn so that
    every layer matters, a fixed input and targets."""
    torch.manual_seed(1234)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(5678)
    idx = torch.randint(0, 100, (2, 32), generator=g)
    targets = torch.randint(0, 100, (2, 32), generator=g)
    targets[:, :3] = -1
    return model, idx, targets


def test_every_field_off_is_the_model_before_them_bit_for_bit():
    ref = torch.load(REFERENCE)
    model, idx, targets = reference_model()
    assert torch.equal(idx, ref["idx"]) and torch.equal(targets, ref["targets"])
    sums = {k: v.double().sum() for k, v in model.state_dict().items()}
    assert sums.keys() == ref["param_sums"].keys()  # not one parameter more
    for name, value in sums.items():
        assert torch.equal(value, ref["param_sums"][name]), f"init_weights changed {name}"
    with torch.no_grad():
        logits, loss = model(idx), model(idx, targets)
    assert ref["logits"].std() > 0.1  # the logits vary: the comparison is not trivial
    assert torch.equal(logits, ref["logits"]), f"logits differ by {(logits - ref['logits']).abs().max():.3g}"
    assert torch.equal(loss, ref["loss"])
    # a checkpoint saved before the fields existed (six fields in its model_config) builds today's architecture
    old = {k: v for k, v in dataclasses.asdict(model.config).items() if k not in ALL}
    assert len(old) == 6 and GPTConfig(**old) == model.config
    assert all(GPTConfig(**old).__dict__[k] == f.default for k, f in GPTConfig.__dataclass_fields__.items() if k in ALL)


def test_meta_device_init_gives_the_documented_values():
    cfg = GPTConfig(sequence_len=32, vocab_size=100, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, **ALL)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what uninitialised memory may hold: init_weights must overwrite every value
    torch.manual_seed(0)
    model.init_weights()
    eager = GPT(cfg)
    torch.manual_seed(0)
    eager.init_weights()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
    assert (model.resid_lambdas == 1).all() and model.resid_lambdas.shape == (3,)
    assert (model.x0_lambdas == 0).all() and model.x0_lambdas.shape == (3,)
    assert (model.smear_gate == 0).all() and model.smear_gate.shape == (1, 12) and model.smear_lambda.tolist() == [0.0]
    assert model.backout_lambda.tolist() == [0.0]
    assert sorted(model.value_embeds) == ["0", "2"]  # alternating layers, the last one included
    bound = math.sqrt(3) / 8  # uniform with std n_embd^-0.5
    for i, block in enumerate(model.transformer.h):
        gate = block.attn.ve_gate
        if str(i) in model.value_embeds:
            table = model.value_embeds[str(i)].weight
            assert table.shape == (128, 32) and table.abs().max() <= bound
            assert table.std().item() == pytest.approx(1 / 8, rel=0.1)
            assert gate.shape == (1, 12) and (gate == 0).all()  # gate 3 * sigmoid(0) = 1.5
        else:
            assert gate is None
    # resid_mix, smear and backout start neutral: with the same other weights, the plain model's function, exactly
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda" not in name and "smear_gate" not in name:
                p.normal_(0, 0.3)
    plain = GPT(dataclasses.replace(cfg, resid_mix=False, smear=False, backout=False))
    plain.init_weights()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lambda" not in k and "smear" not in k})
    idx = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert model(idx).std() > 0.1 and torch.equal(model(idx), plain(idx))


def loop_mask(positions, num_keys, window):
    """The sliding-window mask from its definition: the key at j is visible to the query at p iff p - window < j <= p."""
    return [[[p - window < j <= p for j in range(num_keys)] for p in row] for row in positions]


def test_window_mask_equals_loops_and_windows_follow_the_pattern():
    for positions, num_keys, window in (([list(range(10))], 10, 3), ([list(range(7, 12))], 12, 4),
                                        ([[5], [0], [9], [15]], 16, 2), ([[3]], 8, 1), ([list(range(6))], 6, 100)):
        got = window_mask(torch.tensor(positions), num_keys, window)
        assert got.shape == (len(positions), 1, len(positions[0]), num_keys)
        assert got[:, 0].tolist() == loop_mask(positions, num_keys, window)
    # the pattern is tiled over the layers, the last one is always full, S is a quarter of the context by default
    assert layer_windows(GPTConfig(sequence_len=64, n_layer=6, window_pattern="SSL")) == [16, 16, None, 16, 16, None]
    assert layer_windows(GPTConfig(sequence_len=64, n_layer=5, window_pattern="SSSL")) == [16, 16, 16, None, None]
    assert layer_windows(GPTConfig(n_layer=3, window_pattern="S", short_window=5)) == [5, 5, None]
    assert layer_windows(GPTConfig(n_layer=3)) == [None] * 3
    for bad in ("", "SXL", "ssl"):
        with pytest.raises(ValueError, match="window_pattern"):
            GPTConfig(window_pattern=bad)
    # in the full forward, the windowed first layer's output at t depends on exactly the tokens t-3..t (window 4)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          window_pattern="SL", short_window=4))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    outputs = []
    model.transformer.h[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    idx = torch.randint(0, 100, (1, 20))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 100
    with torch.no_grad():
        model(idx)
        model(changed)
    moved = (outputs[0] - outputs[1]).abs().amax(dim=-1)[0]
    assert moved[:8].max() == 0 and (moved[8:12] > 1e-3).all() and moved[12:].max() == 0, moved


def test_flex_attention_windows_equal_the_sdpa_mask(monkeypatch):
    """The CUDA training path for windows: FlexAttention with flex_window_mask equals SDPA with window_mask (forward:
    FlexAttention has no backward on a CPU; bench.gpu compares its gradients on CUDA), blocks of 128 crossed; and a
    compiled forward on a FLEX_DEVICES device builds its block masks in the graph (no break) with the eager logits."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    import nanochat.gpt as gpt
    torch.manual_seed(0)
    for T, window, heads in ((64, 7, (4, 2)), (50, 1, (2, 2)), (40, 100, (4, 1)), (300, 133, (2, 1))):
        q = torch.randn(2, heads[0], T, 16)
        k, v = torch.randn(2, 2, heads[1], T, 16).unbind(1)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=window_mask(torch.arange(T)[None], T, window), enable_gqa=True)
        got = flex_attention(q, k, v, block_mask=gpt.flex_window_mask(T, window, "cpu"), enable_gqa=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model = GPT(GPTConfig(sequence_len=40, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, **ALL))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        idx = torch.randint(0, 100, (2, 40))
        eager = model(idx)
        built = []
        monkeypatch.setattr(gpt, "FLEX_DEVICES", ("cpu",))
        real = gpt.flex_window_mask
        monkeypatch.setattr(gpt, "flex_window_mask", lambda *a: built.append(a) or real(*a))
        model(idx)  # eager FlexAttention is an unfused reference: eager stays on SDPA
        assert built == []
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, dynamic=False)(idx)
    assert [a[:2] for a in built] == [(40, 6)] and not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare(100_000)
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 400)


def special_ids(tokenizer):
    return [tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()]


def random_model(tokenizer, seed=0, **fields):
    """4 layers (windows S L S L), every parameter re-drawn, lambdas away from neutral so that every field matters;
    the special tokens' rows of the head zeroed so that greedy decoding never stops or calls a tool by itself."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=2,
                          n_embd=64, **fields))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for p, value in ((model.resid_lambdas, 1.0), (model.smear_lambda, 1.0), (model.backout_lambda, 0.5)):
            if p is not None:
                p.add_(value)
        model.lm_head.weight[special_ids(tokenizer)] = 0
    return model.eval()


def prompts(tokenizer):
    texts = ["First Citizen: before we proceed any further", "O Romeo, Romeo", "Now is the winter of our discontent",
             "What light through yonder window breaks? It is the east"]
    return [tokenizer.encode(t, prepend="<|bos|>") for t in texts]


def no_tool(expr):
    raise AssertionError(f"the calculator was not expected to run ({expr!r})")


def test_the_test_model_uses_every_field(tokenizer):
    """The decoding tests below are not vacuous: neutralising any one field moves the logits."""
    model = random_model(tokenizer, **ALL)
    idx = torch.tensor([prompts(tokenizer)[3]])
    assert idx.size(1) > 2 * ALL["short_window"]
    with torch.no_grad():
        base = model(idx)
        assert base.std() > 0.5
        for name, neutral in (("resid_lambdas", 1.0), ("x0_lambdas", 0.0), ("smear_lambda", 0.0), ("backout_lambda", 0.0)):
            saved = getattr(model, name).clone()
            getattr(model, name).fill_(neutral)
            assert (model(idx) - base).abs().max() > 1e-2, name
            getattr(model, name).copy_(saved)
        for table in model.value_embeds.values():
            table.weight.mul_(0)
        assert (model(idx) - base).abs().max() > 1e-2, "value_embeds"
    for name, change in (("qk_scale", dict(qk_scale=1.0)), ("rope_base", dict(rope_base=10000.0)),
                         ("window_pattern", dict(window_pattern="L"))):
        other = random_model(tokenizer, **dict(ALL, **change))
        with torch.no_grad():
            assert (other(idx) - base).abs().max() > 1e-2, name


def test_engine_decoding_equals_the_no_cache_forward_with_every_field_on(tokenizer):
    model = random_model(tokenizer, **ALL)
    prompt = prompts(tokenizer)[0]
    assert len(prompt) > ALL["short_window"]  # the window cuts into the prompt itself
    reference = list(model.generate(prompt, max_tokens=30, temperature=0))
    assert not set(reference) & set(special_ids(tokenizer))
    rows, _ = Engine(model, tokenizer, calculator=no_tool).generate_batch(prompt, max_tokens=30, temperature=0)
    assert rows[0][len(prompt):] == reference
    # the cache's logits: prefill, a chunk after a cached prefix, then one token at a time (the cache grows by copying)
    idx = torch.randint(0, tokenizer.get_vocab_size(), (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2, 2, 4, 16, 4)
        pieces = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:20], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


class Recorder(torch.nn.Module):
    """The GPT under test, keeping the logits it gives at each (cache kind, row, position) with the token fed there,
    and writing a calculator call at fixed positions: the special tokens are otherwise never sampled."""

    def __init__(self, gpt, script, specials):
        super().__init__()
        self.gpt, self.config, self.script, self.specials = gpt, gpt.config, script, specials
        self.seen = {}

    def get_device(self):
        return self.gpt.get_device()

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        if isinstance(kv_cache, SlotCache):  # a row is a slot
            kind, positions = "slot", kv_cache.positions[:B, None].tolist()
        else:
            kind, positions = "kv", [list(range(kv_cache.get_pos(), kv_cache.get_pos() + T))] * B
        logits = self.gpt(idx, kv_cache=kv_cache)
        out = logits.clone()
        out[..., self.specials] = -1e4
        for row in range(B):
            for t, pos in enumerate(positions[row]):
                self.seen[(kind, row, pos)] = (idx[row, t].item(), logits[row, t].clone())
            if positions[row][-1] + 1 in self.script:
                out[row, -1, self.script[positions[row][-1] + 1]] = 1e4
        return out


def assert_logits_match_full_forward(gpt, seen, seq, key, start=0):
    """Every logit the cached run gave for seq[start:] (key(pos): where it was recorded) equals the full forward's."""
    with torch.no_grad():
        full = gpt(torch.tensor([seq]))[0]
    for pos in range(start, len(seq) - 1):  # the last token was never fed
        token, logits = seen[key(pos)]
        assert token == seq[pos], pos
        torch.testing.assert_close(logits, full[pos], rtol=1e-4, atol=1e-4, msg=f"position {pos}")


def calculator_script(tokenizer, at):
    sp = tokenizer.encode_special
    return {at: sp("<|python_start|>"), at + 1: tokenizer.encode("7")[0], at + 2: sp("<|python_end|>")}


def test_engine_smears_the_right_token_across_prefill_decode_and_forced_tokens(tokenizer):
    gpt = random_model(tokenizer, seed=1, **ALL)
    prompt = prompts(tokenizer)[1]
    recorder = Recorder(gpt, calculator_script(tokenizer, len(prompt) + 4), special_ids(tokenizer))
    engine = Engine(recorder, tokenizer, calculator=lambda expr: "12345")
    rows, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=24, temperature=1.0, seed=3)
    assert rows[0] != rows[1]
    for i, (row, mask) in enumerate(zip(rows, masks)):
        assert mask[len(prompt):].count(0) >= 3  # the calculator's output was forced into the row
        assert_logits_match_full_forward(gpt, recorder.seen, row,
                                         lambda pos: ("kv", 0 if pos < len(prompt) else i, pos))


def test_batch_scheduler_equals_the_no_cache_forward_with_every_field_on(tokenizer):
    model = random_model(tokenizer, seed=2, **ALL)
    ps, budgets = prompts(tokenizer), [20, 8, 25, 12]
    want = [list(model.generate(p, max_tokens=b, temperature=0)) for p, b in zip(ps, budgets)]
    scheduler = BatchScheduler(Engine(model, tokenizer, calculator=no_tool), slots=3, max_len=64)
    first = [scheduler.submit(p, max_tokens=b, temperature=0) for p, b in zip(ps[:3], budgets[:3])]
    it = iter(first[0])
    head = [next(it) for _ in range(4)]
    late = scheduler.submit(ps[3], max_tokens=budgets[3], temperature=0)  # joins mid-generation, in a freed slot
    got = [[c[0] for c, _ in head + list(it)]] + [[c[0] for c, _ in r] for r in first[1:] + [late]]
    scheduler.close()
    assert got == want


def test_batch_scheduler_smears_the_right_token_across_loads_and_forced_tokens(tokenizer):
    gpt = random_model(tokenizer, seed=3, **ALL)
    ps = prompts(tokenizer)[:3]
    recorder = Recorder(gpt, calculator_script(tokenizer, max(map(len, ps)) + 3), special_ids(tokenizer))
    scheduler = BatchScheduler(Engine(recorder, tokenizer, calculator=lambda expr: "12345"), slots=3, max_len=64)
    first = [scheduler.submit(p, max_tokens=26 - i, temperature=1.0, seed=i) for i, p in enumerate(ps[:2])]
    it = iter(first[0])
    head = [next(it) for _ in range(3)]
    late = scheduler.submit(ps[2], max_tokens=20, temperature=1.0, seed=5)  # rows at different lengths
    runs = [head + list(it)] + [list(r) for r in first[1:] + [late]]
    scheduler.close()
    for request, prompt, columns in zip(first + [late], ps, runs):
        assert any(f[0] for _, f in columns)  # a forced tool output
        seq = prompt + [c[0] for c, _ in columns]
        slot = request.slots[0]
        # every logit after the prompt came from the slot pool (the prefill is the Engine's, tested above)
        assert_logits_match_full_forward(gpt, recorder.seen, seq, lambda pos: ("slot", slot, pos), start=len(prompt))
    # a step run twice at the same positions (a compiled step's warm-up) gives the same logits
    cache = scheduler.cache
    cache.lengths[:1] = len(ps[0]) + 3
    cache.begin_step(1, 64)
    feed = torch.tensor([[ps[0][0]]])
    with torch.inference_mode():  # the scheduler's tensors are inference tensors
        assert torch.equal(gpt(feed, kv_cache=cache), gpt(feed, kv_cache=cache))


# -------------------------------------------------------------------------------------------------
# optimizers, flags, FLOPs


def test_optimizer_groups_flags_and_flops():
    from nanochat.schedule import peak_lrs
    from nanochat.stage import optimizer_recipe, stage_optimizers
    small = dict(sequence_len=64, vocab_size=100, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
    plain = GPT(GPTConfig(**small))
    plain.init_weights()
    adamw, muon = plain.setup_optimizers()  # fields off: the groups as they always were
    assert [(g["name"], len(g["params"])) for g in adamw.param_groups] == [("lm_head", 1), ("embedding", 1)]
    assert sum(len(g["params"]) for g in muon.param_groups) == 4 * 6
    model = GPT(GPTConfig(**small, **ALL))
    model.init_weights()
    lrs = peak_lrs(64, share=0.5, scalar_lr=0.04)
    betas = {"embedding": (0.7, 0.9), "lm_head": (0.8, 0.95), "scalars": (0.85, 0.99)}
    adamw, muon = model.setup_optimizers(lrs, weight_decay={"embedding": 0.1, "lm_head": 0.2}, adam_betas=betas)
    groups = {g["name"]: g for g in adamw.param_groups}
    assert list(groups) == ["lm_head", "embedding", "scalars", "resid_lambdas"]
    assert groups["scalars"]["lr"] == pytest.approx(0.02) and groups["scalars"]["betas"] == (0.85, 0.99)
    assert groups["scalars"]["weight_decay"] == 0 and groups["embedding"]["weight_decay"] == 0.1
    gates = [b.attn.ve_gate for b in model.transformer.h if b.attn.ve_gate is not None]
    scalars = [model.x0_lambdas, model.smear_gate, model.smear_lambda, model.backout_lambda, *gates]
    assert {id(p) for p in groups["scalars"]["params"]} == {id(p) for p in scalars} and len(gates) == 2
    # the residual lambdas (multiplied through every layer): their own group at 1/100 of the scalars' LR, not decayed
    resid = groups["resid_lambdas"]
    assert resid["params"] == [model.resid_lambdas] and resid["lr"] == pytest.approx(0.02 * 0.01)
    assert resid["betas"] == (0.85, 0.99) and resid["weight_decay"] == 0 and resid["initial_lr"] == resid["lr"]
    embeddings = [model.transformer.wte.weight, *(t.weight for t in model.value_embeds.values())]
    assert {id(p) for p in groups["embedding"]["params"]} == {id(p) for p in embeddings}
    matrices = [lin.weight for b in model.transformer.h for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.attn.c_proj,
                                                                    b.mlp.c_fc, b.mlp.c_proj)]
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in matrices}
    with pytest.raises(ValueError, match="scalars"):
        model.setup_optimizers(peak_lrs(64))  # no LR for the scalars: said, not a KeyError
    # a post-training stage inherits the scalars' LR and betas from the base run's recipe, at its --init-lr-frac
    args = argparse.Namespace(matrix_lr=None, embedding_lr=0.3, unembedding_lr=None, init_lr_frac=0.1)
    (adamw, _), recipe = stage_optimizers(model, args, torch.float32, {"recipe": optimizer_recipe(lrs, adam_betas=betas)})
    groups = {g["name"]: g for g in adamw.param_groups}
    assert recipe["lrs"]["scalars"] == lrs["scalars"] and groups["scalars"]["initial_lr"] == pytest.approx(0.002)
    assert groups["resid_lambdas"]["initial_lr"] == pytest.approx(0.002 * 0.01)
    assert groups["scalars"]["betas"] == (0.85, 0.99)
    # the flags: off by default (today's config), each field from its flag, a bad value a one-line error
    p = argparse.ArgumentParser()
    add_architecture_args(p)
    assert GPTConfig(**architecture_fields(p.parse_args([]))) == GPTConfig()
    fields = architecture_fields(p.parse_args(ARCH_FLAGS + ["--short-window", "6"]))
    assert fields == dict(ALL, window_pattern="SL", short_window=6)
    with pytest.raises(SystemExit, match="error: window_pattern"):
        architecture_fields(p.parse_args(["--window-pattern", "SXL"]))
    assert "2410.17897" in p.format_help()
    # FLOPs: the value embeddings are lookups like wte; a window of 6 keys in layers 0 and 2, 64 in 1 and 3
    lookups = model.transformer.wte.weight.numel() + sum(t.weight.numel() for t in model.value_embeds.values())
    assert model.num_scaling_params() == model.num_params() - lookups
    assert model.estimate_flops() == 6 * model.num_scaling_params() + 12 * 4 * 16 * (6 + 64 + 6 + 64)
    assert plain.estimate_flops() == 6 * plain.num_scaling_params() + 12 * 4 * 16 * 64 * 4


# -------------------------------------------------------------------------------------------------
# base_train end to end with every field on


@pytest.fixture(scope="module")
def uninterrupted(env_base):
    run_train(env_base, *TINY, *ARCH_FLAGS, "--num-iterations", "4", "--model-tag", "arch-full")
    return metrics(env_base, "arch-full")


def test_base_train_with_every_field_on_resumes_exactly(env_base, uninterrupted):
    from nanochat.checkpoint import load_meta
    losses = [r["loss"] for r in uninterrupted]
    assert [r["step"] for r in uninterrupted] == [1, 2, 3, 4] and len(set(losses)) == 4
    run_train(env_base, *TINY, *ARCH_FLAGS, "--num-iterations", "4", "--model-tag", "arch-split", "--stop-after-step", "2")
    run_train(env_base, *TINY, *ARCH_FLAGS, "--num-iterations", "4", "--model-tag", "arch-split", "--resume")
    split = metrics(env_base, "arch-split")
    assert [r["loss"] for r in split] == losses  # CPU fp32: bit-identical
    assert [r["data_checksum"] for r in split] == [r["data_checksum"] for r in uninterrupted]
    meta = load_meta(os.path.join(env_base, "base_checkpoints", "arch-split"), 4)
    config = GPTConfig(**meta["model_config"])
    assert (config.value_embeds, config.smear, config.qk_scale, config.window_pattern) == (True, True, 1.2, "SL")
    assert meta["recipe"]["lrs"]["scalars"] > 0 and meta["recipe"]["adam_betas"]["scalars"] == [0.8, 0.95]
    # resuming with another architecture is refused, in one line
    r = run_train(env_base, *TINY, "--num-iterations", "4", "--model-tag", "arch-split", "--resume", check=False)
    assert r.returncode != 0 and "error: checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_base_train_two_ranks_equal_one_process_with_every_field_on(env_base, uninterrupted):
    from nanochat.checkpoint import load_checkpoint
    run_train(env_base, *TINY, *ARCH_FLAGS, "--num-iterations", "4", "--model-tag", "arch-two", nproc=2, timeout=400)
    two = metrics(env_base, "arch-two")
    assert [r["data_checksum"] for r in two] == [r["data_checksum"] for r in uninterrupted]
    for a, b in zip(uninterrupted, two):  # all-reduce vs accumulation: another summation order
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    w1 = load_checkpoint(os.path.join(env_base, "base_checkpoints", "arch-full"), 4, "cpu")[0]
    w2 = load_checkpoint(os.path.join(env_base, "base_checkpoints", "arch-two"), 4, "cpu")[0]
    assert {"smear_lambda", "resid_lambdas", "value_embeds.1.weight", "transformer.h.1.attn.ve_gate"} <= set(w1)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-3, atol=1e-4, msg=name)


# -------------------------------------------------------------------------------------------------
# export


def test_a_post_training_stage_trains_the_gates_of_a_checkpoint_without_a_recipe(base_dir):
    """mid_train (SFT and RL take the same stage_optimizers) on a value-embedding checkpoint that records no recipe
    (made by hand, or before recipes were recorded): the gates get the scalars' group with today's LR and train."""
    from nanochat.checkpoint import load_model, save_checkpoint
    from test_post_training import run_mid
    tok = RustBPETokenizer.train_from_iterator(iter([shakespeare(50_000)]), 400)
    tok.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64, value_embeds=True))
    model.init_weights()
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "d2"), 5, model, [],
                    {"model_config": dataclasses.asdict(model.config)})
    run_mid(base_dir, "--num-iterations", "2")
    trained, _, meta = load_model("mid", "cpu")
    assert meta["recipe"]["lrs"]["scalars"] > 0 and trained.transformer.h[1].attn.ve_gate.abs().max() > 0


def test_export_refuses_the_fields_it_cannot_represent_and_exports_a_rope_base(tokenizer, tmp_path):
    from nanochat.checkpoint import save_checkpoint
    from nanochat.hf_format import NotExportable, export_folder, import_folder
    flag_of = {"value_embeds": "--value-embeds", "resid_mix": "--resid-mix", "smear": "--smear", "backout": "--backout",
               "qk_scale": "--qk-scale 1", "window_pattern": "--window-pattern L"}
    for name, flag in flag_of.items():  # each one alone is refused, by name, with the flag to leave out
        model = random_model(tokenizer, **{name: ALL[name]})
        for folder_format in ("hf", "mlx"):
            with pytest.raises(NotExportable, match=f"uses {name}=.*model (without|with) {flag} "
                               r"\(speedrun.sh: NANOCHAT_EXPORTABLE=1\)$"):
                export_folder(model, tokenizer, tmp_path / name, folder_format=folder_format)
    # the script, on a checkpoint with every field on: one line naming them all
    base = tmp_path / "base"
    model = random_model(tokenizer, **ALL)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("NANOCHAT_BASE_DIR", str(base))
        tokenizer.save(os.path.join(base, "tokenizer"))
        save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d4"), 1, model, [],
                        {"model_config": dataclasses.asdict(model.config)})
    r = subprocess.run([sys.executable, "-m", "scripts.export_hf", "--out", str(tmp_path / "out")], cwd=REPO_ROOT,
                       env=dict(os.environ, NANOCHAT_BASE_DIR=str(base)), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(name in r.stderr and flag in r.stderr for name, flag in flag_of.items())
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    # a RoPE base other than 10000 is transformers' rope_theta: exported, computed the same, imported back
    import transformers
    model = random_model(tokenizer, rope_base=100000.0)
    export_folder(model, tokenizer, tmp_path / "rope")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rope", dtype=torch.float32).eval()
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
        at_10000 = random_model(tokenizer)(tokens)
    assert (ours - at_10000).abs().max() > 1e-2  # the base matters at these positions
    assert (ours - theirs).abs().max() < 1e-4
    _, config, _ = import_folder(tmp_path / "rope")
    assert config == model.config


if __name__ == "__main__":  # rewrite tests/data/gpt_reference (see its README): only for a deliberate change
    model, idx, targets = reference_model()
    with torch.no_grad():
        logits, loss = model(idx), model(idx, targets)
    torch.save({"idx": idx, "targets": targets, "logits": logits, "loss": loss,
                "param_sums": {k: v.double().sum() for k, v in model.state_dict().items()}}, sys.argv[1])
