"""The training loop, top to bottom: build, (resume), then for each step: batch -> text context once ->
flow-matching loss -> AdamW step -> EMA -> log -> atomic checkpoint.

Everything random in a step is a function of (seed, step) and the sample's position in the step's global
batch (:mod:`fusedit.train.seeding`), so a run resumed from a checkpoint continues with exactly the
losses of an uninterrupted run.

A run is a list of stages (config ``stages``; one implicit stage without them): each stage trains its own
parts at its own resolution, batch, data and learning rates, starting from the previous stage's weights,
EMA and (where the parameter set allows) optimizer state (fusedit.train.stages). Stage boundaries are
global step numbers; a stage's learning-rate schedule and data order count from its first step (its data
seeded by train.seed + stage index), while noise, timesteps and dropout stay functions of the global step.
Checkpoints record their stage, so a run resumes at any step of any stage with the uninterrupted losses.

Under torchrun (``torchrun --nproc_per_node N -m fusedit train ...``) every process runs this same loop on
its share of each global batch of ``batch_size * grad_accum * N`` samples: the denoiser is wrapped by DDP
or sharded by FSDP2 (``train.parallel``), checkpoints go through Distributed Checkpoint, and rank 0 alone
logs, writes metrics and publishes checkpoints (see :mod:`fusedit.train.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from fusedit.adapters import DENOISER, Parts, has_adapters, text_modules
from fusedit.checkpoints import (
    EMA_MOSTLY_START,
    ema_start_share,
    find_checkpoint,
    load_checkpoint_config,
    load_state,
    saved_shapes,
    saved_vocabulary,
    stage_of_checkpoint,
)
from fusedit.config import (
    Config,
    ConfigError,
    RunStopped,
    Stage,
    TextConfig,
    TrainConfig,
    checked,
    gone_model_paths,
    is_deep,
    is_path_to_nothing,
    model_paths,
    refuse_path_to_nothing,
    resolved_stages,
    save_config,
    text_sections,
    with_model_llm_fields,
)
from fusedit.data.loader import PlanFailedElsewhere, check_data_paths, step_loader
from fusedit.data.skips import NotUTF8Count, merged_skip_report
from fusedit.devices import host_to_device
from fusedit.files import remove_folder
from fusedit.flow import caption_keep, flow_loss, interpolate, sample_training_times
from fusedit.system import TextToImage, build_model, uses_bf16
from fusedit.text.context import TextContext
from fusedit.text.llm import check_llm
from fusedit.train import distributed
from fusedit.train.checkpoint import (
    CheckpointNotSaved,
    check_same_model,
    data_state_name,
    init_source,
    init_weights,
    load_training_state,
    save_checkpoint,
    save_distributed_checkpoint,
    sweep_leftovers,
)
from fusedit.train.data_state import (
    resplit_keys,
    saved_data_state,
    skipped_list_name,
    where_listed,
    write_skipped,
)
from fusedit.train.distributed import DistEnv
from fusedit.train.ema import EMA
from fusedit.train.loggers import WandbLogger, check_loggers, open_loggers
from fusedit.train.run_folder import hold_run_folder, how_to_go_on, refuse_a_run, rewind_metrics
from fusedit.train.seeding import global_generator, sample_generators, sample_noise, step_generator
from fusedit.train.stages import (
    Optimizers,
    apply_parts,
    check_stages,
    check_stages_run,
    idle_settings,
    llm_base_changed,
)

log = logging.getLogger(__name__)

# The longest example of a truncated caption the first-truncation warning shows, in characters.
EXAMPLE_CHARS = 80
# How many of a step's captions a preview grid (train.preview_every) samples.
PREVIEW_IMAGES = 8


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``cfg`` into ``run_dir``. ``stop_at`` ends early (as an interruption would) after that step.

    ``resume`` continues the run in ``run_dir`` from its last checkpoint (from step 0 when it has none).
    Without it the run starts afresh, which deletes the checkpoints, metrics and logs of a run already in
    ``run_dir``: refused (RunExists, a ConfigError) unless ``overwrite`` is given. ``cfg`` is checked as
    a config file is (``fusedit.config.checked``: a config edited in Python) and not modified; the run saves
    the checked copy, whose existing paths are absolute, so a resume from another working directory finds
    its data and models.

    Under torchrun this process joins the process group (NCCL on CUDA, gloo on the CPU), trains its share
    and leaves the group at the end; a group the caller initialised is used and left up.

    The initial weights are drawn from torch's global generator seeded with train.seed, inside a fork of
    it: the caller's generator is as it was when train() returns, and train() calls in threads build the
    weights a call alone would (a build_model elsewhere at the same time draws from the same generator).
    Ctrl+C raises KeyboardInterrupt with a note of what is kept and how to go on.

    Returns {"losses": [...] global mean loss of the steps run in this call, "step": the step the run is at
    now, "start_step": the step this call started from (both the same when it trained nothing: a run
    already at ``stop_at`` or at train.steps), "run_dir" (a Path), "model", "ema", "skipped_steps" (the
    run's updates skipped for a NaN/inf loss, across resumes), "truncated_prompts" (the run's prompts cut to
    a text encoder's limit, across resumes), "rank", "world_size"}.

    "model" is the TextToImage as trained: the raw weights, not their EMA, in train mode (LoRA adapters
    live). The model `fusedit sample` uses holds the EMA weights (sample.use_ema) with adapters merged, in
    eval mode: ``fusedit.checkpoints.load_model(run_dir)`` loads it from the last checkpoint. "ema" is the
    fusedit.train.ema.EMA, whose ``state_dict()`` holds those weights by the denoiser's parameter names.
    """
    # Before anything is set up or deleted: a fresh run with stop_at <= 0 would wipe the run folder's
    # checkpoints and train nothing.
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"stop_at={stop_at} is not allowed (allowed: a step number, 1 or more, or None)")
    # Before the process group: every process of a machine reads the same config and files, so its local
    # rank 0 says the refusal (`fusedit train` prints the others' short line).
    with distributed.refused_alike_per_machine():
        # A config edited in Python is checked as a file is, on a copy whose existing paths are absolute (the
        # config a run saves must find them from another working directory: cfg.data.root = "imgs").
        cfg = checked(cfg)
        _check_before_start(cfg, resume)
        if not resume:
            _check_init_from(Path(run_dir), cfg)
    # When a Ctrl+C or a stop names the checkpoint to resume from, an older one is the earlier run that
    # ``overwrite`` was to delete (its deletion comes after the build).
    replaced_before = None if resume else time.time()
    env = distributed.setup(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        # One job per run folder, seen by every rank: checked before anything is read, built or deleted.
        with (
            distributed.released_on_failure(env),
            distributed.quiet_unless_main(env),
            hold_run_folder(Path(run_dir), env),
        ):
            if not (resume or overwrite):  # a re-run notebook cell, a forgotten resume=True: the run is lost
                refuse_a_run(run_dir)  # under the lock: no other job adds a checkpoint in between
            return _train(cfg, Path(run_dir), env, resume=resume, stop_at=stop_at, progress=progress)
    except KeyboardInterrupt as e:
        # A notebook shows the notes under the exception (`fusedit train` prints its own line, for its flags).
        if hasattr(e, "add_note"):  # Python 3.11 and later
            e.add_note(how_to_go_on(Path(run_dir), replaced_before))
        raise
    except ConfigError as e:
        # A refusal every rank meets alike (a config check, the lock) is printed by rank 0 alone
        # (`fusedit train` reads the mark); the library raises it on every rank all the same.
        if distributed.said_by_rank_0(e, env):
            e.said_by = "rank 0"
        raise
    except CheckpointNotSaved as e:  # a full disk, say: what failed, then the checkpoint a resume takes
        raise RunStopped(str(e), how_to_go_on(Path(run_dir), replaced_before)) from e
    except RuntimeError as e:
        if env.world_size > 1 and (distributed.peer_failure(e) or isinstance(e, PlanFailedElsewhere)):
            # The failed process says why in its own error (a traceback, a data error of its share): this
            # rank only lost it, and cannot tell whether the same command would fail again. Ranks whose
            # bucket planning failed said so at once (PlanFailedElsewhere): no process waited for them.
            what = (
                f"another process of the job failed ({distributed.error_summary(e)})"
                if isinstance(e, PlanFailedElsewhere)
                else f"another process of the job failed or stopped answering ({distributed.error_summary(e)}; a "
                f"process waits train.dist_timeout_s={cfg.train.dist_timeout_s:g} s for the others)"
            )
            raise RunStopped(
                f"{what}: that process's own error, printed above or in its log, may say why and what to "
                "change first",
                how_to_go_on(Path(run_dir), replaced_before),
            ) from e
        raise
    finally:
        distributed.teardown(env)


def _check_before_start(cfg: Config, resume: bool) -> None:
    """What a config alone decides, refused before the run folder is made and locked (a refused run left
    one behind, holding train.lock and the loggers opened before the failing one): each stage's data
    locations (and a local Hugging Face dataset's split and columns), the loggers' packages, each LLM's
    family and attention kernel (check_llm: from its config, no weights), and model folders written as
    paths to nothing."""
    # A resumed run's LLM folder that moved is named later with the way on (the override to give it).
    gone = gone_model_paths(cfg) if resume else {}
    for i, (key, text) in enumerate(text_sections(cfg)):
        if f"{key}.model_id" not in gone:
            try:
                check_llm(text, deep=is_deep(cfg.model.design), key=key)
            except ConfigError as e:
                raise ConfigError(f"{e}{_exported_llm_hint(cfg, i, key, text)}") from None
    # Every model folder written as a path (the tokenizers', the VAE's, the pooled text encoder's; an LLM's
    # check_llm named already): a typo or a folder on an unmounted disk, refused before the run folder
    # rather than by the build.
    for key, place in model_paths(cfg).items():
        if key not in gone:
            refuse_path_to_nothing(f"{key}={place!r}", place)
    for stage in resolved_stages(cfg):
        try:
            check_data_paths(stage.config.data, stage.config.vae)
        except ConfigError as e:
            raise ConfigError(f"{stage.where}: {e}" if cfg.stages else str(e)) from None
    check_loggers(cfg)


def _exported_llm_hint(cfg: Config, index: int, key: str, text: TextConfig) -> str:
    """The way on for the ``index``-th LLM's folder that is gone (written as a path to nothing) when
    train.init_from is an exported pipeline folder (`fusedit export`) holding that LLM and its tokenizer: the
    overrides that load them from there; else nothing. The export's config records the LLM's folder as the
    run had it, which a fine-tune elsewhere (another machine, a downloaded model) does not have."""
    from fusedit.pipeline import LLM_SLOTS

    source = cfg.train.init_from
    place = text.model_id
    if not (source and place and is_path_to_nothing(place)) or index >= len(LLM_SLOTS):
        return ""
    tokenizer, encoder = (Path(source) / name for name in LLM_SLOTS[index])
    if not (encoder.is_dir() and tokenizer.is_dir()):
        return ""
    return (
        f"; train.init_from={source!r} holds the LLM it was exported with: give {key}.model_id={encoder} "
        f"{key}.tokenizer={tokenizer}"
    )


def _check_init_from(run_dir: Path, cfg: Config) -> None:
    """A fresh run deletes its folder's checkpoints before it loads train.init_from, so that is checked
    first: weights in the run folder itself (the run being fine-tuned, given as its own --out with
    --overwrite) would be lost, and the load fail; and a path that holds nothing to start from (a typo)
    would fail only after an earlier run there was deleted. An LLM that text.pretrain_steps (or
    extra_text.N.pretrain_steps) would pretrain is refused when train.init_from holds that LLM: its
    weights would replace the pretrained ones, while the saved config said they were pretrained."""
    source = cfg.train.init_from
    if not source:
        return
    if Path(source).resolve().is_relative_to(run_dir.resolve()):
        raise ConfigError(
            f"train.init_from={source!r} lies in the run folder {str(run_dir)!r}, whose checkpoints a fresh run "
            "deletes before it loads them (allowed: another run folder for the fine-tune)"
        )
    init_source(source)
    sections = {"llm": ("text", cfg.text)} | {
        f"llm_extra{i}": (f"extra_text.{i}", t) for i, t in enumerate(cfg.extra_text)
    }
    held = initialised_llms(cfg, sections)
    for key, (where, text) in sections.items():
        if text.pretrain_steps and key in held:
            raise ConfigError(
                f"{where}.pretrain_steps={text.pretrain_steps} pretrains an LLM that train.init_from={source!r} "
                f"replaces with the one it holds (allowed: {where}.pretrain_steps=0 with that init_from)"
            )


def _train(cfg: Config, run_dir: Path, env: DistEnv, *, resume: bool, stop_at: int | None, progress: bool):
    main = env.is_main
    if main:  # before anything is written: a resume onto a disk that a killed save filled gets the space back
        sweep_leftovers(run_dir / "checkpoints")
    parallel = distributed.resolve_parallel(cfg.train.parallel, env)
    metrics_path = run_dir / "metrics.jsonl"
    cfg, ckpt, saved, saved_cfg, start = _resume_point(cfg, run_dir, env, resume)
    tc = cfg.train  # the run-wide settings; each stage trains with its own stage.config.train
    stages = resolved_stages(cfg)
    check_stages_run(cfg, stages, parallel, env.world_size)
    if main and is_deep(cfg.model.design) and cfg.text.hidden_layer != -1:
        # Not refused: a study's base may set it for its shallow designs, beside a deep one.
        log.warning(
            "text.hidden_layer=%d does nothing for model.design=%r, which fuses the LLM layer by layer "
            "(model.num_layers, model.initial_layers); the shallow designs read it",
            cfg.text.hidden_layer,
            cfg.model.design,
        )

    # A resumed run keeps the built-in tokenizer's ids it was trained with, whatever the current code's words.
    vocabulary = saved_vocabulary(ckpt) if ckpt is not None else None
    with global_generator(env.device, tc.seed):  # the weights train.seed has always given
        model = build_model(cfg, env.device, vocabulary=vocabulary)
    check_stages(model, stages)
    if ckpt is None:
        _start_fresh(cfg, model, run_dir, metrics_path, main, progress)
    # Placed against the stages the checkpoint was written under too: an earlier stage made longer or
    # shorter would move the stage's start under its data position.
    first = (
        stage_of_checkpoint(stages, start, saved.get("stage"), resolved_stages(saved_cfg))
        if saved
        else stages[0]
    )
    if saved and main:  # before the file is opened for appending: the rewind replaces it
        rewind_metrics(metrics_path, start)
    sharded_llms = _distribute_llms(cfg, model, env)
    if tc.compile:  # once for the whole run: a later stage's new shapes or adapters recompile the graphs
        model.compile_parts(tc.compile, tc.activation_memory_budget)  # DiT blocks and each LLM

    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    model.denoiser.train()
    with contextlib.ExitStack() as stack:
        loggers = open_loggers(cfg, run_dir, start if ckpt is not None else None) if main else []
        for logger in loggers:
            stack.callback(logger.close)
        bar = tqdm(
            total=max(0, end - start), desc=f"train {cfg.name}", disable=not (progress and main), unit="step"
        )
        stack.callback(bar.close)
        run = _Run(cfg, model, env, run_dir, parallel, sharded_llms, loggers, bar)
        if env.world_size > 1:
            run.launcher = os.getppid()
        if saved:  # the counts of skipped steps and truncated prompts go on across a resume, as the run does
            run.bad_total = int(saved.get("skipped_steps", 0))
            run.bad_in_row = int(saved.get("bad_steps_in_row", 0))
            _resume_truncated(run, saved, start)
        if main:
            run.metrics = stack.enter_context(metrics_path.open("a"))
        ema = _train_stages(run, stages[first.index :], start, end, ckpt)
    if main and run.truncated:  # the run warned at its first truncation only
        some = "a prompt" if run.truncated == 1 else f"{run.truncated} prompts"
        since = (
            f"since the resume at step {run.truncated_since} that set this limit"
            if run.truncated_since
            else "in this run"
        )
        log.info(
            "text: %s longer than %s tokens %s truncated %s (to step %d)",
            some,
            model.limits,
            "was" if run.truncated == 1 else "were",
            since,
            max(start, end),
        )
    # Rank 0 publishes the last checkpoint before any rank returns (or leaves the process group).
    distributed.barrier(env)
    return {
        "losses": run.losses,
        "step": max(start, end),
        "start_step": start,
        "run_dir": run_dir,
        "model": model,
        "ema": ema,
        "skipped_steps": run.bad_total,
        "truncated_prompts": run.truncated,
        "rank": env.rank,
        "world_size": env.world_size,
    }


def _resume_point(
    cfg: Config, run_dir: Path, env: DistEnv, resume: bool
) -> tuple[Config, Path | None, dict | None, Config | None, int]:
    """(config, checkpoint, its saved state, its saved config, its step) that the run continues from; (cfg,
    None, None, None, 0) for a fresh run, or for --resume with no checkpoint yet. Checked against ``cfg``
    before the (slow) model build. A resumed run's config keeps the train.init_from it started from
    (_kept_init_from)."""
    tc = cfg.train
    ckpt = None
    if resume:
        try:
            ckpt = find_checkpoint(run_dir)
        except FileNotFoundError:
            if env.is_main:
                log.warning("--resume: no checkpoint in %s yet, starting from step 0", run_dir)
        found = distributed.broadcast_object(None if ckpt is None else str(ckpt), env)
        ckpt = None if found is None else Path(found)
    saved = load_state(ckpt) if ckpt is not None else None
    saved_cfg = load_checkpoint_config(ckpt) if saved else None
    start = int(saved["step"]) if saved else 0
    if saved:
        cfg, ignored = _kept_init_from(cfg, saved_cfg)
        resplit = resplit_keys(saved, saved_cfg, cfg, env)
        changed = check_same_model(ckpt, cfg, saved_cfg, unchanged=resplit) + ignored
        if changed and env.is_main:
            log.warning(
                "resuming %s with %d changed setting(s): %s", ckpt.name, len(changed), "; ".join(changed)
            )
        if env.is_main:
            _warn_schedule_change(saved_cfg, cfg, start)
        if start > tc.steps:
            raise ConfigError(
                f"the run is at step {start}, past train.steps={tc.steps} (allowed: train.steps >= {start} "
                "to resume it)"
            )
    return cfg, ckpt, saved, saved_cfg, start


def _warn_schedule_change(saved_cfg: Config, cfg: Config, start: int) -> None:
    """A resume with another train.steps (left out of the changed settings: extending a run is what a
    resume is for) that moves the learning rate of its next step: a cosine schedule decays to 0 at
    train.steps, so a finished run extended from 200 to 400 steps jumps from about 0 back to most of
    train.lr. The rate it is compared with is the one the checkpoint's config gave (its lr, warmup and
    schedule, each named where the resume changes it too; a resume that changes only those is told by the
    list of changed settings). A staged run's length is its stages' (stages.N.steps, listed as changed)."""
    old, tc = saved_cfg.train, cfg.train
    if old.steps == tc.steps or cfg.stages or saved_cfg.stages:
        return
    now = learning_rate(start, tc.lr, tc.warmup_steps, tc.schedule, tc.steps)
    if math.isclose(learning_rate(start, tc.lr, tc.warmup_steps, tc.schedule, old.steps), now, rel_tol=1e-6):
        return  # the new train.steps alone leaves the step's rate as it was
    before = learning_rate(start, old.lr, old.warmup_steps, old.schedule, old.steps)
    if old.schedule == tc.schedule:
        change = f"{'stretches' if tc.steps > old.steps else 'shortens'} the {tc.schedule} schedule"
    else:
        change = f"with train.schedule {old.schedule} -> {tc.schedule}"
    was = [f"train.steps={old.steps}"] + [
        f"train.{k}={getattr(old, k)}"
        for k in ("lr", "warmup_steps", "schedule")
        if getattr(old, k) != getattr(tc, k)
    ]
    log.warning(
        "train.steps %d -> %d %s: the learning rate of step %d is %.3g, where %s gave %.3g",
        old.steps,
        tc.steps,
        change,
        start + 1,
        now,
        ", ".join(was),
        before,
    )


def _resume_truncated(run: _Run, saved: dict, start: int) -> None:
    """The run's count of truncated prompts from the checkpoint's state: it goes on when the prompt limits
    are those it was counted at, and starts again when a resume changed them (text.max_length=32 after
    16): prompts cut at the old limit are not cut at the new one, and the first cut at the new limit is
    said with its example. A checkpoint written before the limits were saved counts at the current ones."""
    count = int(saved.get("truncated_prompts", 0))
    limits = saved.get("truncated_prompts_at", run.model.limits)
    if limits == run.model.limits:
        run.truncated, run.truncated_since = count, int(saved.get("truncated_prompts_since", 0))
        return
    run.truncated_since = start
    if count and run.env.is_main:
        some = "a prompt" if count == 1 else f"{count} prompts"
        log.info(
            "text: %s %s truncated at %s to step %d; counted again from here at %s",
            some,
            "was" if count == 1 else "were",
            limits,
            start,
            run.model.limits,
        )


def _kept_init_from(cfg: Config, saved_cfg: Config) -> tuple[Config, list[str]]:
    """``cfg`` with the train.init_from of the run the checkpoint belongs to, and the change it undoes in the
    words of the resume's changed settings (none when the same). train.init_from is read only at step 0
    (_start_fresh): a resumed run goes on from its checkpoint, and the config it saves must name where its
    weights came from, not a path they never came from. ``saved_cfg``: the checkpoint's config."""
    started_from = saved_cfg.train.init_from
    given = cfg.train.init_from
    if given == started_from:
        return cfg, []
    kept = replace(cfg, train=replace(cfg.train, init_from=started_from))
    afresh = f"; to start from {given!r}, train afresh into another folder" if given else ""
    return kept, [
        f"train.init_from: {started_from!r} -> {given!r} ignored (read only when a run starts: the run and "
        f"its saved config keep {started_from!r}{afresh})"
    ]


def _start_fresh(
    cfg: Config, model: TextToImage, run_dir: Path, metrics_path: Path, main: bool, progress: bool
) -> None:
    """A run from step 0: an earlier run's outputs in ``run_dir`` go, each LLM without a hub id is pretrained
    (its text.pretrain_steps or extra_text.N.pretrain_steps) and train.init_from's weights are loaded."""
    tc = cfg.train
    if main:
        metrics_path.unlink(missing_ok=True)
        # An earlier run's lists of skipped samples, which this run's would not all replace.
        for stale in [*run_dir.glob("skipped.jsonl"), *run_dir.glob("skipped.*.jsonl")]:
            stale.unlink(missing_ok=True)
        # An earlier run's checkpoints past this run's steps would outlive its own (pruning keeps the newest
        # train.keep_checkpoints, and each finished stage's last) and be what sampling and --resume find.
        # Renamed aside first: a kill while deleting them must not leave torn checkpoints that --resume
        # would find.
        remove_folder(run_dir / "checkpoints")
        # An earlier run's TensorBoard events would show next to this run's at the same steps (TensorBoard
        # reads every event file of the folder), and a later --resume would continue its wandb run.
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        (run_dir / WandbLogger.ID_FILE).unlink(missing_ok=True)
        # `fusedit eval`'s results (its default --out, RUN/eval/) scored the deleted model: kept, they would
        # pass for this run's, and a shapes bench's scores.json would stand until the same bench is rerun.
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
    pretrain = [
        (encoder, tcfg.pretrain_steps)
        for encoder, tcfg in zip(model.encoders, [cfg.text, *cfg.extra_text], strict=True)
        if tcfg.pretrain_steps  # a random-init LLM's: validate refuses it with a model_id
    ]
    if pretrain:
        from fusedit.data.shapes import caption_corpus
        from fusedit.train.pretrain_llm import pretrain_llm

        corpus = caption_corpus(4096, seed=tc.seed)
        for encoder, steps in pretrain:
            pretrain_llm(encoder, corpus, steps, seed=tc.seed, progress=progress and main)
    if tc.init_from:
        log.info("weights initialised from %s", init_weights(model, tc.init_from, cfg))
    _warn_ema_holds_the_start(cfg)


def _warn_ema_holds_the_start(cfg: Config) -> None:
    """A run whose EMA (what sample, export, serve and eval load: sample.use_ema) would still hold most of
    the weights it started from at its end: a short run at the defaults (0.99 every 100 steps) barely moves
    it, or never updates it; a fine-tune then looks like it did nothing, and a run from scratch samples
    noise from its random initial weights."""
    kept = ema_start_share(cfg, cfg.train.steps)
    if cfg.sample.use_ema and kept > EMA_MOSTLY_START:
        log.warning(
            "the EMA weights, which sampling and export use (sample.use_ema), will still hold %.0f%% of "
            "%s at step %d (train.ema_decay=%g every train.ema_every=%d steps): lower them, or sample with "
            "--no-ema",
            100 * kept,
            "train.init_from's" if cfg.train.init_from else "the random initial weights",
            cfg.train.steps,
            cfg.train.ema_decay,
            cfg.train.ema_every,
        )


def _distribute_llms(cfg: Config, model: TextToImage, env: DistEnv) -> list:
    """Under torchrun, the LLMs no hub id loads made rank 0's on every rank, and with train.shard_llm every
    (frozen) LLM sharded; returns the sharded ones, which the step reshards after each text forward."""
    sharded_llms = []
    if env.distributed:
        # Built at random or pretrained by every rank: rank 0's copies are the ones that are saved.
        for tcfg, llm in zip([cfg.text, *cfg.extra_text], text_modules(model).values()):
            if not tcfg.model_id:
                distributed.broadcast_module(llm)
        if cfg.train.shard_llm:  # validated: no stage trains the LLM
            for encoder in model.encoders:
                distributed.shard_frozen(encoder.llm)
                sharded_llms.append(encoder.llm)
    return sharded_llms


def _train_stages(run: _Run, stages: list[Stage], start: int, end: int, ckpt: Path | None) -> EMA:
    """Train ``stages`` (the first is the one the run is at) up to global step ``end``; the first resumes
    from ``ckpt``, each later one carries weights, EMA and Adam state from the one before. Returns the EMA."""
    model, env, denoiser = run.model, run.env, run.model.denoiser
    parts = opts = ema = forward = stage_parallel = None
    for stage in stages:
        if stage.index > stages[0].index and stage.start >= end:
            break
        stc = stage.config.train
        # The stage's trainable parts, then the wrapper (DDP needs the parts set; FSDP2 shards once,
        # before any optimizer exists), then the optimizers over this stage's parameters.
        new_parts = Parts.of(stc)
        if ema is not None:  # merging adapters changes weights the host-held EMA may still be copying
            ema.settle()
        with global_generator(env.device):  # LoRA seeds its adapters' init in a fork of the global generator
            apply_parts(model, new_parts, parts, seed=run.cfg.train.seed, stage=stage.index)
        denoiser.set_gradient_checkpointing(stc.grad_checkpointing)
        if forward is None or (new_parts != parts and run.parallel == "ddp"):
            # DDP refuses a module without trainable weights: a stage that trains only the LLM runs the
            # denoiser unwrapped (the LLM's gradients are averaged by _Step).
            stage_parallel = run.parallel if any(p.requires_grad for p in denoiser.parameters()) else "none"
            forward = distributed.wrap_denoiser(
                denoiser, stage_parallel, env, uses_bf16(stc.precision, env.device)
            )
        new_opts = Optimizers.build(model, stc, env.device)
        if opts is None:
            ema, data_state = _start_state(run, stage, new_opts, ckpt, start, end)
        else:
            log.info("stage %d %r: %s", stage.index, stage.name, new_opts.carry_from(opts))
            ema.decay = stc.ema_decay
            data_state = None
        parts, opts = new_parts, new_opts
        steps = range(max(start, stage.start), min(stage.end, end))
        if steps:  # empty when resumed at this stage's last step
            run.stage(stage, steps, forward, stage_parallel, opts, ema, data_state)
    return ema


def _start_state(
    run: _Run, stage: Stage, opts: Optimizers, ckpt: Path | None, start: int, end: int
) -> tuple[EMA, dict | None]:
    """The EMA of this call's first stage and this rank's data position (None: from the step alone), both
    loaded with the weights and ``opts``' state from ``ckpt`` when the run resumes; then the config is saved,
    unless this call trains nothing (``start >= end``)."""
    env, denoiser = run.env, run.model.denoiser
    ema = EMA(denoiser, stage.config.train.ema_decay, offload=stage.config.train.ema_offload)
    data_state = None
    if ckpt is not None:
        text = text_modules(run.model)
        saved = load_training_state(ckpt, denoiser, opts.by_module, ema, text, distributed=env.distributed)
        log.info("resumed from %s (step %d, stage %d %r)", ckpt, start, stage.index, stage.name)
        data_state = saved_data_state(ckpt, saved, env, stage.config, stage.index, bool(run.cfg.stages))
    # Once the checkpoint is known to fit: a refused resume leaves the config as it was. So does a resume
    # that trains nothing (--stop-at at or below the run's step): overrides given with it (train.steps=...)
    # were never trained with, and a later plain --resume would take them from config.yaml.
    if env.is_main and start < end:
        save_config(run.saved_cfg, run.run_dir / "config.yaml")
    return ema, data_state


@dataclass
class _Run:
    """What the stages of one train() call share: the model, where outputs go, and the counters."""

    cfg: Config
    model: TextToImage
    env: DistEnv
    run_dir: Path
    parallel: str
    sharded_llms: list
    loggers: list
    bar: tqdm
    metrics: TextIO | None = None
    losses: list[float] = field(default_factory=list)
    bad_in_row: int = 0
    bad_total: int = 0
    # Prompts of the training batches cut to a text encoder's limit so far (text.max_length, an
    # extra_text's or pooled_text's; once however many cut it), over all ranks; previews do not count.
    truncated: int = 0
    # The step the count began at: 0, or that of the resume that changed the limits (_resume_truncated).
    truncated_since: int = 0
    # Under torchrun, the pid of the process that started this one: checked every step (launcher_gone).
    launcher: int | None = None

    @functools.cached_property
    def saved_cfg(self) -> Config:
        """The config the run saves (its config.yaml and every checkpoint's): each LLM's family and arch read
        once from its model's own config (with_model_llm_fields), so that all of them record the same LLM,
        even should its folder become unreadable mid-run."""
        return with_model_llm_fields(self.cfg)

    def stage(self, stage: Stage, steps: range, forward, stage_parallel, opts, ema, data_state) -> None:
        """Train ``steps`` (global step numbers) of ``stage``: batch -> text context once -> loss -> AdamW
        step -> EMA -> log -> atomic checkpoint (at checkpoint_every, the stage's end and the run's end)."""
        tc = stage.config.train
        _announce_stage(self.cfg, stage, self.env.is_main, self.env.world_size)
        skip_path = self.run_dir / skipped_list_name(self.env.rank, stage.index if self.cfg.stages else None)
        loader = self._loader(stage, steps, data_state, skip_path)
        train_step = _Step(self, stage, forward, stage_parallel, opts)
        save_text = saved_llms(self.cfg, self.model, stage.index)
        listed = False  # whether the skipped list was written at the last checkpoint
        for step, batch in zip(steps, loader):
            if self.launcher is not None and distributed.launcher_gone(self.launcher):
                if self.metrics is not None:  # the steps logged so far: those a resume redoes (how_to_go_on)
                    self.metrics.flush()
                raise RunStopped(
                    f"the launcher that started this process (pid {self.launcher}, torchrun's agent) is gone, "
                    f"so the job stops at step {step}",
                    how_to_go_on(self.run_dir),
                )
            t0 = time.perf_counter()
            loss, norm, truncated, lr, lrs = train_step(step, batch)
            if truncated and not self.truncated and self.env.is_main:
                # The same over-long captions come back batch after batch: the run's first are said (with
                # one of them, when this rank cut it), the rest only counted.
                cut = train_step.cut_example or ""
                # Clipped for the log and marked so: the model saw the tokens that fit, not these characters.
                shown = cut if len(cut) <= EXAMPLE_CHARS else cut[: EXAMPLE_CHARS - 1] + "…"
                example = f", e.g. {shown!r}" if cut else ""
                some = "a prompt" if truncated == 1 else f"{truncated} prompts"
                log.warning(
                    "step %d: %s longer than %s tokens %s truncated%s; later truncations are only counted "
                    '(metrics.jsonl\'s "truncated", and a total at the end)',
                    step + 1,
                    some,
                    # Another process may have cut at another limit: then every limit is named.
                    self.model.limits_of(train_step.cut_limits if self.env.world_size == 1 else ()),
                    "was" if truncated == 1 else "were",
                    example,
                )
            self.truncated += truncated
            # Every rank sees the same global loss and gradient norm, so all skip or all step together.
            if take_update(opts, ema, loss, norm):
                self.bad_in_row = 0
            else:
                self._count_bad_step(step, loss, norm, tc.max_bad_steps)
            if (step + 1) % tc.ema_every == 0:
                ema.update(self.model.denoiser)
            self.losses.append(loss)
            if self.metrics is not None:
                self._log_step(stage, step, loss, norm, lr, lrs, t0)
            self.bar.update(1)
            if tc.preview_every and (step + 1) % tc.preview_every == 0:
                captions = self._preview_captions(batch["caption"], tc)  # a collective: on every rank
                if self.env.is_main:
                    path = self.run_dir / "previews" / f"step_{step + 1:08d}.png"
                    _preview(self.model, stage.config, captions, path)
            if (step + 1) % tc.checkpoint_every == 0 or step + 1 == steps.stop:
                listed = self._checkpoint(stage, step, loader, opts, ema, save_text, skip_path)
        self._report_skipped(stage, loader, listed, skip_path)

    def _preview_captions(self, local: list[str], tc) -> list[str]:
        """The first PREVIEW_IMAGES captions of the step's global batch, whose rows are the ranks' local
        batches in rank order (_Step.first_row), so a preview grid is the same at any world size. Ranks
        gather them only where rank 0's rows are fewer; the condition reads the config alone, so every rank
        takes the same branch."""
        if self.env.world_size == 1 or tc.batch_size * tc.grad_accum >= PREVIEW_IMAGES:
            return local[:PREVIEW_IMAGES]
        return [c for rank in distributed.gather_object(list(local), self.env) for c in rank][:PREVIEW_IMAGES]

    def _loader(self, stage: Stage, steps: range, data_state: dict | None, skip_path: Path):
        """This rank's batches of ``steps``: its batch_size * grad_accum samples of every step (the loader's
        rank/world_size addressing). A stage's data is addressed by its own step count, in an order seeded
        by (train.seed + stage index)."""
        tc, env = stage.config.train, self.env
        return step_loader(
            stage.config.data,
            self.cfg.train.seed + stage.index,
            tc.batch_size * tc.grad_accum,
            steps.start - stage.start,
            steps.stop - stage.start,
            rank=env.rank,
            world_size=env.world_size,
            state=data_state,
            skip_list=str(skip_path),
            progress=not self.bar.disable,
            # Bucket planning split over the ranks (each reads its share of the image headers): every
            # rank builds its loader here, so every rank joins the exchange.
            gather=lambda obj: distributed.gather_object(obj, env),
        )

    def _count_bad_step(self, step: int, loss: float, norm: float, max_bad_steps: int) -> None:
        """Count a step whose update was skipped for a NaN/inf loss or gradient norm; too many in a row end
        the run."""
        self.bad_in_row, self.bad_total = self.bad_in_row + 1, self.bad_total + 1
        if self.env.is_main:
            log.warning("step %d: loss %s, grad norm %s: update skipped", step + 1, loss, norm)
        if self.bad_in_row >= max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_in_row} steps in a row had a NaN/inf loss or gradient (train.max_bad_steps="
                f"{max_bad_steps}) at step {step + 1}; lower train.lr or check the data"
            )

    def _log_step(self, stage: Stage, step: int, loss: float, norm: float, lr: float, lrs: dict, t0: float):
        """One line of metrics.jsonl and of every logger for ``step``; the bar shows the mean loss of the
        last train.log_every steps, when the metrics file is flushed too."""
        log_every = stage.config.train.log_every
        record = {
            "step": step + 1,
            "loss": loss,
            "grad_norm": norm,
            "lr": lr,
            "sec": round(time.perf_counter() - t0, 4),
        }
        if self.cfg.stages:
            record["stage"] = stage.index
        if "llm" in lrs:
            record["llm_lr"] = lrs["llm"]
        if self.truncated:  # the run's count so far, from the first truncation on
            record["truncated"] = self.truncated
        self.metrics.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.log(record, step + 1)
        if (step + 1) % log_every == 0:
            self.metrics.flush()
            # A step skipped for a NaN/inf loss (train.max_bad_steps) records that loss: not averaged in.
            recent = [loss for loss in self.losses[-log_every:] if math.isfinite(loss)]
            if recent:
                self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")

    def _checkpoint(self, stage: Stage, step: int, loader, opts: Optimizers, ema: EMA, save_text, skip_path):
        """The atomic checkpoint after ``step``, with this rank's data position (Distributed Checkpoint under
        torchrun); returns whether the list of skipped samples was written beside it."""
        cfg, env, denoiser, tc = self.cfg, self.env, self.model.denoiser, stage.config.train
        if self.metrics is not None:
            self.metrics.flush()
        position = loader.state_dict()
        data = json.dumps(position)
        common = dict(
            keep=cfg.train.keep_checkpoints,  # the newest; each finished stage's last stays too (_publish)
            extra={
                "skipped_steps": self.bad_total,
                "bad_steps_in_row": self.bad_in_row,
                "truncated_prompts": self.truncated,
                "truncated_prompts_at": self.model.limits,  # what the count was counted at
                "truncated_prompts_since": self.truncated_since,
                "batch_size": tc.batch_size,
                "grad_accum": tc.grad_accum,
                "world_size": env.world_size,
                "parallel": self.parallel,
                "stage": stage.index,
                "stage_name": stage.name,
            },
            vocabulary=self.model.vocabulary,
        )
        ema_state = ema.state_dict()
        if env.distributed:
            save_distributed_checkpoint(
                self.run_dir,
                step + 1,
                self.saved_cfg,
                denoiser,
                ema_state,
                opts.by_module,
                save_text,
                rank=env.rank,
                rank_files={data_state_name(env.rank): data},
                **common,
            )
        else:
            others = {k: o for k, o in opts.by_module.items() if k != DENOISER}
            save_checkpoint(
                self.run_dir,
                step + 1,
                self.saved_cfg,
                denoiser,
                ema_state,
                opts.by_module.get(DENOISER),
                None,
                files={"data_state.json": data},
                text=save_text,
                optimizers=others,
                **common,
            )
        # Beside the checkpoint, not in it: a list for people to read (the checkpoint's data state holds the
        # same ids). The last step always checkpoints, so the end of training writes it.
        return write_skipped(skip_path, position, env.world_size if env.is_main else None)

    def _report_skipped(self, stage: Stage, loader, listed: bool, skip_path: Path) -> None:
        """Log the samples skipped over the stage, and where they are listed. Under torchrun the line covers
        the job (rank 0 logs it): the ranks gather one another's counts by reason (distinct ids, occurrences
        and a few examples; never every id, which each rank lists in its own file), and ``merged_skip_report``
        counts the samples found while planning the data, which rank 0 alone holds (states saved before
        rank 0 alone did hold them on every rank), once, and sums those of each rank's own reads over the ranks: a
        sample two ranks met (in different epochs) counts once per rank that met it, as the line says.

        Then, when any caption read into the stage's batches was not UTF-8, their total (``NotUTF8Count``:
        each rank's loader state sums its batches', the steps before a resume included), gathered with the
        skip counts: one collective at the stage's end, none per step."""
        not_utf8 = loader.not_utf8.state_dict()
        if self.env.world_size == 1:
            report = loader.skipped_report()
            ranks = [0] if listed else []
            not_utf8_total = NotUTF8Count.of([not_utf8])
        else:
            shares = distributed.gather_object((loader.skipped_tally(), listed, not_utf8), self.env)
            report = merged_skip_report([tally for tally, _, _ in shares])
            # A rank that skipped nothing writes no list.
            ranks = [rank for rank, (_, each, _) in enumerate(shares) if each]
            not_utf8_total = NotUTF8Count.of(count for _, _, count in shares)
        if ranks:
            report += "; " + where_listed(ranks, skip_path.parent, stage.index if self.cfg.stages else None)
        log.info("data: %s", report)
        line = not_utf8_total.report(self.env.world_size)
        if line:
            log.warning("%s", line)


