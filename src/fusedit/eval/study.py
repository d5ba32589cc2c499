"""Design studies: train several designs under one recipe, score each on the shapes benchmark, and write a
paper-style comparison (``fusedit study STUDY.yaml``).

A study file::

    name: position-encodings-tiny
    description: APE vs 1D / 2D / M-RoPE in deep fusion.
    base:                       # applied to every design: the same data, seeds, steps and batch
      train.steps: 300          # dotted keys or nested sections, or a list of "section.key=value"
    designs:                    # label -> a preset (or YAML config file) plus overrides
      ape: {preset: debug}
      2d-rope: {preset: debug, overrides: [model.pos_embed=2d-rope]}
    eval: {bench: shapes, per_category: 5, steps: 20, guidance: 3.0}
    prompts: [a red circle, a blue square and a green triangle]     # the sample grids (optional)
    seeds: [0, 1]                                                   # one grid row per seed (optional)

Each design's config is its preset, then the study ``base`` (with `fusedit study STUDY.yaml key=value`
overrides merged in), then ``name: <label>``, then the design's own overrides, validated like any config (so
errors read the same one-line way). The base is what the designs share: a design overriding a key it sets is
refused (bookkeeping aside), as is a stage doing so, or a base ``train.steps`` on a staged design. Everything
is resolved before anything trains, so a typo in the last design fails in seconds rather than after the
others trained.

Output folder::

    runs/<label>/          the run (checkpoints, metrics.jsonl, config.yaml) and eval/ (scores.json, ...)
    grids/<label>.png      a labelled sample grid per design; samples.png stacks them
    report.md              the comparison table; loss_curves.png, scores.png; results.json

Re-running a study is cheap and safe: a design whose run holds a checkpoint at its final step and whose
``eval/scores.json`` matches the eval settings is not redone; a partially trained one resumes exactly; a
run folder trained with a different config is refused rather than silently mixed into the table. What a
run does with each design is its status in results.json (see _status); `--check` plans it the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from fusedit.checkpoints import find_checkpoint, load_model, load_state
from fusedit.config import (
    STAGE_SECTIONS,
    Config,
    ConfigError,
    _build,
    _deep_merge,
    _resolve_raw,
    check_data_locations,
    choice,
    config_from_dict,
    flatten,
    is_name_word,
    load_config,
    load_yaml,
    nonneg,
    parse_overrides,
    positive,
    resolved_stages,
    stages_overriding,
    to_dict,
    yaml_problem,
)
from fusedit.data.shapes import ALL_KINDS, DEMO_PROMPTS
from fusedit.eval.shapes_bench import bench_settings, run_shapes_bench
from fusedit.files import write_text_atomic
from fusedit.imaging import image_grid, plot_curves, plot_grouped_bars, save_png, stack_images, to_uint8
from fusedit.sample import check_seed, generate, sample_settings
from fusedit.system import build_model, count_parameters, resolve_device
from fusedit.train.distributed import refuse_several_processes
from fusedit.train.loop import train
from fusedit.train.stages import stage_costs, start_as

log = logging.getLogger(__name__)

STUDY_KEYS = ("name", "description", "base", "designs", "eval", "prompts", "seeds")
DESIGN_KEYS = ("preset", "overrides", "description")
# Keys never compared (what varies, a finished run against the study): a design's name and its device.
_IGNORED_KEYS = ("name", "train.device")
# Bookkeeping: keys that change neither the trained weights nor the scores (the bench does not record
# sample.compile / cuda_graphs, which change images by rounding only), so designs may differ in them and
# still compare fairly (recipe_differences, the base check of load_study, identical_designs).
_BOOKKEEPING_KEYS = (
    "sample.compile",
    "sample.cuda_graphs",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.loggers",
    "train.preview_every",
    "data.num_workers",
)
# Keys a finished design's run may differ in and still be reused: none changes its trained weights (the
# sampling settings the bench records in scores.json, or that change images only by rounding: the scores
# are redone when they change; and the bookkeeping). Not sample.use_ema: it picks other weights, which
# the scores do not record. A sample key not listed counts as trained (refused, not silently reused).
_UNTRAINED_KEYS = (
    *(f"sample.{key}" for key in ("steps", "guidance", "sampler", "shift", "schedule", "negative_prompt")),
    *(f"sample.{key}" for key in ("precision", "seed", "cache_text", "fuse_projections", "bf16_weights")),
    *_BOOKKEEPING_KEYS,
)
# Sections that make up the training recipe: a design that changes them is no longer a fair comparison.
_RECIPE_SECTIONS = ("data", "flow", "train", "sample")


@dataclass
class EvalSettings:
    """How every design is scored (validated by fusedit.config's own field checks)."""

    # Only the built-in programmatic benchmark: GenEval / DPG need external models (`fusedit eval`).
    bench: str = choice("shapes", "shapes")
    per_category: int = positive(5)
    # Sampling steps and guidance; None = each design's sample.steps / sample.guidance (which the study
    # base should then hold equal).
    steps: int | None = positive(None)
    guidance: float | None = field(default=None, metadata={"min": 0})
    # No batch size: run_shapes_bench seeds each batch by its offset, so the batch size changes the noise,
    # and scores from runs with different batch sizes would not be comparable. Its default holds for all.
    seed: int = nonneg(0)


@dataclass
class Design:
    label: str
    preset: str
    overrides: dict
    config: Config
    description: str = ""


@dataclass
class Study:
    name: str
    designs: list[Design]
    eval: EvalSettings
    prompts: list[str]
    seeds: list[int]
    description: str = ""
    source: str = ""


# --------------------------------------------------------------------------------------------------
# Loading and validation


def _overrides_mapping(value: Any, where: str) -> dict:
    """A list of ``section.key=value`` strings, or a mapping (nested sections and/or dotted keys), as one
    nested mapping."""
    if value is None:
        return {}
    if isinstance(value, list):
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ConfigError(f"{where}: list items must be 'section.key=value' strings, got {bad[0]!r}")
        try:
            return parse_overrides(value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{where}: keys must be section names or dotted keys, got {key!r}")
            parts = key.split(".")
            node = out
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            # "arch" holds transformers field names, taken verbatim (no dotted keys inside).
            nested = isinstance(item, dict) and parts[-1] != "arch"
            leaf = _overrides_mapping(item, f"{where}.{key}") if nested else item
            node[parts[-1]] = (
                _deep_merge(node[parts[-1]], leaf) if isinstance(node.get(parts[-1]), dict) else leaf
            )
        return out
    raise ConfigError(f"{where} must be a list of 'section.key=value' or a mapping, got {value!r}")


def _design_raw(preset: str, base: dict, label: str, folder: Path | None) -> dict:
    """The raw mapping of preset (name, or YAML file relative to ``folder``) <- study base <- name."""
    ref: str | Path = preset
    if folder is not None and (folder / preset).is_file():
        ref = folder / preset
    # fusedit.config's own reader and merge, so that presets, files and their `base:` chains behave exactly
    # as in `fusedit train PRESET key=value ...`.
    raw = _resolve_raw(ref)
    for layer in (base, {"name": label}):
        raw = _deep_merge(raw, layer)
    return raw


def resolve_design_config(
    preset: str,
    base: dict,
    overrides: dict,
    label: str,
    folder: Path | None = None,
    device: str | None = None,
) -> Config:
    """preset (name, or YAML file relative to ``folder``) <- study base <- name <- design overrides."""
    raw = _deep_merge(_design_raw(preset, base, label, folder), overrides)
    if device:
        raw = _deep_merge(raw, {"train": {"device": device}})
    return config_from_dict(raw)


def load_study(
    study: str | Path | dict | Study,
    *,
    device: str | None = None,
    overrides: list[str] | None = None,
) -> Study:
    """Read and validate a study (a YAML path, or the same content as a dict) and resolve every design's
    config. ``overrides`` (``section.key=value`` strings, `fusedit study STUDY.yaml key=value ...`) apply to
    the study's base, so they hold for every design and pass the same checks (e.g. ``train.steps=5`` to
    shorten a study). Every problem is a one-line :class:`ConfigError`."""
    if isinstance(study, Study):
        if overrides:
            raise ConfigError(
                f"overrides={overrides!r:.80} cannot apply to a loaded Study, whose designs are resolved "
                "(allowed: the study's YAML path or mapping)"
            )
        _check_seeds(f"study {study.name!r}", study.seeds, study.eval.seed)
        if device:
            study = copy.deepcopy(study)
            for d in study.designs:
                d.config.train.device = device
        return study
    folder: Path | None = None
    source = ""
    if isinstance(study, dict):
        data, default_name = study, "study"
    else:
        path = Path(study)
        if path.is_dir():
            raise ConfigError(
                f"study {str(path)!r} is a folder (allowed: a study YAML file, e.g. studies/*.yaml)"
            )
        if not path.is_file():
            raise ConfigError(f"study file not found: {str(path)!r}")
        try:
            # load_yaml, not yaml.safe_load: a label or key written twice would silently drop the first.
            data = load_yaml(path.read_text())
        except yaml.MarkedYAMLError as e:
            raise ConfigError(f"cannot parse study {str(path)!r}: {yaml_problem(e)}") from None
        except yaml.YAMLError as e:  # its message spans lines; the first one says what
            raise ConfigError(f"cannot parse study {str(path)!r}: {str(e).splitlines()[0]}") from None
        folder, default_name, source = path.parent, path.stem, str(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"a study must be a YAML mapping with {', '.join(STUDY_KEYS)}; got {type(data).__name__}"
        )
    name = data.get("name", default_name)
    where = f"study {name!r}"
    unknown = [k for k in data if k not in STUDY_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(STUDY_KEYS)})")
    if not is_name_word(name):
        raise ConfigError(f"{where}: name must be a word of letters, digits, '.', '_', '+', '-'")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}: description must be a string, got {description!r}")
    given = _overrides_mapping(overrides, f"{where}: overrides")
    base = _deep_merge(_overrides_mapping(data.get("base"), f"{where}: base"), given)
    shared = _Base(base, given)

    eval_raw = data.get("eval") or {}
    try:
        settings = _build(EvalSettings, eval_raw, "eval")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None

    designs_raw = data.get("designs")
    if not isinstance(designs_raw, dict) or not designs_raw:
        raise ConfigError(f"{where}: designs must be a non-empty mapping of label -> {{preset, overrides}}")
    designs = []
    for label, spec in designs_raw.items():
        dwhere = f"{where}: designs.{label}"
        if not is_name_word(label):
            raise ConfigError(f"{dwhere}: a label must be a word of letters, digits, '.', '_', '+', '-'")
        if not isinstance(spec, dict):
            raise ConfigError(f"{dwhere} must be a mapping with {', '.join(DESIGN_KEYS)}, got {spec!r}")
        unknown = [k for k in spec if k not in DESIGN_KEYS]
        if unknown:
            raise ConfigError(f"{dwhere}: unknown key {unknown[0]!r} (allowed: {', '.join(DESIGN_KEYS)})")
        preset = spec.get("preset")
        if not isinstance(preset, str) or not preset:
            raise ConfigError(
                f"{dwhere}: preset is required (a preset name, see `fusedit presets`, or a file)"
            )
        changes = _overrides_mapping(spec.get("overrides"), f"{dwhere}.overrides")
        try:
            cfg = resolve_design_config(preset, base, changes, label, folder, device)
        except ConfigError as e:
            raise ConfigError(f"{shared.blame(e, where, dwhere)}: {e}") from None
        _check_staged_steps(cfg, preset, shared, changes, dwhere)
        _check_design_keeps_base(
            cfg, partial(_design_raw, preset, base, label, folder), shared, changes, settings, where, dwhere
        )
        stages = resolved_stages(cfg)
        _check_stages_keep_base(cfg, stages, base, dwhere)
        for stage in stages:  # as training will, before any design trains
            try:
                check_data_locations(stage.config.data)
            except ConfigError as e:
                raise ConfigError(f"{dwhere}: {stage.where + ': ' if cfg.stages else ''}{e}") from None
        designs.append(Design(label, preset, changes, cfg, str(spec.get("description") or "")))

    prompts = data.get("prompts", list(DEMO_PROMPTS))
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError(f"{where}: prompts must be a non-empty list of strings")
    seeds = data.get("seeds", [0, 1])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers")
    _check_seeds(where, seeds, settings.seed)
    return Study(name, designs, settings, prompts, seeds, description, source)


