"""Checkpoints: one folder per save, written under a temporary name and renamed into place, so a run
killed while saving keeps its previous checkpoint intact. ``latest`` names the newest complete one, and
``state.json`` (written last) marks a folder complete.

A single-process run writes plain files:
  denoiser.safetensors  the trained DiT         ema.safetensors   its EMA (what sampling uses)
  llm.safetensors       the LLM, only when it is not reloadable from text.model_id unchanged
  optimizer.pt          optimizer state          state.json        step and bookkeeping
  config.yaml           the resolved config      data_state.json   the data position

A distributed run (torchrun) writes one Distributed Checkpoint (DCP) instead of the tensor files:
  dcp/                  {"model", "optim", "ema", "llm"?}, each rank writing its own shards; the optimizer
                        state is keyed by parameter name, so DCP reshards it for any other world size or
                        parallelism on load (N -> M ranks, DDP <-> FSDP, and N -> 1 without a process group)
  data_state.json, data_state.rank<r>.json   each rank's data position (rank 0's under the plain name)

Both formats resume either way (``load_training_state``); ``load_model`` samples from both, and
``consolidate_checkpoint`` turns a DCP checkpoint into the plain format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fusedit.config import Config, load_config, save_config

DCP_DIR = "dcp"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    cfg: Config,
    denoiser: torch.nn.Module,
    ema: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None,
    llm: torch.nn.Module | None,
    extra: dict | None = None,
    keep: int = 2,
    files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; ``files`` are extra text files (e.g. the data position)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(denoiser.state_dict()), tmp / "denoiser.safetensors")
    if ema is not None:
        save_file(_contiguous(ema), tmp / "ema.safetensors")
    if llm is not None:
        save_file(_contiguous(llm.state_dict()), tmp / "llm.safetensors")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_config(cfg, tmp / "config.yaml")
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    _publish(root, tmp, final, keep)
    return final


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete temporary folder into place, point ``latest`` at it, keep only the last ``keep``."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def data_state_name(rank: int) -> str:
    """Rank 0's data position keeps the single-process name, so 1-rank and plain runs read each other's."""
    return "data_state.json" if rank == 0 else f"data_state.rank{rank}.json"


def save_distributed_checkpoint(
    run_dir: str | Path,
    step: int,
    cfg: Config,
    denoiser: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    llm: torch.nn.Module | None,
    *,
    rank: int,
    extra: dict | None = None,
    keep: int = 2,
    rank_files: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` through DCP; every rank calls this (it is a collective).

    ``denoiser`` is the unwrapped module (plain, or sharded in place by FSDP2) whose parameters
    ``optimizer`` holds; ``rank_files`` are this rank's own text files (its data position). Every rank
    writes its shards and files into the temporary folder; then rank 0 alone writes config and state.json
    and renames the folder into place, while the others go on training."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving this step
        tmp.mkdir()
    dist.barrier()  # the folder is fresh before anyone writes into it
    model_state, optim_state = get_state_dict(denoiser, optimizer)
    state = {"model": model_state, "optim": optim_state, "ema": ema}
    if llm is not None:
        state["llm"] = get_model_state_dict(llm)
    dcp.save(state, checkpoint_id=tmp / DCP_DIR)
    for name, text in (rank_files or {}).items():
        (tmp / name).write_text(text)
    # Every rank's shards and files are written once all ranks get here. Rank 0 checks it sees the other
    # ranks' files and all ranks learn the verdict, so a run folder that the nodes do not share fails every
    # rank at once, instead of publishing a checkpoint with missing shards.
    names: list = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(rank_files or {}))
    verdict = [[n for per_rank in names for n in per_rank if not (tmp / n).is_file()] if rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise RuntimeError(
            f"checkpoint {str(tmp)!r}: rank 0 does not see files the other ranks wrote ({verdict[0][0]}, "
            "...): the run folder must be on a filesystem that every node shares"
        )
    if rank == 0:
        save_config(cfg, tmp / "config.yaml")
        state_json = {"step": step, "format": "dcp", "world_size": dist.get_world_size(), **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state_json, indent=1))
        _publish(root, tmp, final, keep)
    return final


def is_distributed_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def _dcp_keys(ckpt: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata)


def _has_section(ckpt: Path, section: str) -> bool:
    return any(k.startswith(section + ".") for k in _dcp_keys(ckpt))


def _dcp_load(state: dict, ckpt: Path, no_dist: bool) -> None:
    """dcp.load in place; ``no_dist``: in this process alone (DCP warns each time; here it is meant)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=no_dist)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest one of a run folder; a clear error when there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints"
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip() / "state.json").is_file():
        return root / latest.read_text().strip()
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    if not done:
        raise FileNotFoundError(
            f"no checkpoint in {str(path)!r} (expected a run folder or a checkpoint folder)"
        )
    return done[-1]


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def load_checkpoint_config(ckpt: Path) -> Config:
    return load_config(ckpt / "config.yaml")


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor] | None:
    f = ckpt / f"{name}.safetensors"
    return load_file(f) if f.is_file() else None


