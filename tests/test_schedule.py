"""The one owner of every schedule (nanochat.schedule): values at start, middle and end, the peaks per group,
and apply() setting exactly what the optimizers read."""

import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.schedule import (REFERENCE_BATCH, REFERENCE_WIDTH, Momentum, Schedule, auto_batch_size, batch_lr_scale,
                               batch_weight_decay_scale, peak_lrs)


def test_lr_multiplier_at_its_boundaries():
    s = Schedule(1000, warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0)
    assert [s.lr_multiplier(k) for k in (0, 500, 800)] == [1.0, 1.0, 1.0]  # flat until the warmdown starts
    assert s.lr_multiplier(900) == pytest.approx(0.5) and s.lr_multiplier(1000) == pytest.approx(0.0)
    assert Schedule(1000, warmdown_ratio=0.2, final_lr_frac=0.1).lr_multiplier(1000) == pytest.approx(0.1)
    w = Schedule(1000, warmup_steps=100, warmdown_ratio=0.2)
    ramp = [w.lr_multiplier(k) for k in range(100)]
    assert ramp == sorted(ramp) and ramp[0] == pytest.approx(0.01) and ramp[-1] == 1.0 and w.lr_multiplier(100) == 1.0
    down = [w.lr_multiplier(k) for k in range(800, 1001)]
    assert down == sorted(down, reverse=True) and down[0] == 1.0  # never runs backwards
    # SFT/RL: warmdown over the whole run is 1 - step/n
    sft = Schedule(40, warmdown_ratio=1.0)
    assert [sft.lr_multiplier(k) for k in range(41)] == pytest.approx([1 - k / 40 for k in range(41)])


def test_weight_decay_and_momentum_over_a_run():
    s = Schedule(1000, warmdown_ratio=0.5, weight_decay_shape="cosine",
                 momentum=Momentum(start=0.85, peak=0.97, ramp_steps=400, warmdown=0.90))
    assert s.weight_decay_multiplier(0) == 1.0 and s.weight_decay_multiplier(500) == pytest.approx(0.5)
    assert s.weight_decay_multiplier(1000) == pytest.approx(0.0)
    wd = [s.weight_decay_multiplier(k) for k in range(1001)]
    assert wd == sorted(wd, reverse=True)
    assert Schedule(1000).weight_decay_multiplier(999) == 1.0
    assert s.muon_momentum(0) == pytest.approx(0.85) and s.muon_momentum(200) == pytest.approx(0.91)
    assert s.muon_momentum(400) == pytest.approx(0.97) and s.muon_momentum(500) == pytest.approx(0.97)
    assert s.muon_momentum(750) == pytest.approx(0.935) and s.muon_momentum(1000) == pytest.approx(0.90)
    assert Schedule(1000).muon_momentum(150) == pytest.approx(0.90)  # the default ramp: 0.85 -> 0.95 over 300 steps
    assert Schedule(10, momentum=Momentum.constant(0.95)).muon_momentum(0) == 0.95


def test_a_schedule_that_does_not_fit_is_refused():
    for bad in (dict(num_iterations=0), dict(num_iterations=100, warmup_steps=90, warmdown_ratio=0.2),
                dict(num_iterations=100, warmdown_ratio=1.5), dict(num_iterations=100, weight_decay_shape="linear")):
        with pytest.raises(ValueError):
            Schedule(**bad)


def random_model(n_layer, n_embd):
    """A small GPT, re-randomised: zero-initialised projections would get no gradient."""
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=n_embd))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_peaks_per_group_and_apply_sets_what_the_optimizers_read():
    model = random_model(2, 192)
    lrs = peak_lrs(192, matrix_lr=0.03, embedding_lr=0.3, unembedding_lr=0.006, share=0.5)
    width = math.sqrt(REFERENCE_WIDTH / 192)  # 2: AdamW LRs grow as the model narrows
    assert lrs == pytest.approx({"matrix": 0.015, "embedding": 0.15 * width, "lm_head": 0.003 * width})
    adamw, muon = model.setup_optimizers(lrs, weight_decay=0.1, muon_weight_decay=0.2)
    s = Schedule(100, warmdown_ratio=0.5, weight_decay_shape="cosine", momentum=Momentum(0.8, 0.9, 10))
    assert s.apply([adamw, muon], 75) == pytest.approx(0.5)
    by_name = {g["name"]: g for g in adamw.param_groups}
    assert by_name["lm_head"]["lr"] == pytest.approx(0.003 * width * 0.5)
    assert by_name["embedding"]["lr"] == pytest.approx(0.15 * width * 0.5)
    assert by_name["embedding"]["weight_decay"] == pytest.approx(0.1 * s.weight_decay_multiplier(75))
    assert all(g["lr"] == pytest.approx(0.0075) and g["momentum"] == pytest.approx(0.9)
               and g["weight_decay"] == pytest.approx(0.2 * s.weight_decay_multiplier(75)) for g in muon.param_groups)
    assert all("momentum" not in g for g in adamw.param_groups)
    # the peaks survive the values of the moment: applying step 0 again restores them
    s.apply([adamw, muon], 0)
    assert by_name["lm_head"]["lr"] == pytest.approx(0.003 * width) and muon.param_groups[0]["weight_decay"] == 0.2
    # a state dict from before weight decay was scheduled (no initial_weight_decay) resumes with its constant value
    state = adamw.state_dict()
    for g in state["param_groups"]:
        del g["initial_weight_decay"]
    adamw.load_state_dict(state)
    s.apply([adamw], 50)
    assert adamw.param_groups[0]["weight_decay"] == pytest.approx(0.1 * s.weight_decay_multiplier(50))
    # one step of the optimizers with these values moves every parameter
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    adamw.step()
    muon.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_the_batch_rule():
    """2^19 tokens at depth 12's data, growing as D^0.383 (nanochat's 2026 measurement), a power of two and a multiple of
    one micro-batch per rank; LRs scale as sqrt(batch / 2^19)."""
    d12 = 100e6 * 20
    assert auto_batch_size(d12, d12, 8 * 2048) == 2**19
    assert auto_batch_size(d12 * 2 ** (1 / 0.383), d12, 8 * 2048) == 2**20  # twice the batch for 2^(1/0.383) the data
    assert auto_batch_size(d12 * 1.2, d12, 8 * 2048) == 2**19  # rounds to the nearest power of two
    sizes = [auto_batch_size(d12 * f, d12, 1) for f in (0.01, 0.1, 1, 10, 100)]
    assert sizes == sorted(sizes) and sizes[0] < 2**19 < sizes[-1]
    assert auto_batch_size(d12 / 1e6, d12, 6 * 2048) == 6 * 2048  # never below one micro-batch on every rank
    assert auto_batch_size(d12, d12, 3 * 2**17) % (3 * 2**17) == 0  # a world size of 3 still divides it
    assert batch_lr_scale(2**19) == 1.0 and batch_lr_scale(2**21) == pytest.approx(2.0)


