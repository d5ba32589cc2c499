"""Image position schemes of the FuseDiT study (design-space.md s.1), chosen at build time."""

from __future__ import annotations

import torch

from fusedit.layers.embed import sincos_2d
from fusedit.layers.rope import NoRotary, Rotary, rope_1d, rope_2d, rope_m, rope_text


class PositionScheme:
    """Adds absolute embeddings to image tokens and/or gives the image queries' and keys' rotation."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta

    def add_absolute(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return x

    def rotary(self, h: int, w: int, text_lengths: torch.Tensor) -> Rotary | NoRotary:
        """Rotation for the (h * w) image tokens of each sample, offset by its unpadded text length (B,)."""
        return NoRotary()

    def text_rotary(self, length: int, device) -> Rotary | NoRotary:
        """Rotation of text keys a design projects itself (shallow designs): 1D RoPE at 0..length-1,
        which every RoPE scheme uses for text (M-RoPE's (p, p) included)."""
        return rope_text(length, self.head_dim, self.theta, device)


class APE(PositionScheme):
    """Fixed 2D sin-cos added after patchify; the text keeps the LLM's own 1D RoPE."""

    def add_absolute(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return x + sincos_2d(x.shape[-1], h, w, x.device).to(x.dtype)

    def text_rotary(self, length: int, device) -> NoRotary:
        return NoRotary()


class Rope1D(PositionScheme):
    def rotary(self, h, w, text_lengths):
        return rope_1d(h, w, text_lengths, self.head_dim, self.theta)


class Rope2D(PositionScheme):
    def rotary(self, h, w, text_lengths):
        return rope_2d(h, w, text_lengths, self.head_dim, self.theta)


class MRope(PositionScheme):
    def rotary(self, h, w, text_lengths):
        return rope_m(h, w, text_lengths, self.head_dim, self.theta)


class NoPosition(PositionScheme):
    """No position input here: LI-DiT's conv ResBlock (model.conv_pos) gives image tokens their place."""

    def text_rotary(self, length: int, device) -> NoRotary:
        return NoRotary()


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {
    "ape": APE,
    "1d-rope": Rope1D,
    "2d-rope": Rope2D,
    "m-rope": MRope,
    "none": NoPosition,
}
