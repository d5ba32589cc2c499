"""Sampling encodes each distinct prompt once (TextToImage.encode_prompts(distinct=True)) and takes the rows
back (TextContext.take): the text stream never sees the image (design-space.md s.1), so that is the batch's
own context. An eval call (GenEval, DPG-Bench, CompBench) samples 4 images of one prompt with guidance: 8
LLM rows of 2 texts, now 2 rows.

Every comparison is torch.equal: on the CPU a row's LLM forward gives the same bits in a batch of 2 as in a
batch of 8 (each row's matmuls and attention are its own), and the take copies rows exactly."""

import contextlib

import pytest
import torch

from conftest import randomize, tiny_config
from fusedit.config import load_config
from fusedit.pipeline import FuseDiTPipeline
from fusedit.sampling.generation import generate, sample_settings
from fusedit.system import build_model
from fusedit.text.context import PromptCut, TextContext
from fusedit.train.loop import train

PROMPT = "a red circle to the left of a blue square"
# Past every debug preset's text.max_length (debug-lidit's 40) and the clip-mod CLIP's 16.
LONG = " ".join(["two green triangles"] * 20)
# An eval call: 4 images of one prompt with guidance (the negative prompt's rows first); and a batch with
# prompts cut to the limit, the negative prompt among them, in no order.
EVAL_ROWS = [""] * 4 + [PROMPT] * 4
CUT_ROWS = [LONG, LONG, "", "a red circle", LONG, "a red circle", PROMPT]


def assert_same_context(a: TextContext, b: TextContext) -> None:
    assert torch.equal(a.mask, b.mask) and torch.equal(a.lengths, b.lengths)
    assert (a.leading, a.padded, a.cut) == (b.leading, b.padded, b.cut)
    for field in ("kv", "raw_kv"):
        assert len(getattr(a, field)) == len(getattr(b, field))
        for (ka, va), (kb, vb) in zip(getattr(a, field), getattr(b, field)):
            assert torch.equal(ka, kb) and torch.equal(va, vb)
    for field in ("hidden", "instruction"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), field
    # The pooled CLIP's last matmul (its text projection) runs on B rows, one per prompt: the BLAS picks its
    # kernel by the row count, so 2 rows and 8 may differ in the last bit (measured: 1 ulp on an AMD EPYC).
    # The LLMs' matmuls run on B x T rows, where the kernel and so the bits stay the same.
    assert (a.pooled is None) == (b.pooled is None)
    if a.pooled is not None:
        torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-6, atol=1e-6)
    assert len(a.others) == len(b.others)
    for x, y in zip(a.others, b.others):
        assert_same_context(x, y)


@contextlib.contextmanager
def counting_rows(model):
    """A list of (part, rows) for every forward of each LLM ("llm0", ...) and of the pooled CLIP ("clip")."""
    rows = []
    hooks = [
        enc.llm.register_forward_hook(
            lambda m, args, kwargs, out, i=i: rows.append((f"llm{i}", kwargs["input_ids"].shape[0])),
            with_kwargs=True,
        )
        for i, enc in enumerate(model.encoders)
    ]
    if model.pooled_text is not None:
        hooks.append(
            model.pooled_text.register_forward_hook(lambda m, args, out: rows.append(("clip", len(args[0]))))
        )
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "preset, read",
    [
        ("debug", "kv"),  # deep fusion: post-RoPE K/V
        ("debug-fusedit-cross", "raw_kv"),  # its cross variant: pre-RoPE K/V
        ("debug-dit-self", "hidden"),  # shallow designs: one hidden state
        ("debug-lidit", "others"),  # two LLMs, the LI-DiT instruction template
        ("debug-clip-mod", "pooled"),  # a pooled CLIP
    ],
)
def test_distinct_prompts_encode_once_and_give_the_batchs_own_context(preset, read):
    model = build_model(load_config(preset), with_autoencoder=False).eval()
    parts = [f"llm{i}" for i in range(len(model.encoders))] + (["clip"] if read == "pooled" else [])
    for batch, negatives, texts in ((EVAL_ROWS, 4, 2), (CUT_ROWS, 1, 4)):
        with torch.no_grad(), counting_rows(model) as rows:
            full = model.encode_prompts(batch, negatives)
            assert rows == [(part, len(batch)) for part in parts]
            rows.clear()
            once = model.encode_prompts(batch, negatives, distinct=True)
            assert rows == [(part, texts) for part in parts]  # each distinct text once
        read_here = getattr(full, read)  # the design's own reading is compared, not an empty field
        assert read_here is not None and (not isinstance(read_here, list) or read_here)
        assert_same_context(once, full)
    # The cut rows: LONG's, at whichever limit cut them, told apart from the negative prompt's row 0; each
    # encoder's own rows as the batch's own encoding has them.
    assert (once.cut.rows, once.cut.negatives) == (frozenset({0, 1, 4}), 1) and once.cut == full.cut
    assert (once.cut.prompts, once.cut.negative) == ({0, 3}, True)
    assert full.padded and not model.encode_prompts([PROMPT] * 3, distinct=True).padded


