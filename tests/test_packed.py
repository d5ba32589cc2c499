"""Per-sample tables packed into numpy arrays (data/packed.py), and the folder catalog holding its paths and
index rows that way: a DataLoader worker reading them writes no reference count into the shared pages."""

import json
import pickle

import pytest
from PIL import Image

from fusedit.data.folder import FolderCatalog
from fusedit.data.packed import PackedStrings

ITEMS = ["a.png", "", "dir/héllo wörld.jpg", "x\udc80y.png", "日本語/猫.webp"]


def test_packed_strings_read_back_every_string_including_escaped_bytes():
    packed = PackedStrings(ITEMS)
    assert len(packed) == 5 and list(packed) == ITEMS and packed == ITEMS
    assert packed[3] == "x\udc80y.png"  # a file name that is not UTF-8, as os.walk reads it
    assert (packed[-1], packed[1:3], packed.index("dir/héllo wörld.jpg")) == (ITEMS[-1], ITEMS[1:3], 2)
    with pytest.raises(IndexError, match="index 5 out of range for 5 strings"):
        packed[5]
    assert pickle.loads(pickle.dumps(packed)) == packed  # as a spawned worker receives it
    assert PackedStrings() == [] and len(PackedStrings()) == 0
    # Characters plus 8 bytes per string, in two read-only arrays: nothing per item on the Python heap.
    assert packed.nbytes == sum(len(s.encode("utf-8", "surrogatepass")) for s in ITEMS) + 8 * 5
    assert not packed._data.flags.writeable and not packed._ends.flags.writeable


def test_a_folder_catalog_packs_its_paths_and_index_rows(tmp_path):
    for name in ("b.png", "a.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("first")
    rows = [
        {"file_name": "a.png", "text": "a cat", "width": 8, "height": 8, "unused": [1, 2]},
        {"file_name": "b.png", "text": "ünïcode\nline", "width": 8, "height": 8, "score": None},
    ]
    index = tmp_path / "index.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))
    catalog = FolderCatalog(str(tmp_path), str(index), keep_fields=("text",))
    assert isinstance(catalog.paths, PackedStrings) and isinstance(catalog.rows, PackedStrings)
    assert [catalog.record(i)[0] for i in range(2)] == [
        {"text": "a cat", "width": 8, "height": 8},  # only the columns read are kept
        {"text": "ünïcode\nline", "width": 8, "height": 8},
    ]
    assert catalog.record(1)[1] == tmp_path / "b.png" and catalog.sizes_known.tolist() == [[8, 8], [8, 8]]
    scanned = FolderCatalog(str(tmp_path))
    assert isinstance(scanned.paths, PackedStrings) and scanned.paths == ["a.png", "b.png"]
    assert scanned.record(0)[0]["txt"] == "first"
