"""
How tests/data was cut: real rows copied from a full local copy (a folder laid out like shared/data,
whose MANIFEST.md gives every file's source and license). The test suite reads only the output of
this script, which is committed; re-run it only to change what the suite gets:

    python tests/data/make_subset.py --full ../shared/data --out tests/data

Rows are copied as they are (the first N lines of a file, or every Nth word of the word list);
files are gzipped where the loaders accept gzip. Only MIT, public-domain/Unlicense and CC-BY(-SA)
material is taken. `subset.json` tells the task loaders that this folder is a deliberate subset and
how many rows each file has, so their "incomplete file" check still catches a truncated copy.
"""

import argparse
import csv
import gzip
import io
import json
import os
import shutil
import zipfile

# (folder, file, rows kept) for the jsonl task files; gzipped in the output
JSONL_ROWS = [
    ("gsm8k", "train.jsonl", 200), ("gsm8k", "test.jsonl", 300),
    ("arc/ARC-Easy", "train.jsonl", 60), ("arc/ARC-Easy", "dev.jsonl", 20), ("arc/ARC-Easy", "test.jsonl", 60),
    ("arc/ARC-Challenge", "train.jsonl", 60), ("arc/ARC-Challenge", "dev.jsonl", 20),
    ("arc/ARC-Challenge", "test.jsonl", 60),
]
# CORE task files (plain jsonl, as the eval bundle has them): one or two per task type, licenses known
CORE_ROWS = [
    ("core/world_knowledge", "arc_easy.jsonl", 40),                # multiple_choice, 10 shots (CC BY-SA 4.0)
    ("core/reading_comprehension", "boolq.jsonl", 40),             # multiple_choice, 10 shots (CC BY-SA 3.0)
    ("core/language_understanding", "winograd_wsc.jsonl", 40),     # schema, 0 shots (CC BY 4.0)
    ("core/language_understanding", "lambada_openai.jsonl", 40),   # language_modeling, 0 shots (CC BY 4.0)
]
MMLU_SUBJECTS = ["astronomy", "high_school_psychology", "miscellaneous"]
MMLU_ROWS = 25
MMLU_HEADERED = ("moral_scenarios", 25)   # the headered layout of test_5_subjects_haechan
MMLU_AUX = [("science_elementary.csv", 60), ("science_middle.csv", 60)]
HH_RLHF_ROWS = 60
WORD_EVERY = 25                           # every 25th word of words_alpha.txt (~14.8k words)
# pretraining text: (source path, output path, characters kept or None for the whole file)
PRETRAIN = [
    ("pretrain/tinyshakespeare/input.txt", "pretrain/tinyshakespeare/input.txt.gz", 400_000),
    ("pretrain/wikitext-2-raw/wiki.test.raw", "pretrain/wikitext-2-raw/wiki.test.raw.gz", 300_000),
    ("pretrain/gutenberg/pg42.txt.gz", "pretrain/gutenberg/pg42.txt.gz", None),         # whole book, PG header/footer
    ("pretrain/gutenberg/1342-0.txt.gz", "pretrain/gutenberg/1342-0.txt.gz", 200_000),
]
# Wikipedia articles (CC BY-SA; one per line in the source) as jsonl {"text": article}, the layout of
# web-text samples such as C4's (C4 itself is ODC-BY, so it stays out)
WIKI_ARTICLES = 12


def read_bytes(path):
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def write(path, data, compress):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if compress:
        data = gzip.compress(data, compresslevel=9, mtime=0)  # mtime=0: the same input gives the same bytes
    with open(path, "wb") as f:
        f.write(data)


