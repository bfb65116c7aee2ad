"""
Checkpoints: round trip (weights, optimizer, data position, resumed step), `_orig_mod.` prefix,
completeness, corruption, tokenizer and world-size checks, SIGKILL mid-save, and 2 ranks on gloo.
"""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import nanochat.checkpoint as ck
from conftest import REPO_ROOT, shakespeare
from nanochat.checkpoint import (build_model, clean_state_dict, find_largest_model_tag, find_last_step,
                                 load_checkpoint, load_model, load_rank_state, save_checkpoint)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer


def train_tokenizer(base_dir, vocab_size=300, start=0):
    text = shakespeare()[start:start + 100_000]
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


def train_steps(model, optimizers, steps, seed=123):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def trained_optimizers(model, steps=2):
    optimizers = model.setup_optimizers()
    train_steps(model, optimizers, steps)
    return optimizers


def assert_same(a, b):
    """Nested dicts/lists/tensors equal exactly (optimizer state dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def setup(base_dir):
    tok = train_tokenizer(base_dir)
    model = random_model(tok.get_vocab_size())
    ckpt = os.path.join(base_dir, "base_checkpoints", "d2")
    return base_dir, tok, model, ckpt


def test_round_trip_and_exact_resume(setup):
    base_dir, tok, model, ckpt = setup
    optimizers = trained_optimizers(model)
    dl_state = {"readers": [{"chunk_start": {"epoch": 0, "shard": 1, "row_group": 3}, "rows_taken": 5}]}
    rng = torch.get_rng_state()
    flags = {"depth": 2, "out_dir": base_dir}  # a Path: meta stores it as a string
    meta_path = save_checkpoint(ckpt, 7, model, optimizers, {"model_config": asdict(model.config), "flags": flags,
                                "val_bpb": 1.25}, dataloader_state=dl_state, rng_state=rng)

    meta = json.load(open(meta_path))
    assert meta["step"] == 7 and meta["world_size"] == 1 and meta["val_bpb"] == 1.25
    assert meta["flags"] == {"depth": 2, "out_dir": str(base_dir)} and meta["model_config"]["n_embd"] == 64
    assert meta["tokenizer"] == tok.fingerprint() and "git_commit" in meta
    assert meta["files"] == {name: sha256_of(os.path.join(ckpt, name))
                             for name in ("model_000007.safetensors", "rank0_000007.pt")}
    assert sorted(os.listdir(ckpt)) == ["meta_000007.json", "model_000007.safetensors", "rank0_000007.pt"]

    loaded, tokenizer, meta = load_model("base", "cpu")
    assert meta["step"] == 7 and tokenizer.fingerprint() == tok.fingerprint() and not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randint(0, tok.get_vocab_size(), (2, 20))
    with torch.no_grad():
        expected = model(x)
        assert expected.std() > 0.1  # the logits vary
        assert torch.equal(loaded(x), expected)

    _, optim_states, dl_loaded, _ = load_checkpoint(ckpt, 7, "cpu", load_optimizer=True)
    assert dl_loaded == dl_state
    assert torch.equal(load_rank_state(ckpt, 7, "cpu")["rng"], rng)
    for opt, state in zip(optimizers, optim_states):
        assert state["state"]  # non-trivial: the steps above filled the moments
        assert_same(opt.state_dict(), state)

    # resume: a model rebuilt from the checkpoint, with the loaded optimizer state, takes the next
    # steps exactly like the original; with fresh optimizer state it does not (so the check can tell)
    resumed, _, _ = build_model(ckpt, 7, "cpu", phase="train")
    fresh_optimizers = resumed.setup_optimizers()
    for opt, state in zip(fresh_optimizers, optim_states):
        opt.load_state_dict(state)
    control, _, _ = build_model(ckpt, 7, "cpu", phase="train")
    assert resumed.training
    train_steps(model, optimizers, 1, seed=7)
    train_steps(resumed, fresh_optimizers, 1, seed=7)
    train_steps(control, control.setup_optimizers(), 1, seed=7)
    for (name, a), b, c in zip(model.named_parameters(), resumed.parameters(), control.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(model.parameters(), control.parameters()))


def test_inference_only_save_has_no_rank_file(setup):
    base_dir, tok, model, ckpt = setup
    save_checkpoint(ckpt, 3, model, None, {})  # model_config defaults to model.config
    assert sorted(os.listdir(ckpt)) == ["meta_000003.json", "model_000003.safetensors"]
    state, optim_states, dl_state, meta = load_checkpoint(ckpt, 3, "cpu")
    assert optim_states is None and dl_state is None and meta["model_config"] == asdict(model.config)
    with pytest.raises(ValueError, match="rank0_000003.pt.*inference-only"):
        load_checkpoint(ckpt, 3, "cpu", load_optimizer=True)


def test_compiled_prefix_is_removed_but_names_are_not_mangled():
    model = random_model(300)
    compiled = torch.compile(model)  # not run: only its state_dict keys matter
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    keys = clean_state_dict(compiled).keys()
    assert set(keys) == set(model.state_dict().keys())
    assert all(v.is_contiguous() for v in clean_state_dict(compiled).values())
    # lstrip("_orig_mod.") strips a set of characters: it would also eat the start of these names
    module = torch.nn.Module()
    for name in ("domino", "_rdom", "model"):
        module.register_buffer(name, torch.zeros(1))
    assert list(clean_state_dict(torch.compile(module)).keys()) == ["domino", "_rdom", "model"]
    assert list(clean_state_dict(module).keys()) == ["domino", "_rdom", "model"]


def test_saved_keys_are_unprefixed(setup):
    base_dir, tok, model, ckpt = setup
    save_checkpoint(ckpt, 1, torch.compile(model), [], {"model_config": asdict(model.config)})
    state = load_checkpoint(ckpt, 1, "cpu")[0]
    assert set(state) == set(model.state_dict())
    build_model(ckpt, 1, "cpu")  # strict load


def test_incomplete_steps_and_stray_files_are_ignored(setup):
    base_dir, tok, model, ckpt = setup
    save_checkpoint(ckpt, 10, model, [], {})
    save_checkpoint(ckpt, 20, model, [], {})
    os.remove(os.path.join(ckpt, "meta_000020.json"))  # a crash before the meta was written
    open(os.path.join(ckpt, ".meta_000030.json.abc.tmp"), "w").write("{}")  # a temp file of a crashed write
    open(os.path.join(ckpt, "meta_000040.json.bak"), "w").write("{}")
    assert find_last_step(ckpt) == 10
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 20"):
        load_checkpoint(ckpt, 20, "cpu")
    save_checkpoint(ckpt, 1_234_567, model, [], {})  # more than 6 digits
    assert find_last_step(ckpt) == 1_234_567
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_last_step(os.path.join(base_dir, "base_checkpoints", "nothing"))


def test_resaving_a_step_is_never_half_old_half_new(setup, monkeypatch):
    base_dir, tok, model, ckpt = setup
    save_checkpoint(ckpt, 5, model, trained_optimizers(model, 1), {})
    real_write = ck._write

    def failing_write(path, data):
        if path.endswith(".pt"):
            raise OSError("disk full")
        return real_write(path, data)
    monkeypatch.setattr(ck, "_write", failing_write)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError):  # new weights landed, the rank file did not
        save_checkpoint(ckpt, 5, model, model.setup_optimizers(), {})
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_last_step(ckpt)
    monkeypatch.setattr(ck, "_write", real_write)
    save_checkpoint(ckpt, 5, model, model.setup_optimizers(), {})
    assert torch.equal(load_checkpoint(ckpt, 5, "cpu")[0]["lm_head.weight"], model.lm_head.weight)


def test_largest_tag(base_dir):
    root = base_dir / "base_checkpoints"
    for tag in ("d4", "d12", "d8", "notes"):
        (root / tag).mkdir(parents=True)
    assert find_largest_model_tag(str(root)) == "d12"  # by depth, not by name (d8 > d12 as strings)
    other = base_dir / "mid_checkpoints"
    for tag, mtime in (("alpha", 2000), ("beta", 1000)):
        (other / tag).mkdir(parents=True)
        os.utime(other / tag, (mtime, mtime))
    assert find_largest_model_tag(str(other)) == "alpha"  # no d<N> tags: the most recent
    with pytest.raises(FileNotFoundError):
        find_largest_model_tag(str(base_dir / "chatrl_checkpoints"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("which", ["model", "rank"])
def test_corruption_is_detected_and_named(setup, damage, which):
    base_dir, tok, model, ckpt = setup
    save_checkpoint(ckpt, 5, model, trained_optimizers(model, 1), {}, dataloader_state={"x": 1})
    load_checkpoint(ckpt, 5, "cpu", load_optimizer=True)  # intact: loads
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
    error = FileNotFoundError if damage == "delete" else ValueError
    with pytest.raises(error, match=name):
        load_checkpoint(ckpt, 5, "cpu", load_optimizer=True)


def test_tokenizer_mismatch_is_a_clear_error(setup):
    base_dir, tok, model, ckpt = setup
    save_checkpoint(ckpt, 1, model, [], {})
    build_model(ckpt, 1, "cpu")
    other = train_tokenizer(base_dir, start=200_000)  # same vocab size, different merges
    assert other.get_vocab_size() == tok.get_vocab_size() and other.fingerprint() != tok.fingerprint()
    with pytest.raises(ValueError, match="trained with tokenizer") as info:
        build_model(ckpt, 1, "cpu")
    message = str(info.value)
    assert tok.fingerprint() in message and other.fingerprint() in message
    assert os.path.join(base_dir, "tokenizer") in message and "meta_000001.json" in message


def test_world_size_mismatch_is_a_clear_error(setup):
    base_dir, tok, model, ckpt = setup
    meta_path = save_checkpoint(ckpt, 1, model, trained_optimizers(model, 1), {})
    meta = json.load(open(meta_path))
    meta["world_size"] = 8  # as if saved by an 8-GPU run
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="saved by 8 processes and this run has 1.*same world size"):
        load_checkpoint(ckpt, 1, "cpu", load_optimizer=True)
    load_checkpoint(ckpt, 1, "cpu")  # weights alone load at any world size


class RunsCode:
    """Unpickling this object runs code: a checkpoint loader must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_loading_never_runs_code(setup, tmp_path):
    base_dir, tok, model, ckpt = setup
    meta_path = save_checkpoint(ckpt, 1, model, trained_optimizers(model, 1), {})
    marker = tmp_path / "pwned"
    rank_path = os.path.join(ckpt, "rank0_000001.pt")
    torch.save({"optimizers": [], "dataloader": RunsCode(str(marker)), "rng": None}, rank_path)
    meta = json.load(open(meta_path))
    meta["files"]["rank0_000001.pt"] = sha256_of(rank_path)  # as if the attacker rewrote the meta too
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights.only"):
        load_checkpoint(ckpt, 1, "cpu", load_optimizer=True)
    assert not marker.exists()


