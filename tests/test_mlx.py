"""
MLX-LM runs our export as it is: `scripts.export_hf --format mlx` -> `mlx_lm.load` (its own `nanochat`
model type, no custom code) gives our greedy tokens, with its KV cache and with a full forward per
token, stops where our Engine stops, and renders our chat prompt. Its one known difference, RMSNorm
eps 1e-5 (ours ~1.2e-7), is pinned: with our eps set to 1e-5 the logits agree to float noise.
Skips only where mlx or mlx_lm cannot be imported (the dev extra installs them where MLX has wheels).
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nanochat.gpt as gpt
from conftest import REPO_ROOT, shakespeare
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_format import MLX_RMS_NORM_EPS
from nanochat.tokenizer import RustBPETokenizer

mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install -e '.[dev]'; on Linux it is mlx[cpu])")
mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install -e '.[dev]')")
from mlx_lm.generate import generate_step, stream_generate  # noqa: E402

N_TOKENS = 32
CONVERSATION = {"messages": [{"role": "system", "content": "Answer in verse."},
                             {"role": "user", "content": "What light through yonder window breaks?"},
                             {"role": "assistant", "content": ""}]}


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare()
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), 1000)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=128))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # every parameter re-randomised: zero projections would make logits trivial
            p.normal_(0, 0.15)
        # embedding rows at the scale init_weights gives them and training keeps (mean square ~1 or more);
        # rows of mean square 0.02 would make mlx_lm's eps 1e-5 a 1e-3 logit change no real model sees
        model.transformer.wte.weight.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def mlx_folder(model, tokenizer, tmp_path_factory):
    """The folder the script writes from a checkpoint of ours."""
    base = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as m:  # the checkpoint records the fingerprint of the base dir's tokenizer
        m.setenv("NANOCHAT_BASE_DIR", str(base))
        tokenizer.save(os.path.join(base, "tokenizer"))
        save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), 1, model, [],
                        {"model_config": asdict(model.config)})
    out = base / "mlx"
    r = subprocess.run([sys.executable, "-m", "scripts.export_hf", "-i", "sft", "--format", "mlx", "--out", str(out)],
                       cwd=REPO_ROOT, env=dict(os.environ, NANOCHAT_BASE_DIR=str(base)), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def mlx_logits(mlx_model, tokens):
    return torch.from_numpy(np.array(mlx_model(mx.array(tokens.numpy())).astype(mx.float32)))


def test_mlx_lm_gives_our_greedy_tokens_cached_and_uncached(model, tokenizer, mlx_folder):
    mlx_model, mlx_tok = mlx_lm.load(str(mlx_folder))
    prompt = tokenizer.render_for_completion(CONVERSATION)
    # its tokenizer renders our chat prompt, and puts BOS before a raw text as our server does
    assert list(mlx_tok.apply_chat_template(CONVERSATION["messages"][:-1], add_generation_prompt=True)) == prompt
    assert mlx_tok.encode("To be, or not") == [tokenizer.get_bos_token_id()] + tokenizer.encode("To be, or not")

    ours = list(model.generate(prompt, N_TOKENS, temperature=0))  # our reference: a full forward per token
    assert len(set(ours)) > N_TOKENS // 4, ours  # a varied continuation, not one token repeated
    cached = [int(t) for t, _ in generate_step(mx.array(prompt), mlx_model, max_tokens=N_TOKENS)]
    assert cached == ours
    ids = list(prompt)
    for _ in range(N_TOKENS):  # mlx_lm without its cache: the whole sequence every step
        ids.append(int(mx.argmax(mlx_model(mx.array([ids]))[0, -1]).item()))
    assert ids[len(prompt):] == ours
    # our Engine (KV cache, stops) agrees; mlx_lm's public API stops at the same tokens (generation_config.json)
    rows, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=N_TOKENS, temperature=0)
    assert rows[0][len(prompt):] == ours[:len(rows[0]) - len(prompt)]
    assert set(mlx_tok.eos_token_ids) == {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    responses = list(stream_generate(mlx_model, mlx_tok, prompt, max_tokens=N_TOKENS))
    ended = next((i for i, t in enumerate(ours) if t in mlx_tok.eos_token_ids), None)
    reply = ours if ended is None else ours[:ended]
    assert [r.token for r in responses] == (ours if ended is None else ours[:ended + 1])  # the stop token comes last
    assert "".join(r.text for r in responses) == tokenizer.decode(reply)
    # its streaming text keeps a reply's first space (mlx_lm's byte-level detokenizer would drop it)
    detokenizer = mlx_tok.detokenizer
    detokenizer.reset()
    for t in tokenizer.encode(" To be, or not 日本"):
        detokenizer.add_token(t)
    detokenizer.finalize()
    assert detokenizer.text == " To be, or not 日本"


def test_mlx_lm_logits_differ_from_ours_only_by_its_norm_eps(model, tokenizer, mlx_folder, monkeypatch):
    mlx_model, _ = mlx_lm.load(str(mlx_folder))
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (3, 60), generator=torch.Generator().manual_seed(1))
    theirs = mlx_logits(mlx_model, tokens)
    with torch.no_grad():
        ours = model(tokens)
        monkeypatch.setattr(gpt, "norm", lambda x: F.rms_norm(x, (x.size(-1),), eps=MLX_RMS_NORM_EPS))
        ours_at_their_eps = model(tokens)
    assert ours.std() > 0.5  # the logits vary: the comparison is not trivial
    assert (ours_at_their_eps - theirs).abs().max() < 5e-5  # fp32 arithmetic in another order
    assert (ours - theirs).abs().max() < 1e-3  # measured 4e-5 here, 1.3e-4 on a trained d2 (see mlx_config)


def test_a_wrong_rope_base_in_the_mlx_config_is_caught(model, tokenizer, mlx_folder, tmp_path):
    """The comparisons above can see a wrong field: the same folder with another rope_theta moves the logits."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(mlx_folder):
        (bad / name).write_bytes((mlx_folder / name).read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["rope_theta"] = 500000.0
    (bad / "config.json").write_text(json.dumps(config))
    mlx_model, _ = mlx_lm.load(str(bad))
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(tokens) - mlx_logits(mlx_model, tokens)).abs().max() > 1e-2
