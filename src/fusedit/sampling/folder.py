"""The output folder of `fusedit sample`: ``write_sample_folder`` writes image i of the prompts as NNNNN.png
beside its record NNNNN.json, and grid.png of them all; ``earlier_sample`` reads the records an earlier sample
left there, so that a rerun resumes it and nothing but its files is ever replaced or deleted.

A module of its own: which files of a folder are a sample's, and which of its images a rerun keeps, is settled
here; the images come from ``fusedit.sampling.generation.generate``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusedit.checkpoints import weights_fingerprint
from fusedit.config import Config, check_whole
from fusedit.files import (
    as_json_reads_back,
    check_output_folder,
    sweep_temporaries,
    temporary_of,
    write_text_atomic,
)
from fusedit.imaging import image_grid, save_png, to_uint8
from fusedit.sampling.generation import (
    IMAGE_NEUTRAL,
    check_negative_prompt,
    check_prompts,
    check_seed,
    generate,
    image_shape,
    latent_shape,
    negative_read,
    sample_settings,
    seeded_noise,
    unknown_words_note,
    warn_cut_prompts,
)
from fusedit.system import TextToImage, precision_name

log = logging.getLogger(__name__)


# The files write_sample_folder writes: the numbered images, their records and grid.png.
_SAMPLE_FILES = re.compile(r"\d{5}\.(png|json)|grid\.png")
_NUMBERED = re.compile(r"(\d{5})\.(png|json)")
# The keys every image record of `fusedit sample` has held ("truncated" came later): a NNNNN.json holding
# them all is a record it wrote, and only files it wrote are ever replaced or deleted.
_RECORD_KEYS = frozenset(
    {"prompt", "seed", "negative_prompt", "steps", "guidance", "width", "height", "sampler", "shift"}
    | {"schedule", "precision", "cache_text", "use_ema", "model"}
)


def _image_record(path: Path) -> dict | None:
    """The image record in ``path`` (a NNNNN.json) when `fusedit sample` wrote it, otherwise None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a folder of that name, not JSON, or bytes that are not UTF-8
        return None
    return record if isinstance(record, dict) and record.keys() >= _RECORD_KEYS else None


def earlier_sample(out: str | Path) -> dict[int, dict]:
    """The image records an earlier `fusedit sample` left in ``out``, by image number; {} for a new or
    empty folder. Any other file or folder there (a user's images, a run, a dataset) is refused in one line
    (ConfigError) before anything is sampled, since the sample replaces and deletes the files an earlier one
    wrote: NNNNN.json holding an image record (``_RECORD_KEYS``), NNNNN.png beside one, grid.png beside any,
    and write_atomic's temporary files of those names (left by a kill)."""
    out = Path(out)
    if not out.is_dir():
        return {}
    records = {}
    for path in out.glob("[0-9][0-9][0-9][0-9][0-9].json"):
        record = _image_record(path)
        if record is not None:
            records[int(path.stem)] = record

    def ours(path: Path) -> bool:
        if not path.is_file():
            return False
        target = temporary_of(path.name)
        if target is not None:
            return bool(_SAMPLE_FILES.fullmatch(target))
        numbered = _NUMBERED.fullmatch(path.name)
        if numbered:
            return int(numbered[1]) in records
        return path.name == "grid.png" and bool(records)

    check_output_folder(out, "images", "an earlier fusedit sample's folder", ours)
    return records


def _first_change(saved: dict, record: dict) -> str:
    """The first key in which an earlier image's ``saved`` record differs from the ``record`` of the image
    that replaces it, as "key=old, not new"."""
    key = next(k for k in sorted(set(saved) | set(record)) if saved.get(k) != record.get(k))
    return f"{key}={saved.get(key)!r}, not {record.get(key)!r}"


def _remove_earlier_samples(out: Path, records: dict[int, dict], images: int) -> None:
    """An ``out`` folder reused for fewer prompts would keep the earlier sample's higher-numbered images
    (past ``images``) next to the new ones, and its grid.png would show the earlier prompts. Called once
    the first new image is ready: a sample that fails or is stopped before it leaves the earlier one
    whole. Only files of ``records`` (``earlier_sample``) go. The log counts the images removed, not
    grid.png: a sample of the same prompts redraws it the same, and no image of it was lost."""
    removed = 0
    for i in sorted(i for i in records if i >= images):
        earlier = [path for path in (out / f"{i:05d}.png", out / f"{i:05d}.json") if path.is_file()]
        for path in earlier:
            path.unlink()
        removed += bool(earlier)
    (out / "grid.png").unlink(missing_ok=True)
    if removed:
        some = "an image" if removed == 1 else f"{removed} images"
        log.warning("removed %s of an earlier sample in %s", some, out)  # a user's images gone: h-sample R3


