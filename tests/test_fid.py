"""Frechet distance, cached reference stats, feature extractors and CLIP score (tiny random models)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import fusedit.eval.fid as fid_module
from fusedit.eval.fid import (
    ClipScore,
    ReferenceStats,
    TransformersImageFeatures,
    clip_score,
    clip_scores,
    extract_features,
    feature_stats,
    fid_score,
    folder_source,
    frechet_distance,
    list_images,
    load_image,
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


def test_list_images_reads_every_format_training_reads(tmp_path):
    for name in ("a.gif", "b.TIF", "c.tiff", "d.JPG", "e.webp"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(tmp_path)] == ["a.gif", "b.TIF", "c.tiff", "d.JPG", "e.webp"]


def test_clip_score_matches_the_model(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = random_images(3, size=40), ["a red dog", "two blue cats", "a green-colored clock"]
    scorer = ClipScore(tiny_clip, device="cpu")
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and bool(((scores >= -100) & (scores <= 100)).all())
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    expected = 100 * (out.image_embeds * out.text_embeds).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert clip_score(images, prompts, scorer, batch_size=2, progress=False) == pytest.approx(
        max(float(expected.mean()), 0.0), abs=1e-4
    )
    with pytest.raises(ValueError, match="expected equal"):
        clip_score(images, prompts[:2], scorer, progress=False)


def test_clip_score_clips_the_mean_not_each_pair(monkeypatch):
    # Unit embeddings with cosines 0.3 ("near") and -0.1 ("far") to the image's [1, 0].
    texts = {"near": [0.3, 0.91**0.5], "far": [-0.1, 0.99**0.5]}

    class StubEmbedder:
        def __init__(self, model_id, **kwargs):
            self.model_id = model_id

        def image_embeds(self, images):
            return torch.tensor([[1.0, 0.0]] * len(images))

        def text_embeds(self, prompts):
            return torch.tensor([texts[p] for p in prompts])

    monkeypatch.setattr(fid_module, "ClipEmbedder", StubEmbedder)
    scorer, images = ClipScore("stub"), random_images(2)
    # torchmetrics' CLIPScore code: 100 x cosine per pair, the mean clipped at 0 (not each pair: 15).
    torch.testing.assert_close(scorer(images, ["near", "far"]), torch.tensor([30.0, -10.0]))
    assert clip_score(images, ["near", "far"], scorer, progress=False) == pytest.approx(10.0)
    assert clip_score(images, ["far", "far"], scorer, progress=False) == 0.0


def test_transformers_feature_extractors(tiny_clip, tiny_vit):
    clip = TransformersImageFeatures(tiny_clip, device="cpu")
    assert clip.id == f"transformers:{tiny_clip}"
    assert clip(random_images(3)).shape == (3, 8)  # CLIP's projection_dim
    vit = TransformersImageFeatures(tiny_vit, device="cpu")
    features = extract_features(random_images(5), vit, batch_size=2, progress=False)
    assert features.shape == (5, 16) and features.dtype == np.float64 and np.isfinite(features).all()


def test_fusedit_clip_score_over_a_sample_folder(tiny_clip, tmp_path, capsys, caplog):
    from fusedit.cli import main

    for k, (image, prompt) in enumerate(zip(random_images(2, size=40), ["a red dog", "two blue cats"])):
        image.save(tmp_path / f"{k:05d}.png")
        (tmp_path / f"{k:05d}.json").write_text(json.dumps({"prompt": prompt, "seed": k}))
    assert main(["clip-score", str(tmp_path), "--clip", str(tiny_clip)]) == 0
    assert "CLIP score over 2 images: " in capsys.readouterr().out
    # Images without a prompt file (any image type) are left out, and said to be: the score is of a part.
    random_images(1, size=40)[0].save(tmp_path / "00002.jpg")
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        assert main(["clip-score", str(tmp_path), "--clip", str(tiny_clip)]) == 0
    assert "CLIP score over 2 images: " in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records] == [
        "1 of the 3 images have no prompt file beside them (e.g. 00002.jpg: no 00002.json) and are left out"
    ]
    one = tmp_path / "one"
    one.mkdir()
    (tmp_path / "00002.jpg").rename(one / "00002.jpg")
    (one / "00002.json").write_text(json.dumps({"prompt": "a green bird"}))
    assert main(["clip-score", str(one), "--clip", str(tiny_clip)]) == 0
    assert "CLIP score over 1 image: " in capsys.readouterr().out
    (tmp_path / "00001.json").write_text(json.dumps({"seed": 1}))  # no prompt: one line naming the file
    assert main(["clip-score", str(tmp_path), "--clip", str(tiny_clip)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{str(tmp_path / '00001.json')!r} has no prompt" in err and "\n" not in err
    assert main(["clip-score", str(tmp_path / "nope"), "--clip", str(tiny_clip)]) == 2
    assert "no such folder: " in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The reference cache records what it was computed from; images are decoded as training decodes them.


def save_images(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(folder / (names[k] if names else f"{k:03d}.png"))
    return folder


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    """A random-init ViT (width 16, 32 px) with its processor: a feature model for `fusedit fid`."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


