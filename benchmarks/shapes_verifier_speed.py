"""How long the weight-free shapes verifier takes per image (it scores every sample of `fusedit eval`'s
shapes benchmark, so it must stay far below the sampler's time per image).

    python benchmarks/shapes_verifier_speed.py [--images 200] [--size 64] [--repeats 5]

Renders ``--images`` ground-truth scenes, then prints the median over ``--repeats`` of the milliseconds the
verifier takes per image.
"""

from __future__ import annotations

import argparse
import statistics
import time

from fusedit.data import shapes
from fusedit.eval.shapes_verifier import score


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    pairs = [shapes.make_scene(seed=123, index=i, size=args.size) for i in range(args.images)]
    images = [shapes.render(scene) for _, scene in pairs]
    per_image = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for (prompt, _), image in zip(pairs, images):
            score(prompt, image)
        per_image.append((time.perf_counter() - start) / len(images))
    print(
        f"{args.images} images at {args.size} px: {1000 * statistics.median(per_image):.2f} ms per image (median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
