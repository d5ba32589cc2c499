"""Where a config's files are: names that become folders, paths made absolute, the model locations it sets
and their relocation and identity, and the LLM-config side (a random-init arch checked and built, an LLM's
config where it is known without the network and the family and arch read from it, a model folder's config
through transformers, imported only inside those functions)."""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import json
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusedit.config.schema import STAGE_SECTIONS, Config, ConfigError, TextConfig, choices_of

# A name that becomes a folder or file name (a run's runs/<name>, a study's and its designs' folders,
# grids/<label>.png) and a markdown link: one word, so it is never empty and never leaves its folder
# (../x, /abs).
NAME_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")


NAME_RULE = "a word of letters, digits, '.', '_', '+', '-', starting with a letter or digit"


def is_name_word(name) -> bool:
    """Whether ``name`` keeps to NAME_RULE (a run's or a study's name, a study's design label)."""
    return isinstance(name, str) and NAME_WORD.match(name) is not None


def default_run_folder(name: str) -> str:
    """runs/<name>, where `fusedit train` writes a run given no --out. Checked here, where the name becomes
    a path, not at load: an empty name trained into runs/ itself (which --overwrite clears), ../.. left it;
    a saved run or a converted checkpoint named otherwise still loads."""
    if not is_name_word(name):
        raise ConfigError(
            f"name={name!r} cannot name the run folder runs/<name> (allowed: {NAME_RULE}; or give --out)"
        )
    return f"runs/{name}"


# Keys that may name a local file or folder (or else a hub id).
PATH_KEYS = {
    "text": ("model_id", "tokenizer"),
    "pooled_text": ("model_id", "tokenizer"),
    "vae": ("model_id",),
    "data": ("root", "index_file", "hf_path", "latents_dir"),
    "train": ("init_from",),
}


def absolute_paths(cfg: Config) -> None:
    """Paths that exist here become absolute and normalised ("..", "." and a trailing "/" gone; symlinks
    kept), so the config saved with a run still finds them from another working directory (``fusedit
    sample`` elsewhere) and one folder is one spelling (a resume compares them); hub ids are not paths here
    and stay. Stages hold their sections as override mappings: the path keys they set are made absolute
    alike."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and Path(value).exists():
            return os.path.abspath(value)
        return value

    sections = [(name, getattr(cfg, name)) for name in PATH_KEYS] + [("text", t) for t in cfg.extra_text]
    for name, section in sections:
        for key in PATH_KEYS[name]:
            setattr(section, key, absolute(getattr(section, key)))
    for stage in cfg.stages:
        for name in set(STAGE_SECTIONS) & set(PATH_KEYS):
            overrides = getattr(stage, name)
            for key in set(PATH_KEYS[name]) & set(overrides):
                overrides[key] = absolute(overrides[key])


# The PATH_KEYS sections that name a model's files (an LLM, its tokenizer, the pooled-text encoder, the VAE).
MODEL_PATH_SECTIONS = ("text", "pooled_text", "vae")


def text_sections(cfg: Config) -> list[tuple[str, TextConfig]]:
    """Each LLM's section under the key errors and overrides name it by: text, extra_text.0, ..."""
    return [("text", cfg.text), *((f"extra_text.{i}", text) for i, text in enumerate(cfg.extra_text))]


def _model_path_fields(cfg: Config) -> dict[str, tuple[Any, str]]:
    """(section, field) of each model location ``cfg`` sets, by dotted key (text.model_id,
    extra_text.0.tokenizer, ...)."""
    sections = [(name, name, getattr(cfg, name)) for name in MODEL_PATH_SECTIONS]
    sections += [(key, "text", text) for key, text in text_sections(cfg)[1:]]
    return {
        f"{name}.{key}": (section, key)
        for name, kind, section in sections
        for key in PATH_KEYS[kind]
        if getattr(section, key)
    }


def model_paths(cfg: Config) -> dict[str, str]:
    """The model locations ``cfg`` sets, by dotted key (text.model_id, extra_text.0.tokenizer, ...)."""
    return {key: getattr(section, name) for key, (section, name) in _model_path_fields(cfg).items()}


