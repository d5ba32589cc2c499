"""fusedit.train.loop.train used as a library (a notebook's calls): what a re-run cell, threads, Ctrl+C and
a config edited in Python do to a run."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_config
from fusedit.checkpoints import find_checkpoint, load_model
from fusedit.config import ConfigError, load_config
from fusedit.system import build_model, resolve_device
from fusedit.train import loop
from fusedit.train.loop import train
from fusedit.train.run_folder import RunExists


def _checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


def test_a_fresh_train_into_a_run_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    """Re-running a notebook cell (resume left at False) deleted the run's checkpoints without a word."""
    run = tmp_path / "run"
    train(tiny_config(train={"steps": 2, "checkpoint_every": 1}), run, progress=False)
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as refused:  # what every bad value raises: one line
        train(tiny_config(train={"steps": 1}), run, progress=False)
    assert isinstance(refused.value, RunExists)  # whose callers word the advice for their options
    assert str(refused.value) == (
        f"{str(run)!r} already holds a run (checkpoint at step 2): pass resume=True to continue it, "
        "overwrite=True to delete it and start over, or another run_dir"
    )
    again = pickle.loads(pickle.dumps(refused.value))  # a train() in a process pool hands it back
    assert (str(again), again.step) == (str(refused.value), 2)
    assert _checkpoints(run) == ["step_00000001", "step_00000002"]
    assert (run / "metrics.jsonl").read_text() == metrics
    # resume=True continues it (here: already at its end); overwrite=True starts over.
    assert train(tiny_config(train={"steps": 2}), run, resume=True, progress=False)["losses"] == []
    assert train(tiny_config(train={"steps": 1}), run, overwrite=True, progress=False)["step"] == 1
    assert _checkpoints(run) == ["step_00000001"]


def test_the_library_demo_replaces_only_an_earlier_demo_run(tmp_path, monkeypatch):
    """run_demo trains afresh: a run of days given as its folder was silently deleted; an earlier demo's
    is replaced (the README's demo command runs again as it is)."""
    import fusedit.demo

    run = tmp_path / "run"
    train(tiny_config(train={"steps": 1}), run, progress=False)
    monkeypatch.setattr(fusedit.demo, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=r"at step 1\): pass overwrite=True to delete it and run the demo"):
        fusedit.demo.run_demo(load_config("debug"), run, progress=False)
    trained = []

    class Trained(Exception):  # as far as the test needs the demo to go
        pass

    def recorded(cfg, run_dir, **kwargs):
        trained.append(kwargs["overwrite"])
        raise Trained

    monkeypatch.setattr(fusedit.demo, "train", recorded)
    for name in ("loss.png", "samples.png"):  # what only the demo writes
        (run / name).write_bytes(b"png")
    with pytest.raises(Trained):
        fusedit.demo.run_demo(load_config("debug"), run, progress=False)
    assert trained == [True]


def test_train_builds_the_seeded_weights_and_leaves_the_callers_generator(tmp_path, monkeypatch):
    """train() seeded torch's global generator with train.seed and left it there: the caller's random
    numbers changed under it. The initial weights stay those train.seed has always given."""
    cfg = tiny_config(train={"steps": 2, "checkpoint_every": 2})
    built = []

    def recording_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(loop, "build_model", recording_build)
    device = resolve_device(cfg.train.device)
    gpu = device.type == "cuda"
    torch.manual_seed(1234)
    before = torch.random.get_rng_state(), torch.cuda.get_rng_state(device) if gpu else None
    train(cfg, tmp_path / "run", progress=False)
    assert torch.equal(torch.random.get_rng_state(), before[0])
    assert not gpu or torch.equal(torch.cuda.get_rng_state(device), before[1])
    torch.manual_seed(cfg.train.seed)
    expected = build_model(cfg, device).state_dict()
    assert built[0].keys() == expected.keys()
    assert all(torch.equal(built[0][k], expected[k]) for k in expected)


