"""Checkpoints: one folder per save, written under a temporary name and renamed into place, so a run
killed while saving keeps its previous checkpoint intact. ``latest`` names the newest complete one, and
``state.json`` (written last) marks a folder complete. The files reach the disk (fsync) before the rename,
and the rename before ``latest`` names it, so a power loss or node crash keeps them too.

A single-process run writes plain files:
  denoiser.safetensors  the trained DiT         ema.safetensors   its EMA (what sampling uses)
  llm.safetensors       the LLM, only when it is not reloadable from text.model_id unchanged (random init,
                        or trained); llm_extra<i>.safetensors the same for extra_text.<i>
  <part>_lora.safetensors  the LoRA adapters of a part that trains through them (denoiser, llm, ...)
  optimizer.pt          the denoiser's optimizer state; optimizer_<llm>.pt each trained LLM's
  state.json            step, stage and bookkeeping
  config.yaml           the resolved config      data_state.json   the data position
  models.json           the kind and shapes of each local model folder the config names (load_model's relocate)
  vocabulary.json       the built-in word tokenizer's words, when a part uses it (token id = position + 4)

Weights are always saved under their plain names (without adapters: fusedit.adapters), adapters apart,
and the EMA holds the merged weights; so every file but the adapters loads into a model without adapters.

A distributed run (torchrun) writes one Distributed Checkpoint (DCP) instead of the tensor files:
  dcp/                  {"model", "optim", "ema"} and, as above, "model_lora", "llm", "llm_lora",
                        "optim_llm", ...; each rank writes its own shards; the optimizer state is keyed by
                        parameter name, so DCP reshards it for any other world size or parallelism on load
                        (N -> M ranks, DDP <-> FSDP, and N -> 1 without a process group)
  data_state.json, data_state.rank<r>.json   each rank's data position (rank 0's under the plain name)

A staged run's checkpoint records its stage (state.json "stage"): it is loaded into the model as that
stage built it (its adapters), whatever stage the run goes on to. Pruning keeps the newest
train.keep_checkpoints, as in a run without stages, and each finished stage's last checkpoint besides.

Both formats resume either way (``load_training_state``); ``load_model`` samples from both, and
``consolidate_checkpoint`` turns a DCP checkpoint into the plain format.

This module writes checkpoints, resumes training from them and starts a run from one (train.init_from).
Reading one for sampling, export and evaluation (``find_checkpoint``, ``load_model``, ...) and the names of
the format's files and sections live in :mod:`fusedit.checkpoints`, outside the training package.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fusedit.adapters import (
    Parts,
    adapter_state_dict,
    base_state_dict,
    load_plain_and_adapters,
    structured_state,
    text_modules,
)
from fusedit.checkpoints import (
    DCP_DIR,
    DENOISER,
    EMA_MOSTLY_START,
    MODELS_FILE,
    VOCABULARY_FILE,
    WEIGHT_FILES,
    check_weight_files,
    checkpoint_folders,
    checkpoint_stage,
    dcp_keys,
    dcp_load,
    dcp_section,
    dcp_sections,
    early_ema,
    file_stem,
    find_checkpoint,
    identity_change,
    is_distributed_checkpoint,
    load_checkpoint_config,
    load_state,
    load_tensors,
    load_weights,
    optim_key,
    optim_section,
    optimizer_file,
    readable,
    saved_vocabulary,
    shapes_mismatch,
    split_sections,
    weight_files,
    weights_mismatch,
)
from fusedit.config import (
    Config,
    ConfigError,
    flatten,
    gone_model_paths,
    model_identity,
    model_paths,
    paths_to_nothing,
    resolved_stages,
    save_config,
    to_dict,
    with_stand_ins_of,
)
from fusedit.files import (
    partial_folder,
    readable_by_all,
    readable_size,
    remove_folder,
    replace_folder,
    replacing,
    sync_folder,
    write_text_atomic,
)

log = logging.getLogger(__name__)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


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
    *,
    text: dict[str, tuple[torch.nn.Module, bool]] | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    vocabulary: list[str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; ``files`` are extra text files (e.g. the data position). The
    newest ``keep`` checkpoints stay, and each finished stage's last one (:func:`_publish`).

    ``llm`` is saved whole as llm.safetensors. ``text`` maps further LLM names (``llm``, ``llm_extra0``) to
    (module, whole): whole saves its weights, and its adapters are saved either way. ``optimizers`` are the
    LLMs' optimizers by the same names (``optimizer`` is the denoiser's). ``vocabulary``: the built-in
    tokenizer's words (``TextToImage.vocabulary``), saved as vocabulary.json. A save the file system refuses
    (a full disk) deletes what it wrote and raises CheckpointNotSaved (:func:`_writing`)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = partial_folder(final)
    modules = {
        DENOISER: (denoiser, True),
        **({"llm": (llm, True)} if llm is not None else {}),
        **(text or {}),
    }
    with _writing(root, tmp, step, keep) as into:
        for key, (module, whole) in modules.items():
            if whole:
                save_file(_contiguous(base_state_dict(module)), into(f"{key}.safetensors"))
            adapters = adapter_state_dict(module)
            if adapters:
                save_file(_contiguous(adapters), into(f"{key}_lora.safetensors"))
        if ema is not None:
            save_file(_contiguous(ema), into("ema.safetensors"))
        for key, opt in {
            **({DENOISER: optimizer} if optimizer is not None else {}),
            **(optimizers or {}),
        }.items():
            torch.save(opt.state_dict(), into(optimizer_file(key)))
        _save_config_files(cfg, into, vocabulary)
        for name, content in (files or {}).items():
            into(name).write_text(content)
        state = {"step": step, **(extra or {}), WEIGHT_FILES: weight_files(tmp)}
        into("state.json").write_text(json.dumps(state, indent=1))
        into.file = None
        _publish(root, tmp, final, keep)
    return final


class CheckpointNotSaved(OSError):
    """A checkpoint save that the file system refused or cut short (a full disk or quota, a read-only or
    failing file system): its partial folder is deleted, and the message says in one line what failed,
    where, and what one checkpoint takes. An OSError, as the write's own error was: `fusedit` prints it in
    one line, and training adds the checkpoint a resume would take (RunStopped)."""


class _Files:
    """``into(name)``: the path of file ``name`` in a checkpoint's temporary folder, noted as the one being
    written (``file``; None once all are written), so that a failed save names it."""

    def __init__(self, tmp: Path):
        self.tmp, self.file = tmp, None

    def __call__(self, name: str) -> Path:
        self.file = name
        return self.tmp / name


@contextlib.contextmanager
def _writing(root: Path, tmp: Path, step: int, keep: int):
    """Write checkpoint ``step``'s files into ``tmp`` (through the yielded ``into``) and publish it. A save
    that fails, however, deletes ``tmp``: it holds up to a whole checkpoint's worth of disk, and on a full
    disk no later save (whose _publish sweeps such folders) could succeed to free it. A write the file
    system refused becomes CheckpointNotSaved; any other error (a bug) keeps its traceback."""
    into = _Files(tmp)
    try:
        yield into
    except BaseException as e:
        placed = not tmp.exists()  # renamed into place by _publish, which failed after that
        shutil.rmtree(tmp, ignore_errors=True)
        detail = _write_failure(e)
        if detail is None:
            raise
        remedy = _remedy(e)
        if placed:
            raise CheckpointNotSaved(
                f"checkpoint step {step} is saved in {str(root)!r}, but finishing the save failed ({detail}): "
                f"'latest' may still name the one before, which a --resume then takes; {remedy}"
            ) from e
        where = f"writing {into.file}" if into.file else "putting it in place"
        size = _folder_bytes(last_checkpoint(root.parent))
        room = (
            f" (a checkpoint takes about {readable_size(size)} here, and train.keep_checkpoints={keep} of "
            "them stay beside the one being saved)"
            if size
            else ""
        )
        raise CheckpointNotSaved(
            f"checkpoint step {step} was not saved: {where} in {str(root)!r} failed ({detail}); its partial "
            f"folder is deleted{room}: {remedy}"
        ) from e


def _remedy(error: BaseException) -> str:
    """What to do about a write the file system refused: ``error``'s own reason where it gives one (an
    OSError's errno), else what a cut-short write almost always means."""
    code = getattr(error, "errno", None)
    if code == errno.EROFS:
        return "the file system is read-only: train into a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        return "this user may not write there: check the folder's permissions"
    if isinstance(error, OSError) and code not in (errno.ENOSPC, errno.EDQUOT, None):
        return "check the file system there"
    return "free disk space there"


