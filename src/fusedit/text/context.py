"""What the text side hands the denoiser: computed once per prompt batch, read at every step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TextRequest:
    """What a design needs from the LLM, fixed when the design is built."""

    # LLM layers whose post-RoPE attention keys/values the DiT layers read (deep fusion).
    kv_layers: tuple[int, ...] = ()
    # LLM layers whose pre-RoPE keys/values the DiT cross-attends to (the deep-fusion cross variant).
    raw_kv_layers: tuple[int, ...] = ()
    # One hidden state in transformers' `hidden_states` indexing (0 = embeddings, -1 = last, after the
    # final norm), for the shallow designs; None when unused.
    hidden_layer: int | None = None

    def layers_needed(self, num_layers: int) -> int:
        """How many leading LLM layers must run: the LLM is truncated after that."""
        needed = [i + 1 for i in (*self.kv_layers, *self.raw_kv_layers)]
        if self.hidden_layer is not None:
            needed.append(num_layers if self.hidden_layer < 0 else self.hidden_layer)
        return max(needed, default=0)


@dataclass
class TextContext:
    """A prompt batch as the denoiser sees it. T is the (possibly trimmed) padded text length.

    mask:    (B, T) bool, True on real tokens (right padding).
    lengths: (B,) long, unpadded lengths: image positions continue after them.
    kv:      per requested layer, (keys, values), each (B, KVH, T, head_dim); keys carry the LLM's RoPE.
    raw_kv:  the same without RoPE on the keys (``raw_kv_layers``).
    hidden:  (B, T, d_llm), the requested hidden state, or None.
    padded:  whether any row has padding; when False the denoiser needs no attention mask at all.
    """

    mask: torch.Tensor
    lengths: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    raw_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    padded: bool = True

    @property
    def key_mask(self) -> torch.Tensor | None:
        return self.mask if self.padded else None
