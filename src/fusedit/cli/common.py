"""What several subcommands share: the output folder and interruption rules, the config and model-folder
reads, and the sampling flags `fusedit sample`, `serve` and `eval` check alike."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

from fusedit.config import (
    Config,
    ConfigError,
    SampleConfig,
    allowed_sides,
    choices_of,
    load_config,
    pipeline_record,
    saved_config,
    side_fits,
)

# One logger for every subcommand, named for the package (`WARNING fusedit.cli: ...`), not per module.
log = logging.getLogger("fusedit.cli")


def _config(args) -> object:
    return load_config(args.config, args.overrides)


def _out_folder(out: str | Path, flag: str = "--out") -> Path:
    """--out (or ``flag``) as a folder to write into, refused at once when it or a folder above it is a
    file: creating it would fail only after the slow work, with a bare [Errno 17] or [Errno 20]."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is inside the file {str(existing)!r}"
        raise ConfigError(f"{flag} {str(out)!r} {where} (allowed: a folder, new or existing)")
    return out


GO_ON = "rerun the same command to go on"


@contextlib.contextmanager
def _kept_on_interrupt(kept):
    """Ctrl+C inside the block becomes a KeyboardInterrupt whose message (``main`` prints it in one line)
    says what the command kept: ``kept``, a line or a function that works it out when it happens."""
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept() if callable(kept) else kept) from None


def _relocations(args) -> dict[str, str]:
    """--relocate KEY=PLACE (repeatable) -> {KEY: PLACE}; the keys are checked against the saved config
    when it is read (config.relocate)."""
    moves: dict[str, str] = {}
    for item in args.relocate or []:
        key, sep, place = item.partition("=")
        key = key.strip()
        if not sep or not key or not place:
            raise ConfigError(
                f"--relocate {item!r} must look like KEY=NEW_PLACE (e.g. text.model_id=/data/models/gemma-2b)"
            )
        if key in moves:
            raise ConfigError(
                f"--relocate {key} is given twice ({moves[key]!r} and {place!r}; allowed: once)"
            )
        moves[key] = place
    return moves


def _check_sampling_flags(args) -> None:
    """--steps, --guidance, --shift and --size of `fusedit sample` and `fusedit eval`, checked before the
    (possibly slow) model load, so that a typo fails at once: the size against the model's saved config,
    read without its weights."""
    from fusedit.sampling.generation import check_steps_guidance

    check_steps_guidance(args.steps, args.guidance, flags=True)
    read: list[Config | None] = []  # the saved config (a whole config load), read once, when a check needs it

    def saved() -> Config | None:
        if not read:
            read.append(_saved_config(args.model))
        return read[0]

    for flag, name in (("--sampler", "sampler"), ("--schedule", "schedule")):
        value = getattr(args, name, None)
        if value is not None:
            # Read for its plugins: the modules its config lists may register the name (config.plugins).
            # No model there: the load says what the folder lacks, not a list missing the plugins' names
            # (generate still refuses a name nobody registered).
            if saved() is None:
                continue
            allowed = choices_of(SampleConfig, name)
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not allowed (allowed: {', '.join(allowed)})")
    shift = getattr(args, "shift", None)
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"--shift {shift} is not allowed (allowed: a finite number > 0; 1 = no shift)")
    if args.size is None:
        return
    from fusedit.sampling.generation import image_shape, warn_far_past_trained

    if saved() is not None:
        _check_size(args.size, saved())
        warn_far_past_trained(image_shape(args.size), saved(), f"--size {_size_text(args.size)}")
    elif min(image_shape(args.size)) < 1:  # no config to say more: load_sampling_model reports the folder
        raise ConfigError(
            f"--size {_size_text(args.size)} is not allowed (allowed: a positive multiple of the VAE's "
            "downsampling x the patch size)"
        )


def _size_text(size: int | tuple[int, int]) -> str:
    """A size as --size takes it: 512, or WIDTHxHEIGHT for (height, width)."""
    return str(size) if isinstance(size, int) else f"{size[1]}x{size[0]}"


