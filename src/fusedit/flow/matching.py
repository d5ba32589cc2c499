"""The one place that defines fusedit's time convention.

    t = 0 is data, t = 1 is noise, x_t = (1 - t) * x0 + t * noise, and the model predicts v = noise - x0,
    so dx_t/dt = v and sampling integrates from t = 1 down to t = 0.

This is rectified flow as trained by FuseDiT and SD3 (design-space.md s.3). Everything else in fusedit
(training loop, samplers, guidance) goes through these functions instead of restating the convention.
"""

from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: t' = shift * t / (1 + (shift - 1) * t). shift > 1 spends more time near noise."""
    return shift * t / (1 + (shift - 1) * t)


def sample_training_times(
    n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> torch.Tensor:
    """Logit-normal(mean, std) times, then the SD3 shift. Returns (n,) float32 in (0, 1) on the CPU. The
    defaults are the plain logit-normal without a shift; a run draws with its ``flow`` section's values
    (a shift of 3 unless set), which a loop of one's own should pass too."""
    u = torch.randn(n, generator=generator) * std + mean
    return shift_time(torch.sigmoid(u), shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample times t (B,), broadcast over the remaining dims of x0 (B, ...)."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Plain MSE between predicted and target velocity, in float32 whatever the compute dtype."""
    return torch.mean((v_pred.float() - velocity_target(x0, noise).float()) ** 2)


def caption_keep(n: int, p: float, generator: torch.Generator | None = None) -> list[bool]:
    """Whether each of n captions is kept; a dropped one (probability p) becomes "", so one model learns
    both CFG branches."""
    return (torch.rand(n, generator=generator) >= p).tolist()
