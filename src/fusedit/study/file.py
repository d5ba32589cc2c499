"""Reading and checking a study file: every design's config resolved and validated before anything trains,
and what differs between the designs; ``fusedit.study.run`` runs a study and reports it.

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

A module of its own: what a study file says, and whether its designs compare fairly, is settled here without
training or sampling anything; the run of fusedit.study.run and its `--check` plan both start from
:func:`load_study`.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from fusedit.config import (
    STAGE_SECTIONS,
    Config,
    ConfigError,
    build_section,
    check_data_locations,
    choice,
    config_from_dict,
    deep_merge,
    flatten,
    idle_user_settings,
    is_name_word,
    load_yaml,
    nonneg,
    parse_overrides,
    positive,
    resolve_raw,
    resolved_stages,
    stages_overriding,
    to_dict,
    yaml_problem,
)
from fusedit.data.shapes import DEMO_PROMPTS
from fusedit.sampling.generation import check_seed

log = logging.getLogger(__name__)

STUDY_KEYS = ("name", "description", "base", "designs", "eval", "prompts", "seeds")
DESIGN_KEYS = ("preset", "overrides", "description")
# Keys never compared (what varies, a finished run against the study): a design's name and its device.
_IGNORED_KEYS = ("name", "train.device")
# Bookkeeping: keys that change neither the trained weights nor the scores (the bench does not record
# sample.compile / cuda_graphs, which change images by rounding only), so designs may differ in them and
# still compare fairly (recipe_differences, the base check of load_study, identical_designs).
BOOKKEEPING_KEYS = (
    "sample.compile",
    "sample.cuda_graphs",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.loggers",
    "train.preview_every",
    "data.num_workers",
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
                deep_merge(node[parts[-1]], leaf) if isinstance(node.get(parts[-1]), dict) else leaf
            )
        return out
    raise ConfigError(f"{where} must be a list of 'section.key=value' or a mapping, got {value!r}")


def _design_raw(
    preset: str, base: dict, label: str, folder: Path | None, written: list | None = None
) -> dict:
    """The raw mapping of preset (name, or YAML file relative to ``folder``) <- study base <- name;
    ``written`` collects the mappings of the user's YAML files along the preset's chain (load.resolve_raw)."""
    ref: str | Path = preset
    if folder is not None and (folder / preset).is_file():
        ref = folder / preset
    # fusedit.config's own reader and merge, so that presets, files and their `base:` chains behave exactly
    # as in `fusedit train PRESET key=value ...`.
    raw = resolve_raw(ref, written=written)
    for layer in (base, {"name": label}):
        raw = deep_merge(raw, layer)
    return raw


def resolve_design_config(
    preset: str,
    base: dict,
    overrides: dict,
    label: str,
    folder: Path | None = None,
    device: str | None = None,
    written: list | None = None,
) -> Config:
    """preset (name, or YAML file relative to ``folder``) <- study base <- name <- design overrides;
    ``written`` as in _design_raw."""
    raw = deep_merge(_design_raw(preset, base, label, folder, written), overrides)
    if device:
        raw = deep_merge(raw, {"train": {"device": device}})
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
            data = load_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"study {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}) (allowed: a UTF-8 YAML "
                "file, e.g. studies/*.yaml)"
            ) from None
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
    base = deep_merge(_overrides_mapping(data.get("base"), f"{where}: base"), given)
    shared = _Base(base, given)

    eval_raw = data.get("eval") or {}
    try:
        settings = build_section(EvalSettings, eval_raw, "eval")
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
        written: list[dict] = []
        try:
            cfg = resolve_design_config(preset, base, changes, label, folder, device, written)
        except ConfigError as e:
            raise ConfigError(f"{shared.blame(e, where, dwhere)}: {e}") from None
        _check_staged_steps(cfg, preset, shared, changes, dwhere)
        # A setting this design's own YAML file, overrides or the command line give that does nothing in its
        # design, as load_config warns; the study's base is shared by every design, like a parent preset,
        # so it is not.
        for message in idle_user_settings(cfg, [*written, changes, given]):
            log.warning("%s: %s", dwhere, message)
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
            try:  # each key and value on its own, without the cross-field rules
                build_section(Config, layer, "")
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
        f"cannot be set on a staged config ({preset}): its length is the sum of stages.N.steps "
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
        kept = _typed_flat(build_section(Config, held_raw(), ""))  # the design without its overrides
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
    return (*_IGNORED_KEYS, *BOOKKEEPING_KEYS, *fixed)


def _check_seeds(where: str, seeds: list[int], eval_seed: int) -> None:
    """Refuse, before anything trains, a seed that would fail only once a design is sampled (past 2**64 - 1
    torch.Generator overflows; a negative eval seed numpy refuses) or that torch would wrap (a negative grid
    seed): fusedit's seed range, as `fusedit sample` and `serve` take seeds."""
    for i, seed in enumerate(seeds):
        check_seed(seed, name=f"{where}: seeds[{i}]")
    check_seed(eval_seed, name=f"{where}: eval.seed")


# --------------------------------------------------------------------------------------------------
# What differs between designs


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
