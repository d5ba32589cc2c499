import pytest
import torch
import torch.nn.functional as F

from fusedit.layers.attention import attention, key_padding_mask
from fusedit.layers.embed import patchify, sincos_2d, unpatchify
from fusedit.layers.rope import inv_freq, rope_1d, rope_2d, rope_m, rope_text


@pytest.mark.parametrize("c, h, w, p", [(3, 8, 8, 2), (4, 16, 8, 2), (16, 8, 12, 4), (1, 4, 4, 1)])
def test_patchify_round_trip(c, h, w, p):
    x = torch.randn(2, c, h, w)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(tokens, p, h, w, c), x)
    # token k is the patch at row k // (w/p), column k % (w/p), row-major
    k = (w // p) + 1
    patch = x[0, :, p : 2 * p, p : 2 * p].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[0, k], patch)


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError, match="latent size 7x8 is not divisible by patch size 2"):
        patchify(torch.randn(1, 3, 7, 8), 2)


def test_mrope_of_a_text_token_is_1d_rope():
    """M-RoPE uses (p, p) for text: with the 1D frequency ladder split by axis, that is 1D RoPE at p."""
    head_dim, theta = 16, 10000.0
    # a 1 x 1 "image" at offset p has row = col = p
    offsets = torch.arange(5)
    for p in range(5):
        m = rope_m(1, 1, offsets[p : p + 1], inv_freq(head_dim, theta))
        ref = rope_text(torch.arange(p + 1)[None], inv_freq(head_dim, theta))
        torch.testing.assert_close(m.cos[0, 0, 0], ref.cos[0, 0, p])
        torch.testing.assert_close(m.sin[0, 0, 0], ref.sin[0, 0, p])


def test_rope_positions_follow_text_length():
    head_dim, theta = 16, 100.0
    lengths = torch.tensor([3, 7])
    r = rope_1d(2, 2, lengths, inv_freq(head_dim, theta))
    ref = rope_text(torch.arange(11)[None], inv_freq(head_dim, theta))
    for b, L in enumerate(lengths.tolist()):
        torch.testing.assert_close(r.cos[b, 0], ref.cos[0, 0, L : L + 4])
    # 2D: the first half of the rotary pairs follow the row, the second half the column
    r2 = rope_2d(2, 3, torch.tensor([4]), head_dim, theta)
    q = head_dim // 4
    rows, cols = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    torch.testing.assert_close(r2.cos[0, 0, :, :q], torch.cos((4 + rows)[:, None] * freqs))
    torch.testing.assert_close(r2.cos[0, 0, :, q : 2 * q], torch.cos((4 + cols)[:, None] * freqs))
    # rotations preserve norms
    x = torch.randn(1, 2, 6, head_dim)
    torch.testing.assert_close(r2.apply(x).norm(dim=-1), x.norm(dim=-1))


def test_image_query_attention_equals_the_dense_joint_mask():
    """Our image-rows-only attention with a key-padding mask equals the image rows of one attention over
    [text ; image] with the dense FuseDiT mask (text causal, text -> image masked, padded text keys masked)."""
    B, H, KVH, T, N, d = 2, 4, 2, 5, 6, 8
    q_txt, q_img = torch.randn(B, H, T, d), torch.randn(B, H, N, d)
    k, v = torch.randn(B, KVH, T + N, d), torch.randn(B, KVH, T + N, d)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    ours = attention(q_img, k, v, key_padding_mask(text_mask, N))

    S = T + N
    dense = torch.zeros(B, 1, S, S, dtype=torch.bool)
    dense[:, :, :T, :T] = torch.tril(torch.ones(T, T, dtype=torch.bool))
    dense[:, :, T:, :] = True
    dense &= torch.cat([text_mask, torch.ones(B, N, dtype=torch.bool)], 1)[:, None, None, :]
    dense[:, :, :T, :T] |= torch.eye(T, dtype=torch.bool)  # keep padded text rows finite (they are unused)
    q_all = torch.cat([q_txt, q_img], dim=2)
    k_rep, v_rep = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
    ref = F.scaled_dot_product_attention(q_all, k_rep, v_rep, attn_mask=dense)[:, :, T:]
    torch.testing.assert_close(ours, ref.transpose(1, 2).flatten(2))


def test_sincos_2d_shape_and_distinct_positions():
    e = sincos_2d(32, 3, 4)
    assert e.shape == (12, 32)
    assert torch.cdist(e, e).fill_diagonal_(1.0).min() > 0.1
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 2, 2)


def test_an_ape_table_is_built_once_per_grid_and_dtype_and_serves_training_after_sampling(monkeypatch):
    """The table is a constant of (width, h, w, device, dtype): built at the first forward that meets it, not
    at every step; one first built under inference_mode (sampling) still takes part in a backward."""
    from fusedit.layers import position
    from fusedit.layers.embed import scaled_sincos_2d

    built = []
    real_plain, real_scaled = position.sincos_2d, position.scaled_sincos_2d
    monkeypatch.setattr(position, "sincos_2d", lambda *a: built.append(a[1:3]) or real_plain(*a))
    monkeypatch.setattr(position, "scaled_sincos_2d", lambda *a: built.append(a[1:3]) or real_scaled(*a))
    plain, scaled = position.APE(8, 1e4), position.APE(8, 1e4, base_size=4, max_size=6)
    x = torch.randn(2, 12, 8)
    with torch.inference_mode():
        first = plain.add_absolute(x, 3, 4)
    for _ in range(2):
        assert torch.equal(plain.add_absolute(x, 3, 4), first) and torch.equal(first, x + sincos_2d(8, 3, 4))
        assert torch.equal(scaled.add_absolute(x, 4, 3), x + scaled_sincos_2d(8, 4, 3, 4, 6))
    assert plain.add_absolute(x.double(), 3, 4).dtype == torch.float64
    assert built == [(3, 4), (4, 3), (3, 4)]  # once per grid, and once for the float64 call
    y = x.clone().requires_grad_()
    plain.add_absolute(y, 3, 4).square().sum().backward()
    assert torch.equal(y.grad, 2 * (x + sincos_2d(8, 3, 4)))
