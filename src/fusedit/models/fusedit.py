"""Deep fusion (FuseDiT, design-space.md s.1): DiT layer i is paired with LLM layer i.

One attention per layer over [text ; image] tokens. Text rows are the frozen LLM's own causal forward
(text -> image is masked), so they arrive here as each fused LLM layer's post-RoPE keys and values,
computed once per prompt batch by ``fusedit.text``. This module only computes the image rows: image
queries attend to [text K/V ; image K/V], with the image side using the DiT layer's own weights.

The DiT mirrors the LLM: heads, head_dim, KV heads (MQA/GQA), MLP width and activation come from the LLM
config; only the residual width ``dit_hidden_size`` may differ.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.config import ConfigError, ModelConfig
from fusedit.layers.attention import attention, backend_context, key_padding_mask
from fusedit.layers.embed import PatchEmbed, unpatchify
from fusedit.layers.mlp import GatedMLP
from fusedit.layers.modulation import TIMESTEP_CONDITIONING, TimestepConditioning, ZeroInit
from fusedit.layers.norm import RMSNorm
from fusedit.layers.position import POSITION_SCHEMES
from fusedit.layers.rope import NoRotary, Rotary
from fusedit.text.context import TextContext, TextRequest
from fusedit.text.spec import LLMSpec


def fused_layers(cfg: ModelConfig, llm: LLMSpec) -> tuple[int, ...]:
    """LLM layer index of each DiT layer: initial_layers, initial_layers + 1, ... (contiguous)."""
    n = cfg.num_layers if cfg.num_layers is not None else llm.num_layers - cfg.initial_layers
    if n < 1 or cfg.initial_layers + n > llm.num_layers:
        raise ConfigError(
            f"model.initial_layers={cfg.initial_layers} + model.num_layers={n} needs "
            f"{cfg.initial_layers + n} LLM layers but the LLM has {llm.num_layers}: deep fusion pairs every DiT "
            f"layer with one LLM layer (allowed: initial_layers + num_layers <= {llm.num_layers})"
        )
    return tuple(range(cfg.initial_layers, cfg.initial_layers + n))


class ImageAttention(nn.Module):
    """Image queries over [text K/V ; image K/V]; q/k/v/o shaped like the LLM's attention."""

    def __init__(self, dim: int, llm: LLMSpec, qk_norm: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = llm.num_heads, llm.num_kv_heads, llm.head_dim
        self.q_proj = nn.Linear(dim, llm.num_heads * llm.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, llm.num_kv_heads * llm.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, llm.num_kv_heads * llm.head_dim, bias=False)
        self.o_proj = nn.Linear(llm.num_heads * llm.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(llm.head_dim, llm.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(llm.head_dim, llm.rms_norm_eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        txt_k: torch.Tensor,
        txt_v: torch.Tensor,
        mask: torch.Tensor | None,
        rope: Rotary | NoRotary,
    ) -> torch.Tensor:
        # x (B, N, d); txt_k, txt_v (B, KVH, T, hd); mask (B, 1, 1, T + N) or None
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        q, k = rope.apply(q), rope.apply(k)
        k = torch.cat([txt_k.to(k.dtype), k], dim=2)
        v = torch.cat([txt_v.to(v.dtype), v], dim=2)
        return self.o_proj(attention(q, k, v, mask))


class FusedBlock(nn.Module):
    """One DiT layer: modulated image attention over [text ; image], then the modulated MLP."""

    def __init__(self, dim: int, llm: LLMSpec, cfg: ModelConfig, time: TimestepConditioning):
        super().__init__()
        eps = llm.rms_norm_eps
        self.modulation = time.block_modulation(dim)
        self.attn_norm = time.block_norm(dim, eps)
        self.img_attn = ImageAttention(dim, llm, cfg.qk_norm)
        self.mlp_norm = time.block_norm(dim, eps)
        self.img_mlp = GatedMLP(dim, llm.intermediate_size, llm.activation)
        # Gemma-2 style "sandwich" norms on each sublayer's output (before the gate and residual).
        self.attn_post_norm = RMSNorm(dim, eps) if cfg.sandwich_norm else nn.Identity()
        self.mlp_post_norm = RMSNorm(dim, eps) if cfg.sandwich_norm else nn.Identity()

    def forward(self, x, cond, txt_k, txt_v, mask, rope):
        attn_mod, mlp_mod = self.modulation(cond)
        a = self.img_attn(attn_mod.pre(self.attn_norm(x)), txt_k, txt_v, mask, rope)
        x = x + attn_mod.post(self.attn_post_norm(a))
        m = self.img_mlp(mlp_mod.pre(self.mlp_norm(x)))
        return x + mlp_mod.post(self.mlp_post_norm(m))


class DeepFusionDiT(nn.Module):
    """The FuseDiT denoiser: (latents, t, TextContext of the fused LLM layers) -> velocity."""

    def __init__(self, cfg: ModelConfig, llm: LLMSpec, in_channels: int):
        super().__init__()
        dim = cfg.dit_hidden_size or llm.hidden_size
        self.patch_size, self.in_channels = cfg.patch_size, in_channels
        self.attention_backend = cfg.attention_backend
        self.llm_layers = fused_layers(cfg, llm)
        self.position = POSITION_SCHEMES[cfg.pos_embed](llm.head_dim, llm.rope_theta)
        self.patch_embed = PatchEmbed(in_channels, dim, cfg.patch_size)
        self.time = TIMESTEP_CONDITIONING[cfg.timestep_conditioning](dim)
        self.blocks = nn.ModuleList(FusedBlock(dim, llm, cfg, self.time) for _ in self.llm_layers)
        self.final_norm = self.time.final_layer(dim, llm.rms_norm_eps)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * in_channels)
        self.initialize_weights()

    @property
    def text_request(self) -> TextRequest:
        return TextRequest(kv_layers=self.llm_layers)

    def initialize_weights(self) -> None:
        """DiT's init in one place: xavier Linear, zero biases, adaLN-Zero and the output projection at 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ZeroInit):
                m.zero_()
        for lin in (m for m in self.time.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(lin.weight, std=0.02)  # timestep MLP (and adaLN-single's t_block), as in DiT
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextContext) -> torch.Tensor:
        """x (B, C, H, W) latents at time t (B,) in [0, 1] -> velocity (B, C, H, W)."""
        _, c, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        img = self.position.add_absolute(self.patch_embed(x), h, w)  # (B, N, d)
        temb = self.time.embed(t)  # (B, d) or None
        img = self.time.into_tokens(img, temb)
        cond = self.time.block_input(temb)
        rope = self.position.rotary(h, w, text.lengths)  # image positions continue after the text
        mask = key_padding_mask(text.key_mask, img.shape[1])  # (B, 1, 1, T + N) or None
        with backend_context(self.attention_backend):
            for block, (k, v) in zip(self.blocks, text.kv, strict=True):
                img = block(img, cond, k, v, mask, rope)
        img = self.proj_out(self.final_norm(img, temb))
        return unpatchify(img, self.patch_size, height, width, c)
