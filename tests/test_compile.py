"""Compiled DiT blocks (train.compile, sample.compile) see few shapes: text lengths are trimmed to a
multiple (text.trim_multiple) and torch's recompile limit covers them, so no batch falls back to eager."""

import pytest
import torch
import torch._dynamo

from conftest import POSITIONS, TINY_ARCH, counting_backend, randomize, tiny_config
from fusedit.compiling import compile_settings
from fusedit.config import ConfigError, load_config
from fusedit.sampling.generation import generate, to_sampling_form
from fusedit.system import RECOMPILE_SLACK, build_model
from fusedit.text import encoder
from fusedit.text.encoder import CUDA_TRIM_MULTIPLE

WORDS = [
    "a",
    "red",
    "circle",
    "left",
    "of",
    "a",
    "blue",
    "square",
    "above",
    "two",
    "small",
    "green",
    "triangles",
]


@pytest.fixture
def fresh_dynamo():
    """Each test starts from torch's default recompile limit and no compiled graphs, and leaves none.
    (torch's own config.patch: pytest's monkeypatch may delete the setting on undo, which torch's config
    module takes as hiding it for good.)"""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):
        yield
    torch._dynamo.reset()


def prompt_of(n: int) -> str:
    return " ".join((WORDS * 8)[:n])


def test_compiled_blocks_get_one_graph_per_trimmed_text_length(fresh_dynamo):
    """Prompts of 1 to 69 words give 9 text lengths once rounded up to multiples of 8 (max_length 72):
    9 graphs of the blocks, one more than torch's default recompile limit, all compiled (none left to run
    eagerly) and one of the final norm, which never sees the text; sampling's compile leaves the text side
    (the LLM and its K/V read) eager."""
    arch = {**TINY_ARCH, "max_position_embeddings": 256}
    cfg = tiny_config(text={"max_length": 72, "trim_multiple": 8, "arch": arch})
    model = build_model(cfg)
    graphs = []
    model.compile_parts(counting_backend(graphs), llm=False)
    assert torch._dynamo.config.recompile_limit >= 9
    lengths = set()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    for n in range(1, 70, 3):
        text = model.encode_prompts([prompt_of(n), "a"])
        assert text.mask.shape[1] % 8 == 0
        lengths.add(text.mask.shape[1])
        model(x, t, text)
    assert len(lengths) == 9
    assert len(graphs) == 9 + 1


def test_auto_trim_multiple_is_the_longest_prompt_on_the_cpu_and_128_on_a_gpu(fresh_dynamo):
    model = build_model(
        tiny_config(text={"max_length": 300, "arch": {**TINY_ARCH, "max_position_embeddings": 512}})
    )
    assert model.text.trim_multiple is None
    assert model.text.trim_multiple_on(torch.device("cpu")) == 1
    assert model.text.trim_multiple_on(torch.device("cuda")) == CUDA_TRIM_MULTIPLE == 128
    assert model.text.trimmed_length(3, 300, torch.device("cuda")) == 128
    assert model.text.trimmed_length(290, 300, torch.device("cuda")) == 300
    assert model.encode_prompts([prompt_of(3)]).mask.shape[1] < 16  # trimmed to the longest prompt


def test_the_recompile_limit_covers_every_trimmed_length(fresh_dynamo):
    """3 lengths (100, 200, 300): 8 graphs each (with and without a mask, two autograd states in training,
    previews, a last partial batch) and a few more fit under the raised limit."""
    arch = {**TINY_ARCH, "max_position_embeddings": 512}
    model = build_model(tiny_config(text={"max_length": 300, "trim_multiple": 100, "arch": arch}))
    model.compile_parts("eager", llm=False)
    assert torch._dynamo.config.recompile_limit == 8 * 3 + RECOMPILE_SLACK


