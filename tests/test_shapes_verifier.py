"""Tests for the weight-free shapes-world verifier (fusedit.eval.shapes_verifier)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fusedit.data import shapes
from fusedit.data.shapes import ALL_KINDS, BACKGROUND, COLORS, Prompt, Scene, ShapeObject
from fusedit.eval import shapes_verifier as sv
from fusedit.eval.shapes_verifier import Detection, detect_objects, evaluate, score_detections

SIZES = (32, 64)
PER_SIZE = 150  # ~300 ground-truth scenes in all, ~60 per kind


@functools.cache
def ground_truth() -> tuple[tuple[Prompt, Scene], ...]:
    """~300 (prompt, scene) pairs of every kind, from both splits, at 32 and 64 px."""
    pairs = []
    for size in SIZES:
        for index in range(PER_SIZE):
            split = "heldout" if index % 5 == 0 else "train"
            pairs.append(shapes.make_scene(seed=123, index=index, size=size, split=split))
    return tuple(pairs)


def accuracy(pairs, transform=lambda image: image) -> dict:
    prompts = [prompt for prompt, _ in pairs]
    return evaluate(prompts, [transform(shapes.render(scene)) for _, scene in pairs])


def assert_all_kinds_present(result: dict) -> None:
    assert set(result["per_category"]) == set(ALL_KINDS)


# ----------------------------------------------------------------------------------------------------------
# Corruptions: each turns a correct scene into one its prompt does not describe
# ----------------------------------------------------------------------------------------------------------


def _box(obj: ShapeObject) -> tuple[int, int, int, int]:
    """The pixels render() covers: (left, top, right, bottom), right/bottom exclusive."""
    left, top = round(obj.cx - obj.size / 2), round(obj.cy - obj.size / 2)
    return left, top, round(obj.cx + obj.size / 2), round(obj.cy + obj.size / 2)


def _add_copy(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene plus a copy of its first object somewhere free (>= 2 px from every object), or None."""
    template = scene.objects[0]
    side = int(template.size)
    boxes = [_box(obj) for obj in scene.objects]
    candidates = [(x, y) for x in range(1, scene.size - side) for y in range(1, scene.size - side)]
    for i in rng.permutation(len(candidates)):
        x, y = candidates[i]
        if all(
            x + side + 2 <= x0 or x1 + 2 <= x or y + side + 2 <= y0 or y1 + 2 <= y for x0, y0, x1, y1 in boxes
        ):
            extra = dataclasses.replace(template, cx=x + side / 2, cy=y + side / 2)
            return dataclasses.replace(scene, objects=(*scene.objects, extra))
    return None


def recolor(prompt: Prompt, scene: Scene, rng: np.random.Generator) -> Scene:
    """(a) Give the first object another palette colour."""
    first = scene.objects[0]
    color = str(rng.choice([c for c in COLORS if c != first.color]))
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, color=color), *scene.objects[1:]))


def miscount(prompt: Prompt, scene: Scene, rng: np.random.Generator) -> Scene:
    """(b) Drop an object, or (single, and every other counting prompt) add an extra copy of one."""
    if prompt.kind == "single" or (prompt.kind == "counting" and rng.random() < 0.5):
        added = _add_copy(scene, rng)
        if added is not None:
            return added
    return dataclasses.replace(scene, objects=scene.objects[1:])


def swap_positions(prompt: Prompt, scene: Scene, rng: np.random.Generator) -> Scene:
    """(c) Exchange the two objects of a position prompt, which mirrors the relation."""
    a, b = scene.objects
    a2 = dataclasses.replace(a, shape=b.shape, color=b.color)
    b2 = dataclasses.replace(b, shape=a.shape, color=a.color)
    return dataclasses.replace(scene, objects=(a2, b2))


def reshape(prompt: Prompt, scene: Scene, rng: np.random.Generator) -> Scene:
    """(d) Change the first object's shape (square -> circle, circle -> square, triangle -> circle)."""
    first = scene.objects[0]
    shape = {"square": "circle", "circle": "square", "triangle": "circle"}[first.shape]
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, shape=shape), *scene.objects[1:]))