def _announce_stage(cfg: Config, stage: Stage, main: bool, world_size: int = 1) -> None:
    """Log what a stage (or a run without stages) trains, and warn of its settings that do nothing: those
    for parts it does not train or for adapters it does not add (idle_settings), and a warmup longer than
    the stage. The batch is the global one (what recipes reason about) with its split: batch_size x
    grad_accum x processes."""
    tc = stage.config.train
    parts = Parts.of(tc)
    span = f"stage {stage.index} ({stage.name})" if cfg.stages else "the run"
    if cfg.stages:
        split = f"{tc.batch_size} x {tc.grad_accum}" + (
            f" x {world_size} processes" if world_size > 1 else ""
        )
        log.info(
            "stage %d %r: steps %d..%d, %d px, batch %d (%s), lr %g, trains %s",
            stage.index,
            stage.name,
            stage.start,
            stage.end,
            stage.config.data.image_size,
            tc.batch_size * tc.grad_accum * world_size,
            split,
            tc.lr,
            parts.describe(),
        )
    else:  # a LoRA fine-tune's log tells it from a full one's
        log.info("the run trains %s", parts.describe())
    idle = idle_settings(tc)
    if idle and main:
        log.warning(
            "%s trains %s (train.trainable=%s), so these settings do nothing: %s",
            span,
            parts.describe(),
            tc.trainable,
            ", ".join(idle),
        )
    if tc.warmup_steps > stage.steps and main:
        # The schedule counts from the stage's first step, so its warmup has to fit the stage.
        peak = learning_rate(stage.steps - 1, tc.lr, tc.warmup_steps, tc.schedule, stage.steps)
        log.warning(
            "train.warmup_steps=%d exceeds the %d steps of %s: the learning rate peaks at %.3g instead "
            "of train.lr=%g (allowed: warmup_steps <= %d to reach it)",
            tc.warmup_steps,
            stage.steps,
            span,
            peak,
            tc.lr,
            stage.steps,
        )


