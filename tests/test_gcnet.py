"""GCNet: the context vector, the transforms and the fusions against the paper written as loops."""
from __future__ import annotations

import math

import pytest
import torch

import attnlib
from attnlib.gcnet import (ContextBlock, SimplifiedNonLocal2d, context_block_attention_memory, context_block_flops,
                           simplified_nonlocal_attention_memory, simplified_nonlocal_flops)
from conftest import measured_flops, randomize_, set_fused

FUSION_SETS = [("add",), ("mul",), ("add", "mul"), ("mul", "add")]


@torch.no_grad()
def loop_context(block, x: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """α_j = exp(w_k·x_j) / Σ_m exp(w_k·x_m) and c = Σ_j α_j x_j for one C×H×W image, as loops."""
    c, h, w = x.shape
    positions = [x[:, i, j] for i in range(h) for j in range(w)]
    if block.pooling == "avg":
        alphas = [1.0 / len(positions)] * len(positions)
    else:
        w_k = block.w_k[0]
        logits = [sum(float(w_k[k] * x_j[k]) for k in range(c)) for x_j in positions]
        total = sum(math.exp(l) for l in logits)
        alphas = [math.exp(l) / total for l in logits]
    context = sum(a * x_j for a, x_j in zip(alphas, positions))
    return alphas, context


def loop_transform(transform, v: torch.Tensor) -> torch.Tensor:
    """W_v2 ReLU(LN(W_v1 v)) on one C-vector, every layer written out."""
    conv1, norm, _, conv2 = transform
    u = conv1.weight[:, :, 0, 0] @ v + conv1.bias
    mean, var = u.mean(), ((u - u.mean()) ** 2).mean()  # LayerNorm uses the biased variance
    u = (u - mean) / torch.sqrt(var + norm.eps) * norm.weight.flatten() + norm.bias.flatten()
    return conv2.weight[:, :, 0, 0] @ u.clamp(min=0) + conv2.bias


@torch.no_grad()
def loop_context_block(block: ContextBlock, x: torch.Tensor) -> torch.Tensor:
    """z_i = x_i · σ(t_mul) + t_add at every position i of one image (mul first, then add)."""
    _, context = loop_context(block, x)
    z = torch.empty_like(x)
    gate = torch.sigmoid(loop_transform(block.mul_transform, context)) if block.mul_transform is not None else None
    shift = loop_transform(block.add_transform, context) if block.add_transform is not None else None
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            z_ij = x[:, i, j]
            if gate is not None:
                z_ij = z_ij * gate
            if shift is not None:
                z_ij = z_ij + shift
            z[:, i, j] = z_ij
    return z


@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusions", FUSION_SETS, ids="+".join)
@pytest.mark.parametrize("fused", [False, True])
def test_context_block_equals_loop_definition(pooling, fusions, fused):
    block = randomize_(ContextBlock(6, ratio=0.5, pooling=pooling, fusions=fusions, fused=fused)).double()
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    out = block(x)
    for b in range(2):
        torch.testing.assert_close(out[b], loop_context_block(block, x[b]))


@pytest.mark.parametrize("fused", [False, True])
def test_context_vector_equals_loop_definition(fused):
    block = randomize_(ContextBlock(5, fused=fused)).double()
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    context, _ = block._context(x, need_weights=False)
    for b in range(2):
        torch.testing.assert_close(context[b, :, 0, 0], loop_context(block, x[b])[1])


@pytest.mark.parametrize("fused", [False, True])
def test_simplified_nonlocal_equals_loop_definition(fused):
    block = randomize_(SimplifiedNonLocal2d(5, fused=fused)).double()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    out = block(x)
    w_v, b_v = block.w_v.weight[:, :, 0, 0], block.w_v.bias
    for b in range(2):
        shift = w_v @ loop_context(block, x[b])[1] + b_v  # z_i = x_i + W_v Σ_j α_j x_j
        for i in range(4):
            for j in range(3):
                torch.testing.assert_close(out[b, :, i, j], x[b, :, i, j] + shift)


@pytest.mark.parametrize("make", [lambda: ContextBlock(6), lambda: SimplifiedNonLocal2d(6)], ids=["gc", "snl"])
def test_attention_map_is_one_global_softmax(make):
    """The same map for every query, equal to softmax_j(w_k · x_j) computed by hand."""
    block = randomize_(make()).double()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    maps = [attnlib.attention_map(block, x, (i, j)) for i in range(5) for j in range(4)]
    for amap in maps[1:]:
        torch.testing.assert_close(amap, maps[0], rtol=0, atol=0)
    for b in range(2):
        expected = torch.tensor(loop_context(block, x[b])[0], dtype=torch.float64).reshape(5, 4)
        torch.testing.assert_close(maps[0][b], expected)


def test_avg_pooling_map_is_uniform_and_pooling_is_the_mean():
    block = randomize_(ContextBlock(4, pooling="avg")).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    uniform = torch.full((2, 3, 5), 1 / 15, dtype=torch.float64)
    torch.testing.assert_close(attnlib.attention_map(block, x, (2, 4)), uniform)
    torch.testing.assert_close(block._context(x, need_weights=False)[0], x.mean(dim=(2, 3), keepdim=True))


def test_attention_pooling_ignores_a_logit_bias():
    """Why W_k has no bias: a constant added to every logit leaves the softmax unchanged."""
    block = randomize_(SimplifiedNonLocal2d(4)).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    logits = torch.einsum("c,bchw->bhw", block.w_k[0], x).flatten(1)
    torch.testing.assert_close(logits.softmax(-1), (logits + 3.7).softmax(-1))
    torch.testing.assert_close(logits.softmax(-1).reshape(1, 3, 3), attnlib.attention_map(block, x, (0, 0)))


def test_add_fusion_adds_one_vector_everywhere_and_mul_scales_each_channel():
    x = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    add = randomize_(ContextBlock(6, fusions=("add",))).double()
    shift = add(x) - x
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))  # the same vector at every position

    mul = randomize_(ContextBlock(6, fusions=("mul",))).double()
    gate = mul(x) / x
    torch.testing.assert_close(gate, gate[:, :, :1, :1].expand_as(gate))  # a per-channel gate
    assert ((gate > 0) & (gate < 1)).all() and (gate - 0.5).abs().max() > 1e-3  # σ(t) ∈ (0, 1)


