"""Regression tests for training-loop bugs found in an audit: each failed before its fix."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_ARCH, tiny_config
from fusedit.system import build_model
from fusedit.train.loop import train


def test_an_extra_llms_pretrain_steps_pretrain_it(tmp_path):
    # extra_text.0.pretrain_steps was accepted and silently ignored: only text.pretrain_steps pretrained.
    extra = {"family": "qwen2", "arch": TINY_ARCH, "max_length": 16, "pretrain_steps": 2}
    cfg = tiny_config(
        model={"design": "dit-cross", "refiner_depth": 1, "refiner_heads": 2},
        extra_text=[extra],
        train={"steps": 1, "checkpoint_every": 1},
    )
    torch.manual_seed(cfg.train.seed)
    built = build_model(cfg)
    result = train(cfg, tmp_path / "run", progress=False)
    for before, after, pretrained in (
        (built.text.llm, result["model"].text.llm, False),
        (built.extra_text[0].llm, result["model"].extra_text[0].llm, True),
    ):
        old, new = before.state_dict(), after.state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old) == pretrained


def test_a_fresh_run_drops_an_earlier_runs_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(train={"steps": 3, "checkpoint_every": 3, "loggers": ["tensorboard"]})
    train(cfg, tmp_path / "run", progress=False)
    # The same folder afresh (--overwrite, or --resume before any checkpoint): a shorter run at another lr.
    again = tiny_config(train={"steps": 2, "lr": 1e-4, "checkpoint_every": 2, "loggers": ["tensorboard"]})
    losses = train(again, tmp_path / "run", overwrite=True, progress=False)["losses"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == [torch.tensor(v, dtype=torch.float32).item() for v in losses]
