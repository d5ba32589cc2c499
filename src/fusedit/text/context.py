"""What the text side hands the denoiser: computed once per prompt batch, read at every step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from fusedit.devices import host_to_device


@dataclass(frozen=True)
class TextRequest:
    """What a design needs from the LLM, fixed when the design is built."""

    # LLM layers whose post-RoPE attention keys/values the DiT layers read (deep fusion).
    kv_layers: tuple[int, ...] = ()
    # LLM layers whose pre-RoPE keys/values the DiT cross-attends to (the deep-fusion cross variant).
    raw_kv_layers: tuple[int, ...] = ()
    # One hidden state, as an absolute index into the full LLM's `hidden_states` (0 = embeddings, i = output
    # of block i, num_layers = the last block's output after the final norm); None when unused.
    hidden_layer: int | None = None

    @property
    def reads_kv(self) -> bool:
        """Whether any layer's keys/values are read (deep fusion), not only a hidden state."""
        return bool(self.kv_layers or self.raw_kv_layers)

    def layers_needed(self, num_layers: int) -> int:
        """How many leading LLM layers must run: the LLM is truncated after that.

        transformers applies the final norm to the last entry of `hidden_states`, so an inner block's raw
        output needs one layer past it to stay un-normalised."""
        needed = [i + 1 for i in (*self.kv_layers, *self.raw_kv_layers)]
        if self.hidden_layer is not None:
            needed.append(num_layers if self.hidden_layer == num_layers else self.hidden_layer + 1)
        return max(needed, default=0)


@dataclass(frozen=True)
class PromptCut:
    """The rows of an encoded prompt batch that a text encoder cut to its limit (text.max_length, an
    extra_text's or pooled_text's), each once however many encoders cut it. The first ``negatives`` rows are
    guidance's negative prompt (one per image: TextToImage.encode_prompts), the prompts follow. Whoever
    counts cut prompts (a training run, a sampling call) counts these: the encoders keep no count."""

    rows: frozenset[int] = frozenset()
    negatives: int = 0
    # Which encoder cut which of ``rows``: (its limit as messages name it, limit_named, e.g.
    # "extra_text.0.max_length=8"; the rows it cut), in encoder order, only encoders that cut any. With
    # several LLMs, the messages then name the limit to raise, not every limit of the model.
    by_limit: tuple[tuple[str, frozenset[int]], ...] = ()

    @classmethod
    def of(cls, by_limit: Iterable[tuple[str, Iterable[int]]], negatives: int = 0) -> PromptCut:
        """The cut of encoders that cut the rows given with each one's limit (limit_named)."""
        by = tuple((name, frozenset(rows)) for name, rows in by_limit if rows)
        return cls(frozenset().union(*(rows for _, rows in by)), negatives, by)

    @property
    def limits(self) -> list[str]:
        """The limits (limit_named) of the encoders that cut any row, in encoder order."""
        return [name for name, _ in self.by_limit]

    def taken(self, index: Sequence[int], negatives: int) -> PromptCut:
        """The cut of the rows where row i is row ``index[i]`` of these (TextContext.take)."""
        pairs = [(name, [i for i, j in enumerate(index) if j in rows]) for name, rows in self.by_limit]
        return PromptCut.of(pairs, negatives)

    @property
    def prompts(self) -> frozenset[int]:
        """The prompts cut, as indices among the prompts (the rows after the negative prompt's)."""
        return frozenset(row - self.negatives for row in self.rows if row >= self.negatives)

    @property
    def negative(self) -> bool:
        """Whether the negative prompt was cut."""
        return any(row < self.negatives for row in self.rows)


