"""The compact index of a webdataset shard (h-wds): members are read by offset and size from numpy arrays, not
through tarfile.TarInfo objects, which took about 1.9 KB per sample. The bytes read must be tarfile's for
every kind of member a shard can hold, and the stream must resume mid-shard exactly as before."""

from __future__ import annotations

import gc
import io
import pickle
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np

from fusedit.data.webdataset_source import TarShard, WebDatasetCatalog, WebDatasetReader, split_key


def _sparse_member(name: str) -> tuple[bytes, bytes]:
    """(the tar bytes of an old-GNU sparse member, the 16 bytes tarfile reads from it): tarfile writes no
    sparse member, so its header is patched by hand (map at byte 386, real size at 483, as GNU tar does).
    The file holds 2 stored bytes every 4, the rest being holes."""
    stored = b"ABCDEFGH"
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
    for n in range(4):  # (offset in the file, bytes stored there)
        header[386 + 24 * n : 410 + 24 * n] = tarfile.itn(4 * n, 12) + tarfile.itn(2, 12)
    header[483:495] = tarfile.itn(16, 12)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    data = stored + b"\0" * (tarfile.BLOCKSIZE - len(stored))
    return bytes(header) + data, b"AB\0\0CD\0\0EF\0\0GH\0\0"


def _shard(path: Path) -> Path:
    """A shard with every kind of member: plain (type 0), old-style (NUL type) and contiguous (type 7)
    files, an upper-case extension, an empty member, a Latin-1 name, a name long enough for a GNU longname
    header, a directory, a symbolic and a hard link (not samples), and a sparse file."""
    long = "d" * 120 + "/x"

    def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.linkname = kind, len(data), link
        return info, io.BytesIO(data)

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for info, data in [
            member("a.png", b"image a" * 100),
            member("a.txt", b"caption a"),
            member("dir", kind=tarfile.DIRTYPE),
            member("b.jpg", b"image b" * 50, tarfile.AREGTYPE),
            member("b.TXT", b"caption b"),
            member("c.png", b"image c", tarfile.CONTTYPE),
            member("c.txt", b""),
            member("caf\xe9.png", b"image \xe9"),
            member("caf\xe9.txt", b"caf\xe9"),
            member("s.png", kind=tarfile.SYMTYPE, link="a.png"),
            member("h.png", kind=tarfile.LNKTYPE, link="a.png"),
            member("h.txt", b"caption h, whose image is a hard link"),
            member(long + ".png", b"image x" * 30),
            member(long + ".txt", b"caption x"),
            member("e.txt", b"caption e"),
        ]:
            tar.addfile(info, data if info.isfile() else None)
        tar.fileobj.flush()
    with tarfile.open(path) as tar:
        tar.getmembers()
        end = tar.offset  # where the end-of-archive blocks start: the sparse member goes there
    sparse, _ = _sparse_member("e.png")
    path.write_bytes(path.read_bytes()[:end] + sparse + b"\0" * (2 * tarfile.BLOCKSIZE))
    return path


def _tarfile_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Sample key -> {extension: bytes} as tarfile reads the shard's regular files."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            if info.isfile():
                key, ext = split_key(info.name)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def _image(sample: dict[str, bytes]) -> bytes:
    return sample.get("png", sample.get("jpg"))


def test_the_catalog_and_the_stream_read_the_bytes_tarfile_reads_from_every_kind_of_member(tmp_path):
    path = _shard(tmp_path / "kinds.tar")
    expected = _tarfile_samples(path)
    assert expected["e"]["png"] == _sparse_member("e.png")[1]  # tarfile fills the sparse file's holes
    keys = ["a", "b", "c", "caf\udce9", "h", "d" * 120 + "/x", "e"]
    assert list(expected) == keys
    shard = TarShard(str(path))
    assert (shard.error, shard.dropped) == (None, [])
    assert [(key, list(group)) for key, group in shard.samples] == [
        (key, list(expected[key])) for key in keys
    ]
    catalog = WebDatasetCatalog([[str(path)]])
    assert catalog.skipped == []
    for i, key in enumerate(keys):
        assert catalog.sample_id(i) == f"{path}/{key}"
        if key == "h":  # its image is a hard link, which is not a sample's member, as before
            assert list(catalog.samples[0][i][1]) == ["txt"]
            continue
        fields, image = catalog.record(i)
        assert (image, fields) == (
            _image(expected[key]),
            {"__key__": key, "__url__": str(path), "txt": expected[key]["txt"]},
        )
    # A catalog sent to a worker reads the same.
    assert pickle.loads(pickle.dumps(catalog)).record(6) == catalog.record(6)
    reader = WebDatasetReader([[str(path)]], [1.0], seed=0)
    records = [reader.next() for _ in keys]
    assert sorted(r.id for r in records) == sorted(f"{path}/{key}" for key in keys)
    for record in records:
        key = record.id[len(str(path)) + 1 :]
        if key == "h":
            assert (record.error.reason, record.image) == ("missing", None)
            continue
        assert (record.error, record.image, record.fields["txt"]) == (
            None,
            _image(expected[key]),
            expected[key]["txt"],
        )


