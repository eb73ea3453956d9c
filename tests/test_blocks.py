"""Properties every attention block must have, checked on each block in one table.

Paper-specific properties (brute-force definitions, masks, reachability) live in
``test_<paper>.py``; what all blocks share is here, so no block can skip it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import attnlib
from conftest import measured_flops, randomize_, requires_cuda, set_fused

C = 16  # channels of every test case: small enough for gradcheck, large enough for reduction=8


def _make(module: str, name: str, *args, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return getattr(importlib.import_module(f"attnlib.{module}"), name)(*args, **kwargs)
    return make


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    identity_at_init: bool = False  # zero-initialised output: the block starts as x -> x
    map_is_distribution: bool | None = True  # None: no spatial map; False: a map that need not sum to 1
    low_channels: int | None = None  # AFNB reads a second, low-level feature map
    memory: str = "spatial"  # attention weights grow with H·W ("spatial"), are C×C ("channel"), or none ("none")

    def inputs(self, b: int, h: int, w: int, **kw) -> tuple[torch.Tensor, ...]:
        high = torch.randn(b, C, h, w, **kw)
        if self.low_channels is None:
            return (high,)
        return (torch.randn(b, self.low_channels, h, w, **kw), high)


CASES = [
    *[Case(f"nonlocal-{mode}", _make("nonlocal_block", "NonLocal2d", C, mode=mode), identity_at_init=True,
           map_is_distribution=mode in ("embedded_gaussian", "gaussian"))
      for mode in ("embedded_gaussian", "gaussian", "dot_product", "concatenation")],
    Case("nonlocal-subsample", _make("nonlocal_block", "NonLocal2d", C, sub_sample=True), identity_at_init=True),
    Case("nonlocal-nobn", _make("nonlocal_block", "NonLocal2d", C, bn=False), identity_at_init=True),
    *[Case(f"gc-{pool}-{'+'.join(fus)}", _make("gcnet", "ContextBlock", C, pooling=pool, fusions=fus),
           identity_at_init=fus == ("add",),  # the official "mul" gate σ(0) = 1/2 halves x at init
           memory="spatial" if pool == "att" else "none")
      for pool in ("att", "avg") for fus in (("add",), ("mul",), ("add", "mul"))],
    Case("simplified-nonlocal", _make("gcnet", "SimplifiedNonLocal2d", C), identity_at_init=True),
    Case("pam", _make("danet", "PositionAttention", C), identity_at_init=True),
    Case("cam", _make("danet", "ChannelAttention", C), identity_at_init=True, map_is_distribution=None, memory="channel"),
    Case("dual-head", _make("danet", "DualAttentionHead", C, C)),
    Case("cca", _make("ccnet", "CrissCrossAttention", C), identity_at_init=True),
    Case("rcca", _make("ccnet", "RecurrentCrissCross", C, recurrence=2), identity_at_init=True),
    Case("apnb", _make("ann", "APNB", C, C, 8, 8, pool_sizes=(1, 2, 3))),
    Case("afnb", _make("ann", "AFNB", 12, C, C, 8, 8, pool_sizes=(1, 2, 3)), low_channels=12),
    Case("isa", _make("isanet", "InterlacedSparseAttention", C, 8, 8, C, down_factor=(3, 4))),
]
SHAPES = [(1, 7, 11), (2, 13, 5), (1, 3, 2)]


def cases(predicate=lambda case: True):
    return [pytest.param(case, id=case.id) for case in CASES if predicate(case)]


@pytest.mark.parametrize("case", cases())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_output_shape(case, shape, train):
    block = case.make().train(train)
    out = block(*case.inputs(*shape))
    out_channels = getattr(block, "out_channels", C)
    assert out.shape == (shape[0], out_channels, shape[1], shape[2])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", cases(lambda c: c.identity_at_init))
def test_identity_at_init(case):
    block = case.make()
    (x,) = case.inputs(2, 6, 5)
    for train in (True, False):
        torch.testing.assert_close(block.train(train)(x), x, rtol=0, atol=0)


@pytest.mark.parametrize("case", cases())
def test_gradcheck(case):
    block = randomize_(case.make().double().eval(), std=0.3)
    inputs = tuple(t.double().requires_grad_() for t in case.inputs(1, 3, 4))
    for fused in (False, True):
        set_fused(block, fused)
        assert torch.autograd.gradcheck(block, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", cases())
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_fused_equals_reference(case, shape):
    # std 0.3 keeps the recurrent blocks' second-loop energies moderate: float32 softmax of
    # logits near 100 differs between paths by ~1e-5 through rounding alone
    block = randomize_(case.make().eval(), std=0.3)
    inputs = case.inputs(*shape)
    with torch.no_grad():
        reference = set_fused(block, False)(*inputs)
        fused = set_fused(block, True)(*inputs)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", cases())
def test_fused_trains_as_the_reference(case):
    """A training step (BatchNorm on batch statistics) on both paths, in float64: the same
    output, the same gradient for the input and every parameter, the same running statistics."""
    steps = {}
    for fused in (False, True):
        block = set_fused(randomize_(case.make().double(), std=0.3), fused).train()
        inputs = tuple(t.double().requires_grad_() for t in case.inputs(2, 7, 11))
        torch.manual_seed(1)  # the same dropout masks on both paths
        out = block(*inputs)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        grads = torch.autograd.grad((out * weights).sum(), [*inputs, *block.parameters()])
        steps[fused] = (out, *grads, *block.buffers())
    assert len(steps[True]) == len(steps[False])
    for got, expected in zip(steps[True], steps[False]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", cases(lambda c: c.map_is_distribution is not None))
@pytest.mark.parametrize("query", [(0, 0), (4, 6), (6, 10)])
def test_attention_map_shape_and_mass(case, query):
    block = randomize_(case.make().eval())
    inputs = case.inputs(2, 7, 11)
    x = inputs if len(inputs) > 1 else inputs[0]
    with torch.no_grad():
        amap = attnlib.attention_map(block, x, query)
    assert amap.shape == (2, 7, 11)
    assert torch.isfinite(amap).all()
    if case.map_is_distribution:
        assert (amap >= 0).all()
        torch.testing.assert_close(amap.sum(dim=(1, 2)), torch.ones(2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", cases(lambda c: c.map_is_distribution is not None))
@pytest.mark.parametrize("query", [(7, 0), (0, 11), (-1, 0), (0, -1), (1.0, 2), (1,), "a"])
def test_attention_map_rejects_bad_query(case, query):
    block = case.make().eval()
    inputs = case.inputs(1, 7, 11)
    x = inputs if len(inputs) > 1 else inputs[0]
    with pytest.raises(ValueError, match="query"):
        attnlib.attention_map(block, x, query)


@pytest.mark.parametrize("case", cases())
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("shape", [(2, 7, 11), (1, 16, 16)], ids=["2x7x11", "1x16x16"])
def test_analytic_flops_equal_counted(case, fused, shape):
    block = set_fused(case.make().eval(), fused)
    b, h, w = shape
    assert attnlib.complexity.flops(block, b, h, w) == measured_flops(block, *case.inputs(b, h, w))


@pytest.mark.parametrize("case", cases())
def test_attention_memory_is_a_byte_count(case):
    block = set_fused(case.make().eval(), False)
    small, large = (attnlib.complexity.attention_memory(block, 1, s, s) for s in (8, 16))
    assert isinstance(small, int) and isinstance(large, int)
    assert attnlib.complexity.attention_memory(block, 2, 8, 8) == 2 * small
    assert attnlib.complexity.attention_memory(block, 1, 8, 8, bytes_per_element=2) * 2 == small
    if case.memory == "spatial":
        assert 0 < small < large
    elif case.memory == "channel":  # C×C weights per image, whatever the resolution
        assert small == large == C * C * 4
    else:
        assert small == large == 0


@pytest.mark.parametrize("case", cases())
def test_bf16_autocast_runs(case):
    block = randomize_(case.make().eval())
    inputs = case.inputs(2, 7, 11)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(*inputs)
    reference = block(*inputs)
    assert out.shape == reference.shape and torch.isfinite(out).all()


def _bad_inputs(case: Case):
    """(description, inputs, pattern in the message) for each kind of bad input."""
    good = case.inputs(1, 7, 11)

    def replace_high(t):
        return (*good[:-1], t)

    yield "3-D", replace_high(good[-1][0]), "4-D"
    yield "integer", replace_high(good[-1].long()), "floating"
    yield "empty H", replace_high(torch.randn(1, C, 0, 11)), "non-empty"
    yield "empty W", replace_high(torch.randn(1, C, 7, 0)), "non-empty"
    yield "channels", replace_high(torch.randn(1, C + 1, 7, 11)), f"{C} input channels"
    if case.low_channels is not None:
        yield "low channels", (torch.randn(1, case.low_channels + 1, 7, 11), good[1]), f"{case.low_channels} input channels"
        yield "low size", (torch.randn(1, case.low_channels, 6, 11), good[1]), "spatial size"


@pytest.mark.parametrize("case", cases())
def test_bad_input_raises_clear_value_error(case):
    block = case.make()
    for description, inputs, pattern in _bad_inputs(case):
        with pytest.raises(ValueError, match=pattern):
            block(*inputs)


@requires_cuda
@pytest.mark.parametrize("case", cases())
def test_cuda_and_channels_last_match_cpu(case):
    block = randomize_(case.make().eval())
    inputs = case.inputs(2, 13, 5)
    with torch.no_grad():
        expected = block(*inputs)
        gpu = block.cuda()
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = gpu(*(t.cuda().contiguous(memory_format=fmt) for t in inputs))
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.isfinite(gpu(*(t.cuda() for t in inputs))).all()


@pytest.mark.parametrize("case", cases(lambda c: c.map_is_distribution is not None))
def test_attention_map_leaves_the_block_unchanged_in_training_mode(case):
    block = randomize_(case.make()).train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    inputs = case.inputs(2, 7, 11)
    attnlib.attention_map(block, inputs if len(inputs) > 1 else inputs[0], (3, 4))
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", cases(lambda c: c.map_is_distribution is not None))
def test_attention_map_refuses_the_wrong_number_of_inputs(case):
    block = case.make().eval()
    inputs = case.inputs(1, 7, 11)
    wrong = inputs[-1] if len(inputs) > 1 else (inputs[0], inputs[0])
    with pytest.raises(ValueError, match="input tensor"):
        attnlib.attention_map(block, wrong, (0, 0))
