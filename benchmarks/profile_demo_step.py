"""Where a demo training step's time goes on the CPU, and what `fusedit train`'s own loop adds to it.

    python benchmarks/profile_demo_step.py [--steps 20] [--loop-steps 40] [--repeats 3]

Prints the median milliseconds of each part of a step of the debug preset (batch 32) over ``--steps``
steps: data (the step-addressed shapes loader), text (the frozen LLM's forward), the DiT's forward, backward,
clipping and AdamW, and the EMA update (the debug preset's ema_every is 1). Then the same step as
`fusedit train` runs it, per step, from two runs of the real loop (``train()``) that differ only in length by
``--loop-steps`` steps: both build the model and write one checkpoint at their end, so their difference is
what the loop's steps cost, data wait, logging, progress bar and Python overhead included (the median of
``--repeats`` such pairs: another job on the cores lands in one pair, not in the median). The loop's excess
over the sum of the parts is the overhead issue 6 asks about.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fusedit.config import load_config
from fusedit.data.loader import step_loader
from fusedit.flow import flow_loss, interpolate
from fusedit.system import build_model
from fusedit.train.ema import EMA
from fusedit.train.loop import train

WARMUP = 2  # steps left out of the part medians (first-call allocations)


def part_times(steps: int) -> dict[str, float]:
    """Median ms of each part of a debug step, over ``steps`` steps after WARMUP."""
    cfg = load_config("debug")
    model = build_model(cfg)
    params = [q for q in model.denoiser.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    ema = EMA(model.denoiser, cfg.train.ema_decay)
    loader = iter(step_loader(cfg.data, 0, cfg.train.batch_size, 0, steps + WARMUP))
    parts: dict[str, list[float]] = {"data": [], "text": [], "dit fwd+bwd+adamw": [], "ema": []}
    for i in range(steps + WARMUP):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        text = model.encode_prompts(batch["caption"])
        t2 = time.perf_counter()
        x0 = batch["image"]
        noise, t = torch.randn_like(x0), torch.rand(x0.shape[0])
        flow_loss(model.denoiser(interpolate(x0, noise, t), t, text), x0, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        ema.update(model.denoiser)
        t4 = time.perf_counter()
        if i >= WARMUP:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                parts[k].append(v * 1000)
    return {k: statistics.median(v) for k, v in parts.items()}


def loop_step_ms(steps: int, short: int = WARMUP) -> float:
    """ms per step of `fusedit train`'s own loop on the debug preset: the wall time of a run of
    ``short + steps`` steps less that of a run of ``short`` steps, over ``steps``."""

    def run(n: int) -> float:
        cfg = load_config("debug")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=n, checkpoint_every=n))
        quiet = logging.getLogger("fusedit")
        level = quiet.level
        # A short run's warnings (its warmup and EMA outlast it) are true of it, and not what is timed.
        quiet.setLevel(logging.ERROR)
        try:
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                train(cfg, Path(out) / "run", progress=False)
                return time.perf_counter() - t0
        finally:
            quiet.setLevel(level)

    return (run(short + steps) - run(short)) * 1000 / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20, help="steps timed per part (after 2 untimed)")
    p.add_argument("--loop-steps", type=int, default=40, help="the two loop runs' difference in steps")
    p.add_argument("--repeats", type=int, default=3, help="pairs of loop runs; the median counts")
    args = p.parse_args()
    for flag, value in (
        ("--steps", args.steps),
        ("--loop-steps", args.loop_steps),
        ("--repeats", args.repeats),
    ):
        if value < 1:
            p.error(f"{flag} {value} is not allowed (allowed: 1 or more)")
    parts = part_times(args.steps)
    total = sum(parts.values())
    for k, m in parts.items():
        print(f"{k:<28} {m:8.1f} ms  {100 * m / total:5.1f}%")
    print(f"{'step (sum of the parts)':<28} {total:8.1f} ms  (torch threads: {torch.get_num_threads()})")
    loop = statistics.median(loop_step_ms(args.loop_steps) for _ in range(args.repeats))
    print(f"{'fusedit train, per step':<28} {loop:8.1f} ms  ({loop - total:+.1f} ms over the parts)")


if __name__ == "__main__":
    main()
