import dataclasses
import itertools

import pytest
import torch

from conftest import FAMILIES, randomize, tiny_config
from fusedit.config import ConfigError, load_config
from fusedit.sampling.generation import generate
from fusedit.system import build_model, count_parameters

POSITIONS = ("ape", "1d-rope", "2d-rope", "m-rope")
TIMESTEPS = ("adaln-zero", "adaln-single", "addition", "none")
PROMPTS = ["a red circle", "a blue square to the left of a green triangle", ""]


@pytest.mark.parametrize(
    "pos, time, qk_norm, sandwich",
    [
        (p, t, q, s)
        for p, t in itertools.product(POSITIONS, TIMESTEPS)
        for q, s in ((True, False), (False, True))
    ],
)
def test_every_knob_combination_runs_forward_and_backward(pos, time, qk_norm, sandwich):
    cfg = tiny_config(
        model={"pos_embed": pos, "timestep_conditioning": time, "qk_norm": qk_norm, "sandwich_norm": sandwich}
    )
    model = build_model(cfg)
    randomize(model.denoiser)
    text = model.encode_prompts(PROMPTS)
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    v = model(x, t, text)
    assert v.shape == x.shape and torch.isfinite(v).all()
    v.pow(2).mean().backward()
    grads = [p.grad for p in model.denoiser.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.text.llm.parameters())
    # the timestep reaches the output exactly when the variant has a timestep input
    with torch.no_grad():
        v2 = model(x, 1 - t, text)
    assert torch.equal(v.detach(), v2) == (time == "none")


@pytest.mark.parametrize("family", FAMILIES)
def test_families_build_and_dit_mirrors_the_llm(family):
    cfg = tiny_config(text={"family": family}, model={"dit_hidden_size": 48})
    model = build_model(cfg)
    attn = model.denoiser.blocks[0].img_attn
    llm_cfg = model.text.llm.config
    assert attn.q_proj.out_features == llm_cfg.num_attention_heads * llm_cfg.head_dim
    assert attn.k_proj.out_features == llm_cfg.num_key_value_heads * llm_cfg.head_dim
    assert attn.q_proj.in_features == 48
    assert model.denoiser.blocks[0].img_mlp.gate_proj.out_features == llm_cfg.intermediate_size
    randomize(model.denoiser)
    v = model(torch.randn(3, 3, 8, 8), torch.rand(3), model.encode_prompts(PROMPTS))
    assert v.shape == (3, 3, 8, 8)


@pytest.mark.parametrize("pos, left_pad", [(pos, None) for pos in POSITIONS] + [("ape", 16), ("2d-rope", 16)])
def test_cached_sampling_equals_uncached(pos, left_pad):
    cfg = tiny_config(model={"pos_embed": pos, "rope_left_pad": left_pad})
    model = build_model(cfg)
    randomize(model.denoiser)
    prompts = ["a red circle", "a blue square to the left of a green triangle"]  # different lengths: padding
    kw = dict(image_size=8, steps=4, guidance=4.0, negative_prompt="a yellow circle", seed=3)
    cached = generate(model, prompts, cache_text=True, **kw)
    uncached = generate(model, prompts, cache_text=False, **kw)
    torch.testing.assert_close(cached, uncached, atol=1e-6, rtol=1e-6)
    assert cached.std() > 0.1


