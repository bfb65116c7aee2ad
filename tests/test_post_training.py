"""Midtraining: the mixture is packed and learned from; a run stopped (--stop-after-step or SIGTERM) resumes to the same losses."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO_ROOT, TEST_DATA
from test_chat_cli import make_chat_checkpoint
from test_stage import check_sigterm_resume, sigterm_after_first_step


def run_mid(base_dir, *flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "scripts.mid_train", "--dtype", "float32", "--device-batch-size", "4",
                             "--total-batch-size", "512", "--eval-tokens", "1024", "--num-iterations", "6", *flags],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def records(base_dir, tag):
    with open(os.path.join(base_dir, "mid_checkpoints", tag, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mid_train_learns_and_resumes_exactly(base_dir):
    make_chat_checkpoint(base_dir, source_dir="base_checkpoints")
    out = run_mid(base_dir, "--out-tag", "full", "--eval-every", "3")
    assert "mixture: GSM8K" in out and "packed" in out
    full = records(base_dir, "full")
    losses = [r["loss"] for r in full if "loss" in r]
    bpb = [r["val_bpb"] for r in full if "val_bpb" in r]
    assert len(losses) == 6 and bpb[-1] < bpb[0]
    run_mid(base_dir, "--out-tag", "split", "--eval-every", "3", "--stop-after-step", "3")
    run_mid(base_dir, "--out-tag", "split", "--eval-every", "3", "--resume")
    split = [r["loss"] for r in records(base_dir, "split") if "loss" in r]
    assert split == losses
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA)
    bad = subprocess.run([sys.executable, "-m", "scripts.mid_train", "--dtype", "float32", "--device-batch-size", "4",
                          "--total-batch-size", "1024", "--out-tag", "split", "--resume"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--total-batch-size" in bad.stderr  # a resume must continue the same data order
    # --loss-on assistant: the packed masks travel with the rows, so the loss is on fewer tokens and differs
    run_mid(base_dir, "--out-tag", "masked", "--num-iterations", "2", "--eval-every", "-1", "--loss-on", "assistant")
    masked = [r["loss"] for r in records(base_dir, "masked") if "loss" in r]
    assert len(masked) == 2 and all(math.isfinite(v) for v in masked) and masked[0] != losses[0]
    section = open(os.path.join(base_dir, "report", "midtraining.md"), encoding="utf-8").read()
    assert "final val bpb" in section and "mixture: general chat" in section


def test_mid_train_sigterm_saves_exits_143_and_resumes_exactly(base_dir):
    make_chat_checkpoint(base_dir, source_dir="base_checkpoints")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA, OMP_NUM_THREADS="1")

    def run(tag, *flags, sigterm=False):
        cmd = [sys.executable, "-m", "scripts.mid_train", "--dtype", "float32", "--device-batch-size", "4",
               "--total-batch-size", "512", "--num-iterations", "1000", "--eval-every", "-1", "--eval-tokens", "512",
               "--out-tag", tag, *flags]
        if sigterm:
            return sigterm_after_first_step(cmd, env)
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.returncode, r.stdout

    check_sigterm_resume(run, lambda tag: os.path.join(base_dir, "mid_checkpoints", tag),
                         lambda tag: [r for r in records(base_dir, tag) if "loss" in r])
