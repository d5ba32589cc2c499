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

    samples = out_dir / "samples"
    counts = write_geneval_samples(load_geneval(prompts_path), gen, samples, n_per_prompt, seed, progress)
    result = {"samples": str(samples), **counts}
    if detector:
        scores = score_geneval_folder(
            samples,
            TransformersDetector(detector, device=device),
            ClipColorClassifier(clip, device=device) if clip else None,
            progress=progress,
        )
        result["scores"] = scores
        (out_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    return result


def run_dpg(
    gen, prompts_path, out_dir: Path, *, vqa: str | None, seed: int = 42, device=None, progress: bool = True
) -> dict:
    from fusedit.eval.benchmarks import dpg_csv_path, load_dpg
    from fusedit.eval.dpg import TransformersVQA, score_dpg_folder, write_dpg_grids

    grids = out_dir / "grids"
    counts = write_dpg_grids(load_dpg(prompts_path), gen, grids, seed=seed, progress=progress)
    result = {"grids": str(grids), **counts}
    if vqa:
        scores = score_dpg_folder(
            grids, dpg_csv_path(prompts_path), TransformersVQA(vqa, device=device), progress=progress
        )
        result["scores"] = scores
        (out_dir / "scores.json").write_text(json.dumps(scores, indent=1))
    return result
