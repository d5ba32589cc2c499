"""Configs read and written: YAML files, presets and ``base:`` chains, model folders' saved configs,
``section.key=value`` overrides, a config built from a mapping or edited in Python checked as a file is
(``config_from_dict``, ``checked``), and saving."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fusedit.config.paths import absolute_paths
from fusedit.config.schema import (
    STAGE_SECTION_CLASSES,
    STAGE_SECTIONS,
    Config,
    ConfigError,
    Stage,
    StageConfig,
    build_section,
    deep_merge,
)
from fusedit.config.validate import check_llm_shape, idle_settings, noop_settings, resolved_stages, validate

# The package's name, as before the split into modules: its messages keep their logger.
log = logging.getLogger("fusedit.config")


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("fusedit.presets").iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(name_or_path: str | Path, preset: bool = False) -> tuple[dict, Path | None]:
    """A preset name, a YAML path, or a model folder -> (mapping, folder it came from for relative
    ``base:``). ``preset``: the name is a preset's, whatever the working directory holds. A preset's bare
    name (``debug``) is the preset even beside a folder of that name (a run named after its preset, as
    ``base:`` reads it): the folder is ``./debug`` (or a ``Path``)."""
    path = Path(name_or_path)
    preset = _as_preset(name_or_path, preset)
    if path.is_dir() and not preset:
        return _saved_mapping(path), None
    if not preset and (path.suffix in (".yaml", ".yml") or path.exists()):
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r}")
        try:
            text, folder = path.read_text(encoding="utf-8"), path.parent
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}) (allowed: a UTF-8 YAML file)"
            ) from None
    else:
        res = resources.files("fusedit.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown preset {str(name_or_path)!r}{_preset_hint(str(name_or_path))} "
                f"(allowed: {', '.join(preset_names())})"
            )
        text, folder = res.read_text(), None
    try:
        data = load_yaml(text)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"cannot parse {name_or_path}: {yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {name_or_path}: {str(e).splitlines()[0]}") from None
    if data is None:
        # Read as {}, an empty file was the all-default config, refused for a missing text.arch.
        raise ConfigError(
            f"{name_or_path}: the file is empty (allowed: a YAML mapping of sections, e.g. base: debug)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name_or_path}: a config must be a YAML mapping of sections, got {type(data).__name__}"
        )
    return data, folder


def load_yaml(text: str) -> Any:
    """YAML text as ``yaml.safe_load`` reads it, but a mapping that repeats a key is a
    ``yaml.MarkedYAMLError`` naming the key and both lines (``yaml_problem`` words it in one line): the safe
    loader keeps the last one, so a section written twice (``model:`` twice) or a study's design label given
    twice silently lost the first. Checked on the composed document, before PyYAML splices merged pairs
    (``<<: *base``, which overrides on purpose) into the mappings."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_repeated_keys(node: yaml.Node, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: the anchored node was checked where it stands
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)  # the resolved tag: 1 and "1" are other keys
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key_node.value!r} appears twice (first on line {first[key]}; allowed: each key once)",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line + 1
            _refuse_repeated_keys(key_node, seen)
            _refuse_repeated_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, seen)


def pipeline_record(folder: Path) -> dict | None:
    """The Config sections a diffusers pipeline folder's transformer recorded (``fusedit.hub.export_config``),
    or None where it records none (no such file, or the public FuseDiT code's pipeline). Its scheduler's
    shift is the folder's sample.shift, as FuseDiTPipeline.fusedit_config reads it when the folder loads:
    swapping the scheduler is how docs/diffusers.md changes it."""
    try:
        recorded = json.loads((folder / "transformer" / "config.json").read_text()).get("fusedit")
    except (OSError, ValueError, AttributeError):  # absent, not JSON, or not a JSON object
        return None
    if not isinstance(recorded, dict):
        return None
    try:
        shift = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("shift")
    except (OSError, ValueError, AttributeError):
        shift = None
    if isinstance(shift, (int, float)) and not isinstance(shift, bool):
        recorded = {**recorded, "sample": {**(recorded.get("sample") or {}), "shift": float(shift)}}
    return recorded


