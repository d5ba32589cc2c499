"""LoRA adapters through peft, one mechanism for both parts that can train through them: the LLM (joint
fine-tuning, ``train.llm_lora``) and the DiT (fine-tuning a trained model, ``train.dit_lora``).

peft wraps each adapted ``nn.Linear`` in a LoRA layer that keeps the original as ``base_layer``, so a
module's state dict changes names (``q_proj.weight`` -> ``q_proj.base_layer.weight`` plus
``q_proj.lora_A.default.weight`` and ``q_proj.lora_B.default.weight``). fusedit keeps two views apart:

- the *plain* state: the module's own weights under their plain names (what a module without adapters has,
  so checkpoints, the EMA, export and sampling never depend on which adapters a stage used);
- the *adapter* state: the LoRA weights under their peft names, saved next to the plain state.

``merged_state_dict`` folds the adapters into the plain weights (W + scale * B @ A): the EMA averages that,
so the EMA is always a plain model. ``merge_adapters`` does it in place and removes the wrappers, at the end
of a LoRA stage and when a checkpoint is loaded for sampling or export.

peft is an optional dependency (``pip install -e ".[lora]"`` in the repository), imported only when adapters
are added.

:class:`Parts` says what a stage trains and through which adapters, and :func:`add_stage_adapters` gives a
model those adapters. Training adds them when a stage is built (fusedit.train.stages.apply_parts), and
loading a checkpoint (fusedit.checkpoints.load_weights) adds the adapters of the stage that wrote it before
their weights load and merge; so reading a checkpoint needs nothing of the training package.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from fusedit.config import ConfigError, LoRAConfig, TrainConfig

ADAPTER = "default"  # peft's adapter name; one adapter per module
_ADAPTER_MARK = ".lora_"  # in every LoRA parameter's name (lora_A, lora_B), never in a plain one
_BASE = ".base_layer."


def require_peft(what: str):
    """The peft module, or a one-line error naming what needed it and how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(
            f"{what} trains LoRA adapters through peft, which is not installed: pip install peft "
            "(or pip install -e '.[lora]' in the fusedit repository)"
        ) from None
    return peft


def adapter_seed(seed: int, stage: int, part: str) -> int:
    """Seed of a stage's fresh adapters: a run resumed after the stage began draws the same init."""
    digest = hashlib.blake2b(f"{seed}/lora/{stage}/{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def is_adapter_key(name: str) -> bool:
    return _ADAPTER_MARK in name


def plain_key(name: str) -> str:
    """A structured (peft-wrapped) state-dict name -> the name the weight has without adapters."""
    return name.replace(_BASE, ".")


def adapted_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) for every adapted projection in ``module`` (no peft import needed)."""
    return [
        (n, m) for n, m in module.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
    ]


def has_adapters(module: nn.Module) -> bool:
    return bool(adapted_layers(module))


def add_adapters(module: nn.Module, lora: LoRAConfig, targets: list[str], seed: int, what: str) -> int:
    """Wrap the ``targets`` projections of ``module`` in LoRA layers; returns how many were adapted.

    peft freezes every other parameter of ``module``; B starts at zero, so the module computes exactly
    what it did before. A is drawn from a generator seeded by ``seed`` (not the global one), so the same
    stage starts with the same adapters in an uninterrupted run and in a resumed one."""
    peft = require_peft(what)
    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=list(targets), lora_dropout=0.0
    )
    with torch.random.fork_rng(devices=[]):  # peft initialises A on the CPU, then moves it
        torch.manual_seed(seed)
        try:
            peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as e:
            raise ConfigError(f"{what}: {str(e).splitlines()[0]}") from None
    # Adapters on a bf16/fp16 module are trained weights: keep them in float32 (AdamW on half-precision
    # weights loses the small updates); peft casts the input to their dtype and the output back.
    with torch.no_grad():
        for p in adapter_parameters(module):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    return len(adapted_layers(module))


@torch.no_grad()
def merge_adapters(module: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back; returns how many."""
    layers = adapted_layers(module)
    for name, layer in layers:
        layer.merge(adapter_names=[ADAPTER])
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, layer.get_base_layer())
    if layers and hasattr(module, "peft_config"):  # peft's record of the adapters just folded away
        del module.peft_config
    return len(layers)


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if is_adapter_key(n)]


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state: the module's own weights under their plain names, adapters left out (not merged)."""
    return {plain_key(k): v for k, v in module.state_dict().items() if not is_adapter_key(k)}


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if is_adapter_key(k)}


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The plain state with each adapter folded in (W + scale * B @ A): what the module computes, as a module
    without adapters would hold it. Without adapters this is just ``state_dict()``."""
    layers = adapted_layers(module)
    if not layers:
        return module.state_dict()
    deltas = {f"{name}.weight": layer.get_delta_weight(ADAPTER) for name, layer in layers}
    state = base_state_dict(module)
    for key, delta in deltas.items():
        state[key] = state[key] + delta.to(state[key].dtype)
    return state


def structured_state(module: nn.Module, plain: dict, adapters: dict) -> dict[str, torch.Tensor]:
    """Plain weights and adapter weights -> a state dict under ``module``'s current (wrapped) names."""
    out = {}
    for key in module.state_dict():
        source, name = (adapters, key) if is_adapter_key(key) else (plain, plain_key(key))
        if name not in source:
            kind = "adapter" if source is adapters else "weight"
            raise KeyError(f"{kind} {name!r} is missing from the saved state")
        out[key] = source[name]
    return out