def test_train_calls_in_threads_give_the_losses_of_a_call_alone(tmp_path, monkeypatch):
    """Two train() calls in threads drew their initial weights from one global generator, interleaved:
    both trained other losses than either alone."""
    cfg = tiny_config(train={"steps": 3, "checkpoint_every": 3})
    alone = train(cfg, tmp_path / "alone", progress=False)["losses"]
    together = threading.Barrier(2)
    setup = loop.distributed.setup

    def setup_together(*args, **kwargs):  # both calls reach the build at the same moment
        together.wait(timeout=60)
        return setup(*args, **kwargs)

    monkeypatch.setattr(loop.distributed, "setup", setup_together)
    losses, failed = {}, []

    def call(name):
        try:
            losses[name] = train(cfg, tmp_path / name, progress=False)["losses"]
        except BaseException as e:  # reported by the main thread
            failed.append(e)

    threads = [threading.Thread(target=call, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failed == []
    assert losses == {"a": alone, "b": alone}


def _interrupted_at(monkeypatch, where: str, calls: int = 1) -> None:
    """Ctrl+C at the ``calls``-th call of loop.``where``."""
    real, seen = getattr(loop, where), []

    def interrupted(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, where, interrupted)


def test_ctrl_c_in_train_notes_what_is_kept_and_how_to_go_on(tmp_path, monkeypatch):
    """A notebook user saw a bare KeyboardInterrupt; `fusedit train` prints its own line (test_cli)."""
    run = tmp_path / "run"
    cfg = tiny_config(train={"steps": 4, "checkpoint_every": 2})
    with monkeypatch.context() as patch:
        _interrupted_at(patch, "flow_loss", calls=3)  # in step 3, after the checkpoint of step 2
        with pytest.raises(KeyboardInterrupt) as stopped:
            train(cfg, run, progress=False)
    ckpt = run / "checkpoints" / "step_00000002"
    assert stopped.value.__notes__ == [
        f"the last checkpoint is {ckpt}: resume from it (train(..., resume=True); `fusedit train --resume`)"
    ]
    # overwrite=True stopped before the earlier run is deleted: that run's checkpoint is not this one's.
    with monkeypatch.context() as patch:
        _interrupted_at(patch, "build_model")
        with pytest.raises(KeyboardInterrupt) as stopped:
            train(cfg, run, overwrite=True, progress=False)
    assert stopped.value.__notes__ == [
        f"the earlier run in {run} was not deleted yet: train again with overwrite=True to start over"
    ]
    assert find_checkpoint(run) == ckpt
    with monkeypatch.context() as patch:
        _interrupted_at(patch, "build_model")
        with pytest.raises(KeyboardInterrupt) as stopped:
            train(cfg, tmp_path / "new", progress=False)
    assert stopped.value.__notes__ == [
        f"no checkpoint was saved yet in {tmp_path / 'new'}: train again to start over"
    ]


def test_train_returns_the_raw_weights_in_train_mode_and_says_how_to_get_the_sampled_ones(tmp_path):
    """The returned model is not what `fusedit sample` uses (the EMA, in eval mode); the docstring said only
    "model", "ema"."""
    run = tmp_path / "run"
    out = train(tiny_config(train={"steps": 2, "checkpoint_every": 2}), run, progress=False)
    doc = " ".join(train.__doc__.split())
    for key in out:
        assert f'"{key}"' in doc
    assert "raw weights, not their EMA, in train mode" in doc
    assert "fusedit.checkpoints.load_model(run_dir)" in doc
    assert out["model"].denoiser.training
    raw, _, _ = load_model(run, use_ema=False)
    sampled, cfg, _ = load_model(run)
    assert cfg.sample.use_ema and not sampled.denoiser.training
    trained = out["model"].denoiser.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in raw.denoiser.state_dict().items())
    ema = out["ema"].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in sampled.denoiser.state_dict().items())
    assert not all(torch.equal(v, trained[k]) for k, v in ema.items())  # two different sets of weights


def test_a_config_edited_in_python_is_saved_with_absolute_paths(tmp_path, monkeypatch):
    """cfg.data.root = "imgs" was saved as "imgs": a resume from another working directory failed."""
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red circle")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(train={"steps": 1})
    cfg.data.source, cfg.data.root = "folder", "imgs"
    train(cfg, "run", progress=False)
    assert cfg.data.root == "imgs"  # the caller's config is left as it was
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["root"] == str(images)
    monkeypatch.chdir(tmp_path / "run")
    resumed = load_config(str(tmp_path / "run"))
    resumed.train.steps = 2
    assert train(resumed, tmp_path / "run", resume=True, progress=False)["step"] == 2


