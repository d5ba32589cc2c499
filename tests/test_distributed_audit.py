"""The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK) as fusedit reads it: nonsense is refused in one
line before any rendezvous, rather than waiting train.dist_timeout_s for peers that cannot exist."""

from __future__ import annotations

import os
import signal
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


# --------------------------------------------------------------------------------------------------
# Failure paths of a job (h-dist audit: B1, R1-R4)


def test_half_a_torchrun_environment_is_refused_not_trained_as_one_process(torchrun_env):
    for given, message in (
        ({"WORLD_SIZE": "2"}, "environment variable WORLD_SIZE=2 is set without RANK, so this would train"),
        ({"RANK": "1"}, "environment variable RANK=1 is set without WORLD_SIZE, so this would train"),
    ):
        torchrun_env(**given)
        with pytest.raises(ConfigError, match=f"^{message} as one process \\(allowed: both, as torchrun"):
            setup("cpu", timeout_s=3)
    for given in ({"WORLD_SIZE": "1"}, {"RANK": "0"}):  # a one-process job either way
        torchrun_env(**given)
        assert setup("cpu", timeout_s=3).distributed is False


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_a_missing_store_address_is_refused_in_one_line(torchrun_env, monkeypatch, missing):
    torchrun_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    monkeypatch.delenv(missing)
    with pytest.raises(
        ConfigError, match=f"^environment variable {missing} is not set \\(allowed: launch with"
    ):
        setup("cpu", timeout_s=3)
    assert not dist.is_initialized()


def test_a_process_group_that_cannot_be_joined_stops_the_command_in_one_line(torchrun_env, tmp_path, capsys):
    """Rank 1 of 2 whose rank 0 never comes (no store at MASTER_PORT): torch's DistNetworkError traceback
    was printed; now one line with what a rerun does."""
    from fusedit.cli import main

    torchrun_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    config = tmp_path / "cfg.yaml"
    save_config(tiny_config(train={"device": "cpu", "steps": 1, "dist_timeout_s": 2}), config)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "fusedit: error (rank 1): could not join the job's process group (DistNetworkError: "
    )
    assert err.endswith(
        f"; a process waits train.dist_timeout_s=2 s for the others); no checkpoint was saved yet in "
        f"{tmp_path / 'run'}; rerun the same command to start again\n"
    )
    assert err.count("\n") == 1
    assert not dist.is_initialized()


def test_only_an_error_rank_0_met_too_is_left_to_rank_0(monkeypatch):
    """A rank other than 0 stays quiet about a start-up refusal only when rank 0 posted the same one; its
    own error (a data share of its own) it prints."""
    import torch

    from fusedit.train import distributed

    store = dist.HashStore()
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store", lambda: store)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    rank = [distributed.DistEnv(r, 2, r, torch.device("cpu"), True) for r in (0, 1)]
    assert distributed.said_by_rank_0(ConfigError("train.parallel=none with 2 processes"), rank[0]) is False
    assert distributed.said_by_rank_0(ConfigError("train.parallel=none with 2 processes"), rank[1]) is True
    assert distributed.said_by_rank_0(ConfigError("rank 1's shard is empty"), rank[1], wait_s=0.2) is False
    assert distributed.said_by_rank_0(ConfigError("anything"), distributed.DistEnv()) is False


# A rank of a job: `fusedit train` whose training (loop._train) fails as argv[1] says. The objects its frame
# and its error hold stand for the DDP wrapper of B1: freed while the process group is up, they go quietly;
# freed after it was destroyed, they never return, as gloo's destructor deadlocked (it joined a worker
# thread that waited for the GIL the freeing thread held). A surviving rank printed its line and hung, with
# no torchrun left to end it. The frame's is freed before the group is (released_on_failure); the error's
# only when the error is, which a rank that ends its process never does (end_process).
_FAILING_RANK = r"""
import sys
import threading

import torch.distributed as dist

from fusedit.cli import main
from fusedit.train import loop


class FreedLate:
    def __del__(self):
        if not dist.is_initialized():
            threading.Event().wait()


def fail(*args, **kwargs):
    held = FreedLate()
    if sys.argv[1] == "peer":
        error = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    elif sys.argv[1] == "interrupt":
        error = KeyboardInterrupt()
    else:
        error = ValueError(f"a bug, with {held} in its frame")
    error.held = FreedLate()
    raise error


if sys.argv[1] != "none":
    loop._train = fail
raise SystemExit(main(sys.argv[2:]))
"""

# Seconds a rank may take to start (import torch, read the config) and fail; the hang it guards against is
# forever.
_RANK_TIMEOUT = 120


