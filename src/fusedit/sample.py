"""Prompt -> image. Used by `fusedit sample`, the demo, evaluation and training previews.

``load_sampling_model`` reads a model to sample with from a run, checkpoint or diffusers pipeline folder
(what `fusedit sample`, `serve` and `eval` take as MODEL), and ``write_sample_folder`` writes the images
and per-image metadata of `fusedit sample`.

With ``cache_text`` (the default) the LLM runs once per prompt batch, on each distinct text of it once
(the negative prompt's rows are one text; an eval call's 4 images of one prompt another), and its
per-layer K/V serve every step and both guidance branches. Without
it the LLM runs again at every step, which gives the same images at several times the cost: the test suite
checks that equality for every position scheme.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from fusedit.config import (
    SEED_MAX,
    Config,
    ConfigError,
    SampleConfig,
    check_fields,
    limits_text,
    pooled_tokenizes_builtin,
    text_sections,
    tokenizes_builtin,
    within_limits,
)
from fusedit.files import (
    as_json_reads_back,
    check_output_folder,
    sweep_temporaries,
    temporary_of,
    write_text_atomic,
)
from fusedit.flow import guided, sample
from fusedit.flow.samplers import Velocity, check_sampling
from fusedit.imaging import image_grid, save_png, to_uint8
from fusedit.models.inference import prepare_for_sampling
from fusedit.system import TextToImage, precision_name, resolve_device, uses_bf16
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


def is_whole(value) -> bool:
    """An integer of any kind (numpy's too), and not a bool (True would pass for 1)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


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
        raise ValueError("no prompts to sample (allowed: a list of one or more prompts)")
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

    if steps is not None and not (is_whole(steps) and steps >= 1):
        raise ConfigError(f"{named('steps', steps)} is not allowed (allowed: an integer >= 1)")
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


def _with_sample(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with ``overrides`` of its ``sample`` section, each checked as a config file's value is (one
    line naming sample.KEY, the value and what is allowed): dataclasses.replace checks nothing, and a
    steps=0 or guidance=nan would otherwise sample nothing or NaN images without a word."""
    if not overrides:
        return cfg
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **overrides))
    check_fields(cfg)  # raises on the first bad field
    return cfg


def _refuse_unknown_settings(given, allowed: list[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"unknown sample setting(s) {unknown} (allowed: {', '.join(allowed)})")


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
    _refuse_unknown_settings(overrides, list(settings))
    given = {k: v for k, v in overrides.items() if v is not None}
    if "image_size" in given:
        check_image_size(given["image_size"])
    # Every other setting is the sample section's key of the same name.
    _with_sample(cfg, {k: v for k, v in given.items() if k != "image_size"})
    settings.update(given)
    if settings["guidance"] == 1.0 and overrides.get("negative_prompt") is None:
        settings["negative_prompt"] = ""
    return settings


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
    image side the model cannot take or an unknown precision, ValueError for an unknown sampler or
    schedule, TypeError for prompts that are not a list of strings)."""
    prompts = check_prompts(prompts)
    check_image_size(image_size)
    check_steps_guidance(steps, guidance)
    check_sampling(steps, shift, sampler, schedule)
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
        raise ValueError(
            f"precision {precision!r} samples in fp32, but the model holds bf16 weights (its sampling form "
            "under sample.bf16_weights); prepare it with sample.precision=fp32 or sample.bf16_weights=false, "
            "or sample with precision 'bf16'"
        )
    shape = (len(prompts), *latent_shape(model, image_size))
    if noise is None:
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(noise.shape) != shape:
        # Checked before any LLM forward: a mismatch would otherwise fail deep inside the denoiser.
        raise ValueError(
            f"noise of shape {tuple(noise.shape)} for {len(prompts)} prompt(s) at image_size={image_size!r}; "
            f"expected {shape} (one row of latents per prompt)"
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

    velocity = text_velocity(denoiser, text, guidance, dtype, cuda_graphs)
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
        warn_cut_prompts(len(cut.prompts), len(prompts), model.limits, cut.negative)
    images = ae.decode(latents)
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if bad:
        # Converted to pixels they would be black (NaN) or saturated (inf) images, without a word.
        log.warning(
            "%d of the %d images are NaN or inf (black or saturated pixels): is guidance=%g too large?",
            bad,
            len(prompts),
            guidance,
        )
    return (images, cut) if return_cut else images


def cut_note(cut: int, prompts: int | None, limits: str, negative: bool = False) -> str | None:
    """What a sampling call cut to the text encoders' ``limits`` (TextToImage.limits), as `fusedit sample`'s
    log and a `fusedit serve` job's notice both say it: ``cut`` of ``prompts`` prompts (1 or None: the call's
    one prompt, None where it is sampled for each image, as a serve job's is), and with ``negative`` the
    negative prompt; None when nothing was cut."""
    if cut and prompts in (None, 1):
        if negative:
            return f"the prompt and the negative prompt are longer than {limits} tokens: their ends were cut"
        return f"the prompt is longer than {limits} tokens: its end was cut"
    too = " (the negative prompt's too)" if negative else ""
    if cut == 1:
        return f"1 of the {prompts} prompts was longer than {limits} tokens: its end was cut{too}"
    if cut:
        return f"{cut} of the {prompts} prompts were longer than {limits} tokens: their ends were cut{too}"
    if negative:
        return f"the negative prompt is longer than {limits} tokens: its end was cut"
    return None


def warn_cut_prompts(cut: int, prompts: int, limits: str, negative: bool = False) -> None:
    """The warning (``cut_note``) for ``cut`` of ``prompts`` prompts cut to the text encoders' ``limits``
    and, with ``negative``, for the negative prompt cut too: a call's, or a command's total at its end."""
    note = cut_note(cut, prompts, limits, negative)
    if note:
        log.warning("%s", note)


def _saved_by_public_fusedit(folder: Path) -> bool:
    """Whether ``folder`` is a pipeline or transformer folder of the public FuseDiT code: its pipeline is also
    called FuseDiTPipeline, but its weights and config need `fusedit convert` first."""
    for config in (folder / "transformer" / "config.json", folder / "config.json"):
        try:
            if json.loads(config.read_text()).get("model_type") in ("FuseDiT", "DiT"):
                return True
        except (OSError, ValueError, AttributeError):  # absent, not JSON, or not a JSON object
            continue
    return False


def check_sampling_source(path: str | Path, use_ema: bool = True, relocate: dict | None = None) -> Path:
    """What load_sampling_model refuses about ``path`` before reading any weights (a missing folder, one of
    the public FuseDiT code, a pipeline folder with --no-ema or --relocate): callers that write anything
    before the load (`fusedit eval` records its generation first) check it first. Returns the folder."""
    folder = Path(path)
    if not folder.is_dir():
        if folder.parent.name == "checkpoints" and folder.parent.is_dir() and not folder.exists():
            raise FileNotFoundError(_gone_checkpoint(folder, path))
        # These commands read local folders only; a hub repository is downloaded first (docs/diffusers.md).
        hub = re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not folder.exists()
        hint = (
            f"; a hub id? download it first: hf download {path} --local-dir DIR, and use DIR" if hub else ""
        )
        raise FileNotFoundError(
            f"no such folder: {str(path)!r} (expected a run, checkpoint or diffusers pipeline folder{hint})"
        )
    if _saved_by_public_fusedit(folder):
        raise ConfigError(
            f"{str(path)!r} was saved by the public FuseDiT code: import it first with `fusedit convert "
            f"{path} --out DIR` and use DIR (see docs/run-released-fusedit.md)"
        )
    if (folder / "model_index.json").is_file():
        if not use_ema:
            raise ConfigError(
                f"--no-ema needs a run or checkpoint folder: the pipeline folder {str(path)!r} holds only "
                "the weights it was exported with"
            )
        if relocate:
            raise ConfigError(
                f"--relocate needs a run or checkpoint folder: the pipeline folder {str(path)!r} holds its "
                "models itself"
            )
    return folder


def load_sampling_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    relocate: dict[str, str] | None = None,
    **sample_overrides: Any,
) -> tuple[TextToImage, Config, Path]:
    """A model to sample with, read from ``path`` (the MODEL of `fusedit sample`, `serve` and `eval`):

    - a run folder (its latest checkpoint; `fusedit convert` writes one) or a checkpoint folder, read with
      ``fusedit.checkpoints.load_model``: its EMA weights unless ``use_ema`` is False, and with
      ``relocate`` ({config key: new place}, e.g. ``{"text.model_id": "/data/models/gemma-2b"}``; the
      command line's --relocate) for the run's model folders that moved;
    - a diffusers pipeline folder (with model_index.json: `fusedit export`,
      ``FuseDiTPipeline.save_pretrained``), read with ``fusedit.pipeline.from_pretrained``; it holds only
      the weights it was exported with and its models itself, so ``use_ema=False`` and ``relocate`` are
      refused.

    ``sample_overrides`` replace keys of the saved config's ``sample`` section (``compile=""`` for off,
    ``cuda_graphs=True``, ...; None keeps the saved value), checked as a config file's values are, before
    the model is turned into its sampling form (``to_sampling_form``). ``device`` is where the model is
    loaded: a torch device or its name, "auto" for CUDA when available (``system.resolve_device``).

    The model returned only samples: its sampling form (no gradients; fused q/k/v and gate/up projections
    under sample.fuse_projections; bf16 matmul weights under sample.bf16_weights with bf16 autocast) cannot
    be trained, and ``save_pretrained`` / ``FuseDiTPipeline`` refuse its fused projections. To fine-tune,
    export or inspect the weights, load the training form with ``fusedit.checkpoints.load_model`` (what
    this reads a run or checkpoint with).

    Returns (the model in eval mode and sampling form, its Config with the overrides, the folder its weights
    were read from: the checkpoint folder, or the pipeline folder). Raises FileNotFoundError for a path that
    is not a folder or holds no model, and ConfigError for a bad device or override, a folder saved by the
    public FuseDiT code (import it with `fusedit convert` first) or a pipeline folder with
    ``use_ema=False`` or ``relocate``; the messages name the command-line flags (--no-ema, --relocate), as
    `fusedit` prints them."""
    from fusedit.checkpoints import find_checkpoint, load_model

    # Before the load; the values are checked against the loaded config (_with_sample).
    _refuse_unknown_settings(sample_overrides, [f.name for f in dataclasses.fields(SampleConfig)])
    device = resolve_device(device, "device")

    def sampling(model, cfg):
        cfg = _with_sample(cfg, {k: v for k, v in sample_overrides.items() if v is not None})
        return to_sampling_form(model, cfg), cfg

    folder = check_sampling_source(path, use_ema, relocate)
    if (folder / "model_index.json").is_file():
        from fusedit.pipeline import from_pretrained  # imports this module

        return *sampling(*from_pretrained(folder, device)), folder
    try:
        ckpt = find_checkpoint(folder)
    except FileNotFoundError:
        raise FileNotFoundError(_no_model(folder, path)) from None
    model, cfg, ckpt = load_model(ckpt, device, use_ema=use_ema, relocate=relocate or {})
    return *sampling(model, cfg), ckpt


def _finished_checkpoints(checkpoints: Path) -> str:
    """The names of the finished checkpoints in a run's checkpoints folder, oldest first, for messages."""
    from fusedit.checkpoints import finished_checkpoints

    names = [p.name for p in finished_checkpoints(checkpoints)]
    return ", ".join(names) if names else "none yet"


def _gone_checkpoint(folder: Path, path: str | Path) -> str:
    """Why the checkpoint folder ``folder`` (``path`` as given) of a run is not there: a run keeps only its
    latest train.keep_checkpoints checkpoints, so an older one named in a note may be gone."""
    run = folder.parent.parent
    return (
        f"no such folder: {str(path)!r} (its run {str(run)!r} holds the checkpoints "
        f"{_finished_checkpoints(folder.parent)}, older ones deleted as train.keep_checkpoints says: give "
        "one of them, or the run folder for its latest)"
    )


def _no_model(folder: Path, path: str | Path) -> str:
    """Why ``folder`` (``path`` as given) holds no model: a run that has not saved its first checkpoint yet
    (its config.yaml or train.lock is there) is named as such, not as a path to the wrong kind of folder,
    and a run's checkpoints folder points to the run and its checkpoints."""
    from fusedit.checkpoints import LOCK_FILE, checkpoint_folders
    from fusedit.config import load_config, resolved_stages

    if folder.name == "checkpoints" and checkpoint_folders(folder):
        return (
            f"no model in {str(path)!r}: it is the checkpoints folder of the run {str(folder.parent)!r} "
            f"(allowed: the run folder, for its latest checkpoint, or one of its checkpoints: "
            f"{_finished_checkpoints(folder)})"
        )
    if not ((folder / "config.yaml").is_file() or (folder / LOCK_FILE).is_file()):
        return (
            f"no model in {str(path)!r} (allowed: a run folder, a checkpoint folder, or a diffusers pipeline "
            "folder with model_index.json)"
        )
    run = f"run {str(path)!r} has no finished checkpoint yet"
    try:
        cfg = load_config(folder)
        first = resolved_stages(cfg)[0]
    except (OSError, ValueError):  # a run whose config.yaml is not written yet (or unreadable)
        return run
    # The training saves at every multiple of train.checkpoint_every and at each stage's and the run's end.
    every = first.config.train.checkpoint_every
    if every <= first.end:
        return f"{run} (the first is saved at step {every}: train.checkpoint_every)"
    end = "its first stage" if cfg.stages else "the run"
    return f"{run} (the first is saved at step {first.end}, the end of {end})"


# The files write_sample_folder writes: the numbered images, their records and grid.png.
_SAMPLE_FILES = re.compile(r"\d{5}\.(png|json)|grid\.png")
_NUMBERED = re.compile(r"(\d{5})\.(png|json)")
# The keys every image record of `fusedit sample` has held ("truncated" came later): a NNNNN.json holding
# them all is a record it wrote, and only files it wrote are ever replaced or deleted.
_RECORD_KEYS = frozenset(
    {"prompt", "seed", "negative_prompt", "steps", "guidance", "width", "height", "sampler", "shift"}
    | {"schedule", "precision", "cache_text", "use_ema", "model"}
)


def _image_record(path: Path) -> dict | None:
    """The image record in ``path`` (a NNNNN.json) when `fusedit sample` wrote it, otherwise None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a folder of that name, not JSON, or bytes that are not UTF-8
        return None
    return record if isinstance(record, dict) and record.keys() >= _RECORD_KEYS else None


def earlier_sample(out: str | Path) -> dict[int, dict]:
    """The image records an earlier `fusedit sample` left in ``out``, by image number; {} for a new or
    empty folder. Any other file or folder there (a user's images, a run, a dataset) is refused in one line
    (ValueError) before anything is sampled, since the sample replaces and deletes the files an earlier one
    wrote: NNNNN.json holding an image record (``_RECORD_KEYS``), NNNNN.png beside one, grid.png beside any,
    and write_atomic's temporary files of those names (left by a kill)."""
    out = Path(out)
    if not out.is_dir():
        return {}
    records = {}
    for path in out.glob("[0-9][0-9][0-9][0-9][0-9].json"):
        record = _image_record(path)
        if record is not None:
            records[int(path.stem)] = record

    def ours(path: Path) -> bool:
        if not path.is_file():
            return False
        target = temporary_of(path.name)
        if target is not None:
            return bool(_SAMPLE_FILES.fullmatch(target))
        numbered = _NUMBERED.fullmatch(path.name)
        if numbered:
            return int(numbered[1]) in records
        return path.name == "grid.png" and bool(records)

    check_output_folder(out, "images", "an earlier fusedit sample's folder", ours)
    return records


def _first_change(saved: dict, record: dict) -> str:
    """The first key in which an earlier image's ``saved`` record differs from the ``record`` of the image
    that replaces it, as "key=old, not new"."""
    key = next(k for k in sorted(set(saved) | set(record)) if saved.get(k) != record.get(k))
    return f"{key}={saved.get(key)!r}, not {record.get(key)!r}"


def _remove_earlier_samples(out: Path, records: dict[int, dict], images: int) -> None:
    """An ``out`` folder reused for fewer prompts would keep the earlier sample's higher-numbered images
    (past ``images``) next to the new ones, and its grid.png would show the earlier prompts. Called once
    the first new image is ready: a sample that fails or is stopped before it leaves the earlier one
    whole. Only files of ``records`` (``earlier_sample``) go. The log counts the images removed, not
    grid.png: a sample of the same prompts redraws it the same, and no image of it was lost."""
    removed = 0
    for i in sorted(i for i in records if i >= images):
        earlier = [path for path in (out / f"{i:05d}.png", out / f"{i:05d}.json") if path.is_file()]
        for path in earlier:
            path.unlink()
        removed += bool(earlier)
    (out / "grid.png").unlink(missing_ok=True)
    if removed:
        some = "an image" if removed == 1 else f"{removed} images"
        log.info("removed %s of an earlier sample in %s", some, out)


def write_sample_folder(
    model: TextToImage,
    cfg: Config,
    prompts: list[str],
    out: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    source: str | Path | None = None,
    progress: bool = True,
    written: list[Path] | None = None,
    kept: list[Path] | None = None,
) -> list[Path]:
    """The sample folder of `fusedit sample`: image i of ``prompts`` as ``out``/0000i.png (five digits),
    its metadata (prompt, whether it was "truncated" to the text encoders' limits, seed, settings,
    precision, use_ema, model and its weights' fingerprint, batch size, compile, CUDA graphs) as 0000i.json,
    and grid.png of them all with their prompts. An empty prompt samples unconditionally (the input a
    dropped caption trained), as `fusedit serve` does; the words the built-in word tokenizer reads as <unk>
    are warned about before sampling, and the prompts cut (the negative prompt too) once at the end.

    ``model`` and ``cfg`` are as ``load_sampling_model`` returns them, and ``source`` is the folder it
    returned (recorded, absolute, as each image's "model"). ``settings`` are ``generate``'s keyword
    arguments as ``sample_settings(cfg, ...)`` makes them (None: the config's own); their image size should
    fit the model (`fusedit sample` checks it first). Image i starts from the noise of ``seed`` + i alone
    (None: the config's sample.seed), so any image can be made again by itself (each seed + i must lie in
    0..SEED_MAX, as `fusedit serve` takes seeds: ConfigError otherwise); a negative prompt at guidance 1,
    which would change nothing, is refused too. Prompts are sampled ``batch_size`` at a time, with a
    progress bar unless ``progress`` is False.

    ``out`` is created where missing. A folder holding anything but an earlier sample's files is refused
    before any sampling (``earlier_sample``). An earlier sample's folder resumes when ``source`` names the
    model (whose weights' fingerprint each record holds): a batch whose images are all there, each recorded
    as this call would record it (prompt, seed, settings, model, batch size), is kept, and only the other
    batches are made, so the images are those of one uninterrupted call, bit for bit (a batch is made
    whole, as in that call). Earlier images of other prompts or settings are replaced, and once the first
    new batch is ready, the earlier sample's higher-numbered images and grid.png are removed (no other
    file). Returns the paths of the images, in prompt order; ``written``, when given, receives each as it
    is kept or written (what an interrupted call left), and ``kept`` the images kept from an earlier run."""
    from fusedit.checkpoints import weights_fingerprint

    prompts = check_prompts(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed (allowed: 1 or more)")
    settings = sample_settings(cfg) if settings is None else settings
    seed = cfg.sample.seed if seed is None else seed
    check_seed(seed, len(prompts))
    check_negative_prompt(settings["negative_prompt"], settings["guidance"])
    out = Path(out)
    records = earlier_sample(out)
    device = next(model.denoiser.parameters()).device
    steps, guidance, size = settings["steps"], settings["guidance"], settings["image_size"]
    if settings.get("cuda_graphs") and (device.type != "cuda" or not settings.get("cache_text", True)):
        # Asked for (--cuda-graphs, sample.cuda_graphs), it would otherwise do nothing without a word.
        why = "the model is not on a CUDA device" if device.type != "cuda" else "the text cache is off"
        log.info("sample.cuda_graphs does nothing here: %s (it replays cached-text steps on a GPU)", why)
    negative = settings["negative_prompt"] if guidance != 1.0 else ""
    unknown = unknown_words_note(model, cfg, prompts, negative)
    if unknown:
        log.warning("%s", unknown)
    empty = sum(not p.strip() for p in prompts)
    if empty:
        log.info("%d of the %d prompts are empty: sampled unconditionally", empty, len(prompts))
    model_path = None if source is None else str(Path(source).resolve())
    # The weights' own fingerprint, as `fusedit eval` records it: a folder re-exported or retrained in
    # place keeps its path, and its earlier images must not be kept as this model's.
    weights = None if source is None else weights_fingerprint(Path(source))
    height, width = image_shape(size)
    # Image i's record but "truncated", which only its sampling tells (and which follows from the rest).
    metas = [
        {
            "prompt": prompt,
            "seed": seed + i,
            "negative_prompt": settings["negative_prompt"],
            "steps": steps,
            "guidance": guidance,
            "width": width,
            "height": height,
            **({"size": height} if height == width else {}),
            "sampler": settings["sampler"],
            "shift": settings["shift"],
            "schedule": settings["schedule"],
            "precision": precision_name(settings["precision"], device),
            "cache_text": settings["cache_text"],
            "use_ema": cfg.sample.use_ema,
            "model": model_path,
            "weights": weights,
            # What else decides the pixels: the batch an image is made in, and the kernels that make it.
            "batch_size": batch_size,
            "compile": cfg.sample.compile,
            "cuda_graphs": bool(settings.get("cuda_graphs")),
        }
        for i, prompt in enumerate(prompts)
    ]
    paths = [out / f"{i:05d}.png" for i in range(len(prompts))]

    def saved(i: int) -> dict:  # image i's earlier record but "truncated"
        return {k: v for k, v in records.get(i, {}).items() if k != "truncated"}

    # The earlier images recorded as this call would record them, and the others of its numbers (stale).
    same = {i for i in records if i < len(prompts) and saved(i) == as_json_reads_back(metas[i])}
    stale = sorted(i for i in records if i < len(prompts) and i not in same)

    def made(i: int) -> bool:  # image i is there, as this call would make it (from a model it can tell)
        return weights is not None and i in same and paths[i].is_file()

    # A batch is made whole unless all its images are there: each image then comes out of the batch it
    # would be in without the interruption, bit for bit as that call would make it.
    batches = [range(b, min(b + batch_size, len(prompts))) for b in range(0, len(prompts), batch_size)]
    todo = [batch for batch in batches if not all(map(made, batch))]
    kept_images = [i for batch in batches if batch not in todo for i in batch]
    out.mkdir(parents=True, exist_ok=True)
    # What a kill -9 mid-write left (each file is written whole, so the files themselves are complete).
    sweep_temporaries(out, _SAMPLE_FILES)
    written = [] if written is None else written
    written += [paths[i] for i in kept_images]
    if kept is not None:
        kept += [paths[i] for i in kept_images]
    if kept_images:
        log.info(
            "%d of the %d images are kept from an earlier run of this sample", len(kept_images), len(prompts)
        )
    if records and weights is None:
        log.info(
            "the images of an earlier sample in %s are made again: without the model's folder (source) "
            "they cannot be told to be this model's",
            out,
        )
    elif stale:
        change = _first_change(saved(stale[0]), as_json_reads_back(metas[stale[0]]))
        some = f"{len(stale)} images of an earlier sample in {out} were"
        if len(stale) == 1:
            some = f"an image of an earlier sample in {out} was"
        log.info(
            "%s made with other prompts or settings and will be replaced (image %d: %s)",
            some,
            stale[0],
            change,
        )
    images: dict[int, Any] = {}
    cut_prompts = sum(bool(records[i].get("truncated")) for i in kept_images)
    negative_cut = False
    bar = tqdm(total=len(todo) * steps, desc="sample", unit="step", disable=not progress)
    for indices in todo:
        batch = [prompts[i] for i in indices]
        # Image i starts from the noise of seed + i alone (the rule of `fusedit serve`), which is what
        # sampling its prompt on its own with that seed draws: any image can be made again by itself.
        noise = seeded_noise([seed + i for i in indices], latent_shape(model, size))
        # The cuts are warned about once, at the end, and each image records whether its prompt was cut.
        x, cut = generate(
            model, batch, noise=noise, progress=bar.update, warn_cut=False, return_cut=True, **settings
        )
        cut_prompts, negative_cut = cut_prompts + len(cut.prompts), negative_cut or cut.negative
        if not images:
            _remove_earlier_samples(out, records, len(prompts))
        for j, (i, img) in enumerate(zip(indices, to_uint8(x))):
            # "truncated" after the prompt (the prompt keeps its first place as **metas[i] repeats it).
            meta = {"prompt": prompts[i], "truncated": j in cut.prompts, **metas[i]}
            # The record first, an earlier image of that number gone before it: a stop between the two
            # leaves a record without its image, which a rerun makes, never an image that no record marks
            # as this command's, nor an earlier image under this call's record.
            paths[i].unlink(missing_ok=True)
            write_text_atomic(out / f"{i:05d}.json", json.dumps(meta, indent=1))
            save_png(Image.fromarray(img), paths[i])
            images[i] = img
            written.append(paths[i])
    bar.close()
    if not todo:  # a finished sample run again: only its grid is made again
        _remove_earlier_samples(out, records, len(prompts))
    for i in kept_images:
        with Image.open(paths[i]) as image:
            images[i] = np.asarray(image.convert("RGB"))
    grid = [images[i] for i in range(len(prompts))]
    save_png(image_grid(grid, prompts, scale=max(1, 128 // max(height, width))), out / "grid.png")
    warn_cut_prompts(cut_prompts, len(prompts), model.limits, negative_cut)
    return paths
