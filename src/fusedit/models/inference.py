"""Inference-time forms of a trained denoiser: the same function in fewer, cheaper kernels.

Sampling runs the denoiser 25-50 times per prompt batch with no backward, so two things the training
form needs stop paying for themselves:

- ``cast_matmul_weights``: Linear and Conv weights (and biases) stored in bf16. Under bf16 autocast every
  such layer casts its fp32 weight to bf16 on each call anyway, so outputs are bit-identical while each
  step stops reading 4 bytes and writing 2 per parameter. Norm weights and buffers keep their dtype.
- ``fuse_projections``: q/k/v of every image attention and gate/up of every gated MLP become one matmul
  each over the concatenated weights: fewer, larger GEMMs, equal up to the matmul's own rounding.

Both change the module in place and are meant for a model that will only sample from now on.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.layers.mlp import FusedGatedMLP, GatedMLP
from fusedit.models.blocks import FusedImageAttention, ImageAttention

_MATMUL_LAYERS = (nn.Linear, nn.Conv2d)


def cast_matmul_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the weights autocast would cast anyway in ``dtype``; everything else keeps its dtype."""
    for m in module.modules():
        if isinstance(m, _MATMUL_LAYERS):
            m.to(dtype)
    return module


def fuse_projections(module: nn.Module) -> nn.Module:
    """Replace every ImageAttention / GatedMLP inside ``module`` by its fused form."""
    fused = {ImageAttention: FusedImageAttention, GatedMLP: FusedGatedMLP}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in fused:
                setattr(parent, name, fused[type(child)](child))
    return module


def prepare_for_sampling(
    module: nn.Module, weights_dtype: torch.dtype | None = None, fuse: bool = True
) -> nn.Module:
    """The sampling form: eval mode, no gradients, fused projections, matmul weights in ``weights_dtype``
    (None keeps them)."""
    module.eval().requires_grad_(False)
    if fuse:
        fuse_projections(module)
    if weights_dtype is not None:
        cast_matmul_weights(module, weights_dtype)
    return module
