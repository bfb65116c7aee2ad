"""
Pretraining shards: their names, where they live, how to get them and how to read them.

A shard is a parquet file with one string column `text`, one document per row, named
shard_NNNNN.parquet, in $NANOCHAT_BASE_DIR/base_data, either downloaded (`python -m nanochat.dataset
-n 8 [--dataset climbmix|fineweb-edu]`: the hub, or the NANOCHAT_DATA_URL mirror) or built from local
text (`python -m nanochat.dataset prepare --input PATH ...`, nanochat/text_shards.py). The hub's
sources are one table (SOURCES; ClimbMix by default): shard_00000..shard_<last>, the last one val. A
base_data folder holds one source (recorded in index.json; another source's download is refused: the
tokenizer, and every checkpoint through its fingerprint, are tied to the shards).

The split is pinned by name, never by "the last file on disk" (that moves while shards download):
index.json says which shards are train and which val; a folder without one (from before sources were
recorded) follows FineWeb-Edu's convention, val = shard_01822.parquet. A folder made by `prepare`
(shards + index.json + SHA256SUMS) is itself a mirror: serve it over http or use file://.

This module never tokenizes; nanochat/dataloader.py does that on top of iter_batches.
"""

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nanochat.common import atomic_write, get_base_dir, print0

HUB = "https://huggingface.co/datasets"


# pretraining text on the hub: shard_00000..shard_<last_shard> at `url`, the last one val; chars_per_shard is
# what plans assume before a shard is here (they measure one once it is)
Source = namedtuple("Source", "url last_shard chars_per_shard")
SOURCES = {  # ClimbMix (NVIDIA, 400B tokens): the 2026 nanochat records' data (its switch from FineWeb-Edu took
    # "time to GPT-2" from 2.76 h to 2.02 h on 8xH100); chars per shard estimated (~61M tokens x ~4 chars)
    "climbmix": Source(f"{HUB}/karpathy/climbmix-400b-shuffle/resolve/main", 6542, 250_000_000),
    "fineweb-edu": Source(f"{HUB}/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822, 250_000_000),  # 100B tokens
}
DEFAULT_SOURCE = "climbmix"
LEGACY_SOURCE = "fineweb-edu"  # the convention of a base_data folder without index.json
VAL_SHARD = "shard_01822.parquet"  # that convention's val shard: the last of SOURCES[LEGACY_SOURCE]
INDEX_FILE = "index.json"
SUMS_FILE = "SHA256SUMS"
SHARD_RE = re.compile(r"shard_\d{5}\.parquet")
TIMEOUT = 60  # seconds without data before a download attempt gives up
HOW_TO_GET_SHARDS = ("download some with `python -m nanochat.dataset -n 8` (set NANOCHAT_DATA_URL=http://... or "
                     "file:///path to use a mirror), or build them from local text with "
                     "`python -m nanochat.dataset prepare --input PATH`")


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def base_url(source=DEFAULT_SOURCE):
    """Where shards are downloaded from: $NANOCHAT_DATA_URL (a mirror) or the source's folder on the hub."""
    url = (os.environ.get("NANOCHAT_DATA_URL") or SOURCES[source].url).rstrip("/")
    if not url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"NANOCHAT_DATA_URL={url} must start with http://, https:// or file://")
    return url


def data_dir():
    path = os.path.join(get_base_dir(), "base_data")
    os.makedirs(path, exist_ok=True)
    return path


