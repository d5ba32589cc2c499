"""A run whose model folders moved after training (another disk, another machine): `fusedit sample`,
`serve`, `eval` and `export` read them from their new place with --relocate KEY=PLACE, the same images as
before the move; a saved path to nothing names the flag before anything loads; bad keys and places are
one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_ARCH, randomize, tiny_config
from fusedit.cli import main
from fusedit.config import model_paths
from fusedit.data.shapes import vocabulary
from fusedit.system import build_model
from fusedit.text.tokenizer import word_tokenizer
from fusedit.train.checkpoint import save_checkpoint


@pytest.fixture
def moved_run(tmp_path):
    """A checkpointed run whose LLM (with its tokenizer) was read from a folder, sampled once, and the
    LLM folder then moved to another place."""
    llm = tmp_path / "disk-a" / "llm"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY_ARCH)).save_pretrained(llm)
    word_tokenizer(vocabulary()).save_pretrained(llm)
    cfg = tiny_config(text={"model_id": str(llm), "family": "qwen2"}, model={"num_layers": 2})
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize(model.denoiser)
    save_checkpoint(
        tmp_path / "run", 0, cfg, model.denoiser, model.denoiser.state_dict(), None, model.text.llm
    )
    assert sample(tmp_path / "run", tmp_path / "before") == 0
    new = tmp_path / "disk-b" / "llm"
    new.parent.mkdir()
    llm.rename(new)
    return tmp_path / "run", llm, new


def sample(model, out, *args):
    return main(
        [
            "sample",
            str(model),
            "--prompt",
            "a red circle",
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
            *args,
        ]
    )


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def error(capsys) -> str:
    """The one line `fusedit` printed for a refused command (exit status 2)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("fusedit: error: ") and "\n" not in err, err
    return err.removeprefix("fusedit: error: ")


def test_sample_reads_a_moved_llm_from_its_new_place(moved_run, tmp_path, capsys):
    run, old, new = moved_run
    assert sample(run, tmp_path / "lost") == 2
    assert error(capsys) == (
        f"the saved config's text.model_id={str(old)!r} is a path to nothing (if it moved: --relocate "
        "text.model_id=NEW_PLACE)"
    )
    assert not (tmp_path / "lost").exists()  # refused before the folder is made or anything loads
    assert sample(run, tmp_path / "after", "--relocate", f"text.model_id={new}") == 0
    assert np.array_equal(pixels(tmp_path / "after" / "00000.png"), pixels(tmp_path / "before" / "00000.png"))


def test_export_and_eval_take_the_new_place(moved_run, tmp_path, capsys):
    run, _, new = moved_run
    flag = ["--relocate", f"text.model_id={new}"]
    assert main(["export", str(run), "--out", str(tmp_path / "pipe"), *flag]) == 0
    assert sample(tmp_path / "pipe", tmp_path / "exported") == 0
    assert np.array_equal(
        pixels(tmp_path / "exported" / "00000.png"), pixels(tmp_path / "before" / "00000.png")
    )
    out = tmp_path / "eval"
    args = ["eval", str(run), "--out", str(out), "--per-category", "1", "--quiet", "--device", "cpu"]
    capsys.readouterr()  # the export's and sampling's progress bars
    assert main(args) == 2
    assert error(capsys).endswith("(if it moved: --relocate text.model_id=NEW_PLACE)")
    assert main([*args, *flag]) == 0
    assert (out / "scores.md").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--relocate", "vae.model_id={new}"],
            "--relocate vae.model_id={new}: vae.model_id is not a model location the saved config sets "
            "(allowed: text.model_id)",
        ),
        (
            ["--relocate", "text.model_id=/no/such/llm"],
            "--relocate text.model_id='/no/such/llm' is a path to nothing",
        ),
        (["--relocate", "text.model_id"], "--relocate 'text.model_id' must look like KEY=NEW_PLACE"),
        (
            ["--relocate", "text.model_id={new}", "--relocate", "text.model_id={new}"],
            "--relocate text.model_id is given twice",
        ),
    ],
)
def test_bad_relocations_are_one_line_errors(moved_run, tmp_path, capsys, flags, message):
    run, _, new = moved_run
    assert sample(run, tmp_path / "x", *[f.format(new=new) for f in flags]) == 2
    assert error(capsys).startswith(message.format(new=new))


def test_a_pipeline_folder_takes_no_relocation(moved_run, tmp_path, capsys):
    run, _, new = moved_run
    assert (
        main(["export", str(run), "--out", str(tmp_path / "pipe"), "--relocate", f"text.model_id={new}"]) == 0
    )
    capsys.readouterr()  # the export's progress bars
    assert sample(tmp_path / "pipe", tmp_path / "x", "--relocate", f"text.model_id={new}") == 2
    assert "the pipeline folder" in error(capsys)


def test_model_paths_name_every_model_location(tmp_path, monkeypatch):
    """Every model location, an extra LLM's included, and only those the config sets; relocating one
    changes it alone."""
    from fusedit.config import load_config, relocate

    cfg = tiny_config(
        text={"tokenizer": str(tmp_path)},
        extra_text=[{"family": "qwen2", "arch": TINY_ARCH, "model_id": "org/llm"}],
        model={"design": "dit-self", "refiner_depth": 1, "refiner_heads": 4},
    )
    assert model_paths(cfg) == {"text.tokenizer": str(tmp_path), "extra_text.0.model_id": "org/llm"}
    # A pooled CLIP's tokenizer folder is a model location too: saved absolute, relocatable.
    (tmp_path / "clip-tok").mkdir()
    monkeypatch.chdir(tmp_path)
    pooled = load_config("debug-clip-mod", ["pooled_text.tokenizer=clip-tok"])
    assert model_paths(pooled) == {"pooled_text.tokenizer": str(tmp_path / "clip-tok")}
    (tmp_path / "here").mkdir()
    moved = relocate(cfg, {"extra_text.0.model_id": str(tmp_path / "here" / ".." / "here")})
    assert model_paths(moved) == {
        "text.tokenizer": str(tmp_path),
        "extra_text.0.model_id": str(tmp_path / "here"),
    }