class _Plan(NamedTuple):
    """Which images a call makes and which it keeps from an earlier sample in its folder."""

    todo: list[range]  # the batches to sample, each whole
    kept: list[int]  # the images kept as they are
    stale: list[int]  # the earlier images of this call's numbers, recorded otherwise (replaced)


def _checked_inputs(
    cfg: Config, prompts: list[str], settings: dict[str, Any] | None, seed: int | None, batch_size: int
) -> tuple[list[str], dict[str, Any], int]:
    """The prompts, settings and seed of a call, its defaults filled in, refused in one line when wrong:
    before the folder is read or the model runs, so that a bad call leaves an earlier sample alone."""
    prompts = check_prompts(prompts)
    check_whole("batch_size", batch_size)
    settings = sample_settings(cfg) if settings is None else settings
    seed = cfg.sample.seed if seed is None else seed
    check_seed(seed, len(prompts))
    check_negative_prompt(settings["negative_prompt"], settings["guidance"])
    return prompts, settings, seed


def _note_before_sampling(
    model: TextToImage, cfg: Config, prompts: list[str], settings: dict[str, Any], device: torch.device
) -> None:
    """What the user may not expect of a call (a setting that does nothing here, words the model cannot
    read, prompts sampled unconditionally), said before the sampling, which can take long, starts."""
    if settings.get("cuda_graphs") and (device.type != "cuda" or not settings.get("cache_text", True)):
        # Asked for (--cuda-graphs, sample.cuda_graphs), it would otherwise do nothing without a word.
        why = "the model is not on a CUDA device" if device.type != "cuda" else "the text cache is off"
        log.info("sample.cuda_graphs does nothing here: %s (it replays cached-text steps on a GPU)", why)
    negative = negative_read(settings)
    unknown = unknown_words_note(model, cfg, prompts, negative)
    if unknown:
        log.warning("%s", unknown)
    empty = sum(not p.strip() for p in prompts)
    if empty:
        log.info("%d of the %d prompts are empty: sampled unconditionally", empty, len(prompts))


def _shared_record(
    cfg: Config, settings: dict[str, Any], batch_size: int, device: torch.device, source: str | Path | None
) -> dict[str, Any]:
    """What every image's record holds after its prompt and seed: all else that decides its pixels, so
    that a rerun keeps an earlier image only where it would make the same one, and how it was made."""
    model_path = None if source is None else str(Path(source).resolve())
    # The weights' own fingerprint, as `fusedit eval` records it: a folder re-exported or retrained in
    # place keeps its path, and its earlier images must not be kept as this model's.
    weights = None if source is None else weights_fingerprint(Path(source))
    height, width = image_shape(settings["image_size"])
    return {
        "negative_prompt": settings["negative_prompt"],
        "steps": settings["steps"],
        "guidance": settings["guidance"],
        "width": width,
        "height": height,
        **({"size": height} if height == width else {}),
        "sampler": settings["sampler"],
        "shift": settings["shift"],
        "schedule": settings["schedule"],
        "precision": precision_name(settings["precision"], device),
        "cache_text": settings["cache_text"],
        "use_ema": cfg.sample.use_ema,
        "model": model_path,
        "weights": weights,
        # How it was made, recorded but not compared (_HOW): the batch it was made in and the kernels.
        "batch_size": batch_size,
        "compile": cfg.sample.compile,
        "cuda_graphs": bool(settings.get("cuda_graphs")),
    }


# What a record says of how an image was made, not of what it shows: the batch it was made in, the
# compiled kernels and IMAGE_NEUTRAL's. Image i starts from the noise of seed + i alone whatever its batch,
# so an earlier image that differs only here is kept, with its own record (h-sample R2: a resume with a
# smaller --batch-size to fit memory made every image again). Sorted: the log names them in this order.
_HOW = tuple(sorted(("batch_size", "compile", *IMAGE_NEUTRAL)))


def _saved(record: dict) -> dict:
    """What an earlier image's ``record`` says it shows, as a new call's ``metas`` hold it, to be compared
    with them: without "truncated", which the call learns only by sampling, nor the ``_HOW`` keys."""
    return {k: v for k, v in record.items() if k != "truncated" and k not in _HOW}


def _plan_batches(out: Path, records: dict[int, dict], metas: list[dict], batch_size: int) -> _Plan:
    """A batch is kept only when all its images are there, each recorded as ``metas`` records it, and
    made whole otherwise: each image then comes out of the batch it would be in without an interruption,
    bit for bit as one uninterrupted call would make it."""
    images = len(metas)
    # The earlier images recorded as this call would record them, and the others of its numbers (stale).
    same = {i for i in records if i < images and _saved(records[i]) == _saved(as_json_reads_back(metas[i]))}
    stale = sorted(i for i in records if i < images and i not in same)

    def made(i: int) -> bool:  # image i is there, as this call would make it (from a model it can tell)
        return metas[i]["weights"] is not None and i in same and (out / f"{i:05d}.png").is_file()

    batches = [range(b, min(b + batch_size, images)) for b in range(0, images, batch_size)]
    todo = [batch for batch in batches if not all(map(made, batch))]
    return _Plan(todo, [i for batch in batches if batch not in todo for i in batch], stale)


