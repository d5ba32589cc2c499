"""Typed configuration: dataclasses loaded from YAML presets plus ``section.key=value`` overrides.

A config file is YAML with one mapping per section (``model``, ``text``, ``vae``, ``data``, ``flow``,
``train``, ``sample``) and an optional ``base:`` naming a preset (or another file) it overrides. Every key
is checked at load: an unknown key or a bad value fails with a one-line :class:`ConfigError` naming the
key, the value and what is allowed. The resolved config is written next to every run and checkpoint.

A run may be a list of ``stages`` (training recipes: resolution schedules, joint LLM fine-tuning, LoRA
fine-tuning): each stage has its own length and overrides of the ``data``, ``train``, ``flow`` and
``sample`` sections, applied on top of the stage before it (the first on top of the top-level sections).
:func:`resolved_stages` turns a config into one full config per stage with its global step range; a config
without stages is one implicit stage, the config itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import logging
import numbers
import os
import re
import shlex
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config key or value is not allowed; the message is one line that says what is."""


class RunStopped(RuntimeError):
    """A training job stopped by something outside this process (its launcher gone, another process of the
    job failed or stopped answering): not a bug. ``reason`` says what happened, ``kept`` what is kept and how
    to go on (the command line words it for the flags given); the message is both, in one line."""

    def __init__(self, reason: str, kept: str):
        super().__init__(reason, kept)  # both in args: it pickles (a train() in a process pool)
        self.reason, self.kept = reason, kept

    def __str__(self) -> str:
        return f"{self.reason}; {self.kept}"


# The largest sampling seed, as `fusedit sample` and `serve` take seeds (torch would take up to 2**64 - 1):
# image i starts from the noise of seed + i, and an image's recorded seed should make it again in either.
SEED_MAX = 2**32 - 1


def choice(default: str, *allowed: str) -> Any:
    """A string field restricted to ``allowed`` (validated at load)."""
    return field(default=default, metadata={"choices": allowed})


def choices_of(section: type, name: str) -> tuple[str, ...]:
    """The values a ``choice`` field of a config section allows (command-line flags offer the same)."""
    return section.__dataclass_fields__[name].metadata["choices"]


def positive(default: float | int | None) -> Any:
    return field(default=default, metadata={"min": 0, "strict": True})


def nonneg(default: float | int) -> Any:
    return field(default=default, metadata={"min": 0})


def subset(default: list[str], *allowed: str, nonempty: bool = False) -> Any:
    """A list of distinct strings, each one of ``allowed`` (validated at load)."""
    return field(
        default_factory=lambda: list(default), metadata={"item_choices": allowed, "nonempty": nonempty}
    )


@dataclass
class ModelConfig:
    """The denoiser. Heads, head_dim, KV heads and MLP are mirrored from the LLM (design-space.md s.1)."""

    # fusedit: deep fusion; fusedit-cross: its cross-attention variant; dit-self / dit-cross: the shallow
    # baselines reading one LLM hidden state (text.hidden_layer) per LLM (design-space.md s.1). LI-DiT is
    # dit-cross with the refiner, pooled-text modulation and the conv position embedding (s.2). Their
    # traits (deep or shallow, self- or cross-attention): DESIGN_TRAITS.
    design: str = choice("fusedit", "fusedit", "fusedit-cross", "dit-self", "dit-cross")
    # Residual width of the DiT; None = the LLM's hidden size.
    dit_hidden_size: int | None = positive(None)
    # Number of DiT layers (= fused LLM layers); None = every LLM layer after `initial_layers`.
    num_layers: int | None = positive(None)
    # Deep fusion: LLM layers that run text-only before fusion starts (DiT layer i pairs with LLM layer
    # initial_layers + i). The shallow designs read text.hidden_layer instead.
    initial_layers: int = nonneg(0)
    # "none": no position input besides model.conv_pos, which it requires (LI-DiT).
    pos_embed: str = choice("ape", "ape", "1d-rope", "2d-rope", "m-rope", "none")
    timestep_conditioning: str = choice("adaln-zero", "adaln-zero", "adaln-single", "addition", "none")
    qk_norm: bool = True
    sandwich_norm: bool = False
    patch_size: int = positive(2)
    # SDPA backend for the DiT's attention; "auto" tries cuDNN, flash, efficient, math in that order
    # (fusedit.layers.attention.AUTO_ORDER).
    attention_backend: str = choice("auto", "auto", "math", "flash", "efficient", "cudnn")
    # Shallow designs only: the DiT's own attention/MLP shape instead of the LLM's (None = mirror the LLM,
    # as FuseDiT does; LI-DiT-1B uses 16 heads over width 1152). Deep fusion must mirror the LLM.
    num_heads: int | None = positive(None)
    num_kv_heads: int | None = positive(None)
    head_dim: int | None = positive(None)
    intermediate_size: int | None = positive(None)
    # LI-DiT's position embedding: a conv ResBlock over the patch grid right after patchify (s.2).
    conv_pos: bool = False
    # LI-DiT linguistic token refiner blocks per LLM (shallow designs only; 0 = the plain RMSNorm + Linear
    # context embedder). Width = the DiT width; MLP ratio 4; LayerNorm; no RoPE (unknown in the paper: the
    # choices of a public re-implementation).
    refiner_depth: int = nonneg(0)
    refiner_heads: int = positive(8)
    # Ablation: keep the LLM's causal mask inside the refiner instead of bidirectional attention.
    refiner_causal: bool = False
    # The refiners' zero-initialised gates on every sublayer; false = the "no gating" ablation (s.2).
    refiner_gating: bool = True
    # With 2+ LLMs: LI-DiT's collaborative refiner (each LLM's tokens cross-attend to the others').
    collaborative_refiner: bool = True
    # With 2+ LLMs: how the refined branches become one sequence (the paper leaves the axis unknown):
    # "tokens" one after another; "channels" token j of every branch side by side, Linear back to the width.
    refiner_concat: str = choice("tokens", "tokens", "channels")
    # Drop instruction/template tokens after the refiners (LI-DiT); they stay for the refiners to read.
    drop_instruction: bool = True
    # Extra modulation added to the timestep embedding: "refined" = masked mean of the refined text
    # (LI-DiT), "clip" = a second encoder's pooled embedding (FuseDiT clip-mod, configured in pooled_text).
    pooled_text: str = choice("none", "none", "refined", "clip")
    # -- Options that reproduce the public FuseDiT code's numerics (fusedit.convert.fusedit_official); the
    # defaults are fusedit's own choices.
    # APE positions scaled by ape_base_size / grid, as diffusers' PatchEmbed does (its base_size: the training
    # grid in patches), so every grid spans the training grid's range; None = positions 0 .. h - 1.
    ape_base_size: int | None = positive(None)
    # APE over a fixed ape_max_size x ape_max_size grid, centre-cropped to the latent grid (diffusers'
    # pos_embed_max_size); None = the latent grid itself.
    ape_max_size: int | None = positive(None)
    # The norm adaLN modulates (adaln-zero, adaln-single): "layernorm" (DiT, parameter-free) or "rmsnorm"
    # (affine, the public FuseDiT code).
    adaln_norm: str = choice("layernorm", "layernorm", "rmsnorm")
    # RoPE schemes: "joint" = text and image share one sequence (image positions after the unpadded text;
    # shallow designs rotate their projected text keys at 0 .. T - 1); "image-only" = only image tokens are
    # rotated, from position 0 (the public code's shallow baselines; shallow designs only, as deep fusion's
    # text keys come rotated by the LLM).
    rope_layout: str = choice("joint", "joint", "image-only")
    # Deep fusion: image rotations as the public code computed them for prompts left-padded to this many
    # tokens (Gemma's tokenizers pad on the left), see layers/position.py; None = right padding.
    # design=fusedit with pos_embed ape or a RoPE scheme and rope_layout=joint only.
    rope_left_pad: int | None = positive(None)


