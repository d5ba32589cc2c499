"""Timestep conditioning variants of the FuseDiT study (design-space.md s.1), chosen at build time.

Each variant says (1) how the timestep is embedded, (2) whether it is added to the image tokens, (3) what
each block's two sublayers (attention, MLP) are modulated with, and (4) the final layer's norm. Blocks
call ``mod.pre(norm(x))`` before a sublayer and ``mod.post(y)`` on its output whatever the variant; the
unmodulated variants hand out ``IDENTITY``, so no block ever branches on the variant.

- ``adaln-zero`` (DiT): per block Linear(d, 6d) on SiLU(temb), zero-initialised; adaLN final layer.
- ``adaln-single`` (PixArt-alpha): one global Linear(d, 6d), plus a learned (6, d) table per block.
- ``addition``: temb added to every image token after patchify; plain affine RMSNorms.
- ``none``: no timestep input at all (the released large FuseDiT model).

The norm that adaLN modulates (blocks and final layer) is DiT's parameter-free LayerNorm, or with
``model.adaln_norm=rmsnorm`` an affine RMSNorm, as the public FuseDiT code has it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fusedit.layers.embed import TimestepEmbedder
from fusedit.layers.norm import RMSNorm, layer_norm

# The norm adaLN modulates (model.adaln_norm): DiT's parameter-free LayerNorm, or the public FuseDiT code's
# affine RMSNorm.
MODULATED_NORMS: dict[str, Callable[[int, float], nn.Module]] = {"layernorm": layer_norm, "rmsnorm": RMSNorm}


class ZeroInit:
    """Marks modules whose output projection starts at zero (adaLN-Zero); the model's init calls zero_(),
    which zeroes ``self.linear``, the output projection of each such module."""

    def zero_(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


class OwnInit:
    """Marks modules that initialise their own weights; the model's init calls init_weights() after its
    generic pass (xavier Linears, zero biases) and before zero_(), in module order."""

    def init_weights(self) -> None:
        raise NotImplementedError


def normal_linears_(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) weights for every Linear inside ``module`` (biases kept), in module order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)


@dataclass
class Mod:
    """One sublayer's modulation; shift, scale, gate are (B, 1, d)."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale) + self.shift

    def post(self, y: torch.Tensor) -> torch.Tensor:
        return self.gate * y


class _Identity:
    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def post(self, y: torch.Tensor) -> torch.Tensor:
        return y


IDENTITY = _Identity()


def _six(m: torch.Tensor) -> tuple[Mod, Mod]:
    """(B, 6, d) -> (attention Mod, MLP Mod) in the order shift, scale, gate."""
    s = m[:, :, None, :].unbind(1)
    return Mod(s[0], s[1], s[2]), Mod(s[3], s[4], s[5])


# ------------------------------------------------------------------ per-block modulation


class AdaLNZeroBlock(nn.Module, ZeroInit):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, cond: torch.Tensor) -> tuple[Mod, Mod]:
        return _six(self.linear(cond).unflatten(-1, (6, -1)))


class AdaLNSingleBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, cond: torch.Tensor) -> tuple[Mod, Mod]:
        return _six(cond + self.table)


class NoBlockModulation(nn.Module):
    def __init__(self, dim: int):
        super().__init__()

    def forward(self, cond: None) -> tuple[_Identity, _Identity]:
        return IDENTITY, IDENTITY


# ------------------------------------------------------------------ final layers (norm before proj_out)


class AdaLNFinal(nn.Module, ZeroInit):
    def __init__(self, dim: int, eps: float, norm: Callable[[int, float], nn.Module] = layer_norm):
        super().__init__()
        self.norm = norm(dim, eps)
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Scale before shift, unlike the blocks' modulation: the order of diffusers' AdaLayerNormContinuous,
        # the public FuseDiT code's final norm, whose weights then copy over unchanged (fusedit_official.py).
        scale, shift = self.linear(nn.functional.silu(c))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class TableFinal(nn.Module):
    """PixArt-alpha's final layer: a learned (2, d) shift/scale table plus the timestep embedding."""

    def __init__(self, dim: int, eps: float, norm: Callable[[int, float], nn.Module] = layer_norm):
        super().__init__()
        self.norm = norm(dim, eps)
        self.table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.table[None] + c[:, None]).unbind(1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class NormFinal(nn.Module):
    """Unmodulated: an affine RMSNorm whatever ``norm`` the modulated variants use."""

    def __init__(self, dim: int, eps: float, norm: Callable[[int, float], nn.Module] | None = None):
        super().__init__()
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return self.norm(x)


# ------------------------------------------------------------------ the variants


class NoTimestepEmbedder(nn.Module):
    """No timestep input: no parameters, and no conditioning vector."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, t: torch.Tensor) -> None:
        return None


class TimestepConditioning(nn.Module, OwnInit):
    """Base: owns the global timestep path; builds per-block modulators, block norms and the final layer."""

    embedder_cls: type[nn.Module] = TimestepEmbedder
    block_modulation: type[nn.Module] = NoBlockModulation
    final_cls: type[nn.Module] = NormFinal
    modulated = False

    def __init__(self, dim: int, adaln_norm: str = "layernorm"):
        super().__init__()
        self.embedder = self.embedder_cls(dim)
        self.modulated_norm = MODULATED_NORMS[adaln_norm]

    def init_weights(self) -> None:
        """DiT's N(0, 0.02) for the timestep MLP (and adaLN-single's global t_block)."""
        normal_linears_(self)

    def embed(self, t: torch.Tensor) -> torch.Tensor | None:
        """(B,) t in [0, 1] -> (B, d) conditioning vector (None: no timestep input)."""
        return self.embedder(t)

    def into_tokens(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return x

    def block_input(self, c: torch.Tensor | None):
        """What every block's modulator reads, computed once per forward."""
        return None

    def block_norm(self, dim: int, eps: float) -> nn.Module:
        return self.modulated_norm(dim, eps) if self.modulated else RMSNorm(dim, eps)

    def final_layer(self, dim: int, eps: float) -> nn.Module:
        """The norm before proj_out (modulated like the blocks' norms)."""
        return self.final_cls(dim, eps, self.modulated_norm)


class AdaLNZero(TimestepConditioning):
    block_modulation = AdaLNZeroBlock
    final_cls = AdaLNFinal
    modulated = True

    def block_input(self, c: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(c)


class AdaLNSingle(TimestepConditioning):
    block_modulation = AdaLNSingleBlock
    final_cls = TableFinal
    modulated = True

    def __init__(self, dim: int, adaln_norm: str = "layernorm"):
        super().__init__(dim, adaln_norm)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def block_input(self, c: torch.Tensor) -> torch.Tensor:
        return self.t_block(c).unflatten(-1, (6, -1))


class Addition(TimestepConditioning):
    def into_tokens(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x + c[:, None]


class NoTimestep(TimestepConditioning):
    embedder_cls = NoTimestepEmbedder  # no timestep parameters at all


# model.timestep_conditioning -> the variant, built from (dim, adaln_norm=...); fusedit.models.
# register_timestep_conditioning adds one.
TIMESTEP_CONDITIONING: dict[str, type[TimestepConditioning]] = {
    "adaln-zero": AdaLNZero,
    "adaln-single": AdaLNSingle,
    "addition": Addition,
    "none": NoTimestep,
}
