"""``FuseDiTPipeline``: a fusedit model as a diffusers ``DiffusionPipeline``.

    pipe = FuseDiTPipeline.from_pretrained("exported/")        # or .from_fusedit("runs/a")
    images = pipe("a red circle", negative_prompt="", num_inference_steps=25, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(0)).images

It holds the tokenizer(s), LLM(s), transformer, VAE and scheduler as ordinary diffusers components (see
``fusedit.hub`` for the folder layout) and samples exactly as ``fusedit.sampling.generation.generate`` does:
the LLMs run once per call for the whole [negative ; prompt] batch and that text context serves every step and
both guidance branches; the scheduler integrates the model's ``sample.schedule`` (uniform in t, the
scheduler's own spacing or a registered one, then the SD3 shift of the scheduler's config) with its Euler
steps, or, for any other ``sample.sampler`` (heun, or a registered one-step sampler), with that fusedit
sampler over the scheduler's times (diffusers' Euler scheduler cannot take a second-order step). Same seed,
steps, guidance, shift, schedule and sampler give the same images as ``generate`` in fp32, bit for bit
(``generate`` on a GPU defaults to bf16 autocast: ``sample.precision``).

``save_pretrained(model, cfg, folder)`` writes a fusedit model as a pipeline folder, ``from_pretrained(folder,
device)`` reads one back as ``(TextToImage, Config)`` and ``export_run(run, folder)`` exports a training run.
They live here, not in ``fusedit.hub``, so that imports point one way: this module imports ``fusedit.hub``
(whose component classes model_index.json names), never the reverse.
"""

import dataclasses
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fusedit.config import (
    Config,
    ConfigError,
    allowed_sides,
    check_whole,
    is_whole,
    pooled_tokenizes_builtin,
    side_fits,
    text_sections,
    tokenizes_builtin,
    variant_names,
    variant_traits,
)
from fusedit.files import check_output_folder, first_free, readable_by_all
from fusedit.flow import sampling_times
from fusedit.flow.samplers import SAMPLERS
from fusedit.hub import FuseDiTTransformer2DModel, IdentityVAE
from fusedit.imaging import to_uint8
from fusedit.sampling.generation import (
    check_steps_guidance,
    latent_shape,
    text_velocity,
    unused_prompt_note,
    warn_cut_prompts,
    warn_far_past_trained,
    warn_nonfinite,
    warn_once,
)
from fusedit.system import TextToImage, resolve_device
from fusedit.text.context import TextContext
from fusedit.text.encoder import TextEncoder
from fusedit.text.llm import DTYPES
from fusedit.text.pooled import PooledTextEncoder
from fusedit.text.templates import build_template
from fusedit.text.tokenizer import add_word_normalizer
from fusedit.vae import DiffusersAutoencoder, IdentityAutoencoder

log = logging.getLogger(__name__)

# Component names of the LLMs, in config order (text, extra_text.0, ...): diffusers builds a pipeline from
# its __init__ signature, so the number of LLMs a pipeline can hold is fixed here (LI-DiT uses two).
LLM_SLOTS = [("tokenizer", "text_encoder")] + [(f"tokenizer_{i}", f"text_encoder_{i}") for i in (2, 3, 4)]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Beside the pipeline, what export_run made it from (export_source reads it; diffusers ignores it).
EXPORT_SOURCE = "fusedit_export.json"

# FlowMatchEulerDiscreteScheduler options that change its sigmas beyond the plain shift: a scheduler config
# that sets one is not the spacing sample.schedule=diffusers computes (fusedit.flow.samplers).
DIFFUSERS_SCHEDULE_VARIANTS = (
    "use_dynamic_shifting",
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
)


