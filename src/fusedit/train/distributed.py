"""Data-parallel training on PyTorch's own engine: torchrun starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK (and the rendezvous), DDP or FSDP2 (``fully_shard``) spread the denoiser, and Distributed
Checkpoint (DCP, in :mod:`fusedit.train.checkpoint`) saves and reshards. There is no launcher of our own.

Only the training package imports ``torch.distributed``: the model code stays free of it, and FSDP2 changes
nothing but the modules' parameters (DTensor shards) and forward hooks.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from fusedit.config import ConfigError, RunStopped
from fusedit.system import resolve_device

log = logging.getLogger(__name__)

# How many process groups this process has initialised (setup): from then on its backend's threads may hold
# work that a late destructor waits for (end_process).
_joined = 0

# How long a rank other than 0 waits for rank 0 to report the same start-up error (said_by_rank_0).
SAME_ERROR_WAIT_S = 5.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank and world size, its device, and whether a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # A process group is initialised (by us or by the caller): collectives and DCP checkpoints apply.
    distributed: bool = False
    # We initialised it, so we destroy it at the end.
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets RANK/WORLD_SIZE/LOCAL_RANK for every worker it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE"))


def local_rank_of_several() -> int:
    """This process's LOCAL_RANK in a torchrun job of several processes, read before the process group is
    joined; 0 otherwise (setup refuses nonsense). What a machine's processes refuse alike before then (a
    config, a path) its local rank 0 says in full: not rank 0 across machines, as a path missing on one
    node only is that node's error."""
    local, world = os.environ.get("LOCAL_RANK", ""), os.environ.get("WORLD_SIZE", "")
    return int(local) if local.isdigit() and world.isdigit() and int(world) > 1 else 0


def rank_0_before_setup() -> bool:
    """Whether this process is rank 0 of a torchrun job, or alone, read from RANK before the process group is
    joined: what every process would say alike (a config's warnings), it says for all."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def refused_alike_per_machine() -> Iterator[None]:
    """A ConfigError from the block, met before the process group by every process of a machine alike (they
    read the same command line, config and files), is said in full by that machine's local rank 0; the
    others' is marked so that `fusedit train` prints their short line. Not left to rank 0 across machines: a
    file missing on one node only is that node's error (local_rank_of_several)."""
    try:
        yield
    except ConfigError as e:
        if local_rank_of_several() > 0:
            e.said_by = "this machine's local rank 0"
        raise


def _refuse_half_a_launch() -> None:
    """RANK without WORLD_SIZE, or WORLD_SIZE without RANK, naming a job of several processes: a launcher's or
    a job script's mistake, which would otherwise train silently as one process (a lone RANK=0 or
    WORLD_SIZE=1 is a one-process job either way)."""
    given = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if len(given) != 1:
        return
    name = given[0]
    value = _env_int(name)
    if value > (0 if name == "RANK" else 1):
        missing = "WORLD_SIZE" if name == "RANK" else "RANK"
        raise ConfigError(
            f"environment variable {name}={value} is set without {missing}, so this would train as one "
            f"process (allowed: both, as torchrun sets them, or neither for a one-process run)"
        )


def refuse_several_processes(what: str, each: str, instead: str) -> None:
    """Refuse a one-process job that torchrun started in several processes, where each would do all of it
    (``each``: what each would do; ``instead``: what to run)."""
    if launched_by_torchrun() and (world := torchrun_ranks()[1]) > 1:
        raise ConfigError(
            f"{what} runs in one process (torchrun started WORLD_SIZE={world}: each process would {each}): "
            f"{instead}"
        )


def _env_int(name: str, default: int | None = None) -> int:
    """A rank variable as torchrun writes it: ASCII digits. ``default`` stands in only for an absent one;
    int() would also take "", "1_0", "+1", " 1" or other scripts' digits, and a rank or world size made of
    those is a launcher's mistake, not a number to train with."""
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    if not (value and value.isascii() and value.isdigit()):
        raise ConfigError(
            f"environment variable {name}={value!r} is not allowed (allowed: a whole number, 0 or more, "
            "as torchrun sets it)"
        )
    return int(value)