@pytest.mark.parametrize("ape", [{}, {"ape_base_size": 4, "ape_max_size": 8}], ids=["ape", "diffusers-ape"])
def test_left_pad_emulation_gives_ape_the_public_codes_left_padded_text_keys(ape):
    """The public FuseDiT code (tang-bd/fuse-dit) ran APE deep fusion on prompts Gemma's tokenizer padded
    on the left to P tokens: its LLM rotated the text keys at their padded positions P - L .. P - 1, and its
    APE image queries were not rotated, so image -> text scores were q . R(P - L + j) k. The reference here
    is exactly that computation: the model without emulation fed the prompts left-padded to P (the LLM at
    positions 0 .. P - 1, the pads masked). With rope_left_pad=P the same weights on right-padded prompts,
    as fusedit tokenizes them, must give its output."""
    pad_to, lengths = 12, torch.tensor([5, 9])
    cfg = tiny_config(model={"pos_embed": "ape", **ape}, text={"trim_padding": False, "max_length": pad_to})
    public = build_model(cfg).eval()
    randomize(public.denoiser, std=0.2)
    left_pad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_left_pad=pad_to))
    emulated = build_model(left_pad).eval()
    emulated.load_state_dict(public.state_dict())
    tokens = torch.randint(3, 64, (2, pad_to))
    right = torch.arange(pad_to)[None] < lengths[:, None]
    left = right.flip(1)
    ids_right, ids_left = torch.zeros_like(tokens), torch.zeros_like(tokens)
    ids_right[right], ids_left[left] = tokens[right], tokens[right]
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.no_grad():
        expected = public.denoiser(x, t, public.text(ids_left, left, public.denoiser.text_request))
        plain = public.denoiser(x, t, public.text(ids_right, right, public.denoiser.text_request))
        out = emulated.denoiser(x, t, emulated.text(ids_right, right, emulated.denoiser.text_request))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # ... and the padding matters: without the emulation the output is far outside that tolerance.
    assert (plain - expected).abs().max() > 1000 * (out - expected).abs().max()


@pytest.mark.parametrize("ape", [{}, {"ape_base_size": 4, "ape_max_size": 8}], ids=["ape", "diffusers-ape"])
def test_the_left_pad_emulation_of_ape_turns_by_the_llms_own_frequency_ladder(ape):
    """A rescaled-RoPE LLM (Llama-3's ladder) rotates its text keys by its own frequencies: the emulation's
    angles must be those, for diffusers' scaled APE too (it dropped the ladder for the default one)."""
    from fusedit.models.base import position_scheme

    cfg = tiny_config(model={"pos_embed": "ape", "rope_left_pad": 12, **ape}).model
    ladder = tuple(float(f) for f in torch.linspace(1.0, 0.01, 4))
    scheme = position_scheme(cfg, 8, 10000.0, ladder)
    assert torch.equal(scheme.freqs(torch.device("cpu")), torch.tensor(ladder))