def test_sources_and_missing_stages(base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.chat_sft"):
        load_model("sft", "cpu")
    with pytest.raises(FileNotFoundError, match="scripts.mid_train"):
        load_model("mid", "cpu")
    with pytest.raises(ValueError, match="base, mid, sft, rl"):
        load_model("pretrained", "cpu")
    (base_dir / "chatrl_checkpoints" / "d3").mkdir(parents=True)
    assert ck.checkpoint_dir_for("rl") == os.path.join(base_dir, "chatrl_checkpoints", "d3")
    with pytest.raises(FileNotFoundError, match="d9"):
        load_model("rl", "cpu", model_tag="d9")


KILL_CHILD = r"""
import os, sys, time
import torch
import nanochat.checkpoint as ck
from nanochat.gpt import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=32, vocab_size=int(sys.argv[2]), n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
model.init_weights()
ckpt = sys.argv[1]
ck.save_checkpoint(ckpt, 1, model, model.setup_optimizers(), {})
real_fsync = os.fsync
def stalling_fsync(fd):
    # stall in the fsync of step 2's last file before meta (the rank file): the kill lands when every
    # earlier file of the step is written and this one is not yet renamed; a save that wrote meta
    # earlier, or wrote without temp file + fsync + rename, is caught by the parent's checks
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".rank0_000002.pt"):
        print("writing", flush=True)
        time.sleep(600)
    real_fsync(fd)
os.fsync = stalling_fsync
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
ck.save_checkpoint(ckpt, 2, model, model.setup_optimizers(), {})
print("finished", flush=True)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(setup):
    base_dir, tok, _, ckpt = setup
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, ckpt, str(tok.get_vocab_size())], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert find_last_step(ckpt) == 1
    model, _, meta = load_model("base", "cpu")
    assert meta["step"] == 1
    names = os.listdir(ckpt)
    assert "meta_000002.json" not in names and "rank0_000002.pt" not in names
    assert any(name.startswith(".rank0_000002.pt") and name.endswith(".tmp") for name in names)
    with pytest.raises(FileNotFoundError, match="step 2"):
        load_checkpoint(ckpt, 2, "cpu")  # the complete model file of step 2 does not make the step


DIST_CHILD = r"""
import sys
import torch
from torch.nn.parallel import DistributedDataParallel
from nanochat.checkpoint import load_checkpoint, save_checkpoint
from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPT, GPTConfig
ckpt, vocab = sys.argv[1], int(sys.argv[2])
ddp, rank, _, world, _ = compute_init("cpu")
assert ddp and world == 2
torch.manual_seed(0)  # the same weights on both ranks
model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
model.init_weights()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.5)
optimizers = model.setup_optimizers()
torch.manual_seed(100 + rank)  # each rank its own batches
for _ in range(2):
    x = torch.randint(0, vocab, (2, 16))
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
dl_state = {"rank": rank, "rows_taken": 10 + rank}
# saved through a DDP wrapper: its "module." prefix must not reach the file
save_checkpoint(ckpt, 3, DistributedDataParallel(model), optimizers, {"flags": {"nproc": 2}}, dataloader_state=dl_state)
state, optim_states, dl_loaded, meta = load_checkpoint(ckpt, 3, "cpu", load_optimizer=True)
assert dl_loaded == dl_state, dl_loaded
def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
assert all(s["state"] and same(opt.state_dict(), s) for opt, s in zip(optimizers, optim_states))
assert state.keys() == model.state_dict().keys()
assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
print(f"rank {rank} ok", flush=True)
compute_cleanup()
"""


def test_two_ranks_save_and_load_their_own_state(setup, tmp_path):
    base_dir, tok, _, ckpt = setup
    script = tmp_path / "dist_child.py"
    script.write_text(DIST_CHILD)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1", PYTHONPATH=REPO_ROOT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), ckpt,
                             str(tok.get_vocab_size())], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0 ok" in result.stdout and "rank 1 ok" in result.stdout
    meta = json.load(open(os.path.join(ckpt, "meta_000003.json")))
    assert meta["world_size"] == 2 and meta["flags"] == {"nproc": 2} and meta["tokenizer"] == tok.fingerprint()
    names = ["model_000003.safetensors", "rank0_000003.pt", "rank1_000003.pt"]
    assert meta["files"] == {name: sha256_of(os.path.join(ckpt, name)) for name in names}
    assert meta["files"]["rank0_000003.pt"] != meta["files"]["rank1_000003.pt"]  # each rank its own shard
    rank1 = torch.load(os.path.join(ckpt, "rank1_000003.pt"), weights_only=True)
    assert rank1["dataloader"] == {"rank": 1, "rows_taken": 11}
    with pytest.raises(ValueError, match="saved by 2 processes and this run has 1"):
        load_checkpoint(ckpt, 3, "cpu", load_optimizer=True)
    build_model(ckpt, 3, "cpu")  # the weights alone load in one process
