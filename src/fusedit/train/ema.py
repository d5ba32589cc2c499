"""Exponential moving average of the trainable weights, kept in float32.

Under FSDP2 the model's state dict holds DTensor shards, and so does the EMA: each rank averages only its
own shard (no communication), and checkpoints save it sharded like the weights. With ``offload`` (a whole
model, train.ema_offload) the average lives in host memory and each update runs beside training: the
weights are copied to the host on a stream of the EMA's own (CUDA weights into pinned buffers that torch's
host allocator keeps cached: about one more copy of the weights in host memory), beside the next step's
forward and backward, and a host thread waits for those copies and does the lerp. The weights must not
change until they are copied: the training loop calls ``settle`` before each optimizer step (the training
stream then waits for the copies on the GPU; the host goes on). Reading the average waits for it.
"""

from __future__ import annotations

import threading

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
        self._shadow = {k: self._held(v) for k, v in merged_state_dict(model).items()}
        # The host thread of an offloaded update still running, and what it raised.
        self._updating: threading.Thread | None = None
        self._failed: BaseException | None = None
        # Per CUDA device: the EMA's copy stream, and the event that ends the copies still pending on it.
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._copies: list = []

    def _held(self, value: torch.Tensor) -> torch.Tensor:
        if self.device is None:
            return value.detach().float().clone()
        if getattr(value, "device_mesh", None) is not None:
            raise ValueError("an offloaded EMA holds whole tensors, not FSDP shards (train.ema_offload)")
        return value.detach().to(self.device, torch.float32, copy=True)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights by 1 - decay; offloaded, this returns once the
        copies are queued and the lerp runs on a host thread."""
        state = merged_state_dict(model)
        if self.device is None:
            _lerp(self._shadow, state, 1 - self.decay)
            return
        self.wait()  # one host update at a time: each writes the whole average
        copied, events = self._copied_here(state)
        self._updating = threading.Thread(
            target=self._host_update, args=(copied, events, 1 - self.decay), name="fusedit-ema"
        )
        self._updating.start()

    def _host_update(self, copied: dict[str, torch.Tensor], events: list, weight: float) -> None:
        try:
            for event in events:
                with torch.cuda.device(event.device):  # not the thread's default device (cuda:0)
                    event.synchronize()  # without the GIL, yielding the core: training goes on
            with torch.no_grad():  # grad mode is per thread
                _lerp(self._shadow, copied, weight)
        except BaseException as error:  # handed to the training thread at its next wait()
            self._failed = error

    def _copied_here(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
        """``state`` copied to the host and an event per CUDA device to wait for. CUDA tensors are queued
        without waiting (into pinned memory) on the EMA's stream of their device (each device, not only the
        current one: train.device=cuda:1 in one process never makes it current), after what that device's
        training stream has queued (the optimizer step that made them); host tensors are copied now, a
        snapshot the optimizer's next step cannot change under the host thread."""
        copied = {
            k: v.detach().to(self.device, copy=True) for k, v in state.items() if v.device.type != "cuda"
        }
        self._copies = []
        for device in {v.device for v in state.values() if v.device.type == "cuda"}:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            stream = self._streams[device]
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for k, v in state.items():
                    if v.device == device:
                        copied[k] = v.detach().to(self.device, non_blocking=True)
                        # Read on this stream: the allocator must not hand a merged LoRA weight's memory
                        # (a temporary) to the training stream before the copy is done.
                        v.record_stream(stream)
            event = torch.cuda.Event(blocking=True)
            event.record(stream)
            self._copies.append(event)
        return copied, list(self._copies)

    def settle(self) -> None:
        """Before the weights change in place (the optimizer's step, a stage merging adapters): each training
        stream waits, on the GPU, for the copies an offloaded update still has pending (nothing to do
        otherwise; the host does not wait)."""
        for event in self._copies:
            torch.cuda.current_stream(event.device).wait_event(event)
        self._copies = []

    @property
    def busy(self) -> bool:
        """Whether an offloaded update is still running."""
        return self._updating is not None and self._updating.is_alive()

    def wait(self) -> None:
        """Finish an offloaded update still running (nothing to do otherwise); raises what it raised."""
        if self._updating is not None:
            self._updating.join()
            self._updating = None
        if self._failed is not None:
            error, self._failed = self._failed, None
            raise RuntimeError(f"the host-held EMA's update failed (train.ema_offload): {error}") from error

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        return self._shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait()
        missing = set(self._shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: differing keys {sorted(missing)[:3]}")
        self._shadow = {k: _like(self._shadow[k], v) for k, v in state.items()}


def _lerp(shadow: dict[str, torch.Tensor], state: dict[str, torch.Tensor], weight: float) -> None:
    """``shadow`` += weight * (``state`` - ``shadow``) for float tensors; other tensors are copied.

    One multi-tensor kernel per kind of tensor on a GPU (the same lerp per element): a loop launched one per
    tensor, a few hundred per update of an 18-layer DiT. DTensor shards and plain tensors (an FSDP model's
    unsharded buffers) cannot share one multi-tensor call."""
    groups: dict[type, tuple[list, list]] = {}
    for k, v in state.items():
        if v.is_floating_point():
            shadows, values = groups.setdefault(type(v), ([], []))
            shadows.append(shadow[k])
            values.append(v.float())
        else:
            shadow[k].copy_(v)
    for shadows, values in groups.values():
        torch._foreach_lerp_(shadows, values, weight)


def _like(current: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as a float32 copy laid out like ``current``: a full tensor (a single-process checkpoint)
    is sharded the way the current DTensor is."""
    mesh = getattr(current, "device_mesh", None)
    if mesh is not None and getattr(value, "device_mesh", None) is None:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.float().to(current.device), mesh, current.placements)
    return value.float().clone().to(current.device)
