"""What a training stage trains, and what carries over from one stage to the next (docs/recipes.md).

A stage's ``train.trainable`` names parts (``dit``, ``refiner``, ``llm``) and its LoRA settings say how they
train. :func:`apply_parts` turns that into the model's state once, when the stage is built: it sets
``requires_grad`` and adds or merges LoRA adapters, so no forward pass ever asks which parts train.

- ``dit``: the denoiser, fully (the shallow designs' text adapter included: LI-DiT's refiners and the
  baselines' context embedder train with the DiT, design-space.md s.1, s.2), or through LoRA adapters on
  its attention and MLP projections (``train.dit_lora``), the text adapter then frozen.
- ``refiner``: that text adapter alone, always fully: a stage that trains only it, or trains it fully next
  to the DiT's adapters.
- ``llm``: every LLM of the model (joint fine-tuning), fully (``train.llm_top_layers``: only the top k
  layers it reads) or through LoRA adapters (``train.llm_lora``), with its own learning rate
  (``train.llm_lr``). In deep fusion the text stream never attends to image tokens (design-space.md s.1,
  "Deep fusion mask and its consequence"), so the LLM's gradient arrives only through the image queries'
  attention to its per-layer text K/V: "gradient-masked" attention, by construction. The shallow designs
  pass it back through the hidden state their text adapter reads. Only the weights that reach what the
  denoiser reads train (``TextEncoder.read_modules``); the rest could never get a gradient and stays
  frozen, so every trainable weight has optimizer state. The LLM still runs once per prompt batch; it
  records autograd only while it has trainable weights, and only from its lowest trainable layer up.

Between stages the weights and the EMA carry over unchanged (adapters that the next stage does not keep are
merged into their weights first). Each part has its own AdamW (its own learning rate; Distributed
Checkpoint keys each one by its module); at a stage boundary the optimizers are rebuilt over the new
stage's parameters, and the Adam state of every parameter present in both stages is carried, with a log line
saying which.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedit.config import Config, ConfigError, LoRAConfig, Stage, TrainConfig, resolved_stages
from fusedit.train import lora

log = logging.getLogger(__name__)

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


def idle_settings(tc: TrainConfig) -> list[str]:
    """The settings of ``tc`` for a part that ``train.trainable`` does not train, which therefore do
    nothing, e.g. ``train.llm_lora.rank=8`` in a stage that trains only the DiT. Not an error: a staged
    recipe's later stages inherit the keys of earlier ones (design-space.md s.3, the LLM unfreezes late)."""
    idle = []
    if "llm" not in tc.trainable:
        for key, value in (
            ("llm_lora.rank", tc.llm_lora.rank or None),
            ("llm_lr", tc.llm_lr),
            ("llm_top_layers", tc.llm_top_layers),
        ):
            if value is not None:
                idle.append(f"train.{key}={value!r} (LLM)")
    if "dit" not in tc.trainable and tc.dit_lora.rank:
        idle.append(f"train.dit_lora.rank={tc.dit_lora.rank!r} (DiT)")
    return idle


def text_modules(model) -> dict[str, nn.Module]:
    """Each LLM under its checkpoint name: ``llm`` (text), ``llm_extra0``, ... (extra_text, in order)."""
    return {"llm": model.text.llm, **{f"llm_extra{i}": enc.llm for i, enc in enumerate(model.extra_text)}}


def trained_modules(model) -> dict[str, nn.Module]:
    """Every module that can hold trainable weights, under its checkpoint name (the denoiser first)."""
    return {DENOISER: model.denoiser, **text_modules(model)}


def _text_parts(model):
    """(checkpoint name, text encoder, what the denoiser asks of it) for each LLM."""
    return zip(text_modules(model), model.encoders, model.denoiser.text_requests, strict=True)


def _trained_llm_modules(encoder, request, top: int | None, key: str) -> list[nn.Module]:
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


def _llm_targets(llm: nn.Module, modules: list[nn.Module], targets: tuple) -> list[str]:
    """Full names of the linear ``targets`` projections inside ``modules`` (the LLM's trained part)."""
    inside = {id(sub) for m in modules for sub in m.modules()}
    return [
        name
        for name, m in llm.named_modules()
        if id(m) in inside
        and isinstance(m, nn.Linear)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]


def _check_targets(
    key: str, named: list, targets: tuple, module: nn.Module, inside: list[nn.Module], of: str
) -> None:
    """LoRA ``targets`` (the ``named`` ones, or the defaults when none are named) match linear layers of
    ``inside`` (within ``module``). Each named one must: peft adapts the targets that match and ignores the
    rest, so a misspelled one next to a right one would go unnoticed. Of the defaults, one is enough (a
    stage that trains only the top layer a deep-fusion design reads of the LLM has no q_proj to adapt)."""
    within = {id(sub) for m in inside for sub in m.modules()}
    linear = [n for n, m in module.named_modules() if id(m) in within and isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    names = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear}))
    allowed = f"allowed: {names}, or a dotted name ending in one"
    if named and unmatched:
        raise ConfigError(f"{key}={named}: {unmatched[0]!r} matches no linear layer of {of} ({allowed})")
    if len(unmatched) == len(targets):
        raise ConfigError(
            f"{key} is not set and its defaults {list(targets)} match no linear layer of {of} ({allowed})"
        )


