"""Regression tests for metric bookkeeping: clean-fid's clipped resize, the Inception fingerprint that lets a
copy of the network reuse cached reference statistics, unreadable statistics caches, and DPG-Bench's
input checks."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.config import ConfigError
from fusedit.eval.dpg import DpgQuestion, score_dpg_folder, write_dpg_grids
from fusedit.eval.fid import ReferenceStats, frechet_distance
from fusedit.eval.inception import INCEPTION_FILE, CleanInceptionFeatures, clean_resize


class _Network(torch.nn.Module):
    """The published Inception file's interface: a ``layers`` module."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def save_network(path, seed: int):
    torch.manual_seed(seed)
    layers = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 13, stride=13), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with pytest.warns(Warning):  # jit.script is deprecated; the published network is TorchScript anyway
        torch.jit.script(_Network(layers).eval()).save(str(path))
    return path


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(n)]


def must_not_decode():
    raise AssertionError("a valid cache must not decode the reference images again")


def test_clean_resize_clips_bicubic_overshoot_as_clean_fid_does():
    # A checkerboard upsampled with bicubic rings far below 0 and above 255.
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[::2, ::2] = image[1::2, 1::2] = 255
    out = clean_resize(image)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 255.0
    for c in range(3):
        plain = np.asarray(
            Image.fromarray(image[:, :, c].astype(np.float32)).resize((299, 299), Image.Resampling.BICUBIC)
        )
        assert plain.min() < -50 and plain.max() > 300  # the overshoot clean-fid clips
        np.testing.assert_array_equal(out[:, :, c], np.clip(plain, 0, 255))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_a_copy_of_the_inception_network_elsewhere_reuses_cached_reference_stats(tmp_path):
    first = save_network(tmp_path / "a" / INCEPTION_FILE, seed=0)
    copy = tmp_path / "b" / INCEPTION_FILE
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    cache = tmp_path / "cache"
    stats = ReferenceStats.cached("ref", images(4), CleanInceptionFeatures(first), cache, progress=False)
    again = ReferenceStats.cached("ref", must_not_decode, CleanInceptionFeatures(copy), cache, progress=False)
    np.testing.assert_array_equal(again.mu, stats.mu)
    # Other weights under the same name are still told apart.
    other = save_network(tmp_path / "c" / INCEPTION_FILE, seed=1)
    with pytest.raises(AssertionError, match="must not decode"):
        ReferenceStats.cached("ref", must_not_decode, CleanInceptionFeatures(other), cache, progress=False)


def test_a_cache_recorded_with_the_networks_old_place_in_its_fingerprint_is_reused(tmp_path):
    """Caches written before the fingerprint dropped the folder recorded "/abs/folder/file#digest": the
    same file and digest anywhere reuse them instead of decoding every reference image again."""
    network = save_network(tmp_path / "a" / INCEPTION_FILE, seed=0)
    extractor = CleanInceptionFeatures(network)
    old_style = type("Old", (), {"id": extractor.id, "__call__": lambda self, batch: extractor(batch)})()
    old_style.fingerprint = f"{tmp_path / 'gone' / extractor.fingerprint}"
    cache = tmp_path / "cache"
    stats = ReferenceStats.cached("ref", images(4), old_style, cache, progress=False)
    again = ReferenceStats.cached("ref", must_not_decode, extractor, cache, progress=False)
    np.testing.assert_array_equal(again.mu, stats.mu)


def test_inception_stats_cached_before_the_clipped_resize_are_recomputed(tmp_path):
    """Caches written before clean_resize clipped its overshoot hold the statistics of other features; their
    fingerprint ("/abs/folder/file#digest", no "+clip") must not pass for the current one, folder or not."""
    network = save_network(tmp_path / "a" / INCEPTION_FILE, seed=0)
    extractor = CleanInceptionFeatures(network)
    assert extractor.fingerprint.endswith("+clip")
    unclipped = type("Old", (), {"id": extractor.id, "__call__": lambda self, batch: extractor(batch)})()
    unclipped.fingerprint = f"{tmp_path / 'a' / extractor.fingerprint.removesuffix('+clip')}"
    cache = tmp_path / "cache"
    ReferenceStats.cached("ref", images(4), unclipped, cache, progress=False)
    with pytest.raises(AssertionError, match="must not decode"):
        ReferenceStats.cached("ref", must_not_decode, extractor, cache, progress=False)


class ChannelMeans:
    id = "channel-means"

    def __call__(self, batch):
        return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32)).mean((0, 1)) for i in batch])


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not an npz at all"])
def test_an_unreadable_stats_cache_is_recomputed_with_a_warning(tmp_path, caplog, content):
    path = ReferenceStats.cache_path(tmp_path, "ref", ChannelMeans.id)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"holds no readable feature statistics .*ReferenceStats\.save"):
        ReferenceStats.load(path)
    with caplog.at_level(logging.WARNING, logger="fusedit.eval.fid"):
        stats = ReferenceStats.cached("ref", images(3), ChannelMeans(), tmp_path, progress=False)
    assert "recomputing the cached statistics" in caplog.text and str(path) in caplog.text
    assert stats.count == 3
    np.testing.assert_array_equal(ReferenceStats.load(path).mu, stats.mu)  # rewritten whole


def test_an_npz_of_other_arrays_is_not_read_as_stats(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz' holds no readable feature statistics \(KeyError"):
        ReferenceStats.load(path)


def test_dpg_grid_writer_takes_uint8_arrays_and_names_other_ones(tmp_path):
    def generate_uint8(prompt, seed, n):
        return [np.full((6, 6, 3), 40 * k, dtype=np.uint8) for k in range(n)]

    write_dpg_grids([("0", "p")], generate_uint8, tmp_path, progress=False)
    assert Image.open(tmp_path / "0.png").getpixel((9, 9)) == (120, 120, 120)

    def generate_float(prompt, seed, n):
        return [np.zeros((6, 6, 3)) for _ in range(n)]

    with pytest.raises(ValueError, match=r"dtype float64; expected PIL images or uint8 \(H, W, 3\) arrays"):
        write_dpg_grids([("1", "p")], generate_float, tmp_path, progress=False)


def test_score_dpg_folder_names_a_batch_size_below_one(tmp_path):
    class BatchedVQA:
        def answer_batch(self, batch, questions):
            return ["yes"] * len(batch)

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    questions = {"0": [DpgQuestion(1, (), "Is there a ball?", "entity - whole (ball)")]}
    with pytest.raises(ConfigError, match=r"^batch_size=0 is not allowed \(allowed: an integer >= 1\)$"):
        score_dpg_folder(tmp_path, questions, BatchedVQA(), batch_size=0, progress=False)


def test_frechet_distance_names_non_finite_or_scalar_statistics():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match=r"^mu1 contains NaN or infinite values; allowed: finite"):
        frechet_distance(mu + np.nan, sigma, mu, sigma)
    with pytest.raises(ValueError, match=r"^sigma2 contains NaN or infinite values"):
        frechet_distance(mu, sigma, mu, np.full((3, 3), np.inf))
    with pytest.raises(ValueError, match=r"shapes mu1 \(\), sigma1 \(3, 3\).*expected \(D,\)"):
        frechet_distance(np.float64(1.0), sigma, mu, sigma)


def test_an_image_folder_that_is_a_file_is_named_as_one(tmp_path):
    from fusedit.eval.fid import list_images

    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"image folder '.*a.png' is a file, not a folder"):
        list_images(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match=r"image folder '.*nothing' does not exist"):
        list_images(tmp_path / "nothing")