def written_as_path(value: str) -> bool:
    """Whether a model location is written as a local path (a hub id is "org/name")."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def is_path_to_nothing(place: str) -> bool:
    """Whether a model location is written as a local path (written_as_path) that does not exist."""
    return written_as_path(place) and not Path(place).expanduser().exists()


def refuse_path_to_nothing(named: str, place: str, folder: str = "a folder") -> None:
    """A model location written as a path that does not exist, refused before a loader (transformers,
    diffusers) takes it for a malformed or unreachable hub id; ``named`` is the setting as the error shows
    it (``text.model_id='/x'``, ``--clip '/x'``), ``folder`` what belongs there."""
    if is_path_to_nothing(place):
        raise ConfigError(
            f"{named} is a path to nothing (allowed: {folder} written by save_pretrained, or a hub id "
            "written org/name)"
        )


def model_config(
    place: str | Path, named: str, allowed: str, kinds: tuple[str, ...] = (), folder: str = "a model folder"
):
    """The transformers config of the model at ``place`` (a folder or hub id), refused in one line naming the
    setting (``named``, e.g. ``--clip 'x'``) when it is not a model transformers reads (a file, an image, a
    VAE folder: transformers' own message then names a missing tokenizer backend or a codec), or not of one
    of ``kinds`` (model_type values; empty: any). ``allowed`` says what belongs there; ``folder`` names it
    for a path to nothing (refuse_path_to_nothing)."""
    from transformers import AutoConfig

    refuse_path_to_nothing(named, str(place), folder)
    if Path(place).expanduser().is_file():
        raise ConfigError(f"{named} is a file (allowed: {allowed}, a folder written by save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(place)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if not Path(place).expanduser().is_dir():  # a hub id: offline, gated or mistyped, not a bad model
            raise ConfigError(f"{named} cannot be loaded: {first}") from None
        raise ConfigError(
            f"{named} is not a model transformers can read: {first} (allowed: {allowed})"
        ) from None
    if kinds and config.model_type not in kinds:
        raise ConfigError(f"{named} is a model of model_type {config.model_type!r} (allowed: {allowed})")
    return config


def paths_to_nothing(gone: dict[str, str]) -> str:
    """Model locations that are gone (``gone_model_paths``) as an error names them, all at once: a run whose
    folders all moved to another disk is then fixed in one try, not one folder per try."""
    named = ", ".join(f"{key}={place!r}" for key, place in gone.items())
    return f"{named} {'is a path' if len(gone) == 1 else 'are paths'} to nothing"


def gone_model_paths(cfg: Config) -> dict[str, str]:
    """The model locations ``cfg`` saved as absolute paths that no longer exist (a folder that moved)."""
    return {
        key: place
        for key, place in model_paths(cfg).items()
        if os.path.isabs(place) and not os.path.exists(place)
    }


# The config.json fields that make a model folder the model a run trained with: its kind and shapes. Other
# fields (versions, dtype, _name_or_path) change when the same weights are saved again elsewhere.
IDENTITY_FIELDS = (
    "model_type",
    "_class_name",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "projection_dim",
    "latent_channels",
    "block_out_channels",
    "scaling_factor",
    "shift_factor",
)


def model_identity(place: str, subfolder: str = "") -> dict | None:
    """IDENTITY_FIELDS of the config.json in a local model folder (a multimodal wrapper's language model's,
    under text_config); None for a hub id, a file, or a folder without one (a tokenizer's)."""
    try:
        config = json.loads((Path(place) / subfolder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return {key: config[key] for key in IDENTITY_FIELDS if key in config}


def identity_difference(old: dict, new: dict) -> str | None:
    """The first IDENTITY_FIELDS field two model_identity records both have and disagree on, or None."""
    return next((f for f in IDENTITY_FIELDS if f in old and f in new and old[f] != new[f]), None)


def relocate(cfg: Config, moves: dict[str, str], flag: str = "--relocate") -> Config:
    """A saved run's ``cfg`` with model folders that moved read from their new place: ``moves`` maps
    model_paths keys to the new location (a folder, or a hub id). A saved absolute path that no longer
    exists and is not moved is refused here, naming ``flag``, rather than by the loader's "path to nothing"
    after the slow parts have loaded. That the new place holds the same model is checked by
    checkpoints.load_model against what the checkpoint recorded."""
    cfg = copy.deepcopy(cfg)
    fields = _model_path_fields(cfg)
    for key, place in moves.items():
        if key not in fields:
            raise ConfigError(
                f"{flag} {key}={place}: {key} is not a model location the saved config sets (allowed: "
                f"{', '.join(sorted(fields)) or 'none, the model is wholly in its checkpoint'})"
            )
        place = os.path.expanduser(place)
        if not place or (written_as_path(place) and not os.path.exists(place)):
            raise ConfigError(
                f"{flag} {key}={moves[key]!r} is a path to nothing (allowed: the folder's new place)"
            )
        setattr(*fields[key], place)
    absolute_paths(cfg)
    if gone := gone_model_paths(cfg):
        flags = " ".join(f"{flag} {key}=NEW_PLACE" for key in gone)
        raise ConfigError(
            f"the saved config's {paths_to_nothing(gone)} (if {'it' if len(gone) == 1 else 'they'} moved: "
            f"{flags})"
        )
    return cfg


def llm_head_dim(config) -> int:
    """An HF LLM config's attention head width (set explicitly by Gemma, else hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# The arch keys that size tensors: transformers takes any int, and zero or a negative one failed only when
# the model was built (a negative dimension, a division by zero) or built a zero-width LLM.
ARCH_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


# Arch keys transformers reads of an LLM that its config classes do not declare: rope_theta and rope_scaling
# (transformers 5 folds them into rope_parameters), head_dim (Qwen2 reads it where set), and the activation
# under either name (Gemma's MLP reads hidden_act in transformers 5, hidden_activation in 4; Gemma-2's reads
# hidden_activation; the public-checkpoint converter writes both).
ARCH_READ_KEYS = ("rope_theta", "rope_scaling", "head_dim", "hidden_act", "hidden_activation")


CLIP_TEXT_FAMILY = "clip_text_model"  # pooled_text.arch: transformers' CLIPTextConfig


@functools.cache
def _arch_keys(family: str) -> tuple[tuple[str, ...], dict]:
    """The keys a ``family`` config takes (its constructor's and its saved fields, its attribute_map's
    aliases, ARCH_READ_KEYS), and its defaults."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    defaults = cls().to_dict()
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    read = ARCH_READ_KEYS if family != CLIP_TEXT_FAMILY else ()
    keys = dict.fromkeys([*params, *defaults, *getattr(cls, "attribute_map", {}), *read])
    return tuple(keys), defaults


def arch_defaults(family: str) -> Mapping[str, Any]:
    """The defaults of a ``family`` config (its class's ``to_dict()``), built once per family. Read-only:
    every caller shares the cached dict, so a change would reach them all."""
    return types.MappingProxyType(_arch_keys(family)[1])


def check_arch(family: str, arch: dict, key: str) -> None:
    """A random-init arch's keys and sizes, before transformers reads it: transformers keeps an unknown key
    (vocab_sizee) as an attribute nothing reads, and takes any int as a size."""
    if not arch:
        return
    keys, defaults = _arch_keys(family)
    unknown = [k for k in arch if k not in keys]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), keys, n=1)
        hint = f": did you mean {f'{key}.arch.{close[0]}'!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {f'{key}.arch.{unknown[0]}'!r}{hint} (allowed: the keys of transformers' "
            f"{family} config, e.g. {', '.join(k for k in ARCH_SIZES if k in keys)})"
        )
    for name in ARCH_SIZES:
        value = arch.get(name)
        if name in arch and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}.arch.{name}={value!r} is not allowed (allowed: an integer >= 1)")
    shape = {**defaults, **arch}
    heads, kv = shape.get("num_attention_heads"), shape.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:

        def given(k: str) -> str:
            return f"{shape[k]}" if k in arch else f"{shape[k]} ({family}'s default)"

        raise ConfigError(
            f"{key}.arch.num_key_value_heads={given('num_key_value_heads')} does not divide "
            f"num_attention_heads={given('num_attention_heads')} (allowed: a divisor of num_attention_heads: "
            "each key/value head serves a group of query heads)"
        )