@dataclass
class _Base:
    """The study's base with the ``overrides`` of load_study merged in (``values``), and those overrides
    alone, to say where a base value or a typo came from."""

    values: dict
    overrides: dict

    def origin(self, key: str) -> str:
        return "the override" if key in flatten(self.overrides) else "the study base's"

    def blame(self, e: ConfigError, where: str, dwhere: str) -> str:
        """Where an error resolving a design lies: in the overrides or the base when they alone raise it (a
        typo there, reported against them rather than against the first design), else in the design (its
        preset, its overrides, or how the base sits on its preset)."""
        for place, layer in ((f"{where}: overrides", self.overrides), (f"{where}: base", self.values)):
            if not layer:
                continue
            try:
                _build(Config, layer, "")  # each key and value on its own, without the cross-field rules
            except ConfigError as own:
                if str(own) == str(e):
                    return place
        return dwhere


def _check_stages_keep_base(cfg: Config, stages: list, base: dict, where: str) -> None:
    """A stage's own value wins over the study's base (stages apply on top of the run's sections), so a
    staged design would silently train outside the recipe the base shares (e.g. its first stage's batch
    instead of the base's): refused, naming the key. Compared as each stage resolves (typed, list positions
    patched) against the run's own sections, which hold the base's values; a staged run's length is its
    stages' (config refuses train.steps there). ``stages``: resolved_stages(cfg)."""
    keys = [k for k in flatten(base) if k.split(".")[0] in STAGE_SECTIONS and k != "train.steps"]
    if not cfg.stages or not keys:
        return
    overriding = stages_overriding(cfg, keys, stages)
    if overriding:  # named: the first stage that differs, and its first key in the base's order
        key = min(overriding, key=lambda k: (overriding[k][0][0].index, keys.index(k)))
        stage, value = overriding[key][0]
        shared = flatten(to_dict(cfg))[key]
        raise ConfigError(
            f"{where}: {stage.where} sets {key}={value!r} over the study's base {key}={shared!r}, so this "
            f"design would not train under the shared recipe (allowed: the base's value, e.g. the design "
            f"override stages.{stage.index}.{key}={shared!r}, or {key} left out of the base)"
        )


