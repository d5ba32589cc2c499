"""FID on MJHQ-30K (design-space.md s.4): clean-fid's Inception features without clean-fid (resize,
normalisation, TorchScript loading), the MJHQ-30K prompt file, the sample layout and its seeds, per-category
and overall FID, the `fusedit eval --bench mjhq` / `fusedit fid` / `fusedit benchmarks download mjhq`
commands. The Inception network here is a tiny TorchScript module with the published file's interface (a
``layers`` module): the real one cannot be downloaded on this machine."""

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rmtree_dying_after_one_weight_file
from fusedit.cli import main
from fusedit.config import ConfigError
from fusedit.eval import benchmarks
from fusedit.eval.benchmarks import BenchmarkError, download, load_mjhq
from fusedit.eval.fid import ReferenceStats, extract_features, feature_stats, frechet_distance
from fusedit.eval.inception import (
    INCEPTION_FILE,
    INCEPTION_ID,
    CleanInceptionFeatures,
    clean_resize,
    feature_extractor,
)
from fusedit.eval.mjhq import pool_stats, select, write_mjhq_samples
from fusedit.eval.run import run_mjhq

CATEGORIES = ("animals", "food", "people")


class _Network(torch.nn.Module):
    """The published file's interface: ``forward(x, return_features)`` and a ``layers`` module."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


class _ChannelMeans(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def save_network(path, layers: torch.nn.Module):
    with pytest.warns(Warning):  # jit.script is deprecated; the published network is TorchScript anyway
        torch.jit.script(_Network(layers).eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A random-init conv net saved as inception-2015-12-05.pt: (B, 3, 299, 299) -> (B, 8)."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=8),
        torch.nn.Tanh(),
        torch.nn.Conv2d(8, 8, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    return save_network(tmp_path_factory.mktemp("inception") / INCEPTION_FILE, layers)


def random_image(rng, size=48) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def mjhq_folder(tmp_path, per_category=3, reference_per_category=5):
    """meta_data.json (ids deliberately out of order) and a reference folder of random JPEGs."""
    rng = np.random.default_rng(0)
    meta = {}
    for c, category in enumerate(CATEGORIES):
        for k in range(per_category):
            meta[f"{9 - k}{c}ab"] = {"category": category, "prompt": f"{category} number {k}"}
    (tmp_path / "meta_data.json").write_text(json.dumps(meta))
    for category in CATEGORIES:
        (tmp_path / "refs" / category).mkdir(parents=True)
        for k in range(reference_per_category):
            random_image(rng).save(tmp_path / "refs" / category / f"{k}.jpg")
    return tmp_path / "meta_data.json", tmp_path / "refs"


class Generator:
    """A `generate(prompt, seed, n)` whose image is drawn from the seed; it records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, seed, n):
        self.calls.append((prompt, seed, n))
        rng = np.random.default_rng(seed)
        return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


# ------------------------------------------------------------------ clean-fid's features


def test_clean_resize_resizes_each_channel_as_float_without_rounding():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    out = clean_resize(image)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    for c in range(3):
        alone = Image.fromarray(image[:, :, c].astype(np.float32)).resize(
            (299, 299), Image.Resampling.BICUBIC
        )
        # clean-fid clips the bicubic overshoot to [0, 255]
        np.testing.assert_array_equal(out[:, :, c], np.clip(np.asarray(alone), 0, 255))
    assert not np.allclose(out, np.round(out))  # not quantised back to 8 bits
    # Bicubic on a constant image is that constant (up to float rounding).
    flat = clean_resize(np.full((20, 30, 3), (10, 128, 255), dtype=np.uint8))
    np.testing.assert_allclose(flat, np.broadcast_to([10, 128, 255], flat.shape), atol=1e-3)
    with pytest.raises(ValueError, match=r"image of shape \(8, 8\); expected \(H, W, 3\) RGB"):
        clean_resize(np.zeros((8, 8), dtype=np.uint8))


