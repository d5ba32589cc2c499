"""A procedural "shapes world": tiny images of coloured geometric objects with compositional captions.

This is the built-in dataset of the text-to-image demo: it needs no download, trains on a couple of CPU
cores in minutes, and (because every image is generated *from* its caption) doubles as a benchmark whose
outputs can be checked programmatically. To keep that checking easy the renderer follows a few rules:

* Colours come from a small palette of saturated, well-separated colours on a near-white background, and
  shapes are drawn without anti-aliasing, so every pixel is exactly the background or a palette colour.
* Objects never overlap or touch (at least ``_GAP`` background pixels between their bounding boxes) and
  stay inside the image, so each object is one connected component of its colour.
* Object sizes are a fraction of the image side (22%-38%), large enough that a 32 px image still shows a
  recognisable circle vs square vs triangle.

Captions come in five kinds, mirroring the GenEval categories a later benchmark reports on:

=============  ==============================================  =======================================
kind           example                                          constraint
=============  ==============================================  =======================================
single         "a red circle"
two            "a red circle and a blue square"                 two different shapes
counting       "three green triangles"                           2-4 copies of one colour and shape
position       "a red circle to the left of a blue square"      relation holds by centroid
color_attr     "a purple square and a yellow triangle"          different shapes *and* colours
=============  ==============================================  =======================================

Held-out split
--------------
Every prompt belongs to exactly one of two splits, ``"train"`` or ``"heldout"``, decided by a stable hash
(SHA-256, so it does not change between processes or Python versions) of a canonical form of its text.
About ``HELDOUT_FRACTION`` of the distinct prompts are held out. Sampling for a split draws only from that
split's prompts, so a held-out prompt text never occurs in the training data. The canonical form makes
equivalent phrasings share a split: "a red circle and a blue square" and "a blue square and a red circle"
are both held out or both not, as are "A to the left of B" and "B to the right of A". A model evaluated on
held-out prompts therefore has to compose known words into a new scene rather than recall a paraphrase.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from fusedit.config import SHAPES_KINDS, SHAPES_MAX_OBJECTS, ConfigError
from fusedit.config import check_shapes_options as check_options

# Saturated colours chosen to be far apart in RGB (the closest pair, red/orange, is ~100 apart) and far
# from the background, so nearest-colour classification of a generated image is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (20, 60, 230),
    "yellow": (245, 225, 0),
    "purple": (140, 30, 190),
    "orange": (250, 120, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (235, 235, 235)

# The prompt kinds and the fewest objects each shows are config.SHAPES_KINDS (checked at config load).
ALL_KINDS: tuple[str, ...] = tuple(SHAPES_KINDS)

# The demo's prompt sheet (and a study's default): colours and shapes alone, two objects, relative positions.
DEMO_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a purple square",
    "an orange triangle",
    "a red square and a blue circle",
    "a yellow triangle and a green square",
    "a blue circle to the left of a red square",
    "a green square above an orange circle",
)

# The relation names stored in ``Prompt.relation``; the caption uses the phrase on the right.
_RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
RELATIONS: tuple[str, ...] = tuple(_RELATION_PHRASES)
_INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = SHAPES_MAX_OBJECTS  # the bound config checks data.max_objects against; NUMBER_WORDS names each
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_FRACTION = 0.1
# Part of the hashed key: changing it reshuffles which prompts are held out, so it is versioned.
_SPLIT_SALT = "fusedit-shapes-v1"

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 256
# Object size (side of its bounding square) as a fraction of the image side.
_SIZE_RANGE = (0.22, 0.38)
_MIN_OBJECT_PX = 4  # below this a triangle is no longer distinguishable from a square
_MARGIN = 1  # background pixels kept between objects and the image border
_GAP = 2  # background pixels kept between the bounding boxes of two objects
# For position prompts the offset along the other axis is at most this fraction of the offset along the
# relation's axis. The triangle's centroid sits size/6 below its box centre, and 0.25 leaves room for that
# so the relation also holds for the pixel centroids a benchmark measures.
_POSITION_SLACK = 0.25
_PLACEMENT_ROUNDS = 100  # attempts at a whole layout before falling back to a fixed grid layout
_TRIES_PER_OBJECT = 20  # positions tried for one object before the layout attempt is abandoned
_SHRINK_EVERY = 10  # failed layout attempts after which all objects shrink


@dataclass(frozen=True)
class ShapeObject:
    """One object; ``(cx, cy)`` is the centre of its bounding square and ``size`` its side, in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """The objects of one image of ``size`` x ``size`` pixels."""

    objects: tuple[ShapeObject, ...]
    size: int


