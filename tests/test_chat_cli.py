"""scripts.chat_cli as a user runs it: a real checkpoint in a temp base dir, one-shot and interactive."""

import os
import subprocess
import sys
from dataclasses import asdict

import torch

from conftest import REPO_ROOT, shakespeare
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer


def make_chat_checkpoint(base_dir, source_dir="chatsft_checkpoints"):
    text = shakespeare(100_000)
    tok = RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 400)
    tok.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_checkpoint(os.path.join(base_dir, source_dir, "d2"), 5, model, [], {"model_config": asdict(model.config)})
    return model, tok


def run_cli(base_dir, *flags, stdin=None):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *flags], cwd=REPO_ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_one_shot_prints_the_engines_greedy_reply(base_dir):
    model, tok = make_chat_checkpoint(base_dir)
    result = run_cli(base_dir, "-p", "Hello there", "-t", "0", "-m", "12")
    assert result.returncode == 0, result.stderr
    conversation = {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": ""}]}
    prompt = tok.render_for_completion(conversation)
    rows, _ = Engine(model.eval(), tok).generate_batch(prompt, max_tokens=12, temperature=0)
    expected = tok.decode(rows[0][len(prompt):])
    assert expected and result.stdout.strip().endswith(expected.strip())


def test_interactive_turns_and_exit(base_dir):
    make_chat_checkpoint(base_dir)
    result = run_cli(base_dir, "-t", "0", "-m", "5", stdin="hi\nclear\nagain\nquit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Assistant:") == 2 and "(new conversation)" in result.stdout


def test_missing_checkpoint_is_a_clear_error(base_dir):
    result = run_cli(base_dir, "-i", "rl", "-p", "hi")
    assert result.returncode == 1
    assert "no rl checkpoints" in result.stderr and "scripts.chat_rl" in result.stderr
