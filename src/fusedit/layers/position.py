"""Image position schemes of the FuseDiT study (design-space.md s.1), chosen at build time."""

from __future__ import annotations

import torch

from fusedit.layers.embed import scaled_sincos_2d, sincos_2d
from fusedit.layers.rope import NoRotary, Rotary, inv_freq, rope_1d, rope_2d, rope_m, rope_text


class PositionScheme:
    """Adds absolute embeddings to image tokens and/or gives the image queries' and keys' rotation.

    ``ladder``: the LLM's RoPE inverse frequencies when they are not the default ladder of ``theta``
    (LLMSpec.rope_freqs), so that image rotations continue the LLM's text rotations."""

    def __init__(self, head_dim: int, theta: float, ladder: tuple[float, ...] | None = None):
        self.head_dim, self.theta, self.ladder = head_dim, theta, ladder

    def freqs(self, device) -> torch.Tensor:
        """(head_dim / 2,) float32: the LLM's 1D frequency ladder."""
        if self.ladder is None:
            return inv_freq(self.head_dim, self.theta, device)
        return torch.tensor(self.ladder, dtype=torch.float32, device=device)

    def add_absolute(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return x

    @property
    def max_grid(self) -> int | None:
        """The most patches along a side this scheme can place (None: any number)."""
        return None

    def rotary(self, h: int, w: int, text_lengths: torch.Tensor) -> Rotary | NoRotary:
        """Rotation for the (h * w) image tokens of each sample, offset by its unpadded text length (B,)."""
        return NoRotary()

    def text_rotary(self, positions: torch.Tensor) -> Rotary | NoRotary:
        """Rotation of text keys a design projects itself (shallow designs): 1D RoPE at ``positions``
        (B, T), which every RoPE scheme uses for text (M-RoPE's (p, p) included)."""
        return rope_text(positions, self.freqs(positions.device))


class APE(PositionScheme):
    """Fixed 2D sin-cos added after patchify; the text keeps the LLM's own 1D RoPE.

    With ``base_size`` or ``max_size`` (model.ape_base_size, ape_max_size), the table as diffusers'
    ``PatchEmbed`` builds it (the public FuseDiT code): positions scaled by ``base_size / G`` over a
    G-position grid (G = ``max_size`` or the latent grid), centre-cropped to the latent grid. See
    ``scaled_sincos_2d``."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        ladder: tuple[float, ...] | None = None,
        *,
        base_size: int | None = None,
        max_size: int | None = None,
    ):
        # The ladder is the LLM's: a left-pad emulation (LeftPaddedRotary) rotates by its angles.
        super().__init__(head_dim, theta, ladder)
        self.base_size, self.max_size = base_size, max_size
        # The table of each (width, h, w, device, dtype) met: a constant that would otherwise be rebuilt at
        # every forward (~15 small kernels per training or sampling step, float64 sin/cos included).
        self._tables: dict[tuple, torch.Tensor] = {}

    def add_absolute(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        key = (x.shape[-1], h, w, x.device, x.dtype)
        if key not in self._tables:
            # A plain tensor even when first met while sampling under inference_mode: training uses it next.
            with torch.inference_mode(False), torch.no_grad():
                self._tables[key] = self.table(x.shape[-1], h, w, x.device).to(x.dtype)
        return x + self._tables[key]

    def table(self, dim: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """(h * w, dim) float32."""
        if self.base_size is None and self.max_size is None:
            return sincos_2d(dim, h, w, device)
        return scaled_sincos_2d(dim, h, w, self.base_size, self.max_size, device)

    @property
    def max_grid(self) -> int | None:
        return self.max_size  # the table's fixed grid (model.ape_max_size), when it has one

    def text_rotary(self, positions: torch.Tensor) -> NoRotary:
        return NoRotary()


class Rope1D(PositionScheme):
    def rotary(self, h, w, text_lengths):
        return rope_1d(h, w, text_lengths, self.freqs(text_lengths.device))


class Rope2D(PositionScheme):
    def rotary(self, h, w, text_lengths):
        return rope_2d(h, w, text_lengths, self.head_dim, self.theta)


class MRope(PositionScheme):
    def rotary(self, h, w, text_lengths):
        return rope_m(h, w, text_lengths, self.freqs(text_lengths.device))


class NoPosition(PositionScheme):
    """No position input here: LI-DiT's conv ResBlock (model.conv_pos) gives image tokens their place."""

    def text_rotary(self, positions: torch.Tensor) -> NoRotary:
        return NoRotary()


# model.pos_embed -> the scheme, built from (head_dim, theta, ladder), and base_size, max_size where its
# traits take the APE options (fusedit.config.VARIANTS; fusedit.models.register_position_scheme adds one).
POSITION_SCHEMES: dict[str, type[PositionScheme]] = {
    "ape": APE,
    "1d-rope": Rope1D,
    "2d-rope": Rope2D,
    "m-rope": MRope,
    "none": NoPosition,
}


# ------------------------------------------------------------------ RoPE layout variants (build time)


class _Wrapped(PositionScheme):
    """A position scheme that changes one aspect of another's rotation and delegates the rest."""

    def __init__(self, inner: PositionScheme):
        super().__init__(inner.head_dim, inner.theta, inner.ladder)
        self.inner = inner

    def add_absolute(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.inner.add_absolute(x, h, w)

    @property
    def max_grid(self) -> int | None:
        return self.inner.max_grid

    def rotary(self, h: int, w: int, text_lengths: torch.Tensor) -> Rotary | NoRotary:
        return self.inner.rotary(h, w, text_lengths)

    def text_rotary(self, positions: torch.Tensor) -> Rotary | NoRotary:
        return self.inner.text_rotary(positions)


class ImageOnlyRotary(_Wrapped):
    """``model.rope_layout=image-only``: only image tokens are rotated, at positions from 0 (no text offset);
    text keys a design projects itself stay unrotated. The public FuseDiT code's shallow baselines."""

    def rotary(self, h: int, w: int, text_lengths: torch.Tensor) -> Rotary | NoRotary:
        return self.inner.rotary(h, w, torch.zeros_like(text_lengths))

    def text_rotary(self, positions: torch.Tensor) -> NoRotary:
        return NoRotary()


class LeftPaddedRotary(_Wrapped):
    """``model.rope_left_pad=P``: image rotations as the public FuseDiT code computed them for prompts
    left-padded to P tokens (Gemma's tokenizers pad on the left): its real text tokens sat at positions
    P - L .. P - 1 while the image positions still started at the unpadded length L.

    Here the text keys arrive rotated at 0 .. L - 1 by the LLM's 1D RoPE, so every image query and key is
    rotated back by the LLM's angles for P - L positions instead: image-text angle differences then equal
    the public code's, and image-image ones are unchanged (both sides move alike). For 2D RoPE, whose image
    frequencies differ from the text's, no position shift could do this; an angle shift does.
    """

    def __init__(self, inner: PositionScheme, pad_to: int):
        super().__init__(inner)
        self.pad_to = pad_to

    def rotary(self, h: int, w: int, text_lengths: torch.Tensor) -> Rotary:
        rot = self.inner.rotary(h, w, text_lengths)
        pad = (self.pad_to - text_lengths).float()  # (B,)
        shift = -pad[:, None] * self.freqs(text_lengths.device)  # (B, head_dim / 2)
        shift = torch.cat([shift, shift], dim=-1)[:, None, None]  # rotate-half layout, (B, 1, 1, head_dim)
        cos, sin = shift.cos(), shift.sin()
        # Rotations compose by adding angles: cos(a + b), sin(a + b).
        return Rotary(rot.cos * cos - rot.sin * sin, rot.sin * cos + rot.cos * sin)