def copy(source, target):
    """A whole file, byte for byte."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target)


def first_lines(data, n):
    """The first n lines (line endings kept), as bytes."""
    lines = data.splitlines(keepends=True)
    if len(lines) < n:
        raise ValueError(f"wanted {n} lines, the file has {len(lines)}")
    return b"".join(lines[:n])


def prefix_at_line(data, chars):
    """The longest run of whole lines with at most `chars` characters."""
    text = data.decode("utf-8-sig" if data.startswith(b"\xef\xbb\xbf") else "utf-8")
    cut = text.rfind("\n", 0, chars) + 1
    return data[:len(text[:cut].encode("utf-8")) + (3 if data.startswith(b"\xef\xbb\xbf") else 0)]


def first_csv_rows(data, n):
    """The bytes of the first n csv rows exactly as in the file (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    rows = 0
    for _ in reader:
        rows += 1
        if rows == n:
            break
    return first_lines(data, reader.line_num), rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", required=True, help="the full copy (laid out like shared/data)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args()
    src = lambda *p: os.path.join(args.full, *p)  # noqa: E731
    dst = lambda *p: os.path.join(args.out, *p)   # noqa: E731
    counts = {}

    for folder, name, n in JSONL_ROWS:
        write(dst(folder, name + ".gz"), first_lines(read_bytes(src(folder, name)), n), True)
        counts[f"{folder}/{name}"] = n
    for folder, name, n in CORE_ROWS:
        write(dst(folder, name), first_lines(read_bytes(src(folder, name)), n), False)
    copy(src("humaneval", "HumanEval.jsonl.gz"), dst("humaneval", "HumanEval.jsonl.gz"))

    # MMLU: the original headerless layout, and the headered one for the subjects it supplies
    for split, folder in (("test", "test"), ("val", "val"), ("dev", "dev")):
        total = 0
        for subject in MMLU_SUBJECTS:
            data, n = first_csv_rows(read_bytes(src("mmlu", folder, f"{subject}_{split}.csv")), MMLU_ROWS)
            write(dst("mmlu", folder, f"{subject}_{split}.csv"), data, False)
            total += n
        if split == "test":
            subject, n = MMLU_HEADERED
            data, rows = first_csv_rows(read_bytes(src("mmlu", "test_5_subjects_haechan", f"{subject}_test.csv")), n + 1)
            write(dst("mmlu", "test_5_subjects_haechan", f"{subject}_test.csv"), data, False)  # header + n rows
            total += rows - 1
        counts[f"mmlu/{folder}"] = total
    total = 0
    for name, n in MMLU_AUX:
        data, rows = first_csv_rows(read_bytes(src("mmlu", "auxiliary_train", name)), n)
        write(dst("mmlu", "auxiliary_train", name), data, False)
        total += rows
    counts["mmlu/auxiliary_train"] = total

    # conversations: Schema-Guided Dialogue (CC BY-SA 4.0) and HH-RLHF harmless-base (MIT)
    copy(src("chat", "sgd", "test", "dialogues_001.json.gz"), dst("chat", "sgd", "test", "dialogues_001.json.gz"))
    write(dst("chat", "hh-rlhf", "harmless-base", "test.jsonl.gz"),
          first_lines(read_bytes(src("chat", "hh-rlhf", "harmless-base", "test.jsonl.gz")), HH_RLHF_ROWS), True)

    # the word list, as a zip holding words_alpha.txt like the original
    with zipfile.ZipFile(src("wordlist", "words_alpha.zip")) as z:
        lines = z.read("words_alpha.txt").splitlines(keepends=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        info = zipfile.ZipInfo("words_alpha.txt", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, b"".join(lines[::WORD_EVERY]))
    write(dst("wordlist", "words_alpha.zip"), buf.getvalue(), False)

    # pretraining text
    for source, out, chars in PRETRAIN:
        if chars is None and source.endswith(".gz") and out.endswith(".gz"):
            copy(src(source), dst(out))
            continue
        data = read_bytes(src(source))
        if chars is not None:
            data = prefix_at_line(data, chars)
        write(dst(out), data, out.endswith(".gz"))
    articles = read_bytes(src("pretrain", "wiki_demo", "wiki_demo.txt")).decode("utf-8").splitlines()[:WIKI_ARTICLES]
    jsonl = "".join(json.dumps({"text": a}, ensure_ascii=False) + "\n" for a in articles)
    write(dst("pretrain", "wiki_demo", "wiki_demo.jsonl.gz"), jsonl.encode("utf-8"), True)

    with open(dst("subset.json"), "w", encoding="utf-8") as f:
        json.dump({"about": "a deliberate subset of the full data (see README.md); rows per file or folder",
                   "rows": counts}, f, indent=1)
        f.write("\n")
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
