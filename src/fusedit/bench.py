"""`fusedit bench`: training-step and sampling throughput of any preset with random weights and synthetic
inputs (latents and token ids), so it needs no data and no downloads.

Training: images/s, achieved TFLOP/s from the model's own FLOP count (3 x DiT forward + 1 x LLM forward per
image, ``fusedit.models.flops``), MFU against a matmul peak measured on the spot, peak memory. Sampling:
images/s and seconds per image for N steps with guidance, with and without the text cache. Warm-up runs are
excluded; the figure is the median of the repeats, timed with CUDA events on a GPU (perf_counter on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from fusedit.config import Config
from fusedit.flow import flow_loss, guided, interpolate, sample
from fusedit.models.flops import denoiser_flops, image_tokens, llm_flops
from fusedit.sample import to_sampling_form
from fusedit.system import TextToImage, build_model, count_parameters
from fusedit.text.context import TextContext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """Measured dense matmul rate (FLOP/s) on this device: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_it(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * n**3 / seconds


def synthetic_text(model: TextToImage, batch: int, tokens: int, generator: torch.Generator) -> TextContext:
    """Random token ids of exactly ``tokens`` per prompt (no padding) through every LLM, once."""
    device = next(model.denoiser.parameters()).device
    contexts = []
    for enc, request in zip(model.encoders, model.denoiser.text_requests, strict=True):
        vocab = enc.llm.config.vocab_size
        ids = torch.randint(vocab, (batch, tokens), generator=generator, device=generator.device).to(device)
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        contexts.append(enc(ids, mask, request))
    context = contexts[0]
    context.others = contexts[1:]
    if model.pooled_text is not None:
        context.pooled = model.pooled_text(["a prompt"] * batch)
    return context


@dataclasses.dataclass
class BenchSetup:
    model: TextToImage
    cfg: Config
    device: torch.device
    autocast: contextlib.AbstractContextManager
    peak: float
    sampling_form: bool = False  # set once the denoiser has been turned into its sampling form


def setup(cfg: Config, device: torch.device, bf16: bool) -> BenchSetup:
    """Random weights of the preset's shape (a hub model_id is replaced by its ``arch``), no VAE."""
    # Sampling runs under the same precision as the training steps (sample.precision follows --fp32).
    precision = "bf16" if bf16 else "fp32"
    cfg = dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, model_id="", tokenizer=""),
        sample=dataclasses.replace(cfg.sample, precision=precision),
    )
    torch.manual_seed(0)
    model = build_model(cfg, device, with_autoencoder=False)
    # The same training-time levers as `fusedit train`, read from the config (train.compile, ...).
    model.denoiser.set_gradient_checkpointing(cfg.train.grad_checkpointing)
    model.compile_parts(cfg.train.compile, cfg.train.activation_memory_budget)
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    return BenchSetup(model, cfg, device, autocast, matmul_peak(device, dtype))


def use_sampling_form(s: BenchSetup) -> None:
    """What `fusedit sample` does to a loaded model (sample.fuse_projections, sample.bf16_weights); one-way,
    so every training measurement comes first."""
    if not s.sampling_form:
        to_sampling_form(s.model, s.cfg)
        s.sampling_form = True


def levers(cfg: Config) -> dict:
    """The speed settings a measurement ran with, recorded next to it."""
    return {
        "attention_backend": cfg.model.attention_backend,
        "compile": cfg.train.compile,
        "grad_checkpointing": cfg.train.grad_checkpointing,
        "activation_memory_budget": cfg.train.activation_memory_budget,
        "fuse_projections": cfg.sample.fuse_projections,
        "bf16_weights": cfg.sample.bf16_weights,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bench_train(s: BenchSetup, batch: int, resolution: int, tokens: int, warmup: int, repeats: int) -> dict:
    cfg, device, denoiser = s.cfg, s.device, s.model.denoiser
    side = resolution // cfg.vae.downsample
    gen, tgen = torch.Generator().manual_seed(0), torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, cfg.vae.latent_channels, side, side, generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    denoiser.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        text = synthetic_text(s.model, batch, tokens, tgen)  # a training step includes one LLM forward
        with s.autocast:
            v = denoiser(interpolate(x0, noise, t), t, text)
        flow_loss(v, x0, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_it(step, device, warmup, repeats)
    n_img = image_tokens(resolution, cfg.vae.downsample, cfg.model.patch_size)
    flops = 3 * denoiser_flops(denoiser, n_img, tokens) + sum(
        llm_flops(e.llm, tokens) for e in s.model.encoders
    )
    achieved = flops * batch / seconds
    return {
        "kind": "train",
        "preset": cfg.name,
        "device": str(device),
        "batch": batch,
        "resolution": resolution,
        "text_tokens": tokens,
        "step_s": seconds,
        "images_per_s": batch / seconds,
        "tflops": achieved / 1e12,
        "mfu": achieved / s.peak,
        "peak_tflops": s.peak / 1e12,
        "flops_per_image": flops,
        "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30)
        if device.type == "cuda"
        else None,
        "trainable_params": count_parameters(denoiser, trainable=True),
        **levers(cfg),
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
) -> dict:
    use_sampling_form(s)
    cfg, device, denoiser = s.cfg, s.device, s.model.denoiser
    side = resolution // cfg.vae.downsample
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(prompts, cfg.vae.latent_channels, side, side, generator=gen).to(device)
    rows = 2 * prompts if guidance != 1.0 else prompts

    @torch.no_grad()
    def run():
        context = synthetic_text(s.model, rows, tokens, torch.Generator(device).manual_seed(1))

        def velocity(x, t):
            text = (
                context
                if cached
                else synthetic_text(s.model, rows, tokens, torch.Generator(device).manual_seed(1))
            )
            with s.autocast:
                return denoiser(x, t, text).float()

        v = guided(velocity, guidance) if guidance != 1.0 else velocity
        return sample(v, noise, steps, shift=cfg.sample.shift)

    seconds = time_it(run, device, warmup, repeats)
    return {
        "kind": "sample",
        "preset": cfg.name,
        "device": str(device),
        "prompts": prompts,
        "resolution": resolution,
        "text_tokens": tokens,
        "steps": steps,
        "guidance": guidance,
        "text_cache": cached,
        "batch_s": seconds,
        "images_per_s": prompts / seconds,
        "s_per_image": seconds / prompts,
        **levers(cfg),
    }


def format_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["kind"] == "train":
            mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "-"
            lines.append(
                f"train  {r['preset']:<22} {r['resolution']:>5}px b{r['batch']:<4} {r['images_per_s']:9.2f} img/s "
                f"{r['tflops']:8.2f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  peak mem {mem}"
            )
        else:
            lines.append(
                f"sample {r['preset']:<22} {r['resolution']:>5}px n{r['prompts']:<4} {r['images_per_s']:9.2f} img/s "
                f"{r['s_per_image']:8.3f} s/img  {r['steps']} steps cfg {r['guidance']}  "
                f"{'cached' if r['text_cache'] else 'uncached'}"
            )
    return "\n".join(lines)
