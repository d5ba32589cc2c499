"""Evaluation outputs, second pass: the library scorers' default results file lies beside the scored
folder, named after it (sibling folders and a protocol run keep their own), scores files' results links
survive a moved folder (old absolute records too), T2I-CompBench records its scorers once, and
scorer_record's hub-commit and CLIP paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import fusedit.eval.run as run_mod
from fusedit.config import ConfigError
from fusedit.eval.compbench import score_compbench, write_compbench_samples
from fusedit.eval.dpg import score_dpg_folder, write_dpg_grids
from fusedit.eval.fid import results_beside
from fusedit.eval.geneval import score_geneval_folder, write_geneval_samples
from test_compbench import StubVQA, colour_generate
from test_dpg import colour_generate as grid_generate
from test_dpg import fake_vqa, questions_csv  # noqa: F401 (a fixture)
from test_fid import save_tiny_clip
from test_geneval import det, save_tiny_detr, solid

COW = {"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}


def sees_a_cow(image):
    return [det("cow", 0.8)]


# --------------------------------------------------------------------------------------------------
# 1. The library scorers' default results file


def test_geneval_library_scoring_writes_its_results_beside_the_images_named_after_them(tmp_path, monkeypatch):
    samples = tmp_path / "out" / "samples"
    write_geneval_samples([COW], lambda p, s, n: [solid((200, 20, 20))] * n, samples, progress=False)
    before = sorted(p.relative_to(samples) for p in samples.rglob("*"))
    scores = score_geneval_folder(samples, sees_a_cow, None, progress=False)
    # OUT/samples-results.jsonl: nothing among the images, and not the protocol's OUT/results.jsonl
    assert scores["results_file"] == str(tmp_path / "out" / "samples-results.jsonl")
    assert len((tmp_path / "out" / "samples-results.jsonl").read_text().splitlines()) == 4
    assert sorted(p.relative_to(samples) for p in samples.rglob("*")) == before
    # "." is the images folder itself: its results go to its parent too, under its name, not into it
    monkeypatch.chdir(samples)
    again = score_geneval_folder(".", sees_a_cow, None, progress=False)
    assert again["results_file"] == str(tmp_path / "out" / "samples-results.jsonl")
    assert sorted(p.relative_to(samples) for p in samples.rglob("*")) == before


def test_dpg_library_scoring_writes_its_results_beside_the_grids_named_after_them(tmp_path, questions_csv):  # noqa: F811
    grids = tmp_path / "out" / "grids"
    write_dpg_grids([("0", "A red ball, on a table.")], grid_generate([]), grids, progress=False)
    result = score_dpg_folder(grids, questions_csv, fake_vqa, progress=False)
    assert result["results_file"] == str(tmp_path / "out" / "grids-results.jsonl")
    assert json.loads((tmp_path / "out" / "grids-results.jsonl").read_text())["name"] == "0"
    # ELLA's scorer reads every file among the grids as one: none but the grid is there
    assert sorted(p.name for p in grids.iterdir()) == ["0.png"]


def test_sibling_folders_scored_with_the_default_keep_their_own_results(tmp_path, questions_csv):  # noqa: F811
    """Folders with one parent (after "." and ".." resolve) shared parent/results.jsonl: the second scored
    replaced the first's verdicts, across GenEval and DPG-Bench too. Folders under different parents
    (out/run-a/samples, out/run-b/samples) never shared one."""
    out = tmp_path / "out"
    write_geneval_samples([COW], lambda p, s, n: [solid((200, 20, 20))] * n, out / "a", progress=False)
    write_geneval_samples([COW], lambda p, s, n: [solid((200, 20, 20))] * n, out / "b", 2, progress=False)
    write_dpg_grids([("0", "A red ball, on a table.")], grid_generate([]), out / "grids", progress=False)
    (out / "x").mkdir()
    a = score_geneval_folder(out / "a", sees_a_cow, None, progress=False)
    b = score_geneval_folder(out / "x" / ".." / "b", sees_a_cow, None, progress=False)
    grids = score_dpg_folder(out / "grids", questions_csv, fake_vqa, progress=False)
    files = [a["results_file"], b["results_file"], grids["results_file"]]
    assert files == [
        str(out / "a-results.jsonl"),
        str(out / "b-results.jsonl"),
        str(out / "grids-results.jsonl"),
    ]
    assert len(Path(files[0]).read_text().splitlines()) == 4  # a's four images, not b's two
    assert len(Path(files[1]).read_text().splitlines()) == 2
    assert json.loads(Path(files[2]).read_text())["name"] == "0"


@pytest.mark.parametrize("given", ["samples", "samples/", "./samples//", "x/../samples", "."])
def test_the_default_results_file_is_named_after_the_folder_however_it_is_written(
    given, tmp_path, monkeypatch
):
    """A trailing slash, "." and ".." go before the name is taken, so every spelling of OUT/samples (".": run
    from inside it) gets OUT/samples-results.jsonl."""
    (tmp_path / "out" / "samples").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "out" / ("samples" if given == "." else ""))
    assert results_beside(given) == tmp_path / "out" / "samples-results.jsonl"


@pytest.mark.parametrize(
    ("given", "cwd"), [("/", None), ("//", None), ("/..", None), (".", "/"), ("..", "/")]
)
def test_the_filesystem_root_has_no_default_results_file(given, cwd, monkeypatch):
    """The root has no name to give the file and no parent to hold it: it was "/-results.jsonl" (or
    "//-results.jsonl"), a nameless file among the images scored. Refused in one line, naming the value and
    the way out, whichever way the root is spelt or reached."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError) as refused:
        results_beside(given)
    message = str(refused.value)
    assert message.startswith(f"the images folder {given!r} is the filesystem root ")
    assert message.endswith("pass out_file (the results file to write)") and "\n" not in message


