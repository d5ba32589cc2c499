"""`fusedit bench`: the training and sampling throughput sweep."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
from pathlib import Path

from fusedit.cli.common import _add_config_args, _check_size, _config
from fusedit.config import ConfigError, resolved_stages


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

    from fusedit.bench import format_table, levers, setup, source_commit, warn_text_tokens
    from fusedit.system import resolve_device

    # A staged recipe is timed as `fusedit train` starts it (bench.setup): its first stage's sections are
    # also what the flags' defaults read (the batch, size and sampling settings).
    cfg = resolved_stages(_config(args))[0].config
    # Every flag checked before the (slow) model build, so that a typo fails at once, not after minutes.
    points, tokens, guidance = _bench_points(args, cfg)
    if args.json:
        _appendable(args.json, "--json")
    device = resolve_device(args.device, "--device")
    # The profiler that records each point's attention kernels (bench.attention_kernels) starts kineto, which
    # writes start/stop lines between the table's rows at any level below 6; read at its first use. A
    # level the user set wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    s = setup(cfg, device, bf16=device.type == "cuda" and not args.fp32)
    warn_text_tokens(s, tokens)
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
                rows.append(_measure(s, point, tokens, guidance, args) | made)
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


def _bench_points(args, cfg) -> tuple[list[dict], int, float]:
    """The points `fusedit bench` measures, every training point first (sampling turns the model into its
    sampling form), with the prompt length and guidance scale they share; each flag checked against the
    config (its first stage's) without building anything."""
    from fusedit.sampling.generation import check_steps_guidance

    _check_parts(args)
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
    return points, tokens, guidance


def _check_parts(args) -> None:
    """Refuse a flag of the part (training or sampling) that --what leaves out. The parser's default of
    each is None (False for --cached-only), so that one given is refused rather than ignored."""
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


def _measure(s, point: dict, tokens: int, guidance: float, args) -> dict:
    """One point's record: bench_train or bench_sample with the run's prompt lengths and repeats."""
    from fusedit.bench import bench_sample, bench_train

    if point["kind"] == "train":
        return bench_train(
            s, point["batch"], point["resolution"], tokens, args.warmup, args.repeats, args.min_text_tokens
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


def _add_bench_parser(sub) -> None:
    sp = sub.add_parser("bench", help="training and sampling throughput on synthetic inputs (random weights)")
    _add_config_args(sp)
    sp.add_argument(
        "--what",
        nargs="+",
        choices=["train", "sample"],
        default=["train", "sample"],
        help="training steps, sampling, or both (default)",
    )
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
