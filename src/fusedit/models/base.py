"""The skeleton every design shares, DiT-style: the model never sees the diffusion process, only
(latents, t in [0, 1], TextContext) -> velocity.

    patchify (+ APE) -> timestep embedding -> blocks, each reading its text input -> final norm -> unpatchify

A design (subclass) says which blocks it stacks, what it asks of the LLM (``text_requests``) and what each
block reads from the TextContext (``block_texts``). adaLN-Zero and DiT initialisation live here, once
(``initialize_weights``, run on every built design by ``fusedit.models.build_denoiser``); a module whose init
differs declares it itself (``OwnInit``: the timestep MLP, clip-mod's pooled-text MLP, the shallow baselines'
context projection, N(0, 0.02) as in the public code; ``ZeroInit``: adaLN-Zero, the refiners' gates).

The position scheme and the timestep conditioning are picked here from the config (``position_scheme``,
``timestep_conditioning``), so ``fusedit.layers`` holds the variants without knowing the config schema.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from fusedit.compiling import compile_settings, uncompile
from fusedit.config import ModelConfig, check_positions, dit_layer_count, fused_layers, variant_traits
from fusedit.layers.attention import resolve_backend
from fusedit.layers.embed import PatchEmbed, unpatchify
from fusedit.layers.modulation import (
    TIMESTEP_CONDITIONING,
    OwnInit,
    TimestepConditioning,
    ZeroInit,
    normal_linears_,
)
from fusedit.layers.norm import RMSNorm
from fusedit.layers.pool import masked_mean
from fusedit.layers.position import POSITION_SCHEMES, ImageOnlyRotary, LeftPaddedRotary, PositionScheme
from fusedit.text.context import TextContext, TextRequest
from fusedit.text.spec import LLMSpec


def paired_layers(cfg: ModelConfig, llm: LLMSpec) -> tuple[int, ...]:
    """LLM layer index of each DiT layer in deep fusion: initial_layers, initial_layers + 1, ... (the load
    checks the same rule where the LLM's config is known there: config.check_llm_shape)."""
    return tuple(fused_layers(cfg, llm.num_layers))


def position_scheme(
    cfg: ModelConfig, head_dim: int, theta: float, ladder: tuple[float, ...] | None = None
) -> PositionScheme:
    """The position scheme ``cfg`` asks for, with its options (``ape_*``, ``rope_layout``, ``rope_left_pad``),
    as its traits (fusedit.config.PositionTraits) say they apply."""
    traits = variant_traits("model.pos_embed", cfg.pos_embed)
    ape = {"base_size": cfg.ape_base_size, "max_size": cfg.ape_max_size} if traits.ape_options else {}
    scheme = POSITION_SCHEMES[cfg.pos_embed](head_dim, theta, ladder, **ape)
    if cfg.rope_layout == "image-only" and traits.rotates:
        # Text keys are not rotated in this layout, so how the text was padded cannot matter.
        return ImageOnlyRotary(scheme)
    if cfg.rope_left_pad is not None:
        # APE too: deep fusion's text keys come rotated by the LLM whatever the image scheme, so left
        # padding moved them against the (unrotated) APE image queries as well.
        return LeftPaddedRotary(scheme, cfg.rope_left_pad)
    return scheme


def timestep_conditioning(cfg: ModelConfig, dim: int) -> TimestepConditioning:
    """The timestep conditioning ``cfg`` asks for, with its options (``adaln_norm``)."""
    return TIMESTEP_CONDITIONING[cfg.timestep_conditioning](dim, adaln_norm=cfg.adaln_norm)


class ConvPosition(nn.Module):
    """LI-DiT's position embedding: a conv ResBlock over the (h, w) patch grid right after patchify; zero
    padding at the borders lets the convolutions tell positions apart (design-space.md s.2)."""

    def __init__(self, dim: int):
        super().__init__()
        groups = math.gcd(32, dim)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.GroupNorm(groups, dim),
            nn.SiLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        grid = x.transpose(1, 2).unflatten(-1, (h, w))  # (B, d, h, w)
        return x + self.block(grid).flatten(2).transpose(1, 2)


class NoConvPosition(nn.Module):
    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return x


class NoPooledText(nn.Module):
    def forward(self, temb, text: TextContext, state):
        return temb


class ClipPooledText(nn.Module, OwnInit):
    """FuseDiT clip-mod: a second encoder's pooled embedding, embedded and added to the timestep's."""

    def __init__(self, pooled_dim: int, dim: int, eps: float):
        super().__init__()
        self.embed = nn.Sequential(
            RMSNorm(pooled_dim, eps), nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def init_weights(self) -> None:
        """N(0, 0.02), as the public FuseDiT code inits its condition embedder (like the timestep MLP)."""
        normal_linears_(self)

    def forward(self, temb, text: TextContext, state):
        return temb + self.embed(text.pooled.to(temb.dtype))


class TextTokens(NamedTuple):
    """The shallow designs' text, prepared once per forward and read by every layer."""

    context: torch.Tensor  # (B, T', d): the LLMs' tokens embedded or refined, concatenated
    mask: torch.Tensor  # (B, T') bool: the tokens the image may attend to
    positions: torch.Tensor  # (B, T') long: RoPE position of each token
    # Whether any token is masked (static, from TextContext.padded): attention takes no mask otherwise,
    # which keeps the flash and cuDNN kernels that refuse one (layers/attention.py).
    masked: bool = True


class RefinedPooledText(nn.Module):
    """LI-DiT: the masked mean of the shallow design's text tokens (TextTokens.context, (B, T', d): the
    refiners' output, or the context embedder's with model.refiner_depth 0), projected and added to the
    timestep embedding (B, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, temb, text: TextContext, state: TextTokens):
        return temb + self.embed(masked_mean(state.context, state.mask))


# model.pooled_text: what joins the timestep embedding, built from (pooled_dim, dim, eps) (pooled_dim: the
# second encoder's width for a variant with the ``encoder`` trait, else None); fusedit.models.
# register_pooled_text adds one.
POOLED_TEXT: dict[str, Callable[[int | None, int, float], nn.Module]] = {
    "none": lambda pooled_dim, dim, eps: NoPooledText(),
    "refined": lambda pooled_dim, dim, eps: RefinedPooledText(dim),
    "clip": ClipPooledText,
}


def _run_block(block: nn.Module, *args) -> torch.Tensor:
    return block(*args)


def _run_block_checkpointed(block: nn.Module, *args) -> torch.Tensor:
    """Recompute the block's activations in backward instead of storing them (less memory, ~1/3 more time)."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


class DiT(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        llm: LLMSpec,
        in_channels: int,
        *,
        extra_llms: tuple[LLMSpec, ...] = (),
        hidden_layers: tuple[int, ...] = (-1,),
        pooled_dim: int | None = None,
    ):
        super().__init__()
        dim = cfg.dit_hidden_size or llm.hidden_size
        # A hub LLM's shape may be known only now: the load checks it where it can (config.check_llm_shape).
        check_positions(cfg, dim, llm.head_dim)
        self.dim, self.patch_size, self.in_channels = dim, cfg.patch_size, in_channels
        self.attention_backend = cfg.attention_backend
        self.position = position_scheme(cfg, llm.head_dim, llm.rope_theta, llm.rope_freqs)
        self.patch_embed = PatchEmbed(in_channels, dim, cfg.patch_size)
        self.conv_pos = ConvPosition(dim) if cfg.conv_pos else NoConvPosition()
        self.time = timestep_conditioning(cfg, dim)
        self.pooled = POOLED_TEXT[cfg.pooled_text](pooled_dim, dim, llm.rms_norm_eps)
        # num_layers, or every LLM layer after initial_layers (0 on the shallow designs).
        depth = dit_layer_count(cfg, llm.num_layers)
        self.blocks = nn.ModuleList(self.make_block(dim, llm, cfg) for _ in range(depth))
        self.final_norm = self.time.final_layer(dim, llm.rms_norm_eps)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * in_channels)
        self.run_block = _run_block

    @property
    def attention_backend(self) -> str:
        """model.attention_backend. Setting it (at build, or a benchmark's switch) resolves it then, into
        ``attention_kernels``, which gives a fresh sdpa_kernel context per forward."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        self.attention_kernels = resolve_backend(name)
        self._attention_backend = name

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Training-time choice, made once: every block call is checkpointed, or none is."""
        self.run_block = _run_block_checkpointed if enabled else _run_block

    def compile_blocks(self, backend: str) -> None:
        """torch.compile each repeated block, and the final norm, as ``backend`` (a compile setting:
        compile_settings) asks, with static shapes (the same every step, so one graph serves them all); ""
        runs them eagerly again. The final norm's elementwise work over every image token (a float32 RMS
        norm, then the modulation) would otherwise be about ten kernels each way per forward."""
        for part in (*self.blocks, self.final_norm):
            if backend:
                part.compile(dynamic=False, **compile_settings(backend))
            else:
                uncompile(part)

    # ---- what a design defines
    def make_block(self, dim: int, llm: LLMSpec, cfg: ModelConfig) -> nn.Module:
        raise NotImplementedError

    @property
    def text_requests(self) -> list[TextRequest]:
        """What each LLM must provide (one request per LLM, in config order)."""
        raise NotImplementedError

    @property
    def text_request(self) -> TextRequest:
        return self.text_requests[0]

    def prepare_text(self, text: TextContext, temb: torch.Tensor | None):
        """Per-step text work done once per forward, before the blocks (the deep designs need none)."""
        return text

    def block_texts(self, state, num_image: int) -> Iterator[tuple]:
        """(txt_kv, txt_mask) for each block, in order: what each block (``JointBlock``, ``CrossBlock``)
        reads of the text."""
        raise NotImplementedError

    # ---- shared
    def initialize_weights(self) -> None:
        """DiT's init: xavier Linear with zero bias; then every ``OwnInit`` module's own init (the timestep
        MLP's and clip-mod's N(0, 0.02), ...); then adaLN-Zero (``ZeroInit``) and the output at 0.

        ``fusedit.models.build_denoiser`` calls this once, on the whole built design. The passes walk the
        modules in registration order, so the random draws come in one fixed order for a given design."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, OwnInit):
                m.init_weights()
        for m in self.modules():
            if isinstance(m, ZeroInit):
                m.zero_()
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextContext) -> torch.Tensor:
        """x (B, C, H, W) latents at time t (B,) in [0, 1] -> velocity (B, C, H, W)."""
        _, channels, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        img = self.conv_pos(self.position.add_absolute(self.patch_embed(x), h, w), h, w)  # (B, N, d)
        temb = self.time.embed(t)  # (B, d) or None
        with self.attention_kernels():  # the refiners' attention (prepare_text) included
            state = self.prepare_text(text, temb)
            temb = self.pooled(temb, text, state)
            img = self.time.into_tokens(img, temb)
            cond = self.time.block_input(temb)  # (B, d), (B, 6, d) or None: see JointBlock.forward
            img_rope = self.position.rotary(h, w, text.real_tokens)  # positions continue after the text
            texts = self.block_texts(state, img.shape[1])
            for block, (txt_kv, txt_mask) in zip(self.blocks, texts, strict=True):
                img = self.run_block(block, img, cond, txt_kv, txt_mask, img_rope)
        img = self.proj_out(self.final_norm(img, temb))
        return unpatchify(img, self.patch_size, height, width, channels)
