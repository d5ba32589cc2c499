"""A diffusers pipeline folder (`fusedit export`, a downloaded fusedit model) as the start of more work: the
base of a fine-tuning config, the weights of train.init_from, and the model `fusedit eval` scores."""

import json

import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.adapters import text_modules
from fusedit.checkpoints import find_checkpoint
from fusedit.cli import main
from fusedit.config import ConfigError, load_config, to_dict
from fusedit.pipeline import export_run
from fusedit.system import build_model
from fusedit.train.checkpoint import init_weights, save_checkpoint


@pytest.fixture
def exported(tmp_path):
    """(checkpoint folder, its pipeline folder, the EMA weights it holds): a tiny model whose EMA, raw
    weights and LLM all differ from a fresh build."""
    cfg = tiny_config()
    model = build_model(cfg)
    randomize(model.denoiser)
    randomize(model.text.llm)
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in model.denoiser.state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "run", 4, cfg, model.denoiser, ema, None, model.text.llm)
    export_run(tmp_path / "run", tmp_path / "pipe")
    return ckpt, tmp_path / "pipe", ema, model.text.llm.state_dict()


def test_a_pipeline_folder_is_a_config_base_and_init_from_loads_its_weights(exported):
    ckpt, pipe, ema, llm = exported
    saved = load_config(ckpt)  # a checkpoint folder as a base is its config.yaml
    assert to_dict(saved) == to_dict(tiny_config())
    cfg = load_config(pipe, [f"train.init_from={pipe}"])
    for section in ("model", "text", "vae", "flow", "sample"):
        assert to_dict(cfg)[section] == to_dict(saved)[section], section
    assert (cfg.data.image_size, cfg.data.max_objects) == (saved.data.image_size, saved.data.max_objects)
    model = build_model(cfg)
    assert init_weights(model, cfg.train.init_from) == pipe
    assert all(torch.equal(v, ema[k]) for k, v in model.denoiser.state_dict().items())
    assert all(torch.equal(v, llm[k]) for k, v in text_modules(model)["llm"].state_dict().items())


def test_fusedit_train_fine_tunes_a_pipeline_folder(exported, tmp_path):
    _, pipe, _, _ = exported
    run = tmp_path / "tuned"
    args = ["train", str(pipe), f"train.init_from={pipe}", "train.steps=1", "train.batch_size=2"]
    assert main([*args, "train.checkpoint_every=1", "--out", str(run), "--quiet"]) == 0
    # The pipeline's LLM weights are not known to be its hub id's: every checkpoint keeps them.
    assert (find_checkpoint(run) / "llm.safetensors").is_file()


def test_a_pipeline_of_another_architecture_is_a_one_line_config_error(exported, tmp_path):
    _, pipe, _, _ = exported
    cfg = tiny_config(model={"dit_hidden_size": 64}, train={"init_from": str(pipe)})
    with pytest.raises(
        ConfigError, match=r"train.init_from=.* does not fit this model: transformer weight "
    ) as e:
        init_weights(build_model(cfg), pipe)
    assert "in the pipeline but [64, 12] in the configured model" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_folder_without_a_saved_config_is_no_base(tmp_path):
    with pytest.raises(ConfigError, match="is a folder without a saved config .allowed: a preset name"):
        load_config(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"model_type": "FuseDiT"}))
    with pytest.raises(
        ConfigError, match="is not a fusedit pipeline folder .* needs `fusedit convert` first"
    ):
        load_config(tmp_path)


