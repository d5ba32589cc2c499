"""Reading checkpoints: finding a run's latest checkpoint, its state and config, its weights in either
format (plain safetensors files or a Distributed Checkpoint), and loading a trained model for sampling,
export and evaluation (:func:`load_model`). The names of the format's files and DCP sections are defined
here, for the writer (fusedit.train.checkpoint, which also describes the format) and the readers alike.

It sits outside ``fusedit.train`` so that sampling, export, evaluation and the diffusers pipeline read
checkpoints without importing the training package: the adapters of the stage that wrote a checkpoint are
rebuilt through fusedit.adapters, at the model tier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from fusedit import files
from fusedit.adapters import (
    Parts,
    add_stage_adapters,
    is_adapter_key,
    load_plain_and_adapters,
    merge_adapters,
    plain_key,
    text_modules,
    trained_modules,
)
from fusedit.config import (
    Config,
    ConfigError,
    Stage,
    identity_difference,
    is_whole,
    load_config,
    model_identity,
    model_paths,
    resolved_stages,
)
from fusedit.config import relocate as relocate_paths

DCP_DIR = "dcp"
DENOISER = (
    "denoiser"  # the denoiser's file stem; its DCP sections keep their historical names "model", "optim"
)


def optimizer_file(key: str) -> str:
    return "optimizer.pt" if key == DENOISER else f"optimizer_{key}.pt"


def dcp_section(key: str) -> str:
    return "model" if key == DENOISER else key


def optim_section(key: str) -> str:
    return "optim" if key == DENOISER else f"optim_{key}"


def optim_key(section: str) -> str | None:
    """The module key of a DCP optimizer section (the inverse of optim_section), None for weights."""
    if section == "optim":
        return DENOISER
    return section[len("optim_") :] if section.startswith("optim_") else None


def file_stem(section: str) -> str:
    """A DCP section's plain-format file stem: "model" (the denoiser) -> "denoiser", "model_lora" ->
    "denoiser_lora"; the others keep their names."""
    return DENOISER + section[len("model") :] if section.startswith("model") else section


# state.json's list of the weight files a plain checkpoint was written with: a copy that lost one (cut
# short, or pruned by hand) is refused by name when it loads, rather than sampled with random weights.
WEIGHT_FILES = "weight_files"


def weight_files(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.glob("*.safetensors"))


def check_weight_files(ckpt: Path) -> None:
    """Every weight file state.json lists is there (checkpoints written before the list: the denoiser's,
    which every plain checkpoint has): a missing one is refused by name, not left at its random init."""
    listed = load_state(ckpt).get(WEIGHT_FILES, [f"{DENOISER}.safetensors"])
    missing = [name for name in listed if not (ckpt / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {str(ckpt)!r} lacks {missing[0]}, which it was saved with (a partial copy? copy "
            "the whole checkpoint folder again)"
        )


MODELS_FILE = "models.json"
# The built-in word tokenizer's vocabulary (a JSON list; token id = 4 specials + position): saved so that a
# checkpoint keeps its ids when the shapes world's words change. Absent when every tokenizer is a saved one.
VOCABULARY_FILE = "vocabulary.json"
# The file a training job holds locked in its run folder (train.run_folder): a run with it and no checkpoint
# yet is one before its first save, to sampling and eval too.
LOCK_FILE = "train.lock"


def saved_vocabulary(ckpt: Path) -> list[str] | None:
    """The built-in tokenizer's word list ``ckpt`` was trained with, or None (a hub or local tokenizer, or a
    checkpoint written before the list was saved: the words of the current code then)."""
    path = ckpt / VOCABULARY_FILE
    if not path.is_file():
        return None
    words = files.read_json(path, COPY_AGAIN)
    if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        raise ConfigError(f"{str(path)!r} is not a JSON list of words ({COPY_AGAIN})")
    return words


def identity_change(ckpt: Path, cfg: Config, key: str) -> str | None:
    """How the model folder ``cfg`` names at ``key`` differs from the one ``ckpt``'s run read there
    (models.json): "field=new there, old in the run", or None when it does not, or when either side is not
    known (a checkpoint written before the record, a hub id)."""
    try:
        old = json.loads((ckpt / MODELS_FILE).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    place = model_paths(cfg).get(key)
    new = model_identity(place, cfg.vae.subfolder if key == "vae.model_id" else "") if old and place else None
    if new is None:
        return None
    field = identity_difference(old, new)
    return f"{field}={new[field]!r} there, {old[field]!r} in the run" if field else None


def _check_relocated(ckpt: Path, cfg: Config, relocate: dict[str, str]) -> None:
    """Each relocated model folder holds the model the checkpoint's run read there."""
    for key in relocate:
        change = identity_change(ckpt, cfg, key)
        if change:
            raise ConfigError(
                f"--relocate {key}={relocate[key]}: that folder holds another model than the run trained with "
                f"({change}; allowed: the moved folder itself)"
            )


