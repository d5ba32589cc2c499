"""The `fusedit` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path

from fusedit.config import (
    Config,
    ConfigError,
    RunStopped,
    SampleConfig,
    adds_template_tokens,
    allowed_sides,
    choices_of,
    default_run_folder,
    load_config,
    pipeline_record,
    preset_names,
    save_config,
    saved_config,
    side_fits,
    text_sections,
    to_yaml,
)
from fusedit.files import check_output_folder, replacing

log = logging.getLogger(__name__)

# `fusedit fid` warns below this many images in a folder.
FEW_FOR_FID = 1000
FID_CACHE = ".cache/fusedit-fid"
FEATURES_HELP = (
    "clean-fid's Inception TorchScript inception-2015-12-05.pt (a .pt file, or a folder holding it) for the "
    "standard FID, or a transformers vision model hub id or folder (CLIP, DINOv2, ...)"
)


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


def _train_kept(out: Path, args, started: float) -> str:
    """What an interrupted training run kept: the checkpoint --resume would take, and the command."""
    from fusedit.train.loop import kept_checkpoint

    ckpt, earlier = kept_checkpoint(out, started if args.overwrite else None)
    if earlier:
        return f"the earlier run in {out} was not deleted yet; rerun the same command to start over"
    if ckpt is None:  # the same command is not refused: nothing would be lost
        return f"no checkpoint was saved yet in {out}; rerun the same command to start again"
    go_on = "rerun the same command" + (" with --resume in place of --overwrite" if args.overwrite else "")
    go_on += "" if args.resume or args.overwrite else " with --resume"
    return f"the last checkpoint is {ckpt}; {go_on} to continue from it"


def cmd_train(args) -> int:
    from fusedit.train.loop import RunExists, train

    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at {args.stop_at} is not allowed (allowed: a step number, 1 or more)")
    folders: list[Path] = []  # the model folders the config came from
    cfg = load_config(args.config, args.overrides, folders=folders)
    if args.stop_at is not None and args.stop_at > cfg.train.steps:
        log.warning(
            "--stop-at %d is beyond train.steps=%d: the run ends at step %d first",
            args.stop_at,
            cfg.train.steps,
            cfg.train.steps,
        )
    out = _out_folder(args.out or default_run_folder(cfg.name))
    if not args.resume:
        _warn_weights_not_taken(folders, cfg.train.init_from)
    started = time.time()
    try:
        with _kept_on_interrupt(lambda: _train_kept(out, args, started)):
            result = train(
                cfg,
                out,
                resume=args.resume,
                overwrite=args.overwrite,
                stop_at=args.stop_at,
                progress=not args.quiet,
            )
    except RunExists as e:  # a forgotten --resume would lose the run: train() refuses, worded for the flags
        advice = "pass --resume to continue it, --overwrite to delete it and start over, or another --out"
        raise RunExists(e.run_dir, e.step, advice) from None
    except RunStopped as e:  # what is kept, and the command that goes on, for the flags given
        raise RunStopped(e.reason, _train_kept(out, args, started)) from e
    if result.get("rank", 0) != 0:
        return 0
    step, where = result["step"], f"checkpoints in {out / 'checkpoints'}"
    if step > result["start_step"]:
        print(f"trained to step {step}; {where}")
    elif step >= cfg.train.steps:
        print(
            f"nothing to train: the run already finished (step {step} of train.steps={cfg.train.steps}); {where}"
        )
    else:
        print(
            f"nothing to train: the run is already at step {step}, at or past --stop-at {args.stop_at}; {where}"
        )
    return 0


def _warn_weights_not_taken(folders: list[Path], init_from: str) -> None:
    """A fresh run whose config (or its ``base:``), one of ``folders``, is a model folder takes its config, not its
    weights: a user expecting a fine-tune would train from scratch, or from the folder's own
    train.init_from, which its saved config carries along. Not in load_config: `--resume` reads a run's
    saved config the same way."""
    from fusedit.train.checkpoint import init_source

    if os.environ.get("RANK", "0") != "0":  # said once under torchrun
        return
    for folder in map(Path, map(os.path.normpath, folders)):
        if init_from and _same_start(init_from, folder, init_source):
            continue  # train.init_from names the folder, a checkpoint in it, or the one it holds: its weights load
        now = f"from train.init_from={init_from!r}" if init_from else "from random weights"
        log.warning(
            "%r is a model folder: this run takes its config, not its weights, and trains %s (to start from "
            "its weights: train.init_from=%s)",
            str(folder),
            now,
            folder,
        )


def _same_start(init_from: str, folder: Path, init_source) -> bool:
    """Whether train.init_from loads the weights of ``folder``: it lies in it, or both name one checkpoint
    (a checkpoint folder as the config, its run folder as init_from)."""
    if Path(init_from).resolve().is_relative_to(folder.resolve()):
        return True
    try:
        return init_source(init_from).resolve() == init_source(folder).resolve()
    except ConfigError:  # train() refuses an init_from with nothing to start from
        return False


def cmd_demo(args) -> int:
    from fusedit.demo import check_demo_folder, run_demo

    cfg = load_config("debug", args.overrides)
    out = _out_folder(args.out)
    # Before the demo starts, worded for the flag (run_demo checks the same, worded for its argument).
    check_demo_folder(
        out, args.overwrite, "pass --overwrite to delete it and run the demo again, or another --out"
    )
    t0 = time.time()
    r = run_demo(cfg, out, progress=not args.quiet, overwrite=args.overwrite)
    print(f"demo finished in {time.time() - t0:.0f}s (final loss {r['final_loss']:.4f})")
    print(f"  samples:     {r['samples']}")
    print(f"  loss curve:  {r['loss_curve']}")
    print(f"  checkpoints: {r['checkpoint']}")
    return 0


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        # Not is_file(): a pipe (`--prompts-file <(...)`, /dev/stdin) is read as well.
        if not path.exists():
            raise ConfigError(f"--prompts-file {str(path)!r} does not exist")
        if path.is_dir():
            raise ConfigError(
                f"--prompts-file {str(path)!r} is a folder (allowed: a UTF-8 text file, one prompt per line)"
            )
        # UTF-8 whatever the locale (a prompt file is shared between machines), and "-sig" so that the
        # byte-order mark Windows Notepad writes first does not become part of the first prompt.
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"--prompts-file {str(path)!r} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}; "
                "allowed: a UTF-8 text file, one prompt per line)"
            ) from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"--prompts-file {str(path)!r} holds no prompt (allowed: one prompt per line)")
        prompts += lines
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def _sampling_flags(args) -> dict:
    """fusedit.sample.load_sampling_model's arguments from the flags `fusedit sample` and `fusedit serve`
    share."""
    return {
        "use_ema": not args.no_ema,
        "relocate": _relocations(args),
        "compile": {"off": ""}.get(args.compile, args.compile),
        "cuda_graphs": args.cuda_graphs,
    }


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
    from fusedit.sample import check_steps_guidance

    check_steps_guidance(args.steps, args.guidance, flags=True)
    shift = getattr(args, "shift", None)
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"--shift {shift} is not allowed (allowed: a finite number > 0; 1 = no shift)")
    if args.size is None:
        return
    from fusedit.sample import image_shape, warn_far_past_trained

    saved = _saved_config(args.model)
    if saved is not None:
        _check_size(args.size, saved)
        warn_far_past_trained(image_shape(args.size), saved, f"--size {_size_text(args.size)}")
    elif min(image_shape(args.size)) < 1:  # no config to say more: load_sampling_model reports the folder
        raise ConfigError(
            f"--size {_size_text(args.size)} is not allowed (allowed: a positive multiple of the VAE's "
            "downsampling x the patch size)"
        )


def _image_size(text: str) -> int | tuple[int, int]:
    """--size: one side in pixels (a square), or WIDTHxHEIGHT -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if match is None:  # a side of 0 passes here, to be refused with the allowed multiples (_check_size)
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (allowed: one side in pixels for a square, e.g. 512, or WIDTHxHEIGHT, "
            "e.g. 768x512)"
        )
    width, height = match.groups()
    return int(width) if height is None else (int(height), int(width))


def _size_text(size: int | tuple[int, int]) -> str:
    """A size as --size takes it: 512, or WIDTHxHEIGHT for (height, width)."""
    return str(size) if isinstance(size, int) else f"{size[1]}x{size[0]}"


def _check_size(size: int | tuple[int, int], cfg: Config, flag: str = "--size") -> None:
    """Each side must make whole patches of whole latent pixels, and no more of them than a fixed APE table
    covers (config.side_limits)."""
    from fusedit.sample import image_shape

    if not all(side_fits(s, cfg) for s in image_shape(size)):
        sides = "" if isinstance(size, int) else " for each side"
        raise ConfigError(f"{flag} {_size_text(size)} is not allowed (allowed{sides}: {allowed_sides(cfg)})")


def _saved_model(path: str | Path) -> tuple[Config, Path] | None:
    """The config MODEL samples with and the folder its weights are read from (as
    fusedit.sample.load_sampling_model reads and returns them), without any weights; None where the folder
    holds none, which load_sampling_model then reports."""
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