@dataclass
class TextConfig:
    """The frozen LLM and its tokenizer."""

    # Hugging Face hub id or local folder; empty = build `family` from `arch` with random weights.
    model_id: str = ""
    family: str = choice("gemma", "gemma", "gemma2", "qwen2", "qwen3", "llama", "mistral")
    # transformers config fields for a random-init LLM (ignored when model_id is set).
    arch: dict = field(default_factory=dict)
    # Tokenizer hub id or folder; empty = model_id's, or the built-in shapes-world word tokenizer.
    tokenizer: str = ""
    # Prompt tokens (longer prompts are truncated, with a warning); the template's tokens come on top.
    max_length: int = positive(32)
    # How a prompt is presented to the LLM (fusedit.text.templates): "plain" = instruction + prompt;
    # "chat" = the tokenizer's chat template around it; "lidit" = LI-DiT's instruction as plain text;
    # "lidit-chat" = LI-DiT's instruction inside the chat template (instruction-tuned LLMs).
    template: str = choice("plain", "plain", "chat", "lidit", "lidit-chat")
    # Plain-text prefix before every prompt (FuseDiT's "Imagine: " study).
    instruction: str = ""
    # System prompt for the chat and LI-DiT templates (LI-DiT's wording is unknown; empty by default).
    system_prompt: str = ""
    # The hidden state shallow designs and the refiner read (transformers indexing: -1 = last after the
    # final norm; LI-DiT: -3, the third-to-last block's output).
    hidden_layer: int = -1
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    # The LLM's attention kernel (transformers' attn_implementation; model.attention_backend is the DiT's).
    # auto: what transformers picks for the family, sdpa where the family supports it and eager for
    # Gemma-2, whose attention logit soft-capping sdpa cannot do. A family that cannot run the one named is
    # refused when the LLM loads.
    attn_implementation: str = choice("auto", "auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
    # Cut each batch's text to its longest real prompt: exact (padded keys are masked anyway) and cheaper.
    trim_padding: bool = True
    # With trim_padding, round the kept length up to a multiple of this. Compiled DiT blocks (train.compile,
    # sample.compile) compile once per text length, and past torch's recompile limit new lengths run
    # eagerly, so real prompts of every length must not each get their own. None = auto: 128 on a GPU
    # (at most ceil(max_length / 128) lengths, cuDNN-friendly key lengths; text/encoder.py), 1 (the
    # longest prompt exactly) on the CPU.
    trim_multiple: int | None = positive(None)
    # Steps of next-token pretraining on the shapes caption corpus for a random-init LLM (0 = none).
    pretrain_steps: int = nonneg(0)


@dataclass
class PooledTextConfig:
    """A second text encoder whose pooled embedding modulates the DiT (FuseDiT clip-mod): a CLIP text model
    through transformers (hub id or folder), or a random-init one from ``arch`` (tests, demos)."""

    model_id: str = ""
    arch: dict = field(default_factory=dict)
    tokenizer: str = ""
    max_length: int = positive(77)


@dataclass
class VAEConfig:
    """The latent space. "identity" trains in pixel space behind the same interface a real VAE uses."""

    kind: str = choice("identity", "identity", "diffusers")
    model_id: str = ""
    subfolder: str = ""
    latent_channels: int = positive(3)
    # Pixels per latent cell along each side (8 for the SD3/FLUX/SDXL VAEs, 1 for identity).
    downsample: int = positive(1)


# The procedural shapes world's prompt kinds (data/shapes.py draws them), each with the fewest objects it
# shows, and the most objects a scene holds: here, below data/, so that data.kinds and data.max_objects are
# checked when a config loads rather than when the world is built (for a later stage, hours into a run).
SHAPES_KINDS: dict[str, int] = {"single": 1, "two": 2, "counting": 2, "position": 2, "color_attr": 2}
SHAPES_MAX_OBJECTS = 4


def check_shapes_options(kinds: Iterable[str] | str, max_objects: int) -> tuple[str, ...]:
    """Validate the shapes world's ``kinds`` and ``max_objects``; returns ``kinds`` as a tuple without
    duplicates. Raises ValueError."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(dict.fromkeys(kinds))
    allowed = ", ".join(SHAPES_KINDS)
    if not kinds:
        raise ValueError(f"kinds must not be empty; allowed kinds: {allowed}")
    for kind in kinds:
        if kind not in SHAPES_KINDS:
            raise ValueError(f"unknown prompt kind {kind!r}; allowed kinds: {allowed}")
    if not 1 <= max_objects <= SHAPES_MAX_OBJECTS:
        raise ValueError(f"max_objects must be between 1 and {SHAPES_MAX_OBJECTS}, got {max_objects}")
    for kind in kinds:
        if SHAPES_KINDS[kind] > max_objects:
            raise ValueError(
                f"prompt kind {kind!r} needs at least {SHAPES_KINDS[kind]} objects but max_objects={max_objects}"
            )
    return kinds


@dataclass
class DataConfig:
    # shapes: the procedural world; folder: images on disk; webdataset: tar shards; hf: Hugging Face
    # datasets; latents: a cache written by `fusedit cache-latents` (no VAE encode in training).
    source: str = choice("shapes", "shapes", "folder", "webdataset", "hf", "latents")
    image_size: int = positive(32)
    max_objects: int = positive(4)
    # Distinct samples of the procedural dataset; training steps cycle over them (small = overfit).
    num_samples: int = positive(10_000_000)
    kinds: list = field(default_factory=lambda: list(SHAPES_KINDS))
    # Probability that a caption is replaced by "" so the model learns the unconditional velocity (CFG).
    caption_dropout: float = field(default=0.1, metadata={"min": 0, "max": 1})
    # DataLoader worker processes (index-addressable sources) or decode threads (streams).
    num_workers: int = nonneg(0)
    # folder: the image folder, scanned recursively in sorted path order with <stem>.txt/<stem>.json
    # captions; with index_file, the folder its relative paths are resolved against (default: its folder).
    root: str = ""
    # folder: a .jsonl or .csv index with one row per image (a path column and caption columns).
    index_file: str = ""
    # Column (index file, hf) or tar member extension (webdataset) holding the image; "" = the first of
    # path/file_name/image/filepath/file (index file), "image" (hf), jpg/jpeg/png/webp (webdataset).
    image_field: str = ""
    # Caption sources, tried in order; dotted names read into JSON (e.g. json.caption). Several present:
    # see caption_pick. A sample with none of them is skipped and counted ("no-caption").
    caption_fields: list = field(default_factory=lambda: ["txt", "caption"])
    # "random": a caption drawn by (seed, epoch, sample) among the fields present; "first": the first one.
    caption_pick: str = choice("random", "random", "first")
    # webdataset: one entry per dataset, a brace pattern ("data/{0000..0099}.tar") or a list of them.
    # On the command line quote the YAML: data.shards='["a/{0..9}.tar", "b/{0..3}.tar"]'.
    shards: list = field(default_factory=list)
    # webdataset: mixing weight of each data.shards entry (empty = equal weights).
    weights: list = field(default_factory=list)
    # hf: a parquet file or glob, a local dataset folder, or a hub id; hf_name picks the hub config.
    hf_path: str = ""
    hf_name: str = ""
    hf_split: str = "train"
    # hf: stream instead of downloading (read in stored order, not shuffled; position is restorable).
    hf_streaming: bool = False
    # Images whose shorter side is below this are skipped and counted ("tiny"); None = image_size // 2
    # (upscaling by more than 2x mostly teaches blur).
    min_image_size: int | None = positive(None)
    # Crop after resizing the shorter side: "center", or "random" (offset fixed per sample by seed).
    crop: str = choice("center", "center", "random")
    # Aspect-ratio buckets as [[H, W], ...]: each image goes to the nearest aspect ratio and every batch
    # comes from one bucket (the whole global batch of a step, all processes alike, except for streams,
    # which bucket per process); empty = square image_size crops.
    buckets: list = field(default_factory=list)
    # latents: the folder `fusedit cache-latents` wrote (safetensors shards + index.json).
    latents_dir: str = ""


@dataclass
class FlowConfig:
    """Rectified-flow training (design-space.md s.3): logit-normal t, then the SD3 shift."""

    logit_mean: float = 0.0
    logit_std: float = positive(1.0)
    shift: float = positive(3.0)


# What a stage can train (train.trainable): the denoiser (its text adapter included), the shallow designs'
# text adapter between the LLM and the DiT alone (LI-DiT's refiners or the context embedder), and the
# LLM(s) themselves (joint fine-tuning, see fusedit.train.stages).
TRAINABLE_PARTS = ("dit", "refiner", "llm")


@dataclass
class LoRAConfig:
    """LoRA adapters (through peft) on a part's linear projections: with rank >= 1 the part trains through
    the adapters and its own weights stay frozen; rank 0 = no adapters (the part trains fully)."""

    rank: int = nonneg(0)
    # The adapters' output is scaled by alpha / rank; None = rank (scale 1).
    alpha: float | None = positive(None)
    # Module names to adapt, matched against the end of each module's dotted name (peft's rule); empty =
    # the part's attention projections q/k/v/o_proj, and for the DiT also its MLP's gate/up/down_proj (the
    # DiT's blocks use the LLMs' module names).
    targets: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    # Optimizer steps. With `stages` this is the sum of the stages' steps (set at load).
    steps: int = positive(1000)
    # Samples per process and micro-step: the global batch of a step is
    # batch_size * grad_accum * world size (the number of torchrun processes).
    batch_size: int = positive(32)
    # Micro-steps whose gradients are summed before each optimizer step (under DDP without an all-reduce
    # until the last one).
    grad_accum: int = positive(1)
    # The global batch a recipe means (None: unchecked). When set, batch_size * grad_accum * world size must
    # equal it, checked when training starts: a recipe's batch of 512 stays 512 on 8 GPUs (batch_size=64)
    # instead of becoming 8 x 512.
    global_batch: int | None = positive(None)
    # At most 1: an AdamW step moves each weight by about lr, so far above it a run only diverges, and from
    # about 1e37 Adam's step size overflows float32.
    lr: float = field(default=1e-4, metadata={"min": 0, "strict": True, "max": 1})
    weight_decay: float = nonneg(1e-4)
    beta1: float = field(default=0.9, metadata={"min": 0, "max": 1})
    beta2: float = field(default=0.999, metadata={"min": 0, "max": 1})
    warmup_steps: int = nonneg(0)
    # LR after warmup: "constant" (the FuseDiT recipe) or "cosine" decay to 0 at train.steps.
    schedule: str = choice("constant", "constant", "cosine")
    grad_clip: float = positive(1.0)
    # Recompute each DiT block's activations in backward instead of keeping them (memory for time).
    grad_checkpointing: bool = False
    # torch.compile every DiT block (and the LLM): "auto" = inductor on a GPU and off on the CPU; "" = off;
    # "max-autotune" = inductor choosing each matmul's kernel by timing it (longer compile;
    # fusedit.models.base.compile_settings); "eager" and "aot_eager" only check tracing.
    compile: str = choice("auto", "auto", "", "inductor", "max-autotune", "aot_eager", "eager")
    # Below 1, the compiled blocks recompute their cheapest activations in backward so that the kept ones
    # fit this fraction of the default (memory for a little time; fusedit-gemma2b's 512 px batch 16 fits
    # 64 GB with it, benchmarks/RESULTS.md).
    activation_memory_budget: float = field(default=1.0, metadata={"min": 0, "max": 1})
    # Every this many steps, rank 0 samples a preview grid of data captions into run_dir/previews (0 = off).
    preview_every: int = nonneg(0)
    # A step whose loss or gradient is NaN/inf is skipped and counted; this many in a row stop the run.
    max_bad_steps: int = positive(10)
    ema_decay: float = field(default=0.99, metadata={"min": 0, "max": 1})
    ema_every: int = positive(100)
    # Keep the EMA's float32 copy of the DiT in host memory (fusedit.train.ema): 4 bytes per DiT weight
    # off the GPU (9.1 GiB for fusedit-gemma2b) for a copy over PCIe at each update (every ema_every steps).
    ema_offload: bool = False
    precision: str = choice("auto", "auto", "fp32", "bf16")
    checkpoint_every: int = positive(500)
    # The newest this many checkpoints are kept, and each finished stage's last one besides.
    keep_checkpoints: int = positive(2)
    log_every: int = positive(10)
    # Non-negative: numpy's generators (the shapes world, data order) refuse negative seeds.
    seed: int = nonneg(0)
    # "auto": CUDA when present (under torchrun, each process the GPU of its LOCAL_RANK), else the CPU.
    device: str = "auto"
    # How the denoiser is spread over torchrun's processes: "ddp" (replicated, gradients all-reduced),
    # "fsdp" (FSDP2 fully_shard per DiT block and the root; bf16 parameters with fp32 gradient reduction
    # when precision resolves to bf16), "none" (one process only). Ignored without torchrun.
    parallel: str = choice("ddp", "none", "ddp", "fsdp")
    # Shard the frozen LLM over the processes (FSDP2, gathered for each prompt batch's forward) instead of
    # keeping a full copy on each: 1/world of its memory during the denoiser's forward and backward.
    shard_llm: bool = False
    # Collective timeout: a rank waiting this long for the others (a hung or dead peer) fails the run.
    dist_timeout_s: int = positive(1800)
    # Which parts train (TRAINABLE_PARTS); everything else is frozen and keeps nothing for backward.
    trainable: list = subset(["dit"], *TRAINABLE_PARTS, nonempty=True)
    # The LLM's own learning rate when it trains (same warmup and schedule); None = train.lr.
    llm_lr: float | None = field(default=None, metadata={"min": 0, "strict": True, "max": 1})
    # Train only the top k of the LLM layers the design reads (and the final norm when read); None = all
    # that the design reads (fusedit.text.encoder.TextEncoder.read_modules).
    llm_top_layers: int | None = positive(None)
    # Train the LLM through LoRA adapters instead of fully (rank >= 1); with llm_top_layers, only there.
    llm_lora: LoRAConfig = field(default_factory=LoRAConfig)
    # Train the DiT through LoRA adapters on its attention and MLP projections (rank >= 1), e.g. to
    # fine-tune a trained model (train.init_from); its other weights stay frozen.
    dit_lora: LoRAConfig = field(default_factory=LoRAConfig)
    # A run or checkpoint folder whose weights (EMA when saved, LoRA adapters merged; its LLM when saved),
    # or a diffusers pipeline folder whose transformer and LLMs, start this run instead of the random init:
    # fine-tuning a trained, converted or downloaded model. Resuming reads
    # this run's own checkpoints instead.
    init_from: str = ""
    # Metric loggers next to the always-on metrics.jsonl, on rank 0: "tensorboard" (run_dir/tensorboard)
    # and "wandb" (project from $WANDB_PROJECT, default "fusedit"; offline with WANDB_MODE=offline).
    loggers: list = subset([], "tensorboard", "wandb")


@dataclass
class SampleConfig:
    steps: int = positive(25)
    guidance: float = nonneg(6.0)
    sampler: str = choice("euler", "euler", "heun")
    # Time shift of the sampling schedule (SD3 style); 1.0 = no shift.
    shift: float = positive(3.0)
    # How the sampling times are spaced before the shift (fusedit.flow.samplers.SCHEDULES): "uniform" in t
    # from 1 to 0; "diffusers" = FlowMatchEulerDiscreteScheduler's default spacing, which the public FuseDiT
    # pipeline samples with (converted checkpoints use it, to reproduce published images and scores).
    schedule: str = choice("uniform", "uniform", "diffusers")
    negative_prompt: str = ""
    # Training previews' seed: image i takes seed + i, within SEED_MAX as `fusedit sample --seed` is.
    seed: int = field(default=42, metadata={"min": 0, "max": SEED_MAX})
    # Compute the LLM's per-layer text K/V once per prompt batch and reuse it for every step.
    cache_text: bool = True
    use_ema: bool = True
    # The denoiser's compute dtype when sampling: "auto" = bf16 autocast on a GPU that has bf16 (what
    # training used), fp32 elsewhere; "fp32" always fp32; "bf16" always bf16 autocast.
    precision: str = choice("auto", "auto", "fp32", "bf16")
    # The sampling form of the denoiser (fusedit.models.inference): q/k/v and gate/up as one matmul each,
    # and, under bf16 autocast, matmul weights stored in bf16 (bit-identical outputs, less memory traffic).
    fuse_projections: bool = True
    bf16_weights: bool = True
    # torch.compile each DiT block for sampling, as train.compile does for training: "auto" = inductor on a
    # GPU, off on the CPU; "" = off. The first batch of each new shape pays the compile (inductor caches it
    # on disk for later runs); every later step runs the compiled blocks. "max-autotune" as in train.compile.
    compile: str = choice("auto", "auto", "", "inductor", "max-autotune", "aot_eager", "eager")
    # Replay each sampling step as one CUDA graph (with the text cache, on a GPU; ignored elsewhere): one
    # launch instead of hundreds, for small batches that leave the GPU waiting. Off until it is measured
    # on a GPU (benchmarks/RESULTS.md).
    cuda_graphs: bool = False


# Keys a stage may not change: the run's identity and machinery (seed and placement stay fixed so that
# noise, data order and checkpoints mean the same in every stage), and its length (stages[i].steps).
RUN_WIDE_TRAIN_KEYS = (
    "steps",
    "seed",
    "device",
    "parallel",
    "shard_llm",
    "dist_timeout_s",
    "compile",
    "activation_memory_budget",
    "ema_offload",
    "keep_checkpoints",
    "init_from",
    "loggers",
)
STAGE_SECTIONS = ("data", "train", "flow", "sample")
STAGE_SECTION_CLASSES = {"data": DataConfig, "train": TrainConfig, "flow": FlowConfig, "sample": SampleConfig}


@dataclass
class StageConfig:
    """One stage of a staged run: its length and what it changes, as overrides of the data, train, flow
    and sample sections on top of the stage before it (e.g. data.image_size, train.batch_size, train.lr,
    train.trainable). The architecture (model, text, vae) is the run's."""

    name: str = ""
    # Optimizer steps of this stage (required); stage boundaries are the running sums, global step numbers.
    steps: int | None = positive(None)
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    flow: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Further LLMs (LI-DiT multi-LLM fusion), each with its own tokenizer and template.
    extra_text: list = field(default_factory=list, metadata={"item": TextConfig})
    pooled_text: PooledTextConfig = field(default_factory=PooledTextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    name: str = "run"
    # A staged run (see StageConfig and resolved_stages); empty = one stage, this config.
    stages: list = field(default_factory=list, metadata={"item": StageConfig})


@dataclass(frozen=True)
class Stage:
    """A stage resolved: global steps [start, end) and the full config it trains under (its train.steps is
    the stage's length, its stages list empty)."""

    index: int
    name: str
    start: int
    end: int
    config: Config
    # False for the one implicit stage of a run without stages, which messages do not name.
    staged: bool = True

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def where(self) -> str:
        """The stage as messages name it: "stages[1] (finetune)"."""
        return f"stages[{self.index}] ({self.name})"


# --------------------------------------------------------------------------------------------------
# Loading, merging and validation


# A name that becomes a folder or file name (a run's runs/<name>, a study's and its designs' folders,
# grids/<label>.png) and a markdown link: one word, so it is never empty and never leaves its folder
# (../x, /abs).
NAME_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
NAME_RULE = "a word of letters, digits, '.', '_', '+', '-', starting with a letter or digit"


def default_run_folder(name: str) -> str:
    """runs/<name>, where `fusedit train` writes a run given no --out. Checked here, where the name becomes
    a path, not at load: an empty name trained into runs/ itself (which --overwrite clears), ../.. left it;
    a saved run or a converted checkpoint named otherwise still loads."""
    if not isinstance(name, str) or not NAME_WORD.match(name):
        raise ConfigError(
            f"name={name!r} cannot name the run folder runs/<name> (allowed: {NAME_RULE}; or give --out)"
        )
    return f"runs/{name}"


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("fusedit.presets").iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(name_or_path: str | Path, preset: bool = False) -> tuple[dict, Path | None]:
    """A preset name, a YAML path, or a model folder -> (mapping, folder it came from for relative
    ``base:``). ``preset``: the name is a preset's, whatever the working directory holds. A preset's bare
    name (``debug``) is the preset even beside a folder of that name (a run named after its preset, as
    ``base:`` reads it): the folder is ``./debug`` (or a ``Path``)."""
    path = Path(name_or_path)
    preset = _as_preset(name_or_path, preset)
    if path.is_dir() and not preset:
        return _saved_mapping(path), None
    if not preset and (path.suffix in (".yaml", ".yml") or path.exists()):
        if not path.is_file():
            raise ConfigError(f"config file not found: {str(path)!r}")
        try:
            text, folder = path.read_text(encoding="utf-8"), path.parent
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}) (allowed: a UTF-8 YAML file)"
            ) from None
    else:
        res = resources.files("fusedit.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown preset {str(name_or_path)!r}{_preset_hint(str(name_or_path))} "
                f"(allowed: {', '.join(preset_names())})"
            )
        text, folder = res.read_text(), None
    try:
        data = load_yaml(text)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(f"cannot parse {name_or_path}: {yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {name_or_path}: {str(e).splitlines()[0]}") from None
    if data is None:
        # Read as {}, an empty file was the all-default config, refused for a missing text.arch.
        raise ConfigError(
            f"{name_or_path}: the file is empty (allowed: a YAML mapping of sections, e.g. base: debug)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name_or_path}: a config must be a YAML mapping of sections, got {type(data).__name__}"
        )
    return data, folder


