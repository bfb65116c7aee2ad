"""
Building pretraining shards out of local text: .txt/.raw (books, articles; a Project Gutenberg
header and footer dropped), .jsonl records with a "text" field, .parquet files with a "text" column,
each .gz-compressed too. Documents are shuffled (seeded), a val share split off, and written as
shards with index.json and SHA256SUMS, named and laid out as nanochat/dataset.py reads them:

    python -m nanochat.dataset prepare --input PATH ...

A folder made this way is itself a mirror: serve it over http or point NANOCHAT_DATA_URL at file://.
"""

import gzip
import hashlib
import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_write, print0
from nanochat.dataset import INDEX_FILE, SHARD_RE, SUMS_FILE, data_dir, shard_name

DOC_CHARS = 4000  # plain-text files (books) are cut into documents of about this many chars
INPUT_EXTENSIONS = (".txt", ".txt.gz", ".raw", ".raw.gz", ".jsonl", ".jsonl.gz", ".parquet")

# Project Gutenberg eBooks wrap the book in a license header and footer between these lines
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.M | re.I)


def _paragraphs(text, doc_chars):
    """Blank-line-separated paragraphs; one longer than doc_chars is cut at line breaks, then at spaces."""
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip()
        if len(paragraph) <= doc_chars:
            if paragraph:
                yield paragraph
            continue
        for line in paragraph.split("\n"):
            line = line.strip()
            while len(line) > doc_chars:
                cut = line.rfind(" ", 0, doc_chars)
                cut = cut if cut > 0 else doc_chars
                yield line[:cut]
                line = line[cut:].strip()
            if line:
                yield line


