"""`fusedit demo`: train the debug preset on the shapes world, then sample a fixed prompt sheet.

Writes into the run folder: the checkpoint, metrics.jsonl, loss.png and samples.png (a labelled grid).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fusedit.checkpoints import load_model
from fusedit.config import Config
from fusedit.data.shapes import DEMO_PROMPTS
from fusedit.imaging import image_grid, plot_curve, save_png, to_uint8
from fusedit.sampling.generation import generate, sample_settings
from fusedit.system import resolve_device
from fusedit.train.loop import train
from fusedit.train.run_folder import refuse_a_run


def sample_sheet(run_dir: Path, cfg: Config, prompts=DEMO_PROMPTS, seeds=(0, 1), progress=True) -> Path:
    device = resolve_device(cfg.train.device)
    model, cfg, _ = load_model(run_dir, device, use_ema=cfg.sample.use_ema)
    images, labels = [], []
    for seed in seeds:
        out = generate(model, list(prompts), seed=seed, **sample_settings(cfg))
        images.extend(to_uint8(out))
        labels.extend(f"{p} (seed {seed})" for p in prompts)
    grid = image_grid(images, labels, ncols=len(prompts), scale=3)
    path = run_dir / "samples.png"
    save_png(grid, path)
    return path


def check_demo_folder(
    run_dir: Path,
    overwrite: bool,
    advice: str = "pass overwrite=True to delete it and run the demo again, or another run_dir",
) -> None:
    """The demo trains afresh: a run in ``run_dir`` trained for days would be lost, so it is refused
    (fusedit.train.run_folder.RunExists, with ``advice``) unless ``overwrite``. An earlier demo's run
    (the loss curve and prompt sheet only the demo writes are there) is replaced, so that the README's demo
    command can be run again as it is."""
    earlier_demo = (run_dir / "loss.png").is_file() and (run_dir / "samples.png").is_file()
    if not (overwrite or earlier_demo):
        refuse_a_run(run_dir, advice)


def run_demo(cfg: Config, run_dir: Path, progress: bool = True, overwrite: bool = False) -> dict:
    run_dir = Path(run_dir)
    check_demo_folder(run_dir, overwrite)
    result = train(cfg, run_dir, overwrite=True, progress=progress)  # checked just above
    losses = [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    plot_curve(losses, run_dir / "loss.png", title=f"{cfg.name}: flow-matching loss", smooth=25)
    grid = sample_sheet(run_dir, cfg, progress=progress)
    # The last 50 (fewer below 50 steps), without steps skipped for a NaN/inf loss (train.max_bad_steps).
    recent = [loss for loss in result["losses"][-50:] if math.isfinite(loss)]
    return {
        "run_dir": run_dir,
        "samples": grid,
        "loss_curve": run_dir / "loss.png",
        "checkpoint": run_dir / "checkpoints",
        "final_loss": sum(recent) / len(recent) if recent else math.nan,
    }
