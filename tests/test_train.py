"""
Pretraining: packing, the resumable dataloader, bits per byte (one pass at most, 2 ranks with unequal
shards == 1 process), and scripts.base_train end to end (resume exactness with negative controls,
torchrun on 2 CPU processes vs gradient accumulation, SIGTERM, dry run, flag errors, an eval that reads
the val split once however many --eval-tokens, no data checksum unless asked). Real shards of real
text, a real tokenizer, real subprocesses.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TEST_DATA, data_path, shakespeare
from nanochat.dataloader import DataLoader, pack_rows
from test_stage import check_sigterm_resume, sigterm_after_first_step

BOS = 0


# -------------------------------------------------------------------------------------------------
# fixtures: shards + tokenizer in a throwaway base dir, shared by the tests of this file

@pytest.fixture(scope="module")
def env_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_base")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        from nanochat.text_shards import prepare
        from nanochat.tokenizer import RustBPETokenizer
        inputs = [data_path("pretrain", "tinyshakespeare", "input.txt"), os.path.join(TEST_DATA, "pretrain", "wikitext-2-raw")]
        prepare(inputs, shard_chars=120_000, val_chars=40_000, seed=0)
        text = shakespeare()
        tokenizer = RustBPETokenizer.train_from_iterator(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), 512)
        tokenizer.save(os.path.join(base, "tokenizer"))
        yield base
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


@pytest.fixture(scope="module")
def tokenizer(env_base):
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer()


# -------------------------------------------------------------------------------------------------
# packing

def test_pack_rows_bos_aligned_and_accounted():
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(200):
        n = int(torch.randint(1, 90, (1,), generator=g))
        docs.append([BOS] + [1000 * (i + 1) + j for j in range(n)])  # unique tokens: traceable
    row_len = 65
    rows, cropped = pack_rows(docs, row_len)
    assert rows and all(len(r) == row_len for r in rows)
    assert sum(len(r) for r in rows) + cropped == sum(len(d) for d in docs)
    starts = {d[1] if len(d) > 1 else None for d in docs}
    seen_docs = set()
    for row in rows:
        assert row[0] == BOS  # every row starts at a document's start
        # the row is a concatenation of document prefixes, each starting with BOS, docs not reused
        segments, cur = [], []
        for t in row:
            if t == BOS and cur:
                segments.append(cur)
                cur = []
            cur.append(t)
        segments.append(cur)
        for seg in segments:
            doc_id = seg[1] // 1000 - 1 if len(seg) > 1 else None
            if doc_id is not None:
                assert seg == docs[doc_id][:len(seg)]
                assert doc_id not in seen_docs
                seen_docs.add(doc_id)
    assert cropped / (cropped + len(rows) * row_len) < 0.15, "best-fit should waste little"
    assert starts  # silence unused warnings in a readable way


def test_pack_rows_long_document_is_cropped_not_continued():
    rows, cropped = pack_rows([[BOS] + list(range(1, 300))], 100)
    assert rows == [[BOS] + list(range(1, 100))]
    assert cropped == 200


# -------------------------------------------------------------------------------------------------
# the dataloader

def take(loader, n):
    out = []
    for x, y, state in loader:
        out.append((x.clone(), y.clone(), state))
        if len(out) == n:
            break
    return out


def test_dataloader_shapes_targets_and_bos(tokenizer):
    B, T = 4, 64
    batches = take(DataLoader(tokenizer, B, T, "train"), 5)
    bos = tokenizer.get_bos_token_id()
    for x, y, _ in batches:
        assert x.shape == (B, T) and y.shape == (B, T) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert (x[:, 0] == bos).all()


def test_dataloader_resume_is_exact(tokenizer):
    B, T = 2, 64
    reference = take(DataLoader(tokenizer, B, T, "train", chunk_rows=8), 30)
    for k in (0, 3, 4, 11, 17):  # inside chunks and at their edges
        resumed = take(DataLoader(tokenizer, B, T, "train", chunk_rows=8, resume_state=reference[k][2]), 8)
        for (x, y, _), (rx, ry, _) in zip(reference[k + 1:k + 9], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_dataloader_ranks_disjoint_and_nonempty(tokenizer):
    B, T = 2, 32

    def rows(rank, world):
        loader = DataLoader(tokenizer, B, T, "train", rank=rank, world_size=world, loop=False)
        return {tuple(r.tolist()) for x, _, _ in loader for r in x}

    r0, r1 = rows(0, 2), rows(1, 2)
    assert r0 and r1 and not (r0 & r1)


# -------------------------------------------------------------------------------------------------
# bits per byte

def test_bpb_of_uniform_model(tokenizer):
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    V = tokenizer.get_vocab_size()
    model = GPT(GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    torch.nn.init.zeros_(model.lm_head.weight)  # all logits 0: the uniform distribution
    token_bytes = get_token_bytes()
    batches = take(DataLoader(tokenizer, 4, 64, "val"), 3)
    for _, y, _ in batches:  # special-token targets and ignored (-1) targets must count in neither sum
        y[:, ::5] = tokenizer.get_bos_token_id()
        y[:, 3] = -1
    bpb, tokens = evaluate_bpb(model, iter(batches), 3, token_bytes)
    assert tokens == 3 * 4 * 64 - 3 * 4  # the -1 targets are not evaluated
    targets = torch.cat([y.reshape(-1) for _, y, _ in batches])
    targets = targets[targets >= 0]
    counted = token_bytes[targets] > 0
    mean_bytes = token_bytes[targets][counted].float().mean().item()
    assert bpb == pytest.approx(math.log2(V) / mean_bytes, rel=1e-6)
    assert (~counted).sum() >= 3 * 4 * 12


# 2 gloo ranks whose val shards hold 3 and 1 batches: both stop after 1 step (no hang, no rank reading
# on alone), and the numbers equal one process evaluating the same 2 batches
EVAL_DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO_ROOT"])
from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
model.init_weights()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.3)
g = torch.Generator().manual_seed(rank)
batches = [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
           for _ in range(3 if rank == 0 else 1)]
result = evaluate_bpb(model, iter(batches), 10, torch.arange(64) % 3)
torch.save({"result": result, "first": batches[0], "state": model.state_dict()}, sys.argv[1] + str(rank))
dist.destroy_process_group()
"""