def cmd_sample(args) -> int:
    from fusedit.sample import (
        check_negative_prompt,
        check_seed,
        load_sampling_model,
        sample_settings,
        write_sample_folder,
    )
    from fusedit.system import resolve_device

    prompts = _read_prompts(args)
    # Checked before the (possibly slow) model load, so a typo fails at once.
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is not allowed (allowed: 1 or more)")
    _check_sampling_flags(args)
    check_seed(args.seed, len(prompts), name="--seed")
    if args.guidance is not None:
        check_negative_prompt(args.negative_prompt, args.guidance, flags=True)
    out = _out_folder(args.out)
    device = resolve_device(args.device, "--device")
    model, cfg, source = load_sampling_model(args.model, device, **_sampling_flags(args))
    print(_scoring_line(source, cfg.sample.use_ema, not args.no_ema, "sampling"), flush=True)
    settings = sample_settings(
        cfg,
        steps=args.steps,
        guidance=args.guidance,
        sampler=args.sampler,
        schedule=args.schedule,
        shift=args.shift,
        image_size=args.size,
        negative_prompt=args.negative_prompt,
        cache_text=False if args.no_cache else None,
    )
    # Checked again against the model as loaded: the early check needs a config readable without it.
    _check_size(settings["image_size"], cfg)
    check_negative_prompt(args.negative_prompt, settings["guidance"], flags=True)  # the saved guidance
    written: list[Path] = []
    with _kept_on_interrupt(lambda: _sample_kept(out, written, len(prompts))):
        images = write_sample_folder(
            model,
            cfg,
            prompts,
            out,
            settings=settings,
            seed=args.seed,
            batch_size=args.batch_size,
            source=source,
            progress=not args.quiet,
            written=written,
        )
    print(f"wrote {len(images)} image{'' if len(images) == 1 else 's'} to {out}")
    return 0


def _sample_kept(out: Path, written: list[Path], total: int) -> str:
    """What an interrupted `fusedit sample` leaves in ``out``: the images it ``written`` (an earlier sample's
    are removed once its first batch is ready), without grid.png, which is made at the end."""
    if not written:
        return f"no image was written to {out} yet; rerun the same command"
    return (
        f"{len(written)} of the {total} images are in {out}, without grid.png (made at the end); rerun the "
        "same command to make them all"
    )


def cmd_serve(args) -> int:
    from fusedit.sample import load_sampling_model
    from fusedit.serve import DemoServer, check_port_free, max_side
    from fusedit.system import resolve_device

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not allowed (allowed: 0..65535; 0 picks a free port)")
    if args.port:  # a port in use should fail now, not after loading the model
        try:
            check_port_free(args.host, args.port)
        except OSError as e:
            raise ConfigError(str(e)) from None
    saved = _saved_config(args.model) if args.max_size is not None else None
    if saved is not None:  # checked against the model's saved config before its weights load
        max_side(saved, args.max_size)
    device = resolve_device(args.device, "--device")
    flags = _sampling_flags(args)
    # Compile off unless asked: each new size, image count or guidance setting of a request would compile.
    flags["compile"] = flags["compile"] or ""
    model, cfg, source = load_sampling_model(args.model, device, **flags)
    server = DemoServer(model, cfg, args.host, args.port, source=str(source), max_size=args.max_size)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone reaching it can run the model", file=sys.stderr)
    at = f" at {server.url} (Ctrl+C stops)"
    print(_scoring_line(source, cfg.sample.use_ema, not args.no_ema, "serving", at), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping: a running generation ends after its current step", file=sys.stderr, flush=True)
    finally:
        # Not sitting out a running generation, but waiting for the worker to leave torch: an interpreter
        # that exits with a thread inside torch aborts ("terminate called without an active exception").
        server.close(wait=True, cancel_running=True)
    return 0


# The `fusedit eval` flags that only some benches read: given with another bench, they would be ignored.
_BENCH_FLAGS = {
    "per_category": ("shapes", "mjhq"),
    "prompts": ("geneval", "dpg", "mjhq", "t2i-compbench"),
    "detector": ("geneval", "t2i-compbench"),
    "clip": ("geneval", "t2i-compbench"),
    "vqa": ("dpg", "t2i-compbench"),
    "size": ("geneval", "dpg", "mjhq", "t2i-compbench"),
    "categories": ("t2i-compbench",),
    "per_prompt": ("t2i-compbench",),
    "limit": ("geneval", "dpg"),
    "noun_phrases": ("t2i-compbench",),
    "reference": ("mjhq",),
    "features": ("mjhq",),
    "cache_dir": ("mjhq",),
}
# The benchmarks with an official layout and prompt data (eval.run); shapes is fusedit's own.
_PROTOCOLS = ("geneval", "dpg", "mjhq", "t2i-compbench")


def cmd_eval(args) -> int:
    from fusedit.eval.shapes_bench import (
        PER_CATEGORY,
        bench_settings,
        markdown_table,
        run_shapes_bench,
        untrained_note,
    )
    from fusedit.sample import check_sampling_source, check_seed, load_sampling_model
    from fusedit.system import resolve_device

    # Checked before the (possibly slow) model load, so a typo fails at once. The parser's default of each
    # of these flags is None, so only the flags given count.
    for name, benches in _BENCH_FLAGS.items():
        if getattr(args, name) is not None and args.bench not in benches:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} does not apply to --bench {args.bench} (allowed with: "
                f"{' or '.join(f'--bench {b}' for b in benches)})"
            )
    if args.bench in _PROTOCOLS and not args.prompts:
        raise ConfigError(
            f"--bench {args.bench} needs --prompts PATH (get a copy with `fusedit benchmarks download {args.bench}`)"
        )
    for flag, value in (
        ("--per-category", args.per_category),
        ("--per-prompt", args.per_prompt),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} is not allowed (allowed: 1 or more)")
    _check_sampling_flags(args)
    if args.seed is not None:
        check_seed(args.seed, name="--seed")
    given_out = _out_folder(args.out) if args.out else None
    if args.cache_dir:  # written after all the sampling: a file there would fail only then
        _out_folder(args.cache_dir, "--cache-dir")
    device = resolve_device(args.device, "--device")
    relocate = _relocations(args)
    check_sampling_source(args.model, not args.no_ema, relocate)

    def load(where):
        log.info("loading %s ...", where)  # a 2B model takes a minute, under a progress bar that waits
        return load_sampling_model(where, device, use_ema=not args.no_ema, relocate=relocate)

    # MODEL is resolved once: the record, the scores and the load all name this folder, however the run's
    # latest checkpoint moves (or rotation deletes the one before) while it is evaluated during training.
    saved, model = _saved_model(args.model), None
    if saved is None:  # no config readable without the weights: the load says what the folder lacks
        model, cfg, where = load(args.model)
        ema = cfg.sample.use_ema
    else:
        cfg, where = saved
        ema = _loads_ema(cfg, where, not args.no_ema)
    out = given_out or _out_folder(_eval_folder(args.model, where, ema) / args.bench)
    scoring = _scoring_line(where, ema, not args.no_ema)

    if args.bench in _PROTOCOLS:
        from fusedit.eval.run import ProtocolGenerator

        # Before the folder's record is compared or written: the load comes only at the first image (the
        # protocol's checks of prompts and kept images come first; scoring again loads no model).
        settings, record = _eval_record(args, cfg, where, ema, device)
        _check_eval_folder(args, out, record, where)  # another generation's images: refused before the load
        extractor = _mjhq_scorer(args, device) if args.bench == "mjhq" else None
        if model is None:
            gen = ProtocolGenerator.lazy(lambda: load(where)[0], settings)
        else:
            gen = ProtocolGenerator(model, settings)
        print(scoring, flush=True)
        with _kept_on_interrupt(lambda: _protocol_kept(args.bench, out, where, args.model)):
            return _eval_protocol(args, gen, record, out, device, extractor)
    print(scoring, flush=True)
    if model is None:
        model, cfg, where = load(where)
    s = cfg.sample
    settings = bench_settings(
        cfg,
        per_category=PER_CATEGORY if args.per_category is None else args.per_category,
        steps=s.steps if args.steps is None else args.steps,
        guidance=s.guidance if args.guidance is None else args.guidance,
        seed=0 if args.seed is None else args.seed,
    )
    # The bench writes its files at the end: an interruption keeps what an earlier bench wrote there.
    earlier = (
        "an earlier bench's scores there are kept" if (out / "scores.json").is_file() else "nothing is kept"
    )
    with _kept_on_interrupt(
        f"{earlier} (the bench writes {out} at its end); rerun the same command to start again"
    ):
        name = _row_name(where, cfg.sample.use_ema)
        scores = run_shapes_bench(
            model,
            out_dir=out,
            name=name,
            progress=not args.quiet,
            source=_eval_source(where, cfg.sample.use_ema),
            trained_kinds=_trained_kinds(where),
            **settings,
        )
    # The table as scores.md has it, its note on untrained categories said once, in the line below.
    print(markdown_table(name, scores, note=False), end="")
    untrained = scores.get("untrained")
    note = f" ({untrained_note(untrained, len(scores['per_category']))})" if untrained else ""
    print(
        f"overall {scores['overall']:.3f} on {scores['num_images']} held-out prompts{note}; details in {out}"
    )
    return 0


