"""`fusedit describe`, `config` and `presets`: what a config builds, without training it."""

from __future__ import annotations

import sys

from fusedit.cli.common import _add_config_args, _config
from fusedit.config import (
    Config,
    ConfigError,
    ModelConfig,
    TextConfig,
    adds_template_tokens,
    preset_names,
    text_sections,
    to_yaml,
)
from fusedit.files import counted


def _count(state: str, what: str, count: int) -> str:
    return f"{state} ({what}): {count / 1e6:.1f}M ({count:,})"


def _parameter_lines(model, keys: list[str], stage) -> list[str]:
    """Trainable and frozen parameters of each part of a meta ``model`` once it trains as ``stage`` does:
    training's own apply_parts (start_as) adds the LoRA adapters and sets requires_grad, so the counts cannot drift
    from what the optimizers get. The model keeps the adapters (describe counts FLOPs before this)."""
    from fusedit.system import count_parameters
    from fusedit.train.stages import start_as

    parts = start_as(model, stage)
    d = model.denoiser
    lines, trained, frozen = [], count_parameters(d, True), count_parameters(d, False)
    if trained:
        what = [f"rank-{parts.dit_adapters[0]} LoRA adapters"] if parts.dit_adapters else []
        what += ["refiner"] if parts.refiner else []
        lines.append(_count("trainable", f"DiT: {' and '.join(what)}" if frozen else "DiT", trained))
    if frozen:
        if not parts.dit_adapters:
            rest = "all but the refiner"
        else:
            rest = "base weights but the refiner" if parts.refiner else "base weights"
        lines.append(_count("frozen", f"DiT: {rest}" if trained else "DiT", frozen))
    for key, enc in zip(keys, model.encoders, strict=True):
        llm, name = enc.llm, "LLM" if len(keys) == 1 else f"LLM {key}"
        trained, frozen = count_parameters(llm, True), count_parameters(llm, False)
        if not trained or not frozen:
            state = "trainable" if trained else "frozen"
            lines.append(_count(state, f"{name}, incl. embeddings", trained + frozen))
            continue
        # Joint fine-tuning trains only what reaches the DiT's reads (TextEncoder.read_modules): the
        # embeddings too, unless train.llm_top_layers keeps it to the top layers.
        top = f"the top {parts.llm_top_layers} layers the DiT reads" if parts.llm_top_layers else ""
        if parts.llm_adapters:
            what = f"rank-{parts.llm_adapters[0]} LoRA adapters" + (f" on {top}" if top else "")
            rest = "base weights, incl. embeddings"
        elif llm.get_input_embeddings().weight.requires_grad:
            what, rest = f"{top or 'the layers the DiT reads'}, incl. embeddings", "the rest"
        else:
            what, rest = top, "the rest, incl. embeddings"
        lines += [
            _count("trainable", f"{name}: {what}", trained),
            _count("frozen", f"{name}: {rest}", frozen),
        ]
    if model.pooled_text is not None:
        lines.append(
            _count("frozen", "pooled text encoder, incl. embeddings", count_parameters(model.pooled_text))
        )
    return lines