def arch_config(text: TextConfig, key: str = "text"):
    """The transformers config of a random-init LLM (``family`` + ``arch``, checked first: check_arch); a
    one-line ConfigError naming the key where transformers refuses the arch (TypeError, ValueError, or
    huggingface_hub's validation of transformers 5's config dataclasses, e.g. an odd head_dim under
    RoPE), the failing field first where transformers names one."""
    from transformers import AutoConfig

    check_arch(text.family, text.arch, key)
    try:
        return AutoConfig.for_model(text.family, **text.arch)
    except Exception as e:
        reason = " ".join(str(e).split())
        named = re.search(r"field '(\w+)'", reason)
        fields = [named.group(1)] if named else []
        fields += [k for k in text.arch if re.search(rf"\b{re.escape(str(k))}\b", reason)]
        field_ = next((k for k in fields if k in text.arch), None)
        what = f"{key}.arch.{field_}={text.arch[field_]!r}" if field_ is not None else f"{key}.arch"
        raise ConfigError(f"{what} is not valid for {text.family}: {reason}") from None


def known_llm_config(text: TextConfig):
    """The transformers config of ``text``'s LLM where it is known without the network: ``family`` +
    ``arch`` for a random-init LLM (an arch transformers refuses is a ConfigError), a local folder's, or a
    hub id's in the local cache; None where it is not, or cannot be read (the build names why:
    text.llm.llm_config)."""
    from transformers import AutoConfig

    if not text.model_id:
        return arch_config(text)
    try:
        config = AutoConfig.from_pretrained(text.model_id, local_files_only=True)
    except Exception:  # transformers refuses an arch or folder with many exception types: the build's to name
        return None
    # Multimodal wrappers (PaliGemma, ...) keep the language decoder's config under text_config.
    return getattr(config, "text_config", None) or config


