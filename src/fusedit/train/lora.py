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
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from fusedit.config import ConfigError, LoRAConfig

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
