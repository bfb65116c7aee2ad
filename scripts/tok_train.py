"""
Train the BPE tokenizer on the pretraining shards and save it to $NANOCHAT_BASE_DIR/tokenizer/.

    python -m scripts.tok_train --vocab-size 32768 --max-chars 2000000000

Text streams from the train split one shard batch at a time, so memory stays flat however many
characters are read; rustbpe counts the pre-split chunks in parallel and then learns the merges.
"""

import argparse
import os
import resource
import sys
import time

from nanochat.common import get_base_dir, print0
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer


def text_iterator(max_chars, doc_cap, stats):
    """
    Documents of the train split, each cropped to doc_cap chars, until max_chars chars in total.
    stats["chars"] / stats["docs"] count what was yielded, for the throughput line.
    """
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            # a few huge documents (logs, tables) would otherwise dominate the pair counts
            doc = doc[:doc_cap]
            stats["chars"] += len(doc)
            stats["docs"] += 1
            yield doc
            if stats["chars"] >= max_chars:
                return


def peak_memory_mib():
    """Peak resident memory of this process; ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main():
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer on the pretraining shards.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                        help="stop after this many characters of training text")
    parser.add_argument("--doc-cap", type=int, default=10_000,
                        help="crop each document to this many characters")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help="vocabulary size including the 256 byte tokens and the special tokens")
    args = parser.parse_args()
    print0(f"flags: {vars(args)}")
    for flag in ("max_chars", "doc_cap"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")

    stats = {"chars": 0, "docs": 0}
    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(args.max_chars, args.doc_cap, stats),
                                                     args.vocab_size)
    train_time = time.time() - t0
    chars = stats["chars"]
    print0(f"trained on {chars:,} chars ({stats['docs']:,} documents) in {train_time:.1f}s "
           f"({chars / max(train_time, 1e-9):,.0f} chars/s), peak memory {peak_memory_mib():,.0f} MiB")

    directory = os.path.join(get_base_dir(), "tokenizer")
    tokenizer.save(directory)
    print0(f"saved tokenizer (vocab size {tokenizer.get_vocab_size():,}) to {directory}/ "
           f"(tokenizer.json, token_bytes.npy)")

    get_report().log("Tokenizer training", [vars(args), {
        "vocab size": tokenizer.get_vocab_size(), "training chars": chars, "documents": stats["docs"],
        "train time (s)": train_time, "chars/s": chars / max(train_time, 1e-9), "peak memory (MiB)": peak_memory_mib(),
        "fingerprint": tokenizer.fingerprint()}])

    # A sanity check a human can read: a sentence, its tokens, and the round trip.
    sample = "Hello world! The year 2025 has 365 days. 안녕하세요 🙂"
    ids = tokenizer.encode(sample)
    if tokenizer.decode(ids) != sample:
        raise RuntimeError("the trained tokenizer does not round-trip a sample sentence")
    print0(f"sample: {len(sample.encode('utf-8'))} bytes -> {len(ids)} tokens: "
           f"{[tokenizer.id_to_bytes(i).decode('utf-8', errors='replace') for i in ids]}")


if __name__ == "__main__":
    main()
