"""Prompts -> tokens -> the frozen LLM's forward -> a TextContext (design-space.md s.1 and s.2).

The text stream of deep fusion is exactly the LLM's own causal forward on the prompt: it never sees the
image or the timestep. So it runs once per prompt batch, under no_grad when the LLM is frozen, and the
per-layer keys/values are read off its hidden states with the layer's own modules:

    K_i = RoPE(k_norm(k_proj(input_layernorm(h_i))))    V_i = v_proj(input_layernorm(h_i))

where h_i is the input of LLM layer i. Nothing of the LLM is kept for backward. The shallow designs read
one hidden state instead, and the deep cross variant the keys before RoPE.

When the LLM has trainable weights (joint fine-tuning, fusedit.train.stages) the same single forward per
prompt batch records autograd instead, from the lowest trainable layer up (layers below it have no
trainable input). The text rows still never see the image, so the LLM's gradient reaches it only through
what the denoiser reads: the image queries' attention to these K/V ("gradient-masked" attention,
design-space.md s.1), or the shallow designs' hidden state. Sampling runs under no_grad, so the context is
computed once and cached there as for a frozen LLM.
"""

from __future__ import annotations

import torch
from torch import nn

from fusedit.config import ConfigError, llm_head_dim
from fusedit.devices import host_to_device
from fusedit.layers.rope import rotate_half
from fusedit.text.context import PromptCut, TextContext, TextRequest
from fusedit.text.spec import SUPPORTED_LLMS, unsupported_llm
from fusedit.text.templates import Template

# What _layer_kv reads of a decoder layer: the rest of the deepest K/V layer (its queries, attention output
# and MLP) computes nothing the denoiser reads.
KV_MODULES = ("input_layernorm", "self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm")


def _keys(attn: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, d) normed layer input -> pre-RoPE keys (B, T, KVH, head_dim)."""
    return attn.k_proj(x).unflatten(-1, (-1, head_dim))


def _normed_keys(attn: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Qwen3's keys: normalised per head (``k_norm``) before RoPE."""
    return attn.k_norm(_keys(attn, x, head_dim))


def layer_keys(layer: nn.Module):
    """How an HF decoder layer makes its keys (``_keys`` or ``_normed_keys``): read off its modules once,
    when the TextEncoder is built, not on every forward."""
    return _keys if getattr(layer.self_attn, "k_norm", None) is None else _normed_keys


def _layer_kv(layer: nn.Module, keys, h: torch.Tensor, head_dim: int):
    """(B, T, d) input of an HF decoder layer -> its pre-RoPE keys and its values, (B, KVH, T, head_dim).
    ``keys``: the layer's ``layer_keys``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = keys(attn, x, head_dim)
    v = attn.v_proj(x).unflatten(-1, (-1, head_dim)).transpose(1, 2)
    return k.transpose(1, 2), v


def refuse_unreadable_kv(llm: nn.Module) -> None:
    """Refuse an LLM whose first layer's keys/values ``_read_kv`` cannot read at all (OLMo-2's post-norms:
    no input_layernorm; StableLM's partial rotary, whose cos/sin do not span head_dim). Shapes alone tell,
    so ``llm`` may be built on the meta device (check_llm: one layer, no weights, before a run makes its
    folder); the refusal is TextEncoder.check_kv's. Keys that can be read but differ from the LLM's own
    (Cohere's pairwise RoPE, HunYuan's key norm after RoPE) are told by their values: check_kv, at the build."""
    weight = next(llm.parameters())
    # (1, 8, d): the input of layer 0, in the weights' dtype (a kernel check builds it in text.dtype).
    h = torch.zeros(1, 8, llm.config.hidden_size, device=weight.device, dtype=weight.dtype)
    try:
        # Only the width of cos/sin matters here (rotate-half over 2 * len(inv_freq)); calling rotary_emb on
        # the meta device fails for a dynamic RoPE, which reads its longest position with .item().
        cos = sin = torch.zeros(1, 8, 2 * llm.rotary_emb.inv_freq.shape[-1], device=h.device, dtype=h.dtype)
        layer = llm.layers[0]
        k, _ = _layer_kv(layer, layer_keys(layer), h, llm_head_dim(llm.config))
        _rope(k, cos, sin)
    except (AttributeError, RuntimeError, ValueError) as e:
        raise _unreadable(llm.config.model_type, e) from None


def _unreadable(model_type: str, error: Exception) -> ConfigError:
    first = (str(error).splitlines() or [type(error).__name__])[0]
    return _refused(model_type, f"its layers' keys/values cannot be read: {first}")


def _refused(model_type: str, reason: str) -> ConfigError:
    """Deep fusion's one-line refusal of an LLM family whose K/V it cannot read as the LLM makes them."""
    return unsupported_llm(
        model_type,
        reason,
        " by deep fusion",
        f"the shallow designs dit-self/dit-cross read only its hidden states; {SUPPORTED_LLMS}",
    )


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def _rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The LLM's own rotation (rotate-half layout); cos, sin (B, T, head_dim) from its rotary_emb.

    Not ``Rotary.apply``: that one computes in float32, this one in the LLM's dtype as transformers does,
    so the keys equal those inside the LLM's own attention."""
    return (k * cos[:, None] + rotate_half(k) * sin[:, None]).to(k.dtype)


