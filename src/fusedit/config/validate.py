"""The rules across fields: design traits, image sides, data locations, settings that change nothing, the
cross-field checks of a whole config (``validate``), the DiT's shape against its LLM's, and a staged run
resolved into one checked config per stage (``resolved_stages``)."""

from __future__ import annotations

import copy
import dataclasses
import numbers
from typing import Literal

from fusedit.config.paths import CLIP_TEXT_FAMILY, check_arch, known_llm_config, llm_head_dim, text_sections
from fusedit.config.schema import (
    RUN_WIDE_TRAIN_KEYS,
    STAGE_SECTION_CLASSES,
    STAGE_SECTIONS,
    VARIANTS,
    Config,
    ConfigError,
    DataConfig,
    DesignTraits,
    ModelConfig,
    Stage,
    TextConfig,
    TrainConfig,
    build_section,
    check_shapes_options,
    deep_merge,
    variant_names,
    variant_traits,
    variants_where,
)


def side_limits(cfg: Config) -> tuple[int, int | None]:
    """(unit, largest) of an image side in pixels: a multiple of ``unit`` (the VAE's downsampling x the
    patch size: whole patches of whole latent pixels) and, where a fixed APE table (model.ape_max_size
    patches) bounds the grid, at most ``largest`` (None: any size)."""
    m = cfg.model
    unit = cfg.vae.downsample * m.patch_size
    table = variant_traits("model.pos_embed", m.pos_embed).ape_options and m.ape_max_size is not None
    return unit, m.ape_max_size * unit if table else None


def side_fits(side: int, cfg: Config) -> bool:
    """Whether an image side in pixels keeps to ``side_limits``."""
    return within_limits(side, side_limits(cfg))


def within_limits(side: int, limits: tuple[int, int | None]) -> bool:
    """Whether an image side in pixels keeps to ``limits`` (``side_limits``' (unit, largest), or a built
    model's: fusedit.sampling.generation.generate has no config)."""
    unit, largest = limits
    return side >= unit and side % unit == 0 and (largest is None or side <= largest)


def allowed_sides(cfg: Config) -> str:
    """``side_limits`` as the errors for a bad image side say it."""
    return limits_text(side_limits(cfg))


def limits_text(limits: tuple[int, int | None]) -> str:
    """(unit, largest) side limits as the errors for a bad image side say it."""
    unit, largest = limits
    limit = f", up to {largest} (the APE table's model.ape_max_size)" if largest is not None else ""
    return f"a positive multiple of {unit}, the VAE's downsampling x the patch size{limit}"


# The built-in position schemes that rotate image tokens, as the public code's converter maps them; code
# that must see registered schemes too asks variant_traits("model.pos_embed", name).rotates.
ROTARY_SCHEMES = tuple(n for n, t in VARIANTS["model.pos_embed"].traits.items() if t.rotates)


# Every model.design and its traits, registered ones included (VARIANTS); code asks these, not the names.
DESIGN_TRAITS: dict[str, DesignTraits] = VARIANTS["model.design"].traits


def design_traits(design: str) -> DesignTraits:
    """``DESIGN_TRAITS[design]``; a one-line ConfigError for a name that is not a design."""
    return variant_traits("model.design", design)


def is_deep(design: str) -> bool:
    """Deep fusion (fusedit, fusedit-cross): DiT layers paired with LLM layers."""
    return design_traits(design).deep


def is_shallow(design: str) -> bool:
    """The shallow designs (dit-self, dit-cross): one LLM hidden state, projected by the DiT."""
    return not design_traits(design).deep


def shallow_designs() -> str:
    """The shallow designs, as messages list them ("dit-self or dit-cross", and any registered one)."""
    return variant_names("model.design", lambda t: not t.deep)


def attention_kind(design: str) -> Literal["self", "cross"]:
    """How the design's image tokens attend to the text: joint self-attention or cross-attention."""
    return design_traits(design).attention


# The data keys that say where real data is, and the source that reads each.
DATA_LOCATIONS = {
    "root": "folder",
    "index_file": "folder",
    "shards": "webdataset",
    "hf_path": "hf",
    "latents_dir": "latents",
}


# The keys only one source reads: its data's locations, and how webdataset mixes its shards.
SOURCE_KEYS = {**DATA_LOCATIONS, "weights": "webdataset"}


_DATA_DEFAULTS = dataclasses.asdict(DataConfig())