@dataclass(frozen=True)
class Prompt:
    """A caption together with the structured content it describes.

    ``objects`` lists one ``(color, shape)`` pair per object, repeated for counting prompts. For position
    prompts ``relation`` is one of ``RELATIONS`` and reads ``objects[0] <relation> objects[1]``.
    """

    kind: str
    text: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------


def _noun_phrase(color: str, shape: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


def _make_prompt(kind: str, objects: Sequence[tuple[str, str]], relation: str | None = None) -> Prompt:
    if kind == "single":
        text = _noun_phrase(*objects[0])
    elif kind in ("two", "color_attr"):
        text = f"{_noun_phrase(*objects[0])} and {_noun_phrase(*objects[1])}"
    elif kind == "counting":
        color, shape = objects[0]
        text = f"{NUMBER_WORDS[len(objects)]} {color} {shape}s"
    else:  # position
        text = f"{_noun_phrase(*objects[0])} {_RELATION_PHRASES[relation]} {_noun_phrase(*objects[1])}"
    return Prompt(kind=kind, text=text, objects=tuple(objects), relation=relation)


def _enumerate_kind(kind: str, max_objects: int) -> Iterator[Prompt]:
    """Every distinct prompt of one kind, in a fixed order."""
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    if kind == "single":
        for pair in pairs:
            yield _make_prompt(kind, [pair])
    elif kind == "two":
        # Different shapes, like GenEval's "two different objects"; identical pairs would read as counting.
        for a, b in itertools.product(pairs, repeat=2):
            if a[1] != b[1]:
                yield _make_prompt(kind, [a, b])
    elif kind == "color_attr":
        for a, b in itertools.product(pairs, repeat=2):
            if a[0] != b[0] and a[1] != b[1]:
                yield _make_prompt(kind, [a, b])
    elif kind == "counting":
        for count in range(2, max_objects + 1):
            for pair in pairs:
                yield _make_prompt(kind, [pair] * count)
    elif kind == "position":
        # The two objects must differ, otherwise the relation could not be checked in the image.
        for a, b in itertools.permutations(pairs, 2):
            for relation in RELATIONS:
                yield _make_prompt(kind, [a, b], relation)


def _split_key(prompt: Prompt) -> str:
    """A canonical form of the prompt text shared by all phrasings of the same scene description."""
    if prompt.relation is not None:
        a, b = prompt.objects
        mirrored = _make_prompt("position", [b, a], _INVERSE_RELATION[prompt.relation]).text
        return min(prompt.text, mirrored)
    if prompt.kind in ("two", "color_attr"):
        return " and ".join(sorted(_noun_phrase(*pair) for pair in prompt.objects))
    return prompt.text


def is_heldout(prompt: Prompt) -> bool:
    """Whether ``prompt`` belongs to the held-out split (a pure function of its text)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{_split_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELDOUT_FRACTION * 2**64


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; allowed splits: {', '.join(SPLITS)}")


@functools.cache
def _pool(kind: str, max_objects: int, split: str) -> tuple[Prompt, ...]:
    # The prompt space is small (under 2,000 prompts), so enumerating it once and sampling uniformly from
    # the split's share is exact and avoids an open-ended rejection loop.
    heldout = split == "heldout"
    return tuple(p for p in _enumerate_kind(kind, max_objects) if is_heldout(p) == heldout)


def all_prompts(
    kinds: Iterable[str] | str = ALL_KINDS, max_objects: int = MAX_OBJECTS, split: str | None = None
) -> list[Prompt]:
    """Every distinct prompt of the given kinds, in a fixed order; ``split=None`` returns both splits.

    A text of kind ``color_attr`` is also a text of kind ``two``, so the texts of those kinds overlap.
    """
    kinds = check_options(kinds, max_objects)
    if split is None:
        return [p for kind in kinds for p in _enumerate_kind(kind, max_objects)]
    _check_split(split)
    return [p for kind in kinds for p in _pool(kind, max_objects, split)]


def sample_prompt(
    rng: np.random.Generator,
    kinds: Iterable[str] | str = ALL_KINDS,
    max_objects: int = MAX_OBJECTS,
    split: str = "train",
) -> Prompt:
    """Sample a prompt: a kind uniformly from ``kinds``, then a prompt uniformly from that kind's split.

    ``max_objects`` bounds the number of objects (counting prompts use 2..max_objects copies).
    """
    kinds = check_options(kinds, max_objects)
    _check_split(split)
    # A tiny kind (e.g. the 18 single-object prompts) may have no held-out prompt at all; skip such kinds
    # rather than loop forever looking for one.
    available = [kind for kind in kinds if _pool(kind, max_objects, split)]
    if not available:
        raise ConfigError(f"no {split!r} prompts exist for kinds {kinds} with max_objects={max_objects}")
    pool = _pool(available[rng.integers(len(available))], max_objects, split)
    return pool[rng.integers(len(pool))]


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted (for building a word-level tokenizer)."""
    return sorted({word for prompt in all_prompts() for word in prompt.text.split()})


def caption_corpus(
    n: int,
    seed: int,
    kinds: Iterable[str] | str = ALL_KINDS,
    max_objects: int = MAX_OBJECTS,
    split: str = "train",
) -> list[str]:
    """``n`` sampled captions, e.g. for pretraining a tiny language model.

    Defaults to the train split so that pretraining text never leaks held-out prompts.
    """
    rng = np.random.default_rng(seed)
    return [sample_prompt(rng, kinds, max_objects, split).text for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------

# During placement an object is an integer box: (left, top, side). Integer boxes make rendering exact and
# the no-touch guarantee easy to reason about.
_Box = tuple[int, int, int]


def _check_image_size(size: int) -> None:
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ConfigError(
            f"image size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels, got {size}"
        )


def _separated(a: _Box, b: _Box) -> bool:
    """Whether two boxes have at least ``_GAP`` background pixels between them along some axis."""
    (ax, ay, as_), (bx, by, bs) = a, b
    return ax + as_ + _GAP <= bx or bx + bs + _GAP <= ax or ay + as_ + _GAP <= by or by + bs + _GAP <= ay


def _relation_holds(a: _Box, b: _Box, relation: str) -> bool:
    """Whether box ``a`` is unambiguously ``relation`` box ``b``.

    The boxes must not overlap along the relation's axis (so every pixel of ``a`` is on the correct side of
    every pixel of ``b``) and their centres must be well aligned along the other axis.
    """
    (ax, ay, as_), (bx, by, bs) = a, b
    dx = (bx + bs / 2) - (ax + as_ / 2)
    dy = (by + bs / 2) - (ay + as_ / 2)
    if relation == "left of":
        return ax + as_ + _GAP <= bx and abs(dy) <= _POSITION_SLACK * abs(dx)
    if relation == "right of":
        return bx + bs + _GAP <= ax and abs(dy) <= _POSITION_SLACK * abs(dx)
    if relation == "above":
        return ay + as_ + _GAP <= by and abs(dx) <= _POSITION_SLACK * abs(dy)
    return by + bs + _GAP <= ay and abs(dx) <= _POSITION_SLACK * abs(dy)  # below


def _grid_layout(sides: list[int], image_size: int, relation: str | None) -> list[_Box]:
    """A layout that always fits: objects in the cells of a 2x2 grid, shrunk to the cell if needed.

    Only reached when rejection sampling keeps failing, which should not happen in the supported size range,
    but it guarantees that every prompt gets a valid scene.
    """
    cell = (image_size - 2 * _MARGIN - _GAP) // 2
    cells = [(0, 0), (1, 0), (0, 1), (1, 1)]
    if relation is not None:
        # Put the pair in one row (or column) with the first object on the side the relation names.
        cells = {"left of": [(0, 0), (1, 0)], "right of": [(1, 0), (0, 0)], "above": [(0, 0), (0, 1)]}.get(
            relation, [(0, 1), (0, 0)]
        )
    boxes = []
    for side, (col, row) in zip(sides, cells, strict=False):
        side = min(side, cell)
        offset = (cell - side) // 2
        boxes.append((_MARGIN + col * (cell + _GAP) + offset, _MARGIN + row * (cell + _GAP) + offset, side))
    return boxes


def _place(sides: list[int], rng: np.random.Generator, image_size: int, relation: str | None) -> list[_Box]:
    """Boxes of the given sides inside the image, pairwise separated, by rejection sampling.

    Objects are placed one at a time, each with a few tries; if one does not fit next to those already
    placed, the whole layout starts over, and every few failed layouts all objects shrink by ~10%.
    """
    sides = list(sides)
    for round_index in range(_PLACEMENT_ROUNDS):
        if round_index and round_index % _SHRINK_EVERY == 0:
            sides = [max(_MIN_OBJECT_PX, int(side * 0.9)) for side in sides]
        boxes: list[_Box] = []
        for side in sides:
            high = image_size - _MARGIN - side  # inclusive upper bound of the box's left/top edge
            for _ in range(_TRIES_PER_OBJECT):
                box = (int(rng.integers(_MARGIN, high + 1)), int(rng.integers(_MARGIN, high + 1)), side)
                fits = all(_separated(box, other) for other in boxes)
                # The second object of a position prompt must also stand in the right relation to the first.
                if fits and relation is not None and boxes:
                    fits = _relation_holds(boxes[0], box, relation)
                if fits:
                    boxes.append(box)
                    break
            else:
                break
        else:
            return boxes
    return _grid_layout(sides, image_size, relation)


def scene_for_prompt(prompt: Prompt, rng: np.random.Generator, size: int = 32) -> Scene:
    """A random scene of ``size`` x ``size`` pixels that ``prompt`` describes correctly."""
    _check_image_size(size)
    low = max(_MIN_OBJECT_PX, round(_SIZE_RANGE[0] * size))
    high = max(low, round(_SIZE_RANGE[1] * size))
    sides = [int(side) for side in rng.integers(low, high + 1, size=len(prompt.objects))]
    boxes = _place(sides, rng, size, prompt.relation)
    objects = tuple(
        ShapeObject(shape=shape, color=color, cx=x + side / 2, cy=y + side / 2, size=float(side))
        for (color, shape), (x, y, side) in zip(prompt.objects, boxes, strict=True)
    )
    return Scene(objects=objects, size=size)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene as a ``uint8`` array of shape (size, size, 3).

    Pillow's ImageDraw never anti-aliases, so every pixel is the background or a palette colour.
    """
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        # The object covers the pixels [left, right] x [top, bottom] (inclusive), ``size`` pixels per side.
        left, top = round(obj.cx - obj.size / 2), round(obj.cy - obj.size / 2)
        right, bottom = round(obj.cx + obj.size / 2) - 1, round(obj.cy + obj.size / 2) - 1
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        elif obj.shape == "triangle":
            # Apex up, base along the bottom edge of the box: it reads as a triangle even at 7 px.
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; allowed shapes: {', '.join(SHAPES)}")
    return np.asarray(image, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------------------
# Indexed examples and the torch dataset
# ----------------------------------------------------------------------------------------------------------


def make_scene(
    seed: int,
    index: int,
    size: int = 32,
    kinds: Iterable[str] | str = ALL_KINDS,
    max_objects: int = MAX_OBJECTS,
    split: str = "train",
) -> tuple[Prompt, Scene]:
    """The prompt and scene of example ``index``; a pure function of its arguments.

    Each example has its own generator seeded with ``[seed, index]``, so examples can be produced in any
    order, by any number of workers, with identical results.
    """
    rng = np.random.default_rng([seed, index])
    prompt = sample_prompt(rng, kinds, max_objects, split)
    return prompt, scene_for_prompt(prompt, rng, size)


def make_example(
    seed: int,
    index: int,
    size: int = 32,
    kinds: Iterable[str] | str = ALL_KINDS,
    max_objects: int = MAX_OBJECTS,
    split: str = "train",
) -> tuple[np.ndarray, str]:
    """The rendered image (``uint8``, (size, size, 3)) and caption of example ``index``."""
    prompt, scene = make_scene(seed, index, size, kinds, max_objects, split)
    return render(scene), prompt.text


class ShapesDataset(Dataset):
    """A deterministic, map-style dataset of ``length`` procedurally generated examples.

    Items are ``{"image": float32 tensor (3, size, size) in [-1, 1], "caption": str, "index": int}``.
    Nothing is cached: each item is regenerated from ``(seed, index)`` on access, which is cheap at these
    image sizes and keeps memory use constant.
    """

    def __init__(
        self,
        size: int = 32,
        length: int = 100_000,
        seed: int = 0,
        kinds: Iterable[str] | str = ALL_KINDS,
        max_objects: int = MAX_OBJECTS,
        split: str = "train",
    ) -> None:
        _check_image_size(size)
        if length < 1:
            raise ConfigError(f"length must be positive, got {length}")
        self.kinds = check_options(kinds, max_objects)
        _check_split(split)
        self.size = size
        self.length = length
        self.seed = seed
        self.max_objects = max_objects
        self.split = split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        index = int(index)
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        index %= self.length
        image, caption = make_example(self.seed, index, self.size, self.kinds, self.max_objects, self.split)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"image": tensor, "caption": caption, "index": index}