def test_all_distinct_prompts_take_nothing(monkeypatch):
    """Nothing repeats (a training batch, a sample of distinct prompts): the batch encodes as it always did,
    with no take."""
    model = build_model(tiny_config(), with_autoencoder=False).eval()
    monkeypatch.setattr(TextContext, "take", lambda *a: pytest.fail("took rows"))
    with torch.no_grad():
        once = model.encode_prompts(["", "a red circle", LONG], 1, distinct=True)
        assert_same_context(once, model.encode_prompts(["", "a red circle", LONG], 1))


def context(lengths: list[int], width: int, negatives: int = 0, cut=()) -> TextContext:
    """A hand-made context of len(lengths) rows whose every per-row entry holds its row's number."""
    b = len(lengths)
    lengths = torch.tensor(lengths)
    mask = torch.arange(width)[None] < lengths[:, None]
    row = torch.arange(b, dtype=torch.float32)
    kv = [(row[:, None, None, None].expand(b, 2, width, 4), -row[:, None, None, None].expand(b, 2, width, 4))]
    return TextContext(
        mask=mask,
        lengths=lengths,
        kv=kv,
        raw_kv=[(k + 10, v + 10) for k, v in kv],
        hidden=row[:, None, None].expand(b, width, 6),
        instruction=mask & (torch.arange(width)[None] == 0),
        leading=1,
        pooled=row[:, None].expand(b, 5),
        padded=min(lengths.tolist()) < width,
        cut=PromptCut.of([("text.max_length=9", cut)], negatives),
    )


def test_take_gives_row_i_the_rows_of_index_i_in_every_field():
    ctx = context([2, 3, 1], 3, negatives=1, cut={0, 2})
    ctx.others = [context([4, 4, 4], 4, cut={1})]
    taken = ctx.take([0, 0, 2, 1, 2])
    index = torch.tensor([0, 0, 2, 1, 2])
    assert torch.equal(taken.mask, ctx.mask[index]) and taken.lengths.tolist() == [2, 2, 1, 3, 1]
    assert taken.kv[0][0].shape == (5, 2, 3, 4) and taken.kv[0][0][:, 0, 0, 0].tolist() == [0, 0, 2, 1, 2]
    assert taken.kv[0][1][:, 1, 2, 3].tolist() == [0, 0, -2, -1, -2]
    assert taken.raw_kv[0][0][:, 0, 0, 0].tolist() == [10, 10, 12, 11, 12]
    assert taken.hidden.shape == (5, 3, 6) and taken.hidden[:, 2, 5].tolist() == [0, 0, 2, 1, 2]
    assert torch.equal(taken.instruction, ctx.instruction[index]) and taken.pooled[:, 4].tolist() == [
        0,
        0,
        2,
        1,
        2,
    ]
    assert taken.leading == 1 and taken.padded
    # The cut rows are the new rows of cut ones; the negative prompt's rows are those taken from row 0.
    assert taken.cut == PromptCut(
        frozenset({0, 1, 2, 4}), 2, (("text.max_length=9", frozenset({0, 1, 2, 4})),)
    )
    (other,) = taken.others
    assert other.lengths.tolist() == [4] * 5 and not other.padded
    assert other.cut == PromptCut(frozenset({3}), 0, (("text.max_length=9", frozenset({3})),))