def _loads_ema(cfg: Config, where: Path, asked: bool) -> bool:
    """Whether the model read from ``where`` samples with EMA weights, known before its load: a pipeline
    folder holds the weights it was exported with (its recorded sample.use_ema); a checkpoint its EMA when
    ``asked`` and saved (a converted run has none, and its raw weights load: checkpoints.load_weights)."""
    from fusedit.checkpoints import holds_ema

    if (where / "model_index.json").is_file():
        return cfg.sample.use_ema
    return asked and holds_ema(where)


def _run_of(where: Path) -> Path | None:
    """The run folder of the checkpoint folder ``where`` (RUN/checkpoints/step_N); None for a pipeline
    folder or a checkpoint outside a run."""
    run = where.parent.parent
    return run if where.parent.name == "checkpoints" and (where / "state.json").is_file() else None


def _eval_folder(model: str, where: Path, ema: bool) -> Path:
    """The folder `fusedit eval` writes each bench's results under by default: a run's or checkpoint's go to
    RUN/eval/<checkpoint>[-raw], one per checkpoint and weights, so that evals of successive checkpoints and
    of the EMA and raw weights never meet in one folder, and none lies inside a checkpoint folder, which
    train.keep_checkpoints deletes (a checkpoint folder outside a run, never rotated, holds its own
    CKPT/eval/<name>). A pipeline folder holds one model: MODEL/eval."""
    if (where / "model_index.json").is_file():
        return Path(model) / "eval"
    return (_run_of(where) or where) / "eval" / (where.name + ("" if ema else "-raw"))


def _scoring_line(where: Path, ema: bool, asked: bool, doing: str = "scoring", at: str = "") -> str:
    """What `fusedit eval` scores (`sample` samples, `serve` serves ``at`` its address: ``doing``): the
    folder its weights are read from, EMA or raw, and whether its run is still training (its latest
    checkpoint then moves on while this one is used)."""
    weights = "EMA weights" if ema else f"raw weights: {where.name} holds no EMA" if asked else "raw weights"
    run = _run_of(where)
    from fusedit.train.run_folder import held_by_a_job

    training = (
        "; the run is still training (train.lock held)" if run is not None and held_by_a_job(run) else ""
    )
    return f"{doing} {where} ({weights}){at}{training}"


def _row_name(where: Path, ema: bool) -> str:
    """The shapes bench's row name of the model read from ``where``: its run and step (runA@300), " raw"
    for raw weights, so that two runs' or checkpoints' tables are told apart."""
    from fusedit.checkpoints import load_state

    name = (_run_of(where) or where).resolve().name  # `fusedit eval .` names the folder, not ""
    if (where / "state.json").is_file():
        name += f"@{load_state(where)['step']}"
    return name + ("" if ema else " raw")


def _weights_record(where: Path, ema: bool) -> dict:
    """Which weights an eval scores: the checkpoint's name, their fingerprint, EMA or raw."""
    from fusedit.eval.run import weights_fingerprint

    return {"checkpoint": where.name, "weights": weights_fingerprint(where), "ema": ema}


def _eval_source(where: Path, ema: bool) -> dict:
    """What the shapes bench records of the model it scores (as generation.json does for the protocols)."""
    return {**_weights_record(where, ema), "model": str(where)}


def _trained_kinds(where: Path) -> list[str] | None:
    """The shapes-world kinds the checkpoint at ``where`` trained on (data.kinds of each stage begun by its
    step); None where unknown (a pipeline folder records no data section) or trained on other data."""
    from fusedit.checkpoints import load_checkpoint_config, load_state
    from fusedit.config import resolved_stages

    if not (where / "state.json").is_file():
        return None
    step = int(load_state(where)["step"])
    begun = [s for s in resolved_stages(load_checkpoint_config(where)) if s.start < step or s.index == 0]
    kinds = [k for s in begun if s.config.data.source == "shapes" for k in s.config.data.kinds]
    return list(dict.fromkeys(kinds)) or None


def _check_eval_folder(args, out: Path, record: dict, where: Path) -> None:
    """eval.run.check_protocol_folder, whose refusal of images made with another checkpoint names that
    checkpoint's folder, when it is still there with the same weights, as the way to finish them."""
    from fusedit.eval.run import RecordMismatch, check_protocol_folder, weights_fingerprint

    try:
        check_protocol_folder(out, args.bench, record, _eval_seed(args), args.per_prompt, args.categories)
    except RecordMismatch as e:
        # Named only where the checkpoint is all that differs (another seed or bench would be refused
        # again) and its folder is still there with the weights that made the images.
        other = where.parent / str(e.saved.get("checkpoint"))
        if not (
            "checkpoint" in e.changed
            and set(e.changed) <= {"checkpoint", "weights"}
            and (other / "state.json").is_file()
            and weights_fingerprint(other) == e.saved.get("weights")
        ):
            raise
        raise ConfigError(f"{e}; to finish it, evaluate {other} with --out {out}") from None


def _protocol_kept(bench: str, out: Path, where: Path, model: str) -> str:
    """What an interrupted protocol run leaves in ``out``: its images (DPG-Bench's grids), counted, and how
    to go on: the same command, unless MODEL is a run folder, whose latest checkpoint may move on (rerun,
    it would score that one into another folder): then the checkpoint ``where`` it scored."""
    from fusedit.eval.run import IMAGES

    unit = "grid" if bench == "dpg" else "image"
    folders = list(out.glob("*/samples")) if bench == "t2i-compbench" else [out / IMAGES[bench]]
    n = sum(1 for folder in folders if folder.is_dir() for _ in folder.rglob("*.png"))
    if not n:
        return f"no {unit} was written to {out}; rerun the same command to start"
    same = Path(model).resolve() == where.resolve() or (where / "model_index.json").is_file()
    go_on = GO_ON if same else f"to go on, evaluate {where} with --out {out}"
    return f"{_plural(n, unit)} in {out} {'is' if n == 1 else 'are'} kept; {go_on}"


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _eval_seed(args) -> int:
    return 42 if args.seed is None else args.seed  # GenEval and DPG-Bench fix seed 42


def _mjhq_scorer(args, device):
    """The FID feature extractor of `--bench mjhq`, with its reference folder listed: both before the
    model loads, so that a wrong path fails at once rather than after the samples."""
    from fusedit.eval.benchmarks import load_mjhq
    from fusedit.eval.inception import feature_extractor
    from fusedit.eval.mjhq import check_scoring, reference_files, select

    check_scoring(args.reference, args.features, args.per_category)
    if args.reference is None:
        return None
    rows = select(load_mjhq(args.prompts), args.per_category)
    reference_files(args.reference, sorted({r["category"] for r in rows}))
    return feature_extractor(args.features, device=device)


def _eval_record(args, cfg: Config, where: Path, ema: bool, device) -> tuple[dict, dict]:
    """The sampling settings of `fusedit eval --bench geneval|dpg|...` for a model of ``cfg`` read from
    ``where`` with its EMA weights or not (``ema``: as it loads, _loads_ema), and the record of what makes
    its images (eval.run.claim_folder), so that a rerun after more training does not keep (and score) the
    old ones. The text cache and CUDA graphs change no image beyond rounding, so they may differ between
    runs."""
    from fusedit.sample import sample_settings
    from fusedit.system import precision_name

    settings = sample_settings(cfg, steps=args.steps, guidance=args.guidance, image_size=args.size)
    kept = {k: v for k, v in settings.items() if k not in ("cache_text", "cuda_graphs")}
    record = {
        **_weights_record(Path(where), ema),
        **kept,
        "precision": precision_name(settings["precision"], device),
    }
    return settings, record


def _eval_protocol(args, gen, record: dict, out: Path, device, extractor=None) -> int:
    """A protocol run with the generator ``gen`` (eval.run.ProtocolGenerator) whose model and settings
    ``record`` describes, and the lines that report it."""
    from fusedit.eval import run
    from fusedit.sample import warn_cut_prompts

    # What each protocol takes beyond what they all take (below).
    protocols = {
        "geneval": (run.run_geneval, {"detector": args.detector, "clip": args.clip, "limit": args.limit}),
        "dpg": (run.run_dpg, {"vqa": args.vqa, "limit": args.limit}),
        "mjhq": (
            run.run_mjhq,
            {
                "reference": args.reference,
                "features": extractor,
                "cache_dir": Path(args.cache_dir or FID_CACHE),
                "per_category": args.per_category,
            },
        ),
        "t2i-compbench": (
            run.run_compbench,
            {
                "vqa": args.vqa,
                "clip": args.clip,
                "detector": args.detector,
                "n_per_prompt": args.per_prompt,
                "categories": args.categories,
                "text": args.noun_phrases or "rules",
            },
        ),
    }
    protocol, own = protocols[args.bench]
    r = protocol(
        gen,
        args.prompts,
        out,
        seed=_eval_seed(args),
        device=device,
        progress=not args.quiet,
        record=record,
        **own,
    )
    # GenEval's and DPG-Bench's counts are of prompts (4 images each), the others' of images.
    total = _plural(r["generated"] + r["skipped"], r["unit"].removesuffix("s"))
    print(f"{args.bench}: wrote {out} ({total}: {r['generated']} generated, {r['skipped']} already there)")
    if gen.truncated:  # of the prompts sampled in this run
        warn_cut_prompts(gen.truncated, gen.prompts, gen.model.limits)
    if args.bench == "mjhq" and "scores" in r:
        scores = r["scores"]
        worst = max(scores["categories"], key=scores["categories"].get)
        print(
            f"FID {scores['overall']:.3f} over {scores['samples']} samples ({scores['features']}); per "
            f"category {worst} is highest at {scores['categories'][worst]:.3f}; details in {r['scores_file']}"
        )
    elif "scores" in r:
        part = _scored_part(args, r["scores"])
        print(f"overall {r['scores']['overall']:.4f}{part}; details in {r['scores_file']}")
    return 0