def _saved_mapping(folder: Path) -> dict:
    """The config a model folder was saved with, as a base to build on (fine-tuning it with
    ``train.init_from``): a run or checkpoint folder's ``config.yaml``, or the sections a diffusers pipeline
    folder recorded (the data and train sections then start from their defaults, but for data.image_size
    and data.max_objects)."""
    if (folder / "config.yaml").is_file():
        return _without_noops(_read_yaml(folder / "config.yaml")[0], folder)
    if (folder / "model_index.json").is_file():
        recorded = pipeline_record(folder)
        if recorded is None:
            raise ConfigError(
                f"{str(folder)!r} is not a fusedit pipeline folder ({folder / 'transformer' / 'config.json'} "
                "records no fusedit config; a public FuseDiT pipeline needs `fusedit convert` first)"
            )
        return _without_noops(recorded, folder)
    raise ConfigError(
        f"{str(folder)!r} is a folder without a saved config (allowed: a preset name, a YAML file, or a run, "
        "checkpoint or diffusers pipeline folder)"
    )


def _preset_hint(name: str) -> str:
    """What an unknown preset name most likely meant: a YAML file of that name here (``fusedit train my-run``
    for my-run.yaml), or a preset spelled alike."""
    local = [name + ext for ext in (".yaml", ".yml") if Path(name + ext).is_file()]
    close = local or [repr(n) for n in difflib.get_close_matches(name, preset_names(), n=1)]
    return f": did you mean {close[0]}?" if close else ""