def parse_index(data, source):
    """index.json -> {"train": [names], "val": [names]}, checked (names come from mirrors: no paths)."""
    try:
        index = json.loads(data)
        index = {split: list(index[split]) for split in ("train", "val")}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{source} is not a valid index (want {{\"train\": [...], \"val\": [...]}}): {e}") from e
    for name in index["train"] + index["val"]:
        if not isinstance(name, str) or not SHARD_RE.fullmatch(name):
            raise ValueError(f"{source} lists {name!r}, not a shard name like shard_00000.parquet")
    if set(index["train"]) & set(index["val"]):
        raise ValueError(f"{source} puts the same shard in train and val: {sorted(set(index['train']) & set(index['val']))}")
    return index


def list_shards(split):
    """Absolute paths of the split's shards, in order (see the module docstring for the rule)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    directory = data_dir()
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            names = parse_index(f.read(), index_path)[split]
        missing = [name for name in names if not os.path.exists(os.path.join(directory, name))]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {split} shard(s) listed in {index_path} are missing from {directory}, "
                f"first {missing[0]}: download them with `python -m nanochat.dataset -n N` or rebuild the "
                f"folder with `python -m nanochat.dataset prepare --input PATH`")
        source = index_path
    else:
        on_disk = sorted(name for name in os.listdir(directory) if SHARD_RE.fullmatch(name))
        if split == "val":
            names = [VAL_SHARD] if VAL_SHARD in on_disk else []
        else:
            names = [name for name in on_disk if name != VAL_SHARD]
        source = f"{directory} (no {INDEX_FILE}: val is {VAL_SHARD}, train every other shard)"
    if not names:
        raise FileNotFoundError(f"no {split} shards in {source}: {HOW_TO_GET_SHARDS}")
    return [os.path.join(directory, name) for name in names]


# The default source's shards hold ~250M characters each, and a 32k-vocabulary BPE of this kind
# encodes that text at ~4.8 characters per token; plans use measured values when shards (and a
# tokenizer, measured by the caller) are at hand, these only before anything is downloaded.
REMOTE_SHARD_CHARS = SOURCES[DEFAULT_SOURCE].chars_per_shard


def shard_chars(path):
    """Characters of text in one shard."""
    pf = _open_shard(path)
    return sum(pc.sum(pc.utf8_length(batch.column(0))).as_py() or 0 for batch in pf.iter_batches(columns=["text"]))


def shards_needed(total_tokens, chars_per_token, chars_per_shard, margin=1.1):
    """Train shards holding total_tokens of text, with a margin (documents cropped by packing, variance)."""
    return max(1, int(-(-total_tokens * chars_per_token * margin // chars_per_shard)))


# -------------------------------------------------------------------------------------------------
# reading


def _unreadable(path, error):
    return RuntimeError(f"cannot read shard {path} ({error}); it is corrupt or incomplete: delete it and "
                        f"download it again (`python -m nanochat.dataset -n N`) or re-run prepare")


def _open_shard(path):
    try:
        # page checksums are verified when the writer stored them (prepare does); others read as usual
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from e
    if pf.schema_arrow.get_field_index("text") < 0:
        pf.close()
        raise _unreadable(path, "no column 'text'")
    return pf


def iter_batches(split, rank=0, world_size=1, start=None, loop=False):
    """
    Yield (texts, position), one parquet row group per batch. Row groups are numbered g = 0, 1, ...
    over the split's shards in order (numbering restarts each epoch); this rank takes those with
    g % world_size == rank, so ranks are disjoint and together read everything. `position` names
    the batch just yielded; pass it back as `start` to continue with this rank's next batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    paths = list_shards(split)
    epoch, resume_at = 0, None  # resume_at: (shard, row_group) already consumed in `epoch`
    if start is not None:
        epoch, resume_at = start["epoch"], (start["shard"], start["row_group"])
        if not 0 <= resume_at[0] < len(paths):
            raise ValueError(f"resume position {start} names shard {resume_at[0]} but the {split} split has "
                             f"{len(paths)} shards (did the shards change since it was saved?)")
    while True:
        g = owned = 0
        for i, path in enumerate(paths):
            pf = _open_shard(path)
            try:
                if resume_at is not None and i == resume_at[0] and resume_at[1] >= pf.num_row_groups:
                    raise ValueError(f"resume position {start} is past the {pf.num_row_groups} row groups of {path}")
                for j in range(pf.num_row_groups):
                    mine, g = g % world_size == rank, g + 1
                    owned += mine
                    if not mine or (resume_at is not None and (i, j) <= resume_at):
                        continue
                    try:
                        texts = pf.read_row_group(j, columns=["text"]).column("text").to_pylist()
                    except (OSError, pa.ArrowException) as e:
                        raise _unreadable(path, e) from e
                    yield texts, {"epoch": epoch, "shard": i, "row_group": j}
            finally:
                pf.close()
        if owned == 0:  # with loop=True this would spin forever; in DDP the other ranks would hang
            raise ValueError(f"the {split} split has {g} row groups, fewer than world_size={world_size}: "
                             f"every rank needs one (prepare with a smaller --shard-chars, or use more data)")
        if not loop:
            return
        epoch, resume_at = epoch + 1, None


def parquets_iter_batched(split, start=0, step=1):
    """Just the texts of iter_batches, every `step`-th row group from the `start`-th (one pass)."""
    return (texts for texts, _ in iter_batches(split, rank=start, world_size=step))


# -------------------------------------------------------------------------------------------------
# verification and download


class BadShard(ValueError):
    """A downloaded file failed a check; the download is retried."""


class NotOnMirror(Exception):
    """404 or no such file: retrying will not help."""


def check_shard(f, sha256=None, size=None):
    """
    None if the open binary file `f` is a good shard, else the reason it is not: the byte count
    (a dropped connection), the SHA256SUMS entry, then the parquet structure, every row group read.
    Without a checksum a flipped byte is caught only where the writer stored page CRCs (prepare does).
    """
    f.seek(0, os.SEEK_END)
    if size is not None and f.tell() != size:
        return f"got {f.tell()} bytes, the server announced {size}"
    if sha256:
        f.seek(0)
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if digest.hexdigest() != sha256:
            return f"sha256 {digest.hexdigest()} does not match {SUMS_FILE} ({sha256})"
    f.seek(0)
    try:
        pf = pq.ParquetFile(f, page_checksum_verification=True)
        field = pf.schema_arrow.field("text") if pf.schema_arrow.get_field_index("text") >= 0 else None
        if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            return "no string column 'text'"
        for j in range(pf.num_row_groups):
            pf.read_row_group(j, columns=["text"])
    except (OSError, pa.ArrowException) as e:
        return f"not a readable parquet file ({e})"
    return None


def _open_url(url):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise NotOnMirror(f"{url}: 404 not found") from e
        raise
    except urllib.error.URLError as e:  # file:// reports a missing file this way
        if isinstance(e.reason, FileNotFoundError):
            raise NotOnMirror(f"{url}: no such file") from e
        raise


def _retry(action, what, retries, backoff):
    """action() up to `retries` times, sleeping backoff, 2*backoff, 4*backoff... between attempts."""
    for attempt in range(1, retries + 1):
        try:
            return action()
        except (OSError, http.client.HTTPException, BadShard) as e:  # URLError, resets, timeouts are OSErrors
            last = e
            print0(f"{what}: attempt {attempt}/{retries} failed: {e}")
            if attempt < retries:
                time.sleep(backoff * 2 ** (attempt - 1))
    raise RuntimeError(f"could not download {what} after {retries} attempts; last error: {last}")


def _fetch_small(base, name, retries, backoff):
    """The bytes of a small optional file on the mirror (SHA256SUMS, index.json), or None if it has none."""
    def action():
        try:
            with _open_url(f"{base}/{name}") as response:
                data, size = response.read(), response.headers.get("Content-Length")
        except NotOnMirror:
            return None
        if size is not None and len(data) != int(size):
            raise BadShard(f"got {len(data)} bytes, the server announced {size}")
        return data
    return _retry(action, f"{base}/{name}", retries, backoff)


def fetch_mirror_index(base, retries=5, backoff=0.5):
    """(sha256 by shard name, index or None) from the mirror; the hub serves neither, which is fine."""
    sums = {}
    data = _fetch_small(base, SUMS_FILE, retries, backoff)
    for line in (data or b"").decode("utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            sums[parts[1].lstrip("*")] = parts[0]  # sha256sum marks binary mode with '*'
    data = _fetch_small(base, INDEX_FILE, retries, backoff)
    index = parse_index(data, f"{base}/{INDEX_FILE}") if data is not None else None
    return sums, index


def shards_to_download(num_train, index=None, source=DEFAULT_SOURCE):
    """Shard indices for `-n N` (-1 = all): the first N train shards and every val shard, as the mirror's
    index.json lists them, or without one the source's convention: 0..N-1 plus its last."""
    if index is None:
        last = SOURCES[source].last_shard
        n = last if num_train < 0 else min(num_train, last)
        return list(range(n)) + [last]
    train = index["train"] if num_train < 0 else index["train"][:num_train]
    return [int(name[len("shard_"):-len(".parquet")]) for name in train + index["val"]]


def _download_one(name, url, path, sha256, retries, backoff):
    """Fetch one shard to `path` unless a good copy is there; returns the bytes downloaded (0 if skipped)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            problem = check_shard(f, sha256)
        if problem is None:
            return 0
        print0(f"{name}: the copy on disk is bad ({problem}); downloading it again")
        os.remove(path)

    def attempt():
        # "w+b": the temp file is read back for the checks before atomic_write renames it into place
        with _open_url(url) as response, atomic_write(path, "w+b") as f:
            shutil.copyfileobj(response, f, 1 << 20)
            size = response.headers.get("Content-Length")
            problem = check_shard(f, sha256, int(size) if size is not None else None)
            if problem:
                raise BadShard(problem)
            return f.tell()
    try:
        return _retry(attempt, name, retries, backoff)
    except NotOnMirror as e:
        raise RuntimeError(f"shard {name} is not on the mirror: {e}") from e


def local_source(directory):
    """The source a base_data folder holds: its index.json's "source", LEGACY_SOURCE for shards without an
    index.json, None for an empty folder or one made by `prepare` or from a mirror's index."""
    path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("source")
    return LEGACY_SOURCE if any(SHARD_RE.fullmatch(n) for n in os.listdir(directory)) else None


def download_shards(indices, base=None, workers=4, retries=5, backoff=0.5, source=DEFAULT_SOURCE):
    """
    Download shards by index into data_dir(), `workers` at a time, each verified before it gets its
    final name, retried with exponential back-off. Returns their paths. If the mirror serves an
    index.json, data_dir()'s index.json is written from it, listing the shards asked for or already
    on disk (so a shard that failed stays listed and list_shards says it is missing); if not, from the
    source's convention, with the source's name. A folder that holds another source is refused.
    """
    base = (base or base_url(source)).rstrip("/")
    if not base.startswith(("http://", "https://", "file://")):
        raise ValueError(f"base URL {base} must start with http://, https:// or file://")
    directory = data_dir()
    held = local_source(directory)
    if held not in (None, source):
        raise ValueError(f"{directory} holds {held} shards; {source} shards (with their own tokenizer) go in another "
                         f"folder: set NANOCHAT_BASE_DIR elsewhere, or move those shards away")
    sums, index = fetch_mirror_index(base, retries, backoff)
    names = list(dict.fromkeys(shard_name(i) for i in indices))
    lock, done, t0 = threading.Lock(), [0], time.time()

    def one(name):
        started = time.time()
        nbytes = _download_one(name, f"{base}/{name}", os.path.join(directory, name), sums.get(name), retries, backoff)
        with lock:
            done[0] += 1
            mb, seconds = nbytes / 1e6, max(time.time() - started, 1e-6)
            status = f"{mb:.1f} MB in {seconds:.1f}s ({mb / seconds:.1f} MB/s)" if nbytes else "already here, verified"
            print0(f"[{done[0]}/{len(names)}] {name}: {status}")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, name) for name in names]
    errors = [str(future.exception()) for future in futures if future.exception() is not None]
    index_path = os.path.join(directory, INDEX_FILE)
    if index is not None:
        local = {split: [n for n in index[split] if n in names or os.path.exists(os.path.join(directory, n))]
                 for split in ("train", "val")}
        with atomic_write(index_path, "w") as f:
            json.dump(local, f, indent=1)
    elif held == source or not os.path.exists(index_path):  # the source's convention, recorded with its name
        val = shard_name(SOURCES[source].last_shard)
        on_disk = [n for n in sorted(os.listdir(directory)) if SHARD_RE.fullmatch(n) and n != val]
        with atomic_write(index_path, "w") as f:
            json.dump({"train": sorted(set(on_disk) | {n for n in names if n != val}), "val": [val], "source": source},
                      f, indent=1)
    else:
        print0(f"note: {base} has no {INDEX_FILE} but {directory} has one, which decides the split")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(names)} shards failed: " + "; ".join(errors))
    print0(f"{len(names)} shards in {directory} ({time.time() - t0:.1f}s)")
    return [os.path.join(directory, name) for name in names]


