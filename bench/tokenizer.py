"""
Tokenizer benchmark: our rustbpe trainer vs HuggingFace `tokenizers` on the same real text, same
vocab size, same split pattern, in one run; then encode throughput of our tiktoken export vs
`tokenizers`. Each measurement runs in a fresh subprocess so peak RSS and thread counts are its own.

    python -m bench.tokenizer                 # >= 50 MB of Gutenberg + web/wiki text, vocab 32768
    python -m bench.tokenizer --mb 10         # quicker

Prints a markdown table; paste it into bench/README.md.
"""

import argparse
import gzip
import glob
import json
import os
import resource
import subprocess
import sys
import time

from bench import data_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = None  # the full copy's pretrain/ (bench.data_dir)


def load_documents(data_dir, max_bytes, doc_chars=4000):
    """Real text cut into ~doc_chars documents at paragraph breaks, up to max_bytes of UTF-8."""
    paths = sorted(glob.glob(os.path.join(data_dir, "gutenberg", "*.txt.gz")))
    paths += [os.path.join(data_dir, p) for p in ("wiki_demo/wiki_demo.txt", "wikitext-2-raw/wiki.test.raw",
                                                  "tinyshakespeare/input.txt")]
    docs, total = [], 0
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        current = []
        size = 0
        for para in text.split("\n\n"):
            current.append(para)
            size += len(para) + 2
            if size >= doc_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n\n".join(current))
        total = sum(len(d.encode("utf-8")) for d in docs)
        if total >= max_bytes:
            break
    # Hold out every 50th document to measure compression on text neither trainer saw.
    train = [d for i, d in enumerate(docs) if i % 50 != 0]
    heldout = [d for i, d in enumerate(docs) if i % 50 == 0]
    return train, heldout


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    """One measurement in this fresh process; prints one JSON line."""
    train_docs, heldout = load_documents(args.data, args.mb * 1_000_000)
    nbytes = sum(len(d.encode("utf-8")) for d in train_docs)
    nchars = sum(len(d) for d in train_docs)
    rss_loaded = peak_rss_mb()
    result = {"bytes": nbytes, "chars": nchars, "rss_loaded_mb": rss_loaded}
    import rustbpe
    if args.worker == "train-ours":
        t0 = time.perf_counter()
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(train_docs), args.vocab_size)
        result["seconds"] = time.perf_counter() - t0
        ranks = {b: r for b, r in tok.get_mergeable_ranks()}
        import tiktoken
        enc = tiktoken.Encoding("bench", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={})
        result["heldout_tokens"] = sum(len(x) for x in enc.encode_ordinary_batch(heldout))
        with open(args.out, "w") as f:
            json.dump({"pattern": tok.get_pattern(), "ranks": [[b.hex(), r] for b, r in ranks.items()]}, f)
    elif args.worker == "train-hf":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
        t0 = time.perf_counter()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rustbpe.DEFAULT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, show_progress=False, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0)
        tok.train_from_iterator(iter(train_docs), trainer=trainer, length=len(train_docs))
        result["seconds"] = time.perf_counter() - t0
        result["heldout_tokens"] = sum(len(e.ids) for e in tok.encode_batch(heldout))
        tok.save(args.out)
    elif args.worker in ("encode-ours", "encode-hf"):
        threads = int(os.environ["RAYON_NUM_THREADS"])
        text = train_docs[: max(1, len(train_docs) // 4)]  # ~1/4 of the corpus
        result["bytes"] = sum(len(d.encode("utf-8")) for d in text)
        if args.worker == "encode-ours":
            import tiktoken
            with open(args.model) as f:
                saved = json.load(f)
            ranks = {bytes.fromhex(h): r for h, r in saved["ranks"]}
            enc = tiktoken.Encoding("bench", pat_str=saved["pattern"], mergeable_ranks=ranks, special_tokens={})
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(text, num_threads=threads)
        else:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(args.model)
            t0 = time.perf_counter()
            tok.encode_batch(text)
        result["seconds"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def run_worker(kind, args, threads=None, model=None, out=None):
    cmd = [sys.executable, "-m", "bench.tokenizer", "--worker", kind, "--mb", str(args.mb),
           "--vocab-size", str(args.vocab_size), "--data", args.data]
    if model:
        cmd += ["--model", model]
    if out:
        cmd += ["--out", out]
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
        env["TOKENIZERS_PARALLELISM"] = "true"
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=55, help="megabytes of training text (UTF-8)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size incl. the 256 bytes")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="folder laid out like shared/data/pretrain (default: $NANOCHAT_LOCAL_DATA/pretrain or ../shared/data/pretrain)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.data is None:
        args.data = os.path.join(data_dir(), "pretrain")
    if args.worker:
        return worker(args)

    import tempfile
    tmp = tempfile.mkdtemp(prefix="bench_tok_")
    ours_path, hf_path = os.path.join(tmp, "ours.json"), os.path.join(tmp, "hf.json")
    print(f"training both on {args.mb} MB, vocab {args.vocab_size}, {os.cpu_count()} cores ...", flush=True)
    ours = run_worker("train-ours", args, out=ours_path)
    hf = run_worker("train-hf", args, out=hf_path)
    _, heldout = load_documents(args.data, args.mb * 1_000_000)
    heldout_bytes = sum(len(d.encode("utf-8")) for d in heldout)
    print(f"\ncorpus: {ours['bytes'] / 1e6:.1f} MB, {ours['chars'] / 1e6:.1f} M chars; held out: "
          f"{heldout_bytes / 1e6:.1f} MB; RSS with the text loaded: {ours['rss_loaded_mb']:.0f} MB\n")
    print("| trainer | wall s | M chars/s | peak RSS MB | held-out bytes/token |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("rustbpe (ours)", ours), ("HF tokenizers", hf)):
        r["bpt"] = heldout_bytes / r["heldout_tokens"]
        print(f"| {name} | {r['seconds']:.1f} | {r['chars'] / r['seconds'] / 1e6:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['bpt']:.4f} |")
    print(f"\ntraining speed-up (HF time / ours): {hf['seconds'] / ours['seconds']:.2f}x; "
          f"peak RSS ours/HF: {ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}; "
          f"bytes/token ours vs HF: {(ours['bpt'] / hf['bpt'] - 1) * 100:+.2f}%\n")
    print("| encoder | threads | MB/s |")
    print("|---|---:|---:|")
    speeds = {}
    for threads in (1, 2):
        for kind, model, name in (("encode-ours", ours_path, "tiktoken export of ours"),
                                  ("encode-hf", hf_path, "HF tokenizers")):
            r = run_worker(kind, args, threads=threads, model=model)
            speeds[(kind, threads)] = r["bytes"] / r["seconds"] / 1e6
            print(f"| {name} | {threads} | {speeds[(kind, threads)]:.1f} |")
    for threads in (1, 2):
        print(f"encode ratio at {threads} thread(s): {speeds[('encode-ours', threads)] / speeds[('encode-hf', threads)]:.2f}x")


if __name__ == "__main__":
    main()
