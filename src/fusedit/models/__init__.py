"""Denoiser designs; a registry picks one when the model is built. The register functions add a variant of
your own (a design, a position scheme, a timestep conditioning, a pooled-text modulation) under a new name
that configs may then name, with the traits the config checks and the build ask instead of the name
(fusedit.config.VARIANTS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import nn

from fusedit.config import (
    DesignTraits,
    ModelConfig,
    PooledTextTraits,
    PositionTraits,
    TimestepTraits,
    register_variant,
)
from fusedit.layers.modulation import TIMESTEP_CONDITIONING, TimestepConditioning
from fusedit.layers.position import POSITION_SCHEMES, PositionScheme
from fusedit.models.base import POOLED_TEXT, DiT
from fusedit.models.fusedit import DeepFusionCrossDiT, DeepFusionDiT
from fusedit.models.shallow import CrossAttentionDiT, SelfAttentionDiT
from fusedit.text.spec import LLMSpec

DESIGNS: dict[str, type[DiT]] = {
    "fusedit": DeepFusionDiT,
    "fusedit-cross": DeepFusionCrossDiT,
    "dit-self": SelfAttentionDiT,
    "dit-cross": CrossAttentionDiT,
}


def register_design(name: str, cls: type[DiT], *, deep: bool, attention: Literal["self", "cross"]) -> None:
    """``model.design=name`` builds ``cls(cfg, llm, in_channels, **text_inputs)``, a ``DiT`` subclass
    (subclass a built-in design to change one part). ``deep``: each DiT layer reads its own LLM layer
    (deep fusion) or one hidden state (shallow); ``attention``: "self" (joint) or "cross". The config's
    checks of the design's options ask these traits. A name already taken is a ConfigError."""
    register_variant("model.design", name, DesignTraits(deep=deep, attention=attention))
    DESIGNS[name] = cls


def register_position_scheme(
    name: str,
    cls: type[PositionScheme],
    *,
    rotates: bool,
    places: bool = True,
    head_dim_multiple: int = 1,
    width_multiple: int = 1,
    fit_reason: str = "",
    ape_options: bool = False,
) -> None:
    """``model.pos_embed=name`` builds ``cls(head_dim, theta, ladder)``, a ``PositionScheme``, with the
    keywords ``base_size`` and ``max_size`` (model.ape_base_size, ape_max_size) where ``ape_options``.
    ``rotates``: it rotates image queries and keys (model.rope_layout applies); ``places``: it gives image
    tokens a position (False: model.conv_pos must); the DiT's head width and width must be multiples of
    ``head_dim_multiple`` and ``width_multiple`` (``fit_reason`` says why in the refusal). A name already
    taken is a ConfigError."""
    traits = PositionTraits(
        rotates=rotates,
        places=places,
        head_dim_multiple=head_dim_multiple,
        width_multiple=width_multiple,
        fit_reason=fit_reason,
        ape_options=ape_options,
    )
    register_variant("model.pos_embed", name, traits)
    POSITION_SCHEMES[name] = cls


def register_timestep_conditioning(
    name: str, cls: type[TimestepConditioning], *, has_embedding: bool, modulates_norm: bool = True
) -> None:
    """``model.timestep_conditioning=name`` builds ``cls(dim, adaln_norm=...)``, a ``TimestepConditioning``.
    ``has_embedding``: its ``embed`` returns a timestep embedding (False: None, and model.pooled_text,
    which is added to it, is refused). ``modulates_norm``: it reads ``adaln_norm`` (False: a user's
    model.adaln_norm is warned about as changing nothing). A name already taken is a ConfigError."""
    traits = TimestepTraits(has_embedding=has_embedding, modulates_norm=modulates_norm)
    register_variant("model.timestep_conditioning", name, traits)
    TIMESTEP_CONDITIONING[name] = cls


def register_pooled_text(
    name: str,
    builder: Callable[[int | None, int, float], nn.Module],
    *,
    encoder: bool,
    refined: bool = False,
) -> None:
    """``model.pooled_text=name`` builds ``builder(pooled_dim, dim, eps)`` (a class or function: the DiT's
    width, its norms' eps), a module whose ``forward(temb, text, state)`` returns the timestep embedding
    (B, dim) with its own term added; ``text`` is the TextContext, ``state`` what the design's
    ``prepare_text`` made of it (the shallow designs' ``TextTokens``). ``encoder``: it reads ``text.pooled``,
    the pooled embedding of the second encoder the ``pooled_text`` section configures (that section then
    needs a model_id or arch; pooled_dim is the embedding's width, else None). ``refined``: it pools the
    shallow designs' text tokens (``state.context``: refined, or embedded without a refiner), so the deep
    designs, which prepare none, refuse it. A name already taken is a ConfigError."""
    register_variant("model.pooled_text", name, PooledTextTraits(encoder=encoder, refined=refined))
    POOLED_TEXT[name] = builder


def build_denoiser(cfg: ModelConfig, llm: LLMSpec, in_channels: int, **text_inputs) -> DiT:
    """The design ``cfg`` asks for, initialised (``DiT.initialize_weights``, once, after every module of the
    design exists). ``text_inputs``: extra_llms (further LLMs' specs), hidden_layers (per LLM), pooled_dim."""
    denoiser = DESIGNS[cfg.design](cfg, llm, in_channels, **text_inputs)
    denoiser.initialize_weights()
    return denoiser
