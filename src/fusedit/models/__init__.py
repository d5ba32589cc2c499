"""Denoiser designs; a registry picks one when the model is built."""

from __future__ import annotations

from torch import nn

from fusedit.config import ModelConfig
from fusedit.models.fusedit import DeepFusionDiT
from fusedit.text.spec import LLMSpec

DESIGNS: dict[str, type[nn.Module]] = {"fusedit": DeepFusionDiT}


def build_denoiser(cfg: ModelConfig, llm: LLMSpec, in_channels: int) -> nn.Module:
    return DESIGNS[cfg.design](cfg, llm, in_channels)