def test_bpb_two_ranks_with_unequal_shards_stop_together(tmp_path):
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.loss_eval import evaluate_bpb
    script = tmp_path / "ddp_eval.py"
    script.write_text(EVAL_DDP_SCRIPT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, REPO_ROOT=REPO_ROOT, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = [torch.load(tmp_path / f"out{rank}") for rank in (0, 1)]
    assert outs[0]["result"] == outs[1]["result"]
    bpb, tokens = outs[0]["result"]
    assert tokens == 2 * 2 * 16  # one step on each rank, not three on rank 0
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.load_state_dict(outs[0]["state"])
    alone = evaluate_bpb(model, iter([outs[0]["first"], outs[1]["first"]]), 10, torch.arange(64) % 3)
    assert alone[1] == tokens and alone[0] == pytest.approx(bpb, rel=1e-5)


# -------------------------------------------------------------------------------------------------
# scripts.base_train end to end

TINY = ["--depth", "2", "--head-dim", "32", "--aspect-ratio", "32", "--max-seq-len", "64",
        "--device-batch-size", "4", "--total-batch-size", "512", "--dtype", "float32",
        "--eval-every", "-1", "--eval-tokens", "1024", "--sample-every", "-1", "--save-every", "-1",
        "--warmdown-ratio", "0.5", "--log-data-checksum"]


def run_train(base, *flags, nproc=1, check=True, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    if nproc == 1:
        cmd = [sys.executable, "-m", "scripts.base_train", *flags]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "scripts.base_train", *flags]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"base_train failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def metrics(base, tag, key="loss"):
    """The metrics.jsonl records of a run that carry `key`: trained steps ("loss") or evaluations ("val_bpb")."""
    path = os.path.join(base, "base_checkpoints", tag, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if key in r]


def one_pass_val_tokens(tokenizer, B, T, world_size=1):
    """Target tokens in one pass of the val split as base_train reads it: every rank stops with the first one out."""
    batches = [sum(1 for _ in DataLoader(tokenizer, B, T, "val", rank=r, world_size=world_size, loop=False))
               for r in range(world_size)]
    return min(batches) * B * T * world_size, batches


MANY_EVAL_TOKENS = 2**20  # far more than the val split holds


@pytest.fixture(scope="module")
def default_run(env_base):
    """A run with the default flags where they matter: no --log-data-checksum, --eval-tokens past the split."""
    flags = [f for f in TINY if f != "--log-data-checksum"]
    return run_train(env_base, *flags, "--num-iterations", "2", "--eval-every", "1", "--eval-tokens",
                     str(MANY_EVAL_TOKENS), "--model-tag", "default").stdout


def test_base_train_evaluates_at_most_one_pass_of_the_val_split(env_base, tokenizer, default_run):
    expected, _ = one_pass_val_tokens(tokenizer, 4, 64)
    assert 0 < expected < MANY_EVAL_TOKENS // 10
    evals = metrics(env_base, "default", "val_bpb")
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert [r["val_tokens"] for r in evals] == [expected] * 3
    assert default_run.count(f"over {expected:,} tokens") == 3  # printed too


def test_base_train_logs_no_data_checksum_by_default(env_base, default_run):
    records = metrics(env_base, "default")
    assert [r["step"] for r in records] == [1, 2]
    assert not [r for r in records if "data_checksum" in r]


def test_base_train_resume_is_exact(env_base):
    run_train(env_base, *TINY, "--num-iterations", "8", "--model-tag", "full")
    full = metrics(env_base, "full")
    assert [r["step"] for r in full] == list(range(1, 9))
    losses = [r["loss"] for r in full]
    assert len(set(losses)) == len(losses)  # the model is learning, not stuck

    out = run_train(env_base, *TINY, "--num-iterations", "8", "--model-tag", "split", "--stop-after-step", "4").stdout
    assert "stopped at step 4" in out
    run_train(env_base, *TINY, "--num-iterations", "8", "--model-tag", "split", "--resume")
    split = metrics(env_base, "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    assert [r["loss"] for r in split] == losses  # CPU fp32: bit-identical
    assert [r["data_checksum"] for r in split] == [r["data_checksum"] for r in full]

    # negative controls: resume from the same checkpoint with the optimizer state, or the data
    # position, replaced by fresh ones -> the run differs (so the test above can tell)
    from nanochat.checkpoint import load_checkpoint, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    split_dir = os.path.join(env_base, "base_checkpoints", "split")
    for control in ("optimizer", "data"):
        tag = f"control-{control}"
        state, optim_states, dl_state, meta = load_checkpoint(split_dir, 4, "cpu", load_optimizer=True)
        model = GPT(GPTConfig(**meta["model_config"]))
        model.load_state_dict(state)
        optimizers = model.setup_optimizers()
        if control == "data":
            for opt, s in zip(optimizers, optim_states):
                opt.load_state_dict(s)
            dl_state = {"readers": [None] * len(dl_state["readers"])}
        fields = {k: v for k, v in meta.items() if k in ("model_config", "flags", "loop", "val_bpb", "num_iterations")}
        save_checkpoint(os.path.join(env_base, "base_checkpoints", tag), 4, model, optimizers, fields,
                        dataloader_state=dl_state)
        run_train(env_base, *TINY, "--num-iterations", "8", "--model-tag", tag, "--resume")
        control_records = metrics(env_base, tag)
        assert [r["step"] for r in control_records] == [5, 6, 7, 8]
        assert [r["loss"] for r in control_records] != losses[4:]
        if control == "data":
            assert [r["data_checksum"] for r in control_records] != [r["data_checksum"] for r in full[4:]]


def test_base_train_two_processes_equal_gradient_accumulation(env_base, tokenizer):
    # world size 2 x accumulation 1 vs world size 1 x accumulation 2: the same 512-token steps
    run_train(env_base, *TINY, "--num-iterations", "4", "--model-tag", "one")
    run_train(env_base, *TINY, "--num-iterations", "4", "--model-tag", "two", "--eval-tokens", str(MANY_EVAL_TOKENS),
              nproc=2, timeout=400)
    one, two = metrics(env_base, "one"), metrics(env_base, "two")
    assert [r["data_checksum"] for r in one] == [r["data_checksum"] for r in two]
    # the final eval: one pass of the val split on both ranks, stopping together when the first runs out
    expected, per_rank = one_pass_val_tokens(tokenizer, 4, 64, world_size=2)
    assert metrics(env_base, "two", "val_bpb")[-1]["val_tokens"] == expected, per_rank
    # summation order differs (all-reduce vs accumulation): equal to float tolerance, not bitwise
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]
    from nanochat.checkpoint import load_checkpoint
    w1 = load_checkpoint(os.path.join(env_base, "base_checkpoints", "one"), 4, "cpu")[0]
    w2 = load_checkpoint(os.path.join(env_base, "base_checkpoints", "two"), 4, "cpu")[0]
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-3, atol=1e-4)


