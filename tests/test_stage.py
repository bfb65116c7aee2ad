"""
nanochat/stage.py, the loop bookkeeping every trainer shares: the loop state survives a checkpoint's
JSON exactly, the smoothed loss and ETA by hand, when a step saves, and a real SIGTERM turning into a
stop request and exit code 143. Also the helper the trainers' own SIGTERM tests use
(test_train, test_post_training, test_sft_rl): interrupt a real run, resume it, compare losses.
"""

import json
import math
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field

import pytest

from conftest import REPO_ROOT
from nanochat.stage import LoopState, StopRequest, due, eta_seconds


@dataclass
class ToyState(LoopState):
    val_loss: float | None = None
    metrics: dict = field(default_factory=dict)


def test_loop_state_round_trips_through_json_and_restarts_the_clock():
    state = ToyState()
    for loss, dt in ((4.0, 9.0), (3.0, 1.0), (2.5, 1.5)):
        state.end_step(loss, dt)
    state.val_loss, state.metrics = 2.75, {"GSM8K": 0.5}
    saved = json.loads(json.dumps(state.to_dict()))  # what a checkpoint's meta["loop"] holds
    assert "start_step" not in saved  # where a process began is not part of the run
    resumed = ToyState.from_dict(saved)
    assert resumed == state and resumed.start_step == 3
    assert ToyState.from_dict({"step": 2, "no longer a field": 1}).step == 2  # older checkpoints still load


def test_end_step_smooths_times_and_refuses_a_nonfinite_loss():
    state = LoopState()
    smooth = [state.end_step(loss, dt) for loss, dt in ((4.0, 9.0), (2.0, 1.0), (3.0, 2.0))]
    ema = 0.0
    for k, loss in enumerate((4.0, 2.0, 3.0), 1):  # by hand: EMA 0.9, bias-corrected
        ema = 0.9 * ema + 0.1 * loss
        assert smooth[k - 1] == pytest.approx(ema / (1 - 0.9 ** k))
    assert smooth[0] == pytest.approx(4.0)
    assert state.train_time == 3.0  # the first step of the process (9 s: compilation, warm-up) does not count
    assert state.eta(10) == pytest.approx(3.0 / 2 * 7)  # mean of the timed steps x steps left
    assert math.isnan(LoopState(step=5).eta(10)) and math.isnan(eta_seconds(0.0, 0, 3))
    with pytest.raises(SystemExit, match="loss is nan at step 3"):
        state.end_step(float("nan"), 1.0)


def test_save_and_eval_schedule():
    assert [s for s in range(10) if due(4, s)] == [0, 4, 8] and not any(due(-1, s) for s in range(10))
    state = LoopState(step=4)  # a resumed process: its first step is on disk already
    assert not state.save_due(last=False, stopping=True, save_every=2)
    state.end_step(1.0, 1.0)
    assert not state.save_due(False, False, save_every=2) and state.save_due(False, False, save_every=5)
    assert state.save_due(True, False, -1) and state.save_due(False, True, -1)


