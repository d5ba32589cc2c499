"""Denoiser designs; a registry picks one when the model is built."""

from __future__ import annotations

from torch import nn

from fusedit.config import ModelConfig
from fusedit.models.fusedit import DeepFusionCrossDiT, DeepFusionDiT
from fusedit.models.shallow import CrossAttentionDiT, SelfAttentionDiT
from fusedit.text.spec import LLMSpec

DESIGNS: dict[str, type[nn.Module]] = {
    "fusedit": DeepFusionDiT,
    "fusedit-cross": DeepFusionCrossDiT,
    "dit-self": SelfAttentionDiT,
    "dit-cross": CrossAttentionDiT,
}


def build_denoiser(cfg: ModelConfig, llm: LLMSpec, in_channels: int, **text_inputs) -> nn.Module:
    """``text_inputs``: extra_llms (further LLMs' specs), hidden_layers (per LLM), pooled_dim."""
    return DESIGNS[cfg.design](cfg, llm, in_channels, **text_inputs)
