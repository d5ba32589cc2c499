import json
import subprocess
import sys

import pytest

from conftest import TINY, tiny_vae
from fusedit.cli import main


def test_describe_and_config_and_presets(capsys):
    assert main(["describe", "fusedit-gemma2b"]) == 0
    out = capsys.readouterr().out
    assert "trainable (DiT): 2448.4M" in out and "frozen (LLM, incl. embeddings): 2506.2M" in out
    assert main(["config", "debug", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "debug" in capsys.readouterr().out.split()


def test_bad_config_exits_2_with_one_line(capsys):
    assert main(["config", "debug", "model.pos_embed=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: model.pos_embed='nope' is not allowed") and "\n" not in err


def test_train_then_sample(tmp_path, capsys):
    import yaml

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "tiny.yaml"), "train.steps=2", "--out", str(run), "--quiet"]) == 0
    assert (run / "checkpoints" / "latest").is_file()
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                str(run),
                "--prompt",
                "a red circle",
                "--prompt",
                "a blue square",
                "--steps",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    meta = json.loads((out / "00001.json").read_text())
    assert meta["prompt"] == "a blue square" and meta["steps"] == 2
    assert (out / "00000.png").is_file() and (out / "grid.png").is_file()
    assert main(["sample", str(run), "--out", str(out)]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nothing"), "--prompt", "x"]) == 2


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "fusedit", "presets"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "fusedit-gemma2b" in r.stdout


def _tiny_run(tmp_path):
    import yaml

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "tiny.yaml"), "train.steps=1", "--out", str(run), "--quiet"]) == 0
    return run