def load_yaml(text: str) -> Any:
    """YAML text as ``yaml.safe_load`` reads it, but a mapping that repeats a key is a
    ``yaml.MarkedYAMLError`` naming the key and both lines (``yaml_problem`` words it in one line): the safe
    loader keeps the last one, so a section written twice (``model:`` twice) or a study's design label given
    twice silently lost the first. Checked on the composed document, before PyYAML splices merged pairs
    (``<<: *base``, which overrides on purpose) into the mappings."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_repeated_keys(node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_repeated_keys(node: yaml.Node, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: the anchored node was checked where it stands
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)  # the resolved tag: 1 and "1" are other keys
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key_node.value!r} appears twice (first on line {first[key]}; allowed: each key once)",
                        key_node.start_mark,
                    )
                first[key] = key_node.start_mark.line + 1
            _refuse_repeated_keys(key_node, seen)
            _refuse_repeated_keys(value_node, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, seen)


def pipeline_record(folder: Path) -> dict | None:
    """The Config sections a diffusers pipeline folder's transformer recorded (``fusedit.hub.export_config``),
    or None where it records none (no such file, or the public FuseDiT code's pipeline). Its scheduler's
    shift is the folder's sample.shift, as FuseDiTPipeline.fusedit_config reads it when the folder loads:
    swapping the scheduler is how docs/diffusers.md changes it."""
    try:
        recorded = json.loads((folder / "transformer" / "config.json").read_text()).get("fusedit")
    except (OSError, ValueError, AttributeError):  # absent, not JSON, or not a JSON object
        return None
    if not isinstance(recorded, dict):
        return None
    try:
        shift = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("shift")
    except (OSError, ValueError, AttributeError):
        shift = None
    if isinstance(shift, (int, float)) and not isinstance(shift, bool):
        recorded = {**recorded, "sample": {**(recorded.get("sample") or {}), "shift": float(shift)}}
    return recorded


def _saved_mapping(folder: Path) -> dict:
    """The config a model folder was saved with, as a base to build on (fine-tuning it with
    ``train.init_from``): a run or checkpoint folder's ``config.yaml``, or the sections a diffusers pipeline
    folder recorded (the data and train sections then start from their defaults, but for data.image_size
    and data.max_objects)."""
    if (folder / "config.yaml").is_file():
        return _without_noops(_read_yaml(folder / "config.yaml")[0], folder)
    if (folder / "model_index.json").is_file():
        recorded = pipeline_record(folder)
        if recorded is None:
            raise ConfigError(
                f"{str(folder)!r} is not a fusedit pipeline folder ({folder / 'transformer' / 'config.json'} "
                "records no fusedit config; a public FuseDiT pipeline needs `fusedit convert` first)"
            )
        return _without_noops(recorded, folder)
    raise ConfigError(
        f"{str(folder)!r} is a folder without a saved config (allowed: a preset name, a YAML file, or a run, "
        "checkpoint or diffusers pipeline folder)"
    )


def _preset_hint(name: str) -> str:
    """What an unknown preset name most likely meant: a YAML file of that name here (``fusedit train my-run``
    for my-run.yaml), or a preset spelled alike."""
    local = [name + ext for ext in (".yaml", ".yml") if Path(name + ext).is_file()]
    close = local or [repr(n) for n in difflib.get_close_matches(name, preset_names(), n=1)]
    return f": did you mean {close[0]}?" if close else ""


def yaml_problem(e: yaml.MarkedYAMLError) -> str:
    """PyYAML's report (several lines, the problem's position last) as one line: where, what, and what
    the parser was in the middle of."""

    def where(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    text = e.problem or e.context or "not valid YAML"
    if e.problem_mark is not None:
        text = f"{where(e.problem_mark)}: {text}"
    if e.problem and e.context:
        start = where(e.context_mark)
        text += (
            f" ({e.context} started at {start})"
            if start not in ("", where(e.problem_mark))
            else f" ({e.context})"
        )
    return text


def _as_preset(name_or_path: str | Path, preset: bool) -> bool:
    """Whether a config reference is read as a preset: asked to be (``base: debug``), or a preset's bare
    name given as a str."""
    return preset or (isinstance(name_or_path, str) and name_or_path in preset_names())


def _model_folder(name_or_path: str | Path, preset: bool) -> bool:
    """Whether a config reference reads a model folder's saved config (a preset's bare name never does)."""
    return Path(name_or_path).is_dir() and not _as_preset(name_or_path, preset)


def _resolve_raw(
    name_or_path: str | Path, seen: tuple = (), preset: bool = False, folders: list | None = None
) -> dict:
    """The merged mapping of a config reference and its ``base:`` chain; ``folders`` collects the model
    folders read along it (model_folder_bases)."""
    if str(name_or_path) in seen:
        raise ConfigError(f"config 'base' cycle: {' -> '.join(map(str, (*seen, name_or_path)))}")
    if folders is not None and _model_folder(name_or_path, preset):
        folders.append(Path(name_or_path))
    data, folder = _read_yaml(name_or_path, preset)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(
            f"{name_or_path}: base={base!r} is not allowed (allowed: a preset name, a YAML path, or a run "
            "folder)"
        )
    # A file beside the config, or a run/checkpoint/pipeline folder beside it written as a path (../run,
    # ./runs/a). A bare name (debug) is the preset, even where a folder of that name lies beside the config
    # (an output folder named like a preset) or in the working directory.
    sibling = folder / str(base) if folder is not None else None
    as_path = "/" in str(base) or str(base).startswith(".")
    if sibling is not None and (sibling.is_file() or (sibling.is_dir() and as_path)):
        return _deep_merge(_resolve_raw(sibling, (*seen, str(name_or_path)), folders=folders), data)
    bare = not as_path and Path(str(base)).suffix not in (".yaml", ".yml")
    if bare and base not in preset_names():
        raise ConfigError(
            f"base {base!r} of {name_or_path}: unknown preset{_preset_hint(base)} (allowed: "
            f"{', '.join(preset_names())}; or a YAML path or a run folder)"
        )
    if not bare and not Path(base).exists():
        beside = f"beside it ({sibling}) nor " if sibling is not None else ""
        raise ConfigError(
            f"base {base!r} of {name_or_path}: not found {beside}from the working directory "
            f"({Path(base).absolute()}) (allowed: a preset name, a YAML path, or a run folder)"
        )
    return _deep_merge(_resolve_raw(base, (*seen, str(name_or_path)), preset=bare, folders=folders), data)


def _merge_into_list(items: list, patch: dict, key: str) -> list:
    """``stages.1.steps=10``: a mapping keyed by list positions patches those items of a list."""
    out = list(items)
    for index, value in patch.items():
        i = index if isinstance(index, int) else int(index) if str(index).isdigit() else None
        if i is None or not 0 <= i < len(out):
            allowed = (
                f"allowed: 0..{len(out) - 1}" if out else f"{key} is empty: write its items in a YAML file"
            )
            raise ConfigError(f"{key}.{index}: no such item ({allowed})")
        out[i] = _deep_merge(out[i], value) if isinstance(value, dict) and isinstance(out[i], dict) else value
    return out


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), list):
            out[k] = _merge_into_list(out[k], v, k)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k != "arch":
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            # text.arch is merged key by key (an override may change one number) unless the same override
            # changes the LLM family: another family's keys (Gemma's hidden_activation) must not leak in. A
            # section that names no family has the default one.
            family = a.get("family", TextConfig.family)
            same_family = b.get("family", family) == family
            out[k] = {**out[k], **v} if same_family else dict(v)
        else:
            out[k] = v
    return out


def _field_type(parts: list[str]) -> Any:
    """The declared type of the Config field at ``parts`` (e.g. ["text", "instruction"]), or None. An item
    of a list of sections is addressed by its position (extra_text.0.instruction, stages.1.name) and a
    stage's override mappings by their section's fields (stages.0.data.root)."""
    cls: Any = Config
    parts = list(parts)
    while parts:
        name = parts.pop(0)
        if not dataclasses.is_dataclass(cls):
            return None
        tp = typing.get_type_hints(cls).get(name)
        if not parts or tp is None:
            return tp
        item = cls.__dataclass_fields__[name].metadata.get("item")
        if item is not None:
            if not parts.pop(0).isdigit():
                return None
            tp = item
        elif cls is StageConfig and name in STAGE_SECTIONS:
            tp = STAGE_SECTION_CLASSES[name]
        cls = tp
    return None


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "model.pos_embed=2d-rope"]`` -> nested mapping. Values are parsed as YAML,
    except for string keys, which take the text as typed (``null`` aside, refused as in a YAML file): YAML
    would turn ``text.instruction=Imagine: `` into a mapping and ``name=yes`` into true."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if _field_type(parts) is str:
            # Kept as the text 'null', it would name a folder or a prompt nobody meant.
            node[parts[-1]] = None if value.strip() in ("null", "Null", "NULL") else value
            continue
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _describe_type(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _list_override(path: str, value: Any) -> str:
    """The override giving ``value`` as a list: ``data.shards=[a.tar]``, or the quoted JSON form where YAML
    or the shell would not read the plain one as that list (``data.shards='["a/{0..9}.tar"]'``). A string
    that YAML could not read as a list (``[a/{0..9}.tar]``: the braces open a mapping) gives its items."""
    key = re.sub(r"\[(\d+)\]", r".\1", path)  # stages[0].data.shards is overridden as stages.0.data.shards
    items = _list_items(value) if isinstance(value, str) else [value]
    plain = f"[{','.join(map(str, items))}]"
    with contextlib.suppress(yaml.YAMLError):
        if all(re.fullmatch(r"[\w./-]+", str(v)) for v in items) and yaml.safe_load(plain) == items:
            return f"{key}={plain}"
    return f"{key}={shlex.quote(json.dumps(items))}"


def _list_items(text: str) -> list:
    """The items of a list typed as ``text`` without YAML's quoting: one pair of surrounding brackets
    dropped, split at the commas outside brackets and braces (``{a,b}`` is one shard pattern). An item that
    YAML reads as a list (an aspect bucket ``[256, 384]``) stays one, any other is the text as typed."""
    inner = text.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
    items, depth, start = [], 0, 0
    for i, char in enumerate(inner):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth <= 0:
            items.append(inner[start:i].strip())
            start = i + 1
    items.append(inner[start:].strip())
    out = []
    for item in filter(None, items):
        try:
            loaded = yaml.safe_load(item)
        except yaml.YAMLError:
            loaded = None
        out.append(loaded if isinstance(loaded, list) else item)
    return out


def _check_value(path: str, value: Any, tp: Any, meta: dict, default: Any = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if "choices" in meta:
        if value is False and "" in meta["choices"]:
            return ""  # the choice that turns it off, as YAML reads `false` and `off`
        if value not in meta["choices"] or isinstance(value, bool):
            allowed = ", ".join(c if c != "" else '"" (off; false in YAML)' for c in meta["choices"])
            raise ConfigError(f"{path}={value!r} is not allowed (allowed: {allowed})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        # numbers.Integral: numpy's integers too (a config edited in Python), kept as Python's
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{path}={value!r} must be an integer")
        value = int(value)
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it plainly is.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{path}={value!r} must be a number")
        value = float(value)
    elif tp is str:
        if value is None:
            # A string key's "none" is the empty string (no string key takes null).
            allowed = '"" for none' if default == "" else f"e.g. {default!r}, the default"
            raise ConfigError(f"{path}=null is not allowed (allowed: a string, {allowed})")
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
    elif tp in (dict, list) or origin in (dict, list):
        want = origin or tp
        if not isinstance(value, want):
            example = f", e.g. {_list_override(path, value)}" if want is list and _scalar(value) else ""
            raise ConfigError(f"{path}={value!r} must be a {_describe_type(want)}{example}")
        if want is list and typing.get_args(tp) == (str,) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}={value!r} must be a list of strings (names)")
        if "item_choices" in meta:
            allowed = meta["item_choices"]
            bad = [v for v in value if v not in allowed]
            if bad or len(set(value)) != len(value) or (meta["nonempty"] and not value):
                what = (
                    f"{bad[0]!r} is not allowed" if bad else "needs distinct items" if value else "is empty"
                )
                raise ConfigError(f"{path}={value!r}: {what} (allowed: a list of {', '.join(allowed)})")
        return value
    if isinstance(value, float) and value != value and ("min" in meta or "max" in meta):
        # NaN compares false with any bound, so it would pass them all.
        raise ConfigError(f"{path}={value!r} must be a number (NaN is not)")
    if "min" in meta:
        bad = value <= meta["min"] if meta.get("strict") else value < meta["min"]
        if bad:
            rel = ">" if meta.get("strict") else ">="
            raise ConfigError(f"{path}={value!r} must be {rel} {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{path}={value!r} must be <= {meta['max']}")
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f": did you mean {where + close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {where + str(unknown[0])!r}{hint} (allowed: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        tp, path, spec = hints[name], f"{prefix}.{name}" if prefix else name, fields[name]
        positions = isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
        if (
            positions
            and (typing.get_origin(tp) or tp) is list
            and spec.default_factory is not dataclasses.MISSING
        ):
            # train.trainable.1=llm, extra_text.0.family=qwen2 on a config that leaves the list at its default:
            # the raw YAML holds no list for the positions to patch, so they patch the field's default. (A
            # stage's data/train mapping keeps such a patch: resolved_stages merges it into the inherited list.)
            value = _merge_into_list(spec.default_factory(), value, path)
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, path)
        elif "item" in spec.metadata:
            if not isinstance(value, list):
                raise ConfigError(f"{path}={value!r} must be a list of mappings")
            kwargs[name] = [_build(spec.metadata["item"], v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _check_value(path, value, tp, dict(spec.metadata), spec.default)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    return _completed(_build(Config, data, ""))


def _completed(cfg: Config) -> Config:
    """A config built field by field, with what lies across fields: a staged run's train.steps is its
    stages' sum; the cross-field rules (validate); the DiT's shape against its LLM's, where the LLM's
    config is known without the network (check_llm_shape)."""
    if cfg.stages:
        missing = [i for i, st in enumerate(cfg.stages) if st.steps is None]
        if missing:
            raise ConfigError(f"stages[{missing[0]}].steps is required (the stage's optimizer steps)")
        cfg.train.steps = sum(st.steps for st in cfg.stages)
    validate(cfg)
    check_llm_shape(cfg)
    return cfg


def checked(cfg: Config) -> Config:
    """``cfg`` checked as ``load_config`` checks a file, for a config built or edited in Python: a copy in
    which every field is checked (type, choices, range: one line naming the key, as at load), the
    cross-field rules hold, a staged config's ``train.steps`` is its stages' sum again, and paths that
    exist are absolute. An attribute that is no config key (``cfg.train.stesp = 5``) is refused, not
    dropped; a ``Path`` stands for its text. ``cfg`` itself is left as it is."""
    copy_ = _completed(check_fields(cfg))
    if copy_.train.steps != cfg.train.steps:  # stages set, or train.steps edited, in Python
        log.warning(
            "train.steps=%s is not the stages' sum (%s): a staged run trains its stages' length (set "
            "stages[i].steps to change it)",
            cfg.train.steps,
            "+".join(str(st.steps) for st in copy_.stages),
        )
    absolute_paths(copy_)
    return copy_


def check_fields(cfg: Config) -> Config:
    """``checked``'s checks of each field on its own (type, choices, range; stray attributes), without
    the rules across fields (``validate``): what a build needs of a config code may assemble on purpose
    outside those rules (the public-checkpoint converter's VAE stand-in). Returns the copy built from
    ``cfg``'s fields."""
    if not isinstance(cfg, Config):
        raise ConfigError(
            f"expected a fusedit Config, got {type(cfg).__name__} {cfg!r:.60} (allowed: "
            "fusedit.config.load_config(name_or_path, overrides) or config_from_dict(mapping))"
        )
    _refuse_stray_attributes(cfg, "")
    return _build(Config, _plain(to_dict(cfg)), "")


def _refuse_stray_attributes(section: Any, prefix: str) -> None:
    """An attribute set on a config section that is none of its fields: a misspelt key, which asdict (and
    so every use) would drop without a word."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    stray = [name for name in vars(section) if name not in fields]
    if stray:
        _build(type(section), {stray[0]: None}, prefix)  # the unknown-key error, with its suggestion
    hints = typing.get_type_hints(type(section))
    for name, spec in fields.items():
        value, path = getattr(section, name), f"{prefix}.{name}" if prefix else name
        want = hints[name] if dataclasses.is_dataclass(hints[name]) else spec.metadata.get("item")
        items = value if "item" in spec.metadata and isinstance(value, list) else [value] if want else []
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if "item" in spec.metadata else path
            if not isinstance(item, want):  # a section replaced by a mapping: every use reads attributes
                raise ConfigError(
                    f"{where} is a {type(item).__name__} (allowed: a {want.__name__}; config_from_dict "
                    "builds a whole config from mappings)"
                )
            _refuse_stray_attributes(item, where)


def _plain(value: Any) -> Any:
    """A config mapping as YAML gives one: ``os.PathLike`` values as their text (a path set in Python as a
    Path), tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a tuple, as YAML would give it: a list
        return [_plain(v) for v in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def load_config(
    name_or_path: str | Path = "debug", overrides: list[str] | None = None, folders: list | None = None
) -> Config:
    """Load a preset name or YAML file, apply dotted overrides, validate, and return the typed config.
    ``folders`` collects the model folders (run, checkpoint or pipeline folders) the config takes its saved
    config from, itself or along its ``base:`` chain: their config, never their weights (train.init_from
    loads those)."""
    if isinstance(overrides, (str, dict)):
        raise ConfigError(
            f"overrides={overrides!r:.80} is not allowed (allowed: a list of 'section.key=value' strings, "
            "e.g. ['train.steps=5'])"
        )
    data = _resolve_raw(name_or_path, folders=folders)
    extra = parse_overrides(overrides or [])
    data = _deep_merge(data, extra)
    if data.get("stages") and "steps" in (extra.get("train") or {}):
        raise ConfigError(
            f"train.steps={extra['train']['steps']!r} cannot be set on a staged config: its length is the sum "
            "of stages[i].steps (allowed: stages.N.steps=..., or `fusedit train --stop-at STEP`)"
        )
    cfg = config_from_dict(data)
    absolute_paths(cfg)
    for message in unreached_overrides(cfg, extra):
        log.warning(message)
    return cfg


def unreached_overrides(cfg: Config, extra: dict) -> list[str]:
    """One message per top-level override of a staged run's data/train/flow/sample key that some stage
    does not train under, because that stage (or one before it) sets its own value: a stage's value wins
    (stages apply on top of the run's sections), so ``train.batch_size=4`` on a recipe whose stages set their
    batch would otherwise change nothing, silently. It names the stage overrides that would carry the value
    (the stages setting the key themselves; later ones inherit). Stages the overrides name themselves
    (stages.N...) are the user's choice and not reported. ``extra``: the parsed overrides (parse_overrides)."""
    # Leaf keys, dotted (train.dit_lora.rank=16 as "train.dit_lora.rank").
    keys = [f"{s}.{k}" for s in STAGE_SECTIONS for k in flatten(extra.get(s) or {})]
    if not cfg.stages or not keys:
        return []
    named = {
        str(i): flatten(patch) for i, patch in (extra.get("stages") or {}).items() if isinstance(patch, dict)
    }
    shared = flatten(to_dict(cfg))
    overriding = stages_overriding(cfg, keys, resolved_stages(cfg))
    messages = []
    for key in keys:
        missed = [(st, v) for st, v in overriding.get(key, []) if key not in named.get(str(st.index), {})]
        if missed:
            text = _yaml_text(shared[key])
            theirs = ", ".join(f"{st.where} at {_yaml_text(value)}" for st, value in missed)
            section, field_key = key.split(".", 1)
            setting = [
                st for st, _ in missed if field_key in flatten(getattr(cfg.stages[st.index], section))
            ] or [missed[0][0]]
            fix = " ".join(f"stages.{st.index}.{key}={text}" for st in setting)
            messages.append(
                f"{key}={text} does not reach {theirs}: a stage's value (its own or an earlier stage's) wins "
                f"over the top-level one; to set it there, override {fix}"
            )
    return messages


def stages_overriding(
    cfg: Config, keys: list[str], stages: list[Stage]
) -> dict[str, list[tuple[Stage, Any]]]:
    """For each dotted data/train/flow/sample key of ``keys`` (train.batch_size), the ``stages``
    (resolved_stages(cfg)) that train under another value than the run's top-level one, because they or an
    earlier stage set their own (a stage's value wins), each with that value; keys every stage keeps are left
    out. What `fusedit train` warns about for a top-level override (unreached_overrides) and a study refuses
    for its base (eval.study)."""
    shared = flatten(to_dict(cfg))
    out: dict[str, list[tuple[Stage, Any]]] = {}
    for stage in stages:
        own = flatten(to_dict(stage.config))
        for key in keys:
            if key in shared and own.get(key) != shared[key]:
                out.setdefault(key, []).append((stage, own.get(key)))
    return out


def _yaml_text(value: Any) -> str:
    """A value as an override would spell it (null, true, 0.0001, [a, b])."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


# Keys that may name a local file or folder (or else a hub id).
PATH_KEYS = {
    "text": ("model_id", "tokenizer"),
    "pooled_text": ("model_id", "tokenizer"),
    "vae": ("model_id",),
    "data": ("root", "index_file", "hf_path", "latents_dir"),
    "train": ("init_from",),
}


def absolute_paths(cfg: Config) -> None:
    """Paths that exist here become absolute and normalised ("..", "." and a trailing "/" gone; symlinks
    kept), so the config saved with a run still finds them from another working directory (``fusedit
    sample`` elsewhere) and one folder is one spelling (a resume compares them); hub ids are not paths here
    and stay. Stages hold their sections as override mappings: the path keys they set are made absolute
    alike."""

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and Path(value).exists():
            return os.path.abspath(value)
        return value

    sections = [(name, getattr(cfg, name)) for name in PATH_KEYS] + [("text", t) for t in cfg.extra_text]
    for name, section in sections:
        for key in PATH_KEYS[name]:
            setattr(section, key, absolute(getattr(section, key)))
    for stage in cfg.stages:
        for name in set(STAGE_SECTIONS) & set(PATH_KEYS):
            overrides = getattr(stage, name)
            for key in set(PATH_KEYS[name]) & set(overrides):
                overrides[key] = absolute(overrides[key])


# The PATH_KEYS sections that name a model's files (an LLM, its tokenizer, the pooled-text encoder, the VAE).
MODEL_PATH_SECTIONS = ("text", "pooled_text", "vae")


def text_sections(cfg: Config) -> list[tuple[str, TextConfig]]:
    """Each LLM's section under the key errors and overrides name it by: text, extra_text.0, ..."""
    return [("text", cfg.text), *((f"extra_text.{i}", text) for i, text in enumerate(cfg.extra_text))]


def _model_path_fields(cfg: Config) -> dict[str, tuple[Any, str]]:
    """(section, field) of each model location ``cfg`` sets, by dotted key (text.model_id,
    extra_text.0.tokenizer, ...)."""
    sections = [(name, name, getattr(cfg, name)) for name in MODEL_PATH_SECTIONS]
    sections += [(key, "text", text) for key, text in text_sections(cfg)[1:]]
    return {
        f"{name}.{key}": (section, key)
        for name, kind, section in sections
        for key in PATH_KEYS[kind]
        if getattr(section, key)
    }


def model_paths(cfg: Config) -> dict[str, str]:
    """The model locations ``cfg`` sets, by dotted key (text.model_id, extra_text.0.tokenizer, ...)."""
    return {key: getattr(section, name) for key, (section, name) in _model_path_fields(cfg).items()}


def written_as_path(value: str) -> bool:
    """Whether a model location is written as a local path (a hub id is "org/name")."""
    return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()


def refuse_path_to_nothing(named: str, place: str, folder: str = "a folder") -> None:
    """A model location written as a path that does not exist, refused before a loader (transformers,
    diffusers) takes it for a malformed or unreachable hub id; ``named`` is the setting as the error shows
    it (``text.model_id='/x'``, ``--clip '/x'``), ``folder`` what belongs there."""
    if written_as_path(place) and not Path(place).expanduser().exists():
        raise ConfigError(
            f"{named} is a path to nothing (allowed: {folder} written by save_pretrained, or a hub id "
            "written org/name)"
        )


def model_config(
    place: str | Path, named: str, allowed: str, kinds: tuple[str, ...] = (), folder: str = "a model folder"
):
    """The transformers config of the model at ``place`` (a folder or hub id), refused in one line naming the
    setting (``named``, e.g. ``--clip 'x'``) when it is not a model transformers reads (a file, an image, a
    VAE folder: transformers' own message then names a missing tokenizer backend or a codec), or not of one
    of ``kinds`` (model_type values; empty: any). ``allowed`` says what belongs there; ``folder`` names it
    for a path to nothing (refuse_path_to_nothing)."""
    from transformers import AutoConfig

    refuse_path_to_nothing(named, str(place), folder)
    if Path(place).expanduser().is_file():
        raise ConfigError(f"{named} is a file (allowed: {allowed}, a folder written by save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(place)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if not Path(place).expanduser().is_dir():  # a hub id: offline, gated or mistyped, not a bad model
            raise ConfigError(f"{named} cannot be loaded: {first}") from None
        raise ConfigError(
            f"{named} is not a model transformers can read: {first} (allowed: {allowed})"
        ) from None
    if kinds and config.model_type not in kinds:
        raise ConfigError(f"{named} is a model of model_type {config.model_type!r} (allowed: {allowed})")
    return config


def paths_to_nothing(gone: dict[str, str]) -> str:
    """Model locations that are gone (``gone_model_paths``) as an error names them, all at once: a run whose
    folders all moved to another disk is then fixed in one try, not one folder per try."""
    named = ", ".join(f"{key}={place!r}" for key, place in gone.items())
    return f"{named} {'is a path' if len(gone) == 1 else 'are paths'} to nothing"


def gone_model_paths(cfg: Config) -> dict[str, str]:
    """The model locations ``cfg`` saved as absolute paths that no longer exist (a folder that moved)."""
    return {
        key: place
        for key, place in model_paths(cfg).items()
        if os.path.isabs(place) and not os.path.exists(place)
    }


# The config.json fields that make a model folder the model a run trained with: its kind and shapes. Other
# fields (versions, dtype, _name_or_path) change when the same weights are saved again elsewhere.
IDENTITY_FIELDS = (
    "model_type",
    "_class_name",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "projection_dim",
    "latent_channels",
    "block_out_channels",
    "scaling_factor",
    "shift_factor",
)


def model_identity(place: str, subfolder: str = "") -> dict | None:
    """IDENTITY_FIELDS of the config.json in a local model folder (a multimodal wrapper's language model's,
    under text_config); None for a hub id, a file, or a folder without one (a tokenizer's)."""
    try:
        config = json.loads((Path(place) / subfolder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return {key: config[key] for key in IDENTITY_FIELDS if key in config}


def identity_difference(old: dict, new: dict) -> str | None:
    """The first IDENTITY_FIELDS field two model_identity records both have and disagree on, or None."""
    return next((f for f in IDENTITY_FIELDS if f in old and f in new and old[f] != new[f]), None)


def relocate(cfg: Config, moves: dict[str, str], flag: str = "--relocate") -> Config:
    """A saved run's ``cfg`` with model folders that moved read from their new place: ``moves`` maps
    model_paths keys to the new location (a folder, or a hub id). A saved absolute path that no longer
    exists and is not moved is refused here, naming ``flag``, rather than by the loader's "path to nothing"
    after the slow parts have loaded. That the new place holds the same model is checked by
    checkpoints.load_model against what the checkpoint recorded."""
    cfg = copy.deepcopy(cfg)
    fields = _model_path_fields(cfg)
    for key, place in moves.items():
        if key not in fields:
            raise ConfigError(
                f"{flag} {key}={place}: {key} is not a model location the saved config sets (allowed: "
                f"{', '.join(sorted(fields)) or 'none, the model is wholly in its checkpoint'})"
            )
        place = os.path.expanduser(place)
        if not place or (written_as_path(place) and not os.path.exists(place)):
            raise ConfigError(
                f"{flag} {key}={moves[key]!r} is a path to nothing (allowed: the folder's new place)"
            )
        setattr(*fields[key], place)
    absolute_paths(cfg)
    if gone := gone_model_paths(cfg):
        flags = " ".join(f"{flag} {key}=NEW_PLACE" for key in gone)
        raise ConfigError(
            f"the saved config's {paths_to_nothing(gone)} (if {'it' if len(gone) == 1 else 'they'} moved: "
            f"{flags})"
        )
    return cfg


def side_limits(cfg: Config) -> tuple[int, int | None]:
    """(unit, largest) of an image side in pixels: a multiple of ``unit`` (the VAE's downsampling x the
    patch size: whole patches of whole latent pixels) and, where a fixed APE table (model.ape_max_size
    patches) bounds the grid, at most ``largest`` (None: any size)."""
    m = cfg.model
    unit = cfg.vae.downsample * m.patch_size
    return unit, m.ape_max_size * unit if m.pos_embed == "ape" and m.ape_max_size is not None else None


def side_fits(side: int, cfg: Config) -> bool:
    """Whether an image side in pixels keeps to ``side_limits``."""
    unit, largest = side_limits(cfg)
    return side >= unit and side % unit == 0 and (largest is None or side <= largest)


def allowed_sides(cfg: Config) -> str:
    """``side_limits`` as the errors for a bad image side say it."""
    unit, largest = side_limits(cfg)
    limit = f", up to {largest} (the APE table's model.ape_max_size)" if largest is not None else ""
    return f"a positive multiple of {unit}, the VAE's downsampling x the patch size{limit}"


# The position schemes that rotate image tokens (layers/position.py builds them); the RoPE layout
# options apply to these only.
ROTARY_SCHEMES = ("1d-rope", "2d-rope", "m-rope")


@dataclass(frozen=True)
class DesignTraits:
    """What a model.design is: ``deep`` fusion (each DiT layer reads its own LLM layer's keys and values)
    or shallow (one hidden state, text.hidden_layer, projected by the DiT: the baselines and LI-DiT), and
    whether image tokens meet the text in joint ``self``-attention or in a separate ``cross``-attention."""

    deep: bool
    attention: Literal["self", "cross"]


# Every model.design (ModelConfig.design's choices) and its traits; code asks these, not the names.
DESIGN_TRAITS = {
    "fusedit": DesignTraits(deep=True, attention="self"),
    "fusedit-cross": DesignTraits(deep=True, attention="cross"),
    "dit-self": DesignTraits(deep=False, attention="self"),
    "dit-cross": DesignTraits(deep=False, attention="cross"),
}


def design_traits(design: str) -> DesignTraits:
    """``DESIGN_TRAITS[design]``; a one-line ConfigError for a name that is not a design."""
    if design not in DESIGN_TRAITS:
        raise ConfigError(f"model.design={design!r} is not allowed (allowed: {', '.join(DESIGN_TRAITS)})")
    return DESIGN_TRAITS[design]


def is_deep(design: str) -> bool:
    """Deep fusion (fusedit, fusedit-cross): DiT layers paired with LLM layers."""
    return design_traits(design).deep


def is_shallow(design: str) -> bool:
    """The shallow designs (dit-self, dit-cross): one LLM hidden state, projected by the DiT."""
    return not design_traits(design).deep


def attention_kind(design: str) -> Literal["self", "cross"]:
    """How the design's image tokens attend to the text: joint self-attention or cross-attention."""
    return design_traits(design).attention


def flatten(data: dict, prefix: str = "", lists: bool = False) -> dict:
    """A nested config dict (``to_dict``) as dotted keys (an LLM's ``arch`` stays one value); ``lists``
    also numbers the entries of lists of mappings (extra_text.0.family)."""
    out = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and key != "arch":
            out.update(flatten(value, path, lists))
        elif lists and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.update(flatten(dict(enumerate(value)), path, lists))
        else:
            out[path] = value
    return out


# The data keys that say where real data is, and the source that reads each.
DATA_LOCATIONS = {
    "root": "folder",
    "index_file": "folder",
    "shards": "webdataset",
    "hf_path": "hf",
    "latents_dir": "latents",
}
# The keys only one source reads: its data's locations, and how webdataset mixes its shards.
SOURCE_KEYS = {**DATA_LOCATIONS, "weights": "webdataset"}
_DATA_DEFAULTS = dataclasses.asdict(DataConfig())


def check_data_locations(data: DataConfig) -> None:
    """Refuse a data location of a source other than data.source's (say data.shards with data.source left
    at shapes, or at folder from an example): the run would train on other data without ever reading it.
    Checked where data is about to be read (training, cache-latents), not at every load: a run saved
    before this check with such a leftover must still load to be sampled or resumed with it removed. A
    latent cache's config keeps where its images were read from (cache-latents says to add
    data.source=latents to the config that made it)."""
    source = data.source
    if source == "latents":
        return
    given = [k for k, reader in SOURCE_KEYS.items() if reader != source and getattr(data, k)]
    if given:
        key = given[0]
        reads = " / ".join(f"data.{k}" for k, reader in DATA_LOCATIONS.items() if reader == source)
        raise ConfigError(
            f"data.{key}={getattr(data, key)!r} is set but data.source={source!r} "
            f"({f'it reads {reads}' if reads else 'the built-in procedural world'}) never reads it (allowed: "
            f"data.source={SOURCE_KEYS[key]} to read it, or no data.{key})"
        )


def check_weights(data: DataConfig) -> None:
    """data.weights as the webdataset mixer needs them (data/webdataset_source.py shard_lists), at load:
    otherwise `fusedit config` passed data.weights=[abc] and only training refused it."""
    weights, inf = data.weights, float("inf")
    # 0 <= w < inf refuses NaN too.
    ok = all(isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 <= w < inf for w in weights)
    counted = len(data.shards) if data.source == "webdataset" else 0
    fits = not counted or len(weights) == counted  # the shards' count is known for webdataset only
    if ok and (not weights or (sum(weights) > 0 and fits)):
        return
    per = f" ({counted})" if counted else ""
    raise ConfigError(
        f"data.weights={weights!r} is not allowed (allowed: finite numbers >= 0, not all 0, one per "
        f"data.shards entry{per}; [] for equal weights)"
    )


def uses_builtin_tokenizer(cfg: Config) -> bool:
    """Whether any text encoder (an LLM without text.tokenizer / model_id, or the clip-mod CLIP without
    pooled_text.tokenizer) tokenizes with the built-in word tokenizer."""
    llms = any(not (t.tokenizer or t.model_id) for t in (cfg.text, *cfg.extra_text))
    return llms or (cfg.model.pooled_text == "clip" and not cfg.pooled_text.tokenizer)


def adds_template_tokens(text: TextConfig) -> bool:
    """Whether a text section's template puts tokens around the prompt: any but ``plain``, or a plain one
    with an instruction (a prefix of spaces only opens the prompt instead, TextEncoder)."""
    return text.template != "plain" or bool(text.instruction.strip(" "))


def noop_settings(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, one-line refusal) of each setting that changes nothing in ``cfg``: an ablation of a part
    the model lacks, a system prompt a template has no turn for. Refused in a config being written
    (validate); dropped from the config a model folder was saved with (_saved_mapping), which a run saved
    before a refusal was added may hold, as dropping it changes nothing."""
    m, found = cfg.model, []
    # The built-in word tokenizer's vocabulary takes in every section's system prompt (system.builtin_words),
    # so where any encoder uses it the words change its ids even with a plain template.
    builtin = uses_builtin_tokenizer(cfg)
    for key, text in text_sections(cfg):
        if text.system_prompt and text.template == "plain" and not builtin:
            found.append(
                (
                    f"{key}.system_prompt",
                    f"{key}.system_prompt={text.system_prompt!r} does nothing with {key}.template='plain', "
                    f"which has no system turn (allowed: {key}.template chat, lidit or lidit-chat, or an "
                    "empty system_prompt)",
                )
            )
    # The refiner's ablations (their non-default values), which a model without a refiner has nothing for.
    for knob, ablated in (("refiner_gating", False), ("refiner_causal", True), ("drop_instruction", False)):
        if getattr(m, knob) == ablated and not m.refiner_depth:
            key = f"model.{knob}"
            found.append(
                (key, f"{key}={str(ablated).lower()} is a refiner ablation: set model.refiner_depth >= 1")
            )
    if (
        not m.drop_instruction
        and m.refiner_depth
        and not any(adds_template_tokens(t) for _, t in text_sections(cfg))
    ):
        # With no template tokens on any LLM, the DiT reads the same tokens whether they are dropped.
        others = ", nor does any extra_text" if cfg.extra_text else ""
        found.append(
            (
                "model.drop_instruction",
                "model.drop_instruction=false keeps the instruction tokens for the DiT, but "
                f"text.template='plain' with text.instruction={cfg.text.instruction!r} gives none{others} "
                "(allowed: a text.instruction, or text.template chat, lidit or lidit-chat)",
            )
        )
    if not m.collaborative_refiner and not (m.refiner_depth and cfg.extra_text):
        found.append(
            (
                "model.collaborative_refiner",
                "model.collaborative_refiner=false is an ablation of the refiners of 2+ LLMs: it needs "
                "model.refiner_depth >= 1 and extra_text",
            )
        )
    return found


def saved_config(data: dict, where: str | Path) -> Config:
    """The Config of a mapping a model was saved with (a pipeline's record, a run's config.yaml), without
    its settings that change nothing (_without_noops); ``where`` names it in the note."""
    return config_from_dict(_without_noops(data, where))


def _without_noops(data: dict, folder: str | Path) -> dict:
    """A saved config mapping without the settings that change nothing in it (noop_settings): a run saved
    before their refusal still samples, resumes and serves as a base, as it trained."""
    try:
        keys = [key for key, _ in noop_settings(_build(Config, copy.deepcopy(data), ""))]
    except ConfigError:
        return data  # the load names the problem
    if not keys:
        return data
    log.info("%s: leaving out %s, which change(s) nothing in its saved config", folder, ", ".join(keys))
    out = copy.deepcopy(data)
    for key in keys:
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.pop(leaf, None)
    return out


def validate(cfg: Config) -> None:
    """Cross-field checks that single-field types cannot express."""
    if cfg.vae.kind == "identity" and (cfg.vae.downsample != 1 or cfg.vae.latent_channels != 3):
        raise ConfigError(
            f"vae.kind=identity needs vae.downsample=1 and vae.latent_channels=3 "
            f"(got {cfg.vae.downsample} and {cfg.vae.latent_channels})"
        )
    if cfg.vae.kind == "diffusers" and not cfg.vae.model_id:
        raise ConfigError("vae.kind=diffusers needs vae.model_id (a hub id or a local folder)")
    unit, largest = side_limits(cfg)  # pixels per DiT token side; the APE table's largest side
    if cfg.data.image_size % unit:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} must be divisible by vae.downsample x model.patch_size "
            f"= {unit}"
        )
    for bucket in cfg.data.buckets:
        ok = isinstance(bucket, (list, tuple)) and len(bucket) == 2
        if not (ok and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in bucket)):
            raise ConfigError(
                f"data.buckets={cfg.data.buckets!r}: {bucket!r} is not [height, width] in pixels"
            )
        if bucket[0] % unit or bucket[1] % unit:
            raise ConfigError(
                f"data.buckets: {list(bucket)} must have both sides divisible by vae.downsample x "
                f"model.patch_size = {unit}"
            )
    # The table's size is fixed: a larger grid would otherwise fail only at training's first batch.
    sides = [(f"data.image_size={cfg.data.image_size}", cfg.data.image_size)]
    sides += [(f"data.buckets: {list(b)}", max(b)) for b in cfg.data.buckets]
    for what, side in sides if largest is not None else ():
        if side <= largest:
            continue
        raise ConfigError(
            f"{what} makes a latent grid side of {side // unit} patches, more than the APE table's "
            f"model.ape_max_size={cfg.model.ape_max_size} (allowed: sides up to {largest} px = "
            "model.ape_max_size x vae.downsample x model.patch_size)"
        )
    if cfg.data.source == "shapes":
        # The world's own check of its prompt kinds, here at load: it would otherwise run only when the data
        # is built, after the model, and for a later stage only when that stage starts.
        try:
            check_shapes_options(cfg.data.kinds, cfg.data.max_objects)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"data.kinds={cfg.data.kinds!r} with data.max_objects={cfg.data.max_objects}: {e}"
            ) from None
    for key, text in text_sections(cfg):
        if text.model_id == "" and not text.arch:
            raise ConfigError(
                f"{key}.arch is empty: give {key}.model_id (hub id or folder) or a random-init arch"
            )
        # Checked with a model_id too: the arch stands in for a hub id out of reach (llm_config).
        check_arch(text.family, text.arch, key)
        if text.pretrain_steps and text.model_id:
            # Pretraining fits a random-init LLM to the caption corpus; a trained one is never overwritten.
            raise ConfigError(
                f"{key}.pretrain_steps={text.pretrain_steps} pretrains a random-init LLM, but "
                f"{key}.model_id={text.model_id!r} loads a trained one (allowed: pretrain_steps=0 with a model_id)"
            )
    check_arch(CLIP_TEXT_FAMILY, cfg.pooled_text.arch, "pooled_text")
    check_weights(cfg.data)
    m = cfg.model
    shallow = is_shallow(m.design)
    if cfg.extra_text and not (shallow and m.refiner_depth):
        raise ConfigError(
            f"extra_text has {len(cfg.extra_text)} more LLM(s) but model.design={m.design!r} with "
            f"model.refiner_depth={m.refiner_depth} reads one (allowed: dit-self or dit-cross with refiner_depth >= 1)"
        )
    own_shape = [k for k in ("num_heads", "num_kv_heads", "head_dim", "intermediate_size") if getattr(m, k)]
    if own_shape and not shallow:
        raise ConfigError(
            f"model.{own_shape[0]} is set but model.design={m.design!r} mirrors the LLM's attention and MLP "
            "(allowed only with dit-self or dit-cross)"
        )
    if m.refiner_depth and not shallow:
        raise ConfigError(
            f"model.refiner_depth={m.refiner_depth} needs a shallow design (dit-self or dit-cross)"
        )
    if m.initial_layers and shallow:
        raise ConfigError(
            f"model.initial_layers={m.initial_layers} pairs DiT layers with deeper LLM layers, but "
            f"model.design={m.design!r} reads one hidden state (set text.hidden_layer; allowed: 0)"
        )
    if m.pos_embed == "none" and not m.conv_pos:
        raise ConfigError(
            "model.pos_embed='none' without model.conv_pos=true leaves the image tokens no position "
            "(allowed: ape, 1d-rope, 2d-rope, m-rope, or none with conv_pos=true as LI-DiT)"
        )
    # Deep fusion's text keys come rotated by the LLM at 0 .. L - 1, so its image positions must continue
    # after them (joint); image-only restarts them at 0, on top of the text's (design-space.md s.1).
    if m.rope_layout == "image-only" and not shallow:
        raise ConfigError(
            f"model.rope_layout='image-only' is for the shallow designs, not model.design={m.design!r}, "
            "whose text keys the LLM rotates (allowed: joint)"
        )
    # APE included: its image tokens are unrotated, but the LLM rotates deep fusion's text keys either way.
    if m.rope_left_pad is not None and not (
        is_deep(m.design)
        and attention_kind(m.design) == "self"
        and (m.pos_embed in ROTARY_SCHEMES or m.pos_embed == "ape")
        and m.rope_layout == "joint"
    ):
        raise ConfigError(
            f"model.rope_left_pad={m.rope_left_pad} reproduces the public code's joint text-image rotations: "
            f"it needs model.design='fusedit' with pos_embed ape or a RoPE scheme and rope_layout='joint' "
            f"(got design={m.design!r}, pos_embed={m.pos_embed!r}, rope_layout={m.rope_layout!r})"
        )
    if m.refiner_concat == "channels" and not (m.refiner_depth and cfg.extra_text):
        raise ConfigError(
            "model.refiner_concat='channels' sets the LLMs' refined tokens side by side: it needs "
            f"model.refiner_depth >= 1 and extra_text (got refiner_depth={m.refiner_depth}, "
            f"{1 + len(cfg.extra_text)} LLM)"
        )
    for _, problem in noop_settings(cfg):
        raise ConfigError(problem)
    if m.pooled_text == "refined" and not m.refiner_depth:
        raise ConfigError("model.pooled_text='refined' pools the refined text: set model.refiner_depth >= 1")
    if m.pooled_text == "clip" and not (cfg.pooled_text.model_id or cfg.pooled_text.arch):
        raise ConfigError(
            "model.pooled_text='clip' needs pooled_text.model_id (or a random-init pooled_text.arch)"
        )
    if m.pooled_text != "none" and m.timestep_conditioning == "none":
        raise ConfigError(
            f"model.pooled_text={m.pooled_text!r} is added to the timestep embedding, but "
            "model.timestep_conditioning='none' has none (allowed: adaln-zero, adaln-single, addition)"
        )
    _validate_training(cfg)
    if cfg.stages:
        resolved_stages(cfg)  # builds and validates every stage's config


def _validate_training(cfg: Config) -> None:
    """What train.trainable and the LoRA settings need from the rest of the config."""
    tc, shallow = cfg.train, is_shallow(cfg.model.design)
    if "refiner" in tc.trainable and not shallow:
        raise ConfigError(
            f"train.trainable={tc.trainable} names 'refiner' but model.design={cfg.model.design!r} has none "
            "(allowed with dit-self or dit-cross: their context embedder or LI-DiT refiners)"
        )
    if "llm" not in tc.trainable:
        return
    if tc.shard_llm:
        raise ConfigError(
            "train.shard_llm=true needs a frozen LLM, but train.trainable names 'llm' (allowed: "
            "train.shard_llm=false, or train.trainable without llm)"
        )
    if not tc.llm_lora.rank:
        low = [(k, t.dtype) for k, t in text_sections(cfg) if t.dtype != "float32"]
        if low:
            raise ConfigError(
                f"train.trainable names 'llm' (full fine-tuning) but {low[0][0]}.dtype={low[0][1]!r}: AdamW "
                "needs float32 master weights (allowed: dtype float32, or train.llm_lora.rank >= 1)"
            )


def dit_layer_count(m: ModelConfig, llm_layers: int) -> int:
    """DiT layers: ``model.num_layers``, or every LLM layer after ``initial_layers``."""
    return m.num_layers if m.num_layers is not None else llm_layers - m.initial_layers


def fused_layers(m: ModelConfig, llm_layers: int) -> range:
    """The LLM layer each DiT layer reads in deep fusion: initial_layers, initial_layers + 1, ... (one
    contiguous run: DiT layer i pairs with LLM layer initial_layers + i), for an LLM of ``llm_layers``
    layers; refused in one line where it has too few."""
    n = dit_layer_count(m, llm_layers)
    if m.num_layers is None and n < 1:
        # num_layers unset means "every LLM layer after initial_layers": none are left.
        raise ConfigError(
            f"model.initial_layers={m.initial_layers} leaves no LLM layer for the DiT: the LLM has "
            f"{llm_layers} and deep fusion pairs every DiT layer with one after the initial ones "
            f"(allowed: initial_layers < {llm_layers})"
        )
    if n < 1 or m.initial_layers + n > llm_layers:
        raise ConfigError(
            f"model.initial_layers={m.initial_layers} + model.num_layers={n} needs "
            f"{m.initial_layers + n} LLM layers but the LLM has {llm_layers}: deep fusion pairs every DiT "
            f"layer with one LLM layer (allowed: initial_layers + num_layers <= {llm_layers})"
        )
    return range(m.initial_layers, m.initial_layers + n)


def dit_head_dim(m: ModelConfig, llm_width: int | None, llm_head_dim: int | None) -> int | None:
    """The width of the DiT's attention heads: the LLM's (deep fusion mirrors it), or on the shallow designs
    model.head_dim, or the DiT width split over model.num_heads, which must divide it. None where it rests
    on an LLM size not known yet (None: a hub LLM's at load)."""
    if m.head_dim or not m.num_heads:
        return m.head_dim or llm_head_dim
    width = m.dit_hidden_size or llm_width
    if width is not None and width % m.num_heads:
        given = f"model.dit_hidden_size={width}" if m.dit_hidden_size else f"the LLM's hidden size {width}"
        raise ConfigError(
            f"model.num_heads={m.num_heads} does not divide the DiT width ({given}) into whole heads "
            f"(allowed: a divisor of {width}, or model.head_dim set too)"
        )
    return width // m.num_heads if width is not None else None


def check_positions(m: ModelConfig, width: int | None, head_dim: int | None) -> None:
    """What model.pos_embed needs of the DiT's ``width`` and ``head_dim`` (its heads' width; None: not known
    yet), refused in one line: every RoPE rotates pairs of channels (an even head width), 2D RoPE gives half
    the pairs to the row and half to the column (a multiple of 4, design-space.md s.1), and APE's 2D sin-cos
    table gives a quarter of the width to each of the row's and the column's sines and cosines (a multiple
    of 4)."""
    fits = {
        "ape": width is None or width % 4 == 0,
        "1d-rope": head_dim is None or head_dim % 2 == 0,
        "2d-rope": head_dim is None or head_dim % 4 == 0,
        "m-rope": head_dim is None or head_dim % 2 == 0,
    }
    if fits.get(m.pos_embed, True):  # "none": no position table to fit
        return
    others = [name for name, ok in fits.items() if ok]
    listed = " or ".join([", ".join(others[:-1]), others[-1]] if len(others) > 1 else others)
    instead = f"model.pos_embed {listed}" if others else "model.pos_embed='none' with conv_pos=true"
    if m.pos_embed == "ape":
        given = f"model.dit_hidden_size={width}" if m.dit_hidden_size else f"the LLM's hidden size {width}"
        raise ConfigError(
            f"model.pos_embed='ape' needs a DiT width divisible by 4 (its 2D sin-cos table), but it is "
            f"{given} (allowed: a width divisible by 4, or {instead})"
        )
    step = 4 if m.pos_embed == "2d-rope" else 2
    if m.head_dim:
        given = f"model.head_dim={head_dim}"
    elif m.num_heads:
        given = f"the width {width} over model.num_heads={m.num_heads}"
    else:
        given = "the LLM's head_dim"
    raise ConfigError(
        f"model.pos_embed={m.pos_embed!r} needs a head width divisible by {step} (rotated channel pairs"
        f"{', half for the row and half for the column' if step == 4 else ''}), but the DiT's heads are "
        f"{head_dim} wide ({given}) (allowed: a head width divisible by {step}, or {instead})"
    )


def llm_head_dim(config) -> int:
    """An HF LLM config's attention head width (set explicitly by Gemma, else hidden_size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# The arch keys that size tensors: transformers takes any int, and zero or a negative one failed only when
# the model was built (a negative dimension, a division by zero) or built a zero-width LLM.
ARCH_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)
# Arch keys transformers reads of an LLM that its config classes do not declare: rope_theta and rope_scaling
# (transformers 5 folds them into rope_parameters), head_dim (Qwen2 reads it where set), and the activation
# under either name (Gemma's MLP reads hidden_act in transformers 5, hidden_activation in 4; Gemma-2's reads
# hidden_activation; the public-checkpoint converter writes both).
ARCH_READ_KEYS = ("rope_theta", "rope_scaling", "head_dim", "hidden_act", "hidden_activation")
CLIP_TEXT_FAMILY = "clip_text_model"  # pooled_text.arch: transformers' CLIPTextConfig


@functools.cache
def _arch_keys(family: str) -> tuple[tuple[str, ...], dict]:
    """The keys a ``family`` config takes (its constructor's and its saved fields, its attribute_map's
    aliases, ARCH_READ_KEYS), and its defaults."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    defaults = cls().to_dict()
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    read = ARCH_READ_KEYS if family != CLIP_TEXT_FAMILY else ()
    keys = dict.fromkeys([*params, *defaults, *getattr(cls, "attribute_map", {}), *read])
    return tuple(keys), defaults


def check_arch(family: str, arch: dict, key: str) -> None:
    """A random-init arch's keys and sizes, before transformers reads it: transformers keeps an unknown key
    (vocab_sizee) as an attribute nothing reads, and takes any int as a size."""
    if not arch:
        return
    keys, defaults = _arch_keys(family)
    unknown = [k for k in arch if k not in keys]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), keys, n=1)
        hint = f": did you mean {f'{key}.arch.{close[0]}'!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {f'{key}.arch.{unknown[0]}'!r}{hint} (allowed: the keys of transformers' "
            f"{family} config, e.g. {', '.join(k for k in ARCH_SIZES if k in keys)})"
        )
    for name in ARCH_SIZES:
        value = arch.get(name)
        if name in arch and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}.arch.{name}={value!r} is not allowed (allowed: an integer >= 1)")
    shape = {**defaults, **arch}
    heads, kv = shape.get("num_attention_heads"), shape.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:

        def given(k: str) -> str:
            return f"{shape[k]}" if k in arch else f"{shape[k]} ({family}'s default)"

        raise ConfigError(
            f"{key}.arch.num_key_value_heads={given('num_key_value_heads')} does not divide "
            f"num_attention_heads={given('num_attention_heads')} (allowed: a divisor of num_attention_heads: "
            "each key/value head serves a group of query heads)"
        )


def arch_config(text: TextConfig, key: str = "text"):
    """The transformers config of a random-init LLM (``family`` + ``arch``, checked first: check_arch); a
    one-line ConfigError naming the key where transformers refuses the arch (TypeError, ValueError, or
    huggingface_hub's validation of transformers 5's config dataclasses, e.g. an odd head_dim under
    RoPE), the failing field first where transformers names one."""
    from transformers import AutoConfig

    check_arch(text.family, text.arch, key)
    try:
        return AutoConfig.for_model(text.family, **text.arch)
    except Exception as e:
        reason = " ".join(str(e).split())
        named = re.search(r"field '(\w+)'", reason)
        fields = [named.group(1)] if named else []
        fields += [k for k in text.arch if re.search(rf"\b{re.escape(str(k))}\b", reason)]
        field_ = next((k for k in fields if k in text.arch), None)
        what = f"{key}.arch.{field_}={text.arch[field_]!r}" if field_ is not None else f"{key}.arch"
        raise ConfigError(f"{what} is not valid for {text.family}: {reason}") from None


def known_llm_config(text: TextConfig):
    """The transformers config of ``text``'s LLM where it is known without the network: ``family`` +
    ``arch`` for a random-init LLM (an arch transformers refuses is a ConfigError), a local folder's, or a
    hub id's in the local cache; None where it is not, or cannot be read (the build names why:
    text.llm.llm_config)."""
    from transformers import AutoConfig

    if not text.model_id:
        return arch_config(text)
    try:
        config = AutoConfig.from_pretrained(text.model_id, local_files_only=True)
    except Exception:  # transformers refuses an arch or folder with many exception types: the build's to name
        return None
    # Multimodal wrappers (PaliGemma, ...) keep the language decoder's config under text_config.
    return getattr(config, "text_config", None) or config


def check_llm_shape(cfg: Config) -> None:
    """The DiT's shape against its LLM's, at load where the LLM's config is known (known_llm_config), as the
    build checks it where it is not (then only the sizes the DiT sets itself are checked here): deep
    fusion's layer pairing (fused_layers), the heads (dit_head_dim) and what the position scheme needs of
    them (check_positions). Otherwise a config `fusedit config` calls valid fails at the build, or at
    training's first step, after the run folder is written."""
    m, config = cfg.model, known_llm_config(cfg.text)
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    if config is None or not all(isinstance(getattr(config, k, None), int) for k in shape):
        llm_width = llm_head = None  # the sizes the DiT sets itself are still checked
    else:
        llm_width, llm_head = config.hidden_size, llm_head_dim(config)
        if is_deep(m.design):
            fused_layers(m, config.num_hidden_layers)
    check_positions(m, m.dit_hidden_size or llm_width, dit_head_dim(m, llm_width, llm_head))


def resolved_stages(cfg: Config) -> list[Stage]:
    """The run's stages, each with its global steps [start, end) and full config (module docstring).

    A stage's data/train/flow/sample overrides apply on top of the previous stage's resolved sections, so
    a stage states only what changes. Each is validated like a whole config; errors name the stage."""
    if not cfg.stages:
        return [Stage(0, cfg.name, 0, cfg.train.steps, cfg, staged=False)]
    sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in STAGE_SECTIONS}
    stages, start = [], 0
    for i, st in enumerate(cfg.stages):
        where = f"stages[{i}]"
        fixed = [k for k in st.train if k in RUN_WIDE_TRAIN_KEYS]
        if fixed:
            # Refused even at the run's own value: a stage setting it reads as if stages could differ in it.
            hint = f"{where}.steps, the stage's length" if fixed[0] == "steps" else f"set train.{fixed[0]}"
            raise ConfigError(
                f"{where}.train.{fixed[0]} is set, but train.{fixed[0]} is the run's, not a stage's (allowed: "
                f"{hint})"
            )
        if st.data.get("source", sections["data"]["source"]) != sections["data"]["source"]:
            # A stage that reads another source does not inherit where the earlier one read from.
            for key in SOURCE_KEYS:
                sections["data"][key] = copy.deepcopy(_DATA_DEFAULTS[key])
        built = {}
        for name in STAGE_SECTIONS:
            sections[name] = _deep_merge(sections[name], getattr(st, name))
            built[name] = _build(STAGE_SECTION_CLASSES[name], sections[name], f"{where}.{name}")
        built["train"].steps = st.steps
        stage_cfg = dataclasses.replace(cfg, stages=[], **built)
        try:
            validate(stage_cfg)
        except ConfigError as e:
            raise ConfigError(f"{where} ({st.name or 'unnamed'}): {e}") from None
        stages.append(Stage(i, st.name or f"stage{i}", start, start + st.steps, stage_cfg))
        start += st.steps
    return stages


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
