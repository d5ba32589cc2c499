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


def test_plot_axes_tick_at_round_values_that_span_the_data():
    """A study's loss curves were ticked at 0.6024, 0.8717, 1.141 (the data's range in quarters): ticks
    are round steps (1, 2, 2.5 or 5 x 10^k) from at or below the lowest value to at or above the highest."""
    assert imaging._ticks(0.6024, 1.141) == [0.6, 0.8, 1.0, 1.2]
    assert imaging._ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert imaging._ticks(0, 2600, count=7) == [0, 500, 1000, 1500, 2000, 2500, 3000]
    assert imaging._ticks(1e-5, 3e-5) == [1e-05, 1.5e-05, 2e-05, 2.5e-05, 3e-05]
    assert imaging._ticks(-0.5, 0.5) == [-0.5, -0.25, 0.0, 0.25, 0.5]
