"""The DiT's feed-forward network: the LLM's gated MLP shape (gate/up/down and its activation)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """A GatedMLP whose gate and up projections run as one matmul of the concatenated weights
    (B, N, d) -> (B, N, 2 * hidden): the same function with one larger GEMM (inference-time form)."""

    def __init__(self, mlp: GatedMLP):
        super().__init__()
        weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        self.gate_up_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.gate_up_proj.weight = nn.Parameter(weight, requires_grad=False)
        self.down_proj, self.act = mlp.down_proj, mlp.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)