def test_base_train_sigterm_saves_exits_143_and_resumes_exactly(env_base):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(env_base), OMP_NUM_THREADS="1")

    def run(tag, *flags, sigterm=False):
        flags = [*TINY, "--num-iterations", "1000", "--model-tag", tag, "--log-every", "1", *flags]
        if sigterm:
            return sigterm_after_first_step([sys.executable, "-m", "scripts.base_train", *flags], env)
        r = run_train(env_base, *flags)
        return r.returncode, r.stdout

    # the data position travels too: the resumed steps see the uninterrupted run's tokens
    check_sigterm_resume(run, lambda tag: os.path.join(env_base, "base_checkpoints", tag), lambda tag: metrics(env_base, tag))
    assert [r["data_checksum"] for r in metrics(env_base, "sig")] == [r["data_checksum"] for r in metrics(env_base, "ref")]


def test_base_train_dry_run_and_flag_errors(env_base):
    out = run_train(env_base, "--depth", "20", "--dry-run", "--assume-device", "h100", "--muon-weight-decay", "0.2").stdout
    for needle in ("parameters:", "FLOPs per token", "grad accumulation", "estimated memory per device",
                   "estimated wall time on 8 x h100", "nothing trained"):
        assert needle in out, out
    params = int(out.split("parameters: ")[1].split(" ")[0].replace(",", ""))
    assert 3.5e8 < params < 7e8  # d20: 20 layers of 12 * 1280^2 weights + (small) embeddings
    # the batch rule picks 2^20 for d20 (3.5x depth 12's parameters: 2^19 * 3.5^0.383 ~ 2^19.7) and scales the LRs
    assert "batch from the model size: 1,048,576 tokens" in out and "LRs x 1.414" in out, out
    assert "peak LRs: matrix 0.028284" in out, out
    # the horizon: 10.5 tokens per scaling parameter (block matrices + lm_head), planned for 8 ranks
    scaling = int(out.split("parameters: ")[1].split("(")[1].split(" ")[0].replace(",", ""))
    tokens = int(out.split(" tokens = ")[1].split(" ")[0].replace(",", ""))
    assert tokens == pytest.approx(10.5 * scaling, rel=1e-3) and "grad accumulation 2 x world size 8" in out, out
    # Muon's decay from its depth-12 value, keeping B / (lr * decay * tokens) fixed
    from nanochat.gpt import GPT, config_for_depth
    vocab = int(out.split(" vocab ")[1].split(" ")[0].replace(",", ""))
    with torch.device("meta"):
        d12 = GPT(config_for_depth(12, vocab, 2048)).num_scaling_params()
    expected = 0.2 * math.sqrt(2) * 10.5 * d12 / tokens
    assert f"0.2 -> {expected:.4g}" in out, out
    assert not os.path.exists(os.path.join(env_base, "base_checkpoints", "d20"))

    bad = run_train(env_base, *TINY, "--total-batch-size", "500", check=False)
    assert bad.returncode != 0 and "not a multiple" in bad.stderr + bad.stdout
    bad = run_train(env_base, *TINY, "--depth", "0", check=False)
    assert bad.returncode != 0 and "--depth must be positive" in bad.stderr + bad.stdout
    bad = run_train(env_base, *TINY, "--model-tag", "never-trained", "--resume", check=False)
    assert bad.returncode != 0 and "never-trained" in bad.stderr + bad.stdout


