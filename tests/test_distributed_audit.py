"""The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) as fusedit reads it: nonsense is refused in one
line before any rendezvous, rather than waiting train.dist_timeout_s for peers that cannot exist."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist

from conftest import tiny_config
from fusedit.config import ConfigError, save_config
from fusedit.train.distributed import setup, teardown

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed/gloo",
)

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
def torchrun_env(monkeypatch):
    """Set a torchrun-like environment (None: the variable absent) with a reachable store address."""

    def apply(**values: str | None) -> None:
        for name in _DIST_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", _free_port())
        for name, value in values.items():
            if value is not None:
                monkeypatch.setenv(name, value)

    yield apply
    if dist.is_initialized():  # a setup that wrongly succeeded must not leak its group into other tests
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("rank", "world", "local_rank", "message"),
    [
        ("2", "2", "0", r"RANK=2 is not allowed with WORLD_SIZE=2 \(allowed: 0..1\)"),
        ("-1", "2", "0", r"RANK='-1' is not allowed"),
        ("0", "0", "0", r"WORLD_SIZE=0 is not allowed \(allowed: 1 or more\)"),
        ("0", "", "0", r"WORLD_SIZE='' is not allowed"),
        ("", "1", "0", r"RANK='' is not allowed"),
        ("0", "1_0", "0", r"WORLD_SIZE='1_0' is not allowed"),
        ("0", "1", "-4", r"LOCAL_RANK='-4' is not allowed"),
        ("0", "2", "3", r"LOCAL_RANK=3 is not allowed with WORLD_SIZE=2"),
    ],
)
def test_nonsense_rank_variables_are_refused_before_the_rendezvous(
    torchrun_env, rank, world, local_rank, message
):
    torchrun_env(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local_rank)
    # A short timeout: the unchecked values make torch wait for peers that never come, then fail in its store.
    with pytest.raises(ConfigError, match=message):
        setup("cpu", timeout_s=3)
    assert not dist.is_initialized()


def test_a_one_process_torchrun_environment_still_joins(torchrun_env):
    torchrun_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK=None)  # LOCAL_RANK absent: other launchers omit it
    env = setup("cpu", timeout_s=30)
    try:
        assert (env.rank, env.world_size, env.local_rank, env.distributed, env.owns_group) == (
            0,
            1,
            0,
            True,
            True,
        )
    finally:
        teardown(env)
    assert not dist.is_initialized()


def test_fusedit_train_refuses_a_rank_outside_the_world_in_one_line(tmp_path):
    config = tmp_path / "cfg.yaml"
    save_config(tiny_config(train={"device": "cpu", "steps": 1, "dist_timeout_s": 5}), config)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("TORCHELASTIC")}
    env.update(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "fusedit", "train", str(config), "--out", str(tmp_path / "run"), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("fusedit: error (rank 2): environment variable RANK=2 is not allowed with WORLD_SIZE=2")
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "command",
    [["cache-latents", "debug", "--out", "OUT"], ["sample", "RUN", "--prompt", "a", "--out", "OUT"]],
)
def test_a_one_process_command_under_a_several_process_torchrun_is_refused(
    torchrun_env, tmp_path, capsys, command, tiny_run
):
    from fusedit.cli import main

    torchrun_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    # RUN: a model that would sample, refused all the same before it loads.
    argv = [{"OUT": str(tmp_path / "out"), "RUN": str(tiny_run)}.get(w, w) for w in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fusedit: error (rank 1): `fusedit {command[0]}` runs in one process (torchrun started WORLD_SIZE=2: "
        "each process would do the whole job, into the same files): run it without torchrun (only train uses "
        "several processes)\n"
    )
    assert not (tmp_path / "out").exists()


def test_ranks_other_than_0_log_only_errors(caplog):
    """Config-derived warnings were printed by every rank (32 copies on 4 nodes x 8 GPUs); a rank's errors
    still show, and the level comes back."""
    import logging

    import torch

    from fusedit.train.distributed import DistEnv, quiet_unless_main

    said = [
        ("fusedit.system", logging.WARNING, "a config warning"),
        ("fusedit.data.loader", logging.WARNING, "a data warning"),
        ("fusedit.data.loader", logging.INFO, "a data info"),
        ("fusedit.train.loop", logging.ERROR, "an error"),
    ]
    before = logging.getLogger("fusedit").level
    for rank, shown in (
        (1, ["an error"]),
        (0, [m for *_, m in said if m != "a data info"]),
    ):
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING),
            quiet_unless_main(DistEnv(rank, 2, rank, torch.device("cpu"), True)),
        ):
            for name, level, message in said:
                logging.getLogger(name).log(level, message)
        assert [r.getMessage() for r in caplog.records] == shown
    assert logging.getLogger("fusedit").level == before


def test_consolidate_records_the_absolute_path_of_its_source(torchrun_env, tmp_path, monkeypatch):
    """It recorded the path as given ("runs/ddp/checkpoints/step_00000006"), which names nothing from
    another working directory."""
    import json

    from fusedit.checkpoints import is_distributed_checkpoint
    from fusedit.train.checkpoint import consolidate_checkpoint
    from fusedit.train.loop import train

    torchrun_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # a 1-process job: a DCP checkpoint
    run = train(tiny_config(train={"device": "cpu", "steps": 1}), tmp_path / "run", progress=False)["run_dir"]
    ckpt = run / "checkpoints" / "step_00000001"
    assert is_distributed_checkpoint(ckpt)
    monkeypatch.chdir(tmp_path)
    consolidate_checkpoint("run", "plain")
    assert json.loads((tmp_path / "plain" / "state.json").read_text())["consolidated_from"] == str(ckpt)
