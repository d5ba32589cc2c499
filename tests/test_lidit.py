"""LI-DiT prompt encoding (design-space.md s.2): refiners, instruction tokens, multi-LLM, pooled text,
and the same mechanisms in front of the shallow baselines."""

import re

import pytest
import torch

from conftest import TINY_ARCH, TINY_CLIP_ARCH, randomize, tiny_config
from fusedit.config import ConfigError
from fusedit.sampling.generation import generate
from fusedit.system import build_model
from fusedit.text.refiner import CollaborativeRefiner, LinguisticRefiner
from fusedit.train.loop import train

QWEN = {
    "family": "qwen2",
    "arch": {**TINY_ARCH, "hidden_size": 48, "head_dim": 12, "num_hidden_layers": 4},
    "template": "lidit",
    "hidden_layer": -2,
    "max_length": 40,
}


def lidit(design="dit-cross", extra=True, **model):
    return tiny_config(
        model={
            "design": design,
            "pos_embed": "none",
            "conv_pos": True,
            "refiner_depth": 2,
            "refiner_heads": 4,
            "pooled_text": "refined",
            **model,
        },
        text={"template": "lidit", "hidden_layer": -3, "max_length": 40},
        extra_text=[QWEN] if extra else [],
    )


def test_refiner_starts_as_identity_and_its_gates_are_zero():
    model = build_model(lidit(extra=False))
    refiner = model.denoiser.context
    gates = [b.gates.linear for ref in refiner.linguistic for b in ref.blocks]
    assert gates and all(
        torch.count_nonzero(g.weight) == 0 and torch.count_nonzero(g.bias) == 0 for g in gates
    )
    text = model.encode_prompts(["a red circle", "two blue squares"])
    context, mask, _ = refiner(text.all, torch.randn(2, model.denoiser.dim))
    torch.testing.assert_close(context, refiner.linguistic[0].in_proj(text.hidden))
    assert torch.equal(mask, text.mask & ~text.instruction)


def test_instruction_tokens_are_read_by_the_refiner_then_dropped():
    model = build_model(lidit(extra=False))
    randomize(model.denoiser.context)
    refiner, temb = model.denoiser.context, torch.randn(1, model.denoiser.dim)
    text = model.encode_prompts(["a red circle"])
    context, mask, _ = refiner(text.all, temb)
    n = int(text.instruction.sum())
    assert n > 10 and int(mask.sum()) == int(text.mask.sum()) - n  # the prompt (and <bos>) remain
    assert not mask[0, 1 : 1 + n].any() and mask[0, 0] and mask[0, -3:].all()
    # the refiner reads the instruction: change one instruction token's features, the prompt tokens change
    text.hidden[0, 2] += 1.0
    context2, _, _ = refiner(text.all, temb)
    assert not torch.allclose(context2[0, -3:], context[0, -3:])
    # and with drop_instruction off nothing is masked beyond padding
    model = build_model(lidit(extra=False, drop_instruction=False))
    _, mask, _ = model.denoiser.context(model.encode_prompts(["a red circle"]).all, temb)
    assert mask.all()


def test_causal_refiner_ablation_does_not_look_ahead():
    torch.manual_seed(0)
    ref = LinguisticRefiner(llm_dim=16, dim=32, heads=4, depth=2, causal=True, gated=True)
    randomize(ref)
    x, mask, temb = torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.bool), torch.randn(1, 32)
    y = ref(x, mask, temb)
    x2 = x.clone()
    d = torch.randn(16)
    x2[0, 4] += d  # change the future but not the pooled mean the gates read
    x2[0, 5] -= d
    y2 = ref(x2, mask, temb)
    torch.testing.assert_close(y[0, :4], y2[0, :4])  # the past does not see it
    bidirectional = LinguisticRefiner(16, 32, 4, 2, causal=False, gated=True)
    bidirectional.load_state_dict(ref.state_dict())
    assert not torch.allclose(bidirectional(x, mask, temb)[0, :4], bidirectional(x2, mask, temb)[0, :4])


