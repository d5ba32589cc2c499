import pytest
import torch

from fusedit.config import ConfigError
from fusedit.flow import (
    caption_keep,
    flow_loss,
    guided,
    interpolate,
    sample,
    sample_training_times,
    sampling_times,
    shift_time,
    velocity_target,
)


def test_time_convention():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1 is noise
    assert torch.equal(velocity_target(x0, noise), noise - x0)
    # d x_t / dt = v: a finite difference of the path equals the target velocity
    t = torch.full((3,), 0.3)
    fd = (interpolate(x0, noise, t + 1e-3) - interpolate(x0, noise, t)) / 1e-3
    torch.testing.assert_close(fd, velocity_target(x0, noise), atol=1e-2, rtol=1e-2)
    assert flow_loss(noise - x0, x0, noise).item() == 0.0


def test_shift_and_training_times():
    t = torch.linspace(0, 1, 11)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and torch.all(s >= t)  # shift > 1 moves time toward noise
    torch.testing.assert_close(shift_time(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    g = torch.Generator().manual_seed(0)
    ts = sample_training_times(20000, g, shift=3.0)
    assert ts.min() > 0 and ts.max() < 1
    assert abs(ts.median().item() - 0.75) < 0.02  # median of logit-normal(0,1) is 0.5, shifted to 0.75
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_training_times(8, g1), sample_training_times(8, g2))


def test_euler_and_heun_are_exact_where_they_should_be():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    # A straight path has a constant velocity: Euler recovers the data exactly in any number of steps.
    out = sample(lambda x, t: noise - x0, noise, steps=3, sampler="euler")
    torch.testing.assert_close(out, x0)
    # v = t * a integrates to x(0) = x(1) - a / 2; Heun's trapezoid rule is exact for linear v(t).
    a = torch.randn(2, 3)
    out = sample(lambda x, t: t[:, None] * a, noise, steps=4, sampler="heun")
    torch.testing.assert_close(out, noise - a / 2)
    times = sampling_times(4, shift=1.0)
    torch.testing.assert_close(times, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_guidance_combines_branches():
    def velocity(x, t):  # rows [u ; c]: negative branch 1, conditional branch 3
        half = x.shape[0] // 2
        return torch.cat([torch.full_like(x[:half], 1.0), torch.full_like(x[half:], 3.0)])

    v = guided(velocity, 6.0)(torch.zeros(2, 4), torch.ones(2))
    assert torch.all(v == 1.0 + 6.0 * (3.0 - 1.0))


def test_caption_dropout_rate_and_determinism():
    keep = caption_keep(4000, 0.1, torch.Generator().manual_seed(0))
    assert len(keep) == 4000 and 300 < keep.count(False) < 500
    assert keep == caption_keep(4000, 0.1, torch.Generator().manual_seed(0))
    assert all(caption_keep(50, 0.0)) and not any(caption_keep(50, 1.0))


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("steps", [1, 2, 7, 25, 50])
def test_diffusers_schedule_is_the_schedulers_own_spacing(steps, shift):
    """sample.schedule=diffusers: the sigmas of FlowMatchEulerDiscreteScheduler.set_timesteps(steps), as the
    public FuseDiT pipeline samples, exactly (it shifts its spacing's endpoints, then the times again)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    times = sampling_times(steps, shift, schedule="diffusers")
    assert times.dtype == torch.float32 and torch.equal(times, scheduler.sigmas)
    if steps > 1 and shift > 1:  # the two spacings differ: diffusers' last step starts much closer to 0
        assert times[-2] < sampling_times(steps, shift)[-2]


def test_unknown_schedule_is_named():
    with pytest.raises(
        ValueError, match=r"unknown sampling schedule 'karras' \(allowed: uniform, diffusers\)"
    ):
        sampling_times(4, schedule="karras")


@pytest.mark.parametrize("shift", [0.0, -1.0, float("nan"), float("inf")])
def test_a_shift_that_is_not_positive_is_named(shift):
    """shift_time(1, 0) is 0/0 and a negative shift divides by zero inside (0, 1): the sampler returned NaN
    or garbage without a word."""
    with pytest.raises(
        ValueError, match=rf"sampling shift must be a finite number > 0 \(1 = none\), got {shift}"
    ):
        sample(lambda x, t: x, torch.ones(1, 2), steps=3, shift=shift)


@pytest.mark.parametrize("steps", [2.5, 0, True, "4"])
def test_a_step_count_that_is_not_a_whole_number_is_one_line(steps):
    """torch.linspace failed on 2.5 with its own multi-line TypeError (helper-115 R6); the setting is the
    user's, so the CLI reports it in one line (a ConfigError), as every other whole-number check."""
    with pytest.raises(ConfigError) as e:
        sample(lambda x, t: x, torch.ones(1, 2), steps=steps)
    assert str(e.value) == f"steps={steps!r} is not allowed (allowed: an integer >= 1)"
