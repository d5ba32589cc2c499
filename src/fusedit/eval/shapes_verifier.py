"""A programmatic, weight-free verifier for images of the shapes world (``fusedit.data.shapes``).

GenEval scores a text-to-image model by running an object detector on each image and checking the prompt's
structured content (which objects, how many, what colour, where). In the shapes world every image is built
from a tiny vocabulary (six palette colours on a near-white background; circles, squares and apex-up
triangles), so the detector can be written by hand and needs no learned weights:

1. **Pixel colours** (:func:`classify_pixels`). A generated image is noisy and its edges are soft, i.e. they
   are *mixtures* of an object colour with the background. Plain nearest-colour classification gets such
   mixtures wrong: a pixel that is 2/3 red and 1/3 background is closer to orange than to red, so every red
   object would grow an orange rim. Instead each pixel is projected onto the segment from the background to
   each palette colour; it takes the colour whose segment passes closest (Euclidean RGB), and counts as that
   colour only if it lies at least half-way from the background towards it (``t >= 0.5``), otherwise as
   background. Pixels far from every segment (``> max_color_distance``, e.g. black, dark grey, cyan,
   magenta) are "unknown" and ignored. For the pure palette colours this keeps a wide margin: the closest
   colour/segment pair (orange vs the background-red segment) is ~89 apart, so Gaussian noise of std 12 is
   harmless.
2. **Objects** (:func:`label_components`): 8-connected components of equally coloured pixels, found by
   iterative min-label propagation with pointer jumping in numpy (a few ms for a 64 px image). Components
   smaller than ``min_area_fraction`` of the image are noise and dropped. The renderer keeps objects at
   least two pixels apart, so in a correct image each object is exactly one component.
3. **Shapes** (:func:`classify_shape`) from a component's geometry, see the ``_TRIANGLE_*`` and
   ``_SQUARE_MIN_FILL`` constants for the measured values behind each threshold.

:func:`score` applies GenEval-style rules per prompt kind and :func:`evaluate` aggregates them the GenEval
way: accuracy per category, and ``overall`` as the mean of the category accuracies (not of the images).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusedit.data.shapes import ALL_KINDS, BACKGROUND, COLORS, Prompt

# Order of the palette colours; a pixel's class label is an index into this tuple.
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND_LABEL = -1
UNKNOWN_LABEL = -2
UNKNOWN_SHAPE = "unknown"

# Default noise floor: components smaller than this fraction of the image area are dropped. The smallest
# object the renderer draws is 22% of the side (7 px at 32 px, a triangle of ~25 px = 2.4% of the image),
# while speckles of noise are a handful of pixels; 1.5% (15 px at 32 px, 61 px at 64 px) sits between.
MIN_AREA_FRACTION = 0.015
# Default distance (RGB units) from the nearest background-to-colour segment beyond which a pixel is
# "unknown". Pure palette colours are >= 89 from the other colours' segments, and a desaturated or darkened
# version of a colour stays within 80 of its own segment ((200, 60, 60) is 23 from the red one, (170, 10, 10)
# is 52). The price of that tolerance: a mid grey (128, 128, 128) is 66 from the green segment and counts
# as green, while darker greys, black, cyan and magenta are unknown.
MAX_COLOR_DISTANCE = 80.0
# A pixel counts as a colour only when it is at least this far along the background -> colour segment, i.e.
# closer to the colour than to the background. Soft edges below that belong to the background.
_MIN_MIX = 0.5

# Shape thresholds. Measured on the renderer's output for sides 4..40 px (Pillow, no anti-aliasing):
#   shape      fill (area / bbox area)   asymmetry (centroid below bbox centre, / height)   taper
#   square     1.00                      0.00                                                1.00
#   circle     0.67-0.84 (~pi/4 = 0.785) 0.00                                                1.00
#   triangle   0.50-0.63 (-> 0.5)        0.125-0.166 (-> 1/6)                                0.13-0.27
# where area and row widths are measured by each row's span (see classify_shape) and taper = mean row width
# of the top quarter / mean row width of the bottom quarter (an apex-up triangle is narrow at the top and
# full at the bottom; circles and squares are symmetric). Each threshold is roughly mid-way between the
# classes, and a triangle needs two of its three cues, so one cue spoiled by noise (a blunt apex, a ragged
# edge) does not flip the decision.
_TRIANGLE_MIN_ASYMMETRY = 0.075
_TRIANGLE_MAX_TAPER = 0.6
_TRIANGLE_MAX_FILL = 0.66
# Between a circle (0.785; at most 0.81 from 7 px up) and a square (1.0; ~0.92 for a 7 px square whose
# corners a blur has eaten).
_SQUARE_MIN_FILL = 0.89
# Components that look like none of the shapes: every object is drawn filled in a square box, so a bounding
# box more than twice as long as wide, one less than 35% covered by the rows' spans (a diagonal line, a
# scribble), or spans less than half filled with pixels (an outline, a ring) is not a shape.
_MAX_ASPECT = 2.0
_MIN_FILL = 0.35
_MIN_SOLIDITY = 0.5

# Position: like GenEval, the centroid offset along the relation's axis must exceed this fraction of the two
# objects' extents along that axis, and it must also dominate the offset along the other axis. The renderer
# keeps the other-axis offset of box centres within 25% of the main one, so ground truth always passes.
_POSITION_MARGIN = 0.1


@dataclass
class Detection:
    """One detected object.

    ``(cx, cy)`` is the pixel centroid (x to the right, y down), ``area`` the pixel count and ``bbox`` the
    bounding box ``(left, top, right, bottom)`` with exclusive right/bottom, so
    ``image[top:bottom, left:right]`` crops the object.
    """

    color: str
    shape: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Verdict:
    """Whether an image matches its prompt, a short human-readable reason, and what was detected."""

    correct: bool
    reason: str
    detections: list[Detection]


# ----------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """``image``, a uint8 (H, W, 3) array (or PIL RGB image), as a float array of its 0-255 values."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        # generate's floats in [-1, 1] (or [0, 1]) read as 0-255 values are all near black: every image
        # would score as empty, with no error.
        raise ValueError(
            f"expected a uint8 (H, W, 3) image, got dtype {array.dtype} (convert generate's (B, 3, H, W) "
            "images in [-1, 1] with fusedit.imaging.to_uint8, which gives (B, H, W, 3) uint8)"
        )
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image must not be empty, got shape {array.shape}")
    return array.astype(np.float64)