def check_stages(model, stages: list[Stage]) -> None:
    """What every stage will ask of the built model, checked before the first step, so a recipe never
    fails in its third stage after training two: peft installed, llm_top_layers within the layers the
    design reads, LoRA targets that match a linear layer (each one named). Errors name the stage."""
    for stage in stages:
        tc = stage.config.train
        parts, where = Parts.of(tc), stage.where
        try:
            if parts.dit_adapters or parts.llm_adapters:
                lora.require_peft(where)
            if parts.dit_adapters:
                den, targets = model.denoiser, parts.dit_adapters[2]
                _check_targets(
                    "train.dit_lora.targets", tc.dit_lora.targets, targets, den, [den], "the denoiser"
                )
            for name, encoder, request in _text_parts(model) if parts.llm else ():
                trained = _trained_llm_modules(encoder, request, parts.llm_top_layers, name)
                if parts.llm_adapters:
                    of = f"what the design reads of {name}"
                    targets = parts.llm_adapters[2]
                    _check_targets(
                        "train.llm_lora.targets", tc.llm_lora.targets, targets, encoder.llm, trained, of
                    )
        except ConfigError as e:
            message = str(e)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def _llm_lora_targets(encoder, request, parts: Parts, key: str) -> list[str]:
    """Full names of the projections the LLM's adapters wrap: ``train.llm_lora.targets`` inside the part of
    the LLM the stage trains; a one-line error when they match none."""
    trained = _trained_llm_modules(encoder, request, parts.llm_top_layers, key)
    targets = _llm_targets(encoder.llm, trained, parts.llm_adapters[2])
    if not targets:
        raise ConfigError(
            f"train.llm_lora.targets={list(parts.llm_adapters[2])} match no linear layer that the "
            f"design reads of {key}"
        )
    return targets


def _lora_cfg(adapters: tuple) -> LoRAConfig:
    return LoRAConfig(rank=adapters[0], alpha=adapters[1], targets=list(adapters[2]))


def apply_parts(model, parts: Parts, before: Parts | None, *, seed: int, stage: int) -> None:
    """Make ``model`` train ``parts``; ``before`` is what it trained until now (None: a freshly built model):
    :func:`add_stage_adapters`, then every parameter frozen except those of the parts that train."""
    add_stage_adapters(model, before, parts, seed=seed, stage=stage)
    den = model.denoiser
    den.requires_grad_(False)
    if parts.dit:
        for p in lora.adapter_parameters(den) if parts.dit_adapters else den.parameters():
            p.requires_grad_(True)
    if parts.refiner:
        den.context.requires_grad_(True)
    for key, encoder, request in _text_parts(model):
        encoder.llm.requires_grad_(False)
        if parts.llm_adapters:
            for p in lora.adapter_parameters(encoder.llm):
                p.requires_grad_(True)
        elif parts.llm:
            for module in _trained_llm_modules(encoder, request, parts.llm_top_layers, key):
                module.requires_grad_(True)


def start_as(model, stage: Stage) -> Parts:
    """A freshly built ``model`` made to train as ``stage`` does (its LoRA adapters added, requires_grad
    set): what `fusedit describe` and `fusedit study` count trainable parameters on, so their counts are
    what the optimizers get. Returns the stage's parts."""
    parts = Parts.of(stage.config.train)
    apply_parts(model, parts, None, seed=stage.config.train.seed, stage=stage.index)
    return parts


def add_stage_adapters(model, before: Parts | None, parts: Parts, *, seed: int, stage: int) -> None:
    """The LoRA adapters ``parts`` train through: adapters whose settings differ from ``before``'s are
    merged into their weights, and new ones are added with an init seeded by (seed, stage)."""
    den = model.denoiser
    if (before.dit_adapters if before else None) != parts.dit_adapters:
        lora.merge_adapters(den)
        if parts.dit_adapters:
            cfg = _lora_cfg(parts.dit_adapters)
            lora.add_adapters(
                den, cfg, cfg.targets, lora.adapter_seed(seed, stage, DENOISER), "train.dit_lora"
            )
    for key, encoder, request in _text_parts(model):
        if (before.llm_adapters if before else None) == parts.llm_adapters:
            continue
        lora.merge_adapters(encoder.llm)
        if parts.llm_adapters:
            cfg = _lora_cfg(parts.llm_adapters)
            targets = _llm_lora_targets(encoder, request, parts, key)
            seed_here = lora.adapter_seed(seed, stage, key)
            lora.add_adapters(encoder.llm, cfg, targets, seed_here, "train.llm_lora")


