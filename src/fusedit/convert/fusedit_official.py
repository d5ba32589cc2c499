"""Import checkpoints of the public FuseDiT code (github tang-bd/fuse-dit) into fusedit, with its outputs.

``load_official(path)`` returns ``(Config, TextToImage)`` for

* a transformer folder the public code saved: ``config.json`` (``model_type`` FuseDiT, or DiT for the
  shallow baselines; the LLM's config nested as ``base_config``) and ``model.safetensors`` (also sharded,
  or ``pytorch_model.bin``) holding ``llm.*`` and ``dit.*`` keys (FuseDiT) or the DiT's own keys (DiT);
* a saved pipeline folder: ``transformer/`` as above, ``tokenizer/``, ``vae/`` (loaded as fusedit's
  diffusers VAE), ``scheduler/`` (its ``shift`` becomes ``sample.shift``) and, for the DiT baselines,
  ``llm/`` (the separate frozen LLM);
* raw training checkpoints: zstd-compressed ``model.pt.zst`` / ``ema.pt.zst`` state dicts (needs the
  ``zstandard`` package) and DeepSpeed's ``mp_rank_00_model_states.pt`` (``{"module": state dict}``), with
  the architecture from a ``config.json`` next to the file (or in its parent folder) or from ``config=``.

The public config maps onto fusedit's: ``base_config`` -> ``text.family`` (gemma, gemma2) and
``text.arch`` (the LLM is built from it and its weights come from the checkpoint's ``llm.*`` keys; a DiT
baseline's LLM is ``text.model_id``: the pipeline's ``llm/``, ``llm=``, or the hub id ``base_config`` names);
``attention`` self/cross -> design fusedit/fusedit-cross (DiT: dit-self/dit-cross); ``dit_num_hidden_layers``
-> ``model.num_layers``; ``initial_layers``, ``pos_embed``, ``qk_norm``, ``sandwich_norm``, ``patch_size``
carry over; ``timestep_conditioning`` null -> "none"; ``in_channels`` -> ``vae.latent_channels``;
``sample_size`` x the VAE's downsampling -> ``data.image_size``; ``text_hidden_states_index`` -> the shallow
designs' hidden layer. Unknown or unsupported fields fail with one line naming the field and value.

Numerics: an import is built to reproduce the public code's *uncached* forward. Checked against that code's
own outputs is one configuration, the fixture it made (``tests/fixtures/fusedit-official-tiny``: APE,
adaLN-Zero, Gemma, QK norm, right-padded prompts), plus the RoPE tables, assembled as it assembles them;
every other option only round-trips through ``export_official``. Where that code departs from a textbook
choice:

* Its RMSNorms are Gemma's, ``x * (1 + w)``; fusedit's compute ``x * w``, so every DiT norm weight is
  stored as ``1 + w`` (the LLM keeps its own Gemma norms and its weights unchanged).
* adaLN (adaln-zero, adaln-single, the final layer) modulates an affine RMSNorm, not DiT's parameter-free
  LayerNorm: ``model.adaln_norm=rmsnorm``.
* APE is diffusers' ``PatchEmbed`` table: positions scaled by ``base_size / G`` over a G x G grid
  (``base_size`` = sample_size // patch_size, G = ``pos_embed_max_size``), centre-cropped to the latent
  grid: ``model.ape_base_size``, ``model.ape_max_size``. Its patch projection is a Conv2d, stored here as
  the Linear over flattened (p, p, C) patches that ``fusedit.layers.embed.patchify`` makes.
* Timesteps: ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`` of sigma * 1000, which is
  fusedit's ``TimestepEmbedder`` of t = sigma.
* The text rows: the public code runs each LLM layer inside its fused attention; fusedit runs transformers'
  own Gemma, equal to float tolerance. For Gemma-2 that fused attention applies no logit soft-capping, no
  sliding window and the 1/sqrt(head_dim) scale, so the imported ``text.arch`` sets
  ``attn_logit_softcapping: null``, ``query_pre_attn_scalar: head_dim`` and full attention in every layer.
  (Its text-only ``initial_layers`` ran transformers' own Gemma-2 layer instead; with Gemma-2 and
  initial_layers > 0 fusedit keeps the fused-attention numerics there too.)
* Prompt padding: the public code tokenized with Gemma's tokenizers, which pad on the *left* (to P = 256
  tokens by default): its real text tokens sat at positions P - L .. P - 1, yet its image RoPE positions
  start at the unpadded length L, and with APE its image queries are not rotated at all, so an
  image-to-text score was q . R(P - L + j) k: it depended on each prompt's padding. fusedit pads on the
  right; for deep fusion (every pos_embed, APE included), ``model.rope_left_pad=P`` reproduces the public
  rotations (P: ``max_length=``; whether it applies: ``padding_side=``, else the pipeline tokenizer's
  side, else left). The cross variant and the shallow baselines do not depend on padding.
* The shallow DiT baselines rotate image tokens only, from position 0, and leave their projected text keys
  unrotated: ``model.rope_layout=image-only``. Their self-attention variant shares one k_norm between image
  and text keys (fusedit gets two copies of it).
* Caching: the public cached path crashes with 1D RoPE and drops the image positions' text-length offset
  with 2D/M-RoPE; fusedit's cached and uncached sampling agree, equal to the public *uncached* path.
* Sampling schedule: the public pipeline's FlowMatchEulerDiscreteScheduler spaces its sigmas between 1 and
  its smallest (shifted) training sigma, shifts them again, then ends at 0; fusedit's default spacing is
  uniform in t. Converted configs set ``sample.schedule: diffusers``, which is the public spacing exactly.
  The public DiT pipeline indexes the transformer's output with ``[0]`` (the first sample of the batch);
  that bug is not reproduced.

Not supported (one-line errors): ``text_modulation_embeds_dim`` (the CLIP-pooled modulation of the
``clip-llm`` encoder), LLMs other than Gemma/Gemma-2, ``attention_bias``, scaled RoPE, a DiT depth that
does not match the fused LLM layers (the public code cannot run those either).

``export_official(cfg, model, path, layout=...)`` writes a fusedit model in the public layouts (the inverse
mapping), which the round-trip tests re-import with ``load_official``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fusedit.config import (
    DESIGN_TRAITS,
    Config,
    ConfigError,
    VAEConfig,
    absolute_paths,
    attention_kind,
    config_from_dict,
    is_deep,
    is_shallow,
    rope_layout_idle,
)
from fusedit.files import readable
from fusedit.layers.embed import scaled_sincos_2d
from fusedit.pipeline import DIFFUSERS_SCHEDULE_VARIANTS
from fusedit.system import TextToImage, build_model
from fusedit.text.spec import LLMSpec

# ---------------------------------------------------------------------------------------------------------
# The public config

# DiTConfig's own fields (diffusion/configs.py); anything else must be a generic transformers field.
DIT_FIELDS = (
    "attention",
    "base_config",
    "dit_hidden_size",
    "dit_num_hidden_layers",
    "text_hidden_states_index",
    "in_channels",
    "initial_layers",
    "out_channels",
    "patch_size",
    "pos_embed",
    "pos_embed_max_size",
    "qk_norm",
    "sample_size",
    "sandwich_norm",
    "shared_attention_layers",
    "text_hidden_size",
    "text_modulation_embeds_dim",
    "timestep_conditioning",
)
# Fields every transformers PretrainedConfig writes (4.x wrote many more than 5.x): they say nothing about
# the architecture, so they are ignored rather than rejected.
GENERIC_FIELDS = frozenset(
    [
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_bfloat16",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "tf_legacy_loss",
        "pruned_heads",
        "tie_word_embeddings",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "finetuning_task",
        "id2label",
        "label2id",
        "tokenizer_class",
        "prefix",
        "bos_token_id",
        "pad_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "problem_type",
        "use_cache",
    ]
)
# The public config's attention values, and fusedit's design for each (attention, FuseDiT or not): the
# built-in one, listed first (a design a plugin registers with the same traits is not the public code's).
ATTENTION = ("self", "cross")
DESIGN_OF = dict(reversed([((t.attention, t.deep), design) for design, t in DESIGN_TRAITS.items()]))
POS_EMBEDS = ("ape", "1d-rope", "2d-rope", "m-rope")
TIMESTEP_CONDITIONINGS = {
    None: "none",
    "adaln-zero": "adaln-zero",
    "adaln-single": "adaln-single",
    "addition": "addition",
}
FAMILIES = ("gemma", "gemma2")
# The LLM's architecture fields carried into text.arch.
ARCH_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
GEMMA2_FIELDS = (
    "query_pre_attn_scalar",
    "sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
)
# The public sampling pipeline pads prompts to max_sequence_length (256) plus the instruction's tokens.
PUBLIC_MAX_LENGTH = 256


def _fail(field: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"public FuseDiT config: {field}={value!r} is not supported ({allowed})")


def _arch(base: dict, fused: bool) -> tuple[str, dict]:
    """``base_config`` -> (text.family, text.arch)."""
    family = base.get("model_type")
    if family not in FAMILIES:
        raise _fail("base_config.model_type", family, "allowed: gemma, gemma2")
    for field, ok in (("attention_bias", False), ("rope_scaling", None)):
        if base.get(field, ok) != ok:
            raise _fail(f"base_config.{field}", base[field], f"allowed: {ok}")
    # transformers 5 writes RoPE scaling into rope_parameters (its rope_scaling is then null).
    rope = base.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise _fail("base_config.rope_parameters", rope, "allowed: rope_type 'default'")
    arch = {k: base[k] for k in ARCH_FIELDS if base.get(k) is not None}
    heads = base["num_attention_heads"]
    arch["head_dim"] = base.get("head_dim") or base["hidden_size"] // heads
    arch["rope_theta"] = float(base.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    # The public Gemma MLP (transformers 4.4x) used hidden_activation, falling back to the tanh GELU.
    act = base.get("hidden_activation") or "gelu_pytorch_tanh"
    arch["hidden_act"] = arch["hidden_activation"] = act
    if family == "gemma2":
        arch.update({k: base[k] for k in GEMMA2_FIELDS if k in base})
        if fused:
            # The fused attention computes the text rows with plain SDPA: 1/sqrt(head_dim), no soft-capping,
            # no sliding window (see the module docstring).
            arch["query_pre_attn_scalar"] = arch["head_dim"]
            arch["attn_logit_softcapping"] = None
            arch["layer_types"] = ["full_attention"] * arch["num_hidden_layers"]
    return family, arch


def official_config(
    public: dict,
    *,
    tokenizer: str = "",
    vae: tuple[str, str] | None = None,
    llm: str = "",
    max_length: int = PUBLIC_MAX_LENGTH,
    padding_side: str = "left",
    shift: float | None = None,
    name: str = "fusedit-official",
) -> Config:
    """A public ``config.json`` (dict) -> fusedit's Config; one-line ConfigError on what has no counterpart.

    ``vae`` is (hub id or folder, subfolder) of a diffusers AutoencoderKL, or None when there is none: then
    ``vae.model_id`` stays empty (set it before building or saving the config). ``llm`` is the DiT
    baselines' separate LLM (FuseDiT's LLM weights are in its checkpoint).
    """
    kind = public.get("model_type")
    if kind not in ("FuseDiT", "DiT"):
        raise _fail("model_type", kind, "allowed: FuseDiT, DiT")
    fused = kind == "FuseDiT"
    unknown = [k for k in public if k not in DIT_FIELDS and k not in GENERIC_FIELDS]
    if unknown:
        raise _fail(unknown[0], public[unknown[0]], "not a field of the public DiTConfig")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side={padding_side!r} is not allowed (allowed: left, right)")

    def get(field: str, default=None):
        return public.get(field, default)

    if get("text_modulation_embeds_dim") is not None:
        raise _fail(
            "text_modulation_embeds_dim", get("text_modulation_embeds_dim"), "the CLIP-pooled modulation"
        )
    # Absent fields take the public DiTConfig's defaults.
    attention, pos = get("attention", "self"), get("pos_embed", "1d-rope")
    tc = get("timestep_conditioning", "adaln-zero")
    if attention not in ATTENTION:
        raise _fail("attention", attention, "allowed: self, cross")
    if pos not in POS_EMBEDS:
        raise _fail("pos_embed", pos, f"allowed: {', '.join(POS_EMBEDS)}")
    if tc not in TIMESTEP_CONDITIONINGS:
        raise _fail("timestep_conditioning", tc, "allowed: null, adaln-zero, adaln-single, addition")
    base = get("base_config")
    if not isinstance(base, dict):
        raise _fail("base_config", base, "the LLM's config as a mapping")
    family, arch = _arch(base, fused)
    channels, patch = get("in_channels", 16), get("patch_size", 2)
    if get("out_channels", channels) != channels:
        raise _fail("out_channels", get("out_channels"), f"must equal in_channels={channels}")
    dit_hidden = get("dit_hidden_size") or arch["hidden_size"]
    layers, initial = get("dit_num_hidden_layers", 18), get("initial_layers", 0) if fused else 0
    text_hidden = get("text_hidden_size") or arch["hidden_size"]
    if text_hidden != arch["hidden_size"]:
        raise _fail(
            "text_hidden_size", text_hidden, f"must equal the LLM's hidden_size={arch['hidden_size']}"
        )
    if fused:
        if initial + layers != arch["num_hidden_layers"]:
            raise _fail(
                "dit_num_hidden_layers",
                layers,
                f"with initial_layers={initial} the public code pairs every one of the LLM's "
                f"{arch['num_hidden_layers']} layers after the initial ones with a DiT layer",
            )
        shared = get("shared_attention_layers", "all")
        if shared != "all" and not set(range(initial, initial + layers)) <= set(shared):
            raise _fail(
                "shared_attention_layers", shared, f"'all' or every layer {initial}..{initial + layers - 1}"
            )
    elif attention == "cross" and text_hidden != dit_hidden:
        raise _fail("text_hidden_size", text_hidden, f"the cross baseline needs dit_hidden_size={dit_hidden}")

    sample_size = get("sample_size", 32)
    model = {
        "design": DESIGN_OF[attention, fused],
        "dit_hidden_size": dit_hidden,
        "num_layers": layers,
        "initial_layers": initial,
        "pos_embed": pos,
        "timestep_conditioning": TIMESTEP_CONDITIONINGS[tc],
        "qk_norm": bool(get("qk_norm", False)),
        "sandwich_norm": bool(get("sandwich_norm", False)),
        "patch_size": patch,
        "adaln_norm": "rmsnorm",
        # diffusers' PatchEmbed: base_size = sample_size // patch_size, table over pos_embed_max_size.
        "ape_base_size": sample_size // patch if pos == "ape" else None,
        "ape_max_size": get("pos_embed_max_size", 64) if pos == "ape" else None,
        "rope_layout": "joint" if fused else "image-only",
        # Only deep fusion's joint attention sees the LLM's text rotations beside the image tokens (every
        # pos_embed: with APE the image side is unrotated, the text keys are not).
        "rope_left_pad": max_length if fused and attention == "self" and padding_side == "left" else None,
    }
    text = {"family": family, "arch": arch, "max_length": max_length, "tokenizer": tokenizer}
    if not fused:
        text["hidden_layer"] = get("text_hidden_states_index", -1)
        text["model_id"] = llm
        if not llm:
            raise ConfigError(
                "a public DiT baseline checkpoint carries no LLM: pass llm= (a hub id or folder; its "
                f"base_config names {base.get('_name_or_path') or 'none'!r})"
            )
    # Without a VAE: the public code's (SD3's) 8x downsampling sizes the images; the config is validated
    # in pixel space (identity, the latent size as the image size), then left naming no VAE.
    vae_section = _vae_config(vae, channels) if vae is not None else None
    downsample = vae_section["downsample"] if vae_section else 8
    data = {
        "name": name,
        "model": model,
        "text": text,
        "vae": vae_section or {"kind": "identity"},
        "data": {"image_size": sample_size * (downsample if vae_section else 1)},
    }
    # The public pipeline samples on its scheduler's own spacing (module docstring: sampling schedule).
    data["sample"] = {"schedule": "diffusers"}
    if shift is not None:
        data["sample"]["shift"] = float(shift)
    cfg = config_from_dict(data)
    if vae_section is None:
        cfg = dataclasses.replace(
            cfg,
            vae=VAEConfig(kind="diffusers", latent_channels=channels, downsample=downsample),
            data=dataclasses.replace(cfg.data, image_size=sample_size * downsample),
        )
    # The folders it names (a download's tokenizer and VAE, --tokenizer, --vae, --llm) absolute, as load_config
    # makes them: a converted run then samples from any working directory.
    absolute_paths(cfg)
    return cfg


def _vae_config(vae: tuple[str, str], channels: int) -> dict:
    from diffusers import AutoencoderKL

    model_id, subfolder = vae
    try:
        conf = AutoencoderKL.load_config(model_id, subfolder=subfolder or None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"VAE {model_id!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    missing = next((k for k in ("latent_channels", "block_out_channels") if k not in conf), None)
    if missing:
        raise ConfigError(
            f"VAE {model_id!r} is not a diffusers AutoencoderKL: its config.json has no {missing} (allowed: an "
            "AutoencoderKL folder or hub id, with --vae-subfolder where it lies in a subfolder)"
        )
    if conf["latent_channels"] != channels:
        raise ConfigError(
            f"VAE {model_id!r} has {conf['latent_channels']} latent channels but the checkpoint's in_channels "
            f"is {channels}"
        )
    downsample = 2 ** (len(conf["block_out_channels"]) - 1)
    return {
        "kind": "diffusers",
        "model_id": model_id,
        "subfolder": subfolder,
        "latent_channels": channels,
        "downsample": downsample,
    }


# ---------------------------------------------------------------------------------------------------------
# Parameter names: one rule table serves both directions

COPY, NORM, PATCH, TABLE = "copy", "norm", "patch", "table"


def _rules(cfg: Config) -> list[tuple[re.Pattern, str, str]]:
    """(fusedit parameter name pattern, public name template, transform) for this config's layout."""
    m = cfg.model
    zero = m.timestep_conditioning == "adaln-zero"
    # Read by the text_kv rules below: the shallow designs' own text projections.
    text_attn = "self_attn" if attention_kind(m.design) == "self" else "cross_attn"
    block = r"blocks\.(\d+)\."
    rules = [
        (r"patch_embed\.proj\.weight", "patch_embed.proj.weight", PATCH),
        (r"patch_embed\.proj\.bias", "patch_embed.proj.bias", COPY),
        (r"time\.embedder\.mlp\.([02])\.(weight|bias)", r"timestep_embedder.\1.\2", COPY),
        (r"time\.t_block\.1\.(weight|bias)", r"t_block.1.\1", COPY),
        (block + r"modulation\.linear\.(weight|bias)", r"layers.\1.input_layernorm.linear.\2", COPY),
        (block + r"modulation\.table", r"layers.\1.scale_shift_table", TABLE),
        (
            block + r"attn_norm\.weight",
            r"layers.\1.input_layernorm.norm.weight" if zero else r"layers.\1.input_layernorm.weight",
            NORM,
        ),
        (block + r"img_attn\.([qkvo])_proj\.weight", r"layers.\1.self_attn.\2_proj.weight", COPY),
        (block + r"img_attn\.([qk])_norm\.weight", r"layers.\1.self_attn.\2_norm.weight", NORM),
        (block + r"attn_post_norm\.weight", r"layers.\1.post_attention_layernorm.weight", NORM),
        (
            block + r"mlp_norm\.weight",
            r"layers.\1.pre_feedforward_layernorm.weight"
            if m.sandwich_norm
            else r"layers.\1.post_attention_layernorm.weight",
            NORM,
        ),
        (block + r"mlp_post_norm\.weight", r"layers.\1.post_feedforward_layernorm.weight", NORM),
        (block + r"img_mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.weight", COPY),
        (block + r"txt_attn\.([qo])_proj\.weight", r"layers.\1.cross_attn.\2_proj.weight", COPY),
        (block + r"txt_attn\.q_norm\.weight", r"layers.\1.cross_attn.q_norm.weight", NORM),
        (block + r"txt_attn_post_norm\.weight", r"layers.\1.post_cross_attention_layernorm.weight", NORM),
        (r"final_norm\.linear\.(weight|bias)", r"norm_out.linear.\1", COPY),
        (r"final_norm\.norm\.weight", "norm_out.norm.weight" if zero else "norm_out.weight", NORM),
        (r"final_norm\.table", "scale_shift_table", TABLE),
        (r"proj_out\.(weight|bias)", r"proj_out.\1", COPY),
        (r"context\.norm\.weight", "context_embedder.0.weight", NORM),
        (r"context\.proj\.(weight|bias)", r"context_embedder.1.\1", COPY),
        # The public self-attention baseline projects text keys/values inside its self-attention and
        # normalises them with the image keys' k_norm; the cross one has its own.
        (r"text_kv\.(\d+)\.([kv])_proj\.weight", rf"layers.\1.{text_attn}.text_\2_proj.weight", COPY),
        (r"text_kv\.(\d+)\.k_norm\.weight", rf"layers.\1.{text_attn}.k_norm.weight", NORM),
    ]
    return [(re.compile(p), public, kind) for p, public, kind in rules]


