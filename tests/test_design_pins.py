"""Design details that nothing else pins (review K, findings F3, F4, F5, F7, F8): the paper presets'
sampling protocol, the deep-fusion cross variant's K/V source, adaLN-single's row order, the timestep in
LI-DiT's refiner gates, and the LI-DiT sizes."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_ARCH, randomize, tiny_config
from fusedit.config import load_config, preset_names
from fusedit.layers.rope import NoRotary
from fusedit.sampling.generation import sample_settings
from fusedit.system import build_model, count_parameters
from fusedit.text.refiner import CollaborativeRefiner
from test_lidit import lidit

PROMPTS = ["a red circle", "two blue squares to the left of a green triangle"]

# ------------------------------------------------------------------ F3: sampling protocol (s.4)

# design-space.md s.4: Euler on the flow ODE, 25 steps, CFG 6.0 with "" as negative prompt, 512x512; with
# the recipe's SD3 shift 3 (s.3) on the diffusers schedule.
PAPER_SAMPLING = {
    "sampler": "euler",
    "steps": 25,
    "guidance": 6.0,
    "negative_prompt": "",
    "image_size": 512,
    "shift": 3.0,
    "schedule": "diffusers",
}
# Every preset but the CPU ones (debug*, and the shapes-world recipe that samples at 32 px): a new paper
# preset is checked without being listed. recipe-lidit-3stage: its top-level section; the later stages
# change the resolution on purpose.
PAPER_PRESETS = [p for p in preset_names() if not p.startswith("debug") and p != "recipe-shapes-3stage"]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_paper_presets_sample_with_the_published_protocol(preset):
    """design-space.md s.4: `fusedit eval` samples with the preset's section, so it must be the paper's."""
    settings = sample_settings(load_config(preset))
    assert {k: settings[k] for k in PAPER_SAMPLING} == PAPER_SAMPLING
    assert type(settings["steps"]) is int and type(settings["guidance"]) is float


# ------------------------------------------------------------------ F4: deep fusion, cross variant (s.1)


@pytest.mark.parametrize("family", ["gemma", "qwen3"])  # qwen3: keys normalised per head (k_norm)
def test_cross_variant_reads_its_paired_llm_layers_own_pre_rope_kv(family):
    """design-space.md s.1: DiT layer i cross-attends to LLM layer initial_layers + i's own K/V, pre-RoPE:
    what each block receives equals what k_proj (k_norm) / v_proj give inside the LLM's own forward."""
    cfg = tiny_config(
        model={"design": "fusedit-cross", "num_layers": 2, "initial_layers": 1},
        text={"family": family, "arch": {**TINY_ARCH, "num_hidden_layers": 4}},
    )
    model = build_model(cfg)
    randomize(model.denoiser)
    llm, head_dim = model.text.llm, TINY_ARCH["head_dim"]

    got = []
    for block in model.denoiser.blocks:
        block.txt_attn.register_forward_pre_hook(lambda mod, args: got.append(args[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8), torch.rand(2), model.encode_prompts(PROMPTS))
    assert len(got) == 2

    # The reference: the LLM's own forward on the same (trimmed) tokens, its projections captured by hooks.
    ids, mask = model.text.tokenize(PROMPTS)
    length = got[0][0].shape[2]
    seen, hooks = {}, []
    for i, layer in enumerate(llm.layers):
        attn = layer.self_attn
        keys = attn.k_norm if family == "qwen3" else attn.k_proj
        hooks += [
            keys.register_forward_hook(lambda mod, a, out, i=i: seen.setdefault(("k", i), out)),
            attn.v_proj.register_forward_hook(lambda mod, a, out, i=i: seen.setdefault(("v", i), out)),
        ]
    with torch.no_grad():
        llm(input_ids=ids[:, :length], attention_mask=mask[:, :length].long(), use_cache=False)
    for h in hooks:
        h.remove()

    for j, (k, v) in enumerate(got):
        i = 1 + j  # initial_layers + j
        want_k = seen[("k", i)].unflatten(-1, (-1, head_dim)) if family == "gemma" else seen[("k", i)]
        want_v = seen[("v", i)].unflatten(-1, (-1, head_dim))
        torch.testing.assert_close(k, want_k.transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(v, want_v.transpose(1, 2), rtol=0, atol=0)


# ------------------------------------------------------------------ F5: adaLN-single (s.1)

# Six rows of per-channel constants: row r is ROWS[r], so that every swap changes a value. Powers of two, so
# every sum and product below is exact.
ROWS = torch.tensor([0.5, 2.0, 0.25, -1.0, 4.0, 0.125])


def _adaln_single_model():
    model = build_model(tiny_config(model={"timestep_conditioning": "adaln-single"}))
    randomize(model.denoiser)
    return model.denoiser


def test_adaln_single_rows_are_shift_scale_gate_twice():
    """design-space.md s.1 adaln-single (PixArt-alpha): block i's six modulations are
    t_block(temb).view(6, d) + table_i, read as (shift, scale, gate) for attention then for the MLP."""
    d = _adaln_single_model()
    dim, linear = d.dim, d.time.t_block[1]
    block = d.blocks[1]
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(ROWS.repeat_interleave(dim))  # global part: row r = ROWS[r]
        block.modulation.table.copy_(2 * ROWS[:, None].expand(6, dim))  # this block's: row r = 2 ROWS[r]
        temb = torch.randn(2, dim)
        attn, mlp = block.modulation(d.time.block_input(temb))
    x = torch.randn(2, 5, dim)
    row = [torch.full((dim,), 3 * float(r)) for r in ROWS]  # t_block + table
    for mod, (shift, scale, gate) in ((attn, row[0:3]), (mlp, row[3:6])):
        assert torch.equal(mod.pre(x), x * (1 + scale) + shift)
        assert torch.equal(mod.post(x), gate * x)

    # The global part is one Linear(d, 6d) on SiLU(temb).
    with torch.no_grad():
        randomize(d.time.t_block)
        attn, mlp = block.modulation(d.time.block_input(temb))
        six = (F.silu(temb) @ linear.weight.T + linear.bias).view(2, 6, dim) + block.modulation.table
    for j, (mod, name) in enumerate((m, n) for m in (attn, mlp) for n in ("shift", "scale", "gate")):
        torch.testing.assert_close(getattr(mod, name)[:, 0], six[:, j])


def test_adaln_single_block_output_by_hand():
    """design-space.md s.1: with the attention gate 0 the block is x + g * MLP(LN(x) (1 + scale) + shift);
    shift and scale swapped would give another output."""
    d = _adaln_single_model()
    dim, block = d.dim, d.blocks[0]
    rows = ROWS.clone()
    rows[2] = 0.0  # attention gate: the attention sublayer adds exactly nothing
    with torch.no_grad():
        d.time.t_block[1].weight.zero_()
        d.time.t_block[1].bias.zero_()
        block.modulation.table.copy_(rows[:, None].expand(6, dim))
        x = torch.randn(2, 16, dim)
        cond = d.time.block_input(torch.randn(2, dim))
        out = block(x, cond, None, None, NoRotary())
        shift, scale, gate = rows[3], rows[4], rows[5]
        want = x + gate * block.img_mlp(F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale) + shift)
        swapped = x + gate * block.img_mlp(F.layer_norm(x, (dim,), eps=1e-6) * (1 + shift) + scale)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, swapped)


