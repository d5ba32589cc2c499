"""Optional metric loggers (train.loggers): TensorBoard event files, Weights & Biases through a stand-in
module, and the one-line error when a package is missing."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from conftest import tiny_config
from fusedit.config import ConfigError
from fusedit.train.loop import train


def logged_losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_metrics_and_a_resume_replaces_what_was_lost(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(train={"steps": 4, "checkpoint_every": 2, "loggers": ["tensorboard"]})
    train(cfg, tmp_path / "run", stop_at=3, progress=False)  # checkpoints at 2 and 3
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000002")  # step 3 lost
    train(cfg, tmp_path / "run", resume=True, progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/sec"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    # one value per step: the resumed run's step 3 replaced the interrupted one's (purge_step)
    assert [e.step for e in loss] == [1, 2, 3, 4]
    expected = [torch.tensor(v, dtype=torch.float32).item() for v in logged_losses(tmp_path / "run")]
    assert [e.value for e in loss] == expected


class FakeWandb(types.ModuleType):
    """What fusedit calls of wandb: init(...) -> run with log(values, step=) and finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_every_record_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "shapes")
    # text.max_length=4 cuts some shapes captions: the run's count of them is logged too.
    cfg = tiny_config(text={"max_length": 4}, train={"steps": 3, "checkpoint_every": 2, "loggers": ["wandb"]})
    train(cfg, tmp_path / "run", stop_at=2, progress=False)
    train(cfg, tmp_path / "run", resume=True, progress=False)
    first, second = fake.inits
    assert first["project"] == "shapes" and first["name"] == "tiny" and first["resume"] == "allow"
    assert first["dir"] == str(tmp_path / "run") and first["config"]["train"]["loggers"] == ["wandb"]
    assert second["id"] == first["id"] == (tmp_path / "run" / "wandb_run_id").read_text()
    assert [step for step, _ in fake.logged] == [1, 2, 3] and fake.finished == 2
    assert [values["train/loss"] for _, values in fake.logged] == logged_losses(tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    truncated = [json.loads(line).get("truncated") for line in lines]
    assert truncated[-1] > 0 and [values.get("train/truncated") for _, values in fake.logged] == truncated
    # a fresh (not resumed) run in the same folder is a new wandb run
    train(cfg, tmp_path / "run", overwrite=True, stop_at=1, progress=False)
    assert fake.inits[2]["id"] != first["id"]


@pytest.mark.parametrize("logger, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_is_a_one_line_error_naming_it(tmp_path, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    cfg = tiny_config(train={"steps": 1, "loggers": [logger]})
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run", progress=False)
    assert str(e.value) == f"train.loggers names {logger}, which is not installed: pip install {logger}"
    # Refused before the run folder is made: it held train.lock (and tensorboard's events beside wandb).
    assert not (tmp_path / "run").exists()
