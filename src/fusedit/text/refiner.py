"""LI-DiT's refiners (design-space.md s.2): trainable, timestep-aware, run at every denoising step over
LLM features that were computed once per prompt batch.

- Linguistic token refiner, one per LLM: Linear in-projection to the DiT width, then ``depth`` blocks of
  [bidirectional self-attention, MLP]; each sublayer's output is scaled by a gate computed from
  (masked-mean-pooled features + timestep embedding). The gates start at zero, so the refiner starts as
  the identity on the projected features. Ablations: ``causal`` keeps the LLM's causal mask, and
  ``gated=False`` adds every sublayer's output unscaled ("no gating").
- Collaborative refiner, for 2+ LLMs: one block with a branch per LLM; each branch's tokens cross-attend
  to the other branches' tokens (LayerNormed, as its own queries are), then an MLP, gated the same way.
- Then the instruction (template) tokens are dropped and the branches concatenated (``CONCATS``; the paper
  leaves the axis unknown): along the token axis (any lengths and tokenizers), or along the channel axis,
  the branches' kept tokens side by side aligned on the first prompt token, projected back to the DiT
  width.

Widths, heads, LayerNorm, MLP ratio 4 and masked mean pooling follow a public re-implementation where
the paper is silent.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.config import register_variant
from fusedit.layers.attention import attention, keep_keys
from fusedit.layers.modulation import ZeroInit
from fusedit.layers.pool import masked_mean


class Gates(nn.Module, ZeroInit):
    """Two per-channel gates (attention, MLP) from a conditioning vector; zero at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.linear(nn.functional.silu(c))[:, None]
        return g.chunk(2, dim=-1)


class NoGates(nn.Module):
    """The "no gating" ablation (design-space.md s.2): every sublayer's output is added unscaled."""

    def forward(self, c: torch.Tensor) -> tuple[float, float]:
        return 1.0, 1.0


class TokenAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.refiner_heads={heads} must divide the refiner width {dim}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, T, d) queries; context (B, S, d) keys/values; mask broadcastable to (B, 1, T, S) bool
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.kv(context).chunk(2, dim=-1))
        return self.out(attention(q, k, v, mask))


def _mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))