def _note_plan(out: Path, records: dict[int, dict], metas: list[dict], plan: _Plan) -> None:
    """Why a rerun makes fewer images than it was given, or makes again those an earlier one left."""
    if plan.kept:
        # The first kept image made otherwise (``_HOW``), to say which differing settings it was kept despite.
        other = {}
        for first in plan.kept:
            now = as_json_reads_back(metas[first])
            other = {k: (records[first].get(k), now[k]) for k in _HOW if records[first].get(k) != now[k]}
            if other:
                break
        changes = "; ".join(f"{k}={old!r}, not {new!r}" for k, (old, new) in other.items())
        log.info(
            "%d of the %d images are kept from an earlier run of this sample%s",
            len(plan.kept),
            len(metas),
            f", made with settings that do not change an image (image {first}: {changes})" if other else "",
        )
    if records and metas[0]["weights"] is None:  # no ``source``: no record names this model
        log.info(
            "the images of an earlier sample in %s are made again: without the model's folder (source) "
            "they cannot be told to be this model's",
            out,
        )
    elif plan.stale:
        first = plan.stale[0]
        change = _first_change(_saved(records[first]), _saved(as_json_reads_back(metas[first])))
        some = f"{len(plan.stale)} images of an earlier sample in {out} were"
        if len(plan.stale) == 1:
            some = f"an image of an earlier sample in {out} was"
        # A warning: finished images are replaced without --overwrite (h-sample R3).
        log.warning(
            "%s made with other prompts or settings and will be replaced (image %d: %s)", some, first, change
        )


def _sample_batches(
    model: TextToImage,
    settings: dict[str, Any],
    metas: list[dict],
    out: Path,
    records: dict[int, dict],
    todo: list[range],
    written: list[Path],
    progress: bool,
) -> tuple[dict[int, np.ndarray], list[int], bool, set[str]]:
    """The images of the ``todo`` batches, by number, each written with its record as soon as its batch
    is made, so that an interrupted call leaves every finished batch for a rerun to keep; and the numbers
    of those whose prompts were cut, whether the negative prompt was, and the limits that cut
    (PromptCut.limits), for the one warning at the end."""
    images: dict[int, np.ndarray] = {}
    cut_images, negative_cut, cut_limits = [], False, set()
    bar = tqdm(total=len(todo) * settings["steps"], desc="sample", unit="step", disable=not progress)
    for indices in todo:
        batch = [metas[i]["prompt"] for i in indices]
        # Image i starts from the noise of seed + i alone (the rule of `fusedit serve`), which is what
        # sampling its prompt on its own with that seed draws: any image can be made again by itself.
        noise = seeded_noise([metas[i]["seed"] for i in indices], latent_shape(model, settings["image_size"]))
        # The cuts are warned about once, at the end, and each image records whether its prompt was cut.
        x, cut = generate(
            model, batch, noise=noise, progress=bar.update, warn_cut=False, return_cut=True, **settings
        )
        cut_images += [indices[j] for j in sorted(cut.prompts)]
        negative_cut = negative_cut or cut.negative
        cut_limits.update(cut.limits)
        if not images:
            _remove_earlier_samples(out, records, len(metas))
        for j, (i, img) in enumerate(zip(indices, to_uint8(x))):
            # "truncated" after the prompt (the prompt keeps its first place as **metas[i] repeats it).
            meta = {"prompt": metas[i]["prompt"], "truncated": j in cut.prompts, **metas[i]}
            # The record first, an earlier image of that number gone before it: a stop between the two
            # leaves a record without its image, which a rerun makes, never an image that no record marks
            # as this command's, nor an earlier image under this call's record.
            png = out / f"{i:05d}.png"
            png.unlink(missing_ok=True)
            write_text_atomic(out / f"{i:05d}.json", json.dumps(meta, indent=1))
            save_png(Image.fromarray(img), png)
            images[i] = img
            written.append(png)
    bar.close()
    return images, cut_images, negative_cut, cut_limits


