"""DANet: PAM (eqs. 1–2) and CAM (eqs. 3–4, official sign) against loops; the head's wiring and cost."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import flop_registry

import attnlib
from attnlib.danet import (ChannelAttention, DualAttentionHead, PositionAttention, channel_attention_attention_memory,
                           channel_attention_flops, channel_attention_map, dual_attention_head_attention_memory,
                           dual_attention_head_flops, position_attention_attention_memory, position_attention_flops)
from conftest import measured_flops, randomize_, set_fused

# FlopCounterMode (torch 2.14) has no formula for the CPU flash kernel that SDPA takes on contiguous
# inputs, which CAM's fused path feeds it; fused counts are compared only where one is registered.
CPU_FLASH_COUNTED = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not CPU_FLASH_COUNTED,
                                                            reason="FlopCounterMode cannot count the CPU flash kernel"))]


def conv1x1(x: torch.Tensor, conv) -> torch.Tensor:
    """A 1×1 convolution of one C×H×W image, written as a channel mix at every position."""
    return torch.einsum("oc,chw->ohw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(l - top) for l in logits]
    return [e / sum(exps) for e in exps]


@torch.no_grad()
def loop_pam(block: PositionAttention, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E_j = α Σ_i s_ji D_i + A_j, s_ji = softmax_i(B_i · C_j), for one C×H×W image, as loops."""
    c, h, w = a.shape
    n = h * w
    B = conv1x1(a, block.key_conv).reshape(-1, n)  # the paper's B: the attended positions i
    C = conv1x1(a, block.query_conv).reshape(-1, n)  # the paper's C: the output position j
    D = conv1x1(a, block.value_conv).reshape(c, n)
    A = a.reshape(c, n)
    s = torch.zeros(n, n, dtype=a.dtype)
    E = torch.zeros(c, n, dtype=a.dtype)
    for j in range(n):
        row = softmax([float(B[:, i] @ C[:, j]) for i in range(n)])
        for i in range(n):
            s[j, i] = row[i]
            E[:, j] += s[j, i] * D[:, i]
        E[:, j] = block.alpha * E[:, j] + A[:, j]
    return E.reshape(c, h, w), s