def _check_staged_steps(cfg: Config, preset: str, base: _Base, changes: dict, where: str) -> None:
    """A staged run's length is the sum of its stages' steps, which config_from_dict sets train.steps to
    over any value given: a train.steps in the base (set to shorten the study) would leave a staged design
    at its full length, silently. Refused as load_config refuses `fusedit train RECIPE train.steps=N`,
    naming the stage overrides that shorten it. ``changes``: the design's overrides."""
    if not cfg.stages:
        return
    stage_steps = ", ".join(f"stages.{i}.steps=..." for i in range(len(cfg.stages)))
    staged = (
        f"cannot be set on a staged config ({preset}): its length is the sum of stages[i].steps "
        f"({'+'.join(str(st.steps) for st in cfg.stages)})"
    )
    own, shared = flatten(changes), flatten(base.values)
    if "train.steps" in own:
        raise ConfigError(
            f"{where}.overrides sets train.steps={own['train.steps']!r}, which {staged} (allowed: the design "
            f"overrides {stage_steps})"
        )
    if "train.steps" in shared:
        raise ConfigError(
            f"{where}: {base.origin('train.steps')} train.steps={shared['train.steps']!r} {staged} (allowed: "
            f"the design overrides {stage_steps}, with train.steps set in the single-stage designs' overrides "
            "rather than in the base)"
        )


