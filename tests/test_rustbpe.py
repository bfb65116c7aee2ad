"""
rustbpe against independent references: a slow pure-Python BPE trainer (below) for the merges, the
`regex` module for the pre-split, plus determinism, streaming memory, error handling, and proof that
`import rustbpe` is this project's build.
"""

import collections
import importlib.metadata
import os
import random
import subprocess
import sys

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from conftest import REPO_ROOT, read_text, wiki_articles


# -----------------------------------------------------------------------------
# The slow reference: recount every pair after every merge; same documented tie-break (highest
# count, then smallest (left, right) ids); a merge that would duplicate an existing token's bytes
# is skipped.

def reference_train(texts, vocab_size, pattern=rustbpe.DEFAULT_PATTERN):
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(regex.findall(pattern, text))
    words = [[list(chunk.encode("utf-8")), n] for chunk, n in chunk_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges, banned = [], set()
    while len(vocab) < vocab_size:
        pairs = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        for pair in banned:
            pairs.pop(pair, None)
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        new_bytes = vocab[a] + vocab[b]
        if new_bytes in known:
            banned.add((a, b))
            continue
        new_id = len(vocab)
        vocab.append(new_bytes)
        known.add(new_bytes)
        merges.append((a, b))
        for word in words:
            ids, out, i = word[0], [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            word[0] = out
    return merges, vocab


def corpora():
    """Small corpora that stress different parts of the pre-split and the merge bookkeeping."""
    rng = random.Random(1234)
    tricky = list("aasstl'LveRD ") + ["  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "ſ", "12", "3456", "٣",
                                      "!!", "?", "...", "中文", "한국어", "日本語", "😀", "👍🏽", "👨‍👩‍👧", "é", "e\u0301"]
    return {
        "ascii_prose": [read_text("pretrain", "tinyshakespeare", "input.txt", max_chars=30_000)],
        "heavy_whitespace": ["def f(x):\n\n    \n\t\treturn   x  \n\n\n   \r\n  end  " * 40, "   \n  " * 30 + "a  b   c"],
        "code": [open(os.path.join(REPO_ROOT, "nanochat", "common.py"), encoding="utf-8").read(),
                 open(os.path.join(REPO_ROOT, "rustbpe", "src", "train.rs"), encoding="utf-8").read()[:12_000]],
        "cjk": ["我们今天去公园散步，天气很好。我们明天还去公园吗？" * 20,
                "日本語のテキストです。ひらがなとカタカナと漢字。" * 20, "한국어 문장입니다. 안녕하세요, 반갑습니다. " * 20],
        "emoji": ["I love 🍕 and 🍣!! 😀😀😀 👍🏽👍🏽 👨‍👩‍👧 family 🇫🇷🇫🇷 " * 25],
        "mixed_scripts": [wiki_articles()[0][:8_000]
                          + " Ελληνικά русский текст العربية עברית हिन्दी 12345 6789 " * 10,
                          "".join(rng.choice(tricky) for _ in range(4000))],
    }


@pytest.mark.parametrize("name", list(corpora().keys()))
def test_merges_identical_to_python_reference(name):
    texts = corpora()[name]
    vocab_size = 256 + 120
    expected_merges, expected_vocab = reference_train(texts, vocab_size)
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size)
    assert len(expected_merges) > 20, "corpus too small to exercise merging"
    assert tok.get_merges() == expected_merges
    assert [b for b, _ in tok.get_mergeable_ranks()] == expected_vocab
    assert [r for _, r in tok.get_mergeable_ranks()] == list(range(len(expected_vocab)))


def test_results_independent_of_thread_count_and_batch_size():
    texts = [line for line in read_text("pretrain", "tinyshakespeare", "input.txt", max_chars=200_000).split("\n\n")]
    results = []
    for num_threads, buffer_size in [(1, 1), (1, 10_000), (2, 7), (2, 64), (None, 8192)]:
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), 256 + 400, buffer_size=buffer_size, num_threads=num_threads)
        results.append(tok.get_merges())
    assert len(results[0]) == 400
    assert all(r == results[0] for r in results)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cn")), max_size=60))
def test_fast_pre_split_equals_the_regex_module(text):
    assert rustbpe.split_text(text) == regex.findall(rustbpe.DEFAULT_PATTERN, text)
    assert rustbpe.split_text(text, rustbpe.GPT4_PATTERN) == regex.findall(rustbpe.GPT4_PATTERN, text)


def test_custom_pattern_goes_through_the_general_regex_path():
    assert rustbpe.split_text("ab12 cd", r"\d+|[a-z]+") == ["ab", "12", "cd"]
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(["ab ab ab"], 257, pattern=r"[a-z]+")
    assert tok.get_pattern() == r"[a-z]+"
    assert tok.get_merges() == [(ord("a"), ord("b"))]


def test_encode_applies_merges_in_rank_order():
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(["hello hello hello world"], 256 + 6)
    ids = tok.encode("hello")
    ranks = dict(tok.get_mergeable_ranks())
    vocab = {r: b for b, r in ranks.items()}
    assert b"".join(vocab[i] for i in ids) == b"hello"
    assert len(ids) < 5


@pytest.mark.parametrize("call, error, message", [
    (lambda t: t.train_from_iterator(["abc"], 255), ValueError, "at least 256"),
    (lambda t: t.train_from_iterator(iter([]), 300), ValueError, "empty iterator"),
    (lambda t: t.train_from_iterator(["abc"], 300, pattern="(unclosed"), ValueError, "invalid split pattern"),
    (lambda t: t.train_from_iterator(["abc", 5], 300), TypeError, "expects str items, got int"),
    (lambda t: t.train_from_iterator("just one string", 300), TypeError, "not a single string"),
])
def test_bad_input_gives_a_python_exception_not_a_panic(call, error, message):
    with pytest.raises(error, match=message):
        call(rustbpe.Tokenizer())


def test_exception_inside_the_iterator_propagates():
    def docs():
        yield "some text"
        raise OSError("disk went away")
    with pytest.raises(OSError, match="disk went away"):
        rustbpe.Tokenizer().train_from_iterator(docs(), 300, buffer_size=1)


def test_memory_grows_with_distinct_chunks_not_corpus_size():
    # ~200 MB of text streamed through the trainer, made of few distinct chunks: if the trainer kept
    # the text (or every chunk occurrence), peak memory would grow by hundreds of MB.
    code = """
import resource, rustbpe
doc = " ".join(f"word{i % 500}" for i in range(20_000))  # ~190 KB, 500 distinct chunks
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tok = rustbpe.Tokenizer()
tok.train_from_iterator((doc for _ in range(1_000)), 300, buffer_size=64)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    growth_mb = int(out.stdout.strip())
    assert growth_mb < 60, f"peak RSS grew by {growth_mb} MB while streaming ~190 MB of text"


def test_import_rustbpe_is_this_projects_build():
    assert rustbpe.BUILD_MANIFEST_DIR == os.path.join(REPO_ROOT, "rustbpe")
    cargo_toml = open(os.path.join(REPO_ROOT, "rustbpe", "Cargo.toml")).read()
    assert f'version = "{rustbpe.__version__}"' in cargo_toml
    # no same-named distribution from a package index is installed
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("rustbpe")
