"""Flow matching: the time convention, training targets and samplers. Imports only torch."""

from fusedit.flow.matching import (
    caption_keep,
    flow_loss,
    interpolate,
    sample_training_times,
    shift_time,
    velocity_target,
)
from fusedit.flow.samplers import SAMPLERS, SCHEDULES, guided, sample, sampling_times

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "caption_keep",
    "flow_loss",
    "guided",
    "interpolate",
    "sample",
    "sample_training_times",
    "sampling_times",
    "shift_time",
    "velocity_target",
]