def test_library_scoring_of_a_protocol_folder_leaves_the_runs_results(tmp_path, monkeypatch):
    """scores.json names OUT/results.jsonl; scoring OUT/samples (or a copy beside it) from Python wrote
    that file, so the scores file named verdicts it did not sum."""
    out = tmp_path / "out"
    write_geneval_samples([COW], lambda p, s, n: [solid((200, 20, 20))] * n, out / "samples", progress=False)
    result = {}
    scores = score_geneval_folder(
        out / "samples", sees_a_cow, None, out_file=run_mod.output_files(out)[1], progress=False
    )
    run_mod.with_scores(result, out, {**scores, "limit": None})
    protocol = (out / "results.jsonl").read_text()
    shutil.copytree(out / "samples", out / "samples-copy")
    score_geneval_folder(out / "samples", lambda image: [], None, progress=False)
    score_geneval_folder(out / "samples-copy", lambda image: [], None, progress=False)
    recorded = json.loads((out / "scores.json").read_text())["results_file"]
    assert run_mod.results_path(out / "scores.json", recorded).read_text() == protocol
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "results.jsonl",
        "samples-copy-results.jsonl",
        "samples-results.jsonl",
    ]


def test_a_replaced_record_takes_the_library_results_of_its_images_aside(tmp_path):
    """OUT/samples-results.jsonl, a library scoring of OUT/samples, described the images that are gone."""
    out, record = tmp_path / "out", {"checkpoint": "step_2", "steps": 2}
    (out / "samples").mkdir(parents=True)
    run_mod.claim_folder(out, out / "samples", record, "geneval", 42, 4)
    (out / "samples-results.jsonl").write_text("{}\n")
    (out / "grids-results.jsonl").write_text("{}\n")  # another folder's: stays
    run_mod.claim_folder(out, out / "samples", {**record, "steps": 3}, "geneval", 42, 4)
    assert sorted(p.name for p in (out / "replaced-1").iterdir()) == [
        "generation.json",
        "samples-results.jsonl",
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "generation.json",
        "grids-results.jsonl",
        "replaced-1",
        "samples",
    ]


# --------------------------------------------------------------------------------------------------
# 2. Scores files' results links


def test_a_moved_protocol_folder_keeps_its_scores_results_link(tmp_path):
    out = tmp_path / "out"
    samples = out / "samples"
    write_geneval_samples([COW], lambda p, s, n: [solid((200, 20, 20))] * n, samples, progress=False)
    result = {}
    scores = score_geneval_folder(
        samples, sees_a_cow, None, out_file=out / "results-first1.jsonl", progress=False
    )
    run_mod.with_scores(result, out, {**scores, "limit": 1})
    recorded = json.loads((out / "scores-first1.json").read_text())["results_file"]
    assert recorded == "results-first1.jsonl"
    moved = out.rename(tmp_path / "elsewhere")
    assert run_mod.results_path(moved / "scores-first1.json", recorded) == moved / "results-first1.jsonl"
    # T2I-CompBench's, one per category folder
    assert (
        run_mod.results_path(moved / "scores.json", "color/results.jsonl")
        == moved / "color" / "results.jsonl"
    )