def test_eval_geneval_and_dpg_write_the_official_layouts(tmp_path, capsys):
    run = _tiny_run(tmp_path)
    meta = [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"},
    ]
    (tmp_path / "geneval.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "ge"
    args = [
        "eval",
        str(run),
        "--bench",
        "geneval",
        "--prompts",
        str(tmp_path / "geneval.jsonl"),
        "--steps",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert json.loads((out / "samples" / "00001" / "metadata.jsonl").read_text()) == meta[1]
    assert len(list((out / "samples" / "00000" / "samples").glob("*.png"))) == 4
    assert main(args) == 0 and "0 generated, 2 already there" in capsys.readouterr().out  # resumable

    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "7.txt").write_text("a red circle above a blue square")
    assert (
        main(
            [
                "eval",
                str(run),
                "--bench",
                "dpg",
                "--prompts",
                str(tmp_path / "dpg"),
                "--steps",
                "1",
                "--out",
                str(tmp_path / "dpgout"),
                "--quiet",
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(tmp_path / "dpgout" / "grids" / "7.png").size == (32, 32)  # 2 x 2 tiles of 16 px
    assert main(["eval", str(run), "--bench", "geneval"]) == 2
    assert "needs --prompts PATH" in capsys.readouterr().err
    # A missing copy names the command that fetches one.
    for bench in ("geneval", "dpg"):
        assert main(["eval", str(run), "--bench", bench, "--prompts", str(tmp_path / "nope")]) == 2
        err = capsys.readouterr().err
        assert f"get a copy with `fusedit benchmarks download {bench}`" in err and "\n" not in err.strip()


def test_cache_latents_then_train_on_them(tmp_path):
    import yaml

    cfg = {**TINY, "data": {**TINY["data"], "num_samples": 8}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    lat = tmp_path / "latents"
    assert (
        main(
            [
                "cache-latents",
                str(tmp_path / "tiny.yaml"),
                "--out",
                str(lat),
                "--batch-size",
                "4",
                "--shard-size",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                str(tmp_path / "tiny.yaml"),
                "data.source=latents",
                f"data.latents_dir={lat}",
                "train.steps=2",
                "--out",
                str(tmp_path / "run"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_convert_the_public_fixture_then_sample(tmp_path, capsys):
    from pathlib import Path

    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    fixture = Path(__file__).parent / "fixtures" / "fusedit-official-tiny" / "transformer"
    tiny_vae().save_pretrained(tmp_path / "vae")
    word_tokenizer(vocabulary()).save_pretrained(tmp_path / "tok")
    assert main(["convert", str(fixture), "--out", str(tmp_path / "run")]) == 2
    assert "has no VAE: pass --vae" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                str(fixture),
                "--out",
                str(tmp_path / "run"),
                "--vae",
                str(tmp_path / "vae"),
                "--tokenizer",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    out = tmp_path / "samples"
    assert (
        main(
            [
                "sample",
                str(tmp_path / "run"),
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--size",
                "16",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "00000.png").is_file()


def test_export_a_run_as_a_diffusers_pipeline(tmp_path):
    run = _tiny_run(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "pipe")]) == 0
    import json as _json

    index = _json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "FuseDiTPipeline" and "transformer" in index


def _tiny_yaml(tmp_path):
    import yaml

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return str(tmp_path / "tiny.yaml")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: ") and "\n" not in err, err
    return err


def test_bad_devices_fail_with_one_line(tmp_path, capsys, monkeypatch):
    import torch

    config = _tiny_yaml(tmp_path)
    sample = ["sample", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]
    assert main([*sample, "--device", "tpu"]) == 2
    err = _one_line_error(capsys)
    assert "--device 'tpu' is not allowed (allowed: auto, cpu, cuda, cuda:N, mps" in err
    assert main(["train", config, "train.device=gpu", "--out", str(tmp_path / "run")]) == 2
    assert "train.device 'gpu' is not allowed (allowed: auto, cpu, cuda" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()

    # CUDA asked of a torch without it (whatever this machine has).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    assert main([*sample, "--device", "cuda"]) == 2
    err = _one_line_error(capsys)
    assert "--device 'cuda' is not available: torch " in err and "is built without CUDA" in err
    assert main(["train", config, "train.device=cuda:0", "--out", str(tmp_path / "run")]) == 2
    assert "train.device 'cuda:0' is not available" in _one_line_error(capsys)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    assert main([*sample, "--device", "cuda"]) == 2
    assert "finds no cuda device (allowed here: auto or cpu)" in _one_line_error(capsys)


def test_train_refuses_an_existing_run_without_resume_or_overwrite(tmp_path, capsys):
    from fusedit.train.checkpoint import find_checkpoint

    config, run = _tiny_yaml(tmp_path), tmp_path / "run"

    def train(steps: int, *flags: str) -> int:
        overrides = [f"train.steps={steps}", "train.checkpoint_every=2"]
        return main(["train", config, *overrides, "--out", str(run), "--quiet", *flags])

    assert train(4) == 0
    capsys.readouterr()
    assert train(4) == 2
    err = _one_line_error(capsys)
    assert f"{str(run)!r} already holds a run (checkpoint at step 4)" in err
    assert "--resume" in err and "--overwrite" in err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # untouched
    # Starting over removes the old run's checkpoints, even those past the new run's steps.
    assert train(1, "--overwrite") == 0
    assert find_checkpoint(run).name == "step_00000001"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit):
        train(1, "--resume", "--overwrite")
    assert "not allowed with argument --resume" in capsys.readouterr().err


def test_stop_at_is_checked_and_the_step_reached_is_reported(tmp_path, capsys):
    config, run = _tiny_yaml(tmp_path), tmp_path / "run"

    def train(steps: int, *flags: str) -> int:
        return main(["train", config, f"train.steps={steps}", "--out", str(run), "--quiet", *flags])

    for bad in ("0", "-1"):
        assert train(3, "--stop-at", bad) == 2
        assert f"--stop-at {bad} is not allowed (allowed: a step number, 1 or more)" in _one_line_error(
            capsys
        )
    assert not run.exists()
    assert train(3, "--stop-at", "2") == 0
    assert capsys.readouterr().out == f"trained to step 2; checkpoints in {run / 'checkpoints'}\n"
    assert train(3, "--resume", "--stop-at", "1") == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to train: the run is already at step 2, at or past --stop-at 1; ")
    assert train(2, "--resume") == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to train: the run already finished (step 2 of train.steps=2); ")


def test_overrides_may_follow_options_and_unknown_words_still_fail(tmp_path, capsys):
    import yaml

    config, run = _tiny_yaml(tmp_path), tmp_path / "run"
    args = ["train", config, "train.steps=1", "--out", str(run), "--quiet", "train.lr=0.0005", "train.seed=3"]
    assert main(args) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 1 and saved["train"]["lr"] == 0.0005 and saved["train"]["seed"] == 3
    capsys.readouterr()
    for extra in (["--bogus"], ["train.lr=1", "stray"]):
        with pytest.raises(SystemExit):
            main(["train", config, "--out", str(tmp_path / "other"), *extra])
        assert f"unrecognized arguments: {' '.join(extra)}" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