def saved_llms(cfg: Config, model: TextToImage, stage: int) -> dict[str, tuple[torch.nn.Module, bool]]:
    """The LLMs a checkpoint of ``stage`` holds, by checkpoint name: (module, whole). Whole when the LLM's
    weights are not what its hub id loads (random init, pretrained here, loaded by train.init_from, or
    trained fully or with merged adapters by this stage); otherwise only live LoRA adapters are saved."""
    texts = [cfg.text, *cfg.extra_text]
    out = {}
    initialised = initialised_llms(cfg, text_modules(model))
    for (key, module), tcfg in zip(text_modules(model).items(), texts, strict=True):
        whole = not tcfg.model_id or key in initialised or llm_base_changed(cfg, stage)
        if whole or has_adapters(module):
            out[key] = (module, whole)
    return out


def initialised_llms(cfg: Config, llms: dict) -> set[str]:
    """The LLMs (checkpoint names) whose weights train.init_from loaded: those its checkpoint saved, whole
    or as adapters. The others are what their model_id loads, so a checkpoint need not hold them. All of
    them from a pipeline folder (it holds every LLM), or when that checkpoint is gone (say, on a resume
    elsewhere): saving too much loses nothing."""
    if not cfg.train.init_from:
        return set()
    try:
        saved = saved_shapes(find_checkpoint(cfg.train.init_from))
    except FileNotFoundError:
        return set(llms)
    return {key for key in llms if key in saved or f"{key}_lora" in saved}


