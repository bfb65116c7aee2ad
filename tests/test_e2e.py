"""
The whole pipeline, end to end: `bash speedrun.sh` on the miniature profile (NANOCHAT_PROFILE=mini:
the tiny profile's stages with a few steps each) from the real local data, then every artifact is
checked to exist and load, the report card's summary table to have every expected cell, a re-run to
skip every completed stage, and the final model to answer in chat_cli.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TEST_DATA

STAGES = ["data-prepare", "tok-train", "tok-eval", "base-train", "base-loss", "base-eval", "base-gsm8k", "mid-train", "mid-eval",
          "sft-train", "sft-eval", "rl-train", "rl-eval"]
# (metric, stage column) cells the report must fill; the rest may stay "-"
EXPECTED_CELLS = [("CORE", "BASE")] + [(m, s) for s in ("MID", "SFT") for m in
                                       ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE")] + \
                 [("GSM8K", "RL")]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e_base")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_LOCAL_DATA=TEST_DATA, NANOCHAT_PROFILE="mini",
               NANOCHAT_VENV=sys.prefix, OMP_NUM_THREADS="2")
    env.pop("NANOCHAT_DATA_URL", None)
    run = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    return base, env, run


def test_speedrun_mini_runs_every_stage(pipeline):
    base, _, run = pipeline
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for stage in STAGES:
        assert re.search(rf"^== {re.escape(stage)}: done in \d+ s$", run.stdout, re.M), f"stage {stage} did not run"


def test_every_artifact_exists_and_loads(pipeline, monkeypatch):
    base, _, run = pipeline
    assert run.returncode == 0
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    from nanochat.checkpoint import load_model
    from nanochat.dataset import list_shards
    from nanochat.tokenizer import get_tokenizer
    assert list_shards("train") and list_shards("val")
    tokenizer = get_tokenizer()
    for source in ("base", "mid", "sft", "rl"):
        model, tok, meta = load_model(source, "cpu")
        assert tok.fingerprint() == tokenizer.fingerprint() and model.config.n_layer == 2
        # the profile's architecture additions (speedrun.sh ARCH_FLAGS), carried through every stage
        assert (model.config.value_embeds, model.config.smear, model.config.backout, model.config.resid_mix) == \
            (True, True, True, False)
        assert (model.config.qk_scale, model.config.rope_base, model.config.window_pattern) == (1.2, 10000, "SSSL")
        assert meta["step"] > 0
    for folder in ("base_checkpoints", "mid_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"):
        assert os.path.getsize(os.path.join(base, folder, "d2", "metrics.jsonl")) > 0


def test_report_table_has_every_cell(pipeline):
    base, _, run = pipeline
    assert run.returncode == 0
    report = open(os.path.join(base, "report", "report.md"), encoding="utf-8").read()
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header[1:], cells[1:]))
            for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    for metric, stage in EXPECTED_CELLS:
        value = rows[metric][stage]
        assert value != "-" and float(value) == float(value), f"{metric} under {stage} is {value!r}"
    for section in ("Tokenizer training", "Base model training", "Midtraining", "Chat SFT", "Chat RL"):
        assert f"## {section}" in report, section
    assert os.path.exists(os.path.join(base, "report", "loss.svg"))


def test_rerun_skips_completed_stages(pipeline):
    base, env, run = pipeline
    assert run.returncode == 0
    again = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in STAGES:
        assert f"== {stage}: already complete, skipping" in again.stdout, stage


def test_the_final_model_answers_in_chat_cli(pipeline):
    base, env, run = pipeline
    assert run.returncode == 0
    r = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "-i", "rl", "-p", "Hello, who are you?", "-m", "12"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def speedrun_env(tmp_path, **extra):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), NANOCHAT_VENV=sys.prefix, NANOCHAT_PROFILE="mini")
    for key in ("NANOCHAT_DATA_URL", "NANOCHAT_LOCAL_DATA"):
        env.pop(key, None)
    env.update(extra)
    return env


def test_no_data_source_stops_at_once_saying_what_to_set(tmp_path):
    import urllib.request
    try:
        urllib.request.urlopen("https://huggingface.co", timeout=5)
        pytest.skip("this machine reaches the hub, so speedrun.sh would download")
    except OSError:
        pass
    r = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=speedrun_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "NANOCHAT_DATA_URL" in r.stderr and "NANOCHAT_LOCAL_DATA" in r.stderr
    assert not os.path.exists(tmp_path / "base" / "tokenizer")


def test_a_failing_stage_is_named_and_stops_the_run(tmp_path):
    empty = tmp_path / "data"
    (empty / "pretrain").mkdir(parents=True)  # a local copy with no text in it: shards cannot be built
    r = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=speedrun_env(tmp_path, NANOCHAT_LOCAL_DATA=str(empty)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "error: stage 'data-prepare' failed" in r.stderr
    assert "== tok-train" not in r.stdout  # nothing after the failed stage ran
    bad = subprocess.run(["bash", "speedrun.sh"], cwd=REPO_ROOT, env=speedrun_env(tmp_path, NANOCHAT_PROFILE="huge"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "NANOCHAT_PROFILE must be" in bad.stderr