def checkpoint_folders(root: Path) -> list[Path]:
    """The ``step_<n>`` folders of a checkpoints folder, oldest first. Ordered by the step number: the
    names are zero-padded to 8 digits only, so past step 99,999,999 they no longer sort by step."""
    steps = {}
    for folder in root.glob("step_*"):
        digits = folder.name[len("step_") :]
        if folder.is_dir() and digits.isascii() and digits.isdigit():
            steps[folder] = int(digits)
    return sorted(steps, key=steps.__getitem__)


def split_sections(key: str, state: dict) -> dict[str, dict]:
    """A module's (structured) state dict -> its DCP sections: plain weights, and adapters when it has any."""
    plain = {plain_key(k): v for k, v in state.items() if not is_adapter_key(k)}
    adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
    section = dcp_section(key)
    return {section: plain, **({f"{section}_lora": adapters} if adapters else {})}


def is_distributed_checkpoint(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_DIR / ".metadata").is_file()


def dcp_keys(ckpt: Path) -> set[str]:
    return set(dcp_metadata(ckpt).state_dict_metadata)


def dcp_metadata(ckpt: Path):
    """A DCP checkpoint's metadata; a damaged .metadata named in one line, not pickle's bare "truncated"."""
    from torch.distributed.checkpoint import FileSystemReader

    damaged = (pickle.UnpicklingError, EOFError, ValueError, AttributeError)
    with readable(ckpt / DCP_DIR / ".metadata", "a readable DCP metadata file", damaged):
        return FileSystemReader(str(ckpt / DCP_DIR)).read_metadata()


def dcp_sections(ckpt: Path) -> set[str]:
    """The sections ("model", "ema", "llm_lora", ...) a DCP checkpoint holds, from one metadata read: its
    keys are "section.name", and no section name has a dot."""
    return {key.partition(".")[0] for key in dcp_keys(ckpt)}


def dcp_load(state: dict, ckpt: Path, no_dist: bool) -> None:
    """dcp.load in place; ``no_dist``: in this process alone (DCP warns each time; here it is meant)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
            dcp.load(state, checkpoint_id=ckpt / DCP_DIR, no_dist=no_dist)
    except CheckpointException as e:
        # DCP gathers every failing rank's (exception, frames): the first one says what is damaged.
        failure = next(iter(e.failures.values()))[0]
        with readable(ckpt / DCP_DIR, "a readable DCP checkpoint", (type(failure),)):
            raise failure from None


def finished_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints (state.json is written last) in a run's checkpoints folder, oldest first."""
    return [p for p in checkpoint_folders(root) if (p / "state.json").is_file()]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest one of a run folder; a clear error when there is none."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    root = path / "checkpoints"
    latest = root / "latest"
    if latest.is_file() and (root / latest.read_text().strip() / "state.json").is_file():
        return root / latest.read_text().strip()
    done = finished_checkpoints(root)
    if not done:
        raise FileNotFoundError(
            f"no checkpoint in {str(path)!r} (expected a run folder or a checkpoint folder)"
        )
    return done[-1]


def load_state(ckpt: Path) -> dict:
    """state.json; a damaged one named in one line, not json's bare "Expecting value" traceback, nor
    a KeyError/TypeError of its callers, who read its "step"."""
    path = ckpt / "state.json"
    state = files.read_json(path, COPY_AGAIN)
    if not (isinstance(state, dict) and is_whole(state.get("step")) and state["step"] >= 0):
        raise ConfigError(
            f'{str(path)!r} is not a checkpoint\'s state (allowed: a JSON object with a whole "step" >= 0; '
            f"{COPY_AGAIN})"
        )
    return state