@torch.no_grad()
def loop_cam(block: ChannelAttention, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E_j = β Σ_i x_ji A_i + A_j with the official sign, x_ji = softmax_i(−A_i · A_j), as loops."""
    c, h, w = a.shape
    A = a.reshape(c, h * w)
    x = torch.zeros(c, c, dtype=a.dtype)
    E = torch.zeros_like(A)
    for j in range(c):
        row = softmax([-float(A[i] @ A[j]) for i in range(c)])
        for i in range(c):
            x[j, i] = row[i]
            E[j] += x[j, i] * A[i]
        E[j] = block.beta * E[j] + A[j]
    return E.reshape(c, h, w), x


def official_cam(beta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The official CAM_Module.forward, written out: softmax(max(energy) − energy) applied as X A."""
    b, c, h, w = a.shape
    proj_query = a.view(b, c, -1)
    proj_key = a.view(b, c, -1).permute(0, 2, 1)
    energy = torch.bmm(proj_query, proj_key)
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = torch.softmax(energy_new, dim=-1)
    out = torch.bmm(attention, a.view(b, c, -1)).view(b, c, h, w)
    return beta * out + a


def random_pam(channels: int = 8, reduction: int = 4, fused: bool = True, seed: int = 0) -> PositionAttention:
    return randomize_(PositionAttention(channels, reduction, fused=fused), seed=seed).double()


def random_cam(fused: bool = True, channels: int | None = None) -> ChannelAttention:
    return randomize_(ChannelAttention(channels, fused=fused)).double()


# ---------------------------------------------------------------- PAM

@pytest.mark.parametrize("fused", [False, True])
def test_pam_equals_loop_definition(fused):
    block = random_pam(fused=fused)
    assert block.alpha.abs() > 0.05
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    out, weights = block(x), block.attention_weights(x)
    for b in range(2):
        expected, s = loop_pam(block, x[b])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(weights[b], s)


def test_pam_attention_map_is_the_brute_force_row():
    block = random_pam()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    expected = [loop_pam(block, x[b])[1] for b in range(2)]
    for i, j in [(0, 0), (1, 3), (2, 4)]:
        amap = attnlib.attention_map(block, x, (i, j))
        for b in range(2):
            torch.testing.assert_close(amap[b], expected[b][i * 5 + j].reshape(3, 5))


def test_pam_index_convention_query_is_C_key_is_B():
    """s_ji = softmax_i(B_i · C_j): swapping the roles of B and C gives a different (transposed-logit) map."""
    block = random_pam()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    q = block.query_conv(x).flatten(2)[0]  # C, d×N
    k = block.key_conv(x).flatten(2)[0]  # B
    torch.testing.assert_close(block.attention_weights(x)[0], torch.softmax(q.T @ k, dim=-1))  # unscaled
    assert not torch.allclose(block.attention_weights(x)[0], torch.softmax(k.T @ q, dim=-1), atol=1e-3)


def test_pam_has_three_separate_convolutions():
    block = PositionAttention(16, 4)
    convs = (block.query_conv, block.key_conv, block.value_conv)
    assert len({id(conv) for conv in convs}) == 3
    assert len({conv.weight.data_ptr() for conv in convs}) == 3
    assert [tuple(conv.weight.shape) for conv in convs] == [(4, 16, 1, 1), (4, 16, 1, 1), (16, 16, 1, 1)]
    assert sum(p.numel() for p in block.parameters()) == 2 * (16 * 4 + 4) + (16 * 16 + 16) + 1


def test_pam_each_convolution_plays_its_own_part():
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    block = random_pam()
    weights, out = block.attention_weights(x), block(x)
    with torch.no_grad():
        # D only carries values: changing it leaves S alone and changes E.
        block.value_conv.weight.add_(0.3)
        torch.testing.assert_close(block.attention_weights(x), weights)
        assert not torch.allclose(block(x), out)
        # D = identity: E = α S A + A.
        block.value_conv.weight.copy_(torch.eye(8, dtype=torch.float64)[:, :, None, None])
        block.value_conv.bias.zero_()
        s = block.attention_weights(x)[0]
        expected = block.alpha * (x.flatten(2)[0] @ s.T) + x.flatten(2)[0]
        torch.testing.assert_close(block(x).flatten(2)[0], expected)
        # C = 0 (the query side): every logit B_i · 0 is 0, so each row of S is uniform.
        block.query_conv.weight.zero_()
        block.query_conv.bias.zero_()
        torch.testing.assert_close(block.attention_weights(x), torch.full((1, 12, 12), 1 / 12, dtype=torch.float64))
    # B without weights (only its bias b): B_i · C_j = b · C_j is the same for every i, so S is uniform too.
    block = random_pam()
    with torch.no_grad():
        block.key_conv.weight.zero_()
    torch.testing.assert_close(block.attention_weights(x), torch.full((1, 12, 12), 1 / 12, dtype=torch.float64))


@pytest.mark.parametrize("reduction", [0, -2, 2.0, True, 17])
def test_pam_bad_reduction_raises(reduction):
    with pytest.raises(ValueError, match="reduction"):
        PositionAttention(16, reduction)


def test_pam_alpha_is_a_learnable_scalar_starting_at_zero():
    block = PositionAttention(16)
    assert block.alpha.shape == (1,) and block.alpha.item() == 0 and block.alpha.requires_grad
    x = torch.randn(1, 16, 3, 3)
    block(x).sum().backward()
    assert block.alpha.grad.abs() > 0  # α gets a gradient at init, the convolutions do not yet


# ---------------------------------------------------------------- CAM

@pytest.mark.parametrize("fused", [False, True])
def test_cam_equals_loop_definition(fused):
    block = random_cam(fused)
    assert block.beta.abs() > 0.05
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 0.3  # small energies: a soft map, not one-hot
    out, maps = block(x), channel_attention_map(block, x)
    for b in range(2):
        expected, xmap = loop_cam(block, x[b])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(maps[b], xmap)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [False, True])
def test_cam_equals_the_official_max_minus_energy_form(dtype, fused):
    block = randomize_(ChannelAttention(fused=fused)).to(dtype)
    x = torch.randn(2, 6, 5, 7, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(block(x), official_cam(block.beta, x))


def test_max_minus_energy_softmax_is_softmax_of_minus_energy():
    """The identity the implementation rests on: a per-row shift does not change a row softmax."""
    a = torch.randn(3, 6, 20, dtype=torch.float64)
    energy = a @ a.transpose(1, 2)
    official = torch.softmax(energy.max(-1, keepdim=True)[0] - energy, dim=-1)
    torch.testing.assert_close(official, torch.softmax(-energy, dim=-1))
    assert not torch.allclose(official, torch.softmax(energy, dim=-1), atol=1e-3)  # the sign matters


def test_cam_applies_X_A_not_X_transpose_A():
    block = random_cam()
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64) * 0.3
    xmap = channel_attention_map(block, x)[0]
    assert not torch.allclose(xmap, xmap.T, atol=1e-3)  # a row-normalised map is not symmetric
    a = x.flatten(2)[0]
    out = block(x).flatten(2)[0]
    torch.testing.assert_close(out, block.beta * (xmap @ a) + a)
    assert not torch.allclose(out, block.beta * (xmap.T @ a) + a, atol=1e-3)