class FingerprintedColourStats(ColourStats):
    def __init__(self, fingerprint):
        super().__init__()
        self.fingerprint = fingerprint


def test_cached_reference_stats_are_recomputed_when_the_folder_files_or_model_differ(tmp_path, caplog):
    ref_a = save_images(tmp_path / "a", random_images(6, seed=1))
    ref_b = save_images(tmp_path / "b", random_images(6, seed=2))
    cache = tmp_path / "cache"
    extractor = FingerprintedColourStats("weights-v1")

    def cached(folder):
        files = list_images(folder)
        source = folder_source(folder, files)
        return ReferenceStats.cached("mine", files, extractor, cache, reference=source, progress=False)

    def fresh(folder):
        return feature_stats(extract_features(list_images(folder), ColourStats(), progress=False))

    with caplog.at_level(logging.INFO, logger="fusedit.eval.fid"):
        first = cached(ref_a)
        assert extractor.calls == 1 and first.source["reference"]["folder"] == str(ref_a.resolve())
        # Nothing changed: reused, and the log says so.
        caplog.clear()
        assert cached(ref_a).count == 6 and extractor.calls == 1
        assert "cached statistics of 6 images" in caplog.text
        # Same name, another folder: recomputed from that folder, with a warning naming both.
        caplog.clear()
        other = cached(ref_b)
        assert extractor.calls == 2
        np.testing.assert_allclose(other.mu, fresh(ref_b)[0])
        assert (
            f"the reference folder was {str(ref_a.resolve())!r}, now {str(ref_b.resolve())!r}" in caplog.text
        )
        # An added image, then a re-encoded one (same name, other size), in the same folder.
        random_images(1, seed=9)[0].save(ref_b / "extra.png")
        caplog.clear()
        assert cached(ref_b).count == 7 and extractor.calls == 3
        assert "(were 6, now 7; names, sizes or contents differ)" in caplog.text
        Image.new("RGB", (24, 24), (9, 99, 199)).save(ref_b / "extra.png")  # flat: compresses smaller
        assert cached(ref_b).count == 7 and extractor.calls == 4
        np.testing.assert_allclose(ReferenceStats.load(next(cache.glob("*.npz"))).mu, fresh(ref_b)[0])
        assert cached(ref_b).count == 7 and extractor.calls == 4
        # Rewritten in place at the same size (an uncompressed BMP always is): recomputed.
        Image.new("RGB", (24, 24), (1, 2, 3)).save(ref_b / "flat.bmp")
        assert cached(ref_b).count == 8 and extractor.calls == 5
        size = (ref_b / "flat.bmp").stat().st_size
        Image.new("RGB", (24, 24), (200, 2, 3)).save(ref_b / "flat.bmp")
        assert (ref_b / "flat.bmp").stat().st_size == size
        assert cached(ref_b).count == 8 and extractor.calls == 6
        np.testing.assert_allclose(ReferenceStats.load(next(cache.glob("*.npz"))).mu, fresh(ref_b)[0])
        # Other weights behind the same extractor id.
        extractor.fingerprint = "weights-v2"
        caplog.clear()
        cached(ref_b)
        assert extractor.calls == 7 and "feature model was 'weights-v1', now 'weights-v2'" in caplog.text
    # A cache written without a source (an older fusedit) is recomputed once, then reused.
    path = next(cache.glob("*.npz"))
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "source"}
    np.savez(path, **arrays)
    cached(ref_b)
    cached(ref_b)
    assert extractor.calls == 8