def llm_base_changed(cfg: Config, stage: int) -> bool:
    """Whether the LLMs' own weights (live adapters aside) may differ from what their ``model_id`` loads
    once stage ``stage`` has begun: trained fully in a stage up to this one, or with adapters merged at an
    earlier boundary. Such an LLM is saved whole in checkpoints (as a random-init one always is, and one
    that train.init_from loaded); otherwise only its adapters are."""
    parts = [Parts.of(s.config.train) for s in resolved_stages(cfg)[: stage + 1]]
    if any(p.llm and not p.llm_adapters for p in parts):
        return True
    return any(a.llm_adapters and a.llm_adapters != b.llm_adapters for a, b in zip(parts, parts[1:]))


# --------------------------------------------------------------------------------------------------
# Optimizers


@dataclass
class Optimizers:
    """One AdamW per module with trainable weights (the denoiser, each LLM), keyed like the checkpoint."""

    by_module: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)
    base_lr: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, model, tc: TrainConfig, device: torch.device) -> Optimizers:
        out = cls()
        for key, module in trained_modules(model).items():
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            if not named:
                continue
            lr = tc.lr if key == DENOISER else tc.llm_lr or tc.lr
            out.by_module[key] = torch.optim.AdamW(
                [p for _, p in named],
                lr=lr,
                betas=(tc.beta1, tc.beta2),
                weight_decay=tc.weight_decay,
                fused=device.type == "cuda",
            )
            out.names[key] = [n for n, _ in named]
            out.base_lr[key] = lr
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for opt in self.by_module.values() for g in opt.param_groups for p in g["params"]]

    def named(self) -> dict[str, dict[str, nn.Parameter]]:
        return {
            key: dict(zip(self.names[key], opt.param_groups[0]["params"]))
            for key, opt in self.by_module.items()
        }

    def set_lr(self, lr_of) -> dict[str, float]:
        """Set each optimizer's learning rate to ``lr_of(base_lr)``; returns them by module."""
        lrs = {key: lr_of(base) for key, base in self.base_lr.items()}
        for key, opt in self.by_module.items():
            for group in opt.param_groups:
                group["lr"] = lrs[key]
        return lrs

    def step(self) -> None:
        for opt in self.by_module.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.by_module.values():
            opt.zero_grad(set_to_none=True)

    def carry_from(self, old: Optimizers) -> str:
        """Adam state of every parameter trained before and now moves into these optimizers; returns the
        log line that says what was carried and what starts fresh.

        "Before and now" is the same tensor object: a parameter that lives on keeps its identity (adapter
        merges write into the base weight in place), while re-created adapters get new tensors under the
        same names and shapes and must not inherit the old adapters' moments."""
        before, now = old.named(), self.named()
        common = fresh = 0
        for key, params in now.items():
            old_opt, old_params = old.by_module.get(key), before.get(key, {})
            for name, p in params.items():
                q = old_params.get(name)
                if q is not p:
                    fresh += 1
                    continue
                common += 1
                if q in old_opt.state:
                    self.by_module[key].state[p] = old_opt.state[q]
        dropped = sum(len(v) for v in before.values()) - common
        if not fresh and not dropped:
            return f"optimizer: the same {common} trainable tensors, Adam state carried"
        return (
            f"optimizer rebuilt for a changed parameter set: Adam state carried for the {common} tensors "
            f"that train in both stages, {fresh} new ones start fresh, {dropped} no longer train"
        )


# --------------------------------------------------------------------------------------------------
# Compute budget (``fusedit describe``)


def training_flops_per_image(parts: Parts, dit: int, llm: int, llm_layers: int) -> int:
    """Training FLOPs of one image from the forward FLOPs of the DiT and the LLM(s).

    A part that trains fully costs its forward, the activation gradients and the weight gradients (3x its
    forward); a part the gradient only passes through, or that trains through LoRA, costs 2x (the adapters'
    own products are negligible). The DiT is always passed through (every trainable part sits below its
    output). The LLM is passed through only from its lowest trainable layer up (the top-layer share)."""
    dit_cost = 3 * dit if parts.dit and not parts.dit_adapters else 2 * dit
    if not parts.llm:
        return dit_cost + llm
    share = (parts.llm_top_layers or llm_layers) / llm_layers
    weight_grads = 0 if parts.llm_adapters else 1
    return dit_cost + llm + round(llm * share * (1 + weight_grads))


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.0f} FLOP"


PFLOP_DAY = 1e15 * 86400  # one PFLOP/s sustained for a day


