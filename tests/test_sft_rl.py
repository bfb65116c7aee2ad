"""
Post-training: packing with masks, the SFT loss against a hand-computed masked mean (packing itself and the
optimizer warm start: test_sft_packing.py), RL advantages and
loss against hand-computed values, RL learning a toy reward, the shared step on 2 gloo ranks vs 1, and
scripts.chat_sft / scripts.chat_rl end to end (2 steps each, loadable checkpoints, exact resume after
--stop-after-step and after SIGTERM); scripts.mid_train's val eval (one pass at most) and its one-line
error offline.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, TEST_DATA
from nanochat.dataloader import conversation_batch, pack_conversations
from nanochat.engine import Engine
from nanochat.rl import group_advantages, pg_micro_batches, rollout
from nanochat.schedule import peak_lrs
from nanochat.training import accumulate_gradients, train_step
from test_chat_cli import make_chat_checkpoint
from test_core_eval import assert_one_line_fetch_error, offline_env, refused_endpoint  # noqa: F401 (a fixture)
from test_stage import check_sigterm_resume, sigterm_after_first_step

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def tool_conversation():
    return {"messages": [
        {"role": "user", "content": "What is 12 times 7, and why?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute it. "},
                                          {"type": "python", "text": "12*7"},
                                          {"type": "python_output", "text": "84"},
                                          {"type": "text", "text": "So the answer is 84."}]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."}]}


def plain_conversation():
    return {"messages": [{"role": "user", "content": "Say hello to the king."},
                         {"role": "assistant", "content": "Hail, my lord, and welcome."}]}


# -------------------------------------------------------------------------------------------------
# packing (midtraining) with masks

def test_pack_conversations_keeps_every_token_once_with_its_mask():
    g = torch.Generator().manual_seed(3)
    docs, masks = [], []
    for i in range(150):
        n = int(torch.randint(2, 70, (1,), generator=g))
        docs.append([0] + [100_000 * (i + 1) + j for j in range(n)])  # BOS, then tokens unique to the doc
        masks.append([0] + [(t // 7) % 2 for t in docs[-1][1:]])  # a mask that is a function of the token
    rows, row_masks, cropped = pack_conversations(docs, masks, 64)
    assert all(len(r) == 64 and len(m) == 64 for r, m in zip(rows, row_masks))
    packed = [t for r in rows for t in r]
    real = [t for t in packed if t != 0]
    assert len(real) == len(set(real)), "a token was duplicated"
    assert len(packed) + cropped == sum(map(len, docs)), "tokens lost without being counted"
    for row, mask in zip(rows, row_masks):
        assert row[0] == 0  # a row starts with a conversation's BOS
        for t, m in zip(row, mask):
            assert m == (0 if t == 0 else (t // 7) % 2), "the mask did not travel with its token"
        # each piece of a row is a prefix of one conversation, starting at its BOS
        pieces = [[]]
        for t in row:
            if t == 0 and pieces[-1]:
                pieces.append([])
            pieces[-1].append(t)
        for piece in pieces:
            doc = docs[piece[1] // 100_000 - 1] if len(piece) > 1 else [0]
            assert piece == doc[:len(piece)]
    with pytest.raises(ValueError):
        pack_conversations([[0, 1, 2]], [[0, 1]], 4)


# -------------------------------------------------------------------------------------------------
# SFT: the loss is the mean over the masked tokens only

@pytest.fixture
def tiny(base_dir):
    model, tok = make_chat_checkpoint(base_dir, source_dir="mid_checkpoints")
    return model, tok


def test_sft_loss_is_the_masked_mean(tiny):
    model, tok = tiny
    rendered = [tok.render_conversation(c, max_tokens=None) for c in (tool_conversation(), plain_conversation())]
    x, y = conversation_batch([[c] for c in rendered], 201, tok.get_bos_token_id())  # one conversation a row
    assert x.shape == (2, 200)
    loss, tokens = accumulate_gradients(model, [(x, y)], NO_AUTOCAST)
    model.zero_grad(set_to_none=True)
    # by hand: each conversation alone, no padding; next-token log-probs at the positions the mask marks
    terms = []
    for ids, mask in rendered:
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)
        terms += [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1]]
    assert tokens == len(terms) == sum(sum(m[1:]) for _, m in rendered)
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # user turns, the tool's output, BOS and padding are never targets
    special = tok.encode_special
    ignored_ids = {special("<|user_start|>"), special("<|user_end|>"), special("<|output_start|>"),
                   special("<|output_end|>"), special("<|assistant_start|>"), tok.get_bos_token_id()}
    assert not set(y[y != -1].tolist()) & ignored_ids
    targets = y[y != -1].tolist()
    assert targets.count(special("<|assistant_end|>")) == 3  # every assistant turn learns to end
    assert targets.count(special("<|python_end|>")) == 1  # the tool call is learned, its output is not


def test_sft_loss_on_a_packed_row_is_the_masked_mean_over_the_row(tiny):
    model, tok = tiny
    rendered = [tok.render_conversation(c, max_tokens=None) for c in (tool_conversation(), plain_conversation())]
    ids = [t for c, _ in rendered for t in c]
    trained = [bool(m) and j > 0 for _, mask in rendered for j, m in enumerate(mask)]
    x, y = conversation_batch([rendered], len(ids) + 5, tok.get_bos_token_id())  # both in one row, then padding
    loss, tokens = accumulate_gradients(model, [(x, y)], NO_AUTOCAST)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # by hand: the row as one sequence; the second conversation's BOS is never a target
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], dim=-1)
    terms = [-logp[t, ids[t + 1]].item() for t in range(len(ids) - 1) if trained[t + 1]]
    assert tokens == len(terms) and loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# -------------------------------------------------------------------------------------------------
# RL: advantages, the policy-gradient loss, zero gradient for uniform groups

def test_group_advantages_by_hand():
    assert group_advantages([1, 0, 0, 1]).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1, 0, 0, 0]).tolist() == [0.75, -0.25, -0.25, -0.25]
    assert group_advantages([1, 1, 1]).tolist() == [0, 0, 0]


def test_pg_loss_equals_hand_computed_and_uniform_groups_give_no_gradient(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(5)
    seqs, masks = [], []
    for n in (9, 12, 7, 10, 8, 11):  # 6 rows: prompt of 4, then sampled (1) and forced (0) tokens
        seq = torch.randint(4, tok.get_vocab_size(), (n,), generator=g).tolist()
        mask = [0, 0, 0, 0] + [int(i % 3 != 1) for i in range(n - 4)]  # every third new token "forced"
        seqs.append(seq)
        masks.append(mask)
    rewards = [[1, 0, 0, 1], [1, 1]]  # group 2: identical rewards
    adv = torch.cat([group_advantages(r) for r in rewards]).tolist()
    batches = pg_micro_batches(seqs, masks, adv, pad_id=tok.get_bos_token_id(), device_batch_size=3)
    assert sum(b[0].shape[0] for b in batches) == 4  # the zero-advantage rows are dropped
    loss, tokens = accumulate_gradients(model, batches, NO_AUTOCAST)
    model.zero_grad(set_to_none=True)
    num, count = 0.0, 0
    for seq, mask, a in zip(seqs, masks, adv):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq[:-1]])).float()[0], dim=-1)
        for t in range(len(seq) - 1):
            if mask[t + 1]:
                num += -a * logp[t, seq[t + 1]].item()
                count += 1 if a != 0 else 0
    assert tokens == count
    assert loss == pytest.approx(num / count, rel=1e-5, abs=1e-7)
    # the same rows kept explicitly with their zero advantages: no parameter moves
    uniform = [(torch.tensor([s[:-1]]), torch.tensor([[t if m else -1 for t, m in zip(s[1:], mk[1:])]]),
                torch.tensor([0.0])) for s, mk in zip(seqs[4:], masks[4:])]
    accumulate_gradients(model, uniform, NO_AUTOCAST)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool((gr == 0).all()) for gr in grads)
    model.zero_grad(set_to_none=True)


def test_rollout_masks_forced_tool_tokens(tiny, monkeypatch):
    import nanochat.engine as engine_module
    model, tok = tiny
    engine = Engine(model.eval(), tok)
    prompt = tok.render_for_completion(plain_conversation())
    # the "model" writes a calculator call, then the letter a: the engine forces the tool's output in between
    written = [tok.encode_special("<|python_start|>")] + tok.encode("2+3") + [tok.encode_special("<|python_end|>")]
    a = tok.encode("a")[0]
    script = iter(written + [a] * 50)
    monkeypatch.setattr(engine_module, "sample_next",
                        lambda logits, *args, **kw: torch.full((logits.size(0),), next(script), dtype=torch.long))
    seqs, masks, texts = rollout(engine, prompt, num_samples=1, max_tokens=len(written) + 8)
    forced = [tok.encode_special("<|output_start|>")] + tok.encode("5") + [tok.encode_special("<|output_end|>")]
    new, mask = seqs[0][len(prompt):], masks[0][len(prompt):]
    assert new[:len(written) + len(forced)] == written + forced
    assert mask == [1] * len(written) + [0] * len(forced) + [1] * (len(new) - len(written) - len(forced))
    assert masks[0][:len(prompt)] == [0] * len(prompt)
    assert "5" in texts[0]
    # training targets: the forced tool output (and the prompt) never appear
    (x, y, _), = pg_micro_batches(seqs, masks, [1.0], pad_id=tok.get_bos_token_id(), device_batch_size=4)
    assert (y[0] != -1).sum().item() == sum(mask)
    assert tok.encode_special("<|output_start|>") not in y[0].tolist()


def test_rollout_samples_rows_independently(tiny):
    model, tok = tiny
    engine = Engine(model.eval(), tok)
    prompt = tok.render_for_completion(plain_conversation())
    seqs, masks, _ = rollout(engine, prompt, num_samples=4, max_tokens=6, temperature=1.0, seed=1)
    assert len({tuple(s[len(prompt):][:1]) for s in seqs}) > 1  # not one shared first token
    for s, m in zip(seqs, masks):
        assert s[:len(prompt)] == prompt and m[len(prompt):] == [1] * (len(s) - len(prompt))


# -------------------------------------------------------------------------------------------------
# RL learns: a reward for emitting a chosen token

def test_rl_raises_a_toy_reward(tiny):
    model, tok = tiny
    model.train()
    torch.manual_seed(0)
    engine = Engine(model, tok)
    prompt = tok.render_for_completion(plain_conversation())
    with torch.no_grad():
        probs = F.softmax(model(torch.tensor([prompt])).float()[0, -1], dim=-1)
    special = set(tok.encode_special(s) for s in tok.get_special_tokens())
    candidates = [t for t in range(tok.get_vocab_size()) if t not in special]
    chosen = min(candidates, key=lambda t: abs(probs[t].item() - 0.06))  # a token the model rarely emits first
    optimizers = model.setup_optimizers(peak_lrs(model.config.n_embd, 0.02, 0.2, 0.02))
    # before training the reward is rare: ~0.12 expected over 2 tokens; measured over 64 rollouts, not 16
    before = []
    for seed in range(4):
        seqs, _, _ = rollout(engine, prompt, num_samples=16, max_tokens=2, temperature=1.0, seed=1000 + 16 * seed)
        before += [float(chosen in s[len(prompt):]) for s in seqs]
    assert sum(before) / len(before) <= 0.25, before
    history = []
    for step in range(40):
        seqs, masks, _ = rollout(engine, prompt, num_samples=16, max_tokens=2, temperature=1.0, seed=100 * step)
        rewards = [float(chosen in s[len(prompt):]) for s in seqs]
        history.append(sum(rewards) / len(rewards))
        batches = pg_micro_batches(seqs, masks, group_advantages(rewards).tolist(), tok.get_bos_token_id(), 16)
        train_step(model, optimizers, batches, NO_AUTOCAST)
        if len(history) >= 5 and sum(history[-5:]) / 5 >= 0.9:
            break
    print("toy reward by step:", history)
    assert sum(history[-5:]) / 5 >= 0.8, history


# -------------------------------------------------------------------------------------------------
# the shared step on 2 gloo ranks (unequal token counts, one rank without rows) == 1 process

DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO_ROOT"])
from nanochat.gpt import GPT, GPTConfig
from nanochat.schedule import peak_lrs
from nanochat.training import train_step
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
model.init_weights()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.3)
g = torch.Generator().manual_seed(1)
all_batches = []
for n in (5, 9, 7):  # three micro-batches of different lengths and masks
    x = torch.randint(0, 64, (2, n), generator=g)
    y = torch.randint(0, 64, (2, n), generator=g)
    y[torch.rand((2, n), generator=g) < 0.4] = -1
    all_batches.append((x, y, torch.randn(2, generator=g)))
mine = all_batches if world == 1 else (all_batches if rank == 0 else [])
opts = model.setup_optimizers(peak_lrs(model.config.n_embd, 0.02, 0.1, 0.01))
losses = [train_step(model, opts, mine, torch.autocast("cpu", enabled=False), world)[0] for _ in range(3)]
if rank == 0:
    torch.save({"losses": losses, "state": model.state_dict()}, sys.argv[1])
dist.destroy_process_group()
"""