def test_fusedit_fid_does_not_reuse_another_folders_reference_stats(tiny_vit, tmp_path, capsys):
    from fusedit.cli import main

    samples = save_images(tmp_path / "samples", random_images(4, size=32, seed=5))
    ref_a = save_images(tmp_path / "refA", random_images(4, size=32, seed=6))
    ref_b = save_images(tmp_path / "refB", [Image.new("RGB", (32, 32), (40 * k, 0, 0)) for k in range(4)])

    def fd(reference, cache):
        argv = ["fid", str(samples), "--reference", str(reference), "--reference-name", "mine"]
        assert main([*argv, "--features", str(tiny_vit), "--cache-dir", str(cache)]) == 0
        return capsys.readouterr().out.strip().rsplit(" ", 1)[-1]

    fd_a, fd_b = fd(ref_a, tmp_path / "c1"), fd(ref_b, tmp_path / "c2")
    assert fd_a != fd_b
    # One cache for both, as the report's repro: the second run must read refB, not refA's stats.
    assert fd(ref_a, tmp_path / "c3") == fd_a
    assert fd(ref_b, tmp_path / "c3") == fd_b
    assert fd(ref_b, tmp_path / "c3") == fd_b  # and a cache hit gives the same number
    # A missing reference folder is reported before any model loads, even with cached stats.
    argv = ["fid", str(samples), "--reference", str(tmp_path / "nope"), "--reference-name", "mine"]
    assert main([*argv, "--features", str(tiny_vit), "--cache-dir", str(tmp_path / "c3")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_features_path_to_nothing_is_named_with_its_flag(tmp_path, capsys):
    """Not taken for a malformed hub id (transformers: "Repo id must be in the form ...")."""
    from fusedit.cli import main

    samples = save_images(tmp_path / "samples", random_images(2, size=32, seed=5))
    missing = str(tmp_path / "nofeatures")
    argv = ["fid", str(samples), "--reference", str(samples), "--reference-name", "mine"]
    assert main([*argv, "--features", missing]) == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: --features {missing!r} is a path to nothing (allowed: a feature model folder "
        "written by save_pretrained, or a hub id written org/name)\n"
    )


def test_scoring_models_of_the_wrong_kind_are_named_with_their_flag(tiny_vit, tiny_clip, tmp_path, capsys):
    """A ViT as --clip failed in the tokenizer ("You need to have sentencepiece or tiktoken installed"), an
    image as --clip or --features with "'utf-8' codec can't decode byte 0x89", a JSON file as --features
    with a torch.load paragraph: one line each, naming the flag and what it takes."""
    from fusedit.cli import main

    samples = save_images(tmp_path / "samples", random_images(2, size=32, seed=5))
    for k in range(2):
        (samples / f"{k:03d}.json").write_text(json.dumps({"prompt": "a red dog"}))
    image = samples / "000.png"
    fid = ["fid", str(samples), "--reference", str(samples), "--reference-name", "mine", "--features"]
    for argv, message in [
        (
            ["clip-score", str(samples), "--clip", str(tiny_vit)],
            f"--clip {str(tiny_vit)!r} is a model of model_type 'vit' (allowed: a CLIP model hub id or folder, "
            "e.g. openai/clip-vit-large-patch14)",
        ),
        (
            ["clip-score", str(samples), "--clip", str(image)],
            f"--clip {str(image)!r} is a file (allowed: a CLIP model hub id or folder",
        ),
        ([*fid, str(image)], f"--features {str(image)!r} is a file but not a .pt (allowed: clean-fid's "),
        ([*fid, str(tiny_clip / "config.json")], "config.json' is a file but not a .pt (allowed: "),
        ([*fid, str(tmp_path)], f"--features {str(tmp_path)!r} is not a model transformers can read: "),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fusedit: error: --") and message in err and err.count("\n") == 1, err


def _exif_rotated_jpeg(path):
    """A JPEG stored 40 wide x 24 high (left half red) whose EXIF orientation 6 says: display it rotated
    90 degrees clockwise, i.e. 24 wide x 40 high with the red half on top."""
    image = Image.new("RGB", (40, 24), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)
    return path


def decode_fixtures(folder):
    """One file per decoding case training handles, and what each must decode to (a pixel's colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((10, 200, 10, 255), (0, 0, 8, 16))
    rgba.save(folder / "rgba.png")
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(folder / "grey16.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)  # index 1 opaque: all pixels red
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    _exif_rotated_jpeg(folder / "exif6.jpg")
    return {
        "rgba.png": ((16, 16), [(0, 0, (10, 200, 10)), (15, 0, (255, 255, 255))]),  # transparent -> white
        "grey16.png": ((16, 16), [(0, 0, (128, 128, 128))]),  # 32768 / 257, not clipped to 255
        "palette.png": ((16, 16), [(5, 5, (200, 30, 30))]),
        "cmyk.jpg": ((16, 16), [(8, 8, (255, 0, 0))]),
        "exif6.jpg": ((24, 40), [(12, 5, (255, 0, 0)), (12, 35, (0, 0, 255))]),  # displayed upright
    }


def test_load_image_decodes_as_training_does(tmp_path):
    from fusedit.data.transforms import SampleDecoder, to_tensor

    for name, (size, pixels) in decode_fixtures(tmp_path).items():
        image = load_image(tmp_path / name)
        assert (image.mode, image.size) == ("RGB", size), name
        for x, y, colour in pixels:
            np.testing.assert_allclose(image.getpixel((x, y)), colour, atol=6, err_msg=name)
        # Bit for bit what a training sample of the same file is (a target of the image's own size: no resize).
        decoder = SampleDecoder(targets=((size[1], size[0]),))
        trained = decoder({"txt": "x"}, str(tmp_path / name), key=0).image
        assert torch.equal(to_tensor(image), trained), name


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    folder = save_images(tmp_path / "ref", random_images(3, seed=7))
    (folder / "corrupt.jpg").write_bytes(b"not an image at all")
    random_images(1, size=64, seed=8)[0].save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    files = list_images(folder)
    assert len(files) == 5
    with caplog.at_level(logging.WARNING, logger="fusedit.eval.fid"):
        features = extract_features(
            files, ColourStats(), batch_size=2, progress=False, what="reference images"
        )
    readable = [f for f in files if f.stem not in ("corrupt", "truncated")]
    np.testing.assert_allclose(features, extract_features(readable, ColourStats(), progress=False))
    assert "skipped 2 of 5 reference images that could not be read (e.g. " in caplog.text
    assert str(folder / "corrupt.jpg") in caplog.text
    # Too few left for a covariance: one line that counts them.
    two_bad = [files[0], folder / "corrupt.jpg", folder / "truncated.png"]
    reference = ReferenceStats.from_features(features, "r", "colour-stats-v1")
    with pytest.raises(
        ValueError, match=r"^sample images: 1 of 3 could be read \(2 unreadable, e\.g\. "
    ) as e:
        fid_score(two_bad, reference, ColourStats(), progress=False)
    assert "allowed: at least 2 readable images" in str(e.value) and "\n" not in str(e.value)


def test_fusedit_fid_reads_a_reference_folder_of_phone_photos(tiny_vit, tmp_path, capsys, caplog):
    from fusedit.cli import main

    photos = tmp_path / "photos"
    decode_fixtures(photos)
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    samples = save_images(tmp_path / "samples", random_images(3, size=32, seed=5))
    argv = ["fid", str(samples), "--reference", str(photos), "--reference-name", "photos"]
    assert main([*argv, "--features", str(tiny_vit), "--cache-dir", str(tmp_path / "c")]) == 0
    assert "FD (" in capsys.readouterr().out
    assert "skipped 1 of 6 reference images of 'photos' that could not be read" in caplog.text
    # The cached stats are those of the photos as training sees them (upright, on white, 16-bit scaled).
    extractor = TransformersImageFeatures(tiny_vit, device="cpu")
    decoded = [load_image(p) for p in list_images(photos) if p.name != "corrupt.jpg"]
    stats = ReferenceStats.load(next((tmp_path / "c").glob("*.npz")))
    assert stats.count == 5
    np.testing.assert_allclose(
        stats.mu, feature_stats(extract_features(decoded, extractor, progress=False))[0]
    )


def test_clip_score_skips_unreadable_images(tiny_clip, tmp_path, capsys, caplog):
    from fusedit.cli import main

    prompts = ["a red dog", "two blue cats", "a green clock"]
    for k, (image, prompt) in enumerate(zip(random_images(3, size=40), prompts)):
        image.save(tmp_path / f"{k:05d}.png")
        (tmp_path / f"{k:05d}.json").write_text(json.dumps({"prompt": prompt, "seed": k}))
    scorer = ClipScore(tiny_clip, device="cpu")
    paths = sorted(tmp_path.glob("*.png"))
    whole = clip_scores(paths, prompts, scorer, progress=False)
    (tmp_path / "00001.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="fusedit.eval.fid"):
        scores = clip_scores(paths, prompts, scorer, batch_size=2, progress=False)
    assert torch.isnan(scores[1]) and torch.allclose(scores[[0, 2]], whole[[0, 2]], atol=1e-5)
    assert f"skipped 1 of 3 images that could not be read (e.g. {paths[1]}: corrupt: " in caplog.text
    assert clip_score(paths, prompts, scorer, progress=False) == pytest.approx(
        max(float(whole[[0, 2]].mean()), 0.0), abs=1e-5
    )
    assert main(["clip-score", str(tmp_path), "--clip", str(tiny_clip)]) == 0
    assert "CLIP score over 2 images: " in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"none of the 1 images could be read \(e\.g\. .*00001\.png: corrupt"
    ):
        clip_score(paths[1:2], prompts[1:2], scorer, progress=False)
    # An EXIF-rotated photo is scored upright, as training would see it.
    photo = _exif_rotated_jpeg(tmp_path / "photo.jpg")
    upright = load_image(photo)
    assert upright.size == (24, 40)
    torch.testing.assert_close(scorer([photo], ["a red dog"]), scorer([upright], ["a red dog"]))


def test_fid_cache_dir_and_clip_score_samples_of_the_wrong_kind_say_so(tmp_path, capsys, monkeypatch):
    """`fusedit fid --cache-dir FILE` failed after the feature model loaded with a bare [Errno 17];
    `fusedit clip-score FILE` said "no such folder" of a file that is there."""
    from fusedit.cli import main

    monkeypatch.setattr(fid_module, "ReferenceStats", None)  # nothing past the flags' checks may run
    monkeypatch.setattr("fusedit.eval.inception.feature_extractor", lambda *a: pytest.fail("features loaded"))
    samples = save_images(tmp_path / "samples", random_images(2, size=32, seed=5))
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = ["fid", str(samples), "--reference", str(samples), "--reference-name", "mine", "--features", "o/n"]
    assert main([*argv, "--cache-dir", str(afile)]) == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: --cache-dir {str(afile)!r} is a file (allowed: a folder, new or existing)\n"
    )
    assert main(["clip-score", str(afile), "--clip", "o/n"]) == 2
    assert capsys.readouterr().err == (
        f"fusedit: error: {str(afile)!r} is a file (allowed: a `fusedit sample` output folder)\n"
    )


def test_fid_says_where_it_caches_the_reference_statistics(tmp_path, capsys, caplog):
    """h-journeyG R6: `fusedit fid` left ./.cache/fusedit-fid/*.npz behind unsaid (only a cache hit named
    the file), and --cache-dir had no help text."""
    from fusedit.cli import main

    with caplog.at_level(logging.INFO, logger="fusedit.eval.fid"):
        ReferenceStats.cached("ref-set", random_images(3), ColourStats(), tmp_path, progress=False)
        ReferenceStats.cached("ref-set", random_images(3), ColourStats(), tmp_path, progress=False)
    path = ReferenceStats.cache_path(tmp_path, "ref-set", ColourStats.id)
    assert caplog.messages == [
        f"reference 'ref-set': statistics of 3 images cached in {path}",
        f"reference 'ref-set': cached statistics of 3 images ({path})",
    ]
    with pytest.raises(SystemExit):
        main(["fid", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--cache-dir CACHE_DIR folder of the cached reference statistics, reused while the reference folder "
        "and features are unchanged (default .cache/fusedit-fid, under the current directory)"
    ) in help_text
