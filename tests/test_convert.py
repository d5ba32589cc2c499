"""Importing the public FuseDiT code's checkpoints (fusedit.convert.fusedit_official).

The fixture (tests/fixtures/fusedit-official-tiny, made by the public code with random weights) is the
ground truth for the forward and sampling numerics of its case (APE, adaLN-Zero, Gemma, QK norm, right
padding); the RoPE tables are checked against the public code's assembly of them. Every other option of the
public code is covered by round trips: build a fusedit model, export it to the public layout, re-import it
and check identical weights and outputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, GemmaConfig, PreTrainedTokenizerFast
from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding

from conftest import tiny_config
from fusedit.cli import main
from fusedit.config import ConfigError
from fusedit.convert.fusedit_official import (
    MissingAutoencoder,
    _exportable,
    build,
    export_official,
    load_official,
    official_config,
    read_state_dict,
)
from fusedit.flow import guided, sample
from fusedit.layers.embed import scaled_sincos_2d
from fusedit.layers.norm import RMSNorm
from fusedit.layers.position import ImageOnlyRotary
from fusedit.layers.rope import inv_freq, rotate_half
from fusedit.models.base import position_scheme
from fusedit.pipeline import save_pretrained
from fusedit.sampling.generation import generate
from fusedit.system import build_model
from fusedit.vae import DiffusersAutoencoder

FIXTURE = Path(__file__).parent / "fixtures" / "fusedit-official-tiny"
PUBLIC_CONFIG = json.loads((FIXTURE / "transformer" / "config.json").read_text())


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "reference.safetensors")


@pytest.fixture(scope="module")
def fixture_model():
    # The reference's prompts are right-padded (attention_mask 1 ... 1 0 0 0), so no left-pad emulation.
    return load_official(FIXTURE / "transformer", padding_side="right")


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory) -> str:
    """The fixture tokenizer saved as a tokenizer folder (the fixture LLM's 512 ids)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    fixture_tokenizer().save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def small_words_dir(tmp_path_factory) -> str:
    """The same for the round-trip tests' LLMs of TINY_BASE's 64 ids (a tokenizer of more ids than its LLM
    has embeddings is refused at build)."""
    folder = tmp_path_factory.mktemp("tokenizer64")
    fixture_tokenizer(TINY_BASE["vocab_size"]).save_pretrained(str(folder))
    return str(folder)


def fixture_tokenizer(size: int = 512) -> PreTrainedTokenizerFast:
    """Word "t<i>" -> id i for i < ``size``, no special tokens added: strings that tokenize to the fixture's
    ids. (The special tokens are not words "t<i>": transformers matches them inside words first.) An unknown
    word is the pad id, so that the ids stay within the LLM's ``size`` embeddings."""
    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>", padding_side="right"
    )


def as_words(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [" ".join(f"t{i}" for i in row[m.bool()].tolist()) for row, m in zip(ids, mask)]


class Latents(torch.nn.Module):
    """An autoencoder that hands back latents, so sampled latents can be compared."""

    channels, downsample = 4, 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x


def forward(model, x, t, ids, mask):
    with torch.no_grad():
        text = model.text(ids, mask.bool(), model.denoiser.text_request)
        return model.denoiser(x, t, text)


# ---------------------------------------------------------------------------------------------------------
# Against the public code's own outputs


def test_fixture_config_maps_onto_fusedit(fixture_model):
    cfg, model = fixture_model
    m = cfg.model
    assert (m.design, m.pos_embed, m.timestep_conditioning, m.num_layers, m.initial_layers) == (
        "fusedit",
        "ape",
        "adaln-zero",
        3,
        0,
    )
    assert (m.qk_norm, m.sandwich_norm, m.patch_size, m.dit_hidden_size) == (True, False, 2, 64)
    assert (m.adaln_norm, m.ape_base_size, m.ape_max_size, m.rope_left_pad) == ("rmsnorm", 4, 64, None)
    assert (cfg.text.family, cfg.text.arch["num_key_value_heads"], cfg.vae.latent_channels) == ("gemma", 1, 4)
    assert isinstance(model.autoencoder, MissingAutoencoder)
    with pytest.raises(ConfigError, match="without a VAE"):
        model.autoencoder.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ConfigError, match="without a tokenizer"):
        model.text.tokenize(["a prompt"])


