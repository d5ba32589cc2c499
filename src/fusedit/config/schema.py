"""The config schema: the dataclasses of every section (:class:`Config` and its parts, a staged run's
:class:`StageConfig` and resolved :class:`Stage`), the field helpers whose metadata says what a key allows
(``choice``, ``variant``, ``positive``, ``nonneg``, ``subset``), the variants each registry-backed setting
allows with their traits (``VARIANTS``, ``register_variant``), the config's exceptions, and building a section
from a mapping with each field checked on its own (``build_section``, which imports the config's ``plugins``
first) and merging mappings (``deep_merge``), which both loading and stage resolution use. Imports nothing of
fusedit: every other part of the package reads it."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import json
import numbers
import re
import shlex
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config key or value is not allowed; the message is one line that says what is."""


def is_whole(value) -> bool:
    """An integer of any kind (numpy's too), and not a bool (True would pass for 1)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_whole(name: str, value, minimum: int = 1, none_for: str | None = None) -> int | None:
    """``value`` as an int, or a one-line ConfigError unless it is a whole number >= ``minimum`` (a string
    "3" or a float is refused, not compared). ``name`` is the setting as the error shows it: a keyword
    (``steps``) or a command-line flag (``--steps``). ``none_for``: what None means where it is allowed
    ("all prompts"), which the error lists too."""
    if value is None and none_for is not None:
        return None
    if not (is_whole(value) and value >= minimum):
        shown = f"{name} {value}" if name.startswith("--") else f"{name}={value!r}"
        alternative = f", or None for {none_for}" if none_for is not None else ""
        raise ConfigError(f"{shown} is not allowed (allowed: an integer >= {minimum}{alternative})")
    return int(value)


class RunStopped(RuntimeError):
    """A training job stopped by something outside this process (its launcher gone, another process of the
    job failed or stopped answering): not a bug. ``reason`` says what happened, ``kept`` what is kept and how
    to go on (the command line words it for the flags given); the message is both, in one line."""

    def __init__(self, reason: str, kept: str):
        super().__init__(reason, kept)  # both in args: it pickles (a train() in a process pool)
        self.reason, self.kept = reason, kept

    def __str__(self) -> str:
        return f"{self.reason}; {self.kept}"


# The largest sampling seed, as `fusedit sample` and `serve` take seeds (torch would take up to 2**64 - 1):
# image i starts from the noise of seed + i, and an image's recorded seed should make it again in either.
SEED_MAX = 2**32 - 1


def choice(default: str, *allowed: str) -> Any:
    """A string field restricted to ``allowed`` (validated at load)."""
    return field(default=default, metadata={"choices": allowed})


def choices_of(section: type, name: str) -> tuple[str, ...]:
    """The values a ``choice`` or ``variant`` field of a config section allows now (command-line flags offer
    the same): a variant field's registered ones included."""
    meta = section.__dataclass_fields__[name].metadata
    return tuple(VARIANTS[meta["variants"]].traits) if "variants" in meta else meta["choices"]


@dataclass(frozen=True)
class DesignTraits:
    """What a model.design is: ``deep`` fusion (each DiT layer reads its own LLM layer's keys and values)
    or shallow (one hidden state, text.hidden_layer, projected by the DiT: the baselines and LI-DiT), and
    whether image tokens meet the text in joint ``self``-attention or in a separate ``cross``-attention."""

    deep: bool
    attention: Literal["self", "cross"]

    def __post_init__(self):
        if self.attention not in ("self", "cross"):
            raise ConfigError(f"attention={self.attention!r} is not allowed (allowed: self, cross)")


@dataclass(frozen=True)
class PositionTraits:
    """What the config and the build ask of a model.pos_embed scheme instead of its name."""

    # It rotates image queries and keys (RoPE): model.rope_layout applies (image-only wraps it).
    rotates: bool
    # It gives image tokens their place; without (none) model.conv_pos must.
    places: bool = True
    # The DiT's head width and width it needs as multiples of these (rotated channel pairs, a 2D sin-cos
    # table's quarters), and why, as a refusal says it.
    head_dim_multiple: int = 1
    width_multiple: int = 1
    fit_reason: str = ""
    # It takes model.ape_base_size and ape_max_size (as keywords base_size, max_size): a sin-cos table.
    ape_options: bool = False


@dataclass(frozen=True)
class TimestepTraits:
    """What the config asks of a model.timestep_conditioning: whether it embeds the timestep (pooled text
    is added to that embedding); whether it modulates a norm, which model.adaln_norm chooses (a user's
    adaln_norm is warned about where none is: config.idle_settings)."""

    has_embedding: bool
    modulates_norm: bool = True


@dataclass(frozen=True)
class PooledTextTraits:
    """What the config and the build ask of a model.pooled_text: whether it reads the pooled embedding of
    the second encoder the ``pooled_text`` section configures (``encoder``: it needs pooled_text.model_id or
    arch, and the build passes that embedding's width as pooled_dim), whether it pools the text tokens a
    shallow design prepares, refined or (refiner_depth 0) embedded (``refined``: it needs a shallow
    design), and whether it adds anything to the timestep embedding at all (``adds``: False only for none;
    the timestep conditioning must have an embedding otherwise)."""

    encoder: bool
    refined: bool = False
    adds: bool = True

    def __post_init__(self):
        for name in ("encoder", "refined", "adds"):
            if not isinstance(getattr(self, name), bool):  # "no" would read as True
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed (allowed: True, False)")


@dataclass(frozen=True)
class TemplateTraits:
    """What the config asks of a text.template: whether it has a turn for text.system_prompt, and whether
    it puts tokens of its own around every prompt (besides text.instruction)."""

    system_turn: bool
    adds_tokens: bool


@dataclass(frozen=True)
class SamplerTraits:
    """What a sample.sampler's callers ask of it: ``one_step`` = each step reads only x and its own two times
    (no earlier step's velocity), so a caller may run it one step at a time (the diffusers pipeline)."""

    one_step: bool