def _scored_part(args, scores: dict) -> str:
    """What a protocol's overall is taken over, with the part of the benchmark it leaves out, if any: its
    mean over a few tasks or categories is not the benchmark's overall."""
    from fusedit.eval.compbench import CATEGORIES
    from fusedit.eval.geneval import TASKS

    parts = [f"the first {args.limit}: --limit {args.limit}"] if args.limit is not None else []
    if args.bench == "geneval" and scores.get("missing_tasks"):
        tasks = [t for t in TASKS if t not in scores["missing_tasks"]]
        parts.append(f"{len(tasks)} of {len(TASKS)} tasks: {', '.join(tasks)}")
    if args.bench == "dpg" and scores.get("missing"):
        total = scores["num_prompts"] + len(scores["missing"])
        parts.append(f"{scores['num_prompts']} of the question file's {total}")
    if args.bench == "t2i-compbench" and len(scores["per_category"]) < len(CATEGORIES):
        parts.append(
            f"{len(scores['per_category'])} of {len(CATEGORIES)} categories: {', '.join(scores['per_category'])}"
        )
    over = f" over {_plural(scores['num_prompts'], 'prompt')}" if "num_prompts" in scores else ""
    return over + (f" ({'; '.join(parts)})" if parts else "")


def cmd_benchmarks(args) -> int:
    from fusedit.eval.benchmarks import download

    if args.images and args.name != "mjhq":
        raise ConfigError(f"--images applies to mjhq only (its FID reference images), not {args.name}")
    path = download(
        args.name,
        _out_folder(args.dest or f"benchmarks-data/{args.name}", "--dest"),
        force=args.force,
        progress=not args.quiet,
        images=args.images,
    )
    print(f"{args.name} prompts in {path}")
    if args.name == "mjhq" and args.images:
        print(
            f"reference images in {path / 'mjhq30k_imgs'} (give it to `fusedit eval --bench mjhq --reference`)"
        )
    return 0


def _latents_kept(out: Path) -> str:
    """What an interrupted cache-latents kept: its finished shards that hold samples (a cache with none
    starts over on a rerun, data.latents._check_meta)."""
    from fusedit.data.latents import finished_shards

    kept = sum(bool(shard["samples"]) for shard in finished_shards(out)) if out.is_dir() else 0
    if not kept:
        return f"no shard was finished yet in {out}; rerun the same command to start again"
    return f"{_plural(kept, 'finished shard')} in {out} {'is' if kept == 1 else 'are'} kept; {GO_ON}"


def cmd_cache_latents(args) -> int:
    import torch

    from fusedit.data.latents import cache_latents
    from fusedit.system import resolve_device

    cfg = _config(args)
    out = _out_folder(args.out)
    with _kept_on_interrupt(lambda: _latents_kept(out)):
        summary = cache_latents(
            cfg.data,
            cfg.vae,
            out,
            args.batch_size,
            args.shard_size,
            resolve_device(args.device, "--device"),
            progress=not args.quiet,
            seed=cfg.train.seed,
            dtype=getattr(torch, args.dtype),
        )
    print(summary["report"])
    # The cache holds the VAE's latents: training must name the same VAE (check_latents refuses another).
    print(
        f"train on them with the same config and vae.* settings plus: data.source=latents data.latents_dir={args.out}"
    )
    return 0


def cmd_fid(args) -> int:
    from fusedit.eval.fid import ReferenceStats, fid_score, folder_source, list_images
    from fusedit.eval.inception import INCEPTION_ID, feature_extractor

    def images(folder: str, what: str) -> list[Path]:
        found = list_images(folder)
        if len(found) < 2:  # one image has no covariance
            raise ConfigError(
                f"the {what} folder {folder!r} holds 1 image (allowed: a folder of at least 2 images)"
            )
        if len(found) < FEW_FOR_FID:
            # The covariance of N images has rank N-1 at most, far below the feature width: the distance is
            # mostly small-sample bias, comparable only between runs with the same N.
            log.warning(
                "the %s folder %r holds %d images: FD over fewer than %d images is dominated by small-sample "
                "bias (published FID uses 10k-50k); compare only scores over the same number",
                what,
                folder,
                len(found),
                FEW_FOR_FID,
            )
        return found

    # Both folders are listed before the feature model loads, so a wrong path fails at once. The reference
    # is listed even when its stats are cached: the listing (names, sizes and each file's first 4 KiB, no
    # decoding) is what tells whether the cache still describes this folder.
    samples = images(args.samples, "samples")
    reference_files = images(args.reference, "reference")
    cache_dir = _out_folder(args.cache_dir, "--cache-dir")
    extractor = feature_extractor(args.features)
    reference = ReferenceStats.cached(
        args.reference_name,
        reference_files,
        extractor,
        cache_dir,
        reference=folder_source(args.reference, reference_files),
    )
    value = fid_score(samples, reference, extractor)
    label = "FID (clean-fid Inception)" if extractor.id == INCEPTION_ID else f"FD ({args.features} features)"
    print(f"{label}: {value:.4f}")
    return 0


def cmd_clip_score(args) -> int:
    from fusedit.eval.fid import ClipScore, clip_scores, is_sample_image, mean_clip_score

    def prompt_of(meta: Path) -> str:
        try:
            prompt = json.loads(meta.read_text(encoding="utf-8")).get("prompt")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            prompt = None
        if not isinstance(prompt, str):
            raise ConfigError(
                f"{str(meta)!r} has no prompt (allowed: the JSON object `fusedit sample` writes beside each "
                'image, with "prompt": "...")'
            )
        return prompt

    if Path(args.samples).is_file():
        raise ConfigError(f"{args.samples!r} is a file (allowed: a `fusedit sample` output folder)")
    if not Path(args.samples).is_dir():
        raise FileNotFoundError(
            f"no such folder: {args.samples!r} (expected a `fusedit sample` output folder)"
        )
    paths = sorted(p for p in Path(args.samples).iterdir() if is_sample_image(p))  # this folder's, not below
    pairs = [(p, prompt_of(p.with_suffix(".json"))) for p in paths if p.with_suffix(".json").is_file()]
    if not pairs:
        raise ConfigError(f"no images with a prompt file (NNNNN.png + NNNNN.json) in {args.samples!r}")
    if len(pairs) < len(paths):  # a score over part of the folder must not read as the folder's
        lone = [p for p in paths if not p.with_suffix(".json").is_file()]
        log.warning(
            "%d of the %d images have no prompt file beside them (e.g. %s: no %s) and are left out",
            len(lone),
            len(paths),
            lone[0].name,
            lone[0].with_suffix(".json").name,
        )
    scores = clip_scores([p for p, _ in pairs], [q for _, q in pairs], ClipScore(args.clip))
    scored = int(scores.isfinite().sum())  # unreadable images are NaN, skipped with a warning
    print(f"CLIP score over {scored} image{'' if scored == 1 else 's'}: {mean_clip_score(scores):.3f}")
    return 0


def _size_by_batch(text: str) -> tuple[int, int]:
    try:
        resolution, batch = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RESOLUTIONxBATCH (e.g. 512x16)") from None
    return resolution, batch


def _appendable(path: str, flag: str) -> None:
    """A file to append to, refused at once when open() would fail only after the slow work, with a bare
    [Errno 2] or [Errno 21]."""
    path = Path(path)
    allowed = "allowed: a file, new or existing, in an existing folder"
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a folder ({allowed})")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {str(path)!r}: there is no folder {str(path.parent)!r} ({allowed})")


