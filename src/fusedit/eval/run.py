"""Run the standard benchmark protocols on a fusedit model (design-space.md s.4): generate in each
benchmark's official layout, then score with the built-in scorers when their models are given.

GenEval: 4 images per prompt, seed 42, ``<index>/metadata.jsonl`` + ``<index>/samples/NNNNN.png`` (the
official scorer, github.com/djghosh13/geneval ``evaluation/evaluate_images.py``, runs on that folder for
the published numbers). DPG-Bench: one 2x2 grid per prompt, ``<name>.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from fusedit.config import ConfigError
from fusedit.files import write_text_atomic
from fusedit.imaging import to_uint8
from fusedit.sample import generate


def generator(model, settings: dict):
    """A ``generate(prompt, seed, n) -> [PIL images]`` callable over ``model`` for the protocol writers;
    ``settings`` are ``generate`` keyword arguments (``fusedit.sample.sample_settings``)."""

    def run(prompt: str, seed: int, n: int) -> list[Image.Image]:
        x = generate(model, [prompt] * n, seed=seed, **settings)
        return [Image.fromarray(a) for a in to_uint8(x)]

    return run


def run_geneval(
    gen,
    prompts_path,
    out_dir: Path,
    *,
    detector: str | None,
    clip: str | None,
    n_per_prompt: int = 4,
    seed: int = 42,
    device=None,
    progress: bool = True,
) -> dict:
    from fusedit.eval.benchmarks import load_geneval
    from fusedit.eval.geneval import (
        ClipColorClassifier,
        TransformersDetector,
        score_geneval_folder,
        write_geneval_samples,
    )

    metadata = load_geneval(prompts_path)
    # Checked before generating: a missing scoring model must not surface only after hours of sampling.
    if clip and not detector:
        raise ConfigError(f"--clip {clip} scores GenEval colours only together with --detector ID; add one")
    colour_prompts = sum(any("color" in c for c in m["include"]) for m in metadata)
    if detector and not clip and colour_prompts:
        raise ConfigError(
            f"--detector needs --clip ID: {colour_prompts} of the {len(metadata)} GenEval prompts ask for "
            f"colours, which GenEval classifies with CLIP (e.g. openai/clip-vit-large-patch14)"
        )
    samples = out_dir / "samples"
    counts = write_geneval_samples(metadata, gen, samples, n_per_prompt, seed, progress)
    result = {"samples": str(samples), **counts}
    if detector:
        scores = score_geneval_folder(
            samples,
            TransformersDetector(detector, device=device),
            ClipColorClassifier(clip, device=device) if clip else None,
            progress=progress,
        )
        result["scores"] = scores
        write_text_atomic(out_dir / "scores.json", json.dumps(scores, indent=1))
    return result


def run_dpg(
    gen, prompts_path, out_dir: Path, *, vqa: str | None, seed: int = 42, device=None, progress: bool = True
) -> dict:
    from fusedit.eval.benchmarks import dpg_csv_path, load_dpg
    from fusedit.eval.dpg import TransformersVQA, score_dpg_folder, write_dpg_grids

    prompts = load_dpg(prompts_path)
    # Found before generating: without the question file the grids could not be scored.
    questions = dpg_csv_path(prompts_path) if vqa else None
    grids = out_dir / "grids"
    counts = write_dpg_grids(prompts, gen, grids, seed=seed, progress=progress)
    result = {"grids": str(grids), **counts}
    if vqa:
        scores = score_dpg_folder(grids, questions, TransformersVQA(vqa, device=device), progress=progress)
        result["scores"] = scores
        write_text_atomic(out_dir / "scores.json", json.dumps(scores, indent=1))
    return result