def classify_pixels(image: np.ndarray, max_color_distance: float = MAX_COLOR_DISTANCE) -> np.ndarray:
    """Label every pixel: an index into :data:`COLOR_NAMES`, ``BACKGROUND_LABEL`` or ``UNKNOWN_LABEL``.

    See the module docstring: the pixel is projected onto each background -> colour segment and takes the
    colour of the closest segment, or background if it lies less than half-way along it.
    """
    rgb = _as_rgb(image)
    height, width, _ = rgb.shape
    background = np.asarray(BACKGROUND, dtype=np.float64)
    directions = np.asarray([COLORS[name] for name in COLOR_NAMES], dtype=np.float64) - background  # (K, 3)
    offsets = rgb.reshape(-1, 3) - background  # (N, 3)
    # Position along each segment, 0 at the background and 1 at the pure colour; beyond 1 (a darker or more
    # saturated shade) is clipped to the colour itself.
    t = np.clip(offsets @ directions.T / (directions**2).sum(axis=1), 0.0, 1.0)  # (N, K)
    residual = np.linalg.norm(offsets[:, None, :] - t[:, :, None] * directions[None], axis=-1)  # (N, K)
    nearest = residual.argmin(axis=1)
    rows = np.arange(len(nearest))
    labels = np.where(t[rows, nearest] >= _MIN_MIX, nearest, BACKGROUND_LABEL)
    labels = np.where(residual[rows, nearest] > max_color_distance, UNKNOWN_LABEL, labels)
    return labels.reshape(height, width)


