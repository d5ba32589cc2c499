"""A job's data and resume across processes, checked in one process (a DistEnv or rank/world_size of 2
stands in for torchrun): a resume on another split of a staged run's global batch, a data set smaller than
the global batch, a webdataset shard with fewer samples than ranks, and the process-only settings a resume
onto or from one process changes (h-dist M1, M2, R4, R6)."""

from __future__ import annotations

import json
import logging

import pytest

from conftest import tiny_config
from fusedit.config import ConfigError, DataConfig, load_config
from fusedit.data.loader import step_loader
from fusedit.train.checkpoint import check_same_model
from fusedit.train.data_state import resplit_keys
from fusedit.train.distributed import DistEnv

ONE, TWO = DistEnv(), DistEnv(rank=0, world_size=2)


def _resumed(tmp_path, saved: dict, before: list[str], now: list[str], env: DistEnv) -> list[str]:
    """The changed settings a resume of the recipe (``before``: the checkpoint's overrides, ``now``: the
    resume's) lists, as loop._resume_point computes them."""
    saved_cfg = load_config("recipe-shapes-3stage", before)
    cfg = load_config("recipe-shapes-3stage", now)
    (tmp_path / "state.json").write_text(json.dumps(saved))  # the checkpoint's, which names its stage
    return check_same_model(tmp_path, cfg, saved_cfg, unchanged=resplit_keys(saved, saved_cfg, cfg, env))


def test_a_staged_resume_on_another_split_of_the_same_global_batch_is_said_at_info(tmp_path, caplog):
    """h-dist M1: 2 processes x stages.0.train.batch_size=4 resumed in stage 1 on 1 x 8 (stage 1 and 2
    inherit stage 0's batch_size) was warned as "1 changed setting(s): stages.0.train.batch_size: 4 -> 8",
    and the INFO line multi-node.md promises never came."""
    at_stage_1 = {"step": 805, "stage": 1, "world_size": 2, "batch_size": 4, "grad_accum": 1}
    with caplog.at_level(logging.INFO, logger="fusedit.train.data_state"):
        assert _resumed(tmp_path, at_stage_1, ["stages.0.train.batch_size=4"], [], ONE) == [
            "stages.0.train.batch_size: 4 -> 32"  # the recipe's 32: 1 x 32, not the 8 it trained at
        ]
        assert not caplog.records
        assert (
            _resumed(
                tmp_path, at_stage_1, ["stages.0.train.batch_size=4"], ["stages.0.train.batch_size=8"], ONE
            )
            == []
        )
        # Micro-steps of a later stage's own key, the earlier one's kept: 1 x 4 x 2 in stage 2.
        at_stage_2 = {**at_stage_1, "step": 1305, "stage": 2}
        now = ["stages.0.train.batch_size=4", "stages.2.train.grad_accum=2"]
        assert _resumed(tmp_path, at_stage_2, ["stages.0.train.batch_size=4"], now, ONE) == []
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "INFO",
            "resuming on another split of the same global batch of 8 in stages.1 (joint-32px), and of its own "
            "in each later stage: 1 process(es) x batch_size 8 x grad_accum 1 (the checkpoint's: 2 x 4 x 1)",
        ),
        (
            "INFO",
            "resuming on another split of the same global batch of 8 in stages.2 (lora-position): 1 process(es) "
            "x batch_size 4 x grad_accum 2 (the checkpoint's: 2 x 4 x 1)",
        ),
    ]


def test_a_staged_resume_that_changes_a_later_stages_global_batch_is_warned(tmp_path):
    """The split is a resume's own decision only where every stage still to train keeps its global batch:
    a later stage's own batch_size that does not follow, or a key of an earlier stage that none of them
    inherits, stays a changed setting."""
    at_stage_1 = {"step": 805, "stage": 1, "world_size": 2, "batch_size": 4, "grad_accum": 1}
    four = ["stages.0.train.batch_size=4"]
    # Stage 2 sets its own 4: 1 x 4, not the 2 x 4 it would have trained at.
    assert _resumed(
        tmp_path, at_stage_1, four, ["stages.0.train.batch_size=8", "stages.2.train.batch_size=4"], ONE
    ) == [
        "stages.0.train.batch_size: 4 -> 8",
        "stages.2.train.batch_size: None -> 4",
    ]
    # Stage 1 sets its own 8 and keeps the global batch; stage 0's 4 -> 6 (trained already, inherited by
    # no later stage) is a change all the same.
    own = ["stages.0.train.batch_size=6", "stages.1.train.batch_size=8"]
    assert _resumed(tmp_path, at_stage_1, four, own, ONE) == ["stages.0.train.batch_size: 4 -> 6"]
    # The same processes: another per-process batch is another global batch.
    assert _resumed(tmp_path, at_stage_1, four, ["stages.0.train.batch_size=8"], TWO) == [
        "stages.0.train.batch_size: 4 -> 8"
    ]


