"""scripts.chat_eval: letter scoring proven with oracle models, and the script end to end on a real checkpoint."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, TEST_DATA, shakespeare
from nanochat.task_eval import run_categorical
from test_chat_cli import make_chat_checkpoint


class LetterOracle(torch.nn.Module):
    """Knows the gold letter of every prompt; puts its logit on top (or, reversed, at the bottom)."""

    def __init__(self, tokenizer, gold_by_prompt, reverse=False):
        super().__init__()
        self.tokenizer, self.gold_by_prompt, self.reverse = tokenizer, gold_by_prompt, reverse
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab = tokenizer.get_vocab_size()

    def get_device(self):
        return self.anchor.device

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        pad = self.tokenizer.get_bos_token_id()
        for b in range(B):
            row = idx[b].tolist()
            while row and row[-1] == pad:  # right padding
                row.pop()
            gold = self.tokenizer.encode(self.gold_by_prompt[tuple(row)])[0]
            logits[b, len(row) - 1, gold] = -5.0 if self.reverse else 5.0
        return logits


@pytest.mark.parametrize("reverse", [False, True])
def test_categorical_scoring_with_oracles(monkeypatch, reverse):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", TEST_DATA)
    from nanochat.tokenizer import RustBPETokenizer
    from tasks.arc import ARC
    text = shakespeare(50_000)
    tok = RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 300)
    task = ARC("ARC-Challenge", "test")
    indices = list(range(0, len(task), 2))
    gold = {tuple(tok.render_for_completion(task[i])): task[i]["messages"][-1]["content"] for i in indices}
    model = LetterOracle(tok, gold, reverse=reverse)
    correct = run_categorical(task, model, tok, indices, batch_size=5, autocast=torch.autocast("cpu", enabled=False))
    assert correct == (0 if reverse else len(indices))


def test_chat_eval_script_writes_its_report_section(base_dir):
    make_chat_checkpoint(base_dir)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_LOCAL_DATA=TEST_DATA)
    result = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "sft", "-a", "ARC-Easy|MMLU|GSM8K|SpellingBee",
                             "--max-problems", "6", "--max-new-tokens", "8", "--dtype", "float32"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ChatCORE over 4 task(s)" in result.stdout
    section = open(os.path.join(base_dir, "report", "chat-evaluation-sft.md"), encoding="utf-8").read()
    for metric in ("ARC-Easy", "MMLU", "GSM8K", "SpellingBee", "ChatCORE"):
        assert re.search(rf"^- {metric}: [-0-9.]+$", section, re.M), (metric, section)
    bad = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-a", "NoSuchTask"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown task" in bad.stderr


def test_humaneval_is_skipped_and_named_when_the_sandbox_is_unavailable(base_dir, monkeypatch, capsys):
    """Fail closed, but only for the task that needs the sandbox: the others still count."""
    from nanochat import sandbox
    from scripts import chat_eval

    def no_namespaces():
        raise sandbox.SandboxUnavailable("unshare: Operation not permitted")
    make_chat_checkpoint(base_dir)
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", TEST_DATA)
    monkeypatch.delenv(sandbox.OPT_IN_ENV, raising=False)
    monkeypatch.setattr(sandbox, "_probe", no_namespaces)
    monkeypatch.setattr(sandbox, "_probe_ok", False)
    chat_eval.main(["-i", "sft", "-a", "ARC-Easy|HumanEval", "--max-problems", "2", "--max-new-tokens", "4",
                    "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "HumanEval: skipped" in out and "Operation not permitted" in out and "ChatCORE over 1 task(s) (ARC-Easy)" in out
    section = open(os.path.join(base_dir, "report", "chat-evaluation-sft.md"), encoding="utf-8").read()
    assert "- HumanEval skipped: cannot isolate" in section and not re.search(r"^- HumanEval: ", section, re.M)