def test_eval_scores_a_pipeline_folder_as_it_scores_its_run(exported, tmp_path, capsys):
    ckpt, pipe, _, _ = exported
    flags = ["--bench", "shapes", "--per-category", "1", "--steps", "2", "--quiet"]
    assert main(["eval", str(ckpt), *flags, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", str(pipe), *flags, "--out", str(tmp_path / "b")]) == 0
    scores = [json.loads((tmp_path / x / "scores.json").read_text()) for x in "ab"]
    # What each scored is recorded (the checkpoint, its weights, the folder; what the run trained on),
    # and the scores are the same.
    for s in scores:
        s.pop("untrained", None)
        for key in ("checkpoint", "weights", "model"):
            s["settings"].pop(key)
    assert scores[0]["num_images"] > 0 and scores[0] == scores[1]
    capsys.readouterr()
    assert main(["eval", str(pipe), *flags, "--no-ema"]) == 2
    assert "--no-ema needs a run or checkpoint folder" in capsys.readouterr().err


def test_a_model_folder_as_base_without_init_from_warns_that_its_weights_are_not_taken(
    exported, tmp_path, caplog
):
    """`base: runs/x` (or `fusedit train runs/x`) without train.init_from took the folder's config and
    trained from random weights, silently; a base whose saved config carries its own init_from trained from
    that one. Said on a fresh run, not when the init_from names the folder, nor on --resume."""
    ckpt, pipe, _, _ = exported
    (tmp_path / "tune.yaml").write_text(f"base: {pipe}\ntrain: {{steps: 1, batch_size: 2}}\n")
    common = ["train.checkpoint_every=1", "--quiet"]
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert main(["train", str(tmp_path / "tune.yaml"), *common, "--out", str(tmp_path / "a")]) == 0
    expected = (
        f"{str(pipe)!r} is a model folder: this run takes its config, not its weights, and trains from random "
        f"weights (to start from its weights: train.init_from={pipe})"
    )
    assert [r.getMessage() for r in caplog.records if r.name == "fusedit.cli"] == [expected]
    # A fine-tuned run as the config: its own init_from (the pipeline) comes along with its config.
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert (
            main(
                [
                    "train",
                    str(tmp_path / "a"),
                    "train.init_from=" + str(pipe),
                    *common,
                    "--out",
                    str(tmp_path / "b"),
                ]
            )
            == 0
        )
        assert main(["train", str(tmp_path / "b"), *common, "--out", str(tmp_path / "c")]) == 0
    run_b = tmp_path / "b"
    assert [r.getMessage() for r in caplog.records if r.name == "fusedit.cli"] == [
        f"{str(tmp_path / 'a')!r} is a model folder: this run takes its config, not its weights, and trains "
        f"from train.init_from={str(pipe)!r} (to start from its weights: train.init_from={tmp_path / 'a'})",
        f"{str(run_b)!r} is a model folder: this run takes its config, not its weights, and trains from "
        f"train.init_from={str(pipe)!r} (to start from its weights: train.init_from={run_b})",
    ]
    # Not when train.init_from names the folder or a checkpoint in it, nor on --resume.
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        checkpoint = find_checkpoint(run_b)
        assert (
            main(
                ["train", str(run_b), f"train.init_from={checkpoint}", *common, "--out", str(tmp_path / "d")]
            )
            == 0
        )
        assert main(["train", str(run_b), "train.steps=2", *common, "--out", str(run_b), "--resume"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "fusedit.cli"] == []


def test_the_base_folder_warning_knows_a_run_and_its_checkpoint_start_alike(exported, tmp_path, caplog):
    """A checkpoint folder as the config and its run folder as train.init_from load the same weights: no
    warning; nor on a torchrun rank other than 0 (said once)."""
    ckpt, _, _, _ = exported
    common = ["train.steps=1", "train.batch_size=2", "--quiet"]
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        assert (
            main(
                [
                    "train",
                    str(ckpt),
                    f"train.init_from={ckpt.parent.parent}",
                    *common,
                    "--out",
                    str(tmp_path / "a"),
                ]
            )
            == 0
        )
    assert [r for r in caplog.records if r.name == "fusedit.cli"] == []
    from fusedit.cli.train import _warn_weights_not_taken

    bases = []  # the model folders the config comes from
    load_config(str(ckpt), folders=bases)

    caplog.clear()
    with caplog.at_level("WARNING", logger="fusedit.cli"):
        _warn_weights_not_taken(bases, "")
        assert len(caplog.records) == 1
        import os

        os.environ["RANK"] = "1"
        try:
            _warn_weights_not_taken(bases, "")
        finally:
            del os.environ["RANK"]
    assert len([r for r in caplog.records if r.name == "fusedit.cli"]) == 1