def test_fixture_forward_matches_the_public_code(fixture_model, reference):
    _, model = fixture_model
    r = reference
    # The public model sees sigma * 1000; fusedit's t is sigma.
    out = forward(model, r["hidden_states"], r["timestep"] / 1000, r["input_ids"], r["attention_mask"])
    torch.testing.assert_close(out, r["output"], rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("cache_text", [True, False])
def test_fixture_guided_sampling_matches_the_public_code(words_dir, reference, cache_text):
    _, model = load_official(FIXTURE / "transformer", tokenizer=words_dir)
    r = reference
    model.autoencoder = Latents()
    negative, prompts = "t2", as_words(r["input_ids"], r["attention_mask"])
    # The rows generate() builds, [negative ; prompt], tokenize to the reference's ids.
    ids, mask = model.text.tokenize([negative] * 2 + prompts)
    assert torch.equal(ids[:, :9], torch.cat([r["negative_input_ids"], r["input_ids"]]))
    assert torch.equal(mask[:, :9].long(), torch.cat([r["negative_attention_mask"], r["attention_mask"]]))
    latents = generate(
        model,
        prompts,
        image_size=8,
        steps=4,
        guidance=4.0,
        shift=1.0,
        negative_prompt=negative,
        noise=r["sample_noise"],
        cache_text=cache_text,
    )
    torch.testing.assert_close(latents, r["sample_result"], rtol=1e-5, atol=2e-4)


def test_fixture_sampling_from_token_ids_with_the_flow_functions(fixture_model, reference):
    """The README's protocol spelled out: [negative ; prompt] rows, Euler on linspace(1, 0, 5), CFG 4."""
    _, model = fixture_model
    r, den = reference, fixture_model[1].denoiser
    ids = torch.cat([r["negative_input_ids"], r["input_ids"]])
    mask = torch.cat([r["negative_attention_mask"], r["attention_mask"]]).bool()
    with torch.no_grad():
        text = model.text(ids, mask, den.text_request)
        latents = sample(guided(lambda x, t: den(x, t, text), 4.0), r["sample_noise"], 4, shift=1.0)
    torch.testing.assert_close(latents, r["sample_result"], rtol=1e-5, atol=2e-4)


def test_fixture_ape_table_is_diffusers_bit_for_bit():
    stored = load_file(FIXTURE / "transformer" / "model.safetensors")["dit.patch_embed.pos_embed"][0]
    assert torch.equal(scaled_sincos_2d(64, 64, 64, 4, 64), stored)
    # The 4 x 4 latent grid reads the centre of the 64 x 64 table.
    assert torch.equal(
        scaled_sincos_2d(64, 4, 4, 4, 64), stored.reshape(64, 64, 64)[30:34, 30:34].flatten(0, 1)
    )
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(32, (5, 9), base_size=7, interpolation_scale=1, output_type="pt")
    assert torch.equal(scaled_sincos_2d(32, 5, 9, 7, None), table.float())


def write_pipeline(root: Path, transformer: Path) -> Path:
    """A saved public pipeline around a transformer folder: tokenizer, a tiny VAE, the scheduler."""
    from diffusers import AutoencoderKL

    shutil.copytree(transformer, root / "transformer")
    fixture_tokenizer().save_pretrained(str(root / "tokenizer"))
    vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(str(root / "vae"))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    return root


def raw_checkpoint(folder: Path, name: str, wrap=lambda sd: sd) -> Path:
    """The fixture's weights as a raw training file, with its config.json next to it."""
    folder.mkdir()
    shutil.copy(FIXTURE / "transformer" / "config.json", folder / "config.json")
    sd = wrap(load_file(FIXTURE / "transformer" / "model.safetensors"))
    if name.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard", reason="raw .pt.zst checkpoints need zstandard")
        import io

        buffer = io.BytesIO()
        torch.save(sd, buffer)
        (folder / name).write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
    else:
        torch.save(sd, folder / name)
    return folder / name


@pytest.mark.parametrize(
    "kind", ["pipeline", "model.pt.zst", "ema.pt.zst", "deepspeed", "compiled-ddp", "sharded", "folder"]
)
def test_every_checkpoint_format_loads_the_fixture(tmp_path, fixture_model, reference, kind):
    r = reference
    if kind == "pipeline":
        path = write_pipeline(tmp_path / "pipe", FIXTURE / "transformer")
    elif kind in ("model.pt.zst", "ema.pt.zst"):
        path = raw_checkpoint(tmp_path / "step", kind)
    elif kind == "deepspeed":
        path = raw_checkpoint(tmp_path / "step", "mp_rank_00_model_states.pt", lambda sd: {"module": sd})
    elif kind == "compiled-ddp":  # a state dict saved from a wrapped model: every key prefixed
        path = raw_checkpoint(
            tmp_path / "step", "model.pt", lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()}
        )
    elif kind == "sharded":
        path = tmp_path / "shards"
        path.mkdir()
        shutil.copy(FIXTURE / "transformer" / "config.json", path / "config.json")
        sd = load_file(FIXTURE / "transformer" / "model.safetensors")
        halves = {"a.safetensors": dict(list(sd.items())[::2]), "b.safetensors": dict(list(sd.items())[1::2])}
        for name, part in halves.items():
            save_file(part, path / name)
        weight_map = {k: name for name, part in halves.items() for k in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:  # a raw checkpoint folder: the weights file is found in it
        path = raw_checkpoint(
            tmp_path / "step", "mp_rank_00_model_states.pt", lambda sd: {"module": sd}
        ).parent
    # A pipeline's tokenizer says it pads on the right; the other layouts are told.
    cfg, model = load_official(path) if kind == "pipeline" else load_official(path, padding_side="right")
    assert cfg.model.rope_left_pad is None
    out = forward(model, r["hidden_states"], r["timestep"] / 1000, r["input_ids"], r["attention_mask"])
    assert torch.equal(
        out,
        forward(
            fixture_model[1], r["hidden_states"], r["timestep"] / 1000, r["input_ids"], r["attention_mask"]
        ),
    )
    if kind == "pipeline":
        assert isinstance(model.autoencoder, DiffusersAutoencoder) and model.autoencoder.channels == 4
        assert (cfg.vae.model_id, cfg.vae.subfolder, cfg.vae.downsample) == (str(path), "vae", 2)
        assert (cfg.sample.shift, cfg.sample.schedule, cfg.data.image_size, cfg.text.tokenizer) == (
            3.0,
            "diffusers",  # the public pipeline's sigmas
            16,
            str(path / "tokenizer"),
        )
        ids, mask = model.text.tokenize(["t504 t9"])
        assert ids[0, :3].tolist() == [504, 9, 0] and mask[0, :3].tolist() == [True, True, False]


def test_a_scheduler_spacing_fusedit_does_not_reproduce_is_refused(tmp_path):
    path = write_pipeline(tmp_path / "pipe", FIXTURE / "transformer")
    config = path / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"shift": 3.0, "use_karras_sigmas": False, "shift_terminal": 0.1}))
    with pytest.raises(
        ConfigError, match=r"sets shift_terminal=0.1, a spacing fusedit does not reproduce"
    ) as e:
        load_official(path)
    assert "allowed: a FlowMatchEulerDiscreteScheduler with only shift set" in str(e.value)