def test_a_staged_run_resumed_on_another_split_trains_without_a_changed_setting(tmp_path, caplog):
    """The same through train(): stopped in stage 1 at 4 samples a step, resumed at 2 x 2 micro-steps set on
    stage 0, which stage 1 inherits."""
    from fusedit.train.loop import train
    from test_stages import THREE

    def staged(**stage0):
        stages = [{**THREE[0], "train": stage0}, *THREE[1:]]
        return tiny_config(stages=stages, model={"ape_base_size": 8}, train={"checkpoint_every": 2})

    train(staged(batch_size=4), tmp_path / "run", stop_at=4, progress=False)
    with caplog.at_level(logging.INFO, logger="fusedit"):
        train(staged(batch_size=2, grad_accum=2), tmp_path / "run", resume=True, stop_at=5, progress=False)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.getMessage().startswith("resuming")]
    assert said == [
        (
            "INFO",
            "resuming on another split of the same global batch of 4 in stages.1 (joint), and of its own in "
            "each later stage: 1 process(es) x batch_size 2 x grad_accum 2 (the checkpoint's: 1 x 4 x 1)",
        )
    ]


def test_process_settings_are_no_change_where_either_run_had_one_process(tmp_path):
    """h-dist R6: a 1-process checkpoint resumed on 2 processes with train.parallel=fsdp warned
    "train.parallel: 'ddp' -> 'fsdp'", a setting that is ignored without torchrun."""
    saved_cfg = tiny_config()
    cfg = tiny_config(train={"parallel": "fsdp", "shard_llm": True})
    for saved_world, env, changed in [
        (1, TWO, []),
        (2, ONE, []),
        (2, TWO, ["train.parallel: 'ddp' -> 'fsdp'", "train.shard_llm: False -> True"]),
    ]:
        saved = {"step": 2, "world_size": saved_world, "batch_size": 4, "grad_accum": 1}
        keys = resplit_keys(saved, saved_cfg, cfg, env)
        (tmp_path / "state.json").write_text(json.dumps(saved))
        assert check_same_model(tmp_path, cfg, saved_cfg, unchanged=keys) == changed


def test_a_data_set_smaller_than_the_global_batch_is_warned_once(caplog):
    """h-dist M2: 3 samples under 2 processes x 4 trained silently, every batch repeating samples and the
    ranks reading some of the same ones, which multi-node.md says never happens."""
    three = DataConfig(source="shapes", num_samples=3, image_size=16)
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        for rank in (0, 1):  # rank 0 says it for all
            step_loader(three, 0, 4, 0, 1, rank=rank, world_size=2)
        step_loader(three, 0, 4, 0, 1)
        step_loader(
            DataConfig(source="shapes", num_samples=8, image_size=16), 0, 4, 0, 1, rank=0, world_size=2
        )
        step_loader(DataConfig(source="shapes", num_samples=1, image_size=16), 0, 2, 0, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "data: 3 samples, fewer than the global batch of 8 (4 per process x 2 processes): each batch repeats "
        "samples, and the processes may read the same ones (more data, or a smaller batch, avoid it)",
        "data: 3 samples, fewer than the global batch of 4: each batch repeats samples (more data, or a smaller "
        "batch, avoid it)",
        "data: 1 sample, fewer than the global batch of 2: each batch repeats samples (more data, or a smaller "
        "batch, avoid it)",
    ]


def test_a_shard_with_fewer_samples_than_ranks_says_so(tmp_path):
    """h-dist R4: with one shard of 1 sample and 2 ranks, rank 1 was told the shard "has none"; the ranks
    share a shard's samples when there are fewer shards than ranks, and rank 1's share is empty."""
    from test_data_sources import _write_shards

    one = _write_shards(tmp_path / "wds", "a", shards=1, per_shard=1)
    cfg = DataConfig(source="webdataset", shards=[one], image_size=16, min_image_size=16)
    assert len(list(step_loader(cfg, 0, 1, 0, 1, rank=0, world_size=2))) == 1
    with pytest.raises(ConfigError) as error:
        list(step_loader(cfg, 0, 1, 0, 1, rank=1, world_size=2))
    assert str(error.value) == (
        f"data.shards entry 0 has no readable samples for rank 1 of 2 (1 shards; e.g. {one[0]!r} holds 1 "
        "sample, fewer than the 2 ranks: with fewer shards than ranks each rank reads 1 sample in 2 of every "
        "shard)"
    )