def mild_blur_and_noise(image: np.ndarray, rng: np.random.Generator, std: float = 12.0) -> np.ndarray:
    """A slight blur (half the pixel, an eighth of each 4-neighbour) plus Gaussian pixel noise."""
    pixels = image.astype(np.float64)
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    blurred = 0.5 * pixels + 0.125 * neighbours
    return np.clip(blurred + rng.normal(0.0, std, image.shape), 0, 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Benchmark-level behaviour
# ----------------------------------------------------------------------------------------------------------


def test_ground_truth_renders_score_perfectly():
    result = accuracy(ground_truth())
    assert_all_kinds_present(result)
    failures = [v for v in result["verdicts"] if not v["correct"]]
    assert result["overall"] >= 0.98, failures[:5]
    for kind, value in result["per_category"].items():
        assert value >= 0.98, (kind, failures[:5])
    assert result["num_images"] == len(ground_truth())
    assert sum(c["total"] for c in result["counts"].values()) == len(ground_truth())


@pytest.mark.parametrize(
    ("corrupt", "kinds"),
    [
        (recolor, ALL_KINDS),
        (miscount, ALL_KINDS),
        (swap_positions, ("position",)),
        (reshape, ALL_KINDS),
    ],
    ids=["recolor", "miscount", "swap_positions", "reshape"],
)
def test_corrupted_renders_score_near_zero(corrupt, kinds):
    rng = np.random.default_rng(0)
    pairs = [
        (prompt, corrupt(prompt, scene, rng)) for prompt, scene in ground_truth() if prompt.kind in kinds
    ]
    assert len(pairs) >= 40
    result = accuracy(pairs)
    passed = [v for v in result["verdicts"] if v["correct"]]
    assert result["overall"] <= 0.05, passed[:5]
    for verdict in result["verdicts"]:
        assert verdict["reason"]


def test_blurred_noisy_renders_still_score_well():
    rng = np.random.default_rng(1)
    result = accuracy(ground_truth(), lambda image: mild_blur_and_noise(image, rng))
    assert_all_kinds_present(result)
    failures = [v for v in result["verdicts"] if not v["correct"]]
    assert result["overall"] >= 0.9, failures[:5]
    for kind, value in result["per_category"].items():
        assert value >= 0.9, (kind, failures[:5])


# ----------------------------------------------------------------------------------------------------------
# Detection on hand-made images
# ----------------------------------------------------------------------------------------------------------


def hand_made_image() -> np.ndarray:
    image = Image.new("RGB", (64, 64), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 6, 19, 21), fill=COLORS["red"])  # 16 x 16 square, centre (11.5, 13.5)
    draw.ellipse((36, 4, 55, 23), fill=COLORS["blue"])  # 20 px circle, centre (45.5, 13.5)
    draw.polygon([(20, 36), (8, 58), (32, 58)], fill=COLORS["green"])  # apex-up triangle
    draw.rectangle((44, 44, 45, 45), fill=COLORS["orange"])  # 4 px speck: noise, below the minimum area
    draw.ellipse((44, 50, 56, 62), fill=(0, 0, 0))  # black: not a palette colour, ignored
    return np.asarray(image).copy()


def test_detect_objects_on_hand_made_image():
    found = {d.color: d for d in detect_objects(hand_made_image())}
    assert set(found) == {"red", "blue", "green"}
    square, circle, triangle = found["red"], found["blue"], found["green"]
    assert (square.shape, circle.shape, triangle.shape) == ("square", "circle", "triangle")

    assert square.area == 16 * 16
    assert square.bbox == (4, 6, 20, 22)
    assert (square.cx, square.cy) == pytest.approx((11.5, 13.5))
    assert circle.bbox == (36, 4, 56, 24)
    assert (circle.cx, circle.cy) == pytest.approx((45.5, 13.5), abs=0.3)
    assert 0.7 < circle.area / 20**2 < 0.85
    # The triangle's centroid sits about a third of the way up from its base, below its box centre.
    left, top, right, bottom = triangle.bbox
    assert triangle.cx == pytest.approx((left + right - 1) / 2, abs=0.3)
    assert triangle.cy > (top + bottom - 1) / 2 + 0.1 * (bottom - top)


def test_detect_objects_merges_nothing_across_colours_and_counts_diagonal_neighbours():
    image = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    image[4:12, 4:12] = COLORS["red"]
    image[12:20, 12:20] = COLORS["red"]  # touches the first square only at a corner: one 8-component
    image[4:12, 12:20] = COLORS["yellow"]  # touches the red squares along edges, but is another colour
    found = detect_objects(image)
    assert sorted((d.color, d.area) for d in found) == [("red", 128), ("yellow", 64)]
    labels = sv.label_components(sv.classify_pixels(image))
    assert len(np.unique(labels[labels >= 0])) == 2


def test_soft_edges_keep_their_colour():
    """A red/background mixture is closer to orange than to red in RGB, but must still count as red."""
    red, background = np.array(COLORS["red"], float), np.array(BACKGROUND, float)
    mixes = [background + t * (red - background) for t in (0.55, 0.67, 0.8, 1.0)]
    pixels = np.array([mixes + [background, background + 0.3 * (red - background), (0, 0, 0)]], np.uint8)
    labels = sv.classify_pixels(pixels)[0]
    red_label = sv.COLOR_NAMES.index("red")
    assert labels.tolist() == [red_label] * 4 + [sv.BACKGROUND_LABEL] * 2 + [sv.UNKNOWN_LABEL]