def _check_design_keeps_base(
    cfg: Config, held_raw, base: _Base, changes: dict, settings: EvalSettings, where: str, dwhere: str
) -> None:
    """The base is what the study holds equal across designs: a design's override of a key it sets would
    train or score that design under another recipe than the report states, so it is refused, as a stage
    that overrides the base is (_check_stages_keep_base). Keys that leave the comparison fair
    (_neutral_keys) aside; keys the base leaves out may differ (recipe_differences warns of them).
    Compared typed (the base's '2e-3' is 2.0e-3) at the key the two share, the shorter where one lies
    inside the other (extra_text and extra_text.0.max_length). ``held_raw()``: preset <- base <- name."""
    neutral = _neutral_keys(settings)
    held_keys = [k for k in flatten(base.values) if k not in neutral]
    pairs = [
        (key, held)
        for key in flatten(changes)
        if key not in neutral
        for held in held_keys
        if key == held or key.startswith(f"{held}.") or held.startswith(f"{key}.")
    ]
    if not pairs:
        return
    try:
        kept = _typed_flat(_build(Config, held_raw(), ""))  # the design without its overrides
    except ConfigError as e:  # a base value its override hid from the resolution
        raise ConfigError(f"{base.blame(e, where, dwhere)}: {e}") from None
    mine, own = _typed_flat(cfg), flatten(changes)
    for key, held in pairs:
        shared = min(key, held, key=len)
        if mine.get(shared) != kept.get(shared):
            origin = base.origin(held)
            allowed = (
                f"the base's value, or leave {held} out of the base"
                if origin == "the study base's"
                else f"the override's value, or no {held} override"
            )
            value = mine.get(key, own[key])  # a list of strings has no typed entries: as written
            raise ConfigError(
                f"{dwhere}.overrides sets {key}={value!r} over {origin} {held}={kept.get(held)!r} (allowed: "
                f"{allowed} to vary it)"
            )