def test_no_gating_ablation_adds_every_sublayer_unscaled():
    model = build_model(lidit(extra=False, refiner_gating=False))
    refiner = model.denoiser.context
    assert not [n for n, _ in refiner.named_parameters() if "gates" in n]
    randomize(refiner)
    text = model.encode_prompts(["a red circle", "two blue squares"])
    temb = torch.randn(2, model.denoiser.dim)
    ling = refiner.linguistic[0]
    x = ling.in_proj(text.hidden)
    keep = ling.attention_mask(text.mask)
    for block in ling.blocks:  # the refiner written out: pre-norm residual sublayers, nothing scales them
        h = block.attn_norm(x)
        x = x + block.attn(h, h, keep)
        x = x + block.mlp(block.mlp_norm(x))
    context, mask, _ = refiner(text.all, temb)
    torch.testing.assert_close(context, x)
    # so, unlike the gated refiner, it does not start as the identity, and it ignores the timestep
    assert not torch.allclose(context, ling.in_proj(text.hidden))
    torch.testing.assert_close(refiner(text.all, torch.randn(2, model.denoiser.dim))[0], context)


def test_collaborative_refiner_layer_norms_the_other_branches_tokens():
    """The other LLM's tokens are a residual stream of their own scale: LayerNormed before the K/V
    projection, a branch's output does not change when they are scaled and offset."""
    model = build_model(lidit())
    randomize(model.denoiser)
    collaborative = model.denoiser.context.collaborative
    xs, masks = [torch.randn(2, 5, 32), torch.randn(2, 7, 32)], [torch.ones(2, 5, dtype=torch.bool)] * 2
    masks[1] = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    c = torch.randn(2, 32)
    out = collaborative(xs, masks, c)
    moved = collaborative([xs[0], 3.0 * xs[1] + 2.0], masks, c)
    torch.testing.assert_close(moved[0], out[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moved[1], out[1])  # a branch's own tokens still count as they are


def test_collaborative_refiner_refuses_a_branch_count_other_than_the_llms():
    """A branch per LLM: a refiner of three branches given two LLMs' tokens (or masks for one of them) is an
    error, not a silently dropped branch."""
    refiner = CollaborativeRefiner(32, 4, 3, gated=True)
    xs, masks = [torch.randn(2, 5, 32)] * 2, [torch.ones(2, 5, dtype=torch.bool)] * 2
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        refiner(xs, masks, torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is shorter than argument 1"):
        CollaborativeRefiner(32, 4, 2, gated=True).refine(xs, masks[:1], None)


def test_channel_concatenation_lines_up_each_llms_kept_tokens():
    model = build_model(lidit(refiner_concat="channels"))
    randomize(model.denoiser)
    refiner = model.denoiser.context
    text = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
    temb = torch.randn(2, model.denoiser.dim)
    context, keep, positions = refiner(text.all, temb)
    width = max(text.mask.shape[1], text.others[0].mask.shape[1])
    assert context.shape == (2, width, model.denoiser.dim) and keep.shape == positions.shape == (2, width)
    # Row by row: the refined tokens each LLM keeps (instruction dropped), first to last, side by side
    # (zeros where an LLM has fewer), then the projection.
    refined = [ref(t.hidden, t.mask, temb) for ref, t in zip(refiner.linguistic, text.all)]
    refined = refiner.collaborative(
        refined, [t.mask for t in text.all], refiner_condition(refiner, refined, text, temb)
    )
    for row in range(2):
        columns, counts = [], []
        for x, t in zip(refined, text.all):
            kept = x[row][t.mask[row] & ~t.instruction[row]]
            counts.append(len(kept))
            columns.append(torch.cat([kept, kept.new_zeros(width - len(kept), kept.shape[1])]))
        expected = refiner.concat.proj(torch.cat(columns, dim=-1))
        n = max(counts)
        assert keep[row].tolist() == [True] * n + [False] * (width - n)
        assert positions[row, :n].tolist() == list(range(n))
        torch.testing.assert_close(context[row, :n], expected[:n])


def concat_inputs(refiner, text, temb):
    """What the refiner hands its concatenation: (refined branches, masks, keep-masks, leading counts)."""
    seen = []
    hook = refiner.concat.register_forward_pre_hook(lambda mod, args: seen.append(args))
    out = refiner(text.all, temb)
    hook.remove()
    return out, seen[0]


def old_channel_concat(concat, xs, keeps):
    """ChannelConcat before it aligned the LLMs on the first prompt token: token j is the j-th kept token of
    every branch."""
    width = max(x.shape[1] for x in xs)
    packed, packed_keeps = [], []
    for x, keep in zip(xs, keeps):
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
        x = torch.gather(torch.where(keep[..., None], x, 0.0), 1, order[..., None].expand_as(x))
        packed.append(torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1])))
        packed_keeps.append(torch.nn.functional.pad(torch.gather(keep, 1, order), (0, width - x.shape[1])))
    keep = torch.stack(packed_keeps).any(0)
    return concat.proj(torch.cat(packed, dim=-1)), keep, keep.cumsum(1) - 1


