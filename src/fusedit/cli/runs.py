"""`fusedit convert`, `study`, `export`, `consolidate` and `cache-latents`: the subcommands that write run
folders, or turn a run (or a dataset) into another form."""

from __future__ import annotations

import time
from pathlib import Path

from fusedit.cli.common import (
    GO_ON,
    _add_config_args,
    _add_relocate_flag,
    _config,
    _kept_on_interrupt,
    _out_folder,
    _relocations,
    _scoring_line,
)
from fusedit.config import ConfigError, save_config, with_model_llm_fields
from fusedit.files import check_output_folder, counted, replacing


def _latents_kept(out: Path) -> str:
    """What an interrupted cache-latents kept: its finished shards that hold samples (a cache with none
    starts over on a rerun, data.latents._check_meta)."""
    from fusedit.data.latents import finished_shards

    kept = sum(bool(shard["samples"]) for shard in finished_shards(out)) if out.is_dir() else 0
    if not kept:
        return f"no shard was finished yet in {out}; rerun the same command to start again"
    return f"{counted(kept, 'finished shard')} in {out} {'is' if kept == 1 else 'are'} kept; {GO_ON}"


def cmd_cache_latents(args) -> int:
    import torch

    from fusedit.data.latents import cache_latents
    from fusedit.system import resolve_device

    cfg = _config(args)
    out = _out_folder(args.out)
    with _kept_on_interrupt(lambda: _latents_kept(out)):
        summary = cache_latents(
            cfg.data,
            cfg.vae,
            out,
            args.batch_size,
            args.shard_size,
            resolve_device(args.device, "--device"),
            progress=not args.quiet,
            seed=cfg.train.seed,
            dtype=getattr(torch, args.dtype),
        )
    print(summary["report"])
    # The cache holds the VAE's latents: training must name the same VAE (check_latents refuses another).
    print(
        f"train on them with the same config and vae.* settings plus: data.source=latents data.latents_dir={args.out}"
    )
    return 0


def cmd_convert(args) -> int:
    from fusedit.convert.fusedit_official import load_official, official_tokenizer, official_vae
    from fusedit.train.checkpoint import save_checkpoint

    # Asked before load_official builds and loads the model, which takes minutes for the 4.6B release.
    out = _out_folder(args.out)
    earlier = _converted(out)
    if not earlier:
        check_output_folder(out, "a converted run", "an earlier conversion's folder")
    if not args.vae and official_vae(args.path, args.config) is None:
        raise ConfigError(
            f"{args.path!r} has no VAE: pass --vae (e.g. stabilityai/stable-diffusion-3-medium-diffusers "
            "--vae-subfolder vae, the VAE FuseDiT was trained with)"
        )
    # A run saved without one would sample with the built-in word tokenizer: the ids of another vocabulary.
    tokenizer = args.tokenizer or official_tokenizer(args.path, args.config, args.llm or "")
    if not tokenizer:
        raise ConfigError(
            f"{args.path!r} names no tokenizer (no tokenizer/ folder, and its base_config names no LLM): pass "
            "--tokenizer (the hub id or folder of the LLM it was trained with, e.g. google/gemma-2b)"
        )
    cfg, model = load_official(
        args.path,
        config=args.config,
        tokenizer=tokenizer,
        vae=args.vae or "",
        vae_subfolder=args.vae_subfolder or "",
        llm=args.llm or "",
        max_length=args.max_length,
        padding_side=args.padding_side,
        weights_only=not args.trust_pickle,
    )
    weights = model.denoiser.state_dict()
    # Written beside ``out`` and swapped in whole: a redo (e.g. another --vae or --max-length) killed at
    # any point leaves the earlier conversion or the new one, never a run folder missing weights.
    llm = None if cfg.text.model_id else model.text.llm
    # As a trained run saves it (its LLM's own family and arch), in the checkpoint and beside it: the folder
    # is a config base too.
    saved = with_model_llm_fields(cfg)
    with replacing(out) as tmp:
        ckpt = out / save_checkpoint(tmp, 0, saved, model.denoiser, weights, None, llm).relative_to(tmp)
        save_config(saved, tmp / "config.yaml")
    print(f"converted {args.path} -> {ckpt}; sample with: fusedit sample {args.out} --prompt ...")
    return 0


