"""
The tokenizer: byte-level BPE trained by rustbpe, encoded by tiktoken, plus the chat special tokens.

This module is the only place that knows the special tokens and how a conversation becomes token
ids and a loss mask. Training the merges happens in Rust (rustbpe); encoding reuses tiktoken because
its encoder is fast and batches over threads. A trained tokenizer lives in one folder:

    tokenizer/tokenizer.json   pattern, every token's bytes in rank order, special tokens (plain JSON)
    tokenizer/token_bytes.npy  raw byte length of every token id, 0 for special tokens (int64)

Nothing here is pickled: loading a tokenizer parses data and never runs code.
"""

import base64
import hashlib
import json
import os

import numpy as np
import tiktoken
import torch

from nanochat.common import atomic_write, get_base_dir, print0

# Appended after the BPE ranks in this order: with n BPE tokens, SPECIAL_TOKENS[i] has id n + i.
SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the Python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output comes back inside these
    "<|output_end|>",
]

FORMAT_NAME = "nanochat-tokenizer"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
TRAIN_HINT = "run: python -m scripts.tok_train"


def validate_ranks(token_bytes_by_rank):
    """
    Cheap structural checks on a list of token bytes indexed by rank; raises ValueError on the first
    problem. The 256 single bytes come first (rank = byte value), no two tokens share bytes (tiktoken
    maps bytes -> rank, so a duplicate would silently shadow a rank), and every longer token splits
    into two tokens of lower rank, as a BPE merge must have produced it.
    """
    if len(token_bytes_by_rank) < 256:
        raise ValueError(f"only {len(token_bytes_by_rank)} tokens; the 256 byte tokens alone need 256")
    rank_of = {}
    for rank, token in enumerate(token_bytes_by_rank):
        if not isinstance(token, bytes) or len(token) == 0:
            raise ValueError(f"token {rank} is not a non-empty byte string")
        if rank < 256 and token != bytes([rank]):
            raise ValueError(f"token {rank} should be the single byte {rank}, got {token!r}")
        if token in rank_of:
            raise ValueError(f"token {rank} duplicates the bytes of token {rank_of[token]}: {token!r}")
        if rank >= 256:
            if len(token) < 2:
                raise ValueError(f"token {rank} is a single byte after the byte tokens: {token!r}")
            # rank_of holds only earlier tokens at this point
            if not any(token[:i] in rank_of and token[i:] in rank_of for i in range(1, len(token))):
                raise ValueError(f"token {rank} ({token!r}) is not a merge of two earlier tokens")
        rank_of[token] = rank


