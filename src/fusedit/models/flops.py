"""Forward FLOPs per image from a built model's own shapes (works on the meta device).

Counted: every matrix multiply (2 FLOPs per multiply-add) and the two attention products
(4 * queries * keys * heads * head_dim), which is what matmul-bound GPU time follows; elementwise work
(norms, activations, RoPE) is left out. Token counts per module: image-path Linears run on the N image
tokens, text-path ones (context embedder, text K/V) on the T text tokens, timestep and modulation ones
once per image. A training step costs 3 x the DiT forward (forward + backward) + 1 x the frozen LLM forward.
"""

from __future__ import annotations

from torch import nn

from fusedit.models.blocks import CrossAttention, ImageAttention, JointBlock
from fusedit.text.refiner import TokenAttention
from fusedit.text.spec import head_dim

_TEXT_PATH = ("context", "text_kv")
_PER_IMAGE = ("time", "modulation", "final_norm", "pooled", "gates")


def _linear(m: nn.Linear, tokens: int) -> int:
    return 2 * tokens * m.in_features * m.out_features


def denoiser_flops(denoiser: nn.Module, num_image: int, num_text: int) -> int:
    total = 0
    for name, m in denoiser.named_modules():
        parts = name.split(".")
        if isinstance(m, nn.Linear):
            if any(p in _PER_IMAGE for p in parts):
                total += _linear(m, 1)
            elif any(p in _TEXT_PATH for p in parts):
                total += _linear(m, num_text)
            else:
                total += _linear(m, num_image)
        elif isinstance(m, nn.Conv2d):  # LI-DiT's conv position ResBlock, over the patch grid
            total += 2 * num_image * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, TokenAttention):  # refiner attention over one LLM's tokens (others': same length)
            others = len(denoiser.context.linguistic) - 1 if "collaborative" in parts else 1
            total += 4 * num_text * num_text * others * m.q.out_features
        elif isinstance(m, ImageAttention):
            block = denoiser.get_submodule(".".join(parts[:-1]))
            keys = num_image + (num_text if isinstance(block, JointBlock) else 0)
            total += 4 * num_image * keys * m.heads * m.head_dim
        elif isinstance(m, CrossAttention):
            total += 4 * num_image * num_text * m.heads * m.head_dim
    return total


def llm_flops(llm: nn.Module, num_text: int) -> int:
    """The LLM's forward on one prompt of ``num_text`` tokens (all its Linears; full attention products)."""
    cfg = llm.config
    linears = sum(_linear(m, num_text) for m in llm.modules() if isinstance(m, nn.Linear))
    attention = len(llm.layers) * 4 * num_text * num_text * cfg.num_attention_heads * head_dim(cfg)
    return linears + attention


def model_flops(model, num_image: int) -> tuple[int, int, int]:
    """(DiT forward, LLM forwards, text tokens) per image for a built TextToImage (meta builds too).

    Each LLM runs at its padded width, ``encoder.max_length``: text.max_length plus the template's tokens
    where the tokenizer is local (a hub tokenizer on a meta build: text.max_length alone). The DiT reads
    the first LLM's width (see denoiser_flops)."""
    widths = [enc.max_length for enc in model.encoders]
    lm = sum(llm_flops(enc.llm, w) for enc, w in zip(model.encoders, widths))
    return denoiser_flops(model.denoiser, num_image, widths[0]), lm, widths[0]


def image_tokens(image_size: int, downsample: int, patch_size: int) -> int:
    return (image_size // downsample // patch_size) ** 2