def _check_size(size: int | tuple[int, int], cfg: Config, flag: str = "--size") -> None:
    """Each side must make whole patches of whole latent pixels, and no more of them than a fixed APE table
    covers (config.side_limits)."""
    from fusedit.sampling.generation import image_shape

    if not all(side_fits(s, cfg) for s in image_shape(size)):
        sides = "" if isinstance(size, int) else " for each side"
        raise ConfigError(f"{flag} {_size_text(size)} is not allowed (allowed{sides}: {allowed_sides(cfg)})")


def _saved_model(path: str | Path) -> tuple[Config, Path] | None:
    """The config MODEL samples with and the folder its weights are read from (as
    fusedit.sampling.source.load_sampling_model reads and returns them), without any weights; None where the
    folder holds none, which load_sampling_model then reports."""
    from fusedit.checkpoints import checkpoint_stage, find_checkpoint

    folder = Path(path)
    if (folder / "model_index.json").is_file():
        recorded = pipeline_record(folder)
        return None if recorded is None else (saved_config(recorded, folder), folder)
    try:
        ckpt = find_checkpoint(folder)
    except FileNotFoundError:
        return None
    return checkpoint_stage(ckpt).config, ckpt


def _saved_config(path: str | Path) -> Config | None:
    """The config MODEL samples with, read without any weights (see _saved_model)."""
    saved = _saved_model(path)
    return None if saved is None else saved[0]


def _scoring_line(where: Path, ema: bool, asked: bool, doing: str = "scoring", at: str = "") -> str:
    """The line saying what `fusedit eval` scores (`sample` samples, `serve` serves ``at`` its address,
    `export` exports: ``doing``): the folder its weights are read from, EMA or raw, and whether its run is
    still training (its latest checkpoint then moves on while this one is used). It also logs the warning
    of EMA weights early in their run (_warn_early_ema): each command builds this line once, before its
    work, which is when that warning is due."""
    weights = "EMA weights" if ema else f"raw weights: {where.name} holds no EMA" if asked else "raw weights"
    from fusedit.checkpoints import LOCK_FILE, run_of
    from fusedit.files import lock_held

    run = run_of(where)
    held = run is not None and lock_held(run / LOCK_FILE)
    training = "; the run is still training (train.lock held)" if held else ""
    if ema:
        _warn_early_ema(where)
    return f"{doing} {where} ({weights}){at}{training}"


def _warn_early_ema(where: Path) -> None:
    """Early in a run, the EMA still holds mostly the weights the run started from (noise for a run from
    scratch): what is sampled, scored or exported then reads as the model's, so over half of it is said.
    The training's own warning judges the run's end step only. A pipeline folder is judged by what
    export_run recorded (none for one exported before that record, or not by export_run); a checkpoint at
    step 0, which training never writes (a library save of given weights), has no trained raw weights."""
    from fusedit.checkpoints import EMA_MOSTLY_START, early_ema

    if (where / "model_index.json").is_file():
        from fusedit.pipeline import export_source

        record = export_source(where) or {}
        kept = record.get("ema_holds_start")
        if isinstance(kept, (int, float)) and kept > EMA_MOSTLY_START:
            log.warning(
                "the EMA weights of this export (step %s of %s) still hold %.0f%% of the weights its run "
                "started from: export a later checkpoint, or this one with --no-ema",
                record.get("step"),
                record.get("checkpoint"),
                100 * kept,
            )
        return
    early = early_ema(where)
    if early is None:
        return
    step, kept, from_init, train = early
    log.warning(
        "the EMA weights at step %d still hold %.0f%% of %s (train.ema_decay=%g every train.ema_every=%d "
        "steps): --no-ema uses the trained weights",
        step,
        100 * kept,
        "train.init_from's weights" if from_init else "the random initial weights",
        train.ema_decay,
        train.ema_every,
    )


def _add_relocate_flag(sp):
    sp.add_argument(
        "--relocate",
        action="append",
        metavar="KEY=PLACE",
        help="read a model folder the run's saved config names from its new place, e.g. "
        "text.model_id=/data/gemma-2b (repeatable; keys: text.model_id, text.tokenizer, "
        "extra_text.N.model_id, pooled_text.model_id, vae.model_id, ...)",
    )


def _add_config_args(sp):
    sp.add_argument("config", help="preset name (see `fusedit presets`), YAML file, or model folder")
    sp.add_argument("overrides", nargs="*", help="section.key=value overrides")