# -------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanochat.dataset", description=(
        "Download pretraining shards (-n N), or build them from local text (prepare --input PATH)."))
    parser.add_argument("-n", "--num-files", type=int, default=None,
                        help="download the first N train shards plus the val shard(s); -1 = all (default: none)")
    parser.add_argument("--dataset", default=DEFAULT_SOURCE, choices=sorted(SOURCES),
                        help="which source to download (default: %(default)s)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=5, help="attempts per file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="{prepare}")
    prep = commands.add_parser("prepare", help="build shards from local .txt/.raw/.jsonl (each also .gz) and .parquet")
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH",
                      help="files or folders (walked recursively) to read (required)")
    prep.add_argument("--shard-chars", type=int, default=100_000_000,
                      help="characters of text per shard (default: %(default)s)")
    prep.add_argument("--val-chars", type=int, default=None,
                      help="characters of text for val (default: 1%% of all, at least one document)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the document shuffle (default: %(default)s)")
    prep.add_argument("--out-dir", default=None, help="where to write (default: $NANOCHAT_BASE_DIR/base_data)")
    args = parser.parse_args(argv)
    print0(f"flags: {vars(args)}")
    try:
        if args.command == "prepare":
            for path in args.input:
                if not os.path.exists(path):
                    parser.error(f"--input {path}: no such file or folder")
            if args.shard_chars < 1 or (args.val_chars is not None and args.val_chars < 1):
                parser.error("--shard-chars and --val-chars must be positive")
            from nanochat.text_shards import prepare  # here, not at the top: text_shards imports this module
            prepare(args.input, args.shard_chars, args.val_chars, args.seed, args.out_dir)
            return
        if args.num_files is None or args.num_files < -1 or args.workers < 1 or args.retries < 1:
            parser.error("download with -n N (N >= 0, or -1 for all) and -w/--retries >= 1, or use `prepare`")
        base = base_url(args.dataset)
        _, index = fetch_mirror_index(base, args.retries)
        indices = shards_to_download(args.num_files, index, args.dataset)
        print0(f"downloading {len(indices)} {args.dataset} shards from {base} into {data_dir()}"
               + (f" (the split of its {INDEX_FILE})" if index else f" ({shard_name(SOURCES[args.dataset].last_shard)} is val)"))
        download_shards(indices, base, workers=args.workers, retries=args.retries, source=args.dataset)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