def run_of(where: Path) -> Path | None:
    """The run folder of the checkpoint folder ``where`` (RUN/checkpoints/step_N); None for a pipeline
    folder or a checkpoint outside a run."""
    run = where.parent.parent
    return run if where.parent.name == "checkpoints" and (where / "state.json").is_file() else None


def redone_steps(run_dir: Path, ckpt: Path) -> str:
    """The steps a stopped run trained past its last checkpoint ``ckpt`` (to the last one metrics.jsonl
    logged), which a resume trains again, as a note: " (steps 101-169 are redone)"; "" when none. What
    stopping between checkpoints costs, for choosing train.checkpoint_every."""
    saved = int(load_state(ckpt)["step"])
    logged = last_logged_step(run_dir / "metrics.jsonl")
    if logged is None or logged <= saved:
        return ""
    return (
        f" (step {logged} is redone)" if logged == saved + 1 else f" (steps {saved + 1}-{logged} are redone)"
    )


def last_logged_step(path: Path, tail: int = 4096) -> int | None:
    """The step of the last whole line of a metrics.jsonl (None: no file, or no line yet), read from its
    last ``tail`` bytes: a long run's file is large."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or the tail's cut first line
            continue
    return None


def load_checkpoint_config(ckpt: Path) -> Config:
    """The config a checkpoint folder was saved with (as a model folder: config._saved_mapping)."""
    return load_config(Path(ckpt))


def load_tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor] | None:
    f = ckpt / f"{name}.safetensors"
    if not f.is_file():
        return None
    with readable(f):
        return load_file(f)


COPY_AGAIN = "a damaged copy? copy the checkpoint again"


def readable(
    path: Path, what: str = "a readable safetensors file", damaged: tuple[type, ...] = (SafetensorError,)
):
    """``files.readable`` for a checkpoint's files (safetensors by default; pickle's "truncated", torch's
    "failed finding central directory" for the optimizer state), whose remedy is a fresh copy."""
    return files.readable(path, what, damaged, COPY_AGAIN)


def saved_shapes(ckpt: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shape of every saved weight by file stem ("denoiser", "denoiser_lora", "ema", "llm", ...), in
    either format, from the safetensors headers or the DCP metadata: no tensor is read."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    if is_distributed_checkpoint(ckpt):
        metadata = dcp_metadata(ckpt).state_dict_metadata
        for key, meta in metadata.items():
            section, _, name = key.partition(".")
            # Optimizer states are keyed by parameter too, but their shapes are not the weights'.
            if optim_key(section) is not None or not hasattr(meta, "size"):
                continue
            out.setdefault(file_stem(section), {})[name] = tuple(meta.size)
        return out
    for f in ckpt.glob("*.safetensors"):
        with readable(f), safe_open(f, framework="pt") as tensors:
            names = tensors.keys()  # a safe_open handle is not iterable itself
            out[f.stem] = {k: tuple(tensors.get_slice(k).get_shape()) for k in names}
    return out


def weights_mismatch(ckpt: Path, expected: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The first way the weights saved in ``ckpt`` do not fit ``expected`` (file stem -> the state the
    module will load, as :func:`saved_shapes` names them), or None when they fit. A plain section the
    checkpoint lacks is not compared (a hub LLM's weights are not saved); adapters the module has must be
    saved, since a checkpoint saves the adapters of every module that has them."""
    return shapes_mismatch(saved_shapes(ckpt), expected)


def shapes_mismatch(
    saved: dict[str, dict[str, tuple[int, ...]]],
    expected: dict[str, dict[str, torch.Tensor]],
    where: str = "the checkpoint",
) -> str | None:
    """:func:`weights_mismatch` over the shapes of saved weights by file stem (:func:`saved_shapes`), saved
    in ``where``."""
    for stem, state in expected.items():
        have = saved.get(stem)
        if have is None:
            if stem.endswith("_lora") and state:
                return f"adapter {next(iter(state))!r} of the configured model is not in {where}"
            continue
        for name, tensor in state.items():
            if name not in have:
                return f"{stem} weight {name!r} of the configured model is not in {where}"
            if have[name] != tuple(tensor.shape):
                return (
                    f"{stem} weight {name!r} has shape {list(have[name])} in {where} but "
                    f"{list(tensor.shape)} in the configured model"
                )
        extra = [name for name in have if name not in state]
        if extra:
            return f"{stem} weight {extra[0]!r} of {where} has no place in the configured model"
    return None