def _write_grid(out: Path, metas: list[dict], made: dict[int, np.ndarray], kept: list[int]) -> None:
    """grid.png of every image with its prompt, kept ones (read back) too: drawn last, so that a sample
    stopped early has none, and a rerun that keeps it all draws the same grid again."""
    images = dict(made)
    for i in kept:
        with Image.open(out / f"{i:05d}.png") as image:
            images[i] = np.asarray(image.convert("RGB"))
    grid = [images[i] for i in range(len(metas))]
    height, width = metas[0]["height"], metas[0]["width"]
    prompts = [meta["prompt"] for meta in metas]
    save_png(image_grid(grid, prompts, scale=max(1, 128 // max(height, width))), out / "grid.png")


def write_sample_folder(
    model: TextToImage,
    cfg: Config,
    prompts: list[str],
    out: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    source: str | Path | None = None,
    progress: bool = True,
    written: list[Path] | None = None,
    kept: list[Path] | None = None,
) -> list[Path]:
    """The sample folder of `fusedit sample`: image i of ``prompts`` as ``out``/0000i.png (five digits),
    its metadata (prompt, whether it was "truncated" to the text encoders' limits, seed, settings,
    precision, use_ema, model and its weights' fingerprint, batch size, compile, CUDA graphs) as 0000i.json,
    and grid.png of them all with their prompts. An empty prompt samples unconditionally (the input a
    dropped caption trained), as `fusedit serve` does; the words the built-in word tokenizer reads as <unk>
    are warned about before sampling, and the prompts cut (the negative prompt too) once at the end.

    ``model`` and ``cfg`` are as ``load_sampling_model`` returns them, and ``source`` is the folder it
    returned (recorded, absolute, as each image's "model"). ``settings`` are ``generate``'s keyword
    arguments as ``sample_settings(cfg, ...)`` makes them (None: the config's own); their image size should
    fit the model (`fusedit sample` checks it first). Image i starts from the noise of ``seed`` + i alone
    (None: the config's sample.seed), so any image can be made again by itself (each seed + i must lie in
    0..SEED_MAX, as `fusedit serve` takes seeds: ConfigError otherwise); a negative prompt at guidance 1,
    which would change nothing, is refused too. Prompts are sampled ``batch_size`` at a time, with a
    progress bar unless ``progress`` is False.

    ``out`` is created where missing. A folder holding anything but an earlier sample's files is refused
    before any sampling (``earlier_sample``). An earlier sample's folder resumes when ``source`` names the
    model (whose weights' fingerprint each record holds): a batch whose images are all there, each recorded
    as this call would record it (prompt, seed, settings, model), is kept, and only the other batches are
    made, so the images are those of one uninterrupted call, bit for bit (a batch is made whole, as in that
    call). What changes how an image is made, not what it shows (batch size, text cache, compile, CUDA
    graphs) does not count: such an image is kept with its own record, and the log says so. Earlier images
    of other prompts or settings are replaced, and once the first new batch is ready, the earlier sample's
    higher-numbered images and grid.png are removed (no other file), each said in a warning. Returns the paths of the images, in prompt order; ``written``, when given, receives each as it
    is kept or written (what an interrupted call left), and ``kept`` the images kept from an earlier run."""
    prompts, settings, seed = _checked_inputs(cfg, prompts, settings, seed, batch_size)
    out = Path(out)
    records = earlier_sample(out)
    device = next(model.denoiser.parameters()).device
    _note_before_sampling(model, cfg, prompts, settings, device)
    shared = _shared_record(cfg, settings, batch_size, device, source)
    # Image i's record but "truncated", which only its sampling tells (and which follows from the rest).
    metas = [{"prompt": prompt, "seed": seed + i, **shared} for i, prompt in enumerate(prompts)]
    plan = _plan_batches(out, records, metas, batch_size)
    paths = [out / f"{i:05d}.png" for i in range(len(prompts))]
    out.mkdir(parents=True, exist_ok=True)
    # What a kill -9 mid-write left (each file is written whole, so the files themselves are complete).
    sweep_temporaries(out, _SAMPLE_FILES)
    written = [] if written is None else written
    written += [paths[i] for i in plan.kept]
    if kept is not None:
        kept += [paths[i] for i in plan.kept]
    _note_plan(out, records, metas, plan)
    made, cut_images, negative_cut, cut_limits = _sample_batches(
        model, settings, metas, out, records, plan.todo, written, progress
    )
    if not plan.todo:  # a finished sample run again: only its grid is made again
        _remove_earlier_samples(out, records, len(prompts))
    _write_grid(out, metas, made, plan.kept)
    # The kept images' prompts were cut as their records say: the warning counts the whole sample. Their
    # records do not say which limit cut them: then every limit is named.
    kept_cut = [i for i in plan.kept if records[i].get("truncated")]
    limits = model.limits_of(() if kept_cut else cut_limits)
    cut_images = sorted(cut_images + kept_cut)
    warn_cut_prompts(len(cut_images), len(prompts), limits, negative_cut, cut_images)
    return paths
