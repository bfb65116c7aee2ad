"""CORE: hand-checked prompt rendering, oracle models through the real scoring path, batching, 2 ranks == 1,
and base_eval offline without NANOCHAT_LOCAL_DATA: one clear line, no traceback."""

import json
import os
import socket
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO_ROOT, TEST_DATA, shakespeare
from nanochat.core_eval import (CORE_TASKS, core_data_dir, evaluate_core, evaluate_task, fewshot_indices, load_rows,
                                render_item, score_sequences, tokenize_pairs)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

CORE = os.path.join(TEST_DATA, "core")
# the tasks tests/data/core holds (40 rows each): both multiple-choice renderings, schema, language modeling
SMALL_CORE = {"arc_easy", "boolq", "winograd", "lambada_openai"}
SPEC = {label: (rel, kind, shots, delim, base) for label, rel, kind, shots, delim, base in CORE_TASKS}


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare(200_000)
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 1000)


def rows_of(label):
    return load_rows(os.path.join(CORE, SPEC[label][0]))


def test_rendering_matches_the_spec_by_hand():
    mc = rows_of("boolq")  # multiple choice, rendered as copa is: 0 shots, delimiter " "
    prefixes, conts, gold = render_item(mc, 0, "multiple_choice", 0, " ")
    assert prefixes == [mc[0]["query"] + " "] * len(mc[0]["choices"])
    assert conts == mc[0]["choices"] and gold == mc[0]["gold"]
    wino = rows_of("winograd")  # schema, 0 shots
    prefixes, conts, gold = render_item(wino, 3, "schema", 0, " ")
    assert prefixes == [c + " " for c in wino[3]["context_options"]]
    assert conts == [wino[3]["continuation"]] * 2
    lam = rows_of("lambada_openai")  # language modeling, 0 shots
    prefixes, conts, _ = render_item(lam, 5, "language_modeling", 0, " ")
    assert prefixes == [lam[5]["context"] + " "] and conts == [lam[5]["continuation"]]
    # few-shot: arc_easy, 10 shots, "\nAnswer: ": each shot "query\nAnswer: gold choice", blank lines between
    arc = rows_of("arc_easy")
    prefixes, conts, _ = render_item(arc, 7, "multiple_choice", 10, "\nAnswer: ")
    shots = fewshot_indices(len(arc), 7, 10)
    assert len(shots) == 10 and 7 not in shots and shots == fewshot_indices(len(arc), 7, 10)
    expected = "".join(f"{arc[j]['query']}\nAnswer: {arc[j]['choices'][arc[j]['gold']]}\n\n" for j in shots)
    assert prefixes[0] == expected + arc[7]["query"] + "\nAnswer: "
    # few-shot schema and language modeling: each shot rendered with its gold context / its continuation
    prefixes, conts, _ = render_item(wino, 3, "schema", 10, " ")
    shots = fewshot_indices(len(wino), 3, 10)  # golds 0 and 1 among them
    head = "".join(f"{wino[j]['context_options'][wino[j]['gold']]} {wino[j]['continuation']}\n\n" for j in shots)
    assert prefixes == [head + c + " " for c in wino[3]["context_options"]]
    prefixes, conts, _ = render_item(lam, 5, "language_modeling", 10, " ")
    head = "".join(f"{lam[j]['context']} {lam[j]['continuation']}\n\n" for j in fewshot_indices(len(lam), 5, 10))
    assert prefixes == [head + lam[5]["context"] + " "] and conts == [lam[5]["continuation"]]
    # fewer items than shots + 1: use what exists, no exception
    assert sorted(fewshot_indices(4, 2, 10)) == [0, 1, 3]