@pytest.mark.parametrize("drop_instruction", [True, False])
def test_channel_concatenation_of_llms_with_as_many_bos_tokens_is_unchanged(drop_instruction):
    """Both tiny LLMs' tokenizers put one <bos> first (the debug presets'): aligning on the first prompt
    token leaves the channel concatenation bit for bit what it was."""
    model = build_model(lidit(refiner_concat="channels", drop_instruction=drop_instruction))
    randomize(model.denoiser)
    refiner = model.denoiser.context
    text = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle", ""])
    assert [t.leading for t in text.all] == [1, 1]
    out, (xs, _, keeps, leads) = concat_inputs(refiner, text, torch.randn(3, model.denoiser.dim))
    assert leads == [1, 1]
    for got, want in zip(out, old_channel_concat(refiner.concat, xs, keeps), strict=True):
        assert torch.equal(got, want)


def test_channel_concatenation_aligns_a_bos_llm_and_a_no_bos_llm_on_the_first_prompt_token(tmp_path):
    """Gemma's tokenizer puts <bos> first, Qwen2's nothing: the first prompt words sit side by side, and
    <bos> beside zeros, not beside Qwen's first word."""
    from fusedit.data.shapes import vocabulary
    from fusedit.text.templates import LIDIT_INSTRUCTION
    from fusedit.text.tokenizer import word_tokenizer

    words = sorted(set(vocabulary()) | set(LIDIT_INSTRUCTION.replace(":", " :").replace(",", " ,").split()))
    tok = word_tokenizer(words)
    tok._tokenizer.post_processor = None  # adds no <bos>, as Qwen's
    tok.save_pretrained(tmp_path / "tok")
    cfg = lidit(refiner_concat="channels")
    cfg.extra_text[0].tokenizer = str(tmp_path / "tok")
    model = build_model(cfg)
    randomize(model.denoiser)
    refiner, dim = model.denoiser.context, model.denoiser.dim
    prompts = ["a red circle", "a blue square to the left of a green triangle", ""]
    text = model.encode_prompts(prompts)
    assert [t.leading for t in text.all] == [1, 0]
    # The tokens themselves, as the features: channel 0 of each branch holds its token ids.
    ids = [enc.tokenize(prompts)[0][:, : t.mask.shape[1]] for enc, t in zip(model.encoders, text.all)]
    xs = [torch.nn.functional.pad(i[..., None].float(), (0, dim - 1)) for i in ids]
    keeps = [t.mask & ~t.instruction for t in text.all]
    packed = []
    hook = refiner.concat.proj.register_forward_pre_hook(lambda mod, args: packed.append(args[0]))
    _, keep, positions = refiner.concat(xs, [t.mask for t in text.all], keeps, [1, 0])
    hook.remove()

    def slots(branch: int, row: int, n: int) -> list[str | None]:
        """A branch's first n slots in a row: its tokens, None where it is zeros."""
        ids = packed[0][row, :n, branch * dim].long().tolist()
        return [model.encoders[branch].tokenizer.convert_ids_to_tokens(i) if i else None for i in ids]

    assert slots(0, 0, 5) == ["<bos>", "a", "red", "circle", None]
    assert slots(1, 0, 5) == [None, "a", "red", "circle", None]
    assert slots(0, 1, 2) == ["<bos>", "a"] and slots(1, 1, 2) == [None, "a"]
    # An empty prompt: Gemma's <bos>, then Qwen's end-of-text (its stand-in for no prompt) past the region.
    assert slots(0, 2, 3) == ["<bos>", None, None] and slots(1, 2, 3) == [None, "<eos>", None]
    assert keep[0].tolist()[:5] == [True] * 4 + [False] and positions[0, :4].tolist() == [0, 1, 2, 3]
    assert keep[2].tolist()[:3] == [True, True, False]
    # The refined tokens go the same way: the model's own refiner against them laid out by hand.
    temb = torch.randn(3, dim)
    (context, _, _), (refined, _, kept, leads) = concat_inputs(refiner, text, temb)
    assert leads == [1, 0]
    width = 1 + max(text.mask.shape[1] - 1, text.others[0].mask.shape[1])
    assert context.shape == (3, width, dim)
    # The FLOP count reads as many text tokens as the DiT does at the padded widths (one more than max T_i).
    from fusedit.models.flops import model_flops

    padded = 1 + max(enc.max_length - enc.leading for enc in model.encoders)
    assert model_flops(model, 4)[2] == padded == max(enc.max_length for enc in model.encoders) + 1
    for row in range(3):
        columns = []
        for x, k, n in zip(refined, kept, leads):
            mine = x[row][k[row]]
            rest = torch.cat([mine[n:], mine.new_zeros(width - 1 - len(mine[n:]), dim)])
            columns.append(torch.cat([mine[:n], mine.new_zeros(1 - n, dim), rest]))
        torch.testing.assert_close(context[row], refiner.concat.proj(torch.cat(columns, dim=-1)))
    # and a prompt's output still does not depend on its batch
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    alone = model(x, t, model.encode_prompts(prompts[:1]))
    torch.testing.assert_close(
        alone, model(torch.cat([x] * 3), torch.cat([t] * 3), text)[:1], atol=1e-5, rtol=1e-5
    )


