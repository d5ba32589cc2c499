"""Flow matching: the time convention, training targets and samplers. Imports only torch and the config's
variant table (``register_sampler`` and ``register_schedule`` add the names sample.sampler and
sample.schedule allow)."""

from fusedit.flow.matching import (
    caption_keep,
    flow_loss,
    interpolate,
    sample_training_times,
    shift_time,
    velocity_target,
)
from fusedit.flow.samplers import (
    SAMPLERS,
    SCHEDULES,
    guided,
    register_sampler,
    register_schedule,
    sample,
    sampling_times,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "caption_keep",
    "flow_loss",
    "guided",
    "interpolate",
    "register_sampler",
    "register_schedule",
    "sample",
    "sample_training_times",
    "sampling_times",
    "shift_time",
    "velocity_target",
]
