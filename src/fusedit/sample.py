"""Prompt -> image. Used by `fusedit sample`, the demo, evaluation and training previews.

With ``cache_text`` (the default) the LLM runs once per prompt batch, negative prompts included (they are
just more rows of the batch), and its per-layer K/V serve every step and both guidance branches. Without
it the LLM runs again at every step, which gives the same images at several times the cost: the test suite
checks that equality for every position scheme.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fusedit.config import Config, ConfigError
from fusedit.flow import guided, sample
from fusedit.flow.samplers import Velocity
from fusedit.models.inference import prepare_for_sampling
from fusedit.system import TextToImage, uses_bf16
from fusedit.text.context import TextContext


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of sampling (sample.precision): bf16, or None for plain fp32."""
    return torch.bfloat16 if uses_bf16(precision, device) else None


def to_sampling_form(model: TextToImage, cfg: Config) -> TextToImage:
    """Turn a loaded model that will only sample into its faster sampling form (sample.fuse_projections,
    sample.bf16_weights; fusedit.models.inference) with compiled blocks (sample.compile): the same images
    within bf16 rounding. The LLM is not compiled: with the text cache it runs once per prompt batch."""
    device = next(model.denoiser.parameters()).device
    bf16 = cfg.sample.bf16_weights and sampling_dtype(cfg.sample.precision, device) == torch.bfloat16
    prepare_for_sampling(model.denoiser, torch.bfloat16 if bf16 else None, fuse=cfg.sample.fuse_projections)
    model.compile_parts(cfg.sample.compile, llm=False)
    return model


def text_velocity(
    denoiser: nn.Module,
    text: TextContext | Callable[[], TextContext],
    guidance: float,
    dtype: torch.dtype | None,
    cuda_graphs: bool = False,
) -> Velocity:
    """The velocity the sampler integrates: the denoiser under autocast ``dtype`` (None = plain fp32; the
    sampler's own arithmetic stays fp32) over a text context computed once (the text cache) or by a
    function called at every step, with classifier-free guidance when guidance != 1 (the context's rows are
    then [negative ; prompt]). ``cuda_graphs`` replays it as a CUDA graph (CUDAGraphVelocity) where one
    can be captured: with the text cache, on a GPU."""
    device_type = next(denoiser.parameters()).device.type
    cached = isinstance(text, TextContext)
    context_now = (lambda: text) if cached else text

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        context = context_now()  # outside autocast, as the cached context was computed
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return denoiser(x, t, context).float()

    v = guided(velocity, guidance) if guidance != 1.0 else velocity
    return CUDAGraphVelocity(v) if cuda_graphs and cached and device_type == "cuda" else v


class CUDAGraphVelocity:
    """A velocity function replayed as one CUDA graph (sample.cuda_graphs): every kernel of a step is
    launched at once, which matters when a small batch leaves the GPU waiting on Python and launches.

    The first ``warmup`` calls run normally on a side stream (cuDNN plans, autotuning and the allocator
    settle outside the capture, as torch.cuda.graphs asks); the next one captures the step for inputs
    shaped like its x (B, C, H, W) and t (B,), and every call from then on copies its inputs into the
    graph's buffers and replays it. The graph reads the text context's tensors where they lie, so the
    context must be fixed for the whole run (the text cache)."""

    def __init__(self, velocity: Velocity, warmup: int = 2):
        self.velocity, self.warmup = velocity, warmup
        self.calls = 0
        self.graph = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                out = self.velocity(x, t)
            torch.cuda.current_stream(x.device).wait_stream(side)
            return out
        if self.graph is None:
            self.x, self.t = x.clone(), t.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.velocity(self.x, self.t)
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites self.out (Heun keeps two velocities)