class RefinerBlock(nn.Module):
    """[self-attention, MLP], each gated by the conditioning vector (pre-norm, LayerNorm)."""

    def __init__(self, dim: int, heads: int, gated: bool):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _mlp(dim)
        self.gates = Gates(dim) if gated else NoGates()

    def keys(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return h  # self-attention: keys and values are the normed tokens themselves

    def forward(self, x, c, mask, context=None):
        """x (B, T, d), c (B, d), mask broadcastable to (B, 1, T, S); context (B, S, d) for cross-attention."""
        g_attn, g_mlp = self.gates(c)
        h = self.attn_norm(x)
        x = x + g_attn * self.attn(h, self.keys(h, context), mask)
        return x + g_mlp * self.mlp(self.mlp_norm(x))


class CrossRefinerBlock(RefinerBlock):
    """[cross-attention to another token sequence, MLP]: the collaborative refiner's branch. That sequence
    is another branch's residual stream, so it is LayerNormed like the queries before the K/V projection."""

    def __init__(self, dim: int, heads: int, gated: bool):
        super().__init__(dim, heads, gated)
        self.context_norm = nn.LayerNorm(dim, eps=1e-6)

    def keys(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self.context_norm(context)


def causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """The ``causal`` ablation's (design-space.md s.2): (B, T) key padding -> (B, 1, T, T) bool keep-mask,
    also no looking ahead, as in the LLM itself."""
    t = mask.shape[1]
    return keep_keys(mask) & torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()


class LinguisticRefiner(nn.Module):
    def __init__(self, llm_dim: int, dim: int, heads: int, depth: int, causal: bool, gated: bool):
        super().__init__()
        self.in_proj = nn.Linear(llm_dim, dim)
        self.blocks = nn.ModuleList(RefinerBlock(dim, heads, gated) for _ in range(depth))
        self.attention_mask = causal_mask if causal else keep_keys  # bidirectional over the real tokens

    def forward(self, features: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """features (B, T, d_llm), mask (B, T), temb (B, d) -> refined (B, T, d)."""
        x = self.in_proj(features.to(self.in_proj.weight.dtype))  # a bf16 LLM's features, fp32 weights
        c = masked_mean(x, mask)
        if temb is not None:  # the no-timestep variant gates from the pooled text alone
            c = c + temb
        attn_mask = self.attention_mask(mask)
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class CollaborativeRefiner(nn.Module):
    """One block, a branch per LLM; branch i attends to the concatenation of the other branches."""

    def __init__(self, dim: int, heads: int, branches: int, gated: bool):
        super().__init__()
        self.branches = nn.ModuleList(CrossRefinerBlock(dim, heads, gated) for _ in range(branches))

    def refine(
        self, xs: list[torch.Tensor], masks: list[torch.Tensor], temb: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The block, gated by the branches' mean masked-mean-pooled tokens (B, d) plus the timestep's."""
        c = torch.stack([masked_mean(x, m) for x, m in zip(xs, masks, strict=True)]).mean(0)
        return self(xs, masks, c if temb is None else c + temb)

    def forward(
        self, xs: list[torch.Tensor], masks: list[torch.Tensor], c: torch.Tensor
    ) -> list[torch.Tensor]:
        out = []
        for i, (branch, x) in enumerate(zip(self.branches, xs, strict=True)):
            context = torch.cat([xs[j] for j in range(len(xs)) if j != i], dim=1)
            keep = keep_keys(torch.cat([masks[j] for j in range(len(xs)) if j != i], dim=1))
            out.append(branch(x, c, keep, context))
        return out


class NoCollaboration(nn.Module):
    """One LLM, or model.collaborative_refiner off: the linguistic refiners' tokens go on unchanged."""

    def refine(
        self, xs: list[torch.Tensor], masks: list[torch.Tensor], temb: torch.Tensor | None
    ) -> list[torch.Tensor]:
        return xs


def drop_instruction_tokens(masks: list[torch.Tensor], texts) -> list[torch.Tensor]:
    """Each LLM's (B, T_i) keep-mask without its instruction (template) tokens: the refiners read them, the
    DiT does not (design-space.md s.2)."""
    return [m & ~t.instruction for m, t in zip(masks, texts, strict=True)]


def keep_all_tokens(masks: list[torch.Tensor], texts) -> list[torch.Tensor]:
    """The drop_instruction=False ablation: the DiT reads every real token, the template's included."""
    return masks


class TokenConcat(nn.Module):
    """The branches one after another along the token axis: (B, sum T_i, d)."""

    def __init__(self, dim: int, branches: int):
        super().__init__()

    @staticmethod
    def width(widths: list[int], leads: list[int] | None = None) -> int:
        """Tokens the DiT reads from branches of these widths (their leading counts change nothing here)."""
        return sum(widths)

    def forward(self, xs, masks, keeps, leads):
        # One branch after another needs no alignment (``leads``: ChannelConcat's).
        # A token's position counts the real tokens before it over the LLMs in config order (instruction
        # tokens included: the refiners read them), so no position depends on the batch's padding.
        return torch.cat(xs, dim=1), torch.cat(keeps, dim=1), torch.cat(masks, dim=1).cumsum(1) - 1


class ChannelConcat(nn.Module):
    """The branches side by side along the channel axis, projected back to the DiT width: (B, T', d).

    Aligned on the first prompt token: each branch's leading special tokens (BOS, TextContext.leading) fill
    a leading region as wide as the most any branch has, then every branch's other kept tokens follow in
    order from its end, zeros where a branch has fewer (T' = that width + max (T_i - leading_i)). So an
    LLM whose tokenizer adds a BOS (Gemma's) and one whose tokenizer adds none (Qwen2's) put their first
    prompt words side by side rather than one's BOS beside the other's first word; padding never shifts
    one branch against another, nor, with drop_instruction, templates of other lengths."""

    def __init__(self, dim: int, branches: int):
        super().__init__()
        self.proj = nn.Linear(branches * dim, dim)

    @staticmethod
    def width(widths: list[int], leads: list[int] | None = None) -> int:
        """Tokens the DiT reads from branches of these widths and leading counts (none by default)."""
        leads = leads or [0] * len(widths)
        return max(leads) + max(w - n for w, n in zip(widths, leads, strict=True))

    def forward(self, xs, masks, keeps, leads):
        lead = max(leads)
        width = self.width([x.shape[1] for x in xs], leads)  # static: no host sync to count the kept tokens
        packed, packed_keeps = [], []
        for x, keep, n in zip(xs, keeps, leads, strict=True):
            # Kept tokens first, in order (a stable sort of "dropped" flags); the rest zeroed. A row's first
            # n tokens are its leading specials, which no keep-mask drops: they stay the first n.
            order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
            x = torch.gather(torch.where(keep[..., None], x, 0.0), 1, order[..., None].expand_as(x))
            packed.append(_aligned(x, n, lead, width))
            packed_keeps.append(_aligned(torch.gather(keep, 1, order), n, lead, width))
        keep = torch.stack(packed_keeps).any(0)
        return self.proj(torch.cat(packed, dim=-1)), keep, keep.cumsum(1) - 1


def _aligned(packed: torch.Tensor, n: int, lead: int, width: int) -> torch.Tensor:
    """(B, T, ...) packed tokens -> (B, width, ...): the first ``n`` at 0.., the rest from ``lead`` on,
    zeros (False) between and after."""
    inner = [0, 0] * (packed.dim() - 2)  # no padding along the trailing (channel) dims
    if n == lead:  # the common case, LLMs with as many leading specials: one pad, no copy of the head
        return nn.functional.pad(packed, [*inner, 0, width - packed.shape[1]])
    rest = packed[:, n:]
    shift = [*inner, lead - n, width - lead - rest.shape[1]]
    return torch.cat([packed[:, :n], nn.functional.pad(rest, shift)], dim=1)


# model.refiner_concat: how the branches become the one sequence the DiT reads.
CONCATS: dict[str, type[nn.Module]] = {"tokens": TokenConcat, "channels": ChannelConcat}


def register_refiner_concat(name: str, cls: type[nn.Module]) -> None:
    """``model.refiner_concat=name`` joins the refined branches with ``cls(dim, branches)``, whose
    ``forward(xs, masks, keeps, leads)`` returns (context, keep-mask, positions) and whose static
    ``width(widths, leads)`` says how many tokens the DiT reads (as TokenConcat's and ChannelConcat's). A name
    already taken is a ConfigError."""
    register_variant("model.refiner_concat", name)
    CONCATS[name] = cls


class PromptRefiner(nn.Module):
    """LLM features of one or more LLMs -> one refined token sequence for the DiT to read."""

    def __init__(
        self,
        llm_dims: list[int],
        dim: int,
        heads: int,
        depth: int,
        *,
        causal: bool,
        gated: bool,
        collaborative: bool,
        drop_instruction: bool,
        concat: str,
    ):
        super().__init__()
        self.linguistic = nn.ModuleList(
            LinguisticRefiner(d, dim, heads, depth, causal, gated) for d in llm_dims
        )
        self.collaborative = (
            CollaborativeRefiner(dim, heads, len(llm_dims), gated)
            if collaborative and len(llm_dims) > 1
            else NoCollaboration()
        )
        self.kept_tokens = drop_instruction_tokens if drop_instruction else keep_all_tokens
        self.concat = CONCATS[concat](dim, len(llm_dims))

    def forward(self, texts, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """texts: one TextContext per LLM (hidden, mask, instruction, leading); temb (B, d).

        Returns the refined context (B, T', d), its keep-mask (B, T') and token positions (B, T'); T' is
        sum T_i for the token concatenation, ``ChannelConcat.width`` (max T_i when the LLMs' tokenizers
        put as many special tokens first) for the channel one."""
        xs = [ref(t.hidden, t.mask, temb) for ref, t in zip(self.linguistic, texts, strict=True)]
        masks = [t.mask for t in texts]
        xs = self.collaborative.refine(xs, masks, temb)
        return self.concat(xs, masks, self.kept_tokens(masks, texts), [t.leading for t in texts])
