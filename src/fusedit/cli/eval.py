"""`fusedit eval` (the shapes bench and the published protocols), `benchmarks`, `fid` and `clip-score`, and
where evaluations write their results."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fusedit.cli.common import (
    GO_ON,
    _add_relocate_flag,
    _check_sampling_flags,
    _kept_on_interrupt,
    _out_folder,
    _relocations,
    _saved_model,
    _scoring_line,
    log,
)
from fusedit.config import Config, ConfigError
from fusedit.files import counted, holding_folder

# `fusedit fid` warns below this many images in a folder, `fusedit eval --bench mjhq` below this many samples
# (or in a category).
FEW_FOR_FID = 1000


FID_CACHE = ".cache/fusedit-fid"


FEATURES_HELP = (
    "clean-fid's Inception TorchScript inception-2015-12-05.pt (a .pt file, or a folder holding it) for the "
    "standard FID, or a transformers vision model hub id or folder (CLIP, DINOv2, ...)"
)


# The `fusedit eval` flags that only some benches read: given with another bench, they would be ignored.
_BENCH_FLAGS = {
    "per_category": ("shapes", "mjhq"),
    "prompts": ("geneval", "dpg", "mjhq", "t2i-compbench"),
    "detector": ("geneval", "t2i-compbench"),
    "clip": ("geneval", "t2i-compbench"),
    "vqa": ("dpg", "t2i-compbench"),
    "size": ("geneval", "dpg", "mjhq", "t2i-compbench"),
    "categories": ("t2i-compbench",),
    "per_prompt": ("t2i-compbench",),
    "limit": ("geneval", "dpg"),
    "noun_phrases": ("t2i-compbench",),
    "reference": ("mjhq",),
    "features": ("mjhq",),
    "cache_dir": ("mjhq",),
}


# The benchmarks with an official layout and prompt data (eval.run); shapes is fusedit's own.
_PROTOCOLS = ("geneval", "dpg", "mjhq", "t2i-compbench")


def cmd_eval(args) -> int:
    from fusedit.eval.run import EVAL_LOCK
    from fusedit.sampling.generation import check_seed
    from fusedit.sampling.source import check_sampling_source, load_sampling_model
    from fusedit.system import resolve_device

    # Checked before the (possibly slow) model load, so a typo fails at once. The parser's default of each
    # of these flags is None, so only the flags given count.
    for name, benches in _BENCH_FLAGS.items():
        if getattr(args, name) is not None and args.bench not in benches:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} does not apply to --bench {args.bench} (allowed with: "
                f"{' or '.join(f'--bench {b}' for b in benches)})"
            )
    if args.bench in _PROTOCOLS and not args.prompts:
        raise ConfigError(
            f"--bench {args.bench} needs --prompts PATH (get a copy with `fusedit benchmarks download {args.bench}`)"
        )
    for flag, value in (
        ("--per-category", args.per_category),
        ("--per-prompt", args.per_prompt),
        ("--limit", args.limit),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} is not allowed (allowed: 1 or more)")
    _check_sampling_flags(args)
    if args.seed is not None:
        check_seed(args.seed, name="--seed")
    given_out = _out_folder(args.out) if args.out else None
    if args.cache_dir:  # written after all the sampling: a file there would fail only then
        _out_folder(args.cache_dir, "--cache-dir")
    device = resolve_device(args.device, "--device")
    relocate = _relocations(args)
    check_sampling_source(args.model, not args.no_ema, relocate)

    def load(where):
        log.info("loading %s ...", where)  # a 2B model takes a minute, under a progress bar that waits
        return load_sampling_model(where, device, use_ema=not args.no_ema, relocate=relocate)

    # MODEL is resolved once: the record, the scores and the load all name this folder, however the run's
    # latest checkpoint moves (or rotation deletes the one before) while it is evaluated during training.
    saved, model = _saved_model(args.model), None
    if saved is None:  # no config readable without the weights: the load says what the folder lacks
        model, cfg, where = load(args.model)
        ema = cfg.sample.use_ema
    else:
        cfg, where = saved
        ema = _loads_ema(cfg, where, not args.no_ema)
    out = given_out or _out_folder(_eval_folder(args.model, where, ema) / args.bench)
    # One eval job per folder: a second one started meanwhile could replace the record of what the first
    # is making, or score its half-written folder.
    with holding_folder(out, EVAL_LOCK, "evaluating"):
        return _eval_into(args, out, model, cfg, where, ema, device, load)


def _eval_into(args, out: Path, model, cfg: Config, where: Path, ema: bool, device, load) -> int:
    """cmd_eval's work into ``out``, which this job holds (holding_folder)."""
    from fusedit.eval.shapes_bench import (
        bench_settings,
        bench_source,
        markdown_table,
        row_name,
        run_shapes_bench,
        trained_kinds,
        untrained_note,
    )

    scoring = _scoring_line(where, ema, not args.no_ema)
    if args.bench in _PROTOCOLS:
        from fusedit.eval.run import ProtocolGenerator

        # Before the folder's record is compared or written: the load comes only at the first image (the
        # protocol's checks of prompts and kept images come first; scoring again loads no model).
        settings, record = _eval_record(args, cfg, where, ema, device)
        _check_eval_folder(args, out, record, where)  # another generation's images: refused before the load
        extractor = _mjhq_scorer(args, device, out) if args.bench == "mjhq" else None
        if model is None:
            gen = ProtocolGenerator.lazy(lambda: load(where)[0], settings, cfg)
        else:
            gen = ProtocolGenerator(model, settings, cfg)
        print(scoring, flush=True)
        with _kept_on_interrupt(lambda: _protocol_kept(args.bench, out, where, args.model)):
            return _eval_protocol(args, gen, record, out, device, extractor, where)
    print(scoring, flush=True)
    if model is None:
        model, cfg, where = load(where)
    settings = bench_settings(
        cfg, per_category=args.per_category, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    # The bench writes its files at the end: an interruption keeps what an earlier bench wrote there.
    earlier = (
        "an earlier bench's scores there are kept" if (out / "scores.json").is_file() else "nothing is kept"
    )
    with _kept_on_interrupt(
        f"{earlier} (the bench writes {out} at its end); rerun the same command to start again"
    ):
        name = row_name(where, cfg.sample.use_ema)
        trained = trained_kinds(where)
        scores = run_shapes_bench(
            model,
            out_dir=out,
            name=name,
            progress=not args.quiet,
            source=bench_source(where, cfg.sample.use_ema),
            trained_kinds=trained,
            **settings,
        )
    # The table as scores.md has it, its note on untrained categories said once, in the line below.
    print(markdown_table(name, scores, note=False), end="")
    untrained = scores.get("untrained")
    note = ""
    if untrained:  # all of them for a run never trained on the shapes world ([]), which the note says
        note = f" ({untrained_note(untrained, len(scores['per_category']))})"
    print(
        f"overall {scores['overall']:.3f} on {scores['num_images']} held-out prompts{note}; details in {out}"
    )
    return 0


def _loads_ema(cfg: Config, where: Path, asked: bool) -> bool:
    """Whether the model read from ``where`` samples with EMA weights, known before its load: a pipeline
    folder holds the weights it was exported with (its recorded sample.use_ema); a checkpoint its EMA when
    ``asked`` and saved (a converted run has none, and its raw weights load: checkpoints.load_weights)."""
    from fusedit.checkpoints import holds_ema

    if (where / "model_index.json").is_file():
        return cfg.sample.use_ema
    return asked and holds_ema(where)


def _eval_folder(model: str, where: Path, ema: bool) -> Path:
    """The folder `fusedit eval` writes each bench's results under by default: a run's or checkpoint's go to
    RUN/eval/<checkpoint>[-raw], one per checkpoint and weights, so that evals of successive checkpoints and
    of the EMA and raw weights never meet in one folder, and none lies inside a checkpoint folder, which
    train.keep_checkpoints deletes (a checkpoint folder outside a run, never rotated, holds its own
    CKPT/eval/<name>). A pipeline folder holds one model: MODEL/eval."""
    if (where / "model_index.json").is_file():
        return Path(model) / "eval"
    from fusedit.checkpoints import run_of

    return (run_of(where) or where) / "eval" / (where.name + ("" if ema else "-raw"))


def _check_eval_folder(args, out: Path, record: dict, where: Path) -> None:
    """eval.run.check_protocol_folder, whose refusal of images made with another checkpoint names that
    checkpoint's folder, when it is still there with the same weights, as the way to finish them."""
    from fusedit.checkpoints import weights_fingerprint
    from fusedit.eval.run import RecordMismatch, check_protocol_folder

    try:
        check_protocol_folder(out, args.bench, record, _eval_seed(args), args.per_prompt, args.categories)
    except RecordMismatch as e:
        # Named only where the checkpoint is all that differs (another seed or bench would be refused
        # again) and its folder is still there with the weights that made the images.
        other = where.parent / str(e.saved.get("checkpoint"))
        if not (
            "checkpoint" in e.changed
            and set(e.changed) <= {"checkpoint", "weights"}
            and (other / "state.json").is_file()
            and weights_fingerprint(other) == e.saved.get("weights")
        ):
            raise
        raise ConfigError(f"{e}; to finish it, evaluate {other} with --out {out}") from None


def _protocol_kept(bench: str, out: Path, where: Path, model: str) -> str:
    """What an interrupted protocol run leaves in ``out``: its images (DPG-Bench's grids), counted, and how
    to go on: the same command, unless MODEL is a run folder, whose latest checkpoint may move on (rerun,
    it would score that one into another folder): then the checkpoint ``where`` it scored."""
    from fusedit.eval.run import IMAGES

    unit = "grid" if bench == "dpg" else "image"
    folders = list(out.glob("*/samples")) if bench == "t2i-compbench" else [out / IMAGES[bench]]
    n = sum(1 for folder in folders if folder.is_dir() for _ in folder.rglob("*.png"))
    if not n:
        return f"no {unit} was written to {out}; rerun the same command to start"
    same = Path(model).resolve() == where.resolve() or (where / "model_index.json").is_file()
    go_on = GO_ON if same else f"to go on, evaluate {where} with --out {out}"
    return f"{counted(n, unit)} in {out} {'is' if n == 1 else 'are'} kept; {go_on}"


def _eval_seed(args) -> int:
    return 42 if args.seed is None else args.seed  # GenEval and DPG-Bench fix seed 42


def _mjhq_scorer(args, device, out: Path):
    """The FID feature extractor of `--bench mjhq`, with its reference folder listed: both before the
    model loads, so that a wrong path fails at once rather than after the samples; and the warning that
    the samples are too few for FID (overall, or in a category the line's per-category FIDs read), before
    the hours of sampling, as `fusedit fid` warns before reading its folders."""
    from collections import Counter

    from fusedit.eval.benchmarks import load_mjhq
    from fusedit.eval.inception import feature_extractor
    from fusedit.eval.mjhq import check_scoring, reference_files, select

    check_scoring(args.reference, args.features, args.per_category)
    if args.reference is None:
        return None
    rows = select(load_mjhq(args.prompts), args.per_category)
    reference_files(args.reference, sorted({r["category"] for r in rows}))
    what, counts = f"the MJHQ-30K sample set in {out}", Counter(r["category"] for r in rows)
    if len(rows) < FEW_FOR_FID:  # said of the whole set, it is said of every category
        _warn_few(what, len(rows))
    else:
        smallest = min(counts, key=counts.get)
        _warn_few(f"the {smallest} category of {what}", counts[smallest])
    return feature_extractor(args.features, device=device)


def _eval_record(args, cfg: Config, where: Path, ema: bool, device) -> tuple[dict, dict]:
    """The sampling settings of `fusedit eval --bench geneval|dpg|...` for a model of ``cfg`` read from
    ``where`` with its EMA weights or not (``ema``: as it loads, _loads_ema), and the record of what makes
    its images (eval.run.claim_folder), so that a rerun after more training does not keep (and score) the
    old ones. The text cache and CUDA graphs change no image beyond rounding, so they may differ between
    runs."""
    from fusedit.eval.shapes_bench import weights_record
    from fusedit.sampling.generation import IMAGE_NEUTRAL, sample_settings
    from fusedit.system import precision_name

    settings = sample_settings(cfg, steps=args.steps, guidance=args.guidance, image_size=args.size)
    kept = {k: v for k, v in settings.items() if k not in IMAGE_NEUTRAL}
    record = {
        **weights_record(Path(where), ema),
        **kept,
        "precision": precision_name(settings["precision"], device),
        # Informational (eval.run.INFORMATIONAL, not compared on resume): which folder, wherever --out is.
        "model": str(Path(where).resolve()),
    }
    return settings, record


def _eval_protocol(args, gen, record: dict, out: Path, device, extractor=None, where=None) -> int:
    """A protocol run with the generator ``gen`` (eval.run.ProtocolGenerator) whose model (read from
    ``where``) and settings ``record`` describes, and the lines that report it."""
    from fusedit.eval import run
    from fusedit.sampling.generation import warn_cut_prompts

    # What each protocol takes beyond what they all take (below).
    protocols = {
        "geneval": (run.run_geneval, {"detector": args.detector, "clip": args.clip, "limit": args.limit}),
        "dpg": (run.run_dpg, {"vqa": args.vqa, "limit": args.limit}),
        "mjhq": (
            run.run_mjhq,
            {
                "reference": args.reference,
                "features": extractor,
                "cache_dir": Path(args.cache_dir or FID_CACHE),
                "per_category": args.per_category,
            },
        ),
        "t2i-compbench": (
            run.run_compbench,
            {
                "vqa": args.vqa,
                "clip": args.clip,
                "detector": args.detector,
                "n_per_prompt": args.per_prompt,
                "categories": args.categories,
                "text": args.noun_phrases or "rules",
            },
        ),
    }
    protocol, own = protocols[args.bench]
    r = protocol(
        gen,
        args.prompts,
        out,
        seed=_eval_seed(args),
        device=device,
        progress=not args.quiet,
        record=record,
        **own,
    )
    # GenEval's and DPG-Bench's counts are of prompts (4 images each), the others' of images.
    total = counted(r["generated"] + r["skipped"], r["unit"].removesuffix("s"))
    print(f"{args.bench}: wrote {out} ({total}: {r['generated']} generated, {r['skipped']} already there)")
    if gen.truncated:  # of the prompts sampled in this run
        warn_cut_prompts(gen.truncated, gen.prompts, gen.model.limits_of(gen.cut_limits))
    if gen.unknown:
        log.warning(
            "%d of the %d prompts sampled had words the built-in word tokenizer reads as <unk>: the model "
            "never read them, so their scores say little",
            gen.unknown,
            gen.prompts,
        )
    if args.bench == "mjhq" and "scores" in r:
        scores = r["scores"]
        worst = max(scores["categories"], key=scores["categories"].get)
        label = _distance_label(scores["features"], args.features)
        print(
            f"{label}: {scores['overall']:.3f} over {scores['samples']} samples; per category {worst} is "
            f"highest at {scores['categories'][worst]:.3f}; details in {r['scores_file']}"
        )
    elif args.bench == "dpg" and "scores" in r:
        part = _scored_part(args, r["scores"])
        # DPG-Bench publishes the mean x 100 (ELLA's scorer prints it so); scores.json keeps [0, 1].
        print(
            f"DPG-Bench score {100 * r['scores']['overall']:.2f} (x100, as published){part}; details in "
            f"{r['scores_file']}"
        )
    elif "scores" in r:
        part = _scored_part(args, r["scores"])
        print(f"overall {r['scores']['overall']:.4f}{part}; details in {r['scores_file']}")
    elif args.bench in _UNSCORED:
        print(_unscored_line(args, out, where))
    return 0


# What scores a GenEval or DPG-Bench run written without scoring models: the flags (with the models the
# papers' scorers use, or their closest transformers ports) and the official script, on the image folder.
_UNSCORED = {
    "geneval": (
        [
            "--detector",
            "facebook/mask2former-swin-small-coco-instance",
            "--clip",
            "openai/clip-vit-large-patch14",
        ],
        "GenEval's evaluation/evaluate_images.py",
    ),
    "dpg": (["--vqa", "Salesforce/blip-vqa-capfilt-large"], "ELLA's dpg_bench/compute_dpg_bench.py"),
}


# The `fusedit eval` flags a scoring rerun does not repeat as given: the command places MODEL (the checkpoint
# it scored), --bench, --prompts and --out itself and appends the scoring flags; --quiet is the user's own.
# Every other flag given (sampling, --seed, --limit, --no-ema, --relocate, --device, ...) is repeated, so a
# flag the record depends on, added later, is not forgotten.
_NOT_REPEATED = ("model", "bench", "prompts", "out", "quiet", "detector", "clip", "vqa")


def _repeated_flags(args) -> list[str]:
    """The flags of ``args`` (a `fusedit eval` command) that a rerun scoring its images repeats: each one
    given (its value not the parser's default), as the parser reads it back."""
    import argparse

    words: list[str] = []
    for action in _add_eval_parser(argparse.ArgumentParser().add_subparsers()):
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or action.dest in _NOT_REPEATED:
            continue  # not given, or placed by the caller
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch (--no-ema)
            words.append(flag)
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            words += [flag, *map(str, value)]
        elif isinstance(value, list):  # repeatable (--relocate): once per value
            words += [w for v in value for w in (flag, str(v))]
        else:
            words += [flag, str(value)]
    return words


def _unscored_line(args, out: Path, where) -> str:
    """The line ending a GenEval or DPG-Bench run without scoring models: nothing was scored, and the
    command that scores the images kept in ``out`` (the checkpoint ``where`` and every flag given that made
    them, so it reuses them and loads no model) or the official script."""
    from fusedit.eval.run import IMAGES

    scoring, script = _UNSCORED[args.bench]
    words = ["fusedit", "eval", str(where or args.model), "--bench", args.bench, "--prompts", args.prompts]
    words += ["--out", str(out), *_repeated_flags(args), *scoring]
    flags = " / ".join(w for w in scoring if w.startswith("--"))
    # An unscored DPG-Bench run reads the prompts alone; scoring reads the question file too.
    needs = (
        " (it needs DPG-Bench's dpg_bench.csv in or beside the prompts folder)" if args.bench == "dpg" else ""
    )
    return (
        f"{args.bench}: the images were not scored (no {flags}); score them with `{shlex.join(words)}`{needs}, "
        f"or with {script} on {out / IMAGES[args.bench]}"
    )


def _distance_label(extractor_id: str, features) -> str:
    """`fusedit fid`'s name for a Frechet distance over the features ``extractor_id`` (given as
    ``features``): FID only over clean-fid's Inception, the published metric; else FD with the feature model
    named, a number not comparable with published FIDs."""
    from fusedit.eval.inception import INCEPTION_ID

    return "FID (clean-fid Inception)" if extractor_id == INCEPTION_ID else f"FD ({features} features)"


def _warn_few(what: str, n: int) -> None:
    """Warn when ``what`` holds fewer than FEW_FOR_FID images: the covariance of N images has rank N-1 at
    most, far below the feature width, so the distance is mostly small-sample bias, comparable only between
    runs with the same N."""
    if n < FEW_FOR_FID:
        log.warning(
            "%s holds %d images: FD over fewer than %d images is dominated by small-sample bias (published "
            "FID uses 10k-50k); compare only scores over the same number",
            what,
            n,
            FEW_FOR_FID,
        )


def _scored_part(args, scores: dict) -> str:
    """What a protocol's overall is taken over, with the part of the benchmark it leaves out, if any: its
    mean over a few tasks or categories is not the benchmark's overall. A --limit that takes every prompt
    is a full run (``scores["limit"]`` None)."""
    from fusedit.eval.compbench import CATEGORIES
    from fusedit.eval.geneval import TASKS

    limit = scores.get("limit")
    parts = [f"the first {limit}: --limit {limit}"] if limit is not None else []
    if args.bench == "geneval" and scores.get("missing_tasks"):
        tasks = [t for t in TASKS if t not in scores["missing_tasks"]]
        parts.append(f"{len(tasks)} of {len(TASKS)} tasks: {', '.join(tasks)}")
    if args.bench == "dpg" and scores.get("missing"):
        total = scores["num_prompts"] + len(scores["missing"])
        parts.append(f"{scores['num_prompts']} of the question file's {total}")
    if args.bench == "t2i-compbench" and len(scores["per_category"]) < len(CATEGORIES):
        parts.append(
            f"{len(scores['per_category'])} of {len(CATEGORIES)} categories: {', '.join(scores['per_category'])}"
        )
    over = f" over {counted(scores['num_prompts'], 'prompt')}" if "num_prompts" in scores else ""
    return over + (f" ({'; '.join(parts)})" if parts else "")


def cmd_benchmarks(args) -> int:
    from fusedit.eval.benchmarks import download

    if args.images and args.name != "mjhq":
        raise ConfigError(f"--images applies to mjhq only (its FID reference images), not {args.name}")
    path = download(
        args.name,
        _out_folder(args.dest or f"benchmarks-data/{args.name}", "--dest"),
        force=args.force,
        progress=not args.quiet,
        images=args.images,
    )
    print(f"{args.name} prompts in {path}")
    if args.name == "mjhq" and args.images:
        print(
            f"reference images in {path / 'mjhq30k_imgs'} (give it to `fusedit eval --bench mjhq --reference`)"
        )
    return 0


def cmd_fid(args) -> int:
    from fusedit.eval.fid import ReferenceStats, fid_score, folder_source, list_images
    from fusedit.eval.inception import feature_extractor

    def images(folder: str, what: str) -> list[Path]:
        found = list_images(folder)
        if len(found) < 2:  # one image has no covariance
            raise ConfigError(
                f"the {what} folder {folder!r} holds 1 image (allowed: a folder of at least 2 images)"
            )
        _warn_few(f"the {what} folder {folder!r}", len(found))
        return found

    # Both folders are listed before the feature model loads, so a wrong path fails at once. The reference
    # is listed even when its stats are cached: the listing (names, sizes and each file's first 4 KiB, no
    # decoding) is what tells whether the cache still describes this folder.
    samples = images(args.samples, "samples")
    reference_files = images(args.reference, "reference")
    cache_dir = _out_folder(args.cache_dir, "--cache-dir")
    extractor = feature_extractor(args.features)
    reference = ReferenceStats.cached(
        args.reference_name,
        reference_files,
        extractor,
        cache_dir,
        reference=folder_source(args.reference, reference_files),
    )
    value = fid_score(samples, reference, extractor)
    print(f"{_distance_label(extractor.id, args.features)}: {value:.4f}")
    return 0


def cmd_clip_score(args) -> int:
    from fusedit.eval.fid import ClipScore, clip_scores, is_sample_image, mean_clip_score

    def prompt_of(meta: Path) -> str:
        try:
            prompt = json.loads(meta.read_text(encoding="utf-8")).get("prompt")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            prompt = None
        if not isinstance(prompt, str):
            raise ConfigError(
                f"{str(meta)!r} has no prompt (allowed: the JSON object `fusedit sample` writes beside each "
                'image, with "prompt": "...")'
            )
        return prompt

    if Path(args.samples).is_file():
        raise ConfigError(f"{args.samples!r} is a file (allowed: a `fusedit sample` output folder)")
    if not Path(args.samples).is_dir():
        raise FileNotFoundError(
            f"no such folder: {args.samples!r} (expected a `fusedit sample` output folder)"
        )
    paths = sorted(p for p in Path(args.samples).iterdir() if is_sample_image(p))  # this folder's, not below
    pairs = [(p, prompt_of(p.with_suffix(".json"))) for p in paths if p.with_suffix(".json").is_file()]
    if not pairs:
        raise ConfigError(f"no images with a prompt file (NNNNN.png + NNNNN.json) in {args.samples!r}")
    if len(pairs) < len(paths):  # a score over part of the folder must not read as the folder's
        lone = [p for p in paths if not p.with_suffix(".json").is_file()]
        log.warning(
            "%d of the %d images have no prompt file beside them (e.g. %s: no %s) and are left out",
            len(lone),
            len(paths),
            lone[0].name,
            lone[0].with_suffix(".json").name,
        )
    scores = clip_scores([p for p, _ in pairs], [q for _, q in pairs], ClipScore(args.clip))
    scored = int(scores.isfinite().sum())  # unreadable images are NaN, skipped with a warning
    print(f"CLIP score over {scored} image{'' if scored == 1 else 's'}: {mean_clip_score(scores):.3f}")
    return 0


class _Recorded:
    """A parser whose ``add_argument`` keeps the actions it returns (``actions``): argparse's own list is
    private, and the how-to-score line (``_repeated_flags``) reads the eval flags back."""

    def __init__(self, parser):
        self.parser, self.actions = parser, []

    def add_argument(self, *args, **kwargs):
        self.actions.append(self.parser.add_argument(*args, **kwargs))
        return self.actions[-1]


def _add_eval_parser(sub) -> list:
    """Adds `fusedit eval` to ``sub``; returns the argparse actions of its arguments, in order."""
    parser = sub.add_parser("eval", help="score a run, checkpoint or pipeline folder on a benchmark")
    sp = _Recorded(parser)
    sp.add_argument("model", help="run, checkpoint or pipeline folder (as for `fusedit sample`)")
    sp.add_argument("--bench", choices=["shapes", *_PROTOCOLS], default="shapes")
    sp.add_argument(
        "--per-category",
        type=int,
        help="shapes: held-out prompts per category (default 20); mjhq: prompts per category (default all 3000)",
    )
    sp.add_argument(
        "--prompts",
        help="geneval/dpg/mjhq/t2i-compbench: the prompt data (see `fusedit benchmarks download`)",
    )
    sp.add_argument(
        "--detector",
        help="geneval, t2i-compbench (spatial, complex): detector hub id or folder (e.g. a Mask2Former COCO model)",
    )
    sp.add_argument(
        "--clip",
        help="geneval: CLIP hub id or folder for colour classification; t2i-compbench (non_spatial, complex): "
        "the CLIP it scores with (openai/clip-vit-base-patch32)",
    )
    sp.add_argument(
        "--vqa",
        help="dpg: VQA model hub id or folder (BLIP/ViLT); t2i-compbench (color, shape, texture, complex): "
        "BLIP-VQA (Salesforce/blip-vqa-capfilt-large)",
    )
    sp.add_argument(
        "--categories",
        nargs="+",
        metavar="CATEGORY",
        help="t2i-compbench: color shape texture spatial non_spatial complex (default all)",
    )
    sp.add_argument(
        "--per-prompt", type=int, help="t2i-compbench: images per prompt (default 10, as published)"
    )
    sp.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="geneval/dpg: the first N prompts only, generated and scored into OUT/scores-firstN.json with "
        "their per-image results in OUT/results-firstN.jsonl (a quick subset: a full run's scores.json and "
        "results.jsonl stay; a later full run into the same --out keeps the images); an N at or above the "
        "benchmark's size is the full run",
    )
    sp.add_argument(
        "--noun-phrases",
        choices=["rules", "spacy"],
        help="t2i-compbench: noun phrases from built-in word lists (default) or spaCy (if installed, as published)",
    )
    sp.add_argument(
        "--reference", help="mjhq: the reference images (unzipped mjhq30k_imgs, one folder per category)"
    )
    sp.add_argument("--features", help=f"mjhq: FID features, as for `fusedit fid` ({FEATURES_HELP})")
    sp.add_argument("--cache-dir", help=f"mjhq: reference statistics cache (default {FID_CACHE})")
    sp.add_argument(
        "--size",
        type=int,
        help="geneval/dpg/mjhq/t2i-compbench: image side in pixels, square (default the model's)",
    )
    sp.add_argument(
        "--out",
        help="output folder (default RUN/eval/CHECKPOINT/BENCH for a run or checkpoint folder, "
        "RUN/eval/CHECKPOINT-raw/BENCH with --no-ema; MODEL/eval/BENCH for a pipeline folder)",
    )
    sp.add_argument("--steps", type=int)
    sp.add_argument("--guidance", type=float)
    sp.add_argument("--seed", type=int, help="default 0 for shapes, 42 for the published benchmarks")
    sp.add_argument("--no-ema", action="store_true")
    _add_relocate_flag(sp)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=cmd_eval)
    return sp.actions