def test_config_next_to_the_weights_or_given(tmp_path):
    sd_file = raw_checkpoint(tmp_path / "step", "mp_rank_00_model_states.pt", lambda sd: {"module": sd})
    lone = tmp_path / "lone.pt"
    shutil.move(sd_file, lone)
    with pytest.raises(ConfigError, match="no config.json next to") as e:
        load_official(lone)
    assert "pass --config (config= from Python" in str(e.value)  # the CLI's flag, and the library's
    # the config given where the weights go: said so, not a pickle-safety error about trusting the file
    with pytest.raises(ConfigError, match="config.json' is a JSON file, not checkpoint weights") as e:
        load_official(tmp_path / "step" / "config.json")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    cfg, _ = load_official(lone, config=tmp_path / "step")
    assert cfg.model.num_layers == 3


def test_fusedit_own_pipeline_folder_is_refused_as_needing_no_conversion(tmp_path, capsys):
    # What `fusedit export` writes has no public model_type: said so, not "model_type=None".
    cfg = tiny_config()
    export = save_pretrained(build_model(cfg, "cpu"), cfg, tmp_path / "export")
    capsys.readouterr()  # the export's progress bars
    assert main(["convert", str(export), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is already a fusedit pipeline folder" in err and "\n" not in err and "model_type" not in err
    assert "`fusedit sample` and `fusedit serve` read it directly" in err
    assert not (tmp_path / "out").exists()
    for part in (export / "transformer", export / "transformer" / "diffusion_pytorch_model.safetensors"):
        with pytest.raises(ConfigError, match=r"is part of a fusedit pipeline folder .* read that pipeline"):
            load_official(part)


def test_damaged_weights_an_index_without_weight_map_and_a_config_not_utf8_are_one_line(tmp_path):
    """safetensors' own error, json's on a damaged index, a KeyError on an index without its map and the
    UnicodeDecodeError of a config in another encoding: each names the file and what is allowed (a plain
    ValueError or another exception is a bug's traceback at the CLI)."""
    save_file({"w": torch.zeros(64)}, tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:40]
    )  # cut short
    with pytest.raises(ConfigError) as e:
        read_state_dict(tmp_path / "model.safetensors")
    assert str(e.value) == (
        f"{str(tmp_path / 'model.safetensors')!r} is not a readable safetensors file (Error while deserializing "
        "header: invalid header length; a damaged copy? download it again)"
    )
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with pytest.raises(ConfigError) as e:
        read_state_dict(index)
    assert str(e.value) == (
        f'{str(index)!r} has no weight_map (allowed: a safetensors index: {{"weight_map": {{name: shard file}}}})'
    )
    index.write_text("{cut sho")
    with pytest.raises(ConfigError, match=r"^cannot read .*index.json': Expecting property name"):
        read_state_dict(index)
    (tmp_path / "config.json").write_bytes(b"\x89PNG")
    with pytest.raises(
        ConfigError, match=r"^cannot read .*config.json': 'utf-8' codec can't decode byte 0x89"
    ):
        load_official(tmp_path / "model.safetensors", config=tmp_path / "config.json")


def test_missing_zstandard_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "ema.pt.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ConfigError, match=r"needs the zstandard package: pip install zstandard"):
        read_state_dict(tmp_path / "ema.pt.zst")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"text_modulation_embeds_dim": 768}, "text_modulation_embeds_dim=768 is not supported"),
        ({"pos_embed": "3d-rope"}, "pos_embed='3d-rope' is not supported"),
        ({"attention": "joint"}, "attention='joint'"),
        ({"timestep_conditioning": "film"}, "timestep_conditioning='film'"),
        ({"mystery_knob": 1}, "mystery_knob=1 is not supported"),
        ({"dit_num_hidden_layers": 4}, "dit_num_hidden_layers=4"),
        ({"shared_attention_layers": [0, 1]}, "shared_attention_layers"),
        ({"out_channels": 8}, "out_channels=8"),
        ({"model_type": "UNet"}, "model_type='UNet'"),
        (
            {"base_config": {**PUBLIC_CONFIG["base_config"], "model_type": "llama"}},
            "base_config.model_type='llama'",
        ),
        (
            {"base_config": {**PUBLIC_CONFIG["base_config"], "attention_bias": True}},
            "base_config.attention_bias=True",
        ),
    ],
)
def test_unsupported_public_fields_fail_with_one_line(change, match):
    with pytest.raises(ConfigError, match=match) as e:
        official_config({**PUBLIC_CONFIG, **change})
    assert "\n" not in str(e.value)


