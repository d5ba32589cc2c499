"""Where a demo training step's time goes on the CPU: data, text (LLM forward), DiT forward+backward+AdamW.

    python benchmarks/profile_demo_step.py [--steps 20]

Prints the median milliseconds of each part over ``--steps`` steps of the debug preset (batch 32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusedit.config import load_config
from fusedit.data.loader import step_loader
from fusedit.flow import flow_loss, interpolate
from fusedit.system import build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cfg = load_config("debug")
    model = build_model(cfg)
    params = [q for q in model.denoiser.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loader = iter(step_loader(cfg.data, 0, cfg.train.batch_size, 0, args.steps + 2))
    parts: dict[str, list[float]] = {"data": [], "text": [], "dit fwd+bwd+adamw": []}
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        text = model.encode_prompts(batch["caption"])
        t2 = time.perf_counter()
        x0 = batch["image"]
        noise, t = torch.randn_like(x0), torch.rand(x0.shape[0])
        flow_loss(model.denoiser(interpolate(x0, noise, t), t, text), x0, noise).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= 2:  # warm-up excluded
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v * 1000)
    total = sum(statistics.median(v) for v in parts.values())
    for k, v in parts.items():
        m = statistics.median(v)
        print(f"{k:<20} {m:8.1f} ms  {100 * m / total:5.1f}%")
    print(f"{'step':<20} {total:8.1f} ms  (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