class RustBPETokenizer:
    """BPE ranks from rustbpe + the special tokens, encoded and decoded by a tiktoken.Encoding."""

    def __init__(self, pattern, token_bytes_by_rank):
        validate_ranks(token_bytes_by_rank)
        self._ranks = list(token_bytes_by_rank)  # rank -> bytes; the single source of truth
        n = len(self._ranks)
        special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanochat",
            pat_str=pattern,
            mergeable_ranks={token: rank for rank, token in enumerate(self._ranks)},
            special_tokens=special_tokens,
        )
        self._pattern = pattern
        self._special_tokens = special_tokens

    # -------------------------------------------------------------------------------------------
    # training, saving, loading

    @classmethod
    def train_from_iterator(cls, iterator, vocab_size, pattern=None, buffer_size=8192, num_threads=None):
        """Train on an iterator of str documents. vocab_size counts the 256 bytes, the merges and the specials."""
        smallest = 256 + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise ValueError(f"vocab_size={vocab_size} is too small: the 256 byte tokens and "
                             f"{len(SPECIAL_TOKENS)} special tokens alone need {smallest}")
        import rustbpe  # imported here so loading and using a saved tokenizer needs only tiktoken

        trainer = rustbpe.Tokenizer()
        bpe_size = vocab_size - len(SPECIAL_TOKENS)
        trainer.train_from_iterator(iterator, bpe_size, buffer_size=buffer_size, pattern=pattern,
                                    num_threads=num_threads)
        ranked = sorted(trainer.get_mergeable_ranks(), key=lambda pair: pair[1])
        if [rank for _, rank in ranked] != list(range(len(ranked))):
            raise RuntimeError("rustbpe returned non-contiguous ranks")
        if len(ranked) < bpe_size:
            # Tiny corpora run out of pairs to merge; the vocabulary is then just smaller.
            print0(f"note: the text only supported {len(ranked)} BPE tokens of the {bpe_size} asked for")
        return cls(trainer.get_pattern(), [bytes(token) for token, _ in ranked])

    def save(self, directory):
        """Write tokenizer.json and token_bytes.npy into `directory`, each atomically."""
        os.makedirs(directory, exist_ok=True)
        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self._pattern,
            # index = rank; base64 because tokens are arbitrary bytes, often not valid UTF-8
            "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token in self._ranks],
            "special_tokens": self._special_tokens,
        }
        with atomic_write(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump(payload, f, ensure_ascii=True)
        with atomic_write(os.path.join(directory, TOKEN_BYTES_FILE), "wb") as f:
            np.save(f, self.token_bytes().numpy(), allow_pickle=False)

    @classmethod
    def from_directory(cls, directory):
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path} — {TRAIN_HINT}")
        try:
            with open(path, "r", encoding="utf-8") as f:
                payload = json.load(f)
            if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
                raise ValueError(f"not a {FORMAT_NAME} file")
            if payload.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {payload.get('version')!r}, this code reads {FORMAT_VERSION}")
            pattern = payload["pattern"]
            if not isinstance(pattern, str):
                raise ValueError("pattern is not a string")
            ranks = [base64.b64decode(token, validate=True) for token in payload["mergeable_ranks"]]
            expected_specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
            if payload["special_tokens"] != expected_specials:
                raise ValueError(f"special tokens differ from this code's: {payload['special_tokens']!r}")
            return cls(pattern, ranks)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and binascii.Error are ValueErrors
            raise ValueError(f"corrupt tokenizer file {path}: {e!r} — {TRAIN_HINT}") from e

    # -------------------------------------------------------------------------------------------
    # vocabulary

    def get_vocab_size(self):
        return len(self._ranks) + len(SPECIAL_TOKENS)

    def fingerprint(self):
        """
        A short hash of everything that decides token ids (split pattern, ranks, special tokens).
        Checkpoints record it, so a model is never run with a tokenizer it was not trained with.
        """
        digest = hashlib.sha256()
        digest.update(self._pattern.encode("utf-8"))
        for token in self._ranks:
            digest.update(len(token).to_bytes(4, "little") + token)
        digest.update(json.dumps(self._special_tokens, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()[:16]

    def get_pattern(self):
        return self._pattern

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def get_mergeable_ranks(self):
        """{token bytes: rank} for the BPE part, as tiktoken takes it."""
        return {token: rank for rank, token in enumerate(self._ranks)}

    def encode_special(self, name):
        if name not in self._special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}")
        return self._special_tokens[name]

    def get_bos_token_id(self):
        return self._special_tokens["<|bos|>"]

    def id_to_bytes(self, token_id):
        """The raw bytes of one token (a special token's name as UTF-8)."""
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self):
        """
        torch.long tensor [vocab_size]: the raw byte length of every token id, 0 for special tokens,
        so bits-per-byte never counts them. Counted from the token's bytes, not a decoded string: a
        token holding part of a multi-byte UTF-8 character decodes to U+FFFD, 3 bytes, whatever its
        true length.
        """
        lengths = [len(token) for token in self._ranks] + [0] * len(SPECIAL_TOKENS)
        return torch.tensor(lengths, dtype=torch.long)

    # -------------------------------------------------------------------------------------------
    # encoding and decoding

    def _to_id(self, token):
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, (int, np.integer)) and 0 <= token < self.get_vocab_size():
            return int(token)
        raise ValueError(f"expected a special token name or an id below {self.get_vocab_size()}, got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """
        str -> list[int], or list[str] -> list[list[int]] (encoded on `num_threads` threads).
        prepend/append: a special token name or an id to add around each text. Text is always
        ordinary: a literal "<|bos|>" in it is encoded as the characters it spells.
        """
        before = [] if prepend is None else [self._to_id(prepend)]
        after = [] if append is None else [self._to_id(append)]
        if isinstance(text, str):
            return before + self.enc.encode_ordinary(text) + after
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [before + row + after for row in rows]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(list(ids))

    # -------------------------------------------------------------------------------------------
    # chat

    def render_conversation(self, conversation, max_tokens=2048):
        """
        A conversation -> (ids, mask), both lists of ints of equal length, cut to max_tokens.
        mask is 1 exactly on the tokens the assistant must learn to produce: its text, its tool
        calls (python_start/python_end included) and its <|assistant_end|>. Everything the model
        only reads (bos, user turns, <|assistant_start|>, tool outputs) is 0.
        """
        messages = self._checked_messages(conversation)
        ids, mask = [], []

        def add(token_ids, trained):
            ids.extend(token_ids)
            mask.extend([trained] * len(token_ids))

        special = self.encode_special
        add([self.get_bos_token_id()], 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add([special("<|user_start|>")], 0)
                add(self.encode(content), 0)
                add([special("<|user_end|>")], 0)
                continue
            add([special("<|assistant_start|>")], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if not isinstance(part, dict):
                    raise ValueError(f"assistant parts are dicts {{'type': ..., 'text': ...}}, got {part!r}")
                kind, part_text = part.get("type"), part.get("text")
                if not isinstance(part_text, str):
                    raise ValueError(f"assistant part {part!r} needs a str 'text'")
                if kind == "text":
                    add(self.encode(part_text), 1)
                elif kind == "python":
                    add([special("<|python_start|>")] + self.encode(part_text) + [special("<|python_end|>")], 1)
                elif kind == "python_output":
                    # the tool writes this at inference time; the model never has to predict it
                    add([special("<|output_start|>")] + self.encode(part_text) + [special("<|output_end|>")], 0)
                else:
                    raise ValueError(f"unknown assistant part type {kind!r} (text, python, python_output)")
            add([special("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """The conversation minus its last (assistant) message, ending in <|assistant_start|>, to prime generation."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is from the assistant")
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=None)
        return ids + [self.encode_special("<|assistant_start|>")]

    @staticmethod
    def _checked_messages(conversation):
        """The messages with a leading system message folded into the first user turn, roles checked."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError("a conversation is {'messages': [...]} with at least one message")
        messages = [dict(m) for m in messages]
        if messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ValueError("a system message must be followed by a user message")
            if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
                raise ValueError("system and user message contents must be str")
            # the model has no system role of its own: the system prompt becomes the head of the first user turn
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message.get("role") != expected:
                raise ValueError(f"message {i} has role {message.get('role')!r}, expected {expected!r}: "
                                 "after an optional system message, roles alternate user/assistant")
            content = message.get("content")
            if expected == "user" and not isinstance(content, str):
                raise ValueError(f"user message {i} content must be a str")
            if expected == "assistant" and not isinstance(content, (str, list)):
                raise ValueError(f"assistant message {i} content must be a str or a list of parts")
        return messages

    def visualize(self, ids, mask):
        """A debug view of a rendered conversation: trained tokens (mask 1) in green, the rest grey."""
        green, grey, reset = "\033[92m", "\033[90m", "\033[0m"
        pieces = []
        for token_id, trained in zip(ids, mask):
            piece = self.id_to_bytes(token_id).decode("utf-8", errors="replace")
            pieces.append(f"{green if trained else grey}{piece}{reset}")
        return "|".join(pieces)


def get_tokenizer():
    """The trained tokenizer in $NANOCHAT_BASE_DIR/tokenizer."""
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """token_bytes.npy of the trained tokenizer as a torch.long tensor on `device` (for bits-per-byte)."""
    path = os.path.join(get_base_dir(), "tokenizer", TOKEN_BYTES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token byte counts at {path} — {TRAIN_HINT}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"corrupt token byte counts file {path}: {e} — {TRAIN_HINT}") from e
    if array.ndim != 1 or array.dtype != np.int64:
        raise ValueError(f"corrupt token byte counts file {path}: shape {array.shape}, dtype {array.dtype} — {TRAIN_HINT}")
    return torch.from_numpy(array).to(device)