def test_sampling_compile_keeps_the_training_memory_budget(fresh_dynamo):
    """The activation budget is a process-wide setting: a sampling compile (no backward) in the same
    process, as in fusedit bench, leaves the training one in place."""
    import torch._functorch.config as functorch_config

    model = build_model(tiny_config())
    with functorch_config.patch(activation_memory_budget=1.0):
        model.compile_parts("eager", memory_budget=0.7, llm=False)
        model.compile_parts("eager", llm=False)
        assert functorch_config.activation_memory_budget == 0.7


def test_a_sampling_compile_runs_llms_compiled_for_training_eagerly_again(fresh_dynamo):
    """fusedit bench compiles for training (DiT blocks and LLMs), then for sampling: its sampling figures
    must run the LLMs as `fusedit sample` does (eagerly), not compiled for training."""
    model = build_model(tiny_config())
    model.compile_parts("eager")
    assert model.text.llm._compiled_call_impl is not None
    model.compile_parts("eager", llm=False)
    assert model.text.llm._compiled_call_impl is None
    model.compile_parts("eager")
    model.compile_parts("")
    assert model.text.llm._compiled_call_impl is None


def recording_aot_eager(graphs: list):
    """torch's aot_eager backend (AOT autograd over the traced aten ops, run as they are: the eager math,
    forward and backward), recording each graph it is handed."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, inputs):
        graphs.append(gm)
        return aot_eager(gm, inputs)

    return backend


# (config, how many post-RoPE and pre-RoPE K/V pairs its context holds)
KV_READS = {
    "debug": (lambda: load_config("debug"), (6, 0)),  # deep fusion over a Gemma (MQA)
    "debug-fusedit-cross": (lambda: load_config("debug-fusedit-cross"), (0, 6)),  # raw_kv
    "qwen3": (lambda: tiny_config(text={"family": "qwen3"}), (3, 0)),  # keys normed per head (k_norm)
}
# Three batches of other sizes and widths: (2, 4), (3, 10), (4, 7) tokens with the BOS.
KV_BATCHES = [
    ["a red circle", ""],
    ["two small green triangles left of a blue square", "a", "red"],
    ["blue square above a red circle", "two", "a", "green"],
]


@pytest.mark.parametrize("name", KV_READS)
def test_the_compiled_kv_read_equals_the_eager_one(fresh_dynamo, name):
    """The compiled K/V read (TextEncoder.compile_kv) gives the eager K/V exactly (aot_eager keeps the
    math). Dynamic shapes: the first batch gets a graph of its own, every later size and width shares a
    second one."""
    config, pairs = KV_READS[name]
    model = build_model(config())
    assert name != "qwen3" or model.text.layer_keys == (encoder._normed_keys,) * 3
    eager = [model.encode_prompts(prompts) for prompts in KV_BATCHES]
    graphs = []
    model.text.compile_kv(compile_settings(recording_aot_eager(graphs)))
    compiled = [model.encode_prompts(prompts) for prompts in KV_BATCHES]
    assert [c.mask.shape for c in compiled] == [(2, 4), (3, 10), (4, 7)]
    assert len(graphs) == 2
    for want, got in zip(eager, compiled, strict=True):
        assert (len(got.kv), len(got.raw_kv)) == pairs
        for a, b in zip(want.kv + want.raw_kv, got.kv + got.raw_kv, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_shallow_design_before_a_deep_one_leaves_its_kv_read_two_graphs(fresh_dynamo):
    """A shallow design reads no K/V: its compiled read was an empty graph, after which dynamo skipped the
    read's code for the whole process, so a deep model compiled afterwards (`fusedit study` trains both in
    one) traced each layer's read apart, shape by shape, past the recompile limit."""
    shallow = build_model(load_config("debug-dit-self"))
    shallow.compile_parts(recording_aot_eager([]))  # training's compile: the LLM's
    shallow.encode_prompts(["a red circle", "two blue squares"])
    assert shallow.text.read_kv is encoder._read_kv  # nothing to read, nothing compiled
    graphs = []
    deep = build_model(load_config("debug"))
    deep.text.compile_kv(compile_settings(recording_aot_eager(graphs)))
    for prompts in KV_BATCHES:
        deep.encode_prompts(prompts)
    assert len(graphs) == 2