def checkpoint_stage(ckpt: Path, cfg: Config | None = None) -> Stage:
    """The stage that wrote ``ckpt`` (its state.json), resolved from ``cfg`` (default: the checkpoint's own
    config)."""
    state = load_state(ckpt)
    cfg = cfg if cfg is not None else load_checkpoint_config(ckpt)
    return stage_of_checkpoint(resolved_stages(cfg), int(state["step"]), state.get("stage"))


def stage_of_checkpoint(
    stages: list[Stage], step: int, recorded: int | None, saved: list[Stage] | None = None
) -> Stage:
    """The stage a checkpoint written after ``step`` steps belongs to: the one it recorded (checked against
    this config's step ranges), or for a checkpoint without a record, the stage whose range holds it.
    ``saved`` (the stages of the checkpoint's own config) also refuses a config that moves the start of
    that stage: the data position the checkpoint saved counts the steps since the stage began."""
    if recorded is None:
        recorded = next((s.index for s in saved or stages if s.start < step <= s.end), 0)
    if saved and 0 <= recorded < min(len(saved), len(stages)):
        was, now = saved[recorded].start, stages[recorded].start
        if was != now:
            # Only the earlier stages' lengths place the start: name the first one that changed.
            moved = next(i for i in range(recorded) if saved[i].steps != stages[i].steps)
            raise ConfigError(
                f"stages.{moved}.steps={stages[moved].steps} moves the start of stage {recorded} "
                f"{stages[recorded].name!r}, where the checkpoint at step {step} was written, from step {was} "
                f"to {now} (allowed: stages.{moved}.steps={saved[moved].steps} as the run was trained: only "
                "the current and later stages' steps may change)"
            )
    if not 0 <= recorded < len(stages) or not stages[recorded].start <= step <= stages[recorded].end:
        ranges = ", ".join(f"{s.index} {s.name!r} {s.start}..{s.end}" for s in stages)
        raise ConfigError(
            f"the checkpoint at step {step} was written in stage {recorded}, which this config's stages do "
            f"not place there (stages: {ranges}): resume with the config the run was started with"
        )
    return stages[recorded]


# Above this share of a run's starting weights, an EMA samples mostly them (noise, from scratch): warned about.
EMA_MOSTLY_START = 0.5


def ema_start_share(cfg: Config, step: int) -> float:
    """The share of the weights a run started from (its random init, or train.init_from's) that its EMA
    still holds after ``step`` steps of ``cfg`` (a checkpoint's saved config and its state.json step): the
    EMA starts as a copy of them, and each update (after every ema_every-th step, at the decay of the stage
    it falls in) keeps ema_decay of it. Early in a run from scratch that is mostly noise, which sample,
    export, serve and eval load by default (sample.use_ema)."""
    kept = 1.0
    for stage in resolved_stages(cfg):
        t, end = stage.config.train, min(stage.end, step)
        if end > stage.start:  # the steps start+1..end done in it, an update after each multiple of ema_every
            kept *= t.ema_decay ** (end // t.ema_every - stage.start // t.ema_every)
    return kept


def ema_start_at(ckpt: Path) -> tuple[int, float] | None:
    """(step, ``ema_start_share`` there) of the checkpoint folder ``ckpt`` under its saved config; None
    without a state.json or at step 0 (a library save of given weights: nothing trained to compare)."""
    step = int(load_state(ckpt)["step"]) if (ckpt / "state.json").is_file() else 0
    return (step, ema_start_share(load_checkpoint_config(ckpt), step)) if step else None


def early_ema(ckpt: Path) -> tuple[int, float, bool, Any] | None:
    """Where the EMA of the checkpoint folder ``ckpt`` still holds more than EMA_MOSTLY_START of the
    weights its run started from: (step, that share, whether those were train.init_from's (else the random
    init), the train settings in force at that step, for the warning's decay and cadence); None otherwise
    (or unknown: ema_start_at)."""
    at = ema_start_at(ckpt)
    if at is None or at[1] <= EMA_MOSTLY_START:
        return None
    saved = load_checkpoint_config(ckpt)
    return at[0], at[1], bool(saved.train.init_from), checkpoint_stage(ckpt, saved).config.train


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    relocate: dict[str, str] | None = None,
):
    """A trained model from a run folder or checkpoint folder, EMA weights by default, LoRA adapters merged,
    in eval mode, on ``device``: a torch device or its name, "auto" for CUDA when available (a bad or
    missing device is a one-line ConfigError, before anything is read). ``relocate`` ({"text.model_id":
    NEW_PLACE, ...}, config.relocate) reads model folders that moved since the run saved their paths from
    their new place; given (even empty), a saved path to nothing is refused before anything loads, naming
    the key to relocate.

    Returns (model, config, checkpoint folder). The config is the one the checkpoint's stage trained under
    (the stage's image size and sampling settings; for a run without stages, the run's config), its
    sample.use_ema saying whether the EMA was loaded.
    """
    from fusedit.system import build_model, resolve_device, seeded

    device = resolve_device(device, "device")
    ckpt = find_checkpoint(path)
    cfg = load_checkpoint_config(ckpt)
    if relocate is not None:
        cfg = relocate_paths(cfg, relocate)
        _check_relocated(ckpt, cfg, relocate)
    stage = checkpoint_stage(ckpt, cfg)
    # The build's random weights, which the checkpoint's replace, are drawn in a fork of torch's global
    # generators: loading a model leaves the caller's as they were.
    with seeded(None, device):
        model = build_model(stage.config, device, vocabulary=saved_vocabulary(ckpt))
    ema = load_weights(model, ckpt, stage, use_ema)
    # sample.use_ema says which weights this model holds (a sample's metadata, an export's record).
    return model.eval(), replace(stage.config, sample=replace(stage.config.sample, use_ema=ema)), ckpt


