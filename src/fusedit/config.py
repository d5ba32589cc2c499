"""Typed configuration: dataclasses loaded from YAML presets plus ``section.key=value`` overrides.

A config file is YAML with one mapping per section (``model``, ``text``, ``vae``, ``data``, ``flow``,
``train``, ``sample``) and an optional ``base:`` naming a preset (or another file) it overrides. Every key
is checked at load: an unknown key or a bad value fails with a one-line :class:`ConfigError` naming the
key, the value and what is allowed. The resolved config is written next to every run and checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config key or value is not allowed; the message is one line that says what is."""


def choice(default: str, *allowed: str) -> Any:
    """A string field restricted to ``allowed`` (validated at load)."""
    return field(default=default, metadata={"choices": allowed})


def positive(default: float | int | None) -> Any:
    return field(default=default, metadata={"min": 0, "strict": True})


def nonneg(default: float | int) -> Any:
    return field(default=default, metadata={"min": 0})


@dataclass
class ModelConfig:
    """The denoiser. Heads, head_dim, KV heads and MLP are mirrored from the LLM (design-space.md s.1)."""

    # fusedit: deep fusion; fusedit-cross: its cross-attention variant; dit-self / dit-cross: the shallow
    # baselines reading one LLM hidden state (design-space.md s.1).
    design: str = choice("fusedit", "fusedit", "fusedit-cross", "dit-self", "dit-cross")
    # Residual width of the DiT; None = the LLM's hidden size.
    dit_hidden_size: int | None = positive(None)
    # Number of DiT layers (= fused LLM layers); None = every LLM layer after `initial_layers`.
    num_layers: int | None = positive(None)
    # LLM layers that run text-only before fusion starts: DiT layer i pairs with LLM layer initial_layers + i.
    initial_layers: int = nonneg(0)
    # Shallow designs: which LLM hidden state they read (transformers indexing; -1 = last, after the norm).
    hidden_layer: int = -1
    pos_embed: str = choice("ape", "ape", "1d-rope", "2d-rope", "m-rope")
    timestep_conditioning: str = choice("adaln-zero", "adaln-zero", "adaln-single", "addition", "none")
    qk_norm: bool = True
    sandwich_norm: bool = False
    patch_size: int = positive(2)
    # SDPA backend for the DiT's attention; "auto" lets PyTorch pick.
    attention_backend: str = choice("auto", "auto", "math", "flash", "efficient", "cudnn")


@dataclass
class TextConfig:
    """The frozen LLM and its tokenizer."""

    # Hugging Face hub id or local folder; empty = build `family` from `arch` with random weights.
    model_id: str = ""
    family: str = choice("gemma", "gemma", "gemma2", "qwen2", "qwen3", "llama")
    # transformers config fields for a random-init LLM (ignored when model_id is set).
    arch: dict = field(default_factory=dict)
    # Tokenizer hub id or folder; empty = model_id's, or the built-in shapes-world word tokenizer.
    tokenizer: str = ""
    max_length: int = positive(32)
    # Plain-text prefix prepended to every prompt (FuseDiT's "Imagine: " study, LI-DiT's instruction).
    instruction: str = ""
    # Wrap prompts in the tokenizer's chat template (instruction-tuned LLMs).
    chat_template: bool = False
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    # Cut each batch's text to its longest real prompt: exact (padded keys are masked anyway) and cheaper.
    trim_padding: bool = True
    # Steps of next-token pretraining on the shapes caption corpus for a random-init LLM (0 = none).
    pretrain_steps: int = nonneg(0)


@dataclass
class VAEConfig:
    """The latent space. "identity" trains in pixel space behind the same interface a real VAE uses."""

    kind: str = choice("identity", "identity", "diffusers")
    model_id: str = ""
    subfolder: str = ""
    latent_channels: int = positive(3)
    # Pixels per latent cell along each side (8 for the SD3/FLUX/SDXL VAEs, 1 for identity).
    downsample: int = positive(1)


@dataclass
class DataConfig:
    source: str = choice("shapes", "shapes")
    image_size: int = positive(32)
    max_objects: int = positive(4)
    # Distinct samples of the procedural dataset; training steps cycle over them (small = overfit).
    num_samples: int = positive(10_000_000)
    kinds: list = field(default_factory=lambda: ["single", "two", "counting", "position", "color_attr"])
    # Probability that a caption is replaced by "" so the model learns the unconditional velocity (CFG).
    caption_dropout: float = field(default=0.1, metadata={"min": 0, "max": 1})
    num_workers: int = nonneg(0)


@dataclass
class FlowConfig:
    """Rectified-flow training (design-space.md s.3): logit-normal t, then the SD3 shift."""

    logit_mean: float = 0.0
    logit_std: float = positive(1.0)
    shift: float = positive(3.0)