def _public_name(rules, name: str) -> tuple[str, str]:
    for pattern, public, kind in rules:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(public), kind
    raise ConfigError(f"fusedit parameter {name!r} has no counterpart in the public FuseDiT code")


def _to_fusedit(kind: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if kind == NORM:  # Gemma's x * (1 + w), in float32 as the public code computes it
        return t.float() + 1.0
    if kind == PATCH:  # Conv2d (D, C, p, p) -> Linear over (p, p, C)-flattened patches
        return t.permute(0, 2, 3, 1).reshape(shape)
    return t.reshape(shape)


def _to_public(kind: str, t: torch.Tensor, patch: int) -> torch.Tensor:
    if kind == NORM:
        return t.float() - 1.0
    if kind == PATCH:
        return t.reshape(t.shape[0], patch, patch, -1).permute(0, 3, 1, 2).contiguous()
    if kind == TABLE:
        return t.flatten()
    return t


def _ape_table(cfg: Config, dim: int) -> torch.Tensor:
    """The public code's stored ``patch_embed.pos_embed`` buffer: the whole max x max table."""
    side = cfg.model.ape_max_size
    return scaled_sincos_2d(dim, side, side, cfg.model.ape_base_size, side)[None]


# ---------------------------------------------------------------------------------------------------------
# Building: fusedit's model with the options the public numerics need


class MissingAutoencoder(nn.Module):
    """Stands where the VAE goes when a checkpoint came without one: latents work, images do not."""

    def __init__(self, channels: int, downsample: int):
        super().__init__()
        self.channels, self.downsample = channels, downsample

    def _missing(self, *_):
        raise ConfigError(
            "this FuseDiT checkpoint came without a VAE: load it with load_official(..., vae=<diffusers "
            "AutoencoderKL folder or hub id>), or set vae.model_id"
        )

    encode = decode = _missing


class MissingTokenizer:
    """Stands where the tokenizer goes when a checkpoint came without one (ids still work)."""

    def __init__(self, hint: str):
        self.hint = hint

    def __call__(self, *_, **__):
        raise ConfigError(
            f"this FuseDiT checkpoint came without a tokenizer: load it with load_official(..., "
            f"tokenizer=...){self.hint}"
        )


def build(cfg: Config, device: torch.device | str = "cpu") -> TextToImage:
    """``build_model(cfg)`` (whose DiT builds the public-numerics options of ``cfg.model`` itself), with a
    placeholder autoencoder when the config names no VAE (a checkpoint that came without one)."""
    no_vae = cfg.vae.kind == "diffusers" and not cfg.vae.model_id
    if no_vae:  # build on the identity latent space, then stand the placeholder in its place
        cfg = dataclasses.replace(
            cfg, vae=VAEConfig(kind="identity", latent_channels=cfg.vae.latent_channels)
        )
    model = build_model(cfg, device)
    if no_vae:
        model.autoencoder = MissingAutoencoder(cfg.vae.latent_channels, cfg.vae.downsample)
    return model


# ---------------------------------------------------------------------------------------------------------
# Reading checkpoints

# Wrappers that prefix every key of a state dict (DDP / DeepSpeed, torch.compile, FSDP).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_orig_module.", "_fsdp_wrapped_module.")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin",
    "ema.pt.zst",
    "model.pt.zst",
    "mp_rank_00_model_states.pt",
)