def holds_ema(ckpt: Path) -> bool:
    """Whether a checkpoint folder (either format) holds EMA weights: a converted run has none."""
    return (
        "ema" in dcp_sections(ckpt)
        if is_distributed_checkpoint(ckpt)
        else (ckpt / "ema.safetensors").is_file()
    )


def load_weights(model, ckpt: Path, stage: Stage, use_ema: bool = True) -> bool:
    """Load a checkpoint written in ``stage`` into a freshly built ``model``: the denoiser's EMA (or raw
    weights and adapters), each saved LLM and its adapters; then merge every adapter, leaving a model
    without adapters whose requires_grad flags are as ``build_model`` sets them. Returns whether the EMA
    was loaded: ``use_ema`` asks for it, and a checkpoint saved without one (``ema=None``) has the raw
    weights only."""
    dcp_format = is_distributed_checkpoint(ckpt)
    ema = use_ema and holds_ema(ckpt)
    parts = Parts.of(stage.config.train)
    # The adapters the checkpoint holds (their values are loaded below; the EMA has them merged already).
    add_stage_adapters(model, None, replace(parts, dit_adapters=None) if ema else parts, seed=0, stage=0)
    if dcp_format:
        _load_dcp_weights(ckpt, model, ema)
    else:
        check_weight_files(ckpt)
        if ema:
            model.denoiser.load_state_dict(load_tensors(ckpt, "ema"))
        else:
            load_plain_and_adapters(
                model.denoiser, load_tensors(ckpt, DENOISER), load_tensors(ckpt, f"{DENOISER}_lora")
            )
        for key, module in text_modules(model).items():
            plain, adapters = load_tensors(ckpt, key), load_tensors(ckpt, f"{key}_lora")
            if plain is not None or adapters is not None:
                load_plain_and_adapters(module, plain, adapters)
    for module in trained_modules(model).values():
        merge_adapters(module)
    model.denoiser.requires_grad_(True)
    for module in text_modules(model).values():
        module.requires_grad_(False)
    return ema


def _load_dcp_weights(ckpt: Path, model, ema: bool) -> None:
    """Full (unsharded) weights from a DCP checkpoint written by any number of ranks, in this process alone
    (no process group needed: DCP reassembles each tensor from the shards that cover it)."""
    den = (
        {"ema": model.denoiser.state_dict()} if ema else split_sections(DENOISER, model.denoiser.state_dict())
    )
    text = {key: split_sections(key, m.state_dict()) for key, m in text_modules(model).items()}
    state = {**den, **{name: d for sections in text.values() for name, d in sections.items()}}
    saved = dcp_sections(ckpt)
    state = {name: d for name, d in state.items() if name in saved}
    dcp_load(state, ckpt, no_dist=True)
    if ema:
        model.denoiser.load_state_dict(den["ema"])
    else:
        load_plain_and_adapters(model.denoiser, den["model"], den.get("model_lora"))
    for key, module in text_modules(model).items():
        if any(name in state for name in text[key]):
            load_plain_and_adapters(module, text[key][key], text[key].get(f"{key}_lora"))


