"""`fusedit train` and `fusedit demo`."""

from __future__ import annotations

import os
import re
import shlex
import time
from pathlib import Path

from fusedit.cli.common import _add_config_args, _kept_on_interrupt, _out_folder, log
from fusedit.config import ConfigError, RunStopped, default_run_folder, load_config, resolved_stages

# What a run writes into its folder: train (skipped_list_name's lists, the loggers' folders, previews), the
# demo's plots, `fusedit eval`'s default --out RUN/eval, and hidden temporaries (a ".NAME.deleting").
_RUN_ENTRIES = re.compile(
    r"config\.yaml|checkpoints|metrics\.jsonl|train\.lock|skipped(\.\w+)*\.jsonl|tensorboard|wandb|wandb_run_id|"
    r"previews|eval|loss\.png|samples\.png|\..*"
)


def _warn_other_files(out: Path) -> None:
    """A new run's ``out`` that holds what no run writes (an earlier sample's images, a user's files) is
    trained into all the same, since an earlier run's folder must keep working and nothing there is deleted,
    but said in one line: the run's files land beside them, and `fusedit sample` then refuses the folder."""
    from fusedit.train.distributed import rank_0_before_setup

    if not rank_0_before_setup() or not out.is_dir():  # said once under torchrun
        return
    other = min((p for p in out.iterdir() if not _RUN_ENTRIES.fullmatch(p.name)), default=None)
    if other is not None:
        example = f"the folder {other.name!r}" if other.is_dir() else repr(other.name)
        log.warning(
            "%r already holds files that are not a run's (e.g. %s): the run's files go beside them",
            str(out),
            example,
        )


def _train_kept(out: Path, args, started: float) -> str:
    """What an interrupted training run kept: the checkpoint --resume would take, and the command."""
    from fusedit.checkpoints import redone_steps
    from fusedit.train.run_folder import kept_checkpoint

    ckpt, earlier = kept_checkpoint(out, started if args.overwrite else None)
    if earlier:
        return f"the earlier run in {out} was not deleted yet; rerun the same command to start over"
    if ckpt is None:  # the same command is not refused: nothing would be lost
        return f"no checkpoint was saved yet in {out}; rerun the same command to start again"
    go_on = "rerun the same command" + (" with --resume in place of --overwrite" if args.overwrite else "")
    go_on += "" if args.resume or args.overwrite else " with --resume"
    return f"the last checkpoint is {ckpt}{redone_steps(out, ckpt)}; {go_on} to continue from it"


def cmd_train(args) -> int:
    from fusedit.train import distributed
    from fusedit.train.loop import train
    from fusedit.train.run_folder import RunExists

    folders: list[Path] = []  # the model folders the config came from
    with distributed.refused_alike_per_machine():
        if args.stop_at is not None and args.stop_at < 1:
            raise ConfigError(f"--stop-at {args.stop_at} is not allowed (allowed: a step number, 1 or more)")
        # Every process loads the same config: the settings that change nothing and the overrides no key
        # reads are said once, not once per GPU.
        with distributed.quiet_unless_main():
            cfg = load_config(args.config, args.overrides, folders=folders)
    if args.stop_at is not None and args.stop_at > cfg.train.steps and distributed.rank_0_before_setup():
        log.warning(
            "--stop-at %d is beyond train.steps=%d: the run ends at step %d first",
            args.stop_at,
            cfg.train.steps,
            cfg.train.steps,
        )
    out = _out_folder(args.out or default_run_folder(cfg.name))
    if not args.resume:
        _warn_weights_not_taken(folders, cfg.train.init_from)
        _warn_other_files(out)
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
        worded = RunExists(e.run_dir, e.step, advice)
        worded.said_by = getattr(e, "said_by", None)  # train(): rank 0 refuses alike
        raise worded from None
    except RunStopped as e:  # what is kept, and the command that goes on, for the flags given
        raise RunStopped(e.reason, _train_kept(out, args, started)) from e
    if result.get("rank", 0) != 0:
        return 0
    step, where = result["step"], f"checkpoints in {out / 'checkpoints'}"
    if step > result["start_step"]:
        on = ""
        if step < resolved_stages(cfg)[-1].end:  # --stop-at stopped it before its last stage's end
            flag = " with --resume in place of --overwrite" if args.overwrite else " with --resume"
            flag = "" if args.resume else flag
            on = f"; continue with the same command{flag}, without --stop-at or with a later one"
        print(f"trained to step {step}; {where}{on}")
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
    from fusedit.train.distributed import rank_0_before_setup

    if not rank_0_before_setup():  # said once under torchrun
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
    _warn_other_files(out)
    t0 = time.time()
    with _kept_on_interrupt(lambda: _demo_kept(out, args, cfg.train.steps, t0)):
        r = run_demo(cfg, out, progress=not args.quiet, overwrite=args.overwrite)
    print(f"demo finished in {time.time() - t0:.0f}s (final loss {r['final_loss']:.4f})")
    print(f"  samples:     {r['samples']}")
    print(f"  loss curve:  {r['loss_curve']}")
    print(f"  checkpoints: {r['checkpoint']}")
    return 0


def _demo_kept(out: Path, args, steps: int, started: float) -> str:
    """What an interrupted `fusedit demo` kept in ``out``, and the commands that go on: the demo trains
    afresh, and a folder whose run it stopped (no loss curve and sample sheet yet) is refused without
    --overwrite (check_demo_folder), while `fusedit train --resume` finishes the run's training (the demo's
    preset and overrides, ``steps`` long)."""
    from fusedit.checkpoints import load_state
    from fusedit.demo import check_demo_folder
    from fusedit.train.run_folder import RunExists, kept_checkpoint

    ckpt, earlier = kept_checkpoint(out, started)
    if earlier:
        return f"the earlier run in {out} was not deleted yet; rerun the same command to start over"
    if ckpt is None:
        return f"no checkpoint was saved yet in {out}; rerun the same command to start again"
    try:  # an earlier demo's plots, still there, let the same command start over
        check_demo_folder(out, args.overwrite)
        again = "rerun the same command"
    except RunExists:
        again = "rerun the same command with --overwrite"
    step = int(load_state(ckpt)["step"])
    if step >= steps:  # stopped in the loss curve or the sample sheet
        return (
            f"the demo's run in {out} finished training (checkpoint {ckpt}) but not its sample sheet; "
            f"{again} to run the demo over, or sample the run with `fusedit sample {out} --prompt ...`"
        )
    resume = shlex.join(["fusedit", "train", "debug", *args.overrides, "--out", str(out), "--resume"])
    return (
        f"the demo's run in {out} stopped; its last checkpoint is {ckpt} (step {step} of {steps}); {again} to "
        f"run the demo over, or `{resume}` to finish its training (without the demo's plots)"
    )


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
        help="run in a folder that holds another run, deleting its checkpoints and metrics (an earlier demo's "
        "run is replaced without it)",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_demo)
