"""Sampling: prompt -> image, and the library side of `fusedit sample` and `fusedit serve`.

- ``generation``: ``generate`` (prompts -> images by the flow sampler, the text encoded once per batch),
  ``sample_settings`` (a model's recorded sampling settings as ``generate`` keywords), ``seeded_noise`` and
  ``latent_shape`` (the per-image noise of `fusedit sample`), ``to_sampling_form``.
- ``source``: ``load_sampling_model`` reads a run, checkpoint or diffusers pipeline folder and returns the
  model in its sampling form.
- ``folder``: ``write_sample_folder`` writes (and resumes) the output folder of `fusedit sample`.
- ``serve``: `fusedit serve`, the local web demo (its page is ``serve_page.html``).

The diffusers pipeline and its folder formats stay ``fusedit.pipeline`` and ``fusedit.hub``: exported
folders name their classes by those module paths.
"""

from fusedit.sampling.folder import write_sample_folder
from fusedit.sampling.generation import generate, latent_shape, sample_settings, seeded_noise
from fusedit.sampling.source import load_sampling_model

__all__ = [
    "generate",
    "latent_shape",
    "load_sampling_model",
    "sample_settings",
    "seeded_noise",
    "write_sample_folder",
]
