"""Design studies: train several designs under one recipe, score each on the shapes benchmark, and write a
paper-style comparison (``fusedit study STUDY.yaml``). The study file, and how each design's config is
resolved and checked: ``fusedit.study.file``.

Output folder::

    runs/<label>/          the run (checkpoints, metrics.jsonl, config.yaml) and eval/ (scores.json, ...)
    grids/<label>.png      a labelled sample grid per design; samples.png stacks them
    report.md              the comparison table; loss_curves.png, scores.png; results.json

Re-running a study is cheap and safe: a design whose run holds a checkpoint at its final step and whose
``eval/scores.json`` was made of that checkpoint's weights (their fingerprint) under the eval settings is
not redone; a partially trained one resumes exactly; a run folder trained with a different config is
refused rather than silently mixed into the table. What a run does with each design is its status in
results.json (see _status); `--check` plans it the same way. An interrupted study writes its report too,
where a design not finished says what its run folder holds (pending_status).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusedit.checkpoints import (
    find_checkpoint,
    holds_ema,
    last_logged_step,
    load_model,
    load_state,
    redone_steps,
)
from fusedit.config import (
    Config,
    ConfigError,
    flatten,
    load_config,
    resolved_stages,
    to_dict,
    with_stand_ins_of,
)
from fusedit.data.shapes import ALL_KINDS
from fusedit.eval.shapes_bench import (
    bench_settings,
    bench_source,
    row_name,
    run_shapes_bench,
    trained_kinds,
    untrained_note,
    weights_record,
)
from fusedit.files import write_text_atomic
from fusedit.imaging import image_grid, plot_curves, plot_grouped_bars, save_png, stack_images, to_uint8
from fusedit.sampling.generation import generate, sample_settings
from fusedit.study.file import (
    BOOKKEEPING_KEYS,
    Design,
    EvalSettings,
    Study,
    load_study,
    recipe_differences,
    study_warnings,
    varying_keys,
)
from fusedit.system import build_model, count_parameters, resolve_device
from fusedit.train.distributed import refuse_several_processes
from fusedit.train.loop import train
from fusedit.train.stages import stage_costs, start_as

log = logging.getLogger(__name__)

# Keys a finished design's run may differ in and still be reused: none changes its trained weights (the
# sampling settings the bench records in scores.json, or that change images only by rounding: the scores
# are redone when they change; and the bookkeeping). Not sample.use_ema: it picks other weights, which
# the scores do not record. A sample key not listed counts as trained (refused, not silently reused).
_UNTRAINED_KEYS = (
    *(f"sample.{key}" for key in ("steps", "guidance", "sampler", "shift", "schedule", "negative_prompt")),
    *(f"sample.{key}" for key in ("precision", "seed", "cache_text", "fuse_projections", "bf16_weights")),
    *BOOKKEEPING_KEYS,
)


# --------------------------------------------------------------------------------------------------
# What a design costs, and a study's plan


def final_config(cfg: Config) -> Config:
    """What a design's last checkpoint samples with (its last stage's config): the study scores it there,
    as `fusedit eval` of the run does."""
    return resolved_stages(cfg)[-1].config


def design_cost(cfg: Config) -> dict:
    """Parameter counts and FLOPs per image, counted on the meta device as `fusedit describe` does: the
    training FLOPs of one image are fusedit.train.stages.stage_costs's (3x the DiT forward plus one frozen
    LLM forward, more where the LLM trains), averaged over the images of every stage; the forward counts
    and tokens are the last stage's (what the study scores at). The parameters are counted as the first
    stage trains them (LoRA: its adapters trainable, the DiT's base weights frozen), as describe does."""
    model = build_model(cfg, "meta")
    costs = stage_costs(cfg, model)  # before start_as adds adapters, whose products the counts leave out
    flops = sum(image["training"] * stage.steps * images for stage, image, images in costs)
    images = sum(stage.steps * images for stage, _, images in costs)
    c = costs[-1][1]  # the last stage's (text: the padded width, the template's tokens included)
    start_as(model, costs[0][0])
    return {  # the model of a meta build: the DiT, its LLMs and pooled-text encoder (no VAE)
        "trainable_params": count_parameters(model, True),
        "frozen_params": count_parameters(model, False),
        "image_tokens": c["image"],
        "text_tokens": c["text"],
        "dit_forward_flops": c["dit"],
        "llm_forward_flops": c["llm"],
        "train_flops_per_image": round(flops / images),
    }


def _schedule(cfg: Config) -> str:
    """Steps, batch and resolution of each stage: "12 steps x batch 4 at 32 px"."""
    return " then ".join(
        f"{s.steps} steps x batch {s.config.train.batch_size} at {s.config.data.image_size} px"
        for s in resolved_stages(cfg)
    )


def describe_study(
    study: str | Path | dict | Study, *, only: list[str] | None = None, out_dir: str | Path | None = None
) -> str:
    """A plain-text plan of a study (what each design is and costs), without training anything: of the
    designs ``only`` names (None: all; see chosen_designs), and, given ``out_dir``, what running the study
    into it would do with each (planned_statuses: refused, as the run is, where a design's run there was
    trained with another config)."""
    study = load_study(study)
    chosen = chosen_designs(study, only)
    cfgs = [d.config for d in study.designs]
    lines = [f"study {study.name}: {len(study.designs)} designs"]
    if len(chosen) < len(study.designs):
        lines[0] += f", {len(chosen)} chosen"
    varying = varying_keys(cfgs)
    lines.append(f"  varies: {', '.join(varying) or 'nothing'}")
    lines += [f"  warning: {line}" for line in study_warnings(study)]
    for d in chosen:
        c, cost = d.config, design_cost(d.config)
        lines.append(
            f"  {d.label}: {d.preset} design={c.model.design} pos_embed={c.model.pos_embed} "
            f"timestep={c.model.timestep_conditioning} trainable {_si(cost['trainable_params'])} "
            f"frozen {_si(cost['frozen_params'])} training {_si(cost['train_flops_per_image'])}FLOP/image; "
            f"{_schedule(c)}"
        )
    if out_dir is not None:
        statuses = planned_statuses(study, out_dir, only)
        lines.append(f"  running it into {out_dir} would leave each design (as results.json records it):")
        lines += [f"    {label}: {status}" for label, status in statuses.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running one design


def _last_checkpoint(run_dir: Path) -> Path | None:
    try:
        return find_checkpoint(run_dir)
    except FileNotFoundError:
        return None


def _check_same_config(run_dir: Path, cfg: Config, label: str) -> None:
    """Refuse a run folder trained with another config: its scores would be stale for this study."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    try:
        old = load_config(run_dir)  # as a model folder: settings that change nothing are left out
    except ConfigError as e:
        raise ConfigError(f"{saved}: {e}; delete {run_dir} to retrain design {label!r}") from None
    found = _trained_difference(old, cfg)
    if found:
        key, there, now = found
        # A longer budget is not the run extended: its learning-rate schedule spans the steps it has.
        why = (
            " (a run's schedule spans its train.steps: more steps are another run)"
            if key == "train.steps"
            else ""
        )
        raise ConfigError(
            f"{run_dir} was trained with a different config for design {label!r} ({key}: "
            f"{there!r} there, {now!r} now){why}; delete it or use another output folder"
        )


def _trained_difference(old: Config, new: Config) -> tuple[str, Any, Any] | None:
    """The first key, with its two values, in which ``new`` would train other weights than ``old``:
    stage by stage (a staged run's sampling settings live in its stages too), _UNTRAINED_KEYS aside, and an
    LLM's family and arch where both name its model_id (with_stand_ins_of: the run saved its model's own,
    the design may still carry its preset's)."""
    old = with_stand_ins_of(old, new)
    a, b = resolved_stages(old), resolved_stages(new)
    if [s.steps for s in a] != [s.steps for s in b]:
        key = "train.steps" if old.train.steps != new.train.steps else "stages"
        return key, flatten(to_dict(old))[key], flatten(to_dict(new))[key]
    for x, y in zip(a, b, strict=True):
        for key in varying_keys([x.config, y.config]):
            if not key.startswith(_UNTRAINED_KEYS):
                there, now = flatten(to_dict(x.config)), flatten(to_dict(y.config))
                return key, there.get(key), now.get(key)
    return None


def _eval_settings(settings: EvalSettings, cfg: Config) -> dict:
    """The bench's arguments, which it records in scores.json (to tell whether to redo it)."""
    return bench_settings(
        cfg,
        per_category=settings.per_category,
        steps=settings.steps or cfg.sample.steps,
        guidance=cfg.sample.guidance if settings.guidance is None else settings.guidance,
        seed=settings.seed,
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_metrics(run_dir: Path) -> tuple[list[float], list[float]]:
    """Each logged step's loss and the seconds it took (metrics.jsonl, step order)."""
    losses, seconds = [], []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # blank, or cut short by a kill (as the training's rewind drops it)
                continue
            losses.append(float(record["loss"]))
            seconds.append(float(record.get("sec", 0.0)))
    return losses, seconds


def _sample_grid(model, cfg: Config, prompts: list[str], seeds: list[int], steps: int, guidance: float):
    images, labels = [], []
    for seed in seeds:
        settings = sample_settings(cfg, steps=steps, guidance=guidance, cuda_graphs=False)
        x = generate(model, list(prompts), seed=seed, **settings)
        images.extend(to_uint8(x))
        labels.extend(f"{p} (seed {seed})" for p in prompts)
    return image_grid(images, labels, ncols=len(prompts), scale=max(1, 96 // cfg.data.image_size))


@dataclass
class _Found:
    """What an output folder holds of one design: its run's last checkpoint (None: none) and its step, the
    weights the design is scored with there (cli.eval's record: checkpoint, fingerprint, EMA or raw; None
    without a checkpoint), the eval settings it is scored under now, its scores when made of those weights
    under those settings (else None), and whether its sample grid is current."""

    ckpt: Path | None
    step: int | None
    weights: dict | None
    settings: dict
    scores: dict | None
    grid_current: bool


def _found(design: Design, study: Study, out_dir: Path) -> _Found:
    run_dir = out_dir / "runs" / design.label
    # A staged design is scored at its last stage's size and sampling settings.
    cfg = final_config(design.config)
    settings = _eval_settings(study.eval, cfg)
    ckpt = _last_checkpoint(run_dir)
    # EMA as load_model loads it: asked for and saved (a converted run has raw weights only).
    weights = None if ckpt is None else weights_record(ckpt, cfg.sample.use_ema and holds_ema(ckpt))
    scores = _read_json(run_dir / "eval" / "scores.json")
    current = weights is not None and isinstance(scores, dict) and _scored(scores, settings, weights)
    grid = out_dir / "grids" / f"{design.label}.png"
    return _Found(
        ckpt,
        None if ckpt is None else int(load_state(ckpt)["step"]),
        weights,
        settings,
        scores if current else None,
        weights is not None and _grid_current(grid, _grid_meta(study, settings, weights)),
    )


def _weights(source: dict) -> dict:
    """A bench source (shapes_bench.bench_source) without where the checkpoint lay ("model"): a moved
    output folder holds the same weights."""
    return {k: v for k, v in source.items() if k != "model"}


def _scored(scores: dict, settings: dict, weights: dict) -> bool:
    """Whether ``scores`` (a scores.json) were made under ``settings`` of the ``weights``: equal settings
    alone would pass another run's scores, or the raw weights', as this one's."""
    saved = scores.get("settings")
    return isinstance(saved, dict) and _weights(saved) == {**settings, **weights}


def _status(found: _Found, steps: int) -> str:
    """What running a design of ``steps`` steps does with what it ``found``, as results.json records it:
    "trained" (from scratch), "resumed at step N", "re-scored" (trained before; scored again, as its
    scores are missing, or were made under other eval settings or of other weights), "grid redrawn" (only
    the sample grid is stale), or "reused" (nothing to do). The one decision both the run and `--check`'s plan make."""
    if found.step is None:
        return "trained"
    if found.step < steps:
        return f"resumed at step {found.step}"
    if found.scores is None:
        return "re-scored"
    return "reused" if found.grid_current else "grid redrawn"


def _check_out_folder(study: Study, out_dir: Path) -> None:
    """Refuse an output folder that holds another study (its results.json names it) or a training run: the
    report would be replaced with this study's, and the other study's runs left behind unlisted."""
    from fusedit.checkpoints import LOCK_FILE

    if not out_dir.is_dir():  # a new folder
        return
    results = _read_json(out_dir / "results.json")
    other = results.get("name") if isinstance(results, dict) else None
    if other is not None and other != study.name:
        raise ConfigError(
            f"{out_dir} holds study {other!r} (its results.json), not {study.name!r}: running into it would "
            "replace its report (allowed: this study's own folder, or a new or empty one)"
        )
    held = [name for name in ("checkpoints", LOCK_FILE) if (out_dir / name).exists()]
    if held:
        raise ConfigError(
            f"{out_dir} holds a training run ({', '.join(held)}), not a study: a study writes its report "
            "there and each design's run under runs/ (allowed: this study's own folder, or a new or empty one)"
        )


def _check_same_configs(study: Study, out_dir: Path) -> None:
    """Before anything trains: a finished run of another recipe must not wait until its turn to fail (every
    design, chosen or not: a left-out design's stale row would stay in the report); nor may another study's
    folder or a training run's (_check_out_folder)."""
    _check_out_folder(study, out_dir)
    for design in study.designs:
        _check_same_config(out_dir / "runs" / design.label, design.config, design.label)


def planned_statuses(study: Study, out_dir: str | Path, only: list[str] | None = None) -> dict[str, str]:
    """What run_study(study, out_dir, only=only) would do with each chosen design (label -> status, see
    _status), without doing it; a run folder there trained with another config is refused as the run
    refuses it."""
    out = Path(out_dir)
    _check_same_configs(study, out)
    return {
        d.label: _status(_found(d, study, out), d.config.train.steps) for d in chosen_designs(study, only)
    }


def _run_design(design: Design, study: Study, out_dir: Path, index: str, progress: bool) -> dict:
    label, cfg = design.label, design.config
    run_dir = out_dir / "runs" / label
    found = _found(design, study, out_dir)
    status = _status(found, cfg.train.steps)
    if status == "reused":
        log.info("%s %s: trained, scores and grid present, nothing to do", index, label)
        return _reused_result(design, found, out_dir)
    scores, need_grid = found.scores, not found.grid_current
    if found.step is None or found.step < cfg.train.steps:
        if found.step is None:
            log.info("%s %s: training %s into %s", index, label, _schedule(cfg), run_dir)
        else:
            log.info("%s %s: resuming from step %d of %d", index, label, found.step, cfg.train.steps)
        # The returned model is dropped: scoring reloads the checkpoint's EMA weights (what sampling
        # uses), the same way for a design trained now and one trained by an earlier call.
        train(cfg, run_dir, resume=found.step is not None, progress=progress)
        scores, need_grid = None, True
    elif scores is None:
        log.info(
            "%s %s: trained (step %d), no scores under these eval settings: scoring", index, label, found.step
        )

    cfg = final_config(cfg)  # a staged design is scored at its last stage's size and sampling settings
    settings = found.settings
    grid_path = out_dir / "grids" / f"{label}.png"
    # Past the early return, the scores or the grid (or both) need the model.
    device = resolve_device(cfg.train.device)
    model, loaded, ckpt = load_model(run_dir, device, use_ema=cfg.sample.use_ema)
    ema = loaded.sample.use_ema  # whether the EMA was loaded: a run saved without one has raw weights only
    # The scores name their weights as `fusedit eval`'s do (checkpoint, fingerprint, EMA or raw), and its
    # row (label@step), and mark the categories outside the run's data.kinds as untrained.
    source = bench_source(ckpt, ema)
    row = row_name(ckpt, ema)
    if scores is None:
        log.info("%s %s: shapes benchmark, %d prompts per category", index, label, settings["per_category"])
        scores = run_shapes_bench(
            model,
            out_dir=run_dir / "eval",
            name=row,
            progress=progress,
            source=source,
            trained_kinds=trained_kinds(ckpt),
            **settings,
        )
    else:
        log.info("%s %s: scores present, not re-scored", index, label)
    if need_grid:
        grid = _sample_grid(model, cfg, study.prompts, study.seeds, settings["steps"], settings["guidance"])
        save_png(grid, grid_path)
        meta = _grid_meta(study, settings, _weights(source))
        write_text_atomic(grid_path.with_suffix(".json"), json.dumps(meta, indent=1))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    log.info("%s %s: %s, overall %.3f", index, label, status, scores["overall"])
    return _result(design, run_dir, status, scores, row)


def _grid_meta(study: Study, settings: dict, weights: dict) -> dict:
    """Everything a design's sample grid depends on: the prompts, seeds and sampling settings, and the
    weights (_Found.weights)."""
    return {
        "prompts": study.prompts,
        "seeds": study.seeds,
        **{k: v for k, v in settings.items() if k not in ("per_category", "seed")},
        **weights,
    }


def _grid_current(grid_path: Path, grid_meta: dict) -> bool:
    return grid_path.is_file() and _read_json(grid_path.with_suffix(".json")) == grid_meta


def _earlier_result(design: Design, study: Study, out_dir: Path) -> dict | None:
    """The result of a design that an earlier call finished and scored under the current settings (with
    its grid), without training or sampling anything; None when some of it is missing or stale."""
    found = _found(design, study, out_dir)
    if _status(found, design.config.train.steps) != "reused":
        return None
    return _reused_result(design, found, out_dir)


def _reused_result(design: Design, found: _Found, out_dir: Path) -> dict:
    """The result of a design whose run, scores and grid an earlier call left (``found``: _found's)."""
    row = row_name(found.ckpt, found.weights["ema"])
    return _result(design, out_dir / "runs" / design.label, "reused", found.scores, row)


def _result(design: Design, run_dir: Path, status: str, scores: dict, row: str | None = None) -> dict:
    """One design's row of results.json; ``row`` names it in report.md (label@step, " raw" for raw
    weights, as `fusedit eval` names it; default the label)."""
    label, cfg = design.label, design.config
    losses, seconds = _read_metrics(run_dir)
    # A step skipped for a NaN/inf loss (train.max_bad_steps) logs that loss: it would make the mean NaN.
    tail = [loss for loss in losses[-max(1, len(losses) // 10) :] if math.isfinite(loss)]
    # Step 1 holds the one-off setup (seconds, against hundredths for a tiny step): the median of the
    # others is what a step costs; the sum is the wall clock, other jobs on the machine included.
    steady = seconds[1:]
    scored = scores.get("settings", {})
    return {
        "label": label,
        "row": row or label,
        "preset": design.preset,
        "description": design.description,
        "overrides": design.overrides,
        "status": status,
        "run_dir": f"runs/{label}",
        "config": f"runs/{label}/config.yaml",
        "grid": f"grids/{label}.png",
        "failures": (run_dir / "eval" / "failures.png").is_file(),
        "steps": cfg.train.steps,
        "batch_size": resolved_stages(cfg)[0].config.train.batch_size,  # the first stage's
        "schedule": _schedule(cfg),
        # The mean loss over the last tenth of training: one step's loss is too noisy to rank designs.
        "final_loss": sum(tail) / len(tail) if tail else None,
        "train_seconds": round(sum(seconds), 1),
        "median_step_seconds": round(statistics.median(steady), 4) if steady else None,
        "weights": {k: scored[k] for k in ("checkpoint", "weights", "ema") if k in scored},
        "scores": {
            **{k: scores[k] for k in ("overall", "per_category", "counts", "num_images")},
            "untrained": scores.get("untrained", []),
        },
        **design_cost(cfg),
    }


# --------------------------------------------------------------------------------------------------
# Report


def _duration(seconds: float) -> str:
    """Seconds as a table cell: "31.3 s", "7.0 min" (a GPU design's minutes), "2.5 h"."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _categories(results: dict) -> list[str]:
    present = {k for r in results.values() for k in r["scores"]["per_category"]}
    return [k for k in ALL_KINDS if k in present]


def markdown_report(study: Study, results: dict, varying: list[str], pending: dict | None = None) -> str:
    """The comparison table (rows = designs, columns = shapes categories + overall, cost, loss, samples),
    and ``pending`` (label -> what its run folder holds, pending_status; default "not finished" for each
    design not in ``results``)."""
    kinds = _categories(results)
    first = next(iter(results.values()), None)
    settings = _eval_settings(study.eval, final_config(study.designs[0].config))
    lines = [f"# Study: {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    cfg0 = study.designs[0].config
    lines += [
        f"Recipe: {_schedule(cfg0)}, seed {cfg0.train.seed}, {cfg0.data.source} data. What varies between the designs: "
        f"{', '.join(f'`{k}`' for k in varying) or 'nothing'}.",
        "",
        f"Shapes benchmark: {settings['per_category']} held-out prompts per category (never seen in training), "
        f"{settings['steps']} {settings['sampler']} steps, guidance {settings['guidance']}, seed {settings['seed']}; "
        "accuracy per category, overall = their mean (GenEval's rule). Best of each column in bold. "
        "Params: the trainable denoiser; FLOPs: one training image (3x the DiT forward + the frozen LLM "
        "forward; more where the LLM trains; a staged design's averaged over its stages' images), as "
        "`fusedit describe` counts them; final loss: the mean flow-matching loss over the last "
        "tenth of training; step time: the median seconds of a training step, step 1 (its one-off setup) "
        "left out (metrics.jsonl); wall clock: every training step summed, setup and whatever else ran on "
        "the machine included: not a speed comparison (FLOPs / image is the fair cost column). "
        "A design is named by the checkpoint it was scored at (label@step; raw: its raw weights, not "
        "the EMA); results.json records that checkpoint's weights fingerprint.",
        "",
    ]
    unfair = recipe_differences(study.designs, study.eval)
    if unfair:
        lines += [f"**Warning: not a fair comparison**: the recipe differs in {', '.join(unfair)}.", ""]
    if pending is None:
        pending = {d.label: "not finished" for d in study.designs if d.label not in results}
    waiting = ["Pending:", *(f"* {label}: {what}" for label, what in pending.items())] if pending else []
    if first is None:
        return "\n".join(lines + ["No design has finished yet.", *([""] + waiting if waiting else [])]) + "\n"

    columns = [*kinds, "overall"]
    # A category outside a design's data.kinds is scored all the same (the overall stays comparable):
    # marked in the header when every design left it out, else in that design's cell, as scores.md does.
    untrained = {label: set(r["scores"]["untrained"]) for label, r in results.items()}
    everywhere = [k for k in kinds if all(k in u for u in untrained.values())]
    # Bold marks the best of a column; a column where every design ties (e.g. all 0 early on) has none.
    values = {c: [_score(r, c) for r in results.values()] for c in columns}
    best = {c: max(v) if len(set(v)) > 1 else None for c, v in values.items()}
    lines.append(
        "| design | preset | "
        + " | ".join(c + " (untrained)" * (c in everywhere) for c in columns)
        + " | trainable params | train FLOPs / image | final loss | step time | wall clock | samples |"
    )
    lines.append("|---" * (len(columns) + 8) + "|")
    for label, r in results.items():
        cells = []
        for c in columns:
            value = _score(r, c)
            cell = f"**{value:.3f}**" if value == best[c] else f"{value:.3f}"
            cells.append(cell + " (untrained)" * (c in untrained[label] and c not in everywhere))
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        step = "n/a" if r["median_step_seconds"] is None else f"{r['median_step_seconds']:.3g} s"
        lines.append(
            f"| {r['row']} | {r['preset']} | "
            + " | ".join(cells)
            + f" | {_si(r['trainable_params'])} | {_si(r['train_flops_per_image'])} | {loss} | {step} | "
            f"{_duration(r['train_seconds'])} | [grid]({r['grid']}) |"
        )
    if everywhere:
        lines += ["", untrained_note(everywhere, len(kinds)) + "."]
    if any(untrained[label] - set(everywhere) for label in results):
        lines += [
            "",
            "(untrained) in a cell: not in that design's data.kinds; the overall is over all "
            f"{len(kinds)} categories, comparable across designs.",
        ]
    if waiting:
        lines += ["", *waiting]
    lines.append("")
    for label, r in results.items():
        what = f": {r['description']}" if r["description"] else ""
        links = f"[scores]({r['run_dir']}/eval/scores.md), [config]({r['config']})"
        if r["failures"]:
            links += f", [failures]({r['run_dir']}/eval/failures.png)"
        lines.append(f"* **{label}** ({r['preset']}){what}. {links}")
    lines += [
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![scores](scores.png)",
        "",
        "Samples (one row per seed, same prompts and seeds for every design): [all designs](samples.png).",
        "",
    ]
    return "\n".join(lines)


def _score(result: dict, column: str) -> float:
    s = result["scores"]
    return float(s["overall"] if column == "overall" else s["per_category"].get(column, 0.0))


def pending_status(design: Design, study: Study, out_dir: Path) -> str:
    """What the run folder of a design without a current result holds, for report.md and results.json:
    "not started", "interrupted, last checkpoint at step 30 of 60 (steps 31-32 are redone), not scored", ...
    (a half-trained design is not to be read as one never begun, nor the steps its rerun redoes as kept)."""
    steps, found = design.config.train.steps, _found(design, study, out_dir)
    run_dir = out_dir / "runs" / design.label
    if found.ckpt is None:
        logged = last_logged_step(run_dir / "metrics.jsonl")
        if logged is None:
            return "not started"
        return f"interrupted at step {logged} of {steps} before its first checkpoint, not scored (it starts again)"
    if found.step < steps:
        # The steps trained past the checkpoint are lost: the resume trains them again (as `fusedit train`
        # says of its own interruption).
        redone = redone_steps(run_dir, found.ckpt)
        return f"interrupted, last checkpoint at step {found.step} of {steps}{redone}, not scored"
    if found.scores is None:
        return f"trained ({found.step} steps), not scored under these eval settings"
    if found.grid_current:  # a Ctrl+C after its grid, before its row: a rerun reuses everything
        return "trained, scored and drawn (its row comes with the rerun)"
    return "trained and scored, its sample grid not drawn for these prompts and seeds"


def write_outputs(study: Study, results: dict, out_dir: Path) -> dict:
    """report.md, loss_curves.png, scores.png, samples.png and results.json for the designs done so far."""
    varying = varying_keys([d.config for d in study.designs])
    pending = {d.label: pending_status(d, study, out_dir) for d in study.designs if d.label not in results}
    # Atomic, as the report is rewritten after every design and may be read while the study runs.
    write_text_atomic(out_dir / "report.md", markdown_report(study, results, varying, pending))
    curves = {label: _read_metrics(out_dir / r["run_dir"])[0] for label, r in results.items()}
    longest = max((len(v) for v in curves.values()), default=0)
    plot_curves(
        curves,
        out_dir / "loss_curves.png",
        title=f"{study.name}: flow-matching loss (moving average)",
        smooth=max(1, longest // 25),
    )
    kinds = [*_categories(results), "overall"]
    plot_grouped_bars(
        kinds,
        {label: [_score(r, k) for k in kinds] for label, r in results.items()},
        out_dir / "scores.png",
        title=f"{study.name}: shapes benchmark accuracy",
        ylabel="accuracy",
        ymax=1.0,
    )
    grids = [(label, out_dir / r["grid"]) for label, r in results.items() if (out_dir / r["grid"]).is_file()]
    if grids:
        from PIL import Image

        images = []
        for _, path in grids:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        save_png(stack_images(images, [label for label, _ in grids]), out_dir / "samples.png")
    summary = {
        "name": study.name,
        "description": study.description,
        "source": study.source,
        "varies": varying,
        "eval": {"bench": study.eval.bench, **_eval_settings(study.eval, study.designs[0].config)},
        "prompts": study.prompts,
        "seeds": study.seeds,
        "categories": _categories(results),
        "designs": results,
        "pending": list(pending),
        "pending_status": pending,
        "files": {
            "report": "report.md",
            "loss_curves": "loss_curves.png",
            "scores": "scores.png",
            "samples": "samples.png",
        },
    }
    write_text_atomic(out_dir / "results.json", json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------------------------------
# The study


def chosen_designs(study: Study, only: list[str] | None) -> list[Design]:
    """The designs ``only`` names (None: all), in the study's order; a label the study lacks, or an empty
    list, is a one-line error (`fusedit study --only`, also under --check, which runs nothing)."""
    labels = [d.label for d in study.designs]
    if only is not None and not only:
        raise ConfigError(
            f"only=[] names no design of study {study.name} (allowed: None, or some of {labels})"
        )
    unknown = [label for label in only or () if label not in labels]
    if unknown:
        raise ConfigError(
            f"design {unknown[0]!r} is not in study {study.name} (allowed: {', '.join(labels)})"
        )
    return [d for d in study.designs if only is None or d.label in only]


def run_study(
    study: str | Path | dict | Study,
    out_dir: str | Path,
    *,
    progress: bool = True,
    device: str | None = None,
    only: list[str] | None = None,
) -> dict:
    """Train, evaluate and compare every design of ``study`` (a YAML path or its content as a dict) into
    ``out_dir``; ``device`` overrides every design's train.device. ``only`` (design labels) trains and
    scores just those; the report also shows the other designs an earlier call finished and lists the
    rest as pending. Returns what results.json holds."""
    refuse_several_processes(
        "a study",
        "train, score and write every design",
        "run `fusedit study` without torchrun, or train each design with `torchrun ... -m fusedit train` and "
        "score it with `fusedit eval`",
    )
    study = load_study(study, device=device)
    chosen = chosen_designs(study, only)
    left_out = [d for d in study.designs if d not in chosen]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log.info("study %s: %d of %d designs into %s", study.name, len(chosen), len(study.designs), out)
    for line in study_warnings(study):
        log.warning("study %s: %s", study.name, line)
    _check_same_configs(study, out)
    # The designs left out this time keep their place in the report when an earlier call finished them.
    results = {d.label: r for d in left_out if (r := _earlier_result(d, study, out))}
    summary: dict = {}
    t0 = time.time()
    bar = tqdm(chosen, desc=f"study {study.name}", unit="design", disable=not progress)
    kept = f"what is done in {out} is kept (each design's checkpoints and scores; report.md says what each holds)"
    i, design = 0, None
    try:
        for i, design in enumerate(bar):
            bar.set_postfix_str(design.label)
            index = f"[{i + 1}/{len(chosen)}]"
            results[design.label] = _run_design(design, study, out, index, progress)
            # Written after every design, so a long study's partial table can be read while it runs.
            summary = write_outputs(study, _in_study_order(study, results), out)
    except KeyboardInterrupt:
        # The report is written here too (the first design's interruption left none), saying what the
        # interrupted design keeps: its last checkpoint, and the steps past it that the rerun trains again.
        bar.close()
        pending = write_outputs(study, _in_study_order(study, results), out)["pending_status"]
        if design is None or design.label in results:  # before the first design, or between two
            raise KeyboardInterrupt(kept) from None
        where = f"design {design.label!r} ({i + 1} of {len(chosen)})"
        raise KeyboardInterrupt(f"{where} {pending[design.label]}; {kept}") from None
    bar.close()
    log.info(
        "study %s: done in %.0fs (%s); report in %s",
        study.name,
        time.time() - t0,
        statuses_text(results, [d.label for d in chosen]),
        out / "report.md",
    )
    return summary


def statuses_text(results: dict, labels: list[str]) -> str:
    """What a run did with each of ``labels`` (results.json's designs), for its closing line:
    "a reused, b resumed at step 30, c trained"."""
    return ", ".join(f"{label} {results[label]['status']}" for label in labels)


def _in_study_order(study: Study, results: dict) -> dict:
    return {d.label: results[d.label] for d in study.designs if d.label in results}