def test_debug_lidit_reads_every_llm_at_its_third_to_last_block():
    """LI-DiT's features (design-space.md s.2): the third-to-last block's output of each LLM."""
    from fusedit.config import load_config, text_sections

    cfg = load_config("debug-lidit")
    assert [t.hidden_layer for _, t in text_sections(cfg)] == [-3, -3]
    model = build_model(cfg, "meta")
    layers = [t.arch["num_hidden_layers"] for _, t in text_sections(cfg)]
    assert model.denoiser.hidden_layers == tuple(n - 2 for n in layers)  # hidden_states[n - 2]: block n - 3's


def test_drop_instruction_false_is_refused_only_where_it_changes_nothing():
    """A plain template's instruction ("Imagine: ") is instruction tokens the ablation keeps; with none, it
    would change nothing and is refused."""
    plain = {"design": "dit-cross", "refiner_depth": 1, "refiner_heads": 4}
    with pytest.raises(ConfigError, match=r"^model\.drop_instruction=false keeps the instruction tokens"):
        tiny_config(model={**plain, "drop_instruction": False})
    kept = []
    for drop in (True, False):
        cfg = tiny_config(model={**plain, "drop_instruction": drop}, text={"instruction": "Imagine: "})
        model = build_model(cfg)
        text = model.encode_prompts(["a red circle"])
        kept.append(model.denoiser.context(text.all, torch.randn(1, model.denoiser.dim))[1])
    assert kept[1].sum() == kept[0].sum() + 2  # "Imagine" and ":", read by the DiT only without the drop


def refiner_condition(refiner, refined, text, temb):
    """The collaborative refiner's conditioning: the branches' mean pooled tokens plus the timestep."""
    from fusedit.layers.pool import masked_mean

    pooled = torch.stack([masked_mean(x, t.mask) for x, t in zip(refined, text.all)]).mean(0)
    return pooled + temb


def test_two_llm_families_with_their_own_tokenizers_are_fused(tmp_path):
    from fusedit.data.shapes import vocabulary
    from fusedit.text.templates import LIDIT_INSTRUCTION
    from fusedit.text.tokenizer import word_tokenizer

    # the second LLM gets its own tokenizer (a different vocabulary order, hence different ids)
    words = sorted(set(vocabulary()) | set(LIDIT_INSTRUCTION.replace(":", " :").replace(",", " ,").split()))
    word_tokenizer(words[::-1]).save_pretrained(tmp_path / "tok")
    cfg = lidit()
    cfg.extra_text[0].tokenizer = str(tmp_path / "tok")
    model = build_model(cfg)
    assert (
        type(model.text.llm).__name__ == "GemmaModel"
        and type(model.extra_text[0].llm).__name__ == "Qwen2Model"
    )
    a, b = (enc.tokenize(["a red circle"])[0] for enc in model.encoders)
    assert not torch.equal(a, b)
    assert isinstance(model.denoiser.context.collaborative, CollaborativeRefiner)
    randomize(model.denoiser)
    text = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
    assert len(text.all) == 2 and text.others[0].hidden.shape[-1] == 48
    context, mask, _ = model.denoiser.context(text.all, torch.randn(2, model.denoiser.dim))
    assert context.shape[1] == text.mask.shape[1] + text.others[0].mask.shape[1]
    # both LLMs matter: perturbing the second one's features changes the denoiser's output
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    v = model(x, t, text)
    text.others[0].hidden[:, 1:] += 0.5
    assert not torch.allclose(v, model(x, t, text))


