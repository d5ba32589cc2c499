"""`fusedit bench`: training-step and sampling throughput of any preset with random weights and synthetic
inputs (latents and token ids), so it needs no data and no downloads. Each LLM has its model_id's shape
where its config is on this machine (a local folder, the hub cache), else its ``arch``'s; each record says
which (``llm_shape_from``).

Training: images/s, achieved TFLOP/s from the model's own FLOP count (3 x DiT forward + 1 x LLM forward per
image, ``fusedit.models.flops``), MFU against a matmul peak measured on the spot, peak memory. A step is what
``fusedit train`` runs, by its own functions (``fusedit.train.loop``: flow_backward, finish_gradients,
take_update) on the parts train.trainable trains: one LLM forward, the DiT's forward and backward at
logit-normal times, clipping, the learning rate, the run's AdamW (``train.stages.Optimizers``) and its EMA
(held in memory; what its update, every ``train.ema_every`` steps, adds to the steps it overlaps is timed
apart and added per step). Sampling:
images/s and seconds per image for N steps with guidance, with and without the text cache. Warm-up runs are
excluded; the figure is the median of the repeats, timed with CUDA events on a GPU (perf_counter on CPU); a
training repeat times STEPS_PER_TIMING steps back to back, as a run takes them, a sampling repeat one
batch.
Each record also says how it was made: warm-up and repeat counts, the timer, the levers, and the attention
kernels that ran (read from the profiler, as "auto" picks one per call).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fusedit.adapters import Parts, merge_adapters, trained_modules
from fusedit.config import (
    Config,
    TextConfig,
    arch_config,
    known_llm_config,
    model_family_arch,
    resolved_stages,
    text_sections,
)
from fusedit.devices import host_to_device
from fusedit.flow import interpolate, sample, sample_training_times
from fusedit.models.flops import denoiser_flops, image_tokens, llm_flops
from fusedit.sampling.generation import CUDAGraphVelocity, sampling_dtype, text_velocity, to_sampling_form
from fusedit.system import TextToImage, build_model, seeded
from fusedit.text.context import TextContext
from fusedit.text.llm import llm_config
from fusedit.train.ema import EMA
from fusedit.train.loop import StepAutocasts, finish_gradients, flow_backward, take_update
from fusedit.train.stages import Optimizers, apply_parts, training_flops_per_image

log = logging.getLogger(__name__)

# At most this many text lengths get an untimed priming step each (bench_train).
MAX_PRIMED_WIDTHS = 16

# Training steps per timing (bench_train: time_it's ``runs``): a run's steps follow one another, its host
# preparing each step's inputs while the GPU finishes the last one's AdamW.
STEPS_PER_TIMING = 4

# The aten operator of each scaled-dot-product-attention kernel as the profiler names it; its backward and
# the CPU's flash variant (``..._flash_attention_for_cpu``) start with the same name.
SDPA_KERNELS = {
    "cudnn": "aten::_scaled_dot_product_cudnn_attention",
    "flash": "aten::_scaled_dot_product_flash_attention",
    "efficient": "aten::_scaled_dot_product_efficient_attention",
    "math": "aten::_scaled_dot_product_attention_math",
}


def time_it(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, runs: int = 1
) -> float:
    """Median seconds of one ``fn`` call over ``repeats`` timings after ``warmup`` untimed calls; each
    timing spans ``runs`` calls back to back (divided by ``runs``), as a loop calls it: then the host's
    work before a call overlaps the GPU's on the last one, which a timing of one call after a synchronize
    would count as idle GPU time. On a GPU, with ``runs`` > 1, an untimed call leads each timing in, so
    that the first timed call's host work overlaps GPU work too."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if runs > 1:
                fn()  # queued: the start event below fires when its GPU work is done
            start.record()
            for _ in range(runs):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000 / runs)
        else:
            t0 = time.perf_counter()
            for _ in range(runs):
                fn()
            times.append((time.perf_counter() - t0) / runs)
    return statistics.median(times)


def overlapped_cost(
    start: Callable[[], object],
    busy: Callable[[], bool],
    step: Callable[[], object],
    step_seconds: float,
    device: torch.device,
    repeats: int,
) -> float:
    """Median seconds that ``start`` (work that may go on beside training while ``busy``: the host-held
    EMA's update) adds to the steps it overlaps: ``start``, then ``step`` until it is done, timed whole, less
    those steps at ``step_seconds`` each. Wall-clock between synchronizes, as the work runs on the host too;
    at least 0 (the subtraction carries a step's noise). After one untimed run."""
    costs = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, steps = time.perf_counter(), 0
        start()
        while steps == 0 or busy():
            step()
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        costs.append(max(0.0, time.perf_counter() - t0 - steps * step_seconds))
    return statistics.median(costs[1:])