def check_data_locations(data: DataConfig) -> None:
    """Refuse a data location of a source other than data.source's (say data.shards with data.source left
    at shapes, or at folder from an example): the run would train on other data without ever reading it.
    Checked where data is about to be read (training, cache-latents), not at every load: a run saved
    before this check with such a leftover must still load to be sampled or resumed with it removed. A
    latent cache's config keeps where its images were read from (cache-latents says to add
    data.source=latents to the config that made it)."""
    source = data.source
    if source == "latents":
        return
    given = [k for k, reader in SOURCE_KEYS.items() if reader != source and getattr(data, k)]
    if given:
        key = given[0]
        reads = " / ".join(f"data.{k}" for k, reader in DATA_LOCATIONS.items() if reader == source)
        raise ConfigError(
            f"data.{key}={getattr(data, key)!r} is set but data.source={source!r} "
            f"({f'it reads {reads}' if reads else 'the built-in procedural world'}) never reads it (allowed: "
            f"data.source={SOURCE_KEYS[key]} to read it, or no data.{key})"
        )


def weights_fit(weights, count: int | None) -> bool:
    """Whether ``weights`` are mixing weights for ``count`` datasets (None: a count not known yet): finite
    numbers >= 0, not all 0, one per dataset; [] is equal weights. The webdataset mixer (shard_lists) and
    the load (check_weights) both ask."""
    if not isinstance(weights, list):
        return False
    # 0 <= w < inf refuses NaN too.
    ok = all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 <= w < float("inf") for w in weights
    )
    return ok and (not weights or (sum(weights) > 0 and count in (None, len(weights))))


def check_weights(data: DataConfig) -> None:
    """data.weights at load: otherwise `fusedit config` passed data.weights=[abc] and only training refused
    it. The shards' count is known for webdataset only."""
    weights = data.weights
    counted = len(data.shards) if data.source == "webdataset" else 0
    if weights_fit(weights, counted or None):
        return
    per = f" ({counted})" if counted else ""
    raise ConfigError(
        f"data.weights={weights!r} is not allowed (allowed: finite numbers >= 0, not all 0, one per "
        f"data.shards entry{per}; [] for equal weights)"
    )


def tokenizes_builtin(text: TextConfig) -> bool:
    """Whether an LLM section (text, extra_text.N) tokenizes with the built-in word tokenizer: it names
    neither a tokenizer nor a model (a random-init LLM)."""
    return not (text.tokenizer or text.model_id)


def pooled_tokenizes_builtin(cfg: Config) -> bool:
    """Whether the pooled-text encoder (clip-mod's CLIP; any model.pooled_text with the ``encoder`` trait)
    tokenizes with the built-in word tokenizer (no pooled_text.tokenizer)."""
    encoder = variant_traits("model.pooled_text", cfg.model.pooled_text).encoder
    return encoder and not cfg.pooled_text.tokenizer


def uses_builtin_tokenizer(cfg: Config) -> bool:
    """Whether any text encoder (an LLM without text.tokenizer / model_id, or the clip-mod CLIP without
    pooled_text.tokenizer) tokenizes with the built-in word tokenizer."""
    llms = any(tokenizes_builtin(t) for t in (cfg.text, *cfg.extra_text))
    return llms or pooled_tokenizes_builtin(cfg)


def adds_template_tokens(text: TextConfig) -> bool:
    """Whether a text section's template puts tokens around the prompt: one that adds its own (any but
    ``plain``), or an instruction (a prefix of spaces only opens the prompt instead, TextEncoder)."""
    return variant_traits("text.template", text.template).adds_tokens or bool(text.instruction.strip(" "))


