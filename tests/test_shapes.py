"""Tests for the procedural shapes world (fusedit.data.shapes) and the image utilities (fusedit.imaging)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.data import shapes
from fusedit.imaging import image_grid, plot_curve, save_png, to_uint8

PALETTE = {shapes.BACKGROUND, *shapes.COLORS.values()}


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a boolean mask, each as an (N, 2) array of (row, col) pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    nr, nc = r + dr, c + dc
                    if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        queue.append((nr, nc))
        found.append(np.array(pixels))
    return found


def classify(pixels: np.ndarray) -> str:
    """Shape of a component from how much of its bounding box it fills (square 1, circle ~0.78, triangle ~0.5)."""
    extent = pixels.max(axis=0) - pixels.min(axis=0) + 1
    fill = len(pixels) / (extent[0] * extent[1])
    return "square" if fill > 0.95 else "circle" if fill > 0.645 else "triangle"


def detect(image: np.ndarray) -> list[tuple[str, str, float, float]]:
    """(colour, shape, centroid x, centroid y) of every object in a rendered image."""
    found = []
    for name, rgb in shapes.COLORS.items():
        for pixels in components((image == rgb).all(axis=-1)):
            cy, cx = pixels.mean(axis=0)
            found.append((name, classify(pixels), float(cx), float(cy)))
    return found


def test_make_example_is_deterministic_and_indices_differ():
    image, caption = shapes.make_example(seed=3, index=7)
    again, caption_again = shapes.make_example(seed=3, index=7)
    assert caption == caption_again
    np.testing.assert_array_equal(image, again)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)

    others = [shapes.make_example(seed=3, index=i)[0].tobytes() for i in range(20)]
    assert len(set(others)) == 20
    assert shapes.make_example(seed=4, index=7)[0].tobytes() != image.tobytes()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_images_contain_only_palette_colours_and_match_their_prompt(size):
    for index in range(100):
        prompt, scene = shapes.make_scene(seed=1, index=index, size=size)
        image = shapes.render(scene)
        assert image.shape == (size, size, 3)
        assert {tuple(pixel) for pixel in image.reshape(-1, 3).tolist()} <= PALETTE
        # Objects never touch, so each one is a single connected component of its colour with its shape.
        detected = sorted((color, shape) for color, shape, _, _ in detect(image))
        assert detected == sorted(prompt.objects), prompt.text


@pytest.mark.parametrize("size", [16, 32, 64])
def test_position_prompts_hold_by_pixel_centroid(size):
    for index in range(60):
        prompt, scene = shapes.make_scene(seed=2, index=index, size=size, kinds="position")
        assert prompt.kind == "position" and prompt.relation in shapes.RELATIONS
        found = {(color, shape): (cx, cy) for color, shape, cx, cy in detect(shapes.render(scene))}
        (ax, ay), (bx, by) = found[prompt.objects[0]], found[prompt.objects[1]]
        dx, dy = bx - ax, by - ay  # image y grows downwards
        main, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
            prompt.relation
        ]
        assert main > abs(other), prompt.text


def test_caption_forms():
    rng = np.random.default_rng(0)
    for _ in range(300):
        prompt = shapes.sample_prompt(rng)
        text = prompt.text
        assert text == text.lower() and not text.endswith(".")
        colors = [color for color, _ in prompt.objects]
        kinds_shapes = [shape for _, shape in prompt.objects]
        if prompt.kind == "single":
            assert len(prompt.objects) == 1
        elif prompt.kind == "counting":
            assert 2 <= len(prompt.objects) <= 4 and len(set(prompt.objects)) == 1
            assert text.split()[0] in ("two", "three", "four") and text.endswith("s")
        elif prompt.kind == "two":
            assert len(set(kinds_shapes)) == 2 and " and " in text
        elif prompt.kind == "color_attr":
            assert len(set(kinds_shapes)) == 2 and len(set(colors)) == 2
        else:
            assert prompt.objects[0] != prompt.objects[1]
        assert prompt.relation is None or prompt.kind == "position"
    assert shapes.all_prompts("single")[0].text == "a red circle"
    assert "an orange square" in {p.text for p in shapes.all_prompts("single")}


def test_counting_respects_max_objects():
    rng = np.random.default_rng(0)
    counts = {len(shapes.sample_prompt(rng, ["counting"], max_objects=3).objects) for _ in range(200)}
    assert counts == {2, 3}


def test_heldout_split_never_shares_prompts_with_train():
    rng = np.random.default_rng(0)
    train = {shapes.sample_prompt(rng, split="train").text for _ in range(3000)}
    heldout = {shapes.sample_prompt(rng, split="heldout").text for _ in range(3000)}
    assert train and heldout and not train & heldout
    # Every kind has held-out prompts, and they are about a tenth of all prompts.
    for kind in shapes.ALL_KINDS:
        assert shapes.all_prompts(kind, split="heldout")
    fraction = len(shapes.all_prompts(split="heldout")) / len(shapes.all_prompts())
    assert 0.05 < fraction < 0.2
    # Equivalent phrasings of one description always share a split.
    phrase = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    split_of = {p.text: shapes.is_heldout(p) for p in shapes.all_prompts(["position", "two"])}
    for prompt in shapes.all_prompts("position"):
        first, second = prompt.text.split(f" {phrase[prompt.relation]} ")
        assert split_of[f"{second} {phrase[inverse[prompt.relation]]} {first}"] == split_of[prompt.text]
    for prompt in shapes.all_prompts("two"):
        first, second = prompt.text.split(" and ")
        assert split_of[f"{second} and {first}"] == split_of[prompt.text]
    dataset_captions = {shapes.ShapesDataset(split="heldout")[i]["caption"] for i in range(50)}
    assert dataset_captions <= {p.text for p in shapes.all_prompts(split="heldout")}


def test_vocabulary_and_caption_corpus():
    vocab = shapes.vocabulary()
    assert vocab == sorted(set(vocab)) == shapes.vocabulary()
    assert {"red", "triangles", "four", "left", "above", "an"} <= set(vocab)
    corpus = shapes.caption_corpus(500, seed=5)
    assert corpus == shapes.caption_corpus(500, seed=5) and len(corpus) == 500
    assert {word for caption in corpus for word in caption.split()} <= set(vocab)
    assert not set(corpus) & {p.text for p in shapes.all_prompts(split="heldout")}


def test_dataset_items():
    dataset = shapes.ShapesDataset(size=24, length=10, seed=0)
    assert len(dataset) == 10
    item = dataset[3]
    image = item["image"]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert item["index"] == 3 and isinstance(item["caption"], str)
    expected_image, expected_caption = shapes.make_example(0, 3, 24)
    assert item["caption"] == expected_caption
    np.testing.assert_array_equal(to_uint8(image[None])[0], expected_image)
    with pytest.raises(IndexError, match="10"):
        dataset[10]


def test_bad_arguments_are_named_in_errors():
    with pytest.raises(ValueError, match="hexagon.*single"):
        shapes.ShapesDataset(kinds=["single", "hexagon"])
    with pytest.raises(ValueError, match="8"):
        shapes.ShapesDataset(size=8)
    with pytest.raises(ValueError, match="300"):
        shapes.ShapesDataset(size=300)
    with pytest.raises(ValueError, match="'test'"):
        shapes.ShapesDataset(split="test")
    with pytest.raises(ValueError, match="max_objects"):
        shapes.sample_prompt(np.random.default_rng(0), max_objects=5)
    with pytest.raises(ValueError, match="counting"):
        shapes.sample_prompt(np.random.default_rng(0), kinds=["counting"], max_objects=1)


def test_render_draws_exact_palette_shapes():
    scene = shapes.Scene(
        objects=(
            shapes.ShapeObject("square", "blue", cx=8.0, cy=8.0, size=10.0),
            shapes.ShapeObject("circle", "orange", cx=24.0, cy=24.0, size=12.0),
        ),
        size=32,
    )
    image = shapes.render(scene)
    blue = (image == shapes.COLORS["blue"]).all(axis=-1)
    assert blue.sum() == 100 and blue[3:13, 3:13].all()
    assert sorted((c, s) for c, s, _, _ in detect(image)) == [("blue", "square"), ("orange", "circle")]


def test_to_uint8_maps_and_clamps():
    images = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    out = to_uint8(images)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize(
    ("n", "ncols", "scale", "cols", "rows"), [(5, 3, 2, 3, 2), (4, None, 1, 2, 2), (2, 8, 3, 2, 1)]
)
def test_image_grid_size(n, ncols, scale, cols, rows):
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    grid = image_grid(images, ncols=ncols, scale=scale, margin=2)
    assert grid.size == (cols * 32 * scale + (cols + 1) * 2, rows * 32 * scale + (rows + 1) * 2)

    labelled = image_grid(
        list(images), labels=["a purple triangle to the left of a red square"] * n, ncols=ncols
    )
    assert labelled.width == cols * 32 + (cols + 1) * 2
    assert labelled.height > rows * 32 + (rows + 1) * 2


def test_image_grid_upscales_with_nearest_neighbour():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 0] = (255, 0, 0)
    grid = np.asarray(image_grid([image], scale=4, margin=0))
    assert grid.shape == (8, 8, 3)
    assert (grid[:4, :4] == (255, 0, 0)).all() and (grid[4:, 4:] == 0).all()


@pytest.mark.parametrize("values", [[1.0, 0.8, 0.5, float("nan"), 0.3, 0.31, 0.2], [2.0, 2.0], [0.5], []])
def test_plot_curve_writes_png(tmp_path, values):
    path = tmp_path / "plots" / "loss.png"
    plot_curve(values, path, title="loss", smooth=3)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss.png"]


def test_save_png_replaces_existing_file(tmp_path):
    path = tmp_path / "image.png"
    save_png(Image.new("RGB", (4, 4), (255, 0, 0)), path)
    save_png(Image.new("RGB", (6, 6), (0, 255, 0)), path)
    with Image.open(path) as image:
        assert image.size == (6, 6)
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]