def test_dit_baseline_without_an_llm_says_what_to_pass():
    with pytest.raises(ConfigError, match="carries no LLM: pass llm="):
        official_config({**PUBLIC_CONFIG, "model_type": "DiT"})


@pytest.mark.parametrize("pos", ["ape", "1d-rope", "2d-rope", "m-rope"])
def test_padding_side_sets_the_left_pad_emulation_for_joint_deep_fusion(pos):
    """APE included: its image queries are unrotated, but the LLM rotated the text keys at their
    left-padded positions (test_model's test_left_pad_emulation_gives_ape_...)."""
    public = {**PUBLIC_CONFIG, "pos_embed": pos}
    assert official_config(public, max_length=300).model.rope_left_pad == 300
    assert official_config(public, padding_side="right").model.rope_left_pad is None
    assert official_config({**public, "attention": "cross"}).model.rope_left_pad is None


# ---------------------------------------------------------------------------------------------------------
# Round trips: fusedit -> public layout -> fusedit, for every option of the public code

TINY_BASE = {
    "model_type": "gemma",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}
GEMMA2 = {
    "model_type": "gemma2",
    "query_pre_attn_scalar": 8,
    "sliding_window": 64,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
}
TINY_PUBLIC = {
    "model_type": "FuseDiT",
    "attention": "self",
    "base_config": TINY_BASE,
    "dit_hidden_size": 32,
    "dit_num_hidden_layers": 2,
    "in_channels": 4,
    "out_channels": 4,
    "initial_layers": 0,
    "patch_size": 2,
    "pos_embed": "ape",
    "pos_embed_max_size": 16,
    "qk_norm": True,
    "sample_size": 8,
    "sandwich_norm": False,
    "timestep_conditioning": "adaln-zero",
}
CASES = {
    "ape-adaln-zero": ({}, "transformer"),
    "1d-rope": ({"pos_embed": "1d-rope"}, "model.pt.zst"),
    "2d-rope": ({"pos_embed": "2d-rope"}, "deepspeed"),
    "m-rope": ({"pos_embed": "m-rope", "qk_norm": False}, "transformer"),
    "ape-no-max-size": ({"pos_embed_max_size": None, "sample_size": 12}, "transformer"),
    "adaln-single": ({"timestep_conditioning": "adaln-single"}, "transformer"),
    "addition": ({"timestep_conditioning": "addition", "pos_embed": "1d-rope"}, "ema.pt.zst"),
    "no-timestep": ({"timestep_conditioning": None, "pos_embed": "2d-rope"}, "transformer"),
    "gemma2-sandwich": ({"base_config": {**TINY_BASE, **GEMMA2}, "sandwich_norm": True}, "pipeline"),
    "gemma2-large": (
        {
            "base_config": {**TINY_BASE, **GEMMA2},
            "sandwich_norm": True,
            "pos_embed": "2d-rope",
            "timestep_conditioning": None,
        },
        "transformer",
    ),
    "initial-layers-wide-dit": (
        {"base_config": {**TINY_BASE, "num_hidden_layers": 3}, "initial_layers": 1, "dit_hidden_size": 48},
        "transformer",
    ),
    "cross": ({"attention": "cross", "pos_embed": "1d-rope"}, "transformer"),
    "cross-gemma2-sandwich": (
        {"attention": "cross", "base_config": {**TINY_BASE, **GEMMA2}, "sandwich_norm": True},
        "pipeline",
    ),
    "dit-self": ({"model_type": "DiT", "pos_embed": "1d-rope", "dit_num_hidden_layers": 3}, "pipeline"),
    "dit-self-sandwich-single": (
        {
            "model_type": "DiT",
            "sandwich_norm": True,
            "timestep_conditioning": "adaln-single",
            "text_hidden_states_index": -2,
        },
        "pipeline",
    ),
    "dit-cross": ({"model_type": "DiT", "attention": "cross", "pos_embed": "m-rope"}, "pipeline"),
    "dit-cross-gemma2": (
        {
            "model_type": "DiT",
            "attention": "cross",
            "base_config": {**TINY_BASE, **GEMMA2},
            "pos_embed": "2d-rope",
        },
        "pipeline",
    ),
}


