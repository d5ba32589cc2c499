"""Attention modules and transformer blocks shared by the designs. Every projection is shaped like the
LLM's attention (heads, KV heads, head_dim), whatever the DiT's residual width."""

from __future__ import annotations

import torch
from torch import nn

from fusedit.config import ModelConfig
from fusedit.layers.attention import attention
from fusedit.layers.mlp import GatedMLP
from fusedit.layers.modulation import TimestepConditioning
from fusedit.layers.norm import RMSNorm
from fusedit.layers.rope import NoRotary, Rotary
from fusedit.text.spec import LLMSpec


def _heads(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(B, S, n * d) -> (B, n, S, d)."""
    return x.unflatten(-1, (n, d)).transpose(1, 2)


class ImageAttentionBase(nn.Module):
    """Image queries over [text K/V ; image K/V] (text optional: plain image self-attention). What the
    training form (``ImageAttention``) and the inference form (``FusedImageAttention``) share: a subclass sets
    heads, kv_heads, head_dim, o_proj, q_norm, k_norm and says how img is projected (``project``)."""

    heads: int
    kv_heads: int
    head_dim: int

    def project(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, d) -> q (B, N, H * hd), k and v (B, N, KVH * hd)."""
        raise NotImplementedError

    def forward(
        self,
        img: torch.Tensor,
        img_rope: Rotary | NoRotary,
        txt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        txt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """img (B, N, d); txt_kv (B, KVH, T, hd) each, keys already rotated, or None; txt_mask
        (B, 1, 1, T + N) keep-mask over [text ; image] keys, or None -> (B, N, d)."""
        q, k, v = self.project(img)
        q = img_rope.apply(self.q_norm(_heads(q, self.heads, self.head_dim)))
        k = img_rope.apply(self.k_norm(_heads(k, self.kv_heads, self.head_dim)))
        v = _heads(v, self.kv_heads, self.head_dim)
        if txt_kv is not None:
            k = torch.cat([txt_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([txt_kv[1].to(v.dtype), v], dim=2)
        return self.o_proj(attention(q, k, v, txt_mask))


class ImageAttention(ImageAttentionBase):
    """The training form: separate q/k/v projections, each shaped like the LLM's."""

    def __init__(self, dim: int, llm: LLMSpec, qk_norm: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = llm.num_heads, llm.num_kv_heads, llm.head_dim
        self.q_proj = nn.Linear(dim, llm.num_heads * llm.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, llm.num_kv_heads * llm.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, llm.num_kv_heads * llm.head_dim, bias=False)
        self.o_proj = nn.Linear(llm.num_heads * llm.head_dim, dim, bias=False)
        self.q_norm = head_norm(llm, qk_norm)
        self.k_norm = head_norm(llm, qk_norm)

    def project(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(img), self.k_proj(img), self.v_proj(img)


class FusedImageAttention(ImageAttentionBase):
    """An ImageAttention whose q/k/v projections run as one matmul of the concatenated weights: the same
    function with one larger GEMM instead of three (an inference-time form, ``fusedit.models.inference``).
    Built from a trained ImageAttention, whose o_proj and q/k norms it shares."""

    def __init__(self, attn: ImageAttention):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = attn.heads, attn.kv_heads, attn.head_dim
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        self.qkv_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.qkv_proj.weight = nn.Parameter(weight, requires_grad=False)
        self.split = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
        self.o_proj, self.q_norm, self.k_norm = attn.o_proj, attn.q_norm, attn.k_norm

    def project(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, d) -> q (B, N, H * hd), k and v (B, N, KVH * hd), split from one (B, N, (H + 2 KVH) hd)."""
        return self.qkv_proj(img).split(self.split, dim=-1)


class TextKV(nn.Module):
    """Per-layer text K/V projections of a (context-embedded) LLM hidden state: the shallow self-attention
    DiT's text side. Text tokens are read, never updated."""

    def __init__(self, dim: int, llm: LLMSpec, qk_norm: bool):
        super().__init__()
        self.kv_heads, self.head_dim = llm.num_kv_heads, llm.head_dim
        self.k_proj = nn.Linear(dim, llm.num_kv_heads * llm.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, llm.num_kv_heads * llm.head_dim, bias=False)
        self.k_norm = head_norm(llm, qk_norm)

    def forward(self, txt: torch.Tensor, txt_rope: Rotary | NoRotary) -> tuple[torch.Tensor, torch.Tensor]:
        """txt (B, T, d) -> the block's txt_kv: K, V (B, KVH, T, hd), keys rotated by ``txt_rope``."""
        k = txt_rope.apply(self.k_norm(_heads(self.k_proj(txt), self.kv_heads, self.head_dim)))
        return k, _heads(self.v_proj(txt), self.kv_heads, self.head_dim)


class CrossAttention(nn.Module):
    """Image queries over text keys/values given to it: the paired LLM layer's own K/V (the deep-fusion
    cross variant) or per-layer projections of one LLM hidden state (PixArt-style shallow DiT)."""

    def __init__(self, dim: int, llm: LLMSpec, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = llm.num_heads, llm.head_dim
        self.q_proj = nn.Linear(dim, llm.num_heads * llm.head_dim, bias=False)
        self.o_proj = nn.Linear(llm.num_heads * llm.head_dim, dim, bias=False)
        self.q_norm = head_norm(llm, qk_norm)

    def forward(
        self, img: torch.Tensor, txt_kv: tuple[torch.Tensor, torch.Tensor], txt_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """img (B, N, d); txt_kv (B, KVH, T, hd) each; txt_mask (B, 1, 1, T) or None -> (B, N, d)."""
        q = self.q_norm(_heads(self.q_proj(img), self.heads, self.head_dim))
        k, v = txt_kv
        return self.o_proj(attention(q, k.to(q.dtype), v.to(q.dtype), txt_mask))


def head_norm(llm: LLMSpec, enabled: bool) -> nn.Module:
    """QK norm (model.qk_norm): RMSNorm over each query or key head, or nothing."""
    return RMSNorm(llm.head_dim, llm.rms_norm_eps) if enabled else nn.Identity()


def post_norm(dim: int, eps: float, enabled: bool) -> nn.Module:
    """Gemma-2 style "sandwich" norm on a sublayer's output (before the gate and residual), or nothing."""
    return RMSNorm(dim, eps) if enabled else nn.Identity()


class _Block(nn.Module):
    """What every block has: a modulated image attention and a modulated gated MLP, each with an
    optional sandwich norm on its output."""

    def __init__(self, dim: int, llm: LLMSpec, cfg: ModelConfig, time: TimestepConditioning):
        super().__init__()
        eps = llm.rms_norm_eps
        self.modulation = time.block_modulation(dim)
        self.attn_norm = time.block_norm(dim, eps)
        self.img_attn = ImageAttention(dim, llm, cfg.qk_norm)
        self.attn_post_norm = post_norm(dim, eps, cfg.sandwich_norm)
        self.mlp_norm = time.block_norm(dim, eps)
        self.img_mlp = GatedMLP(dim, llm.intermediate_size, llm.activation)
        self.mlp_post_norm = post_norm(dim, eps, cfg.sandwich_norm)

    def mlp(self, img: torch.Tensor, mod) -> torch.Tensor:
        return img + mod.post(self.mlp_post_norm(self.img_mlp(mod.pre(self.mlp_norm(img)))))


class JointBlock(_Block):
    """Image attention over [text ; image] K/V, then the MLP (deep fusion, shallow self-attention DiT)."""

    def forward(
        self,
        img: torch.Tensor,
        cond: torch.Tensor | None,
        txt_kv: tuple[torch.Tensor, torch.Tensor] | None,
        txt_mask: torch.Tensor | None,
        img_rope: Rotary | NoRotary,
    ) -> torch.Tensor:
        """img (B, N, d) -> (B, N, d). cond: SiLU(temb) (B, d) for adaLN-Zero, (B, 6, d) for adaLN-single,
        None otherwise (``TimestepConditioning.block_input``, design-space.md s.1); txt_kv (B, KVH, T, hd)
        each, keys already rotated; txt_mask (B, 1, 1, T + N) keep-mask over [text ; image] keys, or None."""
        attn_mod, mlp_mod = self.modulation(cond)
        a = self.img_attn(attn_mod.pre(self.attn_norm(img)), img_rope, txt_kv, txt_mask)
        img = img + attn_mod.post(self.attn_post_norm(a))
        return self.mlp(img, mlp_mod)


class CrossBlock(_Block):
    """Image self-attention, then cross-attention to the text (PixArt: unmodulated, no norm on its
    input), then the MLP (deep-fusion cross variant, shallow cross-attention DiT)."""

    def __init__(self, dim: int, llm: LLMSpec, cfg: ModelConfig, time: TimestepConditioning):
        super().__init__(dim, llm, cfg, time)
        self.txt_attn = CrossAttention(dim, llm, cfg.qk_norm)
        self.txt_attn_post_norm = post_norm(dim, llm.rms_norm_eps, cfg.sandwich_norm)

    def forward(
        self,
        img: torch.Tensor,
        cond: torch.Tensor | None,
        txt_kv: tuple[torch.Tensor, torch.Tensor],
        txt_mask: torch.Tensor | None,
        img_rope: Rotary | NoRotary,
    ) -> torch.Tensor:
        """As ``JointBlock.forward``, but txt_kv's keys are unrotated and txt_mask is (B, 1, 1, T) or None."""
        attn_mod, mlp_mod = self.modulation(cond)
        a = self.img_attn(attn_mod.pre(self.attn_norm(img)), img_rope)
        img = img + attn_mod.post(self.attn_post_norm(a))
        img = img + self.txt_attn_post_norm(self.txt_attn(img, txt_kv, txt_mask))
        return self.mlp(img, mlp_mod)
