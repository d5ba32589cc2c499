"""Deep fusion (FuseDiT, design-space.md s.1): DiT layer i is paired with LLM layer i.

``fusedit``: one attention per layer over [text ; image] tokens. Text rows are the frozen LLM's own causal
forward (text -> image is masked), so they arrive as each paired LLM layer's post-RoPE keys and values,
computed once per prompt batch by ``fusedit.text``; this module computes the image rows only: image
queries attend to [text K/V ; image K/V], the image side with the DiT layer's own weights.

``fusedit-cross``: each DiT layer cross-attends to its paired LLM layer's own K/V (before RoPE), after an
image-only self-attention.

The DiT mirrors the LLM: heads, head_dim, KV heads (MQA/GQA), MLP width and activation come from the LLM
config; only the residual width ``dit_hidden_size`` may differ.
"""

from __future__ import annotations

from fusedit.config import ModelConfig
from fusedit.layers.attention import keep_keys, key_padding_mask
from fusedit.models.base import DiT, paired_layers
from fusedit.models.blocks import CrossBlock, JointBlock
from fusedit.text.context import TextContext, TextRequest
from fusedit.text.spec import LLMSpec


class DeepFusionDiT(DiT):
    def __init__(self, cfg: ModelConfig, llm: LLMSpec, in_channels: int, **text_inputs):
        self.llm_layers = paired_layers(cfg, llm)
        super().__init__(cfg, llm, in_channels, **text_inputs)

    def make_block(self, dim, llm, cfg):
        return JointBlock(dim, llm, cfg, self.time)

    @property
    def text_requests(self) -> list[TextRequest]:
        return [TextRequest(kv_layers=self.llm_layers)]

    def block_texts(self, text: TextContext, num_image: int):
        txt_mask = key_padding_mask(text.key_mask, num_image)  # (B, 1, 1, T + N) or None, built once
        return ((txt_kv, txt_mask) for txt_kv in text.kv)


class DeepFusionCrossDiT(DeepFusionDiT):
    def make_block(self, dim, llm, cfg):
        return CrossBlock(dim, llm, cfg, self.time)

    @property
    def text_requests(self) -> list[TextRequest]:
        return [TextRequest(raw_kv_layers=self.llm_layers)]

    def block_texts(self, text: TextContext, num_image: int):
        txt_mask = keep_keys(text.key_mask)  # (B, 1, 1, T) or None
        return ((txt_kv, txt_mask) for txt_kv in text.raw_kv)