def scramble(denoiser: torch.nn.Module) -> None:
    """Random weights everywhere (adaLN-Zero and the output start at zero); RMSNorm weights near 1, as
    trained ones are, so that storing Gemma's w - 1 and reading back 1 + (w - 1) is exact."""
    norms = {id(m.weight) for m in denoiser.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in denoiser.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if id(p) in norms else torch.randn_like(p) * 0.1)


def public_llm(folder: Path, base: dict) -> str:
    """A separate random LLM for the DiT baselines, saved as the public pipeline's llm/."""
    llm = AutoModel.from_config(AutoConfig.for_model(**base))
    with torch.no_grad():
        for p in llm.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    llm.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_the_public_layout(tmp_path, small_words_dir, case):
    change, layout = CASES[case]
    if layout.endswith(".zst"):
        pytest.importorskip("zstandard", reason="raw .pt.zst checkpoints need zstandard")
    public = {**TINY_PUBLIC, **change}
    dit = public["model_type"] == "DiT"
    llm = public_llm(tmp_path / "llm0", public["base_config"]) if dit else ""
    opts = {"max_length": 24, "padding_side": "left"}
    cfg = official_config(public, llm=llm, tokenizer=small_words_dir, **opts)
    model = build(cfg)
    scramble(model.denoiser)
    if cfg.model.design == "dit-self":  # the public self-attention baseline has one k_norm for both
        for block, text_kv in zip(model.denoiser.blocks, model.denoiser.text_kv):
            text_kv.k_norm.load_state_dict(block.img_attn.k_norm.state_dict())
    if not dit:
        with torch.no_grad():
            for p in model.text.llm.parameters():
                p.copy_(torch.randn_like(p) * 0.1)

    path = export_official(cfg, model, tmp_path / "exported", layout=layout)
    # A pipeline carries its tokenizer (and a DiT baseline's LLM); the other layouts are given them.
    extra = {} if layout == "pipeline" else {"tokenizer": small_words_dir, "llm": llm}
    cfg2, model2 = load_official(path, **opts, **extra)

    assert cfg2.model == cfg.model
    if layout == "pipeline":
        assert cfg2.text.tokenizer == str(path / "tokenizer") and cfg2.sample.shift == cfg.sample.shift
    assert cfg2.text.arch == cfg.text.arch and cfg2.text.family == cfg.text.family
    for a, b in ((model.denoiser, model2.denoiser), (model.text.llm, model2.text.llm)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(3, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = mask[1, 1:] = False
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    assert torch.equal(forward(model, x, t, ids, mask), forward(model2, x, t, ids, mask))


def test_export_refuses_what_the_public_code_cannot_express(tmp_path):
    cfg = official_config(TINY_PUBLIC)
    model = build(cfg)
    layernorm = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, adaln_norm="layernorm"))
    with pytest.raises(ConfigError, match="model.adaln_norm='layernorm' has no counterpart"):
        export_official(layernorm, model, tmp_path / "x")
    shallow_joint = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, design="dit-self", pos_embed="1d-rope", rope_layout="joint")
    )
    with pytest.raises(ConfigError, match="model.rope_layout='joint'"):
        export_official(shallow_joint, model, tmp_path / "x")
    # dit-cross never rotates text keys: either layout is its (the load warns that a user's changes nothing).
    for layout in ("joint", "image-only"):
        cross = dataclasses.replace(cfg.model, design="dit-cross", pos_embed="1d-rope", rope_layout=layout)
        _exportable(dataclasses.replace(cfg, model=cross), model)
    with pytest.raises(ConfigError, match="layout='zip'"):
        export_official(cfg, model, tmp_path / "x", layout="zip")