def test_channel_attention_map_rows_are_distributions():
    block = random_cam()
    x = torch.randn(3, 7, 4, 4, dtype=torch.float64)
    xmap = channel_attention_map(block, x)
    assert xmap.shape == (3, 7, 7) and (xmap >= 0).all()
    torch.testing.assert_close(xmap.sum(-1), torch.ones(3, 7, dtype=torch.float64))


def test_channel_attention_map_and_attention_map_reject_other_blocks():
    x = torch.randn(1, 8, 3, 3)
    with pytest.raises(TypeError, match="ChannelAttention"):
        channel_attention_map(PositionAttention(8), x)
    with pytest.raises(TypeError, match="channel_attention_map"):
        attnlib.attention_map(ChannelAttention(), x, (0, 0))


@pytest.mark.parametrize("channels", [1, 3, 13])
def test_cam_works_for_any_channel_count(channels):
    block = random_cam()
    x = torch.randn(2, channels, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(block(x)[0], loop_cam(block, x[0])[0])


def test_cam_checks_its_channels_when_given_them():
    block = ChannelAttention(8)
    assert block(torch.randn(1, 8, 2, 2)).shape == (1, 8, 2, 2)
    with pytest.raises(ValueError, match="8 input channels"):
        block(torch.randn(1, 9, 2, 2))
    with pytest.raises(ValueError, match="in_channels"):
        ChannelAttention(0)
    with pytest.raises(ValueError, match="channel count"):
        ChannelAttention().flops(1, 4, 4)  # the cost depends on C, which it was not told


def test_cam_beta_starts_at_zero_and_cam_has_no_other_parameter():
    block = ChannelAttention()
    assert [name for name, _ in block.named_parameters()] == ["beta"]
    assert block.beta.item() == 0


# ---------------------------------------------------------------- costs

@pytest.mark.parametrize("fused", PATHS)
def test_pam_and_cam_flops_equal_counted(fused):
    x = torch.randn(2, 16, 5, 7)
    for block in (PositionAttention(16, 4), ChannelAttention(16)):
        set_fused(block, fused)
        assert block.flops(2, 5, 7) == measured_flops(block, x)


def test_formulas():
    b, c, h, w = 2, 16, 7, 11
    n = h * w
    assert position_attention_flops(b, c, h, w) == {"conv": 2 * b * n * c * (2 + 2 + 16),
                                                   "matmul": 2 * b * n * n * 2 + 2 * b * n * n * 16}
    assert channel_attention_flops(b, c, h, w) == {"conv": 0, "matmul": 4 * b * c * c * n}
    assert position_attention_attention_memory(b, c, h, w) == b * n * n * 4
    # d_v = C ≠ d_k = C/r: no memory-saving kernel on a CPU, so the fused path stores S there too
    assert position_attention_attention_memory(b, c, h, w, fused=True) == b * n * n * 4
    assert position_attention_attention_memory(b, c, h, w, fused=True, device="cuda") == 0
    assert channel_attention_attention_memory(b, c, h, w) == b * c * c * 4
    assert channel_attention_attention_memory(b, c, 3, 3) == b * c * c * 4  # independent of H and W
    assert channel_attention_attention_memory(b, c, h, w, fused=True) == b * c * c * 4  # C keys < N channels: plain path
    head = dual_attention_head_flops(b, 32, h, w, channels=c, reduction=4)
    assert head["conv"] == 2 * b * n * 9 * (2 * 32 * c + 2 * c * c) + 2 * b * n * c * (4 + 4 + 16)
    assert head["matmul"] == 2 * b * n * n * (4 + c) + 4 * b * c * c * n
    head_memory = dual_attention_head_attention_memory(b, 32, h, w, channels=c, bytes_per_element=2)
    assert head_memory == (b * n * n + b * c * c) * 2
    with pytest.raises(ValueError, match="reduction"):
        position_attention_flops(b, 4, h, w, reduction=8)


# ---------------------------------------------------------------- head

def test_head_shape_and_out_channels():
    head = DualAttentionHead(12, 8, reduction=4)
    assert head.out_channels == 8
    for train in (True, False):
        assert head.train(train)(torch.randn(2, 12, 5, 3)).shape == (2, 8, 5, 3)


def test_head_is_the_sum_of_its_two_branches():
    head = randomize_(DualAttentionHead(6, 8, reduction=4)).double().eval()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    position = head.pam_out(head.pam(head.pam_in(x)))
    channel = head.cam_out(head.cam(head.cam_in(x)))
    torch.testing.assert_close(head(x), position + channel)
    assert head.pam_in[0].weight.data_ptr() != head.cam_in[0].weight.data_ptr()  # two branches, two convolutions
    assert head.pam_in[0].kernel_size == head.pam_out[0].kernel_size == (3, 3) and head.pam_in[0].bias is None


def test_head_fused_switches_both_modules_and_paths_agree():
    head = randomize_(DualAttentionHead(6, 8, reduction=4)).eval()
    x = torch.randn(2, 6, 5, 4)
    with torch.no_grad():
        fused = head(x)
        head.fused = False
        assert not head.pam.fused and not head.cam.fused and not head.fused
        torch.testing.assert_close(head(x), fused, rtol=0, atol=1e-5)
    head.cam.fused = True
    assert not head.fused  # reads True only when both modules are fused


def test_head_attention_map_is_the_pams_map_on_its_own_input():
    head = randomize_(DualAttentionHead(6, 8, reduction=4)).double().eval()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    amap = attnlib.attention_map(head, x, (1, 2))
    _, s = loop_pam(head.pam, head.pam_in(x)[1])
    torch.testing.assert_close(amap[1], s[1 * 5 + 2].reshape(3, 5))
    torch.testing.assert_close(amap.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="query"):
        attnlib.attention_map(head, x, (3, 0))


@pytest.mark.parametrize("fused", PATHS)
def test_head_flops_equal_counted(fused):
    head = set_fused(DualAttentionHead(12, 8, reduction=4).eval(), fused)
    assert head.flops(2, 5, 7) == measured_flops(head, torch.randn(2, 12, 5, 7))


def test_head_attention_memory_sums_its_modules_on_their_own_paths():
    head = DualAttentionHead(12, 8, reduction=4, fused=False)
    assert head.attention_memory(2, 5, 7) == dual_attention_head_attention_memory(2, 12, 5, 7, channels=8, reduction=4)
    assert head.attention_memory(2, 5, 7) == 2 * (35 * 35 + 64) * 4
    head.fused = True  # on a CPU the PAM (d_v ≠ d_k) and the CAM (8 keys < 35 "channels") both store their maps
    assert head.attention_memory(2, 5, 7) == 2 * (35 * 35 + 64) * 4
    # on CUDA the PAM's 35 keys >= its 2 key channels: fused, nothing stored; the CAM still stores X
    assert dual_attention_head_attention_memory(2, 12, 5, 7, channels=8, reduction=4, fused=True,
                                                device="cuda") == 2 * 64 * 4


def test_head_validates_its_settings_and_input():
    with pytest.raises(ValueError, match="in_channels"):
        DualAttentionHead(0, 8)
    with pytest.raises(ValueError, match="channels"):
        DualAttentionHead(8, 0)
    with pytest.raises(ValueError, match="reduction"):
        DualAttentionHead(16, 4, reduction=8)  # 4 // 8 = 0 channels for B and C
    head = DualAttentionHead(12, 8, reduction=4)
    with pytest.raises(ValueError, match="12 input channels"):
        head(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        head(torch.randn(12, 4, 4))


def test_pam_fused_path_on_a_cpu_skips_sdpa_whose_kernel_would_store_the_map(monkeypatch):
    import attnlib.core as core

    calls = []
    sdpa = core.F.scaled_dot_product_attention
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    block = random_pam(fused=True)
    with torch.no_grad():
        block(torch.randn(1, 8, 5, 6, dtype=torch.float64))
    assert not calls and block.attention_memory(1, 5, 6) == 30 * 30 * 4
# ---------------------------------------------------------------- the paper's sign, the branches

def test_cam_paper_sign_is_eq_3_as_printed():
    """sign="paper": x_ji = softmax_i(A_i · A_j), against loops; the default keeps the official sign."""
    assert ChannelAttention().sign == "official"
    block = randomize_(ChannelAttention(sign="paper")).double()
    x = torch.randn(1, 5, 3, 4, dtype=torch.float64) * 0.3
    a = x.flatten(2)[0]
    expected_map = torch.tensor([softmax([float(a[i] @ a[j]) for i in range(5)]) for j in range(5)],
                                dtype=torch.float64)
    torch.testing.assert_close(channel_attention_map(block, x)[0], expected_map)
    torch.testing.assert_close(block(x).flatten(2)[0], block.beta * (expected_map @ a) + a)
    official = randomize_(ChannelAttention()).double()
    assert not torch.allclose(channel_attention_map(official, x)[0], expected_map, atol=1e-3)
    assert "sign='paper'" in repr(block)
    with pytest.raises(ValueError, match="sign"):
        ChannelAttention(sign="minus")


def test_head_returns_its_branches_on_request():
    head = randomize_(DualAttentionHead(6, 8, reduction=4)).double().eval()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    out, position, channel = head(x, return_branches=True)
    torch.testing.assert_close(position, head.pam_out(head.pam(head.pam_in(x))))
    torch.testing.assert_close(channel, head.cam_out(head.cam(head.cam_in(x))))
    torch.testing.assert_close(out, position + channel)
    torch.testing.assert_close(head(x), out)
