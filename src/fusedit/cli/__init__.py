"""The `fusedit` command line: thin subcommands over the library."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback

from fusedit.cli.bench import _add_bench_parser
from fusedit.cli.describe import _add_config_parser, _add_describe_parser, _add_presets_parser
from fusedit.cli.eval import _add_benchmarks_parser, _add_clip_score_parser, _add_eval_parser, _add_fid_parser
from fusedit.cli.runs import (
    _add_cache_latents_parser,
    _add_consolidate_parser,
    _add_convert_parser,
    _add_export_parser,
    _add_study_parser,
)
from fusedit.cli.sample import _add_sample_parser, _add_serve_parser
from fusedit.cli.train import _add_demo_parser, _add_train_parser
from fusedit.config import ConfigError, RunStopped

# How long a rank other than 0 waits to exit after rank 0's start-up error (_error_said_by).
RANK_0_FIRST_S = 2.0

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

# The commands that write only inside _kept_on_interrupt, whose Ctrl+C line says what they kept, and those that
# write nothing (serve's images live in memory): a Ctrl+C without such a line came before anything was written
# (while the libraries load, say, or the config). Any other may have written part of its output.
_WRITE_WHEN_KEPT = (
    "train",
    "sample",
    "serve",
    "eval",
    "study",
    "cache-latents",
    "describe",
    "config",
    "presets",
)


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
    joined = _groups_joined()  # a process group joined by this command ends it with os._exit on an error
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
    # Bad input is a ConfigError (the library raises it for every value, file or argument a user gave) and an
    # outcome outside the code an OSError (a missing or unwritable file, a full disk, CheckpointNotSaved);
    # FloatingPointError: training stopped at train.max_bad_steps NaN/inf steps in a row (its message says
    # what to change). Each is one line. A plain ValueError or TypeError is a bug: it keeps its traceback.
    # Each handler ends a process that joined a process group inside the handler, before the error (and the
    # DDP wrapper its traceback holds) is freed: _leave.
    except (ConfigError, OSError, FloatingPointError, RunStopped) as e:
        said_by = getattr(e, "said_by", None)  # another rank prints this same error (cmd_train, train)
        if said_by:
            return _leave(_error_said_by(said_by), joined)
        return _leave(_error(str(e)), joined)
    except KeyboardInterrupt as e:
        # Ctrl+C: one line of what was kept, not a traceback of wherever the work happened to be; 130 is
        # the shell's status for a command stopped by SIGINT.
        early = "stopped before anything was written; rerun the same command"
        _error(
            str(e) or (early if args.command in _WRITE_WHEN_KEPT else "stopped before the end"), "interrupted"
        )
        return _leave(130, joined)
    except Exception as e:
        # Running out of memory (torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError) is the
        # size of what was asked for, not a bug: one line, not a traceback. Anything else is a bug: its
        # traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, RuntimeError) and (
            type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in first
        ):
            return _leave(
                _error(
                    f"out of memory: {first[:300]} (allowed: less at once: a smaller image size, batch or "
                    "model, or a device with more memory)"
                ),
                joined,
            )
        _leave_after_traceback(joined)
        raise


def _groups_joined() -> int:
    """How many process groups this process has joined (0 where the training code was never imported)."""
    distributed = sys.modules.get("fusedit.train.distributed")
    return distributed.groups_joined() if distributed is not None else 0


def _leave(status: int, joined: int) -> int:
    """``status``, returned; or, where the command joined a process group (a `fusedit train` under torchrun),
    the process ended with it at once: unwinding can deadlock there (distributed.end_process)."""
    if _groups_joined() > joined:
        from fusedit.train.distributed import end_process

        end_process(status)
    return status


def _leave_after_traceback(joined: int) -> None:
    """A bug's traceback, as Python prints an uncaught one, and its status 1, for a command that joined a
    process group (_leave); any other goes on raising."""
    if _groups_joined() > joined:
        traceback.print_exc()
        _leave(1, joined)


def _error_said_by(who: str) -> int:
    """The short line of a rank that stopped at start-up with the error ``who`` (rank 0, or its machine's
    local rank 0) prints: not 32 copies of one refusal on 4 nodes x 8 GPUs. It exits a moment later:
    torchrun stops every rank as soon as one exits with an error, and ``who`` is to print it first."""
    status = _error(f"stopped at start-up, as {who} did: its error says why")
    time.sleep(RANK_0_FIRST_S)
    return status


def _error(message: str, what: str = "error") -> int:
    """The one line a refused command prints (exit status 2); ``what`` heads it."""
    world = os.environ.get("WORLD_SIZE", "")
    # Under torchrun every rank fails alike: say whose line it is, and write it whole, as one flushed
    # write, so that the ranks' lines do not run together.
    who = f" (rank {os.environ.get('RANK', '?')})" if world.isdigit() and int(world) > 1 else ""
    _close_bars()
    sys.stderr.write(f"fusedit: {what}{who}: {message}\n")
    sys.stderr.flush()
    return 2


def _close_bars() -> None:
    """Close the progress bars still open (a Ctrl+C or an error leaves the work's bar drawn): the line then
    starts on a line of its own, not glued to the bar's, and no bar is redrawn below it when the bar is
    collected later. A bar made with leave=True keeps its last line, a transient one is cleared. tqdm keeps
    its open bars in a class-wide set, shared by tqdm.auto's and every other subclass; it has no public
    list of them."""
    if "tqdm" not in sys.modules:  # no bar was ever made
        return
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()