def timer(device: torch.device) -> str:
    """How ``time_it`` times on ``device``."""
    return "cuda-events" if device.type == "cuda" else "perf_counter"


def attention_kernels(fn: Callable[[], object]) -> list[str] | None:
    """The SDPA kernels (SDPA_KERNELS' names) one untimed call of ``fn`` dispatched to, read from the
    profiler's operator names: model.attention_backend=auto picks per call (cuDNN first on a GPU, a kernel
    that cannot take the call passes it on), so a figure records what made it. Empty when a compiler lowered
    attention to plain matmuls; None when the profiler could not run (the reason is logged)."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    except RuntimeError as e:  # e.g. another profiler already running in this process
        log.warning("the attention kernels were not recorded: the profiler failed (%s)", e)
        return None
    names = {e.name for e in prof.events()}
    return [k for k, op in SDPA_KERNELS.items() if any(n.startswith(op) for n in names)]


def source_commit(source: Path = Path(__file__)) -> str | None:
    """The commit of the fusedit code that runs (``source``: this file): $FUSEDIT_COMMIT (a copy without
    .git, such as the GPU machine's), else that of the git checkout fusedit is imported from, "-dirty" when
    tracked files differ from it; None for an installed package."""
    if os.environ.get("FUSEDIT_COMMIT"):
        return os.environ["FUSEDIT_COMMIT"]
    here = str(source.resolve().parent)

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=30)

    try:
        # Only a checkout that tracks this very file: not a repository that merely holds a virtualenv.
        if git("ls-files", "--error-unmatch", source.name).returncode != 0:
            return None
        head = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return None
    return head + ("-dirty" if dirty else "") if head else None


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """Measured dense matmul rate (FLOP/s) on this device: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device).manual_seed(0)  # not the global generator, which is the caller's
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    seconds = time_it(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * n**3 / seconds


def prompt_lengths(
    batch: int, tokens: int, min_tokens: int | None, gen: torch.Generator, empty_rows: int = 0
) -> torch.Tensor:
    """(batch,) real prompt lengths: all ``tokens`` (no padding), or, with ``min_tokens``, uniform in
    min_tokens..tokens with the first ``empty_rows`` rows 1 token long (guidance's empty negative prompt)."""
    if min_tokens is None:
        return torch.full((batch,), tokens)
    lengths = torch.randint(min_tokens, tokens + 1, (batch,), generator=gen)
    lengths[:empty_rows] = 1
    return lengths


def priming_lengths(
    model: TextToImage, batch: int, tokens: int, min_tokens: int | None
) -> dict[tuple[int, bool], torch.Tensor]:
    """One batch of prompt lengths for each (trimmed text length, padding mask or not) that batches of
    real lengths min_tokens..tokens meet (text.trim_padding, text.trim_multiple): compiled blocks have a
    graph for each."""
    if min_tokens is None:
        return {(tokens, False): torch.full((batch,), tokens)}
    enc, device = model.text, next(model.denoiser.parameters()).device
    out = {}
    for n in range(min_tokens, tokens + 1):
        width = enc.trimmed_length(n, tokens, device)
        same = torch.full((batch,), n)  # a mask only where trimming rounds n up
        out.setdefault((width, n < width), same)
        if batch > 1 and min_tokens < width:  # one prompt of n tokens, the others shortest: a mask
            mixed = same.clone()
            mixed[1:] = min_tokens
            out.setdefault((width, True), mixed)
    return out


def synthetic_text(
    model: TextToImage, lengths: torch.Tensor, tokens: int, generator: torch.Generator
) -> TextContext:
    """Random token ids, right-padded to ``tokens`` as tokenized prompts are, through every LLM once; the
    encoders trim the padding as in training and sampling."""
    device = next(model.denoiser.parameters()).device
    batch = len(lengths)
    # As TextEncoder.encode hands a batch over: the mask through pinned memory and the rows' extent read on
    # the host, so that neither makes the host wait for the GPU.
    mask = host_to_device(torch.arange(tokens)[None] < lengths[:, None], device)
    extent = (int(lengths.min()), int(lengths.max()))
    contexts = []
    for enc, request in zip(model.encoders, model.denoiser.text_requests, strict=True):
        vocab = enc.llm.config.vocab_size
        ids = torch.randint(vocab, (batch, tokens), generator=generator, device=generator.device).to(device)
        contexts.append(enc(ids, mask, request, extent))
    context = contexts[0]
    context.others = contexts[1:]
    if model.pooled_text is not None:
        context.pooled = model.pooled_text(["a prompt"] * batch)
    return context


@dataclasses.dataclass
class BenchSetup:
    model: TextToImage
    # train.precision and sample.precision are the run's ("bf16", or "fp32" under --fp32 or on the CPU).
    cfg: Config
    device: torch.device
    peak: float
    # Each LLM timed (text, extra_text.0, ...), recorded with every measurement (levers): its model_id as
    # configured (None for none; cfg's are cleared for the random init), where its timed shape came from
    # ("model_id" or "arch": random_init_text), and the shape, each a list over the LLMs.
    llm: dict
    sampling_form: bool = False  # set once the denoiser has been turned into its sampling form


def random_init_text(text: TextConfig, key: str) -> tuple[TextConfig, str]:
    """``text`` (the section ``key``) as a random-init LLM of its model's shape, and where that shape came
    from ("model_id" or "arch"): a model_id's config where it is readable without the network (a local
    folder, the hub cache; else llm_config warns and the section's ``arch`` stands in), as ``family`` +
    ``arch``; no tokenizer (the bench feeds random ids). A model type no ``family`` allows keeps the
    section's own arch, with a warning naming what is timed."""
    if not text.model_id:
        return dataclasses.replace(text, tokenizer=""), "arch"
    model = dataclasses.replace(text, model_id="", tokenizer="")
    config = known_llm_config(text)
    if config is None:  # not on this machine: llm_config says why, or warns that the arch stands in
        llm_config(text, shape_only=True, key=key)
        return model, "arch"
    found = model_family_arch(config)
    if found is None:
        stand_in = arch_config(text, key)
        log.warning(
            "%s.model_id=%r is a %s LLM, which the bench cannot build with random weights: timing %s.arch "
            "instead (%s, %d layers, width %d)",
            key,
            text.model_id,
            config.model_type,
            key,
            text.family,
            stand_in.num_hidden_layers,
            stand_in.hidden_size,
        )
        return model, "arch"
    family, arch = found
    return dataclasses.replace(model, family=family, arch=arch), "model_id"


def setup(cfg: Config, device: torch.device, bf16: bool) -> BenchSetup:
    """Random weights of the config's shape (each LLM's: random_init_text), no VAE, made ready to train
    as `fusedit train` makes them: compiled (train.compile), the parts train.trainable trains set to train
    (LoRA adapters added), gradient checkpointing (train.grad_checkpointing). The weights are drawn in a
    fork of torch's global generators: the caller's are left as they were. A staged recipe is set up as its
    first stage, as `fusedit train` starts it: that stage's sections, not the top-level ones it overrides."""
    cfg = resolved_stages(cfg)[0].config
    # Training and sampling run under one precision, bf16 unless --fp32 (train.precision, sample.precision).
    precision = "bf16" if bf16 else "fp32"
    sections = text_sections(cfg)
    texts, shape_from = zip(*(random_init_text(t, key) for key, t in sections), strict=True)
    model_ids = [t.model_id or None for _, t in sections]
    cfg = dataclasses.replace(
        cfg,
        text=texts[0],
        extra_text=list(texts[1:]),
        train=dataclasses.replace(cfg.train, precision=precision),
        sample=dataclasses.replace(cfg.sample, precision=precision),
        # The built-in tokenizer only stands in for the LLM's (its ids are never read): no warning that
        # the data's words are not in it (system.builtin_words).
        data=dataclasses.replace(cfg.data, source="shapes"),
    )
    with seeded(0, device):
        model = build_model(cfg, device, with_autoencoder=False)
    # In the order of `fusedit train` (train.loop: _train, then _train_stages for the first stage).
    model.compile_parts(cfg.train.compile, cfg.train.activation_memory_budget)
    apply_parts(model, Parts.of(cfg.train), None, seed=cfg.train.seed, stage=0)
    model.denoiser.set_gradient_checkpointing(cfg.train.grad_checkpointing)
    dtype = torch.bfloat16 if bf16 else torch.float32
    llm = {
        "llm_model_id": model_ids,
        "llm_shape_from": list(shape_from),
        "llm_family": [t.family for _, t in text_sections(cfg)],
        "llm_layers": [arch_config(t, key).num_hidden_layers for key, t in text_sections(cfg)],
        "llm_layers_run": [enc.llm.config.num_hidden_layers for enc in model.encoders],  # the design's
        "llm_hidden": [enc.llm.config.hidden_size for enc in model.encoders],
    }
    return BenchSetup(model, cfg, device, matmul_peak(device, dtype), llm)


def warn_text_tokens(s: BenchSetup, tokens: int) -> None:
    """``tokens`` (--text-tokens) past what an encoder reads, a warning per encoder, as `fusedit describe`
    warns of text.max_length (system._check_positions): past the LLM's max_position_embeddings the numbers
    time positions it never learned; past its max_length, prompts no training or sampling run feeds it."""
    for enc in s.model.encoders:
        positions = getattr(enc.llm.config, "max_position_embeddings", None)
        if positions is not None and tokens > positions:
            log.warning(
                "--text-tokens %d is more than the LLM's max_position_embeddings=%d: the prompts read positions "
                "it never learned; set --text-tokens <= %d",
                tokens,
                positions,
                positions,
            )
        elif tokens > enc.prompt_limit:
            log.warning(
                "--text-tokens %d is more than %s=%d: training and sampling cut prompts to %d tokens, so no "
                "run of this config reads prompts this long",
                tokens,
                enc.setting,
                enc.prompt_limit,
                enc.prompt_limit,
            )


def use_sampling_form(s: BenchSetup) -> None:
    """What `fusedit sample` does to a loaded model: LoRA adapters merged (as load_model merges them), then
    sample.fuse_projections, sample.bf16_weights; one-way, so every training measurement comes first."""
    if not s.sampling_form:
        for module in trained_modules(s.model).values():
            merge_adapters(module)
        to_sampling_form(s.model, s.cfg)
        s.sampling_form = True


def levers(s: BenchSetup) -> dict:
    """The speed settings a measurement ran with, and each LLM it timed (text, extra_text.0, ...): its
    config's model_id, whether its shape is that model_id's or the arch's (random_init_text), and the
    shape, recorded next to it (BenchSetup.llm, found once)."""
    cfg = s.cfg
    return {
        **s.llm,
        "attention_backend": cfg.model.attention_backend,
        "llm_attention": s.model.text.llm.config._attn_implementation,  # text.attn_implementation resolved
        "compile": cfg.train.compile,
        "sample_compile": cfg.sample.compile,
        "trim_padding": cfg.text.trim_padding,
        "trim_multiple": s.model.text.trim_multiple_on(s.device),
        "grad_checkpointing": cfg.train.grad_checkpointing,
        "activation_memory_budget": cfg.train.activation_memory_budget,
        "fuse_projections": cfg.sample.fuse_projections,
        "bf16_weights": cfg.sample.bf16_weights,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bench_train(
    s: BenchSetup,
    batch: int,
    resolution: int,
    tokens: int,
    warmup: int,
    repeats: int,
    min_tokens: int | None = None,
) -> dict:
    """The training step of `fusedit train` (train.loop's flow_backward, finish_gradients, take_update) on
    a synthetic batch: ``batch`` random latents at ``resolution``, fixed over the steps, and random token ids
    of ``tokens`` (with ``min_tokens``, of real lengths drawn in min_tokens..tokens per step:
    prompt_lengths). One record: its time per step (STEPS_PER_TIMING steps back to back, the median of
    ``repeats`` after ``warmup`` untimed steps), throughput, FLOPs and MFU, peak memory, and how it was made."""
    cfg, device, denoiser = s.cfg, s.device, s.model.denoiser
    side = resolution // cfg.vae.downsample
    gen, tgen = torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(0)
    lgen = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, cfg.vae.latent_channels, side, side, generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    tc, fc = cfg.train, cfg.flow
    t = sample_training_times(batch, gen, fc.logit_mean, fc.logit_std, fc.shift).to(device)  # (batch,)
    opts = Optimizers.build(s.model, tc, device)
    params = opts.parameters()
    # Before the peak is reset: its float32 copy is held all run long (on the GPU unless train.ema_offload).
    ema = EMA(denoiser, tc.ema_decay, offload=tc.ema_offload)
    denoiser.train()
    widths = []  # the trimmed text length of each LLM at every timed step
    schedule_steps = itertools.count()  # each step's learning rate is that of a run's step as many in
    autocasts = StepAutocasts.of(tc, device)

    def step(lengths=None):
        if lengths is None:
            lengths = prompt_lengths(batch, tokens, min_tokens, lgen)

        def text() -> TextContext:  # a training step includes one LLM forward
            context = synthetic_text(s.model, lengths, tokens, tgen)
            widths.append([c.mask.shape[1] for c in context.all])
            return context

        loss, _ = flow_backward(denoiser, text, x0, noise, t, autocasts)
        # Random ids of the batch's lengths: no prompt is cut, a count the run's host sync reads all the same.
        loss_value, norm, *_ = finish_gradients(
            opts, params, tc, next(schedule_steps), tc.steps, loss, torch.zeros_like(loss)
        )
        take_update(opts, ema, loss_value, norm)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Padded prompts: an untimed step for every text length and mask a batch can meet, so that no compile
    # lands in the timed steps (what a long training run sees once, at its start). More lengths than a
    # compiled function may have graphs are not primed: the timed steps then show what such a run pays.
    priming = priming_lengths(s.model, batch, tokens, min_tokens)
    widths_to_prime = {width for width, _ in priming}
    primed = len(widths_to_prime) <= MAX_PRIMED_WIDTHS
    for lengths in priming.values() if primed else []:
        step(lengths)
    for _ in range(warmup):
        step()
    widths.clear()
    seconds = time_it(step, device, 0, repeats, STEPS_PER_TIMING)
    timed_widths = list(widths)  # the EMA update's steps below are not the timed ones
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    ema_seconds = overlapped_cost(
        lambda: ema.update(denoiser), lambda: ema.busy, step, seconds, device, repeats
    )
    ema.wait()  # raises what a host-held update raised
    seconds += ema_seconds / tc.ema_every
    # The denoiser's kernels: its forward alone, autograd on as in a step (the LLM's attention runs first).
    with autocasts.text:
        text = synthetic_text(s.model, prompt_lengths(batch, tokens, min_tokens, lgen), tokens, tgen)

    def forward():
        with autocasts.denoiser:
            denoiser(interpolate(x0, noise, t), t, text)

    kernels = attention_kernels(forward)
    n_img = image_tokens(resolution, cfg.vae.downsample, cfg.model.patch_size)
    # FLOPs at the text lengths of every step time_it ran, its untimed lead-ins on a GPU among them (their
    # lengths are drawn as the timed steps' are); padding included: the kernels compute it. What a step
    # costs follows what it trains (training_flops_per_image: 3x the DiT forward and the frozen LLM's
    # forward by default; 2x through LoRA; a trained LLM's backward from its lowest trained layer up).
    leads = [e.leading for e in s.model.encoders]
    parts, layers = Parts.of(tc), min(len(e.llm.layers) for e in s.model.encoders)
    flops = statistics.mean(
        training_flops_per_image(
            parts,
            denoiser_flops(denoiser, n_img, w, leads),
            sum(llm_flops(e.llm, n) for e, n in zip(s.model.encoders, w, strict=True)),
            layers,
        )
        for w in timed_widths
    )
    achieved = flops * batch / seconds
    return {
        "kind": "train",
        "preset": cfg.name,
        "device": str(device),
        "batch": batch,
        "resolution": resolution,
        "text_tokens": tokens,
        "min_text_tokens": min_tokens,
        "text_width_mean": statistics.mean(w[0] for w in timed_widths),
        "primed_widths": len(widths_to_prime) if primed else 0,
        "warmup": warmup,
        "repeats": repeats,
        "steps_per_timing": STEPS_PER_TIMING,
        "timer": timer(device),
        "step_s": seconds,  # the EMA update's share included
        "ema_update_s": ema_seconds,  # what one update adds to the steps it overlaps
        "ema_every": tc.ema_every,
        "ema_offload": tc.ema_offload,
        "images_per_s": batch / seconds,
        "tflops": achieved / 1e12,
        "mfu": achieved / s.peak,
        "peak_tflops": s.peak / 1e12,
        "flops_per_image": flops,
        # Allocated by tensors (what torch.cuda.max_memory_allocated counts), not the allocator's reserve
        # or nvidia-smi's figure; bytes, and GiB (2**30) for reading.
        "peak_memory_bytes": peak_bytes,
        "peak_memory_gib": peak_bytes / 2**30 if peak_bytes is not None else None,
        "trainable_params": sum(p.numel() for p in params),  # every weight the step's AdamW updates
        "trainable": parts.describe(),
        "attention_kernels": kernels,
        **levers(s),
    }


def bench_sample(
    s: BenchSetup,
    prompts: int,
    resolution: int,
    tokens: int,
    steps: int,
    guidance: float,
    cached: bool,
    warmup: int,
    repeats: int,
    min_tokens: int | None = None,
) -> dict:
    """What `generate` does past tokenizing, on synthetic token ids: the velocity of
    ``fusedit.sampling.generation.text_velocity`` (and its CUDA graph, sample.cuda_graphs) integrated by the
    sampler."""
    use_sampling_form(s)
    cfg, device = s.cfg, s.device
    side = resolution // cfg.vae.downsample
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(prompts, cfg.vae.latent_channels, side, side, generator=gen).to(device)
    use_cfg = guidance != 1.0
    # As generate encodes each distinct text once: with guidance, the negative prompt is one LLM row taken
    # for every image's (TextContext.take), then the prompts. It is empty (1 token) when prompts are padded;
    # without padding every row is full.
    lengths = prompt_lengths(prompts + int(use_cfg), tokens, min_tokens, gen, empty_rows=int(use_cfg))
    rows = [0] * prompts + list(range(1, prompts + 1)) if use_cfg else None
    dtype = sampling_dtype(cfg.sample.precision, device)  # set from bf16 by setup
    widths, graphed = [], []

    def guided_text() -> TextContext:
        context = synthetic_text(s.model, lengths, tokens, torch.Generator(device).manual_seed(1))
        return context.take(rows) if rows is not None else context

    @torch.no_grad()
    def run():
        def text():
            context = guided_text()
            widths.append(context.mask.shape[1])
            return context

        velocity = text_velocity(
            s.model.denoiser, text() if cached else text, guidance, dtype, cfg.sample.cuda_graphs
        )
        graphed.append(isinstance(velocity, CUDAGraphVelocity))
        return sample(velocity, noise, steps, shift=cfg.sample.shift, schedule=cfg.sample.schedule)

    seconds = time_it(run, device, warmup, repeats)

    # The denoiser's kernels: one step over the cached text (the LLM's attention runs before), eager, as a
    # CUDA graph's replay dispatches no operator.
    with torch.no_grad():
        velocity = text_velocity(s.model.denoiser, guided_text(), guidance, dtype)
        kernels = attention_kernels(lambda: velocity(noise, torch.ones(prompts, device=device)))
    return {
        "kind": "sample",
        "preset": cfg.name,
        "device": str(device),
        "prompts": prompts,
        "resolution": resolution,
        "text_tokens": tokens,
        "min_text_tokens": min_tokens,
        "text_width_mean": statistics.mean(widths),
        "llm_rows": len(lengths),  # each distinct text once, as generate encodes them
        "steps": steps,
        "guidance": guidance,
        "text_cache": cached,
        "cuda_graphs": graphed[-1],
        "warmup": warmup,
        "repeats": repeats,
        "timer": timer(device),
        "batch_s": seconds,
        "images_per_s": prompts / seconds,
        "s_per_image": seconds / prompts,
        "attention_kernels": kernels,
        **levers(s),
    }


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        kernels = r["attention_kernels"]
        attn = "attention " + ("+".join(kernels) or "compiled") if kernels is not None else ""
        if r["kind"] == "train":
            gib = r["peak_memory_gib"]
            mem = f"{gib:.1f} GiB ({r['peak_memory_bytes'] / 1e9:.1f} GB)" if gib is not None else "-"
            lines.append(
                f"train  {r['preset']:<22} {r['resolution']:>5}px b{r['batch']:<4} {r['images_per_s']:9.2f} img/s "
                f"{r['tflops']:8.2f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  peak mem {mem}  {attn}"
            )
        else:
            lines.append(
                f"sample {r['preset']:<22} {r['resolution']:>5}px n{r['prompts']:<4} {r['images_per_s']:9.2f} img/s "
                f"{r['s_per_image']:8.3f} s/img  {r['steps']} steps cfg {r['guidance']}  "
                f"{'cached' if r['text_cache'] else 'uncached'}  {attn}"
            )
    return "\n".join(lines)