def test_the_network_sees_clean_fid_inputs(tmp_path):
    """(x - 128) / 128 at 299x299: a channel-mean network returns each colour's normalised value."""
    extractor = CleanInceptionFeatures(save_network(tmp_path / "means.pt", _ChannelMeans()))
    image = Image.new("RGB", (64, 40), (0, 128, 255))
    features = extractor([image, image])
    assert features.shape == (2, 3) and features.dtype == torch.float32
    torch.testing.assert_close(features[0], torch.tensor([-1.0, 0.0, 127 / 128]), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_inception_features_are_its_layers_on_resized_normalised_images(inception):
    rng = np.random.default_rng(2)
    images = [random_image(rng), random_image(rng, 80)]
    extractor = CleanInceptionFeatures(inception.parent)  # the folder holding the file
    x = torch.from_numpy(np.stack([clean_resize(np.asarray(i)) for i in images])).permute(0, 3, 1, 2)
    expected = torch.jit.load(str(inception)).layers((x - 128) / 128)
    torch.testing.assert_close(extractor(images), expected, rtol=0, atol=0)
    assert extractor.id == INCEPTION_ID and extractor.fingerprint.startswith(f"{INCEPTION_FILE}#")


def test_feature_extractor_picks_inception_for_its_file_or_folder(inception, tmp_path):
    assert isinstance(feature_extractor(str(inception)), CleanInceptionFeatures)
    assert isinstance(feature_extractor(str(inception.parent)), CleanInceptionFeatures)
    with pytest.raises(
        FileNotFoundError, match=r"no Inception network at .*gone\.pt.*inception-2015-12-05\.pt"
    ):
        feature_extractor(str(tmp_path / "gone.pt"))


def test_a_file_that_is_not_the_inception_network_is_refused(tmp_path):
    (tmp_path / "text.pt").write_text("not a network")
    with pytest.raises(ValueError, match=r"text\.pt' is not a TorchScript file .*allowed: clean-fid's"):
        CleanInceptionFeatures(tmp_path / "text.pt")
    plain = tmp_path / "plain.pt"
    with pytest.warns(Warning):
        torch.jit.script(torch.nn.Identity()).save(str(plain))
    with pytest.raises(ValueError, match=r"has no `layers` module; allowed: clean-fid's inception"):
        CleanInceptionFeatures(plain)


# ------------------------------------------------------------------ MJHQ-30K prompts and samples


def test_load_mjhq_sorts_by_id_and_names_bad_entries(tmp_path):
    meta, _ = mjhq_folder(tmp_path)
    rows = load_mjhq(meta)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows) and len(rows) == 9
    assert rows[0] == {"id": "70ab", "prompt": "animals number 2", "category": "animals"}
    assert load_mjhq(tmp_path) == rows  # the folder holding meta_data.json
    cases = [
        ("[1, 2]", "holds no prompts; expected MJHQ-30K's meta_data.json"),
        ("{oops", "is not JSON"),
        ('{"a": {"prompt": "x"}}', 'entry \'a\' is {"prompt": "x"}; expected an object with a string'),
        ('{"../a": {"prompt": "x", "category": "c"}}', "id '../a' is not a file name"),
        ('{"a": {"prompt": "x", "category": ".."}}', "category '..' is not a file name"),
    ]
    for text, message in cases:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(BenchmarkError, match=message.replace("[", r"\[").replace("{", r"\{")):
            load_mjhq(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="fusedit benchmarks download mjhq"):
        load_mjhq(tmp_path / "nothing.json")


def test_select_takes_the_first_ids_of_each_category_and_keeps_their_positions(tmp_path):
    rows = load_mjhq(mjhq_folder(tmp_path)[0])
    chosen = select(rows, 2)
    assert [(r["category"], r["index"]) for r in chosen] == [
        ("animals", 0),
        ("food", 1),
        ("people", 2),
        ("animals", 3),
        ("food", 4),
        ("people", 5),
    ]
    assert [r["index"] for r in select(rows, None)] == list(range(9))
    with pytest.raises(
        ConfigError, match=r"^per_category=0 is not allowed \(allowed: an integer >= 1, or None for all\)$"
    ):
        select(rows, 0)