def test_a_relocation_to_another_model_is_refused(moved_run, tmp_path, capsys):
    """The checkpoint records the kind and shapes of the LLM folder it read (models.json): a folder of
    another LLM is refused by name; the moved folder itself passes."""
    run, _, new = moved_run
    ckpt = next((run / "checkpoints").glob("step_*"))
    recorded = json.loads((ckpt / "models.json").read_text())
    assert recorded["text.model_id"]["model_type"] == "qwen2"
    assert recorded["text.model_id"]["hidden_size"] == TINY_ARCH["hidden_size"]
    other = tmp_path / "other-llm"
    arch = {**TINY_ARCH, "num_hidden_layers": 4}
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **arch)).save_pretrained(other)
    word_tokenizer(vocabulary()).save_pretrained(other)
    capsys.readouterr()
    assert sample(run, tmp_path / "x", "--relocate", f"text.model_id={other}") == 2
    assert error(capsys) == (
        f"--relocate text.model_id={other}: that folder holds another model than the run trained with "
        "(num_hidden_layers=4 there, 3 in the run; allowed: the moved folder itself)"
    )


def test_a_resume_refuses_another_model_in_place_of_a_moved_one(tmp_path):
    """Resuming accepts a moved LLM folder under its new path (check_same_model), but not a folder of
    another LLM that took its place: the checkpoint's models.json tells them apart. Resuming with the gone
    path names the override before the model builds."""
    from fusedit.config import ConfigError
    from fusedit.train.loop import train

    def llm_folder(path, **arch):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **{**TINY_ARCH, **arch}))
        hf.save_pretrained(path)
        word_tokenizer(vocabulary()).save_pretrained(path)
        return str(path)

    def config(llm, steps):
        text = {"model_id": llm, "family": "qwen2"}
        return tiny_config(text=text, model={"num_layers": 2}, train={"steps": steps, "checkpoint_every": 1})

    run = tmp_path / "run"
    train(config(llm_folder(tmp_path / "llm"), 1), run, progress=False)
    (tmp_path / "llm").rename(tmp_path / "moved")
    # The run's own config, unchanged: the gone folder is named with the override that finds it.
    with pytest.raises(
        ConfigError,
        match=r"^text.model_id='.*llm' is a path to nothing \(if the folder moved, resume with the override "
        r"text.model_id=NEW_PLACE; allowed: a folder holding the model checkpoint '.*step_00000001' was",
    ):
        train(config(str(tmp_path / "llm"), 2), run, resume=True, progress=False)
    other = llm_folder(tmp_path / "other", intermediate_size=96)
    with pytest.raises(
        ConfigError,
        match=r"text.model_id='.*other' holds another model than checkpoint .* "
        r"\(intermediate_size=96 there, 64 in the run; allowed: the moved folder itself\)",
    ):
        train(config(other, 2), run, resume=True, progress=False)
    assert train(config(str(tmp_path / "moved"), 2), run, resume=True, progress=False)["step"] == 2


def test_every_gone_folder_is_named_at_once(tmp_path, capsys):
    """A run whose LLM and tokenizer folders both moved: sampling and resuming name both in one error, so
    one retry with both places works."""
    from fusedit.config import ConfigError
    from fusedit.train.loop import train

    llm, tok = tmp_path / "a" / "llm", tmp_path / "a" / "tok"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY_ARCH)).save_pretrained(llm)
    word_tokenizer(vocabulary()).save_pretrained(tok)
    text = {"model_id": str(llm), "tokenizer": str(tok), "family": "qwen2"}
    cfg = tiny_config(text=text, model={"num_layers": 2}, train={"steps": 1, "checkpoint_every": 1})
    train(cfg, tmp_path / "run", progress=False)
    (tmp_path / "a").rename(tmp_path / "b")
    capsys.readouterr()  # the saving and loading progress bars
    assert sample(tmp_path / "run", tmp_path / "lost") == 2
    assert error(capsys) == (
        f"the saved config's text.model_id={str(llm)!r}, text.tokenizer={str(tok)!r} are paths to nothing "
        "(if they moved: --relocate text.model_id=NEW_PLACE --relocate text.tokenizer=NEW_PLACE)"
    )
    moves = ["--relocate", f"text.model_id={tmp_path / 'b' / 'llm'}"]
    moves += ["--relocate", f"text.tokenizer={tmp_path / 'b' / 'tok'}"]
    assert sample(tmp_path / "run", tmp_path / "found", *moves) == 0
    later = tiny_config(text=text, model={"num_layers": 2}, train={"steps": 2, "checkpoint_every": 1})
    with pytest.raises(ConfigError) as e:
        train(later, tmp_path / "run", resume=True, progress=False)
    assert str(e.value).startswith(
        f"text.model_id={str(llm)!r}, text.tokenizer={str(tok)!r} are paths to nothing (if the folders moved, "
        "resume with the overrides text.model_id=NEW_PLACE text.tokenizer=NEW_PLACE; allowed: folders holding "
        "the models checkpoint"
    )