@pytest.mark.parametrize("design", ["dit-cross", "dit-self"])
def test_lidit_and_refined_shallow_baselines_sample_cached_equals_uncached_and_train(tmp_path, design):
    cfg = lidit(design)
    model = build_model(cfg)
    randomize(model.denoiser)
    kw = dict(image_size=16, steps=3, guidance=3.0, seed=1)
    prompts = ["a red circle", "two green triangles"]
    cached = generate(model, prompts, cache_text=True, **kw)
    torch.testing.assert_close(cached, generate(model, prompts, cache_text=False, **kw))
    # padding invariance through two LLMs, the refiners and the instruction drop
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    alone = model(x, t, model.encode_prompts(["a red circle"]))
    batch = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
    torch.testing.assert_close(
        alone, model(torch.cat([x, x]), torch.cat([t, t]), batch)[:1], atol=1e-5, rtol=1e-5
    )
    cfg.train.steps, cfg.train.checkpoint_every = 3, 3
    result = train(cfg, tmp_path / design, progress=False)
    assert len(result["losses"]) == 3 and all(
        p.grad is None for enc in result["model"].encoders for p in enc.llm.parameters()
    )


@pytest.mark.parametrize(
    "design, pos_embed, concat",
    [
        ("dit-self", "1d-rope", "tokens"),
        ("dit-self", "2d-rope", "tokens"),
        ("dit-self", "m-rope", "tokens"),
        ("dit-cross", "1d-rope", "tokens"),
        ("dit-cross", "2d-rope", "tokens"),
        ("dit-cross", "m-rope", "tokens"),
        ("dit-self", "2d-rope", "channels"),
        ("dit-cross", "1d-rope", "channels"),
    ],
)
def test_two_llms_with_rope_give_a_prompt_the_same_output_whatever_its_batch(design, pos_embed, concat):
    """Text positions count real tokens across both LLMs, so a longer neighbour (more padding on both
    LLMs' sides) moves no token; without that the second LLM's tokens sat after the first's padding. The
    channel concatenation packs each LLM's kept tokens first, so padding never meets a real token."""
    model = build_model(lidit(design, pos_embed=pos_embed, conv_pos=False, refiner_concat=concat))
    randomize(model.denoiser)
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    alone = model(x, t, model.encode_prompts(["a red circle"]))
    batch = model.encode_prompts(["a red circle", "a blue square to the left of a green triangle"])
    assert batch.mask.shape[1] > int(batch.lengths[0]) and batch.others[0].mask.shape[1] > int(
        batch.others[0].lengths[0]
    )
    torch.testing.assert_close(
        alone, model(torch.cat([x, x]), torch.cat([t, t]), batch)[:1], atol=1e-5, rtol=1e-5
    )