def yaml_problem(e: yaml.MarkedYAMLError) -> str:
    """PyYAML's report (several lines, the problem's position last) as one line: where, what, and what
    the parser was in the middle of."""

    def where(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    text = e.problem or e.context or "not valid YAML"
    if e.problem_mark is not None:
        text = f"{where(e.problem_mark)}: {text}"
    if e.problem and e.context:
        start = where(e.context_mark)
        text += (
            f" ({e.context} started at {start})"
            if start not in ("", where(e.problem_mark))
            else f" ({e.context})"
        )
    return text


def _as_preset(name_or_path: str | Path, preset: bool) -> bool:
    """Whether a config reference is read as a preset: asked to be (``base: debug``), or a preset's bare
    name given as a str."""
    return preset or (isinstance(name_or_path, str) and name_or_path in preset_names())


def _model_folder(name_or_path: str | Path, preset: bool) -> bool:
    """Whether a config reference reads a model folder's saved config (a preset's bare name never does)."""
    return Path(name_or_path).is_dir() and not _as_preset(name_or_path, preset)


def resolve_raw(
    name_or_path: str | Path,
    seen: tuple = (),
    preset: bool = False,
    folders: list | None = None,
    written: list | None = None,
) -> dict:
    """The merged mapping of a config reference and its ``base:`` chain; ``folders`` collects the model
    folders read along it (model_folder_bases), ``written`` the mappings of the YAML files read along it
    (the user's own: neither a preset nor a model folder's saved config)."""
    if str(name_or_path) in seen:
        raise ConfigError(f"config 'base' cycle: {' -> '.join(map(str, (*seen, name_or_path)))}")
    if folders is not None and _model_folder(name_or_path, preset):
        folders.append(Path(name_or_path))
    data, folder = _read_yaml(name_or_path, preset)
    base = data.pop("base", None)
    # Only a YAML file has a folder for its relative base; a saved config (a run's config.yaml, save_config's
    # output, used as a file or a base) holds every inherited value, so its settings are not the user's.
    if written is not None and folder is not None and not set(data) >= SAVED_SECTIONS:
        written.append(data)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{name_or_path}: base={base!r} is not allowed (allowed: a preset name, a YAML path, or a run "
            "folder)"
        )
    # A file beside the config, or a run/checkpoint/pipeline folder beside it written as a path (../run,
    # ./runs/a). A bare name (debug) is the preset, even where a folder of that name lies beside the config
    # (an output folder named like a preset) or in the working directory.
    sibling = folder / str(base) if folder is not None else None
    as_path = "/" in str(base) or str(base).startswith(".")
    if sibling is not None and (sibling.is_file() or (sibling.is_dir() and as_path)):
        return deep_merge(
            resolve_raw(sibling, (*seen, str(name_or_path)), folders=folders, written=written), data
        )
    bare = not as_path and Path(str(base)).suffix not in (".yaml", ".yml")
    if bare and base not in preset_names():
        raise ConfigError(
            f"base {base!r} of {name_or_path}: unknown preset{_preset_hint(base)} (allowed: "
            f"{', '.join(preset_names())}; or a YAML path or a run folder)"
        )
    if not bare and not Path(base).exists():
        beside = f"beside it ({sibling}) nor " if sibling is not None else ""
        raise ConfigError(
            f"base {base!r} of {name_or_path}: not found {beside}from the working directory "
            f"({Path(base).absolute()}) (allowed: a preset name, a YAML path, or a run folder)"
        )
    deeper = resolve_raw(base, (*seen, str(name_or_path)), preset=bare, folders=folders, written=written)
    return deep_merge(deeper, data)


# The sections every saved config writes (to_dict): a YAML file holding them all is a dump, not overrides.
SAVED_SECTIONS = {"model", "text", "vae", "data", "flow", "train", "sample"}


def _field(parts: list[str]) -> tuple[Any, Any]:
    """The declared type and the dataclass field of the Config field at ``parts`` (e.g. ["text",
    "instruction"]), or None for each that is not known. An item of a list of sections is addressed by its
    position (extra_text.0.instruction, stages.1.name) and a stage's override mappings by their section's
    fields (stages.0.data.root)."""
    cls: Any = Config
    parts = list(parts)
    while parts:
        name = parts.pop(0)
        if not dataclasses.is_dataclass(cls):
            return None, None
        tp = typing.get_type_hints(cls).get(name)
        if not parts or tp is None:
            return tp, cls.__dataclass_fields__.get(name)
        item = cls.__dataclass_fields__[name].metadata.get("item")
        if item is not None:
            if not parts.pop(0).isdigit():
                return None, None
            tp = item
        elif cls is StageConfig and name in STAGE_SECTIONS:
            tp = STAGE_SECTION_CLASSES[name]
        cls = tp
    return None, None


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "model.pos_embed=2d-rope"]`` -> nested mapping. Values are parsed as YAML,
    except for string keys, which take the text as typed (``null`` aside, refused as in a YAML file): YAML
    would turn ``text.instruction=Imagine: `` into a mapping and ``name=yes`` into true."""
    out: dict = {}
    given: dict[str, str] = {}  # dotted key -> the override that set it last
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = out
        for i, p in enumerate(parts[:-1]):
            if p in node and not isinstance(node[p], dict):
                node[p] = _under_a_value(parts[: i + 1], node[p], given, item)
            node = node.setdefault(p, {})
        given[".".join(parts)] = item
        if _field(parts)[0] is str:
            # Kept as the text 'null', it would name a folder or a prompt nobody meant.
            node[parts[-1]] = None if value.strip() in ("null", "Null", "NULL") else value
            continue
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _under_a_value(parts: list[str], value: Any, given: dict[str, str], item: str) -> dict:
    """The mapping an override ``item`` under ``parts`` builds on where an earlier override set ``parts``
    itself to ``value``: a section whose null is its default (lora_field: ``train.llm_lora=null
    train.llm_lora.rank=4``) builds on that default, all its fields written out, so that the earlier null
    still forgets what the preset set (its alpha, targets). Any other value holds no keys: refused."""
    key = ".".join(parts)
    _, spec = _field(parts)
    if value is None and spec is not None and spec.metadata.get("null_is_default"):
        return dataclasses.asdict(spec.default_factory())
    raise ConfigError(
        f"override {item!r} sets a key inside {key}, which the earlier override {given[key]!r} set to "
        f"{value!r} (allowed: one of the two)"
    )


def config_from_dict(data: dict) -> Config:
    return _completed(build_section(Config, data, ""))


def _completed(cfg: Config) -> Config:
    """A config built field by field, with what lies across fields: a staged run's train.steps is its
    stages' sum; the cross-field rules (validate); the DiT's shape against its LLM's, where the LLM's
    config is known without the network (check_llm_shape)."""
    if cfg.stages:
        missing = [i for i, st in enumerate(cfg.stages) if st.steps is None]
        if missing:
            raise ConfigError(f"stages.{missing[0]}.steps is required (the stage's optimizer steps)")
        cfg.train.steps = sum(st.steps for st in cfg.stages)
    validate(cfg)
    check_llm_shape(cfg)
    return cfg


def checked(cfg: Config) -> Config:
    """``cfg`` checked as ``load_config`` checks a file, for a config built or edited in Python: a copy in
    which every field is checked (type, choices, range: one line naming the key, as at load), the
    cross-field rules hold, a staged config's ``train.steps`` is its stages' sum again, and paths that
    exist are absolute. An attribute that is no config key (``cfg.train.stesp = 5``) is refused, not
    dropped; a ``Path`` stands for its text. ``cfg`` itself is left as it is."""
    copy_ = _completed(check_fields(cfg))
    if copy_.train.steps != cfg.train.steps:  # stages set, or train.steps edited, in Python
        log.warning(
            "train.steps=%s is not the stages' sum (%s): a staged run trains its stages' length (set "
            "stages.N.steps to change it)",
            cfg.train.steps,
            "+".join(str(st.steps) for st in copy_.stages),
        )
    absolute_paths(copy_)
    return copy_


def check_fields(cfg: Config) -> Config:
    """``checked``'s checks of each field on its own (type, choices, range; stray attributes), without
    the rules across fields (``validate``): what a build needs of a config code may assemble on purpose
    outside those rules (the public-checkpoint converter's VAE stand-in). Returns the copy built from
    ``cfg``'s fields."""
    if not isinstance(cfg, Config):
        raise ConfigError(
            f"expected a fusedit Config, got {type(cfg).__name__} {cfg!r:.60} (allowed: "
            "fusedit.config.load_config(name_or_path, overrides) or config_from_dict(mapping))"
        )
    _refuse_stray_attributes(cfg, "")
    return build_section(Config, _plain(to_dict(cfg)), "")


def _refuse_stray_attributes(section: Any, prefix: str) -> None:
    """An attribute set on a config section that is none of its fields: a misspelt key, which asdict (and
    so every use) would drop without a word."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    stray = [name for name in vars(section) if name not in fields]
    if stray:
        build_section(type(section), {stray[0]: None}, prefix)  # the unknown-key error, with its suggestion
    hints = typing.get_type_hints(type(section))
    for name, spec in fields.items():
        value, path = getattr(section, name), f"{prefix}.{name}" if prefix else name
        want = hints[name] if dataclasses.is_dataclass(hints[name]) else spec.metadata.get("item")
        items = value if "item" in spec.metadata and isinstance(value, list) else [value] if want else []
        for i, item in enumerate(items):
            where = f"{path}.{i}" if "item" in spec.metadata else path
            if not isinstance(item, want):  # a section replaced by a mapping: every use reads attributes
                raise ConfigError(
                    f"{where} is a {type(item).__name__} (allowed: a {want.__name__}; config_from_dict "
                    "builds a whole config from mappings)"
                )
            _refuse_stray_attributes(item, where)


def _plain(value: Any) -> Any:
    """A config mapping as YAML gives one: ``os.PathLike`` values as their text (a path set in Python as a
    Path), tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a tuple, as YAML would give it: a list
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def load_config(
    name_or_path: str | Path = "debug", overrides: list[str] | None = None, folders: list | None = None
) -> Config:
    """Load a preset name or YAML file, apply dotted overrides, validate, and return the typed config.
    ``folders`` collects the model folders (run, checkpoint or pipeline folders) the config takes its saved
    config from, itself or along its ``base:`` chain: their config, never their weights (train.init_from
    loads those)."""
    if isinstance(overrides, (str, dict)):
        raise ConfigError(
            f"overrides={overrides!r:.80} is not allowed (allowed: a list of 'section.key=value' strings, "
            "e.g. ['train.steps=5'])"
        )
    written: list[dict] = []
    data = resolve_raw(name_or_path, folders=folders, written=written)
    extra = parse_overrides(overrides or [])
    data = deep_merge(data, extra)
    if data.get("stages") and "steps" in (extra.get("train") or {}):
        raise ConfigError(
            f"train.steps={extra['train']['steps']!r} cannot be set on a staged config: its length is the sum "
            "of stages.N.steps (allowed: stages.N.steps=..., or `fusedit train --stop-at STEP`)"
        )
    cfg = config_from_dict(data)
    absolute_paths(cfg)
    for message in unreached_overrides(cfg, extra):
        log.warning(message)
    for message in idle_user_settings(cfg, [*written, extra]):
        log.warning(message)
    return cfg


def idle_user_settings(cfg: Config, mappings: list[dict]) -> list[str]:
    """One warning per key, of the settings that change nothing in ``cfg``'s design (idle_settings), that
    one of ``mappings`` (the user's own files and overrides, not the presets they inherit from) sets."""
    given = {key for mapping in mappings for key in flatten(mapping)}
    return [message for key, message in idle_settings(cfg) if key in given]


def unreached_overrides(cfg: Config, extra: dict) -> list[str]:
    """One message per top-level override of a staged run's data/train/flow/sample key that some stage
    does not train under, because that stage (or one before it) sets its own value: a stage's value wins
    (stages apply on top of the run's sections), so ``train.batch_size=4`` on a recipe whose stages set their
    batch would otherwise change nothing, silently. It names the stage overrides that would carry the value
    (the stages setting the key themselves; later ones inherit). Stages the overrides name themselves
    (stages.N...) are the user's choice and not reported. ``extra``: the parsed overrides (parse_overrides)."""
    # Leaf keys, dotted (train.dit_lora.rank=16 as "train.dit_lora.rank").
    keys = [f"{s}.{k}" for s in STAGE_SECTIONS for k in flatten(extra.get(s) or {})]
    if not cfg.stages or not keys:
        return []
    named = {
        str(i): flatten(patch) for i, patch in (extra.get("stages") or {}).items() if isinstance(patch, dict)
    }
    shared = flatten(to_dict(cfg))
    overriding = stages_overriding(cfg, keys, resolved_stages(cfg))
    messages = []
    for key in keys:
        missed = [(st, v) for st, v in overriding.get(key, []) if key not in named.get(str(st.index), {})]
        if missed:
            text = _yaml_text(shared[key])
            theirs = ", ".join(f"{st.where} at {_yaml_text(value)}" for st, value in missed)
            section, field_key = key.split(".", 1)
            setting = [
                st for st, _ in missed if field_key in flatten(getattr(cfg.stages[st.index], section))
            ] or [missed[0][0]]
            fix = " ".join(f"stages.{st.index}.{key}={text}" for st in setting)
            messages.append(
                f"{key}={text} does not reach {theirs}: a stage's value (its own or an earlier stage's) wins "
                f"over the top-level one; to set it there, override {fix}"
            )
    return messages


def stages_overriding(
    cfg: Config, keys: list[str], stages: list[Stage]
) -> dict[str, list[tuple[Stage, Any]]]:
    """For each dotted data/train/flow/sample key of ``keys`` (train.batch_size), the ``stages``
    (resolved_stages(cfg)) that train under another value than the run's top-level one, because they or an
    earlier stage set their own (a stage's value wins), each with that value; keys every stage keeps are left
    out. What `fusedit train` warns about for a top-level override (unreached_overrides) and a study refuses
    for its base (fusedit.study.file)."""
    shared = flatten(to_dict(cfg))
    out: dict[str, list[tuple[Stage, Any]]] = {}
    for stage in stages:
        own = flatten(to_dict(stage.config))
        for key in keys:
            if key in shared and own.get(key) != shared[key]:
                out.setdefault(key, []).append((stage, own.get(key)))
    return out


def _yaml_text(value: Any) -> str:
    """A value as an override would spell it (null, true, 0.0001, [a, b])."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def flatten(data: dict, prefix: str = "", lists: bool = False) -> dict:
    """A nested config dict (``to_dict``) as dotted keys (an LLM's ``arch`` stays one value); ``lists``
    also numbers the entries of lists of mappings (extra_text.0.family)."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and key != "arch":
            out.update(flatten(value, path, lists))
        elif lists and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.update(flatten(dict(enumerate(value)), path, lists))
        else:
            out[path] = value
    return out


def saved_config(data: dict, where: str | Path) -> Config:
    """The Config of a mapping a model was saved with (a pipeline's record, a run's config.yaml), without
    its settings that change nothing (_without_noops); ``where`` names it in the note."""
    return config_from_dict(_without_noops(data, where))


def _without_noops(data: dict, folder: str | Path) -> dict:
    """A saved config mapping without the settings that change nothing in it (noop_settings): a run saved
    before their refusal still samples, resumes and serves as a base, as it trained."""
    try:
        keys = [key for key, _ in noop_settings(build_section(Config, copy.deepcopy(data), ""))]
    except ConfigError:
        return data  # the load names the problem
    if not keys:
        return data
    log.info("%s: leaving out %s, which change(s) nothing in its saved config", folder, ", ".join(keys))
    out = copy.deepcopy(data)
    for key in keys:
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.pop(leaf, None)
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
