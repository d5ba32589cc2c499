"""One training job per run folder (a second one is refused while the first holds it, and a killed holder
leaves no stale lock), a run folder that some rank does not see is refused at start-up, and a job stopped
from outside (another rank failed, the launcher is gone) ends in one line that says how to go on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from conftest import tiny_config
from fusedit.cli import main
from fusedit.config import save_config
from fusedit.train import distributed
from fusedit.train.run_folder import LOCK_FILE, hold_run_folder


def test_a_second_job_is_refused_while_the_first_trains_into_the_folder(tmp_path, capsys):
    """Two jobs in one folder delete each other's half-written checkpoints; the second is refused in one line
    naming the first, before it reads or deletes anything. The kernel drops the lock when its holder ends,
    even by SIGKILL, so a killed run leaves nothing to clean up."""
    save_config(tiny_config(train={"steps": 1}), tmp_path / "tiny.yaml")
    run = tmp_path / "run"
    train = ["train", str(tmp_path / "tiny.yaml"), "--out", str(run), "--quiet"]
    assert main(train) == 0 and (run / "checkpoints" / "latest").is_file()

    def files() -> dict:
        return {
            p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE
        }

    before = files()
    with hold_run_folder(run, distributed.setup("cpu")):
        for flag in ("--resume", "--overwrite"):
            assert main([*train, flag]) == 2
            err = capsys.readouterr().err
            assert err.startswith(
                f"fusedit: error: {run} is being trained by another job (pid {os.getpid()} on "
            )
            assert "if that host is down, a network filesystem may hold its lock a while: once no job " in err
            assert err.endswith("or give another --out\n") and err.count("\n") == 1
    assert files() == before  # refused before anything was read or deleted

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*train, "--resume"]) == 2
        assert f"(pid {holder.pid} on " in capsys.readouterr().err
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert main([*train, "--resume"]) == 0
    assert f"pid {os.getpid()} on " in (run / LOCK_FILE).read_text()


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fusedit.train import distributed
    from fusedit.train.run_folder import hold_run_folder
    with hold_run_folder(Path(sys.argv[1]), distributed.setup("cpu")):
        print("held", flush=True)
        time.sleep(600)
    """
)

# Both ranks of a 2-process gloo job, started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*); each
# prints one JSON line per case: the exception's type and message, or "ok".
RANKS = textwrap.dedent(
    """
    import fcntl, json, os, sys
    from pathlib import Path
    from fusedit.config import load_config
    from fusedit.train import distributed, loop, run_folder

    root, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    env = distributed.setup("cpu", timeout_s=60)
    run_folder.SEEN_WITHIN_S = 0.2

    def case(name, fn):
        try:
            fn()
            outcome = "ok"
        except Exception as e:
            outcome = f"{type(e).__name__}: {e}"
        print(json.dumps({"case": name, "rank": rank, "outcome": outcome}), flush=True)

    def hold(folder):
        with run_folder.hold_run_folder(folder, env):
            pass

    case("shared", lambda: hold(root / "shared"))
    # Each rank given its own folder at the same path: nodes that do not share the run folder.
    case("unshared", lambda: hold(root / f"node{rank}"))
    busy = root / "busy"
    busy.mkdir(exist_ok=True)
    if rank == 0:  # held by another job
        other = open(busy / run_folder.LOCK_FILE, "a+")
        other.write("pid 4242 on elsewhere since then, token abc")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    case("busy", lambda: hold(busy))

    cfg = load_config("debug", ["train.device=cpu", "train.steps=2", "train.dist_timeout_s=60"])

    def peer_died(*args, **kwargs):
        raise RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset")

    train = loop._train
    loop._train = peer_died
    case("peer", lambda: loop.train(cfg, root / "peer"))
    loop._train = train
    distributed.launcher_gone = lambda parent: True
    case("launcher", lambda: loop.train(cfg, root / "launcher", progress=False))
    """
)


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)
def test_two_ranks_refuse_an_unshared_or_busy_folder_and_stop_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "LOCAL_RANK"))}
    base |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANKS, str(tmp_path)],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    rows = [json.loads(line) for out in outs for line in out.splitlines() if line.startswith('{"case"')]
    got = {(row["case"], row["rank"]): row["outcome"] for row in rows}
    assert len(got) == 10, outs
    for rank in (0, 1):
        assert got["shared", rank] == "ok"
        assert got["unshared", rank].startswith(
            f"ConfigError: the run folder {tmp_path / f'node{rank}'} is not shared by every process: rank(s) 1 (on "
        )
        assert "it must be on a filesystem that every node mounts at the same path" in got["unshared", rank]
        assert got["busy", rank].startswith(
            f"ConfigError: {tmp_path / 'busy'} is being trained by another job (pid 4242 on elsewhere since then; "
        )
        assert got["peer", rank] == (
            "RunStopped: another process of the job failed or stopped answering (RuntimeError: Read error: "
            "Connection reset; a process waits train.dist_timeout_s=60 s for the others): that process's own "
            "error, printed above or in its log, may say why and what to change first; no checkpoint was "
            f"saved yet in {tmp_path / 'peer'}: train again to start over"
        )
        assert got["launcher", rank].startswith("RunStopped: the launcher that started this process (pid ")
        assert got["launcher", rank].endswith(
            f"is gone, so the job stops at step 0; no checkpoint was saved yet in {tmp_path / 'launcher'}: train "
            "again to start over"
        )


