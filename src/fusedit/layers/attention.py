"""The single place that calls scaled-dot-product attention and chooses its kernel.

Image queries attend to [text K/V ; image K/V]. Text rows are never computed here: in deep fusion they
are the frozen LLM's own causal forward, computed once per prompt batch (design-space.md s.1), so the
only mask left is a key-padding mask over the text part, (B, 1, 1, T + N), and none at all when the batch
has no padding. No dense (T + N) x (T + N) mask is ever built. The other callers pass masks of the same
kind: cross-attention's key padding (B, 1, 1, T) and LI-DiT's refiner's, (B, 1, 1, T), or (B, 1, T, T) in
its causal ablation.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


# "auto" tries these in order. cuDNN first: on an H200 at head_dim 256 with one KV head, forward + backward
# over [256 text ; 1024 image] keys, it takes 1.84 ms against flash's 2.84 (benchmarks/RESULTS.md); a
# backend that cannot take a call (a mask, a head_dim, a dtype, the CPU) passes it to the next.
AUTO_ORDER = ("cudnn", "flash", "efficient", "math")

# Whether sdpa_kernel takes a priority order (torch >= 2.6): a property of the installed torch, read once.
SDPA_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def _auto_order_context() -> contextlib.AbstractContextManager:
    return sdpa_kernel([BACKENDS[b] for b in AUTO_ORDER], set_priority=True)


def _one_backend_context(name: str) -> contextlib.AbstractContextManager:
    return sdpa_kernel(BACKENDS[name])


def resolve_backend(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """``backend_context(name)`` resolved once (a model does it when it is built): a callable giving a
    fresh context per use. Module-level functions only, so a model holding it still copies and pickles."""
    if name == "auto":  # torch < 2.6 takes no priority order: then its own order
        return _auto_order_context if SDPA_SET_PRIORITY else contextlib.nullcontext
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (allowed: auto, {', '.join(BACKENDS)})")
    return functools.partial(_one_backend_context, name)


def backend_context(name: str) -> contextlib.AbstractContextManager:
    """``sdpa_kernel`` for an explicit backend name; "auto" gives the AUTO_ORDER priority list."""
    return resolve_backend(name)()


def keep_keys(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) bool key mask -> (B, 1, 1, T) bool keep-mask, the same for every head and query; None stays
    None (nothing masked)."""
    return None if mask is None else mask[:, None, None, :]


def key_padding_mask(text_mask: torch.Tensor | None, num_image: int) -> torch.Tensor | None:
    """(B, T) bool text mask -> (B, 1, 1, T + N) bool keep-mask over [text ; image] keys, or None."""
    if text_mask is None:
        return None
    return keep_keys(torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], num_image)], dim=1))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q (B, H, N, d); k, v (B, KVH, S, d) with H a multiple of KVH (MQA/GQA); mask a bool keep-mask
    broadcastable to (B, 1, N, S): (B, 1, 1, S) key padding, or (B, 1, N, S) for the causal refiner.

    Returns (B, N, H * d).
    """
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2).flatten(2)
