"""Denoiser designs; a registry picks one when the model is built."""

from __future__ import annotations

from fusedit.config import ModelConfig
from fusedit.models.base import DiT
from fusedit.models.fusedit import DeepFusionCrossDiT, DeepFusionDiT
from fusedit.models.shallow import CrossAttentionDiT, SelfAttentionDiT
from fusedit.text.spec import LLMSpec

DESIGNS: dict[str, type[DiT]] = {
    "fusedit": DeepFusionDiT,
    "fusedit-cross": DeepFusionCrossDiT,
    "dit-self": SelfAttentionDiT,
    "dit-cross": CrossAttentionDiT,
}


def build_denoiser(cfg: ModelConfig, llm: LLMSpec, in_channels: int, **text_inputs) -> DiT:
    """The design ``cfg`` asks for, initialised (``DiT.initialize_weights``, once, after every module of the
    design exists). ``text_inputs``: extra_llms (further LLMs' specs), hidden_layers (per LLM), pooled_dim."""
    denoiser = DESIGNS[cfg.design](cfg, llm, in_channels, **text_inputs)
    denoiser.initialize_weights()
    return denoiser