def split_text(text, doc_chars=DOC_CHARS):
    """
    Documents of a plain-text file: the Gutenberg header/footer dropped when the markers are there,
    paragraphs (separated by blank lines) packed in order into documents of at most ~doc_chars, so a
    book becomes readable chunks rather than one huge document or thousands of one-line ones. A
    paragraph longer than doc_chars (a file of one article per line, say) is cut at line breaks,
    and a line longer than that at spaces.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if start := GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := GUTENBERG_END.search(text):
        text = text[:end.start()]
    doc, size = [], 0
    for paragraph in _paragraphs(text, doc_chars):
        if doc and size + 2 + len(paragraph) > doc_chars:
            yield "\n\n".join(doc)
            doc, size = [], 0
        size += len(paragraph) + (2 if doc else 0)
        doc.append(paragraph)
    if doc:
        yield "\n\n".join(doc)


def _read_bytes(path):
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        return f.read()


def read_documents(path):
    """The non-empty documents of one input file, in file order."""
    lower = path.lower()
    if lower.endswith((".jsonl", ".jsonl.gz")):
        for lineno, line in enumerate(_read_bytes(path).decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e!r})") from e
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: 'text' is a {type(text).__name__}, not a string")
            if text.strip():
                yield text
    elif lower.endswith(".parquet"):
        pf = pq.ParquetFile(path)
        for j in range(pf.num_row_groups):
            yield from (t for t in pf.read_row_group(j, columns=["text"]).column("text").to_pylist() if t and t.strip())
    elif lower.endswith((".txt", ".txt.gz", ".raw", ".raw.gz")):
        data = _read_bytes(path)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:  # older Gutenberg books are Latin-1; that decoding never fails
            print0(f"note: {path} is not UTF-8, reading it as Latin-1")
            text = data.decode("latin-1")
        yield from split_text(text)
    else:
        raise ValueError(f"{path}: cannot read this kind of file (want one of {', '.join(INPUT_EXTENSIONS)})")


def input_files(inputs):
    """Files named, plus those under folders named (walked recursively in sorted order)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()  # os.walk visits subfolders in this list's order
                found += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(INPUT_EXTENSIONS)]
            if not found:
                raise ValueError(f"no {', '.join(INPUT_EXTENSIONS)} files under {path}")
            files += found
        elif os.path.isfile(path):
            if not path.lower().endswith(INPUT_EXTENSIONS):
                raise ValueError(f"{path}: cannot read this kind of file (want one of {', '.join(INPUT_EXTENSIONS)})")
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def encode_shard(docs):
    """
    The parquet bytes of one shard. A row group is one batch for iter_batches and the unit that
    ranks split between them, so: ~1024 docs each, but at least ~8 per shard so that small shards
    (tests, tiny corpora) still spread over several ranks. Page CRCs let a download catch a flipped
    byte without SHA256SUMS; statistics are left out (min/max of documents are useless and sit
    outside the CRCs). Same docs -> same bytes.
    """
    row_group_size = min(1024, max(1, len(docs) // 8))
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd", use_dictionary=False,
                   write_statistics=False, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _group_by_chars(docs, limit):
    groups, size = [[]], 0
    for doc in docs:
        if size >= limit:
            groups.append([])
            size = 0
        groups[-1].append(doc)
        size += len(doc)
    return groups


def prepare(inputs, shard_chars=100_000_000, val_chars=None, seed=0, out_dir=None):
    """
    Build shards from local files (see INPUT_EXTENSIONS) into out_dir (default data_dir()),
    replacing the shards, index.json and SHA256SUMS already there. Documents are shuffled with
    `seed`; the first val_chars worth (default 1% of all, at least one document) become val.
    Train shards come first (shard_00000...), val shards are numbered after them. Returns a summary.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if shard_chars < 1 or (val_chars is not None and val_chars < 1):
        raise ValueError("shard_chars and val_chars must be positive")
    docs = []
    for path in input_files(inputs):
        before = len(docs)
        docs.extend(read_documents(path))
        print0(f"{path}: {len(docs) - before:,} documents")
    if len(docs) < 2:
        raise ValueError(f"found {len(docs)} documents in {inputs}; need at least 2 (one for val, one for train)")
    # a str seed is hashed (sha512) into the generator's state: every seed gives its own order,
    # while int seeds 1 and -1 would give the same one (Random uses abs() of an int)
    random.Random(f"nanochat-prepare-{seed}").shuffle(docs)
    target = max(1, sum(map(len, docs)) // 100) if val_chars is None else val_chars
    n_val, chars = 0, 0
    while n_val == 0 or (chars < target and n_val < len(docs)):
        chars += len(docs[n_val])
        n_val += 1
    splits = {"train": docs[n_val:], "val": docs[:n_val]}
    if not splits["train"]:
        raise ValueError(f"val_chars={val_chars} takes all {len(docs)} documents; none would be left for train")

    out_dir = out_dir or data_dir()
    os.makedirs(out_dir, exist_ok=True)
    old = sorted(n for n in os.listdir(out_dir) if SHARD_RE.fullmatch(n) or n in (INDEX_FILE, SUMS_FILE))
    for name in old:
        os.remove(os.path.join(out_dir, name))
    if old:
        print0(f"removed {len(old)} old files from {out_dir} ({old[0]} ... {old[-1]})")
    groups = {split: _group_by_chars(splits[split], shard_chars) for split in splits}
    names = {"train": [shard_name(i) for i in range(len(groups["train"]))]}
    names["val"] = [shard_name(len(names["train"]) + i) for i in range(len(groups["val"]))]
    # the index goes first: a crash midway then leaves an index naming missing shards (a loud
    # error in list_shards), never shards that the remote convention would silently mis-split
    with atomic_write(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(names, f, indent=1)
    sums = []
    for split in ("train", "val"):
        for name, group in zip(names[split], groups[split]):
            data = encode_shard(group)
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
            with atomic_write(os.path.join(out_dir, name)) as f:
                f.write(data)
    with atomic_write(os.path.join(out_dir, SUMS_FILE), "w") as f:
        f.writelines(sums)
    summary = {split: {"shards": names[split], "docs": len(splits[split]), "chars": sum(map(len, splits[split]))}
               for split in ("train", "val")}
    for split, s in summary.items():
        print0(f"{split}: {s['docs']:,} documents, {s['chars']:,} chars in {len(s['shards'])} shards "
               f"({s['shards'][0]} .. {s['shards'][-1]})")
    print0(f"wrote {out_dir} (also usable as a mirror: NANOCHAT_DATA_URL=file://{os.path.abspath(out_dir)})")
    return {"out_dir": out_dir, **summary}
