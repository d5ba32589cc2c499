"""Regression tests from an audit of the latent cache and model assembly."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, tiny_vae
from fusedit.config import ConfigError, DataConfig, VAEConfig
from fusedit.data.latents import LatentDataset, cache_latents, check_latents
from fusedit.data.loader import planned_dataset
from fusedit.data.skips import SkipCounter
from fusedit.system import builtin_words, resolve_device
from fusedit.text.tokenizer import word_tokenizer


def _captioned_images(root: Path) -> Path:
    """Three 16 px images of different greys, each with a .txt caption."""
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"c{i}")
    return root


def test_a_cache_reports_the_index_rows_the_catalog_refused_like_training_does(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(root / f"img{i}.png")
    index = tmp_path / "index.jsonl"
    rows = [json.dumps({"file": f"img{i}.png", "caption": f"c{i}"}) for i in range(3)]
    index.write_text("\n".join([rows[0], "not json", rows[1], json.dumps({"caption": "no path"}), rows[2]]))
    data = DataConfig(
        source="folder", root=str(root), index_file=str(index), image_size=16, min_image_size=16
    )
    expected = SkipCounter.of(planned_dataset(data, 0, 2)[1])
    assert expected.counts() == {"bad-row": 2}

    out = tmp_path / "cache"
    summary = cache_latents(data, VAEConfig(), out, 2, 2, "cpu", progress=False)
    assert summary["samples"] == 3
    assert summary["skipped"] == expected.counts() and summary["report"] == expected.report()
    assert LatentDataset(out).skipped_report() == expected.report()
    # A rerun over the finished cache reports them again.
    assert cache_latents(data, VAEConfig(), out, 2, 2, "cpu", progress=False)["skipped"] == {"bad-row": 2}


def test_the_builtin_tokenizer_knows_every_word_of_the_configured_instructions():
    """Its pre-tokenizer keeps a run of punctuation together ("...", ")."), so the word list must too."""
    instruction, system = "Draw it (exactly)... ok?!", "You're a painter."
    cfg = tiny_config(text={"template": "lidit", "instruction": instruction, "system_prompt": system})
    tok = word_tokenizer(builtin_words(cfg))
    ids = tok(f"{system} {instruction}", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("name", ["vulkan", "hpu", "xla"])
def test_a_device_type_torch_cannot_place_tensors_on_is_a_config_error(name):
    with pytest.raises(ConfigError) as error:
        resolve_device(name, "--device")
    assert str(error.value).startswith(f"--device {name!r} is not available: ")


def test_a_rerun_is_refused_only_over_settings_its_source_reads(tmp_path):
    """data.kinds or data.num_samples mean nothing to a folder (and data.crop nothing to the shapes world):
    a rerun with them changed continues the cache; one with a setting the source reads is refused."""
    root = _captioned_images(tmp_path / "images")
    folder = {"source": "folder", "root": str(root), "image_size": 16, "min_image_size": 16}
    out = tmp_path / "cache"
    cache_latents(DataConfig(**folder), VAEConfig(), out, 2, 2, "cpu", progress=False)
    unread = DataConfig(**folder, kinds=["single"], max_objects=1, num_samples=5)
    assert cache_latents(unread, VAEConfig(), out, 2, 2, "cpu", progress=False)["samples"] == 3
    with pytest.raises(ConfigError, match="holds latents made with data.crop='center', not 'random'"):
        cache_latents(DataConfig(**folder, crop="random"), VAEConfig(), out, 2, 2, "cpu", progress=False)
    shapes = {"source": "shapes", "image_size": 16, "num_samples": 4}
    cache_latents(DataConfig(**shapes), VAEConfig(), tmp_path / "shapes", 2, 2, "cpu", progress=False)
    again = cache_latents(
        DataConfig(**shapes, crop="random"), VAEConfig(), tmp_path / "shapes", 2, 2, "cpu", progress=False
    )
    assert again["samples"] == 4
    with pytest.raises(ConfigError, match="holds latents made with data.num_samples=4, not 5"):
        cache_latents(
            DataConfig(**{**shapes, "num_samples": 5}),
            VAEConfig(),
            tmp_path / "shapes",
            2,
            2,
            "cpu",
            progress=False,
        )


def test_a_missing_device_names_the_ones_this_machine_has(monkeypatch):
    """On a machine with a GPU, "auto or cpu" would leave out the device a user most likely meant."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "mps"):
        monkeypatch.setattr(torch.mps, "is_available", lambda: False, raising=False)
    with pytest.raises(ConfigError, match=r"\(allowed here: auto, cpu or cuda\)$"):
        resolve_device("vulkan", "--device")