def _job(tmp_path, world: int, failure: str, *train_args: str) -> list[tuple[int, str]]:
    """(exit status, stderr) of each rank of a ``world``-process `fusedit train` job (rank order), started
    as torchrun starts them, with the job's store served here as torchrun's agent serves it (it outlives
    rank 0)."""
    config = tmp_path / "cfg.yaml"
    if not config.exists():
        save_config(tiny_config(train={"device": "cpu", "steps": 2, "dist_timeout_s": 60}), config)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("TORCHELASTIC")}
    env.update(
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        TORCHELASTIC_USE_AGENT_STORE="True",
        OMP_NUM_THREADS="1",
    )
    argv = ["train", str(config), "--out", str(tmp_path / "run"), "--quiet", *train_args]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FAILING_RANK, failure, *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in range(world)
    ]
    try:
        errs = [proc.communicate(timeout=_RANK_TIMEOUT)[1] for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank of the job did not end within {_RANK_TIMEOUT} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [(proc.returncode, err) for proc, err in zip(procs, errs)]


def test_a_rank_that_lost_its_peer_prints_one_line_and_ends(tmp_path):
    ranks = _job(tmp_path, 2, "peer")
    for rank, (status, err) in enumerate(ranks):
        assert status == 2, err[-3000:]
        assert err == (
            f"fusedit: error (rank {rank}): another process of the job failed or stopped answering (RuntimeError: "
            "Read error: Connection reset by peer; a process waits train.dist_timeout_s=60 s for the others): "
            "that process's own error, printed above or in its log, may say why and what to change first; no "
            f"checkpoint was saved yet in {tmp_path / 'run'}; rerun the same command to start again\n"
        )


@pytest.mark.parametrize(
    ("failure", "status", "said"),
    [
        (
            "interrupt",
            130,
            "fusedit: interrupted: no checkpoint was saved yet in {run}; rerun the same command",
        ),
        ("bug", 1, "ValueError: a bug, with <__main__.FreedLate object at 0x"),
    ],
)
def test_an_interrupted_or_failed_rank_ends_after_its_message(tmp_path, failure, status, said):
    """A torchrun job of one process (a group joined, as under torchrun): Ctrl+C keeps its one line and 130,
    a bug its traceback and Python's 1, and neither waits on what its traceback holds."""
    ((got, err),) = _job(tmp_path, 1, failure)
    assert got == status, err[-3000:]
    assert said.format(run=tmp_path / "run") in err
    assert ("Traceback (most recent call last):" in err) is (failure == "bug")


def test_a_start_up_refusal_is_printed_by_rank_0_alone(tmp_path):
    """Every rank met the same refusal (after the ranks met: train.parallel=none; before: a misspelt key,
    which each machine's local rank 0 prints, as a file may be missing on one machine only): rank 0 prints
    it, the other ranks a short line, with the same status."""
    short = "fusedit: error (rank 1): stopped at start-up, as rank 0 did: its error says why\n"
    (zero, one) = _job(tmp_path, 2, "none", "train.parallel=none")
    assert zero == (
        2,
        "fusedit: error (rank 0): train.parallel=none with 2 processes would train unsynchronised copies "
        "(allowed: ddp, fsdp; or launch one process)\n",
    )
    assert one == (2, short)
    (zero, one) = _job(tmp_path, 2, "none", "train.stpes=3")
    assert zero[0] == 2 and zero[1].startswith("fusedit: error (rank 0): ") and "stpes" in zero[1]
    assert one == (2, short.replace("as rank 0 did", "as this machine's local rank 0 did"))


def test_a_failing_rank_frees_its_frames_before_it_leaves_the_group(torchrun_env, tmp_path, monkeypatch):
    """What the failure's frames hold (the DDP wrapper, and through its reducer the process group) is freed
    while the group is still up, so that torch's destroy_process_group drops the group's last reference,
    not the error's late freeing (B1's deadlock)."""
    import weakref

    from fusedit.config import RunStopped
    from fusedit.train import distributed, loop

    class Wrapper:
        pass

    refs = []

    def fail(*args, **kwargs):
        wrapper = Wrapper()
        refs.append(weakref.ref(wrapper))
        raise RunStopped("the launcher is gone", "kept")

    at_teardown = []
    teardown = distributed.teardown

    def record(env):
        at_teardown.append(refs[0]() is None)
        teardown(env)

    monkeypatch.setattr(loop, "_train", fail)
    monkeypatch.setattr(distributed, "teardown", record)
    torchrun_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # a group is joined, as under torchrun
    with pytest.raises(RunStopped, match="^the launcher is gone; kept$"):
        loop.train(tiny_config(train={"device": "cpu", "steps": 1}), tmp_path / "run", progress=False)
    assert at_teardown == [True]
    assert not dist.is_initialized()
