"""Shallow-fusion baselines of the FuseDiT study (design-space.md s.1): the LLM runs separately, and one of
its hidden states (``model.hidden_layer``, default the last) conditions every DiT layer.

The hidden state goes through the context embedder (RMSNorm + Linear to the DiT width); each DiT layer
then has its own text K/V projections of it. Text tokens are read, never updated.

``dit-self`` (MMDiT-lite): image queries attend to [text K/V ; image K/V] in one attention per layer.
``dit-cross`` (PixArt-style): image self-attention, then cross-attention to the text, then the MLP.
"""

from __future__ import annotations

from torch import nn

from fusedit.config import ModelConfig
from fusedit.layers.attention import key_padding_mask
from fusedit.layers.norm import RMSNorm
from fusedit.models.base import DiT
from fusedit.models.blocks import CrossBlock, JointBlock, TextKV
from fusedit.text.context import TextContext, TextRequest, resolve_hidden_layer
from fusedit.text.spec import LLMSpec


class ShallowDiT(DiT):
    def __init__(self, cfg: ModelConfig, llm: LLMSpec, in_channels: int):
        super().__init__(cfg, llm, in_channels)
        self.hidden_layer = resolve_hidden_layer(cfg.hidden_layer, llm.num_layers)
        self.context_embedder = nn.Sequential(
            RMSNorm(llm.hidden_size, llm.rms_norm_eps), nn.Linear(llm.hidden_size, self.dim)
        )
        self.text_kv = nn.ModuleList(TextKV(self.dim, llm, cfg.qk_norm) for _ in self.blocks)
        self.initialize_weights()
        nn.init.normal_(self.context_embedder[1].weight, std=0.02)

    def depth(self, cfg: ModelConfig, llm: LLMSpec) -> int:
        return cfg.num_layers if cfg.num_layers is not None else llm.num_layers

    @property
    def text_request(self) -> TextRequest:
        return TextRequest(hidden_layer=self.hidden_layer)

    def block_texts(self, text: TextContext, num_image: int):
        context = self.context_embedder(text.hidden)  # (B, T, d)
        rope = self.position.text_rotary(context.shape[1], context.device)  # text at 0..T-1 (none for APE)
        mask = self.text_mask(text, num_image)
        return ((proj(context, rope), mask) for proj in self.text_kv)


class SelfAttentionDiT(ShallowDiT):
    def make_block(self, dim, llm, cfg):
        return JointBlock(dim, llm, cfg, self.time)

    def text_mask(self, text: TextContext, num_image: int):
        return key_padding_mask(text.key_mask, num_image)


class CrossAttentionDiT(ShallowDiT):
    def make_block(self, dim, llm, cfg):
        return CrossBlock(dim, llm, cfg, self.time)

    def text_mask(self, text: TextContext, num_image: int):
        return None if text.key_mask is None else text.key_mask[:, None, None, :]