def test_tokenized_spans_and_bos(tokenizer):
    seqs = tokenize_pairs(tokenizer, ["The cat sat on the"], [" mat"], max_len=1000)
    ids, start, end = seqs[0]
    assert ids[0] == tokenizer.get_bos_token_id() and end == len(ids)
    assert tokenizer.decode(ids[start:end]).endswith("mat") and start >= 2
    long = tokenize_pairs(tokenizer, ["word " * 500], [" end"], max_len=64)[0]
    assert len(long[0]) == 64 and long[0][0] == tokenizer.get_bos_token_id()
    assert tokenizer.decode(long[0][long[1]:]).strip() == "end"


class Oracle(torch.nn.Module):
    """Makes the gold sequences cheap (every next token predicted); others uniform. reverse swaps the two."""

    def __init__(self, vocab, gold_sequences, pad, reverse=False, seq_len=4096):
        super().__init__()
        self.vocab, self.gold, self.pad, self.reverse = vocab, gold_sequences, pad, reverse
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=vocab, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)

    def get_device(self):
        return self.anchor.device

    def forward(self, x):
        B, T = x.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = x[b].tolist()
            while len(row) > 1 and row[-1] == self.pad:
                row.pop()
            is_gold = tuple(row) in self.gold
            if is_gold != self.reverse:
                for t in range(len(row) - 1):
                    logits[b, t, row[t + 1]] = 20.0
            elif self.reverse:  # for LM items: predict something else than the continuation
                for t in range(len(row) - 1):
                    logits[b, t, (row[t + 1] + 1) % self.vocab] = 20.0
        return logits


# (task, shots): every task type with 0 and with 10 shots (lambada at 10 shots plays a few-shot LM
# task such as bigbench_operators; boolq at 0 shots a zero-shot multiple-choice one such as copa)
@pytest.mark.parametrize("label,shots", [("arc_easy", None), ("boolq", None), ("boolq", 0), ("winograd", None),
                                         ("winograd", 10), ("lambada_openai", None), ("lambada_openai", 10)])
@pytest.mark.parametrize("reverse", [False, True])
def test_oracles_score_100_and_0(tokenizer, label, shots, reverse):
    rel, kind, spec_shots, delim, base = SPEC[label]
    shots = spec_shots if shots is None else shots
    rows = rows_of(label)
    indices = list(range(12))
    gold = set()
    for i in indices:
        prefixes, conts, g = render_item(rows, i, kind, shots, delim)
        seqs = tokenize_pairs(tokenizer, prefixes, conts, 4096)
        gold.add(tuple(seqs[g][0]))
    model = Oracle(tokenizer.get_vocab_size(), gold, tokenizer.get_bos_token_id(), reverse)
    correct = evaluate_task(model, tokenizer, rows, kind, shots, delim, 4096, indices, batch_size=7)
    assert correct == (0 if reverse else len(indices))


def random_model(vocab):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def test_batched_equals_one_at_a_time(tokenizer):
    model = random_model(tokenizer.get_vocab_size())
    rows = rows_of("boolq")
    seqs = []
    for i in range(6):
        prefixes, conts, _ = render_item(rows, i, "multiple_choice", 2, "\nAnswer: ")
        seqs += tokenize_pairs(tokenizer, prefixes, conts, 256)
    with torch.no_grad():
        assert model(torch.tensor([seqs[0][0]])).std() > 0.1
    batched = score_sequences(model, seqs, tokenizer.get_bos_token_id(), batch_size=5)
    alone = [score_sequences(model, [s], tokenizer.get_bos_token_id(), batch_size=1)[0] for s in seqs]
    for (a, pa), (b, pb) in zip(batched, alone):
        assert a == pytest.approx(b, rel=1e-4) and pa == pb


def test_evaluate_core_reports_absent_tasks(tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", TEST_DATA)
    model = random_model(tokenizer.get_vocab_size())
    out = evaluate_core(model, tokenizer, max_per_task=3, log=lambda *a: None)
    assert out["present"] == len(SMALL_CORE) and out["total"] == 22
    assert set(out["tasks"]) == SMALL_CORE and set(out["absent"]) == set(SPEC) - SMALL_CORE
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / len(SMALL_CORE))
    assert all(r["n"] == 3 for r in out["tasks"].values())