def _hf_table(tmp_path, monkeypatch, rows: int = 5):
    """A parquet table of ``rows`` 16 px images without an id column: its rows are named by number."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    images = []
    for i in range(rows):
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    path = tmp_path / "train.parquet"
    table = {"image": images, "text": [f"c{i}" for i in range(rows)]}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return {"source": "hf", "hf_path": str(path), "caption_fields": ["text"], "image_size": 16}


def test_a_rerun_with_the_other_hf_streaming_setting_is_refused(tmp_path, monkeypatch):
    """The table names its rows "3" and seeds their crops by position, the stream names them "#3" and seeds
    by that name: an interrupted cache resumed with the other setting would hold both kinds of samples."""
    hf = _hf_table(tmp_path, monkeypatch)
    out = tmp_path / "cache"
    cache_latents(DataConfig(**hf), VAEConfig(), out, 2, 2, "cpu", progress=False)
    for name in ("latents-000001", "latents-000002"):  # interrupted after its first shard
        (out / f"{name}.json").unlink()
    with pytest.raises(ConfigError) as error:
        cache_latents(DataConfig(**hf, hf_streaming=True), VAEConfig(), out, 2, 2, "cpu", progress=False)
    assert str(error.value) == (
        f"{str(out)!r} holds latents made with data.hf_streaming=False, not True: use another folder (or "
        "delete this one)"
    )
    # A cache recorded before data.hf_streaming was resumes with the setting as it is.
    meta = json.loads((out / "meta.json").read_text())
    del meta["data"]["hf_streaming"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert cache_latents(DataConfig(**hf), VAEConfig(), out, 2, 2, "cpu", progress=False)["samples"] == 5
    assert set(LatentDataset(out).ids) == {"0", "1", "2", "3", "4"}


def test_a_vae_is_named_by_its_folder_and_subfolder_together(tmp_path):
    """A pipeline folder with vae.subfolder=vae and that subfolder named alone are one VAE; the pipeline
    folder without the subfolder, or another VAE's folder, is not."""
    root = _captioned_images(tmp_path / "images")
    data = DataConfig(source="folder", root=str(root), image_size=16, min_image_size=16)
    tiny_vae().save_pretrained(tmp_path / "pipe" / "vae")

    def vae(place, subfolder=""):
        return VAEConfig("diffusers", str(place), subfolder, latent_channels=4, downsample=2)

    out = tmp_path / "cache"
    cache_latents(data, vae(tmp_path / "pipe", "vae"), out, 2, 2, "cpu", progress=False)
    latents = DataConfig(source="latents", latents_dir=str(out), image_size=16)
    check_latents(latents, vae(tmp_path / "pipe" / "vae"))
    with pytest.raises(ConfigError) as error:
        check_latents(latents, vae(tmp_path / "pipe"))
    assert str(error.value) == (
        f"data.latents_dir={str(out)!r} was encoded with vae.model_id={str(tmp_path / 'pipe')!r} with "
        f"vae.subfolder='vae', but the config has vae.model_id={str(tmp_path / 'pipe')!r}"
    )
    tiny_vae().save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"vae.model_id='.*other' holds other weights of the same config"):
        check_latents(latents, vae(tmp_path / "other"))
    rerun = cache_latents(data, vae(tmp_path / "pipe" / "vae"), out, 2, 2, "cpu", progress=False)
    assert rerun["samples"] == 3


def test_a_rerun_that_cannot_see_the_vae_keeps_its_recorded_identity(tmp_path):
    """A finished cache rerun while its VAE's folder is away (taken as that VAE by its name) must not forget
    the VAE's identity: another VAE put at that name later is refused."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((16, 16, 3), 40, dtype=np.uint8)).save(root / "img.png")
    (root / "img.txt").write_text("c")
    data = DataConfig(source="folder", root=str(root), image_size=16, min_image_size=16)
    cfg = VAEConfig("diffusers", str(tmp_path / "vae"), latent_channels=4, downsample=2)
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "cache"
    cache_latents(data, cfg, out, 2, 2, "cpu", progress=False)
    (tmp_path / "vae").rename(tmp_path / "away")
    assert cache_latents(data, cfg, out, 2, 2, "cpu", progress=False)["samples"] == 1
    tiny_vae().save_pretrained(tmp_path / "vae")
    latents = DataConfig(source="latents", latents_dir=str(out), image_size=16)
    with pytest.raises(ConfigError, match="holds other weights of the same config"):
        check_latents(latents, cfg)
    # Nor when its config.json is seen without its weights (a hub snapshot not downloaded in full).
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_bytes((tmp_path / "away" / "config.json").read_bytes())
    moved = dataclasses.replace(cfg, model_id=str(tmp_path / "config-only"))
    assert cache_latents(data, moved, out, 2, 2, "cpu", progress=False)["samples"] == 1
    with pytest.raises(ConfigError, match="holds other weights of the same config"):
        check_latents(latents, cfg)
    check_latents(latents, dataclasses.replace(cfg, model_id=str(tmp_path / "away")))


def test_settings_given_as_tuples_from_code_compare_equal_to_the_recorded_lists(tmp_path):
    shapes = {"source": "shapes", "image_size": 16, "num_samples": 4}
    out = tmp_path / "cache"
    cache_latents(
        DataConfig(**shapes, kinds=["single", "two"]), VAEConfig(), out, 2, 2, "cpu", progress=False
    )
    again = DataConfig(**shapes, kinds=("single", "two"))
    assert cache_latents(again, VAEConfig(), out, 2, 2, "cpu", progress=False)["samples"] == 4


def test_a_damaged_cache_index_is_named_and_a_rerun_writes_it_anew(tmp_path):
    """A cut index.json is refused naming it (json's bare "Expecting ..." named no file), with the remedy
    that works: cache-latents writes the index last, so a rerun to the end writes it again."""
    root = _captioned_images(tmp_path / "images")
    data = DataConfig(source="folder", root=str(root), image_size=16, min_image_size=16)
    out = tmp_path / "cache"
    cache_latents(data, VAEConfig(), out, 2, 2, "cpu", progress=False)
    shutil.rmtree(out / "index")  # a cache made before the index's columns reads index.json
    index = out / "index.json"
    index.write_text(index.read_text()[:1])
    with pytest.raises(ValueError) as error:
        LatentDataset(out)
    assert str(error.value) == (
        f"{str(index)!r} is not readable JSON (Expecting property name enclosed in double quotes: line 1 "
        f"column 2 (char 1); a damaged copy? copy the cache again, or rerun `fusedit cache-latents CONFIG "
        f"--out {out}`)"
    )
    cache_latents(data, VAEConfig(), out, 2, 2, "cpu", progress=False)
    assert len(LatentDataset(out)) == 3