def test_both_fusions_multiply_first_then_add():
    block = randomize_(ContextBlock(6, fusions=("add", "mul"))).double()
    x = torch.randn(1, 6, 3, 4, dtype=torch.float64)
    context, _ = block._context(x, need_weights=False)
    gate = torch.sigmoid(block.mul_transform(context))
    shift = block.add_transform(context)
    torch.testing.assert_close(block(x), x * gate + shift)
    assert not torch.allclose(block(x), (x + shift) * gate)


def test_fusion_order_given_does_not_change_the_block():
    x = torch.randn(1, 6, 3, 4)
    a = randomize_(ContextBlock(6, fusions=("add", "mul")))
    b = randomize_(ContextBlock(6, fusions=("mul", "add")))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x))


def test_mul_fusion_halves_the_input_at_init_as_in_the_official_code():
    """The zero-initialised transform gives σ(0) = 1/2: "mul" starts by halving x, "add" as the identity."""
    x = torch.randn(2, 6, 3, 4)
    torch.testing.assert_close(ContextBlock(6, fusions=("mul",))(x), x / 2, rtol=0, atol=0)
    torch.testing.assert_close(ContextBlock(6, fusions=("add", "mul"))(x), x / 2, rtol=0, atol=0)
    torch.testing.assert_close(ContextBlock(6, fusions=("add",))(x), x, rtol=0, atol=0)


def test_transform_width_follows_the_official_int_rule():
    assert ContextBlock(16).planes == 4
    assert ContextBlock(10, ratio=0.3).planes == 3
    assert ContextBlock(7, ratio=1 / 4).planes == 1
    assert ContextBlock(3, ratio=1).planes == 3
    block = ContextBlock(10, ratio=0.3, fusions=("add", "mul"))
    assert block.add_transform[0].out_channels == block.mul_transform[0].out_channels == 3


@pytest.mark.parametrize("ratio", [0, -0.25, 1.5, True, "0.25", None, 0.05])  # 16 * 0.05 < 1: no channel left
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="ratio"):
        ContextBlock(16, ratio=ratio)


@pytest.mark.parametrize("pooling", ["max", "Att", None])
def test_bad_pooling_raises(pooling):
    with pytest.raises(ValueError, match="pooling"):
        ContextBlock(8, pooling=pooling)


@pytest.mark.parametrize("fusions", [(), ("sum",), ("add", "add"), ("add", "mul", "add"), "add", None,
                                     ("channel_add",)])
def test_bad_fusions_raise(fusions):
    with pytest.raises(ValueError, match="fusions"):
        ContextBlock(8, fusions=fusions)


@pytest.mark.parametrize("in_channels", [0, -1, 2.0, True])
def test_bad_in_channels_raise(in_channels):
    for make in (ContextBlock, SimplifiedNonLocal2d):
        with pytest.raises(ValueError, match="in_channels"):
            make(in_channels)


@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusions", FUSION_SETS[:3], ids="+".join)
@pytest.mark.parametrize("fused", [False, True])
def test_flops_with_a_non_default_ratio_equal_counted(pooling, fusions, fused):
    block = set_fused(ContextBlock(10, ratio=0.3, pooling=pooling, fusions=fusions), fused)
    assert block.flops(2, 5, 7) == measured_flops(block, torch.randn(2, 10, 5, 7))