def _torch_load(data, where: Path, weights_only: bool):
    try:
        return torch.load(data, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # unpickling fails with many exception types: say which file, and why
        hint = (
            " (only for a file you trust: pass --trust-pickle to `fusedit convert`, weights_only=False "
            "from Python)"
            if weights_only
            else ""
        )
        raise ConfigError(f"cannot read {str(where)!r}: {str(e).splitlines()[0]}{hint}") from None


def read_state_dict(file: str | Path, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint file of the public code -> its state dict (wrapper prefixes removed)."""
    file = Path(file)
    name = file.name
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ConfigError(f"reading {name} needs the zstandard package: pip install zstandard") from None
        with open(file, "rb") as fh:
            raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
        sd = _torch_load(io.BytesIO(raw), file, weights_only)
    elif name.endswith(".safetensors"):
        sd = _load_safetensors(file)
    elif name.endswith(".index.json"):
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ConfigError(
                f'{str(file)!r} has no weight_map (allowed: a safetensors index: {{"weight_map": {{name: '
                "shard file}})"
            )
        sd = {
            k: v
            for shard in sorted(set(weight_map.values()))
            for k, v in _load_safetensors(file.parent / shard).items()
        }
    elif name.endswith(".json"):
        # A config.json given as the checkpoint: torch.load would fail on it with a pickle-safety message
        # that suggests trusting the file instead.
        raise ConfigError(
            f"{str(file)!r} is a JSON file, not checkpoint weights (allowed: the folder holding config.json "
            "and the weights, *.safetensors, *.safetensors.index.json, *.pt.zst, *.pt, *.bin)"
        )
    else:
        sd = _torch_load(file, file, weights_only)
    if isinstance(sd, dict) and isinstance(sd.get("module"), dict):  # DeepSpeed model states
        sd = sd["module"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"{str(file)!r} does not hold a state dict (a mapping of names to tensors)")
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


@dataclass
class _Source:
    """Where each part of a public checkpoint lives."""

    config: dict
    weights: Path
    tokenizer: str = ""
    vae: tuple[str, str] | None = None
    llm: str = ""
    shift: float | None = None


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged one (cut short, not safetensors at all) named in one line."""
    with readable(
        file, "a readable safetensors file", (SafetensorError,), "a damaged copy? download it again"
    ):
        return load_file(file)


def _read_json(path: Path) -> dict:
    """A JSON object (a config, an index, a scheduler config): a file that is not one is a ConfigError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise ConfigError(f"cannot read {str(path)!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, not an object (allowed: a JSON object of keys "
            "and values)"
        )
    return data


def _weights_in(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"no checkpoint weights in {str(folder)!r} (looked for {', '.join(WEIGHT_FILES)})")


def _config_for(weights: Path, config) -> dict:
    if isinstance(config, dict):
        return config
    if config is not None:
        path = Path(config)
        return _read_json(path / "config.json" if path.is_dir() else path)
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "config.json").is_file():
            return _read_json(folder / "config.json")
    raise ConfigError(
        f"no config.json next to {str(weights)!r}: pass --config (config= from Python: a config.json, its "
        "folder or a dict)"
    )


def _scheduler_shift(path: Path) -> float | None:
    """The saved scheduler's shift; its other options must leave the spacing sample.schedule=diffusers
    computes (the public pipeline saves a plain FlowMatchEulerDiscreteScheduler)."""
    if not path.is_file():
        return None
    scheduler = _read_json(path)
    variants = [key for key in DIFFUSERS_SCHEDULE_VARIANTS if scheduler.get(key)]
    if variants:
        raise ConfigError(
            f"{path} sets {variants[0]}={scheduler[variants[0]]!r}, a spacing fusedit does not reproduce "
            "(allowed: a FlowMatchEulerDiscreteScheduler with only shift set)"
        )
    return scheduler.get("shift")


# The class that fusedit's own pipeline folders (`fusedit export`) record in transformer/config.json: that
# of fusedit.hub.FuseDiTTransformer2DModel, spelled out because importing fusedit.hub loads diffusers.
OWN_TRANSFORMER_CLASS = "FuseDiTTransformer2DModel"


def _refuse_own_export(public: dict, path: Path, pipeline: bool) -> None:
    """fusedit's own export has no public model_type, which official_config would report as the problem."""
    if public.get("_class_name") != OWN_TRANSFORMER_CLASS:
        return
    what, reader = ("already", "it") if pipeline else ("part of", "that pipeline folder")
    raise ConfigError(
        f"{str(path)!r} is {what} a fusedit pipeline folder (written by `fusedit export`): nothing to convert, "
        f"`fusedit sample` and `fusedit serve` read {reader} directly (allowed here: the public FuseDiT "
        "code's transformer or pipeline folder, or a raw training file)"
    )


def _locate(path: Path, config) -> _Source:
    if not path.exists():
        raise ConfigError(f"no such checkpoint: {str(path)!r}")
    if path.is_dir() and (path / "transformer").is_dir():  # a saved pipeline
        transformer = path / "transformer"
        scheduler = path / "scheduler" / "scheduler_config.json"
        public = _config_for(transformer / "config.json", config)
        _refuse_own_export(public, path, pipeline=True)
        return _Source(
            config=public,
            weights=_weights_in(transformer),
            tokenizer=str(path / "tokenizer") if (path / "tokenizer").is_dir() else "",
            vae=(str(path), "vae") if (path / "vae" / "config.json").is_file() else None,
            llm=str(path / "llm") if (path / "llm").is_dir() else "",
            shift=_scheduler_shift(scheduler),
        )
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "state.json").is_file()):
        # fusedit's own training output: _weights_in would list the public file names it lacks.
        what = "run" if (path / "checkpoints").is_dir() else "checkpoint"
        raise ConfigError(
            f"{str(path)!r} is already a fusedit {what} folder (written by `fusedit train`): nothing to convert, "
            "`fusedit sample` and `fusedit serve` read it directly (allowed here: the public FuseDiT code's "
            "transformer or pipeline folder, or a raw training file)"
        )
    if path.is_dir() and (path / "config.json").is_file():  # before the weights: any shard layout
        _refuse_own_export(_config_for(path / "config.json", config), path, pipeline=False)
    weights = _weights_in(path) if path.is_dir() else path
    public = _config_for(weights, config)
    _refuse_own_export(public, path, pipeline=False)  # its transformer/ folder or weights file
    return _Source(config=public, weights=weights)


