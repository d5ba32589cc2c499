"""The whole text-to-image model: text encoder (LLM + tokenizer), denoiser and latent space, built from a
Config. Training, sampling and the CLI all start from ``build_model``."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fusedit.config import Config
from fusedit.models import build_denoiser
from fusedit.text.context import TextContext
from fusedit.text.encoder import TextEncoder
from fusedit.text.llm import llm_config, load_llm, load_tokenizer
from fusedit.text.spec import LLMSpec
from fusedit.vae import load_autoencoder


class TextToImage(nn.Module):
    def __init__(self, text: TextEncoder, denoiser: nn.Module, autoencoder: nn.Module):
        super().__init__()
        self.text = text
        self.denoiser = denoiser
        self.autoencoder = autoencoder

    def encode_prompts(self, prompts: list[str]) -> TextContext:
        """One LLM forward for the whole prompt batch; the result serves every step and CFG branch."""
        return self.text.encode(prompts, self.denoiser.text_request)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextContext) -> torch.Tensor:
        return self.denoiser(x, t, text)


def builtin_words(cfg: Config) -> list[str] | None:
    """The word list of the built-in tokenizer when the data is the shapes world."""
    from fusedit.data.shapes import vocabulary

    return vocabulary() if cfg.data.source == "shapes" else None


def build_model(cfg: Config, device: torch.device | str = "cpu") -> TextToImage:
    """Build every part on ``device`` ("meta" builds shapes only, for counting parameters)."""
    meta = str(device) == "meta"
    spec = LLMSpec.from_hf(llm_config(cfg.text, shape_only=meta))
    autoencoder = None if meta else load_autoencoder(cfg.vae, device)
    with torch.device(device):
        denoiser = build_denoiser(cfg.model, spec, cfg.vae.latent_channels)
    needed = denoiser.text_request.layers_needed(spec.num_layers)
    # On "meta" the LLM is built under the device context too, so no real weights are allocated.
    with torch.device(device) if meta else contextlib.nullcontext():
        llm = load_llm(cfg.text, needed, device, shape_only=meta)
    tokenizer = None if meta else load_tokenizer(cfg.text, builtin_words(cfg))
    text = TextEncoder(
        llm,
        tokenizer,
        cfg.text.max_length,
        instruction=cfg.text.instruction,
        chat_template=cfg.text.chat_template,
        trim_padding=cfg.text.trim_padding,
    )
    return TextToImage(text, denoiser, autoencoder)


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
