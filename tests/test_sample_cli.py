"""`fusedit sample`: every kind of MODEL folder (run, checkpoint, `fusedit convert` output, diffusers
pipeline), prompts from the command line and a file, batches and their seeds, the settings, the metadata
written next to each image, the progress bar, and one-line errors for bad arguments."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import randomize, tiny_config, tiny_vae
from fusedit.cli import main
from fusedit.convert.fusedit_official import export_official, load_official
from fusedit.data.shapes import vocabulary
from fusedit.imaging import to_uint8
from fusedit.sampling.folder import write_sample_folder
from fusedit.sampling.generation import SEED_MAX, generate, sample_settings
from fusedit.sampling.source import load_sampling_model
from fusedit.system import build_model
from fusedit.text.tokenizer import word_tokenizer
from fusedit.train.checkpoint import save_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "fusedit-official-tiny" / "transformer"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A run folder whose EMA differs from its raw weights, its checkpoint folder, the diffusers pipeline
    `fusedit export` makes of it, a pipeline folder of the public FuseDiT code (made from the fixture that
    code saved) and its `fusedit convert` import."""
    root = tmp_path_factory.mktemp("models")
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize(model.denoiser)
    ema = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in model.denoiser.named_parameters()}
    ema = {**model.denoiser.state_dict(), **ema}
    ckpt = save_checkpoint(root / "run", 0, cfg, model.denoiser, ema, None, model.text.llm)
    assert main(["export", str(root / "run"), "--out", str(root / "pipeline")]) == 0

    # A pipeline folder as the public code saves one (utils/save_pipeline.py), imported as a user would.
    tiny_vae().save_pretrained(root / "vae")
    word_tokenizer(vocabulary()).save_pretrained(root / "tok")
    official = load_official(FIXTURE, vae=str(root / "vae"), tokenizer=str(root / "tok"))
    export_official(*official, root / "public-pipeline", layout="pipeline")
    assert main(["convert", str(root / "public-pipeline"), "--out", str(root / "converted")]) == 0
    return {
        "run": root / "run",
        "checkpoint": ckpt,
        "pipeline": root / "pipeline",
        "converted": root / "converted",
        "public": root / "public-pipeline",
    }


