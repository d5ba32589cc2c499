"""Rotary position embeddings for image tokens, in the rotate-half layout the HF LLMs use for text.

Each position scheme of the FuseDiT study (design-space.md s.1) becomes a ``Rotary`` (cos, sin) for the
image queries and keys; text keys arrive already rotated by the LLM's own 1D RoPE. Image positions are
offset by each prompt's unpadded text length L, so image tokens continue the text sequence.

- ``1d-rope``: image token n (row-major) sits at position L + n.
- ``2d-rope``: RoPE over head_dim / 2 per axis (its own frequency ladder); the first half of the rotary
  pairs encode the row L + h, the second half the column L + w.
- ``m-rope``: the LLM's 1D frequency ladder split in two: its first half rotates by the row L + h, its
  second by the column L + w. A text token (p, p) then rotates exactly like 1D RoPE at p.

"The LLM's ladder" (``freqs``, (head_dim / 2,)) is its rotary embedding's inverse frequencies: the default
``inv_freq(head_dim, rope_theta)``, or a rescaled one (Llama-3.1's ``llama3``, ``linear``, ...), so image
rotations continue the text keys' exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """(dim / 2,) default RoPE inverse frequencies, float32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Rotary:
    """cos, sin: (B, 1, N, head_dim), broadcast over heads."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, N, head_dim) -> rotated, computed in float32 and cast back."""
        xf = x.float()
        return (xf * self.cos + rotate_half(xf) * self.sin).to(x.dtype)


class NoRotary:
    """No rotation: APE (the position is added after patchify), no positions at all, and text keys that
    are not rotated.

    As the identity rotation its cos is 1 and its sin 0, so a rotation composed onto it is that rotation
    alone, exactly (``LeftPaddedRotary`` over APE)."""

    cos, sin = 1.0, 0.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _grid(h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index of each image token in row-major order, each (N,)."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return rows, cols


def _angles(pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """pos (B, N) float, freqs (F,) -> (B, N, F) angles."""
    return pos.float()[..., None] * freqs


def _rotary(half_angles: torch.Tensor) -> Rotary:
    """(B, N, head_dim / 2) angles -> Rotary in rotate-half layout (angles duplicated over both halves)."""
    emb = torch.cat([half_angles, half_angles], dim=-1)[:, None]
    return Rotary(emb.cos(), emb.sin())


def rope_1d(h: int, w: int, offsets: torch.Tensor, freqs: torch.Tensor) -> Rotary:
    pos = offsets[:, None] + torch.arange(h * w, device=offsets.device)
    return _rotary(_angles(pos, freqs))


def rope_2d(h: int, w: int, offsets: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    rows, cols = _grid(h, w, offsets.device)
    freqs = inv_freq(head_dim // 2, theta, offsets.device)
    a_row = _angles(offsets[:, None] + rows, freqs)
    a_col = _angles(offsets[:, None] + cols, freqs)
    return _rotary(torch.cat([a_row, a_col], dim=-1))


def rope_m(h: int, w: int, offsets: torch.Tensor, freqs: torch.Tensor) -> Rotary:
    rows, cols = _grid(h, w, offsets.device)
    half = freqs.shape[0] // 2
    a_row = _angles(offsets[:, None] + rows, freqs[:half])
    a_col = _angles(offsets[:, None] + cols, freqs[half:])
    return _rotary(torch.cat([a_row, a_col], dim=-1))


def rope_text(positions: torch.Tensor, freqs: torch.Tensor) -> Rotary:
    """1D RoPE of text keys at ``positions`` (B, T) -> (B, 1, T, head_dim): the shallow DiT's text."""
    return _rotary(_angles(positions, freqs))
