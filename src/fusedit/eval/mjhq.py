"""FID on MJHQ-30K (design-space.md s.4: "FID on MJHQ-30K (clean-fid, 512 px)"): one image per prompt at the
model's size with the preset's sampling protocol, scored against MJHQ-30K's 30,000 reference images overall
and per category with clean-fid's Inception features (``eval.inception``).

MJHQ-30K (huggingface.co/datasets/playgroundai/MJHQ-30K) publishes ``meta_data.json`` ({image id:
{"prompt": ..., "category": ...}}, 10 categories of 3,000) and ``mjhq30k_imgs.zip`` (the reference images
as ``<category>/<id>.jpg``). Samples are written the same way, ``samples/<category>/<id>.png``, so that
clean-fid or any other scorer can read both folders side by side.

Seeds: the image of the prompt at position i of the ids in sorted order is drawn with seed ``seed + i``,
so that an image does not depend on which prompts run with it (``per_category`` subsets, resumed runs).
The overall reference statistics are pooled exactly from the per-category ones (``pool_stats``), so the
30,000 reference images are decoded once, category by category, and cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fusedit.config import ConfigError, check_whole
from fusedit.eval.benchmarks import MJHQ_IMAGES_ZIP, MJHQ_URL
from fusedit.eval.fid import (
    ReferenceStats,
    extract_features,
    feature_stats,
    folder_source,
    frechet_distance,
    list_images,
)
from fusedit.imaging import generated_image, kept_for_prompts, save_png


def check_scoring(reference, features, per_category: int | None = None) -> None:
    """Scoring needs both the reference images and the feature model; one alone is a mistake. FID per
    category needs at least 2 samples of each (a covariance), so ``per_category=1`` cannot be scored."""
    if (reference is None) != (features is None):
        given, missing = ("--reference", "--features") if features is None else ("--features", "--reference")
        raise ConfigError(f"{given} scores MJHQ-30K only together with {missing}; add it or leave out both")
    if reference is not None and per_category == 1:
        raise ConfigError(
            "--per-category 1 cannot be scored: FID needs at least 2 samples per category (allowed: "
            "--per-category 2 or more, or no --reference/--features to only sample)"
        )


def select(rows: Sequence[dict], per_category: int | None) -> list[dict]:
    """The first ``per_category`` prompts (in id order) of each category, or all of them when None; each
    row gains ``index``, its position among all ids (its seed offset)."""
    check_whole("per_category", per_category, none_for="all")
    taken: dict[str, int] = {}
    chosen = []
    for index, row in enumerate(rows):
        count = taken.get(row["category"], 0)
        if per_category is None or count < per_category:
            chosen.append({**row, "index": index})
            taken[row["category"]] = count + 1
    return chosen


def sample_path(samples: Path, row: dict) -> Path:
    return samples / row["category"] / f"{row['id']}.png"


def write_mjhq_samples(
    rows: Sequence[dict],
    generate: Callable[[str, int, int], Sequence[Image.Image]],
    samples: str | Path,
    seed: int = 42,
    progress: bool = True,
) -> dict:
    """One image per row into ``samples/<category>/<id>.png`` (rows from ``select``); resumable: an image
    already written for the row's prompt is kept (``imaging.kept_for_prompts``). ``generate(prompt, seed, n)`` as
    for GenEval. Returns counts."""
    samples = Path(samples)
    # Every kept image is checked before the first is generated: a changed prompt is found at once.
    kept = kept_for_prompts([(sample_path(samples, row), row["prompt"]) for row in rows])
    todo = [row for row, keep in zip(rows, kept) if not keep]
    generated, skipped = 0, len(rows) - len(todo)
    for row in tqdm(todo, desc="MJHQ-30K samples", unit="img", disable=not progress):
        target = sample_path(samples, row)
        images = list(generate(row["prompt"], seed + row["index"], 1))
        if len(images) != 1:
            raise ValueError(f"generate returned {len(images)} images for {row['prompt']!r}; expected 1")
        target.parent.mkdir(parents=True, exist_ok=True)
        save_png(generated_image(images[0]), target, row["prompt"])
        generated += 1
    return {"generated": generated, "skipped": skipped}


def pool_stats(parts: Sequence[ReferenceStats]) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean, unbiased covariance and count of the union of sets whose (mu, sigma, count) are ``parts``:
    exactly ``feature_stats`` of all their features concatenated (total scatter = within + between)."""
    counts = np.array([p.count for p in parts], dtype=np.float64)
    total = counts.sum()
    mu = sum(n * p.mu for n, p in zip(counts, parts)) / total
    scatter = sum((n - 1) * p.sigma + n * np.outer(p.mu - mu, p.mu - mu) for n, p in zip(counts, parts))
    return mu, scatter / (total - 1), int(total)


def reference_files(reference: str | Path, categories: Sequence[str]) -> dict[str, list[Path]]:
    """The reference images of each category, ``reference/<category>/*``; listed before any sampling so
    that a wrong folder fails at once."""
    reference = Path(reference)
    if not reference.is_dir():
        raise FileNotFoundError(
            f"MJHQ-30K reference folder {str(reference)!r} does not exist; allowed: the unzipped "
            f"{MJHQ_IMAGES_ZIP} ({MJHQ_URL.format(ref='main', name=MJHQ_IMAGES_ZIP)}), one folder per category"
        )
    missing = [c for c in categories if not (reference / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(reference)!r} has no folder {missing[0]!r}; allowed: the unzipped {MJHQ_IMAGES_ZIP}, "
            f"with one folder per category ({', '.join(categories)})"
        )
    return {c: list_images(reference / c) for c in categories}


def score_mjhq(
    rows: Sequence[dict],
    samples: str | Path,
    references: dict[str, list[Path]],
    extractor,
    cache_dir: str | Path,
    *,
    reference_root: str | Path,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """FID of the samples of ``rows`` against MJHQ-30K's reference images: overall and per category.

    Per category: the category's samples against its reference images (stats cached per category).
    Overall: all samples against the pooled statistics of every listed category."""
    samples = Path(samples)
    categories = sorted({row["category"] for row in rows})
    per_category, sample_features, reference_stats = {}, [], []
    for category in categories:
        files = [sample_path(samples, row) for row in rows if row["category"] == category]
        stats = ReferenceStats.cached(
            f"mjhq30k/{category}",
            references[category],
            extractor,
            cache_dir,
            reference=folder_source(Path(reference_root) / category, references[category]),
            batch_size=batch_size,
            progress=progress,
        )
        features = extract_features(
            files,
            extractor,
            batch_size=batch_size,
            progress=progress,
            min_count=2,
            what=f"{category} samples",
        )
        mu, sigma = feature_stats(features)
        per_category[category] = frechet_distance(mu, sigma, stats.mu, stats.sigma)
        sample_features.append(features)
        reference_stats.append(stats)
    mu_ref, sigma_ref, n_ref = pool_stats(reference_stats)
    mu, sigma = feature_stats(np.concatenate(sample_features))
    return {
        "overall": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "categories": per_category,
        "samples": sum(len(f) for f in sample_features),
        "reference_images": n_ref,
        "features": getattr(extractor, "id", type(extractor).__name__),
    }
