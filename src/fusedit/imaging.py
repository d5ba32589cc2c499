"""Small image utilities for looking at samples and training curves, using only Pillow and numpy.

Everything here produces plain ``PIL.Image`` objects or PNG files, so inspecting a training run needs no
plotting library.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from fusedit.config import ConfigError
from fusedit.data.transforms import SkipSample, open_image
from fusedit.files import write_atomic

log = logging.getLogger(__name__)

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_GRAY = (150, 150, 150)
_RAW_COLOR = (160, 190, 230)  # the raw curve is pale so that the smoothed overlay stands out
_SMOOTH_COLOR = (20, 60, 200)
# The labels are prompts, in any script, and Pillow's own font (a bitmap before Pillow 10.1, Aileron since)
# draws a box for every character outside ASCII ("café", "—"). DejaVu Sans covers accented Latin, Greek,
# Cyrillic, punctuation and many symbols (not CJK): found by name in the system's font folders (Debian's
# fonts-dejavu-core, on most desktops and many images), else matplotlib's bundled copy when matplotlib is
# installed. The size of Pillow's default font, so that every layout keeps its room.
_FONT_NAME = "DejaVuSans.ttf"
_FONT_SIZE = 10


@functools.cache
def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font every drawn label uses: DejaVu Sans where present, otherwise Pillow's default."""
    places = [_FONT_NAME]
    matplotlib = importlib.util.find_spec("matplotlib")  # found, not imported
    if matplotlib is not None:
        for folder in matplotlib.submodule_search_locations or ():
            places.append(os.path.join(folder, "mpl-data", "fonts", "ttf", _FONT_NAME))
    for place in places:
        try:
            return ImageFont.truetype(place, _FONT_SIZE)
        except (OSError, ImportError):  # not there, or Pillow built without FreeType
            continue
    return ImageFont.load_default()


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

    font = label_font()
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
    font = label_font()

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


# The PNG text chunk a benchmark image records its prompt in (save_png, kept_for_prompts).
PROMPT_CHUNK = "fusedit:prompt"


def save_png(image: Image.Image, path: str | os.PathLike[str], prompt: str | None = None) -> None:
    """Save ``image`` as a PNG atomically (``write_atomic``): readers see the old file or the whole new one.
    ``prompt``, the text the image was made for, goes into a text chunk before the pixels (``kept_for_prompts``
    reads it back without decoding them)."""
    info = None
    if prompt is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PROMPT_CHUNK, prompt)  # iTXt: UTF-8, where tEXt is Latin-1 only
    write_atomic(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))


def kept_for_prompts(images: Sequence[tuple[Path, str]]) -> list[bool]:
    """For each (benchmark image, its prompt), whether a resumed run may keep the image: it exists and was
    made for that prompt (its ``save_png`` record). Checked for all before any is made. An image made for
    another prompt is refused (ConfigError): a prompt file edited between two runs into one folder must not
    have its old image scored for the new text. One that cannot be read (damaged since it was written) or
    records no prompt (an older fusedit's) is made again, counted in one warning."""
    kept, remade = [], {"cannot be read": [], "record no prompt": []}
    for path, prompt in images:
        if not path.is_file():
            kept.append(False)
            continue
        try:
            with open_image(path) as image:  # the header only: the record comes before the pixels
                recorded = image.info.get(PROMPT_CHUNK)
        except SkipSample:
            remade["cannot be read"].append(path)
            kept.append(False)
            continue
        if recorded is None:
            remade["record no prompt"].append(path)
        elif recorded != prompt:
            raise ConfigError(
                f"{path} was made for the prompt {recorded!r}, not {prompt!r} (the prompt file changed); give "
                "a new --out, or delete the folder to regenerate"
            )
        kept.append(recorded == prompt)
    for why, paths in remade.items():
        if paths:
            log.warning("%d images %s (e.g. %s): they are made again", len(paths), why, paths[0])
    return kept


# --------------------------------------------------------------------------------------------------
# Comparison plots (several series on one figure), for design studies (fusedit.study.run)

