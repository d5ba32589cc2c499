"""Which SDPA kernel is fastest for deep-fusion attention: image queries over [text ; image] K/V.

Shapes are the FuseDiT baseline's (Gemma-2B: 8 query heads, 1 KV head, head_dim 256): batch B, N image
tokens, T text tokens. Each backend runs forward + backward with GQA handled by the kernel
(``enable_gqa``) and with K/V expanded to every head first; a backend that refuses a shape is reported,
not hidden. Usage (GPU): ``python benchmarks/attention_backends.py --json attn.jsonl``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from fusedit.bench import time_it
from fusedit.layers.attention import BACKENDS


def run(backend: str, b: int, n: int, t: int, heads: int, kv_heads: int, d: int, expand: bool) -> dict:
    device = torch.device("cuda")
    q = torch.randn(b, heads, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, kv_heads, t + n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, kv_heads, t + n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, heads, n, d, device=device, dtype=torch.bfloat16)

    def step():
        kk, vv = k, v
        if expand and kv_heads != heads:
            kk = k.repeat_interleave(heads // kv_heads, dim=1)
            vv = v.repeat_interleave(heads // kv_heads, dim=1)
        with sdpa_kernel(BACKENDS[backend]):
            out = F.scaled_dot_product_attention(q, kk, vv, enable_gqa=not expand and kv_heads != heads)
        out.backward(grad)

    row = {"backend": backend, "batch": b, "image_tokens": n, "text_tokens": t, "heads": heads}
    row |= {"kv_heads": kv_heads, "head_dim": d, "gqa": "expand" if expand else "kernel"}
    try:
        seconds = time_it(step, device, warmup=3, repeats=10)
    except RuntimeError as e:
        return row | {"error": str(e).splitlines()[0][:160]}
    flops = 3.5 * 4 * b * heads * n * (t + n) * d  # fwd 2 matmuls, bwd 5 (2.5x): 4*B*H*N*S*d per matmul pair
    return row | {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    for b, n in ((16, 1024), (32, 256), (4, 4096)):
        for backend in ("flash", "efficient", "cudnn"):
            for expand in (False, True):
                r = run(backend, b, n, 256, heads=8, kv_heads=1, d=256, expand=expand)
                rows.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