def load_plain_and_adapters(module: nn.Module, plain: dict | None, adapters: dict | None) -> None:
    """Load the plain state (None: keep the module's own, e.g. a hub LLM's) and the adapters (None: none
    saved) into ``module`` as it is now wrapped."""
    plain = base_state_dict(module) if plain is None else plain
    unexpected = sorted(set(adapters or {}) - set(module.state_dict()))
    if unexpected:
        raise KeyError(f"saved adapter {unexpected[0]!r} has no place in the module (adapted differently)")
    module.load_state_dict(structured_state(module, plain, adapters or {}))


# --------------------------------------------------------------------------------------------------
# What a stage trains, and its adapters


DENOISER = "denoiser"
# The projections LoRA adapts when train.*_lora.targets is empty. The DiT's blocks use the LLMs' module names.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = {"dit": ATTENTION_PROJECTIONS + MLP_PROJECTIONS, "llm": ATTENTION_PROJECTIONS}


@dataclass(frozen=True)
class Parts:
    """What a stage trains. ``*_adapters`` identify the LoRA adapters a part carries while it trains
    through them (None: none); a part keeps its adapters into the next stage only if they are equal."""

    dit: bool
    refiner: bool
    llm: bool
    llm_top_layers: int | None
    dit_adapters: tuple | None
    llm_adapters: tuple | None

    @classmethod
    def of(cls, tc: TrainConfig) -> Parts:
        def adapters(part: str, cfg: LoRAConfig, *extra) -> tuple | None:
            if part not in tc.trainable or not cfg.rank:
                return None
            # alpha None means alpha = rank: the same adapters, so spelled the same here
            return (cfg.rank, cfg.alpha or cfg.rank, tuple(cfg.targets) or DEFAULT_TARGETS[part], *extra)

        llm = "llm" in tc.trainable
        return cls(
            dit="dit" in tc.trainable,
            refiner="refiner" in tc.trainable,
            llm=llm,
            llm_top_layers=tc.llm_top_layers if llm else None,
            dit_adapters=adapters("dit", tc.dit_lora),
            llm_adapters=adapters("llm", tc.llm_lora, tc.llm_top_layers),
        )

    def describe(self) -> str:
        out = []
        if self.dit:
            out.append(f"DiT (LoRA rank {self.dit_adapters[0]})" if self.dit_adapters else "DiT")
        if self.refiner:
            out.append("refiner")
        if self.llm:
            top = f"top {self.llm_top_layers} layers" if self.llm_top_layers else "all layers"
            how = f"LoRA rank {self.llm_adapters[0]}" if self.llm_adapters else "fully"
            out.append(f"LLM ({how}, {top})")
        return ", ".join(out)