def _typed_flat(cfg: Config) -> dict:
    """Every dotted key of ``cfg``, list entries numbered too (extra_text and extra_text.0.family)."""
    data = to_dict(cfg)
    return {**flatten(data, lists=True), **flatten(data)}


def _neutral_keys(settings: EvalSettings | None) -> tuple[str, ...]:
    """Keys in which designs may differ and still compare fairly: names and devices, bookkeeping, and the
    sampling steps and guidance where the study's eval fixes them (the bench and the grids sample at
    eval's for every design)."""
    fixed = ()
    if settings is not None:
        fixed = (
            *(("sample.steps",) if settings.steps else ()),
            *(("sample.guidance",) if settings.guidance is not None else ()),
        )
    return (*_IGNORED_KEYS, *_BOOKKEEPING_KEYS, *fixed)


def _check_seeds(where: str, seeds: list[int], eval_seed: int) -> None:
    """Refuse, before anything trains, a seed that would fail only once a design is sampled (past 2**64 - 1
    torch.Generator overflows; a negative eval seed numpy refuses) or that torch would wrap (a negative grid
    seed): fusedit's seed range, as `fusedit sample` and `serve` take seeds."""
    for i, seed in enumerate(seeds):
        check_seed(seed, name=f"{where}: seeds[{i}]")
    check_seed(eval_seed, name=f"{where}: eval.seed")


# --------------------------------------------------------------------------------------------------
# What differs between designs, and what a design costs


def varying_keys(configs: list[Config]) -> list[str]:
    """Dotted config keys whose value is not the same in every config (names and devices aside)."""
    flat = [flatten(to_dict(c)) for c in configs]
    keys = sorted(set().union(*flat))
    return [
        k
        for k in keys
        if k not in _IGNORED_KEYS and any(f.get(k, "<unset>") != flat[0].get(k, "<unset>") for f in flat)
    ]


def recipe_differences(designs: list[Design], settings: EvalSettings | None = None) -> list[str]:
    """The recipe keys (_RECIPE_SECTIONS) in which the designs train differently: at some step that every
    design trains, one uses another value than the first (each stage's config holds from its first step
    on, so designs on one staged recipe compare equal, and a staged design differs from single-stage ones
    where its stages part from theirs); and train.steps, the run's length. Keys that leave the comparison
    fair are not counted (_neutral_keys: bookkeeping, and sample.steps / guidance where the study's eval
    ``settings`` fix them)."""
    runs = [[(s.start, flatten(to_dict(s.config))) for s in resolved_stages(d.config)] for d in designs]
    horizon = min(d.config.train.steps for d in designs)
    starts = sorted({start for run in runs for start, _ in run if start < horizon})

    def at(run: list, step: int, key: str) -> Any:  # the value ``key`` has at ``step`` of ``run``
        return next(flat for start, flat in reversed(run) if start <= step).get(key, "<unset>")

    keys = {k for run in runs for _, flat in run for k in flat if k.split(".")[0] in _RECIPE_SECTIONS}
    differ = {
        k
        for k in keys - {*_neutral_keys(settings), "train.steps"}
        if any(at(run, step, k) != at(runs[0], step, k) for run in runs[1:] for step in starts)
    }
    if len({d.config.train.steps for d in designs}) > 1:
        differ.add("train.steps")
    return sorted(differ)


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


