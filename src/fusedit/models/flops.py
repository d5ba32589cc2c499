"""Forward FLOPs per image from a built model's own shapes (works on the meta device).

Counted: every matrix multiply (2 FLOPs per multiply-add) and the two attention products
(4 * queries * keys * heads * head_dim), which is what matmul-bound GPU time follows; elementwise work
(norms, activations, RoPE) is left out. Token counts per module: image-path Linears run on the N image
tokens; the context embedder and each LLM's refiner on that LLM's T_i tokens; the text K/V and the
attention over text on the T' tokens the DiT reads (sum T_i, or max T_i with LI-DiT's channel concat);
timestep and modulation ones once per image. A training step costs 3 x the DiT forward (forward + backward) + 1 x the frozen LLM forward.
LoRA adapters (train.dit_lora, train.llm_lora) are not counted: a model's FLOPs are its architecture's, the
same with or without them (as `fusedit describe` counts them on a build without adapters), and
train.stages.training_flops_per_image prices their training as negligible.
"""

from __future__ import annotations

from torch import nn

from fusedit.adapters import is_adapter_key
from fusedit.config import llm_head_dim
from fusedit.models.blocks import CrossAttention, ImageAttentionBase, JointBlock
from fusedit.text.refiner import TokenAttention

_PER_IMAGE = ("time", "modulation", "final_norm", "pooled", "gates")


def _linear(m: nn.Linear, tokens: int) -> int:
    return 2 * tokens * m.in_features * m.out_features


def _text_width(denoiser: nn.Module, widths: list[int], leads: list[int] | None) -> int:
    """How many text tokens the DiT's layers read: as LI-DiT's concatenation of the LLMs leaves them (the
    refiner's ``concat.width``; ``leads``: each LLM's leading specials, TextEncoder.leading, which the
    channel concatenation aligns), else the one LLM's."""
    concat = getattr(getattr(denoiser, "context", None), "concat", None)
    return concat.width(widths, leads) if concat is not None else sum(widths)


def _branch(parts: list[str]) -> int | None:
    """Which LLM a refiner module serves: context.linguistic.i... and context.collaborative.branches.i..."""
    for key in ("linguistic", "branches"):
        if key in parts[:-1]:
            return int(parts[parts.index(key) + 1])
    return None


def denoiser_flops(
    denoiser: nn.Module, num_image: int, num_text: int | list[int], leads: list[int] | None = None
) -> int:
    """``num_text``: each LLM's text width (one int for one LLM); ``leads``: each LLM's leading special
    tokens (TextEncoder.leading; None: none). The context embedder and each LLM's refiner run on their own
    LLM's tokens; the text K/V and the attention over text on what the DiT reads."""
    widths = [num_text] if isinstance(num_text, int) else list(num_text)
    read = _text_width(denoiser, widths, leads)
    total = 0
    for name, m in denoiser.named_modules():
        if is_adapter_key(name):  # peft's LoRA factors (q.lora_A.default) beside q.base_layer
            continue
        parts = name.split(".")
        branch = _branch(parts)
        own = widths[branch] if branch is not None else widths[0]
        # The collaborative refiner's branch reads the other LLMs' tokens as keys and values.
        others = sum(widths) - own if "collaborative" in parts else own
        if isinstance(m, nn.Linear):
            if any(p in _PER_IMAGE for p in parts):
                total += _linear(m, 1)
            elif "text_kv" in parts or "concat" in parts:
                total += _linear(m, read)
            elif "context" in parts:
                total += _linear(m, others if parts[-1] == "kv" else own)
            else:
                total += _linear(m, num_image)
        elif isinstance(m, nn.Conv2d):  # LI-DiT's conv position ResBlock, over the patch grid
            total += 2 * num_image * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, TokenAttention):  # a refiner's attention: over its own tokens, or the others'
            total += 4 * own * others * m.q.out_features
        elif isinstance(m, ImageAttentionBase):  # training or fused form
            block = denoiser.get_submodule(".".join(parts[:-1]))
            keys = num_image + (read if isinstance(block, JointBlock) else 0)
            total += 4 * num_image * keys * m.heads * m.head_dim
        elif isinstance(m, CrossAttention):
            total += 4 * num_image * read * m.heads * m.head_dim
    return total


def llm_flops(llm: nn.Module, num_text: int) -> int:
    """The LLM's forward on one prompt of ``num_text`` tokens (all its Linears; full attention products)."""
    cfg = llm.config
    linears = sum(
        _linear(m, num_text)
        for name, m in llm.named_modules()
        if isinstance(m, nn.Linear) and not is_adapter_key(name)
    )
    attention = len(llm.layers) * 4 * num_text * num_text * cfg.num_attention_heads * llm_head_dim(cfg)
    return linears + attention


def model_flops(model, num_image: int) -> tuple[int, int, int]:
    """(DiT forward, LLM forwards, text tokens the DiT reads) per image for a built TextToImage (meta
    builds too). Each LLM runs at its padded width, ``encoder.max_length``: text.max_length plus the
    template's tokens where the tokenizer is local (a hub tokenizer on a meta build: text.max_length)."""
    widths = [enc.max_length for enc in model.encoders]
    leads = [enc.leading for enc in model.encoders]
    lm = sum(llm_flops(enc.llm, w) for enc, w in zip(model.encoders, widths))
    return (
        denoiser_flops(model.denoiser, num_image, widths, leads),
        lm,
        _text_width(model.denoiser, widths, leads),
    )


def image_tokens(image_size: int, downsample: int, patch_size: int) -> int:
    return (image_size // downsample // patch_size) ** 2