def text_modules(model) -> dict[str, nn.Module]:
    """Each LLM under its checkpoint name: ``llm`` (text), ``llm_extra0``, ... (extra_text, in order)."""
    return {"llm": model.text.llm, **{f"llm_extra{i}": enc.llm for i, enc in enumerate(model.extra_text)}}


def trained_modules(model) -> dict[str, nn.Module]:
    """Every module that can hold trainable weights, under its checkpoint name (the denoiser first)."""
    return {DENOISER: model.denoiser, **text_modules(model)}


def text_parts(model):
    """(checkpoint name, text encoder, what the denoiser asks of it) for each LLM."""
    return zip(text_modules(model), model.encoders, model.denoiser.text_requests, strict=True)


def trained_llm_modules(encoder, request, top: int | None, key: str) -> list[nn.Module]:
    """The modules of one LLM a stage trains: what the denoiser reads of it (TextEncoder.read_modules:
    nothing else can get a gradient), with ``top`` only its top ``top`` read layers and the final norm."""
    read = encoder.read_modules(request)
    if not top:
        return [m for _, m in read]
    n = len(encoder.llm.layers)
    layers = sorted({i for i, _ in read if 0 <= i < n})
    if top > len(layers):
        raise ConfigError(
            f"train.llm_top_layers={top} but the design reads {len(layers)} layers of {key} "
            f"(allowed: 1..{len(layers)})"
        )
    keep = {*layers[-top:], n}
    return [m for i, m in read if i in keep]


def linear_names(module: nn.Module, inside: list[nn.Module]) -> list[str]:
    """Full names (within ``module``) of the linear layers inside the submodules ``inside``."""
    within = {id(sub) for m in inside for sub in m.modules()}
    return [n for n, m in module.named_modules() if id(m) in within and isinstance(m, nn.Linear)]


def targets_name(target: str, name: str) -> bool:
    """Whether the LoRA target ``target`` names the layer ``name``: itself, or a dotted name ending in it."""
    return name == target or name.endswith("." + target)


def _llm_targets(llm: nn.Module, modules: list[nn.Module], targets: tuple) -> list[str]:
    """Full names of the linear ``targets`` projections inside ``modules`` (the LLM's trained part)."""
    return [n for n in linear_names(llm, modules) if any(targets_name(t, n) for t in targets)]


def _llm_lora_targets(encoder, request, parts: Parts, key: str) -> list[str]:
    """Full names of the projections the LLM's adapters wrap: ``train.llm_lora.targets`` inside the part of
    the LLM the stage trains; a one-line error when they match none."""
    trained = trained_llm_modules(encoder, request, parts.llm_top_layers, key)
    targets = _llm_targets(encoder.llm, trained, parts.llm_adapters[2])
    if not targets:
        raise ConfigError(
            f"train.llm_lora.targets={list(parts.llm_adapters[2])} match no linear layer that the "
            f"design reads of {key}"
        )
    return targets


def _lora_cfg(adapters: tuple) -> LoRAConfig:
    return LoRAConfig(rank=adapters[0], alpha=adapters[1], targets=list(adapters[2]))


def add_stage_adapters(model, before: Parts | None, parts: Parts, *, seed: int, stage: int) -> None:
    """The LoRA adapters ``parts`` train through: adapters whose settings differ from ``before``'s are
    merged into their weights, and new ones are added with an init seeded by (seed, stage)."""
    den = model.denoiser
    if (before.dit_adapters if before else None) != parts.dit_adapters:
        merge_adapters(den)
        if parts.dit_adapters:
            cfg = _lora_cfg(parts.dit_adapters)
            add_adapters(den, cfg, cfg.targets, adapter_seed(seed, stage, DENOISER), "train.dit_lora")
    for key, encoder, request in text_parts(model):
        if (before.llm_adapters if before else None) == parts.llm_adapters:
            continue
        merge_adapters(encoder.llm)
        if parts.llm_adapters:
            cfg = _lora_cfg(parts.llm_adapters)
            targets = _llm_lora_targets(encoder, request, parts, key)
            seed_here = adapter_seed(seed, stage, key)
            add_adapters(encoder.llm, cfg, targets, seed_here, "train.llm_lora")