def identical_designs(study: Study) -> list[list[str]]:
    """The groups of designs whose configs are the same (keys that leave a comparison fair aside): a
    forgotten override, which would train and score one design twice."""
    neutral = _neutral_keys(study.eval)
    groups: dict[str, list[str]] = {}
    for d in study.designs:
        flat = {k: v for k, v in flatten(to_dict(d.config)).items() if k not in neutral}
        groups.setdefault(json.dumps(flat, sort_keys=True, default=str), []).append(d.label)
    return [labels for labels in groups.values() if len(labels) > 1]


def study_warnings(study: Study) -> list[str]:
    """What makes a study's comparison doubtful, one line each: a recipe that differs between designs,
    designs that are the same."""
    lines = []
    unfair = recipe_differences(study.designs, study.eval)
    if unfair:
        lines.append(f"the recipe differs between designs in {', '.join(unfair)}")
    for labels in identical_designs(study):
        names = f"{', '.join(labels[:-1])} and {labels[-1]}"
        lines.append(
            f"designs {names} train and score the same (their configs differ in no key that changes either: "
            "a forgotten override?)"
        )
    return lines


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


def _finished_step(run_dir: Path) -> int | None:
    try:
        return int(load_state(find_checkpoint(run_dir))["step"])
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
        raise ConfigError(
            f"{run_dir} was trained with a different config for design {label!r} ({key}: "
            f"{there!r} there, {now!r} now); delete it or use another output folder"
        )


def _trained_difference(old: Config, new: Config) -> tuple[str, Any, Any] | None:
    """The first key, with its two values, in which ``new`` would train other weights than ``old``:
    stage by stage (a staged run's sampling settings live in its stages too), _UNTRAINED_KEYS aside."""
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


def _read_losses(run_dir: Path) -> tuple[list[float], float]:
    """Per-step losses of a run and the seconds its steps took (from metrics.jsonl)."""
    losses, seconds = [], 0.0
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # blank, or cut short by a kill (as the training's rewind drops it)
                continue
            losses.append(float(record["loss"]))
            seconds += float(record.get("sec", 0.0))
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
    """What an output folder holds of one design: its run's last checkpoint step (None: none), the eval
    settings it is scored under now, its scores when made under those (else None), and whether its sample
    grid is current."""

    step: int | None
    settings: dict
    scores: dict | None
    grid_current: bool


def _found(design: Design, study: Study, out_dir: Path) -> _Found:
    run_dir = out_dir / "runs" / design.label
    # A staged design is scored at its last stage's size and sampling settings.
    settings = _eval_settings(study.eval, final_config(design.config))
    scores = _read_json(run_dir / "eval" / "scores.json")
    grid = out_dir / "grids" / f"{design.label}.png"
    return _Found(
        _finished_step(run_dir),
        settings,
        scores if scores is not None and scores.get("settings") == settings else None,
        _grid_current(grid, _grid_meta(study, settings)),
    )


def _status(found: _Found, steps: int) -> str:
    """What running a design of ``steps`` steps does with what it ``found``, as results.json records it:
    "trained" (from scratch), "resumed at step N", "re-scored" (trained before; scored again, as its
    scores are missing or were made under other eval settings), "grid redrawn" (only the sample grid is
    stale), or "reused" (nothing to do). The one decision both the run and `--check`'s plan make."""
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
        return _result(design, run_dir, status, found.scores)
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
    model, _, _ = load_model(run_dir, device, use_ema=cfg.sample.use_ema)
    if scores is None:
        log.info("%s %s: shapes benchmark, %d prompts per category", index, label, settings["per_category"])
        scores = run_shapes_bench(
            model,
            out_dir=run_dir / "eval",
            name=label,
            progress=progress,
            **settings,
        )
    else:
        log.info("%s %s: scores present, not re-scored", index, label)
    if need_grid:
        grid = _sample_grid(model, cfg, study.prompts, study.seeds, settings["steps"], settings["guidance"])
        save_png(grid, grid_path)
        write_text_atomic(grid_path.with_suffix(".json"), json.dumps(_grid_meta(study, settings), indent=1))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    log.info("%s %s: %s, overall %.3f", index, label, status, scores["overall"])
    return _result(design, run_dir, status, scores)