def noop_settings(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, one-line refusal) of each setting that changes nothing in ``cfg``: an ablation of a part
    the model lacks, a system prompt a template has no turn for, a choice of train.init_from's weights
    without one. Refused in a config being written (validate); dropped from the config a model folder was
    saved with (_saved_mapping), which a run saved before a refusal was added may hold, as dropping it
    changes nothing."""
    m, found = cfg.model, []
    # The built-in word tokenizer's vocabulary takes in every section's system prompt (system.builtin_words),
    # so where any encoder uses it the words change its ids even with a plain template.
    builtin = uses_builtin_tokenizer(cfg)
    for key, text in text_sections(cfg):
        system_turn = variant_traits("text.template", text.template).system_turn
        if text.system_prompt and not system_turn and not builtin:
            found.append(
                (
                    f"{key}.system_prompt",
                    f"{key}.system_prompt={text.system_prompt!r} does nothing with {key}.template="
                    f"{text.template!r}, which has no system turn (allowed: {key}.template "
                    f"{variant_names('text.template', lambda t: t.system_turn)}, or an empty system_prompt)",
                )
            )
    # The refiner's ablations (their non-default values), which a model without a refiner has nothing for.
    for knob, ablated in (("refiner_gating", False), ("refiner_causal", True), ("drop_instruction", False)):
        if getattr(m, knob) == ablated and not m.refiner_depth:
            key = f"model.{knob}"
            found.append(
                (key, f"{key}={str(ablated).lower()} is a refiner ablation: set model.refiner_depth >= 1")
            )
    if (
        not m.drop_instruction
        and m.refiner_depth
        and not any(adds_template_tokens(t) for _, t in text_sections(cfg))
    ):
        # With no template tokens on any LLM, the DiT reads the same tokens whether they are dropped.
        others = ", nor does any extra_text" if cfg.extra_text else ""
        found.append(
            (
                "model.drop_instruction",
                "model.drop_instruction=false keeps the instruction tokens for the DiT, but "
                f"text.template={cfg.text.template!r} with text.instruction={cfg.text.instruction!r} gives "
                f"none{others} (allowed: a text.instruction, or text.template "
                f"{variant_names('text.template', lambda t: t.adds_tokens)})",
            )
        )
    if not cfg.train.init_from_ema and not cfg.train.init_from:
        found.append(
            (
                "train.init_from_ema",
                "train.init_from_ema=false chooses the raw weights of train.init_from, which is not set "
                "(allowed: a train.init_from, or train.init_from_ema=true)",
            )
        )
    if not m.collaborative_refiner and not (m.refiner_depth and cfg.extra_text):
        found.append(
            (
                "model.collaborative_refiner",
                "model.collaborative_refiner=false is an ablation of the refiners of 2+ LLMs: it needs "
                "model.refiner_depth >= 1 and extra_text",
            )
        )
    return found


_MODEL_DEFAULTS = dataclasses.asdict(ModelConfig())


def rope_layout_idle(m: ModelConfig) -> str | None:
    """Why model.rope_layout changes nothing in ``m``'s design (the end of an idle-setting warning), or None
    where it acts. image-only restarts the image rotations at 0 apart from the text's: only dit-self rotates
    text keys in the image's attention (deep fusion's layout is held at joint by validate)."""
    design = design_traits(m.design)
    if not variant_traits("model.pos_embed", m.pos_embed).rotates:
        return f"model.pos_embed={m.pos_embed!r}, which rotates no tokens"
    if not design.deep and design.attention != "self":
        return (
            f"model.design={m.design!r}, whose cross-attention never rotates the text keys (its image "
            "attention sees relative positions only)"
        )
    return None


def idle_settings(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, one-line warning) of each setting, away from its default, that changes nothing in the
    design ``cfg`` chose but is accepted (not refused as noop_settings are): a preset or study parent sets it
    for its own design, and the variants that inherit it into another design must still load. load_config
    warns of those among the keys the user set (an override file, key=value), never of inherited ones."""
    m = cfg.model
    position = variant_traits("model.pos_embed", m.pos_embed)
    no_ape = None if position.ape_options else f"model.pos_embed={m.pos_embed!r}, which has no APE table"
    modulates = variant_traits("model.timestep_conditioning", m.timestep_conditioning).modulates_norm
    # Each model knob and why it is idle here (None: it acts).
    why_idle = {
        "refiner_heads": None if m.refiner_depth else "model.refiner_depth=0 (no refiner)",
        "rope_layout": rope_layout_idle(m),
        "adaln_norm": None
        if modulates
        else f"model.timestep_conditioning={m.timestep_conditioning!r}, which modulates no norm",
        "ape_base_size": no_ape,
        "ape_max_size": no_ape,
    }
    found = [
        (f"model.{knob}", f"model.{knob}={getattr(m, knob)!r} changes nothing with {why}")
        for knob, why in why_idle.items()
        if why and getattr(m, knob) != _MODEL_DEFAULTS[knob]
    ]
    if not variant_traits("model.pooled_text", m.pooled_text).encoder:
        defaults = dataclasses.asdict(type(cfg.pooled_text)())
        found += [
            (
                f"pooled_text.{knob}",
                f"pooled_text.{knob}={value!r} changes nothing with model.pooled_text={m.pooled_text!r}, "
                "which reads no second encoder",
            )
            for knob, value in dataclasses.asdict(cfg.pooled_text).items()
            if value != defaults[knob]
        ]
    return found