def torchrun_ranks() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) of a torchrun launch, refused in one line unless they make sense.
    torch checks none of this before it waits for peers: a rank outside 0..WORLD_SIZE-1 would wait for a
    rendezvous that never completes, for the whole train.dist_timeout_s, and WORLD_SIZE=0 fails in the
    store with a message that names no variable."""
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK", 0)
    if world < 1:
        raise ConfigError(f"environment variable WORLD_SIZE={world} is not allowed (allowed: 1 or more)")
    if rank >= world:
        raise ConfigError(
            f"environment variable RANK={rank} is not allowed with WORLD_SIZE={world} "
            f"(allowed: 0..{world - 1})"
        )
    # The processes of one machine are a part of the job's.
    if local_rank >= world:
        raise ConfigError(
            f"environment variable LOCAL_RANK={local_rank} is not allowed with WORLD_SIZE={world} "
            f"(allowed: 0..{world - 1})"
        )
    return rank, world, local_rank


def local_device(name: str, local_rank: int) -> torch.device:
    """train.device resolved for this process (system.resolve_device: "auto" is CUDA when present, a bad or
    absent device a one-line error); a CUDA device without an index becomes the local rank's GPU (one
    process per GPU, torchrun's model)."""
    device = resolve_device(name, "train.device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str, timeout_s: float = 1800) -> DistEnv:
    """Join the process group torchrun describes (or the one the caller already initialised).

    Without torchrun's environment this is a plain single process. The backend is NCCL on CUDA and gloo
    on the CPU; the device is the local rank's GPU."""
    if dist.is_available() and dist.is_initialized():
        local_rank = _env_int("LOCAL_RANK", 0)
        device = local_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, True, False)
    _refuse_half_a_launch()
    if not launched_by_torchrun():
        return DistEnv(device=local_device(device_name, 0))
    if not dist.is_available():
        raise RuntimeError("launched by torchrun, but this torch build has no torch.distributed")
    rank, world, local_rank = torchrun_ranks()
    _check_store_address()
    device = local_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        # Before init: NCCL binds each process's communicator to its current device.
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    except RuntimeError as e:
        # The rendezvous timing out, or peers that do not connect (gloo's connectFullMesh after a torchrun
        # --max-restarts relaunch on torch 2.13, docs/multi-node.md): the job's network, not a bug. This
        # rank's own backend fault (a bad CUDA device) keeps its traceback.
        if not (isinstance(e, dist.DistError) or peer_failure(e)):
            raise
        raise RunStopped(
            f"could not join the job's process group ({error_summary(e)}; a process waits "
            f"train.dist_timeout_s={timeout_s:g} s for the others)",
            "nothing was trained in this launch: relaunch the command",
        ) from e
    global _joined
    _joined += 1
    return DistEnv(rank, world, local_rank, device, True, True)


def _check_store_address() -> None:
    """MASTER_ADDR and MASTER_PORT, where the processes meet (torchrun sets both): torch's own error for a
    missing one is a traceback."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(
                f"environment variable {name} is not set (allowed: launch with torchrun, which sets it, or "
                "set MASTER_ADDR and MASTER_PORT to where rank 0 listens)"
            )
    _env_int("MASTER_PORT")


def error_summary(error: BaseException) -> str:
    """The type and first line of a backend's error, without gloo's source location and boilerplate:
    "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [...]:3998. This is ..." says
    "RuntimeError: Connection closed by peer [...]:3998"."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:300]
    return f"{type(error).__name__}: {first}"


def said_by_rank_0(error: ConfigError, env: DistEnv, wait_s: float = SAME_ERROR_WAIT_S) -> bool:
    """Whether rank 0 stops with this same error (a refusal every rank meets alike: a config check, the
    run folder's lock), so that only rank 0 need print it, not every one of 32 ranks. Rank 0 posts each
    error in the job's store; another rank waits up to ``wait_s`` for its own to show there. An error of
    this rank alone (its data share, say) never shows, and is printed by the rank that met it."""
    if not (env.distributed and env.world_size > 1 and dist.is_initialized()):
        return False
    key = "fusedit/stopped/" + hashlib.sha256(str(error).encode()).hexdigest()
    try:
        # The store the process group was made with (torchrun's, which outlives rank 0): private, as torch
        # has no public accessor; where it is missing every rank prints its error, as before.
        store = dist.distributed_c10d._get_default_store()
        if env.is_main:
            store.set(key, "1")
            return False
        store.wait([key], timedelta(seconds=wait_s))
    except (AttributeError, RuntimeError, ValueError):
        # Not posted in time (rank 0 met another error, or none), or the store is gone.
        return False
    return True


def groups_joined() -> int:
    """How many process groups this process has initialised so far (a caller compares before and after)."""
    return _joined