def official_vae(path: str | Path, config: dict | str | Path | None = None) -> tuple[str, str] | None:
    """The VAE (folder, subfolder) that the public checkpoint at ``path`` brings, a pipeline folder's
    ``vae/``, or None; reads no weights, so a caller can ask for a missing VAE before load_official."""
    return _locate(Path(path), config).vae


def official_tokenizer(path: str | Path, config: dict | str | Path | None = None, llm: str = "") -> str:
    """The tokenizer the public checkpoint at ``path`` was trained with, as far as it says: a pipeline
    folder's ``tokenizer/``, else its LLM's (``llm``, a pipeline's ``llm/``, or the hub id its base_config
    names); "" when it names none. Reads no weights."""
    src = _locate(Path(path), config)
    return src.tokenizer or llm or src.llm or (src.config.get("base_config") or {}).get("_name_or_path", "")


def _padding_side(tokenizer: str) -> str:
    """The side the checkpoint's tokenizer pads; without one, Gemma's (left), which the public code used."""
    if not tokenizer:
        return "left"
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer).padding_side
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer {tokenizer!r} cannot be loaded: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------------
# Import


def _load_exact(module: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict) with a one-line error naming the first missing or unexpected key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        problem = "is missing from the checkpoint" if missing else "has no place in fusedit's model"
        raise ConfigError(
            f"{what} key {key!r} {problem} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ConfigError(
                f"{what} key {k!r} has shape {tuple(v.shape)}, fusedit expects {tuple(expected[k].shape)}"
            )
    module.load_state_dict(sd)


