"""The FuseDiT study's designs: every preset counted against design-space.md s.1, every design trained
and sampled at debug size."""

import pytest
import torch

from conftest import POSITIONS, TINY_ARCH, randomize, tiny_config
from fusedit.config import ConfigError, load_config, preset_names
from fusedit.sampling.generation import generate
from fusedit.system import build_model, count_parameters
from fusedit.text.spec import LLMSpec
from fusedit.train.loop import train

DESIGNS = ("fusedit", "fusedit-cross", "dit-self", "dit-cross")

# preset -> (trainable DiT, frozen LLM incl. embeddings) in millions, design-space.md s.1
PAPER_COUNTS = {
    "fusedit-gemma2b": (2448.5, 2506.2),
    "fusedit-no-timestep": (1982.2, 2506.2),
    "fusedit-adaln-single": (2012.3, 2506.2),
    "fusedit-cross": (2599.5, 2506.2),
    "fusedit-hidden-1280": (1421.2, None),
    "fusedit-hidden-1536": (1749.1, None),
    "fusedit-hidden-1792": (2091.5, None),
    "fusedit-14-layers": (1907.3, 2286.0),
    "fusedit-10-layers": (1366.2, 2065.8),
    "fusedit-gemma2": (2869.8, 2614.3),
    "fusedit-large": (2024.8, 2614.3),
    "dit-self-gemma2b": (2471.6, 2506.2),
    "dit-cross-gemma2b": (2622.6, 2506.2),
}


@pytest.mark.parametrize("preset", sorted(PAPER_COUNTS))
def test_preset_parameter_counts_match_the_paper(preset):
    model = build_model(load_config(preset), "meta")
    dit, llm = PAPER_COUNTS[preset]
    # to the 0.1M the paper gives: the public code's affine RMSNorm in adaLN is 0.08M of the baseline
    assert round(count_parameters(model.denoiser) / 1e6, 1) == dit
    if llm is not None:
        assert round(count_parameters(model.text.llm) / 1e6, 1) == llm


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_loads_and_builds_on_meta(preset):
    cfg = load_config(preset)
    model = build_model(cfg, "meta")
    assert len(model.denoiser.blocks) >= 1


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("pos", POSITIONS)
def test_designs_forward_backward_and_cached_sampling(design, pos):
    cfg = tiny_config(model={"design": design, "pos_embed": pos})
    model = build_model(cfg)
    randomize(model.denoiser)
    text = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle", ""])
    v = model(torch.randn(3, 3, 16, 16), torch.rand(3), text)
    v.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())
    assert all(p.grad is None for p in model.text.llm.parameters())
    kw = dict(image_size=16, steps=3, guidance=3.0, seed=1)
    prompts = ["a red circle", "two green triangles"]
    torch.testing.assert_close(
        generate(model, prompts, cache_text=True, **kw), generate(model, prompts, cache_text=False, **kw)
    )


def test_shallow_designs_read_the_chosen_hidden_state():
    cfg = tiny_config(
        model={"design": "dit-self"}, text={"hidden_layer": -3, "arch": {"num_hidden_layers": 4}}
    )
    model = build_model(cfg)
    assert model.denoiser.text_request.hidden_layer == 2  # -3 of 5 hidden states: the output of block 2
    assert len(model.text.llm.layers) == 3  # one layer past it, so it is not the final-normed last entry
    text = model.encode_prompts(["a red circle"])
    ids, mask = model.text.tokenize(["a red circle"])
    T = int(mask.sum())
    from transformers import AutoModel

    full = AutoModel.from_config(
        model.text.llm.config.__class__(
            **{**model.text.llm.config.to_dict(), "num_hidden_layers": 4, "layer_types": None}
        )
    )
    full.load_state_dict(model.text.llm.state_dict(), strict=False)
    with torch.no_grad():
        ref = full.eval()(input_ids=ids[:, :T], output_hidden_states=True).hidden_states[-3]
    torch.testing.assert_close(text.hidden, ref)
    last = build_model(tiny_config(model={"design": "dit-cross"}))
    assert len(last.text.llm.layers) == 3  # the last (final-normed) hidden state needs the whole LLM
    with pytest.raises(ConfigError, match=r"text.hidden_layer=7 is out of range .* \(allowed: -4..3\)"):
        build_model(tiny_config(model={"design": "dit-self"}, text={"hidden_layer": 7}))