def test_formulas():
    b, c, h, w = 2, 16, 7, 11
    n = h * w
    assert context_block_flops(b, c, h, w) == {"conv": 2 * (2 * b * c * 4), "matmul": 4 * b * n * c}
    avg_both = context_block_flops(b, c, h, w, pooling="avg", fusions=("add", "mul"))
    assert avg_both == {"conv": 4 * (2 * b * c * 4), "matmul": 0}
    assert simplified_nonlocal_flops(b, c, h, w) == {"conv": 2 * b * c * c, "matmul": 4 * b * n * c}
    assert context_block_attention_memory(b, c, h, w) == b * n * 4  # B×1×N, linear in N
    assert context_block_attention_memory(b, c, h, w, fused=True) == b * n * 4  # one query: the core's plain path
    assert context_block_attention_memory(b, c, h, w, pooling="avg") == 0
    assert simplified_nonlocal_attention_memory(b, c, h, w, bytes_per_element=2) == b * n * 2
    assert simplified_nonlocal_attention_memory(b, c, h, w, fused=True) == b * n * 4
    with pytest.raises(ValueError, match="fusions"):
        context_block_flops(b, c, h, w, fusions=())


def test_methods_read_the_block_settings():
    block = ContextBlock(8)
    assert block.attention_memory(1, 4, 4) == 16 * 4
    block.fused = False  # a single query: both paths store the same 1×N weights
    assert block.attention_memory(1, 4, 4) == 16 * 4
    assert ContextBlock(8, pooling="avg").attention_memory(1, 4, 4) == 0
    assert SimplifiedNonLocal2d(8, fused=False).attention_memory(2, 3, 3, bytes_per_element=2) == 2 * 9 * 2

class MmcvContextBlock(torch.nn.Module):
    """mmcv's ``ContextBlock`` (mmcv/cnn/bricks/context_block.py, v2.1.0), transcribed: its
    layer names, its ``conv_mask`` with a bias, its ``spatial_pool`` and ``forward``."""

    def __init__(self, inplanes: int, ratio: float, pooling_type: str = "att",
                 fusion_types: tuple = ("channel_add",)) -> None:
        super().__init__()
        planes = int(inplanes * ratio)
        self.pooling_type = pooling_type
        if pooling_type == "att":
            self.conv_mask = torch.nn.Conv2d(inplanes, 1, kernel_size=1)
        else:
            self.avg_pool = torch.nn.AdaptiveAvgPool2d(1)

        def transform():
            return torch.nn.Sequential(torch.nn.Conv2d(inplanes, planes, kernel_size=1),
                                       torch.nn.LayerNorm([planes, 1, 1]), torch.nn.ReLU(inplace=True),
                                       torch.nn.Conv2d(planes, inplanes, kernel_size=1))
        self.channel_add_conv = transform() if "channel_add" in fusion_types else None
        self.channel_mul_conv = transform() if "channel_mul" in fusion_types else None

    def spatial_pool(self, x):
        batch, channel, height, width = x.size()
        if self.pooling_type != "att":
            return self.avg_pool(x)
        input_x = x.view(batch, channel, height * width).unsqueeze(1)
        context_mask = self.conv_mask(x).view(batch, 1, height * width)
        context_mask = torch.nn.functional.softmax(context_mask, dim=2).unsqueeze(-1)
        return torch.matmul(input_x, context_mask).view(batch, channel, 1, 1)

    def forward(self, x):
        context = self.spatial_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out


MMCV_FUSIONS = {("add",): ("channel_add",), ("mul",): ("channel_mul",), ("add", "mul"): ("channel_add", "channel_mul")}


@pytest.mark.parametrize("pooling", ["att", "avg"])
@pytest.mark.parametrize("fusions", list(MMCV_FUSIONS), ids="+".join)
def test_mmcv_weights_load_and_give_mmcv_outputs(pooling, fusions):
    """mmcv's conv_mask has a bias, attnlib's w_k none: the bias is dropped and the outputs still agree."""
    mmcv = randomize_(MmcvContextBlock(8, 1 / 4, pooling, MMCV_FUSIONS[fusions])).double().eval()
    if pooling == "att":
        assert mmcv.conv_mask.bias.abs().item() > 0.1  # a bias that would matter if the softmax saw it
    block = ContextBlock(8, ratio=1 / 4, pooling=pooling, fusions=fusions).double()
    block.load_state_dict(attnlib.gcnet.from_mmcv_state_dict(mmcv.state_dict()))
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), mmcv(x))
        assert (block(x) - x).abs().max() > 1e-2  # the transforms are not zero


@pytest.mark.parametrize("state", [{"conv_mask.weight": torch.zeros(2, 8, 1, 1)}, {"gc_block.conv_mask.weight": 0},
                                   {"channel_add.0.weight": 0}])
def test_from_mmcv_state_dict_rejects_what_is_not_a_context_block(state):
    with pytest.raises(ValueError, match="from_mmcv_state_dict"):
        attnlib.gcnet.from_mmcv_state_dict(state)