def test_rope_left_pad_takes_ape_in_joint_deep_fusion_only():
    assert load_config("debug", ["model.rope_left_pad=16"]).model.rope_left_pad == 16  # debug: fusedit, APE
    needs = (
        "model.rope_left_pad=16 reproduces the public code's joint text-image rotations: it needs "
        "model.design='fusedit' with pos_embed ape or a RoPE scheme and rope_layout='joint'"
    )
    for overrides, got in (
        (["model.design=fusedit-cross"], "design='fusedit-cross', pos_embed='ape'"),
        (["model.design=dit-self"], "design='dit-self', pos_embed='ape'"),
        (["model.design=dit-cross"], "design='dit-cross', pos_embed='ape'"),
        (["model.pos_embed=none", "model.conv_pos=true"], "design='fusedit', pos_embed='none'"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config("debug", [*overrides, "model.rope_left_pad=16"])
        assert f"{needs} (got {got}, rope_layout='joint')" in str(e.value)


def test_llm_runs_once_per_prompt_batch_when_cached():
    model = build_model(tiny_config())
    calls = []
    model.text.llm.register_forward_hook(lambda *a: calls.append(1))
    generate(model, ["a red circle", "a blue square"], image_size=8, steps=5, guidance=3.0, cache_text=True)
    assert len(calls) == 1  # negative and positive prompts in one batch, reused by all 5 steps
    generate(model, ["a red circle"], image_size=8, steps=5, guidance=3.0, cache_text=False)
    assert len(calls) == 1 + 5


@pytest.mark.parametrize("design", ["fusedit", "fusedit-cross", "dit-self", "dit-cross"])
@pytest.mark.parametrize("pos", POSITIONS)
def test_padding_and_batch_composition_do_not_change_a_prompt(pos, design):
    """A prompt's velocity is the same alone (no padding) or next to a longer prompt (padded keys masked,
    image positions offset by the unpadded length), with or without trimming the padding, and trimmed to
    a multiple of a few tokens (what compiled blocks use)."""
    outs = []
    for trim, multiple, max_len in ((True, None, 16), (False, None, 16), (False, None, 24), (True, 6, 16)):
        cfg = tiny_config(
            model={"pos_embed": pos, "design": design},
            text={"trim_padding": trim, "trim_multiple": multiple, "max_length": max_len},
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        torch.manual_seed(1)
        randomize(model.denoiser)
        x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
        alone = model(x, t, model.encode_prompts(["a red circle"]))
        batch = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
        together = model(torch.cat([x, x]), torch.cat([t, t]), batch)[:1]
        torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
        outs.append(alone)
    for out in outs[1:]:
        torch.testing.assert_close(outs[0], out, atol=1e-5, rtol=1e-5)


def _cache_kv(cache, i):
    """Keys/values of layer i from an HF cache (transformers 4.x and 5.x layouts)."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_stream_reproduces_the_plain_transformers_model(family):
    """The fused model's text path is the LLM's own forward: its hidden states and each fused layer's
    post-RoPE K/V equal those of the unmodified transformers model (read from its KV cache)."""
    from transformers import AutoModel

    cfg = tiny_config(
        text={"family": family, "arch": {"num_hidden_layers": 4}},
        model={"num_layers": 2, "initial_layers": 1},
    )
    model = build_model(cfg)
    assert len(model.text.llm.layers) == 3  # truncated after the deepest fused layer (index 2)
    full = AutoModel.from_config(
        model.text.llm.config.__class__(
            **{**model.text.llm.config.to_dict(), "num_hidden_layers": 4, "layer_types": None}
        )
    )
    missing, _ = full.load_state_dict(model.text.llm.state_dict(), strict=False)
    assert all(".3." in k for k in missing)  # only the unused fourth layer differs
    full.eval()

    prompts = ["a red circle", "two blue squares"]
    ids, mask = model.text.tokenize(prompts)
    T = int(mask.sum(1).max())
    ids, mask = ids[:, :T], mask[:, :T]
    with torch.no_grad():
        ref = full(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True, use_cache=True)
        ours = model.text.llm(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    for i in range(3):  # inputs of layers 0..2 agree layer by layer
        torch.testing.assert_close(ours.hidden_states[i], ref.hidden_states[i])
    context = model.encode_prompts(prompts)
    assert [k.shape for k, _ in context.kv] == [(2, 2, T, 8)] * 2
    for (k, v), layer in zip(context.kv, model.denoiser.llm_layers):
        rk, rv = _cache_kv(ref.past_key_values, layer)
        torch.testing.assert_close(k, rk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, rv, atol=1e-5, rtol=1e-5)


def test_no_gradient_reaches_the_frozen_llm_and_nothing_is_kept_for_backward():
    model = build_model(tiny_config())
    randomize(model.denoiser)
    text = model.encode_prompts(PROMPTS)
    assert all(not k.requires_grad and k.grad_fn is None for k, _ in text.kv)  # no graph through the LLM
    loss = model(torch.randn(3, 3, 8, 8), torch.rand(3), text).pow(2).mean()
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.text.llm.parameters())
    assert all(p.grad is not None for p in model.denoiser.parameters())


def test_unsupported_fusion_layout_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=r"model.initial_layers=1 \+ model.num_layers=3 needs 4 LLM layers but the LLM has 3",
    ):
        build_model(tiny_config(model={"initial_layers": 1, "num_layers": 3}))
    # num_layers unset = every LLM layer after the initial ones: none left is said so, not "needs 3 ... has 3".
    with pytest.raises(
        ConfigError, match=r"model.initial_layers=3 leaves no LLM layer for the DiT: the LLM has 3"
    ):
        build_model(tiny_config(model={"initial_layers": 3, "num_layers": None}))


def test_paper_baseline_parameter_count_on_meta():
    """design-space.md s.1: FuseDiT baseline on Gemma-2B: 2448.5M trainable / 2506.2M frozen."""
    model = build_model(load_config("fusedit-gemma2b"), "meta")
    assert abs(count_parameters(model.denoiser) / 1e6 - 2448.5) / 2448.5 < 0.01
    assert abs(count_parameters(model.text.llm) / 1e6 - 2506.2) / 2506.2 < 0.01
    assert count_parameters(model.denoiser, trainable=True) == count_parameters(model.denoiser)


def test_adaln_zero_starts_as_identity_blocks():
    """adaLN-Zero (DiT): every block and the output start at zero, so the initial velocity is zero."""
    model = build_model(tiny_config())
    v = model(torch.randn(2, 3, 8, 8), torch.rand(2), model.encode_prompts(PROMPTS[:2]))
    assert torch.count_nonzero(v) == 0