def end_process(status: int) -> None:
    """End this process with ``status`` now, once its error line is out: for a process that joined a process
    group (groups_joined), where unwinding further can deadlock. The error's traceback holds the DDP wrapper,
    whose reducer holds the last reference to the process group; freeing it (with the GIL held) joins a gloo
    worker thread that waits for the GIL to finish a pending collective. Once torchrun is gone nothing would
    end such a process, and rank 0's would keep the run folder's lock. The lock, like every open file and
    the GPU's memory, goes with the process."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing more to say
            stream.flush()
    os._exit(status)


@contextlib.contextmanager
def released_on_failure(env: DistEnv) -> Iterator[None]:
    """A failure in the block frees what its frames hold (the DDP wrapper, whose reducer holds the process
    group) before it leaves, and the group is destroyed (teardown): the group's last reference is then
    dropped by torch's own destroy_process_group, which runs gloo's destructor without the GIL. Dropped
    instead by the reducer, when the error is freed later, that destructor holds the GIL while it joins a
    worker thread that waits for it: a deadlock (end_process). The traceback keeps its lines, not the
    locals of its frames."""
    try:
        yield
    except BaseException as e:
        if env.owns_group:
            seen: set[int] = set()
            pending: list[BaseException | None] = [e]
            while pending:
                error = pending.pop()
                if error is None or id(error) in seen:
                    continue
                seen.add(id(error))
                traceback.clear_frames(error.__traceback__)  # frames still running are skipped
                pending += [error.__cause__, error.__context__]
            gc.collect()  # a module's reference cycles
        raise


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_unless_main(env: DistEnv | None = None) -> Iterator[None]:
    """Logging from rank 0 only: every rank would print the same lines (32 copies of each config warning on
    4 nodes x 8 GPUs). The other ranks keep their errors. Rank 0 is ``env``'s, or without one (before the
    process group: loading the config) RANK's, rank_0_before_setup. (The data loaders warn from rank 0 too,
    and each rank lists its own skipped samples, train.data_state.skipped_list_name.)"""
    logger = logging.getLogger("fusedit")
    level = logger.level
    if not (env.is_main if env is not None else rank_0_before_setup()):
        logger.setLevel(max(logging.ERROR, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_parallel(parallel: str, env: DistEnv) -> str:
    """train.parallel for this launch: without a process group there is nothing to spread."""
    if not env.distributed:
        return "none"
    if parallel == "none" and env.world_size > 1:
        raise ConfigError(
            f"train.parallel=none with {env.world_size} processes would train unsynchronised copies "
            "(allowed: ddp, fsdp; or launch one process)"
        )
    return parallel


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers rank ``src``'s (before sharding, or for a frozen module that
    each rank built or pretrained itself: CUDA kernels need not be bitwise deterministic across GPUs)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def _fsdp_api():
    try:  # public since torch 2.6
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def wrap_denoiser(denoiser: nn.Module, parallel: str, env: DistEnv, bf16: bool) -> nn.Module:
    """The module to call for the forward pass. ``denoiser`` itself stays the model's attribute (its
    design properties, state-dict names and EMA see the unwrapped module; FSDP2 shards it in place).

    ddp: DistributedDataParallel over the whole denoiser.
    fsdp: fully_shard on every DiT block, then on the root (patch/time embeddings, refiners, output), with
    bf16 parameters and fp32 gradient reduction when training in bf16."""
    if parallel == "none":
        return denoiser
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The denoiser's buffers are constants (RoPE tables): synced once at construction, not every forward.
        # Newer torch names the switch forward_sync_buffers (broadcast_buffers is deprecated there).
        names = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {
            "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers": False
        }
        return DistributedDataParallel(
            denoiser,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **no_buffer_sync,
        )
    if parallel == "fsdp":
        fully_shard, MixedPrecisionPolicy = _fsdp_api()
        # fully_shard keeps each rank's local values: make them rank 0's first, as DDP's constructor does.
        broadcast_module(denoiser)
        # cast_forward_inputs=False: the inputs stay fp32 and autocast casts at the matmuls, so the timestep
        # (fractions in (0, 1) that feed a sinusoidal embedding) is not rounded to bf16's 8 bits.
        policy = (
            MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
            if bf16
            else MixedPrecisionPolicy()
        )
        for block in getattr(denoiser, "blocks", ()):
            fully_shard(block, mp_policy=policy)
        fully_shard(denoiser, mp_policy=policy)
        return denoiser
    raise ConfigError(f"train.parallel={parallel!r} is not allowed (allowed: none, ddp, fsdp)")


def shard_frozen(llm: nn.Module) -> None:
    """Shard a frozen LLM over the ranks with FSDP2: each decoder layer, the embeddings and the final norm
    are their own unit, gathered during the prompt batch's forward and freed by :func:`reshard` after it.

    Two constraints of the text side shape this. The text encoder reads each fused layer's K/V with that
    layer's own modules after the LLM's forward (outside the layer's forward hooks), so the units stay
    gathered until the encode is done (reshard_after_forward=False). And the LLM's root module is left
    unwrapped: transformers finds a model's hidden-state recorders by its class name, which fully_shard
    would change. Memory: the whole LLM while a prompt batch is encoded, 1/world of it during the
    denoiser's forward and backward (a training step's peak)."""
    fully_shard, _ = _fsdp_api()
    units = list(getattr(llm, "layers", ()))
    units += [child for name, child in llm.named_children() if name != "layers" and _has_parameters(child)]
    for unit in units:
        fully_shard(unit, reshard_after_forward=False)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in ``module`` (no-op for unsharded modules)."""
    for sub in module.modules():
        if hasattr(sub, "reshard") and hasattr(sub, "_get_fsdp_state"):
            sub.reshard()