@dataclass
class Variants:
    """The names a registry-backed setting allows, built-ins first, each with its traits, an instance of
    ``kind`` (None: code asks none, and each name's traits are None), and the function that registers
    another (the error for an unknown name points to it)."""

    register: str
    kind: type | None
    traits: dict[str, Any]


# Every setting that names a build-time variant, the implementation picked from a registry (fusedit.models.
# DESIGNS, fusedit.flow.SAMPLERS, ...): the built-in names are listed once, here, as the config is checked
# before any model code is imported. ``variant`` fields allow what this table holds when checked, so a
# variant user code registers (``register_variant``, which each registry's register function calls) is a
# value a config may name. Code asks the traits (``variant_traits``), never the names.
VARIANTS: dict[str, Variants] = {
    "model.design": Variants(
        "fusedit.models.register_design",
        DesignTraits,
        {
            "fusedit": DesignTraits(deep=True, attention="self"),
            "fusedit-cross": DesignTraits(deep=True, attention="cross"),
            "dit-self": DesignTraits(deep=False, attention="self"),
            "dit-cross": DesignTraits(deep=False, attention="cross"),
        },
    ),
    "model.pos_embed": Variants(
        "fusedit.models.register_position_scheme",
        PositionTraits,
        {
            "ape": PositionTraits(
                rotates=False, width_multiple=4, fit_reason="its 2D sin-cos table", ape_options=True
            ),
            "1d-rope": PositionTraits(rotates=True, head_dim_multiple=2, fit_reason="rotated channel pairs"),
            "2d-rope": PositionTraits(
                rotates=True,
                head_dim_multiple=4,
                fit_reason="rotated channel pairs, half for the row and half for the column",
            ),
            # M-RoPE splits the LLM's ladder in two halves, row then column (the public code's chunk(4)):
            # an odd pair count would give the column one pair more than the row.
            "m-rope": PositionTraits(
                rotates=True,
                head_dim_multiple=4,
                fit_reason="rotated channel pairs, half of the LLM's frequencies for the row and half for the "
                "column",
            ),
            "none": PositionTraits(rotates=False, places=False),
        },
    ),
    "model.timestep_conditioning": Variants(
        "fusedit.models.register_timestep_conditioning",
        TimestepTraits,
        {
            "adaln-zero": TimestepTraits(has_embedding=True),
            "adaln-single": TimestepTraits(has_embedding=True),
            "addition": TimestepTraits(has_embedding=True, modulates_norm=False),
            "none": TimestepTraits(has_embedding=False, modulates_norm=False),
        },
    ),
    "model.pooled_text": Variants(
        "fusedit.models.register_pooled_text",
        PooledTextTraits,
        {
            "none": PooledTextTraits(encoder=False, adds=False),
            "refined": PooledTextTraits(encoder=False, refined=True),
            "clip": PooledTextTraits(encoder=True),
        },
    ),
    "model.refiner_concat": Variants(
        "fusedit.text.refiner.register_refiner_concat", None, {"tokens": None, "channels": None}
    ),
    "text.template": Variants(
        "fusedit.text.templates.register_template",
        TemplateTraits,
        {
            "plain": TemplateTraits(system_turn=False, adds_tokens=False),
            "chat": TemplateTraits(system_turn=True, adds_tokens=True),
            "lidit": TemplateTraits(system_turn=True, adds_tokens=True),
            "lidit-chat": TemplateTraits(system_turn=True, adds_tokens=True),
        },
    ),
    "sample.sampler": Variants(
        "fusedit.flow.register_sampler",
        SamplerTraits,
        {"euler": SamplerTraits(one_step=True), "heun": SamplerTraits(one_step=True)},
    ),
    "sample.schedule": Variants("fusedit.flow.register_schedule", None, {"uniform": None, "diffusers": None}),
}


def variant(setting: str, default: str) -> Any:
    """A string field naming a variant of ``setting`` (a VARIANTS key): one it holds when checked."""
    return field(default=default, metadata={"variants": setting})


def register_variant(setting: str, name: str, traits: Any = None) -> None:
    """Allow ``name`` for ``setting`` (a VARIANTS key), with ``traits``, for the rest of the process: what
    each registry's register function (fusedit.models.register_design, ...) calls as it adds the
    implementation. A name already allowed is refused, so no variant is ever silently replaced, and so are
    traits not of the setting's class (``Variants.kind``): the checks would read attributes they lack."""
    table = VARIANTS[setting]
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(
            f"{setting} name {name!r} is not allowed (allowed: a non-empty string, no outer spaces)"
        )
    if not (isinstance(traits, table.kind) if table.kind else traits is None):
        allowed = f"a {table.kind.__name__}" if table.kind else "None: no code asks this setting's traits"
        raise ConfigError(f"{setting}={name!r} traits={traits!r} are not allowed (allowed: {allowed})")
    if name in table.traits:
        raise ConfigError(
            f"{setting}={name!r} is already registered (allowed: a name not yet taken, i.e. none of "
            f"{', '.join(table.traits)})"
        )
    table.traits[name] = traits


def unknown_variant(path: str, value: Any, setting: str) -> str:
    """The one-line refusal of a name ``setting`` does not allow, with how to add one."""
    table = VARIANTS[setting]
    return (
        f"{path}={value!r} is not allowed (allowed: {', '.join(table.traits)}); to add one, register it with "
        f"{table.register} in a module the config's plugins lists"
    )


def variant_traits(setting: str, name: str, path: str | None = None) -> Any:
    """The traits of variant ``name`` of ``setting`` (VARIANTS); a one-line ConfigError for a name not
    registered, naming ``path`` (the key as written, e.g. "stages.1.sample.sampler"; default ``setting``)."""
    traits = VARIANTS[setting].traits
    if not isinstance(name, str) or name not in traits:
        raise ConfigError(unknown_variant(path or setting, name, setting))
    return traits[name]


def variants_where(setting: str, keep: Any = None) -> list[str]:
    """The names of ``setting`` whose traits ``keep`` accepts (all: None), in VARIANTS' order."""
    return [n for n, t in VARIANTS[setting].traits.items() if keep is None or keep(t)]