# Ten well-separated colours (matplotlib's tab10), so that up to ten designs stay distinguishable.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_GRID_COLOR = (225, 225, 225)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (a step of 1, 2, 2.5 or 5 x 10^k) from at or below ``low`` to at or
    above ``high``: an axis then reads 0.6, 0.8, 1.0 rather than 0.6024, 0.8717, 1.141."""
    raw = (high - low) / (count - 1)
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 2.5, 5, 10) if m * unit >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9) * step
    n = math.ceil((high - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(n + 1)]


def _draw_legend(draw: ImageDraw.ImageDraw, font, labels: Sequence[str], right: float, top: float) -> None:
    """A boxed legend (colour swatch + label per line) whose top-right corner is at (right, top)."""
    line_h = font.getbbox("Ag")[3] + 4
    width = 22 + max(font.getlength(label) for label in labels) + 8
    left = right - width
    draw.rectangle((left, top, right, top + 6 + line_h * len(labels)), fill=_WHITE, outline=_GRAY)
    for i, label in enumerate(labels):
        y = top + 4 + i * line_h
        color = PALETTE[i % len(PALETTE)]
        draw.rectangle((left + 6, y + 2, left + 18, y + line_h - 4), fill=color)
        draw.text((left + 22, y), label, fill=_BLACK, font=font)


def plot_curves(
    series: dict[str, Sequence[float]],
    path: str | os.PathLike[str],
    title: str = "",
    ylabel: str = "loss",
    xlabel: str = "step",
    smooth: int = 0,
) -> None:
    """Write several curves (label -> values against their index + 1, i.e. training steps) on one PNG,
    with a legend, each in its own colour.

    With ``smooth > 1`` every curve is a trailing moving average over that many points: raw per-step losses
    of several runs overlap into noise, and a comparison only needs the trends. Non-finite values are left
    out. The y range covers the drawn (smoothed) curves.
    """
    width, height = 720, 440
    left, right, top, bottom = 70, 20, 30, 44
    image = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(image)
    font = label_font()
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    if title:
        draw.text(((width - font.getlength(title)) / 2, 8), title, fill=_BLACK, font=font)
    draw.text((8, 8), ylabel, fill=_BLACK, font=font)
    draw.text(((x0 + x1 - font.getlength(xlabel)) / 2, height - 16), xlabel, fill=_BLACK, font=font)

    curves: list[tuple[np.ndarray, np.ndarray]] = []
    for values in series.values():
        data = np.asarray(values, dtype=np.float64)
        steps = np.flatnonzero(np.isfinite(data))
        finite = data[steps]
        if smooth > 1 and finite.size:
            finite = _moving_average(finite, smooth)
        curves.append((steps + 1, finite))
    drawn = [c for c in curves if c[1].size]
    if not drawn:
        draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_BLACK)
        draw.text((x0 + 10, y0 + 10), "no data", fill=_GRAY, font=font)
        save_png(image, path)
        return
    low = min(float(v.min()) for _, v in drawn)
    high = max(float(v.max()) for _, v in drawn)
    if high == low:
        low, high = low - 0.5, high + 0.5
    levels = _ticks(low, high)
    low, high = levels[0], levels[-1]  # the axis spans its round ticks
    last = max(max(int(s[-1]) for s, _ in drawn), 2)

    def px(step: np.ndarray) -> np.ndarray:
        return x0 + (step - 1) / (last - 1) * (x1 - x0)

    def py(value: np.ndarray | float) -> np.ndarray | float:
        return y1 - (value - low) / (high - low) * (y1 - y0)

    for value in levels:
        y = py(value)
        draw.line([(x0, y), (x1, y)], fill=_GRID_COLOR)
        text = f"{value:.4g}"
        draw.text((x0 - 6 - font.getlength(text), y - 5), text, fill=_BLACK, font=font)
    for step in sorted({1, *(round(v) for v in _ticks(0, last, count=7) if 1 <= v <= last)}):
        x = float(px(np.asarray(step)))
        draw.line([(x, y1), (x, y1 + 4)], fill=_BLACK)
        draw.text((x - font.getlength(str(step)) / 2, y1 + 6), str(step), fill=_BLACK, font=font)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_BLACK)
    for i, (steps, values) in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        points = list(zip(px(steps).tolist(), py(values).tolist()))
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        elif points:
            draw.line(points, fill=color, width=2)
    _draw_legend(draw, font, list(series), x1 - 4, y0 + 4)
    save_png(image, path)


def plot_grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    path: str | os.PathLike[str],
    title: str = "",
    ylabel: str = "",
    ymax: float | None = None,
) -> None:
    """Write a grouped bar chart: one group per entry of ``groups`` (e.g. benchmark categories), one bar per
    series (e.g. designs; label -> one value per group) in the series' colour, with a legend.

    ``ymax`` fixes the top of the axis (1.0 for accuracies, so that two charts compare by eye); by default
    it is the largest value. Values are printed above their bars where the bar is wide enough.
    """
    labels = list(series)
    for label in labels:
        if len(series[label]) != len(groups):
            raise ValueError(f"series {label!r} has {len(series[label])} values for {len(groups)} groups")
    font = label_font()
    legend_w = 40 + max((font.getlength(label) for label in labels), default=0)
    bar_w = 16 if len(labels) > 4 else 22
    group_w = max(len(labels), 1) * bar_w + 24
    left, right, top, bottom = 56, 20 + legend_w, 30, 40
    width = max(560, int(left + right + group_w * len(groups)))
    height = 400
    image = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    if title:
        draw.text(((width - font.getlength(title)) / 2, 8), title, fill=_BLACK, font=font)
    if ylabel:
        draw.text((8, 8), ylabel, fill=_BLACK, font=font)

    values = [float(v) for label in labels for v in series[label] if math.isfinite(float(v))]
    top_value = ymax if ymax is not None else max(values, default=1.0)
    top_value = top_value if top_value > 0 else 1.0
    levels = _ticks(0.0, top_value)
    if ymax is None:  # the axis ends at a round tick
        top_value = levels[-1]
    for value in levels:
        y = y1 - value / top_value * (y1 - y0)
        draw.line([(x0, y), (x1, y)], fill=_GRID_COLOR)
        text = f"{value:.3g}"
        draw.text((x0 - 6 - font.getlength(text), y - 5), text, fill=_BLACK, font=font)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_BLACK)

    slot = (x1 - x0) / max(len(groups), 1)
    for g, group in enumerate(groups):
        center = x0 + (g + 0.5) * slot
        draw.text((center - font.getlength(group) / 2, y1 + 6), group, fill=_BLACK, font=font)
        start = center - len(labels) * bar_w / 2
        for i, label in enumerate(labels):
            value = float(series[label][g])
            if not math.isfinite(value):
                continue
            bx = start + i * bar_w
            by = y1 - min(max(value, 0.0), top_value) / top_value * (y1 - y0)
            draw.rectangle((bx + 1, by, bx + bar_w - 2, y1), fill=PALETTE[i % len(PALETTE)])
            text = f"{value:.2f}".lstrip("0") if 0 <= value < 1 else f"{value:.3g}"
            if font.getlength(text) <= bar_w + 2:
                draw.text((bx + bar_w / 2 - font.getlength(text) / 2, by - 12), text, fill=_BLACK, font=font)
    if labels:
        _draw_legend(draw, font, labels, width - 6, y0)
    save_png(image, path)


def stack_images(images: Sequence[Image.Image], titles: Sequence[str], margin: int = 4) -> Image.Image:
    """Stack images vertically on white, each under its own title line (left-aligned), e.g. one sample
    grid per design into a single side-by-side comparison."""
    if len(images) != len(titles):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images")
    if not images:
        raise ValueError("stack_images needs at least one image")
    font = label_font()
    title_h = font.getbbox("Ag")[3] + 6
    width = max(max(im.width for im in images), *(int(font.getlength(t)) + 8 for t in titles)) + 2 * margin
    height = sum(im.height + title_h + margin for im in images) + margin
    out = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(out)
    y = margin
    for im, title in zip(images, titles):
        draw.text((margin + 2, y + 2), title, fill=_BLACK, font=font)
        y += title_h
        out.paste(im.convert("RGB"), (margin, y))
        y += im.height + margin
    return out


def generated_image(sample) -> Image.Image:
    """What a benchmark's ``generate`` returned (a PIL image or a uint8 (H, W, 3) array) as a PIL image."""
    if isinstance(sample, Image.Image):
        return sample
    array = np.asarray(sample)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"generate returned an array of shape {array.shape} and dtype {array.dtype}; expected PIL "
            f"images or uint8 (H, W, 3) arrays"
        )
    return Image.fromarray(array)