def test_classify_shape_rejects_lines_and_rings():
    line = np.zeros((3, 20), dtype=bool)
    line[1] = True
    ring = np.zeros((20, 20), dtype=bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    assert sv.classify_shape(line) == sv.UNKNOWN_SHAPE
    assert sv.classify_shape(ring) == sv.UNKNOWN_SHAPE
    assert sv.classify_shape(np.ones((9, 9), dtype=bool)) == "square"


def test_detect_objects_validates_and_handles_empty_images():
    assert detect_objects(np.full((16, 16, 3), BACKGROUND, dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="RGB"):
        detect_objects(np.zeros((16, 16), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------
# Scoring rules
# ----------------------------------------------------------------------------------------------------------


def det(color: str, shape: str, cx: float = 10.0, cy: float = 10.0, side: int = 8) -> Detection:
    left, top = round(cx - side / 2), round(cy - side / 2)
    return Detection(color, shape, cx, cy, side * side, (left, top, left + side, top + side))


def prompt(kind: str, objects, relation: str | None = None, text: str = "") -> Prompt:
    return Prompt(kind=kind, text=text or kind, objects=tuple(objects), relation=relation)


def test_single_needs_the_object_alone():
    p = prompt("single", [("red", "circle")])
    assert score_detections(p, [det("red", "circle")]).correct
    assert not score_detections(p, [det("red", "square")]).correct
    assert not score_detections(p, [det("blue", "circle")]).correct
    extra = score_detections(p, [det("red", "circle"), det("blue", "square", cx=30)])
    assert not extra.correct and "2 objects" in extra.reason
    assert not score_detections(p, []).correct


def test_two_and_color_attr_bind_colours_to_shapes():
    for kind in ("two", "color_attr"):
        p = prompt(kind, [("purple", "square"), ("yellow", "triangle")])
        assert score_detections(p, [det("yellow", "triangle"), det("purple", "square", cx=30)]).correct
        swapped = score_detections(p, [det("yellow", "square"), det("purple", "triangle", cx=30)])
        assert not swapped.correct and "missing purple square and yellow triangle" in swapped.reason
        # As in GenEval, an extra object does not make a two-object prompt wrong.
        assert score_detections(
            p, [det("purple", "square"), det("yellow", "triangle"), det("red", "circle")]
        ).correct


def test_counting_counts_the_class_exactly():
    p = prompt("counting", [("green", "triangle")] * 3)
    three = [det("green", "triangle", cx=10 * i) for i in range(1, 4)]
    assert score_detections(p, three).correct
    assert score_detections(p, [*three, det("red", "circle")]).correct  # other shapes are ignored
    two = score_detections(p, three[:2])
    assert not two.correct and two.reason == "expected 3 green triangle(s), found 2"
    assert not score_detections(p, [*three, det("green", "triangle", cx=50)]).correct
    other_colour = score_detections(p, [*three, det("red", "triangle", cx=50)])
    assert not other_colour.correct and "1 triangle(s) of another colour" in other_colour.reason


def test_position_follows_the_centroids():
    a, b = ("red", "circle"), ("blue", "square")
    left, right = det(*a, cx=8, cy=16), det(*b, cx=24, cy=18)
    assert score_detections(prompt("position", [a, b], "left of"), [left, right]).correct
    assert score_detections(prompt("position", [b, a], "right of"), [left, right]).correct
    wrong = score_detections(prompt("position", [a, b], "right of"), [left, right])
    assert not wrong.correct and wrong.reason == "red circle is left of blue square, expected right of"
    top, bottom = det(*a, cx=16, cy=6), det(*b, cx=14, cy=26)
    assert score_detections(prompt("position", [a, b], "above"), [top, bottom]).correct
    assert score_detections(prompt("position", [b, a], "below"), [top, bottom]).correct
    # On a diagonal the larger offset wins; nearly on top of each other there is no relation.
    assert sv.relation_between(det(*a, cx=0, cy=0), det(*b, cx=20, cy=15)) == "left of"
    assert sv.relation_between(det(*a, cx=10, cy=10), det(*b, cx=11, cy=10)) is None
    missing = score_detections(prompt("position", [a, b], "left of"), [left])
    assert not missing.correct and "missing blue square" in missing.reason


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown prompt kind"):
        score_detections(Prompt(kind="bogus", text="x", objects=(("red", "circle"),)), [])


# ----------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------


def test_evaluate_averages_over_categories_not_images():
    size = 32
    circle = ShapeObject(shape="circle", color="red", cx=16, cy=16, size=10)
    single = prompt("single", [("red", "circle")])
    counting = prompt("counting", [("red", "circle")] * 2, text="two red circles")
    one_circle = shapes.render(Scene(objects=(circle,), size=size))
    # Three correct single-object images and one wrong counting image (one circle instead of two).
    result = evaluate([single, single, single, counting], [one_circle] * 4)
    assert result["per_category"] == {"single": 1.0, "counting": 0.0}
    assert result["overall"] == pytest.approx(0.5)  # the per-image mean would be 0.75
    assert result["counts"] == {"single": {"correct": 3, "total": 3}, "counting": {"correct": 0, "total": 1}}
    assert result["num_images"] == 4
    last = result["verdicts"][-1]
    assert last == {
        "text": "two red circles",
        "kind": "counting",
        "correct": False,
        "reason": "expected 2 red circle(s), found 1",
        "detected": ["red circle"],
    }


def test_evaluate_validates_its_inputs():
    image = np.full((16, 16, 3), BACKGROUND, dtype=np.uint8)
    with pytest.raises(ValueError, match="prompts but"):
        evaluate([prompt("single", [("red", "circle")])], [image, image])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate([], [])
