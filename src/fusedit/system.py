"""The whole text-to-image model: text encoder(s) (LLM + tokenizer + template), an optional pooled text
encoder, the denoiser and the latent space, built from a Config. Training, sampling and the CLI all start
from ``build_model``."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
import torch._dynamo.config
import torch._functorch.config
from torch import nn

from fusedit.compiling import compile_settings, uncompile
from fusedit.config import (
    Config,
    ConfigError,
    SampleConfig,
    TextConfig,
    check_fields,
    choices_of,
    is_shallow,
    model_identity,
    text_sections,
    tokenizes_builtin,
    uses_builtin_tokenizer,
    variant_traits,
)
from fusedit.models import build_denoiser
from fusedit.text.context import PromptCut, TextContext, TextRequest
from fusedit.text.encoder import TextEncoder
from fusedit.text.llm import llm_config, load_llm, load_tokenizer
from fusedit.text.pooled import PooledTextEncoder, load_pooled_encoder
from fusedit.text.spec import LLMSpec
from fusedit.text.templates import LIDIT_INSTRUCTION, build_template
from fusedit.vae import load_autoencoder

log = logging.getLogger(__name__)

# Compiled graphs allowed per function beyond those of the text lengths (see compile_parts).
RECOMPILE_SLACK = 8


class TextToImage(nn.Module):
    """A text-to-image model as built from a config (``build_model``): the parts a design combines.

    - ``text``: the first LLM's TextEncoder (the frozen LLM as ``text.llm``, its tokenizer and template);
    - ``extra_text``: the further LLMs' TextEncoders (LI-DiT's multi-LLM fusion), in config order;
    - ``pooled_text``: clip-mod's pooled CLIP text encoder, or None;
    - ``denoiser``: the DiT that trains (fusedit.models), velocity = denoiser(x_t, t, text context);
    - ``autoencoder``: the latent space (``encode``/``decode``), or None in a build without one (the bench);
    - ``vocabulary``: the built-in word tokenizer's words when a part uses it, else None.

    ``encode_prompts`` gives the text context of a prompt batch, which ``forward`` (the denoiser's) reads."""

    def __init__(
        self,
        text: TextEncoder,
        denoiser: nn.Module,
        autoencoder: nn.Module | None,
        extra_text: list[TextEncoder] | None = None,
        pooled_text: PooledTextEncoder | None = None,
        vocabulary: list[str] | None = None,
    ):
        super().__init__()
        self.text = text
        # The built-in tokenizer's word list when any part uses it (else None): token ids are positions in
        # it, so checkpoints save it and load_model rebuilds from the saved list.
        self.vocabulary = vocabulary
        self.extra_text = nn.ModuleList(extra_text or [])
        self.pooled_text = pooled_text
        self.denoiser = denoiser
        self.autoencoder = autoencoder
        for i, enc in enumerate(self.extra_text):
            enc.setting = f"extra_text.{i}.max_length"

    @property
    def encoders(self) -> list[TextEncoder]:
        return [self.text, *self.extra_text]

    @property
    def limited(self) -> list:
        """Every encoder that cuts prompts to a limit of its own: the LLMs' and the pooled CLIP's."""
        return [*self.encoders, *([self.pooled_text] if self.pooled_text is not None else [])]

    @property
    def limits(self) -> str:
        """The prompt limits of the text encoders, for messages: "text.max_length=256", or with several
        encoders "one of text.max_length=256, pooled_text.max_length=77"."""
        return self.limits_of()

    def limits_of(self, cut: Iterable[str] = ()) -> str:
        """``limits`` of only the encoders whose limits (limit_named) are in ``cut`` (PromptCut.limits, or
        their union over several calls): the ones a user would raise; all of them where ``cut`` is empty
        (nothing known of who cut)."""
        cut = set(cut)
        named = [enc.limit_named for enc in self.limited if not cut or enc.limit_named in cut]
        return named[0] if len(named) == 1 else "one of " + ", ".join(named)

    def encode_prompts(
        self, prompts: list[str], negatives: int = 0, *, distinct: bool = False
    ) -> TextContext:
        """One forward of each LLM for the whole prompt batch; the result serves every step and CFG branch.
        The first ``negatives`` rows are guidance's negative prompt (one per image), the prompts follow: the
        context's ``cut`` tells them apart among the rows any text encoder cut to its limit.

        ``distinct``: run the LLMs (and a pooled CLIP) on each distinct prompt once and take the rows back
        (TextContext.take). The text stream never sees the image (design-space.md s.1), so a row's context
        depends on its own text alone and this is the batch's own context (bit for bit on the CPU; a GPU may
        round a smaller batch's matmuls otherwise). Sampling passes it, its uncached baseline at every step
        too: guidance's negative rows are one text, and an eval call samples 4 images of one prompt (8 rows,
        2 texts). Training does not: its captions repeat little (dropped ones, ""), and a trainable LLM's
        gradient would sum a repeated row's uses through the take, not the arithmetic of its own rows."""
        if distinct:
            texts = list(dict.fromkeys(prompts))
            if len(texts) < len(prompts):
                where = {text: i for i, text in enumerate(texts)}
                context = self.encode_prompts(texts).take([where[text] for text in prompts])
                context.cut = replace(context.cut, negatives=negatives)
                return context
        requests = self.denoiser.text_requests
        context = self.text.encode(prompts, requests[0])
        context.others = [
            enc.encode(prompts, req) for enc, req in zip(self.extra_text, requests[1:], strict=True)
        ]
        cut = [pair for text in context.all for pair in text.cut.by_limit]
        if self.pooled_text is not None:
            context.pooled = self.pooled_text(prompts)
            cut.append((self.pooled_text.limit_named, self.pooled_text.cut_rows(prompts)))
        # A row cut by several encoders is one prompt cut.
        context.cut = PromptCut.of(cut, negatives)
        return context

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextContext) -> torch.Tensor:
        return self.denoiser(x, t, text)

    def compile_parts(
        self, backend: str = "auto", memory_budget: float | None = None, llm: bool = True
    ) -> None:
        """torch.compile the denoiser's blocks and, with ``llm``, each LLM's forward (train.compile,
        sample.compile; named apart from nn.Module.compile): "auto" = inductor on a GPU and nothing on the
        CPU. The LLM compiles with automatic dynamic shapes, since trimmed prompt batches change length; on
        an H200 it takes Gemma-2B's batch-16 forward from 40 to 33 ms; each encoder's K/V read after the LLM
        (TextEncoder.compile_kv: every read layer's norm, key/value projections and RoPE, ~290 small kernels
        eagerly for Gemma-2B) compiles with it. Sampling (``llm`` False) keeps both eager: they run once per
        prompt batch, so their compile (tens of seconds on a GPU, again for a new batch size) would cost a
        sampling call more than the milliseconds it saves per batch.

        The blocks compile with static shapes: all blocks share their graphs, one per batch size, text
        length, padding mask or none, and autograd state (a training step's first block may get an input
        without grad and the others one with it; previews run without grad). Past torch's per-function
        recompile limit (8) new shapes would run eagerly, so it is raised to cover those graphs for every
        text length a batch can be trimmed to (text.trim_multiple, CUDA_TRIM_MULTIPLE by default on a GPU).
        That covers the K/V read too, whose dynamic graphs serve every length (at most a few per LLM and
        autograd state: TextEncoder.compile_kv).

        ``memory_budget`` < 1 (train.activation_memory_budget) lets the compiler recompute the cheapest
        activations in backward until the kept ones fit that fraction of what it would keep otherwise;
        None (sampling: no backward) leaves it as it is. It and the recompile limit are PyTorch's
        process-wide settings (torch._functorch.config, torch._dynamo.config), read whenever a graph
        compiles, so they are set here; the limit is only ever raised."""
        device = next(self.denoiser.parameters()).device
        if backend == "auto":
            backend = "inductor" if device.type == "cuda" else ""
        for enc, request in zip(self.encoders, self.denoiser.text_requests, strict=True):
            if backend and llm:
                enc.llm.compile(**compile_settings(backend))
                # A shallow design reads no K/V: compiled, its empty read would be a graph dynamo then
                # skips for the rest of the process, every later model's read with it (`fusedit study`).
                enc.compile_kv(compile_settings(backend) if request.reads_kv else None)
            else:  # off, or sampling: LLMs compiled for training in this process (fusedit bench) run eagerly
                uncompile(enc.llm)
                enc.compile_kv(None)
        if not backend:  # off: blocks compiled for training run eagerly again
            self.denoiser.compile_blocks("")
            return
        if memory_budget is not None:
            torch._functorch.config.activation_memory_budget = memory_budget
        lengths = math.prod(enc.text_lengths(device) for enc in self.encoders)
        # Per text length (of every LLM together): with and without a padding mask, each in a training
        # step's two autograd states and in a preview without grad, and a last partial batch.
        needed = 8 * lengths + RECOMPILE_SLACK
        # torch < 2.7 calls the recompile limit cache_size_limit.
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), needed))
        self.denoiser.compile_blocks(backend)