def image_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels of an image size: one side (a square) or (height, width)."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def seeded_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(len(seeds), C, h, w) starting noise for latents of ``shape`` (C, h, w), row i drawn alone from
    seeds[i]: image i of a batch is then the image its prompt gives sampled alone with that seed
    (``fusedit sample``, ``serve``)."""
    rows = [torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(rows)


def latent_shape(model: TextToImage, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
    """(C, h, w) of the latents of an image of ``image_size`` (one side, or (height, width))."""
    ae = model.autoencoder
    height, width = image_shape(image_size)
    return ae.channels, height // ae.downsample, width // ae.downsample


def check_steps_guidance(steps: int | None, guidance: float | None, *, flags: bool = False) -> None:
    """One-line errors for a step count below 1 or a guidance scale that is negative or not finite (None:
    not given). Called before any slow work; ``flags`` names them as command-line flags (``--steps 0``)
    rather than keywords (``steps=0``)."""

    def named(key: str, value) -> str:
        return f"--{key} {value}" if flags else f"{key}={value!r}"

    if steps is not None and steps < 1:
        raise ConfigError(f"{named('steps', steps)} is not allowed (allowed: an integer >= 1)")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"{named('guidance', guidance)} is not allowed (allowed: a finite number >= 0)")


def sample_settings(cfg: Config, **overrides) -> dict:
    """``generate`` keyword arguments from a config's ``sample`` section and image size; an override of
    None keeps the config's value (so CLI flags can be passed straight through)."""
    s = cfg.sample
    settings = {
        "image_size": cfg.data.image_size,
        "steps": s.steps,
        "guidance": s.guidance,
        "sampler": s.sampler,
        "shift": s.shift,
        "schedule": s.schedule,
        "negative_prompt": s.negative_prompt,
        "cache_text": s.cache_text,
        "precision": s.precision,
        "cuda_graphs": s.cuda_graphs,
    }
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown sample setting(s) {sorted(unknown)} (allowed: {', '.join(settings)})")
    return {**settings, **{k: v for k, v in overrides.items() if v is not None}}


@torch.no_grad()
def generate(
    model: TextToImage,
    prompts: list[str],
    *,
    image_size: int | tuple[int, int],
    steps: int = 25,
    guidance: float = 6.0,
    sampler: str = "euler",
    shift: float = 1.0,
    schedule: str = "uniform",
    negative_prompt: str = "",
    seed: int = 42,
    cache_text: bool = True,
    precision: str = "auto",
    cuda_graphs: bool = False,
    noise: torch.Tensor | None = None,
    progress=None,
) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``prompts`` at ``image_size``: one side (a square) or (H, W).
    CFG is used when guidance != 1. ``cuda_graphs``
    replays each step as one CUDA graph (with the text cache on a GPU; elsewhere it changes nothing)."""
    denoiser, ae = model.denoiser, model.autoencoder
    device = next(denoiser.parameters()).device
    dtype = sampling_dtype(precision, device)
    if dtype is None and any(p.dtype == torch.bfloat16 for p in denoiser.parameters()):
        # Plain fp32 matmuls cannot take bf16 weights: torch would fail deep inside with a dtype mismatch.
        raise ValueError(
            f"precision {precision!r} samples in fp32, but the model holds bf16 weights (its sampling form "
            "under sample.bf16_weights); prepare it with sample.precision=fp32 or sample.bf16_weights=false, "
            "or sample with precision 'bf16'"
        )
    rows = [negative_prompt] * len(prompts) + list(prompts) if guidance != 1.0 else list(prompts)
    if cache_text:
        text = model.encode_prompts(rows)
    else:
        first = True

        def text():
            # The uncached baseline encodes at every step; its prompts are cut (and counted) once, as cached.
            nonlocal first
            if first:
                first = False
                return model.encode_prompts(rows)
            with model.uncounted():
                return model.encode_prompts(rows)

    velocity = text_velocity(denoiser, text, guidance, dtype, cuda_graphs)
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(prompts), *latent_shape(model, image_size), generator=gen)
    latents = sample(
        velocity, noise.to(device), steps, sampler=sampler, shift=shift, progress=progress, schedule=schedule
    )
    return ae.decode(latents)
