"""Checkpoints: round trip, prefix handling, completeness, corruption, tokenizer/world-size checks, SIGKILL mid-save."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT, SHARED_DATA
from nanochat.checkpoint import (build_model, clean_state_dict, find_largest_model_tag, find_last_step,
                                 load_checkpoint, load_model, save_checkpoint)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer


def train_tokenizer(base_dir, vocab_size=300, start=0):
    with open(os.path.join(SHARED_DATA, "pretrain", "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()[start:start + 100_000]
    tok = RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), vocab_size)
    tok.save(os.path.join(base_dir, "tokenizer"))
    return tok


def random_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would make every logit 0
            p.normal_(0, 0.5)
    return model


def trained_optimizers(model, steps=3):
    optimizers = model.setup_optimizers()
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (2, 16))
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return optimizers


def meta_for(model):
    from dataclasses import asdict
    return {"model_config": asdict(model.config)}


@pytest.fixture
def setup(base_dir):
    tok = train_tokenizer(base_dir)
    model = random_model(tok.get_vocab_size())
    return base_dir, tok, model


def test_round_trip(setup):
    base_dir, tok, model = setup
    optimizers = trained_optimizers(model)
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    dl_state = {"readers": [{"chunk_start": {"epoch": 0, "shard": 1, "row_group": 3}, "rows_taken": 5}]}
    save_checkpoint(ckpt, 7, model, optimizers, meta_for(model), dataloader_state=dl_state)
    loaded, tokenizer, meta = load_model("base", "cpu")
    assert meta["step"] == 7 and tokenizer.fingerprint() == tok.fingerprint()
    x = torch.randint(0, tok.get_vocab_size(), (2, 20))
    with torch.no_grad():
        expected = model(x)
        assert expected.std() > 0.1  # the logits vary
        assert torch.equal(loaded(x), expected)
    _, optim_states, dl_loaded, _ = load_checkpoint(ckpt, 7, "cpu", load_optimizer=True)
    assert dl_loaded == dl_state
    fresh = random_model(tok.get_vocab_size(), seed=1).setup_optimizers()
    for opt, state in zip(fresh, optim_states):
        opt.load_state_dict(state)
    for before, after in zip(optimizers, fresh):
        a, b = before.state_dict()["state"], after.state_dict()["state"]
        assert a.keys() == b.keys() and a
        for k in a:
            for name in a[k]:
                assert torch.equal(a[k][name], b[k][name])


def test_compiled_prefix_is_removed_but_names_are_not_mangled():
    model = random_model(300)
    compiled = torch.compile(model)  # not run: only its state_dict keys matter
    keys = clean_state_dict(compiled).keys()
    assert set(keys) == set(model.state_dict().keys())
    # lstrip("_orig_mod.") would also eat the leading letters of a name made of those characters
    module = torch.nn.Module()
    module.register_buffer("domino", torch.zeros(1))
    assert list(clean_state_dict(torch.compile(module)).keys()) == ["domino"]


def test_incomplete_steps_and_stray_files_are_ignored(setup):
    base_dir, tok, model = setup
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    save_checkpoint(ckpt, 10, model, [], meta_for(model))
    save_checkpoint(ckpt, 20, model, [], meta_for(model))
    os.remove(os.path.join(ckpt, "meta_000020.json"))  # a crash before the meta was written
    open(os.path.join(ckpt, ".meta_000030.json.abc.tmp"), "w").write("{}")  # a temp file of a crashed write
    assert find_last_step(ckpt) == 10
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_last_step(os.path.join(base_dir, "base_checkpoints", "nothing"))


def test_largest_tag_is_the_deepest(base_dir):
    root = base_dir / "base_checkpoints"
    for tag in ("d4", "d12", "d8"):
        (root / tag).mkdir(parents=True)
    assert find_largest_model_tag(str(root)) == "d12"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("which", ["model", "rank"])
def test_corruption_is_detected_and_named(setup, damage, which):
    base_dir, tok, model = setup
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    save_checkpoint(ckpt, 5, model, trained_optimizers(model, 1), meta_for(model), dataloader_state={"x": 1})
    name = "model_000005.safetensors" if which == "model" else "rank0_000005.pt"
    path = os.path.join(ckpt, name)
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))
    elif damage == "truncate":
        open(path, "wb").write(bytes(data[:len(data) // 2]))
    else:
        os.remove(path)
    with pytest.raises((ValueError, FileNotFoundError), match=name):
        load_checkpoint(ckpt, 5, "cpu", load_optimizer=True)


def test_tokenizer_mismatch_is_a_clear_error(setup):
    base_dir, tok, model = setup
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    save_checkpoint(ckpt, 1, model, [], meta_for(model))
    train_tokenizer(base_dir, start=200_000)  # same vocab size, different merges
    with pytest.raises(ValueError, match="trained with tokenizer"):
        build_model(ckpt, 1, "cpu")


def test_world_size_mismatch_is_a_clear_error(setup):
    import json
    base_dir, tok, model = setup
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    meta_path = save_checkpoint(ckpt, 1, model, trained_optimizers(model, 1), meta_for(model))
    meta = json.load(open(meta_path))
    meta["world_size"] = 8  # as if saved by an 8-GPU run
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="saved by 8 processes and this run has 1"):
        load_checkpoint(ckpt, 1, "cpu", load_optimizer=True)
    load_checkpoint(ckpt, 1, "cpu")  # weights alone load at any world size


def test_missing_source_names_the_producing_script(base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.chat_sft"):
        load_model("sft", "cpu")
    with pytest.raises(ValueError, match="base, mid, sft, rl"):
        load_model("pretrained", "cpu")


KILL_CHILD = r"""
import os, sys, time
from dataclasses import asdict
import torch
import nanochat.checkpoint as ck
from nanochat.gpt import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=32, vocab_size=int(sys.argv[2]), n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
model.init_weights()
ckpt = sys.argv[1]
ck.save_checkpoint(ckpt, 1, model, model.setup_optimizers(), {"model_config": asdict(model.config)})
def slow_write(path, data):
    # the real atomic write, stalled halfway through the first file of step 2: the kill lands mid-write
    with ck.atomic_write(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        print("writing", flush=True)
        time.sleep(600)
        f.write(data[len(data) // 2:])
ck._write = slow_write
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
ck.save_checkpoint(ckpt, 2, model, model.setup_optimizers(), {"model_config": asdict(model.config)})
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(setup):
    base_dir, tok, _ = setup
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, ckpt, str(tok.get_vocab_size())], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert find_last_step(ckpt) == 1
    model, _, meta = load_model("base", "cpu")
    assert meta["step"] == 1
    assert not os.path.exists(os.path.join(ckpt, "meta_000002.json"))
    assert not os.path.exists(os.path.join(ckpt, "model_000002.safetensors"))  # only a temp file was left
    assert any(name.endswith(".tmp") for name in os.listdir(ckpt))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(ckpt, 2, "cpu")