def _usable_devices() -> str:
    """The device settings this machine takes, as errors list them: "auto or cpu", "auto, cpu or cuda"."""
    found = [
        kind
        for kind in ("cuda", "mps", "xpu")
        if callable(available := getattr(getattr(torch, kind, None), "is_available", None)) and available()
    ]
    *first, last = ["auto", "cpu", *found]
    return f"{', '.join(first)} or {last}"


def resolve_device(name: str | torch.device | None = "auto", setting: str = "device") -> torch.device:
    """A device setting (train.device, --device, an evaluator's device): "auto" or None = CUDA when
    available, else the CPU. A name torch does not know, or a device this machine lacks, is a one-line
    ConfigError naming ``setting``: torch's own errors surface late and say nothing of the setting."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{setting} {str(name)!r} is not allowed (allowed: auto, cpu, cuda, cuda:N, mps, or another "
            "torch device type such as xpu)"
        ) from None
    # torch.cuda, torch.mps, torch.xpu, ... say whether the device is there; for the types without such a
    # module (hpu, xla, vulkan, ...; cpu and meta always work) a tensor placed there tells, rather than the
    # first model or batch moved there failing with a traceback.
    backend = getattr(torch, device.type, None)
    if not callable(getattr(backend, "is_available", None)):
        try:
            torch.empty(0, device=device)
        except Exception as e:
            raise ConfigError(
                f"{setting} {str(name)!r} is not available: torch {torch.__version__} cannot place tensors "
                f"on it ({type(e).__name__}) (allowed here: {_usable_devices()})"
            ) from None
    elif not backend.is_available():
        why = (
            "is built without CUDA"
            if device.type == "cuda" and not torch.backends.cuda.is_built()
            else f"finds no {device.type} device"
        )
        raise ConfigError(
            f"{setting} {str(name)!r} is not available: torch {torch.__version__} {why} (allowed here: "
            f"{_usable_devices()})"
        )
    count = getattr(backend, "device_count", None)
    # torch accepts any index of "cpu" and ignores it, so only accelerators' indexes are checked.
    if device.type != "cpu" and device.index is not None and callable(count) and device.index >= count():
        raise ConfigError(
            f"{setting} {str(name)!r} is not available: this machine has {count()} {device.type} "
            f"device(s) (allowed: {device.type}:0..{device.type}:{count() - 1})"
        )
    return device


# The precision settings (train.precision and sample.precision allow the same).
PRECISIONS = choices_of(SampleConfig, "precision")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a precision setting (train.precision, sample.precision) resolves to bf16 autocast here:
    "bf16" always, "auto" on a CUDA device with bf16 support, "fp32" never. Anything else is a one-line
    ConfigError: it would otherwise run (and be recorded as) fp32 without a word."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not allowed (allowed: {', '.join(PRECISIONS)})")
    return precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )


def precision_name(precision: str, device: torch.device) -> str:
    """What a precision setting ran as here, for records: "bf16" or "fp32" ("auto" resolved)."""
    return "bf16" if uses_bf16(precision, device) else "fp32"


def builtin_words(cfg: Config) -> list[str]:
    """The word list of the built-in tokenizer (used when no text.tokenizer / model_id is set): the shapes
    caption vocabulary plus the words of the configured templates (so LI-DiT's instruction is not <unk>)."""
    from fusedit.data.shapes import vocabulary

    if cfg.data.source not in ("shapes", "latents") and tokenizes_builtin(cfg.text):
        # A fine-tune's LLM learned the words of its source's built-in tokenizer (a source with another
        # tokenizer has other embedding rows, refused by init_from's checks, as is another word list), so
        # only the captions' words can change.
        log.warning(
            "data.source=%s with the built-in shapes-world tokenizer: other words become <unk>; %s",
            cfg.data.source,
            "train.init_from's model knows only the words it was trained with: caption in those"
            if cfg.train.init_from
            else "set text.tokenizer (or text.model_id)",
        )
    extra = " ".join(
        [LIDIT_INSTRUCTION] + [f"{t.instruction} {t.system_prompt}" for t in (cfg.text, *cfg.extra_text)]
    )
    # Split as the word tokenizer's Whitespace pre-tokenizer splits: a run of punctuation ("...", ").") is
    # one token there, which would be <unk> were its characters listed one by one.
    return vocabulary() + sorted(set(re.findall(r"\w+|[^\w\s]+", extra)) - set(vocabulary()))


def _text_ids_top(tokenizer) -> int:
    """The highest id text can reach through ``tokenizer``: its base vocabulary, its added tokens that are
    not special (words matched in the text), and the special tokens fusedit feeds (pad, BOS, EOS). Special
    added tokens past the LLM's embeddings (Gemma-3's <image_soft_token> on its text-only sizes) never come
    from a prompt: the per-prompt check (TextEncoder.tokenize) stays for those."""
    added = [i for i, token in tokenizer.added_tokens_decoder.items() if not token.special]
    fed = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    return max([tokenizer.vocab_size - 1, *added, *(i for i in fed if i is not None)])


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """torch's global generators of the CPU and of ``device`` (a GPU's) for the block, seeded with ``seed``
    (None: as they are), and put back as they were after it. Other GPUs' generators are left alone, which
    torch.manual_seed would reseed; the CPU's draws equal torch.manual_seed's."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for gpu in devices:
                with torch.cuda.device(gpu):
                    torch.cuda.manual_seed(seed)
        yield


def llm_seed(seed: int, key: str) -> int:
    """The seed of the LLM of section ``key`` (text, extra_text.0) in a run of ``train.seed`` ``seed``, for
    its random init (a random-init LLM; weights a checkpoint lacks). Its own, not the global generator's
    state after the denoiser's init: that differs between designs, and a design study then compared each
    design over another random text encoder, where the papers hold the LLM fixed (design-space.md)."""
    digest = hashlib.blake2b(f"llm/{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _text_encoder(
    key: str,
    tcfg: TextConfig,
    request: TextRequest,
    spec: LLMSpec,
    config,
    device,
    meta: bool,
    words: list[str] | None,
    seed: int,
) -> TextEncoder:
    """``config``: the LLM's transformers config (llm_config), read once per build; ``spec`` its summary;
    ``key`` the section as errors name it (text, extra_text.0); ``seed`` the random init's (llm_seed)."""
    needed = request.layers_needed(spec.num_layers)
    reads_kv = request.reads_kv
    if meta:  # built under the device context too, so no real weights are allocated
        with torch.device(device):
            llm = load_llm(tcfg, needed, device, shape_only=True, config=config, reads_kv=reads_kv, key=key)
    else:
        with seeded(seed, device):
            llm = load_llm(tcfg, needed, device, config=config, reads_kv=reads_kv, key=key)
    name = tcfg.tokenizer or tcfg.model_id
    if meta and name and not Path(name).is_dir():
        return TextEncoder(llm, None, tcfg.max_length)  # a hub tokenizer: shapes only, no download
    # Meta builds load a local tokenizer too (cheap), so that the padded width (encoder.max_length) counts
    # the template's tokens: what FLOP counts of templated designs read.
    tokenizer = load_tokenizer(tcfg, words)
    rows = llm.get_input_embeddings().num_embeddings
    top = _text_ids_top(tokenizer)
    if top >= rows:
        # Refused at build: otherwise the first caption or prompt that uses a high id fails, mid-run.
        raise ConfigError(
            f"{key}'s tokenizer ({name or 'built-in'}) gives text token ids up to {top} but its LLM has {rows} "
            f"embeddings, so a prompt using an id past {rows - 1} would fail (allowed: the LLM's own tokenizer "
            f"as {key}.tokenizer, or none to use {key}.model_id's)"
        )
    if tcfg.tokenizer and tcfg.model_id and tcfg.tokenizer != tcfg.model_id:
        _warn_other_tokenizer(key, tcfg, tokenizer, config)
    template = build_template(tcfg.template, tokenizer, tcfg.instruction, tcfg.system_prompt, key)
    encoder = TextEncoder(
        llm,
        tokenizer,
        tcfg.max_length,
        template,
        trim_padding=tcfg.trim_padding,
        trim_multiple=tcfg.trim_multiple,
    )
    # Deep fusion reads K/V off the LLM's layers: are they those its attention uses?
    encoder.check_kv(request)
    return encoder


def _warn_other_tokenizer(key: str, tcfg: TextConfig, tokenizer, config) -> None:
    """Warn where ``{key}.tokenizer``, given apart from the LLM, names another begin-of-text id than the
    LLM's config: another family's tokenizer whose ids fit the embeddings (which is all the build can check)
    would feed the LLM other tokens than it was trained on, without an error. A tokenizer in another LLM's
    folder (its config.json names another model type) is warned about the same way. The first warning
    that applies is the one given."""
    other = (model_identity(tcfg.tokenizer) or {}).get("model_type")
    if other is not None and other != config.model_type:
        log.warning(
            "%s.tokenizer=%r is the tokenizer of a %s model but %s.model_id=%r is a %s LLM: is it this LLM's "
            "tokenizer? (none: the model_id's own)",
            key,
            tcfg.tokenizer,
            other,
            key,
            tcfg.model_id,
            config.model_type,
        )
        return
    # BOS only: an instruct model's tokenizer ends text with its own turn token (Qwen2.5-Instruct's EOS is
    # 151645, its base model's 151643), a pair that is fine together; the text stream feeds EOS only as the
    # empty prompt of a tokenizer without BOS.
    ours, theirs = tokenizer.bos_token_id, getattr(config, "bos_token_id", None)
    if ours is not None and theirs is not None and ours != theirs:
        log.warning(
            "%s.tokenizer=%r gives the BOS token id %d but %s.model_id=%r's config says %s: is it this LLM's "
            "tokenizer? (none: the model_id's own)",
            key,
            tcfg.tokenizer,
            ours,
            key,
            tcfg.model_id,
            theirs,
        )


def build_model(
    cfg: Config,
    device: torch.device | str = "cpu",
    with_autoencoder: bool = True,
    vocabulary: list[str] | None = None,
) -> TextToImage:
    """Build every part on ``device``: a torch device or its name, "auto" for CUDA when available
    (``resolve_device``: a bad or missing device is a one-line ConfigError); "meta" builds shapes only,
    for counting parameters.

    ``with_autoencoder=False`` skips the VAE (benchmarks on synthetic latents). ``vocabulary``: the built-in
    tokenizer's word list a checkpoint saved (default: :func:`builtin_words` of ``cfg``, as a new run has)."""
    check_fields(cfg)  # a config edited in Python: one line naming a bad key, not a KeyError deep in a build
    device = resolve_device(device, "device")
    meta = device.type == "meta"
    text_cfgs = [cfg.text, *cfg.extra_text]
    configs = [llm_config(t, shape_only=meta, key=key) for key, t in text_sections(cfg)]
    specs = [LLMSpec.from_hf(c, deep=not is_shallow(cfg.model.design)) for c in configs]
    words = None
    if uses_builtin_tokenizer(cfg):
        words = vocabulary if vocabulary is not None else builtin_words(cfg)
    pooled = None
    if variant_traits("model.pooled_text", cfg.model.pooled_text).encoder:
        # A random-init encoder (pooled_text.arch) is frozen and not saved with checkpoints: its own seed, as
        # a random-init LLM's, makes every build of the run (a resume, sampling) hold the one it trained with,
        # whatever the global generator's state (it was drawn from that, another CLIP at each load).
        with torch.device(device) if meta else seeded(llm_seed(cfg.train.seed, "pooled_text"), device):
            builtin = None if meta or cfg.pooled_text.tokenizer else load_tokenizer(TextConfig(), words)
            pooled = load_pooled_encoder(
                cfg.pooled_text, device, builtin, shape_only=meta, instruction=cfg.text.instruction
            )
    with torch.device(device):
        denoiser = build_denoiser(
            cfg.model,
            specs[0],
            cfg.vae.latent_channels,
            extra_llms=tuple(specs[1:]),
            hidden_layers=tuple(t.hidden_layer for t in text_cfgs),
            pooled_dim=pooled.dim if pooled is not None else None,
        )
    sections = text_sections(cfg)
    encoders = [
        _text_encoder(key, t, req, spec, config, device, meta, words, llm_seed(cfg.train.seed, key))
        for (key, t), req, spec, config in zip(sections, denoiser.text_requests, specs, configs, strict=True)
    ]
    autoencoder = load_autoencoder(cfg.vae, device) if with_autoencoder and not meta else None
    model = TextToImage(encoders[0], denoiser, autoencoder, encoders[1:], pooled, vocabulary=words)
    _check_positions(model)
    return model


def _check_positions(model: TextToImage) -> None:
    """Warns when a text encoder's padded width (its max_length, plus the template's tokens for an LLM)
    passes the positions its model was trained with: a RoPE LLM then reads positions it never saw, and a
    CLIP text model's learned table fails on a prompt that long. A warning, not an error, so that a run
    saved under such a setting still loads."""
    encoders = [*model.encoders, *([model.pooled_text] if model.pooled_text is not None else [])]
    for enc in encoders:
        config = enc.llm.config if isinstance(enc, TextEncoder) else enc.model.config
        positions = getattr(config, "max_position_embeddings", None)
        if positions is None or enc.max_length <= positions:
            continue
        template = enc.max_length - enc.prompt_limit
        log.warning(
            "%s=%d%s %d positions, more than the model's max_position_embeddings=%d: longer prompts read "
            "positions it never learned; set %s <= %d",
            enc.setting,
            enc.prompt_limit,
            f" and the template's {template} token(s) make" if template else " makes",
            enc.max_length,
            positions,
            enc.setting,
            positions - template,
        )


def count_parameters(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