def test_samples_are_written_by_category_with_seeds_from_their_position_and_resume(tmp_path):
    rows = load_mjhq(mjhq_folder(tmp_path)[0])
    gen = Generator()
    counts = write_mjhq_samples(select(rows, 1), gen, tmp_path / "samples", seed=7, progress=False)
    assert counts == {"generated": 3, "skipped": 0}
    assert gen.calls == [(rows[i]["prompt"], 7 + i, 1) for i in range(3)]
    first = np.asarray(Image.open(tmp_path / "samples" / "animals" / "70ab.png"))
    np.testing.assert_array_equal(first, np.asarray(Generator()("", 7, 1)[0]))
    # A larger subset: the three images already there are kept, each new one gets its own position's seed.
    counts = write_mjhq_samples(select(rows, 2), gen, tmp_path / "samples", seed=7, progress=False)
    assert counts == {"generated": 3, "skipped": 3}
    assert [seed for _, seed, _ in gen.calls[3:]] == [10, 11, 12]
    assert sorted(p.name for p in (tmp_path / "samples" / "food").iterdir()) == ["71ab.png", "81ab.png"]
    # An id whose prompt changed in the metadata: its kept image is refused, before anything is generated.
    # (70ab.png, first in order and now missing, is not made either.)
    (tmp_path / "samples" / "animals" / "70ab.png").unlink()
    edited = [{**r, "prompt": "a changed prompt"} if r["index"] == 4 else r for r in select(rows, 3)]
    with pytest.raises(ConfigError, match=r"81ab\.png was made for the prompt .*, not 'a changed prompt'"):
        write_mjhq_samples(edited, gen, tmp_path / "samples", seed=7, progress=False)
    assert len(gen.calls) == 6 and not (tmp_path / "samples" / "animals" / "70ab.png").exists()


def test_pooled_stats_are_the_stats_of_the_union():
    rng = np.random.default_rng(3)
    parts = [rng.normal(k, 1 + k, (n, 5)) for k, n in enumerate((4, 9, 6))]
    stats = [ReferenceStats.from_features(p) for p in parts]
    mu, sigma, count = pool_stats(stats)
    expected_mu, expected_sigma = feature_stats(np.concatenate(parts))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)
    assert count == 19


def test_run_mjhq_scores_fid_overall_and_per_category(tmp_path, inception):
    meta, refs = mjhq_folder(tmp_path)
    extractor = CleanInceptionFeatures(inception)
    result = run_mjhq(
        Generator(),
        meta,
        tmp_path / "out",
        reference=refs,
        features=extractor,
        cache_dir=tmp_path / "cache",
        per_category=2,
        progress=False,
        record={"checkpoint": "step-1"},
    )
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores == json.loads(json.dumps(result["scores"]))
    assert scores["samples"] == 6 and scores["reference_images"] == 15 and scores["features"] == INCEPTION_ID
    assert (result["generated"], result["skipped"], result["unit"]) == (6, 0, "images")

    def features(files):
        return extract_features(sorted(files), extractor, progress=False)

    every_sample, every_reference = [], []
    for category in CATEGORIES:
        sample = features((tmp_path / "out" / "samples" / category).glob("*.png"))
        reference = features((refs / category).glob("*.jpg"))
        every_sample.append(sample)
        every_reference.append(reference)
        expected = frechet_distance(*feature_stats(sample), *feature_stats(reference))
        assert scores["categories"][category] == pytest.approx(expected, rel=1e-9)
    overall = frechet_distance(
        *feature_stats(np.concatenate(every_sample)), *feature_stats(np.concatenate(every_reference))
    )
    assert scores["overall"] == pytest.approx(overall, rel=1e-9) and scores["overall"] > 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # one per category: the overall is pooled
    record = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert record == {"checkpoint": "step-1", "bench": "mjhq", "seed": 42, "noise": "seed+k per image"}