def test_take_says_padded_for_the_rows_it_keeps():
    ctx = context([3, 1, 3], 3)
    assert ctx.padded and not ctx.take([2, 0, 0]).padded  # the one padded row left out
    assert ctx.take([1, 1]).padded and ctx.take([2, 1, 0]).padded
    assert not context([3, 3], 3).take([1]).padded


def test_take_refuses_rows_out_of_range_and_prompts_before_the_negative_prompt():
    ctx = context([2, 3, 1], 3, negatives=1)
    with pytest.raises(IndexError, match=r"^take index 3 is out of range for 3 rows \(allowed: 0\.\.2\)$"):
        ctx.take([0, 3])
    with pytest.raises(IndexError, match=r"^take index -1 is out of range for 3 rows"):
        ctx.take([-1])
    with pytest.raises(
        ValueError,
        match=r"^take index \[1, 0\] puts a prompt's row before a negative prompt's \(allowed: the rows taken "
        r"from the first 1, the negative prompt's, before any other\)$",
    ):
        ctx.take([1, 0])


@pytest.fixture(scope="module")
def debug_model():
    cfg = load_config("debug")
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize(model.denoiser)  # adaLN-Zero starts at 0: the images would not depend on the text at all
    return model.eval(), cfg


def full_encoding(model, monkeypatch) -> None:
    """Make ``model`` encode every row, as generate did before it passed distinct=True."""
    encode = model.encode_prompts
    monkeypatch.setattr(
        model, "encode_prompts", lambda rows, negatives, distinct=False: encode(rows, negatives)
    )


@pytest.mark.parametrize("cache_text", [True, False])
def test_generate_runs_the_llm_on_distinct_prompts_and_samples_the_same_images(
    debug_model, monkeypatch, cache_text
):
    """An eval call: 4 images of one prompt with CFG. The uncached baseline re-encodes at every step the
    same way, so cached and uncached stay equal."""
    model, _ = debug_model
    kw = dict(image_size=16, steps=3, guidance=3.0, negative_prompt="a blurry image", cache_text=cache_text)
    encodes = 1 if cache_text else 3  # the uncached: the first step takes the first encoding
    with counting_rows(model) as rows:
        images = generate(model, [PROMPT] * 4, **kw)
        assert rows == [("llm0", 2)] * encodes
        rows.clear()
        full_encoding(model, monkeypatch)
        reference = generate(model, [PROMPT] * 4, **kw)
        assert rows == [("llm0", 8)] * encodes
    assert torch.equal(images, reference)
    assert torch.equal(images, generate(model, [PROMPT] * 4, **{**kw, "cache_text": not cache_text}))


def test_the_pipeline_runs_the_llm_on_distinct_prompts_and_samples_the_same_images(debug_model, monkeypatch):
    model, cfg = debug_model
    pipe = FuseDiTPipeline.from_model(model, cfg)
    pipe.set_progress_bar_config(disable=True)
    with counting_rows(model) as rows:
        latents = pipe(
            PROMPT,
            negative_prompt="a blurry image",
            num_inference_steps=3,
            guidance_scale=3.0,
            height=16,
            width=16,
            num_images_per_prompt=4,
            generator=torch.Generator().manual_seed(5),
            output_type="latent",
        ).images
        assert rows == [("llm0", 2)]
    full_encoding(model, monkeypatch)
    settings = sample_settings(cfg, image_size=16, steps=3, guidance=3.0, negative_prompt="a blurry image")
    reference = generate(model, [PROMPT] * 4, seed=5, **settings)
    assert torch.equal(latents.clamp(-1, 1), reference)


def test_training_encodes_every_caption_row(tmp_path, monkeypatch):
    """Training keeps its own encoding (its LLM may train): every caption of the batch, dropped ones (all
    "" here) included, is an LLM row. A guard: training never passed distinct."""
    from fusedit.train import loop

    rows = []
    build = loop.build_model

    def watching_build(cfg, device, **kwargs):
        model = build(cfg, device, **kwargs)
        model.text.llm.register_forward_hook(
            lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        return model

    monkeypatch.setattr(loop, "build_model", watching_build)
    cfg = tiny_config(train={"steps": 1, "checkpoint_every": 1}, data={"caption_dropout": 1.0})
    train(cfg, tmp_path / "run", progress=False)
    assert rows == [cfg.train.batch_size]