def validate(cfg: Config) -> None:
    """Cross-field checks that single-field types cannot express, a section at a time."""
    _validate_vae(cfg)
    _validate_data(cfg)
    _validate_text(cfg)
    _validate_model(cfg)
    _validate_training(cfg)
    if cfg.stages:
        resolved_stages(cfg)  # builds and validates every stage's config


def _validate_vae(cfg: Config) -> None:
    if cfg.vae.kind == "identity" and (cfg.vae.downsample != 1 or cfg.vae.latent_channels != 3):
        raise ConfigError(
            f"vae.kind=identity needs vae.downsample=1 and vae.latent_channels=3 "
            f"(got {cfg.vae.downsample} and {cfg.vae.latent_channels})"
        )
    if cfg.vae.kind == "diffusers" and not cfg.vae.model_id:
        raise ConfigError("vae.kind=diffusers needs vae.model_id (a hub id or a local folder)")


def _validate_data(cfg: Config) -> None:
    """Image sizes and buckets against the patch grid and the APE table; the shapes world's options; the
    aspect-ratio limit; the webdataset mix's weights."""
    unit, largest = side_limits(cfg)  # pixels per DiT token side; the APE table's largest side
    if cfg.data.image_size % unit:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} must be divisible by vae.downsample x model.patch_size "
            f"= {unit}"
        )
    for bucket in cfg.data.buckets:
        ok = isinstance(bucket, (list, tuple)) and len(bucket) == 2
        if not (ok and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in bucket)):
            raise ConfigError(
                f"data.buckets={cfg.data.buckets!r}: {bucket!r} is not [height, width] in pixels"
            )
        if bucket[0] % unit or bucket[1] % unit:
            raise ConfigError(
                f"data.buckets: {list(bucket)} must have both sides divisible by vae.downsample x "
                f"model.patch_size = {unit}"
            )
    # The table's size is fixed: a larger grid would otherwise fail only at training's first batch.
    sides = [(f"data.image_size={cfg.data.image_size}", cfg.data.image_size)]
    sides += [(f"data.buckets: {list(b)}", max(b)) for b in cfg.data.buckets]
    for what, side in sides if largest is not None else ():
        if side <= largest:
            continue
        raise ConfigError(
            f"{what} makes a latent grid side of {side // unit} patches, more than the APE table's "
            f"model.ape_max_size={cfg.model.ape_max_size} (allowed: sides up to {largest} px = "
            "model.ape_max_size x vae.downsample x model.patch_size)"
        )
    if cfg.data.source == "shapes":
        # The world's own check of its prompt kinds, here at load: it would otherwise run only when the data
        # is built, after the model, and for a later stage only when that stage starts.
        try:
            check_shapes_options(cfg.data.kinds, cfg.data.max_objects)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"data.kinds={cfg.data.kinds!r} with data.max_objects={cfg.data.max_objects}: {e}"
            ) from None
    ratio = cfg.data.max_aspect_ratio
    if ratio and not ratio > 1:  # NaN fails the comparison too
        raise ConfigError(
            f"data.max_aspect_ratio={ratio!r} is not allowed (allowed: a number > 1, e.g. 3 for 3:1, or 0 or "
            "null for no limit)"
        )
    check_weights(cfg.data)


def _validate_text(cfg: Config) -> None:
    for key, text in text_sections(cfg):
        if text.model_id == "" and not text.arch:
            raise ConfigError(
                f"{key}.arch is empty: give {key}.model_id (hub id or folder) or a random-init arch"
            )
        # Checked with a model_id too: the arch stands in for a hub id out of reach (llm_config).
        check_arch(text.family, text.arch, key)
        if text.pretrain_steps and text.model_id:
            # Pretraining fits a random-init LLM to the caption corpus; a trained one is never overwritten.
            raise ConfigError(
                f"{key}.pretrain_steps={text.pretrain_steps} pretrains a random-init LLM, but "
                f"{key}.model_id={text.model_id!r} loads a trained one (allowed: pretrain_steps=0 with a model_id)"
            )
    check_arch(CLIP_TEXT_FAMILY, cfg.pooled_text.arch, "pooled_text")


