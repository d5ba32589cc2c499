"""Variants are resolved when the model is built, not on every forward (review J, finding 9): the attention
backend's torch capability check, the text encoder's key norm, the refiner's mask, collaboration and
instruction drop. Checkpoints keep their keys."""

import copy
import inspect
import pickle

import pytest
import torch

from conftest import TINY_ARCH, randomize, tiny_config
from fusedit.layers.attention import backend_context, keep_keys, resolve_backend
from fusedit.system import build_model
from fusedit.text import refiner
from fusedit.text.encoder import _keys, _normed_keys
from test_lidit import lidit


@pytest.mark.parametrize("backend", ["auto", "math"])
def test_a_denoiser_forward_no_longer_inspects_torch(monkeypatch, backend):
    """Whether sdpa_kernel takes a priority order is a property of torch, read at import: a forward does not
    evaluate inspect.signature (it did, through backend_context, on every call)."""
    model = build_model(tiny_config(model={"attention_backend": backend}))
    randomize(model.denoiser)
    text = model.encode_prompts(["a red circle", "two blue squares"])
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    expected = model(x, t, text)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect.signature called during a forward")

    monkeypatch.setattr(inspect, "signature", refuse)
    assert torch.equal(model(x, t, text), expected)


def test_resolved_backend_keeps_backend_contexts_behaviour_and_copies():
    for name in ("auto", "math", "flash", "efficient", "cudnn"):
        with resolve_backend(name)(), backend_context(name):
            pass
    for resolve in (resolve_backend, backend_context):
        with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
            resolve("fast")
    # A model holds the resolved context maker: it still deep-copies (the inference forms copy models) and
    # pickles.
    model = build_model(tiny_config(model={"attention_backend": "math"}))
    pickle.loads(pickle.dumps(model.denoiser.attention_kernels))
    copied = copy.deepcopy(model.denoiser)
    with copied.attention_kernels():
        pass


def test_setting_attention_backend_after_build_switches_the_kernels(monkeypatch):
    """benchmarks/check_fast_paths.py compares a copy set to "auto" with the model set to "math"."""
    from fusedit.layers import attention

    chosen, sdpa_kernel = [], attention.sdpa_kernel

    def recording(backends, **kwargs):
        chosen.append(backends)
        return sdpa_kernel(backends, **kwargs)

    monkeypatch.setattr(attention, "sdpa_kernel", recording)
    model = build_model(tiny_config(model={"attention_backend": "auto"}))
    fast = copy.deepcopy(model.denoiser)
    model.denoiser.attention_backend = "math"
    assert (model.denoiser.attention_backend, fast.attention_backend) == ("math", "auto")
    text = model.encode_prompts(["a red circle"])
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    model.denoiser(x, t, text)
    assert chosen == [attention.SDPBackend.MATH]
    chosen.clear()
    fast(x, t, text)
    assert chosen == (
        [[attention.BACKENDS[b] for b in attention.AUTO_ORDER]] if attention.SDPA_SET_PRIORITY else []
    )


@pytest.mark.parametrize(("family", "keys"), [("gemma", _keys), ("qwen3", _normed_keys)])
def test_text_encoder_reads_each_layers_key_norm_once(family, keys):
    model = build_model(tiny_config(text={"family": family, "arch": TINY_ARCH}))
    assert model.text.layer_keys == (keys,) * TINY_ARCH["num_hidden_layers"]


@pytest.mark.parametrize(
    ("options", "mask", "kept", "collaborative"),
    [
        ({}, keep_keys, refiner.drop_instruction_tokens, refiner.CollaborativeRefiner),
        (
            {"refiner_causal": True, "drop_instruction": False, "collaborative_refiner": False},
            refiner.causal_mask,
            refiner.keep_all_tokens,
            refiner.NoCollaboration,
        ),
    ],
)
def test_refiner_variants_are_chosen_at_build(options, mask, kept, collaborative):
    context = build_model(lidit(**options)).denoiser.context
    assert all(ref.attention_mask is mask for ref in context.linguistic)
    assert context.kept_tokens is kept and type(context.collaborative) is collaborative


def test_refiner_checkpoint_keys_are_unchanged():
    """The null variants (no collaboration, no gates) hold no weights: a checkpoint's keys stay as they
    were before the variants became objects."""
    prompt_refiner = refiner.PromptRefiner(
        [16, 24],
        32,
        4,
        1,
        causal=True,
        gated=False,
        collaborative=False,
        drop_instruction=False,
        concat="tokens",
    )
    block = [
        "attn_norm.weight",
        "attn_norm.bias",
        "attn.q.weight",
        "attn.q.bias",
        "attn.kv.weight",
        "attn.kv.bias",
        "attn.out.weight",
        "attn.out.bias",
        "mlp_norm.weight",
        "mlp_norm.bias",
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
    ]
    expected = [
        key
        for i in range(2)
        for key in (
            f"linguistic.{i}.in_proj.weight",
            f"linguistic.{i}.in_proj.bias",
            *(f"linguistic.{i}.blocks.0.{k}" for k in block),
        )
    ]
    assert list(prompt_refiner.state_dict()) == expected
