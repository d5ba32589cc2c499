"""Golden losses: each built-in debug preset, trained a few steps from its seed, gives the losses recorded in
tests/fixtures/golden.json (as torchtitan pins its debug models' loss curves), and its EMA then
samples a seeded image whose per-channel mean and mean absolute value are recorded beside them.

Any change to the training math shows here: initialisation (adaLN-Zero, the output projection), the flow
matching convention and timestep sampling, caption dropout, the shapes data, the optimizer and learning-rate
schedule, a design's forward; the sampler, its timestep schedule and classifier-free guidance. The other
tests check such pieces one by one against their definitions; this one catches the change nobody meant to
make. A change that is meant rewrites the file:

    FUSEDIT_GOLDEN=update python -m pytest -q tests/test_golden.py

and the diff of the JSON file goes into the commit that changes the math, saying why.

The tolerance (relative 1e-4) allows for CPUs whose kernels round differently: one thread against two moves
these losses by 1e-7 at most. A change of the math moves them by more: learning rate 2.1e-3 for 2e-3 by 1%,
flow.shift 1.1 for 1.0 by 0.2%, caption dropout 0.15 for 0.1 by 0.02%.
"""

import json
import math
import os
from pathlib import Path

import pytest

from fusedit.config.load import load_config
from fusedit.sampling import generate, load_sampling_model, sample_settings
from fusedit.train.loop import train

GOLDEN = Path(__file__).parent / "fixtures" / "golden.json"
# Short and small, so that the whole set takes a few seconds; a learning rate, warmup and EMA that keep the
# run a real one (the schedule's warmup and decay both reached; no early-EMA warning).
OVERRIDES = [
    "train.device=cpu",  # on a GPU host "auto" trains on CUDA in bf16, far from a CPU record
    "train.steps=6",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.checkpoint_every=6",
    "train.ema_decay=0.5",
    "train.log_every=1",
]
PRESETS = [
    "debug",
    "debug-dit-self",
    "debug-dit-cross",
    "debug-fusedit-cross",
    "debug-lidit",
    "debug-clip-mod",
]
UPDATE = os.environ.get("FUSEDIT_GOLDEN") == "update"


def _recorded() -> dict[str, dict[str, list[float]]]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def _image_stats(run) -> list[float]:
    """The run's EMA sampling one seeded prompt at its own settings, 4 steps: per-channel mean, then
    per-channel mean absolute value of the (1, 3, H, W) image in [-1, 1]."""
    sampler, cfg, _ = load_sampling_model(run, "cpu")
    image = generate(sampler, ["a red circle"], seed=0, **sample_settings(cfg, steps=4))
    return [*image.mean(dim=(0, 2, 3)).tolist(), *image.abs().mean(dim=(0, 2, 3)).tolist()]


@pytest.mark.parametrize("preset", PRESETS)
def test_debug_preset_trains_and_samples_as_recorded(preset, tmp_path):
    losses = train(load_config(preset, OVERRIDES), tmp_path / "run", progress=False)["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    got = {"losses": losses, "sample": _image_stats(tmp_path / "run")}
    if UPDATE:
        recorded = _recorded()
        recorded[preset] = got
        GOLDEN.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
        return
    expected = _recorded().get(preset)
    assert expected is not None, (
        f"{GOLDEN} has no record for {preset!r}: run FUSEDIT_GOLDEN=update (see docstring)"
    )
    for key in ("losses", "sample"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (
            f"{preset}: the {'training' if key == 'losses' else 'sampling'} math changed (got {got[key]}, "
            f"recorded {expected[key]}); if that is meant, rewrite the record with FUSEDIT_GOLDEN=update "
            "(see this file's docstring)"
        )


def test_every_recorded_preset_is_still_trained():
    # A preset dropped from PRESETS (or renamed) must take its record with it, so no stale curve lingers.
    assert sorted(_recorded()) == sorted(PRESETS)
