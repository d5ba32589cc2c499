"""Prompt -> image. Used by `fusedit sample`, the demo, evaluation and training previews.

``fusedit.sampling.source.load_sampling_model`` reads a model to sample with from a run, checkpoint or
diffusers pipeline folder (what `fusedit sample`, `serve` and `eval` take as MODEL), and
``fusedit.sampling.folder.write_sample_folder`` writes the images and per-image metadata of `fusedit sample`.

With ``cache_text`` (the default) the LLM runs once per prompt batch, on each distinct text of it once
(the negative prompt's rows are one text; an eval call's 4 images of one prompt another), and its
per-layer K/V serve every step and both guidance branches. Without
it the LLM runs again at every step, which gives the same images at several times the cost: the test suite
checks that equality for every position scheme.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fusedit.config import (
    SEED_MAX,
    Config,
    ConfigError,
    SampleConfig,
    check_fields,
    check_whole,
    is_whole,
    limits_text,
    pooled_tokenizes_builtin,
    text_sections,
    tokenizes_builtin,
    within_limits,
)
from fusedit.flow import guided, sample
from fusedit.flow.samplers import Velocity, check_sampling
from fusedit.models.inference import prepare_for_sampling
from fusedit.system import TextToImage, uses_bf16
from fusedit.text.context import PromptCut, TextContext
from fusedit.text.tokenizer import unknown_words

log = logging.getLogger(__name__)


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
    denoiser: nn.Module | Callable[[torch.Tensor, torch.Tensor, TextContext], torch.Tensor],
    text: TextContext | Callable[[], TextContext],
    guidance: float,
    dtype: torch.dtype | None,
    cuda_graphs: bool = False,
    device_type: str | None = None,
) -> Velocity:
    """The velocity the sampler integrates: the denoiser under autocast ``dtype`` (None = plain fp32; the
    sampler's own arithmetic stays fp32) over a text context computed once (the text cache) or by a
    function called at every step, with classifier-free guidance when guidance != 1 (the context's rows are
    then [negative ; prompt]). ``cuda_graphs`` replays it as a CUDA graph (CUDAGraphVelocity) where one
    can be captured: with the text cache, on a GPU. ``device_type``: where the denoiser computes (default:
    where its weights are; a pipeline under diffusers' model offload keeps them elsewhere until its forward
    moves them, so it names the device and passes a function)."""
    device_type = device_type or next(denoiser.parameters()).device.type
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
    return (size, size) if isinstance(size, numbers.Integral) else (size[0], size[1])


def check_image_size(image_size) -> None:
    """A one-line error for an image size that is neither a whole number of pixels >= 1 (a square) nor a
    (height, width) pair of them; whether the model takes that size is its own check (latent_shape's
    patch grid, side_fits)."""
    pair = isinstance(image_size, (tuple, list))
    sides = tuple(image_size) if pair else (image_size,)
    if (pair and len(sides) != 2) or not all(is_whole(side) and side >= 1 for side in sides):
        raise ConfigError(
            f"image_size={image_size!r} is not allowed (allowed: a whole number of pixels >= 1, or a "
            "(height, width) pair of them)"
        )


def check_prompts(prompts) -> list[str]:
    """``prompts`` as a list, refused in one line unless it is a non-empty list (or tuple) of strings: a
    bare string would be sampled one character at a time (TextEncoder.tokenize refuses it the same way)."""
    if isinstance(prompts, str):
        raise TypeError(
            f"prompts={prompts[:60]!r} is a single string (allowed: a list of prompts: [{prompts[:60]!r}])"
        )
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts={prompts!r:.80} is not allowed (allowed: a list of prompt strings)")
    if not prompts:
        raise ConfigError("no prompts to sample (allowed: a list of one or more prompts)")
    return list(prompts)


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


# A size of more than this many times the trained image's pixels is warned about (`fusedit sample`, `eval`,
# the pipeline): allowed, since a model may be tried past its size.
FAR_PAST_TRAINED = 16


def warn_far_past_trained(shape: tuple[int, int], cfg: Config, named: str) -> None:
    """Warn when (height, width) ``shape`` is far past the size ``cfg`` trained at: each step then processes
    that many times the image tokens, and attention their square, so a mistyped size looks like a hang.
    ``named`` says where the size came from (``--size 2048``, ``height=1024, width=1024``)."""
    trained = cfg.data.image_size
    ratio = shape[0] * shape[1] / trained**2
    if ratio > FAR_PAST_TRAINED:
        log.warning(
            "%s has %.0fx the pixels of the %d px the model trained at: each step processes that many times "
            "the image tokens (attention grows with their square), and the model never saw such sizes",
            named,
            ratio,
            trained,
        )


def check_steps_guidance(
    steps: int | None, guidance: float | None, *, flags: bool = False, guidance_key: str = "guidance"
) -> None:
    """One-line errors for a step count that is not an integer >= 1 or a guidance scale that is not a
    finite number >= 0 (None: not given). Called before any slow work; ``flags`` names them as
    command-line flags (``--steps 0``) rather than keywords (``steps=0``), and ``guidance_key`` is the
    guidance's keyword (the pipeline's ``guidance_scale``)."""

    def named(key: str, value) -> str:
        return f"--{key} {value}" if flags else f"{key}={value!r}"

    if steps is not None:
        check_whole("--steps" if flags else "steps", steps)
    # 1 samples the prompt alone (no unconditional branch) and 0 the negative prompt alone (v = u + 0 (c - u)
    # = u: unused_prompt_note); below 0 is no setting, NaN gives NaN images.
    if guidance is not None and (
        isinstance(guidance, bool)
        or not isinstance(guidance, numbers.Real)
        or not (math.isfinite(guidance) and guidance >= 0)
    ):
        raise ConfigError(f"{named(guidance_key, guidance)} is not allowed (allowed: a finite number >= 0)")


def check_seed(seed: int, images: int = 1, *, name: str = "seed") -> None:
    """A one-line error for a seed that is not an integer in 0..SEED_MAX, or one whose images' seeds (seed
    + i for image i of ``images``) would pass SEED_MAX. ``name`` is the setting as the error shows it: a
    keyword (``seed``, ``study 'x': seeds[1]``) or a command-line flag (``--seed``)."""
    top = SEED_MAX - (images - 1)
    whole = is_whole(seed)
    if not (whole and 0 <= seed <= top):
        named = f"{name} {seed}" if name.startswith("--") else f"{name}={seed!r}"
        why = f" for {images} images: image i takes seed + i" if images > 1 else ""
        problem = "is out of range" if whole else "is not an integer"
        raise ConfigError(f"{named} {problem} (allowed: 0..{top}{why})")


def check_negative_prompt(negative_prompt: str | None, guidance: float, *, flags: bool = False) -> None:
    """Guidance 1 samples the prompt alone (no unconditional branch): a negative prompt would change
    nothing, yet be recorded beside each image as if it had. None or "": none given. ``flags`` names them
    as command-line flags (``--negative-prompt``) rather than keywords (``negative_prompt=``)."""
    if not negative_prompt or guidance != 1.0:
        return
    if flags:
        raise ConfigError(
            f"--negative-prompt {negative_prompt!r} does nothing at guidance 1 (no unconditional branch; "
            "allowed with a --guidance other than 1)"
        )
    raise ConfigError(
        f"negative_prompt={negative_prompt!r} does nothing at guidance={guidance!r} (no unconditional "
        "branch; allowed: negative_prompt='', or a guidance other than 1)"
    )


def negative_read(settings: dict) -> str:
    """The negative prompt a sampling with ``settings`` (sample_settings' keywords) reads: none at
    guidance 1, which runs no unconditional branch."""
    return settings.get("negative_prompt", "") if settings["guidance"] != 1.0 else ""


def unused_prompt_note(guidance: float, negative: bool) -> str | None:
    """What a guidance setting leaves out of the images, where it leaves something out (else None);
    ``negative``: whether a negative prompt is given. CFG's v = u + guidance (c - u) is u at guidance 0:
    the negative prompt's velocity alone (the empty prompt's, by default: unconditional), so the prompt is
    not used; at guidance 1 no unconditional branch is computed, so a negative prompt is not used."""
    if guidance == 0:
        return "guidance 0 samples the negative prompt alone: the prompt is not used"
    if guidance == 1.0 and negative:
        return "guidance 1 samples the prompt alone: the negative prompt is not used"
    return None


@functools.cache
def warn_once(message: str) -> None:
    """Log ``message`` the first time only: an evaluation or a training run's previews call generate with
    the same settings again and again."""
    log.warning("%s", message)


def _builtin_tokenizer(model: TextToImage, cfg: Config):
    """The built-in word tokenizer of ``model``'s text encoders, or None where none uses it (every encoder
    that does holds the same word list: TextToImage.vocabulary)."""
    for (_, text), enc in zip(text_sections(cfg), model.encoders):
        if tokenizes_builtin(text):
            return enc.tokenizer
    if pooled_tokenizes_builtin(cfg):
        return model.pooled_text.tokenizer
    return None


def unknown_words_note(
    model: TextToImage, cfg: Config, prompts: list[str], negative_prompt: str = ""
) -> str | None:
    """The words of ``prompts`` and of ``negative_prompt`` (give it where it is used: guidance != 1) that
    ``model``'s built-in word tokenizer reads as <unk>, as a warning says them; None where there are none
    or no encoder uses that tokenizer. It knows only the shapes world's words (and its templates'): an
    unknown word reaches the model as <unk>, whatever it was."""
    tokenizer = _builtin_tokenizer(model, cfg)
    if tokenizer is None:
        return None
    named = []
    what = "the prompt" if len(set(prompts)) == 1 else "the prompts"
    for texts, of in ((prompts, what), ([negative_prompt], "the negative prompt")):
        words = unknown_words(tokenizer, texts)
        if words:
            more = f" and {len(words) - 10} more" if len(words) > 10 else ""
            named.append(f"{', '.join(map(repr, words[:10]))}{more} of {of}")
    if not named:
        return None
    vocab = tokenizer.get_vocab()
    known = [w for w in sorted(vocab, key=vocab.__getitem__) if re.fullmatch(r"\w+", w)]
    listed = ", ".join(known[:60]) + (", ..." if len(known) > 60 else "")
    return (
        f"the built-in word tokenizer reads {' and '.join(named)} as <unk>: it knows only the words of the "
        f"shapes world's captions and the templates ({listed})"
    )


def with_sample(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with ``overrides`` of its ``sample`` section, each checked as a config file's value is (one
    line naming sample.KEY, the value and what is allowed): dataclasses.replace checks nothing, and a
    steps=0 or guidance=nan would otherwise sample nothing or NaN images without a word."""
    if not overrides:
        return cfg
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **overrides))
    check_fields(cfg)  # raises on the first bad field
    return cfg