def test_adaln_single_final_layer_is_table_plus_temb():
    """design-space.md s.1 adaln-single: the final layer is LN(x) (1 + scale) + shift, with (shift, scale)
    the rows of its learned (2, d) table plus the timestep embedding."""
    d = _adaln_single_model()
    dim = d.dim
    with torch.no_grad():
        d.final_norm.table.copy_(torch.stack([torch.full((dim,), 0.5), torch.full((dim,), 2.0)]))
        x, temb = torch.randn(2, 16, dim), torch.randn(2, dim)
        out = d.final_norm(x, temb)
    shift, scale = (0.5 + temb)[:, None], (2.0 + temb)[:, None]
    torch.testing.assert_close(out, F.layer_norm(x, (dim,), eps=1e-6) * (1 + scale) + shift)


# ------------------------------------------------------------------ F7: LI-DiT refiner gates (s.2)


def _lidit(two_llms: bool):
    model = build_model(lidit(extra=two_llms))
    randomize(model.denoiser)
    return model


def _masked_mean(x, mask):
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1)


def test_linguistic_refiner_output_depends_on_the_timestep():
    """design-space.md s.2: the refiner's gates read the timestep embedding, so with one LLM (no
    collaborative refiner) the refined text changes with t."""
    model = _lidit(two_llms=False)
    refined = []
    model.denoiser.context.register_forward_hook(lambda mod, args, out: refined.append(out[0]))
    x, text = torch.randn(2, 3, 16, 16), model.encode_prompts(PROMPTS)
    with torch.no_grad():
        model(x, torch.tensor([0.2, 0.7]), text)
        model(x, torch.tensor([0.2, 0.7]), text)
        model(x, torch.tensor([0.6, 0.1]), text)
    assert torch.equal(refined[0], refined[1])
    assert not torch.allclose(refined[0], refined[2])


