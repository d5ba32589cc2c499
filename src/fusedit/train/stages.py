"""What a training stage trains, and what carries over from one stage to the next (docs/recipes.md).

A stage's ``train.trainable`` names parts (``dit``, ``refiner``, ``llm``) and its LoRA settings say how they
train. :func:`apply_parts` turns that into the model's state once, when the stage is built: it sets
``requires_grad`` and adds or merges LoRA adapters, so no forward pass ever asks which parts train. The
parts (:class:`fusedit.adapters.Parts`) and the adapters they train through live in fusedit.adapters, at the
model tier, because loading a checkpoint rebuilds the adapters of the stage that wrote it.

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

Before anything is built, :func:`check_stages_run` refuses stages that the launch cannot train (names,
``train.parallel``, the global batch on this many processes); :func:`check_stages` then checks what they
ask of the built model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fusedit.adapters import (
    DENOISER,
    Parts,
    adapter_parameters,
    add_stage_adapters,
    linear_names,
    require_peft,
    targets_name,
    text_parts,
    trained_llm_modules,
    trained_modules,
)
from fusedit.config import Config, ConfigError, Stage, TrainConfig, resolved_stages

log = logging.getLogger(__name__)


def idle_settings(tc: TrainConfig) -> list[str]:
    """The settings of ``tc`` that do nothing: those for a part that ``train.trainable`` does not train,
    e.g. ``train.llm_lora.rank=8`` in a stage that trains only the DiT, and a LoRA alpha or targets without
    a rank (rank 0: the part trains fully, without adapters). Not an error: a staged recipe's later stages
    inherit the keys of earlier ones (design-space.md s.3, the LLM unfreezes late)."""
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
    for key, lora in (("dit_lora", tc.dit_lora), ("llm_lora", tc.llm_lora)):
        if not lora.rank:
            idle += [
                f"train.{key}.{name}={value!r} (rank 0: no adapters)"
                for name, value in (("alpha", lora.alpha), ("targets", lora.targets))
                if value
            ]
    return idle


def _check_targets(
    key: str, named: list, targets: tuple, module: nn.Module, inside: list[nn.Module], of: str
) -> None:
    """LoRA ``targets`` (the ``named`` ones, or the defaults when none are named) match linear layers of
    ``inside`` (within ``module``). Each named one must: peft adapts the targets that match and ignores the
    rest, so a misspelled one next to a right one would go unnoticed. Of the defaults, one is enough (a
    stage that trains only the top layer a deep-fusion design reads of the LLM has no q_proj to adapt)."""
    linear = linear_names(module, inside)
    unmatched = [t for t in targets if not any(targets_name(t, n) for n in linear)]
    # A Sequential's positions (the 0 of mlp.0) are no names to offer: they match a layer of every block.
    ends = {n.rsplit(".", 1)[-1] for n in linear}
    names = ", ".join(sorted(e for e in ends if not e.isdigit()))
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
                require_peft(where)
            if parts.dit_adapters:
                den, targets = model.denoiser, parts.dit_adapters[2]
                _check_targets(
                    "train.dit_lora.targets", tc.dit_lora.targets, targets, den, [den], "the denoiser"
                )
            for name, encoder, request in text_parts(model) if parts.llm else ():
                trained = trained_llm_modules(encoder, request, parts.llm_top_layers, name)
                if parts.llm_adapters:
                    of = f"what the design reads of {name}"
                    targets = parts.llm_adapters[2]
                    _check_targets(
                        "train.llm_lora.targets", tc.llm_lora.targets, targets, encoder.llm, trained, of
                    )
        except ConfigError as e:
            message = str(e)
            if not stage.staged or message.startswith(where):
                raise
            raise ConfigError(f"{where}: {message}") from None


def check_stages_run(cfg: Config, stages: list[Stage], parallel: str, world_size: int) -> None:
    """What the run's stages must satisfy before anything is built: distinct names, what the launch
    allows (_check_stages_fit) and the global batches they ask for (_check_global_batch)."""
    names = [stage.name for stage in stages]
    for stage in stages:
        # Refused here rather than at config load, so that a saved run with such names still samples.
        if names.index(stage.name) != stage.index:
            raise ConfigError(
                f"stages.{stage.index}.name={stage.name!r} is already the name of stages.{names.index(stage.name)} "
                "(allowed: distinct names, which tell the stages apart in the logs and metrics.jsonl)"
            )
    _check_stages_fit(stages, parallel, cfg.train.shard_llm)
    _check_global_batch(stages, world_size, bool(cfg.stages))


def _check_stages_fit(stages: list[Stage], parallel: str, shard_llm: bool) -> None:
    """What train.parallel and train.shard_llm allow a run's stages to do (the checks that need the launch)."""
    if parallel == "none":  # one plain process: nothing is sharded
        return
    # A preview encodes its captions on rank 0 alone: a sharded LLM would wait there for the other ranks'
    # shards until train.dist_timeout_s.
    if shard_llm and any(s.config.train.preview_every for s in stages):
        raise ConfigError(
            "train.preview_every needs the whole LLM on rank 0, which train.shard_llm=true shards "
            "(allowed: preview_every=0 with shard_llm, or shard_llm=false)"
        )
    if parallel != "fsdp":
        return
    if stages[0].config.train.ema_offload:
        raise ConfigError(
            "train.ema_offload=true keeps a whole EMA on the host, while train.parallel=fsdp shards it over "
            "the GPUs already (allowed: ema_offload=false with fsdp, or parallel=ddp)"
        )
    if any(s.config.train.preview_every for s in stages):
        raise ConfigError(
            "train.preview_every needs the whole model on rank 0, which train.parallel=fsdp shards "
            "(allowed: preview_every=0 with fsdp, or parallel=ddp)"
        )
    first = Parts.of(stages[0].config.train)
    for s in stages:
        parts = Parts.of(s.config.train)
        if parts.llm or parts.dit_adapters:
            raise ConfigError(
                f"stage {s.index} ({s.name}) trains {parts.describe()}: train.parallel=fsdp shards the DiT "
                "alone and without adapters (allowed: trainable [dit] or [dit, refiner] with fsdp, or parallel=ddp)"
            )
        if parts != first or s.config.train.precision != stages[0].config.train.precision:
            raise ConfigError(
                f"stage {s.index} ({s.name}) changes the trainable parts or train.precision, which "
                "train.parallel=fsdp fixes when it shards the model (allowed: the same in every stage, or ddp)"
            )


