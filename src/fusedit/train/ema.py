"""Exponential moving average of the trainable weights, kept in float32.

Under FSDP2 the model's state dict holds DTensor shards, and so does the EMA: each rank averages only its
own shard (no communication), and checkpoints save it sharded like the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.train.lora import merged_state_dict


class EMA:
    """The average of what the model computes: with LoRA adapters (fusedit.train.lora) it averages the
    merged weights under their plain names, so the EMA is always a model without adapters, and it carries
    over unchanged when a stage adds or merges adapters."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in merged_state_dict(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in merged_state_dict(model).items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.float(), 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:3]}")
        self.shadow = {k: _like(self.shadow[k], v) for k, v in state.items()}


def _like(current: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as a float32 copy laid out like ``current``: a full tensor (a single-process checkpoint)
    is sharded the way the current DTensor is."""
    mesh = getattr(current, "device_mesh", None)
    if mesh is not None and getattr(value, "device_mesh", None) is None:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.float().to(current.device), mesh, current.placements)
    return value.float().clone().to(current.device)
