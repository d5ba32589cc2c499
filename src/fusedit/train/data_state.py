"""The bookkeeping of a run's data across checkpoints: each rank's list of skipped samples, and the data
position a resume takes from its checkpoint.

Each rank lists the samples its loader skipped in its own file of the run folder, for people to read (the
checkpoint's data state holds the same ids). A resume takes this rank's data position from the checkpoint;
when the job now splits the global batch another way (other processes, per-process batch or grad_accum),
the old ranks' positions are merged into one (``resplit_state``) and the change is said.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from fusedit.checkpoints import COPY_AGAIN
from fusedit.config import Config, Stage, resolved_stages
from fusedit.data.loader import is_stream, resplit_state
from fusedit.data.skips import skipped_jsonl
from fusedit.files import read_json, write_text_atomic
from fusedit.train.checkpoint import data_state_name
from fusedit.train.distributed import DistEnv

log = logging.getLogger(__name__)


def skipped_list_name(rank: int, stage: int | None = None) -> str:
    """The run folder's list of the samples a rank skipped (``stage``: in a run of stages, whose data may
    differ). Ranks read different samples, so each writes its own; rank 0 keeps the plain name, as its
    data_state.json does."""
    stage_part = "" if stage is None else f".stage{stage}"
    rank_part = "" if rank == 0 else f".rank{rank}"
    return f"skipped{stage_part}{rank_part}.jsonl"


def write_skipped(path: Path, loader_state: dict, world_size: int | None = None) -> bool:
    """The skipped samples of a loader's state into ``path`` (whether there were any; with none, an earlier
    list there goes: the file always matches the last checkpoint). Rank 0 (``world_size`` given) also
    removes the lists of ranks this run does not have: after a resume on fewer processes their skips are in
    rank 0's state and list (``resplit_state``)."""
    text = skipped_jsonl(loader_state.get("skips", {}))
    if text:
        write_text_atomic(path, text)
    else:
        path.unlink(missing_ok=True)
    if world_size is not None:
        stem = path.name.removesuffix(".jsonl")
        for other in path.parent.glob(f"{stem}.rank*.jsonl"):
            rank = other.name.removeprefix(f"{stem}.rank").removesuffix(".jsonl")
            if rank.isdigit() and int(rank) >= world_size:
                other.unlink(missing_ok=True)
    return bool(text)


def where_listed(ranks: list[int], run_dir: Path, stage: int | None) -> str:
    """Where the skip line sends its reader: the lists of the ``ranks`` that wrote one (a rank that skipped
    nothing writes none), the first by its path, a few others by name, more by their pattern."""
    first = f"every skipped id is listed in {run_dir / skipped_list_name(ranks[0], stage)}"
    others = ranks[1:]
    if not others:
        return first
    if len(others) <= 3:
        named = [f"rank {r}'s in {skipped_list_name(r, stage)}" for r in others]
        return f"{first} ({', '.join(named)})"
    pattern = skipped_list_name(1, stage).replace(".rank1.", ".rank<r>.")
    return f"{first} (ranks {', '.join(map(str, others[:3]))} and {len(others) - 3} more in {pattern})"


def _warn_global_batch_changed(
    saved_world: int, saved_per_rank: int, world: int, tc, stage: int, staged: bool
) -> None:
    """A resume on another number of processes with the same per-process batch trains the rest of the stage
    at another global batch (e.g. after a lost node): allowed (train.global_batch, when set, refuses it at
    start), but said, with the batch_size that keeps the checkpoint's."""
    before, now = saved_world * saved_per_rank, world * tc.batch_size * tc.grad_accum
    key = f"stages.{stage}.train.batch_size" if staged else "train.batch_size"
    keep = before // (world * tc.grad_accum) if before % (world * tc.grad_accum) == 0 else None
    log.warning(
        "resuming at a global batch of %d (%d process(es) x batch_size %d x grad_accum %d), not the %d the "
        "checkpoint trained at (%d x %d samples): the rest of the run trains at another batch%s",
        now,
        world,
        tc.batch_size,
        tc.grad_accum,
        before,
        saved_world,
        saved_per_rank,
        f" (to keep {before}: {key}={keep})" if keep else "",
    )


def _saved_split(saved: dict, tc) -> tuple[int, int, int]:
    """(processes, batch_size, grad_accum) a checkpoint's state recorded (a state from before they were
    recorded: one process, this run's batch_size, no accumulation)."""
    return (
        int(saved.get("world_size", 1)),
        int(saved.get("batch_size", tc.batch_size)),
        int(saved.get("grad_accum", 1)),
    )


