"""What a protocol run leaves in its output folder and says about it: each scores file keeps its own
per-image results, records what made and what scored its images, stale scores go aside with a replaced
record, and the lines name the scale, the distance and the way to score unscored images."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import numpy as np
import torch

import fusedit.eval.benchmarks as benchmarks
import fusedit.eval.dpg as dpg_mod
import fusedit.eval.run as run_mod
from fusedit.cli import main
from fusedit.config import ConfigError
from fusedit.eval.run import run_dpg, run_geneval
from test_benchmarks import make_archive
from test_eval_run import (
    FIVE,
    dpg_folder,
    generate,
    scorers,  # noqa: F401 (a fixture)
    sees_a_cow,
    write_jsonl,
)
from test_mjhq import mjhq_folder

RECORD = {"checkpoint": "step_00000004", "weights": "abc", "ema": True, "steps": 2, "model": "/runs/a/ckpt"}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_limit_run_keeps_the_full_runs_per_image_results(tmp_path, monkeypatch, scorers):  # noqa: F811
    """A full run's scores.json named samples/results.jsonl, which a later --limit run rewrote with its
    own few rows; each scores file now has its own results file, beside it, named relative to the folder."""
    sees_a_cow(monkeypatch)
    path, out = write_jsonl(tmp_path / "5.jsonl", FIVE), tmp_path / "out"
    detector = scorers["detector"]
    run_geneval(generate([]), path, out, detector=detector, clip=None, progress=False, record=RECORD)
    run_geneval(generate([]), path, out, detector=detector, clip=None, limit=2, progress=False, record=RECORD)
    full, part = (json.loads((out / n).read_text()) for n in ("scores.json", "scores-first2.json"))
    assert (full["results_file"], part["results_file"]) == ("results.jsonl", "results-first2.jsonl")
    assert (full["num_images"], len(lines(out / "results.jsonl"))) == (20, 20)
    assert (part["num_images"], len(lines(out / "results-first2.jsonl"))) == (8, 8)
    assert not list((out / "samples").glob("results*"))


def test_a_dpg_limit_run_keeps_the_full_runs_results_outside_the_grids(tmp_path, monkeypatch, scorers):  # noqa: F811
    monkeypatch.setattr(dpg_mod, "TransformersVQA", lambda model_id, device: lambda image, q: "yes")
    prompts, out = dpg_folder(tmp_path / "five", range(5)), tmp_path / "out"
    run_dpg(generate([]), prompts, out, vqa=scorers["vqa"], progress=False)
    run_dpg(generate([]), prompts, out, vqa=scorers["vqa"], limit=2, progress=False)
    assert json.loads((out / "scores.json").read_text())["results_file"] == "results.jsonl"
    assert [r["name"] for r in lines(out / "results.jsonl")] == ["0", "1", "2", "3", "4"]
    assert [r["name"] for r in lines(out / "results-first2.jsonl")] == ["0", "1"]
    # ELLA's scorer reads every file of the grid folder as a grid.
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"{i}.png" for i in range(5)]


def test_scores_record_what_made_and_what_scored_the_images(tmp_path, monkeypatch, scorers):  # noqa: F811
    sees_a_cow(monkeypatch)
    path, out = write_jsonl(tmp_path / "1.jsonl", FIVE[:1]), tmp_path / "out"
    detector = scorers["detector"]
    run_geneval(generate([]), path, out, detector=detector, clip=None, progress=False, record=RECORD)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["generation"] == json.loads((out / "generation.json").read_text())
    assert scores["generation"]["checkpoint"] == "step_00000004"
    assert list(scores["scorers"]) == ["detector"]
    assert scores["scorers"]["detector"]["id"] == detector
    assert scores["scorers"]["detector"]["fingerprint"].startswith("detr#")
    monkeypatch.setattr(dpg_mod, "TransformersVQA", lambda model_id, device: lambda image, q: "yes")
    prompts = dpg_folder(tmp_path / "dpg", range(2))
    r = run_dpg(
        generate([]), prompts, tmp_path / "dpg-out", vqa=scorers["vqa"], progress=False, record=RECORD
    )
    assert r["scores"]["scorers"]["vqa"]["id"] == scorers["vqa"]
    assert r["scores"]["generation"]["bench"] == "dpg"
    # DPG-Bench's numbers say their scale: published scores are the overall x 100.
    assert r["scores"]["scale"] == "fractions in [0, 1]; DPG-Bench publishes the overall x 100"


def test_a_replaced_record_takes_the_scores_of_its_images_aside(tmp_path, monkeypatch, scorers, caplog):  # noqa: F811
    """The images were deleted and the run repeated with other settings: the old scores, next to a record of
    the new images, would read as theirs."""
    sees_a_cow(monkeypatch)
    path, out = write_jsonl(tmp_path / "2.jsonl", FIVE[:2]), tmp_path / "out"
    detector = scorers["detector"]
    run_geneval(generate([]), path, out, detector=detector, clip=None, limit=1, progress=False, record=RECORD)
    run_geneval(generate([]), path, out, detector=detector, clip=None, progress=False, record=RECORD)
    names = ["generation.json", "results-first1.jsonl", "results.jsonl", "scores-first1.json", "scores.json"]
    shutil.rmtree(out / "samples")
    # Only the informational model path differs: the same generation, nothing is moved.
    moved = {**RECORD, "model": "/elsewhere/ckpt"}
    run_geneval(generate([]), path, out, detector=None, clip=None, progress=False, record=moved)
    assert not list(out.glob("replaced-*"))
    old = {n: (out / n).read_text() for n in names}
    shutil.rmtree(out / "samples")
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_geneval(
            generate([]), path, out, detector=None, clip=None, progress=False, record={**RECORD, "steps": 3}
        )
    aside = out / "replaced-1"
    assert sorted(p.name for p in aside.iterdir()) == names
    assert {n: (aside / n).read_text() for n in names} == old
    assert json.loads((out / "generation.json").read_text())["steps"] == 3
    assert not list(out.glob("scores*")) and not list(out.glob("results*"))
    assert caplog.messages[-1] == (
        f"{out / 'generation.json'} described other images (steps=2, now 3), which are gone: moved it and 4 "
        f"scores/results file(s) to {aside}"
    )


def test_a_limit_over_the_whole_benchmark_is_the_full_run(tmp_path, monkeypatch, scorers):  # noqa: F811
    sees_a_cow(monkeypatch)
    path, out = write_jsonl(tmp_path / "5.jsonl", FIVE), tmp_path / "out"
    r = run_geneval(
        generate([]), path, out, detector=scorers["detector"], clip=None, limit=600, progress=False
    )
    assert (r["scores"]["limit"], r["scores_file"]) == (None, str(out / "scores.json"))
    assert sorted(p.name for p in out.glob("*.json*")) == ["results.jsonl", "scores.json"]


def test_the_eval_records_the_checkpoint_folder_and_says_how_to_score(tiny_run, tmp_path, capsys):
    """The record names the checkpoint's folder (wherever --out is), not compared on resume; a run without
    scoring models ends with the command that scores its images."""
    prompts = write_jsonl(tmp_path / "p.jsonl", FIVE[:1])
    out = tmp_path / "ge"
    ckpt = tiny_run / "checkpoints" / "step_00000000"
    command = ["eval", str(tiny_run), "--bench", "geneval", "--prompts", str(prompts), "--out", str(out)]
    command += ["--steps", "1", "--device", "cpu", "--quiet"]
    assert main(command) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["model"] == str(ckpt.resolve())
    assert capsys.readouterr().out.splitlines()[-1] == (
        "geneval: the images were not scored (no --detector / --clip); score them with `fusedit eval "
        f"{ckpt} --bench geneval --prompts {prompts} --out {out} --steps 1 --device cpu --detector "
        "facebook/mask2former-swin-small-coco-instance --clip openai/clip-vit-large-patch14`, or with "
        f"GenEval's evaluation/evaluate_images.py on {out / 'samples'}"
    )
    (out / "generation.json").write_text(json.dumps({**record, "model": "/moved/away"}))
    assert main(command) == 0  # a moved run's images are still its images
    assert "(1 prompt: 0 generated, 1 already there)" in capsys.readouterr().out


def test_an_unscored_dpg_run_names_the_vqa_flag_and_ellas_script(tiny_run, tmp_path, capsys):
    prompts, out = dpg_folder(tmp_path / "dpg", range(1)), tmp_path / "dpg-out"
    command = ["eval", str(tiny_run), "--bench", "dpg", "--prompts", str(prompts), "--out", str(out)]
    assert main([*command, "--steps", "1", "--no-ema", "--device", "cpu", "--quiet"]) == 0
    ckpt = tiny_run / "checkpoints" / "step_00000000"
    assert capsys.readouterr().out.splitlines()[-1] == (
        "dpg: the images were not scored (no --vqa); score them with `fusedit eval "
        f"{ckpt} --bench dpg --prompts {prompts} --out {out} --steps 1 --no-ema --device cpu --vqa "
        "Salesforce/blip-vqa-capfilt-large` (it needs DPG-Bench's dpg_bench.csv in or beside the prompts "
        f"folder), or with ELLA's dpg_bench/compute_dpg_bench.py on {out / 'grids'}"
    )


def test_the_how_to_score_command_repeats_every_flag_given():
    """Each flag that made the images (or names what was scored) comes back as given: one left out (--device
    on a machine whose auto is another device, --relocate) would refuse the folder or load nothing."""
    from fusedit.cli import build_parser
    from fusedit.cli.eval import _unscored_line

    given = ["eval", "run", "--bench", "geneval", "--prompts", "p.jsonl", "--out", "o", "--steps", "3"]
    given += ["--guidance", "4.5", "--size", "64", "--seed", "7", "--limit", "2", "--no-ema", "--device"]
    given += ["cpu", "--relocate", "text.model_id=/m", "--relocate", "vae.model_id=/v", "--quiet"]
    args = build_parser().parse_args(given)
    line = _unscored_line(args, Path(args.out), "run/checkpoints/step_5")
    command = shlex.split(line.split("`")[1])
    again = build_parser().parse_args(command[1:])
    scoring = {
        "detector": "facebook/mask2former-swin-small-coco-instance",
        "clip": "openai/clip-vit-large-patch14",
    }
    placed = {"model": "run/checkpoints/step_5", "quiet": False, "func": args.func}
    assert vars(again) == {**vars(args), **scoring, **placed}


class ChannelFeatures:
    """A feature model that is not Inception: each image's channel means and deviations."""

    id, fingerprint = "transformers:my-dino", "my-dino#0"

    def __call__(self, images):
        arrays = [np.asarray(i.convert("RGB"), dtype=np.float64) / 255 for i in images]
        return torch.tensor([[*a.mean((0, 1)), *a.std((0, 1))] for a in arrays])