# Bytes read at each end of every tensor (and of every DCP item) for the weights fingerprint.
FINGERPRINT_BYTES = 4096


def weights_fingerprint(folder: Path) -> str:
    """A short hash of the weights under ``folder`` (a checkpoint or pipeline folder): every tensor of its
    safetensors files and every item of a Distributed Checkpoint, by name, shape and the bytes at both
    ends of its data. So a retrained tensor changes it wherever it lies in its file (the first bytes of a
    file hold its first tensors only), while a few KiB per tensor keep it instant for a 19 GB checkpoint.
    It follows the weights, not the path: a moved or copied model keeps it, a later checkpoint or a
    re-export into the same folder changes it."""
    digest = hashlib.sha256()
    # eval/ is not walked: results written into a pipeline folder (thousands of images) hold no weights.
    tops = [p for p in folder.iterdir() if p.name != "eval"]
    files = [
        f
        for p in tops
        for f in (p.rglob("*.safetensors") if p.is_dir() else [p] if p.suffix == ".safetensors" else [])
    ]
    for path in sorted(files):
        digest.update(f"{path.relative_to(folder).as_posix()}\n".encode())
        _safetensors_digest(path, digest)
    if is_distributed_checkpoint(folder):
        _dcp_digest(folder, digest)
    return digest.hexdigest()[:16]


def _ends(handle, start: int, length: int) -> bytes:
    """``FINGERPRINT_BYTES`` at each end of the ``length`` bytes at ``start`` of the open file ``handle``.
    Training moves every row of a trained matrix, so the first bytes follow it; the last ones follow rows
    added at the end (new tokens), and hold a torch.save archive's directory, whose CRC-32 of each record
    follows all of a DCP item's values."""
    n = min(length, FINGERPRINT_BYTES)
    handle.seek(start)
    head = handle.read(n)
    handle.seek(start + length - n)
    return head + handle.read(n)


def _safetensors_digest(path: Path, digest) -> None:
    """Each tensor of the safetensors file ``path`` into ``digest``: name, dtype, shape and its data's
    ends, read from the header and with plain reads (a memory map, as safe_open uses, reads megabytes
    ahead around each slice: the whole file, over all its tensors)."""
    with path.open("rb") as handle, readable(path, damaged=(ValueError, KeyError, TypeError)):
        size = int.from_bytes(handle.read(8), "little")
        if size > path.stat().st_size:
            raise ValueError(f"header of {size} bytes in a file of {path.stat().st_size}")
        header = json.loads(handle.read(size))
        for name in sorted(k for k in header if k != "__metadata__"):
            tensor = header[name]
            begin, end = tensor["data_offsets"]
            digest.update(f"{name}:{tensor['dtype']}:{tensor['shape']}\n".encode())
            digest.update(_ends(handle, 8 + size + begin, end - begin))


def _dcp_digest(folder: Path, digest) -> None:
    """Each item of the Distributed Checkpoint in ``folder`` into ``digest``: its name, chunk, length and
    ends."""
    items = dcp_metadata(folder).storage_data
    with contextlib.ExitStack() as stack:
        # One handle per file: an FSDP checkpoint's items (every parameter, EMA and optimizer moment, by
        # rank) lie in a few files, and an open per item would be tens of thousands on a network filesystem.
        handles: dict[str, Any] = {}
        for index in sorted(items, key=lambda i: (i.fqn, tuple(i.offset or ()), i.index or 0)):
            info = items[index]
            digest.update(f"{index.fqn}:{tuple(index.offset or ())}:{info.length}\n".encode())
            if info.relative_path not in handles:
                handles[info.relative_path] = stack.enter_context(
                    (folder / DCP_DIR / info.relative_path).open("rb")
                )
            digest.update(_ends(handles[info.relative_path], info.offset, info.length))
