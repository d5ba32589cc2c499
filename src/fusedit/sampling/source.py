"""Reading a model to sample with: ``load_sampling_model`` takes a run, checkpoint or diffusers pipeline
folder (what `fusedit sample`, `serve` and `eval` take as MODEL) and returns the model in its sampling form
(``fusedit.sampling.generation.to_sampling_form``); ``check_sampling_source`` refuses what it would refuse
about the folder before any weights are read, and ``model_folder`` resolves the folder its weights would be
read from (`fusedit export` resolves its source with it too).

A module of its own: what a folder holds, and why one holds no model (a run without a finished checkpoint
yet, a checkpoint that train.keep_checkpoints deleted, a folder of the public FuseDiT code), is settled here;
``fusedit.sampling.generation`` samples the model it returns.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

# Called through the module, as fusedit.checkpoints.load_model etc., so that a stand-in set on it (a test's
# "the model must not load") is the one called.
from fusedit import checkpoints
from fusedit.config import Config, ConfigError, SampleConfig, load_config, resolved_stages
from fusedit.sampling.generation import refuse_unknown_settings, to_sampling_form, with_sample
from fusedit.system import TextToImage, resolve_device


def _saved_by_public_fusedit(folder: Path) -> bool:
    """Whether ``folder`` is a pipeline or transformer folder of the public FuseDiT code: its pipeline is also
    called FuseDiTPipeline, but its weights and config need `fusedit convert` first."""
    for config in (folder / "transformer" / "config.json", folder / "config.json"):
        try:
            if json.loads(config.read_text()).get("model_type") in ("FuseDiT", "DiT"):
                return True
        except (OSError, ValueError, AttributeError):  # absent, not JSON, or not a JSON object
            continue
    return False


def check_sampling_source(path: str | Path, use_ema: bool = True, relocate: dict | None = None) -> Path:
    """What load_sampling_model refuses about ``path`` before reading any weights (a missing folder, one of
    the public FuseDiT code, a pipeline folder with --no-ema or --relocate): callers that write anything
    before the load (`fusedit eval` records its generation first) check it first. Returns the folder."""
    folder = Path(path)
    if not folder.is_dir():
        if folder.parent.name == "checkpoints" and folder.parent.is_dir() and not folder.exists():
            raise FileNotFoundError(_gone_checkpoint(folder, path))
        # These commands read local folders only; a hub repository is downloaded first (docs/diffusers.md).
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not folder.exists()
        hint = (
            f"; a hub id? download it first: hf download {path} --local-dir DIR, and use DIR" if hub else ""
        )
        raise FileNotFoundError(
            f"no such folder: {str(path)!r} (expected a run, checkpoint or diffusers pipeline folder{hint})"
        )
    if _saved_by_public_fusedit(folder):
        raise ConfigError(
            f"{str(path)!r} was saved by the public FuseDiT code: import it first with `fusedit convert "
            f"{path} --out DIR` and use DIR (see docs/run-released-fusedit.md)"
        )
    if (folder / "model_index.json").is_file():
        if not use_ema:
            raise ConfigError(
                f"--no-ema needs a run or checkpoint folder: the pipeline folder {str(path)!r} holds only "
                "the weights it was exported with"
            )
        if relocate:
            raise ConfigError(
                f"--relocate needs a run or checkpoint folder: the pipeline folder {str(path)!r} holds its "
                "models itself"
            )
    return folder


def load_sampling_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    relocate: dict[str, str] | None = None,
    **sample_overrides: Any,
) -> tuple[TextToImage, Config, Path]:
    """A model to sample with, read from ``path`` (the MODEL of `fusedit sample`, `serve` and `eval`):

    - a run folder (its latest checkpoint; `fusedit convert` writes one) or a checkpoint folder, read with
      ``fusedit.checkpoints.load_model``: its EMA weights unless ``use_ema`` is False, and with
      ``relocate`` ({config key: new place}, e.g. ``{"text.model_id": "/data/models/gemma-2b"}``; the
      command line's --relocate) for the run's model folders that moved;
    - a diffusers pipeline folder (with model_index.json: `fusedit export`,
      ``FuseDiTPipeline.save_pretrained``), read with ``fusedit.pipeline.from_pretrained``; it holds only
      the weights it was exported with and its models itself, so ``use_ema=False`` and ``relocate`` are
      refused.

    ``sample_overrides`` replace keys of the saved config's ``sample`` section (``compile=""`` for off,
    ``cuda_graphs=True``, ...; None keeps the saved value), checked as a config file's values are, before
    the model is turned into its sampling form (``to_sampling_form``). ``device`` is where the model is
    loaded: a torch device or its name, "auto" for CUDA when available (``system.resolve_device``).

    The model returned only samples: its sampling form (no gradients; fused q/k/v and gate/up projections
    under sample.fuse_projections; bf16 matmul weights under sample.bf16_weights with bf16 autocast) cannot
    be trained, and ``save_pretrained`` / ``FuseDiTPipeline`` refuse its fused projections. To fine-tune,
    export or inspect the weights, load the training form with ``fusedit.checkpoints.load_model`` (what
    this reads a run or checkpoint with).

    Returns (the model in eval mode and sampling form, its Config with the overrides, the folder its weights
    were read from: the checkpoint folder, or the pipeline folder). Raises FileNotFoundError for a path that
    is not a folder or holds no model, and ConfigError for a bad device or override, a folder saved by the
    public FuseDiT code (import it with `fusedit convert` first) or a pipeline folder with
    ``use_ema=False`` or ``relocate``; the messages name the command-line flags (--no-ema, --relocate), as
    `fusedit` prints them."""
    # Before the load; the values are checked against the loaded config (with_sample).
    refuse_unknown_settings(sample_overrides, [f.name for f in dataclasses.fields(SampleConfig)])
    device = resolve_device(device, "device")

    def sampling(model, cfg):
        cfg = with_sample(cfg, {k: v for k, v in sample_overrides.items() if v is not None})
        return to_sampling_form(model, cfg), cfg

    folder = model_folder(path, use_ema, relocate)
    if (folder / "model_index.json").is_file():
        from fusedit.pipeline import from_pretrained  # imports diffusers, which only a pipeline folder needs

        return *sampling(*from_pretrained(folder, device)), folder
    model, cfg, ckpt = checkpoints.load_model(folder, device, use_ema=use_ema, relocate=relocate or {})
    return *sampling(model, cfg), ckpt


def model_folder(path: str | Path, use_ema: bool = True, relocate: dict | None = None) -> Path:
    """The folder ``load_sampling_model`` reads ``path``'s weights from: a pipeline folder as it is, or the
    checkpoint folder of a run or checkpoint (a run's latest), refused as check_sampling_source refuses it,
    or with why it holds no model (a run without a finished checkpoint yet, say)."""
    folder = check_sampling_source(path, use_ema, relocate)
    if (folder / "model_index.json").is_file():
        return folder
    try:
        return checkpoints.find_checkpoint(folder)
    except FileNotFoundError:
        raise FileNotFoundError(_no_model(folder, path)) from None


def _finished_checkpoints(folder: Path) -> str:
    """The names of the finished checkpoints in a run's checkpoints folder, oldest first, for messages."""
    names = [p.name for p in checkpoints.finished_checkpoints(folder)]
    return ", ".join(names) if names else "none yet"


def _gone_checkpoint(folder: Path, path: str | Path) -> str:
    """Why the checkpoint folder ``folder`` (``path`` as given) of a run is not there: a run keeps only its
    latest train.keep_checkpoints checkpoints, so an older one named in a note may be gone."""
    run = folder.parent.parent
    return (
        f"no such folder: {str(path)!r} (its run {str(run)!r} holds the checkpoints "
        f"{_finished_checkpoints(folder.parent)}, older ones deleted as train.keep_checkpoints says: give "
        "one of them, or the run folder for its latest)"
    )


def _no_model(folder: Path, path: str | Path) -> str:
    """Why ``folder`` (``path`` as given) holds no model: a run that has not saved its first checkpoint yet
    (its config.yaml or train.lock is there) is named as such, not as a path to the wrong kind of folder,
    and a run's checkpoints folder points to the run and its checkpoints."""
    if folder.name == "checkpoints" and checkpoints.checkpoint_folders(folder):
        return (
            f"no model in {str(path)!r}: it is the checkpoints folder of the run {str(folder.parent)!r} "
            f"(allowed: the run folder, for its latest checkpoint, or one of its checkpoints: "
            f"{_finished_checkpoints(folder)})"
        )
    if not ((folder / "config.yaml").is_file() or (folder / checkpoints.LOCK_FILE).is_file()):
        return (
            f"no model in {str(path)!r} (allowed: a run folder, a checkpoint folder, or a diffusers pipeline "
            "folder with model_index.json)"
        )
    run = f"run {str(path)!r} has no finished checkpoint yet"
    try:
        cfg = load_config(folder)
        first = resolved_stages(cfg)[0]
    except (OSError, ValueError):  # a run whose config.yaml is not written yet (or unreadable)
        return run
    # The training saves at every multiple of train.checkpoint_every and at each stage's and the run's end.
    every = first.config.train.checkpoint_every
    if every <= first.end:
        return f"{run} (the first is saved at step {every}: train.checkpoint_every)"
    end = "its first stage" if cfg.stages else "the run"
    return f"{run} (the first is saved at step {first.end}, the end of {end})"
