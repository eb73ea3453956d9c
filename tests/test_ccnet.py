"""CCNet: criss-cross attention against eqs. 1–2 written as loops, the dense masked definition,
the H + W − 1 count (no double-counted centre), and RCCA's full-image reach with shared weights."""
from __future__ import annotations

import pytest
import torch

import attnlib
from attnlib.ccnet import (CrissCrossAttention, RecurrentCrissCross, criss_cross_attention_memory,
                           criss_cross_flops, criss_cross_mask, recurrent_criss_cross_attention_memory,
                           recurrent_criss_cross_flops)
from attnlib.core import attend
from conftest import randomize_, set_fused

SIZES = [(1, 1), (1, 6), (5, 1), (2, 2), (3, 4), (7, 11), (13, 5)]


def conv1x1(x, conv):
    return torch.einsum("oc,chw->ohw", conv.weight.flatten(1), x) + conv.bias[:, None, None]


def random_block(cls=CrissCrossAttention, channels=8, seed=0, **kwargs):
    """A block in float64 with every weight random, γ included (so the attention shows in the output)."""
    return randomize_(cls(channels, reduction=4, **kwargs), seed=seed, std=0.4).double().eval()


@torch.no_grad()
def loop_criss_cross(block: CrissCrossAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 1–2 for one image (C×H×W), position by position: H'_u = γ Σ_i A_iu Φ_iu + H_u.

    Returns H' and the N×N matrix of the A_iu (zero off the criss-cross path)."""
    q, k, v = (conv1x1(x, m) for m in (block.query, block.key, block.value))
    _, h, w = x.shape
    weights = torch.zeros(h * w, h * w, dtype=x.dtype)
    y = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            path = [(r, j) for r in range(h)] + [(i, c) for c in range(w) if c != j]  # Ω_u, u once
            assert len(path) == h + w - 1
            energies = torch.stack([q[:, i, j] @ k[:, r, c] for r, c in path])  # eq. 1, no 1/√d
            a = torch.softmax(energies, dim=0)
            for (r, c), a_rc in zip(path, a):
                weights[i * w + j, r * w + c] = a_rc
                y[:, i, j] += a_rc * v[:, r, c]  # eq. 2
    return block.gamma * y + x, weights


@pytest.mark.parametrize("h,w", SIZES)
def test_mask_is_the_row_and_the_column(h, w):
    mask = criss_cross_mask(h, w)
    expected = torch.tensor([[i1 == i2 or j1 == j2 for i2 in range(h) for j2 in range(w)]
                             for i1 in range(h) for j1 in range(w)])
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert (mask.sum(dim=1) == h + w - 1).all()


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("h,w", [(1, 1), (1, 4), (4, 1), (3, 4), (5, 3)])
def test_equals_loop_definition(h, w, fused):
    block = random_block(fused=fused)
    x = torch.randn(2, 8, h, w, dtype=torch.float64)
    out, weights = block(x), block.attention_weights(x)
    with torch.no_grad():  # the factorised sum has one layout with autograd, one without
        torch.testing.assert_close(block(x), out, rtol=0, atol=1e-12)
    for b in range(2):
        expected, expected_weights = loop_criss_cross(block, x[b])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(weights[b], expected_weights)


@pytest.mark.parametrize("h,w", SIZES)
def test_factorised_path_equals_dense_masked_attention(h, w):
    """The fast path against the definition, computed by the core both ways (reference and SDPA)."""
    block = random_block(fused=True)
    x = torch.randn(2, 8, h, w, dtype=torch.float64)
    q, k, v = (m(x).flatten(2).transpose(1, 2) for m in (block.query, block.key, block.value))
    with torch.no_grad():
        out = block(x)
        for core_fused in (False, True):
            y, _ = attend(q, k, v, scale=1.0, mask=criss_cross_mask(h, w), fused=core_fused)
            expected = block.gamma * y.transpose(1, 2).reshape(x.shape) + x
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_centre_is_counted_once():
    """With all energies equal (Q = 0) each of the H + W − 1 path positions gets 1/(H + W − 1):
    the double-counting bug would give the centre 2/(H + W) and the others 1/(H + W)."""
    block = random_block()
    torch.nn.init.zeros_(block.query.weight)
    torch.nn.init.zeros_(block.query.bias)
    h, w, (i, j) = 5, 7, (2, 3)
    amap = block.attention_map(torch.randn(1, 8, h, w, dtype=torch.float64), (i, j))[0]
    expected = criss_cross_mask(h, w)[i * w + j].reshape(h, w).double() / (h + w - 1)
    torch.testing.assert_close(amap, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("h,w", SIZES)
def test_each_query_has_h_plus_w_minus_1_weights_summing_to_one(h, w):
    block = random_block()
    x = torch.randn(2, 8, h, w, dtype=torch.float64)
    with torch.no_grad():
        dense = block.attention_weights(x)
        factorised = block._factorised(*block._project(x))[1]  # B×H×W×(H+W), one entry exactly 0
    for weights in (dense, factorised):
        assert ((weights != 0).sum(dim=-1) == h + w - 1).all()
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1], dtype=torch.float64))
    assert torch.equal(dense[0] != 0, criss_cross_mask(h, w))