def _check_global_batch(stages: list[Stage], world_size: int, staged: bool) -> None:
    """A stage's train.global_batch (a recipe's batch) is what its batch_size x grad_accum x processes
    make; refused at start, naming a per-process batch that makes it, rather than trained at another."""
    for s in stages:
        tc = s.config.train
        if tc.global_batch is None:
            continue
        made = tc.batch_size * tc.grad_accum * world_size
        if made == tc.global_batch:
            continue
        key = f"stages.{s.index}.train" if staged else "train"
        per_process, rest = divmod(tc.global_batch, world_size)
        if rest:
            fix = f"a number of processes that divides {tc.global_batch}, "
        elif per_process % tc.grad_accum == 0:
            fix = f"{key}.batch_size={per_process // tc.grad_accum} on {world_size} process(es), "
        else:
            fix = f"{key}.batch_size={per_process} {key}.grad_accum=1 on {world_size} process(es), "
        raise ConfigError(
            f"{key}.global_batch={tc.global_batch}, but {key}.batch_size={tc.batch_size} x grad_accum="
            f"{tc.grad_accum} x {world_size} process(es) = {made} (allowed: {fix}or {key}.global_batch=null "
            f"to train at {made})"
        )


def apply_parts(model, parts: Parts, before: Parts | None, *, seed: int, stage: int) -> None:
    """Make ``model`` train ``parts``; ``before`` is what it trained until now (None: a freshly built model):
    :func:`fusedit.adapters.add_stage_adapters`, then every parameter frozen except those of the parts that
    train."""
    add_stage_adapters(model, before, parts, seed=seed, stage=stage)
    den = model.denoiser
    den.requires_grad_(False)
    if parts.dit:
        for p in adapter_parameters(den) if parts.dit_adapters else den.parameters():
            p.requires_grad_(True)
    if parts.refiner:
        den.context.requires_grad_(True)
    for key, encoder, request in text_parts(model):
        encoder.llm.requires_grad_(False)
        if parts.llm_adapters:
            for p in adapter_parameters(encoder.llm):
                p.requires_grad_(True)
        elif parts.llm:
            for module in trained_llm_modules(encoder, request, parts.llm_top_layers, key):
                module.requires_grad_(True)


def start_as(model, stage: Stage) -> Parts:
    """A freshly built ``model`` made to train as ``stage`` does (its LoRA adapters added, requires_grad
    set): what `fusedit describe` and `fusedit study` count trainable parameters on, so their counts are
    what the optimizers get. Returns the stage's parts."""
    parts = Parts.of(stage.config.train)
    apply_parts(model, parts, None, seed=stage.config.train.seed, stage=stage.index)
    return parts


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