def _validate_model(cfg: Config) -> None:
    """The design's options against each other and against the text side (extra LLMs, the pooled CLIP)."""
    m = cfg.model
    shallow = is_shallow(m.design)
    if cfg.extra_text and not (shallow and m.refiner_depth):
        raise ConfigError(
            f"extra_text has {len(cfg.extra_text)} more LLM(s) but model.design={m.design!r} with "
            f"model.refiner_depth={m.refiner_depth} reads one (allowed: {shallow_designs()} with refiner_depth >= 1)"
        )
    own_shape = [k for k in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size") if getattr(m, k)]
    if own_shape and not shallow:
        raise ConfigError(
            f"model.{own_shape[0]} is set but model.design={m.design!r} mirrors the LLM's attention and MLP "
            f"(allowed only with {shallow_designs()})"
        )
    if m.refiner_depth and not shallow:
        raise ConfigError(
            f"model.refiner_depth={m.refiner_depth} needs a shallow design ({shallow_designs()})"
        )
    if m.initial_layers and shallow:
        raise ConfigError(
            f"model.initial_layers={m.initial_layers} pairs DiT layers with deeper LLM layers, but "
            f"model.design={m.design!r} reads one hidden state (set text.hidden_layer; allowed: 0)"
        )
    position = variant_traits("model.pos_embed", m.pos_embed)
    if not position.places and not m.conv_pos:
        raise ConfigError(
            f"model.pos_embed={m.pos_embed!r} without model.conv_pos=true leaves the image tokens no position "
            f"(allowed: {', '.join(variants_where('model.pos_embed', lambda t: t.places))}, or "
            f"{m.pos_embed} with conv_pos=true as LI-DiT)"
        )
    # Deep fusion's text keys come rotated by the LLM at 0 .. L - 1, so its image positions must continue
    # after them (joint); image-only restarts them at 0, on top of the text's (design-space.md s.1).
    if m.rope_layout == "image-only" and not shallow:
        raise ConfigError(
            f"model.rope_layout='image-only' is for the shallow designs, not model.design={m.design!r}, "
            "whose text keys the LLM rotates (allowed: joint)"
        )

    # Any scheme that places image tokens (APE included: its image tokens are unrotated, but the LLM rotates
    # deep fusion's text keys either way, and the emulation turns the image rows against them).
    def joint(t: DesignTraits) -> bool:  # image and text keys in one attention, the text's rotated by the LLM
        return t.deep and t.attention == "self"

    if m.rope_left_pad is not None and not (
        joint(design_traits(m.design)) and position.places and m.rope_layout == "joint"
    ):
        designs = variants_where("model.design", joint)
        raise ConfigError(
            f"model.rope_left_pad={m.rope_left_pad} reproduces the public code's joint text-image rotations: "
            f"it needs model.design={' or '.join(map(repr, designs))} with pos_embed ape or a RoPE scheme and "
            f"rope_layout='joint' (got design={m.design!r}, pos_embed={m.pos_embed!r}, "
            f"rope_layout={m.rope_layout!r})"
        )
    # How the refined branches of several LLMs become one sequence: a choice only they make (the default aside).
    if m.refiner_concat != ModelConfig.refiner_concat and not (m.refiner_depth and cfg.extra_text):
        raise ConfigError(
            f"model.refiner_concat={m.refiner_concat!r} joins the refined tokens of several LLMs: it needs "
            f"model.refiner_depth >= 1 and extra_text (got refiner_depth={m.refiner_depth}, "
            f"{1 + len(cfg.extra_text)} LLM)"
        )
    for _, problem in noop_settings(cfg):
        raise ConfigError(problem)
    pooled = variant_traits("model.pooled_text", m.pooled_text)
    if pooled.refined and not shallow:
        # It pools the text tokens a shallow design prepares once per forward (refined, or embedded without a
        # refiner: TextTokens); deep fusion prepares none, each layer reading its own LLM layer.
        raise ConfigError(
            f"model.pooled_text={m.pooled_text!r} pools the text tokens a shallow design prepares (refined, "
            f"or embedded without a refiner), but model.design={m.design!r} prepares none (allowed: design "
            f"{shallow_designs()}, or model.pooled_text "
            f"{variant_names('model.pooled_text', lambda t: not t.refined)})"
        )
    if pooled.encoder and not (cfg.pooled_text.model_id or cfg.pooled_text.arch):
        raise ConfigError(
            f"model.pooled_text={m.pooled_text!r} needs pooled_text.model_id (or a random-init "
            "pooled_text.arch)"
        )
    has_embedding = variant_traits("model.timestep_conditioning", m.timestep_conditioning).has_embedding
    if pooled.adds and not has_embedding:
        embedded = variant_names("model.timestep_conditioning", lambda t: t.has_embedding)
        raise ConfigError(
            f"model.pooled_text={m.pooled_text!r} is added to the timestep embedding, but "
            f"model.timestep_conditioning={m.timestep_conditioning!r} has none (allowed: {embedded})"
        )


def _validate_training(cfg: Config) -> None:
    """What train.trainable and the LoRA settings need from the rest of the config."""
    tc, shallow = cfg.train, is_shallow(cfg.model.design)
    if "refiner" in tc.trainable and not shallow:
        raise ConfigError(
            f"train.trainable={tc.trainable} names 'refiner' but model.design={cfg.model.design!r} has none "
            f"(allowed with {shallow_designs()}: their context embedder or "
            "LI-DiT refiners)"
        )
    if "llm" not in tc.trainable:
        return
    if tc.shard_llm:
        raise ConfigError(
            "train.shard_llm=true needs a frozen LLM, but train.trainable names 'llm' (allowed: "
            "train.shard_llm=false, or train.trainable without llm)"
        )
    if not tc.llm_lora.rank:
        low = [(k, t.dtype) for k, t in text_sections(cfg) if t.dtype != "float32"]
        if low:
            raise ConfigError(
                f"train.trainable names 'llm' (full fine-tuning) but {low[0][0]}.dtype={low[0][1]!r}: AdamW "
                "needs float32 master weights (allowed: dtype float32, or train.llm_lora.rank >= 1)"
            )


def dit_layer_count(m: ModelConfig, llm_layers: int) -> int:
    """DiT layers: ``model.num_layers``, or every LLM layer after ``initial_layers``."""
    return m.num_layers if m.num_layers is not None else llm_layers - m.initial_layers


def fused_layers(m: ModelConfig, llm_layers: int) -> range:
    """The LLM layer each DiT layer reads in deep fusion: initial_layers, initial_layers + 1, ... (one
    contiguous run: DiT layer i pairs with LLM layer initial_layers + i), for an LLM of ``llm_layers``
    layers; refused in one line where it has too few."""
    n = dit_layer_count(m, llm_layers)
    if m.num_layers is None and n < 1:
        # num_layers unset means "every LLM layer after initial_layers": none are left.
        raise ConfigError(
            f"model.initial_layers={m.initial_layers} leaves no LLM layer for the DiT: the LLM has "
            f"{llm_layers} and deep fusion pairs every DiT layer with one after the initial ones "
            f"(allowed: initial_layers < {llm_layers})"
        )
    if n < 1 or m.initial_layers + n > llm_layers:
        raise ConfigError(
            f"model.initial_layers={m.initial_layers} + model.num_layers={n} needs "
            f"{m.initial_layers + n} LLM layers but the LLM has {llm_layers}: deep fusion pairs every DiT "
            f"layer with one LLM layer (allowed: initial_layers + num_layers <= {llm_layers})"
        )
    return range(m.initial_layers, m.initial_layers + n)


def dit_head_dim(m: ModelConfig, llm_width: int | None, llm_head_dim: int | None) -> int | None:
    """The width of the DiT's attention heads: the LLM's (deep fusion mirrors it), or on the shallow designs
    model.head_dim, or the DiT width split over model.num_heads, which must divide it. None where it rests
    on an LLM size not known yet (None: a hub LLM's at load)."""
    if m.head_dim or not m.num_heads:
        return m.head_dim or llm_head_dim
    width = m.dit_hidden_size or llm_width
    if width is not None and width % m.num_heads:
        given = f"model.dit_hidden_size={width}" if m.dit_hidden_size else f"the LLM's hidden size {width}"
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide the DiT width ({given}) into whole heads "
            f"(allowed: a divisor of {width}, or model.head_dim set too)"
        )
    return width // m.num_heads if width is not None else None