def test_the_refiners_read_bf16_llms_in_fp32():
    cfg = lidit()
    cfg.text.dtype = cfg.extra_text[0].dtype = "bfloat16"
    model = build_model(cfg)
    randomize(model.denoiser)
    images = generate(model, ["a red circle"], image_size=16, steps=2, guidance=3.0, precision="fp32")
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_clip_pooled_text_modulation():
    cfg = tiny_config(
        model={"pooled_text": "clip"},
        pooled_text={
            "arch": TINY_CLIP_ARCH,
            "max_length": 16,
        },
    )
    model = build_model(cfg)
    # The embedding MLP starts as the public code's: N(0, 0.02) weights, zero biases (not xavier)
    for lin in (model.denoiser.pooled.embed[1], model.denoiser.pooled.embed[3]):
        assert abs(lin.weight.std().item() - 0.02) < 0.004 and not lin.bias.any()
    randomize(model.denoiser)
    text = model.encode_prompts(["a red circle", "a blue square"])
    assert text.pooled.shape == (2, 20) and not torch.allclose(text.pooled[0], text.pooled[1])
    # CLIP's own text_embeds (the projected end-of-text state), which the public code adds, for a prompt
    # whose last token is CLIP's end-of-text id
    pooled = model.pooled_text
    tok = pooled.tokenizer(["a red circle <eos>"], return_tensors="pt")
    assert tok["input_ids"][0, -1] == TINY_CLIP_ARCH["eos_token_id"]
    clip = pooled.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).text_embeds
    torch.testing.assert_close(pooled(["a red circle <eos>"]), clip)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    v = model(x, t, text)
    text.pooled = text.pooled.flip(0)
    assert not torch.allclose(v, model(x, t, text))  # the pooled embedding modulates the DiT
    assert all(not p.requires_grad for p in model.pooled_text.parameters())
    kw = dict(image_size=16, steps=2, guidance=2.0)
    torch.testing.assert_close(
        generate(model, ["a red circle"], cache_text=True, **kw),
        generate(model, ["a red circle"], cache_text=False, **kw),
    )


def test_clip_pooled_text_reads_the_instruction_before_each_prompt_as_the_llm_does():
    """With text.instruction ("Imagine: ") the public FuseDiT code tokenises instruction + caption for CLIP
    as for the LLM; a dropped caption "" stays "" (the unconditional branch). Its tokens count against
    pooled_text.max_length: CLIP's positions are fixed."""
    cfg = tiny_config(
        text={"instruction": "a blue "},
        model={"pooled_text": "clip"},
        pooled_text={"arch": TINY_CLIP_ARCH, "max_length": 4},
    )
    model = build_model(cfg)
    pooled = model.pooled_text
    assert pooled.instruction == "a blue "
    # The cut warnings name CLIP's limit with the instruction in it.
    assert model.limits.endswith(", pooled_text.max_length=4 (text.instruction included)")
    torch.manual_seed(0)
    got = pooled(["square", "", "red circle"])
    pooled.instruction = ""
    torch.testing.assert_close(got, pooled(["a blue square", "", "a blue red circle"]))
    assert not torch.allclose(got[0], pooled(["square"])[0])
    pooled.instruction = "a blue "
    # BOS + 4 words with the instruction: over the 4 tokens, where "red circle" alone is not
    assert pooled.cut_rows(["square", "", "red circle"]) == {2}


def test_clip_pooled_text_pads_on_the_right_whatever_its_tokenizer_says(tmp_path):
    """The pooled token is the last real one; a tokenizer saved to pad on the left (as Gemma's do) must not
    make every prompt pool a padding position."""
    from fusedit.config import PooledTextConfig
    from fusedit.text.pooled import load_pooled_encoder
    from fusedit.text.tokenizer import word_tokenizer

    tok = word_tokenizer(["a", "red", "circle", "blue", "square"])
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    encoder = load_pooled_encoder(
        PooledTextConfig(arch=TINY_CLIP_ARCH, tokenizer=str(tmp_path / "tok"), max_length=8), "cpu"
    )
    assert encoder.tokenizer.padding_side == "right"
    pooled = encoder(["a red circle", "a blue square"])
    assert not torch.allclose(pooled[0], pooled[1])
    encoder.max_length = 16  # more padding changes nothing: CLIP's mask is causal, padding comes after
    torch.testing.assert_close(encoder(["a red circle", "a blue square"]), pooled)