def sample(model, out, *args):
    return main(["sample", str(model), "--out", str(out), "--quiet", "--device", "cpu", *args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def metadata(out, i) -> dict:
    return json.loads((out / f"{i:05d}.json").read_text())


@pytest.mark.parametrize("kind", ["run", "checkpoint", "pipeline", "converted"])
def test_every_kind_of_model_folder_samples(folders, tmp_path, kind):
    out = tmp_path / "out"
    assert sample(folders[kind], out, "--prompt", "a red circle", "--steps", "2", "--size", "16") == 0
    image = Image.open(out / "00000.png")
    assert image.format == "PNG" and image.size == (16, 16)
    meta = metadata(out, 0)
    assert meta["prompt"] == "a red circle" and meta["steps"] == 2 and meta["size"] == 16
    expected = {
        "run": folders["checkpoint"],
        "converted": next((folders["converted"] / "checkpoints").glob("step_*")),
    }
    assert meta["model"] == str(expected.get(kind, folders[kind]))
    assert meta["use_ema"] is True


def test_the_metadata_says_which_weights_were_sampled(folders, tmp_path):
    """--no-ema and an export of the raw weights are recorded as such (before, the flag was written, and a
    pipeline exported with --no-ema claimed its EMA)."""
    assert sample(folders["run"], tmp_path / "raw", "--prompt", "x", "--steps", "1", "--no-ema") == 0
    assert metadata(tmp_path / "raw", 0)["use_ema"] is False
    assert main(["export", str(folders["run"]), "--out", str(tmp_path / "pipe"), "--no-ema", "--quiet"]) == 0
    assert sample(tmp_path / "pipe", tmp_path / "piped", "--prompt", "x", "--steps", "1") == 0
    assert metadata(tmp_path / "piped", 0)["use_ema"] is False
    assert np.array_equal(pixels(tmp_path / "raw" / "00000.png"), pixels(tmp_path / "piped" / "00000.png"))


@pytest.mark.parametrize("lost", ["ema.safetensors", "llm.safetensors", "denoiser.safetensors"])
def test_a_checkpoint_that_lost_a_weight_file_is_refused(folders, tmp_path, capsys, lost):
    """A partial copy of a checkpoint is refused by name; before, a lost LLM file sampled a random-init
    LLM, a lost EMA the raw weights, a lost denoiser (with --no-ema) a random DiT, each with exit status 0."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["checkpoint"], copy)
    (copy / lost).unlink()
    capsys.readouterr()
    assert sample(copy, tmp_path / "out", "--prompt", "x", "--steps", "1") == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: checkpoint {str(copy)!r} lacks {lost}, which it was saved with (a partial copy? "
        "copy the whole checkpoint folder again)\n"
    )


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _shard(path):
    """The LLM's weights as the index of two shards, the second lost."""
    path.rename(path.with_name("model-00001-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    path.with_name("model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    "file, damage, message",
    [
        ("tokenizer/tokenizer.json", Path.unlink, " lacks tokenizer/tokenizer.json, which its export wrote"),
        (
            "transformer/diffusion_pytorch_model.safetensors",
            Path.unlink,
            " lacks transformer/diffusion_pytorch_model.safetensors, which its export wrote",
        ),
        (
            "transformer/diffusion_pytorch_model.safetensors",
            _truncate,
            ": transformer/diffusion_pytorch_model.safetensors is damaged (incomplete metadata, file not fully "
            "covered)",
        ),
        (
            "text_encoder/model.safetensors",
            _shard,
            " lacks text_encoder/model-00002-of-00002.safetensors, which text_encoder/model.safetensors.index.json "
            "lists",
        ),
        (
            "scheduler/scheduler_config.json",
            Path.unlink,
            " lacks scheduler/scheduler_config.json, which its export wrote",
        ),
    ],
)
def test_a_pipeline_folder_that_lost_or_damaged_a_file_is_refused_by_name(
    folders, tmp_path, capsys, file, damage, message
):
    """A missing tokenizer.json gave a traceback advising to install sentencepiece, a missing transformer
    weights file named a .bin the export never wrote, a truncated one said "Unable to load weights" without
    a reason (h-sample R1): one line naming the file."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["pipeline"], copy)
    damage(copy / file)
    capsys.readouterr()
    assert sample(copy, tmp_path / "out", "--prompt", "x", "--steps", "1") == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: {str(copy)!r}{message}: re-export it with `fusedit export`\n"
    )


def test_a_pipeline_folder_gives_the_images_of_its_run(folders, tmp_path):
    args = ["--prompt", "a red circle", "--prompt", "two blue squares", "--steps", "2", "--seed", "3"]
    assert sample(folders["run"], tmp_path / "run", *args) == 0
    assert sample(folders["pipeline"], tmp_path / "pipe", *args) == 0
    for i in range(2):
        assert np.array_equal(
            pixels(tmp_path / "run" / f"{i:05d}.png"), pixels(tmp_path / "pipe" / f"{i:05d}.png")
        )
    # The raw weights are not the EMA the pipeline was exported with.
    assert sample(folders["run"], tmp_path / "raw", *args, "--no-ema") == 0
    assert not np.array_equal(pixels(tmp_path / "run" / "00000.png"), pixels(tmp_path / "raw" / "00000.png"))


def test_prompts_batches_seeds_settings_and_metadata(folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("two blue squares\n\n  a green triangle  \n")
    out = tmp_path / "out"
    settings = [
        "--steps",
        "2",
        "--guidance",
        "2.5",
        "--sampler",
        "heun",
        "--schedule",
        "diffusers",
        "--shift",
        "2",
        "--negative-prompt",
        "a yellow square",
    ]
    args = ["--prompt", "a red circle", "--prompts-file", str(prompts), "--batch-size", "2", "--seed", "5"]
    assert sample(folders["run"], out, *args, *settings, "--size", "8") == 0
    metas = [metadata(out, i) for i in range(3)]
    assert [m["prompt"] for m in metas] == ["a red circle", "two blue squares", "a green triangle"]
    assert [m["seed"] for m in metas] == [5, 6, 7]  # image i: seed + i, whatever the batches
    for m in metas:
        assert m == {
            **m,
            "negative_prompt": "a yellow square",
            "steps": 2,
            "guidance": 2.5,
            "size": 8,
            "width": 8,
            "height": 8,
            "sampler": "heun",
            "shift": 2.0,
            "schedule": "diffusers",
            "precision": "fp32",  # what sample.precision=auto resolved to on the CPU
            "cache_text": True,
            "use_ema": True,
        }
    assert not (out / "00003.png").exists() and Image.open(out / "grid.png").format == "PNG"

    # Each image is the one its prompt makes alone with its recorded seed (up to the rounding of other
    # batch sizes), the second image of a batch too.
    model, cfg, _ = load_sampling_model(folders["run"], "cpu")
    kw = dict(
        image_size=8,
        steps=2,
        guidance=2.5,
        sampler="heun",
        shift=2.0,
        schedule="diffusers",
        negative_prompt="a yellow square",
    )
    for i, m in enumerate(metas):
        alone = to_uint8(generate(model, [m["prompt"]], seed=m["seed"], **kw))[0]
        assert np.abs(pixels(out / f"{i:05d}.png").astype(int) - alone.astype(int)).max() <= 1, i
    one = ["--prompt", metas[1]["prompt"], "--seed", str(metas[1]["seed"])]
    assert sample(folders["run"], tmp_path / "alone", *one, *settings, "--size", "8") == 0
    difference = pixels(out / "00001.png").astype(int) - pixels(tmp_path / "alone" / "00000.png").astype(int)
    assert np.abs(difference).max() <= 1

    # The same seed makes the same image again; another seed another one.
    assert sample(folders["run"], tmp_path / "again", *args, *settings, "--size", "8") == 0
    assert np.array_equal(pixels(out / "00002.png"), pixels(tmp_path / "again" / "00002.png"))
    assert sample(folders["run"], tmp_path / "other", *args[:-1], "6", *settings, "--size", "8") == 0
    assert not np.array_equal(pixels(out / "00000.png"), pixels(tmp_path / "other" / "00000.png"))


def test_without_seed_the_models_own_sample_seed_is_taken(tmp_path):
    """sample.seed was read by training previews alone: `fusedit sample` and write_sample_folder started
    from 42 whatever the config said."""
    import dataclasses

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, seed=9))
    torch.manual_seed(0)
    model = build_model(cfg)
    save_checkpoint(
        tmp_path / "run", 0, cfg, model.denoiser, model.denoiser.state_dict(), None, model.text.llm
    )
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--steps", "1", "--size", "8"]
    assert sample(tmp_path / "run", tmp_path / "out", *args) == 0
    assert [metadata(tmp_path / "out", i)["seed"] for i in range(2)] == [9, 10]
    assert sample(tmp_path / "run", tmp_path / "given", *args, "--seed", "3") == 0
    assert metadata(tmp_path / "given", 1)["seed"] == 4
    loaded, saved, _ = load_sampling_model(tmp_path / "run", "cpu")
    paths = write_sample_folder(
        loaded,
        saved,
        ["a red circle"],
        tmp_path / "lib",
        settings=sample_settings(saved, steps=1, image_size=8),
    )
    assert json.loads(paths[0].with_suffix(".json").read_text())["seed"] == 9


def test_the_library_writes_the_folder_the_cli_writes(folders, tmp_path):
    """From Python, without the CLI: fusedit.sampling.source.load_sampling_model and
    fusedit.sampling.folder.write_sample_folder give the images, metadata and grid of `fusedit sample` with
    the same settings."""
    prompts = ["a red circle", "a blue square", "a green triangle"]
    flags = [word for prompt in prompts for word in ("--prompt", prompt)]
    cli, lib = tmp_path / "cli", tmp_path / "lib"
    assert sample(folders["run"], cli, *flags, "--steps", "2", "--seed", "3", "--batch-size", "2") == 0
    model, cfg, source = load_sampling_model(folders["run"], "cpu")
    assert source == folders["checkpoint"]
    settings = sample_settings(cfg, steps=2)
    written = write_sample_folder(
        model, cfg, prompts, lib, settings=settings, seed=3, batch_size=2, source=source, progress=False
    )
    assert written == [lib / f"{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in lib.iterdir()) == sorted(p.name for p in cli.iterdir())
    for i in range(3):
        assert metadata(lib, i) == metadata(cli, i)
        assert np.array_equal(pixels(lib / f"{i:05d}.png"), pixels(cli / f"{i:05d}.png"))
    assert np.array_equal(pixels(lib / "grid.png"), pixels(cli / "grid.png"))
    with pytest.raises(ValueError, match="batch_size=0 is not allowed"):
        write_sample_folder(model, cfg, prompts, lib, batch_size=0)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_sampling_model(tmp_path / "nothing", "cpu")


def test_the_library_refuses_an_ignored_negative_prompt_and_seeds_past_seed_max(folders, tmp_path):
    """As `fusedit sample` does: a negative prompt at guidance 1 would change nothing yet be recorded, and
    image i takes seed + i, which must stay a seed that `fusedit serve` (and `sample`) take back. Refused
    before anything is written."""
    model, cfg, _ = load_sampling_model(folders["run"], "cpu")
    out = tmp_path / "out"
    ignored = sample_settings(cfg, guidance=1.0, negative_prompt="blurry")
    message = "negative_prompt='blurry' does nothing at guidance=1.0 (no unconditional branch; allowed: "
    with pytest.raises(ValueError, match=re.escape(message)):
        write_sample_folder(model, cfg, ["a red circle"], out, settings=ignored, progress=False)
    message = (
        f"seed={SEED_MAX} is out of range (allowed: 0..{SEED_MAX - 1} for 2 images: image i takes seed + i)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        write_sample_folder(model, cfg, ["a red circle", "a blue square"], out, seed=SEED_MAX, progress=False)
    with pytest.raises(ValueError, match=re.escape(f"seed=-1 is out of range (allowed: 0..{SEED_MAX})")):
        write_sample_folder(model, cfg, ["a red circle"], out, seed=-1, progress=False)
    assert not out.exists()
    settings = sample_settings(cfg, guidance=1.0, steps=1, image_size=8)
    prompts = ["a red circle", "a blue square"]
    write_sample_folder(model, cfg, prompts, out, settings=settings, seed=SEED_MAX - 1, progress=False)
    assert [metadata(out, i)["seed"] for i in range(2)] == [SEED_MAX - 1, SEED_MAX]  # the last one may be it


def test_a_seed_whose_images_pass_seed_max_is_one_line(folders, tmp_path, capsys):
    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--seed", str(SEED_MAX), "--steps", "1"]
    assert sample(folders["run"], tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: ") and "\n" not in err
    assert (
        f"{SEED_MAX} is out of range (allowed: 0..{SEED_MAX - 1} for 2 images: image i takes seed + i)" in err
    )
    assert not (tmp_path / "out").exists()


def test_width_by_height_samples_a_wide_image(folders, tmp_path):
    """--size WIDTHxHEIGHT: a 12 px wide, 8 px tall image, the one generate makes at (8, 12), recorded as
    width and height (no "size": that one is a square's side)."""
    out = tmp_path / "wide"
    assert sample(folders["run"], out, "--prompt", "a red circle", "--steps", "2", "--size", "12x8") == 0
    assert Image.open(out / "00000.png").size == (12, 8)
    meta = metadata(out, 0)
    assert (meta["width"], meta["height"]) == (12, 8) and "size" not in meta
    model, cfg, _ = load_sampling_model(folders["run"], "cpu")
    kw = {"image_size": (8, 12), "steps": 2, "guidance": cfg.sample.guidance, "shift": cfg.sample.shift}
    alone = to_uint8(generate(model, ["a red circle"], seed=42, **kw))[0]
    assert np.array_equal(pixels(out / "00000.png"), alone)


def test_a_size_far_past_the_trained_one_is_warned_about_before_the_load(
    folders, tmp_path, caplog, monkeypatch
):
    """2048 px on a 32 px model sat at step 0 for over 10 minutes without a word: allowed, but said first."""
    monkeypatch.setattr("fusedit.sampling.source.load_sampling_model", lambda *a, **k: pytest.fail("loaded"))
    for size, warned in (("64", False), ("80", True), ("16x80", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fusedit"), pytest.raises(pytest.fail.Exception):
            sample(folders["run"], tmp_path / "o", "--prompt", "a", "--size", size)
        expected = (
            [
                f"--size {size} has 25x the pixels of the 16 px the model trained at: each step processes "
                "that many times the image tokens (attention grows with their square), and the model never "
                "saw such sizes"
            ]
            if warned
            else []
        )
        assert [r.getMessage() for r in caplog.records] == expected


@pytest.mark.parametrize("flag", [["--no-ema"], ["--relocate", "vae.model_id=/elsewhere"]])
def test_eval_refuses_a_pipeline_folders_flags_before_claiming_its_folder(folders, tmp_path, capsys, flag):
    """eval loads the model only at the first image to make: the flags a pipeline folder cannot take are
    refused before its out folder is claimed (generation.json), and also when every image is there."""
    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "7.txt").write_text("a red circle")
    out = tmp_path / "ev"
    argv = ["eval", str(folders["pipeline"]), "--bench", "dpg", "--prompts", str(tmp_path / "dpg")]
    assert main([*argv, "--out", str(out), "--quiet", *flag]) == 2
    err = capsys.readouterr().err
    assert f"needs a run or checkpoint folder: the pipeline folder {str(folders['pipeline'])!r}" in err
    assert not out.exists()


def test_a_square_written_width_by_height_is_recorded_as_one_side(folders, tmp_path):
    assert sample(folders["run"], tmp_path, "--prompt", "a red circle", "--steps", "1", "--size", "8x8") == 0
    assert metadata(tmp_path, 0)["size"] == 8


def test_a_size_that_is_not_a_number_is_refused_by_the_parser(folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        sample(folders["run"], tmp_path, "--prompt", "a", "--size", "12by8")
    assert stop.value.code == 2
    assert "'12by8' is not a size (allowed: one side in pixels for a square" in capsys.readouterr().err


def test_progress_bar_counts_every_step(folders, tmp_path, capsys):
    args = ["sample", str(folders["run"]), "--out", str(tmp_path), "--device", "cpu", "--steps", "2"]
    assert main([*args, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "sample" in captured.err and "4/4" in captured.err  # 2 batches x 2 steps
    assert f"wrote 3 images to {tmp_path}" in captured.out


def test_one_image_is_reported_in_the_singular(folders, tmp_path, capsys):
    assert sample(folders["run"], tmp_path, "--prompt", "a", "--steps", "1") == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 1 image to {tmp_path}"


def test_every_prompt_cut_to_the_limit_is_counted_in_a_last_warning(folders, tmp_path, caplog):
    long = " ".join(["a red circle"] * 100)
    with caplog.at_level("WARNING"):
        assert (
            sample(
                folders["run"],
                tmp_path,
                "--prompt",
                long,
                "--prompt",
                "a",
                "--prompt",
                long + " b",
                "--steps",
                "1",
            )
            == 0
        )
    cut = [r.getMessage() for r in caplog.records if "their ends were cut" in r.getMessage()]
    # Which ones, by image (h-sample R5): the records say it too, but a long sample's warning should.
    assert cut == [
        "2 of the 3 prompts (00000.png, 00002.png) were longer than text.max_length=16 tokens: their "
        "ends were cut"
    ]
    # A long negative prompt (one row per image under guidance) is not counted as prompts of their own.
    caplog.clear()
    flags = ["--guidance", "3", "--negative-prompt", long, "--steps", "1"]
    with caplog.at_level("WARNING"):
        assert sample(folders["run"], tmp_path / "neg", "--prompt", long, "--prompt", "a", *flags) == 0
    cut = [r.getMessage() for r in caplog.records if "end was cut" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith(
        "1 of the 2 prompts (00000.png) was longer than text.max_length="
    )


def test_a_reused_out_folder_keeps_only_the_new_sample(folders, tmp_path, caplog):
    out = tmp_path / "out"
    assert sample(folders["run"], out, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--steps", "1") == 0
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, "--prompt", "d", "--steps", "1") == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00000.png", "grid.png"]
    assert metadata(out, 0)["prompt"] == "d"
    # Warnings: finished images of the user's are replaced and deleted without --overwrite (h-sample R3).
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "earlier sample" in r.getMessage()] == [
        (
            "WARNING",
            f"an image of an earlier sample in {out} was made with other prompts or settings and will be "
            "replaced (image 0: prompt='a', not 'd')",
        ),
        ("WARNING", f"removed 2 images of an earlier sample in {out}"),
    ]


def test_a_rerun_that_keeps_every_image_removes_nothing_and_counts_what_it_wrote(
    folders, tmp_path, caplog, capsys
):
    """A rerun logged "removed 1 files" (grid.png, redrawn the same) and counted kept images as written
    (h-docs M1)."""
    out = tmp_path / "out"
    args = ("--prompt", "a", "--prompt", "b", "--steps", "1", "--batch-size", "1")
    assert sample(folders["run"], out, *args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 2 images to {out}"
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, *args) == 0
    assert "removed" not in caplog.text
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 0 images to {out} (2 kept from an earlier run)"
    (out / "00001.png").unlink()  # as a stop before the second batch's image leaves it
    assert sample(folders["run"], out, *args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote 1 image to {out} (1 kept from an earlier run)"
    caplog.clear()
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, "--prompt", "a", "--steps", "1", "--batch-size", "1") == 0
    assert f"removed an image of an earlier sample in {out}" in caplog.text


def user_folder(folder: Path) -> dict[str, bytes]:
    """A folder of a user's own images named as a sample's are, with JSON that is not a sample's record."""
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.json").write_text(json.dumps({"label": i, "prompt": "mine", "seed": i}))
    (folder / "notes.txt").write_text("mine")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_out_folder_of_other_files_is_refused_before_the_model_loads(
    folders, tmp_path, capsys, monkeypatch
):
    """Before, every NNNNN.png, NNNNN.json and grid.png in --out was deleted by its name: a user's own
    images were lost, and a run folder took the images beside its checkpoints. Only a folder that an
    earlier `fusedit sample` filled is written into."""
    import fusedit.sampling.folder
    import fusedit.sampling.source

    mine = tmp_path / "mine"
    before = user_folder(mine)
    earlier = tmp_path / "earlier"
    assert sample(folders["run"], earlier, "--prompt", "a", "--steps", "1") == 0
    (earlier / "notes.txt").write_text("mine")
    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", lambda *a, **k: pytest.fail("loaded"))
    for out, first in [
        (mine, "'00000.json'"),
        (folders["run"], "the folder 'checkpoints'"),
        (earlier, "'notes.txt'"),
    ]:
        capsys.readouterr()
        assert sample(folders["run"], out, "--prompt", "a", "--steps", "1") == 2
        assert capsys.readouterr().err == (
            f"fusedit: error: the output folder {str(out)!r} already holds other files (e.g. {first}); "
            "writing images into it would mix them (allowed: a new or empty folder, or an earlier fusedit "
            "sample's folder)\n"
        )
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    monkeypatch.undo()
    # From Python too, before any sampling.
    model, cfg, source = load_sampling_model(folders["run"], "cpu")
    monkeypatch.setattr(fusedit.sampling.folder, "generate", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="already holds other files"):
        write_sample_folder(model, cfg, ["a"], mine, source=source, progress=False)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_an_out_folder_that_cannot_be_written_fails_before_the_model_loads(
    folders, tmp_path, capsys, monkeypatch
):
    """Before, a read-only --out failed only at the first image, after the load and the first batch. As
    root every permission is granted, so the refusal of a read-only file system is imitated."""
    import errno
    import tempfile

    import fusedit.sampling.source

    monkeypatch.setattr(fusedit.sampling.source, "load_sampling_model", lambda *a, **k: pytest.fail("loaded"))

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert sample(folders["run"], tmp_path, "--prompt", "a") == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: --out {str(tmp_path)!r} cannot be written: Read-only file system (allowed: a "
        "folder you may write to, on a writable disk)\n"
    )


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_interrupted_sample_resumes_with_the_images_of_an_uninterrupted_one(
    folders, tmp_path, monkeypatch, capsys, caplog
):
    """Rerunning the command after a Ctrl+C keeps the finished batches and makes only the others, whole:
    every file is byte for byte what one uninterrupted run writes. Before, every image was made again."""
    from fusedit.sampling import folder as sample_folder
    from test_files import killed_mid_write

    prompts = [w for p in ["a red circle", "a blue square", "a", "two", "red"] for w in ("--prompt", p)]
    flags = [*prompts, "--batch-size", "2", "--steps", "2", "--seed", "7"]
    whole = tmp_path / "whole"
    assert sample(folders["run"], whole, *flags) == 0
    original, batches = sample_folder.generate, []

    def counted(model, batch, *args, stop_at=None, **kwargs):
        batches.append(batch)
        if len(batches) == stop_at:
            raise KeyboardInterrupt
        return original(model, batch, *args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(sample_folder, "generate", lambda *a, **k: counted(*a, stop_at=2, **k))
    capsys.readouterr()
    assert sample(folders["run"], out, *flags) == 130  # Ctrl+C in the second batch
    assert capsys.readouterr().err == (
        f"fusedit: interrupted: 2 of the 5 images are in {out}, without grid.png (made at the end); rerun the "
        "same command to make the rest (it keeps every finished batch)\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["00000.json", "00000.png", "00001.json", "00001.png"]
    killed_mid_write(out / "00002.png")  # and a kill -9 leaves a temporary file
    assert len(list(out.glob(".00002.png.*.tmp"))) == 1

    batches.clear()
    monkeypatch.setattr(sample_folder, "generate", counted)
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, *flags) == 0
    assert batches == [["a", "two"], ["red"]]  # the first batch is not made again
    assert "2 of the 5 images are kept from an earlier run of this sample" in caplog.text
    assert folder_bytes(out) == folder_bytes(whole)

    # Run again as it is: nothing is sampled, and grid.png is the same. A changed setting replaces them all.
    batches.clear()
    assert sample(folders["run"], out, *flags) == 0
    assert batches == [] and folder_bytes(out) == folder_bytes(whole)
    caplog.clear()
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, *prompts, "--batch-size", "2", "--steps", "1", "--seed", "7") == 0
    assert len(batches) == 3
    assert (
        f"5 images of an earlier sample in {out} were made with other prompts or settings and will be "
        "replaced (image 0: steps=2, not 1)" in caplog.text
    )
    assert [metadata(out, i)["steps"] for i in range(5)] == [1] * 5


def test_a_rerun_with_another_batch_size_or_no_cache_keeps_the_finished_images(
    folders, tmp_path, monkeypatch, caplog
):
    """Settings that change how an image is made, not what it shows, made a resumed sample start over: a
    rerun with a smaller --batch-size (to fit memory) or --no-cache made every image again (h-sample R2).
    Now they are kept, each with its own record, and the log names what differs; only images of other
    settings are made, and a replacement is a warning (R3)."""
    from fusedit.sampling import folder as sample_folder

    prompts = [w for p in ["a red circle", "a blue square", "a", "two"] for w in ("--prompt", p)]
    flags = [*prompts, "--steps", "2", "--seed", "7"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert sample(folders["run"], whole, *flags, "--batch-size", "4") == 0
    assert sample(folders["run"], out, *flags, "--batch-size", "2") == 0
    (out / "00003.png").unlink()  # as a stop in the second batch of 2 leaves it
    records = [metadata(out, i) for i in range(3)]
    original, batches = sample_folder.generate, []
    monkeypatch.setattr(
        sample_folder,
        "generate",
        lambda model, batch, *a, **k: batches.append(batch) or original(model, batch, *a, **k),
    )
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, *flags, "--batch-size", "1", "--no-cache") == 0
    assert batches == [["two"]]
    assert [metadata(out, i) for i in range(3)] == records  # kept with their own records
    assert [metadata(out, 3)[k] for k in ("batch_size", "cache_text")] == [1, False]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "INFO",
            "3 of the 4 images are kept from an earlier run of this sample, made with settings that do not "
            "change an image (image 0: batch_size=2, not 1; cache_text=True, not False)",
        )
    ]
    assert all(np.array_equal(pixels(out / f"{i:05d}.png"), pixels(whole / f"{i:05d}.png")) for i in range(4))
    # Another step count changes the images: replaced, in a warning naming it (not the batch size).
    caplog.clear()
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(folders["run"], out, *prompts[:2], "--steps", "1", "--seed", "7") == 0
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"an image of an earlier sample in {out} was made with other prompts or settings and will be "
            "replaced (image 0: steps=2, not 1)",
        ),
        ("WARNING", f"removed 3 images of an earlier sample in {out}"),
    ]


def test_an_image_whose_record_was_written_but_not_its_png_is_made_with_its_batch(
    folders, tmp_path, monkeypatch
):
    """The record comes first: a stop between the two leaves a record without its image, which the rerun
    makes, with the rest of its batch (never an image that no record marks as the sample's)."""
    from fusedit.sampling import folder as sample_folder

    flags = ["--prompt", "a", "--prompt", "b", "--prompt", "c", "--batch-size", "2", "--steps", "1"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert sample(folders["run"], whole, *flags) == 0
    assert sample(folders["run"], out, *flags) == 0
    (out / "00001.png").unlink()
    (out / "grid.png").unlink()
    original, batches = sample_folder.generate, []
    monkeypatch.setattr(
        sample_folder,
        "generate",
        lambda model, batch, *a, **k: batches.append(batch) or original(model, batch, *a, **k),
    )
    assert sample(folders["run"], out, *flags) == 0
    assert batches == [["a", "b"]]
    assert folder_bytes(out) == folder_bytes(whole)


def test_images_of_a_model_retrained_in_its_folder_are_not_kept(folders, tmp_path, caplog):
    """A folder whose weights change in place (a re-export, a retrained run's checkpoint) keeps its path: the
    weights' fingerprint in each record tells its earlier images from the new model's."""
    import shutil

    from safetensors.torch import load_file, save_file

    pipe, out = tmp_path / "pipe", tmp_path / "out"
    shutil.copytree(folders["pipeline"], pipe)
    assert sample(pipe, out, "--prompt", "a red circle", "--steps", "1") == 0
    before = metadata(out, 0)["weights"]
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors = {name: t + 0.01 if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        assert sample(pipe, out, "--prompt", "a red circle", "--steps", "1") == 0
    after = metadata(out, 0)["weights"]
    assert after != before and metadata(out, 0)["model"] == str(pipe.resolve())
    assert (
        f"an image of an earlier sample in {out} was made with other prompts or settings and will be replaced "
        f"(image 0: weights={before!r}, not {after!r})" in caplog.text
    )


def test_a_sample_that_fails_before_its_first_image_keeps_the_earlier_one(
    folders, tmp_path, monkeypatch, capsys
):
    """The earlier images go once the first new one is ready: a failed or interrupted sample (a bad
    model, Ctrl+C during the first batch) leaves them whole. Before, they were removed up front."""
    out = tmp_path / "out"
    assert sample(folders["run"], out, "--prompt", "a", "--prompt", "b", "--steps", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fusedit.sampling.folder.generate", interrupted)
    assert sample(folders["run"], out, "--prompt", "c", "--steps", "1") == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert capsys.readouterr().err == (
        f"fusedit: interrupted: no image was written to {out} yet; rerun the same command\n"
    )


def test_quiet_hushes_the_libraries_bars_and_restores_them(folders, tmp_path, monkeypatch, capsys):
    from transformers.utils import logging as hf_logging

    seen = []
    monkeypatch.setattr(
        "fusedit.cli.sample.cmd_sample", lambda args: seen.append(hf_logging.is_progress_bar_enabled())
    )
    assert hf_logging.is_progress_bar_enabled()
    sample(folders["run"], tmp_path, "--prompt", "a")
    assert seen == [False] and hf_logging.is_progress_bar_enabled()


def test_quiet_hushes_diffusers_bars_too(folders, tmp_path, monkeypatch):
    """A pipeline folder loads through diffusers, whose "Loading pipeline components" bar has a switch
    of its own."""
    from diffusers.utils import logging as diffusers_logging

    seen = []
    monkeypatch.setattr(
        "fusedit.cli.sample.cmd_sample", lambda args: seen.append(diffusers_logging.is_progress_bar_enabled())
    )
    sample(folders["pipeline"], tmp_path, "--prompt", "a")
    assert seen == [False] and diffusers_logging.is_progress_bar_enabled()


def test_prompts_come_from_a_pipe(folders, tmp_path):
    """`--prompts-file <(...)`: a named pipe is not a regular file, but it is read all the same."""
    import os
    import threading

    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    # A daemon: were the pipe never opened for reading, the blocked writer would not hold pytest open.
    writer = threading.Thread(target=lambda: fifo.write_text("a red circle\na blue square\n"), daemon=True)
    writer.start()
    assert sample(folders["run"], tmp_path / "out", "--prompts-file", str(fifo), "--steps", "1") == 0
    writer.join(timeout=10)
    assert [metadata(tmp_path / "out", i)["prompt"] for i in range(2)] == ["a red circle", "a blue square"]


def test_a_damaged_weight_file_is_named_in_one_line(folders, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders["checkpoint"], copy)
    (copy / "ema.safetensors").write_bytes(b"\xff" * 64)
    capsys.readouterr()
    assert sample(copy, tmp_path / "out", "--prompt", "x", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"fusedit: error: {str(copy / 'ema.safetensors')!r} is not a readable safetensors file ("
    )
    assert err.endswith("; a damaged copy? copy the checkpoint again)\n") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size 0 is not allowed (allowed: 1 or more)"),
        (["--steps", "0"], "--steps 0 is not allowed (allowed: an integer >= 1)"),
        (["--guidance", "nan"], "--guidance nan is not allowed"),
        (["--guidance", "-1"], "--guidance -1.0 is not allowed"),
        (["--size", "15"], "--size 15 is not allowed (allowed: a positive multiple of 2"),
        (["--size", "0"], "--size 0 is not allowed"),
        (["--size", "12x15"], "--size 12x15 is not allowed (allowed for each side: a positive multiple of 2"),
        (["--size", "0x8"], "--size 0x8 is not allowed"),
        (["--shift", "0"], "--shift 0.0 is not allowed (allowed: a finite number > 0; 1 = no shift)"),
        (["--shift", "inf"], "--shift inf is not allowed"),
        (["--prompts-file", "missing.txt"], "--prompts-file 'missing.txt' does not exist"),
        (["--prompts-file", "."], "--prompts-file '.' is a folder (allowed: a UTF-8 text file, one prompt"),
    ],
)
def test_bad_arguments_fail_with_one_line(folders, tmp_path, capsys, args, message):
    prompt = [] if "--prompts-file" in args else ["--prompt", "a red circle"]
    assert sample(folders["run"], tmp_path, *prompt, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: ") and message in err and "\n" not in err


def test_bad_model_folders_fail_with_one_line(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    cases = [
        ([str(tmp_path / "nothing")], "no such folder"),
        ([str(tmp_path / "empty")], "no model in"),
        ([str(folders["pipeline"]), "--no-ema"], "--no-ema needs a run or checkpoint folder"),
        (
            [str(folders["public"])],
            "was saved by the public FuseDiT code: import it first with `fusedit convert",
        ),
        ([str(FIXTURE)], "was saved by the public FuseDiT code"),
        ([str(folders["run"]), "--prompts-file", str(tmp_path / "empty.txt")], "empty.txt' holds no prompt"),
    ]
    for args, message in cases:
        prompt = [] if "--prompts-file" in args else ["--prompt", "x"]
        assert main(["sample", *args, *prompt, "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


@pytest.mark.parametrize("kind", ["run", "pipeline"])
def test_compile_and_cuda_graph_flags_override_the_saved_sample_section(folders, monkeypatch, tmp_path, kind):
    """--compile and --cuda-graphs reach the sampling form and generate; without them the saved values
    (compile auto: nothing on the CPU) hold, and the images are the same either way on the CPU."""
    import fusedit.sampling.source

    seen = []
    real = fusedit.sampling.source.to_sampling_form
    monkeypatch.setattr(
        fusedit.sampling.source, "to_sampling_form", lambda m, c: seen.append(c.sample) or real(m, c)
    )
    assert sample(folders[kind], tmp_path / "a", "--prompt", "a red circle") == 0
    assert (
        sample(folders[kind], tmp_path / "b", "--prompt", "a red circle", "--compile", "off", "--cuda-graphs")
        == 0
    )
    assert [(s.compile, s.cuda_graphs) for s in seen] == [("auto", False), ("", True)]
    assert np.array_equal(pixels(tmp_path / "a" / "00000.png"), pixels(tmp_path / "b" / "00000.png"))


def test_unknown_compile_flag_is_a_one_line_error(folders, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample(folders["run"], tmp_path, "--prompt", "x", "--compile", "fast")
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["run", "checkpoint", "pipeline"])
def test_a_bad_size_or_out_fails_before_the_model_loads(folders, tmp_path, capsys, monkeypatch, kind):
    """--size is checked against the saved config, read without the weights, as `fusedit eval` does; an
    --out that is a file is refused at once too."""
    import fusedit.checkpoints
    import fusedit.pipeline

    monkeypatch.setattr(fusedit.checkpoints, "load_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(fusedit.pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "afile").write_text("")
    cases = [
        (["--size", "33"], "--size 33 is not allowed (allowed: a positive multiple of 2, the VAE's"),
        (
            ["--out", str(tmp_path / "afile")],
            f"--out {str(tmp_path / 'afile')!r} is a file (allowed: a folder",
        ),
    ]
    for args, message in cases:
        assert main(["sample", str(folders[kind]), "--prompt", "x", "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fusedit: error: ") and message in err and "\n" not in err, err


def test_a_size_past_the_ape_table_fails_before_the_model_loads(folders, tmp_path, capsys, monkeypatch):
    """A converted FuseDiT model has the public code's fixed APE table (model.ape_max_size): larger images
    would fail only in the first sampling step."""
    import fusedit.checkpoints
    from fusedit.checkpoints import checkpoint_stage, find_checkpoint
    from fusedit.config import side_limits

    saved = checkpoint_stage(find_checkpoint(folders["converted"])).config
    unit, largest = side_limits(saved)
    monkeypatch.setattr(fusedit.checkpoints, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert sample(folders["converted"], tmp_path, "--prompt", "x", "--size", str(largest + unit)) == 2
    err = capsys.readouterr().err.strip()
    assert f"--size {largest + unit} is not allowed (allowed: a positive multiple of {unit}" in err
    assert f"up to {largest} (the APE table's model.ape_max_size)" in err and "\n" not in err


def test_an_export_of_a_public_pipeline_points_to_convert(folders, tmp_path, capsys):
    """Before, it said "load it with FuseDiTPipeline.from_pretrained or `fusedit sample`", both of which
    refuse a public pipeline."""
    capsys.readouterr()
    assert main(["export", str(folders["public"]), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: {str(folders['public'])!r} is a pipeline folder fusedit did not write (nothing to "
        f"export; one of the public FuseDiT code is imported with `fusedit convert {folders['public']} --out "
        "DIR`, see docs/run-released-fusedit.md)\n"
    )


def test_a_saved_negative_prompt_is_dropped_at_guidance_1_unless_given(folders, tmp_path):
    """A model saved with a negative prompt, sampled at guidance 1 (saved or given): the saved prompt would
    change nothing, so the settings hold none and the images record none, rather than refusing a prompt the
    user never typed. One given at guidance 1 is kept, for write_sample_folder to refuse."""
    model, cfg, _ = load_sampling_model(folders["run"], "cpu")
    cfg.sample.negative_prompt, cfg.sample.guidance = "blurry", 1.0
    assert sample_settings(cfg)["negative_prompt"] == ""
    assert sample_settings(cfg, guidance=2.0)["negative_prompt"] == "blurry"
    assert sample_settings(cfg, negative_prompt="dark")["negative_prompt"] == "dark"
    cfg.sample.guidance = 3.0
    assert sample_settings(cfg)["negative_prompt"] == "blurry"
    assert sample_settings(cfg, guidance=1.0)["negative_prompt"] == ""
    settings = sample_settings(cfg, guidance=1.0, steps=1, image_size=8)
    write_sample_folder(model, cfg, ["a red circle"], tmp_path / "out", settings=settings, progress=False)
    assert metadata(tmp_path / "out", 0)["negative_prompt"] == ""


# ---- helper-115's sampling journey: what `fusedit sample` says and records


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_sample_says_which_checkpoint_and_weights_it_loaded(folders, tmp_path, capsys):
    """As `fusedit eval` does (helper-115 M3): before, successive samples of a training run silently moved
    from checkpoint to checkpoint, and nothing said EMA or raw."""
    assert sample(folders["run"], tmp_path / "a", "--prompt", "a red circle", "--steps", "1") == 0
    assert capsys.readouterr().out.splitlines()[0] == f"sampling {folders['checkpoint']} (EMA weights)"
    assert sample(folders["run"], tmp_path / "b", "--prompt", "a red circle", "--steps", "1", "--no-ema") == 0
    assert capsys.readouterr().out.splitlines()[0] == f"sampling {folders['checkpoint']} (raw weights)"


def test_case_and_punctuation_give_the_image_of_the_plain_words(folders, tmp_path, caplog):
    """ "A Red Circle." was sampled as "<unk> <unk> <unk>"-ish without a word (helper-115 B2); words the
    built-in tokenizer still does not know are named once."""
    with caplog.at_level(logging.WARNING):
        assert sample(folders["run"], tmp_path / "a", "--prompt", "A Red Circle.", "--steps", "2") == 0
        assert sample(folders["run"], tmp_path / "b", "--prompt", "a red circle", "--steps", "2") == 0
    assert np.array_equal(pixels(tmp_path / "a" / "00000.png"), pixels(tmp_path / "b" / "00000.png"))
    assert warnings_of(caplog) == []
    prompts = [
        "--prompt",
        "an astronaut riding a horse",
        "--prompt",
        "a red Horse",
        "--prompt",
        "a red circle",
    ]
    with caplog.at_level(logging.WARNING):
        assert sample(folders["run"], tmp_path / "c", *prompts, "--steps", "1", "--batch-size", "1") == 0
    unknown = [w for w in warnings_of(caplog) if "<unk>" in w]
    assert len(unknown) == 1 and unknown[0].startswith(
        "the built-in word tokenizer reads 'astronaut', 'riding', 'horse', 'Horse' of the prompts as <unk>: "
        "it knows only the words of the shapes world's captions and the templates (a, above, an, and, below,"
    )


def test_guidance_0_is_said_to_leave_the_prompt_unused(folders, tmp_path, caplog):
    """v = u + 0 (c - u) = u: the negative prompt alone; the CLI said nothing and the code called it "CFG off"
    (helper-115 M1)."""
    from fusedit.sampling.generation import warn_once

    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert (
            sample(folders["run"], tmp_path, "--prompt", "a red circle", "--guidance", "0", "--steps", "1")
            == 0
        )
    assert warnings_of(caplog) == ["guidance 0 samples the negative prompt alone: the prompt is not used"]


def test_a_cut_prompt_is_recorded_as_cut(folders, tmp_path):
    """Each image's JSON says whether its prompt was cut to text.max_length (helper-115 M2), in every
    batch."""
    long = " ".join(["a red circle"] * 10)
    prompts = ["--prompt", "a red circle", "--prompt", long, "--prompt", long, "--prompt", "a blue square"]
    assert sample(folders["run"], tmp_path, *prompts, "--steps", "1", "--batch-size", "3") == 0
    assert [metadata(tmp_path, i)["truncated"] for i in range(4)] == [False, True, True, False]


def test_a_resumed_sample_counts_the_cut_prompts_of_its_kept_images(folders, tmp_path, caplog):
    """The last warning counts the whole sample: a kept image's cut prompt is read from its record, since
    the rerun does not sample it again. Its record keeps "truncated" right after the prompt."""
    long = " ".join(["a red circle"] * 10)
    args = ["--prompt", long, "--prompt", "a", "--steps", "1", "--batch-size", "1"]
    assert sample(folders["run"], tmp_path, *args) == 0
    (tmp_path / "00001.png").unlink()  # as a stop before the second batch's image leaves it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedit"):
        assert sample(folders["run"], tmp_path, *args) == 0
    assert "1 of the 2 images are kept from an earlier run of this sample" in caplog.text
    assert warnings_of(caplog) == [
        "1 of the 2 prompts (00000.png) was longer than text.max_length=16 tokens: its end was cut"
    ]
    assert list(metadata(tmp_path, 1))[:3] == ["prompt", "truncated", "seed"]


def test_the_last_cut_warning_names_the_first_three_cut_images(folders, tmp_path, caplog):
    """ "2 of the 50 prompts were longer ..." did not say which (h-sample R5): the first three cut images are
    named, across batches, kept ones included."""
    long = " ".join(["a red circle"] * 10)
    prompts = [w for p in ["a", long, "red", long, long, "two", long] for w in ("--prompt", p)]
    args = [*prompts, "--steps", "1", "--batch-size", "2"]
    assert sample(folders["run"], tmp_path, *args) == 0
    (tmp_path / "00004.png").unlink()  # the third batch is made again, the others kept
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit.sampling.generation"):
        assert sample(folders["run"], tmp_path, *args) == 0
    assert warnings_of(caplog) == [
        "4 of the 7 prompts (00001.png, 00003.png, 00004.png, ...) were longer than text.max_length=16 tokens: "
        "their ends were cut"
    ]


def test_a_cut_negative_prompt_is_named_in_the_last_warning(folders, tmp_path, caplog):
    """The only message was the encoder's "1 prompt(s) ... truncated", and the total left the negative prompt
    out (helper-115 M4)."""
    long = " ".join(["a red circle"] * 10)
    args = [
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--negative-prompt",
        long,
        "--steps",
        "1",
    ]
    with caplog.at_level(logging.WARNING, logger="fusedit.sampling.generation"):
        assert sample(folders["run"], tmp_path / "a", *args, "--batch-size", "1") == 0
    cut = [r.getMessage() for r in caplog.records if r.name == "fusedit.sampling.generation"]
    assert cut == ["the negative prompt is longer than text.max_length=16 tokens: its end was cut"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit.sampling.generation"):
        assert sample(folders["run"], tmp_path / "b", *args, "--prompt", long) == 0
    cut = [r.getMessage() for r in caplog.records if r.name == "fusedit.sampling.generation"]
    assert cut == [
        "1 of the 3 prompts (00002.png) was longer than text.max_length=16 tokens: its end was cut (the "
        "negative prompt's too)"
    ]
    assert [metadata(tmp_path / "b", i)["truncated"] for i in range(3)] == [False, False, True]


def test_the_model_is_recorded_absolute(folders, tmp_path, monkeypatch):
    """A relative MODEL was recorded as given, meaningless once the folder is copied elsewhere (R7)."""
    monkeypatch.chdir(folders["run"].parent)
    assert sample("run", tmp_path, "--prompt", "a red circle", "--steps", "1") == 0
    assert metadata(tmp_path, 0)["model"] == str(folders["checkpoint"].resolve())


def test_nan_images_are_warned_about(folders, tmp_path, caplog):
    """An absurd guidance wrote black NaN images without a word (helper-115 R1)."""
    with caplog.at_level(logging.WARNING, logger="fusedit.sampling.generation"):
        assert (
            sample(folders["run"], tmp_path, "--prompt", "a red circle", "--guidance", "1e38", "--steps", "2")
            == 0
        )
    assert [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()] == [
        "1 of the 1 images are NaN or inf (black or saturated pixels): is guidance=1e+38 too large, "
        "or do the model's weights or inputs hold non-finite or huge values?"
    ]


def test_help_gives_every_default(capsys):
    """--out, --seed and --batch-size had defaults the help did not show, and --steps, --guidance, --sampler
    and --negative-prompt did not say they default to the run's saved sample section (helper-115 R2)."""
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in (
        "(default samples;",
        "(default the saved sample.seed, 42 unless set)",
        "(default 8)",
        "(default the saved sample.steps)",
        "(default the saved sample.guidance)",
        "(default the saved sample.sampler)",
        "(default the saved sample.negative_prompt)",
    ):
        assert said in text, said


def test_a_deleted_checkpoint_or_the_checkpoints_folder_points_to_what_exists(folders, tmp_path, capsys):
    """A checkpoint that train.keep_checkpoints deleted got "no such folder", and a run's checkpoints/ folder
    "no model in" (helper-115 R3): both name the checkpoints there are and the run folder."""
    checkpoints = folders["run"] / "checkpoints"
    assert sample(checkpoints / "step_00000030", tmp_path, "--prompt", "x") == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: no such folder: {str(checkpoints / 'step_00000030')!r} (its run "
        f"{str(folders['run'])!r} holds the checkpoints step_00000000, older ones deleted as "
        "train.keep_checkpoints says: give one of them, or the run folder for its latest)\n"
    )
    assert sample(checkpoints, tmp_path, "--prompt", "x") == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: no model in {str(checkpoints)!r}: it is the checkpoints folder of the run "
        f"{str(folders['run'])!r} (allowed: the run folder, for its latest checkpoint, or one of its "
        "checkpoints: step_00000000)\n"
    )


def test_an_empty_prompt_samples_unconditionally(folders, tmp_path, caplog):
    """The empty prompt is the model's unconditional input, as `fusedit serve` now takes it too (R4)."""
    with caplog.at_level(logging.INFO, logger="fusedit.sampling.folder"):
        assert (
            sample(folders["run"], tmp_path, "--prompt", "", "--prompt", "a red circle", "--steps", "2") == 0
        )
    assert "1 of the 2 prompts are empty: sampled unconditionally" in [r.getMessage() for r in caplog.records]
    model, cfg, _ = load_sampling_model(folders["run"], "cpu")
    alone = to_uint8(generate(model, [""], seed=42, **sample_settings(cfg, steps=2)))[0]
    assert np.array_equal(pixels(tmp_path / "00000.png"), alone)


def test_a_stop_between_a_new_record_and_its_image_never_keeps_the_earlier_image(
    folders, tmp_path, monkeypatch
):
    """Replacing an earlier sample's image: its PNG goes before the new record is written, so a stop while
    the new PNG is encoded leaves a record without an image (made again), never the new record beside the
    earlier picture (which a rerun would keep as the new prompt's)."""
    from fusedit.sampling import folder as sample_folder

    whole, out = tmp_path / "whole", tmp_path / "out"
    assert sample(folders["run"], whole, "--prompt", "b", "--steps", "1") == 0
    assert sample(folders["run"], out, "--prompt", "a", "--steps", "1") == 0
    real_save = sample_folder.save_png

    def stopped(image, path):
        if path.name == "00000.png":
            raise KeyboardInterrupt
        return real_save(image, path)

    with monkeypatch.context() as patch:
        patch.setattr(sample_folder, "save_png", stopped)
        assert sample(folders["run"], out, "--prompt", "b", "--steps", "1") == 130
    assert metadata(out, 0)["prompt"] == "b" and not (out / "00000.png").exists()
    assert sample(folders["run"], out, "--prompt", "b", "--steps", "1") == 0
    assert folder_bytes(out) == folder_bytes(whole)


def test_only_a_sample_that_can_name_its_model_resumes_whatever_its_batch(folders, tmp_path, caplog):
    """Without ``source`` the records hold no model, so images of another in-memory model would match:
    they are made again. Another batch size changes how, not what: kept (h-sample R2), the log says so."""
    model, cfg, source = load_sampling_model(folders["run"], "cpu")
    settings = sample_settings(cfg, steps=1)
    out, prompts = tmp_path / "lib", ["a red circle", "a blue square"]
    kept: list = []
    write_sample_folder(model, cfg, prompts, out, settings=settings, progress=False)
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        write_sample_folder(model, cfg, prompts, out, settings=settings, progress=False, kept=kept)
    assert kept == []
    assert "cannot be told to be this model's" in caplog.text
    write_sample_folder(model, cfg, prompts, out, settings=settings, source=source, progress=False)
    write_sample_folder(model, cfg, prompts, out, settings=settings, source=source, progress=False, kept=kept)
    assert kept == [out / "00000.png", out / "00001.png"]
    kept.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="fusedit.sampling.folder"):
        write_sample_folder(
            model,
            cfg,
            prompts,
            out,
            settings=settings,
            source=source,
            batch_size=1,
            progress=False,
            kept=kept,
        )
    assert kept == [out / "00000.png", out / "00001.png"]
    assert (
        "2 of the 2 images are kept from an earlier run of this sample, made with settings that do not change "
        "an image (image 0: batch_size=8, not 1)" in caplog.text
    )
