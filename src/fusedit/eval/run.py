"""Run the standard benchmark protocols on a fusedit model (design-space.md s.4): generate in each
benchmark's official layout, then score with the built-in scorers when their models are given.

GenEval: 4 images per prompt, seed 42, ``<index>/metadata.jsonl`` + ``<index>/samples/NNNNN.png`` (the
official scorer, github.com/djghosh13/geneval ``evaluation/evaluate_images.py``, runs on that folder for
the published numbers). DPG-Bench: one 2x2 grid per prompt, ``<name>.png``. MJHQ-30K: one image per
prompt, ``samples/<category>/<id>.png``, FID with clean-fid's Inception (``eval.mjhq``).

Generation resumes: images already in the output folder are kept. So that a rerun after more training (or
with other settings) never scores the old images, the folder records what made them (``generation.json``:
the checkpoint's name and a fingerprint of its weights, EMA or not, the sampling settings, seed) and a
rerun with a different record is refused. A folder recorded before 2026-11-25, when the fingerprint read
each weight file's first MiB only (blind to a retrain of the tensors past it), has another fingerprint and
is refused the same way. GenEval and DPG-Bench score exactly the prompts given (``limit``: the first N),
not every prompt folder or grid an earlier run left there; the scores of the first N go to
``scores-first<N>.json`` and their per-image verdicts to ``results-first<N>.jsonl`` (a whole run's:
``scores.json``, ``results.jsonl``; T2I-CompBench's ``--categories`` subset: ``scores-<categories>.json``),
so a quick subset or a rescore of it never replaces the whole benchmark's. Each scores file records what
made its images (the ``generation.json`` record) and what scored them (``scorers``: the model ids as given, a
fingerprint of a model folder). When a record without images is replaced, the scores and results that
described the images before go aside with it (``replaced-<n>/``).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from fusedit.config import ConfigError, check_whole, refuse_path_to_nothing
from fusedit.eval.fid import check_batch_size, results_beside, scorer_record
from fusedit.files import as_json_reads_back, first_free, read_json, sweep_temporaries, write_text_atomic
from fusedit.imaging import to_uint8
from fusedit.sampling.generation import (
    generate,
    latent_shape,
    negative_read,
    seeded_noise,
    unknown_words_note,
)

log = logging.getLogger("fusedit")


class ProtocolGenerator:
    """A ``generate(prompt, seed, n) -> [PIL images]`` callable over ``model`` for the protocol writers;
    ``settings`` are ``generate`` keyword arguments (``fusedit.sampling.generation.sample_settings``). Image k
    starts from the noise of ``seed + k`` alone, as in ``fusedit sample``: any benchmark image is made again
    by sampling its prompt with its seed, and a protocol that resumes per image (T2I-CompBench) makes the
    missing ones exactly as an uninterrupted run would.

    ``prompts`` counts the calls and ``truncated`` those whose prompt a text encoder cut to its limit (once
    per call, however many of its n images' rows were cut); ``cut_limits`` holds the limits that cut them
    (PromptCut.limits), which the warning names. Given the model's ``cfg``, ``unknown`` counts
    the calls whose prompt has words a built-in word tokenizer reads as <unk>: the first is warned about as
    it comes (a benchmark's prompts are the real world's, the tokenizer knows the shapes world's), the total
    at the end (``fusedit eval``), as the cuts. The negative prompt, the same in every call, is warned about
    at the first call, once, and not counted.

    ``lazy`` builds one whose model is loaded at the first image: the protocols check their prompts and
    kept images before generating, so those refusals come before a slow load, and a run whose images are
    all there (scoring again) loads no model at all."""

    def __init__(self, model, settings: dict, cfg=None):
        self._model, self._load, self.settings, self.cfg = model, None, settings, cfg
        self.prompts = self.truncated = self.unknown = 0
        self.cut_limits: set[str] = set()

    @classmethod
    def lazy(cls, load: Callable[[], object], settings: dict, cfg=None) -> ProtocolGenerator:
        """``load()`` returns the sampling model; it is called at the first image, once."""
        gen = cls(None, settings, cfg)
        gen._load = load
        return gen

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def __call__(self, prompt: str, seed: int, n: int) -> list[Image.Image]:
        noise = seeded_noise(
            [seed + k for k in range(n)], latent_shape(self.model, self.settings["image_size"])
        )
        # Cuts are counted here; `fusedit eval` warns about their total once, at the end.
        x, cut = generate(
            self.model, [prompt] * n, noise=noise, warn_cut=False, return_cut=True, **self.settings
        )
        self.prompts += 1
        self.truncated += bool(cut.prompts)
        self.cut_limits.update(cut.limits)
        self._count_unknown(prompt)
        return [Image.fromarray(a) for a in to_uint8(x)]

    def _count_unknown(self, prompt: str) -> None:
        if self.cfg is None:
            return
        if self.prompts == 1:  # the first call (__call__ counts it before this): the negative prompt, once
            negative = negative_read(self.settings)
            note = unknown_words_note(self.model, self.cfg, [], negative) if negative else None
            if note:
                log.warning("%s", note)
        note = unknown_words_note(self.model, self.cfg, [prompt])
        if note is None:
            return
        if not self.unknown:
            log.warning("%s; the benchmark's other prompts are counted at the end", note)
        self.unknown += 1


RECORD = "generation.json"
# The lock one eval job holds on its output folder (fusedit.files.holding_folder).
EVAL_LOCK = "eval.lock"
# Record keys that inform and are not compared on resume: "model", the absolute path of the checkpoint or
# pipeline folder, changes when a run is moved, which changes no image.
INFORMATIONAL = ("model",)
# Where each protocol writes its images under the out folder, and GenEval's images per prompt.
IMAGES = {"geneval": "samples", "dpg": "grids", "mjhq": "samples"}
GENEVAL_PER_PROMPT = 4


NOISE = "seed+k per image"


def protocol_record(record: dict, bench: str, seed: int, n_per_prompt: int | None = None) -> dict:
    """``record`` (the model and its sampling settings) with what the protocol run adds to it."""
    extra = {} if n_per_prompt is None else {"n_per_prompt": n_per_prompt}
    # "noise": how image k's starting noise follows from the seed (before 2026-11: one stream for a prompt's
    # n images), so that a folder of the earlier draw is not completed with images of this one.
    return {**record, "bench": bench, "seed": seed, "noise": NOISE, **extra}


def check_protocol_folder(
    out_dir: Path,
    bench: str,
    record: dict,
    seed: int,
    n_per_prompt: int | None = None,
    categories: Sequence[str] | None = None,
) -> None:
    """``claim_folder``'s refusal alone, for the ``run_*`` protocols with their default layout: the CLI
    checks it before the model loads. ``n_per_prompt`` (default the protocol's) and ``categories`` are
    T2I-CompBench's, whose categories each keep their own record."""
    if bench == "t2i-compbench":
        check_compbench_folder(out_dir, record, seed, n_per_prompt, categories)
        return
    n = GENEVAL_PER_PROMPT if bench == "geneval" else None
    check_claim(out_dir, out_dir / IMAGES[bench], protocol_record(record, bench, seed, n))


class RecordMismatch(ConfigError):
    """A folder's images were made by another generation: ``saved`` is its record, ``changed`` the keys in
    which it differs from the one asked for (sorted)."""

    def __init__(self, message: str, saved: dict, changed: list[str]):
        super().__init__(message)
        self.saved, self.changed = saved, changed


def check_claim(out_dir: Path, images: Path, record: dict) -> bool:
    """Raise when ``out_dir``'s ``images`` were made by another generation than ``record`` (as JSON reads
    it back) describes, or have no record; True when there are images, made as it describes."""
    record = as_json_reads_back(record)
    path = out_dir / RECORD
    if not (images.is_dir() and any(images.iterdir())):
        return False
    if not path.is_file():
        raise ConfigError(
            f"{images} holds images without a record of what made them ({RECORD}); give a new --out, or "
            "delete the folder to regenerate"
        )
    saved = read_json(path, "give a new --out, or delete the folder to regenerate")
    changed = record_changes(saved, record)
    if changed:
        k = changed[0]
        raise RecordMismatch(
            f"{out_dir} holds images made with {k}={saved.get(k)!r}, not {k}={record.get(k)!r} (see "
            f"{path}); give a new --out, or delete the folder to regenerate",
            saved,
            changed,
        )
    return True


def record_changes(saved: dict, record: dict) -> list[str]:
    """The keys (sorted) in which two generation records differ, the informational ones left out."""
    keys = sorted((set(saved) | set(record)) - set(INFORMATIONAL))
    return [k for k in keys if saved.get(k) != record.get(k)]


def claim_folder(
    out_dir: Path,
    images: Path,
    record: dict | None,
    bench: str,
    seed: int,
    n_per_prompt: int | None = None,
    fed: Sequence[Path] = (),
) -> dict | None:
    """Refuse ``out_dir`` when its ``images`` were made by another generation than ``record`` describes
    (with what the protocol run adds: ``protocol_record``); otherwise write that record there and return
    it, as written. ``record`` None (a caller-made generator whose settings are unknown) checks nothing.
    A record without images (a run that stopped before its first, or whose images were deleted) is
    replaced; when it differs (or cannot be read), the scores and results files beside it (a library
    scorer's default one of ``images`` too, ``fid.results_beside``), and the ``fed`` files elsewhere that
    its images' scores went into, are moved aside with it (``set_aside``). A record that matches is
    written again: its informational keys (the model's current path) are then the ones the scores
    record. The temporary files a kill -9 left beside the record and the scores go first."""
    sweep_temporaries(out_dir)
    if record is None:
        return None
    record = as_json_reads_back(protocol_record(record, bench, seed, n_per_prompt))
    if not check_claim(out_dir, images, record):  # with images, the record already matches
        set_aside(out_dir, record, [results_beside(images), *fed])
    write_text_atomic(out_dir / RECORD, json.dumps(record, indent=1))
    return record


def set_aside(out_dir: Path, record: dict, fed: Sequence[Path] = ()) -> Path | None:
    """Move ``out_dir``'s record and the scores and results files of the images it described (those in
    ``out_dir`` and the ``fed`` ones that exist) into ``out_dir/replaced-<n>`` (the first free n) when it
    differs from ``record`` or cannot be read, with a line saying so: next to the new record they would
    read as scores of the new images. Nothing is moved when no such file is there (a run stopped before
    its first image): the record is then only replaced. Returns the folder, or None."""
    path, record = out_dir / RECORD, as_json_reads_back(record)
    if not path.is_file():
        return None
    try:
        saved = read_json(path, "")
    except ConfigError:  # damaged: it describes no generation, so none of the files beside it is this one's
        said = f"{path} is not readable JSON and its images are gone"
    else:
        changed = record_changes(saved, record)
        if not changed:
            return None
        k = changed[0]
        said = f"{path} described other images ({k}={saved.get(k)!r}, now {record.get(k)!r}), which are gone"
    stale = [p for pattern in ("scores*.json", "results*.jsonl") for p in sorted(out_dir.glob(pattern))]
    stale += [p for p in fed if p.is_file()]
    if not stale:
        return None
    aside = first_free(out_dir, (f"replaced-{n}" for n in itertools.count(1)))
    aside.mkdir()
    for p in [path, *stale]:
        p.replace(aside / p.name)
    log.warning("%s: moved it and %d scores/results file(s) to %s", said, len(stale), aside)
    return aside


def output_files(
    out_dir: Path, limit: int | None = None, categories: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """The scores file and the per-image results file of a protocol run over the first ``limit`` prompts
    or T2I-CompBench's ``categories`` (None: all): ``scores.json`` and ``results.jsonl``, or
    ``scores-first<N>.json`` and ``results-first<N>.jsonl``, ``scores-color-spatial.json`` and (in each
    category's folder) ``results-color-spatial.jsonl``. Each scores file has its own results, so a subset
    or a rescore never overwrites the verdicts another scores file names; they lie in ``out_dir``, not
    among the images, where the official scorers read every file as a sample."""
    suffix = "" if limit is None else f"-first{limit}"
    if categories is not None:
        suffix = "-" + "-".join(categories)
    return Path(out_dir) / f"scores{suffix}.json", Path(out_dir) / f"results{suffix}.jsonl"


# Where fusedit wrote a protocol's per-image results before they moved beside the scores (2026-11): among
# the images, which the official scorers read as samples (ELLA's DPG script fails on the file, by name).
LEGACY_RESULTS = {"geneval": "results.jsonl", "dpg": "dpg_results.jsonl"}
LEGACY_PLACES = {(IMAGES[bench], name) for bench, name in LEGACY_RESULTS.items()}


def move_legacy_results(out_dir: Path, bench: str) -> None:
    """Move an earlier fusedit's results file out of ``out_dir``'s images to ``out_dir/results-legacy.jsonl``
    (a free name), with a line saying so: it describes the images it was scored from, so it is kept. The
    scores files in ``out_dir`` that named it (``results_path``) name it at its new place, relative."""
    old = out_dir / IMAGES[bench] / LEGACY_RESULTS[bench]
    if not old.is_file():
        return
    naming = []
    for scores_file in sorted(out_dir.glob("scores*.json")):
        try:
            scores = read_json(scores_file, "")
        except ConfigError:  # not readable: it names nothing to mend
            continue
        recorded = scores.get("results_file") if isinstance(scores, dict) else None
        if isinstance(recorded, str) and results_path(scores_file, recorded).resolve() == old.resolve():
            naming.append((scores_file, scores))
    later = (f"results-legacy{n}.jsonl" for n in itertools.count(2))
    target = first_free(out_dir, itertools.chain(["results-legacy.jsonl"], later))
    old.replace(target)
    for scores_file, scores in naming:
        write_text_atomic(scores_file, json.dumps({**scores, "results_file": target.name}, indent=1))
    log.warning("moved %s, an earlier run's results file, out of the images to %s", old, target)


def with_scores(
    result: dict,
    out_dir: Path,
    scores: dict,
    generation: dict | None = None,
    scorers: dict | None = None,
    categories: Sequence[str] | None = None,
) -> None:
    """A protocol run's ``scores`` into its ``result`` and, atomically, into ``out_dir/scores.json``
    (``scores-first<N>.json`` for the first N prompts, ``scores["limit"]``; ``scores-<categories>.json``
    for a subset of T2I-CompBench's ``categories``; ``output_files``) with the ``generation`` record that
    made the images (None: unknown, a caller's generator) and the ``scorers`` (``scorer_record``s) that
    scored them; a ``results_file`` (or ``results_files``) is named relative to ``out_dir``, the scores
    file's folder, so that the link holds when the folder moves (``results_path`` reads it back).
    ``result["scores_file"]`` names the file."""
    path, _ = output_files(out_dir, scores.get("limit"), categories)

    def relative(file) -> str:
        return Path(file).relative_to(out_dir).as_posix()

    if "results_file" in scores:  # OUT/results[-firstN].jsonl
        scores = {**scores, "results_file": relative(scores["results_file"])}
    if "results_files" in scores:  # T2I-CompBench's, one per category: OUT/<category>/results[-...].jsonl
        scores = {**scores, "results_files": {c: relative(f) for c, f in scores["results_files"].items()}}
    scores = {**scores, "generation": generation}
    if scorers is not None:
        scores["scorers"] = scorers
    result["scores"], result["scores_file"] = scores, str(path)
    write_text_atomic(path, json.dumps(scores, indent=1))


def results_path(scores_file: str | Path, recorded: str) -> Path:
    """Where the per-image results a scores file names (its ``results_file``, or one of T2I-CompBench's
    ``results_files``) lie. Since 2026-11-25 the name is relative to the scores file's folder. Before, it
    was the path the results were written to among the images, absolute or relative to the working
    directory then (``OUT/samples/results.jsonl``, ``OUT/grids/dpg_results.jsonl``): the same place under
    the scores file's folder when that file is there, else that path (the caller's error then names it).
    Beside the scores first: a copied OUT, or one read from another working directory, must not resolve to
    another run's file that happens to lie at the recorded path."""
    here, path = Path(scores_file).parent, Path(recorded)
    if (path.parent.name, path.name) not in LEGACY_PLACES:
        return here / path
    moved = here / path.parent.name / path.name
    return moved if moved.is_file() else path


def first_prompts(prompts: list, limit: int | None) -> tuple[list, int | None]:
    """The first ``limit`` of ``prompts`` (all of them for None): GenEval's and DPG-Bench's quick subset,
    the same prompts, seeds and folder names as in a full run, so that a later full run keeps their images;
    and the limit that applies: None when ``limit`` takes every prompt, which is then the full run (its
    files and words)."""
    if check_whole("limit", limit, none_for="all prompts") is None or limit >= len(prompts):
        return prompts, None
    return prompts[:limit], limit


def run_geneval(
    gen,
    prompts_path,
    out_dir: Path,
    *,
    detector: str | None,
    clip: str | None,
    n_per_prompt: int = GENEVAL_PER_PROMPT,
    seed: int = 42,
    limit: int | None = None,
    device=None,
    progress: bool = True,
    record: dict | None = None,
) -> dict:
    """GenEval images into ``out_dir/samples`` (scored with ``detector``/``clip`` when given) for the
    first ``limit`` prompts (None: all), which alone are scored. ``record`` describes ``gen`` (model and
    settings; see ``claim_folder``). The result's ``generated`` and ``skipped`` count prompts (``unit``),
    each of ``n_per_prompt`` images; its ``scores`` (and scores.json) record the ``limit``."""
    from fusedit.eval.benchmarks import load_geneval
    from fusedit.eval.geneval import (
        ClipColorClassifier,
        TransformersDetector,
        check_scoring_models,
        score_geneval_folder,
        write_geneval_samples,
    )

    metadata, limit = first_prompts(load_geneval(prompts_path), limit)
    # Checked before generating: a missing scoring model must not surface only after hours of sampling.
    if clip and not detector:
        raise ConfigError(f"--clip {clip} scores GenEval colours only together with --detector ID; add one")
    colour_prompts = sum(any("color" in c for c in m["include"]) for m in metadata)
    if detector and not clip and colour_prompts:
        raise ConfigError(
            f"--detector needs --clip ID: {colour_prompts} of the {len(metadata)} GenEval prompts ask for "
            f"colours, which GenEval classifies with CLIP (e.g. openai/clip-vit-large-patch14)"
        )
    check_scoring_models(detector, clip)
    samples = out_dir / IMAGES["geneval"]
    generation = claim_folder(out_dir, samples, record, "geneval", seed, n_per_prompt)
    move_legacy_results(out_dir, "geneval")
    counts = write_geneval_samples(metadata, gen, samples, n_per_prompt, seed, progress)
    result = {"samples": str(samples), **counts, "unit": "prompts"}
    if detector:
        boxes = TransformersDetector(detector, device=device)
        colours = ClipColorClassifier(clip, device=device) if clip else None
        scores = score_geneval_folder(
            samples,
            boxes,
            colours,
            metadata=metadata,
            out_file=output_files(out_dir, limit)[1],
            progress=progress,
        )
        scorers = {"detector": scorer_record(detector, boxes)}
        if clip:
            scorers["clip"] = scorer_record(clip, colours)
        with_scores(result, out_dir, {**scores, "limit": limit}, generation, scorers)
    return result


def run_dpg(
    gen,
    prompts_path,
    out_dir: Path,
    *,
    vqa: str | None,
    seed: int = 42,
    limit: int | None = None,
    device=None,
    progress: bool = True,
    record: dict | None = None,
) -> dict:
    """DPG-Bench grids into ``out_dir/grids`` (scored with ``vqa`` when given) for the first ``limit``
    prompts (None: all; in DPG-Bench's order, ``benchmarks.name_order``), which alone are scored;
    ``record`` as in ``run_geneval``. The result's ``generated`` and ``skipped`` count prompts (``unit``),
    each a grid of 4 images; its ``scores`` (and scores.json) record the ``limit``."""
    from fusedit.eval.benchmarks import check_dpg_files, dpg_csv_path, load_dpg
    from fusedit.eval.dpg import (
        TransformersVQA,
        check_prompt_names,
        load_dpg_questions,
        score_dpg_folder,
        vqa_model_type,
        write_dpg_grids,
    )

    every = load_dpg(prompts_path)
    prompts, limit = first_prompts(every, limit)
    # Read and matched to the prompts before generating: without them the grids could not be scored.
    questions = load_dpg_questions(prompts_path) if vqa else None
    if questions is not None:
        check_prompt_names([name for name, _ in prompts], questions, str(dpg_csv_path(prompts_path)))
        vqa_model_type(vqa)
    else:  # no question file names the prompts: the folder must at least be laid out as DPG-Bench's
        check_dpg_files(prompts_path, every)
    grids = out_dir / IMAGES["dpg"]
    generation = claim_folder(out_dir, grids, record, "dpg", seed)
    move_legacy_results(out_dir, "dpg")
    counts = write_dpg_grids(prompts, gen, grids, seed=seed, progress=progress)
    result = {"grids": str(grids), **counts, "unit": "prompts"}
    if vqa:
        answerer = TransformersVQA(vqa, device=device)
        scores = score_dpg_folder(
            grids,
            questions,
            answerer,
            names=[name for name, _ in prompts],
            out_file=output_files(out_dir, limit)[1],
            progress=progress,
        )
        scorers = {"vqa": scorer_record(vqa, answerer)}
        with_scores(result, out_dir, {**scores, "limit": limit}, generation, scorers)
    return result


def run_mjhq(
    gen,
    prompts_path,
    out_dir: Path,
    *,
    reference=None,
    features=None,
    cache_dir: Path = Path(".cache/fusedit-fid"),
    per_category: int | None = None,
    seed: int = 42,
    batch_size: int = 32,
    device=None,
    progress: bool = True,
    record: dict | None = None,
) -> dict:
    """MJHQ-30K samples into ``out_dir/samples/<category>/<id>.png`` (``per_category`` of each category, or
    all 30,000), then, with a ``reference`` folder (the unzipped ``mjhq30k_imgs``) and ``features`` (an
    extractor, e.g. ``eval.inception.CleanInceptionFeatures``), FID overall and per category into
    ``scores.json``. ``record`` as in ``run_geneval``. The result's ``generated`` and ``skipped`` count
    images, one per prompt (``unit``)."""
    from fusedit.eval.benchmarks import load_mjhq
    from fusedit.eval.mjhq import check_scoring, reference_files, score_mjhq, select, write_mjhq_samples

    check_batch_size(batch_size)  # before generating: not found out hours later
    rows = select(load_mjhq(prompts_path), per_category)
    check_scoring(reference, features, per_category)
    # Listed before generating: a wrong reference folder must not surface after hours of sampling.
    references = reference_files(reference, sorted({r["category"] for r in rows})) if reference else None
    samples = out_dir / IMAGES["mjhq"]
    generation = claim_folder(out_dir, samples, record, "mjhq", seed)
    sweep_temporaries(samples, recursive=True)  # a kill -9 mid-write leaves one; each image is written whole
    counts = write_mjhq_samples(rows, gen, samples, seed=seed, progress=progress)
    result = {"samples": str(samples), **counts, "unit": "images"}
    if references is not None:
        scores = score_mjhq(
            rows,
            samples,
            references,
            features,
            cache_dir,
            reference_root=reference,
            batch_size=batch_size,
            progress=progress,
        )
        features_id = getattr(features, "id", type(features).__name__)
        scorer = scorer_record(features_id, fingerprint=getattr(features, "fingerprint", None))
        with_scores(result, out_dir, scores, generation, {"features": scorer})
    return result


def check_compbench_folder(
    out_dir: str | Path,
    record: dict,
    seed: int = 42,
    n_per_prompt: int | None = None,
    categories: Sequence[str] | None = None,
) -> None:
    """``run_compbench``'s refusal of images made by another generation, alone: the command line checks
    it before the model loads (through ``check_protocol_folder``)."""
    from fusedit.eval.compbench import BENCH, N_PER_PROMPT, protocol_images, select_categories

    n_per_prompt = N_PER_PROMPT if n_per_prompt is None else n_per_prompt
    for category in select_categories(categories):
        check_claim(
            Path(out_dir) / category,
            protocol_images(out_dir, category),
            protocol_record(record, BENCH, seed, n_per_prompt),
        )


def run_compbench(
    gen,
    dataset_path,
    out_dir: Path,
    *,
    vqa: str | None,
    clip: str | None,
    detector: str | None,
    n_per_prompt: int | None = None,
    seed: int = 42,
    categories: Sequence[str] | None = None,
    device=None,
    progress: bool = True,
    record: dict | None = None,
    text: str = "rules",
    batch_size: int = 32,
) -> dict:
    """T2I-CompBench images into ``out_dir/<category>/samples`` (scored when scoring models are given:
    ``vqa``, ``clip``, ``detector`` are hub ids or folders). ``record`` describes ``gen`` (model and
    settings; see ``eval.run.claim_folder``); each category folder keeps its own. Scoring needs every
    model the chosen categories use (``SCORERS``), checked before anything is generated; with none given
    the images are only written (for the official scripts, or a later run). ``n_per_prompt`` None is the
    official 10. The result's ``generated`` and ``skipped`` count images (``unit``) over all categories."""
    from fusedit.eval.compbench import (
        BENCH,
        CATEGORIES,
        N_PER_PROMPT,
        SCORERS,
        ClipSimilarity,
        SpatialRules,
        TransformersYesNoVQA,
        check_scorers,
        load_compbench,
        load_complex_groups,
        protocol_images,
        score_compbench,
        select_categories,
        text_rules,
        write_compbench_samples,
    )
    from fusedit.eval.geneval import TransformersDetector

    check_batch_size(batch_size)  # before generating: not found out hours later
    n_per_prompt = N_PER_PROMPT if n_per_prompt is None else n_per_prompt
    chosen = select_categories(categories)
    prompts = load_compbench(dataset_path, chosen)
    given = {"vqa": vqa, "clip": clip, "detector": detector}
    scoring = any(given.values())
    # Checked before generating: a missing scoring model must not surface only after hours of sampling.
    groups = None
    if scoring:
        check_scorers(chosen, given, flags=True)
        for name, place in given.items():
            if place:
                refuse_path_to_nothing(f"--{name} {str(place)!r}", str(place), f"a {name} model folder")
        if "complex" in chosen:
            groups = load_complex_groups(dataset_path)
        rules_text = text_rules(text)
    out_dir = Path(out_dir)
    subset = None if chosen == CATEGORIES else list(chosen)
    fed = fed_scores(out_dir, chosen)
    for category in chosen:  # each category's record is the same
        generation = claim_folder(
            out_dir / category,
            protocol_images(out_dir, category),
            record,
            BENCH,
            seed,
            n_per_prompt,
            fed=fed[category],
        )
    generated = skipped = 0
    for category in chosen:
        counts = write_compbench_samples(
            prompts[category],
            gen,
            protocol_images(out_dir, category),
            n_per_prompt,
            seed,
            progress,
            desc=f"T2I-CompBench {category}",
        )
        generated, skipped = generated + counts["generated"], skipped + counts["skipped"]
    result = {
        "samples": {c: str(protocol_images(out_dir, c)) for c in chosen},
        "generated": generated,
        "skipped": skipped,
        "unit": "images",
    }
    if scoring:
        need = {s for c in chosen for s in SCORERS[c]}
        built = {
            "vqa": TransformersYesNoVQA(vqa, device=device) if "vqa" in need else None,
            "clip": ClipSimilarity(clip, device=device) if "clip" in need else None,
            "detector": (
                TransformersDetector(detector, device=device, min_score=SpatialRules().min_score)
                if "detector" in need
                else None
            ),
        }
        scores = score_compbench(
            out_dir,
            prompts,
            n_per_prompt=n_per_prompt,
            **built,
            complex_groups=groups,
            text=rules_text,
            batch_size=batch_size,
            progress=progress,
            results_name=output_files(out_dir, categories=subset)[1].name,
        )
        # score_compbench recorded the scorers (scorer_record of each model's id as given, and the text rules)
        with_scores(result, out_dir, scores, generation, categories=subset)
    return result


def fed_scores(out_dir: Path, categories: Sequence[str]) -> dict[str, list[Path]]:
    """For each of ``categories``, T2I-CompBench's scores files in ``out_dir`` that took its scores:
    ``scores.json`` (every category) and each ``scores-<categories>.json`` naming it (``output_files``)."""
    named = {
        p: p.stem.removeprefix("scores").removeprefix("-").split("-")
        for p in sorted(out_dir.glob("scores*.json"))
    }
    return {c: [p for p, took in named.items() if took == [""] or c in took] for c in categories}
