"""One training job per run folder, and a folder every process of the job sees.

Two jobs writing one run folder (the same job submitted twice, or a relaunch while the ranks of a killed
torchrun still train: torchrun starts its ranks in their own process group, so they outlive a SIGKILLed
launcher) delete each other's half-written checkpoints and rewind each other's metrics. Rank 0 therefore
holds an exclusive advisory lock (``flock``) on ``<run>/train.lock`` for the whole run; the kernel releases it
when the process ends, however it ends, so a killed run never leaves a stale lock behind. The file names its
holder, for the refusal a second job gets.

Under torchrun the run folder must also be on a filesystem that every node shares: each rank writes its own
checkpoint shards into it. Every rank reads back the token rank 0 wrote into the lock file at start-up, so a
folder that some node does not share fails every rank at once, in one line, before any training (rather than
at the first checkpoint, ``train.checkpoint_every`` steps later).

What the folder holds decides the rest here: a fresh run into a folder that holds a run is refused
(``RunExists``) unless told to overwrite it, a stopped run names the checkpoint it kept (``kept_checkpoint``),
and a resume rewinds ``metrics.jsonl`` to its step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from fusedit.checkpoints import LOCK_FILE, load_state, redone_steps
from fusedit.config import ConfigError
from fusedit.files import take_lock, write_text_atomic
from fusedit.train import distributed
from fusedit.train.checkpoint import last_checkpoint
from fusedit.train.distributed import DistEnv

log = logging.getLogger(__name__)

# How long a rank waits for rank 0's token to show before calling the folder unshared: a shared filesystem's
# attribute cache (NFS: a few seconds) may serve an earlier run's copy of the file for a moment.
SEEN_WITHIN_S = 10.0


@contextlib.contextmanager
def hold_run_folder(run_dir: Path, env: DistEnv) -> Iterator[None]:
    """While the block runs, this job alone trains into ``run_dir`` (created), and every rank sees the
    folder rank 0 writes into; otherwise every rank raises the same one-line ConfigError before anything is
    built or deleted (module docstring). A collective under torchrun."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    handle = holder = token = None
    if env.is_main:
        handle, holder, token = take_lock(path, "training")
    holder, token = distributed.broadcast_object((holder, token), env)
    try:
        if holder is not None:
            raise ConfigError(
                f"{run_dir} is being trained by another job ({holder}; see {LOCK_FILE}): stop it, or wait for "
                "it to end, before training into this folder (a torchrun killed with SIGKILL can leave its "
                "ranks training; if that host is down, a network filesystem may hold its lock a while: once "
                f"no job trains here, delete {path}), or give another --out"
            )
        _check_every_rank_sees(path, token, env)
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays, naming the last holder


def _check_every_rank_sees(path: Path, token: str, env: DistEnv) -> None:
    """Every rank reads rank 0's token from ``path``; all raise the same error, naming the ranks that do not."""
    if not env.distributed or env.world_size == 1:
        return
    sees = env.is_main or _shows(path, token)
    seen = distributed.gather_object((sees, socket.gethostname()), env)
    blind = [(rank, host) for rank, (ok, host) in enumerate(seen) if not ok]
    if blind:
        ranks = ", ".join(f"{rank} (on {host})" for rank, host in blind[:4]) + (
            ", ..." if len(blind) > 4 else ""
        )
        raise ConfigError(
            f"the run folder {path.parent} is not shared by every process: rank(s) {ranks} do not see the "
            f"{LOCK_FILE} rank 0 wrote there; it must be on a filesystem that every node mounts at the same "
            "path (NFS, Lustre, GPFS, ...), since each rank writes its checkpoint shards into it"
        )


def _shows(path: Path, token: str) -> bool:
    deadline = time.monotonic() + SEEN_WITHIN_S
    while True:
        with contextlib.suppress(OSError):
            if path.read_text().rstrip().endswith(f"token {token}"):
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


class RunExists(ConfigError):
    """Training afresh into a folder that holds a run, which deletes its checkpoints and metrics (a forgotten
    resume would lose the run): refused, naming the run's step, with ``advice`` on what to pass instead,
    worded for the caller's options (`fusedit train` and `fusedit demo` word it for their flags, as they
    word RunStopped's)."""

    def __init__(self, run_dir: str, step: int, advice: str):
        super().__init__(run_dir, step, advice)  # all in args: it pickles (a train() in a process pool)
        self.run_dir, self.step, self.advice = run_dir, step, advice

    def __str__(self) -> str:
        return f"{self.run_dir!r} already holds a run (checkpoint at step {self.step}): {self.advice}"


START_OVER = "pass resume=True to continue it, overwrite=True to delete it and start over, or another run_dir"


def refuse_a_run(run_dir: str | Path, advice: str = START_OVER) -> None:
    """RunExists when ``run_dir`` holds a checkpoint (one that sampling or a resume would find)."""
    ckpt = last_checkpoint(Path(run_dir))
    if ckpt is not None:
        raise RunExists(str(run_dir), int(load_state(ckpt)["step"]), advice)


def kept_checkpoint(run_dir: Path, replaced_before: float | None = None) -> tuple[Path | None, bool]:
    """The checkpoint a stopped run left in ``run_dir`` (None: none yet) and whether it is the earlier run's
    that a fresh run starting at ``replaced_before`` (a time.time()) was to replace: saved before it."""
    ckpt = last_checkpoint(run_dir)
    if ckpt is None:
        return None, False
    return ckpt, replaced_before is not None and (ckpt / "state.json").stat().st_mtime < replaced_before


def how_to_go_on(run_dir: Path, replaced_before: float | None = None) -> str:
    """What a stopped job keeps and how it goes on, for RunStopped and a Ctrl+C's note (`fusedit train`
    words it for its flags, from kept_checkpoint too)."""
    ckpt, earlier = kept_checkpoint(run_dir, replaced_before)
    if ckpt is None:
        return f"no checkpoint was saved yet in {run_dir}: train again to start over"
    if earlier:
        return (
            f"the earlier run in {run_dir} was not deleted yet: train again with overwrite=True to start over"
        )
    return (
        f"the last checkpoint is {ckpt}{redone_steps(run_dir, ckpt)}: resume from it (train(..., resume=True); "
        "`fusedit train --resume`)"
    )


def rewind_metrics(path: Path, step: int) -> None:
    """Drop log lines past the resumed step so the metrics file reads like one uninterrupted run (and a
    line cut short by a kill). Atomic: a kill during the rewind leaves the old file whole."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))