def cmd_bench(args) -> int:
    import torch

    from fusedit.bench import (
        bench_sample,
        bench_train,
        format_table,
        levers,
        setup,
        source_commit,
        warn_text_tokens,
    )
    from fusedit.sample import check_steps_guidance
    from fusedit.system import resolve_device

    cfg = _config(args)
    # Every flag checked before the (slow) model build, so that a typo fails at once, not after minutes.
    # The parser's default of each flag of one part is None (False for --cached-only), so that one given
    # for a part --what leaves out is refused rather than ignored.
    parts = {
        "sample": {
            "--prompts": args.prompts,
            "--steps": args.steps,
            "--guidance": args.guidance,
            "--cached-only": args.cached_only or None,
        },
        "train": {"--batch": args.batch, "--train-points": args.train_points},
    }
    for part, flags in parts.items():
        given = [flag for flag, value in flags.items() if value is not None]
        if given and part not in args.what:
            raise ConfigError(
                f"{given[0]} does not apply with --what {' '.join(args.what)} (it sets the {part} points; "
                f"allowed with --what {part})"
            )
    prompts, steps = args.prompts or [4], args.steps or [25]
    guidance = 6.0 if args.guidance is None else args.guidance
    for n in steps:
        check_steps_guidance(n, guidance, flags=True)
    counts = [
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--text-tokens", args.text_tokens, 1),
    ]
    counts += [("--prompts", n, 1) for n in prompts] + [("--batch", n, 1) for n in args.batch or []]
    for flag, value, low in counts:
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value} is not allowed (allowed: {low} or more)")
    tokens = args.text_tokens or cfg.text.max_length
    if args.min_text_tokens is not None and not 1 <= args.min_text_tokens <= tokens:
        raise ConfigError(
            f"--min-text-tokens {args.min_text_tokens} is not in 1..{tokens} (the prompt length)"
        )
    # --train-points names each training point whole: --batch (and, without sampling, --resolution) would
    # be silently ignored beside it.
    if args.train_points and args.batch:
        raise ConfigError(
            "--batch does not apply with --train-points (each RESOLUTIONxBATCH point names its batch)"
        )
    if args.train_points and args.resolution and "sample" not in args.what:
        raise ConfigError(
            "--resolution does not apply with --train-points and --what train (each RESOLUTIONxBATCH point "
            "names its resolution; --resolution sets the sampling points)"
        )
    resolutions = args.resolution or [cfg.data.image_size]
    for size in resolutions:
        _check_size(size, cfg, "--resolution")
    for size, batch in args.train_points or []:
        if batch < 1:
            raise ConfigError(f"--train-points {size}x{batch} is not allowed (allowed: a batch of 1 or more)")
        _check_size(size, cfg, "--train-points")
    if args.json:
        _appendable(args.json, "--json")
    device = resolve_device(args.device, "--device")
    # The profiler that records each point's attention kernels (bench.attention_kernels) starts kineto, which
    # writes start/stop lines between the table's rows at any level below 6; read at its first use. A
    # level the user set wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    s = setup(cfg, device, bf16=device.type == "cuda" and not args.fp32)
    warn_text_tokens(s, tokens)
    # Every training point first: sampling turns the model into its sampling form.
    points = []
    if "train" in args.what:
        grid = [(r, b) for r in resolutions for b in args.batch or [cfg.train.batch_size]]
        points += [{"kind": "train", "resolution": r, "batch": b} for r, b in args.train_points or grid]
    if "sample" in args.what:
        caches = (True,) if args.cached_only else (True, False)
        points += [
            {"kind": "sample", "resolution": r, "prompts": p, "steps": n, "text_cache": c}
            for r in resolutions
            for p in prompts
            for n in steps
            for c in caches
        ]

    def measure(point: dict) -> dict:
        if point["kind"] == "train":
            return bench_train(
                s,
                point["batch"],
                point["resolution"],
                tokens,
                args.warmup,
                args.repeats,
                args.min_text_tokens,
            )
        return bench_sample(
            s,
            point["prompts"],
            point["resolution"],
            tokens,
            point["steps"],
            guidance,
            point["text_cache"],
            args.warmup,
            args.repeats,
            args.min_text_tokens,
        )

    # What every record says of the run that made it (RESULTS.md names each figure's command, date, commit).
    made = {
        "command": shlex.join(["fusedit", *args.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
    }
    rows = []
    with contextlib.ExitStack() as stack:
        # Appended: the measurements of earlier runs into the same file (a session's sweep) are kept.
        sink = stack.enter_context(open(args.json, "a")) if args.json else None
        for point in points:
            try:
                rows.append(measure(point) | made)
                print(format_table(rows[-1:]), flush=True)
            except torch.OutOfMemoryError:
                # "does batch 64 fit?" is a result too: record it and go on with the next point
                rows.append(point | {"preset": cfg.name, "error": "out of memory", **levers(s), **made})
                print(f"{point}: out of memory", flush=True)
            if sink is not None:  # written as it goes, so a run cut short keeps what it measured
                sink.write(json.dumps(rows[-1]) + "\n")
                sink.flush()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        print(f"appended {len(rows)} measurements to {args.json}")
    return 0


def cmd_convert(args) -> int:
    from fusedit.convert.fusedit_official import load_official, official_tokenizer, official_vae
    from fusedit.train.checkpoint import save_checkpoint

    # Asked before load_official builds and loads the model, which takes minutes for the 4.6B release.
    out = _out_folder(args.out)
    earlier = _converted(out)
    if not earlier:
        check_output_folder(out, "a converted run", "an earlier conversion's folder")
    if not args.vae and official_vae(args.path, args.config) is None:
        raise ConfigError(
            f"{args.path!r} has no VAE: pass --vae (e.g. stabilityai/stable-diffusion-3-medium-diffusers "
            "--vae-subfolder vae, the VAE FuseDiT was trained with)"
        )
    # A run saved without one would sample with the built-in word tokenizer: the ids of another vocabulary.
    tokenizer = args.tokenizer or official_tokenizer(args.path, args.config, args.llm or "")
    if not tokenizer:
        raise ConfigError(
            f"{args.path!r} names no tokenizer (no tokenizer/ folder, and its base_config names no LLM): pass "
            "--tokenizer (the hub id or folder of the LLM it was trained with, e.g. google/gemma-2b)"
        )
    cfg, model = load_official(
        args.path,
        config=args.config,
        tokenizer=tokenizer,
        vae=args.vae or "",
        vae_subfolder=args.vae_subfolder or "",
        llm=args.llm or "",
        max_length=args.max_length,
        padding_side=args.padding_side,
        weights_only=not args.trust_pickle,
    )
    weights = model.denoiser.state_dict()
    # Written beside ``out`` and swapped in whole: a redo (e.g. another --vae or --max-length) killed at
    # any point leaves the earlier conversion or the new one, never a run folder missing weights.
    llm = None if cfg.text.model_id else model.text.llm
    with replacing(out) as tmp:
        ckpt = out / save_checkpoint(tmp, 0, cfg, model.denoiser, weights, None, llm).relative_to(tmp)
        save_config(cfg, tmp / "config.yaml")  # as a trained run has: the folder is a config base too
    print(f"converted {args.path} -> {ckpt}; sample with: fusedit sample {args.out} --prompt ...")
    return 0


def _converted(out: Path) -> bool:
    """Whether ``out`` is what `fusedit convert` writes: a run folder whose only checkpoint is step 0 (with
    the run's config.yaml, or without it as before 2b20aca)."""
    checkpoints = out / "checkpoints"
    return (
        checkpoints.is_dir()
        and {p.name for p in out.iterdir()} <= {"checkpoints", "config.yaml"}
        and {p.name for p in checkpoints.iterdir()} <= {"latest", "step_00000000"}
        and (checkpoints / "step_00000000" / "state.json").is_file()
    )


def cmd_study(args) -> int:
    from fusedit.eval.study import chosen_designs, describe_study, load_study, run_study, statuses_text
    from fusedit.system import resolve_device

    # A design label is a word without '=': overrides typed after --only's labels (`--only a b
    # train.steps=5`) land in its list, and are overrides all the same.
    only = None if args.only is None else [word for word in args.only if "=" not in word]
    overrides = [*args.overrides, *(word for word in args.only or () if "=" in word)]
    study = load_study(args.study, device=args.device, overrides=overrides)
    if only == []:  # `--only key=value`: argparse gave --only the overrides alone
        labels = ", ".join(d.label for d in study.designs)
        raise ConfigError(f"--only names no design (allowed: one or more of {labels}, before any key=value)")
    chosen = [d.label for d in chosen_designs(study, only)]
    if args.device:  # else the first design's training refuses it, after the output folder is made
        resolve_device(args.device, "--device")
    out = _out_folder(args.out or f"runs/studies/{study.name}")
    if args.check:  # what the run would do, from the run's own checks and decisions; nothing is made
        print(describe_study(study, only=only, out_dir=out))
        return 0
    t0 = time.time()
    with _kept_on_interrupt(f"what is done in {out} is kept (each design's checkpoints and scores); {GO_ON}"):
        r = run_study(study, out, progress=not args.quiet, only=only)
    print("\n".join(line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")))
    pending = f"; pending: {', '.join(r['pending'])}" if r["pending"] else ""
    count = f"{len(chosen)} of {len(study.designs)}" if len(chosen) < len(study.designs) else len(chosen)
    print(
        f"study {r['name']}: {count} designs in {time.time() - t0:.0f}s: "
        f"{statuses_text(r['designs'], chosen)}{pending}"
    )
    print(f"  report:  {out / 'report.md'}")
    print(f"  plots:   {out / 'loss_curves.png'}, {out / 'scores.png'}")
    print(f"  samples: {out / 'samples.png'} (per design: {out / 'grids'})")
    return 0


def cmd_export(args) -> int:
    from fusedit.pipeline import export_run
    from fusedit.system import resolve_device

    out = export_run(
        args.model,
        _out_folder(args.out),
        use_ema=not args.no_ema,
        device=resolve_device(args.device, "--device"),
        relocate=_relocations(args),
    )
    print(f"wrote a diffusers pipeline folder to {out} (load it with fusedit.pipeline.FuseDiTPipeline)")
    return 0


def cmd_consolidate(args) -> int:
    from fusedit.train.checkpoint import consolidate_checkpoint

    out = consolidate_checkpoint(args.model, _out_folder(args.out))
    print(f"wrote the plain single-process checkpoint {out} (safetensors weights and EMA, optimizer.pt)")
    return 0


def _count(state: str, what: str, count: int) -> str:
    return f"{state} ({what}): {count / 1e6:.1f}M ({count:,})"


def _parameter_lines(model, keys: list[str], stage) -> list[str]:
    """Trainable and frozen parameters of each part of a meta ``model`` once it trains as ``stage`` does:
    training's own apply_parts (start_as) adds the LoRA adapters and sets requires_grad, so the counts cannot drift
    from what the optimizers get. The model keeps the adapters (describe counts FLOPs before this)."""
    from fusedit.system import count_parameters
    from fusedit.train.stages import start_as

    parts = start_as(model, stage)
    d = model.denoiser
    lines, trained, frozen = [], count_parameters(d, True), count_parameters(d, False)
    if trained:
        what = [f"rank-{parts.dit_adapters[0]} LoRA adapters"] if parts.dit_adapters else []
        what += ["refiner"] if parts.refiner else []
        lines.append(_count("trainable", f"DiT: {' and '.join(what)}" if frozen else "DiT", trained))
    if frozen:
        if not parts.dit_adapters:
            rest = "all but the refiner"
        else:
            rest = "base weights but the refiner" if parts.refiner else "base weights"
        lines.append(_count("frozen", f"DiT: {rest}" if trained else "DiT", frozen))
    for key, enc in zip(keys, model.encoders, strict=True):
        llm, name = enc.llm, "LLM" if len(keys) == 1 else f"LLM {key}"
        trained, frozen = count_parameters(llm, True), count_parameters(llm, False)
        if not trained or not frozen:
            state = "trainable" if trained else "frozen"
            lines.append(_count(state, f"{name}, incl. embeddings", trained + frozen))
            continue
        # Joint fine-tuning trains only what reaches the DiT's reads (TextEncoder.read_modules): the
        # embeddings too, unless train.llm_top_layers keeps it to the top layers.
        top = f"the top {parts.llm_top_layers} layers the DiT reads" if parts.llm_top_layers else ""
        if parts.llm_adapters:
            what = f"rank-{parts.llm_adapters[0]} LoRA adapters" + (f" on {top}" if top else "")
            rest = "base weights, incl. embeddings"
        elif llm.get_input_embeddings().weight.requires_grad:
            what, rest = f"{top or 'the layers the DiT reads'}, incl. embeddings", "the rest"
        else:
            what, rest = top, "the rest, incl. embeddings"
        lines += [
            _count("trainable", f"{name}: {what}", trained),
            _count("frozen", f"{name}: {rest}", frozen),
        ]
    if model.pooled_text is not None:
        lines.append(
            _count("frozen", "pooled text encoder, incl. embeddings", count_parameters(model.pooled_text))
        )
    return lines


def _unloaded_templates(cfg: Config, model) -> list[str]:
    """The text sections whose template's tokens a meta build leaves out of the text width: a hub
    tokenizer is not downloaded there (system._text_encoder), so its encoder has no tokenizer to count a
    template, an instruction or a system prompt with."""
    return [
        key
        for (key, t), enc in zip(text_sections(cfg), model.encoders, strict=True)
        if enc.tokenizer is None and adds_template_tokens(t)
    ]


_NO_PEFT = (
    "(parameters: the LoRA adapters are counted through peft, which is not installed: pip install peft)"
)


def _can_count(stage) -> bool:
    """Whether the parameters ``stage`` trains can be counted here: LoRA adapters are added through peft,
    an optional package; describe still gives the rest without it."""
    from fusedit.adapters import Parts, require_peft

    parts = Parts.of(stage.config.train)
    if not (parts.dit_adapters or parts.llm_adapters):
        return True
    try:
        require_peft("describe")
    except ConfigError:
        return False
    return True


def cmd_describe(args) -> int:
    from fusedit.config import resolved_stages
    from fusedit.system import build_model
    from fusedit.train.stages import _flop, describe_stages, image_costs

    cfg = _config(args)
    model = build_model(cfg, "meta")
    d = model.denoiser
    keys = [key for key, _ in text_sections(cfg)]
    # The parameter and per-image lines describe what training starts with: the run, or its first stage
    # (the model is the run's; stages change what trains, the image size and the batch).
    first = resolved_stages(cfg)[0]

    def reads(req, llm) -> str:
        what = (
            f"K/V of LLM layers {req.kv_layers[0]}..{req.kv_layers[-1]}"
            if req.kv_layers
            else f"pre-RoPE K/V of LLM layers {req.raw_kv_layers[0]}..{req.raw_kv_layers[-1]}"
            if req.raw_kv_layers
            else f"LLM hidden state {req.hidden_layer}"
        )
        return f"{what} of {len(llm.layers)} LLM layers run"

    read = [reads(req, enc.llm) for req, enc in zip(d.text_requests, model.encoders, strict=True)]
    if len(read) > 1:  # several LLMs (LI-DiT): each named by its section
        read = [f"{r} ({key})" for r, key in zip(read, keys, strict=True)]
    # What a step costs follows what it trains (train.trainable, LoRA): 3x the DiT forward plus the frozen
    # LLM's forward for the default. Counted before _parameter_lines adds the adapters, whose own products
    # the FLOP counts leave out (training_flops_per_image).
    sizes = sorted({256, 512, first.config.data.image_size})
    costs = [(size, image_costs(model, first.config, size)) for size in sizes]
    stage_lines = describe_stages(cfg, model) if cfg.stages else []
    # The exact counts too: a debug design's 1.5M would not confirm the 1.53M `fusedit study` reports.
    parameters = _parameter_lines(model, keys, first) if _can_count(first) else [_NO_PEFT]
    print(
        f"{cfg.name}: design={cfg.model.design} pos_embed={cfg.model.pos_embed} "
        f"timestep={cfg.model.timestep_conditioning} dit_layers={len(d.blocks)} width={d.dim}; reads "
        f"{'; '.join(read)}"
    )
    if cfg.stages:
        print(f"stage 0 {first.name!r}, where training starts (every stage's own line at the end):")
    print("\n".join(parameters))
    if any(req.kv_layers or req.raw_kv_layers for req in d.text_requests) and any(
        t.model_id for _, t in text_sections(cfg)
    ):
        # The K/V probe runs a forward of the real weights (TextEncoder.check_kv); describe reads shapes.
        print("(whether deep fusion can read this LLM's K/V is checked when its weights load: train, sample)")
    unloaded = _unloaded_templates(cfg, model)
    if unloaded:
        print(
            f"(the text tokens below leave out the template's tokens of {', '.join(unloaded)}: describe does "
            "not download hub tokenizers; a local folder as the section's tokenizer or model_id counts them)"
        )
    for size, c in costs:
        print(
            f"{size} px ({c['image']} image + {c['text']} text tokens): DiT forward {_flop(c['dit'])}, "
            f"LLM forward {_flop(c['llm'])}, training {_flop(c['training'])} per image"
        )
    if stage_lines:
        print("\n".join(stage_lines))
    return 0


def cmd_config(args) -> int:
    cfg = _config(args)
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_presets(args) -> int:
    print("\n".join(preset_names()))
    return 0


def _add_relocate_flag(sp):
    sp.add_argument(
        "--relocate",
        action="append",
        metavar="KEY=PLACE",
        help="read a model folder the run's saved config names from its new place, e.g. "
        "text.model_id=/data/gemma-2b (repeatable; keys: text.model_id, text.tokenizer, "
        "extra_text.N.model_id, pooled_text.model_id, vae.model_id, ...)",
    )


def _add_sampling_flags(sp, compile_default="the saved sample.compile: auto = on a GPU"):
    _add_relocate_flag(sp)
    sp.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    sp.add_argument("--device", default="auto")
    sp.add_argument(
        "--compile",
        choices=["auto", "off", "inductor", "max-autotune"],
        help=f"torch.compile the DiT blocks (default {compile_default})",
    )
    sp.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="replay each step as one CUDA graph (default the saved sample.cuda_graphs)",
    )


def _add_config_args(sp):
    sp.add_argument("config", help="preset name (see `fusedit presets`), YAML file, or model folder")
    sp.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_train_parser(sub) -> None:
    sp = sub.add_parser("train", help="train a config")
    _add_config_args(sp)
    sp.add_argument("--out", help="run folder (default runs/<name>)")
    fresh = sp.add_mutually_exclusive_group()
    fresh.add_argument(
        "--resume", action="store_true", help="continue from the run folder's latest checkpoint"
    )
    fresh.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run folder that holds checkpoints, deleting them and its metrics",
    )
    sp.add_argument("--stop-at", type=int, help="stop after this step, 1 or more (the run can be resumed)")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_train)


def _add_demo_parser(sub) -> None:
    sp = sub.add_parser("demo", help="train the debug preset on the shapes world and sample a grid")
    sp.add_argument("overrides", nargs="*", help="section.key=value overrides of the debug preset")
    sp.add_argument("--out", default="runs/demo")
    sp.add_argument(
        "--overwrite",
        action="store_true",
        help="run again in a folder that holds a run (an earlier demo's), deleting its checkpoints and metrics",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_demo)


def _add_sample_parser(sub) -> None:
    sp = sub.add_parser("sample", help="generate images from a run, checkpoint or pipeline folder")
    sp.add_argument("model", help="run folder (also `fusedit convert`'s), checkpoint or pipeline folder")
    sp.add_argument(
        "--prompt", action="append", help='a prompt (repeatable; "" samples unconditionally, as serve does)'
    )
    sp.add_argument("--prompts-file", help="a text file with one prompt per line")
    sp.add_argument(
        "--out",
        default="samples",
        help="folder for the images (default samples; an earlier sample's images there are removed)",
    )
    sp.add_argument("--steps", type=int, help="sampling steps (default the saved sample.steps)")
    sp.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale: 1 = the prompt alone, 0 = the negative prompt alone "
        "(default the saved sample.guidance)",
    )
    sp.add_argument(
        "--sampler",
        choices=choices_of(SampleConfig, "sampler"),
        help="the ODE sampler (default the saved sample.sampler)",
    )
    sp.add_argument(
        "--schedule",
        choices=choices_of(SampleConfig, "schedule"),
        help="how the sampling times are spaced before the shift (default the saved sample.schedule)",
    )
    sp.add_argument(
        "--shift", type=float, help="time shift of the schedule, 1 = none (default the saved sample.shift)"
    )
    sp.add_argument(
        "--negative-prompt",
        help="the prompt guidance steers away from (default the saved sample.negative_prompt)",
    )
    sp.add_argument(
        "--seed", type=int, default=42, help="image i starts from the noise of seed + i (default 42)"
    )
    sp.add_argument(
        "--size",
        type=_image_size,
        help="image size in pixels: one side (512) or WIDTHxHEIGHT (768x512); default the model's",
    )
    sp.add_argument("--batch-size", type=int, default=8, help="prompts sampled at once (default 8)")
    sp.add_argument("--no-cache", action="store_true", help="recompute the text K/V at every step")
    _add_sampling_flags(sp)
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_sample)


