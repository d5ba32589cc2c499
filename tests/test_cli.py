import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, CtrlCAtStep, rmtree_dying_after_one_weight_file, tiny_vae
from fusedit.cli import main


def test_describe_and_config_and_presets(capsys):
    assert main(["describe", "fusedit-gemma2b"]) == 0
    out = capsys.readouterr().out
    assert "trainable (DiT): 2448.5M" in out and "frozen (LLM, incl. embeddings): 2506.2M" in out
    # A deep design over a real LLM: the K/V probe needs its weights, which describe does not load.
    assert "(whether deep fusion can read this LLM's K/V is checked when its weights load" in out
    assert main(["describe", "lidit-1b-collab"]) == 0  # two LLMs: each line names its section
    out = capsys.readouterr().out
    assert (
        "reads LLM hidden state 30 of 31 LLM layers run (text); LLM hidden state 26 of 27 LLM layers " in out
    )
    assert "frozen (LLM text, incl. embeddings): " in out and "frozen (LLM extra_text.0, incl. " in out
    assert "deep fusion can read" not in out
    for overrides, reads in (
        ([], "reads K/V of LLM layers 0..5 of 6"),
        (["model.num_layers=1"], "reads K/V of LLM layer 0 of 1 LLM layer run"),
    ):
        assert main(["describe", "debug", *overrides]) == 0
        assert reads in capsys.readouterr().out
    assert main(["config", "debug", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "debug" in capsys.readouterr().out.split()


def test_describe_says_what_training_holds_before_activations(capsys):
    """The 64 GB budget of issue 6 at a glance: weights, gradients and AdamW's moments of what trains, the
    EMA's float32 DiT (on the GPU, or in host memory with train.ema_offload), the frozen bf16 LLM."""
    assert main(["describe", "fusedit-gemma2b"]) == 0
    assert (
        "training holds 50.3 GiB per GPU before activations (trainable weights 9.1 GiB, their gradients 9.1 "
        "GiB, AdamW's moments 18.2 GiB, the EMA 9.1 GiB, frozen weights 4.7 GiB; train.parallel=fsdp shards "
        "it over the GPUs; `fusedit bench` measures the peak)"
    ) in capsys.readouterr().out
    assert main(["describe", "fusedit-gemma2b", "train.ema_offload=true"]) == 0
    out = capsys.readouterr().out
    assert "training holds 41.2 GiB per GPU" in out and "the EMA's 9.1 GiB in host memory" in out


def held(total: str, trained: str, ema: str, frozen: str) -> str:
    """describe's line of what training holds, trainable weights taking ``trained`` (gradients alike,
    AdamW's moments twice that)."""
    value, unit = trained.split()
    parts = f"trainable weights {trained}, their gradients {trained}, AdamW's moments {2 * float(value):.1f} {unit}"
    return (
        f"training holds {total} per GPU before activations ({parts}, the EMA {ema}, frozen weights {frozen}; "
        "train.parallel=fsdp shards it over the GPUs; `fusedit bench` measures the peak)"
    )


def test_describe_counts_what_the_run_trains_through_trainings_own_apply_parts(capsys):
    """With LoRA the adapters train and the DiT's base weights are frozen; a jointly trained LLM trains what
    the DiT reads of it. The counts are those training's optimizers get on a real build, and the FLOP lines
    leave the adapters' own products out (training_flops_per_image)."""
    pytest.importorskip("peft")
    from torch import nn

    from fusedit.adapters import DEFAULT_TARGETS, Parts
    from fusedit.config import load_config
    from fusedit.system import build_model
    from fusedit.train.stages import Optimizers, apply_parts

    cases = {
        "train.dit_lora.rank=8": (
            [
                "trainable (DiT: rank-8 LoRA adapters): 0.1M (95,232)",
                "frozen (DiT: base weights): 1.5M (1,525,296)",
                "frozen (LLM, incl. embeddings): 0.4M (422,720)",
                held("14.7 MiB", "372.0 KiB", "5.8 MiB", "7.4 MiB"),  # the EMA: the merged DiT
                "32 px (64 image + 16 text tokens): DiT forward 125.600 MFLOP, LLM forward 14.156 MFLOP, "
                "training 265.355 MFLOP per image",
            ],
            {"denoiser": 95_232},
        ),
        "train.trainable=[dit,llm]": (
            [
                "trainable (DiT): 1.5M (1,525,296)",
                "trainable (LLM: the layers the DiT reads, incl. embeddings): 0.4M (357,056)",
                "frozen (LLM: the rest): 0.1M (65,664)",
                held("34.8 MiB", "7.2 MiB", "5.8 MiB", "256.5 KiB"),
            ],
            {"denoiser": 1_525_296, "llm": 357_056},
        ),
        "train.trainable=[llm] train.llm_lora.rank=4 train.llm_top_layers=2": (
            [
                "frozen (DiT): 1.5M (1,525,296)",
                "trainable (LLM: rank-4 LoRA adapters on the top 2 layers the DiT reads): 0.0M (3,072)",
                "frozen (LLM: base weights, incl. embeddings): 0.4M (422,720)",
                held("13.3 MiB", "12.0 KiB", "5.8 MiB", "7.4 MiB"),  # the frozen DiT's EMA is held too
            ],
            {"llm": 3_072},
        ),
    }
    for overrides, (lines, optimized) in cases.items():
        assert main(["describe", "debug", *overrides.split()]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1 : 1 + len(lines)] == lines, overrides
        cfg = load_config("debug", overrides.split())
        model = build_model(cfg)
        apply_parts(model, Parts.of(cfg.train), None, seed=cfg.train.seed, stage=0)
        opts = Optimizers.build(model, cfg.train, torch.device("cpu"))
        assert {k: sum(p.numel() for p in v.values()) for k, v in opts.named().items()} == optimized
    # rank x (in + out) of every projection LoRA adapts by default
    den = build_model(load_config("debug", []), "meta").denoiser
    targets = [
        m
        for n, m in den.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in DEFAULT_TARGETS["dit"]
    ]
    assert sum(8 * (m.in_features + m.out_features) for m in targets) == 95_232


def test_describe_of_a_staged_run_gives_the_first_stages_parameters_and_costs(capsys):
    """The top lines describe stage 0, where training starts, not the top-level train section it overrides:
    its trainable parts and its image size, as its own stage line says."""
    pytest.importorskip("peft")
    assert main(["describe", "recipe-shapes-3stage", "stages.0.train.dit_lora.rank=8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:7] == [
        "stage 0 'low-res', where training starts (every stage's own line at the end):",
        "trainable (DiT: rank-8 LoRA adapters): 0.1M (95,232)",
        "frozen (DiT: base weights): 1.5M (1,525,296)",
        "frozen (LLM, incl. embeddings): 0.4M (422,720)",
        held("14.7 MiB", "372.0 KiB", "5.8 MiB", "7.4 MiB"),
        "16 px (16 image + 16 text tokens): DiT forward 30.048 MFLOP, LLM forward 14.156 MFLOP, "
        "training 74.252 MFLOP per image",
    ]
    assert out[9].startswith(
        "stage 0 'low-res': steps 0..800, 16 px, batch 32x1, lr 0.002, trains DiT (LoRA "
    )
    assert ": 74.252 MFLOP per image, " in out[9]


def test_describe_counts_a_local_tokenizers_template_and_says_when_a_hub_ones_is_left_out(tmp_path, capsys):
    """The text width is the one the run pads to (TextEncoder.max_length: text.max_length plus the template's
    tokens): a local folder's tokenizer is loaded and its chat template counted; a hub tokenizer is not
    downloaded, and describe says its template's tokens are missing from the count."""
    from transformers import AutoTokenizer

    from fusedit.config import load_config
    from fusedit.system import build_model
    from test_designs import _saved_llm

    folder = tmp_path / "llm"
    _saved_llm(folder, "gemma")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} below {% endfor %}"
        "{% if add_generation_prompt %}two{% endif %}"
    )
    tok.save_pretrained(folder)
    overrides = [f"text.model_id={folder}", "text.template=chat"]
    assert build_model(load_config("debug", overrides)).text.max_length == 19  # 16 + 3 template tokens
    assert main(["describe", "debug", *overrides]) == 0
    out = capsys.readouterr().out
    assert "32 px (64 image + 19 text tokens): " in out and "leave out" not in out
    assert main(["describe", "debug", "text.model_id=fusedit-tests/no-such-llm", "text.template=chat"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[5:7] == [
        "(the text tokens below leave out the template's tokens of text: describe does not download hub "
        "tokenizers; a local folder as the section's tokenizer or model_id counts them)",
        "32 px (64 image + 16 text tokens): DiT forward 125.600 MFLOP, LLM forward 14.156 MFLOP, "
        "training 390.955 MFLOP per image",
    ]
    # A plain template without an instruction adds no tokens: nothing is left out.
    assert main(["describe", "debug", "text.model_id=fusedit-tests/no-such-llm"]) == 0
    assert "leave out" not in capsys.readouterr().out


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


def test_eval_geneval_and_dpg_write_the_official_layouts(tmp_path, capsys, monkeypatch, caplog):
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
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        assert main(args) == 0
    # The shapes world's built-in tokenizer cannot read a photo of a cat: said, as `fusedit sample` says it.
    assert caplog.records[-1].getMessage() == (
        "2 of the 2 prompts sampled had words the built-in word tokenizer reads as <unk>: the model never read "
        "them, so their scores say little"
    )
    assert json.loads((out / "samples" / "00001" / "metadata.jsonl").read_text()) == meta[1]
    assert len(list((out / "samples" / "00000" / "samples").glob("*.png"))) == 4
    assert main(args) == 0 and "0 generated, 2 already there" in capsys.readouterr().out  # resumable
    # ... but only by the same generation: other settings (or a later checkpoint) never reuse those images.
    record = json.loads((out / "generation.json").read_text())
    assert (record["steps"], record["seed"], record["checkpoint"], record["precision"]) == (
        1,
        42,
        "step_00000001",
        "fp32",
    )
    # Refused before the model loads (a large LLM takes minutes to load).
    with monkeypatch.context() as m:
        m.setattr(
            "fusedit.sampling.source.load_sampling_model", lambda *a, **k: pytest.fail("the model was loaded")
        )
        assert main([*args, "--guidance", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{out} holds images made with guidance=3.0, not guidance=2.0" in err and "\n" not in err

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
    # With every image there (scoring again) no model is loaded; a prompt file changed since is refused
    # before any load (a large LLM takes minutes to load).
    dpg_args = ["eval", str(run), "--bench", "dpg", "--prompts", str(tmp_path / "dpg"), "--steps", "1"]
    dpg_args += ["--out", str(tmp_path / "dpgout"), "--quiet"]
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(
            "fusedit.sampling.source.load_sampling_model", lambda *a, **k: pytest.fail("the model was loaded")
        )
        assert main(dpg_args) == 0 and "0 generated, 1 already there" in capsys.readouterr().out
        (tmp_path / "dpg" / "7.txt").write_text("a blue circle")
        assert main(dpg_args) == 2
    err = capsys.readouterr().err.strip()
    assert "7.png was made for the prompt 'a red circle above a blue square', not 'a blue circle'" in err
    assert "\n" not in err
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


class _Kill(BaseException):
    """A kill, as far as the code under test can tell: nothing catches it."""


def test_convert_the_public_fixture_then_sample(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from fusedit.checkpoints import find_checkpoint, load_checkpoint_config
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
    capsys.readouterr()
    again = ["convert", str(fixture), "--vae", str(tmp_path / "vae"), "--tokenizer", str(tmp_path / "tok")]
    assert main([*again, "--out", str(tmp_path / "run"), "--max-length", "12"]) == 0  # redone: replaced
    assert load_checkpoint_config(find_checkpoint(tmp_path / "run")).text.max_length == 12
    # A redo killed while deleting the earlier conversion (a deletion goes in no set order) leaves a
    # whole one, and the next redo clears what the kill left.
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", rmtree_dying_after_one_weight_file(shutil.rmtree, _Kill()))
        with pytest.raises(_Kill):
            main([*again, "--out", str(tmp_path / "run"), "--max-length", "14"])
    ckpt = find_checkpoint(tmp_path / "run")
    assert (ckpt / "denoiser.safetensors").is_file() and load_checkpoint_config(ckpt).text.max_length == 14
    assert main([*again, "--out", str(tmp_path / "run"), "--max-length", "12"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    from fusedit.config import load_config

    assert load_config(str(tmp_path / "run")).text.max_length == 12  # a converted run is a config base
    (tmp_path / "trained").mkdir()
    trained = _tiny_run(tmp_path / "trained")
    capsys.readouterr()
    assert (
        main([*again, "--out", str(trained)]) == 2
    )  # a trained run: refused, it would gain a step-0 checkpoint
    err = capsys.readouterr().err
    assert "already holds other files (e.g. the folder 'checkpoints'); writing a converted run into it" in err
    assert "(allowed: a new or empty folder, or an earlier conversion's folder)" in err
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


def test_convert_takes_the_tokenizer_of_the_llm_the_checkpoint_names(tmp_path, capsys):
    """Without --tokenizer and a pipeline's tokenizer/, a conversion reads the tokenizer of the LLM the
    public config's base_config names; where it names none, the conversion is refused. Before, the run
    was saved without one and sampled silently with the built-in word tokenizer (another vocabulary)."""
    from fusedit.checkpoints import find_checkpoint, load_checkpoint_config
    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    fixture = Path(__file__).parent / "fixtures" / "fusedit-official-tiny" / "transformer"
    tiny_vae().save_pretrained(tmp_path / "vae")
    word_tokenizer(vocabulary()).save_pretrained(tmp_path / "llm")
    capsys.readouterr()
    assert main(["convert", str(fixture), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "a")]) == 2
    assert _one_line_error(capsys) == (
        f"fusedit: error: {str(fixture)!r} names no tokenizer (no tokenizer/ folder, and its base_config names no LLM): pass "
        "--tokenizer (the hub id or folder of the LLM it was trained with, e.g. google/gemma-2b)"
    )
    named = tmp_path / "named"
    shutil.copytree(fixture, named)
    public = json.loads((named / "config.json").read_text())
    public["base_config"]["_name_or_path"] = str(tmp_path / "llm")
    (named / "config.json").write_text(json.dumps(public))
    assert main(["convert", str(named), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "b")]) == 0
    assert load_checkpoint_config(find_checkpoint(tmp_path / "b")).text.tokenizer == str(tmp_path / "llm")


def test_export_a_run_as_a_diffusers_pipeline(tmp_path, capsys, monkeypatch):
    run = _tiny_run(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "pipe")]) == 0
    import json as _json

    index = _json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "FuseDiTPipeline" and "transformer" in index
    assert main(["export", str(run), "--out", str(tmp_path / "pipe")]) == 0  # an earlier export: written over
    # safetensors writes its files owner-only: a run or pipeline folder a team shares is readable by all.
    for folder in (run, tmp_path / "pipe"):
        assert all(p.stat().st_mode & 0o444 == 0o444 for p in folder.rglob("*") if p.is_file())
    # Into the run itself (or any folder of other files): refused, the run would sample the export from then on.
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(run)]) == 2
    err = _one_line_error(capsys)
    assert f"the output folder {str(run)!r} already holds other files (e.g. the folder 'checkpoints')" in err
    assert "(allowed: a new or empty folder, or an earlier export's folder)" in err
    assert not (run / "model_index.json").exists()
    assert main(["export", str(tmp_path / "pipe"), "--out", str(tmp_path / "again")]) == 2
    assert "is a diffusers pipeline folder already (nothing to export" in _one_line_error(capsys)
    # What a user put beside the pipeline (`fusedit eval`'s default output) outlives a new export.
    (tmp_path / "pipe" / "eval" / "shapes").mkdir(parents=True)
    (tmp_path / "pipe" / "eval" / "shapes" / "scores.md").write_text("| overall | 0.5 |")
    assert main(["export", str(run), "--out", str(tmp_path / "pipe"), "--device", "auto", "--quiet"]) == 0
    assert (tmp_path / "pipe" / "eval" / "shapes" / "scores.md").read_text() == "| overall | 0.5 |"
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--device", "gpu"]) == 2
    assert "--device 'gpu' is not allowed (allowed: auto, cpu, cuda" in _one_line_error(capsys)
    # A release of the public FuseDiT code names a FuseDiTPipeline too: never taken for an earlier export.
    public = tmp_path / "release"
    public.mkdir()
    index = {"_class_name": "FuseDiTPipeline", "transformer": ["models.fusedit", "FuseDiT"]}
    (public / "model_index.json").write_text(_json.dumps(index))
    assert main(["export", str(run), "--out", str(public)]) == 2
    assert "already holds other files (e.g. 'model_index.json')" in _one_line_error(capsys)
    assert _json.loads((public / "model_index.json").read_text()) == index
    # An export killed while writing leaves the folder as it was; the next one replaces its partial copy.
    import fusedit.pipeline

    def killed(self, folder, **kwargs):
        (Path(folder) / "transformer").mkdir(parents=True)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fusedit.pipeline.FuseDiTPipeline, "save_pretrained", killed)
        assert (
            main(["export", str(run), "--out", str(tmp_path / "fresh")]) == 130
        )  # one line, not a traceback
    assert not (tmp_path / "fresh").exists() and (tmp_path / ".fresh.partial" / "transformer").is_dir()
    assert main(["export", str(run), "--out", str(tmp_path / "fresh")]) == 0
    assert (tmp_path / "fresh" / "model_index.json").is_file() and not (tmp_path / ".fresh.partial").exists()


def test_export_and_sample_say_what_they_read_and_an_ema_that_is_mostly_the_start(tmp_path, capsys, caplog):
    """`fusedit export` named neither the checkpoint nor EMA/raw (sample does), and a run folder without a
    checkpoint yet was "expected a run folder". An early checkpoint's EMA still holds most of the random
    init (1 step of decay 0.99: 99%), which export and sample read by default: said in one warning line,
    not for --no-ema."""
    run = _tiny_run(tmp_path)
    ckpt = run / "checkpoints" / "step_00000001"
    warning = (
        "the EMA weights at step 1 still hold 99% of the random initial weights (train.ema_decay=0.99 every "
        "train.ema_every=1 steps): --no-ema uses the trained weights"
    )
    capsys.readouterr()
    for flags, weights in (([], "EMA weights"), (["--no-ema"], "raw weights")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fusedit"):
            assert main(["export", str(run), "--out", str(tmp_path / "pipe"), "--quiet", *flags]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"exporting {ckpt} ({weights})"
        assert [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()] == (
            [] if flags else [warning]
        )
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusedit"):
        sample = [
            "sample",
            str(run),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
        assert main(sample) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"sampling {ckpt} (EMA weights)"
    assert [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()] == [warning]
    # A pipeline folder is judged by what its export recorded: the raw weights (the last export) are not
    # warned about, an export of the EMA is.
    from fusedit.pipeline import export_source

    assert export_source(tmp_path / "pipe") == {
        "checkpoint": str(ckpt.resolve()),
        "step": 1,
        "weights": "raw",
        "ema_holds_start": None,
    }
    assert main(["export", str(run), "--out", str(tmp_path / "pipe-ema"), "--quiet"]) == 0
    assert export_source(tmp_path / "pipe-ema")["ema_holds_start"] == 0.99
    for pipe, warned in (("pipe", []), ("pipe-ema", [f"step 1 of {ckpt.resolve()}) still hold 99%"])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fusedit"):
            out = str(tmp_path / f"{pipe}-out")
            argv = ["sample", str(tmp_path / pipe), "--prompt", "x", "--steps", "1", "--out", out, "--quiet"]
            assert main(argv) == 0
        said = [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()]
        assert [m[m.index("step 1") : m.index("%") + 1] for m in said] == warned
    # A run before its first checkpoint: the line `fusedit sample` gives.
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(run / "config.yaml", live / "config.yaml")
    capsys.readouterr()
    assert main(["export", str(live), "--out", str(tmp_path / "pipe2")]) == 2
    assert _one_line_error(capsys) == (
        f"fusedit: error: run {str(live)!r} has no finished checkpoint yet (the first is saved at step 1, "
        "the end of the run)"
    )
    assert not (tmp_path / "pipe2").exists()


def test_an_error_or_ctrl_c_line_under_a_progress_bar_starts_a_line_of_its_own(tmp_path, capsys, monkeypatch):
    """Printed while a bar was drawn, the line was glued to the end of the bar's ("...2.01step/s]fusedit:
    interrupted: ...") and the bar was redrawn below it when it was collected: the last line on the
    terminal was a stale bar, not the message. The bars are closed first: the bar keeps its line, the
    message comes last."""
    import gc

    from tqdm.auto import tqdm

    import fusedit.cli.train
    from fusedit.config import ConfigError

    def working(stop):
        def run(*args, **kwargs):
            bar = tqdm(total=10, desc="work")
            bar.update(3)
            raise stop()  # a new one: the bar goes with its traceback once main is done with it

        return run

    for stop, line in (
        (
            KeyboardInterrupt,
            "fusedit: interrupted: stopped before anything was written; rerun the same command",
        ),
        (lambda: ConfigError("train.lr=-1 is not allowed"), "fusedit: error: train.lr=-1 is not allowed"),
    ):
        monkeypatch.setattr(fusedit.cli.train, "load_config", working(stop))
        main(["train", _tiny_yaml(tmp_path), "--out", str(tmp_path / "run")])
        gc.collect()  # as at the process's exit: a bar still open is closed, and redrawn, when collected
        err = capsys.readouterr().err
        bar, _, rest = err.rpartition("\n" + line + "\n")
        assert rest == "" and re.search(r"work:  30%\S* *\| 3/10 \[[^\n]*\]$", bar), repr(err)
        assert err.count(line) == 1


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


def test_ctrl_c_in_train_says_in_one_line_which_checkpoint_is_kept_and_how_to_go_on(
    tmp_path, capsys, monkeypatch
):
    from fusedit.train import loop

    config, run = _tiny_yaml(tmp_path), tmp_path / "run"
    argv = ["train", config, "train.steps=4", "train.checkpoint_every=2", "--out", str(run), "--quiet"]
    ctrl_c_at_step_3 = CtrlCAtStep(monkeypatch, 3)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"fusedit: interrupted: the last checkpoint is {run / 'checkpoints' / 'step_00000002'}; rerun the same "
        "command with --resume to continue from it"
    )
    assert not any("Traceback" in line for line in err)
    ctrl_c_at_step_3.disarm()
    assert main([*argv, "--resume"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4

    ctrl_c_at_step_3.arm()  # --overwrite, stopped after a checkpoint of the new run: --resume, not --overwrite again
    ctrl_c_at_step_3.step = 4  # step 3 trained past the checkpoint: the line says a resume trains it again
    assert main([*argv, "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: interrupted: the last checkpoint is {run / 'checkpoints' / 'step_00000002'} (step 3 is "
        "redone); rerun the same command with --resume in place of --overwrite to continue from it"
    )

    def ctrl_c(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # stopped before the earlier run was deleted: --resume would continue it
        m.setattr(loop, "_start_fresh", ctrl_c)
        assert main([*argv, "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: interrupted: the earlier run in {run} was not deleted yet; rerun the same command to start over"
    )
    ctrl_c_at_step_3.arm()  # stopped before the first checkpoint: nothing is lost by the same command again
    assert main([*argv[:3], "train.checkpoint_every=5", *argv[4:], "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: interrupted: no checkpoint was saved yet in {run}; rerun the same command to start again"
    )


def test_ctrl_c_before_the_work_starts_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    """A Ctrl+C while the libraries or the config load comes before any command that says what it kept has
    written anything: the line says so, and what to do. A command that may have written part of its output
    (demo) does not claim it."""
    import fusedit.cli.train

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedit.cli.train, "load_config", ctrl_c)
    assert main(["train", _tiny_yaml(tmp_path), "--out", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err == (
        "fusedit: interrupted: stopped before anything was written; rerun the same command\n"
    )
    assert not (tmp_path / "run").exists()
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 130
    assert capsys.readouterr().err == "fusedit: interrupted: stopped before the end\n"


@pytest.mark.parametrize("bug", [ValueError("boom"), TypeError("boom")], ids=["ValueError", "TypeError"])
def test_a_bug_inside_a_command_keeps_its_traceback_while_bad_input_is_one_line(capsys, monkeypatch, bug):
    """Bad input (a ConfigError) and what the system refused (an OSError) are one line and exit status 2. A
    plain ValueError or TypeError (a bad unpacking, numpy's broadcasting, int() of bad data) is a bug: it
    leaves main with its traceback, where a line without a location would read as a config typo."""
    import fusedit.cli.describe
    from fusedit.config import ConfigError

    def raising(error):
        def run(*args, **kwargs):
            raise error

        return run

    monkeypatch.setattr(fusedit.cli.describe, "to_yaml", raising(bug))
    with pytest.raises(type(bug), match="^boom$"):
        main(["config", "debug"])
    for error in (ConfigError("train.lr=-1 is not allowed"), PermissionError("cannot write /x")):
        monkeypatch.setattr(fusedit.cli.describe, "to_yaml", raising(error))
        assert main(["config", "debug"]) == 2
        assert _one_line_error(capsys) == f"fusedit: error: {error}"


def test_refiner_heads_that_do_not_divide_the_width_are_refused_before_the_run_folder(tmp_path, capsys):
    """model.refiner_heads is checked at load, against the refiner's width: it failed at the build, after
    the run folder was made and locked (train.lock left behind)."""
    run = tmp_path / "run"
    argv = ["train", "debug-lidit", "model.refiner_heads=7", "--out", str(run), "train.steps=1"]
    assert main(argv) == 2
    assert _one_line_error(capsys) == (
        "fusedit: error: model.refiner_heads=7 does not divide the refiner width (model.dit_hidden_size=128) "
        "into whole heads (allowed: a divisor of 128)"
    )
    assert not run.exists()
    assert main(["config", "debug-lidit", "model.refiner_heads=7"]) == 2  # no build needed to see it
    assert "model.refiner_heads=7 does not divide" in _one_line_error(capsys)


def test_key_value_heads_that_do_not_divide_the_query_heads_are_refused_before_the_run_folder(
    tmp_path, capsys
):
    """model.num_kv_heads of a shallow design must divide its query heads (model.num_heads, else the LLM's):
    it passed config, describe and the build, wrote the run folder, and failed in attention at the first
    step with a torch traceback (h-knobs S1)."""
    from fusedit.config import ConfigError, ModelConfig, check_kv_heads

    run = tmp_path / "run"
    cross = ["model.design=dit-cross", "train.steps=1"]
    assert (
        main(["train", "debug", *cross, "model.num_heads=8", "model.num_kv_heads=3", "--out", str(run)]) == 2
    )
    assert _one_line_error(capsys) == (
        "fusedit: error: model.num_kv_heads=3 does not divide model.num_heads=8: each key/value head serves a "
        "whole number of query heads (allowed: 1, 2, 4, 8)"
    )
    assert not run.exists()
    assert main(["config", "debug", *cross, "model.num_kv_heads=3"]) == 2  # the debug LLM's 4 heads
    assert "does not divide the LLM's 4 heads (model.num_heads unset)" in _one_line_error(capsys)
    # Where only the build knows the LLM (a hub id not in the cache), the build refuses it the same way.
    with pytest.raises(ConfigError, match=r"^model.num_kv_heads=3 does not divide the LLM's 8 heads"):
        check_kv_heads(ModelConfig(design="dit-cross", num_kv_heads=3), 8)
    check_kv_heads(ModelConfig(design="dit-cross", num_heads=8, num_kv_heads=4), None)


def test_a_hidden_layer_out_of_the_llms_range_is_refused_at_load_where_its_depth_is_known(tmp_path, capsys):
    """text.hidden_layer (and extra_text.N's) of a shallow design against the LLM's depth, at load where the
    config knows it (the debug LLM's text.arch: 6 layers): it was refused only at the build, after the run
    folder was made and locked (h-knobs S3)."""
    run = tmp_path / "run"
    argv = [
        "train",
        "debug",
        "model.design=dit-cross",
        "text.hidden_layer=7",
        "train.steps=1",
        "--out",
        str(run),
    ]
    assert main(argv) == 2
    assert _one_line_error(capsys) == (
        "fusedit: error: text.hidden_layer=7 is out of range for an LLM with 6 layers (allowed: -7..6)"
    )
    assert not run.exists()
    assert main(["config", "debug-lidit", "extra_text.0.hidden_layer=-99"]) == 2
    assert "extra_text.0.hidden_layer=-99 is out of range for an LLM with" in _one_line_error(capsys)
    assert main(["config", "debug", "model.design=dit-cross", "text.hidden_layer=-7"]) == 0


def test_a_full_disk_at_a_checkpoint_stops_train_in_one_line_and_resume_goes_on(
    tmp_path, capsys, monkeypatch
):
    """torch.save on a full disk raises a RuntimeError of its zip writer: one line naming the file, the
    folder, the checkpoint kept and what to do; the half-written checkpoint is gone. A save killed outright
    leaves its .partial folder: the resume deletes it before it writes anything (its metrics first)."""
    from fusedit.train import loop

    run = tmp_path / "run"
    root = run / "checkpoints"
    argv = [
        "train",
        _tiny_yaml(tmp_path),
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
    ]
    argv += ["--out", str(run), "--quiet"]
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if Path(path).parent.name == ".step_00000004.partial":
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 1720448 vs 1720336"
            )
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        assert main(argv) == 2
    from fusedit.files import readable_size

    size = readable_size(sum(f.stat().st_size for f in (root / "step_00000002").iterdir()))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fusedit: error: checkpoint step 4 was not saved: writing optimizer.pt in {str(root)!r} failed (torch's "
        "writer stopped short, as on a full disk: unexpected pos 1720448 vs 1720336); its partial folder is "
        f"deleted (a checkpoint takes about {size} here, and train.keep_checkpoints=2 of them stay beside the "
        f"one being saved): free disk space there; the last checkpoint is {root / 'step_00000002'} (steps 3-4 "
        "are redone); rerun the same command with --resume to continue from it"
    )
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    leftover = root / ".step_00000004.partial"
    leftover.mkdir()
    (leftover / "denoiser.safetensors").write_bytes(bytes(1000))
    seen, rewind = [], loop.rewind_metrics

    def first_write(*args):
        seen.append(leftover.exists())
        rewind(*args)

    monkeypatch.setattr(loop, "rewind_metrics", first_write)
    assert main([*argv, "--resume"]) == 0
    assert seen == [False]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_ctrl_c_in_cache_latents_counts_the_finished_shards_kept(tmp_path, capsys, monkeypatch):
    import fusedit.data.latents

    cache, finished = tmp_path / "cache", []

    def interrupted(*args, **kwargs):
        cache.mkdir(exist_ok=True)
        for j, samples in enumerate(finished):  # the record is written after the tensors: both mark a shard
            (cache / f"latents-{j:06d}.safetensors").write_bytes(b"")
            (cache / f"latents-{j:06d}.json").write_text(json.dumps({"samples": samples, "skipped": []}))
        (cache / f"latents-{len(finished):06d}.safetensors").write_bytes(b"")  # one being written
        raise KeyboardInterrupt

    monkeypatch.setattr(fusedit.data.latents, "cache_latents", interrupted)
    argv = ["cache-latents", "debug", "--out", str(cache), "--quiet"]
    for finished[:], kept in (
        ([], f"no shard was finished yet in {cache}; rerun the same command to start again"),
        ([[]], f"no shard was finished yet in {cache}; rerun the same command to start again"),  # all skipped
        ([[{"id": "a"}]], f"1 finished shard in {cache} is kept; rerun the same command to go on"),
        (
            [[{"id": "a"}], [{"id": "b"}]],
            f"2 finished shards in {cache} are kept; rerun the same command to go on",
        ),
    ):
        assert main(argv) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"fusedit: interrupted: {kept}"


def test_train_refuses_an_existing_run_without_resume_or_overwrite(tmp_path, capsys):
    from fusedit.checkpoints import find_checkpoint

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


def test_an_overwrite_killed_while_deleting_the_old_checkpoints_leaves_none_torn(tmp_path, monkeypatch):
    """--overwrite deletes the earlier run's checkpoints; a kill midway (a deletion goes in no set order)
    must not leave a step folder holding state.json but missing weights, which --resume would find."""
    from fusedit.checkpoints import find_checkpoint

    config, run = _tiny_yaml(tmp_path), tmp_path / "run"

    def train(*flags: str) -> int:
        return main(["train", config, "train.steps=2", "--out", str(run), "--quiet", *flags])

    assert train() == 0
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", rmtree_dying_after_one_weight_file(shutil.rmtree, _Kill()))
        with pytest.raises(_Kill):
            train("--overwrite")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(run)
    assert train("--overwrite") == 0
    assert find_checkpoint(run).name == "step_00000002"
    assert [p.name for p in run.iterdir() if p.name.endswith(".deleting")] == []


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
    # The run stopped before train.steps says how to go on (h-docs R6).
    assert capsys.readouterr().out == (
        f"trained to step 2; checkpoints in {run / 'checkpoints'}; continue with the same command with "
        "--resume, without --stop-at or with a later one\n"
    )
    saved = (run / "config.yaml").read_text()
    assert train(5, "--resume", "--stop-at", "1") == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to train: the run is already at step 2, at or past --stop-at 1; ")
    # Nothing was trained with train.steps=5: a later plain --resume must not take it from config.yaml.
    assert (run / "config.yaml").read_text() == saved
    assert train(2, "--resume") == 0
    out = capsys.readouterr().out
    assert out.startswith("nothing to train: the run already finished (step 2 of train.steps=2); ")
    assert train(4, "--resume", "--stop-at", "3") == 0
    assert capsys.readouterr().out.endswith(
        "; continue with the same command, without --stop-at or with a later one\n"
    )
    assert train(4, "--overwrite", "--stop-at", "1") == 0
    assert capsys.readouterr().out.endswith(
        "; continue with the same command with --resume in place of --overwrite, without --stop-at or with a "
        "later one\n"
    )
    assert train(4, "--resume") == 0
    assert capsys.readouterr().out == f"trained to step 4; checkpoints in {run / 'checkpoints'}\n"


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


FIXTURE = Path(__file__).parent / "fixtures" / "fusedit-official-tiny" / "transformer"


def test_convert_asks_for_a_missing_vae_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import fusedit.convert.fusedit_official

    def load_official(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fusedit.convert.fusedit_official, "load_official", load_official)
    assert main(["convert", str(FIXTURE), "--out", str(tmp_path / "run")]) == 2
    assert "has no VAE: pass --vae (e.g. stabilityai/" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_convert_reads_a_pickled_file_only_with_trust_pickle(tmp_path, capsys):
    from safetensors.torch import load_file

    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    # A DeepSpeed file pickles more than tensors (here its training arguments), which weights_only refuses.
    (tmp_path / "step").mkdir()
    shutil.copy(FIXTURE / "config.json", tmp_path / "step" / "config.json")
    weights = tmp_path / "step" / "mp_rank_00_model_states.pt"
    torch.save(
        {"module": load_file(FIXTURE / "model.safetensors"), "args": argparse.Namespace(lr=1)}, weights
    )
    tiny_vae().save_pretrained(tmp_path / "vae")
    word_tokenizer(vocabulary()).save_pretrained(tmp_path / "tok")
    convert = ["convert", str(weights), "--vae", str(tmp_path / "vae"), "--tokenizer", str(tmp_path / "tok")]
    assert main([*convert, "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert f"cannot read {str(weights)!r}" in err and "only for a file you trust: pass --trust-pickle" in err
    assert main([*convert, "--out", str(tmp_path / "run"), "--trust-pickle"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


def test_a_converted_run_samples_from_another_working_directory(tmp_path, monkeypatch):
    """The folders convert reads (--vae, --tokenizer, the download's own) are saved as absolute paths."""
    from fusedit.checkpoints import find_checkpoint, load_checkpoint_config
    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    monkeypatch.chdir(tmp_path)
    tiny_vae().save_pretrained("vae")
    word_tokenizer(vocabulary()).save_pretrained("tok")
    assert main(["convert", str(FIXTURE), "--vae", "vae", "--tokenizer", "tok", "--out", "run"]) == 0
    cfg = load_checkpoint_config(find_checkpoint("run"))
    assert (cfg.vae.model_id, cfg.text.tokenizer) == (str(tmp_path / "vae"), str(tmp_path / "tok"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["sample", str(tmp_path / "run"), "--prompt", "a red circle", "--steps", "1", "--quiet"]
    assert main([*args, "--out", "out"]) == 0


def test_fid_names_a_folder_of_one_image(tmp_path, capsys, monkeypatch, caplog):
    import numpy as np
    from PIL import Image

    import fusedit.eval.inception

    class MeanColour:  # a stand-in feature model: each image's mean colour
        def __init__(self, model_id, device=None):
            self.id = f"mean-colour:{model_id}"

        def __call__(self, images):
            return torch.tensor(np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) for im in images]))

    monkeypatch.setattr(fusedit.eval.inception, "TransformersImageFeatures", MeanColour)
    for folder, count in (("one", 1), ("three", 3), ("four", 4)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            colour = (60 * i, 200 - 40 * i, 30 * (i % 2))
            Image.new("RGB", (8, 8), colour).save(tmp_path / folder / f"{i:05d}.png")

    def fid(samples: str, reference: str) -> int:
        return main(
            [
                "fid",
                str(tmp_path / samples),
                "--reference",
                str(tmp_path / reference),
                "--reference-name",
                reference,
                "--features",
                "x",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )

    for samples, reference, what in (("one", "three", "samples"), ("three", "one", "reference")):
        assert fid(samples, reference) == 2
        err = _one_line_error(capsys)
        assert f"the {what} folder {str(tmp_path / 'one')!r} holds 1 image" in err
        assert "(allowed: a folder of at least 2 images)" in err
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert fid("three", "four") == 0
    assert capsys.readouterr().out.startswith("FD (x features): ")
    # A handful of images gives a number, with a warning of what it is worth.
    assert (
        f"the samples folder {str(tmp_path / 'three')!r} holds 3 images: FD over fewer than 1000"
        in caplog.text
    )


def test_under_torchrun_rank_0_alone_warns_of_the_config(caplog, monkeypatch, tmp_path):
    # Every rank loads the config; what it says of settings that change nothing is said once, by rank 0.
    monkeypatch.setattr(
        "fusedit.train.loop.train",
        lambda cfg, out, **kw: {"rank": int(os.environ["RANK"]), "step": 0, "start_step": 0},
    )
    args = ["train", "debug", "model.refiner_heads=2", "--stop-at", "100000", "--out", str(tmp_path / "run")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert main(args) == 0
        assert ("model.refiner_heads=2 changes nothing" in caplog.text) is said, rank
        assert ("--stop-at 100000 is beyond train.steps" in caplog.text) is said, rank
    assert not logging.getLogger("fusedit.config").disabled


def test_under_torchrun_each_rank_writes_its_own_error_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    bad = ["train", "debug", "model.pos_embed=nope"]  # train: the one command torchrun runs in several
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the line of a plain run
    assert main(bad) == 2
    assert capsys.readouterr().err.startswith("fusedit: error: model.pos_embed='nope'")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedit: error (rank 1): model.pos_embed='nope' is not allowed")
    assert err.endswith("\n") and err.count("\n") == 1
    # A machine's other processes read the same files: its local rank 0 says it, they say so in short; also
    # of what train() refuses before the process group (a data path, an LLM that deep fusion cannot read).
    monkeypatch.setattr("fusedit.cli.RANK_0_FIRST_S", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    for refused in (bad, ["train", "debug", "data.source=folder", f"data.root={tmp_path / 'nothing'}"]):
        assert main(refused) == 2
        assert capsys.readouterr().err == (
            "fusedit: error (rank 1): stopped at start-up, as this machine's local rank 0 did: its error says why\n"
        )
    assert not (tmp_path / "runs").exists()


def test_log_lines_go_above_the_progress_bar(capsys, monkeypatch):
    import logging

    from tqdm import tqdm

    def train(args):  # a bar on the console, and a warning while it is drawn
        with tqdm(total=2, desc="train", file=sys.stderr) as bar:
            bar.update(1)
            logging.getLogger("fusedit.train").warning("warmup is long")
            bar.update(1)
        return 0

    monkeypatch.setattr("fusedit.cli.train.cmd_train", train)
    console = logging.StreamHandler(sys.stderr)  # what `fusedit` has outside pytest (logging.basicConfig)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    monkeypatch.setattr(logging.root, "handlers", [*logging.root.handlers, console])
    line = "WARNING fusedit.train: warmup is long"
    assert main(["train", "debug"]) == 0
    assert line in re.split(r"[\r\n]", capsys.readouterr().err)  # a line of its own, not after the bar's
    assert logging.root.handlers[-1] is console  # restored


@pytest.mark.parametrize(
    "command",
    [
        ["train", "CONFIG"],
        ["demo"],
        ["export", "RUN"],
        ["eval", "RUN"],
        ["cache-latents", "CONFIG"],
        ["convert", "RUN"],
        ["consolidate", "RUN"],
    ],
)
def test_an_out_that_is_a_file_fails_at_once_with_one_line(tmp_path, capsys, monkeypatch, command):
    """Not a bare [Errno 17] File exists or [Errno 20] Not a directory once the work is done: the check
    comes before training, exporting or any model folder is read (RUN does not even exist)."""
    import fusedit.demo
    import fusedit.train.loop

    monkeypatch.setattr(fusedit.train.loop, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(fusedit.demo, "run_demo", lambda *a, **k: pytest.fail("trained"))
    afile = tmp_path / "afile"
    afile.write_text("")
    names = {"CONFIG": _tiny_yaml(tmp_path), "RUN": str(tmp_path / "run")}
    argv = [names.get(word, word) for word in command]
    assert main([*argv, "--out", str(afile)]) == 2
    assert f"--out {str(afile)!r} is a file (allowed: a folder, new or existing)" in _one_line_error(capsys)
    assert main([*argv, "--out", str(afile / "sub")]) == 2
    err = _one_line_error(capsys)
    assert f"--out {str(afile / 'sub')!r} is inside the file {str(afile)!r} (allowed: a folder" in err


def test_a_diverging_run_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """NaN/inf steps in a row reach train.max_bad_steps: said in one line, as a learning rate that could
    only diverge is at load."""
    import fusedit.train.loop as loop

    args = ["train", _tiny_yaml(tmp_path), "train.steps=6", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "train.lr=1e38"]) == 2
    assert "train.lr=1e+38 must be <= 1" in _one_line_error(capsys)
    assert main([*args, "train.llm_lr=nan"]) == 2  # NaN passes every comparison
    assert "train.llm_lr=nan must be a number (NaN is not)" in _one_line_error(capsys)
    monkeypatch.setattr(loop, "flow_loss", lambda v, x0, noise: (v - noise).sum() * float("nan"))
    assert main([*args, "train.max_bad_steps=2"]) == 2
    assert "2 steps in a row had a NaN/inf loss or gradient (train.max_bad_steps=2)" in _one_line_error(
        capsys
    )


def test_prompts_file_is_read_as_utf8_whatever_the_locale_and_a_bom_is_dropped(tmp_path):
    from fusedit.cli.sample import _read_prompts
    from fusedit.config import ConfigError

    path = tmp_path / "prompts.txt"
    # The BOM Windows Notepad writes first; the first prompt used to start with an invisible "\ufeff".
    path.write_bytes(b"\xef\xbb\xbf" + "a café at dusk\n\n  a 🌸 in rain \n".encode())
    args = argparse.Namespace(prompt=["first"], prompts_file=str(path))
    assert _read_prompts(args) == ["first", "a café at dusk", "a 🌸 in rain"]
    path.write_bytes("a café".encode("latin-1"))  # not UTF-8: one line naming the file and what is allowed
    with pytest.raises(
        ConfigError, match=r"prompts.txt' is not UTF-8 text \(byte 5 is 0xe9; allowed: a UTF-8"
    ):
        _read_prompts(args)


def test_transformers_log_lines_are_written_above_progress_bars(monkeypatch):
    """transformers logs through a console handler of its own (it does not propagate): while a bar is
    drawn, its lines go through tqdm.write too, and its handler is put back afterwards."""
    import logging

    import tqdm

    from fusedit.cli import _logs_above_bars

    hf = logging.getLogger("transformers")
    handler = logging.StreamHandler(sys.stderr)
    monkeypatch.setattr(hf, "handlers", [handler])
    monkeypatch.setattr(hf, "propagate", False)
    written = []
    monkeypatch.setattr(tqdm.std.tqdm, "write", classmethod(lambda cls, s, **kw: written.append(s)))
    with _logs_above_bars(True):
        hf.warning("a transformers warning")
    assert written == ["a transformers warning"]
    assert hf.handlers == [handler]
    with _logs_above_bars(False):  # --quiet: no bars, nothing moved
        assert hf.handlers == [handler]


def test_a_re_export_of_other_weights_moves_the_earlier_scores_aside_and_save_pretrained_drops_its_record(
    tmp_path, caplog, monkeypatch
):
    """An export into an earlier export's folder keeps what the user put there; the earlier weights' eval/
    stays eval/ only where the weights are the same, else it moves aside, named after the weights it scored
    (it would read as the new weights' scores), also where the earlier weights cannot be read (decided before
    anything moves: the folder is never left renamed away). save_pretrained over an export drops its
    fusedit_export.json, which would describe the earlier weights, and moves eval/ aside as an export does
    where it writes other weights."""
    from types import SimpleNamespace

    from fusedit.checkpoints import load_model
    from fusedit.pipeline import EXPORT_SOURCE, FuseDiTPipeline, export_source, save_pretrained

    run, pipe = _tiny_run(tmp_path), tmp_path / "pipe"
    assert main(["export", str(run), "--out", str(pipe), "--quiet"]) == 0
    (pipe / "eval").mkdir()
    (pipe / "eval" / "scores.md").write_text("| overall | 0.5 |")
    (pipe / "MODEL_CARD.md").write_text("mine")
    assert main(["export", str(run), "--out", str(pipe), "--quiet"]) == 0  # the same weights: scores kept
    assert (pipe / "eval" / "scores.md").is_file() and "dropped" not in caplog.text
    assert main(["export", str(run), "--no-ema", "--out", str(pipe), "--quiet"]) == 0  # the raw weights
    step = export_source(pipe)["step"]
    assert not (pipe / "eval").exists() and (pipe / "MODEL_CARD.md").read_text() == "mine"
    aside = pipe / f"eval-replaced-step{step}-ema"
    assert (aside / "scores.md").read_text() == "| overall | 0.5 |"
    assert (
        f"export: {pipe / 'eval'} scored the weights this export replaces: kept beside the new scores as {aside}"
        in caplog.text
    )
    assert export_source(pipe)["weights"] == "raw"
    # A damaged earlier export (what a re-export may be meant to repair): other weights, and nothing moves
    # before that is decided.
    (pipe / "eval").mkdir()
    (pipe / "eval" / "scores.md").write_text("raw")
    with open(next((pipe / "transformer").glob("*.safetensors")), "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    assert main(["export", str(run), "--out", str(pipe), "--quiet"]) == 0
    assert (pipe / "eval-replaced-step1-raw" / "scores.md").read_text() == "raw" and not (
        pipe / "eval"
    ).exists()
    assert (aside / "scores.md").is_file() and export_source(pipe)["weights"] == "ema"
    (pipe / "eval").mkdir()
    (pipe / "eval" / "scores.md").write_text("ema")
    model, cfg, _ = load_model(run)
    save_pretrained(model, cfg, pipe)  # the same EMA weights: eval/ stays
    assert not (pipe / EXPORT_SOURCE).exists() and export_source(pipe) is None
    assert (pipe / "MODEL_CARD.md").read_text() == "mine" and (
        pipe / "eval" / "scores.md"
    ).read_text() == "ema"
    model, cfg, _ = load_model(run, use_ema=False)
    save_pretrained(model, cfg, pipe)  # the raw weights over them, and no record left to name the EMA's
    assert not (pipe / "eval").exists() and (pipe / "eval-replaced" / "scores.md").read_text() == "ema"
    # push_to_hub uploads the folder inside diffusers' save: eval/ is not in it then, and is back after.
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    uploaded = []
    monkeypatch.setattr(pipeline_utils, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(
        pipeline_utils.DiffusionPipeline,
        "_upload_folder",
        lambda self, folder, *a, **kw: uploaded.append(sorted(p.name for p in Path(folder).iterdir())),
        raising=False,
    )
    (pipe / "eval").mkdir()
    save_pretrained(model, cfg, pipe)  # the same raw weights: this eval/ stays
    FuseDiTPipeline.from_model(model, cfg).save_pretrained(str(pipe), push_to_hub=True, repo_id="me/pipe")
    assert len(uploaded) == 1 and "eval" not in uploaded[0] and "transformer" in uploaded[0]
    assert (pipe / "eval").is_dir() and not list(tmp_path.glob(".*eval-held"))
    assert (
        f"save_pretrained: {pipe / 'eval'} scored the weights this save_pretrained replaces: kept beside the new "
        f"scores as {pipe / 'eval-replaced'}" in caplog.text
    )


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_an_export_killed_while_replacing_an_earlier_one_loses_nothing(tmp_path, monkeypatch, kill_at):
    """Replacing an earlier export moves it aside, moves the user's entries (eval/) into the new pipeline,
    renames that into place and deletes the old one. Killed at any of those steps (the kill_at-th rename of
    the pair's folders; 4: while deleting), the next export finishes with the user's results kept."""
    import fusedit.pipeline

    run, pipe = _tiny_run(tmp_path), tmp_path / "pipe"
    assert main(["export", str(run), "--out", str(pipe), "--quiet"]) == 0
    (pipe / "eval").mkdir()
    (pipe / "eval" / "scores.md").write_text("| overall | 0.5 |")
    renames, replace, rmtree = [], os.replace, shutil.rmtree

    def killed_replace(src, dst):
        if Path(src).parent in (tmp_path, tmp_path / ".pipe.old"):
            renames.append(src)
            if len(renames) == kill_at:
                raise KeyboardInterrupt
        replace(src, dst)

    def killed_rmtree(path, *args, **kwargs):
        if Path(path) == tmp_path / ".pipe.old" and kill_at == 4:
            (Path(path) / "model_index.json").unlink()  # a deletion cut short
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(fusedit.pipeline.os, "replace", killed_replace)
        m.setattr(fusedit.pipeline.shutil, "rmtree", killed_rmtree)
        assert main(["export", str(run), "--out", str(pipe), "--quiet"]) == 130
    assert main(["export", str(run), "--out", str(pipe), "--quiet"]) == 0
    assert (pipe / "eval" / "scores.md").read_text() == "| overall | 0.5 |"
    assert (pipe / "model_index.json").is_file() and (pipe / "transformer").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".pipe")) == []


def test_describe_of_a_lora_config_without_peft_gives_the_rest(capsys, monkeypatch):
    """describe counted the adapters through peft and so refused a LoRA config where peft is missing: a
    read-only planning command now says what it cannot count and prints the rest."""
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    assert main(["describe", "debug", "train.dit_lora.rank=8"]) == 0
    out = capsys.readouterr().out
    assert (
        "(parameters: the LoRA adapters are counted through peft, which is not installed: pip install peft)\n"
        in out
    )
    assert "32 px (64 image + 16 text tokens): DiT forward 125.600 MFLOP" in out


def test_stop_at_beyond_train_steps_is_warned_of(tmp_path, capsys, caplog):
    """`--stop-at 5` with train.steps=1 trained 1 step and said nothing of the stop it never reached."""
    config, run = _tiny_yaml(tmp_path), tmp_path / "run"
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        argv = ["train", config, "train.steps=1", "--out", str(run), "--quiet", "--stop-at", "5"]
        assert main(argv) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "fusedit.cli"] == [
        "--stop-at 5 is beyond train.steps=1: the run ends at step 1 first"
    ]
    assert capsys.readouterr().out == f"trained to step 1; checkpoints in {run / 'checkpoints'}\n"


def test_huggingface_hub_warnings_are_printed_once():
    """Offline, each of huggingface_hub's retry warnings came twice: its own handler's line and the root's."""
    script = (  # the hub's HTTP helpers load its logging module, which adds its handler
        "import logging, huggingface_hub.utils._http\n"
        "from fusedit.cli import main\n"
        "assert main(['presets']) == 0\n"
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("Retrying in 1s [Retry 1/5].") == 1, r.stderr


def test_a_new_run_into_a_folder_of_other_files_is_warned_of_in_one_line(tmp_path, capsys, caplog):
    """`fusedit train`/`demo` into an earlier sample's folder added a run beside its images without a word,
    after which `fusedit sample` refused the folder (h-docs R5). Trained into all the same: nothing is
    deleted, and a run's own folder (resumed or started over) is not warned of."""
    config, run = _tiny_yaml(tmp_path), tmp_path / "run"
    run.mkdir()
    (run / "00000.png").write_bytes(b"mine")
    (run / "sub").mkdir()
    argv = ["train", config, "train.steps=1", "--out", str(run), "--quiet"]

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "fusedit.cli"]

    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert main(argv) == 0
    assert warnings() == [
        f"{str(run)!r} already holds files that are not a run's (e.g. '00000.png'): the run's files go beside them"
    ]
    assert (run / "00000.png").read_bytes() == b"mine"
    (run / "00000.png").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert main([*argv, "--overwrite"]) == 0
    assert warnings() == [
        f"{str(run)!r} already holds files that are not a run's (e.g. the folder 'sub'): the run's files go "
        "beside them"
    ]
    (run / "sub").rmdir()
    (run / "eval").mkdir()  # `fusedit eval`'s results
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert main([*argv, "--overwrite"]) == 0
        assert main(["train", config, "train.steps=2", "--out", str(run), "--quiet", "--resume"]) == 0
    assert warnings() == []


def test_json_of_the_wrong_shape_is_one_line_like_damaged_json(tmp_path, capsys):
    """A checkpoint's state.json and convert's config.json or index that parse as JSON but are not what they
    must be (a list, an object without "step", shard names that are not strings) are refused in one line
    naming the file, not a KeyError/TypeError/AttributeError traceback of the code that reads them."""
    run = _tiny_run(tmp_path)
    state = next(run.glob("checkpoints/step_*/state.json"))
    for bad in ("[1, 2]", '{"x": 1}', '{"step": "x"}'):
        state.write_text(bad)
        capsys.readouterr()
        assert main(["sample", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "s")]) == 2
        assert f"{str(state)!r} is not a checkpoint's state (allowed: a JSON object" in _one_line_error(
            capsys
        )
    weights = tmp_path / "release"
    weights.mkdir()
    (weights / "config.json").write_text("[1]")
    (weights / "model.safetensors").write_bytes(b"")
    assert main(["convert", str(weights), "--out", str(tmp_path / "c1")]) == 2
    assert "holds a JSON list, not an object (allowed: a JSON object" in _one_line_error(capsys)
    from fusedit.config import ConfigError
    from fusedit.convert.fusedit_official import read_state_dict

    index = tmp_path / "model.safetensors.index.json"
    for bad, says in (
        ("[1]", "holds a JSON list, not an object"),
        ('{"weight_map": {"a": 1}}', "has no weight_map"),
    ):
        index.write_text(bad)
        with pytest.raises(ConfigError, match=says):
            read_state_dict(index)