def resolve_hidden_layer(index: int, num_layers: int, key: str = "text.hidden_layer") -> int:
    """A transformers-style hidden-state index (negative counts from the end) -> absolute 0..num_layers;
    one out of range is a one-line ConfigError naming ``key``. Checked at load where the LLM's depth is known
    (check_llm_shape), at the build otherwise."""
    absolute = index if index >= 0 else num_layers + 1 + index
    if not 0 <= absolute <= num_layers:
        raise ConfigError(
            f"{key}={index} is out of range for an LLM with {num_layers} layers "
            f"(allowed: {-(num_layers + 1)}..{num_layers})"
        )
    return absolute


def check_kv_heads(m: ModelConfig, llm_heads: int | None) -> None:
    """model.num_kv_heads of a shallow design against its query heads (model.num_heads, else the LLM's
    ``llm_heads``; None: not known yet): grouped-query attention shares each key/value head among a whole
    number of query heads. Refused in one line at load where both are known, as the build refuses it for an
    LLM whose heads only the build knows; otherwise attention fails at training's first step."""
    heads = m.num_heads or llm_heads
    if m.num_kv_heads and heads is not None and heads % m.num_kv_heads:
        given = (
            f"model.num_heads={heads}" if m.num_heads else f"the LLM's {heads} heads (model.num_heads unset)"
        )
        divisors = [d for d in range(1, heads + 1) if heads % d == 0]
        raise ConfigError(
            f"model.num_kv_heads={m.num_kv_heads} does not divide {given}: each key/value head serves a whole "
            f"number of query heads (allowed: {', '.join(map(str, divisors))})"
        )


