"""Every build-time registry (a variant is chosen when the model is built) names exactly the values its
config key allows: a value the config accepts always builds, and every registered variant is reachable."""

import pytest

from fusedit.config import ModelConfig, SampleConfig, TextConfig, choices_of
from fusedit.flow.samplers import SAMPLERS, SCHEDULES
from fusedit.layers.attention import BACKENDS
from fusedit.layers.modulation import MODULATED_NORMS, TIMESTEP_CONDITIONING
from fusedit.layers.position import POSITION_SCHEMES
from fusedit.models import DESIGNS
from fusedit.models.base import POOLED_TEXT
from fusedit.text.refiner import CONCATS
from fusedit.text.templates import TEMPLATES


@pytest.mark.parametrize(
    ("section", "key", "registry"),
    [
        (ModelConfig, "design", DESIGNS),
        (ModelConfig, "pos_embed", POSITION_SCHEMES),
        (ModelConfig, "timestep_conditioning", TIMESTEP_CONDITIONING),
        (ModelConfig, "adaln_norm", MODULATED_NORMS),
        (ModelConfig, "refiner_concat", CONCATS),
        (ModelConfig, "attention_backend", {"auto": None, **BACKENDS}),  # auto: the AUTO_ORDER priority list
        (ModelConfig, "pooled_text", POOLED_TEXT),
        (SampleConfig, "sampler", SAMPLERS),
        (SampleConfig, "schedule", SCHEDULES),
        (TextConfig, "template", TEMPLATES),
    ],
)
def test_a_registry_names_what_its_config_key_allows(section, key, registry):
    assert sorted(choices_of(section, key)) == sorted(registry)


def test_bench_names_the_kernels_that_ran_as_model_attention_backend_does():
    """A bench record's attention_kernels (read from the profiler) use the backend names a user sets."""
    from fusedit.bench import SDPA_KERNELS

    assert sorted(SDPA_KERNELS) == sorted(BACKENDS)
