"""Samplers as pure functions over a velocity function ``v(x, t) -> v`` (t is (B,), 1 = noise).

Nothing here knows about models or text: guidance is a wrapper that turns a two-branch velocity into one,
and the caller decides how the branches are computed (for fusedit: one batch [negative ; prompt] over a
text context computed once, see ``fusedit.sampling.generation``).

A sampler (``SAMPLERS``, sample.sampler) is ``fn(velocity, x, times, progress=None) -> x``: it integrates
``x`` from ``times[0]`` down the (steps + 1,) times and calls ``progress()`` once after each step. A one-step
sampler's step reads only x and its own two times (euler, heun), so running it over ``times[i : i + 2]``
is step i of the whole run: the diffusers pipeline runs samplers so, one scheduler step at a time. A
schedule (``SCHEDULES``, sample.schedule) is ``fn(steps, shift) -> (steps + 1,)`` float64 times from 1 to
0 before the shift. ``register_sampler`` and ``register_schedule`` add one under a new name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fusedit.config import ConfigError, SamplerTraits, check_whole, register_variant
from fusedit.flow.matching import shift_time

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _uniform(steps: int, shift: float) -> torch.Tensor:
    """fusedit's spacing: t uniform from 1 to 0 (steps + 1 points)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def _diffusers(steps: int, shift: float) -> torch.Tensor:
    """diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(steps) at its defaults (1000 training
    timesteps, no dynamic shifting), which the public FuseDiT pipeline samples with: ``steps`` points evenly
    spaced between its largest and smallest *already shifted* training sigmas, 1 and shift(1/1000), then
    shifted (a second time) and followed by 0. Its last step starts close to the data: at 25 steps and
    shift 3 the final times are 0.22, 0.12, 0.009, 0, where uniform spacing gives 0.29, 0.21, 0.11, 0."""
    # Computed as the scheduler does, to the bit: its training sigmas in float32, the spacing in float64
    # over timesteps (sigma * 1000).
    sigma_min = float(shift_time(torch.tensor(1.0) / 1000, shift))
    spaced = torch.linspace(1000.0, sigma_min * 1000, steps, dtype=torch.float64) / 1000
    return torch.cat([spaced, torch.zeros(1, dtype=torch.float64)])


# sample.schedule: how the unshifted times are spaced before the SD3 shift (shift_time(0) = 0 keeps the end).
SCHEDULES = {"uniform": _uniform, "diffusers": _diffusers}


def sampling_times(
    steps: int, shift: float = 1.0, device: torch.device | str = "cpu", schedule: str = "uniform"
) -> torch.Tensor:
    """(steps + 1,) float32 times from 1 (noise) down to 0 (data): spaced by ``schedule`` (SCHEDULES), then
    the SD3 shift, computed in float64 and rounded once."""
    _check_times(steps, shift, schedule)
    return shift_time(SCHEDULES[schedule](steps, shift), shift).float().to(device)


def _check_times(steps: int, shift: float, schedule: str) -> None:
    # Not an integer, torch.linspace would fail with its own multi-line TypeError.
    check_whole("steps", steps)
    # shift_time(1, 0) is 0/0, and a negative shift divides by zero inside (0, 1): NaN images, no error.
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"sampling shift must be a finite number > 0 (1 = none), got {shift}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown sampling schedule {schedule!r} (allowed: {', '.join(SCHEDULES)})")


def check_sampling(steps: int, shift: float = 1.0, sampler: str = "euler", schedule: str = "uniform") -> None:
    """The one-line ConfigError ``sample`` would raise for these settings, for a caller that checks them
    before any slow work (``fusedit.sampling.generation.generate``, before the LLM's forward)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r} (allowed: {', '.join(SAMPLERS)})")
    _check_times(steps, shift, schedule)


def guided(velocity: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance: v = u + scale * (c - u).

    ``velocity`` is called once on the doubled batch [x ; x] and must return [u ; c] (negative-prompt
    rows first), so both branches share one forward pass.
    """

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u, c = velocity(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return u + scale * (c - u)

    return v


def euler(velocity: Velocity, x: torch.Tensor, times: torch.Tensor, progress: Callable | None = None):
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        x = x + (t_next - t) * velocity(x, t.expand(x.shape[0]))
        if progress is not None:
            progress()
    return x


def heun(velocity: Velocity, x: torch.Tensor, times: torch.Tensor, progress: Callable | None = None):
    """Heun's second-order method (two velocity calls per step). Unlike EDM's sigma parametrisation, the
    flow velocity is well defined at t = 0, so the last step is a full Heun step too."""
    for i in range(len(times) - 1):
        t, t_next = times[i], times[i + 1]
        dt = t_next - t
        v = velocity(x, t.expand(x.shape[0]))
        v_next = velocity(x + dt * v, t_next.expand(x.shape[0]))
        x = x + dt * 0.5 * (v + v_next)
        if progress is not None:
            progress()
    return x


SAMPLERS = {"euler": euler, "heun": heun}


def register_sampler(name: str, fn: Callable, *, one_step: bool) -> None:
    """``sample.sampler=name`` integrates with ``fn`` (the module docstring's signature). ``one_step``: each
    step reads only x and its own two times, so the diffusers pipeline may run it a step at a time (it
    refuses the others). A name already taken is a ConfigError."""
    register_variant("sample.sampler", name, SamplerTraits(one_step=one_step))
    SAMPLERS[name] = fn


def register_schedule(name: str, fn: Callable[[int, float], torch.Tensor]) -> None:
    """``sample.schedule=name`` spaces the sampling times with ``fn(steps, shift)``: (steps + 1,) float64
    times from 1 to 0, before the SD3 shift. A name already taken is a ConfigError."""
    register_variant("sample.schedule", name)
    SCHEDULES[name] = fn


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    steps: int,
    sampler: str = "euler",
    shift: float = 1.0,
    progress: Callable | None = None,
    schedule: str = "uniform",
) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` (t = 1) to data (t = 0) on ``sampling_times``.

    ``shift`` defaults to 1.0, no shift: the plain integrator. ``fusedit.sampling.generation.generate`` and
    the ``sample`` section (SampleConfig.shift) default to 3.0, so a call that gives only ``steps`` samples
    other times than ``generate`` does; pass the model's ``sample.shift`` (and ``sample.schedule``) to
    sample as it does. ``progress`` is called once after each step."""
    check_sampling(steps, shift, sampler, schedule)
    times = sampling_times(steps, shift, noise.device, schedule)
    return SAMPLERS[sampler](velocity, noise, times, progress)