_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def label_components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal, non-negative class labels; -1 elsewhere.

    Each component is labelled with the flat index of its first pixel (row-major). Every foreground pixel
    starts with its own index and repeatedly takes the minimum over its same-class neighbours; pointer jumping
    (``label = label[label]``, valid because a label always names a pixel of the same component) shortcuts
    long chains, so a 64 px image converges in a few sweeps.
    """
    classes = np.asarray(classes)
    height, width = classes.shape
    foreground = classes >= 0
    sentinel = height * width  # larger than any pixel index
    labels = np.where(foreground, np.arange(height * width).reshape(height, width), sentinel)
    padded_classes = np.pad(classes, 1, constant_values=-1)
    same = [
        foreground & (padded_classes[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == classes)
        for dy, dx in _NEIGHBOURS
    ]
    padded = np.full((height + 2, width + 2), sentinel, dtype=labels.dtype)
    flat_foreground = foreground.ravel()
    while True:
        padded[1:-1, 1:-1] = labels
        new = labels.copy()
        for (dy, dx), mask in zip(_NEIGHBOURS, same):
            neighbour = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            np.minimum(new, np.where(mask, neighbour, sentinel), out=new)
        flat = new.ravel()
        while True:
            jumped = flat[flat[flat_foreground]]
            if np.array_equal(jumped, flat[flat_foreground]):
                break
            flat[flat_foreground] = jumped
        if np.array_equal(new, labels):
            return np.where(foreground, labels, -1)
        labels = new


def classify_shape(mask: np.ndarray) -> str:
    """``"circle"``, ``"square"``, ``"triangle"`` or ``"unknown"`` for a boolean mask of one object.

    Uses the cues measured in the table above ``_TRIANGLE_MIN_ASYMMETRY``; ``mask`` may have any margin.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return UNKNOWN_SHAPE
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    height, width = bottom - top + 1, right - left + 1
    # Each row's span (leftmost to rightmost pixel) rather than its pixel count: all three shapes are convex,
    # so the span is their true width, and pixels lost to noise inside an object (holes) do not make a
    # square look like a circle. Rows with no pixel at all (a broken object) have span 0.
    first = np.full(height, width, dtype=np.int64)
    last = np.full(height, -1, dtype=np.int64)
    np.minimum.at(first, ys - top, xs - left)
    np.maximum.at(last, ys - top, xs - left)
    spans = np.maximum(last - first + 1, 0)
    fill = spans.sum() / (height * width)
    solidity = len(ys) / spans.sum()  # ~1 for a filled shape, even with some noise holes; low for a ring
    if max(height, width) > _MAX_ASPECT * min(height, width) or fill < _MIN_FILL or solidity < _MIN_SOLIDITY:
        return UNKNOWN_SHAPE
    # How far the centre of mass of the spans sits below the box centre, in box heights (triangle ~1/6,
    # symmetric shapes 0).
    asymmetry = ((np.arange(height) * spans).sum() / spans.sum() - (height - 1) / 2) / height
    quarter = max(1, round(height / 4))
    taper = spans[:quarter].mean() / max(spans[-quarter:].mean(), 1e-9)
    votes = (
        int(asymmetry > _TRIANGLE_MIN_ASYMMETRY)
        + int(taper < _TRIANGLE_MAX_TAPER)
        + int(fill < _TRIANGLE_MAX_FILL)
    )
    if votes >= 2:
        return "triangle"
    return "square" if fill >= _SQUARE_MIN_FILL else "circle"