def _size(count: int) -> str:
    """Bytes in the largest binary unit (GiB, MiB, KiB) they make one of, as torch's memory figures."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.1f} KiB"


def _memory_line(model, cfg: Config) -> str:
    """What training holds on each GPU before activations, once ``_parameter_lines`` set what trains: the
    trainable weights, their gradients and AdamW's two moments (in the weights' dtype, as torch's AdamW
    keeps them), the EMA's float32 copy of the DiT (adapters merged: the EMA's own form; in host memory
    with train.ema_offload) and the frozen weights. Activations depend on the batch, the resolution and
    train.activation_memory_budget: `fusedit bench` measures the peak."""
    from fusedit.adapters import merged_state_dict

    params = list(model.parameters())
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    ema = 4 * sum(v.numel() for v in merged_state_dict(model.denoiser).values())
    parts = [
        ("trainable weights", trained),
        ("their gradients", trained),
        ("AdamW's moments", 2 * trained),
        ("the EMA", 0 if cfg.train.ema_offload else ema),
        ("frozen weights", frozen),
    ]
    held = ", ".join(f"{what} {_size(n)}" for what, n in parts if n)
    host = f"; the EMA's {_size(ema)} in host memory (train.ema_offload)" if cfg.train.ema_offload else ""
    return (
        f"training holds {_size(sum(n for _, n in parts))} per GPU before activations ({held}{host}; "
        "train.parallel=fsdp shards it over the GPUs; `fusedit bench` measures the peak)"
    )


def _lidit_knobs(cfg: Config) -> str:
    """The headline's prompt-encoding knobs, LI-DiT's (design-space.md s.2) above all, that the config sets
    away from the plain baseline, as key=value: the conv position block, the refiners and their ablations,
    how 2+ LLMs' branches meet, the pooled text modulation, the templates and instructions in front of the
    prompt."""
    m, default = cfg.model, ModelConfig()
    sections = text_sections(cfg)
    knobs = ["conv_pos=true"] if m.conv_pos else []
    if m.refiner_depth:
        knobs.append(f"refiner_depth={m.refiner_depth}")
        knobs += [
            f"{k}={str(getattr(m, k)).lower()}"
            for k in ("refiner_causal", "refiner_gating", "drop_instruction")
            if getattr(m, k) != getattr(default, k)
        ]
    if cfg.extra_text:
        knobs.append(f"llms={len(sections)}")
        if m.refiner_depth:  # the refiners are what join them (validate refuses extra_text without)
            knobs.append(f"collaborative_refiner={str(m.collaborative_refiner).lower()}")
            if m.refiner_concat != default.refiner_concat:
                knobs.append(f"refiner_concat={m.refiner_concat}")
    if m.pooled_text != default.pooled_text:
        knobs.append(f"pooled_text={m.pooled_text}")
    templates = [t.template for _, t in sections]
    if any(t != TextConfig.template for t in templates):
        knobs.append(f"template={'/'.join(dict.fromkeys(templates))}")
    instructed = [key for key, t in sections if t.instruction]
    if instructed:
        knobs.append(f"instruction={'/'.join(instructed)}")
    return "".join(f" {k}" for k in knobs)


def _unloaded_templates(cfg: Config, model) -> list[str]:
    """The text sections whose template's tokens a meta build leaves out of the text width: a hub
    tokenizer is not downloaded there (system._text_encoder), so its encoder has no tokenizer to count a
    template, an instruction or a system prompt with."""
    return [
        key
        for (key, t), enc in zip(text_sections(cfg), model.encoders, strict=True)
        if enc.tokenizer is None and adds_template_tokens(t)
    ]


_NO_PEFT = (
    "(parameters: the LoRA adapters are counted through peft, which is not installed: pip install peft)"
)


def _can_count(stage) -> bool:
    """Whether the parameters ``stage`` trains can be counted here: LoRA adapters are added through peft,
    an optional package; describe still gives the rest without it."""
    from fusedit.adapters import Parts, require_peft

    parts = Parts.of(stage.config.train)
    if not (parts.dit_adapters or parts.llm_adapters):
        return True
    try:
        require_peft("describe")
    except ConfigError:
        return False
    return True


def cmd_describe(args) -> int:
    from fusedit.config import resolved_stages
    from fusedit.system import build_model
    from fusedit.train.stages import _flop, describe_stages, image_costs

    cfg = _config(args)
    model = build_model(cfg, "meta")
    d = model.denoiser
    keys = [key for key, _ in text_sections(cfg)]
    # The parameter and per-image lines describe what training starts with: the run, or its first stage
    # (the model is the run's; stages change what trains, the image size and the batch).
    first = resolved_stages(cfg)[0]

    def layers(which: tuple[int, ...]) -> str:
        return f"layer {which[0]}" if len(which) == 1 else f"layers {which[0]}..{which[-1]}"

    def reads(req, llm) -> str:
        what = (
            f"K/V of LLM {layers(req.kv_layers)}"
            if req.kv_layers
            else f"pre-RoPE K/V of LLM {layers(req.raw_kv_layers)}"
            if req.raw_kv_layers
            else f"LLM hidden state {req.hidden_layer}"
        )
        return f"{what} of {counted(len(llm.layers), 'LLM layer')} run"

    read = [reads(req, enc.llm) for req, enc in zip(d.text_requests, model.encoders, strict=True)]
    if len(read) > 1:  # several LLMs (LI-DiT): each named by its section
        read = [f"{r} ({key})" for r, key in zip(read, keys, strict=True)]
    # What a step costs follows what it trains (train.trainable, LoRA): 3x the DiT forward plus the frozen
    # LLM's forward for the default. Counted before _parameter_lines adds the adapters, whose own products
    # the FLOP counts leave out (training_flops_per_image).
    sizes = sorted({256, 512, first.config.data.image_size})
    costs = [(size, image_costs(model, first.config, size)) for size in sizes]
    stage_lines = describe_stages(cfg, model) if cfg.stages else []
    # The exact counts too: a debug design's 1.5M would not confirm the 1.53M `fusedit study` reports.
    parameters = _parameter_lines(model, keys, first) if _can_count(first) else [_NO_PEFT]
    if parameters != [_NO_PEFT]:
        parameters.append(_memory_line(model, first.config))
    print(
        f"{cfg.name}: design={cfg.model.design} pos_embed={cfg.model.pos_embed} "
        f"timestep={cfg.model.timestep_conditioning} dit_layers={len(d.blocks)} width={d.dim}"
        f"{_lidit_knobs(cfg)}; reads "
        f"{'; '.join(read)}"
    )
    if cfg.stages:
        print(f"stage 0 {first.name!r}, where training starts (every stage's own line at the end):")
    print("\n".join(parameters))
    if any(req.reads_kv for req in d.text_requests) and any(t.model_id for _, t in text_sections(cfg)):
        # The K/V probe runs a forward of the real weights (TextEncoder.check_kv); describe reads shapes.
        print("(whether deep fusion can read this LLM's K/V is checked when its weights load: train, sample)")
    unloaded = _unloaded_templates(cfg, model)
    if unloaded:
        print(
            f"(the text tokens below leave out the template's tokens of {', '.join(unloaded)}: describe does "
            "not download hub tokenizers; a local folder as the section's tokenizer or model_id counts them)"
        )
    for size, c in costs:
        print(
            f"{size} px ({c['image']} image + {c['text']} text tokens): DiT forward {_flop(c['dit'])}, "
            f"LLM forward {_flop(c['llm'])}, training {_flop(c['training'])} per image"
        )
    if stage_lines:
        print("\n".join(stage_lines))
    return 0


def cmd_config(args) -> int:
    cfg = _config(args)
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_presets(args) -> int:
    print("\n".join(preset_names()))
    return 0


def _add_describe_parser(sub) -> None:
    sp = sub.add_parser(
        "describe", help="architecture summary and parameter counts (built on the meta device)"
    )
    _add_config_args(sp)
    sp.set_defaults(func=cmd_describe)


def _add_config_parser(sub) -> None:
    sp = sub.add_parser(
        "config",
        help="print the resolved config, checked key by key (`fusedit describe` also checks it against the "
        "LLM's shape, e.g. model.initial_layers)",
    )
    _add_config_args(sp)
    sp.set_defaults(func=cmd_config)


def _add_presets_parser(sub) -> None:
    sp = sub.add_parser("presets", help="list the named presets")
    sp.set_defaults(func=cmd_presets)
