"""Loading the LLM and its tokenizer: any Hugging Face decoder-only model, or a random-init one.

The LLM is kept as transformers' own *base* model (no LM head): its layers, norms and rotary embedding are
what the text stream runs, so every supported family (Gemma, Gemma-2, Qwen2/2.5/3, Llama, Mistral) works unchanged.
It is truncated after the deepest layer a design reads: deeper layers would never be used.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from fusedit.config import ConfigError, TextConfig, arch_config, refuse_path_to_nothing, written_as_path
from fusedit.text.encoder import refuse_unreadable_kv
from fusedit.text.spec import LLMSpec, unsupported_llm

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def llm_config(cfg: TextConfig, shape_only: bool = False, key: str = "text") -> PretrainedConfig:
    """The LLM's transformers config: from the hub id / folder, or ``family`` + ``arch`` for random init.

    ``shape_only`` (meta-device builds that only count parameters) falls back to ``arch`` when the hub id
    cannot be reached, so a preset can be described offline. ``key``: the config section, as errors name it
    (``config.text_sections``: ``text``, ``extra_text.0``).
    """
    if cfg.model_id:
        refuse_path_to_nothing(f"{key}.model_id={cfg.model_id!r}", cfg.model_id)
        try:
            # Shape-only builds never wait on the network: the local cache or the preset's arch will do.
            config = AutoConfig.from_pretrained(cfg.model_id, local_files_only=shape_only)
        except OSError as e:
            # The preset's arch stands in for an unreachable hub id, never for a folder that is not there.
            if shape_only and cfg.arch and not written_as_path(cfg.model_id):
                config = arch_config(cfg, key)
                # The arch may be a preset's, inherited past a changed model_id: say what was counted.
                log.warning(
                    "%s.model_id=%r is not in the local cache: counting %s.arch instead (%s, %d layers, "
                    "width %d); set %s.arch to the model's shape if it differs",
                    key,
                    cfg.model_id,
                    key,
                    cfg.family,
                    config.num_hidden_layers,
                    config.hidden_size,
                    key,
                )
                return config
            raise ConfigError(
                f"{key}.model_id={cfg.model_id!r} cannot be loaded (not a local folder, and the hub is "
                f"unreachable or has no such model): {str(e).splitlines()[0]}"
            ) from None
        except ValueError as e:  # a folder of something else, or a model_type this transformers lacks
            raise ConfigError(
                f"{key}.model_id={cfg.model_id!r} cannot be read as a transformers model (allowed: an LLM's "
                f"folder written by save_pretrained, or its hub id){_pipeline_hint(cfg.model_id)}: "
                f"{str(e).splitlines()[0]}"
            ) from None
        # Multimodal wrappers (PaliGemma, ...) keep the language decoder's config under text_config.
        return getattr(config, "text_config", None) or config
    return arch_config(cfg, key)


def _pipeline_hint(place: str) -> str:
    """For a pipeline folder given as an LLM: where its LLMs are (its transformers text encoders, as
    model_index.json lists them), and how to start from the whole of it."""
    index = Path(place).expanduser() / "model_index.json"
    try:
        components = json.loads(index.read_text())
    except (OSError, ValueError):
        return ""
    llms = [
        repr(str(Path(place) / name))
        for name, kind in components.items()
        if name.startswith("text_encoder") and isinstance(kind, list) and kind[0] == "transformers"
    ]
    where = f"its LLMs are in {', '.join(llms)}, and " if llms else ""
    return f"; it is a pipeline folder: {where}to train on from the whole pipeline give it as the config's base or train.init_from"


def load_llm(
    cfg: TextConfig,
    num_layers: int,
    device: torch.device | str = "cpu",
    shape_only: bool = False,
    config: PretrainedConfig | None = None,
    reads_kv: bool = True,
    key: str = "text",
) -> PreTrainedModel:
    """The frozen base LLM with only its first ``num_layers`` layers, in eval mode, on ``device``.

    ``shape_only`` builds random weights from the config (meta-device parameter counts); ``config`` is
    ``llm_config(cfg, shape_only)`` when the caller has it already (it is not modified). ``reads_kv``: the
    design reads each layer's K/V (deep fusion), which needs separate q/k/v projections; the shallow
    designs read hidden states only and take any decoder. ``key``: the config section, as messages name it
    (``text``, ``extra_text.0``).
    """
    config = llm_config(cfg, shape_only, key) if config is None else copy.deepcopy(config)
    if num_layers > config.num_hidden_layers:
        raise ConfigError(
            f"the design needs {num_layers} LLM layers but the LLM has {config.num_hidden_layers}"
        )
    full = copy.deepcopy(config)
    _cut_config(config, num_layers)
    dtype = DTYPES[cfg.dtype]
    kernel = {} if cfg.attn_implementation == "auto" else {"attn_implementation": cfg.attn_implementation}
    try:
        if cfg.model_id and not shape_only and _is_multimodal(cfg.model_id):
            # A multimodal checkpoint (PaliGemma, ...): its weights sit under the language model's prefix,
            # so load the whole model and keep its language decoder, cut after the layers the design reads.
            llm = _from_pretrained(cfg.model_id, key, **{_DTYPE_KW: dtype}, **kernel).language_model
            _keep_first_layers(llm, num_layers)
        elif cfg.model_id and not shape_only:
            llm = _from_pretrained(cfg.model_id, key, config=config, **{_DTYPE_KW: dtype}, **kernel)
        else:
            # A random init draws the LLM at its own depth, then keeps the layers the design reads: the
            # weights of a layer (and the embeddings) do not depend on how many a design reads, so a study
            # compares deep fusion, LI-DiT's -3 and depth ablations over one text encoder, as the papers
            # hold the LLM fixed (design-space.md), not over an init drawn in another order.
            llm = AutoModel.from_config(full, **kernel)
            _keep_first_layers(llm, num_layers)
            llm = llm.to(dtype)  # after the cut: the layers dropped are never converted
    except (ValueError, ImportError) as e:  # a kernel the family (or this machine) cannot run
        if not kernel:
            raise
        raise _kernel_refusal(cfg, config, key, e) from None
    if reads_kv:
        _refuse_without_kv(llm, config.model_type)
    llm = llm.to(device) if str(device) != "meta" else llm
    llm.requires_grad_(False)
    return llm.eval()


def check_llm(cfg: TextConfig, deep: bool, key: str = "text") -> None:
    """The refusals of ``load_llm`` and ``LLMSpec.from_hf`` that the LLM's config alone decides, made
    without its weights: a config that is not LLaMA-style, an attention kernel (text.attn_implementation)
    the family or this machine cannot run, and for a ``deep`` design (its trait: it reads each layer's K/V)
    a RoPE per layer type, layers without separate q/k/v projections, or K/V that cannot be read at all
    (OLMo-2's post-norms, StableLM's partial rotary: one layer built on the meta device shows them). A run
    checks this before it makes and locks its folder. Not all: whether the K/V that deep fusion reads match
    the LLM's own (TextEncoder.check_kv: Cohere's pairwise RoPE, HunYuan's key norm after RoPE) is told by
    their values, which need weights, and is refused when the run builds the LLM."""
    config = llm_config(cfg, key=key)
    LLMSpec.from_hf(config, deep=deep)
    # A kernel is checked where the family's model class is known (else the load says what it makes of it).
    kernel = cfg.attn_implementation != "auto" and _family_kernels(config) is not None
    if not (deep or kernel):
        return
    # One layer on the meta device serves both checks: transformers decides the kernel when it builds it.
    one = copy.deepcopy(config)
    _cut_config(one, 1)
    kwargs = {"attn_implementation": cfg.attn_implementation, _DTYPE_KW: DTYPES[cfg.dtype]} if kernel else {}
    try:
        with torch.device("meta"):
            llm = AutoModel.from_config(one, **kwargs)
    except (ValueError, ImportError) as e:
        if kernel:  # the family's class exists: what it refused is the kernel (or this machine's lack of it)
            raise _kernel_refusal(cfg, config, key, e) from None
        if isinstance(e, ImportError):
            raise
        # A config AutoModel has no decoder for (a vision-language model's text part).
        raise unsupported_llm(
            config.model_type, f"transformers builds no model of it: {str(e).splitlines()[0]}"
        ) from None
    if deep:
        _refuse_without_kv(llm, config.model_type)
        refuse_unreadable_kv(llm)


# The kernels text.attn_implementation names beside eager (which every family runs), and the flags of
# transformers' model class that say its family runs each (transformers before 4.54 named flash's
# _supports_flash_attn_2).
_KERNEL_FLAGS = {
    "sdpa": ("_supports_sdpa",),
    "flash_attention_2": ("_supports_flash_attn", "_supports_flash_attn_2"),
    "flex_attention": ("_supports_flex_attn",),
}


def _family_kernels(config: PretrainedConfig) -> list[str] | None:
    """The kernels ``config``'s family runs, as its transformers model class says; None where AutoModel
    has no class for the config."""
    from transformers import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:
        return None
    return ["eager"] + [
        kernel
        for kernel, flags in _KERNEL_FLAGS.items()
        if any(getattr(model_class, f, False) for f in flags)
    ]


def _kernel_refusal(cfg: TextConfig, config: PretrainedConfig, key: str, error: Exception) -> ConfigError:
    """The one-line refusal of a kernel that transformers refused with ``error``: one the family lacks (its
    kernels allowed; transformers' own message names another model), or one this machine cannot run
    (transformers' reason, and the family's other kernels)."""
    named = f"{key}.attn_implementation={cfg.attn_implementation!r}"
    family = config.model_type
    kernels = _family_kernels(config)
    if kernels is not None and cfg.attn_implementation not in kernels:
        return ConfigError(
            f"{named} cannot run the {family} LLM: its transformers model has no such kernel (allowed for "
            f"{family}: auto, {', '.join(kernels)})"
        )
    # transformers' reason, without its preamble ("FlashAttention2 has been toggled on, but it cannot be
    # used due to the following error: ...").
    reason = (str(error).splitlines() or [type(error).__name__])[0].split("following error: ")[-1].rstrip(".")
    others = [k for k in kernels or () if k != cfg.attn_implementation]
    return ConfigError(
        f"{named} cannot run the {family} LLM on this machine: {reason} (allowed here: "
        f"{', '.join(['auto', *others])})"
    )


def _refuse_without_kv(llm: PreTrainedModel, model_type: str) -> None:
    """Deep fusion reads each layer's K/V through its q/k/v projections (text/encoder.py): a family whose
    attention fuses them (Phi-3's qkv_proj) is refused in one line."""
    attn = getattr((getattr(llm, "layers", None) or [None])[0], "self_attn", None)
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise unsupported_llm(
            model_type,
            "its layers have no separate q/k/v projections to read K/V from (the shallow designs read only "
            "its hidden states)",
            by=" by deep fusion",
        )


def _cut_config(config: PretrainedConfig, num_layers: int) -> None:
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):  # Gemma-2, Qwen2/3: one attention type per layer
        config.layer_types = config.layer_types[:num_layers]


def _keep_first_layers(llm: PreTrainedModel, num_layers: int) -> None:
    """Cut a built decoder after its first ``num_layers`` layers (its config with it)."""
    llm.layers = llm.layers[:num_layers]
    _cut_config(llm.config, num_layers)


def _from_pretrained(model_id: str, key: str, **kwargs) -> PreTrainedModel:
    """AutoModel.from_pretrained, reporting only what matters here. The base model of a causal-LM
    checkpoint never reads its LM head (or the layers past the cut), which transformers reports as a table
    of unexpected weights on every load; weights the model needs but the checkpoint lacks are warned
    about, since they stay random. ``key``: the config section, as the warning names it."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(model_id, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        log.warning(
            "%s.model_id=%r lacks %d weight(s) the LLM needs (random instead), e.g. %s",
            key,
            model_id,
            len(missing) + len(mismatched),
            (missing + mismatched)[0],
        )
    return model


def _is_multimodal(model_id: str) -> bool:
    config = AutoConfig.from_pretrained(model_id)
    return getattr(config, "text_config", None) is not None and config.text_config is not config


# A caption with words, numbers, a contraction, punctuation, a blank line, a double space and accents:
# tokenizers that read it alike read captions alike. No leading space, which Llama-2's class treats apart
# from its tokenizer.json on purpose.
_TOKENIZER_PROBE = (
    "A photo of 3 red cats, 2024 dogs' toys & the Eiffel Tower at night.\n\nIt's  a café-style."
)


def _as_its_file_says(tok, name: str):
    """``tok`` (AutoTokenizer's) where it splits text as the folder's own tokenizer.json does; else the
    tokenizer that file describes. transformers 5 builds a family's tokenizer class from the file's vocabulary
    (Qwen2Tokenizer rebuilds a byte-level BPE), so a tokenizer.json of another kind in a Qwen2 folder (a
    word-level one, a custom BPE) would become other ids, most words one id, without a word; the file is
    what the LLM was trained with."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import cached_file

    path = cached_file(
        name,
        "tokenizer.json",
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if path is None:  # a sentencepiece-only tokenizer: nothing else to compare with
        return tok
    own = Tokenizer.from_file(path)
    backend = getattr(tok, "backend_tokenizer", None)
    # Another kind of model (word-level in the file, BPE rebuilt) differs whatever the probe gives.
    if backend is None or type(backend.model) is type(own.model):
        try:
            probe = own.encode(_TOKENIZER_PROBE, add_special_tokens=False).ids
            if tok(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"] == probe:
                return tok
        except Exception:  # noqa: BLE001  (tokenizers raises plain Exception)
            return tok  # a vocabulary without an unknown token cannot split the probe: same kind, kept
    # A warning: a run trained on this folder before fusedit read it so had other token ids.
    log.warning(
        "tokenizer %r: transformers' %s splits text otherwise than the folder's tokenizer.json; using the "
        "tokenizer.json as it is",
        name,
        type(tok).__name__,
    )
    return PreTrainedTokenizerFast.from_pretrained(name)


def load_tokenizer(cfg: TextConfig, builtin_words: list[str] | None = None):
    """The tokenizer of ``text.tokenizer`` or ``text.model_id``; else a word tokenizer over ``builtin_words``."""
    from fusedit.text.tokenizer import word_tokenizer

    name = cfg.tokenizer or cfg.model_id
    if not name:
        if builtin_words is None:
            raise ConfigError("no tokenizer: set text.tokenizer or text.model_id")
        return word_tokenizer(builtin_words)
    try:
        tok = _as_its_file_says(AutoTokenizer.from_pretrained(name), name)
    except OSError as e:
        raise ConfigError(f"tokenizer {name!r} cannot be loaded: {str(e).splitlines()[0]}") from None
    # transformers builds an empty tokenizer for a folder that has a config but no tokenizer files.
    probe = "a photo of a cat"
    if not tok(probe, add_special_tokens=False)["input_ids"]:
        raise ConfigError(
            f"tokenizer {name!r} turns {probe!r} into no tokens ({len(tok)} in its vocabulary): the folder "
            "has no tokenizer files? (set text.tokenizer to the LLM's tokenizer)"
        )
    tok.padding_side = "right"
    # Padding is masked out of every design's attention and pooling, so any id the LLM embeds will do:
    # its own pad token, else its end-of-text token (as transformers' generate does), else its unknown one.
    tok.pad_token = tok.pad_token or tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise ConfigError(
            f"tokenizer {name!r} has neither a pad, an end-of-text nor an unknown token to pad prompts with "
            "(allowed: a tokenizer naming one, e.g. pad_token, eos_token or unk_token in its "
            "tokenizer_config.json)"
        )
    return tok