def _add_serve_parser(sub) -> None:
    sp = sub.add_parser("serve", help="a local web demo: prompt, settings, live progress, gallery")
    sp.add_argument("model", help="run, checkpoint or pipeline folder (as for `fusedit sample`)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sp.add_argument("--port", type=int, default=7860, help="0 picks a free port")
    sp.add_argument(
        "--max-size",
        type=int,
        help="largest image side a request may ask for, in pixels (default: twice the trained data.image_size)",
    )
    _add_sampling_flags(sp, compile_default="off: every new request shape would compile")
    sp.set_defaults(func=cmd_serve)


def _add_eval_parser(sub) -> None:
    sp = sub.add_parser("eval", help="score a run, checkpoint or pipeline folder on a benchmark")
    sp.add_argument("model", help="run, checkpoint or pipeline folder (as for `fusedit sample`)")
    sp.add_argument("--bench", choices=["shapes", *_PROTOCOLS], default="shapes")
    sp.add_argument(
        "--per-category",
        type=int,
        help="shapes: held-out prompts per category (default 20); mjhq: prompts per category (default all 3000)",
    )
    sp.add_argument(
        "--prompts",
        help="geneval/dpg/mjhq/t2i-compbench: the prompt data (see `fusedit benchmarks download`)",
    )
    sp.add_argument(
        "--detector",
        help="geneval, t2i-compbench (spatial, complex): detector hub id or folder (e.g. a Mask2Former COCO model)",
    )
    sp.add_argument(
        "--clip",
        help="geneval: CLIP hub id or folder for colour classification; t2i-compbench (non_spatial, complex): "
        "the CLIP it scores with (openai/clip-vit-base-patch32)",
    )
    sp.add_argument(
        "--vqa",
        help="dpg: VQA model hub id or folder (BLIP/ViLT); t2i-compbench (color, shape, texture, complex): "
        "BLIP-VQA (Salesforce/blip-vqa-capfilt-large)",
    )
    sp.add_argument(
        "--categories",
        nargs="+",
        metavar="CATEGORY",
        help="t2i-compbench: color shape texture spatial non_spatial complex (default all)",
    )
    sp.add_argument(
        "--per-prompt", type=int, help="t2i-compbench: images per prompt (default 10, as published)"
    )
    sp.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="geneval/dpg: the first N prompts only, generated and scored into OUT/scores-firstN.json (a "
        "quick subset: a full run's scores.json stays; a later full run into the same --out keeps the images)",
    )
    sp.add_argument(
        "--noun-phrases",
        choices=["rules", "spacy"],
        help="t2i-compbench: noun phrases from built-in word lists (default) or spaCy (if installed, as published)",
    )
    sp.add_argument(
        "--reference", help="mjhq: the reference images (unzipped mjhq30k_imgs, one folder per category)"
    )
    sp.add_argument("--features", help=f"mjhq: FID features, as for `fusedit fid` ({FEATURES_HELP})")
    sp.add_argument("--cache-dir", help=f"mjhq: reference statistics cache (default {FID_CACHE})")
    sp.add_argument(
        "--size",
        type=int,
        help="geneval/dpg/mjhq/t2i-compbench: image side in pixels, square (default the model's)",
    )
    sp.add_argument(
        "--out",
        help="output folder (default RUN/eval/CHECKPOINT/BENCH for a run or checkpoint folder, "
        "RUN/eval/CHECKPOINT-raw/BENCH with --no-ema; MODEL/eval/BENCH for a pipeline folder)",
    )
    sp.add_argument("--steps", type=int)
    sp.add_argument("--guidance", type=float)
    sp.add_argument("--seed", type=int, help="default 0 for shapes, 42 for the published benchmarks")
    sp.add_argument("--no-ema", action="store_true")
    _add_relocate_flag(sp)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_eval)