def load_weights(model: TextToImage, cfg: Config, sd: dict[str, torch.Tensor]) -> None:
    """Put a public state dict (FuseDiT: ``llm.*`` + ``dit.*``; DiT: its own keys) into ``model``."""
    fused = is_deep(cfg.model.design)
    if fused:
        stray = [k for k in sd if not k.startswith(("llm.", "dit."))]
        if stray:
            raise ConfigError(
                f"checkpoint key {stray[0]!r} is neither llm.* nor dit.* (a FuseDiT state dict)"
            )
        dit = {k[4:]: v for k, v in sd.items() if k.startswith("dit.")}
        llm = {k[4:]: v for k, v in sd.items() if k.startswith("llm.")}
        _load_exact(model.text.llm, llm, "LLM")
    else:
        dit = dict(sd)
    # Rotary tables are recomputed (and were never persistent in the public code).
    dit = {
        k: v for k, v in dit.items() if not k.endswith(("rotary_emb.inv_freq", "rotary_emb_half.inv_freq"))
    }
    denoiser = model.denoiser
    table = dit.pop("patch_embed.pos_embed", None)
    if table is not None:
        expected = _ape_table(cfg, denoiser.dim) if cfg.model.ape_max_size else None
        if (
            expected is None
            or table.shape != expected.shape
            or not torch.allclose(table.float(), expected, atol=1e-6)
        ):
            raise ConfigError(
                "the checkpoint's patch_embed.pos_embed is not diffusers' sin-cos table for "
                f"sample_size // patch_size = {cfg.model.ape_base_size} over {cfg.model.ape_max_size} positions"
            )
    rules = _rules(cfg)
    converted = {}
    for name, ours in denoiser.state_dict().items():
        public, kind = _public_name(rules, name)
        if public not in dit:
            raise ConfigError(f"checkpoint key {public!r} (for fusedit's {name!r}) is missing")
        converted[name] = _to_fusedit(kind, dit[public], ours.shape)
    used = {_public_name(rules, name)[0] for name in converted}
    unused = [k for k in dit if k not in used]
    if unused:
        raise ConfigError(f"checkpoint key {unused[0]!r} has no place in fusedit's {cfg.model.design} model")
    _load_exact(denoiser, converted, "denoiser")