def _grid_meta(study: Study, settings: dict) -> dict:
    """Everything a design's sample grid depends on besides the weights."""
    return {
        "prompts": study.prompts,
        "seeds": study.seeds,
        **{k: v for k, v in settings.items() if k not in ("per_category", "seed")},
    }


def _grid_current(grid_path: Path, grid_meta: dict) -> bool:
    return grid_path.is_file() and _read_json(grid_path.with_suffix(".json")) == grid_meta


def _earlier_result(design: Design, study: Study, out_dir: Path) -> dict | None:
    """The result of a design that an earlier call finished and scored under the current settings (with
    its grid), without training or sampling anything; None when some of it is missing or stale."""
    found = _found(design, study, out_dir)
    if _status(found, design.config.train.steps) != "reused":
        return None
    return _result(design, out_dir / "runs" / design.label, "reused", found.scores)


def _result(design: Design, run_dir: Path, status: str, scores: dict) -> dict:
    """One design's row of results.json."""
    label, cfg = design.label, design.config
    losses, seconds = _read_losses(run_dir)
    # A step skipped for a NaN/inf loss (train.max_bad_steps) logs that loss: it would make the mean NaN.
    tail = [loss for loss in losses[-max(1, len(losses) // 10) :] if math.isfinite(loss)]
    return {
        "label": label,
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
        "train_seconds": round(seconds, 1),
        "scores": {k: scores[k] for k in ("overall", "per_category", "counts", "num_images")},
        **design_cost(cfg),
    }


# --------------------------------------------------------------------------------------------------
# Report


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _categories(results: dict) -> list[str]:
    present = {k for r in results.values() for k in r["scores"]["per_category"]}
    return [k for k in ALL_KINDS if k in present]


def markdown_report(study: Study, results: dict, varying: list[str]) -> str:
    """The comparison table (rows = designs, columns = shapes categories + overall, cost, loss, samples)."""
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
        "tenth of training; train time: the training steps alone (metrics.jsonl).",
        "",
    ]
    unfair = recipe_differences(study.designs, study.eval)
    if unfair:
        lines += [f"**Warning: not a fair comparison**: the recipe differs in {', '.join(unfair)}.", ""]
    if first is None:
        return "\n".join(lines + ["No design has finished yet."]) + "\n"

    columns = [*kinds, "overall"]
    # Bold marks the best of a column; a column where every design ties (e.g. all 0 early on) has none.
    values = {c: [_score(r, c) for r in results.values()] for c in columns}
    best = {c: max(v) if len(set(v)) > 1 else None for c, v in values.items()}
    lines.append(
        "| design | preset | "
        + " | ".join(columns)
        + " | trainable params | train FLOPs / image | final loss | train time | samples |"
    )
    lines.append("|---" * (len(columns) + 7) + "|")
    for label, r in results.items():
        cells = []
        for c in columns:
            value = _score(r, c)
            cells.append(f"**{value:.3f}**" if value == best[c] else f"{value:.3f}")
        loss = "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(
            f"| {label} | {r['preset']} | "
            + " | ".join(cells)
            + f" | {_si(r['trainable_params'])} | {_si(r['train_flops_per_image'])} | {loss} | "
            f"{r['train_seconds'] / 60:.1f} min | [grid]({r['grid']}) |"
        )
    pending = [d.label for d in study.designs if d.label not in results]
    if pending:
        lines += ["", f"Pending: {', '.join(pending)}."]
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


def write_outputs(study: Study, results: dict, out_dir: Path) -> dict:
    """report.md, loss_curves.png, scores.png, samples.png and results.json for the designs done so far."""
    varying = varying_keys([d.config for d in study.designs])
    # Atomic, as the report is rewritten after every design and may be read while the study runs.
    write_text_atomic(out_dir / "report.md", markdown_report(study, results, varying))
    curves = {label: _read_losses(out_dir / r["run_dir"])[0] for label, r in results.items()}
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
        "pending": [d.label for d in study.designs if d.label not in results],
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
    for i, design in enumerate(bar):
        bar.set_postfix_str(design.label)
        index = f"[{i + 1}/{len(chosen)}]"
        results[design.label] = _run_design(design, study, out, index, progress)
        # Written after every design, so a long study's partial table can be read while it runs.
        summary = write_outputs(study, _in_study_order(study, results), out)
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