def variant_names(setting: str, keep: Any = None) -> str:
    """``variants_where`` as messages list them: "a, b or c"."""
    names = variants_where(setting, keep)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def import_plugins(path: str, modules: list[str]) -> None:
    """Import each module of the config's ``plugins`` (a list of importable names), which registers the
    variants the rest of the config may name; one line naming a module that cannot be found, or an item
    that is no module name, checked before any is imported (a relative or empty name fails inside importlib
    with its own message; a file name, my_variants.py, would run my_variants and then fail to find .py)."""
    for name in modules:
        if not all(part.isidentifier() for part in name.split(".")) or name.endswith(".py"):
            raise ConfigError(
                f"{path}={modules!r}: {name!r} is not allowed (allowed: importable module names, e.g. "
                "my_variants, not file paths)"
            )
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise  # the plugin was found but imports something missing: its own traceback says what
            raise ConfigError(
                f"{path}: cannot import plugin module {name!r} (allowed: a module importable here: install it "
                "or put its folder on PYTHONPATH, or remove it from plugins)"
            ) from None


def positive(default: float | int | None) -> Any:
    return field(default=default, metadata={"min": 0, "strict": True})


def nonneg(default: float | int) -> Any:
    return field(default=default, metadata={"min": 0})


def subset(default: list[str], *allowed: str, nonempty: bool = False) -> Any:
    """A list of distinct strings, each one of ``allowed`` (validated at load)."""
    return field(
        default_factory=lambda: list(default), metadata={"item_choices": allowed, "nonempty": nonempty}
    )


@dataclass
class ModelConfig:
    """The denoiser. Heads, head_dim, KV heads and MLP are mirrored from the LLM (design-space.md s.1)."""

    # fusedit: deep fusion; fusedit-cross: its cross-attention variant; dit-self / dit-cross: the shallow
    # baselines reading one LLM hidden state (text.hidden_layer) per LLM (design-space.md s.1). LI-DiT is
    # dit-cross with the refiner, pooled-text modulation and the conv position embedding (s.2). Their
    # traits (deep or shallow, self- or cross-attention): VARIANTS; fusedit.models.register_design adds one.
    design: str = variant("model.design", "fusedit")
    # Residual width of the DiT; None = the LLM's hidden size.
    dit_hidden_size: int | None = positive(None)
    # Number of DiT layers (= fused LLM layers); None = every LLM layer after `initial_layers`.
    num_layers: int | None = positive(None)
    # Deep fusion: LLM layers that run text-only before fusion starts (DiT layer i pairs with LLM layer
    # initial_layers + i). The shallow designs read text.hidden_layer instead.
    initial_layers: int = nonneg(0)
    # "none": no position input besides model.conv_pos, which it requires (LI-DiT).
    pos_embed: str = variant("model.pos_embed", "ape")
    timestep_conditioning: str = variant("model.timestep_conditioning", "adaln-zero")
    qk_norm: bool = True
    sandwich_norm: bool = False
    patch_size: int = positive(2)
    # SDPA backend for the DiT's attention; "auto" tries cuDNN, flash, efficient, math in that order
    # (fusedit.layers.attention.AUTO_ORDER).
    attention_backend: str = choice("auto", "auto", "math", "flash", "efficient", "cudnn")
    # Shallow designs only: the DiT's own attention/MLP shape instead of the LLM's (None = mirror the LLM,
    # as FuseDiT does; LI-DiT-1B uses 16 heads over width 1152). Deep fusion must mirror the LLM.
    num_heads: int | None = positive(None)
    num_kv_heads: int | None = positive(None)
    head_dim: int | None = positive(None)
    intermediate_size: int | None = positive(None)
    # LI-DiT's position embedding: a conv ResBlock over the patch grid right after patchify (s.2).
    conv_pos: bool = False
    # LI-DiT linguistic token refiner blocks per LLM (shallow designs only; 0 = the plain RMSNorm + Linear
    # context embedder). Width = the DiT width; MLP ratio 4; LayerNorm; no RoPE (unknown in the paper: the
    # choices of a public re-implementation).
    refiner_depth: int = nonneg(0)
    refiner_heads: int = positive(8)
    # Ablation: keep the LLM's causal mask inside the refiner instead of bidirectional attention.
    refiner_causal: bool = False
    # The refiners' zero-initialised gates on every sublayer; false = the "no gating" ablation (s.2).
    refiner_gating: bool = True
    # With 2+ LLMs: LI-DiT's collaborative refiner (each LLM's tokens cross-attend to the others').
    collaborative_refiner: bool = True
    # With 2+ LLMs: how the refined branches become one sequence (the paper leaves the axis unknown):
    # "tokens" one after another; "channels" token j of every branch side by side, Linear back to the width.
    refiner_concat: str = variant("model.refiner_concat", "tokens")
    # Drop instruction/template tokens after the refiners (LI-DiT); they stay for the refiners to read.
    drop_instruction: bool = True
    # Extra modulation added to the timestep embedding: "refined" = masked mean of the text tokens, projected
    # (LI-DiT; shallow designs only: the refiners' output, or the context embedder's with refiner_depth 0,
    # which separates the pooled modulation from the refiner), "clip" = a second encoder's pooled embedding
    # (FuseDiT clip-mod, configured in pooled_text).
    # Their traits: VARIANTS; fusedit.models.register_pooled_text adds one.
    pooled_text: str = variant("model.pooled_text", "none")
    # -- Options that reproduce the public FuseDiT code's numerics (fusedit.convert.fusedit_official); the
    # defaults are fusedit's own choices.
    # APE positions scaled by ape_base_size / grid, as diffusers' PatchEmbed does (its base_size: the training
    # grid in patches), so every grid spans the training grid's range; None = positions 0 .. h - 1.
    ape_base_size: int | None = positive(None)
    # APE over a fixed ape_max_size x ape_max_size grid, centre-cropped to the latent grid (diffusers'
    # pos_embed_max_size); None = the latent grid itself.
    ape_max_size: int | None = positive(None)
    # The norm adaLN modulates (adaln-zero, adaln-single): "layernorm" (DiT, parameter-free) or "rmsnorm"
    # (affine, the public FuseDiT code). Accepted and a no-op with timestep_conditioning addition or none,
    # which the paper presets' variants inherit it into (warned about where the user sets it).
    adaln_norm: str = choice("layernorm", "layernorm", "rmsnorm")
    # RoPE schemes: "joint" = text and image share one sequence (image positions after the unpadded text;
    # dit-self rotates its projected text keys at 0 .. T - 1); "image-only" = only image tokens are rotated,
    # from position 0 (the public code's shallow baselines; shallow designs only, as deep fusion's text keys
    # come rotated by the LLM). It changes only dit-self with a RoPE pos_embed: dit-cross never rotates its
    # text keys, and APE or no positions rotate nothing (accepted there, a no-op; load_config warns of one
    # the user set: idle_settings).
    rope_layout: str = choice("joint", "joint", "image-only")
    # Deep fusion: image rotations as the public code computed them for prompts left-padded to this many
    # tokens (Gemma's tokenizers pad on the left), see layers/position.py; None = right padding.
    # design=fusedit with pos_embed ape or a RoPE scheme and rope_layout=joint only.
    rope_left_pad: int | None = positive(None)