@pytest.mark.parametrize(
    "bench, images, name", [("geneval", "samples", "results.jsonl"), ("dpg", "grids", "dpg_results.jsonl")]
)
def test_an_old_scores_files_absolute_results_path_is_read_where_it_is_or_where_it_moved(
    tmp_path, monkeypatch, bench, images, name
):
    """Before 2026-11-25 a scores file named the path its results were written to, among the images:
    absolute, or relative to the working directory of the run."""
    out = tmp_path / "out"
    (out / images).mkdir(parents=True)
    (out / images / name).write_text("{}\n")
    absolute = str(out / images / name)
    assert run_mod.results_path(out / "scores.json", absolute) == out / images / name
    monkeypatch.chdir(tmp_path)
    assert run_mod.results_path(out / "scores.json", f"out/{images}/{name}") == out / images / name
    # A copy of OUT reads its own file, not the original's that still lies at the recorded path.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for recorded in (absolute, f"out/{images}/{name}"):
        assert run_mod.results_path(copy / "scores.json", recorded) == copy / images / name
    (copy / images / name).unlink()  # the copy's own gone: the recorded path, which the caller's error names
    assert run_mod.results_path(copy / "scores.json", absolute) == Path(absolute)
    moved = out.rename(tmp_path / "moved")
    for recorded in (absolute, f"out/{images}/{name}"):  # both gone: the same place under the scores' folder
        assert run_mod.results_path(moved / "scores.json", recorded) == moved / images / name
    # neither there: the place recorded, for the caller's refusal to name
    (moved / images / name).unlink()
    assert run_mod.results_path(moved / "scores.json", absolute) == Path(absolute)


def test_moving_a_legacy_results_file_out_mends_the_scores_file_naming_it(tmp_path):
    out = tmp_path / "out"
    (out / "grids").mkdir(parents=True)
    (out / "grids" / "dpg_results.jsonl").write_text('{"name": "0"}\n')
    (out / "scores.json").write_text(
        json.dumps({"overall": 0.5, "results_file": str(out / "grids/dpg_results.jsonl")})
    )
    other = {"overall": 0.25, "results_file": "results-first2.jsonl"}
    (out / "scores-first2.json").write_text(json.dumps(other))
    run_mod.move_legacy_results(out, "dpg")
    scores = json.loads((out / "scores.json").read_text())
    assert scores == {"overall": 0.5, "results_file": "results-legacy.jsonl"}
    assert run_mod.results_path(out / "scores.json", scores["results_file"]).read_text() == '{"name": "0"}\n'
    assert json.loads((out / "scores-first2.json").read_text()) == other  # named another file: untouched


# --------------------------------------------------------------------------------------------------
# 3, 4. T2I-CompBench: the scorers record built once; the scores files each category fed, in one pass


def test_score_compbench_records_its_scorers_as_the_scores_file_does(tmp_path):
    color = tmp_path / "out" / "color" / "samples"
    write_compbench_samples(["a red ball"], colour_generate([]), color, 1, 42, False)
    vqa = StubVQA("Salesforce/blip-vqa-capfilt-large")
    vqa.model = type("Loaded", (), {"config": type("Config", (), {"_commit_hash": "0ab1"})()})()
    scores = score_compbench(
        tmp_path / "out", {"color": ["a red ball"]}, n_per_prompt=1, vqa=vqa, progress=False
    )
    # the models given only, each as scorer_record (a hub id at its commit), and the text rules' name
    assert scores["scorers"] == {
        "vqa": {
            "id": "Salesforce/blip-vqa-capfilt-large",
            "fingerprint": "Salesforce/blip-vqa-capfilt-large@0ab1",
        },
        "text": "rules",
    }
    assert scores["per_category"] == {"color": 0.9}  # one noun phrase, "a red ball", of a red image


def test_fed_scores_names_each_categorys_scores_files(tmp_path, monkeypatch):
    for name in ("scores.json", "scores-color-spatial.json", "scores-spatial.json", "scores-first2.json"):
        (tmp_path / name).write_text("{}")
    globs = []
    real_glob = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: globs.append(pattern) or real_glob(self, pattern))
    fed = run_mod.fed_scores(tmp_path, ["color", "spatial", "shape"])
    assert fed == {
        "color": [tmp_path / "scores-color-spatial.json", tmp_path / "scores.json"],
        "spatial": [
            tmp_path / "scores-color-spatial.json",
            tmp_path / "scores-spatial.json",
            tmp_path / "scores.json",
        ],
        "shape": [tmp_path / "scores.json"],
    }
    assert globs == ["scores*.json"]


# --------------------------------------------------------------------------------------------------
# 5. The eval parser's flags, read back without argparse's private list