def test_run_mjhq_checks_its_scorer_and_reference_before_generating(tmp_path, inception):
    meta, refs = mjhq_folder(tmp_path)
    gen = Generator()
    extractor = CleanInceptionFeatures(inception)
    with pytest.raises(ConfigError, match="--reference scores MJHQ-30K only together with --features"):
        run_mjhq(gen, meta, tmp_path / "out", reference=refs, progress=False)
    with pytest.raises(ConfigError, match="--features scores MJHQ-30K only together with --reference"):
        run_mjhq(gen, meta, tmp_path / "out", features=extractor, progress=False)
    with pytest.raises(ConfigError, match=r"--per-category 1 cannot be scored: FID needs at least 2 samples"):
        run_mjhq(
            gen, meta, tmp_path / "out", reference=refs, features=extractor, per_category=1, progress=False
        )
    (refs / "people").rename(refs / "humans")
    with pytest.raises(
        FileNotFoundError, match=r"has no folder 'people'; allowed: the unzipped mjhq30k_imgs"
    ):
        run_mjhq(gen, meta, tmp_path / "out", reference=refs, features=extractor, progress=False)
    with pytest.raises(ConfigError, match=r"^batch_size=0 is not allowed \(allowed: an integer >= 1\)$"):
        run_mjhq(
            gen, meta, tmp_path / "out", reference=refs, features=extractor, batch_size=0, progress=False
        )
    assert gen.calls == []
    # Without a scorer it only generates.
    result = run_mjhq(gen, meta, tmp_path / "out", per_category=1, progress=False)
    samples = str(tmp_path / "out" / "samples")
    assert result == {"samples": samples, "generated": 3, "skipped": 0, "unit": "images"}
    assert not (tmp_path / "out" / "scores.json").exists()


# ------------------------------------------------------------------ commands


