"""ANN (APNB, AFNB): the pyramid sampling, the blocks and their maps against loop definitions."""
from __future__ import annotations

import math
import re

import pytest
import torch

import attnlib
from attnlib.ann import (AFNB, APNB, afnb_flops, apnb_attention_memory, apnb_flops, num_samples, pyramid_sample,
                         spread_to_pixels)
from attnlib.core import attend
from conftest import measured_flops, randomize_


def bin_edges(length: int, n: int) -> list[tuple[int, int]]:
    """Adaptive pooling's bins along one side, written out: [floor(kL/n), ceil((k+1)L/n))."""
    return [(k * length // n, -((-(k + 1) * length) // n)) for k in range(n)]


def levels(pool_sizes):
    """Each level as (rows, cols): n means n×n."""
    return [(n, n) if isinstance(n, int) else n for n in pool_sizes]


def loop_pyramid(x: torch.Tensor, pool_sizes) -> torch.Tensor:
    """P(x) for one C×H×W map: the mean of every bin, coarsest pyramid level first, row-major."""
    _, h, w = x.shape
    samples = []
    for rows, cols in levels(pool_sizes):
        for top, bottom in bin_edges(h, rows):
            for left, right in bin_edges(w, cols):
                samples.append(x[:, top:bottom, left:right].mean(dim=(1, 2)))
    return torch.stack(samples, dim=1)  # C×S


def loop_map(row: torch.Tensor, h: int, w: int, pool_sizes) -> torch.Tensor:
    """Pixel p's weight Σ_{bins b ∋ p} a_b / |b|, bin by bin."""
    amap = torch.zeros(h, w, dtype=row.dtype)
    s = 0
    for rows, cols in levels(pool_sizes):
        for top, bottom in bin_edges(h, rows):
            for left, right in bin_edges(w, cols):
                amap[top:bottom, left:right] += row[s] / ((bottom - top) * (right - left))
                s += 1
    return amap


def conv1x1(x, conv):
    out = torch.einsum("oc,chw->ohw", conv.weight.flatten(1), x)
    return out if conv.bias is None else out + conv.bias[:, None, None]


def batch_norm(x, bn):
    x = (x - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    return x * bn.weight[:, None, None] + bn.bias[:, None, None]


def conv_bn_relu(x, seq):
    return torch.relu(batch_norm(conv1x1(x, seq[0]), seq[1]))


@torch.no_grad()
def loop_block(block, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image through the paper's equations as loops; APNB is the case low = high (and φ = θ)."""
    phi = conv_bn_relu(high, block.f_key if block.f_query is None else block.f_query).flatten(1)  # d×N
    theta_p = loop_pyramid(conv_bn_relu(low, block.f_key), block.pool_sizes)  # d×S
    gamma_p = loop_pyramid(conv1x1(low, block.f_value), block.pool_sizes)  # d_v×S
    n, s = phi.shape[1], theta_p.shape[1]
    weights = torch.zeros(n, s, dtype=low.dtype)
    for i in range(n):
        for b in range(s):
            weights[i, b] = math.exp(float(phi[:, i] @ theta_p[:, b]) / math.sqrt(block.key_channels))
        weights[i] /= weights[i].sum()
    o = (gamma_p @ weights.T).reshape(-1, *high.shape[1:])  # O_P^T as d_v×H×W
    z = batch_norm(conv1x1(torch.cat([conv1x1(o, block.W), high]), block.fuse[0]), block.fuse[1])
    return (torch.relu(z) if isinstance(block, APNB) else z), weights


def make_apnb(pool_sizes=(1, 2, 3), c=5, out=5, **kwargs):
    torch.manual_seed(0)
    return randomize_(APNB(c, out, 4, 3, pool_sizes=pool_sizes, **kwargs), std=0.4).double().eval()


def make_afnb(pool_sizes=(1, 2, 3), **kwargs):
    torch.manual_seed(0)
    return randomize_(AFNB(4, 6, 5, 3, 3, pool_sizes=pool_sizes, **kwargs), std=0.4).double().eval()


# --- pyramid sampling ------------------------------------------------------------------------


def test_paper_pyramid_has_110_samples():
    assert num_samples((1, 3, 6, 8)) == 1 + 9 + 36 + 64 == 110
    assert pyramid_sample(torch.randn(2, 3, 16, 16)).shape == (2, 3, 110)
    assert APNB(8, 8, 4, 4).attention_weights(torch.randn(1, 8, 12, 9)).shape == (1, 108, 110)


@pytest.mark.parametrize("size", [(12, 12), (7, 11), (5, 3)], ids=["divisible", "overlapping", "smaller-than-8"])
@pytest.mark.parametrize("pool_sizes", [(1, 3, 6, 8), (1, (2, 3), (5, 4))], ids=["paper", "rectangular"])
def test_pyramid_sample_is_the_mean_of_each_bin(size, pool_sizes):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    out = pyramid_sample(x, pool_sizes)
    assert out.shape == (2, 3, num_samples(pool_sizes))
    for b in range(2):
        torch.testing.assert_close(out[b], loop_pyramid(x[b], pool_sizes))


def test_bin_edges_overlap_when_not_divisible():
    """The hand-written bins really do overlap on 7 with 3 bins: the map tests cover that case."""
    assert bin_edges(7, 3) == [(0, 3), (2, 5), (4, 7)]


@pytest.mark.parametrize("bad", [0, -1, (), (3, 0), 2.5, (2.5,), (True,), "13", None, ((2, 0),), ((1, 2, 3),),
                                 ([2, 3],), ((2, True),)])
def test_bad_pool_sizes_raise(bad):
    pattern = "pool_sizes.*" + re.escape(repr(bad))
    for build in (lambda: pyramid_sample(torch.randn(1, 2, 4, 4), bad), lambda: num_samples(bad),
                  lambda: APNB(4, 4, 2, 2, pool_sizes=bad), lambda: AFNB(3, 4, 4, 2, 2, pool_sizes=bad)):
        with pytest.raises(ValueError, match=pattern):
            build()


# --- the blocks against the equations --------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("pool_sizes", [(1, 2, 3), (1, 3, 6, 8)])
def test_apnb_equals_loop_definition(fused, pool_sizes):
    block = make_apnb(pool_sizes, out=7)  # out_channels != in_channels: the fusion conv takes out + in
    block.fused = fused
    x = torch.randn(2, 5, 5, 7, dtype=torch.float64)
    out, weights = block(x), block.attention_weights(x)
    assert out.shape == (2, 7, 5, 7)
    for b in range(2):
        expected, expected_weights = loop_block(block, x[b], x[b])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(weights[b], expected_weights)


@pytest.mark.parametrize("fused", [False, True])
def test_afnb_equals_loop_definition(fused):
    block = make_afnb()
    block.fused = fused
    low, high = torch.randn(2, 4, 5, 7, dtype=torch.float64), torch.randn(2, 6, 5, 7, dtype=torch.float64)
    out, weights = block(low, high), block.attention_weights(low, high)
    assert out.shape == (2, 5, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(out, block.fuse(torch.cat([block.context(low, high), high], dim=1)))
    for b in range(2):
        expected, expected_weights = loop_block(block, low[b], high[b])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(weights[b], expected_weights)


@pytest.mark.parametrize("kind", ["apnb", "afnb"])
def test_folded_fusion_trains_as_the_concatenation(kind):
    """The fast path folds W_o into the fusion conv; in a training step (BatchNorm on batch
    statistics) its output and every gradient, W_o's and the fusion conv's included, are
    those of conv(cat[W_o(O), X])."""
    block = (make_apnb(out=7, dropout=0.0) if kind == "apnb" else make_afnb(dropout=0.0)).train()
    inputs = [torch.randn(2, 5, 5, 7, dtype=torch.float64)] if kind == "apnb" else [
        torch.randn(2, 4, 5, 7, dtype=torch.float64), torch.randn(2, 6, 5, 7, dtype=torch.float64)]
    results = []
    for fused in (False, True):
        block.fused = fused
        xs = [t.clone().requires_grad_() for t in inputs]
        out = block(*xs)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                    [*xs, *block.parameters()])
        results.append((out, grads))
    (reference, reference_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12)
    for g_fused, g_reference in zip(fused_grads, reference_grads):
        torch.testing.assert_close(g_fused, g_reference, rtol=0, atol=1e-12)


def test_default_widths_follow_the_official_network():
    """APNB(512) is the official context block (512 → 512, 256 key/value channels); AFNB(1024, 2048) its fusion."""
    apnb, afnb = APNB(512), AFNB(1024, 2048)
    assert (apnb.out_channels, apnb.key_channels, apnb.value_channels) == (512, 256, 256)
    assert (afnb.out_channels, afnb.key_channels, afnb.value_channels) == (2048, 256, 256)
    assert APNB(8, key_channels=3).value_channels == 3
    assert APNB(512)(torch.randn(1, 512, 6, 7)).shape == (1, 512, 6, 7)
    with pytest.raises(ValueError, match="in_channels // reduction >= 1.*1 // 2 = 0"):
        APNB(1)


def test_apnb_query_and_key_share_one_projection():
    block = APNB(8, 8, 4, 4)
    assert block.f_query is None
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules()) == 2  # f_key's and the fusion's


@pytest.mark.parametrize("fused", [False, True])
def test_full_grid_apnb_is_nonlocal_with_shared_query_and_key(fused):
    """Pool size = H = W samples every pixel once, in order: APNB is then dense non-local attention, θ = φ."""
    block = make_apnb(pool_sizes=(5,))
    block.fused = fused
    x = torch.randn(2, 5, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        q = block.f_key(x).flatten(2).transpose(1, 2)  # θ = φ, B×N×d
        v = block.f_value(x).flatten(2).transpose(1, 2)
        dense, dense_weights = attend(q, q, v, scale=block.key_channels ** -0.5, need_weights=True)
        context = block.W(dense.transpose(1, 2).reshape(2, -1, 5, 5))
        expected = block.fuse(torch.cat([context, x], dim=1))
        torch.testing.assert_close(block.attention_weights(x), dense_weights)
        torch.testing.assert_close(block.context(x), context)
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("fused", [False, True])
def test_full_grid_of_a_rectangular_map_is_nonlocal(fused):
    """One level of (H, W) bins on an H×W map: S = N and APNB's weights are the dense N×N softmax."""
    block = make_apnb(pool_sizes=((4, 6),))
    block.fused = fused
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        q = block.f_key(x).flatten(2).transpose(1, 2)
        v = block.f_value(x).flatten(2).transpose(1, 2)
        dense, dense_weights = attend(q, q, v, scale=block.key_channels ** -0.5, need_weights=True)
        expected = block.fuse(torch.cat([block.W(dense.transpose(1, 2).reshape(2, -1, 4, 6)), x], dim=1))
        torch.testing.assert_close(block.attention_weights(x), dense_weights)
        torch.testing.assert_close(block(x), expected)
        amap = attnlib.attention_map(block, x, (1, 4))
        torch.testing.assert_close(amap, dense_weights[:, 1 * 6 + 4].reshape(2, 4, 6))


# --- AFNB's asymmetry: queries from high, keys and values from low ----------------------------


def test_afnb_queries_come_from_high_keys_and_values_from_low():
    block = make_afnb()
    low = torch.randn(1, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    high = torch.randn(1, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    i, j = 2, 3
    grad_low, grad_high = torch.autograd.grad(block(low, high)[0, :, i, j].sum(), (low, high))
    # high enters through pixel (i, j)'s query and its fusion only; low through every pooled bin
    # (the 1×1 level covers the whole map), so every low pixel moves this output.
    untouched = torch.ones(5, 7, dtype=torch.bool)
    untouched[i, j] = False
    assert (grad_high[0][:, untouched] == 0).all() and (grad_high[0, :, i, j] != 0).any()
    assert (grad_low[0].abs().sum(dim=0) > 0).all()

    with torch.no_grad():
        weights = block.attention_weights(low, high)
        bumped = high.clone()
        bumped[0, :, i, j] += 1.0
        changed = (block.attention_weights(low, bumped) - weights).abs().amax(dim=-1)[0]
        assert changed[i * 7 + j] > 0 and (changed.reshape(5, 7)[untouched] == 0).all()
        # One low pixel moves the keys and values of its bins: every query's output changes (a query
        # whose φ is all zero after the ReLU attends uniformly, so its weights alone may not).
        bumped = low.clone()
        bumped[0, :, 0, 0] += 1.0
        assert (block.attention_weights(bumped, high) != weights).any()
        moved = block._attend(bumped, high, need_weights=False)[0] - block._attend(low, high, need_weights=False)[0]
        assert (moved.abs().amax(dim=-1) > 0).all()


def test_afnb_rejects_mismatched_low_and_high():
    block = AFNB(4, 6, 5, 3, 3)
    high = torch.randn(2, 6, 5, 7)
    for low in (torch.randn(2, 4, 5, 6), torch.randn(1, 4, 5, 7)):
        with pytest.raises(ValueError, match="spatial size.*" + re.escape(f"{tuple(low.shape)} and high (2, 6, 5, 7)")):
            block(low, high)
    with pytest.raises(ValueError, match="AFNB \\(low\\): expected 4 input channels"):
        block(torch.randn(2, 6, 5, 7), high)


# --- the effective attention map -------------------------------------------------------------


@pytest.mark.parametrize("pool_sizes", [(1, 2, 3), (1, 3, 6, 8), (1, (2, 4), (3, 2))],
                         ids=["overlapping", "paper", "rectangular"])
def test_attention_map_equals_loop_over_bins(pool_sizes):
    block = make_apnb(pool_sizes)
    x = torch.randn(2, 5, 7, 11, dtype=torch.float64)
    weights = block.attention_weights(x)
    for i, j in [(0, 0), (3, 5), (6, 10)]:
        amap = attnlib.attention_map(block, x, (i, j))
        for b in range(2):
            torch.testing.assert_close(amap[b], loop_map(weights[b, i * 11 + j], 7, 11, pool_sizes))
        torch.testing.assert_close(amap.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["apnb", "afnb"])
def test_attention_map_is_the_weight_of_each_pixels_value(kind):
    """Σ_p map_p γ(x_p) is exactly the query's attention output O_P: the map is no display convention."""
    block = make_apnb() if kind == "apnb" else make_afnb()
    low = torch.randn(2, 5 if kind == "apnb" else 4, 7, 11, dtype=torch.float64)
    inputs = (low,) if kind == "apnb" else (low, torch.randn(2, 6, 7, 11, dtype=torch.float64))
    queries_from = inputs[-1]
    with torch.no_grad():
        out, _ = block._attend(low, queries_from, need_weights=False)
        gamma = block.f_value(low)  # B×d_v×H×W, before sampling
        for i, j in [(0, 0), (4, 6), (6, 10)]:
            amap = attnlib.attention_map(block, inputs if kind == "afnb" else low, (i, j))
            torch.testing.assert_close(torch.einsum("bhw,bdhw->bd", amap, gamma), out[:, i * 11 + j])


def test_spread_to_pixels_takes_many_queries_and_checks_its_shape():
    block = make_apnb((1, 3, 6, 8))
    x = torch.randn(1, 5, 7, 11, dtype=torch.float64)
    weights = block.attention_weights(x)[0]  # N×S: every query's row at once
    maps = spread_to_pixels(weights, 7, 11, (1, 3, 6, 8))
    for i, j in [(0, 0), (3, 5)]:
        torch.testing.assert_close(maps[i * 11 + j], attnlib.attention_map(block, x, (i, j))[0])
    with pytest.raises(ValueError, match=re.escape("expected weights of shape (B, 110)") + ".*got \\(77, 14\\)"):
        spread_to_pixels(weights[:, :14], 7, 11, (1, 3, 6, 8))


# --- cost formulas ---------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_flops_with_paper_pyramid_equal_counted(fused):
    apnb = APNB(12, 10, 6, 4, fused=fused).eval()
    afnb = AFNB(8, 12, 10, 6, 4, fused=fused).eval()
    low, high = torch.randn(2, 8, 9, 13), torch.randn(2, 12, 9, 13)
    assert apnb.flops(2, 9, 13) == measured_flops(apnb, high)
    assert afnb.flops(2, 9, 13) == measured_flops(afnb, low, high)
    n = 9 * 13
    assert apnb_flops(2, 12, 9, 13, out_channels=10, key_channels=6, value_channels=4)["matmul"] == 2 * 2 * n * 110 * 10
    # γ (8 → 4) runs on the 110 pooled bins, every other convolution on the n pixels
    assert afnb_flops(2, 12, 9, 13, low_channels=8, out_channels=10, key_channels=6, value_channels=4)["conv"] == (
        2 * 2 * n * (8 * 6 + 12 * 6 + 4 * 10 + 22 * 10) + 2 * 2 * 110 * 8 * 4)
    # the fast path folds W_o (4 → 10) into the fusion conv: 2·C_o²·(BN − d_v) fewer
    reference, fused = (sum(afnb_flops(2, 12, 9, 13, low_channels=8, out_channels=10, key_channels=6, value_channels=4,
                                       fused=f).values()) for f in (False, True))
    assert reference - fused == 2 * 10 * 10 * (2 * n - 4)


def test_attention_memory_is_n_by_s():
    assert apnb_attention_memory(2, 16, 32, 64, key_channels=8) == 2 * 32 * 64 * 110 * 4
    assert apnb_attention_memory(2, 16, 32, 64, key_channels=8, fused=True) == 0
    # fewer samples than key channels: the core's plain path, on either setting
    assert apnb_attention_memory(2, 16, 32, 64, key_channels=256, fused=True) == 2 * 32 * 64 * 110 * 4
    assert APNB(16, 16, 8, 8, pool_sizes=(1, 2), fused=False).attention_memory(1, 8, 8, 2) == 64 * 5 * 2


# --- against mmseg 1.2.2 (not a dependency: skipped where it is not installed) -----------------


def _mmseg_ann_head():
    """mmseg's ann_head module, importable without mmcv's compiled ops (stubbed: ANN uses none)."""
    import sys
    import types
    import warnings

    pytest.importorskip("mmseg")
    if "mmcv.ops" not in sys.modules:
        def any_op(name):  # any compiled op mmseg imports by name; ANN calls none of them
            if name.startswith("__"):
                raise AttributeError(name)
            return object

        ops = types.ModuleType("mmcv.ops")
        ops.__getattr__ = any_op
        sys.modules["mmcv.ops"] = ops
    try:
        with warnings.catch_warnings():  # mmcv-lite says it lacks compiled ops ANN does not use
            warnings.simplefilter("ignore", UserWarning)
            from mmseg.models.decode_heads import ann_head
    except ImportError as err:
        pytest.skip(f"mmseg's ANN head does not import here: {err}")
    return ann_head


def _bn_state(prefix, bn):
    return {f"{prefix}.{k}": v for k, v in bn.state_dict().items()}


@pytest.mark.parametrize("kind", ["apnb", "afnb"])
def test_blocks_equal_mmseg_without_dropout(kind):
    """mmseg's APNB/AFNB (query_scales=(1,)) and attnlib's with dropout=0 compute the same function."""
    ann_head = _mmseg_ann_head()
    torch.manual_seed(0)
    cfg = dict(query_scales=(1,), key_pool_scales=(1, 3, 6, 8), conv_cfg=None, norm_cfg=dict(type="BN"),
               act_cfg=dict(type="ReLU"))
    if kind == "apnb":
        theirs = ann_head.APNB(in_channels=8, channels=4, out_channels=8, **cfg)
        ours = APNB(8, 8, 4, 4, dropout=0.0)
    else:
        theirs = ann_head.AFNB(low_in_channels=6, high_in_channels=8, channels=4, out_channels=8, **cfg)
        ours = AFNB(6, 8, 8, 4, 4, dropout=0.0)
    theirs = randomize_(theirs, std=0.3).double().eval()
    stage = theirs.stages[0]
    state = {"f_key.0.weight": stage.key_project.conv.weight, **_bn_state("f_key.1", stage.key_project.bn),
             "f_value.weight": stage.value_project.weight, "f_value.bias": stage.value_project.bias,
             "W.weight": stage.out_project.weight, "W.bias": stage.out_project.bias,
             "fuse.0.weight": theirs.bottleneck.conv.weight, **_bn_state("fuse.1", theirs.bottleneck.bn)}
    if kind == "afnb":
        state.update({"f_query.0.weight": stage.query_project.conv.weight,
                      **_bn_state("f_query.1", stage.query_project.bn)})
    else:
        assert stage.query_project is stage.key_project  # mmseg's APNB shares the projection too
    ours.load_state_dict(state)
    ours = ours.double().eval()
    high = torch.randn(2, 8, 13, 17, dtype=torch.float64)
    inputs = (high,) if kind == "apnb" else (torch.randn(2, 6, 13, 17, dtype=torch.float64), high)
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs), theirs(*inputs), rtol=0, atol=1e-12)