def test_export_reads_the_built_llms_own_type_not_the_stand_in_family(tmp_path, small_words_dir):
    # A preset's text.family (gemma) left beside the user's own Qwen2 folder: the model holds a Qwen2 LLM,
    # which the public code has no counterpart for.
    qwen = tmp_path / "qwen"
    shape = {k: v for k, v in TINY_BASE.items() if k != "model_type"}
    AutoModel.from_config(AutoConfig.for_model("qwen2", **shape)).save_pretrained(qwen)
    cfg = official_config(TINY_PUBLIC)
    text = dataclasses.replace(cfg.text, model_id=str(qwen), tokenizer=str(small_words_dir))
    cfg = dataclasses.replace(cfg, text=text)
    assert cfg.text.family == "gemma"
    with pytest.raises(ConfigError, match=r"^text.model_id's model_type='qwen2' has no counterpart"):
        export_official(cfg, build(cfg), tmp_path / "x")


def test_dit_self_exports_only_a_shared_k_norm(tmp_path, small_words_dir):
    public = {**TINY_PUBLIC, "model_type": "DiT", "pos_embed": "1d-rope"}
    cfg = official_config(public, llm=public_llm(tmp_path / "llm0", TINY_BASE), tokenizer=small_words_dir)
    model = build(cfg)
    with torch.no_grad():
        model.denoiser.text_kv[0].k_norm.weight.add_(0.5)
    with pytest.raises(ConfigError, match="differs from the weight it shares"):
        export_official(cfg, model, tmp_path / "x")