class FuseDiTPipeline(DiffusionPipeline):
    """Text-to-image with a fusedit model (any design: deep fusion, the shallow baselines, LI-DiT).

    ``__call__`` defaults (steps, guidance, negative prompt, size) are the model's own ``sample`` section and
    training resolution, recorded in ``transformer/config.json``."""

    model_cpu_offload_seq = "->".join(
        [enc for _, enc in LLM_SLOTS] + ["pooled_text_encoder", "transformer", "vae"]
    )
    _optional_components = [name for slot in LLM_SLOTS[1:] for name in slot] + [
        "pooled_tokenizer",
        "pooled_text_encoder",
    ]
    # What callback_on_step_end may read and replace (diffusers' name for the list). The text context is a
    # TextContext (per-LLM hidden states and masks, shared by both guidance branches), not one prompt_embeds
    # tensor a callback could swap, so only the latents are offered.
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: PreTrainedModel,
        transformer: FuseDiTTransformer2DModel,
        vae: AutoencoderKL | IdentityVAE,
        scheduler: FlowMatchEulerDiscreteScheduler,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_3: PreTrainedTokenizerBase | None = None,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_4: PreTrainedTokenizerBase | None = None,
        text_encoder_4: PreTrainedModel | None = None,
        pooled_tokenizer: PreTrainedTokenizerBase | None = None,
        pooled_text_encoder: PreTrainedModel | None = None,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            tokenizer_2=tokenizer_2,
            text_encoder_2=text_encoder_2,
            tokenizer_3=tokenizer_3,
            text_encoder_3=text_encoder_3,
            tokenizer_4=tokenizer_4,
            text_encoder_4=text_encoder_4,
            pooled_tokenizer=pooled_tokenizer,
            pooled_text_encoder=pooled_text_encoder,
        )
        # fusedit keeps every text encoder and the VAE frozen; a loaded transformers model comes back with
        # requires_grad on, which would make TextEncoder run the LLM with autograd.
        for module in (*self._llms(), pooled_text_encoder, vae):
            if module is not None:
                module.requires_grad_(False)

    # ---- building
    @classmethod
    def from_model(cls, model: TextToImage, cfg: Config) -> "FuseDiTPipeline":
        """A pipeline over a built fusedit model (``build_model(cfg)`` / ``load_model``), sharing its
        modules: nothing is copied."""
        encoders = model.encoders
        if len(encoders) > len(LLM_SLOTS):
            raise ConfigError(
                f"a FuseDiTPipeline holds at most {len(LLM_SLOTS)} LLMs; this model has {len(encoders)}"
            )
        if any(enc.tokenizer is None for enc in encoders):
            raise ValueError("a shape-only (meta device) model has no tokenizer and no weights to export")
        parts = {}
        for (tok_name, llm_name), enc in zip(LLM_SLOTS, encoders):
            parts[tok_name], parts[llm_name] = enc.tokenizer, enc.llm
        pooled_dim = None
        if model.pooled_text is not None:
            parts["pooled_tokenizer"] = model.pooled_text.tokenizer
            parts["pooled_text_encoder"] = model.pooled_text.model
            pooled_dim = model.pooled_text.dim
        ae = model.autoencoder
        if isinstance(ae, IdentityAutoencoder):
            vae = IdentityVAE(latent_channels=ae.channels).to(next(model.denoiser.parameters()).device)
        elif isinstance(ae, DiffusersAutoencoder):
            vae = ae.vae
        else:
            raise ConfigError(f"cannot export autoencoder {type(ae).__name__} (allowed: identity, diffusers)")
        return cls(
            transformer=FuseDiTTransformer2DModel.from_denoiser(model.denoiser, cfg, pooled_dim),
            vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.sample.shift),
            **parts,
        )

    @classmethod
    def from_fusedit(
        cls,
        run_or_checkpoint: str | os.PathLike,
        device: torch.device | str = "cpu",
        use_ema: bool = True,
        relocate: dict[str, str] | None = None,
    ) -> "FuseDiTPipeline":
        """A pipeline from a fusedit run folder (its latest checkpoint) or a checkpoint folder on ``device``
        (a torch device or its name, "auto" for CUDA when available); ``relocate`` names the new place of
        model folders that moved (checkpoints.load_model, which checks the device first)."""
        from fusedit.checkpoints import load_model

        model, cfg, _ = load_model(run_or_checkpoint, device, use_ema=use_ema, relocate=relocate)
        return cls.from_model(model, cfg)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "FuseDiTPipeline":
        """diffusers' loader, after checking (one-line errors) that the folder or hub repo is a fusedit
        pipeline. Without ``dtype`` (or ``torch_dtype``) each LLM gets the dtype its ``text.dtype`` recorded.
        A built-in word tokenizer gets the normalizer ``word_tokenizer`` gives it now (case and punctuation
        leave known words known), which a folder exported before it had one lacks: such a folder reads
        prompts as its run and a newer export do."""
        _check_pipeline(str(pretrained_model_name_or_path), cls.__name__, kwargs)
        if not is_accelerate_available() and kwargs.get("device_map") is None:
            # What diffusers falls back to without accelerate anyway, asked for: it would otherwise say so in
            # a five-line warning that reads as a failed install.
            kwargs.setdefault("low_cpu_mem_usage", False)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        cfg = pipe.fusedit_config
        for (tok_name, _), text in zip(LLM_SLOTS, [cfg.text, *cfg.extra_text]):
            if tokenizes_builtin(text):
                add_word_normalizer(getattr(pipe, tok_name))
        if pooled_tokenizes_builtin(cfg) and pipe.pooled_tokenizer is not None:
            add_word_normalizer(pipe.pooled_tokenizer)
        # diffusers takes the dtype as `dtype` (newer) or `torch_dtype` (older, still accepted).
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            # transformers 4.x loads float32 whatever the checkpoint holds; fusedit ran the LLM in text.dtype.
            for text, llm in zip([cfg.text, *cfg.extra_text], pipe._llms()):
                llm.to(DTYPES[text.dtype])
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """diffusers' writer. fusedit cuts an LLM after the deepest layer a design reads, but per-layer config
        lists (``layer_types`` of Gemma-2, Qwen2/3) keep the full length, and transformers refuses to save
        such a config: they are cut to the saved layers while saving, then restored. An earlier export's
        record of what it was made from (EXPORT_SOURCE) is removed: these weights may come from anywhere
        (export_run writes its own afterwards). An eval/ there (`fusedit eval`'s results) stays only where
        the weights written are those it scored; else it moves aside, as export_run moves it (_scores_name),
        so that it does not read as these weights' scores. With ``push_to_hub``, which uploads the folder
        inside diffusers' save, eval/ is held beside the folder meanwhile: results are not the pipeline."""
        folder = Path(save_directory)
        # What eval/ scored, read before the weights it scored are overwritten.
        scored = (_fingerprint_or_none(folder), export_source(folder)) if (folder / "eval").is_dir() else None
        restore = []
        for llm in self._llms():
            config = llm.config
            types = getattr(config, "layer_types", None)
            if types is not None and len(types) > config.num_hidden_layers:
                restore.append((config, types))
                config.layer_types = list(types[: config.num_hidden_layers])
        # Before the save, so that a push_to_hub of the folder does not upload it either.
        (folder / EXPORT_SOURCE).unlink(missing_ok=True)
        held = folder.with_name(f".{folder.name}.eval-held") if scored and kwargs.get("push_to_hub") else None
        if held is not None:
            os.replace(
                folder / "eval", held
            )  # a kill before it is back leaves it there, named for the folder
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            for config, types in restore:
                config.layer_types = types
            if held is not None:
                os.replace(held, folder / "eval")
        if scored is not None and not _same_weights(scored[0], folder):
            os.replace(folder / "eval", folder / _replaced_scores_name(folder, scored[1], "save_pretrained"))

    # ---- the fusedit view
    def _llms(self) -> list:
        return [m for _, name in LLM_SLOTS if (m := getattr(self, name, None)) is not None]

    @property
    def fusedit_config(self) -> Config:
        """The transformer's recorded config with the scheduler's shift as sample.shift: swapping in a
        scheduler of another shift (docs/diffusers.md) changes how this pipeline samples, so fusedit's own
        sampling of it (to_fusedit, `fusedit sample`, a saved and reloaded copy) follows, not the old value."""
        cfg = self.transformer.fusedit_config()
        shift = getattr(self.scheduler, "config", {}).get("shift")
        if shift is None:
            return cfg
        return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, shift=float(shift)))

    def to_fusedit(self) -> tuple[TextToImage, Config]:
        """``(TextToImage, Config)`` over this pipeline's components (shared, not copied): what
        ``fusedit.sampling.generation.generate``, evaluation and training take."""
        cfg = self.fusedit_config
        texts = [cfg.text, *cfg.extra_text]
        pairs = [(getattr(self, tok), getattr(self, llm)) for tok, llm in LLM_SLOTS[: len(texts)]]
        if len(texts) > len(LLM_SLOTS) or any(tok is None or llm is None for tok, llm in pairs):
            have = sum(llm is not None for llm in self._llms())
            raise ConfigError(
                f"the transformer reads {len(texts)} LLM(s) but the pipeline holds {have} text encoder(s)"
            )
        encoders = [
            TextEncoder(
                llm,
                tok,
                t.max_length,
                build_template(t.template, tok, t.instruction, t.system_prompt, key),
                trim_padding=t.trim_padding,
                trim_multiple=t.trim_multiple,
            )
            for (key, t), (tok, llm) in zip(text_sections(cfg), pairs)
        ]
        pooled = None
        if variant_traits("model.pooled_text", cfg.model.pooled_text).encoder:
            if self.pooled_text_encoder is None or self.pooled_tokenizer is None:
                raise ConfigError(
                    f"the transformer reads a pooled text embedding (model.pooled_text={cfg.model.pooled_text!r}) "
                    "but the pipeline has no pooled_text_encoder"
                )
            pooled = PooledTextEncoder(
                self.pooled_text_encoder,
                self.pooled_tokenizer,
                cfg.pooled_text.max_length,
                cfg.text.instruction,
            )
        ae = self.vae if isinstance(self.vae, IdentityVAE) else DiffusersAutoencoder(self.vae)
        return TextToImage(encoders[0], self.transformer.denoiser, ae, encoders[1:], pooled), cfg

    # ---- sampling
    @property
    def interrupt(self) -> bool:
        """diffusers' early stop: a step-end callback sets ``pipe._interrupt = True`` and the remaining steps
        are skipped; the latents reached so far are what the call returns (decoded unless "latent")."""
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int:
        """The number of denoising steps of the running (or last) call, as diffusers' pipelines offer it to
        callbacks (a step-end callback's ``step_index`` runs from 0 to ``num_timesteps - 1``)."""
        return self._num_timesteps

    def _set_schedule(self, steps: int, device: torch.device) -> None:
        """Put the model's ``sample.schedule`` on the scheduler: "diffusers" (the scheduler's own spacing, which
        is what that means), or the times ``sampling_times`` spaces by the schedule ("uniform": t uniform from
        1 to 0 over ``steps``; a registered one: its function), then the shift."""
        scheduler = self.scheduler
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(
                f"FuseDiTPipeline samples with FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}"
            )
        if scheduler.config.get("use_dynamic_shifting"):
            raise ConfigError(
                "FuseDiTPipeline: the scheduler's use_dynamic_shifting=True needs a resolution-dependent mu, "
                "which fusedit models do not define (allowed: use_dynamic_shifting=False; sample.shift shifts)"
            )
        schedule = self.fusedit_config.sample.schedule
        if schedule == "diffusers":
            scheduler.set_timesteps(steps, device=device)
            return
        if any(scheduler.config.get(key) for key in DIFFUSERS_SCHEDULE_VARIANTS):
            # A schedule variant the user configured: hand it the unshifted times and let it transform them.
            scheduler.set_timesteps(
                sigmas=sampling_times(steps, schedule=schedule)[:-1].tolist(), device=device
            )
            return
        # The scheduler would apply the shift to float32 sigmas; fusedit shifts in float64 and rounds once.
        # Giving it fusedit's shifted times with its shift at 1 (an exact identity) keeps the images equal
        # to generate's, not just close.
        shift = scheduler.shift
        scheduler.set_shift(1.0)
        try:
            scheduler.set_timesteps(
                sigmas=sampling_times(steps, shift, schedule=schedule)[:-1].tolist(), device=device
            )
        finally:
            scheduler.set_shift(shift)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ):
        """Images for ``prompt``. None means the model's own default (``sample.steps``, ``sample.guidance``,
        ``sample.negative_prompt``, the training resolution). Guidance is classifier-free whenever it is not
        1. ``output_type``: "pil" (fusedit's uint8 rounding, as ``fusedit sample`` writes), "np" / "pt"
        (floats in [0, 1]), "latent". Returns ImagePipelineOutput(images=...) or a 1-tuple.

        ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict`` runs after every step
        (Euler's or Heun's) as in diffusers: ``callback_kwargs`` holds the tensors named in
        ``callback_on_step_end_tensor_inputs`` (only "latents" is offered), the ``"latents"`` of the dict it
        returns replace the pipeline's, and setting ``pipe._interrupt = True`` skips the remaining steps. A
        diffusers ``PipelineCallback`` or ``MultiPipelineCallbacks`` names its own tensor inputs."""
        model, cfg, prompts, negatives, steps, guidance, latents, device, tensor_inputs = self._call_args(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            num_images_per_prompt,
            generator,
            latents,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # The text cache: one forward of each LLM for the batch's distinct texts (negative rows first, as
        # fusedit.flow.guided expects), read by every step and both guidance branches.
        rows = negatives + prompts if guidance != 1.0 else prompts
        context = model.encode_prompts(rows, len(rows) - len(prompts), distinct=True)
        cut = context.cut
        warn_cut_prompts(len(cut.prompts), len(prompts), model.limits_of(cut.limits), cut.negative)
        # generate's velocity: the denoiser under autocast at its weights' dtype (a pipeline loaded or moved
        # to bf16), plain float32 otherwise, guided whenever guidance != 1. It is called through the
        # transformer's forward, where diffusers' hooks act (enable_model_cpu_offload moves the weights to the
        # device there), with autocast on the device it runs on, not the one its weights wait on.
        dtype = None if self.transformer.dtype == torch.float32 else self.transformer.dtype

        def transformer(x: torch.Tensor, t: torch.Tensor, text: TextContext) -> torch.Tensor:
            return self.transformer(x, t, text, return_dict=False)[0]

        velocity = text_velocity(transformer, context, guidance, dtype, device_type=device.type)
        self._set_schedule(steps, device)
        timesteps, sigmas = self.scheduler.timesteps, self.scheduler.sigmas
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        step = self._step_fn(cfg.sample.sampler, velocity, sigmas, device)
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, timestep in enumerate(timesteps):
                if self.interrupt:
                    break
                latents = step(i, timestep, latents)
                if callback_on_step_end is not None:
                    latents = self._step_end(callback_on_step_end, tensor_inputs, i, timestep, latents)
                bar.update()
        self.maybe_free_model_hooks()

        if output_type == "latent":
            images = latents
            warn_nonfinite(latents, guidance)
        else:
            decoded = model.autoencoder.decode(latents)
            warn_nonfinite(decoded, guidance)  # as generate warns: "pil" would turn them to black pixels
            if output_type == "pil":
                images = [Image.fromarray(a) for a in to_uint8(decoded)]
            else:
                unit_range = ((decoded.float() + 1) / 2).clamp(0, 1)
                images = unit_range.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else unit_range
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _call_args(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        height: int | None,
        width: int | None,
        num_images_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        tensor_inputs: list[str] | tuple[str, ...],
    ) -> tuple[
        TextToImage,
        Config,
        list[str],
        list[str],
        int,
        float,
        torch.Tensor,
        torch.device,
        list[str] | tuple[str, ...],
    ]:
        """__call__'s arguments checked before any LLM runs, one line each (the first wrong one in the order
        below is the error), and filled in from the model's defaults: (model, cfg, prompts, negatives (one per
        image each), steps, guidance, the starting latents (float32 on the execution device), that device,
        the callback's tensor inputs)."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(
                f"output_type={output_type!r} is not allowed (allowed: {', '.join(OUTPUT_TYPES)})"
            )
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            # diffusers' callback objects name the tensors they read; the argument is ignored then, as there.
            tensor_inputs = callback_on_step_end.tensor_inputs
        _check_callback(callback_on_step_end, tensor_inputs, self._callback_tensor_inputs)
        model, cfg = self.to_fusedit()
        if not variant_traits("sample.sampler", cfg.sample.sampler).one_step:
            # The steps below run one at a time, each over its own two times: a sampler whose step reads an
            # earlier one's would silently sample as another.
            raise ConfigError(
                f"sample.sampler={cfg.sample.sampler!r} was registered with one_step=False, but this pipeline "
                "runs one scheduler step at a time (allowed: "
                f"{variant_names('sample.sampler', lambda t: t.one_step)}; or `fusedit sample` with this one)"
            )
        prompts = _strings("prompt", prompt)
        if not prompts:
            raise ConfigError("no prompt: give a string or a non-empty list of strings")
        negative = cfg.sample.negative_prompt if negative_prompt is None else negative_prompt
        negatives = _strings("negative_prompt", negative)
        if isinstance(negative, str):
            negatives *= len(prompts)
        if len(negatives) != len(prompts):
            raise ConfigError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        per_prompt = check_whole("num_images_per_prompt", num_images_per_prompt)
        prompts = [p for p in prompts for _ in range(per_prompt)]
        negatives = [n for n in negatives for _ in range(per_prompt)]
        steps = (
            cfg.sample.steps
            if num_inference_steps is None
            else check_whole("num_inference_steps", num_inference_steps)
        )
        guidance = cfg.sample.guidance if guidance_scale is None else guidance_scale
        check_steps_guidance(None, guidance, guidance_key="guidance_scale")  # as generate checks guidance
        # As generate warns: guidance 0 leaves the prompt unused, 1 a negative prompt given (not the saved
        # one, which a call at guidance 1 need not clear).
        note = unused_prompt_note(guidance, negative_prompt is not None and any(negatives))
        if note:
            warn_once(note)
        height, width = (
            cfg.data.image_size if size is None else _side(name, size, cfg)
            for name, size in (("height", height), ("width", width))
        )
        warn_far_past_trained((height, width), cfg, f"height={height}, width={width}")
        shape = (len(prompts), *latent_shape(model, (height, width)))
        if isinstance(generator, list) and len(generator) != len(prompts):
            # randn_tensor would silently reuse one generator for a list of one, or ignore the extras.
            raise ConfigError(
                f"got {len(generator)} generators for {len(prompts)} images (allowed: one torch.Generator, "
                "or one per image: len(prompt) x num_images_per_prompt)"
            )
        device = self._execution_device
        if latents is None:
            # randn_tensor draws on the generator's device (the CPU for a CPU generator) and then moves, as
            # generate draws its noise on the CPU: the same seed gives the same noise on every device.
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        # The scheduler integrates in float32 whatever the weights' dtype, as generate does.
        latents = latents.to(device, torch.float32)
        return model, cfg, prompts, negatives, steps, guidance, latents, device, tensor_inputs

    def _step_fn(
        self, sampler: str, velocity: Callable, sigmas: torch.Tensor, device: torch.device
    ) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
        """``step(i, timestep, x)``: the call's step i from latents ``x``, by the Euler scheduler for
        ``sampler`` "euler", else by that fusedit sampler over the scheduler's ``sigmas``."""
        if sampler == "euler":

            def step(i: int, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                # The denoiser takes t in [0, 1] (the scheduler's sigma), not the 0..1000 timestep.
                v = velocity(x, sigmas[i].expand(x.shape[0]))
                return self.scheduler.step(v, timestep, x, return_dict=False)[0]

            return step
        # A step the Euler scheduler cannot take: fusedit's sampler, a pure function, over this step's two
        # scheduler sigmas. It is one-step (_call_args refuses others: a step reads only x and its own two
        # times), so step i over sigmas[i : i + 2] is step i of the whole (steps + 1,) run bit for bit, with
        # room for the callback between steps.
        times, one_step = sigmas.to(device), SAMPLERS[sampler]

        def step(i: int, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return one_step(velocity, x, times[i : i + 2])

        return step

    def _step_end(
        self, callback: Callable, names: list[str], i: int, timestep: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """Call the step-end callback with the tensors it asked for; the latents it returns (if any) go on."""
        tensors = {"latents": latents}
        outputs = callback(self, i, timestep, {name: tensors[name] for name in names})
        if not isinstance(outputs, dict):
            raise TypeError(
                f"callback_on_step_end returned {type(outputs).__name__} at step {i} (allowed: a dict, such as "
                "the callback_kwargs it was given)"
            )
        new = outputs.get("latents", latents)
        if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
            found = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"callback_on_step_end returned latents of shape {found} at step {i}, expected "
                f"{tuple(latents.shape)}"
            )
        # The sampler integrates in float32 on the pipeline's device, as it does the initial latents.
        return new.to(latents.device, torch.float32)


def save_pretrained(model: TextToImage, cfg: Config, folder: str | os.PathLike) -> Path:
    """Write ``model`` (a TextToImage built from ``cfg``) as a diffusers pipeline folder; returns it."""
    FuseDiTPipeline.from_model(model, cfg).save_pretrained(str(folder))
    return Path(folder)


def from_pretrained(
    folder: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[TextToImage, Config]:
    """A saved pipeline folder (or hub id) -> ``(TextToImage, Config)`` on ``device`` (a torch device or its
    name, "auto" for CUDA when available: system.resolve_device), in eval mode; the same model
    ``fusedit.sampling.generation.generate`` and the training loop take."""
    device = resolve_device(device, "device")  # a bad or missing device fails in one line, before the load
    model, cfg = FuseDiTPipeline.from_pretrained(str(folder)).to(device).to_fusedit()
    return model.eval(), cfg


def export_run(
    run_or_checkpoint: str | os.PathLike,
    folder: str | os.PathLike,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    relocate: dict[str, str] | None = None,
) -> Path:
    """A fusedit run or checkpoint folder (EMA weights by default) -> a diffusers pipeline folder.
    ``folder`` is new, empty, or an earlier export (replaced: what it holds besides its pipeline, e.g. a model
    card, moves into the new one, and so do its ``fusedit eval`` results: as eval/ for the same weights,
    beside it for other weights, _scores_name); anything else is refused before the model loads. The pipeline is written beside it and renamed into place, so a killed export leaves ``folder``
    as it was (and a partial ``.NAME.partial`` that the next export replaces). ``relocate``: model folders
    that moved since the run saved their paths (checkpoints.load_model)."""
    source = Path(run_or_checkpoint)
    if _exported(source):
        raise ConfigError(
            f"{str(source)!r} is a diffusers pipeline folder already (nothing to export; load it with "
            "FuseDiTPipeline.from_pretrained or `fusedit sample`)"
        )
    if (source / "model_index.json").is_file():
        raise ConfigError(
            f"{str(source)!r} is a pipeline folder fusedit did not write (nothing to export; one of the public "
            f"FuseDiT code is imported with `fusedit convert {source} --out DIR`, see docs/run-released-fusedit.md)"
        )
    folder = Path(folder)
    partial, old = (folder.with_name(f".{folder.name}.{end}") for end in ("partial", "old"))
    _finish_killed_export(folder, partial, old)
    earlier = _exported(folder)
    if not earlier:
        check_output_folder(folder, "a pipeline", "an earlier export's folder")
    from fusedit.checkpoints import load_model

    model, cfg, ckpt = load_model(source, device, use_ema=use_ema, relocate=relocate)
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, cfg, partial)
    (partial / EXPORT_SOURCE).write_text(json.dumps(_export_record(ckpt, cfg.sample.use_ema), indent=1))
    readable_by_all(partial)
    if earlier:
        # The earlier export goes aside whole (one rename), then what is not its pipeline (a model card,
        # `fusedit eval`'s results) moves into the new one: a kill at any point leaves every file in
        # ``folder``, ``old`` or ``partial``, which _finish_killed_export puts back together.
        scores = _scores_name(folder, partial)  # decided first: nothing has moved yet if it fails
        os.replace(folder, old)
        pipeline = _pipeline_entries(old)
        for entry in old.iterdir():
            name = scores if entry.name == "eval" else entry.name
            if not (partial / name).exists() and entry.name not in pipeline:
                os.replace(entry, partial / name)
    elif folder.exists():
        folder.rmdir()  # empty, as checked
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _scores_name(folder: Path, partial: Path) -> str:
    """The name the earlier export ``folder``'s eval/ (`fusedit eval`'s default output) takes in the new
    pipeline ``partial``: eval/ where both hold the same weights; else a folder beside it named after the
    weights it scored, logged, so that those scores neither read as the new weights' (a shapes bench's
    scores.md) nor stand in the way of scoring them (the protocols refuse another model's images). An earlier
    export whose weights cannot be read holds other weights than these."""
    if not (folder / "eval").is_dir():
        return "eval"
    if _same_weights(_fingerprint_or_none(folder), partial):
        return "eval"
    return _replaced_scores_name(folder, export_source(folder), "export")


def _same_weights(scored: str | None, folder: Path) -> bool:
    """Whether ``folder`` holds the weights an eval/ scored (``scored``: their fingerprint, None where they
    could not be read, which then count as other weights)."""
    return scored is not None and scored == _fingerprint_or_none(folder)


def _fingerprint_or_none(folder: Path) -> str | None:
    """The weights fingerprint of ``folder``, or None where its weights cannot be read (a damaged export,
    what a re-export may be meant to repair, or a folder without a pipeline yet)."""
    from fusedit.checkpoints import weights_fingerprint

    try:
        return weights_fingerprint(folder)
    except (ConfigError, OSError):
        return None


def _replaced_scores_name(folder: Path, record: dict | None, writer: str) -> str:
    """A free name in ``folder`` for its eval/, which scored other weights than those ``writer`` (export,
    save_pretrained) puts there: named after the weights it scored where ``record`` (export_source, read
    before they were replaced) says, and logged."""
    record = record or {}
    step, weights = record.get("step"), record.get("weights")
    scored = f"-step{step}-{weights}" if is_whole(step) and weights in ("ema", "raw") else ""
    later = (f"eval-replaced{scored}-{n}" for n in itertools.count(2))
    name = first_free(folder, itertools.chain([f"eval-replaced{scored}"], later)).name
    log.warning(
        "%s: %s scored the weights this %s replaces: kept beside the new scores as %s",
        writer,
        folder / "eval",
        writer,
        folder / name,
    )
    return name


def _finish_killed_export(folder: Path, partial: Path, old: Path) -> None:
    """Undo or finish an export killed while replacing an earlier one (see export_run). Killed before the
    new pipeline took ``folder``'s name: the earlier export comes back from ``old``, with the entries of
    its own that had moved into ``partial``. Killed after: ``old`` holds only the earlier pipeline."""
    if not old.exists():
        return
    if not folder.exists():
        pipeline = _pipeline_entries(partial) if (partial / "model_index.json").is_file() else set()
        for entry in partial.iterdir() if partial.exists() else ():
            if entry.name not in pipeline and not (old / entry.name).exists():
                os.replace(entry, old / entry.name)
        os.replace(old, folder)
    shutil.rmtree(old, ignore_errors=True)


def _pipeline_entries(folder: Path) -> set[str]:
    """The files and folders of the pipeline saved in ``folder``: model_index.json, a folder per component
    it lists, and the record of what it was exported from."""
    index = json.loads((folder / "model_index.json").read_text())
    return {"model_index.json", EXPORT_SOURCE, *(key for key in index if not key.startswith("_"))}


def _export_record(ckpt: Path, ema: bool) -> dict:
    """What an export was made from: the checkpoint, its step, EMA or raw weights and, for EMA weights, the
    share of the run's starting weights the EMA still held (checkpoints.ema_start_share: over half, an
    early checkpoint's EMA samples mostly noise, which the folder's users are told)."""
    from fusedit.checkpoints import ema_start_at

    at = ema_start_at(ckpt)
    share = at[1] if ema and at is not None else None
    return {
        "checkpoint": str(ckpt.resolve()),
        "step": at[0] if at is not None else None,
        "weights": "ema" if ema else "raw",
        "ema_holds_start": None if share is None else round(share, 4),
    }


def export_source(folder: str | os.PathLike) -> dict | None:
    """The record ``export_run`` wrote beside the pipeline in ``folder`` (checkpoint, step, weights,
    ema_holds_start); None for a folder without one (exported before it existed, or not by export_run)."""
    try:
        record = json.loads((Path(folder) / EXPORT_SOURCE).read_bytes())
    except (OSError, ValueError):  # absent, not JSON, or bytes that are not UTF-8
        return None
    return record if isinstance(record, dict) else None


def _exported(folder: Path) -> bool:
    """Whether ``folder`` holds a fusedit pipeline (an earlier export, which an export may replace): its
    model_index.json names fusedit's transformer class. The public FuseDiT code's pipelines share the
    pipeline's class name, not the transformer's, so a downloaded release is never replaced."""
    try:
        index = json.loads((folder / "model_index.json").read_bytes())
    except (OSError, ValueError):  # absent, not JSON, or bytes that are not UTF-8
        return False
    return (
        isinstance(index, dict)
        and index.get("_class_name") == FuseDiTPipeline.__name__
        and _fusedit_transformer(index)
    )


def _fusedit_transformer(index: dict) -> bool:
    """Whether a model_index.json names fusedit's transformer class (the public code's names its own)."""
    transformer = index.get("transformer")
    return isinstance(transformer, list) and transformer[-1:] == [FuseDiTTransformer2DModel.__name__]


def _strings(name: str, value) -> list[str]:
    """A prompt argument as a list: one string, or a list or tuple of strings."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{name}={value!r} is not allowed (allowed: a string or a list of strings)")
    return list(values)


def _side(name: str, value, cfg: Config) -> int:
    """height / width: a whole number of pixels that keeps to the model's side limits."""
    if not is_whole(value) or not side_fits(int(value), cfg):
        raise ConfigError(f"{name}={value!r} is not allowed (allowed: {allowed_sides(cfg)})")
    return int(value)


def _check_callback(callback, names, allowed: list[str]) -> None:
    """callback_on_step_end and its tensor inputs, refused in one line before anything runs (diffusers'
    check_inputs does the same)."""
    if callback is not None and not callable(callback):
        raise ConfigError(
            f"callback_on_step_end={callback!r} is not allowed (allowed: a function (pipe, step_index, timestep, "
            "callback_kwargs) -> dict, or a diffusers PipelineCallback / MultiPipelineCallbacks)"
        )
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise ConfigError(
            f"callback_on_step_end_tensor_inputs={names!r} is not allowed (allowed: a list of names from: "
            f"{', '.join(allowed)})"
        )
    for name in names:
        if name not in allowed:
            raise ConfigError(
                f"callback_on_step_end_tensor_inputs names {name!r}, which FuseDiTPipeline does not offer "
                f"(allowed: {', '.join(allowed)})"
            )


# The weights file each kind of component is saved as: a single file or the index of its shards, in
# safetensors (what save_pretrained writes) or the older pickle format (safe_serialization=False).
WEIGHTS = {
    "transformers": ("model.safetensors", "pytorch_model.bin"),
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
}
# A tokenizer needs one of these vocabulary files besides tokenizer_config.json: tokenizer.json is what a
# fast tokenizer saves (every tokenizer fusedit exports), the others what a SentencePiece or BPE one may.
VOCABULARIES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def _check_pipeline_files(folder: Path, name: str, index: dict, variant: bool) -> None:
    """One-line errors for a local pipeline folder missing a file its export wrote, or holding a damaged
    (truncated, overwritten header) safetensors file, before diffusers' loader: a missing tokenizer.json
    came back as transformers' advice to install sentencepiece with a traceback, a missing transformer
    weights file as a missing .bin the export never wrote, a truncated one as "Unable to load weights"
    without a reason (h-sample R1). With a ``variant`` (weights named model.fp16.safetensors, ...) only the
    configs are checked. ``index``: its model_index.json, parsed."""
    for component, entry in sorted(index.items()):
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue  # diffusers' own keys, and the optional components this pipeline does not hold
        library, class_name = entry
        if component == "scheduler":
            _need(folder, name, component, ["scheduler_config.json"])
        elif "tokenizer" in component:
            _need(folder, name, component, ["tokenizer_config.json"])
            _need(folder, name, component, VOCABULARIES)
        else:
            _need(folder, name, component, ["config.json"])
            if class_name != IdentityVAE.__name__ and not variant:  # the identity VAE is its config alone
                single, pickled = WEIGHTS["transformers" if library == "transformers" else "diffusers"]
                weights = [single, f"{single}.index.json", pickled, f"{pickled}.index.json"]
                _check_weights(folder, name, component, _need(folder, name, component, weights))


def _need(folder: Path, name: str, component: str, files) -> str:
    """The first of ``files`` that ``folder``/``component`` holds; a ConfigError naming the first if none."""
    for file in files:
        if (folder / component / file).is_file():
            return file
    raise ConfigError(
        f"{name!r} lacks {component}/{files[0]}, which its export wrote: re-export it with `fusedit export`"
    )


def _check_weights(folder: Path, name: str, component: str, file: str) -> None:
    """A ConfigError naming a safetensors file of ``component`` (``file``, or the shards its index lists)
    that is missing or damaged: safe_open reads the header and checks that it covers the whole file."""
    if file.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((folder / component / file).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(
                f"{name!r}: {component}/{file} is damaged (not a JSON index of weight shards): "
                "re-export it with `fusedit export`"
            ) from None
    else:
        shards = [file]
    for shard in shards:
        path = folder / component / shard
        if not path.is_file():
            raise ConfigError(
                f"{name!r} lacks {component}/{shard}, which {component}/{file} lists: re-export it with "
                "`fusedit export`"
            )
        if not shard.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(path), "pt"):
                pass
        except SafetensorError as e:
            reason = str(e).splitlines()[0].removeprefix("Error while deserializing header: ")
            raise ConfigError(
                f"{name!r}: {component}/{shard} is damaged ({reason}): re-export it with `fusedit export`"
            ) from None


def _check_pipeline(name: str, class_name: str, kwargs: dict) -> None:
    """One-line errors for what is not a fusedit pipeline folder or hub repo, before diffusers' loader; for a
    local folder, for a file it lacks or holds damaged too (_check_pipeline_files)."""
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            if (path / "checkpoints").is_dir() or (path / "state.json").is_file():
                raise ConfigError(
                    f"{name!r} is a fusedit run or checkpoint folder, not a pipeline folder: use "
                    f"FuseDiTPipeline.from_fusedit({name!r}) or export it first (fusedit.pipeline.export_run)"
                )
            raise ConfigError(f"{name!r} is not a fusedit pipeline folder (it has no model_index.json)")
        text = index.read_bytes()
    elif path.exists():
        raise ConfigError(f"{name!r} is a file, not a fusedit pipeline folder")
    elif os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") != 1:
        # A hub repo id is exactly "owner/name"; anything else was meant as a local folder.
        raise FileNotFoundError(f"no such folder: {name!r}")
    else:
        from huggingface_hub import hf_hub_download

        hub = ("revision", "cache_dir", "token", "local_files_only", "proxies", "force_download")
        try:
            text = Path(
                hf_hub_download(name, "model_index.json", **{k: kwargs[k] for k in hub if k in kwargs})
            ).read_bytes()
        except Exception as e:  # the hub client's many error types all mean: not readable from there
            raise OSError(
                f"cannot read model_index.json of {name!r} from the Hugging Face hub: {str(e).splitlines()[0]}"
            ) from None
    try:
        index = json.loads(text)
        found = index.get("_class_name")
    except (ValueError, AttributeError):  # not JSON, bytes that are not UTF-8, or not a JSON object
        raise ConfigError(f"{name!r}: model_index.json is not a JSON object") from None
    if found != class_name:
        raise ConfigError(f"{name!r} holds a {found} pipeline, not a fusedit pipeline ({class_name})")
    # The public FuseDiT code calls its pipeline FuseDiTPipeline too; its transformer is its own class,
    # which diffusers would fail on with a long message about importing modules.
    transformer = index.get("transformer")
    if not _fusedit_transformer(index):
        raise ConfigError(
            f"{name!r} holds a transformer {transformer!r}, not fusedit's {FuseDiTTransformer2DModel.__name__}: "
            f"a pipeline saved by the public FuseDiT code needs `fusedit convert {name} --out DIR` first "
            "(docs/run-released-fusedit.md)"
        )
    if path.is_dir():  # a hub repo is diffusers' to download and check
        _check_pipeline_files(path, name, index, "variant" in kwargs)
