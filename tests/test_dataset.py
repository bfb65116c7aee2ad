"""
nanochat/text_shards.py and nanochat/dataset.py: prepare keeps every document exactly once and is deterministic, the val split
is pinned by name, DDP ranks split the row groups exactly and resume exactly, and downloads survive
a misbehaving server (a real one on 127.0.0.1) and work from a file:// mirror.
"""

import collections
import functools
import gzip
import hashlib
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, data_path, read_text
from nanochat import dataset, text_shards

# real text from tests/data (gzipped there: prepare reads .gz as well)
SHAKESPEARE = data_path("pretrain", "tinyshakespeare", "input.txt")
WIKI = data_path("pretrain", "wiki_demo", "wiki_demo.jsonl")  # jsonl records {"text": article}
JEKYLL = data_path("pretrain", "gutenberg", "pg42.txt.gz")  # the smallest book, with PG header/footer
WIKITEXT = data_path("pretrain", "wikitext-2-raw", "wiki.test.raw")


def read_shard(path):
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def read_split(folder, split):
    with open(os.path.join(folder, "index.json")) as f:
        return [doc for name in json.load(f)[split] for doc in read_shard(os.path.join(folder, name))]


def folder_bytes(folder):
    return {name: pathlib.Path(folder, name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A folder made by prepare (shards + index.json + SHA256SUMS) from real text: ~11 shards, ~90 row groups."""
    out = tmp_path_factory.mktemp("mirror")
    text_shards.prepare([SHAKESPEARE, WIKI, JEKYLL], shard_chars=80_000, out_dir=str(out))
    return out


@pytest.fixture
def prepared_index(mirror):
    with open(mirror / "index.json") as f:
        return json.load(f)


@pytest.fixture
def prepared(mirror, prepared_index, base_dir):
    """The mirror's files copied where list_shards / iter_batches look; returns its index."""
    shutil.copytree(mirror, base_dir / "base_data")
    return prepared_index


# -------------------------------------------------------------------------------------------------
# 1. prepare: no document lost or duplicated, val pinned in index.json, deterministic


def test_prepare_keeps_every_document_once(tmp_path):
    # the documents, parsed here without the module: jsonl records, and for plain text the words
    wiki_docs = [r["text"] for r in map(json.loads, read_text(WIKI).splitlines()) if r["text"].strip()]
    shakespeare_words = read_text(SHAKESPEARE).split()
    shakespeare_docs = list(text_shards.read_documents(SHAKESPEARE))
    assert [w for doc in shakespeare_docs for w in doc.split()] == shakespeare_words  # nothing lost in parsing
    assert len(shakespeare_docs) > 100 and max(map(len, shakespeare_docs)) <= text_shards.DOC_CHARS
    wikitext_words = read_text(WIKITEXT).split()
    wikitext_docs = list(text_shards.read_documents(WIKITEXT))
    assert [w for doc in wikitext_docs for w in doc.split()] == wikitext_words
    expected = collections.Counter(wiki_docs + shakespeare_docs + wikitext_docs)

    inputs = [SHAKESPEARE, os.path.dirname(WIKI), WIKITEXT]  # a folder is walked for its .jsonl
    summary = text_shards.prepare(inputs, shard_chars=150_000, out_dir=str(tmp_path / "a"))
    with open(tmp_path / "a" / "index.json") as f:
        index = json.load(f)
    assert index["val"] and index["val"] == summary["val"]["shards"]
    assert not set(index["val"]) & set(index["train"])
    assert len(index["train"]) >= 5
    train, val = read_split(tmp_path / "a", "train"), read_split(tmp_path / "a", "val")
    assert val and collections.Counter(train + val) == expected
    # only the shards, the index and the checksums; SHA256SUMS matches every shard
    files = folder_bytes(tmp_path / "a")
    assert set(files) == set(index["train"] + index["val"]) | {"index.json", "SHA256SUMS"}
    sums = dict(reversed(line.split()) for line in files["SHA256SUMS"].decode().splitlines())
    assert sums == {name: hashlib.sha256(data).hexdigest() for name, data in files.items() if name.startswith("shard_")}
    # several row groups per shard, so small shards still spread over ranks
    for name in index["train"] + index["val"]:
        md = pq.ParquetFile(tmp_path / "a" / name).metadata
        assert md.num_row_groups >= min(8, md.num_rows)

    # deterministic: a second run gives the same bytes; another seed another order, same documents
    text_shards.prepare(inputs, shard_chars=150_000, out_dir=str(tmp_path / "b"))
    assert folder_bytes(tmp_path / "b") == files
    orders = {}
    for seed in (1, -1):  # Random(1) and Random(-1) are the same stream; our seeds must not be
        text_shards.prepare(inputs, shard_chars=150_000, seed=seed, out_dir=str(tmp_path / f"seed{seed}"))
        orders[seed] = read_split(tmp_path / f"seed{seed}", "train") + read_split(tmp_path / f"seed{seed}", "val")
        assert collections.Counter(orders[seed]) == expected
        assert orders[seed] != train + val
    assert orders[1] != orders[-1]

    # shards are valid input too (a .parquet "text" column); re-preparing over a folder replaces it
    summary = text_shards.prepare([str(tmp_path / "a")], shard_chars=10**9, out_dir=str(tmp_path / "b"))
    assert collections.Counter(read_split(tmp_path / "b", "train") + read_split(tmp_path / "b", "val")) == expected
    assert sorted(os.listdir(tmp_path / "b")) == ["SHA256SUMS", "index.json", "shard_00000.parquet", "shard_00001.parquet"]


def test_gutenberg_book_loses_only_its_license(tmp_path):
    text = gzip.decompress(pathlib.Path(JEKYLL).read_bytes()).decode("utf-8-sig")
    start = text.index("\n", text.index("*** START OF")) + 1
    body_words = text[start:text.index("*** END OF")].split()
    docs = list(text_shards.read_documents(JEKYLL))
    assert [w for doc in docs for w in doc.split()] == body_words
    assert not any(marker in doc for doc in docs for marker in ("*** START OF", "*** END OF", "FULL LICENSE"))
    # a book becomes chunks of a few thousand chars, cut at paragraph boundaries
    assert len(docs) > 20 and all(len(doc) <= text_shards.DOC_CHARS or "\n\n" not in doc for doc in docs)
    # a non-UTF-8 book is read as Latin-1 rather than failing
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Caf\u00e9 cr\u00e8me.\n\nSecond paragraph.".encode("latin-1"))
    assert list(text_shards.read_documents(str(latin))) == ["Caf\u00e9 cr\u00e8me.\n\nSecond paragraph."]


def test_prepare_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_shards.prepare([str(tmp_path / "nowhere")], out_dir=str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        text_shards.prepare([str(tmp_path / "empty")], out_dir=str(tmp_path / "out"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        text_shards.prepare([str(tmp_path / "bad.jsonl")], out_dir=str(tmp_path / "out"))
    for argv in (["prepare", "--input", str(tmp_path / "nowhere")], ["prepare", "--bogus"], ["-n", "x"], []):
        with pytest.raises(SystemExit) as info:
            dataset.main(argv)
        assert info.value.code == 2, argv
    assert "nowhere: no such file" in capsys.readouterr().err
    for argv, flags in ((["--help"], ["--num-files", "--workers", "--retries", "prepare"]),
                        (["prepare", "--help"], ["--input", "--shard-chars", "--val-chars", "--seed", "--out-dir"])):
        with pytest.raises(SystemExit):
            dataset.main(argv)
        out = capsys.readouterr().out
        assert all(flag in out for flag in flags) and "default" in out


# -------------------------------------------------------------------------------------------------
# 2. list_shards: the val split is pinned by name


def test_list_shards_pins_val_by_name(base_dir):
    data = base_dir / "base_data"
    with pytest.raises(FileNotFoundError) as info:
        dataset.list_shards("train")
    message = str(info.value)
    assert "python -m nanochat.dataset -n" in message and "NANOCHAT_DATA_URL" in message and "prepare --input" in message
    with pytest.raises(ValueError, match="'train' or 'val'"):
        dataset.list_shards("test")

    shard = text_shards.encode_shard(["a document", "another one"])
    for i in (0, 1):  # train shards arrive first while the download is still running...
        (data / dataset.shard_name(i)).write_bytes(shard)
    with pytest.raises(FileNotFoundError, match="val.*shard_01822"):
        dataset.list_shards("val")  # ...and the last file on disk must not pass for val
    (data / dataset.VAL_SHARD).write_bytes(shard)
    assert dataset.list_shards("val") == [str(data / dataset.VAL_SHARD)]
    for i in (2, 3):
        (data / dataset.shard_name(i)).write_bytes(shard)
    assert dataset.list_shards("val") == [str(data / dataset.VAL_SHARD)]
    assert dataset.list_shards("train") == [str(data / dataset.shard_name(i)) for i in range(4)]

    # with an index.json the index decides, and a listed shard that is missing is an error naming it
    (data / "index.json").write_text(json.dumps({"train": ["shard_00003.parquet", "shard_00001.parquet"],
                                                 "val": ["shard_00000.parquet"]}))
    assert dataset.list_shards("train") == [str(data / "shard_00003.parquet"), str(data / "shard_00001.parquet")]
    assert dataset.list_shards("val") == [str(data / "shard_00000.parquet")]
    (data / "index.json").write_text(json.dumps({"train": ["shard_00005.parquet"], "val": ["shard_00000.parquet"]}))
    with pytest.raises(FileNotFoundError, match=r"shard_00005\.parquet.*python -m nanochat\.dataset"):
        dataset.list_shards("train")
    (data / "index.json").write_text(json.dumps({"train": ["../../etc/passwd"], "val": []}))
    with pytest.raises(ValueError, match="not a shard name"):
        dataset.list_shards("train")


# -------------------------------------------------------------------------------------------------
# 3. iter_batches: ranks split the row groups exactly, resume exactly, loop counts epochs


def test_ranks_partition_the_stream(prepared):
    full = list(dataset.iter_batches("train"))
    assert len(full) > 40 and [pos["epoch"] for _, pos in full] == [0] * len(full)
    key = lambda pos: (pos["shard"], pos["row_group"])
    assert [key(pos) for _, pos in full] == sorted(key(pos) for _, pos in full)
    for world_size in (2, 3):
        ranks = [list(dataset.iter_batches("train", rank=r, world_size=world_size)) for r in range(world_size)]
        seen = [key(pos) for batches in ranks for _, pos in batches]
        assert len(seen) == len(set(seen)) == len(full)  # disjoint, and together everything
        merged = sorted((key(pos), texts) for batches in ranks for texts, pos in batches)
        assert merged == [(key(pos), texts) for texts, pos in full]
        assert all(abs(len(a) - len(b)) <= 1 for a in ranks for b in ranks)
    odd = [texts for i, (texts, _) in enumerate(full) if i % 2 == 1]
    assert list(dataset.parquets_iter_batched("train", start=1, step=2)) == odd
    with pytest.raises(ValueError, match="fewer than world_size"):
        next(dataset.iter_batches("val", rank=9_999, world_size=10_000))


def test_resume_gives_exactly_the_continuation(prepared):
    for world_size, rank in ((1, 0), (2, 1)):
        stream = list(dataset.iter_batches("train", rank=rank, world_size=world_size))
        for k, (_, pos) in enumerate(stream):
            resumed = list(dataset.iter_batches("train", rank=rank, world_size=world_size, start=pos))
            assert resumed == stream[k + 1:], (world_size, pos)
    with pytest.raises(ValueError, match="shard 99"):
        next(dataset.iter_batches("train", start={"epoch": 0, "shard": 99, "row_group": 0}))


def test_loop_counts_epochs_and_resumes_across_them(prepared):
    one_pass = list(dataset.iter_batches("val", world_size=2, rank=0))
    n = len(one_pass)
    looped = dataset.iter_batches("val", world_size=2, rank=0, loop=True)
    batches = [next(looped) for _ in range(3 * n)]
    assert [pos["epoch"] for _, pos in batches] == [0] * n + [1] * n + [2] * n
    assert [texts for texts, _ in batches[n:2 * n]] == [texts for texts, _ in one_pass]
    for k in (n - 1, n, 2 * n - 1):  # resume at the end of an epoch and just after
        resumed = dataset.iter_batches("val", world_size=2, rank=0, loop=True, start=batches[k][1])
        assert [next(resumed) for _ in range(n)] == batches[k + 1:k + 1 + n]


# -------------------------------------------------------------------------------------------------
# 6. a corrupt shard on disk is an error naming it, not silently skipped data


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_shard_names_the_file(prepared, base_dir, damage):
    path = base_dir / "base_data" / prepared["train"][1]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[data_page_middle(path)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=f"{prepared['train'][1]}.*delete it"):
        list(dataset.iter_batches("train"))


def data_page_middle(path):
    """An offset inside the compressed values of a column chunk (not a page header, not the footer)."""
    md = pq.ParquetFile(path).metadata
    chunk = md.row_group(md.num_row_groups // 2).column(0)
    return chunk.data_page_offset + chunk.total_compressed_size // 2


# -------------------------------------------------------------------------------------------------
# 4. downloads from a real HTTP server that misbehaves on purpose


class FaultyMirror(http.server.SimpleHTTPRequestHandler):
    """
    Serves a folder, but the n-th request for a file with faults[name][n-1] set misbehaves:
    "drop"     headers announce the full length, half the body is sent, the connection closes
    "truncate" half the file, with a Content-Length that matches the half (only the checks see it)
    "flip"     the full length with one byte inverted (at flip_at[name], default the middle)
    """

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        with self.server.lock:
            self.server.requests[name] += 1
            attempt = self.server.requests[name]
        faults = self.server.faults.get(name, [])
        if attempt > len(faults) or not os.path.exists(os.path.join(self.directory, name)):
            return super().do_GET()
        data = bytearray(pathlib.Path(self.directory, name).read_bytes())
        length = len(data)
        if faults[attempt - 1] == "drop":
            data = data[:length // 2]
        elif faults[attempt - 1] == "truncate":
            data = data[:length // 2]
            length = len(data)
        elif faults[attempt - 1] == "flip":
            data[self.server.flip_at.get(name, length // 2)] ^= 0xFF
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(bytes(data))
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve():
    servers = []

    def start(folder, faults=None, flip_at=None):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyMirror, directory=str(folder)))
        server.lock, server.requests = threading.Lock(), collections.Counter()
        server.faults, server.flip_at = faults or {}, flip_at or {}
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def all_indices(index):
    return dataset.shards_to_download(-1, index)


def test_download_survives_a_misbehaving_server(mirror, prepared_index, base_dir, serve):
    index = prepared_index
    train0, train1, train2, val0 = index["train"][0], index["train"][1], index["train"][2], index["val"][0]
    faults = {train0: ["drop"], train1: ["truncate", "truncate"], train2: ["flip"], val0: ["drop", "flip"]}
    server, url = serve(mirror, faults)
    paths = dataset.download_shards(all_indices(index), base=url, workers=3, retries=4, backoff=0.01)
    data = base_dir / "base_data"
    assert paths == [str(data / name) for name in index["train"] + index["val"]]
    # byte-identical, nothing else left behind (no temp files), retries exactly where the faults were
    assert folder_bytes(data) == {name: content for name, content in folder_bytes(mirror).items() if name != "SHA256SUMS"}
    assert {name: server.requests[name] for name in index["train"] + index["val"]} == {
        name: 1 + len(faults.get(name, [])) for name in index["train"] + index["val"]}
    assert server.requests["SHA256SUMS"] == server.requests["index.json"] == 1
    assert dataset.list_shards("val") == [str(data / val0)]

    # again: good shards on disk are verified and skipped, a damaged one is fetched again
    damaged = bytearray((data / train1).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (data / train1).write_bytes(bytes(damaged))
    before = collections.Counter(server.requests)
    dataset.download_shards(all_indices(index), base=url, workers=3, backoff=0.01)
    assert server.requests - before == collections.Counter({train1: 1, "SHA256SUMS": 1, "index.json": 1})
    assert folder_bytes(data)[train1] == folder_bytes(mirror)[train1]


def test_download_gives_up_on_an_always_corrupt_shard(mirror, prepared_index, base_dir, serve):
    bad = prepared_index["train"][1]
    server, url = serve(mirror, {bad: ["flip"] * 100})
    with pytest.raises(RuntimeError, match=f"{bad}.*3 attempts.*sha256"):
        dataset.download_shards(all_indices(prepared_index), base=url, workers=2, retries=3, backoff=0.01)
    assert server.requests[bad] == 3
    left = set(os.listdir(base_dir / "base_data"))
    assert bad not in left  # nothing at the final name, no temp files either
    assert left == set(prepared_index["train"] + prepared_index["val"] + ["index.json"]) - {bad}
    with pytest.raises(FileNotFoundError, match=bad):  # still listed: the split is not silently short
        dataset.list_shards("train")


def test_download_checks_without_sha256sums(mirror, prepared_index, base_dir, serve, tmp_path):
    # Without SHA256SUMS: a dropped connection is caught by the length, a truncated file by parquet
    # (no footer), and a flipped byte inside the data by the page CRCs that prepare writes. (Shards
    # written without page CRCs, like the hub's, get no such check: there SHA256SUMS is the only guard.)
    folder = tmp_path / "no_sums"
    shutil.copytree(mirror, folder)
    os.remove(folder / "SHA256SUMS")
    train0, train1, train2 = prepared_index["train"][:3]
    flip_at = data_page_middle(folder / train2)
    damaged = bytearray((folder / train2).read_bytes())
    damaged[flip_at] ^= 0xFF
    with open(tmp_path / "damaged.parquet", "w+b") as f:
        f.write(bytes(damaged))
        assert "parquet" in dataset.check_shard(f)  # the check itself sees it, without a checksum
    good = (folder / train2).read_bytes()
    with open(folder / train2, "rb") as f:  # each check on its own
        assert dataset.check_shard(f, hashlib.sha256(good).hexdigest(), len(good)) is None
        assert "announced" in dataset.check_shard(f, size=len(good) + 1)
        assert "sha256" in dataset.check_shard(f, sha256="0" * 64)
    faults = {train0: ["drop"], train1: ["truncate"], train2: ["flip", "flip"]}
    server, url = serve(folder, faults, {train2: flip_at})
    dataset.download_shards(all_indices(prepared_index), base=url, workers=3, retries=4, backoff=0.01)
    assert folder_bytes(base_dir / "base_data") == folder_bytes(folder)
    assert server.requests[train0] == 2 and server.requests[train1] == 2 and server.requests[train2] == 3


def test_remote_convention_over_http(mirror, prepared_index, base_dir, serve, tmp_path, monkeypatch):
    # a mirror laid out like the hub: no index.json, no SHA256SUMS, val is shard_01822
    folder = tmp_path / "hub"
    folder.mkdir()
    names = prepared_index["train"][:3] + [dataset.VAL_SHARD]
    for name, source in zip(names, prepared_index["train"][:3] + prepared_index["val"][:1]):
        shutil.copy(mirror / source, folder / name)
    server, url = serve(folder)
    monkeypatch.setenv("NANOCHAT_DATA_URL", url + "/")
    assert dataset.base_url() == url
    dataset.main(["-n", "2", "-w", "2", "--dataset", "fineweb-edu"])
    data = base_dir / "base_data"
    # no index.json on the mirror: the source's convention decides, and is recorded with the source's name
    assert sorted(os.listdir(data)) == sorted(names[:2] + [dataset.VAL_SHARD, "index.json"])
    assert json.loads((data / "index.json").read_text()) == {"train": names[:2], "val": [dataset.VAL_SHARD],
                                                             "source": "fineweb-edu"}
    assert dataset.list_shards("val") == [str(data / dataset.VAL_SHARD)]
    assert server.requests["index.json"] >= 1 and server.requests["SHA256SUMS"] >= 1  # asked, 404, fine
    dataset.main(["-n", "3", "-w", "2", "--dataset", "fineweb-edu"])  # more of the same source: listed too
    assert dataset.list_shards("train") == [str(data / n) for n in names[:3]]
    with pytest.raises(SystemExit):  # another source into the same folder: refused, nothing fetched
        dataset.main(["-n", "1", "--dataset", "climbmix"])
    assert sorted(os.listdir(data)) == sorted(names + ["index.json"])
    assert dataset.shards_to_download(2, source="fineweb-edu") == [0, 1, 1822]
    assert dataset.shards_to_download(2) == [0, 1, 6542]  # ClimbMix by default
    assert len(dataset.shards_to_download(-1, source="fineweb-edu")) == 1823
    index = {"train": ["shard_00003.parquet", "shard_00007.parquet", "shard_00001.parquet"], "val": ["shard_00009.parquet"]}
    assert dataset.shards_to_download(2, index) == [3, 7, 9]
    monkeypatch.setenv("NANOCHAT_DATA_URL", "ftp://example.com")
    with pytest.raises(ValueError, match="http://, https:// or file://"):
        dataset.base_url()


def test_the_source_table_by_hand(base_dir, monkeypatch):
    """The hub's sources as their repositories name them (issue 21): ClimbMix by default, 6,543 shards, the last val;
    FineWeb-Edu, 1,823; a folder of shards without index.json is FineWeb-Edu's and refuses ClimbMix."""
    assert dataset.DEFAULT_SOURCE == "climbmix"
    climbmix, fineweb = dataset.SOURCES["climbmix"], dataset.SOURCES["fineweb-edu"]
    assert climbmix.url == "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
    assert fineweb.url == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
    assert dataset.shard_name(climbmix.last_shard) == "shard_06542.parquet"
    assert dataset.shard_name(fineweb.last_shard) == dataset.VAL_SHARD == "shard_01822.parquet"
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)
    assert dataset.base_url() == climbmix.url and dataset.base_url("fineweb-edu") == fineweb.url
    data = base_dir / "base_data"
    data.mkdir(exist_ok=True)
    assert dataset.local_source(str(data)) is None
    (data / dataset.shard_name(0)).write_bytes(text_shards.encode_shard(["an old document"]))
    assert dataset.local_source(str(data)) == "fineweb-edu"
    with pytest.raises(ValueError, match="holds fineweb-edu shards"):
        dataset.download_shards([0], base="file:///nonexistent", source="climbmix")


# -------------------------------------------------------------------------------------------------
# 5. a folder made by prepare works as a file:// mirror for the real command line


def test_file_mirror_command_line(mirror, prepared_index, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATA_URL=f"file://{mirror}")
    run = lambda *flags: subprocess.run([sys.executable, "-m", "nanochat.dataset", *flags], cwd=REPO_ROOT,
                                        env=env, capture_output=True, text=True, timeout=120)
    result = run("-n", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    data = base_dir / "base_data"
    wanted = prepared_index["train"][:1] + prepared_index["val"]
    assert sorted(os.listdir(data)) == sorted(wanted + ["index.json"])
    assert all((data / name).read_bytes() == (mirror / name).read_bytes() for name in wanted)
    assert dataset.list_shards("train") == [str(data / prepared_index["train"][0])]
    assert dataset.list_shards("val") == [str(data / name) for name in prepared_index["val"]]
    assert next(dataset.iter_batches("val"))[0]

    result = run("-n", "2", "-w", "1")  # one more train shard; the ones already here are verified, not fetched
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("already here") == 1 + len(prepared_index["val"])
    assert dataset.list_shards("train") == [str(data / name) for name in prepared_index["train"][:2]]
    result = run("-n", "1", "-w", "0")
    assert result.returncode == 2 and "-w" in result.stderr