def saved_data_state(
    ckpt: Path, saved: dict, env: DistEnv, cfg: Config, stage: int = 0, staged: bool = False
) -> dict | None:
    """This rank's data position from the checkpoint, when the run that wrote it split the data the same way
    (same world size and per-rank batch). Otherwise the old ranks' states as one (``resplit_state``): every
    old rank's skipped samples go to rank 0 (the others read rank 0's state alone), an index-addressable
    source without buckets goes on after the samples read, and a stream's saved positions, which cannot be
    mapped onto another split, are read through again (a warning says so). None where the checkpoint holds
    no data state. A global batch that changed within the checkpoint's ``stage`` is warned about."""
    tc = cfg.train
    per_rank = tc.batch_size * tc.grad_accum
    saved_world, saved_batch, saved_accum = _saved_split(saved, tc)
    saved_per_rank = saved_batch * saved_accum
    if saved_world == env.world_size and saved_per_rank == per_rank:
        path = ckpt / data_state_name(env.rank)
        return read_json(path, COPY_AGAIN) if path.is_file() else None
    paths = [ckpt / data_state_name(r) for r in range(saved_world if env.is_main else 1)]
    state = None
    if all(path.is_file() for path in paths):
        state = resplit_state([read_json(path, COPY_AGAIN) for path in paths], saved_world * saved_per_rank)
    if not env.is_main:
        return state
    if saved_world * saved_per_rank != env.world_size * per_rank and saved.get("stage", stage) == stage:
        _warn_global_batch_changed(saved_world, saved_per_rank, env.world_size, tc, stage, staged)
    if is_stream(cfg.data):
        log.warning(
            "data: the checkpoint's stream positions are for %d processes x %d samples, this run has "
            "%d x %d; each rank re-reads its new shard of the stream from the start up to step %d (slow, "
            "and not the samples the old run would have read next)",
            saved_world,
            saved_per_rank,
            env.world_size,
            per_rank,
            int(saved["step"]),
        )
    return state


# How a job is spread over processes: with one process (the checkpoint's run or this one) they had no effect
# there (train.parallel is "ignored without torchrun"; one process has nothing to shard), so a resume that
# changes them changes nothing that was trained.
PROCESS_KEYS = ("train.parallel", "train.shard_llm")


def resplit_keys(saved: dict, saved_cfg: Config, cfg: Config, env: DistEnv) -> tuple[str, ...]:
    """The settings a resume changes that only say how the job is spread over its processes, left out of
    its changed settings (check_same_model's ``unchanged``): train.parallel and train.shard_llm when the
    checkpoint's run or this one has one process (PROCESS_KEYS), and the batch_size and grad_accum keys
    that split the checkpoint's global batch another way, as multi-node.md recommends when the number of
    processes changes (said at INFO: _split_keys)."""
    idle = PROCESS_KEYS if min(int(saved.get("world_size", 1)), env.world_size) == 1 else ()
    return idle + _split_keys(saved, saved_cfg, cfg, env)


def _split_keys(saved: dict, saved_cfg: Config, cfg: Config, env: DistEnv) -> tuple[str, ...]:
    """train.batch_size and train.grad_accum when they only split the checkpoint's global batch another way.
    In a staged run, the keys that give the checkpoint's stage and each later one their split (their own
    stages.N.train.*, or the earlier stage's or train.* they inherit), when each of those stages keeps its
    global batch: the run goes on as it would have on the checkpoint's processes."""
    if "batch_size" not in saved or bool(cfg.stages) != bool(saved_cfg.stages):
        return ()
    was_stages, now_stages = resolved_stages(saved_cfg), resolved_stages(cfg)
    at = int(saved.get("stage", 0)) if cfg.stages else 0
    later = range(at, min(len(was_stages), len(now_stages)))
    if not later:
        return ()
    tc, was = now_stages[at].config.train, was_stages[at].config.train
    if (was.batch_size, was.grad_accum) == (tc.batch_size, tc.grad_accum):
        return ()
    old = _saved_split(saved, tc)
    now = _global_batch(now_stages[at], env.world_size)
    if math.prod(old) != now or any(
        _global_batch(was_stages[j], old[0]) != _global_batch(now_stages[j], env.world_size)
        for j in later[1:]
    ):
        return ()
    if env.is_main:
        where = ""
        if cfg.stages:
            where = f" in {now_stages[at].where}" + (
                ", and of its own in each later stage" if later[1:] else ""
            )
        log.info(
            "resuming on another split of the same global batch of %d%s: %d process(es) x batch_size %d x "
            "grad_accum %d (the checkpoint's: %d x %d x %d)",
            now,
            where,
            env.world_size,
            tc.batch_size,
            tc.grad_accum,
            *old,
        )
    if not cfg.stages:
        return ("train.batch_size", "train.grad_accum")
    # The stages still to train own their keys; an earlier stage's (or train.*) counts where one of them
    # inherits it now: a change that reaches none of them changes only what was trained already.
    own = {f"stages.{j}.train.{name}" for j in later for name in ("batch_size", "grad_accum")}
    return tuple(sorted(own | {key for j in later for key in _split_settings(cfg, j)}))


def _global_batch(stage: Stage, processes: int) -> int:
    return processes * stage.config.train.batch_size * stage.config.train.grad_accum


def _split_settings(cfg: Config, index: int) -> list[str]:
    """The keys that set stage ``index``'s batch_size and grad_accum: the last stage up to it that sets
    each (a stage states only what changes), or train.* when none does."""
    keys = []
    for name in ("batch_size", "grad_accum"):
        setting = next((i for i in range(index, -1, -1) if name in cfg.stages[i].train), None)
        keys.append(f"train.{name}" if setting is None else f"stages.{setting}.train.{name}")
    return keys