def _add_benchmarks_parser(sub) -> None:
    sp = sub.add_parser("benchmarks", help="obtain benchmark prompt data from the official sources")
    bsub = sp.add_subparsers(dest="action", required=True)
    dp = bsub.add_parser("download", help="download GenEval, DPG-Bench, MJHQ-30K or T2I-CompBench prompts")
    dp.add_argument("name", choices=["geneval", "dpg", "mjhq", "t2i-compbench"])
    dp.add_argument(
        "--images", action="store_true", help="mjhq: also the 30,000 reference images for FID (large)"
    )
    dp.add_argument("--dest", help="folder (default benchmarks-data/NAME)")
    dp.add_argument("--force", action="store_true")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(func=cmd_benchmarks)


def _add_fid_parser(sub) -> None:
    sp = sub.add_parser("fid", help="Frechet distance of a sample folder to a reference folder")
    sp.add_argument("samples")
    sp.add_argument("--reference", required=True)
    sp.add_argument("--reference-name", required=True, help="name of the cached reference statistics")
    sp.add_argument("--features", required=True, help=FEATURES_HELP)
    sp.add_argument(
        "--cache-dir",
        default=FID_CACHE,
        help=f"folder of the cached reference statistics, reused while the reference folder and features "
        f"are unchanged (default {FID_CACHE}, under the current directory)",
    )
    sp.set_defaults(func=cmd_fid)


def _add_clip_score_parser(sub) -> None:
    sp = sub.add_parser("clip-score", help="CLIP score of a `fusedit sample` output folder")
    sp.add_argument("samples")
    sp.add_argument("--clip", required=True, help="CLIP hub id or folder")
    sp.set_defaults(func=cmd_clip_score)