@torch.no_grad()
def _preview(model: TextToImage, cfg: Config, captions: list[str], path: Path) -> None:
    """A labelled grid of this step's captions sampled with the current (not EMA) weights: image i from
    the noise of sample.seed + i alone, as `fusedit sample` draws it, so that a checkpoint's preview image
    is the one `fusedit sample --no-ema --seed <sample.seed + i>` makes of its caption.

    Rank 0 alone runs it: the local module, no collectives (FSDP runs refuse previews, see train())."""
    from fusedit.imaging import image_grid, save_png, to_uint8
    from fusedit.sampling.generation import generate, latent_shape, sample_settings, seeded_noise

    was_training = model.denoiser.training
    model.denoiser.eval()
    # No CUDA graph: a capture on the training thread would outlive a one-off grid for nothing. Captions cut
    # to the limit are training's (the run warned at the first), not one warning per preview.
    settings = sample_settings(cfg, cuda_graphs=False)
    seeds = [cfg.sample.seed + i for i in range(len(captions))]
    noise = seeded_noise(seeds, latent_shape(model, settings["image_size"]))
    images = generate(model, captions, noise=noise, warn_cut=False, **settings)
    model.denoiser.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(list(to_uint8(images)), captions, scale=max(1, 96 // cfg.data.image_size)), path)


class _Step:
    """One stage's training step: this rank's rows of the step's global batch -> text context -> x_t ->
    flow-matching loss -> gradients averaged over ranks and clipped, learning rates set. The caller steps
    AdamW (or skips a NaN step: take_update) and the EMA. The numeric core (flow_backward, finish_gradients,
    take_update) lives in module functions, which `fusedit bench` times as its training step."""

    def __init__(self, run: _Run, stage: Stage, forward, stage_parallel: str, opts: Optimizers) -> None:
        tc, env = stage.config.train, run.env
        self.model, self.env, self.stage, self.seed = run.model, env, stage, run.cfg.train.seed
        self.forward, self.stage_parallel, self.opts = forward, stage_parallel, opts
        self.sharded_llms = run.sharded_llms
        # Each rank reads its batch_size * grad_accum samples of every step; micro-step m takes rows
        # [m * batch_size, (m + 1) * batch_size) of them.
        self.micro, self.accum = tc.batch_size, tc.grad_accum
        self.global_batch = self.micro * self.accum * env.world_size
        self.first_row = env.rank * self.micro * self.accum  # this rank's rows in the step's global batch
        self.autocasts = StepAutocasts.of(tc, env.device)  # resolved once, entered every micro-step
        self.params = opts.parameters()  # every trained weight: clipped together
        # The first caption this rank's encoders cut, and the limits that cut its captions (PromptCut.limits),
        # for the run's warning.
        self.cut_example: str | None = None
        self.cut_limits: set[str] = set()
        # The LLMs' weights, whose gradients DDP (wrapping the denoiser alone) does not average.
        self.llm_params = [
            p for key, o in opts.by_module.items() if key != DENOISER for p in o.param_groups[0]["params"]
        ]

    def __call__(self, step: int, batch: dict) -> tuple[float, float, int, float, dict[str, float]]:
        """The gradients of ``step`` and its learning rates; returns (global mean loss, gradient norm,
        prompts truncated over all ranks, lr, lr by module) as host values."""
        sc, tc = self.stage.config, self.stage.config.train
        # The global batch's dropout and times from (seed, step), then this rank's rows: the losses are
        # the same however the global batch is split over ranks and micro-steps.
        gen = step_generator(self.seed, step)
        keep = caption_keep(self.global_batch, sc.data.caption_dropout, gen)  # global_batch bools
        times = sample_training_times(  # (global_batch,)
            self.global_batch, gen, sc.flow.logit_mean, sc.flow.logit_std, sc.flow.shift
        )
        loss_sum = torch.zeros((), device=self.env.device)
        truncated = 0
        for m in range(self.accum):
            loss, cut, limits = self.micro_step(step, m, batch, keep, times)
            loss_sum += loss
            truncated += len(cut)
            self.cut_example = self.cut_example or next(iter(cut), None)
            self.cut_limits.update(limits)
        distributed.average_gradients(self.llm_params, self.env)
        # This rank's truncated prompts ride on the loss's all-reduce (no collective of their own);
        # full_like fills on the device, where a copy from the host would wait for the step's kernels.
        step_sums = torch.stack([loss_sum / self.accum, torch.full_like(loss_sum, truncated)])
        loss_mean, truncated_mean = distributed.mean_over_ranks(step_sums, self.env)
        # Each stage's schedule counts from its own first step.
        loss_value, norm_value, truncated_value, lr, lrs = finish_gradients(
            self.opts, self.params, tc, step - self.stage.start, self.stage.steps, loss_mean, truncated_mean
        )
        return loss_value, norm_value, round(truncated_value * self.env.world_size), lr, lrs

    def micro_step(
        self, step: int, m: int, batch: dict, keep: list[bool], times: torch.Tensor
    ) -> tuple[torch.Tensor, list[str], list[str]]:
        """Forward and backward of micro-batch ``m`` (gradients scaled by 1 / grad_accum, synced over ranks
        at the last micro-step); returns its loss, detached, the captions a text encoder cut to its limit,
        and those limits (PromptCut.limits)."""
        device = self.env.device
        local = slice(m * self.micro, (m + 1) * self.micro)
        rows = range(self.first_row + local.start, self.first_row + local.stop)
        captions = [c if k else "" for c, k in zip(batch["caption"][local], keep[rows.start : rows.stop])]
        # Host tensors reach the GPU without the host waiting (host_to_device): it draws the noise and
        # tokenises the captions while the last step's AdamW runs. (A VAE's posterior draw, without cached
        # latents, still copies its CPU-drawn noise with a wait: diffusers' randn_tensor.)
        x0 = self.latents(batch, local, step, rows)  # (micro, C, h, w)
        noise = host_to_device(sample_noise(self.seed, step, rows, x0.shape[1:]), device)
        t = host_to_device(times[rows.start : rows.stop], device)  # (micro,)

        def text() -> TextContext:
            # One LLM forward per micro-batch: without autograd when frozen; when it trains, its
            # graph runs from its lowest trainable layer to the text K/V the image queries read.
            context = self.model.encode_prompts(captions)
            for llm in self.sharded_llms:  # frees the gathered weights: no arithmetic
                distributed.reshard(llm)
            return context

        with distributed.gradient_sync(self.forward, self.stage_parallel, sync=m == self.accum - 1):
            loss, context = flow_backward(self.forward, text, x0, noise, t, self.autocasts, self.accum)
        return loss, [captions[i] for i in sorted(context.cut.prompts)], context.cut.limits

    def latents(self, batch: dict, local: slice, step: int, rows: range) -> torch.Tensor:
        """The micro-batch's latents: pre-encoded by cache-latents (checked against the VAE before the
        build), or the VAE's posterior draw from (seed, step, position), like the flow's noise: a resumed
        run, or one split over other ranks, draws what an uninterrupted one would."""
        if self.stage.config.data.source == "latents":
            return host_to_device(batch["latent"][local], self.env.device)
        generators = sample_generators(self.seed, step, rows, stream="vae/")
        images = host_to_device(batch["image"][local], self.env.device)
        return self.model.autoencoder.encode(images, generators)


@dataclass(frozen=True)
class StepAutocasts:
    """The autocasts of a training step, resolved once per stage (train.precision on the device: "auto"
    asks CUDA whether it has bf16) and entered at every micro-step: the denoiser's, and the text
    forward's, which is the same for a trained LLM (LoRA adapters, its top layers) and none for a frozen
    one (it runs in its own dtype)."""

    denoiser: contextlib.AbstractContextManager
    text: contextlib.AbstractContextManager

    @classmethod
    def of(cls, tc: TrainConfig, device: torch.device) -> StepAutocasts:
        text = autocast_for(tc.precision, device) if Parts.of(tc).llm else contextlib.nullcontext()
        return cls(autocast_for(tc.precision, device), text)


def flow_backward(
    forward,
    text: Callable[[], TextContext],
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    autocasts: StepAutocasts,
    accum: int = 1,
) -> tuple[torch.Tensor, TextContext]:
    """Forward and backward of one micro-batch, the numeric core of a training step (`fusedit bench` times
    it too): its text context from ``text()`` under the text's autocast, the velocity ``forward`` (the
    denoiser, or its DDP/FSDP wrapper) predicts at x_t between the latents ``x0`` and ``noise`` at times
    ``t``, under the denoiser's, and the flow-matching loss, whose gradients are scaled by 1 / ``accum``
    (grad_accum micro-steps add up to their mean's). Returns the loss, detached, and the text context."""
    with autocasts.text:
        context = text()
    with autocasts.denoiser:
        v = forward(interpolate(x0, noise, t), t, context)
    loss = flow_loss(v, x0, noise)
    (loss / accum).backward()
    return loss.detach(), context


def finish_gradients(
    opts: Optimizers,
    params: list[torch.nn.Parameter],
    tc: TrainConfig,
    step: int,
    steps: int,
    loss: torch.Tensor,
    truncated: torch.Tensor,
) -> tuple[float, float, float, float, dict[str, float]]:
    """A step's gradients made ready for AdamW: ``params`` (every trained weight) clipped together to
    train.grad_clip (0: measured, not clipped); every optimizer given its learning rate at ``step`` of a
    schedule of ``steps`` (each module scales its own base lr); then the step's one host sync (logging needs
    these anyway) reads the device scalars ``loss`` and ``truncated`` with the gradient norm. Returns (loss, gradient norm before
    clipping, truncated, lr, lr by module) as host values."""
    grad_norm = distributed.full_value(_gradient_norm(params, tc.grad_clip))
    rate = functools.partial(learning_rate, step, warmup=tc.warmup_steps, schedule=tc.schedule, total=steps)
    lr, lrs = rate(tc.lr), opts.set_lr(rate)
    loss_value, norm_value, truncated_value = torch.stack(
        [loss.float(), grad_norm.float(), truncated.float()]
    ).tolist()
    return loss_value, norm_value, truncated_value, lr, lrs


def _gradient_norm(params: list[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The total gradient norm of ``params``, their gradients clipped to ``clip`` when it is above 0. At 0
    only measured: clip_grad_norm_ with an infinite limit would also multiply every gradient by 1, a pass
    over all of them per step (torch 2.6 and later measure alone: get_total_norm)."""
    measure = getattr(torch.nn.utils, "get_total_norm", None)
    if clip or measure is None:
        return torch.nn.utils.clip_grad_norm_(params, clip or math.inf)
    return measure([p.grad for p in params if p.grad is not None])


def take_update(opts: Optimizers, ema: EMA, loss: float, norm: float) -> bool:
    """AdamW's step on the finished gradients, unless the loss or gradient norm is NaN/inf: the update is
    then skipped and the weights stay as they were. The gradients are zeroed either way. Returns whether
    the weights were updated."""
    updated = math.isfinite(loss) and math.isfinite(norm)
    if updated:
        ema.settle()  # the host-held EMA's copies of the weights are done before they change
        opts.step()
    opts.zero_grad()
    return updated


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights where the device supports it ("auto": CUDA with bf16)."""
    if uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def learning_rate(step: int, base: float, warmup: int, schedule: str = "constant", total: int = 1) -> float:
    """Linear warmup, then constant (the FuseDiT recipe) or cosine decay to 0 at ``total`` steps."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base