@pytest.mark.parametrize("query", [(0, 0), (2, 3), (4, 5)])
def test_attention_map_equals_loop_definition(query):
    block = random_block()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    amap = attnlib.attention_map(block, x, query)
    i, j = query
    for b in range(2):
        _, weights = loop_criss_cross(block, x[b])
        torch.testing.assert_close(amap[b], weights[i * 6 + j].reshape(5, 6))


def input_output_reach(block, h, w):
    """N×N pattern of the Jacobian: [u, v] True where output position u depends on input position v."""
    x = torch.randn(1, 8, h, w, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(block, x)[0, :, :, :, 0]  # C×H×W×C×H×W
    return jacobian.abs().sum(dim=(0, 3)).reshape(h * w, h * w) != 0


def test_one_loop_reaches_exactly_the_criss_cross():
    block = random_block(RecurrentCrissCross, recurrence=1)
    assert torch.equal(input_output_reach(block, 4, 5), criss_cross_mask(4, 5))


@pytest.mark.parametrize("h,w", [(4, 5), (6, 3)])
def test_two_loops_reach_every_position(h, w):
    block = random_block(RecurrentCrissCross, recurrence=2)
    assert input_output_reach(block, h, w).all()


def test_recurrence_shares_one_set_of_weights():
    block = random_block(RecurrentCrissCross, recurrence=3)
    one = CrissCrossAttention(8, reduction=4)
    assert [name for name, _ in block.named_parameters()] == [f"cca.{name}" for name, _ in one.named_parameters()]
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.cca(block.cca(block.cca(x))), rtol=0, atol=0)


def test_fused_switch_reaches_the_shared_module():
    block = RecurrentCrissCross(8, reduction=4, fused=False)
    assert not block.cca.fused
    block.fused = True
    assert block.cca.fused and block.fused