def test_evaluate_core_on_the_full_copy(tokenizer, monkeypatch, large_data):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", large_data)
    model = random_model(tokenizer.get_vocab_size())
    out = evaluate_core(model, tokenizer, max_per_task=2, log=lambda *a: None)
    assert out["present"] == 18 and out["total"] == 22
    assert set(out["absent"]) == {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / 18)
    assert all(r["n"] == 2 for r in out["tasks"].values())


def test_eval_bundle_download_from_a_file_url(tmp_path, base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_LOCAL_DATA", raising=False)
    bundle = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        z.write(os.path.join(CORE, "language_understanding", "winograd_wsc.jsonl"), "eval_bundle/eval_data/language_understanding/winograd_wsc.jsonl")
        z.write(os.path.join(CORE, "world_knowledge", "arc_easy.jsonl"), "eval_bundle/eval_data/world_knowledge/arc_easy.jsonl")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", bundle.as_uri())
    folder = core_data_dir()
    assert os.path.exists(os.path.join(folder, "language_understanding", "winograd_wsc.jsonl"))
    assert core_data_dir() == folder  # second call: no download


def test_base_eval_two_ranks_equal_one(tmp_path, tokenizer):
    from dataclasses import asdict
    from nanochat.checkpoint import save_checkpoint
    base = tmp_path / "base"
    tokenizer.save(str(base / "tokenizer"))
    model = random_model(tokenizer.get_vocab_size())
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_LOCAL_DATA=TEST_DATA, OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        save_checkpoint(str(base / "base_checkpoints" / "d2"), 1, model, [], {"model_config": asdict(model.config)})
    finally:
        os.environ.pop("NANOCHAT_BASE_DIR") if old is None else os.environ.__setitem__("NANOCHAT_BASE_DIR", old)
    flags = ["-m", "scripts.base_eval", "--max-per-task", "5", "--dtype", "float32", "--batch-size", "8"]
    one = subprocess.run([sys.executable, *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", *flags], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    pick = lambda out: [l for l in out.splitlines() if "acc " in l or l.startswith("CORE (")]
    lines_one, lines_two = pick(one.stdout), pick(two.stdout)
    assert len(lines_one) == len(SMALL_CORE) + 1 and [l.split("[")[0] for l in lines_one] == [l.split("[")[0] for l in lines_two]


@pytest.fixture
def refused_endpoint():
    """http://127.0.0.1:<port> where a socket is bound but never listens: every connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def offline_env(base_dir, endpoint):
    """The environment of a stage with no network: every remote source points at a refused port, no local copy."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", HF_ENDPOINT=endpoint,
               HF_HOME=os.path.join(base_dir, "hf_home"), NANOCHAT_EVAL_BUNDLE_URL=f"{endpoint}/eval_bundle.zip",
               NANOCHAT_WORDS_URL=f"{endpoint}/words_alpha.txt", NANOCHAT_DATA_URL=endpoint)
    for name in ("NANOCHAT_LOCAL_DATA", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(name, None)
    return env


def assert_one_line_fetch_error(result, what, endpoint):
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"error: could not fetch {what}") and f"from {endpoint}" in lines[0], lines[0]
    assert "set NANOCHAT_LOCAL_DATA to a folder laid out like ../shared/data" in lines[0]


def test_base_eval_offline_without_local_data_is_one_clear_line(base_dir, refused_endpoint):
    from test_chat_cli import make_chat_checkpoint
    make_chat_checkpoint(base_dir, source_dir="base_checkpoints")
    r = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--dtype", "float32", "--max-per-task", "2"],
                       cwd=REPO_ROOT, env=offline_env(base_dir, refused_endpoint), capture_output=True, text=True,
                       timeout=300)
    assert_one_line_fetch_error(r, "the CORE eval bundle", f"{refused_endpoint}/eval_bundle.zip")
    assert "NANOCHAT_EVAL_BUNDLE_URL" in r.stderr