def test_train_step_two_ranks_equal_one(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, REPO_ROOT=REPO_ROOT, OMP_NUM_THREADS="1")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}.pt"
        r = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={n}", str(script), str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = torch.load(out)
    assert outs[1]["losses"] == pytest.approx(outs[2]["losses"], rel=1e-5)
    for k, v in outs[1]["state"].items():
        assert torch.allclose(v, outs[2]["state"][k], atol=1e-5), k


# -------------------------------------------------------------------------------------------------
# the scripts: 2 steps each from the previous stage's checkpoint; resume; clear errors

def run_stage(base_dir, module, *flags, check=True):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", module, "--dtype", "float32", *flags], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(base_dir, folder, tag):
    with open(os.path.join(base_dir, folder, tag, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


SFT_FLAGS = ["--device-batch-size", "2", "--rows-per-step", "4", "--max-seq-len", "128", "--eval-every", "2",
             "--eval-steps", "2", "--eval-problems", "3", "--max-new-tokens", "8"]
RL_FLAGS = ["--prompts-per-step", "2", "--num-samples", "3", "--max-new-tokens", "12", "--eval-every", "2",
            "--eval-problems", "2", "--eval-samples", "2", "--temperature", "1.0"]


def test_sft_then_rl_two_steps_each_loadable_and_resumable(tiny, base_dir):
    from nanochat.checkpoint import load_model
    # missing input checkpoint: a clear error naming the stage to run
    r = run_stage(base_dir, "scripts.chat_rl", *RL_FLAGS, "--num-iterations", "2", check=False)
    assert r.returncode != 0 and "chatsft_checkpoints" in (r.stderr + r.stdout) and "Traceback" not in r.stderr
    # --load-optimizer from a checkpoint saved without optimizer state: one clear line
    r = run_stage(base_dir, "scripts.chat_sft", *SFT_FLAGS, "--num-iterations", "2", "--load-optimizer", check=False)
    assert r.returncode == 1 and "has no optimizer state" in r.stderr and "Traceback" not in r.stderr
    out = run_stage(base_dir, "scripts.chat_sft", *SFT_FLAGS, "--num-iterations", "2").stdout
    assert "mixture: identity" in out and "mixture: GSM8K" in out
    packing = re.search(r"packed ([\d,]+) into ([\d,]+) rows of 129 tokens \(fill ([\d.]+)%.*dropped ([\d,]+) longer "
                        r"than a row and ([\d,]+) with nothing to train", out)
    assert packing and int(packing.group(4).replace(",", "")) > 0 and 50 < float(packing.group(3)) <= 100
    full = [m["loss"] for m in metrics(base_dir, "chatsft_checkpoints", "d2") if "loss" in m]
    assert len(full) == 2
    quick = [m for m in metrics(base_dir, "chatsft_checkpoints", "d2") if "GSM8K well-formed" in m]
    assert quick and 0 <= quick[-1]["ARC-Easy"] <= 1
    model, _, meta = load_model("sft", "cpu")
    assert meta["step"] == 2 and meta["optimizer_warm_start"] is False and meta["packing"]["rows"] > 0
    # SFT again from that SFT checkpoint (it has optimizer state): warm-started, and recorded as such
    out = run_stage(base_dir, "scripts.chat_sft", "-i", "sft", *SFT_FLAGS, "--num-iterations", "1",
                    "--eval-every", "-1", "--eval-problems", "0", "--load-optimizer", "--out-tag", "warm").stdout
    assert "optimizer state from" in out
    with open(os.path.join(base_dir, "chatsft_checkpoints", "warm", "meta_000001.json")) as f:
        assert json.load(f)["optimizer_warm_start"] is True
    # an interrupted SFT run resumes to the same losses
    run_stage(base_dir, "scripts.chat_sft", *SFT_FLAGS, "--num-iterations", "2", "--out-tag", "split",
              "--stop-after-step", "1")
    run_stage(base_dir, "scripts.chat_sft", *SFT_FLAGS, "--num-iterations", "2", "--out-tag", "split", "--resume")
    assert [m["loss"] for m in metrics(base_dir, "chatsft_checkpoints", "split") if "loss" in m] == full
    # RL from the SFT checkpoint
    out = run_stage(base_dir, "scripts.chat_rl", *RL_FLAGS, "--num-iterations", "2", "--model-tag", "d2").stdout
    assert "mean reward" in out and "pass@2" in out
    records = metrics(base_dir, "chatrl_checkpoints", "d2")
    assert len([m for m in records if "mean_reward" in m]) == 2
    model, _, meta = load_model("rl", "cpu")
    assert meta["step"] == 2
    # an interrupted RL run resumes to the same rollouts and losses
    for flags in (["--stop-after-step", "1"], ["--resume"]):
        run_stage(base_dir, "scripts.chat_rl", *RL_FLAGS, "--num-iterations", "2", "--model-tag", "d2",
                  "--out-tag", "split", *flags)
    key = lambda m: (m["step"], m["mean_reward"], m["sampled_tokens"], m["loss"])  # noqa: E731
    assert [key(m) for m in metrics(base_dir, "chatrl_checkpoints", "split") if "mean_reward" in m] == \
        [key(m) for m in records if "mean_reward" in m]
    report = open(os.path.join(base_dir, "report", "chat-rl.md"), encoding="utf-8").read()
    assert "first step mean reward" in report
    assert "final val loss" in open(os.path.join(base_dir, "report", "chat-sft.md"), encoding="utf-8").read()


def stage_runner(base_dir, module, folder, *fixed):
    """For check_sigterm_resume: run(tag, *flags, sigterm=) and records(tag) of one post-training script."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA, OMP_NUM_THREADS="1")

    def run(tag, *flags, sigterm=False):
        flags = [*fixed, "--num-iterations", "1000", "--out-tag", tag, *flags]
        if sigterm:
            return sigterm_after_first_step([sys.executable, "-m", module, "--dtype", "float32", *flags], env)
        r = run_stage(base_dir, module, *flags)
        return r.returncode, r.stdout

    def records(tag):
        return [m for m in metrics(base_dir, folder, tag) if "loss" in m]

    return run, lambda tag: os.path.join(base_dir, folder, tag), records


def test_sft_sigterm_saves_exits_143_and_resumes_exactly(tiny, base_dir):
    check_sigterm_resume(*stage_runner(base_dir, "scripts.chat_sft", "chatsft_checkpoints", *SFT_FLAGS,
                                       "--eval-every", "-1", "--eval-problems", "0"))


def test_rl_sigterm_saves_exits_143_and_resumes_exactly(base_dir):
    make_chat_checkpoint(base_dir, source_dir="chatsft_checkpoints")
    check_sigterm_resume(*stage_runner(base_dir, "scripts.chat_rl", "chatrl_checkpoints", *RL_FLAGS,
                                       "--eval-problems", "0", "--model-tag", "d2"))


def run_torchrun(base_dir, nproc, module, *flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA, OMP_NUM_THREADS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", module, "--dtype", "float32",
                        *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_sft_and_rl_on_two_ranks_equal_one(tiny, base_dir):
    """2 gloo ranks take the same conversations / problems as 1 process: same losses, same rollouts."""
    for nproc in (1, 2):
        run_torchrun(base_dir, nproc, "scripts.chat_sft", *SFT_FLAGS, "--eval-problems", "0", "--num-iterations", "2",
                     "--out-tag", f"n{nproc}")
    one, two = (metrics(base_dir, "chatsft_checkpoints", f"n{n}") for n in (1, 2))
    assert [m["loss"] for m in one if "loss" in m] == pytest.approx([m["loss"] for m in two if "loss" in m], rel=1e-4)
    assert [m["tokens"] for m in one if "tokens" in m] == [m["tokens"] for m in two if "tokens" in m]
    assert [m["val_loss"] for m in one if "val_loss" in m] == pytest.approx(
        [m["val_loss"] for m in two if "val_loss" in m], rel=1e-4)
    # warm-started from those checkpoints' optimizer state (each rank its own shard): step 2 moves by the moments
    for nproc in (1, 2):
        run_torchrun(base_dir, nproc, "scripts.chat_sft", "-i", "sft", "--model-tag", f"n{nproc}", *SFT_FLAGS,
                     "--eval-every", "-1", "--eval-problems", "0", "--num-iterations", "2", "--load-optimizer",
                     "--out-tag", f"warm{nproc}")
    one, two = (metrics(base_dir, "chatsft_checkpoints", f"warm{n}") for n in (1, 2))
    assert [m["loss"] for m in one if "loss" in m] == pytest.approx([m["loss"] for m in two if "loss" in m], rel=1e-4)
    for nproc in (1, 2):
        run_torchrun(base_dir, nproc, "scripts.chat_rl", *RL_FLAGS, "--eval-problems", "0", "--num-iterations", "2",
                     "--model-tag", "n1", "--out-tag", f"n{nproc}")
    one, two = (metrics(base_dir, "chatrl_checkpoints", f"n{n}") for n in (1, 2))
    key = lambda m: (m["mean_reward"], m["sampled_tokens"])  # noqa: E731
    assert [key(m) for m in one if "mean_reward" in m] == [key(m) for m in two if "mean_reward" in m]


# -------------------------------------------------------------------------------------------------
# midtraining: the val eval reads the packed val rows once at most; offline, one clear line


def test_mid_train_evaluates_at_most_one_pass_of_the_val_rows(base_dir):
    make_chat_checkpoint(base_dir, source_dir="base_checkpoints")
    many = 2**20  # far more than the val rows hold
    out = run_stage(base_dir, "scripts.mid_train", "--device-batch-size", "4", "--total-batch-size", "512",
                    "--num-iterations", "1", "--eval-every", "-1", "--eval-tokens", str(many)).stdout
    val_rows = int(re.search(r"val ([\d,]+) rows", out).group(1).replace(",", ""))
    expected = val_rows * 64  # every row once, 64 targets each (the model's context; loss on every token)
    assert 0 < expected < many // 10
    evals = [m for m in metrics(base_dir, "mid_checkpoints", "d2") if "val_bpb" in m]
    assert [m["val_tokens"] for m in evals] == [expected]
    assert f"over {expected:,} tokens" in out


def test_mid_train_offline_without_local_data_is_one_clear_line(base_dir, refused_endpoint):
    make_chat_checkpoint(base_dir, source_dir="base_checkpoints")
    r = subprocess.run([sys.executable, "-m", "scripts.mid_train", "--dtype", "float32", "--device-batch-size", "4",
                        "--total-batch-size", "512"], cwd=REPO_ROOT, env=offline_env(base_dir, refused_endpoint),
                       capture_output=True, text=True, timeout=300)
    assert_one_line_fetch_error(r, "the HuggingFace dataset HuggingFaceTB/smol-smoltalk", refused_endpoint)
