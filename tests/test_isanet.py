"""ISANet: interlaced sparse self-attention against its definition — two masked dense attentions,
and the same written as loops — and, with ``pad_mode="zeros"``, against a transcription of the
official ``ISA_Block``; plus full reach, padding at every size, and argument checks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.core import attend
from attnlib.isanet import InterlacedSparseAttention, _Layout, interlaced_sparse_attention_memory, interlaced_sparse_flops
from conftest import randomize_

C, KEY, VALUE, OUT = 6, 4, 5, 7


def random_isa(down_factor=(2, 3), seed=0) -> InterlacedSparseAttention:
    block = InterlacedSparseAttention(C, KEY, VALUE, OUT, down_factor=down_factor)
    return randomize_(block, seed=seed, std=0.4).double().eval()


def padding(h, w, down_factor):
    """(top, bottom, left, right) of the official code: pad to multiples, half (rounded down) before."""
    dh, dw = down_factor
    pad_h, pad_w = math.ceil(h / dh) * dh - h, math.ceil(w / dw) * dw - w
    return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2


def groupings(h, w, down_factor):
    """Padded size, the real-position mask and, for each stage, "u and v are in one group" (N_p×N_p)."""
    (dh, dw), (top, bottom, left, right) = down_factor, padding(h, w, down_factor)
    hp, wp = h + top + bottom, w + left + right
    rows, cols = [p // wp for p in range(hp * wp)], [p % wp for p in range(hp * wp)]
    real = torch.tensor([top <= r < top + h and left <= c < left + w for r, c in zip(rows, cols)])
    same_offset = torch.tensor([[ru % dh == rv % dh and cu % dw == cv % dw for rv, cv in zip(rows, cols)]
                                for ru, cu in zip(rows, cols)])
    same_block = torch.tensor([[ru // dh == rv // dh and cu // dw == cv // dw for rv, cv in zip(rows, cols)]
                               for ru, cu in zip(rows, cols)])
    return (hp, wp), real, same_offset, same_block


def key_mask(same_group, real):
    """Padded keys out; a group with no real key keeps all of its keys."""
    keys = same_group & real[None, :]
    return torch.where(keys.any(dim=1, keepdim=True), keys, same_group)


def stage_inputs(sa, x):
    return [m(x).flatten(2).transpose(1, 2) for m in (sa.query, sa.key, sa.value)]  # B×N_p×·


@torch.no_grad()
def dense_isa(block, x):
    """Long-range then short-range, each as ONE dense N_p×N_p attention masked to its groups."""
    b, _, h, w = x.shape
    (hp, wp), real, same_offset, same_block = groupings(h, w, block.down_factor)
    top, bottom, left, right = padding(h, w, block.down_factor)
    y = F.pad(x, (left, right, top, bottom))
    for sa, same_group in ((block.long_range, same_offset), (block.short_range, same_block)):
        context, _ = attend(*stage_inputs(sa, y), scale=KEY ** -0.5, mask=key_mask(same_group, real), fused=False)
        y = sa.out(context.transpose(1, 2).reshape(b, -1, hp, wp))
    return y[:, :, top:top + h, left:left + w]


@torch.no_grad()
def loop_attention(sa, x, same_group, real):
    """One self-attention block on one image (C×H_p×W_p), query by query: ρ(Σ_v softmax(q_u·k_v/√d_k) g_v)."""
    q, k, v = (t[0] for t in stage_inputs(sa, x[None]))
    n = q.shape[0]
    weights = torch.zeros(n, n, dtype=x.dtype)
    context = torch.zeros_like(v)
    for u in range(n):
        keys = [j for j in range(n) if same_group[u, j] and real[j]] or [j for j in range(n) if same_group[u, j]]
        a = torch.softmax(torch.stack([q[u] @ k[j] for j in keys]) / math.sqrt(KEY), dim=0)
        for j, a_j in zip(keys, a):
            weights[u, j] = a_j
            context[u] += a_j * v[j]
    return sa.out(context.T.reshape(1, -1, *x.shape[1:]))[0], weights


@torch.no_grad()
def loop_isa(block, x):
    """The block on one image by loops; returns the cropped output and A^L, A^S over the padded map."""
    _, h, w = x.shape
    _, real, same_offset, same_block = groupings(h, w, block.down_factor)
    top, bottom, left, right = padding(h, w, block.down_factor)
    y, a_long = loop_attention(block.long_range, F.pad(x, (left, right, top, bottom)), same_offset, real)
    z, a_short = loop_attention(block.short_range, y, same_block, real)
    return z[:, top:top + h, left:left + w], a_long, a_short


SIZES = [(4, 6), (5, 7), (1, 2), (3, 8)]  # divisible by (2, 3), padded both ways, smaller than a block


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("h,w", SIZES)
def test_equals_two_masked_dense_attentions(h, w, fused):
    block = random_isa()
    block.fused = fused
    x = torch.randn(2, C, h, w, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), dense_isa(block, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("h,w", SIZES[:2])
def test_equals_loop_definition(h, w):
    block = random_isa()
    x = torch.randn(2, C, h, w, dtype=torch.float64)
    out = block(x)
    for b in range(2):
        torch.testing.assert_close(out[b], loop_isa(block, x[b])[0])


@pytest.mark.parametrize("h,w", SIZES)
def test_attention_map_equals_loop_definition(h, w):
    block = random_isa()
    x = torch.randn(1, C, h, w, dtype=torch.float64)
    _, a_long, a_short = loop_isa(block, x[0])
    top, _, left, right = padding(h, w, block.down_factor)
    wp = w + left + right
    for i, j in {(0, 0), (h // 2, w // 2), (h - 1, w - 1)}:
        u = (i + top) * wp + (j + left)
        composed = (a_short[u] @ a_long).reshape(-1, wp)[top:top + h, left:left + w]
        amap = attnlib.attention_map(block, x, (i, j))[0]
        torch.testing.assert_close(amap, composed)
        torch.testing.assert_close(amap.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_attention_map_reaches_every_position_when_divisible():
    block = random_isa()
    x = torch.randn(2, C, 6, 9, dtype=torch.float64)
    for query in [(0, 0), (3, 4), (5, 8)]:
        assert (attnlib.attention_map(block, x, query) > 0).all()


def test_every_output_depends_on_every_input_when_divisible():
    """The Jacobian's non-zero pattern, one output position at a time (a random mix of its channels)."""
    block = random_isa()
    h, w = 4, 6
    x = torch.randn(1, C, h, w, dtype=torch.float64, requires_grad=True)
    out = block(x)
    probe = torch.randn_like(out)
    for i in range(h):
        for j in range(w):
            (grad,) = torch.autograd.grad((out * probe)[..., i, j].sum(), x, retain_graph=True)
            assert (grad[0].abs().sum(dim=0) != 0).all(), (i, j)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_size_from_1_to_10_works(train, fused):
    """Blocks of 3×4: sizes below, at and between multiples, so some long-range groups hold no real key."""
    block = randomize_(InterlacedSparseAttention(C, KEY, VALUE, OUT, down_factor=(3, 4), fused=fused)).train(train)
    for h in range(1, 11):
        for w in range(1, 11):
            x = torch.randn(1, C, h, w)
            with torch.no_grad():
                out = block(x)
                assert out.shape == (1, OUT, h, w) and torch.isfinite(out).all(), (h, w)
                if not train:
                    amap = block.attention_map(x, (h - 1, w // 2))
                    assert torch.isfinite(amap).all() and (amap >= 0).all(), (h, w)
                    torch.testing.assert_close(amap.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("h,w", [(4, 6), (5, 7)], ids=["divisible", "padded"])
def test_output_takes_the_input_layout(h, w, grad, fused):
    """The steps run on tokens, channels last; the output comes back in x's layout, contiguous
    or channels last, as a convolution's would, with the same values."""
    block = attnlib.set_fused(random_isa(), fused)
    x = torch.randn(2, C, h, w, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        out = block(x)
        out_last = block(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous()
    assert out_last.is_contiguous(memory_format=torch.channels_last) and not out_last.is_contiguous()
    torch.testing.assert_close(out_last, out, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["long", "short"])
def test_grouping_is_a_permutation_of_the_padded_tokens(kind):
    """group and ungroup invert each other; group's rows are index's groups of positions;
    blocks and to_map pad and crop with zeros."""
    layout = _Layout.of(5, 7, (2, 3))
    x = torch.randn(2, C, 5, 7, dtype=torch.float64)
    blocks = layout.blocks(x)
    groups = layout.group(blocks, kind)  # (B·groups)×C×S×1
    assert groups.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layout.ungroup(groups, kind), blocks, rtol=0, atol=0)
    torch.testing.assert_close(layout.to_map(layout.ungroup(groups, kind), like=x), x, rtol=0, atol=0)
    padded = layout.pad(x).flatten(2)  # B×C×N_p
    index = layout.index(kind, x.device)  # groups×S
    expected = padded[:, :, index].permute(0, 2, 1, 3).reshape(groups.shape[:3])
    torch.testing.assert_close(groups[..., 0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -1, (2, 0), (0, 2), 1.5, (2.0, 2), (2,), (2, 2, 2), True, "8"])
def test_bad_down_factor_raises(bad):
    with pytest.raises(ValueError, match="down_factor"):
        InterlacedSparseAttention(C, KEY, VALUE, OUT, down_factor=bad)


def test_int_down_factor_means_square_blocks():
    assert InterlacedSparseAttention(C, KEY, VALUE, OUT, down_factor=4).down_factor == (4, 4)


def test_flops_count_the_padded_map():
    kwargs = dict(key_channels=KEY, value_channels=VALUE, out_channels=OUT, down_factor=(3, 4))
    assert interlaced_sparse_flops(2, C, 7, 11, **kwargs) == interlaced_sparse_flops(2, C, 9, 12, **kwargs)
    n, g, p = 9 * 12, 3 * 3, 3 * 4
    conv = sum(2 * 2 * n * (2 * (c_in * KEY + KEY * KEY) + c_in * VALUE + VALUE * OUT) for c_in in (C, OUT))
    matmul = 2 * 2 * (p * g * g + g * p * p) * (KEY + VALUE)
    assert interlaced_sparse_flops(2, C, 9, 12, **kwargs) == {"conv": conv, "matmul": matmul}


def test_attention_memory_formula():
    # 1×512×256×128 at 8×8 (the official benchmark): G = 32·16 = 512 blocks of P = 64 positions.
    g, p = 512, 64
    kw = {"key_channels": 64}
    assert interlaced_sparse_attention_memory(1, 512, 256, 128, down_factor=(8, 8), **kw) == (p * g * g + g * p * p) * 4
    assert interlaced_sparse_attention_memory(1, 512, 250, 121, down_factor=8, **kw) == (p * g * g + g * p * p) * 4
    assert interlaced_sparse_attention_memory(1, 512, 256, 128, down_factor=8, fused=True, key_channels=16) == 0
    # On a CPU a stage takes the flash kernel only where its groups have more positions than
    # key_channels + value_channels: from 32 + 32 channels on, the 64-position short-range matrices are
    # stored; from 256 + 256 on, the 512-position long-range ones too.  On CUDA neither is, below 64 and 512.
    for key_channels in (32, 64, 255):
        assert interlaced_sparse_attention_memory(1, 512, 256, 128, down_factor=8, fused=True,
                                                  key_channels=key_channels) == g * p * p * 4
    assert interlaced_sparse_attention_memory(1, 512, 256, 128, down_factor=8, fused=True,
                                              key_channels=256) == (p * g * g + g * p * p) * 4
    assert interlaced_sparse_attention_memory(1, 512, 256, 128, down_factor=8, fused=True, key_channels=63,
                                              device="cuda") == 0


def test_memory_formula_follows_the_kernel_that_runs(monkeypatch):
    """value ≠ key width: no CPU flash kernel, so the fused path stores its matrices (and says so); on CUDA it would not."""
    import attnlib.core as core

    calls = []
    sdpa = core.F.scaled_dot_product_attention
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    # 4-position groups: more than 1 + 1 key and value channels, so with equal widths the flash kernel runs
    unequal = InterlacedSparseAttention(8, 1, 6, 8, down_factor=(2, 2)).eval()
    equal = InterlacedSparseAttention(8, 1, 1, 8, down_factor=(2, 2)).eval()
    with torch.no_grad():
        unequal(torch.randn(1, 8, 4, 4))
        assert not calls
        equal(torch.randn(1, 8, 4, 4))
        assert len(calls) == 2  # both stages
    assert unequal.attention_memory(1, 4, 4) == (4 * 4 * 4 + 4 * 4 * 4) * 4 and equal.attention_memory(1, 4, 4) == 0
    assert interlaced_sparse_attention_memory(1, 8, 4, 4, key_channels=1, value_channels=6, down_factor=(2, 2),
                                              fused=True, device="cuda") == 0


@torch.no_grad()
def openseg_isa_block(block, x):
    """openseg.pytorch ``ISA_Block.forward`` and ``SelfAttentionBlock2D.forward``, line by line
    (lib/models/modules/isa_block.py), on the weights of ``block``: zero padding, no mask."""

    def self_attention_block_2d(sa, x):
        batch_size, h, w = x.size(0), x.size(2), x.size(3)
        value = sa.value(x).view(batch_size, sa.value.out_channels, -1).permute(0, 2, 1)
        query = sa.query(x).view(batch_size, sa.key_channels, -1).permute(0, 2, 1)
        key = sa.key(x).view(batch_size, sa.key_channels, -1)
        sim_map = torch.matmul(query, key)
        sim_map = (sa.key_channels ** -.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).contiguous()
        return sa.out(context.view(batch_size, sa.value.out_channels, h, w))

    n, c, h, w = x.size()
    dh, dw = block.down_factor
    out_h, out_w = math.ceil(h / dh), math.ceil(w / dw)
    pad_h, pad_w = out_h * dh - h, out_w * dw - w
    if pad_h > 0 or pad_w > 0:
        feats = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    else:
        feats = x
    feats = feats.view(n, c, out_h, dh, out_w, dw)
    feats = feats.permute(0, 3, 5, 1, 2, 4).contiguous().view(-1, c, out_h, out_w)
    feats = self_attention_block_2d(block.long_range, feats)
    c = block.out_channels
    feats = feats.view(n, dh, dw, c, out_h, out_w)
    feats = feats.permute(0, 4, 5, 3, 1, 2).contiguous().view(-1, c, dh, dw)
    feats = self_attention_block_2d(block.short_range, feats)
    feats = feats.view(n, out_h, out_w, c, dh, dw).permute(0, 3, 1, 4, 2, 5)
    feats = feats.contiguous().view(n, c, dh * out_h, dw * out_w)
    if pad_h > 0 or pad_w > 0:
        feats = feats[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
    return feats


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("h,w", SIZES)
def test_zeros_padding_equals_official_isa_block(h, w, train, fused):
    """In train mode too: BatchNorm sees the same padded positions in both (batch statistics)."""
    block = random_isa()
    block.pad_mode, block.fused = "zeros", fused
    official = copy.deepcopy(block.train(train))
    x = torch.randn(2, C, h, w, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), openseg_isa_block(official, x), rtol=0, atol=1e-12)
    if train:  # and the running statistics moved the same way
        for ours, theirs in zip(block.buffers(), official.buffers()):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_pad_modes_agree_exactly_when_divisible_and_differ_otherwise():
    masked = random_isa()
    zeros = copy.deepcopy(masked)
    zeros.pad_mode = "zeros"
    with torch.no_grad():
        x = torch.randn(2, C, 4, 6, dtype=torch.float64)  # divisible by (2, 3)
        assert torch.equal(masked(x), zeros(x))
        x = torch.randn(2, C, 5, 7, dtype=torch.float64)
        gap = (masked(x) - zeros(x)).abs().amax(dim=1)  # per position
    assert (gap > 1e-6).all()  # padding reaches every position: through the long range, then the short


def test_zeros_padding_attention_map_loses_the_padded_share():
    block = random_isa()
    block.pad_mode = "zeros"
    h, w = 5, 7
    x = torch.randn(1, C, h, w, dtype=torch.float64)
    (hp, wp), _, same_offset, same_block = groupings(h, w, block.down_factor)
    top, bottom, left, right = padding(h, w, block.down_factor)
    everyone = torch.ones(hp * wp, dtype=torch.bool)  # no key is hidden
    y, a_long = loop_attention(block.long_range, F.pad(x[0], (left, right, top, bottom)), same_offset, everyone)
    _, a_short = loop_attention(block.short_range, y, same_block, everyone)
    for i, j in [(0, 0), (2, 3), (4, 6)]:
        u = (i + top) * wp + (j + left)
        full = (a_short[u] @ a_long).reshape(hp, wp)
        amap = attnlib.attention_map(block, x, (i, j))[0]
        torch.testing.assert_close(amap, full[top:top + h, left:left + w])
        assert 0 < amap.sum() < 1 and torch.isclose(full.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("bad", ["reflect", "", None, "Mask"])
def test_bad_pad_mode_raises(bad):
    with pytest.raises(ValueError, match=r"pad_mode in \('mask', 'zeros'\), got"):
        InterlacedSparseAttention(C, KEY, VALUE, OUT, pad_mode=bad)


def test_attention_maps_are_rows_of_the_product_of_the_two_matrices():
    block = random_isa()
    h, w = 5, 7
    x = torch.randn(2, C, h, w, dtype=torch.float64)
    a_long, a_short = block.attention_matrices(x)
    (hp, wp), real, same_offset, same_block = groupings(h, w, block.down_factor)
    assert a_long.shape == a_short.shape == (2, hp * wp, hp * wp)
    assert (a_long[:, ~same_offset] == 0).all() and (a_short[:, ~same_block] == 0).all()  # block-sparse
    queries = [(0, 0), (2, 3), (4, 6), (1, 5)]
    maps = block.attention_maps(x, queries)
    top, _, left, _ = padding(h, w, block.down_factor)
    for q, (i, j) in enumerate(queries):
        torch.testing.assert_close(maps[:, q], block.attention_map(x, (i, j)))
        u = (i + top) * wp + (j + left)
        torch.testing.assert_close(maps[:, q], (a_short[:, u:u + 1] @ a_long)[:, 0, real].reshape(2, h, w))


def reachable(h, w, down_factor, pad_mode):
    """u → v in two steps: through w, the position of u's block with v's offset; masked, w must be real."""
    (hp, wp), real, same_offset, same_block = groupings(h, w, down_factor)
    relay_ok = real if pad_mode == "mask" else torch.ones_like(real)
    # (u, v) is reachable iff some w is in u's block, has v's offset, and may relay
    reach = (same_block & relay_ok[None, :]).double() @ same_offset.double() > 0
    return reach[real][:, real]


@pytest.mark.parametrize("pad_mode", ["mask", "zeros"])
def test_reach_of_every_query_follows_the_relay_rule(pad_mode):
    """Masked padding loses the pairs whose only relay is a padded position; zero padding keeps them."""
    block = random_isa()
    block.pad_mode = pad_mode
    h, w = 5, 7
    x = torch.randn(1, C, h, w, dtype=torch.float64)
    maps = block.attention_maps(x, [(i, j) for i in range(h) for j in range(w)])[0]
    expected = reachable(h, w, block.down_factor, pad_mode)
    assert torch.equal(maps.reshape(h * w, h * w) > 0, expected)
    assert expected.all() == (pad_mode == "zeros")


def test_attention_maps_refuse_a_query_outside_the_map():
    with pytest.raises(ValueError, match="query"):
        random_isa().attention_maps(torch.randn(1, C, 4, 6, dtype=torch.float64), [(0, 0), (4, 0)])