def test_the_eval_parser_gives_back_the_actions_of_its_flags():
    import argparse

    from fusedit.cli.eval import _add_eval_parser

    actions = _add_eval_parser(argparse.ArgumentParser().add_subparsers())
    dests = [a.dest for a in actions]
    assert dests[:3] == ["model", "bench", "per_category"] and dests[-3:] == ["relocate", "device", "quiet"]
    assert "help" not in dests


# --------------------------------------------------------------------------------------------------
# 6. scorer_record: a hub id's commit, through a CLIP scorer's embedder too; a folder's digest


def test_scorer_record_names_a_hub_ids_commit_and_a_folders_digest(tmp_path):
    from fusedit.eval.compbench import ClipSimilarity
    from fusedit.eval.geneval import ClipColorClassifier, TransformersDetector

    clip_folder = save_tiny_clip(tmp_path / "clip")
    colours = ClipColorClassifier(clip_folder, device="cpu")
    similarity = ClipSimilarity(clip_folder, device="cpu")
    detector = TransformersDetector(save_tiny_detr(tmp_path / "detr"), device="cpu")
    # A folder: its name and a digest of its files (no commit: loaded from disk)
    for scorer, folder in ((colours, clip_folder), (similarity, clip_folder), (detector, tmp_path / "detr")):
        record = run_mod.scorer_record(str(folder), scorer)
        assert record["id"] == str(folder) and record["fingerprint"].startswith(f"{folder.name}#")
        assert len(record["fingerprint"]) == len(folder.name) + 17
    # A hub id: the commit its loaded transformers model came from, read through .model or .clip.model
    colours.clip.model.config._commit_hash = similarity.clip.model.config._commit_hash = "c0ffee"
    detector.model.config._commit_hash = "deadbeef"
    assert run_mod.scorer_record("openai/clip-vit-large-patch14", colours) == {
        "id": "openai/clip-vit-large-patch14",
        "fingerprint": "openai/clip-vit-large-patch14@c0ffee",
    }
    assert run_mod.scorer_record("openai/clip-vit-base-patch32", similarity)["fingerprint"] == (
        "openai/clip-vit-base-patch32@c0ffee"
    )
    assert (
        run_mod.scorer_record("facebook/detr-resnet-50", detector)["fingerprint"]
        == "facebook/detr-resnet-50@deadbeef"
    )
    # no commit known (a stub, or a model without one): the id alone; a feature extractor's own fingerprint
    assert run_mod.scorer_record("some/hub-id", object()) == {
        "id": "some/hub-id",
        "fingerprint": "some/hub-id",
    }
    assert run_mod.scorer_record("transformers:x", fingerprint="x#0") == {
        "id": "transformers:x",
        "fingerprint": "x#0",
    }


# --------------------------------------------------------------------------------------------------
# 7. Long work shows its progress


def test_unpacking_the_mjhq_images_shows_its_progress(tmp_path, monkeypatch, capsys):
    """30,000 images: the unpacking after the download (which has its bar) showed nothing for minutes."""
    import zipfile

    import fusedit.eval.benchmarks as benchmarks
    from test_mjhq import mjhq_folder

    source = tmp_path / "hub" / "main"
    source.mkdir(parents=True)
    meta, refs = mjhq_folder(tmp_path)
    (source / "meta_data.json").write_bytes(meta.read_bytes())
    images = sorted(refs.rglob("*.jpg"))
    with zipfile.ZipFile(source / "mjhq30k_imgs.zip", "w") as bundle:
        for path in images:
            bundle.write(path, f"mjhq30k_imgs/{path.parent.name}/{path.name}")
    monkeypatch.setattr(benchmarks, "MJHQ_URL", (tmp_path / "hub").as_uri() + "/{ref}/{name}")
    benchmarks.download("mjhq", tmp_path / "data", images=True, progress=True)
    assert (
        f"MJHQ-30K images, unpacking: 100%|██████████| {len(images)}/{len(images)}" in capsys.readouterr().err
    )


def test_the_scorers_refuse_the_root_before_they_score(questions_csv, monkeypatch):  # noqa: F811
    """GenEval's and DPG-Bench's folder scorers name their results file before scoring: the root (no place
    beside it) is refused at once, not after a whole folder's scoring (or, with nothing to score there, as
    a folder holding no samples)."""

    def never(*args):
        raise AssertionError("scored")

    monkeypatch.chdir("/")
    for score in (
        lambda: score_geneval_folder("/", never, None, progress=False),
        lambda: score_dpg_folder(".", questions_csv, never, progress=False),
    ):
        with pytest.raises(ConfigError, match=r" is the filesystem root '/', which has no parent"):
            score()