def test_fusedit_eval_mjhq_samples_and_scores_a_run(tiny_run, tmp_path, inception, capsys):
    meta, refs = mjhq_folder(tmp_path)
    out = tmp_path / "eval"
    args = ["eval", str(tiny_run), "--bench", "mjhq", "--prompts", str(meta), "--per-category", "2"]
    scoring = ["--reference", str(refs), "--features", str(inception), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, *scoring, "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    assert f"FID (clean-fid Inception): {scores['overall']:.3f} over 6 samples; " in printed
    assert scores["scorers"]["features"]["id"] == INCEPTION_ID
    assert sorted(p.relative_to(out / "samples").as_posix() for p in (out / "samples").rglob("*.png")) == [
        "animals/70ab.png",
        "animals/80ab.png",
        "food/71ab.png",
        "food/81ab.png",
        "people/72ab.png",
        "people/82ab.png",
    ]
    record = json.loads((out / "generation.json").read_text())
    assert (record["bench"], record["seed"], record["steps"]) == ("mjhq", 42, 2)
    # Other sampling settings are refused on the same folder before the model loads.
    assert main([*args, "--out", str(out), "--steps", "3", "--device", "cpu", "--quiet"]) == 2
    assert "holds images made with steps=2, not steps=3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reference", "REFS"], "--reference scores MJHQ-30K only together with --features"),
        (["--features", "INCEPTION"], "--features scores MJHQ-30K only together with --reference"),
        (["--reference", "nowhere", "--features", "INCEPTION"], "MJHQ-30K reference folder"),
        (["--reference", "REFS", "--features", "gone.pt"], "no Inception network at"),
        (
            ["--reference", "REFS", "--features", "INCEPTION", "--per-category", "1"],
            "--per-category 1 cannot",
        ),
    ],
)
def test_fusedit_eval_mjhq_checks_scoring_before_the_model_loads(
    tiny_run, tmp_path, inception, monkeypatch, capsys, extra, message
):
    import fusedit.checkpoints

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fusedit.checkpoints, "load_model", load_model)
    meta, refs = mjhq_folder(tmp_path)
    extra = [{"REFS": str(refs), "INCEPTION": str(inception)}.get(a, a) for a in extra]
    assert main(["eval", str(tiny_run), "--bench", "mjhq", "--prompts", str(meta), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedit: error: ") and err.count("\n") == 1 and message in err, err


def test_fusedit_fid_with_the_inception_file_reports_fid(tmp_path, inception, capsys):
    _, refs = mjhq_folder(tmp_path)
    args = ["fid", str(refs / "food"), "--reference", str(refs / "animals"), "--reference-name", "animals"]
    assert main([*args, "--features", str(inception), "--cache-dir", str(tmp_path / "c")]) == 0
    value = float(capsys.readouterr().out.split("FID (clean-fid Inception): ")[1])
    extractor = CleanInceptionFeatures(inception)
    food = extract_features(sorted((refs / "food").glob("*.jpg")), extractor, progress=False)
    animals = extract_features(sorted((refs / "animals").glob("*.jpg")), extractor, progress=False)
    expected = frechet_distance(*feature_stats(food), *feature_stats(animals))
    assert value == pytest.approx(expected, abs=1e-4)


def test_download_mjhq_metadata_and_images_from_the_hub_layout(tmp_path, monkeypatch, capsys):
    source = tmp_path / "hub" / "main"
    source.mkdir(parents=True)
    meta, refs = mjhq_folder(tmp_path)
    (source / "meta_data.json").write_bytes(meta.read_bytes())
    with zipfile.ZipFile(source / "mjhq30k_imgs.zip", "w") as bundle:
        for path in sorted(refs.rglob("*.jpg")):
            bundle.write(path, f"mjhq30k_imgs/{path.parent.name}/{path.name}")
        bundle.writestr("mjhq30k_imgs/README.txt", "not an image")
    monkeypatch.setattr(benchmarks, "MJHQ_URL", (tmp_path / "hub").as_uri() + "/{ref}/{name}")
    dest = tmp_path / "data"
    assert download("mjhq", dest, progress=False) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["SOURCE.json", "meta_data.json"]
    assert json.loads((dest / "SOURCE.json").read_text())["ref"] == "main"  # no pinned revision
    assert main(["benchmarks", "download", "mjhq", "--images", "--dest", str(dest), "--quiet"]) == 0
    assert "reference images in" in capsys.readouterr().out
    got = sorted(p.relative_to(dest / "mjhq30k_imgs").as_posix() for p in (dest / "mjhq30k_imgs").rglob("*"))
    assert got == sorted(
        [c for c in CATEGORIES] + [p.relative_to(refs).as_posix() for p in refs.rglob("*.jpg")]
    )
    assert not (dest / "mjhq30k_imgs.zip").exists()
    # A forced download killed while deleting the earlier copy leaves a whole one, not a folder of images
    # that lost some (which would pass as complete).
    with monkeypatch.context() as patch:
        patch.setattr(
            shutil, "rmtree", rmtree_dying_after_one_weight_file(shutil.rmtree, KeyboardInterrupt(), "*.jpg")
        )
        with pytest.raises(KeyboardInterrupt):
            download("mjhq", dest, images=True, force=True, progress=False)
    kept = sorted(p.relative_to(dest / "mjhq30k_imgs").as_posix() for p in (dest / "mjhq30k_imgs").rglob("*"))
    assert kept == got
    assert main(["benchmarks", "download", "geneval", "--images", "--quiet"]) == 2
    assert "--images applies to mjhq only" in capsys.readouterr().err
    (source / "meta_data.json").write_text("<html>proxy error</html>")
    with pytest.raises(BenchmarkError, match="is not JSON"):
        download("mjhq", tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / "meta_data.json").exists()