def _converted(out: Path) -> bool:
    """Whether ``out`` is what `fusedit convert` writes: a run folder whose only checkpoint is step 0 (with
    the run's config.yaml, or without it as before 2b20aca)."""
    checkpoints = out / "checkpoints"
    return (
        checkpoints.is_dir()
        and {p.name for p in out.iterdir()} <= {"checkpoints", "config.yaml"}
        and {p.name for p in checkpoints.iterdir()} <= {"latest", "step_00000000"}
        and (checkpoints / "step_00000000" / "state.json").is_file()
    )


def cmd_study(args) -> int:
    from fusedit.study.file import load_study
    from fusedit.study.run import chosen_designs, describe_study, run_study, statuses_text
    from fusedit.system import resolve_device

    # A design label is a word without '=': overrides typed after --only's labels (`--only a b
    # train.steps=5`) land in its list, and are overrides all the same.
    only = None if args.only is None else [word for word in args.only if "=" not in word]
    overrides = [*args.overrides, *(word for word in args.only or () if "=" in word)]
    study = load_study(args.study, device=args.device, overrides=overrides)
    if only == []:  # `--only key=value`: argparse gave --only the overrides alone
        labels = ", ".join(d.label for d in study.designs)
        raise ConfigError(f"--only names no design (allowed: one or more of {labels}, before any key=value)")
    chosen = [d.label for d in chosen_designs(study, only)]
    if args.device:  # else the first design's training refuses it, after the output folder is made
        resolve_device(args.device, "--device")
    out = _out_folder(args.out or f"runs/studies/{study.name}")
    if args.check:  # what the run would do, from the run's own checks and decisions; nothing is made
        print(describe_study(study, only=only, out_dir=out))
        return 0
    t0 = time.time()
    try:
        r = run_study(study, out, progress=not args.quiet, only=only)
    except KeyboardInterrupt as e:  # run_study's line names the design interrupted and what it keeps
        # A Ctrl+C outside its loop (loading, checks, the report) carries no line of its own.
        kept = str(e) or f"what is done in {out} is kept (each design's checkpoints and scores)"
        raise KeyboardInterrupt(f"{kept}; {GO_ON}") from None
    print("\n".join(line for line in (out / "report.md").read_text().splitlines() if line.startswith("|")))
    pending = f"; pending: {', '.join(r['pending'])}" if r["pending"] else ""
    count = f"{len(chosen)} of {len(study.designs)}" if len(chosen) < len(study.designs) else len(chosen)
    print(
        f"study {r['name']}: {count} designs in {time.time() - t0:.0f}s: "
        f"{statuses_text(r['designs'], chosen)}{pending}"
    )
    print(f"  report:  {out / 'report.md'}")
    print(f"  plots:   {out / 'loss_curves.png'}, {out / 'scores.png'}")
    print(f"  samples: {out / 'samples.png'} (per design: {out / 'grids'})")
    return 0


def cmd_export(args) -> int:
    from fusedit.checkpoints import holds_ema
    from fusedit.pipeline import export_run
    from fusedit.sampling.source import model_folder
    from fusedit.system import resolve_device

    out, device = _out_folder(args.out), resolve_device(args.device, "--device")
    use_ema, relocate = not args.no_ema, _relocations(args)
    source = Path(args.model)
    # A pipeline folder goes to export_run as it is, which says why it is refused.
    if not (source / "model_index.json").is_file():
        # Refused as `fusedit sample` refuses it: a run without a finished checkpoint is named as such.
        # Resolved once: a run still training moves its latest checkpoint on while this one is exported.
        source = model_folder(source, use_ema, relocate)
        print(_scoring_line(source, use_ema and holds_ema(source), use_ema, "exporting"), flush=True)
    out = export_run(source, out, use_ema=use_ema, device=device, relocate=relocate)
    print(f"wrote a diffusers pipeline folder to {out} (load it with fusedit.pipeline.FuseDiTPipeline)")
    return 0