def _write_failure(error: BaseException) -> str | None:
    """The file system's refusal that ``error`` reports, in a few words, or None when it is not one. The
    writers word a full disk each their own way: an OSError (``No space left on device``), safetensors'
    SafetensorError ("I/O error: ..."), torch.save's RuntimeError from its zip writer, which sees only a
    write cut short ("[enforce fail at inline_container.cc:672] . unexpected pos 1720448 vs 1720336"), and
    DCP's CheckpointException, holding each failed rank's error."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    first = (str(error).strip().splitlines() or [""])[0]
    if type(error).__name__ == "SafetensorError" and "I/O error" in first:
        return first.removeprefix("Error while serializing: ")
    if isinstance(error, RuntimeError) and ("inline_container.cc" in first or "PytorchStreamWriter" in first):
        cause = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", first)  # the C++ source line: not the user's
        return f"torch's writer stopped short, as on a full disk: {cause[:200]}"
    if type(error).__name__ == "CheckpointException":
        failures = (_write_failure(failed) for failed, _ in getattr(error, "failures", {}).values())
        return next((detail for detail in failures if detail), None)
    return None


def last_checkpoint(run_dir: Path) -> Path | None:
    """``run_dir``'s latest finished checkpoint (find_checkpoint), or None when it has none yet."""
    try:
        return find_checkpoint(run_dir)
    except FileNotFoundError:
        return None


