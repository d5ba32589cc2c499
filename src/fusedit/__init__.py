"""fusedit: text-to-image diffusion transformers that use a large language model as their text encoder.

Covers the design space of FuseDiT (deep layer-by-layer fusion of a frozen decoder-only LLM with a DiT)
and LI-DiT. Start from ``fusedit.config.load_config`` and ``fusedit.system.build_model``, or the CLI.
"""

__version__ = "0.1.0"
