"""Labels drawn on grids, plots and comparison sheets: text beyond ASCII renders as letters, not boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

import fusedit.imaging as imaging

# A private-use character no font draws: what any character the font lacks renders as (its .notdef box).
_NO_GLYPH = "\ue000"


def _grid(text, tmp_path):
    return np.asarray(imaging.image_grid([np.zeros((16, 64, 3), np.uint8)], [text]))


def _stack(text, tmp_path):
    return np.asarray(imaging.stack_images([Image.new("RGB", (64, 16))], [text]))


def _png(draw):
    def drawn(text, tmp_path):
        path = tmp_path / "plot.png"
        draw(text, path)
        return np.asarray(Image.open(path))

    return drawn


@pytest.fixture
def dejavu():
    """Skips unless labels are drawn in DejaVu Sans: where neither the system's fonts nor matplotlib's copy
    hold it (matplotlib installed without its fonts too), labels fall back to Pillow's font, as the test
    below checks, and its boxes would fail the test for a reason that is not the code's."""
    font = imaging.label_font()
    if not (isinstance(font, ImageFont.FreeTypeFont) and font.getname()[0] == "DejaVu Sans"):
        pytest.skip("labels are not drawn in DejaVu Sans here (neither system fonts nor matplotlib's copy)")


@pytest.mark.parametrize(
    "draw",
    [
        _grid,
        _stack,
        _png(lambda text, path: imaging.plot_curve([1.0, 0.5], path, title=text)),
        _png(lambda text, path: imaging.plot_curves({"a": [1.0, 0.5]}, path, title=text)),
        _png(lambda text, path: imaging.plot_grouped_bars(["g"], {"a": [0.5]}, path, title=text)),
    ],
    ids=["image_grid", "stack_images", "plot_curve", "plot_curves", "plot_grouped_bars"],
)
@pytest.mark.parametrize("char", ["é", "—", "☕", "ж", "α"])
def test_labels_draw_letters_beyond_ascii_not_boxes(dejavu, tmp_path, draw, char):
    """h-journeyG R2: grid.png labels ("café — ☕") showed a box for every character outside ASCII (Pillow's
    default font has no others)."""
    assert not np.array_equal(draw(char, tmp_path), draw(_NO_GLYPH, tmp_path))


def test_without_dejavu_labels_fall_back_to_pillows_font(monkeypatch):
    monkeypatch.setattr(imaging, "_FONT_NAME", "NoSuchFont.ttf")
    imaging.label_font.cache_clear()
    try:
        font, default = imaging.label_font(), ImageFont.load_default()
        name = lambda f: f.getname() if isinstance(f, ImageFont.FreeTypeFont) else None  # noqa: E731
        assert type(font) is type(default) and name(font) == name(default)
        assert imaging.image_grid([np.zeros((16, 16, 3), np.uint8)], ["café"]).size[0] == 20
    finally:
        imaging.label_font.cache_clear()