def _read_kv(encoder: TextEncoder, hidden: tuple[torch.Tensor, ...], request: TextRequest):
    """``request``'s K/V read off the LLM's ``hidden`` states (h_i the input of layer i): the post-RoPE
    (kv_layers) and the pre-RoPE (raw_kv_layers) pairs, each (B, KVH, T, head_dim).

    One function, so that it compiles as one graph (TextEncoder.compile_kv): run eagerly, each layer's norm,
    projections and rotation are about 16 small kernels after the LLM's forward, ~290 for Gemma-2B's 18."""
    kv = []
    if request.kv_layers:  # not the shallow designs' (hidden states only, from any RoPE scheme)
        positions = torch.arange(hidden[0].shape[1], device=hidden[0].device)[None]
        cos, sin = encoder.llm.rotary_emb(hidden[0], positions)
        for i in request.kv_layers:
            k, v = encoder.layer_kv(i, hidden[i])
            kv.append((_rope(k, cos, sin), v))
    raw_kv = [encoder.layer_kv(i, hidden[i]) for i in request.raw_kv_layers]
    return kv, raw_kv


# text.trim_multiple's "auto" on a GPU. Compiled DiT blocks get one graph per text length, so few lengths
# must occur (prompts of up to 256 tokens give 2); and with the image tokens (256, 1024, 4096: multiples of
# 128) the keys stay a multiple of 128, the lengths cuDNN's attention kernels are tiled for, away from
# lengths where masked cuDNN attention has failed (pytorch/pytorch#196678: NaN dq at S % 128 == 64 on
# H100/H200 in torch 2.11). (LI-DiT's channel concatenation of an LLM with a BOS and one without reads one
# token more, 129 or 257: its leading slot; the multiple is kept for each LLM's own attention.)
CUDA_TRIM_MULTIPLE = 128