def test_the_weight_decay_rule_keeps_the_time_scale():
    """Muon's decay under the batch rule keeps B / (lr * decay * D) at depth 12's value (arXiv 2405.13698's time
    scale), with the LR scaled as the rule scales it; at the reference it is the flag's value."""
    d12 = 110e6 * 10.5
    assert batch_weight_decay_scale(REFERENCE_BATCH, d12, d12) == 1.0
    reference = REFERENCE_BATCH / (0.02 * 0.2 * d12)
    for factor in (0.3, 4, 50):
        tokens = d12 * factor
        batch = auto_batch_size(tokens, d12, 2048)
        lr, decay = 0.02 * batch_lr_scale(batch), 0.2 * batch_weight_decay_scale(batch, tokens, d12)
        assert batch / (lr * decay * tokens) == pytest.approx(reference)
    assert batch_weight_decay_scale(2**20, 4 * d12, d12) < 1  # more data: less decay per step


def test_adamw_groups_have_their_own_betas_and_decay():
    """setup_optimizers with a pair per group: each group steps as torch's AdamW with its own betas and decay."""
    torch.manual_seed(0)
    model = random_model(1, 128)
    assert model.num_scaling_params() == model.num_params() - 64 * 128  # blocks + lm_head, not the embedding
    betas = {"embedding": (0.7, 0.99), "lm_head": (0.9, 0.9)}
    decay = {"embedding": 0.0, "lm_head": 0.3}
    lrs = {"matrix": 0.0, "embedding": 0.05, "lm_head": 0.02}
    adamw, _ = model.setup_optimizers(lrs, weight_decay=decay, adam_betas=betas)
    groups = {g["name"]: g for g in adamw.param_groups}
    refs = {name: [torch.nn.Parameter(p.detach().clone()) for p in groups[name]["params"]] for name in groups}
    torch_opts = {name: torch.optim.AdamW(refs[name], lr=lrs[name], betas=betas[name], eps=1e-10,
                                          weight_decay=decay[name]) for name in groups}
    for step in range(6):
        for name in groups:
            for p, r in zip(groups[name]["params"], refs[name]):
                grad = torch.randn_like(p) * (1 + step)
                p.grad, r.grad = grad, grad.clone()
            torch_opts[name].step()
        adamw.step()
    for name in groups:
        for p, r in zip(groups[name]["params"], refs[name]):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_base_schedule_from_the_recipe_flags():
    """base_train's recipe defaults (the 2026 values), and a short run's warmup shortened to what the warmdown leaves."""
    import argparse
    from nanochat.schedule import add_recipe_args, base_schedule
    p = argparse.ArgumentParser()
    add_recipe_args(p)
    args = p.parse_args([])
    long = base_schedule(args, 1000)
    assert (long.warmup_steps, long.warmdown_steps, long.final_lr_frac) == (40, 650, 0.05)
    assert long.momentum == Momentum(0.85, 0.97, 400, 0.90) and long.weight_decay_shape == "cosine"
    assert (args.orthogonalize, args.normuon_beta2, args.muon_weight_decay, args.cautious) == ("polar_express", 0.9, 0.2, True)
    short = base_schedule(args, 12)
    assert (short.warmup_steps, short.warmdown_steps) == (4, 8) and short.lr_multiplier(3) == 1.0
    assert base_schedule(p.parse_args(["--warmup-steps", "0"]), 12).lr_multiplier(0) == 1.0
    with pytest.raises(SystemExit, match="final_lr_frac"):
        base_schedule(p.parse_args(["--final-lr-frac", "2"]), 100)