def load_official(
    path: str | Path,
    *,
    config: dict | str | Path | None = None,
    tokenizer: str = "",
    vae: str = "",
    vae_subfolder: str = "",
    llm: str = "",
    max_length: int = PUBLIC_MAX_LENGTH,
    padding_side: str | None = None,
    weights_only: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[Config, TextToImage]:
    """A public FuseDiT checkpoint (transformer folder, pipeline folder or raw training file) -> fusedit.

    ``config``: the public config.json (path, folder or dict) when it is not next to the weights.
    ``tokenizer``, ``vae`` (+ ``vae_subfolder``), ``llm``: hub ids or folders overriding or completing what
    a pipeline folder provides (``llm``: the DiT baselines' separate LLM; defaults to the one its
    ``base_config`` names). ``max_length``: the padded prompt length the public code used (its
    ``max_sequence_length``, 256, plus the instruction's tokens); ``padding_side``: how its tokenizer padded
    (default: the tokenizer's own side; without a tokenizer, left, as Gemma's). Returns the model in eval
    mode; without a VAE or tokenizer it stands on placeholders that say what to pass.
    """
    path = Path(path)
    src = _locate(path, config)
    tokenizer = tokenizer or src.tokenizer
    vae_ref = (vae, vae_subfolder) if vae else src.vae
    base = src.config.get("base_config") or {}
    llm = llm or src.llm or base.get("_name_or_path", "")
    cfg = official_config(
        src.config,
        tokenizer=tokenizer,
        vae=vae_ref,
        llm=llm,
        max_length=max_length,
        padding_side=padding_side or _padding_side(tokenizer),
        shift=src.shift,
        name=(path if path.is_dir() else path.parent).name or "fusedit-official",
    )
    model = build(cfg, device)
    if not tokenizer and not cfg.text.model_id:
        named = base.get("_name_or_path")
        model.text.tokenizer = MissingTokenizer(f" (its base_config names {named!r})" if named else "")
    load_weights(model, cfg, read_state_dict(src.weights, weights_only))
    return cfg, model.eval()


# ---------------------------------------------------------------------------------------------------------
# Export (the inverse mapping; the round-trip tests use it)

LAYOUTS = ("transformer", "pipeline", "model.pt.zst", "ema.pt.zst", "deepspeed")


def _exportable(cfg: Config, model: TextToImage) -> None:
    m, llm = cfg.model, model.text.llm.config
    fused = is_deep(m.design)
    # The built LLM's own type: with a model_id, text.family only stands in for it (a preset's Gemma beside
    # the user's Qwen2 folder, or beside a Phi-3 one, which no family names: with_model_llm_fields).
    family = "text.model_id's model_type" if cfg.text.model_id else "text.family"
    checks: list[tuple[str, object, bool, str]] = [
        (family, llm.model_type, llm.model_type in FAMILIES, "gemma, gemma2"),
        (
            "model.adaln_norm",
            m.adaln_norm,
            m.adaln_norm == "rmsnorm" or m.timestep_conditioning not in ("adaln-zero", "adaln-single"),
            "rmsnorm",
        ),
        (
            "model.ape_base_size",
            m.ape_base_size,
            m.pos_embed != "ape" or m.ape_base_size is not None,
            "an integer",
        ),
        (
            "model.rope_layout",
            m.rope_layout,
            # Where the layout changes nothing (no rotation; dit-cross, whose text keys are never rotated),
            # either is the public code's.
            rope_layout_idle(m) is not None or m.rope_layout == ("joint" if fused else "image-only"),
            "joint for deep fusion, image-only for the shallow baselines (either for dit-cross)",
        ),
    ]
    # What the public code has no counterpart for (LI-DiT's parts, the CLIP-pooled modulation, a variant a
    # plugin registers: its code is not the public code's, whatever its traits, ...).
    designs = [d for d in DESIGN_TRAITS if d in DESIGN_OF.values()]  # in the order the config lists them
    conditionings = TIMESTEP_CONDITIONINGS.values()
    checks += [
        ("model.design", m.design, m.design in designs, ", ".join(designs)),
        (
            "model.timestep_conditioning",
            m.timestep_conditioning,
            m.timestep_conditioning in conditionings,
            ", ".join(conditionings),
        ),
        ("model.pos_embed", m.pos_embed, m.pos_embed in POS_EMBEDS, ", ".join(POS_EMBEDS)),
        ("model.conv_pos", m.conv_pos, not m.conv_pos, "false"),
        ("model.refiner_depth", m.refiner_depth, m.refiner_depth == 0, "0"),
        ("model.pooled_text", m.pooled_text, m.pooled_text == "none", "none"),
        ("extra_text", cfg.extra_text, not cfg.extra_text, "no further LLMs"),
    ]
    _refuse(checks)  # before the model is read: a registered design's denoiser may have no blocks
    spec, block = LLMSpec.from_hf(llm, deep=is_deep(m.design)), model.denoiser.blocks[0]
    mirrored = (
        block.img_attn.q_proj.out_features == spec.num_heads * spec.head_dim
        and block.img_attn.k_proj.out_features == spec.num_kv_heads * spec.head_dim
        and block.img_mlp.gate_proj.out_features == spec.intermediate_size
    )
    checks = [("the DiT's heads and MLP", "not the LLM's", mirrored, "the public DiT mirrors its LLM")]
    if fused and llm.model_type == "gemma2":
        head_dim = spec.head_dim
        layer_types = getattr(llm, "layer_types", None) or []
        checks += [
            (
                "text.arch.layer_types",
                layer_types,
                all(t == "full_attention" for t in layer_types),
                "full_attention only",
            ),
            (
                "text.arch.attn_logit_softcapping",
                llm.attn_logit_softcapping,
                llm.attn_logit_softcapping is None,
                "null",
            ),
            (
                "text.arch.query_pre_attn_scalar",
                llm.query_pre_attn_scalar,
                llm.query_pre_attn_scalar == head_dim,
                f"head_dim={head_dim}",
            ),
        ]
    _refuse(checks)


def _refuse(checks: list[tuple[str, object, bool, str]]) -> None:
    """The first of ``checks`` (setting, value, whether the public code has it, what it allows) that fails,
    as one line."""
    for field, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(
                f"{field}={value!r} has no counterpart in the public FuseDiT code (allowed: {allowed})"
            )


def public_config(cfg: Config, model: TextToImage) -> dict:
    """fusedit's Config -> the public config.json (the inverse of ``official_config``)."""
    _exportable(cfg, model)
    m, llm = cfg.model, model.text.llm.config
    fused = is_deep(m.design)
    spec = LLMSpec.from_hf(llm, deep=fused)
    base = {"model_type": llm.model_type}
    base.update({k: getattr(llm, k) for k in ARCH_FIELDS if getattr(llm, k, None) is not None})
    base.update(head_dim=spec.head_dim, rope_theta=spec.rope_theta, attention_bias=False)
    base.update(hidden_act=spec.activation, hidden_activation=spec.activation)
    if llm.model_type == "gemma2":
        base.update({k: getattr(llm, k) for k in GEMMA2_FIELDS})
    base["_name_or_path"] = cfg.text.model_id
    tc = {v: k for k, v in TIMESTEP_CONDITIONINGS.items()}[m.timestep_conditioning]
    patch = m.patch_size
    sample = m.ape_base_size * patch if m.pos_embed == "ape" else cfg.data.image_size // cfg.vae.downsample
    out = {
        "architectures": ["FuseDiT" if fused else "DiT"],
        "model_type": "FuseDiT" if fused else "DiT",
        "attention": attention_kind(m.design),
        "base_config": base,
        "dit_hidden_size": model.denoiser.dim,
        "dit_num_hidden_layers": len(model.denoiser.blocks),
        "in_channels": cfg.vae.latent_channels,
        "out_channels": cfg.vae.latent_channels,
        "initial_layers": m.initial_layers if fused else 0,
        "patch_size": patch,
        "pos_embed": m.pos_embed,
        "pos_embed_max_size": m.ape_max_size if m.pos_embed == "ape" else None,
        "qk_norm": m.qk_norm,
        "sample_size": sample,
        "sandwich_norm": m.sandwich_norm,
        "shared_attention_layers": "all",
        "text_hidden_size": spec.hidden_size,
        # Absolute (transformers' hidden_states index): the llm/ a pipeline export writes is fusedit's LLM,
        # which may stop after the layer read.
        "text_hidden_states_index": -1 if fused else model.denoiser.hidden_layers[0],
        "text_modulation_embeds_dim": None,
        "timestep_conditioning": tc,
        "torch_dtype": "float32",
    }
    return out


def public_state_dict(cfg: Config, model: TextToImage) -> dict[str, torch.Tensor]:
    """fusedit's weights -> the public state dict (FuseDiT: ``llm.*`` + ``dit.*``; DiT: its own keys)."""
    _exportable(cfg, model)
    rules, dit = _rules(cfg), {}
    for name, t in model.denoiser.state_dict().items():
        public, kind = _public_name(rules, name)
        value = _to_public(kind, t.detach().cpu(), cfg.model.patch_size)
        if public in dit and not torch.equal(dit[public], value):
            raise ConfigError(
                f"fusedit's {name!r} differs from the weight it shares {public!r} with in the public code"
            )
        dit[public] = value
    if cfg.model.pos_embed == "ape" and cfg.model.ape_max_size:
        dit["patch_embed.pos_embed"] = _ape_table(cfg, model.denoiser.dim)
    if is_deep(cfg.model.design):
        llm = {f"llm.{k}": v.detach().cpu() for k, v in model.text.llm.state_dict().items()}
        return {**llm, **{f"dit.{k}": v for k, v in dit.items()}}
    return dit


def _write(sd: dict[str, torch.Tensor], config: dict, folder: Path, weights: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    sd = {k: v.contiguous() for k, v in sd.items()}
    if weights == "model.safetensors":
        save_file(sd, folder / weights, metadata={"format": "pt"})
        return
    buffer = io.BytesIO()
    torch.save({"module": sd} if weights == "mp_rank_00_model_states.pt" else sd, buffer)
    if weights.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ConfigError(
                f"writing {weights} needs the zstandard package: pip install zstandard"
            ) from None
        (folder / weights).write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
    else:
        (folder / weights).write_bytes(buffer.getvalue())


def export_official(cfg: Config, model: TextToImage, path: str | Path, layout: str = "transformer") -> Path:
    """Write ``model`` as the public code would have saved it: ``layout`` is "transformer" (config.json +
    model.safetensors), "pipeline" (transformer/, tokenizer/, vae/, scheduler/, and llm/ for the DiT
    baselines), "model.pt.zst" / "ema.pt.zst" or "deepspeed" (mp_rank_00_model_states.pt), each with its
    config.json. Fails with one line when the model has no public counterpart."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not allowed (allowed: {', '.join(LAYOUTS)})")
    path = Path(path)
    config, sd = public_config(cfg, model), public_state_dict(cfg, model)
    if layout != "pipeline":
        weights = {"transformer": "model.safetensors", "deepspeed": "mp_rank_00_model_states.pt"}
        _write(sd, config, path, weights.get(layout, layout))
        return path
    _write(sd, config, path / "transformer", "model.safetensors")
    saves: list[tuple[str, Callable]] = []
    if hasattr(model.text.tokenizer, "save_pretrained"):
        saves.append(("tokenizer", model.text.tokenizer.save_pretrained))
    if hasattr(model.autoencoder, "vae"):
        saves.append(("vae", model.autoencoder.vae.save_pretrained))
    if is_shallow(cfg.model.design):
        saves.append(("llm", model.text.llm.save_pretrained))
    for folder, save in saves:
        save(str(path / folder))
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**scheduler, "shift": cfg.sample.shift})
    )
    index = {"_class_name": "FuseDiTPipeline" if config["model_type"] == "FuseDiT" else "DiTPipeline"}
    (path / "model_index.json").write_text(json.dumps(index))
    return path
