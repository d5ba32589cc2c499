"""On the GPU: the fast paths compute what the slow ones do, within bf16 rounding.

Builds a preset's model with random weights (a few layers: equality does not need depth) and compares,
under bf16 autocast, (1) the compiled blocks with the "auto" (cuDNN-first) attention against eager blocks
with the math backend, forward and the gradients of a loss, and (2) the sampling form (fused projections,
bf16 matmul weights) against the training form. Prints one JSON line per check with the max abs error
relative to the output's scale. Usage: ``python benchmarks/check_fast_paths.py fusedit-gemma2b``.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch._functorch.config

from fusedit.bench import synthetic_text
from fusedit.config import load_config
from fusedit.models.inference import prepare_for_sampling
from fusedit.system import build_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--device", default="cuda", help="cpu only checks the script (compiles with eager)")
    args = p.parse_args()
    cfg = load_config(args.preset, [f"model.num_layers={args.layers}", "text.model_id=", "text.tokenizer="])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg, device, with_autoencoder=False)
    with torch.no_grad():  # adaLN-Zero starts at zero: give every weight something to compute
        for q in model.denoiser.parameters():
            q.add_(torch.randn_like(q) * 0.02)
    slow = model.denoiser
    fast = copy.deepcopy(slow)
    slow.attention_backend = "math"
    fast.attention_backend = "auto"
    torch._functorch.config.activation_memory_budget = cfg.train.activation_memory_budget
    fast.compile_blocks("inductor" if device.type == "cuda" else "eager")
    side = args.resolution // cfg.vae.downsample
    x = torch.randn(4, cfg.vae.latent_channels, side, side, device=device)
    t = torch.rand(4, device=device)
    text = synthetic_text(model, torch.full((4,), 256), 256, torch.Generator(device).manual_seed(0))
    outs, grads = [], []
    for m in (slow, fast):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = m(x, t, text)
        v.float().pow(2).mean().backward()
        outs.append(v.detach())
        grads.append(torch.cat([q.grad.flatten() for q in m.parameters()]))
    print(json.dumps({"check": "compiled+auto vs eager+math: forward", "rel_err": rel(outs[1], outs[0])}))
    print(json.dumps({"check": "compiled+auto vs eager+math: grads", "rel_err": rel(grads[1], grads[0])}))
    sampling = prepare_for_sampling(copy.deepcopy(slow), torch.bfloat16, fuse=True)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ref, got = slow(x, t, text), sampling(x, t, text)
    print(json.dumps({"check": "sampling form vs training form", "rel_err": rel(got, ref)}))


if __name__ == "__main__":
    main()
