"""The few numbers of an LLM's architecture that a DiT mirrors (design-space.md s.1)."""

from __future__ import annotations

from dataclasses import dataclass


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

    @classmethod
    def from_hf(cls, config) -> LLMSpec:
        """From a transformers PretrainedConfig (4.x and 5.x spellings of rope_theta and activation)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        theta = theta or getattr(config, "rope_theta", None) or 10000.0
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        return cls(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            activation=activation,
            rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            model_type=config.model_type,
        )