# What a saved LLM config records beside its shape: not part of the arch a random init is built from.
CONFIG_RECORD_KEYS = ("architectures", "dtype", "torch_dtype", "transformers_version")
# The sizes an LLM config computes others from (head_dim, the K/V heads), written into every saved arch.
_ATTENTION_SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def model_family_arch(config) -> tuple[str, dict] | None:
    """An LLM's transformers ``config`` as text.family + text.arch, or None for a model type no family
    allows. The arch holds the attention sizes (_ATTENTION_SIZES) and the fields that differ from the family's
    defaults, and then each field that a config built from those (arch_config) still gets otherwise (every
    field where transformers refuses a config built from some): a default computed from other fields
    (LlamaConfig's head_dim = hidden_size / heads, num_key_value_heads = heads) is not the model's where it
    sets that field to the class default's own value (Mistral-Nemo: head_dim 128, hidden 5120 / 32 heads).
    arch_config builds the same config from them."""
    from transformers import AutoConfig

    if config.model_type not in choices_of(TextConfig, "family"):
        return None
    defaults = arch_defaults(config.model_type)
    real = {
        k: v
        for k, v in config.to_dict().items()
        if k in defaults and not k.startswith("_") and k not in CONFIG_RECORD_KEYS
    }
    # The attention sizes are always written: a build from the other fields alone can compute one that
    # transformers refuses (head_dim = hidden 120 / 8 heads = 15, odd for RoPE, where the model sets 128).
    arch = {k: v for k, v in real.items() if v != defaults[k] or k in _ATTENTION_SIZES}
    while True:
        try:
            built = AutoConfig.for_model(config.model_type, **copy.deepcopy(arch)).to_dict()
        except Exception:  # noqa: BLE001
            # A validator of this transformers version refused the partial arch: every field, as the model's.
            return config.model_type, real
        # A field given as the model's and still built otherwise (the class rewrites it) is left to its own.
        missing = {k: v for k, v in real.items() if built.get(k) != v and k not in arch}
        if not missing:
            return config.model_type, arch
        arch.update(missing)


def with_stand_ins_of(cfg: Config, other: Config) -> Config:
    """``cfg`` with the family and arch of each LLM section that names a model_id both here and in ``other``
    taken from ``other``, so that a comparison of the two (a resume's or fine-tune's config_differences, a
    study's re-run) leaves them out: with a model_id the LLM is built from the model's own config and they
    only stand in for it offline, and a run saves the model's own (with_model_llm_fields) where the command
    it is compared with may still carry its preset's. ``cfg`` itself is left as it is."""
    out = copy.deepcopy(cfg)
    theirs = dict(text_sections(other))
    for key, text in text_sections(out):
        given = theirs.get(key)
        if given is not None and text.model_id and given.model_id:
            text.family, text.arch = given.family, copy.deepcopy(given.arch)
    return out


def with_model_llm_fields(cfg: Config) -> Config:
    """``cfg`` with each LLM section's family and arch read from its model_id's own config, for the config a
    run saves. With a model_id they are only a stand-in (the LLM is built from the model's config; the arch
    counts parameters offline for a hub id out of reach: text.llm.llm_config), so a preset's (Gemma's)
    inherited past a user's model_id (a local Qwen folder) would record another LLM than the run trained.
    A section whose model type no family allows (Phi-3, Gemma-3) is kept as the user's config had it: no
    family and arch describe that model, and the user's stay the stand-in they chose (bench.random_init_text
    times them). So is a section whose model's config is not known without the network
    (known_llm_config), and a random-init one. ``cfg`` itself is left as it is."""
    out = copy.deepcopy(cfg)
    for _, text in text_sections(out):
        config = known_llm_config(text) if text.model_id else None
        found = model_family_arch(config) if config is not None else None
        if found is not None:
            text.family, text.arch = found
    return out