def test_the_kv_read_compiles_with_the_llm_and_runs_eagerly_in_sampling_and_off(fresh_dynamo):
    """Training's compile (the LLM's) compiles the read; sampling's (llm=False) and off run it eagerly:
    once per prompt batch, its compile would cost a sampling call more than it saves."""
    model = build_model(tiny_config())
    model.compile_parts(recording_aot_eager([]))
    assert model.text.read_kv is not encoder._read_kv
    for backend, llm in ((recording_aot_eager([]), False), ("", True)):
        model.compile_parts(recording_aot_eager([]))
        model.compile_parts(backend, llm=llm)
        assert model.text.read_kv is encoder._read_kv


def test_a_trainable_llms_gradient_through_the_compiled_kv_read_equals_the_eager_one(fresh_dynamo):
    """Joint fine-tuning (the LLM's read modules train): a training compile compiles the LLM and its K/V
    read, and backward through both gives the LLM's weights exactly the eager gradients."""
    model = build_model(load_config("debug"))
    for _, module in model.text.read_modules(model.denoiser.text_request):
        module.requires_grad_(True)

    def gradients() -> dict[str, torch.Tensor]:
        model.text.llm.zero_grad(set_to_none=True)
        context = model.encode_prompts(["a red circle", "two small green triangles"])
        weights = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=weights)).sum() for kv in context.kv for t in kv)
        loss.backward()
        return {n: p.grad for n, p in model.text.llm.named_parameters() if p.grad is not None}

    eager = gradients()
    graphs = []
    model.compile_parts(recording_aot_eager(graphs))
    compiled = gradients()
    assert len(graphs) == 2  # the LLM's forward and the K/V read
    assert eager.keys() == compiled.keys()
    assert len(eager) == sum(p.requires_grad for p in model.text.llm.parameters())  # 49
    assert all(torch.equal(eager[n], compiled[n]) for n in eager)


def test_trim_multiple_of_the_config_is_kept_on_any_device(fresh_dynamo):
    model = build_model(tiny_config(text={"trim_multiple": 4}))
    model.compile_parts("eager", llm=False)
    assert model.text.trim_multiple_on(torch.device("cuda")) == 4
    assert model.encode_prompts([prompt_of(3)]).mask.shape[1] == 4


def test_sample_compile_gives_the_same_images(fresh_dynamo):
    """sample.compile compiles the blocks of the sampling form; "eager" traces them without generating code,
    so the images equal those of the uncompiled sampling form exactly (at the same text length: a
    different trim changes float rounding)."""
    images = []
    for backend in ("", "eager"):
        cfg = tiny_config(sample={"compile": backend}, text={"trim_multiple": 16})
        torch.manual_seed(0)
        model = build_model(cfg)
        randomize(model.denoiser)
        to_sampling_form(model.eval(), cfg)
        compiled = [
            part._compiled_call_impl is not None
            for part in (*model.denoiser.blocks, model.denoiser.final_norm)
        ]
        assert compiled == [bool(backend)] * len(compiled)
        images.append(generate(model, ["a red circle", "two blue squares"], image_size=16, steps=3))
    assert torch.equal(images[0], images[1])


def test_inductor_blocks_compile_without_mix_order_reduction(fresh_dynamo, monkeypatch):
    """torch 2.11's mix-order reduction fails an assertion compiling a gemma2b block's backward at batch 4
    on an H200 (benchmarks/RESULTS.md): inductor blocks turn it off per compile, other backends get no
    inductor options, and the process-wide inductor config is left alone."""
    import torch._inductor.config as inductor

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append(kw))
    model = build_model(tiny_config())
    before = inductor.triton.mix_order_reduction
    model.denoiser.compile_blocks("inductor")
    assert calls and all(kw["options"] == {"triton.mix_order_reduction": False} for kw in calls)
    assert inductor.triton.mix_order_reduction == before
    calls.clear()
    model.denoiser.compile_blocks("eager")
    assert calls and all(kw["options"] is None for kw in calls)