# ---------------------------------------------------------------------------------------------------------
# The RoPE layouts the public numerics need


@pytest.mark.parametrize("pos", ["1d-rope", "2d-rope", "m-rope"])
def test_left_pad_emulation_equals_text_keys_at_the_left_padded_positions(pos):
    """rope_left_pad=P must give what the public code computed for prompts left-padded to P tokens: text
    keys at P - L .. P - 1, image positions after L. Here: the same model with its text keys rotated by
    P - L more positions, and no emulation."""
    public = {**TINY_PUBLIC, "pos_embed": pos, "qk_norm": False}
    cfg = official_config(public, padding_side="right")
    model = build(cfg)
    scramble(model.denoiser)
    ids = torch.randint(3, 64, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    x, t, pad_to = torch.randn(2, 4, 8, 8), torch.rand(2), 20
    with torch.no_grad():
        text = model.text(ids, mask, model.denoiser.text_request)
        plain = model.denoiser(x, t, text)
        angles = (pad_to - text.lengths).float()[:, None] * inv_freq(8, 10000.0)
        angles = torch.cat([angles, angles], -1)[:, None, None]  # (B, 1, 1, head_dim)
        shifted = [(k * angles.cos() + rotate_half(k) * angles.sin(), v) for k, v in text.kv]
        expected = model.denoiser(x, t, dataclasses.replace(text, kv=shifted))
        model.denoiser.position = position_scheme(
            dataclasses.replace(cfg.model, rope_left_pad=pad_to), 8, 10000.0
        )
        emulated = model.denoiser(x, t, text)
    torch.testing.assert_close(emulated, expected, rtol=1e-5, atol=1e-5)
    # ... and the emulation is no no-op: it moves the output far more than the tolerance.
    assert (emulated - plain).abs().max() > 100 * (emulated - expected).abs().max()


def public_rotary(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of transformers' GemmaRotaryEmbedding at ``positions`` (B, S): what the public code builds
    its tables from (``rotary_emb``, and ``rotary_emb_half`` of head_dim / 2 for 2D RoPE)."""
    return GemmaRotaryEmbedding(GemmaConfig(head_dim=head_dim, rope_theta=theta))(torch.zeros(1), positions)


@pytest.mark.parametrize("pos", ["1d-rope", "2d-rope", "m-rope"])
def test_image_rope_tables_equal_the_public_codes_bit_for_bit(pos):
    """The image rows of the public code's joint tables (FuseDiT.prepare_hidden_states, self-attention,
    uncached), assembled here as it assembles them, equal the imported scheme's rotation exactly."""
    head_dim, theta, h, w = 16, 10000.0, 3, 4
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])  # prompts of 7 and 5 tokens, padded to T = 7
    batch, text = mask.shape
    padding = (1 - mask).sum(-1, keepdim=True)
    rows = torch.arange(h).repeat_interleave(w).expand(batch, -1) + text - padding
    cols = torch.arange(w).repeat(h).expand(batch, -1) + text - padding
    if pos == "1d-rope":
        ids = torch.arange(text + h * w).expand(batch, -1).clone()
        ids[:, text:] -= padding
        table = [c[:, text:] for c in public_rotary(head_dim, theta, ids)]
    elif pos == "2d-rope":
        # cat([rearrange(m, "b s n d -> b s (n d)") for m in stack([h_cos, w_cos], dim=2).chunk(2, dim=-1)])
        row, col = public_rotary(head_dim // 2, theta, rows), public_rotary(head_dim // 2, theta, cols)
        table = [
            torch.cat([m.flatten(2) for m in torch.stack([r, c], dim=2).chunk(2, dim=-1)], dim=-1)
            for r, c in zip(row, col)
        ]
    else:
        # cat([m[i % 2] for i, m in enumerate(stack([h_cos, w_cos], dim=0).chunk(4, dim=-1))])
        row, col = public_rotary(head_dim, theta, rows), public_rotary(head_dim, theta, cols)
        table = [
            torch.cat([m[i % 2] for i, m in enumerate(torch.stack([r, c]).chunk(4, dim=-1))], dim=-1)
            for r, c in zip(row, col)
        ]
    cfg = official_config({**PUBLIC_CONFIG, "pos_embed": pos}, padding_side="right")
    ours = position_scheme(cfg.model, head_dim, theta).rotary(h, w, mask.sum(-1))
    assert torch.equal(ours.cos[:, 0], table[0]) and torch.equal(ours.sin[:, 0], table[1])


def test_image_only_layout_rotates_images_from_zero_and_never_text():
    cfg = official_config({**TINY_PUBLIC, "model_type": "DiT", "pos_embed": "2d-rope"}, llm="unused")
    scheme = position_scheme(cfg.model, 8, 10000.0)
    assert isinstance(scheme, ImageOnlyRotary)
    lengths = torch.tensor([3, 7])
    rot, zero = scheme.rotary(4, 4, lengths), scheme.inner.rotary(4, 4, torch.zeros_like(lengths))
    assert torch.equal(rot.cos, zero.cos) and torch.equal(rot.sin, zero.sin)
    k = torch.randn(2, 2, 5, 8)
    assert torch.equal(scheme.text_rotary(torch.arange(5)[None]).apply(k), k)


def test_fusedit_run_and_checkpoint_folders_are_refused_as_needing_no_conversion(tmp_path, capsys):
    """They were searched for the public code's weight files: "no checkpoint weights in ... (looked for
    model.safetensors, ...)", as if the folder were a damaged public checkpoint."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "state.json").write_text('{"step": 1}')
    for folder, what in ((run, "run"), (run / "checkpoints" / "step_00000001", "checkpoint")):
        assert main(["convert", str(folder), "--out", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == (
            f"fusedit: error: {str(folder)!r} is already a fusedit {what} folder (written by `fusedit train`): "
            "nothing to convert, `fusedit sample` and `fusedit serve` read it directly (allowed here: the "
            "public FuseDiT code's transformer or pipeline folder, or a raw training file)\n"
        )
    assert not (tmp_path / "out").exists()