def check_refiner_heads(m: ModelConfig, width: int | None) -> None:
    """model.refiner_heads against the refiners' width, the DiT's ``width`` (None: not known yet): whole
    heads. Refused in one line at load, before a run folder is made and locked, as the build refuses it for
    an LLM whose width only the build knows."""
    if m.refiner_depth and width is not None and width % m.refiner_heads:
        given = f"model.dit_hidden_size={width}" if m.dit_hidden_size else f"the LLM's hidden size {width}"
        raise ConfigError(
            f"model.refiner_heads={m.refiner_heads} does not divide the refiner width ({given}) into whole "
            f"heads (allowed: a divisor of {width})"
        )


def check_positions(m: ModelConfig, width: int | None, head_dim: int | None) -> None:
    """What model.pos_embed needs of the DiT's ``width`` and ``head_dim`` (its heads' width; None: not known
    yet), refused in one line: the multiples its traits name (PositionTraits). Every RoPE rotates pairs of
    channels (an even head width), 2D RoPE gives half the pairs to the row and half to the column (a
    multiple of 4, design-space.md s.1), and APE's 2D sin-cos table gives a quarter of the width to each of
    the row's and the column's sines and cosines (a multiple of 4)."""

    def fits(traits) -> tuple[bool, bool]:
        """(width fits, head width fits) a scheme of these traits, where known."""
        return (
            width is None or width % traits.width_multiple == 0,
            head_dim is None or head_dim % traits.head_dim_multiple == 0,
        )

    traits = variant_traits("model.pos_embed", m.pos_embed)
    wide, heads = fits(traits)
    if wide and heads:
        return
    listed = variant_names("model.pos_embed", lambda t: t.places and all(fits(t)))
    unplaced = next(iter(variants_where("model.pos_embed", lambda t: not t.places)), None)
    instead = f"model.pos_embed {listed}" if listed else f"model.pos_embed={unplaced!r} with conv_pos=true"
    why = f" ({traits.fit_reason})" if traits.fit_reason else ""
    if not wide:
        step = traits.width_multiple
        given = f"model.dit_hidden_size={width}" if m.dit_hidden_size else f"the LLM's hidden size {width}"
        raise ConfigError(
            f"model.pos_embed={m.pos_embed!r} needs a DiT width divisible by {step}{why}, but it is "
            f"{given} (allowed: a width divisible by {step}, or {instead})"
        )
    step = traits.head_dim_multiple
    if m.head_dim:
        given = f"model.head_dim={head_dim}"
    elif m.num_heads:
        given = f"the width {width} over model.num_heads={m.num_heads}"
    else:
        given = "the LLM's head_dim"
    raise ConfigError(
        f"model.pos_embed={m.pos_embed!r} needs a head width divisible by {step}{why}, but the DiT's heads are "
        f"{head_dim} wide ({given}) (allowed: a head width divisible by {step}, or {instead})"
    )