def _add_study_parser(sub) -> None:
    sp = sub.add_parser("study", help="train, score and compare several designs under one recipe")
    sp.add_argument("study", help="study YAML file (see studies/)")
    sp.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value overrides of the study's base, for every design (e.g. train.steps=5)",
    )
    sp.add_argument("--out", help="output folder (default runs/studies/<name>); running it again resumes")
    sp.add_argument("--device", help="train.device for every design (default: each config's, auto)")
    sp.add_argument(
        "--only",
        nargs="+",
        metavar="DESIGN",
        help="train and score only these designs; the report keeps the others an earlier call finished",
    )
    sp.add_argument(
        "--check",
        action="store_true",
        help="validate, print each design's size and cost and what the run into --out would do with it; "
        "train nothing",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_study)


def _add_export_parser(sub) -> None:
    sp = sub.add_parser("export", help="write a run or checkpoint as a diffusers pipeline folder")
    sp.add_argument("model", help="run folder or checkpoint folder")
    sp.add_argument("--out", required=True)
    sp.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    _add_relocate_flag(sp)
    sp.add_argument(
        "--device",
        default="cpu",
        help="where the model loads to be written: auto, cpu, cuda, ... (default cpu)",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_export)


def _add_consolidate_parser(sub) -> None:
    sp = sub.add_parser(
        "consolidate", help="turn a distributed (DCP) checkpoint into the plain one-process format"
    )
    sp.add_argument("model", help="run folder or checkpoint folder of a torchrun run")
    sp.add_argument("--out", required=True, help="the checkpoint folder to write")
    sp.set_defaults(func=cmd_consolidate)


