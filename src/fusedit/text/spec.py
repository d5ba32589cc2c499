"""The few numbers of an LLM's architecture that a DiT mirrors (design-space.md s.1)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from fusedit.config import ConfigError, llm_head_dim

# What the text stream needs of an LLM: a LLaMA-style decoder config, and layers with separate q/k/v/o
# projections (fusedit reads each layer's K/V itself, text/encoder.py).
SUPPORTED_LLMS = (
    "allowed: LLaMA-style decoder-only LLMs with separate q/k/v projections, e.g. Gemma, Gemma-2, "
    "Qwen2/2.5/3, Llama, Mistral"
)


def unsupported_llm(model_type: str, reason: str, by: str = "", allowed: str = SUPPORTED_LLMS) -> ConfigError:
    """The one-line refusal of an LLM family: ``reason`` says what it lacks, ``by`` which part refuses it."""
    return ConfigError(f"an LLM of model_type {model_type!r} is not supported{by}: {reason} ({allowed})")


@dataclass(frozen=True)
class LLMSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    rms_norm_eps: float
    rope_theta: float
    model_type: str
    # The LLM's RoPE inverse frequencies (head_dim / 2) when its rope_type rescales them (Llama-3.1's
    # llama3, linear, yarn, ...); None = the default ladder of rope_theta. Image rotations use the same
    # ladder so that they continue the text keys' (layers/rope.py). An attention factor (yarn, longrope)
    # scales only the text keys' logits: a constant the DiT's own projections adapt to.
    rope_freqs: tuple[float, ...] | None = None

    @classmethod
    def from_hf(cls, config, deep: bool = True) -> LLMSpec:
        """From a transformers PretrainedConfig (4.x and 5.x spellings of RoPE settings and activation).
        ``deep``: the design reads the LLM's K/V, so its image queries must rotate as the LLM's keys do (a
        RoPE per layer type is refused); a shallow design reads hidden states only and takes the
        full-attention layers' RoPE for its own positions."""
        missing = [
            k
            for k in ("num_hidden_layers", "num_attention_heads", "intermediate_size")
            if not hasattr(config, k)
        ]
        if missing or not (hasattr(config, "hidden_act") or hasattr(config, "hidden_activation")):
            raise unsupported_llm(config.model_type, f"its config has no {(missing or ['hidden_act'])[0]}")
        rope = _rope_settings(config, deep)
        theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        freqs = None
        if rope_type != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            # A per-layer-type config (a shallow design over Gemma-3) keeps its settings per layer type: the
            # full-attention layers' are read as _rope_settings chose them.
            per_type = any(
                isinstance(v, dict) for v in (getattr(config, "rope_parameters", None) or {}).values()
            )
            where = {"layer_type": "full_attention"} if per_type else {}
            freqs = tuple(ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **where)[0].tolist())
        activation = _activation(config)
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=llm_head_dim(config),
            intermediate_size=config.intermediate_size,
            activation=activation,
            rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            model_type=config.model_type,
            rope_freqs=freqs,
        )


def _activation(config) -> str:
    """The activation the LLM's MLP runs: ``hidden_activation`` for families whose config declares it
    (Gemma-2/3; Gemma-1 in transformers 4), else ``hidden_act``. An undeclared ``hidden_activation`` (a key
    carried into another family's config) is not read: the LLM ignores it."""
    cls = type(config)
    declared = any("hidden_activation" in getattr(c, "__annotations__", {}) for c in cls.__mro__)
    declared = declared or "hidden_activation" in inspect.signature(cls.__init__).parameters
    chosen = getattr(config, "hidden_activation", None) if declared else None
    return chosen or config.hidden_act


def _rope_settings(config, deep: bool = True) -> dict:
    """The LLM's RoPE settings as one dict: transformers 5's ``rope_parameters``, or 4.x's ``rope_scaling``
    (its ``rope_theta`` is an attribute of its own). A RoPE per layer type (Gemma-3's local and global
    layers) is refused for a ``deep`` design; otherwise its full-attention layers' settings are the LLM's."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # transformers 5 nests one dict per layer type; 4.x's Gemma-3 has a second base frequency instead.
    per_type = any(isinstance(v, dict) for v in params.values())
    if per_type or hasattr(config, "rope_local_base_freq"):
        if deep:
            raise unsupported_llm(
                config.model_type,
                "its layers rotate keys with a RoPE per layer type, which the DiT's image queries cannot "
                "mirror (the shallow designs read only its hidden states)",
                by=" by deep fusion",
            )
        if per_type:
            return params.get("full_attention") or next(v for v in params.values() if isinstance(v, dict))
    return params
