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
