"""Regression tests from an audit of the latent cache and model assembly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from fusedit.config import ConfigError, DataConfig, VAEConfig
from fusedit.data.latents import LatentDataset, cache_latents
from fusedit.data.loader import SkipCounter, planned_dataset
from fusedit.system import builtin_words, resolve_device
from fusedit.text.tokenizer import word_tokenizer


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
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"c{i}")
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
