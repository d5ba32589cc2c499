"""fusedit: text-to-image diffusion transformers that use a large language model as their text encoder.

Covers the design space of FuseDiT (deep layer-by-layer fusion of a frozen decoder-only LLM with a DiT)
and LI-DiT. Start from ``fusedit.config.load_config`` and ``fusedit.system.build_model``, or the CLI.

The modules form four tiers; a module imports only from its own tier and the tiers listed before it:

1. Utilities: ``devices`` (host-to-device copies) and ``compiling`` (torch.compile settings and undoing a
   compile, for the DiT blocks and the LLM).
2. Model assembly: ``config`` (the schema), ``files`` (atomic file writes; its refusals of a file or folder
   a user gave are config's ConfigError), ``presets`` (the named configs, YAML), ``imaging`` (PNGs,
   image grids, plots; it reads images as ``data`` does), ``layers``, ``text``, ``models``, ``flow`` (flow
   matching and samplers), ``vae``, ``data`` (datasets and latent caches), ``system`` (builds a
   text-to-image model from a config), ``adapters`` (LoRA adapters through peft, and which of them a
   training stage adds) and ``checkpoints`` (reading them; ``train.checkpoint`` writes them).
3. Inference: ``sampling`` (prompt -> image: ``sampling.generation``; ``sampling.source`` reads a run,
   checkpoint or pipeline folder to sample with; ``sampling.folder`` writes the folder of `fusedit sample`;
   ``sampling.serve``, the web demo), ``pipeline`` (the diffusers pipeline), ``hub`` (Hugging Face folder
   formats) and ``convert`` (checkpoints of other code bases).
4. Apps: ``bench``, ``demo``, ``eval``, ``train``, ``study`` (design studies: they train and evaluate, so
   they sit above both) and ``cli`` (the `fusedit` command: thin subcommands that parse flags and call the
   library; nothing but ``__main__`` imports it).

``layers`` imports nothing else of fusedit. ``tests/test_layering.py`` checks the tiers (read off this
list) for every module, and the finer rules on ``cli``, ``train`` and ``layers``.
"""

__version__ = "0.1.0"