def test_max_autotune_compiles_the_blocks_and_the_llm_as_inductor_with_tuning(fresh_dynamo, monkeypatch):
    """train.compile / sample.compile "max-autotune": inductor with its kernel tuning on (the options of
    torch's max-autotune-no-cudagraphs mode) and mix-order reduction still off, for every block (static
    shapes) and each LLM (automatic dynamic shapes: trimmed batches change length)."""
    import torch._inductor as inductor

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    cfg = tiny_config(train={"compile": "max-autotune"})
    model = build_model(cfg)
    model.compile_parts(cfg.train.compile)
    tuned = {**inductor.list_mode_options("max-autotune-no-cudagraphs"), "triton.mix_order_reduction": False}
    blocks = [kw for module, kw in calls if module in set(model.denoiser.blocks)]
    llms = [kw for module, kw in calls if module is model.encoders[0].llm]
    assert len(blocks) == len(model.denoiser.blocks) and len(llms) == 1
    assert all(kw == {"backend": "inductor", "options": tuned, "dynamic": False} for kw in blocks)
    assert llms[0] == {"backend": "inductor", "options": tuned}


def test_max_autotune_is_a_compile_choice_of_sample_and_serve(tmp_path):
    """`--compile max-autotune` reaches sample.compile; a misspelt choice is refused, naming the allowed."""
    from fusedit.cli import build_parser
    from fusedit.cli.sample import _sampling_flags

    for command in (["sample", "run", "--prompt", "x"], ["serve", "run"]):
        args = build_parser().parse_args([*command, "--compile", "max-autotune"])
        assert _sampling_flags(args)["compile"] == "max-autotune"
    with pytest.raises(ConfigError, match="'max_autotune'.*max-autotune"):
        tiny_config(sample={"compile": "max_autotune"})


LIDIT = {
    "pos_embed": "none",
    "conv_pos": True,
    "refiner_depth": 1,
    "refiner_heads": 4,
    "pooled_text": "refined",
}
# Every design with every position scheme, the timestep conditionings, and LI-DiT's text side (refiner,
# refined pooled text, conv positions) in front of each design: what train.compile compiles on a GPU.
COMPILED_VARIANTS = [
    *[
        {"design": d, "pos_embed": p}
        for d in ("fusedit", "fusedit-cross", "dit-self", "dit-cross")
        for p in POSITIONS
    ],
    *[{"timestep_conditioning": c} for c in ("adaln-single", "addition", "none")],
    *[{"design": d, **LIDIT} for d in ("dit-self", "dit-cross")],
]


@pytest.mark.parametrize("model_cfg", COMPILED_VARIANTS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_compiled_parts_trace_without_a_graph_break(fresh_dynamo, model_cfg):
    """A graph break splits a compiled block into graphs with eager Python between them (on a GPU: lost
    fusions and launches, the MFU the variants must keep, issue 6): every design and variant's blocks, final
    norm and K/V read trace whole, with and without grad, with and without a padding mask, and in guided
    sampling over the cached text K/V."""
    from torch._dynamo.utils import counters

    model = build_model(tiny_config(model=model_cfg))
    graphs = []
    model.compile_parts(counting_backend(graphs), llm=False)
    for enc, request in zip(model.encoders, model.denoiser.text_requests, strict=True):
        enc.compile_kv(compile_settings(counting_backend(graphs)) if request.reads_kv else None)
    counters.clear()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    for prompts in (["a red circle", "two small green triangles above a blue square"], ["a red circle"] * 2):
        text = model.encode_prompts(prompts)
        model(x, t, text).pow(2).mean().backward()
        with torch.no_grad():
            model(x, t, text)
    generate(model, ["a red circle", ""], image_size=16, steps=2, guidance=3.0, cache_text=True, seed=0)
    assert graphs, "nothing was compiled"
    assert dict(counters["graph_break"]) == {}