def _add_convert_parser(sub) -> None:
    sp = sub.add_parser("convert", help="import a public FuseDiT checkpoint (folder, pipeline or raw file)")
    sp.add_argument(
        "path", help="transformer folder, pipeline folder, model.pt.zst/ema.pt.zst or DeepSpeed file"
    )
    sp.add_argument("--out", required=True, help="fusedit run folder to write")
    sp.add_argument("--config", help="the public config.json when it is not next to the weights")
    sp.add_argument("--tokenizer", help="tokenizer hub id or folder (default: the pipeline's or the LLM's)")
    sp.add_argument("--vae", help="VAE hub id or folder (default: the pipeline's)")
    sp.add_argument("--vae-subfolder")
    sp.add_argument("--llm", help="LLM hub id or folder when the checkpoint holds no LLM weights")
    sp.add_argument("--max-length", type=int, default=256)
    sp.add_argument("--padding-side", choices=["left", "right"])
    sp.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a pickled *.pt/*.bin file with weights_only=False: only for a file you trust (unpickling "
        "can run code)",
    )
    sp.set_defaults(func=cmd_convert)


def _add_bench_parser(sub) -> None:
    sp = sub.add_parser("bench", help="training and sampling throughput on synthetic inputs (random weights)")
    _add_config_args(sp)
    sp.add_argument("--what", nargs="+", choices=["train", "sample"], default=["train", "sample"])
    sp.add_argument("--resolution", type=int, nargs="+", help="image sizes in pixels (default the config's)")
    sp.add_argument("--batch", type=int, nargs="+", help="training batch sizes (default train.batch_size)")
    sp.add_argument(
        "--train-points",
        type=_size_by_batch,
        nargs="+",
        help="training points as RESOLUTIONxBATCH, e.g. 256x64 512x16 (instead of --resolution x --batch)",
    )
    sp.add_argument("--text-tokens", type=int, help="prompt length in tokens (default text.max_length)")
    sp.add_argument(
        "--min-text-tokens",
        type=int,
        help="padded prompts: real lengths uniform in this..--text-tokens, empty negative prompts "
        "(default: every prompt --text-tokens long, no padding)",
    )
    sp.add_argument("--prompts", type=int, nargs="+", help="sampling batch(es) (default 4)")
    sp.add_argument("--steps", type=int, nargs="+", help="sampling step count(s) (default 25)")
    sp.add_argument("--cached-only", action="store_true", help="skip the uncached sampling runs")
    sp.add_argument("--guidance", type=float, help="guidance scale when sampling (default 6)")
    sp.add_argument(
        "--warmup", type=int, default=2, help="untimed runs before the timed ones, per point (default 2)"
    )
    sp.add_argument(
        "--repeats", type=int, default=5, help="timed runs per point; the median counts (default 5)"
    )
    sp.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    sp.add_argument("--json", help="append one JSON object per measurement to this file (JSON lines)")
    sp.set_defaults(func=cmd_bench)


def _add_benchmarks_parser(sub) -> None:
    sp = sub.add_parser("benchmarks", help="obtain benchmark prompt data from the official sources")
    bsub = sp.add_subparsers(dest="action", required=True)
    dp = bsub.add_parser("download", help="download GenEval, DPG-Bench, MJHQ-30K or T2I-CompBench prompts")
    dp.add_argument("name", choices=["geneval", "dpg", "mjhq", "t2i-compbench"])
    dp.add_argument(
        "--images", action="store_true", help="mjhq: also the 30,000 reference images for FID (large)"
    )
    dp.add_argument("--dest", help="folder (default benchmarks-data/NAME)")
    dp.add_argument("--force", action="store_true")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(func=cmd_benchmarks)


def _add_cache_latents_parser(sub) -> None:
    sp = sub.add_parser("cache-latents", help="pre-encode a dataset with the config's VAE into latent shards")
    _add_config_args(sp)
    sp.add_argument("--out", required=True)
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_cache_latents)


def _add_fid_parser(sub) -> None:
    sp = sub.add_parser("fid", help="Frechet distance of a sample folder to a reference folder")
    sp.add_argument("samples")
    sp.add_argument("--reference", required=True)
    sp.add_argument("--reference-name", required=True, help="name of the cached reference statistics")
    sp.add_argument("--features", required=True, help=FEATURES_HELP)
    sp.add_argument("--cache-dir", default=FID_CACHE)
    sp.set_defaults(func=cmd_fid)


def _add_clip_score_parser(sub) -> None:
    sp = sub.add_parser("clip-score", help="CLIP score of a `fusedit sample` output folder")
    sp.add_argument("samples")
    sp.add_argument("--clip", required=True, help="CLIP hub id or folder")
    sp.set_defaults(func=cmd_clip_score)


def _add_describe_parser(sub) -> None:
    sp = sub.add_parser(
        "describe", help="architecture summary and parameter counts (built on the meta device)"
    )
    _add_config_args(sp)
    sp.set_defaults(func=cmd_describe)


def _add_config_parser(sub) -> None:
    sp = sub.add_parser(
        "config",
        help="print the resolved config, checked key by key (`fusedit describe` also checks it against the "
        "LLM's shape, e.g. model.initial_layers)",
    )
    _add_config_args(sp)
    sp.set_defaults(func=cmd_config)


def _add_presets_parser(sub) -> None:
    sp = sub.add_parser("presets", help="list the named presets")
    sp.set_defaults(func=cmd_presets)


# One function per subcommand, in the order `fusedit --help` lists them.
_SUBCOMMANDS = (
    _add_train_parser,
    _add_demo_parser,
    _add_sample_parser,
    _add_serve_parser,
    _add_eval_parser,
    _add_study_parser,
    _add_export_parser,
    _add_consolidate_parser,
    _add_convert_parser,
    _add_bench_parser,
    _add_benchmarks_parser,
    _add_cache_latents_parser,
    _add_fid_parser,
    _add_clip_score_parser,
    _add_describe_parser,
    _add_config_parser,
    _add_presets_parser,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusedit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return p


@contextlib.contextmanager
def _library_bars(enabled: bool):
    """--quiet also hushes transformers' and diffusers' own bars ("Loading weights", "Loading pipeline
    components"); the settings are process-wide, so they are restored afterwards for a caller of main()
    that goes on."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    libraries = [hf_logging]
    try:  # an optional dependency (the GPU image has none)
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        pass
    else:
        libraries.append(diffusers_logging)
    were = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was in zip(libraries, were):
            if was:
                library.enable_progress_bar()


@contextlib.contextmanager
def _logs_above_bars(enabled: bool):
    """Log lines (the warmup warning, stage changes) written while a progress bar is drawn would land on
    the bar's line: tqdm writes them instead, above the bar. That of every logger that writes to the
    console itself: the root logger, and transformers' and huggingface_hub's, which have handlers of their
    own and do not propagate (main). A logger without a console handler is left alone: tqdm would add one
    (under pytest, which captures logs, a second copy of each line)."""

    def console(logger: logging.Logger) -> bool:
        return any(
            isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
            for h in logger.handlers
        )

    loggers = [logging.root, logging.getLogger("transformers"), logging.getLogger("huggingface_hub")]
    loggers = [logger for logger in loggers if console(logger)]
    if not (enabled and loggers):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers):
        yield


# The commands that share their work among torchrun's processes; any other, under torchrun with several,
# would run whole in each. A study refuses itself (run_study), saying how to train its designs under torchrun.
_SEVERAL_PROCESSES = ("train",)
_REFUSE_THEMSELVES = ("study",)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # A positional list ends at the first option, so overrides written after one (`train debug --out r
    # train.steps=2`) come back unrecognised: they are overrides all the same.
    if extra and hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # huggingface_hub writes with a handler of its own, as transformers does, but unlike transformers also
    # passes each record on to the root's: every warning (a hub request's retries offline) printed twice.
    logging.getLogger("huggingface_hub").propagate = False
    progress = not getattr(args, "quiet", False)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for records (fusedit bench)
    try:
        if "WORLD_SIZE" in os.environ and args.command not in _SEVERAL_PROCESSES + _REFUSE_THEMSELVES:
            from fusedit.train.distributed import refuse_several_processes

            refuse_several_processes(
                f"`fusedit {args.command}`",
                "do the whole job, into the same files",
                f"run it without torchrun (only {', '.join(_SEVERAL_PROCESSES)} uses several processes)",
            )
        with _library_bars(progress), _logs_above_bars(progress):
            return args.func(args)
    # FloatingPointError: training stopped at train.max_bad_steps NaN/inf steps in a row (its message says
    # what to change), an outcome to report in one line like bad input.
    except (ConfigError, FileNotFoundError, ValueError, OSError, FloatingPointError, RunStopped) as e:
        return _error(str(e))
    except KeyboardInterrupt as e:
        # Ctrl+C: one line of what was kept, not a traceback of wherever the work happened to be; 130 is
        # the shell's status for a command stopped by SIGINT.
        _error(str(e) or "stopped before the end", "interrupted")
        return 130
    except RuntimeError as e:
        # Running out of memory (torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError) is the
        # size of what was asked for, not a bug: one line, not a traceback. Any other RuntimeError is a bug.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in first:
            raise
        return _error(
            f"out of memory: {first[:300]} (allowed: less at once: a smaller image size, batch or model, "
            "or a device with more memory)"
        )


def _error(message: str, what: str = "error") -> int:
    """The one line a refused command prints (exit status 2); ``what`` heads it."""
    world = os.environ.get("WORLD_SIZE", "")
    # Under torchrun every rank fails alike: say whose line it is, and write it whole, as one flushed
    # write, so that the ranks' lines do not run together.
    who = f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""
    sys.stderr.write(f"fusedit: {what}{who}: {message}\n")
    sys.stderr.flush()
    return 2
