"""A second, pooled text embedding (FuseDiT's clip-mod study): a CLIP text model through transformers,
frozen, whose projected pooled output (CLIP's ``text_embeds``, as the public code reads it) is added to the
DiT's timestep embedding."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

from fusedit.config import ConfigError, PooledTextConfig, model_config
from fusedit.devices import host_to_device


class PooledTextEncoder(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, max_length: int, instruction: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        # text.instruction ("Imagine: "), before every non-empty prompt as the LLM reads it: the public
        # FuseDiT code tokenises instruction + caption for CLIP too, and a dropped caption "" stays "".
        # Unlike the LLM's template, it counts against max_length (CLIP's positions are fixed).
        self.instruction = instruction
        # The config key of the limit, for messages (as TextEncoder's).
        self.setting = "pooled_text.max_length"

    @property
    def prompt_limit(self) -> int:
        return self.max_length

    @property
    def limit_named(self) -> str:
        """The prompt limit as messages name it: the instruction's tokens count in it."""
        included = " (text.instruction included)" if self.instruction else ""
        return f"{self.setting}={self.prompt_limit}{included}"

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def cut_rows(self, prompts: list[str]) -> frozenset[int]:
        """The rows of ``prompts`` longer than max_length tokens, which ``forward`` cuts to it."""
        lengths = [len(ids) for ids in self.tokenizer(self._texts(prompts))["input_ids"]]
        return frozenset(i for i, n in enumerate(lengths) if n > self.max_length)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """(B,) prompts -> (B, projection_dim): the final (layer-normed) state of each prompt's last real
        token, through CLIP's text projection.

        For CLIP's own tokenizer that token is end-of-text, so this is exactly CLIP's ``text_embeds``; unlike
        CLIP's pooler it needs no particular end-of-text id, so any tokenizer works."""
        device = next(self.model.parameters()).device
        tok = self.tokenizer(
            self._texts(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        mask = host_to_device(tok["attention_mask"], device)
        ids = host_to_device(tok["input_ids"], device)
        hidden = self.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        return self.model.text_projection(hidden[torch.arange(hidden.shape[0], device=device), last])

    def _texts(self, prompts: list[str]) -> list[str]:
        return [self.instruction + p if p else p for p in prompts]


def _clip_text_config(place: str, named: str) -> CLIPTextConfig:
    """The text tower's config of the CLIP model at ``place`` (a folder or hub id; ``named`` as errors name
    it). Another kind of model is refused: transformers would load it with every weight random."""
    allowed = "a CLIP or CLIP text model, e.g. openai/clip-vit-large-patch14"
    config = model_config(place, named, allowed, kinds=("clip", "clip_text_model"))
    if config.model_type == "clip_text_model":
        return config
    # A whole CLIP's text projection (text_projection.weight) maps to its shared width, projection_dim;
    # text_config keeps its own default where the saved model did not set it.
    text = config.text_config
    text.projection_dim = config.projection_dim
    return text


def load_pooled_encoder(
    cfg: PooledTextConfig, device, builtin_tokenizer=None, shape_only: bool = False, instruction: str = ""
):
    """The CLIP text model of ``cfg.model_id``, or a random-init one from ``cfg.arch``; ``instruction``:
    text.instruction, which it reads before every non-empty prompt (PooledTextEncoder)."""
    if cfg.model_id and not shape_only:
        named = f"pooled_text.model_id={cfg.model_id!r}"
        # transformers loads another kind of model into a CLIP text model with a warning, every weight
        # random: the run would train on noise for a pooled embedding.
        config = _clip_text_config(cfg.model_id, named)
        try:
            model = CLIPTextModelWithProjection.from_pretrained(cfg.model_id, config=config)
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model_id)
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights of other shapes
            raise ConfigError(f"{named} cannot be loaded: {str(e).strip().splitlines()[0]}") from None
    else:
        model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg.arch))
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer) if cfg.tokenizer else builtin_tokenizer
    # The pooled token is the last real one at index mask.sum - 1, and CLIP was trained with its tokens
    # from position 0: both need padding on the right, whatever the tokenizer's own default. (A meta build
    # without a local tokenizer has none: it only counts parameters.)
    if tokenizer is not None:
        tokenizer.padding_side = "right"
    model = model.to(device) if str(device) != "meta" else model
    return PooledTextEncoder(model, tokenizer, cfg.max_length, instruction)