def test_sigterm_becomes_a_stop_request_and_exit_143():
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = StopRequest("cpu")
        assert not stop.requested(step=3, stop_after_step=-1) and stop.requested(3, stop_after_step=3)
        os.kill(os.getpid(), signal.SIGTERM)  # handled between bytecodes: before the next line runs
        assert stop.signal == signal.SIGTERM and stop.requested(3, -1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second signal would act at once

        class Log:
            finish = staticmethod(lambda: None)
        with pytest.raises(SystemExit) as stopped:
            stop.finish(LoopState(step=3), 10, Log())
        assert stopped.value.code == 128 + signal.SIGTERM
        stop.finish(LoopState(step=10), 10, Log())  # a run that reached its end exits 0, signal or not
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


# -------------------------------------------------------------------------------------------------
# for the trainers' tests: a real run interrupted by SIGTERM


def sigterm_after_first_step(cmd, env, timeout=180):
    """Runs cmd (a trainer), sends it SIGTERM once its first step line is out; (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"step \d{5}/\d{5}", line):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + rest


def check_sigterm_resume(run, checkpoint_dir, records, big_n=1000, exit_code=128 + signal.SIGTERM, signal_seen_by_rank0=True):
    """
    The SIGTERM contract, for a trainer: `run(tag, *flags, sigterm=)` runs it (with --num-iterations
    big_n, so that it cannot finish first) and `records(tag)` reads its metrics.jsonl steps. A SIGTERM
    after the first step saves the step reached and exits 143 (exit_code: what the launcher returns
    instead, torchrun's own); --resume continues from it; the interrupted + resumed losses equal an
    uninterrupted run's to the bit.
    """
    from nanochat.checkpoint import find_last_step
    code, out = run("sig", sigterm=True)
    assert code == exit_code, out[-3000:]
    assert ("received signal 15" in out) == signal_seen_by_rank0, out[-3000:]  # rank 0 prints; another rank's signal is silent
    assert "saved checkpoint" in out and "stopped at step" in out, out[-3000:]
    step = find_last_step(checkpoint_dir("sig"))
    assert 1 <= step < big_n and [r["step"] for r in records("sig")] == list(range(1, step + 1))
    out = run("sig", "--resume", "--stop-after-step", str(step + 2))[1]
    assert f"resumed from {checkpoint_dir('sig')} step {step}" in out and f"stopped at step {step + 2}" in out
    run("ref", "--stop-after-step", str(step + 2))
    interrupted, uninterrupted = records("sig"), records("ref")
    assert [r["step"] for r in interrupted] == list(range(1, step + 3))
    assert [r["loss"] for r in interrupted] == [r["loss"] for r in uninterrupted]


def test_post_training_inherits_the_input_recipe():
    """A post-training stage's optimizers take the input checkpoint's recipe (peak LRs after width/batch scaling,
    Polar Express, NorMuon, AdamW betas) at its --init-lr-frac; an LR flag that is given replaces its group's (scaled
    by width); a checkpoint without a recipe counts as today's defaults."""
    import argparse
    import torch
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import polar_express
    from nanochat.schedule import peak_lrs
    from nanochat.stage import optimizer_recipe, stage_optimizers
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=192))
    model.init_weights()
    base = optimizer_recipe({"matrix": 0.03, "embedding": 0.5, "lm_head": 0.01}, "polar_express", 0.9,
                            {"embedding": (0.7, 0.9), "lm_head": (0.8, 0.96)})
    args = argparse.Namespace(matrix_lr=None, embedding_lr=None, unembedding_lr=None, init_lr_frac=0.1)
    (adamw, muon), recipe = stage_optimizers(model, args, torch.float32, {"recipe": base})
    assert recipe == base
    groups = {g["name"]: g for g in adamw.param_groups}
    assert groups["embedding"]["initial_lr"] == pytest.approx(0.05) and groups["lm_head"]["initial_lr"] == pytest.approx(0.001)
    assert groups["embedding"]["betas"] == (0.7, 0.9) and groups["lm_head"]["betas"] == (0.8, 0.96)
    assert muon.param_groups[0]["initial_lr"] == pytest.approx(0.003)
    assert muon.orthogonalize is polar_express and muon.param_groups[0]["beta2"] == 0.9
    assert all(g["weight_decay"] == 0 for opt in (adamw, muon) for g in opt.param_groups)
    # a given flag replaces its group only, scaled by width like base_train's
    args.matrix_lr, args.unembedding_lr = 0.05, 0.004
    (adamw, muon), recipe = stage_optimizers(model, args, torch.float32, {"recipe": base})
    assert recipe["lrs"] == pytest.approx({"matrix": 0.05, "embedding": 0.5, "lm_head": peak_lrs(192)["lm_head"]})
    assert muon.param_groups[0]["initial_lr"] == pytest.approx(0.005)
    # an older checkpoint (no recipe): the defaults
    args.matrix_lr = args.unembedding_lr = None
    _, recipe = stage_optimizers(model, args, torch.float32, {})
    assert recipe == optimizer_recipe(peak_lrs(192))
    # a recipe from before AdamW's groups had their own betas (one pair): both groups take it
    legacy = dict(base, adam_betas=[0.6, 0.9])
    (adamw, _), recipe = stage_optimizers(model, args, torch.float32, {"recipe": legacy})
    assert all(g["betas"] == (0.6, 0.9) for g in adamw.param_groups)
    assert recipe["adam_betas"] == {"embedding": [0.6, 0.9], "lm_head": [0.6, 0.9]}