def detect_objects(
    image: np.ndarray,
    min_area_fraction: float = MIN_AREA_FRACTION,
    max_color_distance: float = MAX_COLOR_DISTANCE,
) -> list[Detection]:
    """All objects in an (H, W, 3) ``uint8`` image, ordered by their first pixel in row-major order.

    ``min_area_fraction``: components smaller than this fraction of ``H * W`` pixels are dropped as noise.
    ``max_color_distance``: see :func:`classify_pixels`.
    """
    classes = classify_pixels(image, max_color_distance)
    height, width = classes.shape
    components = label_components(classes)
    foreground = components >= 0
    if not foreground.any():
        return []
    ys, xs = np.nonzero(foreground)  # row-major, the same order as components[foreground]
    roots, index = np.unique(components[foreground], return_inverse=True)
    areas = np.bincount(index, minlength=len(roots))
    min_area = max(1, int(np.ceil(min_area_fraction * height * width)))
    detections = []
    for k in np.flatnonzero(areas >= min_area):
        member = index == k
        cy, cx = ys[member], xs[member]
        top, bottom, left, right = int(cy.min()), int(cy.max()) + 1, int(cx.min()), int(cx.max()) + 1
        mask = np.zeros((bottom - top, right - left), dtype=bool)
        mask[cy - top, cx - left] = True
        detections.append(
            Detection(
                color=COLOR_NAMES[classes.flat[roots[k]]],
                shape=classify_shape(mask),
                cx=float(cx.mean()),
                cy=float(cy.mean()),
                area=int(areas[k]),
                bbox=(left, top, right, bottom),
            )
        )
    return detections


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------


def _noun(color: str, shape: str) -> str:
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


def _describe(detections: Sequence[Detection]) -> str:
    if not detections:
        return "nothing"
    return ", ".join(d.name for d in detections)


def _count(detections: Sequence[Detection], color: str | None, shape: str) -> int:
    return sum(d.shape == shape and (color is None or d.color == color) for d in detections)


def _largest(detections: Sequence[Detection], color: str, shape: str) -> Detection | None:
    matches = [d for d in detections if d.color == color and d.shape == shape]
    return max(matches, key=lambda d: d.area) if matches else None


def relation_between(a: Detection, b: Detection) -> str | None:
    """Where ``a`` is relative to ``b``: one of ``shapes.RELATIONS``, or None when no direction dominates.

    The centroid offset along the relation's axis must be larger than the offset along the other axis and
    than ``_POSITION_MARGIN`` times the objects' summed extents along the axis (GenEval's margin), so two
    objects whose centroids nearly coincide, or sit exactly on a diagonal, stand in no relation.
    """
    dx, dy = b.cx - a.cx, b.cy - a.cy  # image y points down
    widths = (a.bbox[2] - a.bbox[0]) + (b.bbox[2] - b.bbox[0])
    heights = (a.bbox[3] - a.bbox[1]) + (b.bbox[3] - b.bbox[1])
    if abs(dx) > abs(dy) and abs(dx) > _POSITION_MARGIN * widths:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx) and abs(dy) > _POSITION_MARGIN * heights:
        return "above" if dy > 0 else "below"
    return None


def score_detections(prompt: Prompt, detections: Sequence[Detection]) -> Verdict:
    """Judge already detected objects against ``prompt`` (the rules of :func:`score`)."""
    detections = list(detections)
    found = f"found {_describe(detections)}"

    def verdict(correct: bool, reason: str) -> Verdict:
        return Verdict(correct=correct, reason=reason, detections=detections)

    if prompt.kind == "single":
        color, shape = prompt.objects[0]
        hits = _count(detections, color, shape)
        if hits == 1 and len(detections) == 1:
            return verdict(True, f"found exactly one object, {_noun(color, shape)}")
        if hits == 0:
            return verdict(False, f"expected {_noun(color, shape)}, {found}")
        return verdict(
            False,
            f"expected only {_noun(color, shape)}, found {len(detections)} objects: {_describe(detections)}",
        )

    if prompt.kind in ("two", "color_attr"):
        missing = [f"{c} {s}" for c, s in prompt.objects if _count(detections, c, s) == 0]
        if not missing:
            return verdict(True, f"found both {' and '.join(f'{c} {s}' for c, s in prompt.objects)}")
        return verdict(False, f"missing {' and '.join(missing)}; {found}")

    if prompt.kind == "counting":
        color, shape = prompt.objects[0]
        expected = len(prompt.objects)
        hits = _count(detections, color, shape)
        others = _count(detections, None, shape) - hits
        reason = f"expected {expected} {color} {shape}(s), found {hits}"
        if others:
            reason += f" and {others} {shape}(s) of another colour"
        return verdict(hits == expected and others == 0, reason)

    if prompt.kind == "position":
        (color_a, shape_a), (color_b, shape_b) = prompt.objects
        a, b = _largest(detections, color_a, shape_a), _largest(detections, color_b, shape_b)
        missing = [f"{c} {s}" for (c, s), d in zip(prompt.objects, (a, b)) if d is None]
        if missing:
            return verdict(False, f"missing {' and '.join(missing)}; {found}")
        actual = relation_between(a, b)
        where = "in no clear relation to" if actual is None else actual
        reason = f"{a.name} is {where} {b.name}"
        if actual != prompt.relation:
            reason += f", expected {prompt.relation}"
        return verdict(actual == prompt.relation, reason)

    raise ValueError(f"unknown prompt kind {prompt.kind!r}; allowed kinds: {', '.join(ALL_KINDS)}")