def test_refiner_gates_read_pooled_text_plus_timestep_embedding():
    """design-space.md s.2: each linguistic gate reads SiLU(masked mean of the projected LLM features +
    temb); the collaborative refiner's read SiLU(mean over LLMs of the pooled refined text + temb)."""
    model = _lidit(two_llms=True)
    d = model.denoiser
    refiner = d.context
    assert isinstance(refiner.collaborative, CollaborativeRefiner)
    seen, refined = [], []
    for r in refiner.linguistic:
        r.register_forward_hook(lambda mod, args, out: refined.append(out))
        for block in r.blocks:
            block.gates.linear.register_forward_pre_hook(lambda mod, args: seen.append(("ling", args[0])))
    for branch in refiner.collaborative.branches:
        branch.gates.linear.register_forward_pre_hook(lambda mod, args: seen.append(("collab", args[0])))
    t, text = torch.tensor([0.3, 0.8]), model.encode_prompts(PROMPTS)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), t, text)
        temb = d.time.embed(t)
        want = [
            F.silu(_masked_mean(r.in_proj(c.hidden), c.mask) + temb)
            for r, c in zip(refiner.linguistic, text.all)
        ]
    pooled = torch.stack([_masked_mean(x, c.mask) for x, c in zip(refined, text.all)]).mean(0)
    assert [k for k, _ in seen] == ["ling"] * 4 + ["collab"] * 2
    for (_, got), w in zip(seen[:4], [w for w in want for _ in range(2)]):  # 2 blocks per refiner
        torch.testing.assert_close(got, w)
    for _, got in seen[4:]:
        torch.testing.assert_close(got, F.silu(pooled + temb))


# ------------------------------------------------------------------ F8: LI-DiT sizes (s.2)

# preset -> (depth, width, heads, head_dim, trainable DiT in millions). The shapes are design-space.md s.2's;
# the counts follow from fusedit's choices where the paper is silent (gated MLP x4, adaLN-single, per-layer
# text K/V, conv ResBlock): the paper's own counts are unknown.
LIDIT_SIZES = {
    "lidit-1b": (28, 1152, 16, 72, 821.7),
    "lidit-1b-collab": (28, 1152, 16, 72, 900.2),
    "recipe-lidit-3stage": (28, 1152, 16, 72, 821.7),
    "lidit-10b": (48, 2816, 44, 64, 8062.7),
}


@pytest.mark.parametrize("preset", sorted(LIDIT_SIZES))
def test_lidit_presets_have_the_papers_shapes(preset):
    """design-space.md s.2: LI-DiT-1B depth 28 / width 1152 / 16 heads; LI-DiT-10B 48 / 2816 / 44."""
    d = build_model(load_config(preset), "meta").denoiser
    depth, width, heads, head_dim, millions = LIDIT_SIZES[preset]
    attn = d.blocks[0].img_attn
    assert (len(d.blocks), d.dim, attn.heads, attn.kv_heads, attn.head_dim) == (
        depth,
        width,
        heads,
        heads,
        head_dim,
    )
    assert heads * head_dim == width
    assert round(count_parameters(d) / 1e6, 1) == millions
