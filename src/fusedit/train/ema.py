"""Exponential moving average of the trainable weights, kept in float32.

Under FSDP2 the model's state dict holds DTensor shards, and so does the EMA: each rank averages only its
own shard (no communication), and checkpoints save it sharded like the weights. With ``offload`` (a whole
model, train.ema_offload) the average lives in host memory and each update copies the weights there: CUDA
weights through pinned buffers that torch's host allocator keeps cached (about one more copy of the weights
in host memory), so the copies run without waiting and one synchronize per device waits for them all.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.adapters import merged_state_dict


class EMA:
    """The average of what the model computes: with LoRA adapters (fusedit.adapters) it averages the
    merged weights under their plain names, so the EMA is always a model without adapters, and it carries
    over unchanged when a stage adds or merges adapters."""

    def __init__(self, model: nn.Module, decay: float, offload: bool = False):
        self.decay = decay
        self.device = torch.device("cpu") if offload else None  # None: each tensor where its weight is
        self.shadow = {k: self._held(v) for k, v in merged_state_dict(model).items()}

    def _held(self, value: torch.Tensor) -> torch.Tensor:
        if self.device is None:
            return value.detach().float().clone()
        if getattr(value, "device_mesh", None) is not None:
            raise ValueError("an offloaded EMA holds whole tensors, not FSDP shards (train.ema_offload)")
        return value.detach().to(self.device, torch.float32, copy=True)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        state = merged_state_dict(model)
        if self.device is not None:
            state = self._copied_here(state)
        # One multi-tensor kernel per kind of tensor on a GPU (the same lerp per element): a loop launched one
        # per tensor, a few hundred per update of an 18-layer DiT. DTensor shards and plain tensors (an FSDP
        # model's unsharded buffers) cannot share one multi-tensor call.
        groups: dict[type, tuple[list, list]] = {}
        for k, v in state.items():
            if v.is_floating_point():
                shadows, values = groups.setdefault(type(v), ([], []))
                shadows.append(self.shadow[k])
                values.append(v.float())
            else:
                self.shadow[k].copy_(v)
        for shadows, values in groups.values():
            torch._foreach_lerp_(shadows, values, 1 - self.decay)

    def _copied_here(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` copied to the host: CUDA tensors queued without waiting (into pinned memory), then each
        CUDA device they came from synchronized, not only the current one (train.device=cuda:1 in one
        process never makes it current); other devices' copies wait by themselves."""
        copied = {
            k: v.detach().to(self.device, non_blocking=v.device.type == "cuda") for k, v in state.items()
        }
        for device in {v.device for v in state.values() if v.device.type == "cuda"}:
            torch.cuda.synchronize(device)
        return copied

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
