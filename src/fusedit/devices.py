"""Moving host tensors to a device without making the host wait."""

from __future__ import annotations

import torch


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``. To a GPU through pinned memory, without waiting: a copy from
    pageable memory makes the host wait for every kernel queued before it, which on a training step's path
    (after the last step's AdamW) leaves the GPU idle while the host prepares the next inputs. The copy
    still runs in stream order, before any kernel that reads it, and torch's host allocator keeps the
    pinned buffer until it is done."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
