"""Shallow-fusion designs (design-space.md s.1 and s.2): the LLM runs separately, and one of its hidden
states (``text.hidden_layer``, default the last) conditions every DiT layer.

The hidden state becomes the DiT's text context either through the context embedder (RMSNorm + Linear to
the DiT width: the FuseDiT baselines) or through LI-DiT's refiners (``model.refiner_depth`` >= 1), which
also fuse several LLMs. Each DiT layer then has its own text K/V projections of that context. Text tokens
are read, never updated.

``dit-self`` (MMDiT-lite): image queries attend to [text K/V ; image K/V] in one attention per layer.
``dit-cross`` (PixArt-style, and LI-DiT's denoiser): image self-attention, cross-attention to the text, MLP.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fusedit.config import (
    ConfigError,
    ModelConfig,
    check_kv_heads,
    check_refiner_heads,
    dit_head_dim,
    resolve_hidden_layer,
)
from fusedit.layers.attention import keep_keys, key_padding_mask
from fusedit.layers.modulation import OwnInit
from fusedit.layers.norm import RMSNorm
from fusedit.layers.rope import NoRotary, Rotary
from fusedit.models.base import DiT, TextTokens
from fusedit.models.blocks import CrossBlock, JointBlock, TextKV
from fusedit.text.context import TextContext, TextRequest
from fusedit.text.refiner import PromptRefiner
from fusedit.text.spec import LLMSpec


class ContextEmbedder(nn.Module, OwnInit):
    """One LLM's hidden state -> RMSNorm + Linear to the DiT width (the FuseDiT shallow baselines)."""

    def __init__(self, llm_dim: int, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(llm_dim, eps)
        self.proj = nn.Linear(llm_dim, dim)

    def init_weights(self) -> None:
        """N(0, 0.02) weight, as the public code inits its context embedder; the bias stays 0."""
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(
        self, texts: list[TextContext], temb
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """-> context (B, T, d), keep-mask (B, T), positions (B, T): 0..L-1 as in the LLM itself, and
        whether the batch has padding to mask."""
        # The LLM's weights may be bf16 (text.dtype) while this runs in fp32 (no autocast).
        hidden, mask = texts[0].hidden.to(self.norm.weight.dtype), texts[0].mask
        return self.proj(self.norm(hidden)), mask, mask.cumsum(1) - 1, texts[0].padded


def own_shape(cfg: ModelConfig, llm: LLMSpec) -> LLMSpec:
    """The attention/MLP shape the DiT's blocks take: the LLM's, with the model.* overrides applied."""
    check_kv_heads(
        cfg, llm.num_heads
    )  # at load where the LLM was known there, here where only the build knows it
    heads = cfg.num_heads or llm.num_heads
    head_dim = dit_head_dim(cfg, llm.hidden_size, llm.head_dim)
    return dataclasses.replace(
        llm,
        num_heads=heads,
        num_kv_heads=cfg.num_kv_heads or (heads if cfg.num_heads else llm.num_kv_heads),
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size or llm.intermediate_size,
        # The DiT rotates its own text keys and image queries alike, so any ladder of its head width is
        # consistent; the LLM's rescaled one (head_dim / 2 entries) fits only the LLM's head width.
        rope_freqs=llm.rope_freqs if head_dim == llm.head_dim else None,
    )


class ShallowDiT(DiT):
    def __init__(self, cfg: ModelConfig, llm: LLMSpec, in_channels: int, **text_inputs):
        shape = own_shape(cfg, llm)
        super().__init__(cfg, shape, in_channels, **text_inputs)
        llms = (llm, *text_inputs.get("extra_llms", ()))
        wanted = text_inputs.get("hidden_layers", (-1,) * len(llms))
        if len(wanted) != len(llms):
            raise ConfigError(
                f"got {len(wanted)} hidden layers for {len(llms)} LLMs (allowed: one text.hidden_layer per "
                "LLM: text and each extra_text.N)"
            )
        # Named as the config names each LLM's section: text, extra_text.0, ...
        keys = ["text", *(f"extra_text.{i}" for i in range(len(llms) - 1))]
        self.hidden_layers = tuple(
            resolve_hidden_layer(h, spec.num_layers, f"{key}.hidden_layer")
            for h, spec, key in zip(wanted, llms, keys, strict=True)
        )
        if cfg.refiner_depth:
            # A hub LLM's width may be known only now: the load checks it where it can (config.check_llm_shape).
            check_refiner_heads(cfg, self.dim)
            self.context = PromptRefiner(
                [spec.hidden_size for spec in llms],
                self.dim,
                cfg.refiner_heads,
                cfg.refiner_depth,
                causal=cfg.refiner_causal,
                gated=cfg.refiner_gating,
                collaborative=cfg.collaborative_refiner,
                drop_instruction=cfg.drop_instruction,
                concat=cfg.refiner_concat,
            )
        else:
            self.context = ContextEmbedder(llm.hidden_size, self.dim, llm.rms_norm_eps)
        # Each block's txt_kv projections. "text_kv" is a state_dict key (checkpoints, the public code's key
        # map in fusedit.convert), so the name stays.
        self.text_kv = nn.ModuleList(TextKV(self.dim, shape, cfg.qk_norm) for _ in self.blocks)

    @property
    def text_requests(self) -> list[TextRequest]:
        return [TextRequest(hidden_layer=h) for h in self.hidden_layers]

    def prepare_text(self, text: TextContext, temb) -> TextTokens:
        """Computed once per forward, read by every layer: the context embedder's or the refiners' tokens,
        keep-mask and positions. A position counts the tokens before it that are not padding (the concat
        modules of ``fusedit.text.refiner``), so no position depends on how much padding its batch has;
        the image continues after all the LLMs' real tokens (TextContext.real_tokens), which with
        refiner_concat=channels leaves a gap past the packed tokens, the same for any batch."""
        return TextTokens(*self.context(text.all, temb))

    def block_texts(self, state: TextTokens, num_image: int):
        txt_rope = self.text_rotary(state.positions)
        txt_mask = self.text_mask(state.mask, num_image) if state.masked else None
        return ((txt_kv_proj(state.context, txt_rope), txt_mask) for txt_kv_proj in self.text_kv)


class SelfAttentionDiT(ShallowDiT):
    def make_block(self, dim, llm, cfg):
        return JointBlock(dim, llm, cfg, self.time)

    def text_rotary(self, positions: torch.Tensor) -> Rotary | NoRotary:
        return self.position.text_rotary(positions)  # none for APE and rope_layout=image-only

    def text_mask(self, mask: torch.Tensor, num_image: int):
        return key_padding_mask(mask, num_image)


class CrossAttentionDiT(ShallowDiT):
    def make_block(self, dim, llm, cfg):
        return CrossBlock(dim, llm, cfg, self.time)

    def text_rotary(self, positions: torch.Tensor) -> NoRotary:
        """Unrotated text keys: the cross-attention's image queries carry no rotation (PixArt; fusedit-cross
        reads the LLM's pre-RoPE keys likewise), and keys rotated alone would encode no relative position."""
        return NoRotary()

    def text_mask(self, mask: torch.Tensor, num_image: int):
        return keep_keys(mask)