def cmd_consolidate(args) -> int:
    from fusedit.train.checkpoint import consolidate_checkpoint

    out = consolidate_checkpoint(args.model, _out_folder(args.out))
    print(f"wrote the plain single-process checkpoint {out} (safetensors weights and EMA, optimizer.pt)")
    return 0


def _add_study_parser(sub) -> None:
    sp = sub.add_parser("study", help="train, score and compare several designs under one recipe")
    sp.add_argument("study", help="study YAML file (see studies/)")
    sp.add_argument(
        "overrides",
        nargs="*",
        help="section.key=value overrides of the study's base, for every design (e.g. train.steps=5)",
    )
    sp.add_argument("--out", help="output folder (default runs/studies/<name>); running it again resumes")
    sp.add_argument("--device", help="train.device for every design (default: each config's, auto)")
    sp.add_argument(
        "--only",
        nargs="+",
        metavar="DESIGN",
        help="train and score only these designs; the report keeps the others an earlier call finished",
    )
    sp.add_argument(
        "--check",
        action="store_true",
        help="validate, print each design's size and cost and what the run into --out would do with it; "
        "train nothing",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_study)


def _add_export_parser(sub) -> None:
    sp = sub.add_parser("export", help="write a run or checkpoint as a diffusers pipeline folder")
    sp.add_argument("model", help="run folder or checkpoint folder")
    sp.add_argument("--out", required=True)
    sp.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    _add_relocate_flag(sp)
    sp.add_argument(
        "--device",
        default="cpu",
        help="where the model loads to be written: auto, cpu, cuda, ... (default cpu)",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_export)


def _add_consolidate_parser(sub) -> None:
    sp = sub.add_parser(
        "consolidate", help="turn a distributed (DCP) checkpoint into the plain one-process format"
    )
    sp.add_argument("model", help="run folder or checkpoint folder of a torchrun run")
    sp.add_argument("--out", required=True, help="the checkpoint folder to write")
    sp.set_defaults(func=cmd_consolidate)


def _add_convert_parser(sub) -> None:
    sp = sub.add_parser("convert", help="import a public FuseDiT checkpoint (folder, pipeline or raw file)")
    sp.add_argument(
        "path", help="transformer folder, pipeline folder, model.pt.zst/ema.pt.zst or DeepSpeed file"
    )
    sp.add_argument("--out", required=True, help="fusedit run folder to write")
    sp.add_argument("--config", help="the public config.json when it is not next to the weights")
    sp.add_argument("--tokenizer", help="tokenizer hub id or folder (default: the pipeline's or the LLM's)")
    sp.add_argument("--vae", help="VAE hub id or folder (default: the pipeline's)")
    sp.add_argument("--vae-subfolder")
    sp.add_argument("--llm", help="LLM hub id or folder when the checkpoint holds no LLM weights")
    sp.add_argument("--max-length", type=int, default=256)
    sp.add_argument("--padding-side", choices=["left", "right"])
    sp.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a pickled *.pt/*.bin file with weights_only=False: only for a file you trust (unpickling "
        "can run code)",
    )
    sp.set_defaults(func=cmd_convert)


def _add_cache_latents_parser(sub) -> None:
    sp = sub.add_parser("cache-latents", help="pre-encode a dataset with the config's VAE into latent shards")
    _add_config_args(sp)
    sp.add_argument("--out", required=True, help="the cache folder (train on it with data.source=latents)")
    sp.add_argument("--batch-size", type=int, default=32, help="images the VAE encodes at once (default 32)")
    sp.add_argument(
        "--shard-size", type=int, default=1000, help="samples per latents-NNNNNN.safetensors file"
    )
    sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    sp.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="the stored latents' type: float16/bfloat16 halve the disk (default float32)",
    )
    sp.add_argument("--quiet", action="store_true")
    sp.set_defaults(func=cmd_cache_latents)