def test_a_run_refused_for_its_data_makes_no_run_folder(tmp_path):
    """A data location the source never reads was refused after the run folder and its lock were made."""
    cfg = tiny_config(data={"root": str(tmp_path)}, train={"steps": 1})
    with pytest.raises(ConfigError, match=r"data\.root=.* is set but data\.source='shapes'"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_fine_tune_into_its_own_source_is_refused_before_anything_is_deleted(tmp_path, caplog):
    """`--out DIR --overwrite` with train.init_from=DIR deleted DIR's checkpoints, then failed to load them."""
    import logging

    run = tmp_path / "run"
    train(tiny_config(train={"steps": 1}), run, progress=False)
    kept = _checkpoints(run)
    tune = tiny_config(train={"steps": 2, "init_from": str(run)})
    with pytest.raises(ConfigError, match=r"lies in the run folder .*whose checkpoints a fresh run deletes"):
        train(tune, run, overwrite=True, progress=False)
    assert _checkpoints(run) == kept
    # Elsewhere it trains; a 2-step fine-tune leaves the EMA (decay 0.99) at the start: said.
    caplog.clear()  # the 1-step run's own warning (its EMA is the random init)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(tune, tmp_path / "tuned", progress=False)
    assert [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()] == [
        # The source's own EMA is its random init after 1 step: what init_from loads by default.
        f"train.init_from={str(run)!r}: its EMA weights at step 1 still hold 99% of its run's random initial "
        "weights (train.ema_decay=0.99 every train.ema_every=1 steps), so this run starts from mostly those: "
        "train.init_from_ema=false starts it from the trained (raw) weights",
        "the EMA weights, which sampling and export use (sample.use_ema), will still hold 98% of "
        "train.init_from's at step 2 (train.ema_decay=0.99 every train.ema_every=1 steps): lower them, or "
        "sample with --no-ema",
    ]


def test_a_short_run_from_scratch_says_its_ema_is_mostly_the_random_init(tmp_path, caplog):
    """60 steps of decay 0.998 leave 89% of the random init in the EMA that sample and serve load: they gave
    noise, whatever the guidance, without a word. Said; a run whose EMA has moved on, or sampling the raw
    weights, is not warned."""
    import logging

    def warned(**train_cfg):
        caplog.clear()
        cfg = tiny_config(train={"ema_every": 1, "ema_decay": 0.998, **train_cfg})
        with caplog.at_level(logging.WARNING, logger="fusedit"):
            train(cfg, tmp_path / "run", overwrite=True, stop_at=1, progress=False)
        return [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()]

    assert warned(steps=60) == [
        "the EMA weights, which sampling and export use (sample.use_ema), will still hold 89% of the random "
        "initial weights at step 60 (train.ema_decay=0.998 every train.ema_every=1 steps): lower them, or "
        "sample with --no-ema"
    ]
    assert warned(steps=600) == [] and warned(steps=60, ema_decay=0.9) == []


def test_a_resume_with_another_init_from_keeps_the_one_the_run_started_from(tmp_path, caplog):
    """A resume with a changed train.init_from saved the new path into the run's config, though the weights
    came from the first one at step 0 (init_from is read only when a run starts)."""
    import logging

    first, other, run = tmp_path / "first", tmp_path / "other", tmp_path / "tuned"
    for source in (first, other):
        train(tiny_config(train={"steps": 1}), source, progress=False)
    train(tiny_config(train={"steps": 2, "init_from": str(first)}), run, stop_at=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(tiny_config(train={"steps": 2, "init_from": str(other)}), run, resume=True, progress=False)
    assert [r.getMessage() for r in caplog.records if "changed setting" in r.getMessage()] == [
        f"resuming step_00000001 with 1 changed setting(s): train.init_from: {str(first)!r} -> "
        f"{str(other)!r} ignored (read only when a run starts: the run and its saved config keep "
        f"{str(first)!r}; to start from {str(other)!r}, train afresh into another folder)"
    ]
    for config in (run / "config.yaml", find_checkpoint(run) / "config.yaml"):
        assert yaml.safe_load(config.read_text())["train"]["init_from"] == str(first)
    assert find_checkpoint(run).name == "step_00000002"
    # Resumed without the override it was started with: nothing to start from instead.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(tiny_config(train={"steps": 3}), run, resume=True, progress=False)
    assert [r.getMessage() for r in caplog.records if "changed setting" in r.getMessage()] == [
        f"resuming step_00000002 with 1 changed setting(s): train.init_from: {str(first)!r} -> '' ignored "
        f"(read only when a run starts: the run and its saved config keep {str(first)!r})"
    ]


@pytest.mark.parametrize("kind", ["nothing", "empty folder", "resumed"])
def test_an_init_from_with_nothing_to_start_from_names_every_kind_allowed(tmp_path, kind):
    """train.init_from=nope said "no checkpoint in 'nope' (expected a run folder or a checkpoint folder)": not
    that the path is to nothing, nor that a pipeline folder would do; and a fresh run with overwrite=True
    had deleted the earlier run in its folder before it failed."""
    run, source = tmp_path / "run", tmp_path / "nope"
    train(tiny_config(train={"steps": 1}), run, progress=False)
    if kind == "empty folder":
        source.mkdir()
    what = "holds no checkpoint" if kind == "empty folder" else "is a path to nothing"
    tune = tiny_config(train={"steps": 1, "init_from": str(source)})
    with pytest.raises(ConfigError) as refused:
        if kind == "resumed":  # a resume with no checkpoint yet starts at step 0 and loads it then
            train(tune, tmp_path / "new", resume=True, progress=False)
        else:
            train(tune, run, overwrite=True, progress=False)
    assert str(refused.value) == (
        f"train.init_from={str(source)!r} {what} (allowed: a run folder holding a checkpoint, a checkpoint "
        "folder, or a diffusers pipeline folder that fusedit export wrote)"
    )
    if kind != "resumed":  # the fresh run into the earlier one's folder checked before deleting it
        assert _checkpoints(run) == ["step_00000001"]