def _folder_bytes(folder: Path | None) -> int:
    """The size of the files under ``folder`` (0 for None)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder else 0


def _save_config_files(cfg: Config, into: _Files, vocabulary: list[str] | None) -> None:
    """config.yaml; models.json: what each local model folder the config names held (model_identity),
    so that a run read after one moved (load_model's ``relocate``) can tell the new place holds the same
    model; and the built-in tokenizer's ``vocabulary`` when there is one (vocabulary.json)."""
    save_config(cfg, into("config.yaml"))
    if vocabulary is not None:
        into(VOCABULARY_FILE).write_text(json.dumps(vocabulary))
    identities = {}
    for key, place in model_paths(cfg).items():
        identity = model_identity(place, cfg.vae.subfolder if key == "vae.model_id" else "")
        if identity:
            identities[key] = identity
    into(MODELS_FILE).write_text(json.dumps(identities, indent=1))


def _publish(root: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rename a complete temporary folder into place, point ``latest`` at it, keep only the last ``keep``
    (train.keep_checkpoints) and the last checkpoint of each finished stage (:func:`_stage_ends`). Each on
    the disk before the next (fsync): after a crash ``latest`` never names a folder whose files were lost
    with the page cache, nor is ``checkpoints/`` itself (new at a run's first save) lost."""
    readable_by_all(tmp)
    # ``final`` may exist: an earlier save of this step that ``latest`` never named (see below).
    replace_folder(tmp, final)
    sync_folder(root.parent)
    write_text_atomic(root / "latest", final.name, durable=True)
    # The newest ``keep`` up to ``final``: a folder past it (a crash kept ``latest`` from naming it, and the
    # run resumed from the one before) must not push ``final`` out.
    folders = checkpoint_folders(root)
    stage_ends = _stage_ends(folders)
    # Each renamed to .step_<n>.deleting before it goes: never a step_<n> holding state.json (the mark of
    # a complete folder, which find_checkpoint takes) but missing weights.
    for old in folders[: max(folders.index(final) + 1 - keep, 0)]:
        if old not in stage_ends:
            remove_folder(old)
    # Every rank is past its writes into this step's folder, and none has begun the next.
    sweep_leftovers(root)


def sweep_leftovers(root: Path) -> None:
    """Delete the ``.step_*.partial`` and ``.step_*.deleting`` folders in the checkpoints folder ``root``:
    left by a run killed while saving or deleting a step it may never save again, a whole checkpoint's
    worth of disk each. Only while no process of the job writes into ``root``."""
    for stale in [*root.glob(".step_*.partial"), *root.glob(".step_*.deleting")]:
        shutil.rmtree(stale, ignore_errors=True)


def _stage_ends(folders: list[Path]) -> set[Path]:
    """The checkpoints of ``folders`` (oldest first) that end a stage: each stage's last before a later
    stage's (state.json "stage"), which the stage wrote at its last step. Out of train.keep_checkpoints'
    rotation: a staged run's first result (its 256 px model, say) is one to sample or start another run
    from, and the stages after it would otherwise push it out. A fresh run still deletes them all."""
    stages = [_saved_stage(folder) for folder in folders]
    return {
        folder
        for folder, stage, after in zip(folders, stages, stages[1:])
        if stage is not None and after is not None and after > stage
    }


def _saved_stage(folder: Path) -> int | None:
    """The stage a checkpoint folder records, or None (one written without stages, by fusedit convert, or
    an unreadable state.json: pruning goes on without it)."""
    try:
        return int(json.loads((folder / "state.json").read_text())["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def data_state_name(rank: int) -> str:
    """Rank 0's data position keeps the single-process name, so 1-rank and plain runs read each other's."""
    return "data_state.json" if rank == 0 else f"data_state.rank{rank}.json"


def save_distributed_checkpoint(
    run_dir: str | Path,
    step: int,
    cfg: Config,
    denoiser: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizers: dict[str, torch.optim.Optimizer],
    text: dict[str, tuple[torch.nn.Module, bool]],
    *,
    rank: int,
    extra: dict | None = None,
    keep: int = 2,
    rank_files: dict[str, str] | None = None,
    vocabulary: list[str] | None = None,
) -> Path:
    """Write checkpoint ``step`` through DCP; every rank calls this (it is a collective).

    ``denoiser`` is the unwrapped module (plain, or sharded in place by FSDP2); ``optimizers`` hold its
    parameters (key "denoiser") and each trained LLM's; ``text`` is as for :func:`save_checkpoint`;
    ``rank_files`` are this rank's own text files (its data position). Every rank writes its shards and
    files into the temporary folder; then rank 0 alone writes config (with ``vocabulary``, as for
    :func:`save_checkpoint`) and state.json and renames the folder into place, while the others go on
    training."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    # Rank 0 clears one left by a run killed while saving this step and makes it afresh.
    tmp = partial_folder(final, fresh=rank == 0)
    dist.barrier()  # the folder is fresh before anyone writes into it
    state = {"ema": ema}
    for key, (module, whole) in {DENOISER: (denoiser, True), **text}.items():
        module_state, optim_state = _state_to_save(module, optimizers.get(key))
        sections = split_sections(key, module_state)
        if not whole:  # a hub LLM trained through adapters: its own weights reload from text.model_id
            sections.pop(dcp_section(key))
        state.update(sections)
        if optim_state is not None:
            state[optim_section(key)] = optim_state
    # A rank whose save fails deletes the folder (every rank's shards: the checkpoint is lost either way);
    # the others stop at the next collective (a peer's failure), or with it when it is DCP's own.
    with _writing(root, tmp, step, keep) as into:
        dcp.save(state, checkpoint_id=into(DCP_DIR))
        for name, content in (rank_files or {}).items():
            into(name).write_text(content)
        into.file = None
        # Every rank's shards and files are written once all ranks get here. Rank 0 checks it sees the other
        # ranks' files and all ranks learn the verdict, so a run folder that the nodes do not share fails
        # every rank at once, instead of publishing a checkpoint with missing shards.
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(rank_files or {}))
        verdict = [
            [n for per_rank in names for n in per_rank if not (tmp / n).is_file()] if rank == 0 else None
        ]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:  # a folder shared at start-up (train.run_folder) but not since: one line on every rank
            raise ConfigError(
                f"checkpoint {str(tmp)!r}: rank 0 does not see files the other ranks wrote ({verdict[0][0]}, "
                "...): the run folder must be on a filesystem that every node shares"
            )
        if rank == 0:
            _save_config_files(cfg, into, vocabulary)
            state_json = {"step": step, "format": "dcp", "world_size": dist.get_world_size(), **(extra or {})}
            into("state.json").write_text(json.dumps(state_json, indent=1))
            into.file = None
            _publish(root, tmp, final, keep)
    return final


def _module_and_optim_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """DCP's (possibly sharded) state dicts of a module and its optimizer (None when it has none).

    For an optimizer without any state, torch's get_state_dict first takes a step at learning rate 0 with
    zero gradients: every parameter gets a zero state with step 1, which the optimizer then keeps."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(module), None
    return get_state_dict(module, optimizer)


def _state_to_save(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """:func:`_module_and_optim_state` that leaves ``optimizer`` as it was. An optimizer that has not
    stepped yet (every step so far skipped as non-finite) would otherwise keep, and save, the zero states
    with step 1 that get_state_dict makes, and its first real step would use Adam's bias correction of
    step 2, in this run and in the runs resumed from the checkpoint."""
    stepped = optimizer is None or bool(optimizer.state)
    module_state, optim_state = _module_and_optim_state(module, optimizer)
    if not stepped:
        optimizer.state.clear()
        optim_state["state"] = {}
    return module_state, optim_state


def _set_optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict, filler, options=None
) -> None:
    """Load ``named`` (an optimizer state keyed by parameter name, DCP's form) into ``optimizer``, leaving
    the parameters it has no state for (no gradient before the save) without state, as the saved run had
    them. torch's loader wants a state for every trainable parameter (a KeyError, or an error unless
    strict=False in newer torch), so ``filler()`` (states of this optimizer in the form ``options`` load)
    stands in for the missing ones until it is done: kept, their zero states with step 1 would change
    Adam's bias correction at each such parameter's first update."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    missing = [name for name in trainable_names(module) if name not in named["state"]]
    if missing:
        stand_in = filler()
        named = {**named, "state": {**named["state"], **{name: stand_in[name] for name in missing}}}
    set_optimizer_state_dict(module, optimizer, named, options=options)
    params = dict(module.named_parameters())
    for name in missing:
        optimizer.state.pop(params[name], None)


def _names_with_state(keys: set[str], section: str) -> set[str]:
    """The parameters that a DCP optimizer section holds a state for. Its keys are
    "<section>.state.<parameter>.<state name>" (Adam's "step", "exp_avg", ...: no dots)."""
    prefix = f"{section}.state."
    return {key[len(prefix) :].rpartition(".")[0] for key in keys if key.startswith(prefix)}


def init_weights(model, path: str | Path, cfg: Config | None = None) -> Path:
    """train.init_from: start ``model`` (freshly built, before any stage applies) from the weights of a run
    or checkpoint folder, as sampling would load them (its EMA, or with train.init_from_ema=false its raw
    weights; adapters merged, its LLMs when saved), or of a diffusers pipeline folder (its transformer and
    every LLM). Warns of an EMA that still holds mostly the weights its run started from. ``cfg``: the
    config ``model`` was built from, whose train.init_from_ema applies and whose model-defining settings
    the source was trained with otherwise are warned about (:func:`init_from_changes`; a source that does
    not fit names them too); None loads the EMA, uncompared."""
    use_ema = cfg is None or cfg.train.init_from_ema
    source = init_source(path)
    changes = init_from_changes(source, cfg) if cfg is not None else []
    if (source / "model_index.json").is_file():
        _check_exported_weights(path, source, use_ema)
        problem = _init_from_pipeline(model, source)
    else:
        # The EMA holds the denoiser with its adapters merged, so it is compared with the model as built
        # (the raw weights have the same shapes).
        expected = {
            "ema": model.denoiser.state_dict(),
            **{k: m.state_dict() for k, m in text_modules(model).items()},
        }
        problem = _vocabulary_change(saved_vocabulary(source), model.vocabulary) or weights_mismatch(
            source, expected
        )
        if problem is None:
            try:
                if load_weights(model, source, checkpoint_stage(source), use_ema):
                    _warn_early_ema(path, source)
            except (RuntimeError, KeyError) as e:  # what the shapes cannot show (adapters of another rank)
                problem = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
    if problem:
        trained = f" (it was trained with {'; '.join(changes)})" if changes else ""
        raise ConfigError(f"train.init_from={str(path)!r} does not fit this model: {problem}{trained}")
    if changes:
        log.warning(
            "train.init_from=%r was trained as another model than this run builds, and its weights start it "
            "all the same: %s",
            path,
            "; ".join(changes),
        )
    return source


def _warn_early_ema(path: str, ckpt: Path) -> None:
    """The EMA of a checkpoint that train.init_from loads still holds mostly the weights its run started
    from (its random init, early in a run): the fine-tune would start from about those, not from what the
    run learned (checkpoints.early_ema)."""
    early = early_ema(ckpt)
    if early is None:
        return
    step, kept, from_init, train = early
    log.warning(
        "train.init_from=%r: its EMA weights at step %d still hold %.0f%% of its run's %s (train.ema_decay=%g "
        "every train.ema_every=%d steps), so this run starts from mostly those: train.init_from_ema=false "
        "starts it from the trained (raw) weights",
        path,
        step,
        100 * kept,
        "train.init_from's weights" if from_init else "random initial weights",
        train.ema_decay,
        train.ema_every,
    )


def _check_exported_weights(path: str, folder: Path, use_ema: bool) -> None:
    """A pipeline folder holds the weights it was exported with, as its record says (pipeline.export_source;
    a folder without one is not judged): train.init_from_ema=false cannot get raw weights from an export of
    the EMA (refused), and an EMA that still held mostly its run's starting weights is warned about."""
    from fusedit.pipeline import export_source

    record = export_source(folder) or {}
    if record.get("weights") != "ema":
        return
    made = f"the EMA weights of step {record.get('step')} of {record.get('checkpoint')}"
    if not use_ema:
        raise ConfigError(
            f"train.init_from_ema=false asks for raw weights, but the pipeline folder {str(path)!r} holds {made} "
            "(allowed: train.init_from= that checkpoint, or an export of it with --no-ema)"
        )
    kept = record.get("ema_holds_start")
    if isinstance(kept, (int, float)) and kept > EMA_MOSTLY_START:
        log.warning(
            "train.init_from=%r holds %s, which still held %.0f%% of the weights its run started from, so this "
            "run starts from mostly those: train.init_from= that checkpoint with train.init_from_ema=false "
            "starts it from the trained (raw) weights",
            path,
            made,
            100 * kept,
        )


def init_from_changes(source: Path, cfg: Config) -> list[str]:
    """The settings of the model-defining sections (MODEL_SECTIONS) that ``cfg`` sets otherwise than the
    config train.init_from's ``source`` (a checkpoint or pipeline folder) was trained with, as
    "key=old (this run: new)", and the model folders that hold another model than the one its run read
    (models.json). Weights loaded into another design, position encoding, LLM layer or LLM of the same
    shape fit every shape check but no longer mean what they learned. Quiet: RESUMABLE_CHANGES (how the
    text is batched and which kernels compute, not what the weights mean), and a model folder named
    otherwise that holds the same model (moved or copied). data.image_size and the train section, which a
    fine-tune changes, are not model-defining. A pipeline folder that recorded no config (not exported by
    fusedit) has nothing to compare: the shapes of its weights are still checked."""
    try:
        saved = load_checkpoint_config(source)
    except ConfigError:
        return []
    out, compared = [], set()  # compared: the keys whose model identity the first loop already judged
    for key, old, new in config_differences(saved, cfg):
        section, name = key.split(".", 1)[0], key.rsplit(".", 1)[-1]
        if section not in MODEL_SECTIONS or name in RESUMABLE_CHANGES:
            continue
        compared.add(key)
        if name in ("model_id", "tokenizer") and _moved(old, new) and not identity_change(source, cfg, key):
            continue
        out.append(f"{key}={old!r} (this run: {new!r})")
    for key, place in model_paths(cfg).items():
        change = identity_change(source, cfg, key) if key not in compared else None
        if change:
            out.append(f"{key}={place!r} holds another model than its run read ({change})")
    return out


def init_source(path: str | Path) -> Path:
    """What train.init_from names: a pipeline folder (model_index.json) itself, else the checkpoint
    (:func:`find_checkpoint`: the latest of a run folder); a one-line ConfigError naming every kind allowed
    when it is none of them."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    try:
        return find_checkpoint(path)
    except FileNotFoundError:
        what = "holds no checkpoint" if path.exists() else "is a path to nothing"
        raise ConfigError(
            f"train.init_from={str(path)!r} {what} (allowed: a run folder holding a checkpoint, a checkpoint "
            "folder, or a diffusers pipeline folder that fusedit export wrote)"
        ) from None


def _vocabulary_change(
    saved: list[str] | None,
    current: list[str] | None,
    what: str = f"built-in tokenizer's words ({VOCABULARY_FILE})",
) -> str | None:
    """How the tokens a checkpoint saved (``what``) differ from the model's (same-size lists with other
    words would pass every shape check and silently remap the LLM's token ids), or None."""
    if saved is None or current is None or saved == current:
        return None
    at = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current)))
    theirs = saved[at] if at < len(saved) else "(end)"
    ours = current[at] if at < len(current) else "(end)"
    return (
        f"its {what} differ from this model's at position {at} "
        f"({theirs!r} there, {ours!r} here), so its token ids mean other words"
    )


def _tokenizer_change(source, model, slots: list[str]) -> str | None:
    """How the tokenizers of a pipeline's LLMs differ from ``model``'s, slot by slot, as
    :func:`_vocabulary_change` words it (a pipeline saves whole tokenizers, not vocabulary.json), or None.
    The LLMs' weights come from the pipeline, so their token ids must mean the same words here; the pooled
    CLIP keeps its own weights and tokenizer. A tokenizer the model lacks (a shape-only build) is skipped.
    ``slots``: the pipeline's tokenizer folders, in LLM order."""
    pairs = [(slot, a.tokenizer, b.tokenizer) for slot, a, b in zip(slots, source.encoders, model.encoders)]
    for slot, theirs, ours in pairs:
        if theirs is not None and ours is not None:
            change = _vocabulary_change(
                _in_id_order(theirs), _in_id_order(ours), f"{slot}/ folder's tokens (in id order)"
            )
            if change:
                return change
    return None


def _in_id_order(tokenizer) -> list[str]:
    """A tokenizer's tokens, the one of id i at position i."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


def _init_from_pipeline(model, folder: Path) -> str | None:
    """init_weights from a pipeline folder (``fusedit export``, ``FuseDiTPipeline.save_pretrained``): the
    first way it does not fit ``model`` (as :func:`shapes_mismatch` words it, under the pipeline's folder
    names), or None once its denoiser and LLM weights are loaded. The pooled CLIP and the VAE stay what the
    config loads, as they do for a run folder."""
    from fusedit.pipeline import LLM_SLOTS, from_pretrained

    try:
        source, _ = from_pretrained(folder)
    except (ValueError, OSError) as e:  # not a fusedit pipeline, or a component it cannot read
        return str(e).splitlines()[0]
    # Checkpoint name -> the pipeline's folder for it (llm -> text_encoder, llm_extra0 -> text_encoder_2, ...).
    folders = {DENOISER: "transformer"} | {
        key: slot for key, (_, slot) in zip(text_modules(model), LLM_SLOTS, strict=False)
    }
    have = {DENOISER: source.denoiser, **text_modules(source)}
    want = {DENOISER: model.denoiser, **text_modules(model)}
    if set(have) != set(want):
        return f"it holds {len(have) - 1} LLM(s), the configured model reads {len(want) - 1}"
    states = {key: module.state_dict() for key, module in have.items()}
    problem = _tokenizer_change(source, model, [tok for tok, _ in LLM_SLOTS]) or shapes_mismatch(
        {folders[k]: {n: tuple(t.shape) for n, t in s.items()} for k, s in states.items()},
        {folders[k]: m.state_dict() for k, m in want.items()},
        where="the pipeline",
    )
    if problem is None:
        for key, module in want.items():
            module.load_state_dict(states[key])
    return problem


# Settings a resumed run may change: how the text is batched and which kernels compute, not what the
# weights are or mean.
RESUMABLE_CHANGES = frozenset(
    {
        "attention_backend",
        "attn_implementation",
        "dtype",
        "trim_padding",
        "trim_multiple",
        "pretrain_steps",
        "max_length",
    }
)
MODEL_SECTIONS = ("model", "text", "extra_text", "vae", "pooled_text")


def config_differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """Each setting whose value differs between two configs, as (dotted key, old, new) sorted by key: list
    items by position (extra_text.0.model_id), a key one of them lacks as None. An LLM section's family and
    arch are left out where both configs name its model_id (with_stand_ins_of)."""
    a, b = (flatten(to_dict(c), lists=True) for c in (with_stand_ins_of(old, new), new))
    return [(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def check_same_model(
    ckpt: Path, cfg: Config, saved: Config | None = None, unchanged: tuple[str, ...] = ()
) -> list[str]:
    """Resuming keeps a run's model: a changed design, LLM, VAE or pooled-text encoder is refused, naming
    the first differing key, rather than trained on under the old run's name (a change that leaves every
    weight shape alone, such as another LLM of the same shape, would otherwise go unnoticed).

    Returns what ``cfg`` changes all the same, as "key: old -> new": the settings a resumed run may change
    (data, schedule, sampling, the kernels, a moved model folder), which may be meant but should not be
    silent. train.steps, the run's length, is left out (a resume says when it moves the learning rate:
    loop._warn_schedule_change), and the keys ``unchanged`` names (a resume's own decision). ``saved``:
    the checkpoint's config, when the caller has it already."""
    saved = saved if saved is not None else load_checkpoint_config(ckpt)
    changed = []
    for key, old, new in config_differences(saved, cfg):
        if key in ("train.steps", *unchanged):
            continue
        section, name = key.split(".", 1)[0], key.rsplit(".", 1)[-1]
        moved = name in ("model_id", "tokenizer") and _moved(old, new)
        allowed = section not in MODEL_SECTIONS or name in RESUMABLE_CHANGES or moved
        change = identity_change(ckpt, cfg, key) if moved else None
        if change:
            raise ConfigError(
                f"{key}={new!r} holds another model than checkpoint {str(ckpt)!r} was trained with "
                f"({change}; allowed: the moved folder itself)"
            )
        if not allowed:
            raise ConfigError(
                f"checkpoint {str(ckpt)!r} was trained with {key}={old!r}, this config has "
                f"{new!r}: a resumed run keeps its model (train a new one into another --out, "
                "or start one from these weights with train.init_from)"
            )
        changed.append(f"{key}: {old!r} -> {new!r}")
    _check_same_parts(ckpt, saved, cfg)
    if gone := gone_model_paths(cfg):
        # Named here, before the model builds, with the way out: the loader would only say "path to nothing".
        one = len(gone) == 1
        overrides = " ".join(f"{key}=NEW_PLACE" for key in gone)
        raise ConfigError(
            f"{paths_to_nothing(gone)} (if the {'folder' if one else 'folders'} moved, resume with the "
            f"{'override' if one else 'overrides'} {overrides}; allowed: "
            f"{'a folder holding the model' if one else 'folders holding the models'} checkpoint "
            f"{str(ckpt)!r} was trained with)"
        )
    return changed


# The settings that decide what a stage trains and through which adapters (adapters.Parts), in the order
# a resume that changes them names them.
PARTS_KEYS = (
    "trainable",
    "llm_top_layers",
    "dit_lora.rank",
    "dit_lora.targets",
    "dit_lora.alpha",
    "llm_lora.rank",
    "llm_lora.targets",
    "llm_lora.alpha",
)


def _check_same_parts(ckpt: Path, saved: Config, cfg: Config) -> None:
    """A resumed stage trains the parts its checkpoint saved, through the same LoRA adapters (adapters.Parts
    of train.trainable, llm_top_layers and the *_lora settings): other parts, ranks, targets or top layers
    do not fit the saved weights and optimizer state (refused by the load in peft's parameter names), and
    another alpha rescales the trained adapters' output at once by new/old. Refused in config words before
    the resume lists the changes it accepts; a later stage may change them."""
    stage = checkpoint_stage(ckpt, saved)
    stages = resolved_stages(cfg)
    if stage.index >= len(stages):  # refused with the stages' ranges when the run loads its stage
        return
    old, new = stage.config.train, stages[stage.index].config.train
    if Parts.of(old) == Parts.of(new):
        return
    # The first key that alone changes the parts (an alpha equal to the rank is no change: alpha None).
    key = next(
        (k for k in PARTS_KEYS if Parts.of(_with_train(old, k, _train_value(new, k))) != Parts.of(old)),
        next(k for k in PARTS_KEYS if _train_value(old, k) != _train_value(new, k)),
    )
    where = f" in stage {stage.index} ({stage.name})" if cfg.stages else ""
    raise ConfigError(
        f"checkpoint {str(ckpt)!r} was trained with train.{key}={_train_value(old, key)!r}{where}, this config "
        f"has {_train_value(new, key)!r}: a resumed run trains the same parts through the same LoRA adapters "
        f"(allowed: {_train_value(old, key)!r}; change it in a later stage, or start a new --out from these "
        "weights with train.init_from)"
    )


def _train_value(tc, key: str) -> Any:
    """A PARTS_KEYS setting of a train section ("dit_lora.rank": tc.dit_lora.rank)."""
    part, _, name = key.rpartition(".")
    return getattr(getattr(tc, part) if part else tc, name)


def _with_train(tc, key: str, value: Any):
    """A train section with the PARTS_KEYS setting ``key`` set to ``value``."""
    part, _, name = key.rpartition(".")
    if not part:
        return replace(tc, **{name: value})
    return replace(tc, **{part: replace(getattr(tc, part), **{name: value})})


def _moved(old: Any, new: Any) -> bool:
    """Whether a model path of a checkpoint's config and one of a resuming config name the same folder:
    spelled otherwise (configs saved before paths were normalised), or moved (the old path gone, the new
    one a folder). Weights that do not fit are still refused when they load."""
    if not (isinstance(old, str) and isinstance(new, str) and os.path.isabs(old)):
        return False
    return os.path.normpath(old) == os.path.normpath(new) or (not os.path.exists(old) and os.path.isdir(new))


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
        # DCP writes no "state" for an optimizer saved before its first step (nothing to flatten).
        "state": {index[name]: s for name, s in state.get("state", {}).items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def load_training_state(
    ckpt: Path,
    denoiser: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    ema,
    text: dict[str, torch.nn.Module],
    *,
    distributed: bool,
) -> dict:
    """Load weights and adapters, optimizers (by module: "denoiser", "llm", ...), the EMA and the saved LLMs
    of ``text`` from either checkpoint format into this run's modules, built as the checkpoint's stage built
    them, whatever the world size and parallelism of the run that wrote it. Every rank calls this. Returns
    the checkpoint's state.json.

    A checkpoint of another architecture (a changed width, depth or LLM) is a one-line ConfigError naming
    the first weight that does not fit, before anything is loaded."""
    expected = {}
    for key, module in {DENOISER: denoiser, **text}.items():
        expected[key] = base_state_dict(module)
        expected[f"{key}_lora"] = adapter_state_dict(module)
    expected["ema"] = ema.state_dict()
    if not is_distributed_checkpoint(ckpt):
        check_weight_files(ckpt)  # a missing file would leave its module as built, not fail below
    problem = weights_mismatch(ckpt, expected)
    if problem:
        raise ConfigError(
            f"checkpoint {str(ckpt)!r} does not fit the configured model: {problem}; resume with the "
            f"config it was trained with ({ckpt / 'config.yaml'}) or train into a new --out"
        )
    if is_distributed_checkpoint(ckpt):
        _load_dcp_training(ckpt, denoiser, optimizers, ema, text, distributed)
    elif distributed:
        _load_files_distributed(ckpt, denoiser, optimizers, ema, text)
    else:
        for key, module in {DENOISER: denoiser, **text}.items():
            plain, adapters = load_tensors(ckpt, key), load_tensors(ckpt, f"{key}_lora")
            if plain is not None or adapters is not None:
                load_plain_and_adapters(module, plain, adapters)
        ema.load_state_dict(load_tensors(ckpt, "ema"))
        for key, opt in optimizers.items():
            opt.load_state_dict(_load_optimizer(ckpt, key))
    return load_state(ckpt)


def _load_optimizer(ckpt: Path, key: str) -> dict:
    """A saved optimizer state (plain format), on the CPU first: a GPU run's Adam moments load on a machine
    without one, and load_state_dict moves them to each parameter's device. A damaged file (cut short,
    overwritten) is named in one line, not torch's bare "failed finding central directory"."""
    path = ckpt / optimizer_file(key)
    with readable(path, "a readable optimizer state", (RuntimeError, EOFError, pickle.UnpicklingError)):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_dcp_training(ckpt, denoiser, optimizers, ema, text, distributed: bool) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    # The destination's own (possibly sharded) state dicts: DCP fills them in place, reading from each
    # saved shard the pieces this rank holds. A section the checkpoint lacks (a hub LLM saved as adapters
    # only) keeps the module's current values.
    modules = {DENOISER: denoiser, **text}
    state, sections, fresh = {"ema": ema.state_dict()}, {}, {}
    keys, present = dcp_keys(ckpt), dcp_sections(ckpt)
    for key, module in modules.items():
        module_state, optim_state = _module_and_optim_state(module, optimizers.get(key))
        sections[key] = split_sections(key, module_state)
        state.update({n: d for n, d in sections[key].items() if key == DENOISER or n in present})
        if optim_state is not None:
            # Only the states the checkpoint holds: DCP fails on a key it lacks, and a parameter without
            # a gradient before the save has none. The fresh optimizer's fill the gaps while loading.
            section = optim_section(key)
            saved = _names_with_state(keys, section)
            fresh[key] = optim_state["state"]
            kept = {name: s for name, s in optim_state["state"].items() if name in saved}
            state[section] = {**optim_state, "state": kept}
    dcp_load(state, ckpt, no_dist=not distributed)
    for key, module in modules.items():
        section = dcp_section(key)
        if not any(name in state for name in sections[key]):
            continue
        joined = structured_state(module, sections[key][section], sections[key].get(f"{section}_lora", {}))
        set_model_state_dict(module, joined)
        if key in optimizers:
            named = state[optim_section(key)]
            _set_optimizer_state(module, optimizers[key], named, lambda key=key: fresh[key])
    ema.load_state_dict(state["ema"])


def _load_files_distributed(ckpt, denoiser, optimizers, ema, text) -> None:
    """A single-process checkpoint into a distributed run: every rank reads the full tensors and keeps its
    share (FSDP2 slices them; DDP replicas load them whole)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    for key, module in {DENOISER: denoiser, **text}.items():
        plain, adapters = load_tensors(ckpt, key), load_tensors(ckpt, f"{key}_lora")
        if plain is None and adapters is None:
            continue
        plain = base_state_dict(module) if plain is None else plain
        set_model_state_dict(module, structured_state(module, plain, adapters or {}), options=full)
        if key in optimizers:
            saved = _load_optimizer(ckpt, key)
            named = optimizer_by_name(saved, trainable_names(module))
            opt = optimizers[key]

            def whole_states(module=module, opt=opt) -> dict:  # gathered only when some are missing
                return get_optimizer_state_dict(module, opt, options=full)["state"]

            _set_optimizer_state(module, opt, named, whole_states, options=full)
    ema.load_state_dict(load_tensors(ckpt, "ema"))


def consolidate_checkpoint(src: str | Path, out: str | Path) -> Path:
    """Write a DCP checkpoint (a run folder or checkpoint folder) as a single-process checkpoint folder
    ``out`` (safetensors, optimizer.pt with numbered parameters, config, state, each rank's data position),
    e.g. to publish weights or to read them without torch.distributed. No model is built."""
    ckpt = find_checkpoint(src)
    if not is_distributed_checkpoint(ckpt):
        raise ConfigError(
            f"{str(ckpt)!r} is not a distributed (DCP) checkpoint: it is in the plain format already"
        )
    out = Path(out)
    run_checkpoints = ckpt.parent.name == "checkpoints" and (ckpt.parent / "latest").is_file()
    if run_checkpoints and out.resolve().is_relative_to(ckpt.parent.resolve()):
        # Beside the step folders it would go with them: pruning, or `fusedit train --overwrite`.
        raise ConfigError(
            f"the output folder {str(out)!r} is inside the run's checkpoints folder {str(ckpt.parent)!r}, "
            "whose content the run prunes and --overwrite deletes (allowed: a folder outside it)"
        )
    # ``out`` is replaced whole at the end: anything but an earlier consolidation or an empty folder (the
    # run folder itself, a folder of other files) would be deleted.
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not _written_by_consolidate(out):
        raise ConfigError(
            f"the output folder {str(out)!r} already exists and is not a checkpoint that consolidate wrote, "
            "so replacing it would delete it (allowed: a new or empty folder, or an earlier consolidation's)"
        )
    # A kill while an earlier consolidation is deleted leaves no torn ``out`` (files.replacing).
    with replacing(out) as tmp:
        _consolidate_into(tmp, ckpt)
    return out


def _consolidate_into(tmp: Path, ckpt: Path) -> None:
    """consolidate_checkpoint's files, of the DCP checkpoint ``ckpt``, written into the empty ``tmp``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        whole = Path(scratch) / "whole.pt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
            dcp_to_torch_save(ckpt / DCP_DIR, whole)
        state = torch.load(whole, map_location="cpu", weights_only=True)
    for section, content in state.items():
        key = optim_key(section)
        if key is not None:
            torch.save(optimizer_by_index(content), tmp / optimizer_file(key))
        else:
            save_file(_contiguous(content), tmp / f"{file_stem(section)}.safetensors")
    # Every rank's data position: state.json keeps the run's world size, so a resume of the consolidated
    # checkpoint on as many processes continues each rank's stream where it was (rank 0 alone would send
    # the others back to their shard's start).
    ranks = sorted(p.name for p in ckpt.glob("data_state.rank*.json"))
    for name in ("config.yaml", MODELS_FILE, VOCABULARY_FILE, "data_state.json", *ranks):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, tmp / name)
    meta = load_state(ckpt)
    meta.pop("format", None)
    # Absolute: a path relative to where consolidate ran would name nothing from anywhere else.
    meta = {**meta, "consolidated_from": os.path.abspath(ckpt), WEIGHT_FILES: weight_files(tmp)}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    readable_by_all(tmp)


def _written_by_consolidate(folder: Path) -> bool:
    state = folder / "state.json"
    return state.is_file() and "consolidated_from" in load_state(folder)
