"""Frechet distance, cached reference stats, feature extractors and CLIP score (tiny random models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.eval.fid import (
    ClipScore,
    ReferenceStats,
    TransformersImageFeatures,
    clip_score,
    extract_features,
    feature_stats,
    fid_score,
    frechet_distance,
    list_images,
)


def save_tiny_clip(path):
    """A random-init CLIP (width 16, 32 px images) with a character-level tokenizer, saved to ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz-":
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            max_position_embeddings=64,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            **layers,
        ),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def random_images(n, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class ColourStats:
    """A cheap deterministic extractor (per-channel mean and std) that counts its calls."""

    id = "colour-stats-v1"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255) for i in images])
        return torch.cat([x.mean((1, 2)), x.std((1, 2))], dim=1)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_full_covariances_against_independent_computations():
    rng = np.random.default_rng(1)
    # Rotating both Gaussians by one orthogonal matrix leaves the distance of the diagonal case unchanged.
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    a, b = rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    fd = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-10)
    # Non-commuting covariances: tr sqrt(S1 S2) is the sum of the square roots of S1 S2's eigenvalues.
    x, y = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = x @ x.T + 0.1 * np.eye(5), y @ y.T + 0.1 * np.eye(5)
    trace_root = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    m1, m2 = np.full(5, mu1[0]), np.full(5, mu2[0])
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n, d", [(200, 8), (6, 32)])  # full rank and rank-deficient covariances
def test_frechet_distance_is_zero_on_itself_symmetric_and_non_negative(n, d):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.5, size=(n, d))
    sa, sb = feature_stats(a), feature_stats(b)
    assert frechet_distance(*sa, *sa) == pytest.approx(0.0, abs=1e-8)
    ab, ba = frechet_distance(*sa, *sb), frechet_distance(*sb, *sa)
    assert ab > 0 and np.isfinite(ab)
    assert ab == pytest.approx(ba, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"shapes mu1 \(3,\).*expected"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_and_need_two_samples():
    x = np.random.default_rng(0).normal(size=(50, 6))
    mu, sigma = feature_stats(torch.from_numpy(x).float())
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(1, 6\); expected \(N, D\) with N >= 2"):
        feature_stats(x[:1])


def test_reference_stats_are_computed_once_then_read_from_the_cache(tmp_path):
    images = random_images(10)
    extractor = ColourStats()
    stats = ReferenceStats.cached("ref-set", images, extractor, tmp_path, batch_size=4, progress=False)
    assert extractor.calls == 3 and stats.count == 10 and stats.extractor_id == "colour-stats-v1"
    path = ReferenceStats.cache_path(tmp_path, "ref-set", "colour-stats-v1")
    assert path.is_file() and path.name.startswith("ref-set__colour-stats-v1__")

    def must_not_list():
        raise AssertionError("a cache hit must not touch the reference images")

    again = ReferenceStats.cached("ref-set", must_not_list, extractor, tmp_path, progress=False)
    assert extractor.calls == 3
    np.testing.assert_array_equal(again.mu, stats.mu)
    np.testing.assert_array_equal(again.sigma, stats.sigma)
    # Another extractor id is another cache entry.
    ReferenceStats.cached("ref-set", images, extractor, tmp_path, extractor_id="other", progress=False)
    assert extractor.calls == 4 and len(list(tmp_path.glob("*.npz"))) == 2
    with pytest.raises(ValueError, match="pass extractor_id="):
        ReferenceStats.cached("ref-set", images, lambda imgs: torch.zeros(len(imgs), 2), tmp_path)


def test_fid_of_a_set_against_itself_is_zero_and_extractors_must_match(tmp_path):
    images = random_images(12, seed=3)
    for k, image in enumerate(images):
        image.save(tmp_path / f"{k:03d}.png")
    paths = list_images(tmp_path)
    assert len(paths) == 12
    reference = ReferenceStats.from_features(
        extract_features(paths, ColourStats(), progress=False), "self", "colour-stats-v1"
    )
    assert fid_score(images, reference, ColourStats(), progress=False) == pytest.approx(0.0, abs=1e-6)
    assert fid_score(random_images(12, seed=4), reference, ColourStats(), progress=False) > 0
    reference.extractor_id = "something-else"
    with pytest.raises(ValueError, match="compare features of one extractor"):
        fid_score(images, reference, ColourStats(), progress=False)


def test_list_images_leaves_out_the_contact_sheets_of_sample_folders(tmp_path):
    # `fusedit sample` writes NNNNN.png + NNNNN.json and a grid.png of them all; GenEval's generator writes
    # <index>/samples/NNNNN.png and <index>/grid.png. Only the samples are images of the model's output.
    for folder in (tmp_path, tmp_path / "00000", tmp_path / "00000" / "samples"):
        folder.mkdir(exist_ok=True)
    for path in (tmp_path / "00000.png", tmp_path / "00000" / "samples" / "00000.png"):
        Image.new("RGB", (4, 4)).save(path)
    for path in (tmp_path / "grid.png", tmp_path / "00000" / "grid.png"):
        Image.new("RGB", (8, 8)).save(path)
    assert list_images(tmp_path) == [tmp_path / "00000" / "samples" / "00000.png", tmp_path / "00000.png"]


def test_clip_score_matches_the_model_and_clips_at_zero(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = random_images(3, size=40), ["a red dog", "two blue cats", "a green-colored clock"]
    scorer = ClipScore(tiny_clip, device="cpu")
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 100)).all())
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    expected = (100 * (out.image_embeds * out.text_embeds).sum(-1)).clamp(min=0)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert clip_score(images, prompts, scorer, batch_size=2, progress=False) == pytest.approx(
        float(expected.mean()), abs=1e-4
    )
    with pytest.raises(ValueError, match="expected equal"):
        clip_score(images, prompts[:2], scorer, progress=False)


def test_transformers_feature_extractors(tiny_clip, tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    clip = TransformersImageFeatures(tiny_clip, device="cpu")
    assert clip.id == f"transformers:{tiny_clip}"
    assert clip(random_images(3)).shape == (3, 8)  # CLIP's projection_dim
    vit_dir = tmp_path / "vit"
    ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(vit_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit_dir)
    vit = TransformersImageFeatures(vit_dir, device="cpu")
    features = extract_features(random_images(5), vit, batch_size=2, progress=False)
    assert features.shape == (5, 16) and features.dtype == np.float64 and np.isfinite(features).all()


def test_fusedit_clip_score_over_a_sample_folder(tiny_clip, tmp_path, capsys):
    from fusedit.cli import main

    for k, (image, prompt) in enumerate(zip(random_images(2, size=40), ["a red dog", "two blue cats"])):
        image.save(tmp_path / f"{k:05d}.png")
        (tmp_path / f"{k:05d}.json").write_text(json.dumps({"prompt": prompt, "seed": k}))
    assert main(["clip-score", str(tmp_path), "--clip", str(tiny_clip)]) == 0
    assert "CLIP score over 2 images: " in capsys.readouterr().out
    (tmp_path / "00001.json").write_text(json.dumps({"seed": 1}))  # no prompt: one line naming the file
    assert main(["clip-score", str(tmp_path), "--clip", str(tiny_clip)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{str(tmp_path / '00001.json')!r} has no prompt" in err and "\n" not in err
    assert main(["clip-score", str(tmp_path / "nope"), "--clip", str(tiny_clip)]) == 2
    assert "no such folder: " in capsys.readouterr().err