@pytest.mark.parametrize("design", DESIGNS[1:])
def test_designs_train_a_few_steps(tmp_path, design):
    cfg = tiny_config(model={"design": design}, train={"steps": 4, "checkpoint_every": 4})
    losses = train(cfg, tmp_path / design, progress=False)["losses"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("design", DESIGNS)
def test_flop_formula_matches_a_counted_forward(design):
    """The analytic count equals torch's FlopCounterMode over a real forward (matmuls + attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusedit.layers.attention import backend_context
    from fusedit.models.flops import denoiser_flops, llm_flops

    # The math backend spells attention as matmuls, which the counter sees on every device.
    cfg = tiny_config(model={"design": design, "attention_backend": "math"}, text={"trim_padding": False})
    model = build_model(cfg)
    text = model.encode_prompts(["a red circle"])
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, text)
    assert denoiser_flops(model.denoiser, 64, 16) == counter.get_total_flops()
    ids, mask = model.text.tokenize(["a red circle"])
    with FlopCounterMode(display=False) as counter, backend_context("math"):
        model.text.llm(input_ids=ids, attention_mask=mask.long())
    assert llm_flops(model.text.llm, 16) == counter.get_total_flops()


def test_paper_training_flops_per_image():
    """design-space.md s.3: about 13.8 TFLOP per 512 px training image, 4.25 per DiT forward, ~4.1 at 256."""
    from fusedit.models.flops import denoiser_flops, llm_flops

    model = build_model(load_config("fusedit-gemma2b"), "meta")
    dit512, dit256 = denoiser_flops(model.denoiser, 1024, 256), denoiser_flops(model.denoiser, 256, 256)
    lm = llm_flops(model.text.llm, 256)
    assert abs(dit512 / 1e12 - 4.25) < 0.05
    assert abs((3 * dit512 + lm) / 1e12 - 13.8) < 0.2
    assert abs((3 * dit256 + lm) / 1e12 - 4.1) < 0.1


@pytest.mark.parametrize("preset", [p for p in preset_names() if p.startswith("debug")])
def test_every_debug_twin_trains_and_samples_on_cpu(tmp_path, preset):
    """The CPU-size twin of each design family trains a couple of steps and samples (cached = uncached)."""
    cfg = load_config(preset, ["train.steps=2", "train.batch_size=4", "train.checkpoint_every=2"])
    model = train(cfg, tmp_path / preset, progress=False)["model"].eval()
    kw = dict(image_size=cfg.data.image_size, steps=2, guidance=3.0, seed=0)
    images = generate(model, ["a red circle", "a blue square to the left of a green triangle"], **kw)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    torch.testing.assert_close(
        images,
        generate(
            model, ["a red circle", "a blue square to the left of a green triangle"], cache_text=False, **kw
        ),
    )


LLAMA3_SCALED = {
    "family": "llama",
    "arch": {
        **TINY_ARCH,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
}


@pytest.mark.parametrize("text", [{}, LLAMA3_SCALED], ids=["default-rope", "llama3-rope"])
def test_image_rotations_continue_the_llms_own_text_rotations(text):
    """Deep fusion puts image queries next to text keys the LLM rotated itself: image token n of a prompt of
    L tokens must rotate exactly as the LLM would rotate position L + n (1D RoPE), and M-RoPE's 1 x 1 image
    at offset p as the LLM's position p, whatever the LLM's RoPE type (Llama-3.1's rescaled ladder here)."""
    model = build_model(tiny_config(model={"pos_embed": "1d-rope"}, text=text))
    llm = model.text.llm
    lengths = torch.tensor([3, 5])
    positions = torch.arange(12)[None]
    cos, sin = llm.rotary_emb(torch.zeros(1, 12, 8), positions)  # (1, 12, head_dim)
    rot = model.denoiser.position.rotary(2, 2, lengths)  # (B, 1, 4, head_dim)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(rot.cos[b, 0], cos[0, n : n + 4])
        torch.testing.assert_close(rot.sin[b, 0], sin[0, n : n + 4])
    mrope = build_model(tiny_config(model={"pos_embed": "m-rope"}, text=text)).denoiser.position
    for p in range(6):
        torch.testing.assert_close(mrope.rotary(1, 1, torch.tensor([p])).cos[0, 0, 0], cos[0, p])
    if text:  # the rescaled ladder differs from the default one, so this case tests something
        default = build_model(tiny_config(model={"pos_embed": "1d-rope"})).text.llm.rotary_emb
        assert not torch.allclose(default(torch.zeros(1, 12, 8), positions)[0], cos)


@pytest.mark.parametrize("design", ["dit-self", "dit-cross"])
def test_shallow_designs_of_their_own_head_width_take_their_own_rope_ladder(design):
    """A shallow DiT rotates its text keys and image queries itself: with the LLM's head width it keeps the
    LLM's rescaled ladder; with its own (model.num_heads) the LLM's ladder has the wrong length, so it takes
    rope_theta's default ladder of its own width."""
    same = build_model(tiny_config(model={"design": design, "pos_embed": "1d-rope"}, text=LLAMA3_SCALED))
    ladder = LLMSpec.from_hf(same.text.llm.config).rope_freqs
    assert ladder is not None and same.denoiser.position.ladder == ladder
    model = build_model(
        tiny_config(model={"design": design, "pos_embed": "m-rope", "num_heads": 2}, text=LLAMA3_SCALED)
    )
    assert model.denoiser.position.ladder is None and model.denoiser.position.head_dim == 16
    x = model(torch.randn(2, 3, 16, 16), torch.rand(2), model.encode_prompts(["a red circle", "two squares"]))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


def _saved_llm(folder, family: str, **extra) -> dict:
    """A tiny random-init LLM of ``family`` with the built-in words as its tokenizer: a text section."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fusedit.data.shapes import vocabulary
    from fusedit.text.tokenizer import word_tokenizer

    config = AutoConfig.for_model(
        family, **TINY_ARCH, pad_token_id=0, bos_token_id=2, eos_token_id=1, **extra
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    word_tokenizer(vocabulary()).save_pretrained(folder)
    return {"model_id": str(folder)}


def test_an_llm_with_a_rope_per_layer_type_is_refused_by_deep_fusion_only(tmp_path):
    """Gemma-3 rotates its local and global layers' keys differently: deep fusion's image queries cannot
    mirror that, but the shallow designs read hidden states only, and take the global layers' RoPE for
    their own positions."""
    from transformers import AutoConfig

    gemma3 = AutoConfig.for_model("gemma3_text")
    with pytest.raises(ConfigError) as e:
        LLMSpec.from_hf(gemma3)
    assert str(e.value).startswith(
        "an LLM of model_type 'gemma3_text' is not supported by deep fusion: its layers rotate keys with a "
        "RoPE per layer type, which the DiT's image queries cannot mirror (the shallow designs read only its "
        "hidden states) (allowed: "
    )
    assert (
        LLMSpec.from_hf(gemma3, deep=False).rope_theta
        == gemma3.rope_parameters["full_attention"]["rope_theta"]
    )
    text = _saved_llm(tmp_path / "gemma3", "gemma3_text")
    with pytest.raises(ConfigError, match="not supported by deep fusion"):
        build_model(tiny_config(text=text), with_autoencoder=False)
    for design in ("dit-cross", "dit-self"):
        model = build_model(tiny_config(text=text, model={"design": design}), with_autoencoder=False)
        x = model(torch.randn(1, 3, 16, 16), torch.rand(1), model.encode_prompts(["a red circle"]))
        assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
    # The public code has no Gemma-3: an export says that, not the deep-fusion refusal.
    from fusedit.convert.fusedit_official import export_official

    shallow = tiny_config(text=text, model={"design": "dit-cross"})
    with pytest.raises(ConfigError) as e:
        export_official(
            shallow, build_model(shallow, with_autoencoder=False), tmp_path / "x", layout="transformer"
        )
    assert "deep fusion" not in str(e.value) and "has no counterpart in the public FuseDiT code" in str(
        e.value
    )
    # Gemma-3 4B/12B/27B scale their global layers' RoPE (linear, factor 8): read per layer type.
    scaled = {"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1e6}
    text = _saved_llm(tmp_path / "gemma3-scaled", "gemma3_text", **scaled)
    model = build_model(tiny_config(text=text, model={"design": "dit-cross"}), with_autoencoder=False)
    spec = LLMSpec.from_hf(model.text.llm.config, deep=False)
    assert spec.rope_freqs is not None and spec.rope_freqs[0] == pytest.approx(1 / 8)


def test_llms_the_text_stream_cannot_read_are_refused_in_one_line(tmp_path):
    """GPT-2's config is not LLaMA-style; Phi-3's is, but its attention fuses q/k/v into one projection, so
    its K/V cannot be read per layer: both are one-line errors naming the model type, before any training."""
    from transformers import AutoConfig, AutoModel

    from fusedit.config import TextConfig
    from fusedit.text.llm import load_llm

    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported: its config has no "):
        LLMSpec.from_hf(AutoConfig.for_model("gpt2"))
    arch = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = AutoConfig.for_model(
        "phi3", **arch, num_attention_heads=2, num_key_value_heads=1, pad_token_id=0
    )
    config.eos_token_id = config.bos_token_id = 1
    AutoModel.from_config(config).save_pretrained(tmp_path / "phi3")
    with pytest.raises(ConfigError) as e:
        load_llm(TextConfig(model_id=str(tmp_path / "phi3")), 1)
    assert (
        "model_type 'phi3' is not supported by deep fusion: its layers have no separate q/k/v projections to "
        "read K/V from (the shallow designs read only its hidden states)" in str(e.value)
    )
    assert "Gemma, Gemma-2, Qwen2/2.5/3, Llama, Mistral" in str(e.value) and "\n" not in str(e.value)
    # The shallow designs read its hidden states only.
    text = _saved_llm(tmp_path / "phi3-causal", "phi3")
    model = build_model(tiny_config(text=text, model={"design": "dit-cross"}), with_autoencoder=False)
    assert model.encode_prompts(["a red circle"]).hidden.shape[-1] == TINY_ARCH["hidden_size"]


@pytest.mark.parametrize(
    ("family", "says"),
    [
        ("phi3", "its layers have no separate q/k/v projections"),
        ("gemma3_text", "its layers rotate keys with a RoPE per layer type"),
    ],
)
def test_deep_fusion_over_an_llm_it_cannot_read_is_refused_before_the_run_folder(tmp_path, family, says):
    """The family's refusal comes from its config alone (one layer built on the meta device for its
    projections), before the run folder is made and locked: a refused run left an empty folder behind. The
    shallow designs read hidden states only: they train over it."""
    text = _saved_llm(tmp_path / family, family)
    with pytest.raises(ConfigError, match=f"model_type {family!r} is not supported by deep fusion: {says}"):
        train(tiny_config(text=text, train={"steps": 1}), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    shallow = tiny_config(text=text, model={"design": "dit-self"}, train={"steps": 1})
    assert train(shallow, tmp_path / "shallow")["step"] == 1


@pytest.mark.parametrize(("concat", "llms"), [("tokens", 2), ("channels", 2), ("tokens", 3)])
def test_flop_formula_matches_a_counted_forward_with_several_llms_and_the_refiners(concat, llms):
    """LI-DiT with two or three LLMs of other widths: each refiner counts its own LLM's tokens, the
    collaborative refiner's keys and values the others', and the DiT what the concatenation leaves it (the
    sum, or the widest LLM). Three LLMs tell "the others" apart from "the other"."""
    from torch.utils.flop_counter import FlopCounterMode

    from fusedit.models.flops import denoiser_flops

    second = {**TINY_ARCH, "hidden_size": 48, "head_dim": 12, "num_hidden_layers": 4}
    cfg = tiny_config(
        model={
            "design": "dit-cross",
            "attention_backend": "math",
            "refiner_depth": 2,
            "refiner_heads": 4,
            "refiner_concat": concat,
        },
        text={"trim_padding": False, "template": "lidit", "max_length": 12},
        extra_text=[
            {"family": "qwen2", "arch": second, "max_length": 20 + 7 * i, "trim_padding": False}
            for i in range(llms - 1)
        ],
    )
    model = build_model(cfg)
    text = model.encode_prompts(["a red circle"])
    widths = [t.mask.shape[1] for t in text.all]
    assert len(set(widths)) == llms and widths == [enc.max_length for enc in model.encoders]
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    with FlopCounterMode(display=False) as counter:
        model(x, t, text)
    assert denoiser_flops(model.denoiser, 64, widths) == counter.get_total_flops()


def test_designs_of_one_seed_hold_the_same_random_llm_whatever_their_dit():
    """The random-init LLM was drawn from the global generator after the denoiser's init, so every design
    whose DiT drew another number of values got another text encoder: a study compared each design over
    another LLM. It is now a function of train.seed and its section alone. Nor does it depend on how many
    of its layers a design reads (a shallower fusion, LI-DiT's hidden_layer -3): it is drawn at its own depth
    and cut, where a cut config drew the embeddings and the layers kept in another order."""
    designs = [
        ("debug", []),
        ("debug-dit-self", []),
        ("debug-dit-cross", []),
        ("debug-fusedit-cross", []),
        ("debug-clip-mod", []),
        ("debug", ["model.num_layers=4"]),
        ("debug-dit-self", ["text.hidden_layer=-3"]),
    ]
    llms = []
    for name, overrides in designs:
        torch.manual_seed(0)
        model = build_model(load_config(name, overrides), with_autoencoder=False)
        llms.append(model.encoders[0].llm.state_dict())
    first = llms[0]
    assert all(len(llm) < len(first) for llm in llms[-2:])  # the LLMs cut after fewer layers
    for design, llm in zip(designs[1:], llms[1:], strict=True):
        shared = [k for k in first if k in llm]  # a design reading fewer layers builds fewer of them
        assert len(shared) > len(first) / 2 and all(torch.equal(first[k], llm[k]) for k in shared), design
    other = build_model(load_config("debug", ["train.seed=1"]), with_autoencoder=False).encoders[0].llm
    assert not torch.equal(other.state_dict()["embed_tokens.weight"], first["embed_tokens.weight"])


@pytest.mark.parametrize("design", ["dit-self", "dit-cross"])
def test_a_shallow_design_attends_without_a_mask_when_no_prompt_is_padded(design, monkeypatch):
    """Deep fusion passed no mask to attention for an unpadded batch, the shallow baselines an all-True one,
    which rules out the flash and cuDNN kernels that take none. Now neither does; the output is unchanged."""
    import dataclasses

    import fusedit.models.blocks as blocks

    model = build_model(tiny_config(model={"design": design}))
    randomize(model.denoiser)
    ids = torch.randint(3, 64, (2, 6))
    text = model.text(ids, torch.ones(2, 6, dtype=torch.bool), model.denoiser.text_requests[0])
    assert not text.padded
    masks, real = [], blocks.attention
    monkeypatch.setattr(
        blocks, "attention", lambda q, k, v, mask=None: masks.append(mask) or real(q, k, v, mask)
    )
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.no_grad():
        plain = model.denoiser(x, t, text)
        unmasked = masks[:]
        masks.clear()
        masked = model.denoiser(x, t, dataclasses.replace(text, padded=True))
    assert unmasked and all(m is None for m in unmasked)
    assert any(m is not None for m in masks)
    torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-5)