@contextlib.contextmanager
def gradient_sync(forward: nn.Module, parallel: str, sync: bool) -> Iterator[None]:
    """Gradient accumulation under DDP: no all-reduce on all but the last micro-step (``no_sync``).

    FSDP2 reduce-scatters every micro-step instead: skipping it would keep each rank's whole unsharded
    gradient until the last micro-step, the memory that sharding is there to save."""
    if parallel == "ddp" and not sync:
        with forward.no_sync():
            yield
    else:
        yield


def average_gradients(params: list[nn.Parameter], env: DistEnv) -> None:
    """Mean of each gradient over the ranks, for trainable weights outside the wrapped denoiser (a jointly
    trained LLM): DDP reduces only the module it wraps. Every rank calls this (a collective per tensor)."""
    if not env.distributed or env.world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(env.world_size)


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a per-rank scalar over all ranks (every rank calls this: it is a collective)."""
    if not env.distributed or env.world_size == 1:
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value / env.world_size


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's gradient norm) as a plain tensor; plain tensors pass through."""
    full = getattr(value, "full_tensor", None)
    return full() if full is not None else value


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of ``obj`` on every rank (a collective): ranks agree on e.g. the checkpoint to resume
    from even when a shared filesystem shows them different views for a moment."""
    if not env.distributed or env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, env: DistEnv) -> list:
    """Every rank's ``obj``, in rank order, on every rank (a collective); ``[obj]`` in one process."""
    if not env.distributed or env.world_size == 1:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process of the job did (died, hung past
    the timeout, lost its connection): torch's network and store errors, and backend errors (gloo's come as
    plain RuntimeErrors naming its transport; NCCL's as DistBackendError) that say a peer, a connection, an
    abort or a timeout, or are NCCL's ncclRemoteError ("remote process exited or there was a network
    error", which need not say more). Any other backend error (this rank's own NCCL or CUDA fault) is not:
    it keeps its traceback. Torch built against an NCCL older than ncclRemoteError appends "It can be also
    caused by unexpected exit of a remote peer" to every ncclSystemError, a malloc failure too: that hedge
    alone does not make a peer's failure."""
    if isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    text = re.sub(_NCCL_SYSTEM_ERROR_HEDGE, "", str(error))
    backend = isinstance(error, dist.DistError) or "gloo" in text.lower()
    return (
        backend and re.search(r"(?i)peer|connection|timed out|timeout|abort|remote process", text) is not None
    )


# torch's ProcessGroupNCCL hedge on an ncclSystemError, when built against an NCCL without ncclRemoteError (the
# sentence; torch 1.x went on ", you can check NCCL warnings ... connection closure by a peer.").
_NCCL_SYSTEM_ERROR_HEDGE = r"It can be also caused by unexpected exit of a remote peer[^.]*\.?"


def launcher_gone(parent: int) -> bool:
    """Whether the process that started this one (torchrun's agent, pid ``parent``) has ended: its ranks run
    in their own process group, so a SIGKILLed torchrun leaves them training on their own."""
    return os.getppid() != parent


def barrier(env: DistEnv) -> None:
    if env.distributed and env.world_size > 1:
        dist.barrier()
