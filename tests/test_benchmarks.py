"""Benchmark prompt data: the loaders on the shared copies, and download() against local file:// sources
(never the network) including the one-line offline error."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from fusedit.eval import benchmarks
from fusedit.eval.benchmarks import BenchmarkError, download, dpg_csv_path, load_dpg, load_geneval


def shared_data() -> Path | None:
    here = Path(__file__).resolve()
    for root in (here.parents[2] / "shared", here.parents[1] / ".." / "shared"):
        if (root / "data").is_dir():
            return (root / "data").resolve()
    return None


def shared(sub: str) -> Path:
    data = shared_data()
    if data is None or not (data / sub).exists():
        pytest.skip(f"benchmark copy {sub} not found under ../shared/data (see shared/data/README.md)")
    return data / sub


def test_load_geneval_reads_the_official_prompts_from_a_file_or_folder():
    folder = shared("geneval")
    rows = load_geneval(folder)
    assert rows == load_geneval(folder / "evaluation_metadata.jsonl")
    assert len(rows) == 553
    assert Counter(r["tag"] for r in rows) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    assert rows[0] == {
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
        "prompt": "a photo of a bench",
    }
    counting = next(r for r in rows if r["tag"] == "counting")
    assert counting["exclude"][0]["count"] == counting["include"][0]["count"] + 1


def test_load_dpg_reads_the_official_prompts_in_numeric_order():
    folder = shared("dpg_bench")
    prompts = load_dpg(folder)  # the folder holding prompts/ works, as does prompts/ itself
    assert prompts == load_dpg(folder / "prompts")
    assert len(prompts) == 1065 and len({n for n, _ in prompts}) == 1065
    assert [n for n, _ in prompts[:12]] == [str(k) for k in range(12)]
    assert prompts[0][1] == (folder / "prompts" / "0.txt").read_text().strip() and all(p for _, p in prompts)


def test_loaders_report_bad_inputs_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="GenEval metadata '.*missing.jsonl' does not exist"):
        load_geneval(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "prompt": "a red car", "include": []}\nnot json\n')
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:2 is not JSON"):
        load_geneval(bad)
    bad.write_text('{"prompt": "a red car"}\n')
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:1 is not a GenEval prompt; expected keys tag"):
        load_geneval(bad)
    # A clause the scorer could not read is refused on loading, not after every image was generated.
    for clause in (
        '{"class": "car", "count": 1.5}',
        '{"class": "car", "count": 0}',
        '{"class": 3, "count": 1}',
    ):
        bad.write_text(f'{{"tag": "counting", "prompt": "a car", "include": [{clause}]}}\n')
        with pytest.raises(BenchmarkError, match=r"bad.jsonl:1 is not a GenEval prompt"):
            load_geneval(bad)
    bad.write_text('{"tag": "colors", "prompt": "a car", "include": [], "exclude": [{"class": "car"}]}\n')
    with pytest.raises(BenchmarkError, match=r"lists of \{class: a name, count: a whole number >= 1\}"):
        load_geneval(bad)
    with pytest.raises(BenchmarkError, match="no \\*.txt prompt files"):
        load_dpg(tmp_path)
    with pytest.raises(BenchmarkError, match="is a file; expected a folder"):
        load_dpg(bad)
    with pytest.raises(BenchmarkError, match="unknown benchmark 'coco'; allowed: geneval, dpg"):
        download("coco", tmp_path)


def test_download_geneval_from_the_configured_source(tmp_path, monkeypatch):
    # The default ref: the pinned commit, not a branch that may move.
    source = tmp_path / "upstream" / "af4902f24d3ca90ebbb446dd9891a59e0f82725f"
    source.mkdir(parents=True)
    (source / "meta.jsonl").write_text(
        '{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}\n'
    )
    (source / "LICENSE").write_text("MIT")
    monkeypatch.setattr(
        benchmarks,
        "GENEVAL_URLS",
        {
            "evaluation_metadata.jsonl": source.parent.as_uri() + "/{ref}/meta.jsonl",
            "LICENSE": (source / "LICENSE").as_uri(),
        },
    )
    dest = download("geneval", tmp_path / "geneval", progress=False)
    assert load_geneval(dest) == [json.loads((source / "meta.jsonl").read_text())]
    assert (dest / "LICENSE").read_text() == "MIT" and not list(dest.glob(".download-*"))
    assert json.loads((dest / "SOURCE.json").read_text()) == {
        "benchmark": "geneval",
        "ref": source.name,
        "source": "github.com/djghosh13/geneval",
    }

    # A complete copy is reused without any network access.
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert download("geneval", dest) == dest


def test_a_kept_copy_of_another_ref_is_said_to_be_kept(tmp_path, monkeypatch, caplog):
    """A copy downloaded before SOURCE.json (from a moving branch), or of another ref than asked, is kept
    (nothing is deleted unasked), with one line naming what it is and how to fetch the one asked for."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "geneval"
    dest.mkdir()
    (dest / "evaluation_metadata.jsonl").write_text("{}\n")
    pinned = benchmarks.PINNED_REFS["geneval"]
    for source, said in (
        (None, "of unknown ref (no readable SOURCE.json)"),
        ({"ref": "main"}, "of ref main"),
        ({"ref": pinned}, None),
    ):
        if source is not None:
            (dest / "SOURCE.json").write_text(json.dumps(source))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fusedit"):
            assert download("geneval", dest) == dest
        expected = f"kept the existing copy in {dest} {said}, not {pinned}; --force fetches that one"
        assert caplog.messages == ([expected] if said else [])