def test_mjhq_names_a_distance_over_other_features_fd_and_warns_of_few_samples(
    tiny_run, tmp_path, capsys, caplog, monkeypatch
):
    """As `fusedit fid`: FID only over clean-fid's Inception features, and a warning below 1000 images."""
    import fusedit.eval.inception

    monkeypatch.setattr(
        fusedit.eval.inception, "feature_extractor", lambda features, device: ChannelFeatures()
    )
    meta, refs = mjhq_folder(tmp_path)
    out = tmp_path / "mjhq"
    command = ["eval", str(tiny_run), "--bench", "mjhq", "--prompts", str(meta), "--per-category", "2"]
    command += ["--reference", str(refs), "--features", "my-dino", "--cache-dir", str(tmp_path / "c")]
    with caplog.at_level(logging.WARNING, logger="fusedit.cli"):
        assert main([*command, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .startswith(f"FD (my-dino features): {scores['overall']:.3f} over 6 samples; per category ")
    )
    assert scores["scorers"] == {"features": {"id": "transformers:my-dino", "fingerprint": "my-dino#0"}}
    assert scores["generation"]["bench"] == "mjhq"
    assert (
        f"the MJHQ-30K sample set in {out} holds 6 images: FD over fewer than 1000 images is dominated by "
        "small-sample bias (published FID uses 10k-50k); compare only scores over the same number"
    ) in caplog.messages


def test_dpg_downloads_its_pinned_commit_and_records_it(tmp_path, monkeypatch):
    pinned = tmp_path / "3c228f1dc6c4d3cad0a47493816151a419f14db3"
    pinned.mkdir()
    make_archive(pinned / "ella.tar.gz")
    monkeypatch.setattr(benchmarks, "DPG_ARCHIVE_URL", tmp_path.as_uri() + "/{ref}/ella.tar.gz")
    dest = benchmarks.download("dpg", tmp_path / "dpg", progress=False)
    assert json.loads((dest / "SOURCE.json").read_text()) == {
        "benchmark": "dpg",
        "ref": pinned.name,
        "source": "github.com/TencentQQGYLab/ELLA",
    }


def test_record_changes_leave_out_the_informational_path():
    assert run_mod.record_changes({**RECORD, "steps": 3}, {**RECORD, "model": "/b"}) == ["steps"]


def test_the_suggested_command_scores_the_images_without_generating(
    tiny_run,
    tmp_path,
    capsys,
    monkeypatch,
    scorers,  # noqa: F811
):
    """Run as printed (the tiny detector for Mask2Former; no colour prompt, so no --clip) on a machine whose
    --device auto is another device, where the model would run in bf16: the folder's images, made on the
    CPU in fp32, are scored, and no model is loaded."""
    import fusedit.sampling.source
    import fusedit.system as system

    prompts, out = write_jsonl(tmp_path / "p.jsonl", FIVE[:1]), tmp_path / "ge"
    command = ["eval", str(tiny_run), "--bench", "geneval", "--prompts", str(prompts), "--out", str(out)]
    assert main([*command, "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    words = shlex.split(capsys.readouterr().out.splitlines()[-1].split("`")[1])[1:]
    words[words.index("--detector") + 1] = scorers["detector"]
    del words[words.index("--clip") : words.index("--clip") + 2]
    cpu, precision = system.resolve_device, system.precision_name
    monkeypatch.setattr(
        system,
        "resolve_device",
        lambda name, setting="device": torch.device("meta") if name == "auto" else cpu(name, setting),
    )
    monkeypatch.setattr(
        system, "precision_name", lambda p, d: "bf16" if d.type == "meta" else precision(p, d)
    )

    def no_load(*args, **kwargs):
        raise AssertionError("scoring kept images loads no model")

    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", no_load)
    assert main([*words, "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "(1 prompt: 0 generated, 1 already there)" in said
    assert said.splitlines()[-1] == (
        f"overall 0.0000 over 1 prompt (1 of 6 tasks: single_object); details in {out / 'scores.json'}"
    )
    assert json.loads((out / "scores.json").read_text())["num_images"] == 4


def test_a_record_without_images_or_scores_is_replaced_in_place(tmp_path, caplog):
    """A run stopped before its first image, rerun with other settings (or its record damaged): nothing
    described images, so nothing goes aside and nothing is said."""
    path, out = write_jsonl(tmp_path / "1.jsonl", FIVE[:1]), tmp_path / "out"
    out.mkdir()
    (out / "generation.json").write_text(json.dumps({**RECORD, "steps": 9}))
    for damaged in (False, True):
        if damaged:
            shutil.rmtree(out / "samples")
            (out / "generation.json").write_text("")
        with caplog.at_level(logging.WARNING, logger="fusedit"):
            run_geneval(generate([]), path, out, detector=None, clip=None, progress=False, record=RECORD)
        assert json.loads((out / "generation.json").read_text())["steps"] == 2
        assert not list(out.glob("replaced-*")) and not caplog.messages


def test_a_damaged_record_beside_scores_goes_aside_with_them(tmp_path, caplog):
    path, out = write_jsonl(tmp_path / "1.jsonl", FIVE[:1]), tmp_path / "out"
    out.mkdir()
    (out / "generation.json").write_text("{")
    (out / "scores.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_geneval(generate([]), path, out, detector=None, clip=None, progress=False, record=RECORD)
    aside = out / "replaced-1"
    assert sorted(p.name for p in aside.iterdir()) == ["generation.json", "scores.json"]
    assert caplog.messages == [
        f"{out / 'generation.json'} is not readable JSON and its images are gone: moved it and 1 "
        f"scores/results file(s) to {aside}"
    ]


def test_scores_name_the_generation_json_of_a_moved_or_older_folder(tmp_path, monkeypatch, scorers):  # noqa: F811
    """The record is written again when only its informational model path differs (a moved run, or a folder
    recorded before the path was), so that the scores' generation is what generation.json holds."""
    sees_a_cow(monkeypatch)
    path, out = write_jsonl(tmp_path / "1.jsonl", FIVE[:1]), tmp_path / "out"
    run_geneval(generate([]), path, out, detector=None, clip=None, progress=False, record=RECORD)
    moved = {**RECORD, "model": "/moved/away"}
    for saved in (moved, {k: v for k, v in RECORD.items() if k != "model"}):
        record = {k: v for k, v in json.loads((out / "generation.json").read_text()).items() if k != "model"}
        (out / "generation.json").write_text(json.dumps({**record, **saved}))
        r = run_geneval(
            generate([]), path, out, detector=scorers["detector"], clip=None, progress=False, record=RECORD
        )
        written = json.loads((out / "generation.json").read_text())
        assert written["model"] == "/runs/a/ckpt"
        assert (
            json.loads((out / "scores.json").read_text())["generation"]
            == written
            == r["scores"]["generation"]
        )


def test_an_earlier_runs_results_among_the_images_move_beside_the_scores(tmp_path, monkeypatch, caplog):
    """fusedit wrote DPG's grids/dpg_results.jsonl and GenEval's samples/results.jsonl before they moved
    beside the scores; ELLA's scorer reads every file among the grids as one."""
    monkeypatch.setattr(dpg_mod, "TransformersVQA", lambda model_id, device: lambda image, q: "yes")
    prompts, out = dpg_folder(tmp_path / "dpg", range(2)), tmp_path / "dpg-out"
    run_dpg(generate([]), prompts, out, vqa=None, progress=False)
    (out / "grids" / "dpg_results.jsonl").write_text('{"name": "0"}\n')
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        run_dpg(generate([]), prompts, out, vqa=None, progress=False)
    assert (out / "results-legacy.jsonl").read_text() == '{"name": "0"}\n'
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["0.png", "1.png"]
    assert caplog.messages == [
        f"moved {out / 'grids' / 'dpg_results.jsonl'}, an earlier run's results file, out of the images to "
        f"{out / 'results-legacy.jsonl'}"
    ]
    path, out = write_jsonl(tmp_path / "1.jsonl", FIVE[:1]), tmp_path / "ge"
    run_geneval(generate([]), path, out, detector=None, clip=None, progress=False)
    (out / "samples" / "results.jsonl").write_text("{}\n")
    run_geneval(generate([]), path, out, detector=None, clip=None, progress=False)
    assert (out / "results-legacy.jsonl").read_text() == "{}\n"
    assert not (out / "samples" / "results.jsonl").exists()


def test_mjhq_warns_of_a_small_category_before_sampling(tiny_run, tmp_path, caplog, monkeypatch):
    """Enough samples in all, but the per-category FD the line names is over one category's few; said
    before the hours of sampling, as `fusedit fid` says it before reading its folders."""
    import fusedit.cli.eval as cli_eval
    import fusedit.eval.inception
    import fusedit.sampling.source

    monkeypatch.setattr(
        fusedit.eval.inception, "feature_extractor", lambda features, device: ChannelFeatures()
    )
    monkeypatch.setattr(cli_eval, "FEW_FOR_FID", 8)

    def no_load(*args, **kwargs):
        raise ConfigError("stopped at the load")

    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", no_load)
    meta, refs = mjhq_folder(tmp_path)
    rows = json.loads(meta.read_text())
    first = next(iter(rows))
    category = rows.pop(first)["category"]
    meta.write_text(json.dumps(rows))
    out = tmp_path / "mjhq"
    command = ["eval", str(tiny_run), "--bench", "mjhq", "--prompts", str(meta), "--reference", str(refs)]
    command += [
        "--features",
        "my-dino",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    with caplog.at_level(logging.WARNING, logger="fusedit.cli"):
        assert main([*command, "--quiet"]) == 2
    assert (
        f"the {category} category of the MJHQ-30K sample set in {out} holds 2 images: FD over fewer than 8 "
        "images is dominated by small-sample bias (published FID uses 10k-50k); compare only scores over the "
        "same number"
    ) in caplog.messages