def test_a_stopped_job_is_told_the_command_that_goes_on_for_its_flags(tmp_path, capsys, monkeypatch):
    """`--resume` cannot be added to a command given `--overwrite` (argparse refuses the two): the advice
    of a stopped job is worded for the flags given, as Ctrl+C's is."""
    from fusedit.config import RunStopped
    from fusedit.train import loop

    def stopped(*args, **kwargs):
        raise RunStopped("another process of the job failed", "the library's own advice")

    monkeypatch.setattr(loop, "train", stopped)
    save_config(tiny_config(), tmp_path / "tiny.yaml")
    train = ["train", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"), "--quiet", "--overwrite"]
    assert main(train) == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: another process of the job failed; no checkpoint was saved yet in {tmp_path / 'run'}; "
        "rerun the same command to start again\n"
    )


def test_a_stopped_run_pickles_with_its_message():
    """A train() in a process pool hands its exception back pickled."""
    import pickle

    from fusedit.config import RunStopped

    again = pickle.loads(pickle.dumps(RunStopped("a peer failed", "the last checkpoint is x")))
    assert (str(again), again.reason, again.kept) == (
        "a peer failed; the last checkpoint is x",
        "a peer failed",
        "the last checkpoint is x",
    )


def test_only_failures_of_other_processes_are_reported_as_theirs():
    """This rank's own backend fault (an NCCL or CUDA error) keeps its traceback; a lost peer, a closed
    connection or a timeout is another process's failure, reported in one line."""
    peer = distributed.peer_failure
    assert peer(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [1.2.3.4]:5"))
    assert peer(RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms"))
    assert peer(dist.DistBackendError("NCCL communicator was aborted on rank 1"))
    assert peer(dist.DistNetworkError("failed to recv, got 0 bytes"))
    assert not peer(dist.DistBackendError("NCCL error: unhandled cuda error (run with NCCL_DEBUG=INFO)"))
    # NCCL's errors as torch's ProcessGroupNCCL words them (getNcclErrorDetailStr): a remote error says
    # neither peer nor connection unless NCCL's last error line does; torch built against an NCCL without
    # ncclRemoteError hedges every system error with "a remote peer" (torch 1.x: and "connection closure").
    nccl = "NCCL error in: ProcessGroupNCCL.cpp:2103, "
    remote = (
        "remote process exited or there was a network error, NCCL version 2.27.3\nncclRemoteError: A call "
    )
    system = (
        "unhandled system error, NCCL version 2.10.3\nncclSystemError: System call (e.g. socket, malloc) "
    )
    hedge = "It can be also caused by unexpected exit of a remote peer"
    old = ", you can check NCCL warnings for failure reason and see if there is connection closure by a peer."
    for text, theirs in (
        (remote + "failed possibly due to a network error or a remote process exiting prematurely.", True),
        (system + "or external library call failed or device error. " + hedge + ".", False),
        (system + "or external library call failed or device error. " + hedge + old, False),
        (system + "failed.\nLast error:\nsocketProgress: Connection closed by remote peer", True),
    ):
        assert peer(dist.DistBackendError(nccl + text)) is theirs, text
    assert not peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (connection of layers)"))


def test_a_starting_job_waits_out_an_evals_brief_probe_of_the_lock(tmp_path):
    """`fusedit eval` asks whether a run is training with a brief shared lock on train.lock: a job starting
    at that moment was turned away as "being trained by another job"; it now tries again for a second."""
    import fcntl
    import threading

    (tmp_path / LOCK_FILE).write_text("")
    probe = (tmp_path / LOCK_FILE).open()
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.3, probe.close).start()  # released as the probe releases it
    with hold_run_folder(tmp_path, distributed.setup("cpu")):
        assert LOCK_FILE in os.listdir(tmp_path)