def test_download_geneval_refuses_a_page_that_is_not_the_prompt_file(tmp_path, monkeypatch):
    page = tmp_path / "page.html"
    page.write_text("<html>rate limited</html>")
    monkeypatch.setattr(benchmarks, "GENEVAL_URLS", {"evaluation_metadata.jsonl": page.as_uri()})
    with pytest.raises(BenchmarkError, match="is not JSON"):
        download("geneval", tmp_path / "geneval")
    assert not (tmp_path / "geneval" / "evaluation_metadata.jsonl").exists()


def make_archive(path: Path) -> Path:
    """A stand-in for ELLA's GitHub archive: the DPG files among others, plus a member escaping the root."""
    files = {
        "ELLA-main/README.md": "ELLA",
        "ELLA-main/LICENSE": "Apache-2.0",
        "ELLA-main/dpg_bench/prompts/0.txt": "A red ball.\n",
        "ELLA-main/dpg_bench/prompts/10.txt": "A sunny sky.",
        "ELLA-main/dpg_bench/prompts/2.txt": "Two cats.",
        "ELLA-main/dpg_bench/dpg_bench.csv": "item_id,text\n",
        "ELLA-main/dpg_bench/compute_dpg_bench.py": "print()",
        "ELLA-main/assets/notes/prompts/x.txt": "not a prompt",
        "../escape.txt": "outside",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_download_dpg_extracts_only_the_benchmark_files(tmp_path, monkeypatch):
    (tmp_path / "v1").mkdir()
    make_archive(tmp_path / "v1" / "ella.tar.gz")
    monkeypatch.setattr(benchmarks, "DPG_ARCHIVE_URL", tmp_path.as_uri() + "/{ref}/ella.tar.gz")
    dest = download("dpg", tmp_path / "dpg", ref="v1", progress=False)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "LICENSE",
        "SOURCE.json",
        "dpg_bench.csv",
        "prompts",
        "prompts/0.txt",
        "prompts/10.txt",
        "prompts/2.txt",
    ]
    assert load_dpg(dest) == [("0", "A red ball."), ("2", "Two cats."), ("10", "A sunny sky.")]
    assert json.loads((dest / "SOURCE.json").read_text())["ref"] == "v1"
    assert dpg_csv_path(dest / "prompts") == dest / "dpg_bench.csv"
    assert not (tmp_path / "escape.txt").exists()
    # force replaces the copy
    (dest / "prompts" / "0.txt").write_text("edited")
    download("dpg", dest, ref="v1", force=True, progress=False)
    assert (dest / "prompts" / "0.txt").read_text() == "A red ball.\n"


def test_download_dpg_rejects_an_archive_without_the_benchmark(tmp_path, monkeypatch):
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("ELLA-main/README.md")
        tar.addfile(info, io.BytesIO(b""))
    monkeypatch.setattr(benchmarks, "DPG_ARCHIVE_URL", empty.as_uri())
    with pytest.raises(BenchmarkError, match="has no dpg_bench/prompts"):
        download("dpg", tmp_path / "dpg", progress=False)


@pytest.mark.parametrize("name", ["geneval", "dpg"])
def test_offline_download_fails_with_one_line_that_says_what_to_do(tmp_path, monkeypatch, name):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(BenchmarkError) as info:
        download(name, tmp_path / name, progress=False)
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "--prompts PATH" in message
    assert "https://" in message and "Network is unreachable" in message
    assert not (tmp_path / name / "evaluation_metadata.jsonl").exists()


def test_http_errors_name_the_status(tmp_path, monkeypatch):
    def not_found(url, *args, **kwargs):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(urllib.request, "urlopen", not_found)
    with pytest.raises(BenchmarkError, match=r"HTTP 404 Not Found; check the ref, or pass --prompts PATH"):
        download("geneval", tmp_path, ref="no-such-branch")
