"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32. ``affine=False`` gives a parameter-free norm."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)


def layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """The parameter-free LayerNorm that adaLN modulates (DiT)."""
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