def score(
    prompt: Prompt,
    image: np.ndarray,
    min_area_fraction: float = MIN_AREA_FRACTION,
    max_color_distance: float = MAX_COLOR_DISTANCE,
) -> Verdict:
    """Whether ``image`` (H, W, 3) ``uint8`` shows what ``prompt`` describes, following GenEval's rules.

    * ``single``: exactly one object, with the asked colour *and* shape. Stricter than GenEval (which only
      checks that the class is present): in the shapes world an extra object (any detected component, even
      one of unknown shape, or a second copy of the asked object) is an unambiguous mistake.
    * ``two`` / ``color_attr``: each asked (colour, shape) pair is present, so the colours must be bound to
      the right shapes. As in GenEval, extra objects are allowed.
    * ``counting``: exactly N objects of the asked colour and shape and no object of that shape in another
      colour (GenEval: the count of the class equals N). Objects of other shapes are ignored.
    * ``position``: both objects present and the relation holds between their centroids (see
      :func:`relation_between`); with several candidates the largest of each is used, as GenEval uses the
      most confident detection.
    """
    return score_detections(prompt, detect_objects(image, min_area_fraction, max_color_distance))


def evaluate(
    prompts: Sequence[Prompt],
    images: Sequence[np.ndarray],
    min_area_fraction: float = MIN_AREA_FRACTION,
    max_color_distance: float = MAX_COLOR_DISTANCE,
) -> dict:
    """Score one ``uint8`` (H, W, 3) image per prompt (``fusedit.imaging.to_uint8`` of generated images)
    and aggregate.

    Returns ``{"overall", "per_category", "counts", "num_images", "verdicts"}``: ``per_category`` maps each
    kind present to its accuracy, ``overall`` is the mean of those accuracies (GenEval's rule, so a
    category's weight does not depend on how many of its prompts were drawn), ``counts`` maps each kind to
    ``{"correct", "total"}``, and ``verdicts`` has one dict per image with the prompt ``text``, ``kind``,
    ``correct``, ``reason`` and the ``detected`` objects' names.
    """
    if len(prompts) != len(images):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(images)} images; expected one image per prompt"
        )
    if not prompts:
        raise ValueError("nothing to evaluate: no prompts given")
    counts: dict[str, dict[str, int]] = {}
    verdicts = []
    for prompt, image in zip(prompts, images):
        result = score(prompt, image, min_area_fraction, max_color_distance)
        tally = counts.setdefault(prompt.kind, {"correct": 0, "total": 0})
        tally["correct"] += int(result.correct)
        tally["total"] += 1
        verdicts.append(
            {
                "text": prompt.text,
                "kind": prompt.kind,
                "correct": result.correct,
                "reason": result.reason,
                "detected": [d.name for d in result.detections],
            }
        )
    # Categories in the canonical order of shapes.ALL_KINDS (score() rejects any other kind).
    kinds = [kind for kind in ALL_KINDS if kind in counts]
    per_category = {kind: counts[kind]["correct"] / counts[kind]["total"] for kind in kinds}
    return {
        "overall": float(np.mean(list(per_category.values()))),
        "per_category": per_category,
        "counts": {kind: counts[kind] for kind in kinds},
        "num_images": len(prompts),
        "verdicts": verdicts,
    }