def test_base_train_compiled_matches_eager(env_base):
    # torch.compile (inductor, CPU) must train the same model: same data, losses equal to float tolerance
    flags = [*TINY, "--num-iterations", "3", "--depth", "1"]
    run_train(env_base, *flags, "--model-tag", "eager")
    run_train(env_base, *flags, "--model-tag", "compiled", "--compile", timeout=600)
    eager, compiled = metrics(env_base, "eager"), metrics(env_base, "compiled")
    assert [r["data_checksum"] for r in eager] == [r["data_checksum"] for r in compiled]
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def worker_of_rank(launcher_pid, rank):
    """The pid of torchrun's worker with this LOCAL_RANK (read from /proc)."""
    children = []
    for task in os.listdir(f"/proc/{launcher_pid}/task"):
        with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"LOCAL_RANK={rank}".encode() in f.read().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


@pytest.mark.parametrize("target", ["torchrun", "rank 1 only"])
def test_base_train_two_ranks_sigterm_saves_and_resumes_exactly(env_base, target):
    """A SIGTERM to torchrun (a cluster preempting the job), or to one worker only: both ranks stop at the same
    step (the signalled one tells the other), it is saved, and --resume on 2 ranks continues to the
    uninterrupted 2-rank run's losses, to the bit."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(env_base), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    prefix = "2ranks-" + target.split()[0]

    def interrupted(cmd):
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if re.match(r"step \d{5}/\d{5}", line):
                    os.kill(proc.pid if target == "torchrun" else worker_of_rank(proc.pid, 1), signal.SIGTERM)
                    break
            rest, _ = proc.communicate(timeout=300)  # ranks that disagree would hang in their next collective
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
                proc.wait()
        return proc.returncode, "".join(lines) + rest

    def run(tag, *flags, sigterm=False):
        flags = [*TINY, "--num-iterations", "1000", "--model-tag", f"{prefix}-{tag}", "--log-every", "1", *flags]
        if sigterm:
            return interrupted([torchrun, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", *flags])
        r = run_train(env_base, *flags, nproc=2, timeout=400)
        return r.returncode, r.stdout

    # torchrun exits 1 either way (its own SignalException, or a worker's 143); what the workers did is checked
    # through the checkpoint and the resume
    check_sigterm_resume(run, lambda tag: os.path.join(env_base, "base_checkpoints", f"{prefix}-{tag}"),
                         lambda tag: metrics(env_base, f"{prefix}-{tag}"), exit_code=1,
                         signal_seen_by_rank0=target == "torchrun")
    assert [r["data_checksum"] for r in metrics(env_base, f"{prefix}-sig")] == \
        [r["data_checksum"] for r in metrics(env_base, f"{prefix}-ref")]