def check_llm_shape(cfg: Config) -> None:
    """The DiT's shape against its LLM's, at load where the LLM's config is known (known_llm_config), as the
    build checks it where it is not (then only the sizes the DiT sets itself are checked here): deep
    fusion's layer pairing (fused_layers), the heads (dit_head_dim), what the position scheme needs of
    them (check_positions), the refiners' heads (check_refiner_heads), the key/value heads
    (check_kv_heads) and the hidden state each LLM's section reads (resolve_hidden_layer). Otherwise a config `fusedit
    config` calls valid fails at the build, or at training's first step, after the run folder is written."""
    m, config = cfg.model, known_llm_config(cfg.text)
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    if config is None or not all(isinstance(getattr(config, k, None), int) for k in shape):
        llm_width = llm_head = None  # the sizes the DiT sets itself are still checked
    else:
        llm_width, llm_head = config.hidden_size, llm_head_dim(config)
        if is_deep(m.design):
            fused_layers(m, config.num_hidden_layers)
    check_positions(m, m.dit_hidden_size or llm_width, dit_head_dim(m, llm_width, llm_head))
    check_refiner_heads(m, m.dit_hidden_size or llm_width)
    check_kv_heads(m, None if config is None else getattr(config, "num_attention_heads", None))
    if not is_deep(m.design):  # the shallow designs read one hidden state of each LLM
        for key, text in text_sections(cfg):
            depth = getattr(config if key == "text" else known_llm_config(text), "num_hidden_layers", None)
            if isinstance(depth, int):
                resolve_hidden_layer(text.hidden_layer, depth, f"{key}.hidden_layer")


def _forget_idle_lora(train: TrainConfig, own: dict, trained: set[str]) -> None:
    """A stage's LoRA sections at rank 0 (no adapters) without the alpha and targets it inherits from an
    earlier stage that trained with them (its section in ``trained``: rank >= 1): they mean nothing there, so
    a stage that turns adapters off with ``{rank: 0}`` is not warned about the earlier stage's alpha
    (loop._announce_stage). Those the stage sets itself stay, and are warned about; so do those no stage
    has used yet (a top-level ``train.llm_lora: {alpha: 8}`` that no stage gives a rank does nothing in the
    whole run). The merged sections resolved_stages carries on keep them: a later stage that sets a rank
    alone again gets the earlier alpha and targets, as before (``null`` forgets them there too: lora_field)."""
    for key in ("llm_lora", "dit_lora"):
        lora, given = getattr(train, key), own.get(key)
        given = given if isinstance(given, dict) else {}
        if lora.rank:
            trained.add(key)
        elif key in trained:
            setattr(
                train,
                key,
                dataclasses.replace(
                    lora,
                    alpha=lora.alpha if "alpha" in given else None,
                    targets=lora.targets if "targets" in given else [],
                ),
            )


def resolved_stages(cfg: Config) -> list[Stage]:
    """The run's stages, each with its global steps [start, end) and full config (module docstring).

    A stage's data/train/flow/sample overrides apply on top of the previous stage's resolved sections, so
    a stage states only what changes. Each is validated like a whole config; errors name the stage."""
    if not cfg.stages:
        return [Stage(0, cfg.name, 0, cfg.train.steps, cfg, staged=False)]
    sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in STAGE_SECTIONS}
    stages, start, trained = [], 0, set()
    for i, st in enumerate(cfg.stages):
        where = f"stages.{i}"
        fixed = [k for k in st.train if k in RUN_WIDE_TRAIN_KEYS]
        if fixed:
            # Refused even at the run's own value: a stage setting it reads as if stages could differ in it.
            hint = f"{where}.steps, the stage's length" if fixed[0] == "steps" else f"set train.{fixed[0]}"
            raise ConfigError(
                f"{where}.train.{fixed[0]} is set, but train.{fixed[0]} is the run's, not a stage's (allowed: "
                f"{hint})"
            )
        if st.data.get("source", sections["data"]["source"]) != sections["data"]["source"]:
            # A stage that reads another source does not inherit where the earlier one read from.
            for key in SOURCE_KEYS:
                sections["data"][key] = copy.deepcopy(_DATA_DEFAULTS[key])
        built = {}
        for name in STAGE_SECTIONS:
            sections[name] = deep_merge(sections[name], getattr(st, name))
            built[name] = build_section(STAGE_SECTION_CLASSES[name], sections[name], f"{where}.{name}")
        built["train"].steps = st.steps
        _forget_idle_lora(built["train"], st.train, trained)
        stage_cfg = dataclasses.replace(cfg, stages=[], **built)
        try:
            validate(stage_cfg)
        except ConfigError as e:
            raise ConfigError(f"{where} ({st.name or 'unnamed'}): {e}") from None
        stages.append(Stage(i, st.name or f"stage{i}", start, start + st.steps, stage_cfg))
        start += st.steps
    return stages
