"""Frechet distance between feature Gaussians (FID and its variants) and CLIP score.

* ``frechet_distance``: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64 torch. The
  trace term is computed from the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), which has the same
  eigenvalues as S1 S2, by eigen-decomposition: no complex parts to discard and no ill-conditioned
  iteration (feature covariances of a few thousand images are rank-deficient).
* Features come from any callable ``images -> (B, D) tensor``; ``TransformersImageFeatures`` wraps a
  transformers vision model (CLIP, DINOv2, ViT, ...) loaded by hub id or folder, for FD_CLIP / FD_DINOv2.
  The standard FID's features (clean-fid's Inception-v3, as on MJHQ-30K) are ``eval.inception``'s.
* ``ReferenceStats.cached``: a reference set's (mu, sigma) computed once and kept in an ``.npz`` whose name
  is derived from the set's name and the extractor's id, so a later run never decodes the reference
  images again. The ``.npz`` also records what it was computed from (``folder_source``: the resolved
  folder and a digest of its files' names, sizes and first bytes; the feature model's ``fingerprint``):
  when that no longer matches, the stats are recomputed rather than reused for a different set.
* Images are decoded as training decodes them (``load_image``): EXIF orientation applied, transparency
  composited on white, 16-bit greyscale scaled rather than clipped. An unreadable file is skipped and
  counted, as in training.
* ``ClipScore``: 100 x cosine(image, text) of CLIP embeddings per pair; ``clip_score``, their mean clipped at
  0, as torchmetrics' code computes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from fusedit.config import ConfigError, check_whole, model_config
from fusedit.data.transforms import SkipSample, decode_rgb, image_extensions, open_image
from fusedit.files import files_digest, write_atomic
from fusedit.system import resolve_device

log = logging.getLogger(__name__)

FeatureExtractor = Callable[[list[Image.Image]], torch.Tensor]
# Bytes of each reference image that its digest reads besides name and size: a re-encoded image of the same
# size (a BMP or TIFF always is; a PNG may be) changes its first bytes, and 4 KiB each costs little beside
# decoding the folder again.
DIGEST_HEAD_BYTES = 4096
# `fusedit sample` and GenEval's generation script write a grid of their samples under this name; counted as
# an image it would be one more (out-of-distribution) sample in the statistics.
CONTACT_SHEET = "grid.png"


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", torch.float64)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = _f64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features have shape {tuple(x.shape)}; expected (N, D) with N >= 2")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values; check the extractor's inputs and dtype")
    mu = x.mean(0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu.numpy(), sigma.numpy()


def _psd_eigenvalues(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix with rounding noise removed: those below the matrix's numerical
    precision become 0. Feature covariances of fewer images than dimensions are singular, and the square
    root would otherwise turn each ~1e-16 of noise into ~1e-8 of error."""
    tol = values.abs().max() * values.numel() * torch.finfo(values.dtype).eps
    return torch.where(values > tol, values, torch.zeros_like(values))


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * _psd_eigenvalues(values).sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (non-negative; 0 for equal inputs)."""
    mu1, mu2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    d = mu1.shape[0] if mu1.ndim else 0  # a scalar mu1 then fails the shape check below
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 "
            f"{tuple(s2.shape)}; expected (D,), (D, D), (D,), (D, D) with one D"
        )
    # NaN would come out as a NaN distance (or an eigensolver failure) instead of an error.
    for label, value in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not torch.isfinite(value).all():
            raise ConfigError(f"{label} contains NaN or infinite values; allowed: finite statistics")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # covariances are symmetric; remove rounding asymmetry
    root1 = _sqrtm_psd(s1)
    middle = root1 @ s2 @ root1
    eigenvalues = _psd_eigenvalues(torch.linalg.eigvalsh((middle + middle.T) / 2))
    value = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * eigenvalues.sqrt().sum()
    return max(float(value), 0.0)  # a squared distance: tiny negative values are rounding


def is_sample_image(path: Path) -> bool:
    """Whether ``path`` is an image file of a sample folder: an image type, and not the contact sheet
    (``CONTACT_SHEET``) sample folders hold beside their samples."""
    # The types training reads (data.transforms), so that a reference folder of training images is read whole.
    image = path.suffix[1:].lower() in image_extensions()
    return image and path.name != CONTACT_SHEET and path.is_file()


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, ``is_sample_image``), in a fixed (sorted) order."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {str(folder)!r} {problem}")
    files = sorted(p for p in folder.rglob("*") if is_sample_image(p))
    if not files:
        suffixes = ", ".join(f".{ext}" for ext in image_extensions())
        raise FileNotFoundError(f"no images ({suffixes}) under {str(folder)!r}")
    return files


def load_image(item) -> Image.Image:
    """An image (a PIL image or a path) as RGB, decoded exactly as training decodes a sample (see
    ``SampleDecoder``): EXIF orientation applied, transparent pixels composited on white, 16/32-bit greyscale
    scaled to 8 bits, palette and CMYK converted. Raises ``SkipSample`` for a missing or unreadable file."""
    image = open_image(item)
    try:
        return decode_rgb(image)
    finally:
        if image is not item:  # close the file we opened, never the caller's image
            image.close()


def decoded_image(item, remedy: str = "allowed: a readable image file") -> Image.Image:
    """``load_image`` for the model wrappers, whose callers pass images one by one, and for the scorers of
    generated benchmark images (a missing one would change the benchmark): an unreadable one is an error
    there, naming it and ``remedy`` (the batch functions skip and count them before they reach a model)."""
    try:
        return load_image(item)
    except SkipSample as e:
        raise ConfigError(f"{item}: {e.reason} image ({e.detail}); {remedy}") from None


class SkippedImages:
    """Unreadable images met while reading a set: counted, with the first as the example to report."""

    def __init__(self, what: str):
        self.what, self.count, self.example = what, 0, ""

    def add(self, item, error: SkipSample) -> None:
        self.count += 1
        if not self.example:
            self.example = f"{item}: {error.reason}: {error.detail}"

    def warn(self, total: int) -> None:
        if self.count:
            log.warning(
                "skipped %d of %d %s that could not be read (e.g. %s)",
                self.count,
                total,
                self.what,
                self.example,
            )


def extract_features(
    images: Iterable,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 32,
    progress: bool = True,
    min_count: int = 1,
    what: str = "images",
) -> np.ndarray:
    """Features (N, D) float64 of images (PIL images or paths), ``batch_size`` at a time. Unreadable
    files are skipped and counted (one warning names how many and an example); fewer than ``min_count``
    readable images is an error. ``what`` names the images in those messages. A single path (a folder's
    name is iterable, character by character) is refused: pass ``list_images(folder)``."""
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(
            f"images={str(images)!r} is one path (allowed: a list of PIL images or paths, e.g. "
            f"fusedit.eval.fid.list_images({str(images)!r}) for a folder's images)"
        )
    check_batch_size(batch_size)
    total = len(images) if hasattr(images, "__len__") else None
    chunks, batch, seen, skipped = [], [], 0, SkippedImages(what)
    with tqdm(total=total, desc="features", unit="img", disable=not progress) as bar:
        for item in images:
            seen += 1
            try:
                batch.append(load_image(item))
            except SkipSample as e:
                skipped.add(item, e)
                bar.update(1)
                continue
            if len(batch) == batch_size:
                chunks.append(_f64(extractor(batch)))
                bar.update(len(batch))
                batch = []
        if batch:
            chunks.append(_f64(extractor(batch)))
            bar.update(len(batch))
    skipped.warn(seen)
    readable, needed = sum(len(c) for c in chunks), max(min_count, 1)
    if readable < needed:
        unreadable = f" ({skipped.count} unreadable, e.g. {skipped.example})" if skipped.count else ""
        raise ConfigError(
            f"{what}: {readable} of {seen} could be read{unreadable}; allowed: at least {needed} readable "
            "images"
        )
    return torch.cat(chunks).numpy()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


def check_batch_size(batch_size: int) -> None:
    """The batch of a scoring model (Inception, CLIP, a VQA model or detector), checked before any work:
    0 would fail in range() midway, a negative size would score nothing."""
    check_whole("batch_size", batch_size)


def folder_source(folder: str | Path, files: Sequence[Path] | None = None) -> dict:
    """What stats computed from ``folder`` were computed from: its resolved path, its image count and a
    digest of the images' names, sizes and first bytes. ``files`` are its images as ``list_images`` gives them (listed
    here when None)."""
    files = list_images(folder) if files is None else files
    return {
        "folder": str(Path(folder).resolve()),
        "files": len(files),
        "digest": files_digest(folder, files, DIGEST_HEAD_BYTES),
    }


def _place_free(fingerprint) -> object:
    """A feature model's fingerprint without the folder that fusedit before session 19 wrote into it
    ("/x/inception-2015-12-05.pt#d" -> "inception-2015-12-05.pt#d"): the weights' digest still tells
    models apart, and caches written then are not recomputed (30,000 images for MJHQ) over the place."""
    if not isinstance(fingerprint, str) or "#" not in fingerprint:
        return fingerprint
    place, _, digest = fingerprint.rpartition("#")
    return f"{Path(place).name}#{digest}"


def _source_change(recorded: dict, current: dict) -> str:
    """Why stats recorded from ``recorded`` do not describe ``current`` ("" when they do). Only what
    ``current`` knows is compared: a caller that cannot describe its images leaves them unchecked."""
    changes = []
    for key, label in (("reference", "reference images"), ("features", "feature model")):
        old, new = recorded.get(key), current.get(key)
        if new is None or old == new or (key == "features" and _place_free(old) == _place_free(new)):
            continue
        if old is None:
            changes.append(f"the cache does not record its {label} (now {new!r})")
        elif key == "reference" and old.get("folder") != new.get("folder"):
            changes.append(f"the reference folder was {old.get('folder')!r}, now {new.get('folder')!r}")
        elif key == "reference":
            changes.append(
                f"the images in {new.get('folder')!r} changed (were {old.get('files')}, now "
                f"{new.get('files')}; names, sizes or contents differ)"
            )
        else:
            changes.append(f"the {label} was {old!r}, now {new!r}")
    return "; ".join(changes)


@dataclass(eq=False)
class ReferenceStats:
    """A reference image set's feature Gaussian, tagged with the set's name, the extractor's id and what
    it was computed from (``source``: ``{"reference": folder_source(...), "features": fingerprint}``)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    name: str = ""
    extractor_id: str = ""
    source: dict = field(default_factory=dict)

    @classmethod
    def from_features(
        cls, features, name: str = "", extractor_id: str = "", source: dict | None = None
    ) -> ReferenceStats:
        mu, sigma = feature_stats(features)
        return cls(mu, sigma, int(np.shape(features)[0]), name, extractor_id, dict(source or {}))

    def save(self, path: str | Path) -> None:
        """Write the stats as .npz, atomically (a half-written cache would be read as valid later)."""
        arrays = {
            "mu": self.mu,
            "sigma": self.sigma,
            "count": self.count,
            "name": np.array(self.name),
            "extractor_id": np.array(self.extractor_id),
            # JSON in a string array: np.load can then read it without allow_pickle.
            "source": np.array(json.dumps(self.source, sort_keys=True)),
        }
        write_atomic(path, lambda handle: np.savez(handle, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """The stats ``save`` wrote to ``path``; a ConfigError naming the file when it holds something else
        (an empty or truncated copy, another .npz)."""
        try:
            with np.load(Path(path)) as data:
                # Caches written before sources were recorded have no "source": an empty one never matches
                # a described reference, so they are recomputed once.
                source = json.loads(str(data["source"])) if "source" in data.files else {}
                return cls(
                    data["mu"],
                    data["sigma"],
                    int(data["count"]),
                    str(data["name"]),
                    str(data["extractor_id"]),
                    source,
                )
        except (EOFError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
            raise ConfigError(
                f"{str(path)!r} holds no readable feature statistics ({type(e).__name__}: {e}); allowed: an "
                ".npz written by ReferenceStats.save"
            ) from None

    @staticmethod
    def cache_path(cache_dir: str | Path, name: str, extractor_id: str) -> Path:
        """``<cache_dir>/<name>__<extractor>__<hash>.npz``; the hash keeps apart ids that slug alike."""
        digest = hashlib.sha1(f"{name}\0{extractor_id}".encode()).hexdigest()[:10]
        return Path(cache_dir) / f"{_slug(name)}__{_slug(extractor_id)}__{digest}.npz"

    @classmethod
    def cached(
        cls,
        name: str,
        images: Iterable | Callable[[], Iterable],
        extractor: FeatureExtractor,
        cache_dir: str | Path,
        *,
        extractor_id: str | None = None,
        reference: dict | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> ReferenceStats:
        """The stats of reference set ``name`` under ``extractor``, from the cache when present and still
        describing the same images, otherwise computed and cached. ``images`` may be a zero-argument
        callable so that a cache hit does not even list the reference images. ``extractor_id`` defaults to
        ``extractor.id``.

        ``reference`` describes the images (``folder_source(folder)``) and ``extractor.fingerprint``, when
        it has one, the feature model's weights; both are recorded in the cache, and a cache that recorded
        other ones is recomputed (with a warning saying what changed) rather than reused."""
        extractor_id = extractor_id if extractor_id is not None else getattr(extractor, "id", None)
        if not extractor_id:
            raise ValueError("the extractor has no `id`; pass extractor_id= to name it in the cache key")
        source = {"reference": reference, "features": getattr(extractor, "fingerprint", None)}
        source = {k: v for k, v in source.items() if v is not None}
        path = cls.cache_path(cache_dir, name, extractor_id)
        stats = None
        if path.is_file():
            try:
                stats = cls.load(path)
            except ValueError as e:
                # The cache only saves time: an unreadable one (a truncated copy) is recomputed, not fatal.
                log.warning("reference %r: recomputing the cached statistics: %s", name, e)
        if stats is not None and (stats.name, stats.extractor_id) == (name, extractor_id):
            change = _source_change(stats.source, source)
            if not change:
                log.info("reference %r: cached statistics of %d images (%s)", name, stats.count, path)
                return stats
            log.warning("reference %r: recomputing the cached statistics in %s: %s", name, path, change)
        features = extract_features(
            images() if callable(images) else images,
            extractor,
            batch_size=batch_size,
            progress=progress,
            min_count=2,  # one image has no covariance
            what=f"reference images of {name!r}",
        )
        stats = cls.from_features(features, name, extractor_id, source)
        stats.save(path)
        # Said as a cache hit is: the file stays behind (by default under the working directory).
        log.info("reference %r: statistics of %d images cached in %s", name, stats.count, path)
        return stats


def fid_score(
    images: Iterable,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> float:
    """Frechet distance between ``images`` and ``reference`` in ``extractor``'s feature space."""
    extractor_id = getattr(extractor, "id", None)
    if reference.extractor_id and extractor_id and extractor_id != reference.extractor_id:
        raise ConfigError(
            f"reference stats were computed with {reference.extractor_id!r}, not {extractor_id!r}; "
            f"compare features of one extractor"
        )
    features = extract_features(
        images, extractor, batch_size=batch_size, progress=progress, min_count=2, what="sample images"
    )
    mu, sigma = feature_stats(features)
    return frechet_distance(mu, sigma, reference.mu, reference.sigma)


def model_inputs(inputs, device: torch.device, dtype: torch.dtype) -> dict:
    """Move processor outputs to the model: floating tensors also take the model's dtype."""
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
        for k, v in inputs.items()
    }


CLIP_ALLOWED = "a CLIP model hub id or folder, e.g. openai/clip-vit-large-patch14"


class ClipEmbedder:
    """Unit CLIP image and text embeddings from a ``CLIPModel`` hub id or folder (with its processor)."""

    def __init__(
        self,
        model_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import CLIPModel, CLIPProcessor

        # Refused here, in one line: transformers would take a path for a malformed hub id, and another kind
        # of model would fail in its tokenizer or load with random CLIP weights.
        model_config(model_id, f"--clip {str(model_id)!r}", CLIP_ALLOWED, ("clip",), "a CLIP folder")
        self.model_id = str(model_id)
        self.device, self.dtype = resolve_device(device), dtype
        self.processor = CLIPProcessor.from_pretrained(model_id)
        # Cast after loading: the keyword for the load dtype differs across transformers versions.
        self.model = CLIPModel.from_pretrained(model_id).to(self.device, dtype).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings

    # The projections are applied here rather than through get_*_features, whose return type changed
    # between transformers 4 (a tensor) and 5 (a model output).
    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[decoded_image(i) for i in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        # CLIP reads at most max_position_embeddings (77) tokens; longer prompts are truncated, as in
        # torchmetrics' CLIPScore.
        inputs = self.processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        )
        out = self.model.text_model(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
        )
        return torch.nn.functional.normalize(
            self.model.text_projection(out.pooler_output).float(), dim=-1
        ).cpu()


class ClipScore:
    """CLIP score of (image, prompt) pairs: 100 x cosine similarity, unclipped (``clip_score`` clips their
    mean at 0). torchmetrics' default model is ``openai/clip-vit-large-patch14``."""

    def __init__(
        self,
        model_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.clip = ClipEmbedder(model_id, device=device, dtype=dtype)
        self.id = f"clip-score:{self.clip.model_id}"

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(
                f"{len(images)} images but {len(prompts)} prompts; expected one prompt per image"
            )
        cosine = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        # Not clipped per pair: the CLIP score papers report is torchmetrics' CLIPScore, whose code
        # (functional/multimodal/clip_score.py, _clip_score_update; CLIPScore.compute) keeps 100 x cosine
        # per pair and clips only the mean at 0; its docstring's per-pair max(100 cos, 0) is not what runs.
        return 100 * cosine


def clip_scores(
    images: Sequence,
    prompts: Sequence[str],
    scorer: Callable[[Sequence, Sequence[str]], torch.Tensor],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> torch.Tensor:
    """CLIP score of each (image, prompt) pair (images as PIL images or paths), float64 (N,), unclipped
    (see ``ClipScore``), with NaN for an image that could not be read: those are skipped and counted (one
    warning names how many and an example), as training skips them."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"{len(images)} images and {len(prompts)} prompts; expected equal, non-zero counts")
    check_batch_size(batch_size)
    scores = torch.full((len(images),), float("nan"), dtype=torch.float64)
    skipped = SkippedImages("images")
    for start in tqdm(
        range(0, len(images), batch_size), desc="CLIP score", unit="batch", disable=not progress
    ):
        kept, batch = [], []
        for index in range(start, min(start + batch_size, len(images))):
            try:
                batch.append(load_image(images[index]))
            except SkipSample as e:
                skipped.add(images[index], e)
                continue
            kept.append(index)
        if batch:
            scores[kept] = _f64(scorer(batch, [prompts[i] for i in kept]))
    skipped.warn(len(images))
    if skipped.count == len(images):
        raise ConfigError(
            f"none of the {len(images)} images could be read (e.g. {skipped.example}); allowed: readable "
            "image files"
        )
    return scores


def clip_score(
    images: Sequence,
    prompts: Sequence[str],
    scorer: Callable[[Sequence, Sequence[str]], torch.Tensor],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> float:
    """Mean CLIP score over the pairs whose image could be read (see ``clip_scores``), clipped at 0 as
    torchmetrics' CLIPScore clips it."""
    return mean_clip_score(clip_scores(images, prompts, scorer, batch_size=batch_size, progress=progress))


def mean_clip_score(scores: torch.Tensor) -> float:
    """The CLIP score of pairs scored by ``clip_scores``: the mean over the readable ones (NaN: skipped),
    clipped at 0 as torchmetrics' CLIPScore clips it."""
    return max(float(scores.nanmean()), 0.0)


def model_fingerprint(model_id: str | Path, model=None) -> str:
    """What the model named ``model_id`` is beyond its name: for a folder, its name and a digest of its
    files' names and sizes (the folder's name, not its place: a copy elsewhere keeps it; replaced weights
    change it); for a hub id, the id at the commit the loaded transformers ``model`` came from, when known.
    Cheap: no weight is read."""
    folder = Path(model_id)
    if folder.is_dir():
        weights = [p for p in folder.rglob("*") if p.is_file()]
        return f"{folder.resolve().name}#{files_digest(folder, weights)[:16]}"
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"{model_id}@{commit}" if commit else str(model_id)


def results_file(folder: str | Path, out_file: str | Path | None = None) -> Path:
    """``out_file``, or by default ``results_beside(folder)``: named before the scoring, so that a folder
    with no place beside it is refused before the work."""
    return Path(out_file) if out_file is not None else results_beside(folder)


def results_beside(folder: str | Path) -> Path:
    """Where GenEval's, DPG-Bench's and T2I-CompBench's library scorers write the per-image results of ``folder`` by
    default: ``<name>-results.jsonl`` beside it (in its parent, "." and ".." resolved), never among the
    images, which the official scorers read as samples (ELLA's DPG-Bench script fails on any other file).
    Named after the folder, so that sibling folders (``out/a``, ``out/b``; a GenEval ``OUT/samples`` and
    a DPG-Bench ``OUT/grids``) keep one each, and never a protocol run's ``results[-...].jsonl``
    (``eval.run.output_files``), which its scores file names. The filesystem root has no name to give the
    file and no parent to hold it (a ``results.jsonl`` inside it would lie among the images), so it is
    refused: the caller passes ``out_file``."""
    resolved = Path(os.path.abspath(folder))  # lexically ("samples/", ".", ".."): a symlink keeps its name
    if not resolved.name:  # "/", "//", "/..", or "." run from the root
        raise ConfigError(
            f"the images folder {str(folder)!r} is the filesystem root {str(resolved)!r}, which has no parent "
            "to hold its default results file: pass out_file (the results file to write)"
        )
    return resolved.parent / f"{resolved.name}-results.jsonl"


def scorer_record(model_id, loaded=None, fingerprint: str | None = None) -> dict:
    """A scoring model as a scores file records it: its id as given and, as ``model_fingerprint``, what
    that id loaded (``loaded``: the scorer built from it, whose ``model`` or ``clip.model`` is the
    transformers model, for a hub id's commit), or the ``fingerprint`` a feature extractor made itself."""
    if fingerprint is None:
        model = getattr(loaded, "model", None)
        if model is None:  # ClipColorClassifier and ClipSimilarity: through their ClipEmbedder
            model = getattr(getattr(loaded, "clip", None), "model", None)
        fingerprint = model_fingerprint(model_id, model)
    return {"id": str(model_id), "fingerprint": fingerprint}


class TransformersImageFeatures:
    """A transformers vision model as a ``FeatureExtractor``: images -> (B, D) float32 features.

    CLIP checkpoints give their projected image embeddings (unnormalised); other models (DINOv2, ViT,
    SigLIP vision, ...) loaded through ``AutoModel`` give ``image_embeds`` when they have them, else the
    pooled output, else the mean of the last hidden state. ``id`` names the model for stats caches.
    """

    def __init__(
        self,
        model_id: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoImageProcessor, AutoModel, CLIPModel

        named = f"--features {str(model_id)!r}"
        vision = "a transformers vision model (CLIP, DINOv2, ViT, ...)"
        config = model_config(model_id, named, vision, folder="a feature model folder")
        self.model_id = str(model_id)
        self.id = f"transformers:{self.model_id}"
        self.device, self.dtype = resolve_device(device), dtype
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_id)
        except (OSError, ValueError) as e:  # a text-only model: no image processor
            raise ConfigError(
                f"{named} has no image processor, so it is no vision model ({config.model_type!r}; allowed: a "
                "transformers vision model (CLIP, DINOv2, ViT, ...))"
            ) from e
        self.is_clip = config.model_type == "clip"
        loader = CLIPModel if self.is_clip else AutoModel
        self.model = loader.from_pretrained(model_id).to(self.device, dtype).eval()
        # The id is the name the user gave; the fingerprint is what that name loaded, so that cached
        # reference stats are not reused after the folder's weights were replaced (or the hub model updated).
        self.fingerprint = model_fingerprint(model_id, self.model)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[decoded_image(i) for i in images], return_tensors="pt")[
            "pixel_values"
        ]
        pixels = pixels.to(self.device, self.dtype)
        if self.is_clip:
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            return self.model.visual_projection(pooled).float().cpu()
        out = self.model(pixel_values=pixels)
        for key in ("image_embeds", "pooler_output"):
            value = getattr(out, key, None)
            if value is not None:
                return value.flatten(1).float().cpu()
        return out.last_hidden_state.mean(1).float().cpu()