def test_pooled_text_loads_a_whole_clips_text_tower_and_refuses_other_models(tmp_path):
    from transformers import AutoConfig, CLIPModel

    from fusedit.config import ConfigError, PooledTextConfig
    from fusedit.text.pooled import load_pooled_encoder
    from test_fid import save_tiny_clip

    # A whole CLIP whose text_config kept its default projection_dim (512): the text tower is projected to
    # the model's shared width (8), with the saved weights.
    path = save_tiny_clip(tmp_path / "clip")
    clip = CLIPModel.from_pretrained(path)
    encoder = load_pooled_encoder(PooledTextConfig(model_id=str(path), max_length=16), "cpu")
    assert torch.equal(encoder.model.text_projection.weight, clip.text_projection.weight)
    tok = encoder.tokenizer(["a red circle"], return_tensors="pt", padding="max_length", max_length=16)
    expected = clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    expected = getattr(expected, "pooler_output", expected)  # a tensor before transformers 5
    torch.testing.assert_close(encoder(["a red circle"]), expected)
    # Another kind of model would load with every weight random: refused, naming the key.
    llm = tmp_path / "llm"
    AutoConfig.for_model("gemma", **TINY_ARCH).save_pretrained(llm)  # what is read before the weights
    with pytest.raises(
        ConfigError,
        match=r"^pooled_text.model_id='.*llm' is a model of model_type 'gemma' \(allowed: a CLIP or CLIP text",
    ):
        load_pooled_encoder(PooledTextConfig(model_id=str(llm)), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError, match=r"^pooled_text.model_id='.*empty' is not a model transformers can read: "
    ):
        load_pooled_encoder(PooledTextConfig(model_id=str(tmp_path / "empty")), "cpu")


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"extra_text": [QWEN]}, "extra_text has 1 more LLM(s) but model.design='fusedit'"),
        (
            {"model": {"design": "fusedit", "refiner_depth": 2}},
            "model.refiner_depth=2 needs a shallow design",
        ),
        (
            {"model": {"design": "fusedit", "pooled_text": "refined"}},
            "model.pooled_text='refined' pools the text tokens a shallow design prepares",
        ),
        ({"model": {"pooled_text": "clip"}}, "needs pooled_text.model_id"),
        ({"model": {"num_heads": 4}}, "model.num_heads is set but model.design='fusedit' mirrors the LLM"),
        (
            {"model": {"design": "dit-cross", "refiner_depth": 1, "refiner_concat": "channels"}},
            "model.refiner_concat='channels' joins the refined tokens of several LLMs: it needs "
            "model.refiner_depth >= 1 and extra_text (got refiner_depth=1, 1 LLM)",
        ),
        (
            {"model": {"design": "dit-cross", "refiner_gating": False}},
            "model.refiner_gating=false is a refiner ablation: set model.refiner_depth >= 1",
        ),
        (
            {
                "model": {
                    "design": "dit-cross",
                    "refiner_depth": 1,
                    "pooled_text": "refined",
                    "timestep_conditioning": "none",
                }
            },
            "is added to the timestep embedding",
        ),
    ],
)
def test_lidit_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**sections)


def test_dit_shape_of_its_own_for_shallow_designs():
    model = build_model(
        tiny_config(model={"design": "dit-cross", "num_heads": 2, "head_dim": 16, "intermediate_size": 96})
    )
    block = model.denoiser.blocks[0]
    assert block.img_attn.q_proj.out_features == 32 and block.img_attn.heads == 2
    assert block.img_mlp.up_proj.out_features == 96
    v = model(torch.randn(1, 3, 16, 16), torch.rand(1), model.encode_prompts(["a red circle"]))
    assert v.shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "extra_text.0.family=foo",
            "extra_text.0.family='foo' is not allowed (allowed: gemma, gemma2, qwen2",
        ),
        ("extra_text.0.max_length=0", "extra_text.0.max_length=0 must be > 0"),
        (
            "extra_text.0.templat=lidit",
            "unknown config key 'extra_text.0.templat': did you mean 'extra_text.0.template'?",
        ),
    ],
)
def test_a_further_llms_errors_name_its_setting_as_an_override_writes_it(override, message):
    """extra_text.0.family, not extra_text[0].family: the error's name pastes back as the override."""
    from fusedit.config import load_config

    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config("debug-lidit", [override])


def test_trainings_first_cut_warning_names_the_llm_that_cut(tmp_path, caplog):
    """Two LLMs with their own limits: a run whose captions only the second LLM cuts says the limit to
    raise, extra_text.0.max_length, not every limit of the model (over micro-steps too)."""
    import logging
    from dataclasses import replace

    cfg = lidit()
    cfg = replace(
        cfg,
        extra_text=[replace(cfg.extra_text[0], max_length=4)],
        data=replace(cfg.data, caption_dropout=0.0),
        train=replace(cfg.train, steps=1, batch_size=2, grad_accum=2),
    )
    with caplog.at_level(logging.WARNING, logger="fusedit"):
        train(cfg, tmp_path / "run", progress=False)
    first = [r.getMessage() for r in caplog.records if "later truncations are only" in r.getMessage()]
    assert len(first) == 1 and " longer than extra_text.0.max_length=4 tokens " in first[0]