def refuse_unknown_settings(given, allowed: list[str]) -> None:
    """Refuse the keys of ``given`` (the keyword overrides of sample_settings or load_sampling_model) not in
    ``allowed``: a TypeError naming them and the allowed ones, as Python's for an unexpected keyword."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"unknown sample setting(s) {unknown} (allowed: {', '.join(allowed)})")


# The sample_settings that change how an image is computed, not the image: the text cache gives the images
# of recomputing the text every step (README: `--no-cache`, "same images"), a CUDA graph replays the same
# kernels. Records of a sampling keep them out of what tells two samplings apart.
IMAGE_NEUTRAL = ("cache_text", "cuda_graphs")


def sample_settings(cfg: Config, **overrides) -> dict:
    """``generate`` keyword arguments from a config's ``sample`` section and image size; an override of
    None keeps the config's value (so CLI flags can be passed straight through). Overrides are checked as
    the config's own values are (ConfigError: one line naming the key, the value and what is allowed). At
    guidance 1 the saved negative prompt is dropped unless one is given: it would change nothing
    (check_negative_prompt)."""
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
    refuse_unknown_settings(overrides, list(settings))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "image_size" in given:
        check_image_size(given["image_size"])
    # Every other setting is the sample section's key of the same name.
    with_sample(cfg, {k: v for k, v in given.items() if k != "image_size"})
    settings.update(given)
    if settings["guidance"] == 1.0 and overrides.get("negative_prompt") is None:
        settings["negative_prompt"] = ""
    return settings


def _checked_generate_args(
    model: TextToImage,
    prompts: list[str],
    *,
    image_size: int | tuple[int, int],
    steps: int,
    guidance: float,
    sampler: str,
    shift: float,
    schedule: str,
    seed: int,
    precision: str,
    noise: torch.Tensor | None,
    progress: bool | Callable[[], None] | None,
) -> tuple[list[str], torch.device, torch.dtype | None, torch.Tensor]:
    """generate's arguments checked before any slow work, one line each (the first wrong one in the order
    below is the error): (the prompts, the denoiser's device, the sampling dtype, the starting noise:
    ``noise`` or drawn from ``seed``)."""
    prompts = check_prompts(prompts)
    check_image_size(image_size)
    check_sampling(steps, shift, sampler, schedule)  # steps too
    check_steps_guidance(None, guidance)
    check_seed(seed)
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError(
            f"progress={progress!r} is not allowed (allowed: True for a progress bar, False or None for none, "
            "or a function called once per step)"
        )
    denoiser, ae = model.denoiser, model.autoencoder
    # Whole patches of whole latent pixels, within a fixed APE table: the denoiser would refuse any other
    # side only after the LLM ran. The model's own limits: config.side_limits without a config.
    unit, grid = ae.downsample * denoiser.patch_size, denoiser.position.max_grid
    limits = (unit, grid * unit if grid is not None else None)
    if not all(within_limits(side, limits) for side in image_shape(image_size)):
        raise ConfigError(f"image_size={image_size!r} is not allowed (allowed: {limits_text(limits)})")
    device = next(denoiser.parameters()).device
    dtype = sampling_dtype(precision, device)
    if dtype is None and any(p.dtype == torch.bfloat16 for p in denoiser.parameters()):
        # Plain fp32 matmuls cannot take bf16 weights: torch would fail deep inside with a dtype mismatch.
        raise ConfigError(
            f"precision {precision!r} samples in fp32, but the model holds bf16 weights (its sampling form "
            "under sample.bf16_weights); prepare it with sample.precision=fp32 or sample.bf16_weights=false, "
            "or sample with precision 'bf16'"
        )
    shape = (len(prompts), *latent_shape(model, image_size))
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(noise.shape) != shape:
        # Checked before any LLM forward: a mismatch would otherwise fail deep inside the denoiser.
        raise ConfigError(
            f"noise of shape {tuple(noise.shape)} for {len(prompts)} prompt(s) at image_size={image_size!r}; "
            f"expected {shape} (one row of latents per prompt)"
        )
    return prompts, device, dtype, noise


@torch.no_grad()
def generate(
    model: TextToImage,
    prompts: list[str],
    *,
    image_size: int | tuple[int, int],
    steps: int = SampleConfig.steps,
    guidance: float = SampleConfig.guidance,
    sampler: str = SampleConfig.sampler,
    shift: float = SampleConfig.shift,
    schedule: str = SampleConfig.schedule,
    negative_prompt: str = SampleConfig.negative_prompt,
    seed: int = SampleConfig.seed,
    cache_text: bool = SampleConfig.cache_text,
    precision: str = SampleConfig.precision,
    cuda_graphs: bool = SampleConfig.cuda_graphs,
    noise: torch.Tensor | None = None,
    progress: bool | Callable[[], None] | None = None,
    warn_cut: bool = True,
    return_cut: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, PromptCut]:
    """Images (B, 3, H, W) in [-1, 1] for ``prompts`` (a list of strings) at ``image_size``: one side (a
    square) or (H, W). The defaults are the ``sample`` section's; ``sample_settings(cfg)`` gives a saved
    model's own. CFG is used when guidance != 1. ``cuda_graphs`` replays each step as one CUDA graph (with
    the text cache on a GPU; elsewhere it changes nothing). A setting that leaves the prompt or the
    negative prompt unused (guidance 0, a negative prompt at guidance 1: ``unused_prompt_note``) is
    warned about once per process; images that come out NaN or inf are counted in a warning at each call.

    ``noise``: the starting latents, (B, C, h, w) for B prompts (default: drawn from ``seed`` as one
    (B, C, h, w) tensor, so only image 0 is the image ``seed`` gives its prompt alone). `fusedit sample
    --seed s`, `fusedit serve` and `fusedit eval` start image i from the noise of seed s + i alone instead:
    ``noise=seeded_noise([s + i for i in range(B)], latent_shape(model, image_size))`` makes their images
    (and ``seeded_noise([s + i], ...)`` with the one prompt makes image i alone).
    ``progress``: True shows a tqdm bar over the steps, as every other ``progress`` of fusedit does; or a
    function taking no arguments, called once after each sampler step (a Heun step included; what
    ``write_sample_folder`` and ``fusedit serve`` count steps with); None or False: nothing.
    ``warn_cut``: log a warning for the prompts this call cut to the text encoders' limits (the negative
    prompt too); False for a caller that reports a total itself (as ``write_sample_folder`` does).
    ``return_cut``: return (images, the call's PromptCut: which prompts were cut, and whether the negative
    prompt was) rather than the images alone, for a caller that counts or records the cuts.

    Arguments are checked before any slow work, one line each (ConfigError for a value out of range, an
    image side the model cannot take, or an unknown precision, sampler or schedule; TypeError for prompts
    that are not a list of strings)."""
    prompts, device, dtype, noise = _checked_generate_args(
        model,
        prompts,
        image_size=image_size,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        shift=shift,
        schedule=schedule,
        seed=seed,
        precision=precision,
        noise=noise,
        progress=progress,
    )
    note = unused_prompt_note(guidance, bool(negative_prompt))
    if note:
        warn_once(note)
    rows = [negative_prompt] * len(prompts) + prompts if guidance != 1.0 else list(prompts)
    # Each distinct text once (the negative prompt's rows are one): TextToImage.encode_prompts.
    context = model.encode_prompts(rows, len(rows) - len(prompts), distinct=True)
    cut = context.cut  # the call's, whether or not its context serves the steps
    text = context
    if not cache_text:
        # The LLM runs again at every step (the baseline the cache is checked against); the first step
        # takes the encoding above.
        first = [context]
        del context  # held by ``first`` until the first step takes it, not for the whole call

        def text() -> TextContext:
            return first.pop() if first else model.encode_prompts(rows, cut.negatives, distinct=True)

    velocity = text_velocity(model.denoiser, text, guidance, dtype, cuda_graphs)
    bar = tqdm(total=steps, desc="sample", unit="step") if progress is True else None
    try:
        latents = sample(
            velocity,
            noise.to(device),
            steps,
            sampler=sampler,
            shift=shift,
            progress=bar.update if bar is not None else progress or None,
            schedule=schedule,
        )
    finally:
        if bar is not None:
            bar.close()
    if warn_cut:
        warn_cut_prompts(len(cut.prompts), len(prompts), model.limits_of(cut.limits), cut.negative)
    images = model.autoencoder.decode(latents)
    warn_nonfinite(images, guidance)
    return (images, cut) if return_cut else images


def warn_nonfinite(images: torch.Tensor, guidance: float) -> None:
    """Count the images (or latents) of a batch that hold NaN or inf in a warning that names what can cause
    it: guidance above 1 extrapolates past the conditional velocity (it can blow up), guidance in [0, 1]
    only mixes two finite velocities, so there the weights or the inputs hold non-finite or huge values.
    Converted to pixels they would be black (NaN) or saturated (inf) images, without a word."""
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if not bad:
        return
    weights = "do the model's weights or inputs hold non-finite or huge values?"
    if guidance > 1:
        cause = f"is guidance={guidance:g} too large, or {weights}"
    else:
        cause = f"{weights} (guidance={guidance:g} cannot cause it)"
    log.warning("%d of the %d images are NaN or inf (black or saturated pixels): %s", bad, len(images), cause)


def cut_note(
    cut: int, prompts: int | None, limits: str, negative: bool = False, images: Sequence[int] = ()
) -> str | None:
    """What a sampling call cut to the text encoders' ``limits`` (TextToImage.limits), as `fusedit sample`'s
    log and a `fusedit serve` job's notice both say it: ``cut`` of ``prompts`` prompts (1 or None: the call's
    one prompt, None where it is sampled for each image, as a serve job's is), and with ``negative`` the
    negative prompt; None when nothing was cut. ``images``: the numbers of the cut prompts' images in a
    sample folder, in order, of which the first three are named (NNNNN.png), so that "2 of the 50 prompts"
    says which (h-sample R5)."""
    if cut and prompts in (None, 1):
        if negative:
            return f"the prompt and the negative prompt are longer than {limits} tokens: their ends were cut"
        return f"the prompt is longer than {limits} tokens: its end was cut"
    too = " (the negative prompt's too)" if negative else ""
    which = ""
    if images:
        which = " (" + ", ".join(f"{i:05d}.png" for i in images[:3]) + (", ...)" if len(images) > 3 else ")")
    if cut == 1:
        return f"1 of the {prompts} prompts{which} was longer than {limits} tokens: its end was cut{too}"
    if cut:
        return f"{cut} of the {prompts} prompts{which} were longer than {limits} tokens: their ends were cut{too}"
    if negative:
        return f"the negative prompt is longer than {limits} tokens: its end was cut"
    return None


def warn_cut_prompts(
    cut: int, prompts: int, limits: str, negative: bool = False, images: Sequence[int] = ()
) -> None:
    """The warning (``cut_note``) for ``cut`` of ``prompts`` prompts cut to the text encoders' ``limits``
    and, with ``negative``, for the negative prompt cut too: a call's, or a command's total at its end
    (which names the first cut ``images``)."""
    note = cut_note(cut, prompts, limits, negative, images)
    if note:
        log.warning("%s", note)
