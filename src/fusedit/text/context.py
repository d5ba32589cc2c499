"""What the text side hands the denoiser: computed once per prompt batch, read at every step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TextRequest:
    """What a design needs from the LLM, fixed when the design is built."""

    # LLM layers whose post-RoPE attention keys/values the DiT layers read (deep fusion).
    kv_layers: tuple[int, ...] = ()


@dataclass
class TextContext:
    """A prompt batch as the denoiser sees it. T is the (possibly trimmed) padded text length.

    mask:    (B, T) bool, True on real tokens (right padding).
    lengths: (B,) long, unpadded lengths: image positions continue after them.
    kv:      per requested layer, (keys, values), each (B, KVH, T, head_dim); keys carry the LLM's RoPE.
    padded:  whether any row has padding; when False the denoiser needs no attention mask at all.
    """

    mask: torch.Tensor
    lengths: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    padded: bool = True

    @property
    def key_mask(self) -> torch.Tensor | None:
        return self.mask if self.padded else None
