"""Small image utilities for looking at samples and training curves, using only Pillow and numpy.

Everything here produces plain ``PIL.Image`` objects or PNG files, so inspecting a training run needs no
plotting library.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GRAY = (150, 150, 150)
_RAW_COLOR = (160, 190, 230)  # the raw curve is pale so that the smoothed overlay stands out
_SMOOTH_COLOR = (20, 60, 200)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert a batch (B, 3, H, W) with values in [-1, 1] to ``uint8`` images (B, H, W, 3).

    Values outside [-1, 1], which a sampler can produce, are clamped rather than wrapped around.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a tensor of shape (B, 3, H, W), got {tuple(images.shape)}")
    scaled = (images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels.

    Words wider than a whole line are split between characters, so no line ever spills into a neighbouring
    cell of a grid.
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    return lines


def image_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str] | None = None,
    ncols: int | None = None,
    scale: int = 1,
    margin: int = 2,
) -> Image.Image:
    """Arrange equally sized RGB images (H, W, 3) ``uint8`` in a grid on a white background.

    Args:
        images: a list of (H, W, 3) arrays or one (B, H, W, 3) array.
        labels: optional text drawn under each image, wrapped to the cell width.
        ncols: number of columns; defaults to a near-square grid and is capped at the number of images.
        scale: integer nearest-neighbour upscaling factor (32 px images are hard to see at 1).
        margin: pixels of white around and between cells.
    """
    images = [np.asarray(image) for image in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    height, width = images[0].shape[:2]
    for image in images:
        if image.shape != (height, width, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"all images must be uint8 of shape ({height}, {width}, 3), got {image.dtype} {image.shape}"
            )
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")

    ncols = min(ncols or math.ceil(math.sqrt(len(images))), len(images))
    nrows = math.ceil(len(images) / ncols)
    cell_w, cell_h = width * scale, height * scale

    font = ImageFont.load_default()
    wrapped = [_wrap(label, font, cell_w) for label in labels] if labels is not None else []
    line_h = font.getbbox("Ag")[3] + 1
    # Every row reserves room for the longest label so that the images of a row stay aligned.
    label_h = max((len(lines) for lines in wrapped), default=0) * line_h

    grid = Image.new(
        "RGB",
        (ncols * cell_w + (ncols + 1) * margin, nrows * (cell_h + label_h) + (nrows + 1) * margin),
        _WHITE,
    )
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        x = margin + col * (cell_w + margin)
        y = margin + row * (cell_h + label_h + margin)
        tile = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (x, y))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + cell_h + j * line_h), line, fill=_BLACK, font=font)
    return grid


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values; the first points average over what is available so far."""
    cumsum = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (cumsum[ends] - cumsum[starts]) / (ends - starts)


def plot_curve(
    values: Sequence[float],
    path: str | os.PathLike[str],
    title: str = "",
    ylabel: str = "loss",
    smooth: int = 0,
) -> None:
    """Write a line plot of ``values`` against their index as a PNG.

    Non-finite values (a diverging loss) are left out rather than breaking the scale. With ``smooth > 1`` a
    trailing moving average over that many points is drawn on top of the raw curve.
    """
    width, height = 640, 400
    left, right, top, bottom = 70, 20, 30, 40  # plot-area insets, leaving room for tick labels
    image = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    x0, y0, x1, y1 = left, top, width - right, height - bottom
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_BLACK)
    if title:
        draw.text(((width - font.getlength(title)) / 2, 8), title, fill=_BLACK, font=font)
    draw.text((8, 8), ylabel, fill=_BLACK, font=font)

    data = np.asarray(values, dtype=np.float64)
    steps = np.flatnonzero(np.isfinite(data))
    if steps.size == 0:
        draw.text((x0 + 10, y0 + 10), "no data", fill=_GRAY, font=font)
        save_png(image, path)
        return
    finite = data[steps]
    low, high = float(finite.min()), float(finite.max())
    if high == low:  # a flat curve still needs a non-zero range to map onto the axis
        low, high = low - 0.5, high + 0.5
    last_step = max(len(data) - 1, 1)

    def to_pixel(step: np.ndarray, value: np.ndarray) -> list[tuple[float, float]]:
        px = x0 + step / last_step * (x1 - x0)
        py = y1 - (value - low) / (high - low) * (y1 - y0)
        return list(zip(px.tolist(), py.tolist(), strict=True))

    for value, y in ((high, y0), (low, y1)):
        text = f"{value:.4g}"
        draw.line([(x0 - 4, y), (x0, y)], fill=_BLACK)
        draw.text((x0 - 6 - font.getlength(text), y - 5), text, fill=_BLACK, font=font)
    for step, x in ((0, x0), (len(data) - 1, x1)):
        text = str(step)
        draw.line([(x, y1), (x, y1 + 4)], fill=_BLACK)
        draw.text((x - font.getlength(text) / 2, y1 + 6), text, fill=_BLACK, font=font)

    if smooth > 1:
        curves = [(finite, _RAW_COLOR, 1), (_moving_average(finite, smooth), _SMOOTH_COLOR, 2)]
    else:
        curves = [(finite, _SMOOTH_COLOR, 1)]
    for curve, color, line_width in curves:
        points = to_pixel(steps, curve)
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        else:
            draw.line(points, fill=color, width=line_width)
    save_png(image, path)


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Save ``image`` as a PNG atomically: readers see either the old file or the complete new one.

    The image is written to a temporary file in the destination folder (``os.replace`` is only atomic
    within one file system) and then renamed over ``path``. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        # mkstemp creates the file readable by its owner only; an image should get ordinary permissions.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