def test_a_member_cut_short_is_a_corrupt_sample_with_tarfiles_words(tmp_path):
    path = _shard(tmp_path / "kinds.tar")
    with tarfile.open(path) as tar:
        cut = tar.getmember("a.png").offset_data + 10  # inside the first sample's image
    path.write_bytes(path.read_bytes()[:cut])
    catalog = WebDatasetCatalog([[str(path)]])
    assert [key for key, _ in catalog.samples[0]] == ["a"]
    assert catalog.skipped == [("corrupt-shard", str(path), "unexpected end of data")]
    reader = WebDatasetReader([[str(path)]], [1.0], seed=0)
    record = reader.next()
    assert (record.id, record.error.reason, record.error.detail) == (
        f"{path}/a",
        "corrupt",
        "tar member unreadable: unexpected end of data",
    )


def _ids(reader: WebDatasetReader, n: int) -> list[str]:
    return [reader.next().id for _ in range(n)]


def test_a_stream_resumed_mid_shard_continues_with_the_next_sample(tmp_path):
    paths = [str(_shard(tmp_path / f"kinds-{s}.tar")) for s in range(2)]
    through = WebDatasetReader([paths], [1.0], seed=3)
    ids = _ids(through, 30)  # two epochs of 14 samples, and some
    for stop in (3, 9, 17):  # inside the first shard, inside the second, inside the next epoch's first
        first = WebDatasetReader([paths], [1.0], seed=3)
        assert _ids(first, stop) == ids[:stop]
        state = first.state_dict()
        first.close()
        resumed = WebDatasetReader([paths], [1.0], seed=3)
        resumed.load_state_dict(state)
        assert _ids(resumed, 30 - stop) == ids[stop:]
        resumed.close()


def _tar_infos(root: object) -> int:
    """How many tarfile.TarInfo objects are reachable from ``root``."""
    seen, todo, found = set(), [root], 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        found += isinstance(obj, tarfile.TarInfo)
        todo += gc.get_referents(obj)
    return found


def test_the_index_holds_no_tar_info_and_about_90_bytes_a_sample(tmp_path):
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(1000):
            for ext in ("jpg", "txt", "json"):
                info = tarfile.TarInfo(f"00000/{i:09d}.{ext}")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
    WebDatasetCatalog([[str(path)]])  # once before measuring: first uses cache things of their own
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        catalog = WebDatasetCatalog([[str(path)]])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(catalog) == 1000
    # 15 bytes of key and 8 of its end, 3 x 20 bytes of members; TarInfo objects took about 1,900.
    assert held / 1000 < 150
    assert _tar_infos(catalog) == 0
    # The stream's open shard: tarfile keeps every member it reads unless told otherwise.
    shard = TarShard(str(path))
    assert _tar_infos(shard) == 0
    assert isinstance(shard.samples.offsets, np.ndarray)
    shard.close()


def test_member_names_starting_with_a_slash_are_read(tmp_path):
    # tar -P keeps a leading "/": key "a" of "/a.jpg" (split_key), whose extension is still "jpg".
    path = tmp_path / "abs.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (
            ("/a.jpg", b"img-a"),
            ("/a.txt", b"cap-a"),
            ("/a.txt", b"again"),
            ("/b.JPG", b"img-b"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = TarShard(str(path))
    try:
        assert [(key, sorted(group)) for key, group in shard.samples] == [
            ("a", ["jpg", "txt"]),
            ("b", ["jpg"]),
        ]
        assert shard.read(0, {"txt": "txt"}, "")[1:] == (
            {"__key__": "a", "__url__": str(path), "txt": b"cap-a"},
            b"img-a",
        )
        assert [d[2] for d in shard.dropped] == [
            "duplicate member /a.txt in the shard (key 'a' again); the first copy is used"
        ]
    finally:
        shard.close()


def test_a_catalog_of_more_shards_than_open_files_allowed_reads_them_all(tmp_path):
    # Each shard is closed once indexed: holding every one open until all were read, the shards past
    # `ulimit -n` failed as corrupt-shard and were left out.
    import resource

    paths = []
    for n in range(80):
        path = tmp_path / f"{n:03d}.tar"
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo(f"{n:03d}.txt")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        paths.append(str(path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(list(Path("/proc/self/fd").iterdir()))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 40, hard))  # room for the 16 indexing threads
    try:
        catalog = WebDatasetCatalog([paths])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (len(catalog), catalog.skipped) == (80, [])
