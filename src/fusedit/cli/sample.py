"""`fusedit sample` and `fusedit serve`, and the sampling flags they share."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fusedit.cli.common import (
    _add_relocate_flag,
    _check_sampling_flags,
    _check_size,
    _kept_on_interrupt,
    _out_folder,
    _relocations,
    _saved_config,
    _scoring_line,
)
from fusedit.config import ConfigError, SampleConfig, choices_of


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
    """fusedit.sampling.source.load_sampling_model's arguments from the flags `fusedit sample` and `fusedit
    serve` share."""
    return {
        "use_ema": not args.no_ema,
        "relocate": _relocations(args),
        "compile": {"off": ""}.get(args.compile, args.compile),
        "cuda_graphs": args.cuda_graphs,
    }


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


def cmd_sample(args) -> int:
    from fusedit.files import check_writable
    from fusedit.sampling.folder import earlier_sample, write_sample_folder
    from fusedit.sampling.generation import check_negative_prompt, check_seed, sample_settings
    from fusedit.sampling.source import load_sampling_model
    from fusedit.system import resolve_device

    prompts = _read_prompts(args)
    # Checked before the (possibly slow) model load, so a typo fails at once.
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} is not allowed (allowed: 1 or more)")
    _check_sampling_flags(args)
    if args.seed is not None:
        check_seed(args.seed, len(prompts), name="--seed")
    if args.guidance is not None:
        check_negative_prompt(args.negative_prompt, args.guidance, flags=True)
    out = _out_folder(args.out)
    # A folder of other files (a user's images, a run, a dataset), or one that cannot be written, is refused
    # now: not after the model load and all the sampling.
    earlier_sample(out)
    check_writable(out)
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
    kept: list[Path] = []  # the images kept from an earlier run of this sample
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
            kept=kept,
        )
    made = len(images) - len(kept)
    also = f" ({len(kept)} kept from an earlier run)" if kept else ""
    print(f"wrote {made} image{'' if made == 1 else 's'} to {out}{also}")
    return 0


def _sample_kept(out: Path, written: list[Path], total: int) -> str:
    """What an interrupted `fusedit sample` leaves in ``out``: the images it kept or ``written`` (an earlier
    sample's others are removed once its first batch is ready), without grid.png, which is made at the end.
    The same command resumes: it keeps every whole batch and makes the rest (write_sample_folder)."""
    if not written:
        return f"no image was written to {out} yet; rerun the same command"
    return (
        f"{len(written)} of the {total} images are in {out}, without grid.png (made at the end); rerun the "
        "same command to make the rest (it keeps every finished batch)"
    )


def cmd_serve(args) -> int:
    from fusedit.sampling.serve import DemoServer, check_port_free, max_side
    from fusedit.sampling.source import load_sampling_model
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
        running = "a running generation ends after its current step; " if server.jobs.running() else ""
        print(f"stopping: {running}{server.jobs.lost_on_exit()}", file=sys.stderr, flush=True)
    finally:
        # Not sitting out a running generation, but waiting for the worker to leave torch: an interpreter
        # that exits with a thread inside torch aborts ("terminate called without an active exception").
        server.close(wait=True, cancel_running=True)
    return 0


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


def _add_sample_parser(sub) -> None:
    sp = sub.add_parser("sample", help="generate images from a run, checkpoint or pipeline folder")
    sp.add_argument("model", help="run folder (also `fusedit convert`'s), checkpoint or pipeline folder")
    sp.add_argument(
        "--prompt", action="append", help='a prompt (repeatable; "" samples unconditionally, as serve does)'
    )
    sp.add_argument(
        "--prompts-file",
        help="a UTF-8 text file with one prompt per line: blank lines are skipped, every other line is a prompt "
        "(one starting with # too: there are no comments)",
    )
    sp.add_argument(
        "--out",
        default="samples",
        help="folder for the images (default samples; new or empty, or an earlier sample's: its images "
        "made as now are kept, the others replaced)",
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
        help=f"the ODE sampler: {', '.join(choices_of(SampleConfig, 'sampler'))} or one the model's plugins "
        "register (default the saved sample.sampler)",
    )
    sp.add_argument(
        "--schedule",
        help=f"how the sampling times are spaced before the shift: {', '.join(choices_of(SampleConfig, 'schedule'))} "
        "or one the model's plugins register (default the saved sample.schedule)",
    )
    sp.add_argument(
        "--shift", type=float, help="time shift of the schedule, 1 = none (default the saved sample.shift)"
    )
    sp.add_argument(
        "--negative-prompt",
        help="the prompt guidance steers away from (default the saved sample.negative_prompt)",
    )
    sp.add_argument(
        "--seed",
        type=int,
        help="image i starts from the noise of seed + i (default the saved sample.seed, 42 unless set)",
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