class TextEncoder(nn.Module):
    """Holds the LLM, its tokenizer and prompt template; ``encode(prompts, request)`` gives the TextContext."""

    def __init__(
        self,
        llm: nn.Module,
        tokenizer,
        max_length: int,
        template: Template | None = None,
        trim_padding: bool = True,
        trim_multiple: int | None = None,
    ):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.prompt_limit = max_length  # text.max_length
        self.max_length = max_length  # the padded width: text.max_length + the template's tokens, below
        self.template = template or Template("", "")
        self.trim_padding = trim_padding
        self.trim_multiple = trim_multiple  # None = auto, see trim_multiple_on
        self.head_dim = llm_head_dim(llm.config)
        self.layer_keys = tuple(layer_keys(layer) for layer in llm.layers)  # _layer_kv's, per layer
        self.read_kv = _read_kv  # or its compiled form: compile_kv
        self.setting = "text.max_length"  # the config key of the limit, for messages (TextToImage names it)
        # The tokenizer's own leading specials (BOS) every row opens with, set below; a shape-only build
        # counts none (so its FLOP counts leave out the slot a channel concatenation of LLMs with and
        # without a BOS adds, as its widths leave the template out).
        self.leading = 0
        if tokenizer is None:  # shape-only (meta) builds never tokenise
            return
        t = self.template
        # The spaces ending a prefix ("Imagine: ") open the prompt instead: tokenised apart they would be a
        # lone space token and the prompt's first word would lose its leading-space form, whereas the text
        # the LLM was trained on (and the public code, which tokenises instruction + caption as one string)
        # has "▁a" / "Ġa" there. Cut at the space, the two pieces tokenise as the whole string does.
        prefix = t.prefix.rstrip(" ")
        self.prompt_lead = t.prefix[len(prefix) :]
        # Only the special tokens a tokenizer puts before any text (BOS) open the sequence: one that also
        # appends an EOS would put it between the template and the prompt (or in an empty prompt's row).
        probe = "a"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe)["input_ids"]
        lead = next((full[:j] for j in range(len(full)) if full[j : j + len(plain)] == plain), [])
        body = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        self.prefix_ids = ([] if t.rendered else lead) + body
        self.suffix_ids = tokenizer(t.suffix, add_special_tokens=False)["input_ids"] if t.suffix else []
        # Template tokens the refiners may read but the DiT should not. The DiT keeps only what the tokenizer
        # itself puts before any text (BOS; nothing for Qwen's), the tokens an empty prompt is made of.
        # Everything else is instruction, like the suffix: chat markers a tokenizer registers as special
        # (Qwen's <|im_start|>, Gemma-it's <start_of_turn>), which the DiT would otherwise see before the
        # prompt but not after it, and an <unk> standing for an instruction word the vocabulary lacks.
        keep = 0
        while keep < min(len(lead), len(self.prefix_ids)) and self.prefix_ids[keep] == lead[keep]:
            keep += 1
        # Every row opens with these: a templated one's prefix, and an empty prompt's ``empty_ids`` (the
        # tokenizer's leading specials), so the count is the encoder's, fixed for every batch
        # (TextContext.leading).
        self.leading = keep
        instruction = [j >= keep for j in range(len(self.prefix_ids))]
        self.register_buffer(
            "prefix_instruction", torch.tensor(instruction, dtype=torch.bool), persistent=False
        )
        # text.max_length counts the prompt and the tokenizer's own special tokens (BOS); the template's
        # tokens come on top, as in the public code (max prompt length + instruction length), so a long
        # template does not eat into the prompt.
        self.budget = max_length - self.leading
        if self.budget < 1:
            raise ConfigError(
                f"text.max_length={max_length} leaves no room for the prompt after the tokenizer's "
                f"{max_length - self.budget} special token(s) (allowed: more than that)"
            )
        self.max_length = max_length + sum(instruction) + len(self.suffix_ids)
        # An empty prompt (a dropped caption, the empty negative prompt) is the unconditional input: the
        # tokenizer's own encoding of "" (BOS), without the template, as the public code drops it (design-
        # space.md s.3: caption dropout to ""). A tokenizer that adds no BOS (Qwen's) would give zero tokens,
        # which no LLM runs on: then it is the end-of-text token, the same in training and sampling.
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        self.empty_ids = lead or [end]
        self.vocab_rows = llm.get_input_embeddings().num_embeddings

    @property
    def trainable(self) -> bool:
        """Whether any LLM weight (or LoRA adapter) trains: set once per stage by train.stages.apply_parts."""
        return any(p.requires_grad for p in self.llm.parameters())

    def read_modules(self, request: TextRequest) -> list[tuple[int, nn.Module]]:
        """The LLM modules whose weights reach what ``request`` reads, bottom up, each with its position
        (-1 the embeddings, i decoder layer i, len(layers) the final norm): what joint fine-tuning trains.

        The text stream never sees the image (design-space.md s.1), so nothing else of the LLM can get a
        gradient: the deepest K/V layer's queries, attention output and MLP, the layer past a read hidden
        state (run only so that the hidden state is that block's raw output), and the final norm unless the
        last hidden state is read."""
        llm, hidden = self.llm, request.hidden_layer
        n, kv = len(llm.layers), [*request.kv_layers, *request.raw_kv_layers]
        depth = max(hidden or 0, max(kv, default=0))  # the layers below this one are read whole
        out = [(-1, llm.get_input_embeddings()), *((i, llm.layers[i]) for i in range(min(depth, n)))]
        if kv and max(kv) == depth:
            layer = llm.layers[depth]
            out += [(depth, layer.get_submodule(m)) for m in KV_MODULES if _has_submodule(layer, m)]
        if hidden == n:
            out.append((n, llm.norm))
        return out

    @property
    def limit_named(self) -> str:
        """The prompt limit as messages name it: "text.max_length=256" (the template's tokens come on top)."""
        return f"{self.setting}={self.prompt_limit}"

    def tokenize(self, prompts: list[str], device: torch.device | str = "cpu"):
        """Right-padded ids and bool mask, (B, max_length): template prefix, prompt, template suffix.

        Prompts longer than text.max_length (with the tokenizer's special tokens; the template's come on top)
        are cut to it (``encode`` says which). An empty prompt is ``empty_ids``, without the template."""
        ids, mask = self._pad(self._bodies(prompts))
        return host_to_device(ids, device), host_to_device(mask, device)

    def _bodies(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's own token ids, uncut (an empty prompt's: none)."""
        if isinstance(prompts, str):
            raise TypeError("tokenize takes a list of prompts, not a single string")
        texts = [self.prompt_lead + p if p else p for p in prompts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _pad(self, bodies: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokenize``'s ids and mask, on the host, of the prompts' token ids ``bodies``."""
        pad = self.tokenizer.pad_token_id
        out = torch.full((len(bodies), self.max_length), pad, dtype=torch.long)
        mask = torch.zeros((len(bodies), self.max_length), dtype=torch.bool)
        for i, body in enumerate(bodies):
            seq = self.prefix_ids + body[: self.budget] + self.suffix_ids if body else self.empty_ids
            out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = True
        if int(out.max()) >= self.vocab_rows:
            raise ConfigError(
                f"the tokenizer gives token ids up to {int(out.max())} (padding: {pad}) but the LLM has "
                f"{self.vocab_rows} embeddings: it is not this LLM's tokenizer (check text.tokenizer)"
            )
        return out, mask

    def instruction_mask(self, lengths: torch.Tensor, length: int) -> torch.Tensor:
        """(B, T) bool: True on template tokens (prefix after any special tokens, and the suffix) of the rows
        that have them. An empty prompt's row (``empty_ids``, no template) is shorter than any templated
        one, which holds the template's tokens and at least one of the prompt's."""
        pos = torch.arange(length, device=lengths.device)[None]
        n = len(self.prefix_ids)
        prefix = torch.zeros(length, dtype=torch.bool, device=lengths.device)
        prefix[: min(n, length)] = self.prefix_instruction[:length].to(lengths.device)
        suffix = (pos >= (lengths - len(self.suffix_ids))[:, None]) & (pos < lengths[:, None])
        templated = lengths > n + len(self.suffix_ids)
        return (prefix[None] | suffix) & templated[:, None]

    def trim_multiple_on(self, device: torch.device) -> int:
        """text.trim_multiple, with "auto" (None) resolved for ``device``: CUDA_TRIM_MULTIPLE on a GPU, 1
        (the longest prompt exactly) elsewhere."""
        return self.trim_multiple or (CUDA_TRIM_MULTIPLE if device.type == "cuda" else 1)

    def trimmed_length(self, longest: int, width: int, device: torch.device) -> int:
        """The text length a batch of padded ``width`` whose longest prompt has ``longest`` tokens is cut to."""
        if not self.trim_padding:
            return width
        multiple = self.trim_multiple_on(device)
        return min(width, -(-longest // multiple) * multiple)

    def text_lengths(self, device: torch.device) -> int:
        """How many text lengths a tokenized batch (padded to max_length) can be cut to on ``device``."""
        return len({self.trimmed_length(n, self.max_length, device) for n in range(1, self.max_length + 1)})

    def layer_kv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) input of LLM layer ``i`` -> its pre-RoPE keys and its values, (B, KVH, T, head_dim)."""
        return _layer_kv(self.llm.layers[i], self.layer_keys[i], h, self.head_dim)

    def compile_kv(self, settings: dict | None) -> None:
        """torch.compile the K/V read (``_read_kv``) with ``settings`` (fusedit.compiling.compile_settings of
        a compile setting); None runs it eagerly again. TextToImage.compile_parts calls it with the LLM's own
        compile (training).

        Automatic dynamic shapes (dynamic=None), as the LLM: the batch and the trimmed text width change
        between prompt batches, and the read runs once per batch, so a graph that serves every shape (the
        first shape's static graph, then one with the changed sizes symbolic) beats one compile per shape,
        which a sampling server with any prompt count would pay again and again until the recompile limit
        sent it back to eager. Its few graphs (per autograd state and LLM, plus torch's own for sizes 0 and
        1) fit under compile_parts' limit."""
        self.read_kv = _read_kv if settings is None else torch.compile(_read_kv, dynamic=None, **settings)

    @torch.no_grad()
    def check_kv(self, request: TextRequest) -> None:
        """Refuse an LLM whose attention makes its keys/values otherwise than ``_layer_kv`` and ``_rope`` do.

        load_llm accepts any decoder with q/k/v/o projections, and the shallow designs read only its hidden
        states, which transformers computes. Deep fusion reads K/V off the layers itself, assuming the LLaMA
        layout; families that load fine but differ (Cohere's and Helium's interleaved RoPE, HunYuan's key
        norm after RoPE) would otherwise give the DiT other keys than the LLM's attention uses, silently. One
        eager forward of 8 tokens (positions past 0, where RoPE layouts differ) compares the K/V of
        ``request``'s layers with the LLM's own cache. Called once, when build_model builds the model, so that
        ``forward`` holds no check: the LLM's call and its K/V read (``compile_kv``), each compiled on its
        own. (A diffusers pipeline assembled by hand around another LLM is not checked: FuseDiTPipeline wraps
        its components anew at each call.)"""
        layers = (*request.kv_layers, *request.raw_kv_layers)
        device = next(self.llm.parameters()).device
        if not layers or device.type == "meta":
            return
        rows = self.llm.get_input_embeddings().num_embeddings
        ids = (torch.arange(1, 9, device=device) % rows)[None]  # (1, 8)
        mask = torch.ones_like(ids)
        out = self.llm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
        # OLMo-2's post-norms (no input_layernorm) or StableLM's partial rotary fail to be read at all.
        try:  # every read layer's keys with RoPE, as the LLM's cache holds them
            ours, _ = _read_kv(self, out.hidden_states, TextRequest(kv_layers=layers))
        except (AttributeError, RuntimeError, ValueError) as e:
            raise _unreadable(self.llm.config.model_type, e) from None
        # transformers 5.24 names it `cache` (and warns on `past_key_values`); earlier ones `past_key_values`.
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for i, kv in zip(layers, ours, strict=True):
            layer = cache.layers[i] if hasattr(cache, "layers") else None  # transformers < 4.56: key_cache
            theirs = (
                (layer.keys, layer.values)
                if layer is not None
                else (cache.key_cache[i], cache.value_cache[i])
            )
            n = theirs[0].shape[2]  # a sliding-window layer caches only its window
            # Same modules in the same dtype: equal up to rounding (1% of the largest entry).
            if not all(
                a.shape[:2] == b.shape[:2] and (a[:, :, -n:] - b).abs().max() <= 1e-2 * b.abs().max()
                for a, b in zip(kv, theirs, strict=True)
            ):
                raise _refused(
                    self.llm.config.model_type,
                    f"layer {i}'s keys/values differ from those its attention uses",
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        request: TextRequest,
        extent: tuple[int, int] | None = None,
    ) -> TextContext:
        """input_ids, mask (B, T) -> TextContext with ``request``'s layers. One LLM forward. ``extent``: the
        shortest and longest row's length, when the caller has them on the host (``encode``); else they are
        read from the device, one host sync (per prompt batch, not per sampling step)."""
        lengths = mask.sum(1)
        # For both the trim and the padding flag.
        shortest, longest = extent or torch.stack([lengths.min(), lengths.max()]).tolist()
        keep = self.trimmed_length(longest, input_ids.shape[1], input_ids.device)
        input_ids, mask = input_ids[:, :keep], mask[:, :keep]
        # The grad path: autograd only for a trainable LLM in a grad-enabled caller (a training step).
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.llm(
                input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=False
            )
            hidden = out.hidden_states  # (embeddings, output of layer 0, ...); h_i is the input of layer i
            kv, raw_kv = self.read_kv(self, hidden, request)
            chosen = hidden[request.hidden_layer] if request.hidden_layer is not None else None
        return TextContext(
            mask=mask,
            lengths=lengths,
            kv=kv,
            raw_kv=raw_kv,
            hidden=chosen,
            instruction=self.instruction_mask(lengths, mask.shape[1]),
            leading=self.leading,
            padded=shortest < mask.shape[1],
        )

    def encode(self, prompts: list[str], request: TextRequest, device=None) -> TextContext:
        """The TextContext of ``prompts`` for ``request``; its ``cut`` holds the rows cut to the limit (``setting``)."""
        device = device or next(self.llm.parameters()).device
        bodies = self._bodies(prompts)
        ids, mask = self._pad(bodies)
        lengths = mask.sum(1).tolist()  # on the host, where the batch is made: no wait for the device
        extent = (min(lengths), max(lengths))
        context = self(host_to_device(ids, device), host_to_device(mask, device), request, extent)
        cut = [i for i, body in enumerate(bodies) if len(body) > self.budget]
        context.cut = PromptCut.of([(self.limit_named, cut)])
        return context