@dataclass
class TextContext:
    """A prompt batch as the denoiser sees it. T is the (possibly trimmed) padded text length.

    mask:    (B, T) bool, True on real tokens (right padding).
    lengths: (B,) long, unpadded lengths.
    kv:      per requested layer, (keys, values), each (B, KVH, T, head_dim); keys carry the LLM's RoPE.
    raw_kv:  the same without RoPE on the keys (``raw_kv_layers``).
    hidden:  (B, T, d_llm), the requested hidden state, or None.
    instruction: (B, T) bool, True on template tokens (dropped after LI-DiT's refiners), or None.
    leading: how many of every row's first tokens the tokenizer itself puts before any text (BOS: 1 for
             Gemma's, 0 for Qwen2's), never instruction. A count fixed by the tokenizer and template rather
             than a mask: LI-DiT's channel concatenation sizes its output by it without a host sync.
    pooled:  (B, P) pooled embedding of a second encoder (FuseDiT clip-mod), or None.
    others:  contexts of the further LLMs of a multi-LLM model (LI-DiT), same prompts, in config order.
    padded:  whether any row has padding; when False the denoiser needs no attention mask at all.
    cut:     the rows cut to the encoder's limit (TextEncoder.encode); TextToImage.encode_prompts puts
             those of all its encoders on the first context, with the negative prompt's rows told apart.
    """

    mask: torch.Tensor
    lengths: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    raw_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    instruction: torch.Tensor | None = None
    leading: int = 0
    pooled: torch.Tensor | None = None
    others: list[TextContext] = field(default_factory=list)
    padded: bool = True
    cut: PromptCut = PromptCut()

    @property
    def all(self) -> list[TextContext]:
        """This LLM's context followed by the further LLMs' (one per LLM)."""
        return [self, *self.others]

    @property
    def real_tokens(self) -> torch.Tensor:
        """(B,) real tokens of every LLM together: image positions continue after them."""
        total = self.lengths
        for other in self.others:
            total = total + other.lengths
        return total

    @property
    def key_mask(self) -> torch.Tensor | None:
        return self.mask if self.padded else None

    def take(self, index: Sequence[int]) -> TextContext:
        """The context whose row i is row ``index[i]`` of this one (B rows; indexes 0..B-1 in any order,
        repeats allowed), every LLM's alike. TextToImage.encode_prompts(distinct=True) encodes each distinct
        prompt once and takes its rows back to the batch's: since the text stream never sees the image
        (design-space.md s.1), a row's context depends on its own text alone, so that is the batch's own.

        With B' = len(index): mask and instruction (B', T), lengths (B',), each kv and raw_kv pair's keys and
        values (B', KVH, T, head_dim), hidden (B', T, d_llm), pooled (B', P); T and ``leading`` stay. ``padded``
        is the taken rows' own (read from the device only when rows are left out of a padded context); ``cut``
        holds the new rows taken from cut ones, and as negatives the new rows taken from negatives, which
        must lead as they do here."""
        index, rows = list(index), len(self.lengths)
        bad = next((j for j in index if not 0 <= j < rows), None)
        if bad is not None:
            raise IndexError(f"take index {bad} is out of range for {rows} rows (allowed: 0..{rows - 1})")
        negatives = sum(j < self.cut.negatives for j in index)
        if any(j >= self.cut.negatives for j in index[:negatives]):
            raise ValueError(
                f"take index {index} puts a prompt's row before a negative prompt's (allowed: the rows taken "
                f"from the first {self.cut.negatives}, the negative prompt's, before any other)"
            )
        at = host_to_device(torch.tensor(index, dtype=torch.long), self.mask.device)
        lengths = self.lengths[at]
        padded = self.padded
        if padded and set(index) != set(range(rows)):
            padded = bool((lengths < self.mask.shape[1]).any())
        return TextContext(
            mask=self.mask[at],
            lengths=lengths,
            kv=[(k[at], v[at]) for k, v in self.kv],
            raw_kv=[(k[at], v[at]) for k, v in self.raw_kv],
            hidden=self.hidden[at] if self.hidden is not None else None,
            instruction=self.instruction[at] if self.instruction is not None else None,
            leading=self.leading,
            pooled=self.pooled[at] if self.pooled is not None else None,
            others=[other.take(index) for other in self.others],
            padded=padded,
            cut=self.cut.taken(index, negatives),
        )