@dataclass
class TextConfig:
    """The frozen LLM and its tokenizer."""

    # Hugging Face hub id or local folder; empty = build `family` from `arch` with random weights.
    model_id: str = ""
    family: str = choice("gemma", "gemma", "gemma2", "qwen2", "qwen3", "llama", "mistral")
    # transformers config fields for a random-init LLM. With model_id, family and arch only stand in for a
    # hub id out of reach (parameter counts offline: text.llm.llm_config); the LLM is built from the model's
    # own config, which paths.with_model_llm_fields reads into them for the config a run saves.
    arch: dict = field(default_factory=dict)
    # Tokenizer hub id or folder; empty = model_id's, or the built-in shapes-world word tokenizer.
    tokenizer: str = ""
    # Prompt tokens, the tokenizer's own leading ones (BOS) included (longer prompts are truncated, with a
    # warning); the template's tokens come on top.
    max_length: int = positive(32)
    # How a prompt is presented to the LLM (fusedit.text.templates): "plain" = instruction + prompt;
    # "chat" = the tokenizer's chat template around it; "lidit" = LI-DiT's instruction as plain text;
    # "lidit-chat" = LI-DiT's instruction inside the chat template (instruction-tuned LLMs).
    template: str = variant("text.template", "plain")
    # Plain-text prefix before every prompt (FuseDiT's "Imagine: " study); a pooled CLIP (model.pooled_text
    # clip) reads it too, as in the public code.
    instruction: str = ""
    # System prompt for the chat and LI-DiT templates (LI-DiT's wording is unknown; empty by default).
    system_prompt: str = ""
    # The hidden state shallow designs and the refiner read (transformers indexing: -1 = last after the
    # final norm; LI-DiT: -3, the third-to-last block's output).
    hidden_layer: int = -1
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    # The LLM's attention kernel (transformers' attn_implementation; model.attention_backend is the DiT's).
    # auto: what transformers picks for the family, sdpa where the family supports it and eager for
    # Gemma-2, whose attention logit soft-capping sdpa cannot do. One the family or this machine cannot run
    # is refused before a run starts (text.llm.check_llm; the build refuses it alike).
    attn_implementation: str = choice("auto", "auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
    # Cut each batch's text to its longest real prompt: exact (padded keys are masked anyway) and cheaper.
    trim_padding: bool = True
    # With trim_padding, round the kept length up to a multiple of this. Compiled DiT blocks (train.compile,
    # sample.compile) compile once per text length, and past torch's recompile limit new lengths run
    # eagerly, so real prompts of every length must not each get their own. None = auto: 128 on a GPU
    # (at most ceil(max_length / 128) lengths, cuDNN-friendly key lengths; text/encoder.py), 1 (the
    # longest prompt exactly) on the CPU.
    trim_multiple: int | None = positive(None)
    # Steps of next-token pretraining on the shapes caption corpus for a random-init LLM (0 = none).
    pretrain_steps: int = nonneg(0)


@dataclass
class PooledTextConfig:
    """A second text encoder whose pooled embedding modulates the DiT (FuseDiT clip-mod): a CLIP text model
    through transformers (hub id or folder), or a random-init one from ``arch`` (tests, demos)."""

    model_id: str = ""
    arch: dict = field(default_factory=dict)
    tokenizer: str = ""
    max_length: int = positive(77)


@dataclass
class VAEConfig:
    """The latent space. "identity" trains in pixel space behind the same interface a real VAE uses."""

    kind: str = choice("identity", "identity", "diffusers")
    model_id: str = ""
    subfolder: str = ""
    latent_channels: int = positive(3)
    # Pixels per latent cell along each side (8 for the SD3/FLUX/SDXL VAEs, 1 for identity).
    downsample: int = positive(1)


# The procedural shapes world's prompt kinds (data/shapes.py draws them), each with the fewest objects it
# shows, and the most objects a scene holds: here, below data/, so that data.kinds and data.max_objects are
# checked when a config loads rather than when the world is built (for a later stage, hours into a run).
SHAPES_KINDS: dict[str, int] = {"single": 1, "two": 2, "counting": 2, "position": 2, "color_attr": 2}


SHAPES_MAX_OBJECTS = 4


def check_shapes_options(kinds: Iterable[str] | str, max_objects: int) -> tuple[str, ...]:
    """Validate the shapes world's ``kinds`` and ``max_objects``; returns ``kinds`` as a tuple without
    duplicates. Raises ConfigError."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(dict.fromkeys(kinds))
    allowed = ", ".join(SHAPES_KINDS)
    if not kinds:
        raise ConfigError(f"kinds must not be empty; allowed kinds: {allowed}")
    for kind in kinds:
        if kind not in SHAPES_KINDS:
            raise ConfigError(f"unknown prompt kind {kind!r}; allowed kinds: {allowed}")
    if not 1 <= max_objects <= SHAPES_MAX_OBJECTS:
        raise ConfigError(f"max_objects must be between 1 and {SHAPES_MAX_OBJECTS}, got {max_objects}")
    for kind in kinds:
        if SHAPES_KINDS[kind] > max_objects:
            raise ConfigError(
                f"prompt kind {kind!r} needs at least {SHAPES_KINDS[kind]} objects but max_objects={max_objects}"
            )
    return kinds


@dataclass
class DataConfig:
    # shapes: the procedural world; folder: images on disk; webdataset: tar shards; hf: Hugging Face
    # datasets; latents: a cache written by `fusedit cache-latents` (no VAE encode in training).
    source: str = choice("shapes", "shapes", "folder", "webdataset", "hf", "latents")
    image_size: int = positive(32)
    max_objects: int = positive(4)
    # Distinct samples of the procedural dataset; training steps cycle over them (small = overfit).
    num_samples: int = positive(10_000_000)
    kinds: list = field(default_factory=lambda: list(SHAPES_KINDS))
    # Probability that a caption is replaced by "" so the model learns the unconditional velocity (CFG).
    caption_dropout: float = field(default=0.1, metadata={"min": 0, "max": 1})
    # DataLoader worker processes (index-addressable sources) or decode threads (streams).
    num_workers: int = nonneg(0)
    # folder: the image folder, scanned recursively in sorted path order with <stem>.txt/<stem>.json
    # captions; with index_file, the folder its relative paths are resolved against (default: its folder).
    root: str = ""
    # folder: a .jsonl or .csv index with one row per image (a path column and caption columns).
    index_file: str = ""
    # Column (index file, hf) or tar member extension (webdataset) holding the image; "" = the first of
    # path/file_name/image/filepath/file (index file), "image" (hf), the first member whose extension a
    # folder reads as an image, jpg first (webdataset).
    image_field: str = ""
    # Caption sources, tried in order; dotted names read into JSON (e.g. json.caption). Several present:
    # see caption_pick. A sample with none of them is skipped and counted ("no-caption").
    caption_fields: list = field(default_factory=lambda: ["txt", "caption"])
    # "random": a caption drawn by (seed, epoch, sample) among the fields present; "first": the first one.
    caption_pick: str = choice("random", "random", "first")
    # webdataset: one entry per dataset, a brace pattern ("data/{0000..0099}.tar") or a list of them.
    # On the command line quote the YAML: data.shards='["a/{0..9}.tar", "b/{0..3}.tar"]'.
    shards: list = field(default_factory=list)
    # webdataset: mixing weight of each data.shards entry (empty = equal weights).
    weights: list = field(default_factory=list)
    # hf: a parquet file or glob, a local dataset folder, or a hub id; hf_name picks the hub config.
    hf_path: str = ""
    hf_name: str = ""
    hf_split: str = "train"
    # hf: stream instead of downloading (read in stored order, not shuffled; position is restorable).
    hf_streaming: bool = False
    # Images whose shorter side is below this are skipped and counted ("tiny"); None = image_size // 2
    # (upscaling by more than 2x mostly teaches blur).
    min_image_size: int | None = positive(None)
    # Images whose long side is more than this many times their short side (web banners, 8:1) are skipped and
    # counted ("aspect-ratio"): a crop or the nearest bucket keeps a sliver of them. 0 or None = no limit;
    # otherwise > 1 (checked at load).
    max_aspect_ratio: float | None = None
    # Crop after resizing the shorter side: "center", or "random" (offset fixed per sample by seed).
    crop: str = choice("center", "center", "random")
    # Aspect-ratio buckets as [[H, W], ...]: each image goes to the nearest aspect ratio and every batch
    # comes from one bucket (the whole global batch of a step, all processes alike, except for streams,
    # which bucket per process); empty = square image_size crops.
    buckets: list = field(default_factory=list)
    # latents: the folder `fusedit cache-latents` wrote (safetensors shards + index.json and its columns, index/).
    latents_dir: str = ""


@dataclass
class FlowConfig:
    """Rectified-flow training (design-space.md s.3): logit-normal t, then the SD3 shift."""

    logit_mean: float = 0.0
    logit_std: float = positive(1.0)
    shift: float = positive(3.0)


# What a stage can train (train.trainable): the denoiser (its text adapter included), the shallow designs'
# text adapter between the LLM and the DiT alone (LI-DiT's refiners or the context embedder), and the
# LLM(s) themselves (joint fine-tuning, see fusedit.train.stages).
TRAINABLE_PARTS = ("dit", "refiner", "llm")


@dataclass
class LoRAConfig:
    """LoRA adapters (through peft) on a part's linear projections: with rank >= 1 the part trains through
    the adapters and its own weights stay frozen; rank 0 = no adapters (the part trains fully). The whole
    section written as null is this default, no adapters (``lora_field``)."""

    rank: int = nonneg(0)
    # The adapters' output is scaled by alpha / rank; None = rank (scale 1).
    alpha: float | None = positive(None)
    # Module names to adapt, matched against the end of each module's dotted name (peft's rule); empty =
    # the part's attention projections q/k/v/o_proj, and for the DiT also its MLP's gate/up/down_proj (the
    # DiT's blocks use the LLMs' module names).
    targets: list[str] = field(default_factory=list)


def lora_field() -> Any:
    """A LoRAConfig field that also takes null, as its default: no adapters. A later stage turns a part's
    adapters off with it (``train.llm_lora: null``), forgetting their alpha and targets too."""
    return field(default_factory=LoRAConfig, metadata={"null_is_default": True})


@dataclass
class TrainConfig:
    # Optimizer steps. With `stages` this is the sum of the stages' steps (set at load).
    steps: int = positive(1000)
    # Samples per process and micro-step: the global batch of a step is
    # batch_size * grad_accum * world size (the number of torchrun processes).
    batch_size: int = positive(32)
    # Micro-steps whose gradients are summed before each optimizer step (under DDP without an all-reduce
    # until the last one).
    grad_accum: int = positive(1)
    # The global batch a recipe means (None: unchecked). When set, batch_size * grad_accum * world size must
    # equal it, checked when training starts: a recipe's batch of 512 stays 512 on 8 GPUs (batch_size=64)
    # instead of becoming 8 x 512.
    global_batch: int | None = positive(None)
    # At most 1: an AdamW step moves each weight by about lr, so far above it a run only diverges, and from
    # about 1e37 Adam's step size overflows float32.
    lr: float = field(default=1e-4, metadata={"min": 0, "strict": True, "max": 1})
    # AdamW decays every trained tensor, norms and biases too, as the public FuseDiT trainer; eps is torch's 1e-8.
    weight_decay: float = nonneg(1e-4)
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 1})
    beta2: float = field(default=0.999, metadata={"min": 0, "max": 1})
    warmup_steps: int = nonneg(0)
    # LR after warmup: "constant" (the FuseDiT recipe) or "cosine" decay to 0 at train.steps.
    schedule: str = choice("constant", "constant", "cosine")
    # The global gradient norm (every trained weight together) is clipped to this; 0 = no clipping (the norm
    # is still measured and logged as grad_norm).
    grad_clip: float = nonneg(1.0)
    # Recompute each DiT block's activations in backward instead of keeping them (memory for time).
    grad_checkpointing: bool = False
    # torch.compile every DiT block, the final norm (and the LLM): "auto" = inductor on a GPU and off on the
    # CPU; "" = off; "max-autotune" = inductor choosing each matmul's kernel by timing it (longer compile;
    # fusedit.compiling.compile_settings); "eager" and "aot_eager" only check tracing.
    compile: str = choice("auto", "auto", "", "inductor", "max-autotune", "aot_eager", "eager")
    # Below 1, the compiled blocks recompute their cheapest activations in backward so that the kept ones
    # fit this fraction of the default (memory for a little time; fusedit-gemma2b's 512 px batch 16 fits
    # 64 GB with it, benchmarks/RESULTS.md).
    activation_memory_budget: float = field(default=1.0, metadata={"min": 0, "max": 1})
    # Every this many steps, rank 0 samples a preview grid of the step's first 8 captions (of the global
    # batch, at any world size) into run_dir/previews (0 = off).
    preview_every: int = nonneg(0)
    # A step whose loss or gradient is NaN/inf is skipped and counted; this many in a row stop the run.
    max_bad_steps: int = positive(10)
    ema_decay: float = field(default=0.99, metadata={"min": 0, "max": 1})
    ema_every: int = positive(100)
    # Keep the EMA's float32 copy of the DiT in host memory (fusedit.train.ema): 4 bytes per DiT weight
    # off the GPU (9.1 GiB for fusedit-gemma2b) for a copy over PCIe at each update (every ema_every steps),
    # averaged by a host thread while the GPU trains on.
    ema_offload: bool = False
    precision: str = choice("auto", "auto", "fp32", "bf16")
    checkpoint_every: int = positive(500)
    # The newest this many checkpoints are kept, and each finished stage's last one besides.
    keep_checkpoints: int = positive(2)
    log_every: int = positive(10)
    # Non-negative: numpy's generators (the shapes world, data order) refuse negative seeds.
    seed: int = nonneg(0)
    # "auto": CUDA when present (under torchrun, each process the GPU of its LOCAL_RANK), else the CPU.
    device: str = "auto"
    # How the denoiser is spread over torchrun's processes: "ddp" (replicated, gradients all-reduced),
    # "fsdp" (FSDP2 fully_shard per DiT block and the root; bf16 parameters with fp32 gradient reduction
    # when precision resolves to bf16), "none" (one process only). Ignored without torchrun.
    parallel: str = choice("ddp", "none", "ddp", "fsdp")
    # Shard the frozen LLM over the processes (FSDP2, gathered for each prompt batch's forward) instead of
    # keeping a full copy on each: 1/world of its memory during the denoiser's forward and backward.
    shard_llm: bool = False
    # Collective timeout: a rank waiting this long for the others (a hung or dead peer) fails the run.
    dist_timeout_s: int = positive(1800)
    # Which parts train (TRAINABLE_PARTS); everything else is frozen and keeps nothing for backward.
    trainable: list = subset(["dit"], *TRAINABLE_PARTS, nonempty=True)
    # The LLM's own learning rate when it trains (same warmup and schedule); None = train.lr.
    llm_lr: float | None = field(default=None, metadata={"min": 0, "strict": True, "max": 1})
    # Train only the top k of the LLM layers the design reads (and the final norm when read); None = all
    # that the design reads (fusedit.text.encoder.TextEncoder.read_modules).
    llm_top_layers: int | None = positive(None)
    # Train the LLM through LoRA adapters instead of fully (rank >= 1); with llm_top_layers, only there.
    # null or rank 0 = no adapters.
    llm_lora: LoRAConfig = lora_field()
    # Train the DiT through LoRA adapters on its attention and MLP projections (rank >= 1), e.g. to
    # fine-tune a trained model (train.init_from); its other weights stay frozen. null or rank 0 = no adapters.
    dit_lora: LoRAConfig = lora_field()
    # A run or checkpoint folder whose weights (EMA when saved, LoRA adapters merged; its LLM when saved),
    # or a diffusers pipeline folder whose transformer and LLMs, start this run instead of the random init:
    # fine-tuning a trained, converted or downloaded model. It starts the run at step 0 with a fresh AdamW,
    # learning-rate schedule and warmup, and an EMA that is a copy of the loaded weights. Resuming reads
    # this run's own checkpoints instead.
    init_from: str = ""
    # Start from train.init_from's EMA weights (true) or its raw, trained weights (false: early in a run
    # the EMA still holds mostly the weights that run started from, checkpoints.ema_start_share). A
    # pipeline folder holds the one set of weights it was exported with.
    init_from_ema: bool = True
    # Metric loggers next to the always-on metrics.jsonl, on rank 0: "tensorboard" (run_dir/tensorboard)
    # and "wandb" (project from $WANDB_PROJECT, default "fusedit"; offline with WANDB_MODE=offline).
    loggers: list = subset([], "tensorboard", "wandb")


@dataclass
class SampleConfig:
    steps: int = positive(25)
    guidance: float = nonneg(6.0)
    sampler: str = variant("sample.sampler", "euler")
    # Time shift of the sampling schedule (SD3 style); 1.0 = no shift.
    shift: float = positive(3.0)
    # How the sampling times are spaced before the shift (fusedit.flow.samplers.SCHEDULES): "uniform" in t
    # from 1 to 0; "diffusers" = FlowMatchEulerDiscreteScheduler's default spacing, which the public FuseDiT
    # pipeline samples with (converted checkpoints use it, to reproduce published images and scores).
    schedule: str = variant("sample.schedule", "uniform")
    negative_prompt: str = ""
    # `fusedit sample`'s seed (its --seed overrides it) and training previews': image i starts from the
    # noise of seed + i alone, within SEED_MAX.
    seed: int = field(default=42, metadata={"min": 0, "max": SEED_MAX})
    # Compute the LLM's per-layer text K/V once per prompt batch and reuse it for every step.
    cache_text: bool = True
    use_ema: bool = True
    # The denoiser's compute dtype when sampling: "auto" = bf16 autocast on a GPU that has bf16 (what
    # training used), fp32 elsewhere; "fp32" always fp32; "bf16" always bf16 autocast.
    precision: str = choice("auto", "auto", "fp32", "bf16")
    # The sampling form of the denoiser (fusedit.models.inference): q/k/v and gate/up as one matmul each,
    # and, under bf16 autocast, matmul weights stored in bf16 (bit-identical outputs, less memory traffic).
    fuse_projections: bool = True
    bf16_weights: bool = True
    # torch.compile each DiT block and the final norm for sampling, as train.compile does for training:
    # "auto" = inductor on a GPU, off on the CPU; "" = off. The first batch of each new shape pays the compile
    # (inductor caches it on disk for later runs); every later step runs the compiled blocks. "max-autotune" as
    # in train.compile.
    compile: str = choice("auto", "auto", "", "inductor", "max-autotune", "aot_eager", "eager")
    # Replay each sampling step as one CUDA graph (with the text cache, on a GPU; ignored elsewhere): one
    # launch instead of hundreds, for small batches that leave the GPU waiting. Off until it is measured
    # on a GPU (benchmarks/RESULTS.md).
    cuda_graphs: bool = False


# Keys a stage may not change: the run's identity and machinery (seed and placement stay fixed so that
# noise, data order and checkpoints mean the same in every stage), and its length (stages.N.steps).
RUN_WIDE_TRAIN_KEYS = (
    "steps",
    "seed",
    "device",
    "parallel",
    "shard_llm",
    "dist_timeout_s",
    "compile",
    "activation_memory_budget",
    "ema_offload",
    "keep_checkpoints",
    "init_from",
    "init_from_ema",
    "loggers",
)


STAGE_SECTIONS = ("data", "train", "flow", "sample")


STAGE_SECTION_CLASSES = {"data": DataConfig, "train": TrainConfig, "flow": FlowConfig, "sample": SampleConfig}


@dataclass
class StageConfig:
    """One stage of a staged run: its length and what it changes, as overrides of the data, train, flow
    and sample sections on top of the stage before it (e.g. data.image_size, train.batch_size, train.lr,
    train.trainable). The architecture (model, text, vae) is the run's."""

    name: str = ""
    # Optimizer steps of this stage (required); stage boundaries are the running sums, global step numbers.
    steps: int | None = positive(None)
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    flow: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Further LLMs (LI-DiT multi-LLM fusion), each with its own tokenizer and template.
    extra_text: list = field(default_factory=list, metadata={"item": TextConfig})
    pooled_text: PooledTextConfig = field(default_factory=PooledTextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    name: str = "run"
    # A staged run (see StageConfig and resolved_stages); empty = one stage, this config.
    stages: list = field(default_factory=list, metadata={"item": StageConfig})
    # Modules imported when the config loads, before its values are checked: code of your own that registers
    # variants (fusedit.models.register_design, fusedit.flow.register_sampler, ...) the config names. Saved
    # with the run, so sampling or resuming it imports them again. A config's layers (a base: chain, a run it
    # is based on or resumes, overrides) add to the list rather than replace it, since the values they
    # inherit may name a base's variants: a plugin listed once cannot be removed by a child.
    plugins: list[str] = field(default_factory=list, metadata={"imports": True})


@dataclass(frozen=True)
class Stage:
    """A stage resolved: global steps [start, end) and the full config it trains under (its train.steps is
    the stage's length, its stages list empty)."""

    index: int
    name: str
    start: int
    end: int
    config: Config
    # False for the one implicit stage of a run without stages, which messages do not name.
    staged: bool = True

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def where(self) -> str:
        """The stage as messages name it: "stages.1 (finetune)"."""
        return f"stages.{self.index} ({self.name})"


def _merge_into_list(items: list, patch: dict, key: str) -> list:
    """``stages.1.steps=10``: a mapping keyed by list positions patches those items of a list."""
    out = list(items)
    for index, value in patch.items():
        i = index if isinstance(index, int) else int(index) if str(index).isdigit() else None
        if i is None or not 0 <= i < len(out):
            allowed = (
                f"allowed: 0..{len(out) - 1}" if out else f"{key} is empty: write its items in a YAML file"
            )
            raise ConfigError(f"{key}.{index}: no such item ({allowed})")
        out[i] = deep_merge(out[i], value) if isinstance(value, dict) and isinstance(out[i], dict) else value
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k == "plugins" and isinstance(v, list) and isinstance(out.get(k), list):
            # Each layer adds its plugins: the values it inherits may name a base's variants (Config.plugins).
            out[k] = out[k] + [m for m in v if m not in out[k]]
        elif isinstance(v, dict) and isinstance(out.get(k), list):
            out[k] = _merge_into_list(out[k], v, k)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "arch":
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            # text.arch is merged key by key (an override may change one number) unless the same override
            # changes the LLM family: another family's keys (Gemma's hidden_activation) must not leak in. A
            # section that names no family has the default one.
            family = a.get("family", TextConfig.family)
            same_family = b.get("family", family) == family
            out[k] = {**out[k], **v} if same_family else dict(v)
        else:
            out[k] = v
    return out


def _describe_type(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _list_override(path: str, value: Any) -> str:
    """The override giving ``value`` as a list: ``data.shards=[a.tar]``, or the quoted JSON form where YAML
    or the shell would not read the plain one as that list (``data.shards='["a/{0..9}.tar"]'``). A string
    that YAML could not read as a list (``[a/{0..9}.tar]``: the braces open a mapping) gives its items."""
    items = _list_items(value) if isinstance(value, str) else [value]
    plain = f"[{','.join(map(str, items))}]"
    with contextlib.suppress(yaml.YAMLError):
        if all(re.fullmatch(r"[\w./-]+", str(v)) for v in items) and yaml.safe_load(plain) == items:
            return f"{path}={plain}"
    return f"{path}={shlex.quote(json.dumps(items))}"


def _list_items(text: str) -> list:
    """The items of a list typed as ``text`` without YAML's quoting: one pair of surrounding brackets
    dropped, split at the commas outside brackets and braces (``{a,b}`` is one shard pattern). An item that
    YAML reads as a list (an aspect bucket ``[256, 384]``) stays one, any other is the text as typed."""
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    items, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth <= 0:
            items.append(inner[start:i].strip())
            start = i + 1
    items.append(inner[start:].strip())
    out = []
    for item in filter(None, items):
        try:
            loaded = yaml.safe_load(item)
        except yaml.YAMLError:
            loaded = None
        out.append(loaded if isinstance(loaded, list) else item)
    return out


def _check_value(path: str, value: Any, tp: Any, meta: dict, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if "variants" in meta:
        variant_traits(meta["variants"], value, path)
        return value
    if "choices" in meta:
        if value is False and "" in meta["choices"]:
            return ""  # the choice that turns it off, as YAML reads `false` and `off`
        if value not in meta["choices"] or isinstance(value, bool):
            allowed = ", ".join(c if c != "" else '"" (off; false in YAML)' for c in meta["choices"])
            raise ConfigError(f"{path}={value!r} is not allowed (allowed: {allowed})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        # numpy's integers too (a config edited in Python), kept as Python's
        if not is_whole(value):
            raise ConfigError(f"{path}={value!r} must be an integer")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it plainly is.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{path}={value!r} must be a number")
        value = float(value)
    elif tp is str:
        if value is None:
            # A string key's "none" is the empty string (no string key takes null).
            allowed = '"" for none' if default == "" else f"e.g. {default!r}, the default"
            raise ConfigError(f"{path}=null is not allowed (allowed: a string, {allowed})")
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
    elif tp in (dict, list) or origin in (dict, list):
        want = origin or tp
        if not isinstance(value, want):
            example = f", e.g. {_list_override(path, value)}" if want is list and _scalar(value) else ""
            raise ConfigError(f"{path}={value!r} must be a {_describe_type(want)}{example}")
        if want is list and typing.get_args(tp) == (str,) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}={value!r} must be a list of strings (names)")
        if "item_choices" in meta:
            allowed = meta["item_choices"]
            bad = [v for v in value if v not in allowed]
            if bad or len(set(value)) != len(value) or (meta["nonempty"] and not value):
                what = (
                    f"{bad[0]!r} is not allowed" if bad else "needs distinct items" if value else "is empty"
                )
                raise ConfigError(f"{path}={value!r}: {what} (allowed: a list of {', '.join(allowed)})")
        if meta.get("imports"):
            import_plugins(path, value)
        return value
    if isinstance(value, float) and value != value and ("min" in meta or "max" in meta):
        # NaN compares false with any bound, so it would pass them all.
        raise ConfigError(f"{path}={value!r} must be a number (NaN is not)")
    if "min" in meta:
        bad = value <= meta["min"] if meta.get("strict") else value < meta["min"]
        if bad:
            rel = ">" if meta.get("strict") else ">="
            raise ConfigError(f"{path}={value!r} must be {rel} {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}={value!r} must be <= {meta['max']}")
    return value


def build_section(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f": did you mean {where + close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {where + str(unknown[0])!r}{hint} (allowed: {', '.join(fields)})"
        )
    kwargs = {}
    # The plugins first: the values after them may name the variants they register.
    for name in sorted(data, key=lambda name: not fields[name].metadata.get("imports")):
        value = data[name]
        tp, path, spec = hints[name], f"{prefix}.{name}" if prefix else name, fields[name]
        positions = isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
        if (
            positions
            and (typing.get_origin(tp) or tp) is list
            and spec.default_factory is not dataclasses.MISSING
        ):
            # train.trainable.1=llm, extra_text.0.family=qwen2 on a config that leaves the list at its default:
            # the raw YAML holds no list for the positions to patch, so they patch the field's default. (A
            # stage's data/train mapping keeps such a patch: resolved_stages merges it into the inherited list.)
            value = _merge_into_list(spec.default_factory(), value, path)
        if dataclasses.is_dataclass(tp) and value is None and spec.metadata.get("null_is_default"):
            kwargs[name] = spec.default_factory()
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, path)
        elif "item" in spec.metadata:
            if not isinstance(value, list):
                raise ConfigError(f"{path}={value!r} must be a list of mappings")
            kwargs[name] = [
                build_section(spec.metadata["item"], v, f"{path}.{i}") for i, v in enumerate(value)
            ]
        else:
            kwargs[name] = _check_value(path, value, tp, dict(spec.metadata), spec.default)
    return cls(**kwargs)