def load_model(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True):
    """A trained model from a run folder or checkpoint folder, EMA weights by default, in eval mode.

    Returns (model, config, checkpoint folder).
    """
    from fusedit.system import build_model

    ckpt = find_checkpoint(path)
    cfg = load_checkpoint_config(ckpt)
    model = build_model(cfg, device)
    if is_distributed_checkpoint(ckpt):
        _load_dcp_weights(ckpt, model, use_ema)
        return model.eval(), cfg, ckpt
    weights = (load_tensors(ckpt, "ema") if use_ema else None) or load_tensors(ckpt, "denoiser")
    model.denoiser.load_state_dict(weights)
    llm = load_tensors(ckpt, "llm")
    if llm is not None:
        model.text.llm.load_state_dict(llm)
    return model.eval(), cfg, ckpt


def _load_dcp_weights(ckpt: Path, model, use_ema: bool) -> None:
    """Full (unsharded) weights from a DCP checkpoint written by any number of ranks, in this process alone
    (no process group needed: DCP reassembles each tensor from the shards that cover it)."""

    key = "ema" if use_ema and _has_section(ckpt, "ema") else "model"
    state = {key: model.denoiser.state_dict()}
    if _has_section(ckpt, "llm"):
        state["llm"] = model.text.llm.state_dict()
    _dcp_load(state, ckpt, no_dist=True)
    model.denoiser.load_state_dict(state[key])
    if "llm" in state:
        model.text.llm.load_state_dict(state["llm"])


# --------------------------------------------------------------------------------------------------
# Resuming training (either format, into plain, DDP-unwrapped or FSDP2-sharded modules)


def trainable_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters the training loop optimises, in the optimizer's order."""
    return [name for name, p in module.named_parameters() if p.requires_grad]


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """torch's optimizer state dict (parameters numbered in order) -> keyed by parameter name (DCP's form)."""
    return {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def optimizer_by_index(state: dict) -> dict:
    """The inverse of :func:`optimizer_by_name`, numbering parameters in the order the groups list them."""
    index = {name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {
        "state": {index[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def load_training_state(
    ckpt: Path,
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema,
    llm: torch.nn.Module | None,
    *,
    distributed: bool,
) -> dict:
    """Load weights, optimizer, EMA (and the LLM when given and saved) from either checkpoint format into
    this run's modules, whatever the world size and parallelism of the run that wrote it. Every rank calls
    this. Returns the checkpoint's state.json."""
    if is_distributed_checkpoint(ckpt):
        _load_dcp_training(ckpt, denoiser, optimizer, ema, llm, distributed)
    elif distributed:
        _load_files_distributed(ckpt, denoiser, optimizer, ema, llm)
    else:
        denoiser.load_state_dict(load_tensors(ckpt, "denoiser"))
        saved_llm = load_tensors(ckpt, "llm") if llm is not None else None
        if saved_llm is not None:
            llm.load_state_dict(saved_llm)
        ema.load_state_dict(load_tensors(ckpt, "ema"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return load_state(ckpt)


def _load_dcp_training(ckpt, denoiser, optimizer, ema, llm, distributed: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    # The destination's own (possibly sharded) state dicts: DCP fills them in place, reading from each
    # saved shard the pieces this rank holds.
    model_state, optim_state = get_state_dict(denoiser, optimizer)
    state = {"model": model_state, "optim": optim_state, "ema": ema.state_dict()}
    with_llm = llm is not None and _has_section(ckpt, "llm")
    if with_llm:
        state["llm"] = get_model_state_dict(llm)
    _dcp_load(state, ckpt, no_dist=not distributed)
    set_state_dict(denoiser, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_state_dict(state["ema"])
    if with_llm:
        set_model_state_dict(llm, state["llm"])


def _load_files_distributed(ckpt, denoiser, optimizer, ema, llm) -> None:
    """A single-process checkpoint into a distributed run: every rank reads the full tensors and keeps its
    share (FSDP2 slices them; DDP replicas load them whole)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(denoiser, load_tensors(ckpt, "denoiser"), options=full)
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    named = optimizer_by_name(saved, trainable_names(denoiser))
    set_optimizer_state_dict(denoiser, optimizer, named, options=full)
    ema.load_state_dict(load_tensors(ckpt, "ema"))
    saved_llm = load_tensors(ckpt, "llm") if llm is not None else None
    if saved_llm is not None:
        set_model_state_dict(llm, saved_llm, options=full)


def consolidate_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write a DCP checkpoint (a run folder or checkpoint folder) as a single-process checkpoint folder
    ``out`` (safetensors, optimizer.pt with numbered parameters, config, state, rank 0's data position),
    e.g. to publish weights or to read them without torch.distributed. No model is built."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = find_checkpoint(src)
    if not is_distributed_checkpoint(ckpt):
        raise ValueError(
            f"{str(ckpt)!r} is not a distributed (DCP) checkpoint: it is in the plain format already"
        )
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        whole = Path(scratch) / "whole.pt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
            dcp_to_torch_save(ckpt / DCP_DIR, whole)
        state = torch.load(whole, weights_only=True)
    save_file(_contiguous(state["model"]), tmp / "denoiser.safetensors")
    save_file(_contiguous(state["ema"]), tmp / "ema.safetensors")
    if "llm" in state:
        save_file(_contiguous(state["llm"]), tmp / "llm.safetensors")
    torch.save(optimizer_by_index(state["optim"]), tmp / "optimizer.pt")
    for name in ("config.yaml", "data_state.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, tmp / name)
    meta = load_state(ckpt)
    meta.pop("format", None)
    (tmp / "state.json").write_text(json.dumps({**meta, "consolidated_from": str(ckpt)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