@pytest.mark.parametrize("recurrence", [1, 2, 3])
def test_fused_equals_reference_float64(recurrence):
    """Equal to rounding; in float32 the two paths differ by ~1e-5 only because randomised weights make
    energies of ~100, whose float32 spacing is ~1e-5 (both paths are then equally far from float64)."""
    block = random_block(RecurrentCrissCross, recurrence=recurrence)
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(set_fused(block, True)(x), set_fused(block, False)(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("fused", [True, False])
def test_output_takes_the_input_layout(fused, grad):
    """The factorised sum comes out permuted (channels first with autograd, channels last
    without); the residual writes H' in x's layout, so the next loop's convolutions get a
    contiguous map, and a channels-last input stays channels-last."""
    block = set_fused(random_block(RecurrentCrissCross, recurrence=2), fused)
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64, requires_grad=True)
    with torch.set_grad_enabled(grad):
        assert block(x).is_contiguous()
        assert block(x.detach().to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def test_recurrent_attention_map_composes_the_loops():
    block = random_block(RecurrentCrissCross, recurrence=2)
    h, w = 4, 6
    x = torch.randn(1, 8, h, w, dtype=torch.float64)
    x1, a1 = loop_criss_cross(block.cca, x[0])
    _, a2 = loop_criss_cross(block.cca, x1)
    composed = a2 @ a1
    for i, j in [(0, 0), (1, 4), (3, 5)]:
        amap = attnlib.attention_map(block, x, (i, j))[0]
        torch.testing.assert_close(amap, composed[i * w + j].reshape(h, w))
        assert (amap > 0).all()
    single = random_block(RecurrentCrissCross, recurrence=1)
    torch.testing.assert_close(single.attention_map(x, (1, 4)), single.cca.attention_map(x, (1, 4)))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_recurrence_raises(bad):
    with pytest.raises(ValueError, match="recurrence"):
        RecurrentCrissCross(8, recurrence=bad)


@pytest.mark.parametrize("kwargs", [dict(reduction=0), dict(reduction=16), dict(reduction=2.0)])
def test_bad_reduction_raises(kwargs):
    with pytest.raises(ValueError, match="reduction"):
        CrissCrossAttention(8, **kwargs)


def test_flops_at_the_papers_setting():
    """speedinghzl/CCNet issue #2: 1×512×97×97, C' = 64 — one module ≈ 8 GFLOPs, R = 2 ≈ 16.6 GFLOPs.

    The issue's own formula counts biases (513 inputs) and 195 path positions; we count neither
    (FlopCounterMode ignores biases; the factorised path scores H + W = 194 keys), hence ≈ 0.3 % less."""
    n = 97 * 97
    ours = criss_cross_flops(1, 512, 97, 97, reduction=8, fused=True)
    assert ours == {"conv": 2 * n * 512 * (64 + 64 + 512), "matmul": 2 * n * 194 * 64 + 2 * n * 194 * 512}
    issue = 2 * n * 513 * (64 + 64 + 512) + 2 * n * 195 * 64 + 2 * n * 195 * 512
    total = sum(ours.values())
    assert abs(total / issue - 1) < 0.02
    assert round(total / 1e9) == 8
    recurrent = sum(recurrent_criss_cross_flops(1, 512, 97, 97, reduction=8, recurrence=2, fused=True).values())
    assert recurrent == 2 * total and abs(recurrent / 16.6e9 - 1) < 0.02
    dense = criss_cross_flops(1, 512, 97, 97, reduction=8, fused=False)
    assert dense["matmul"] == 2 * n * n * (64 + 512) and dense["conv"] == ours["conv"]


def test_attention_memory_formulas():
    b, h, w = 2, 9, 13
    n = h * w
    assert criss_cross_attention_memory(b, 16, h, w, fused=True) == b * n * (h + w) * 4
    assert criss_cross_attention_memory(b, 16, h, w, fused=False, bytes_per_element=2) == b * n * n * 2
    assert recurrent_criss_cross_attention_memory(b, 16, h, w, recurrence=3, fused=True) == 3 * b * n * (h + w) * 4
    block = CrissCrossAttention(16, fused=True)
    assert attnlib.complexity.attention_memory(block, b, h, w) == b * n * (h + w) * 4


def mmcv_criss_cross(block: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """mmcv 2.1 ``ops/cc_attention.py`` ``CrissCrossAttention.forward``, transcribed (einsums and all)
    with attnlib's parameter names; mmcv's ``Scale(0.)`` is our ``gamma``."""
    h = x.shape[2]
    query, key, value = block.query(x), block.key(x), block.value(x)
    neg_inf_diag = torch.diag(torch.tensor(float("-inf"), dtype=x.dtype).repeat(h), 0)
    energy_h = torch.einsum("bchw,bciw->bwhi", query, key) + neg_inf_diag
    energy_h = energy_h.transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attn = torch.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)  # [B,H,W,(H+W)]
    out = torch.einsum("bciw,bhwi->bchw", value, attn[..., :h])
    out += torch.einsum("bchj,bhwj->bchw", value, attn[..., h:])
    return block.gamma * out + x


def cuda_kernel_weights(block: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """The official CUDA kernel's layout (speedinghzl/CCNet ``ca_forward_kernel``), for one image:
    H + W - 1 energies per position, the W of its row first, then its column *without* its own row
    (``j = i < y ? i : i + 1``), no -inf anywhere; a softmax over them.  Returns the N×N weights."""
    q, k = conv1x1(x, block.query), conv1x1(x, block.key)
    _, h, w = x.shape
    weights = torch.zeros(h * w, h * w, dtype=x.dtype)
    for y in range(h):
        for xx in range(w):
            keys = [(y, i) for i in range(w)] + [(i if i < y else i + 1, xx) for i in range(h - 1)]
            energy = torch.stack([q[:, y, xx] @ k[:, r, c] for r, c in keys])
            for (r, c), a in zip(keys, energy.softmax(dim=0)):
                weights[y * w + xx, r * w + c] = a
    return weights


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (4, 1), (5, 7)])
def test_equals_mmcv_pure_pytorch_and_the_official_cuda_layout(h, w):
    """Two ways to count the centre once, one function: mmcv's -inf on the column diagonal and the
    original kernel's H + W - 1 energies; attnlib's both paths agree with both in float64."""
    block = random_block()
    x = torch.randn(2, 8, h, w, dtype=torch.float64)
    with torch.no_grad():
        expected = mmcv_criss_cross(block, x)
        for fused in (True, False):
            torch.testing.assert_close(set_fused(block, fused)(x), expected, rtol=0, atol=1e-12)
        weights = block.attention_weights(x)
    for b in range(2):
        torch.testing.assert_close(weights[b], cuda_kernel_weights(block, x[b]), rtol=0, atol=1e-14)


def test_double_counting_changes_the_output():
    """Without the -inf the centre is weighed twice: the test above would catch that bug."""
    block = random_block()
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    q, k, v = block._project(x)
    e_col = torch.einsum("bchw,bckw->bhwk", q, k)
    e_row = torch.einsum("bchw,bchl->bhwl", q, k)
    a = torch.cat([e_col, e_row], dim=-1).softmax(dim=-1)
    y = torch.einsum("bhwk,bckw->bchw", a[..., :5], v) + torch.einsum("bhwl,bchl->bchw", a[..., 5:], v)
    with torch.no_grad():
        assert (block.gamma * y + x - block(x)).abs().max() > 1e-3
