"""Hugging Face formats for fusedit models: a diffusers pipeline folder that diffusers, transformers and
fusedit all read, and that rebuilds the model without any fusedit YAML.

    model_index.json             FuseDiTPipeline and the library and class of every component
    transformer/                 FuseDiTTransformer2DModel: config.json (the fusedit architecture: the Config
                                 sections the model needs, each LLM's transformers config and hub id) and
                                 diffusion_pytorch_model.safetensors (the denoiser)
    text_encoder/, tokenizer/    the frozen LLM (cut after the deepest layer the design reads) and its
                                 tokenizer; text_encoder_2/, tokenizer_2/, ... for further LLMs (LI-DiT)
    pooled_text_encoder/, pooled_tokenizer/   the CLIP text model of the clip-mod study, when there is one
    vae/                         diffusers AutoencoderKL, or IdentityVAE (pixel space: a config, no weights)
    scheduler/                   FlowMatchEulerDiscreteScheduler with fusedit's ``sample.shift``

The classes here are the custom components model_index.json names as ``["fusedit.hub", class]``: diffusers
imports them from this module, which ``fusedit.pipeline`` imports, so loading through ``FuseDiTPipeline``
always finds them. Imports point one way, pipeline -> hub: the functions that write and read whole folders
(``save_pretrained``, ``from_pretrained``, ``export_run``) live in ``fusedit.pipeline``.
"""

from __future__ import annotations

import copy
import json

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from transformers import AutoConfig, PretrainedConfig

from fusedit.config import Config, ConfigError, is_shallow, saved_config, text_sections, to_dict
from fusedit.layers.mlp import FusedGatedMLP
from fusedit.models import build_denoiser
from fusedit.models.blocks import FusedImageAttention
from fusedit.text.context import TextContext
from fusedit.text.llm import llm_config
from fusedit.text.spec import LLMSpec
from fusedit.vae import IdentityAutoencoder

# The Config sections a saved model needs: the architecture, the text side (templates, lengths, hub ids),
# the latent space, the defaults sampling uses, and the plugins that register its variants (loading the
# folder imports them, as a run's saved config does). `train` and the data pipeline stay with the run.
EXPORTED_SECTIONS = ("name", "model", "text", "extra_text", "pooled_text", "vae", "flow", "sample", "plugins")


def export_config(cfg: Config) -> dict:
    """The Config sections a saved model records (JSON-ready), with data.image_size as its native size and
    data.max_objects (the shapes world it learnt, which `fusedit eval --bench shapes` draws from)."""
    full = to_dict(cfg)
    out = {key: copy.deepcopy(full[key]) for key in EXPORTED_SECTIONS}
    out["data"] = {"image_size": cfg.data.image_size, "max_objects": cfg.data.max_objects}
    return out


def llm_records(cfg: Config) -> list[dict]:
    """Each LLM's hub id (None for a random-init one) and its *full* transformers config.

    The full config, not the truncated one the text encoder is saved with: the denoiser resolves negative
    hidden-layer indices and its default depth against the LLM's real layer count."""
    return [
        {
            "model_id": t.model_id or None,
            "config": json.loads(llm_config(t, key=key).to_json_string(use_diff=False)),
        }
        for key, t in text_sections(cfg)
    ]


def hf_config(record: dict) -> PretrainedConfig:
    """A transformers config from an ``llm_records`` entry, without any download."""
    fields = dict(record["config"])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


class FuseDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A fusedit denoiser (any design) as a diffusers model.

    Its config is the whole architecture: ``fusedit`` (the Config sections of ``export_config``), ``llms``
    (``llm_records``) and ``pooled_dim`` (the CLIP width of clip-mod). ``forward(hidden_states, timestep,
    text)`` is fusedit's: latents (B, C, H, W), timestep = t in [0, 1] with 1 = noise (diffusers' sigma, not
    its 0..1000 timesteps), text = the TextContext of ``TextToImage.encode_prompts``; it returns the flow
    velocity noise - x0."""

    @register_to_config
    def __init__(self, fusedit: dict, llms: list, pooled_dim: int | None = None):
        super().__init__()
        cfg = saved_config(copy.deepcopy(dict(fusedit)), "the transformer's recorded config")
        texts = [cfg.text, *cfg.extra_text]
        if len(llms) != len(texts):
            raise ConfigError(
                f"transformer config lists {len(llms)} LLM config(s) for {len(texts)} text encoder(s)"
            )
        specs = [LLMSpec.from_hf(hf_config(r), deep=not is_shallow(cfg.model.design)) for r in llms]
        self.denoiser = build_denoiser(
            cfg.model,
            specs[0],
            cfg.vae.latent_channels,
            extra_llms=tuple(specs[1:]),
            hidden_layers=tuple(t.hidden_layer for t in texts),
            pooled_dim=pooled_dim,
        )

    @classmethod
    def from_denoiser(cls, denoiser: torch.nn.Module, cfg: Config, pooled_dim: int | None = None):
        """Wrap a built denoiser, sharing its weights. The recorded config is first rebuilt on the meta device
        (no memory, no init cost) and must give the same parameter names and shapes, so what is saved
        always reloads into this architecture. A denoiser in its sampling form (fused projections:
        ``fusedit.sampling.source.load_sampling_model``, ``fusedit.sampling.generation.to_sampling_form``) is
        refused in one line: it only samples, and its parameter names are not the architecture's."""
        if any(isinstance(m, (FusedImageAttention, FusedGatedMLP)) for m in denoiser.modules()):
            raise ValueError(
                "this denoiser is in its sampling form (fused projections, as "
                "fusedit.sampling.source.load_sampling_model and "
                "fusedit.sampling.generation.to_sampling_form leave it), which only "
                "fusedit.sampling.generation.generate takes: a pipeline or an export needs the model "
                "fusedit.checkpoints.load_model returns"
            )
        with torch.device("meta"):
            wrapper = cls(export_config(cfg), llm_records(cfg), pooled_dim)
        want = {k: tuple(v.shape) for k, v in wrapper.denoiser.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in denoiser.state_dict().items()}
        if want != have:
            key = sorted(set(want.items()) ^ set(have.items()))[0][0]
            raise ValueError(
                f"the config does not describe this denoiser (first difference at {key!r}: config "
                f"{want.get(key)}, model {have.get(key)})"
            )
        wrapper.denoiser = denoiser
        return wrapper

    def fusedit_config(self) -> Config:
        """The recorded sections as a validated fusedit Config (train/data at their defaults)."""
        return saved_config(copy.deepcopy(dict(self.config.fusedit)), "the transformer's recorded config")

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor | float, text: TextContext, return_dict=True
    ):
        t = torch.as_tensor(timestep, device=hidden_states.device, dtype=torch.float32)
        v = self.denoiser(hidden_states, t.expand(hidden_states.shape[0]), text)
        return Transformer2DModelOutput(sample=v) if return_dict else (v,)


class IdentityVAE(IdentityAutoencoder, ModelMixin, ConfigMixin):
    """The pixel-space "VAE" (fusedit's IdentityAutoencoder, whose encode and decode it takes) as a
    diffusers component: latents are the images in [-1, 1]; decode clamps. It has no weights, so its folder
    is just config.json."""

    @register_to_config
    def __init__(self, latent_channels: int = 3):
        super().__init__()
        # An empty non-persistent buffer gives the module a device and dtype: diffusers' pipeline.device and
        # .dtype read them off every component's first tensor and fail on a module with none.
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @property
    def channels(self) -> int:
        return self.config.latent_channels

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # ModelMixin.from_pretrained insists on a weights file; the config is all there is. Loading options
        # meant for weights (dtype, device_map, variant, ...) have nothing to act on.
        hub = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        config = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in hub if k in kwargs})
        return cls.from_config(config)
