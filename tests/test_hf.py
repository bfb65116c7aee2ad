"""
The HuggingFace ecosystem: scripts.export_hf -> transformers' NanoChatForCausalLM + AutoTokenizer
(logits, greedy generation, token ids, chat template with str or OpenAI-style list contents, BOS on raw
text), scripts.import_hf round trip, refusal of a model with no HF equivalent, /v1/completions
log-probabilities, and a real lm-evaluation-harness run against a real server on 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from conftest import REPO_ROOT, read_text, shakespeare, wait_for_server
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_format import NotExportable, export_folder, to_hf_state_dict
from nanochat.tokenizer import RustBPETokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! How are you today?",
    "def square(x):\n    return x ** 2  # power\n\n\nprint(square(12))\n",
    "日本語のテキストと中文的句子，还有한국어도 있어요。",
    "emoji 🤖🎉 👍🏽 and a family 👨‍👩‍👧 — done.",
    "   leading spaces, trailing   \n\n\n\ttabs\t\tand\r\nCRLF lines  ",
    "It's 3.14159, 1,000,000 and 2024-12-02; don't won't I'LL WE'VE",
    "naïve café résumé Ångström ß œ",
    "<html><body class=\"x\">a &amp; b</body></html>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare()
    rows = [json.loads(line) for line in read_text("humaneval", "HumanEval.jsonl.gz").splitlines()]
    code = "".join(r["prompt"] + r["canonical_solution"] for r in rows)
    docs = [text[i:i + 2000] for i in range(0, len(text), 2000)] + [code[i:i + 2000] for i in range(0, len(code), 2000)]
    docs += TEXTS[:4] * 20  # some CJK and emoji merges too
    return RustBPETokenizer.train_from_iterator(iter(docs), 1000)  # not a multiple of 64: the model pads


def random_model(tokenizer, seed=0, n_kv_head=2):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4,
                          n_kv_head=n_kv_head, n_embd=128))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # every parameter re-randomised: zero projections would make logits trivial
            p.normal_(0, 0.15)
    return model.eval()


def hf_logits_diff(model, folder, tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    return (ours - theirs).abs().max().item(), ours, hf


def test_export_matches_transformers_logits_and_greedy(tokenizer, tmp_path):
    model = random_model(tokenizer)
    export_folder(model, tokenizer, tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (3, 60), generator=g)
    diff, ours, hf = hf_logits_diff(model, tmp_path / "hf", tokens)
    assert ours.std() > 0.5  # the logits vary: the comparison is not trivial
    assert diff < 1e-4, diff
    # the exported vocabulary is the real one: HF can never emit a padding id
    assert hf.config.vocab_size == tokenizer.get_vocab_size() < model.padded_vocab_size
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Hello there"},
                                                           {"role": "assistant", "content": ""}]})
    rows, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=24, temperature=0)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    ours_new = rows[0][len(prompt):]
    assert ours_new and out[0, len(prompt):len(prompt) + len(ours_new)].tolist() == ours_new


def test_a_planted_rotary_bug_is_caught(tokenizer, tmp_path, monkeypatch):
    """Exporting for the other rotate_half convention (q/k halves swapped per head) must change the logits."""
    import nanochat.hf_format as hf_format
    model = random_model(tokenizer)
    original = hf_format.to_hf_state_dict

    def swapped(state_dict, config):
        out = original(state_dict, config)
        d = config.n_embd // config.n_head
        for key, w in out.items():
            if key.endswith(("q_proj.weight", "k_proj.weight")):
                heads = w.view(-1, d, w.size(1))
                out[key] = torch.cat([heads[:, d // 2:], heads[:, :d // 2]], dim=1).reshape_as(w)
        return out
    monkeypatch.setattr(hf_format, "to_hf_state_dict", swapped)
    export_folder(model, tokenizer, tmp_path / "bad")
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(2))
    diff, _, _ = hf_logits_diff(model, tmp_path / "bad", tokens)
    assert diff > 1e-2, "a wrong rotary convention went unnoticed"


def test_auto_tokenizer_reproduces_our_ids_and_chat_template(tokenizer, tmp_path):
    model = random_model(tokenizer)
    export_folder(model, tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prose = shakespeare(60_000)
    texts = TEXTS + [prose[i:i + 3000] for i in range(0, len(prose), 3000)]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text), repr(text[:50])
        assert hf_tok.decode(tokenizer.encode(text)) == text
    conversations = [
        {"messages": [{"role": "user", "content": "What is 2+3?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "Let me check. "},
                                                        {"type": "python", "text": "2+3"},
                                                        {"type": "python_output", "text": "5"},
                                                        {"type": "text", "text": "It is 5."}]},
                      {"role": "user", "content": "And 日本?"}, {"role": "assistant", "content": "🤖 no idea"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there\n"},
                      {"role": "assistant", "content": "Hello!"}]},
    ]
    for conversation in conversations:
        ids, _ = tokenizer.render_conversation(conversation, max_tokens=None)
        assert list(hf_tok.apply_chat_template(conversation["messages"], tokenize=True, return_dict=False)) == ids
        prompt = tokenizer.render_for_completion(conversation)
        hf_prompt = hf_tok.apply_chat_template(conversation["messages"][:-1], tokenize=True, return_dict=False,
                                               add_generation_prompt=True)
        assert list(hf_prompt) == prompt


def test_chat_template_takes_openai_list_content_and_raw_text_gets_bos(tokenizer, tmp_path):
    """
    OpenAI clients (and vLLM's chat-template warm-up) send contents as [{"type": "text", "text": ...}]:
    the exported template renders the parts' concatenated text, to the ids our render gives that text.
    A raw text encoded with special tokens (what vLLM's and mlx_lm's /v1/completions do) gets BOS
    first, as our server prompts it.
    """
    export_folder(random_model(tokenizer), tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    parts = lambda text, cut: [{"type": "text", "text": text[:cut]}, {"type": "text", "text": text[cut:]}]  # noqa: E731
    messages = [{"role": "system", "content": parts("Be brief and kind.", 5)},  # cut inside a word
                {"role": "user", "content": parts("What is 日本?", 4)},
                {"role": "assistant", "content": [{"type": "text", "text": "A country. "},
                                                  {"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"}]},
                {"role": "user", "content": [{"type": "text", "text": "Thanks 🤖"}]},
                {"role": "assistant", "content": "You're welcome."}]
    joined = lambda m: dict(m, content="".join(p["text"] for p in m["content"]))  # noqa: E731
    flat = [joined(m) if m["role"] != "assistant" else m for m in messages]  # our renderer takes str user turns
    ids, _ = tokenizer.render_conversation({"messages": flat}, max_tokens=None)
    assert list(hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)) == ids
    prompt = hf_tok.apply_chat_template(messages[:-1], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert list(prompt) == tokenizer.render_for_completion({"messages": flat})
    assert prompt.count(tokenizer.get_bos_token_id()) == 1  # the template's BOS only: chat text is encoded without
    # what our renderer refuses, the template refuses too (never a silently different prompt)
    for bad in ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                [{"role": "system", "content": "a"}]):
        with pytest.raises(Exception, match="text|alternate|first"):
            hf_tok.apply_chat_template(bad, tokenize=False)
    for text in ("To be, or not to be", "日本語 🤖", ""):
        assert hf_tok(text).input_ids == [tokenizer.get_bos_token_id()] + tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def write_checkpoint(base, tokenizer, model, step, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    tokenizer.save(os.path.join(base, "tokenizer"))
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), step, model, [], {"model_config": asdict(model.config)})


def test_hand_made_merges_where_plain_bpe_and_tiktoken_differ(tokenizer, tmp_path):
    """
    Two cases a naive tokenizer.json gets wrong. 'pqrs' is a token (made from pq + rs), but merging
    pairs from bytes goes p|qr|s (qr ranks first) and no rule joins that: tiktoken takes the whole
    piece, so ignore_merges must be on. 'abcx': tiktoken merges a + bc into abc (bc ranks before ab);
    a file holding one rule per token, ab + c (as training may well have made abc), misses it: the file
    needs a rule for every valid split.
    """
    from nanochat.hf_format import tokenizer_files
    ranks = [bytes([b]) for b in range(256)] + [b"qr", b"pq", b"rs", b"pqrs", b"bc", b"ab", b"abc"]
    ours = RustBPETokenizer(tokenizer.get_pattern(), ranks)
    tok_json, tok_config = tokenizer_files(ours, 64)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.encode("pqrs") == [259] and ours.encode("abcx") == [262, ord("x")]  # what tiktoken does
    for text in ("pqrs", "abcx", "xpqrs abcx abc pqrsx"):
        assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text


def test_import_of_export_round_trips_bit_exactly(tokenizer, tmp_path, monkeypatch):
    base = tmp_path / "base"
    model = random_model(tokenizer, seed=3, n_kv_head=1)
    # a checkpoint of ours, exported and imported by the scripts (each its own base dir)
    write_checkpoint(base, tokenizer, model, 7, monkeypatch)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    r = subprocess.run([sys.executable, "-m", "scripts.export_hf", "-i", "sft", "--out", str(tmp_path / "hf")],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh"
    env2 = dict(os.environ, NANOCHAT_BASE_DIR=str(fresh))
    r = subprocess.run([sys.executable, "-m", "scripts.import_hf", str(tmp_path / "hf"), "-i", "rl", "--model-tag", "back"],
                       cwd=REPO_ROOT, env=env2, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    back_tok = RustBPETokenizer.from_directory(os.path.join(fresh, "tokenizer"))
    assert back_tok.fingerprint() == tokenizer.fingerprint()
    from nanochat.checkpoint import build_model
    back, _, meta = build_model(os.path.join(fresh, "chatrl_checkpoints", "back"), 0, "cpu")
    assert back.config == model.config
    V = model.config.vocab_size
    ours, theirs = model.state_dict(), back.state_dict()
    for key, value in ours.items():
        if key in ("cos", "sin"):
            continue
        real = value[:V] if key in ("transformer.wte.weight", "lm_head.weight") else value
        assert torch.equal(real, theirs[key][:real.size(0)]), key  # bit-exact
    tokens = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(tokens), back(tokens))
    # importing into a base dir that holds a different tokenizer is refused, not silently mixed
    other = RustBPETokenizer.train_from_iterator(iter(["a different corpus entirely " * 50]), 300)
    other.save(os.path.join(tmp_path / "other", "tokenizer"))
    r = subprocess.run([sys.executable, "-m", "scripts.import_hf", str(tmp_path / "hf")], cwd=REPO_ROOT,
                       env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "other")), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "different tokenizer" in r.stderr


def test_a_model_without_hf_equivalent_is_refused(tokenizer, tmp_path):
    model = random_model(tokenizer)
    state = dict(model.state_dict())
    state["transformer.h.0.attn.c_q.bias"] = torch.zeros(128)  # an architecture change HF NanoChat cannot hold
    with pytest.raises(NotExportable, match="do not match the NanoChat architecture"):
        to_hf_state_dict(state, model.config)
    r = subprocess.run([sys.executable, "-m", "scripts.export_hf", "--out", str(tmp_path / "x")], cwd=REPO_ROOT,
                       env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "empty")), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr


# -------------------------------------------------------------------------------------------------
# /v1/completions and lm-evaluation-harness

def test_completions_echo_logprobs_equal_minus_the_loss(tokenizer):
    from fastapi.testclient import TestClient
    from nanochat.serving import Worker
    from scripts.chat_web import create_app
    model = random_model(tokenizer)
    client = TestClient(create_app([Worker(0, Engine(model, tokenizer), tokenizer)]))
    for text in ("The quick brown fox jumps over the lazy dog.", "日本語 🤖 and code: x = f(y)"):
        ids = tokenizer.encode(text)
        for prompt in (ids, text):
            r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's tokens, then the generated one
            with torch.no_grad():
                loss = model(torch.tensor([[tokenizer.get_bos_token_id()] + ids[:-1]]), torch.tensor([ids]),
                             loss_reduction="sum").item()
            assert sum(lp["token_logprobs"][:len(ids)]) == pytest.approx(-loss, rel=1e-5)
            # greedy check material: the top-1 entry is the best log-probability at each position
            for value, top in zip(lp["token_logprobs"][:len(ids)], lp["top_logprobs"][:len(ids)]):
                assert value <= max(top.values()) + 1e-6
    r = client.post("/v1/completions", json={"prompt": [tokenizer.get_vocab_size() + 5]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "hi", "logprobs": "many"})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LM_EVAL_TASK = """task: nanochat_arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_harness_scores_the_model_through_our_server(tokenizer, tmp_path, monkeypatch):
    if subprocess.run([sys.executable, "-c", "import lm_eval"], capture_output=True).returncode != 0:
        pytest.fail("lm-eval is a test dependency (pip install -e '.[dev]')")
    base = tmp_path / "base"
    model = random_model(tokenizer)
    write_checkpoint(base, tokenizer, model, 1, monkeypatch)
    export_folder(model, tokenizer, tmp_path / "hf")
    # ARC-Easy test questions from the local copy, as a task from local files
    rows = []
    for line in read_text("arc", "ARC-Easy", "test.jsonl").splitlines()[:12]:
        item = json.loads(line)
        labels = [c["label"] for c in item["question"]["choices"]]
        rows.append({"question": item["question"]["stem"], "choices": [c["text"] for c in item["question"]["choices"]],
                     "label": labels.index(item["answerKey"])})
    data = tmp_path / "arc_easy_test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "nanochat_arc_easy_local.yaml").write_text(LM_EVAL_TASK.format(path=data))
    port = free_port()
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port", str(port),
                               "--dtype", "float32"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(server, port)
        lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
        model_args = (f"base_url=http://127.0.0.1:{port}/v1/completions,model=nanochat,tokenizer={tmp_path / 'hf'},"
                      f"tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,"
                      # the server refuses prompt + max_tokens beyond the 64-token context: lm-eval cuts its
                      # inputs to max_length (the server adds BOS, and scores 1 new token)
                      f"max_length=63")
        r = subprocess.run([lm_eval, "run", "--model", "local-completions", "--model_args", model_args,
                            "--tasks", "nanochat_arc_easy_local", "--include_path", str(tasks),
                            "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files if f.startswith("results")]
    assert results, r.stdout[-2000:]
    with open(results[0]) as f:
        acc = json.load(f)["results"]["nanochat_arc_easy_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "nanochat_arc_easy_local" in r.stdout