@dataclass
class TrainConfig:
    steps: int = positive(1000)
    batch_size: int = positive(32)
    lr: float = positive(1e-4)
    weight_decay: float = nonneg(1e-4)
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 1})
    beta2: float = field(default=0.999, metadata={"min": 0, "max": 1})
    warmup_steps: int = nonneg(0)
    # LR after warmup: "constant" (the FuseDiT recipe) or "cosine" decay to 0 at train.steps.
    schedule: str = choice("constant", "constant", "cosine")
    grad_clip: float = positive(1.0)
    ema_decay: float = field(default=0.99, metadata={"min": 0, "max": 1})
    ema_every: int = positive(100)
    precision: str = choice("auto", "auto", "fp32", "bf16")
    checkpoint_every: int = positive(500)
    keep_checkpoints: int = positive(2)
    log_every: int = positive(10)
    seed: int = 0
    device: str = "auto"


@dataclass
class SampleConfig:
    steps: int = positive(25)
    guidance: float = nonneg(6.0)
    sampler: str = choice("euler", "euler", "heun")
    # Time shift of the sampling schedule (SD3 style); 1.0 = uniform in t.
    shift: float = positive(3.0)
    negative_prompt: str = ""
    seed: int = 42
    # Compute the LLM's per-layer text K/V once per prompt batch and reuse it for every step.
    cache_text: bool = True
    use_ema: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    name: str = "run"


# --------------------------------------------------------------------------------------------------
# Loading, merging and validation


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("fusedit.presets").iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(name_or_path: str | Path) -> tuple[dict, Path | None]:
    """A preset name or a YAML path -> (mapping, folder it came from for relative ``base:``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r}")
        text, folder = path.read_text(), path.parent
    else:
        res = resources.files("fusedit.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {str(name_or_path)!r} (allowed: {', '.join(preset_names())})")
        text, folder = res.read_text(), None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {name_or_path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name_or_path}: a config must be a YAML mapping of sections, got {type(data).__name__}"
        )
    return data, folder


def _resolve_raw(name_or_path: str | Path, seen: tuple = ()) -> dict:
    if str(name_or_path) in seen:
        raise ConfigError(f"config 'base' cycle: {' -> '.join(map(str, (*seen, name_or_path)))}")
    data, folder = _read_yaml(name_or_path)
    base = data.pop("base", None)
    if base is None:
        return data
    base_ref = base
    if folder is not None and (folder / str(base)).is_file():
        base_ref = folder / str(base)
    return _deep_merge(_resolve_raw(base_ref, (*seen, str(name_or_path))), data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "arch":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "model.pos_embed=2d-rope"]`` -> nested mapping (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _describe_type(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(path: str, value: Any, tp: Any, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if "choices" in meta:
        if value not in meta["choices"]:
            raise ConfigError(f"{path}={value!r} is not allowed (allowed: {', '.join(meta['choices'])})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it plainly is.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
    elif tp in (dict, list) or origin in (dict, list):
        want = origin or tp
        if not isinstance(value, want):
            raise ConfigError(f"{path}={value!r} must be a {_describe_type(want)}")
        return value
    if "min" in meta:
        bad = value <= meta["min"] if meta.get("strict") else value < meta["min"]
        if bad:
            rel = ">" if meta.get("strict") else ">="
            raise ConfigError(f"{path}={value!r} must be {rel} {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}={value!r} must be <= {meta['max']}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r} (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        tp, path = hints[name], f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
        else:
            kwargs[name] = _check_value(path, value, tp, dict(fields[name].metadata))
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load_config(name_or_path: str | Path = "debug", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file, apply dotted overrides, validate, and return the typed config."""
    data = _resolve_raw(name_or_path)
    data = _deep_merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def validate(cfg: Config) -> None:
    """Cross-field checks that single-field types cannot express."""
    if cfg.vae.kind == "identity" and (cfg.vae.downsample != 1 or cfg.vae.latent_channels != 3):
        raise ConfigError(
            f"vae.kind=identity needs vae.downsample=1 and vae.latent_channels=3 "
            f"(got {cfg.vae.downsample} and {cfg.vae.latent_channels})"
        )
    if cfg.vae.kind == "diffusers" and not cfg.vae.model_id:
        raise ConfigError("vae.kind=diffusers needs vae.model_id (a hub id or a local folder)")
    latent = cfg.data.image_size // cfg.vae.downsample
    if cfg.data.image_size % cfg.vae.downsample or latent % cfg.model.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} must be divisible by vae.downsample x model.patch_size "
            f"= {cfg.vae.downsample * cfg.model.patch_size}"
        )
    if cfg.text.model_id == "" and not cfg.text.arch:
        raise ConfigError(
            "text.arch is empty: give text.model_id (hub id or folder) or a random-init text.arch"
        )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