def stage_costs(cfg: Config, model) -> list[tuple[Stage, dict[str, int], int]]:
    """(stage, image_costs at its image size, images per step) of each stage, for a meta-device ``model``;
    the images are its train.global_batch, which any number of processes keeps, else batch_size x
    grad_accum, which N processes multiply by N."""
    costs = []
    for stage in resolved_stages(cfg):
        sc, tc = stage.config, stage.config.train
        costs.append(
            (
                stage,
                image_costs(model, sc, sc.data.image_size),
                tc.global_batch or tc.batch_size * tc.grad_accum,
            )
        )
    return costs


def image_costs(model, cfg: Config, size: int) -> dict[str, int]:
    """One ``size`` px image's token counts ("image", "text") and FLOPs ("dit" and "llm" forward,
    "training": training_flops_per_image for what cfg.train trains), for a meta-device ``model``."""
    from fusedit.models.flops import image_tokens, model_flops

    n = image_tokens(size, cfg.vae.downsample, cfg.model.patch_size)
    dit, lm, text = model_flops(model, n)
    layers = min(len(e.llm.layers) for e in model.encoders)
    training = training_flops_per_image(Parts.of(cfg.train), dit, lm, layers)
    return {"image": n, "text": text, "dit": dit, "llm": lm, "training": training}


def describe_stages(cfg: Config, model) -> list[str]:
    """One line per stage (of a meta-device ``model``): steps, resolution, batch, what trains, and the
    training compute of stage_costs (per image, and in total for its images)."""
    lines, run_total = [], 0
    costs = stage_costs(cfg, model)
    for stage, image, images in costs:
        sc, tc, per_image = stage.config, stage.config.train, image["training"]
        parts = Parts.of(tc)
        size = sc.data.image_size
        total = per_image * stage.steps * images
        run_total += total
        res = f"{size} px" + (
            f" ({len(sc.data.buckets)} aspect buckets, counted square)" if sc.data.buckets else ""
        )
        batch = f"{tc.batch_size}x{tc.grad_accum}" + (
            f" (global batch {tc.global_batch})" if tc.global_batch else ""
        )
        lines.append(
            f"stage {stage.index} {stage.name!r}: steps {stage.start}..{stage.end}, {res}, batch "
            f"{batch}, lr {tc.lr:g}, trains {parts.describe()}: "
            f"{_flop(per_image)} per image, {total:.3e} FLOP ({total / PFLOP_DAY:.3g} PFLOP/s-days)"
        )
    fixed = [s.config.train.global_batch is not None for s, _, _ in costs]
    if all(fixed):
        scale = (
            "at each stage's global batch (N processes: the same batch and FLOPs, batch_size x grad_accum = "
            "global batch / N per process)"
        )
    elif any(fixed):
        scale = (
            "at each stage's global batch where it is set (N processes: the same, batch_size x grad_accum = "
            "global batch / N per process), else at batch_size x grad_accum images per step (N processes: N "
            "times the batch and the FLOPs)"
        )
    else:
        scale = "at batch_size x grad_accum images per step (N processes: N times the batch and the FLOPs)"
    lines.append(f"whole run: {run_total:.3e} FLOP ({run_total / PFLOP_DAY:.3g} PFLOP/s-days) {scale}")
    return lines


def stage_of_checkpoint(
    stages: list[Stage], step: int, recorded: int | None, saved: list[Stage] | None = None
) -> Stage:
    """The stage a checkpoint written after ``step`` steps belongs to: the one it recorded (checked against
    this config's step ranges), or for a checkpoint without a record, the stage whose range holds it.
    ``saved`` (the stages of the checkpoint's own config) also refuses a config that moves the start of
    that stage: the data position the checkpoint saved counts the steps since the stage began."""
    if recorded is None:
        recorded = next((s.index for s in saved or stages if s.start < step <= s.end), 0)
    if saved and 0 <= recorded < min(len(saved), len(stages)):
        was, now = saved[recorded].start, stages[recorded].start
        if was != now:
            # Only the earlier stages' lengths place the start: name the first one that changed.
            moved = next(i for i in range(recorded) if saved[i].steps != stages[i].steps)
            raise ConfigError(
                f"stages.{moved}.steps={stages[moved].steps} moves the start of stage {recorded} "
                f"{stages[recorded].name!r}, where the checkpoint at step {step} was written, from step {was} "
                f"to {now} (allowed: stages.{moved}.steps={saved[moved].steps} as the run was trained: only "
                "the current and later stages' steps may change)"
            )
    if not 0 <= recorded < len(stages) or not stages[recorded].start <= step <= stages[recorded].end:
        ranges = ", ".join(f"{s.index} {s.name!r} {s.start}..{s.end}" for s in stages)
        raise ConfigError(
            f"the checkpoint at step {step} was written in stage {recorded}, which this config's stages do "
            f"not place there (stages: {ranges}): resume with the config the run was started with"
        )
    return stages[recorded]
