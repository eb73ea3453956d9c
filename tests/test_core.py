"""The attention core: both paths agree, masks mean what they say, bad operands are refused."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from attnlib.core import attend, fold_batch_norm, project


def operands(*batch, n_q=7, n_k=9, d_k=5, d_v=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*batch, n_q, d_k, generator=g, dtype=dtype),
            torch.randn(*batch, n_k, d_k, generator=g, dtype=dtype),
            torch.randn(*batch, n_k, d_v, generator=g, dtype=dtype))


def loop_attention(q, k, v, scale, mask=None):
    """softmax(s q_i·k_j) v_j, one query at a time, in float64."""
    out = torch.zeros(q.shape[0], v.shape[1], dtype=torch.float64)
    for i in range(q.shape[0]):
        logits = torch.tensor([scale * float(q[i] @ k[j]) for j in range(k.shape[0])], dtype=torch.float64)
        if mask is not None:
            logits[~mask[i]] = -math.inf
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        out[i] = (w[:, None] * v.double()).sum(0)
    return out


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)], ids=["unbatched", "B", "BxHeads"])
@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_fused_equals_reference(batch, scale):
    q, k, v = operands(*batch)
    reference, weights = attend(q, k, v, scale=scale, need_weights=True)
    fused, none = attend(q, k, v, scale=scale)
    assert none is None and weights.shape == (*batch, 7, 9)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(*batch, 7))


def test_reference_equals_loop_definition():
    q, k, v = operands(dtype=torch.float64)
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True  # every query keeps a key
    for scale in (None, 1.0):
        s = 1 / math.sqrt(5) if scale is None else scale
        out, _ = attend(q, k, v, scale=scale, mask=mask, fused=False)
        torch.testing.assert_close(out, loop_attention(q, k, v, s, mask))


def test_mask_zeroes_weights_on_both_paths():
    q, k, v = operands(2)
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[:, 4:] = False
    out, weights = attend(q, k, v, mask=mask, need_weights=True)
    assert (weights[..., 4:] == 0).all()
    torch.testing.assert_close(attend(q, k, v, mask=mask)[0], out, rtol=0, atol=1e-5)
    # masked keys cannot influence the output
    v2 = v.clone()
    v2[:, 4:] += 100
    torch.testing.assert_close(attend(q, k, v2, mask=mask)[0], out, rtol=0, atol=1e-5)


def test_gradients_agree():
    q, k, v = (t.double().requires_grad_() for t in operands(2))
    assert torch.autograd.gradcheck(lambda *t: attend(*t, fused=False)[0], (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: attend(*t)[0], (q, k, v))


@pytest.mark.parametrize("shapes, pattern", [
    (((2, 7, 5), (3, 9, 5), (3, 9, 3)), "leading"),
    (((7, 5), (2, 9, 5), (2, 9, 3)), "same number of dimensions"),
    (((2, 7, 5), (2, 9, 4), (2, 9, 3)), "d_k"),
    (((2, 7, 5), (2, 9, 5), (2, 8, 3)), "as many keys as values"),
    (((5,), (5,), (5,)), "same number of dimensions"),
])
def test_refuses_operands_that_would_broadcast(shapes, pattern):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=pattern):
        attend(q, k, v)


@pytest.mark.parametrize("mask, pattern", [
    (torch.ones(7, 9), "boolean"),
    (torch.ones(9, 7, dtype=torch.bool), "shape"),
    (torch.ones(1, 7, 9, dtype=torch.bool), "shape"),
    (torch.ones(7, 9, dtype=torch.bool).index_fill_(0, torch.tensor([3]), False), "at least one key"),
])
def test_refuses_bad_masks(mask, pattern):
    q, k, v = operands(2)
    with pytest.raises(ValueError, match=pattern):
        attend(q, k, v, mask=mask)


def test_bf16_autocast():
    q, k, v = operands(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fused in (False, True):
            out, _ = attend(q, k, v, fused=fused)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("n_q, n_k, d_k, d_v, expected", [
    (7, 11, 5, 5, True),    # more keys than d_k + d_v: SDPA saves the 7×11 matrix
    (1, 11, 5, 5, False),   # a single query (GCNet): nothing to save
    (7, 4, 5, 5, False),    # fewer keys than query channels (CAM, ANN's pooled keys at 256 channels)
    (7, 5, 5, 5, False),    # as many keys as channels: the matrix is the queries' size, nothing saved
    (7, 10, 5, 5, False),   # N_k = d_k + d_v (ANN's 110 keys at 64 + 64): not worth the recompute on a CPU
    (7, 11, 5, 3, False),   # d_v ≠ d_k (DANet's PAM): no CPU flash kernel, SDPA would store the matrix
])
def test_fused_kernel_is_called_exactly_when_the_rule_says(monkeypatch, n_q, n_k, d_k, d_v, expected):
    import attnlib.core as core

    calls = []
    sdpa = core.F.scaled_dot_product_attention
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    q, k, v = operands(2, n_q=n_q, n_k=n_k, d_k=d_k, d_v=d_v)
    fused, _ = attend(q, k, v)
    assert bool(calls) == expected == core.takes_fused_path(n_q, n_k, d_k, d_v=d_v)
    assert core.attention_matrix_bytes(2, n_q, n_k, d_k, d_v=d_v, fused=True) == (0 if expected else 2 * n_q * n_k * 4)
    torch.testing.assert_close(fused, attend(q, k, v, fused=False)[0], rtol=0, atol=1e-5)


def test_cuda_has_a_memory_saving_kernel_for_any_value_width():
    from attnlib.core import attention_matrix_bytes, takes_fused_path

    assert takes_fused_path(7, 9, 5, d_v=3, device="cuda") and not takes_fused_path(7, 9, 5, d_v=3, device="cpu")
    # and, being faster in both directions there, it is taken for any matrix larger than the queries
    assert takes_fused_path(7, 6, 5, device="cuda") and not takes_fused_path(7, 10, 5, device="cpu")
    assert attention_matrix_bytes(2, 7, 9, 5, d_v=3, device=torch.device("cuda"), fused=True) == 0


def test_cpu_flash_kernel_runs_for_equal_widths_and_not_for_unequal_ones():
    """The premise of the d_v rule, checked on this torch: which SDPA kernel a CPU actually runs."""
    from torch.profiler import profile

    def kernels(d_v):
        q, k, v = operands(2, n_q=16, n_k=16, d_k=8, d_v=d_v)
        with profile() as prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return {e.name for e in prof.events()}

    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels(8)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in kernels(16)


def test_plain_path_flushes_subnormal_weights_of_small_matrices():
    """Weights below finfo.tiny are 0 (not subnormal) where the matrix is small, and the output is unchanged."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 6, 80, generator=g)  # DANet's CAM: 6 channels of 80 positions, official sign
    out, weights = attend(-a, a, a, scale=1.0, need_weights=True)
    tiny = torch.finfo(torch.float32).tiny
    plain = (-a @ a.transpose(1, 2)).softmax(-1)
    assert ((plain > 0) & (plain < tiny)).any()  # the case exists: a float32 softmax gives subnormal weights
    exact = (-a.double() @ a.double().transpose(1, 2)).softmax(-1)
    assert not ((weights > 0) & (weights < tiny)).any()
    torch.testing.assert_close(weights.double(), exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), exact @ a.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_k, d_k", [(12, 4), (3, 16)], ids=["scales-queries", "scales-scores"])
@pytest.mark.parametrize("scale", [0.3, -1.0])
def test_plain_path_scales_exactly_whichever_operand_it_scales(n_k, d_k, scale):
    """Fewer keys than query channels: the N_q×N_k scores are scaled, else the queries."""
    q = torch.randn(2, 5, d_k, dtype=torch.float64)
    k, v = torch.randn(2, n_k, d_k, dtype=torch.float64), torch.randn(2, n_k, 6, dtype=torch.float64)
    out, weights = attend(q, k, v, scale=scale, need_weights=True)
    expected = (scale * q @ k.transpose(1, 2)).softmax(-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, expected @ v)
    torch.testing.assert_close(attend(q, k, v, scale=scale)[0], out)


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "B"])
@pytest.mark.parametrize("fused", [False, True])
def test_key_mask_means_the_same_row_for_every_query(batch, fused):
    """A (…, 1, N_k) key mask equals the full (…, N_q, N_k) mask with that row repeated."""
    q, k, v = operands(*batch, d_v=5)  # d_v = d_k: the CPU flash kernel takes masks too
    keys = torch.rand(*batch, 1, 9, generator=torch.Generator().manual_seed(2)) > 0.5
    keys[..., 0] = True
    out, _ = attend(q, k, v, mask=keys, fused=fused)
    torch.testing.assert_close(out, attend(q, k, v, mask=keys.expand(*batch, 7, 9), fused=False)[0],
                               rtol=0, atol=1e-5)


def test_refuses_a_key_mask_for_the_wrong_batch():
    q, k, v = operands(2)
    with pytest.raises(ValueError, match=r"\(2, 1, 9\).*got \(3, 1, 9\)"):
        attend(q, k, v, mask=torch.ones(3, 1, 9, dtype=torch.bool))


@pytest.mark.parametrize("n", [1, 2, 7], ids=["one-token", "even", "odd"])
@pytest.mark.parametrize("scale", [1.0, -1.0, 0.3])
def test_self_attention_uses_the_symmetric_scores_and_equals_the_literal_path(n, scale):
    """Keys that are the queries (CAM): _Gram's scores, values and gradients equal QKᵀ's, in float64."""
    x = torch.randn(2, n, 11, dtype=torch.float64, requires_grad=True)
    out, weights = attend(x, x, x, scale=scale, need_weights=True)
    reference, reference_weights = attend(x, x.clone(), x, scale=scale, need_weights=True, fused=False)
    torch.testing.assert_close(weights, reference_weights)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(reference, x, grad)[0])
    assert torch.autograd.gradcheck(lambda t: attend(t, t, t, scale=scale)[0], (x,))
    assert torch.autograd.gradgradcheck(lambda t: attend(t, t, t, scale=scale)[0], (x,))


def test_symmetric_scores_mirror_a_block_and_count_three_quarters_of_the_products():
    from torch.utils.flop_counter import FlopCounterMode

    from attnlib.core import _Gram

    x = torch.randn(3, 10, 40)
    gram = _Gram.apply(x)
    assert torch.equal(gram[:, 5:, :5], gram[:, :5, 5:].mT)  # computed once, mirrored
    torch.testing.assert_close(gram, x @ x.mT)
    with FlopCounterMode(display=False) as counter:
        _Gram.apply(x)
    assert counter.get_total_flops() == 2 * 3 * 40 * (5 * 10 + 5 * 5)  # X_1 Xᵀ and X_2 X_2ᵀ


def test_symmetric_scores_under_bf16_autocast():
    x = torch.randn(2, 6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attend(x, x, x, scale=-1.0)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def pooling_operands(batch, n, d, layout, seed=0):
    """One query and tokens (keys = values), as GCNet passes them: ``map`` is a B×d×N map seen as tokens."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    shape = (batch, d, n) if layout == "map" else (batch, n, d)
    source = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return query, source


def as_tokens(source, layout):
    return source.mT if layout == "map" else source


@pytest.mark.parametrize("layout", ["map", "tokens"])
@pytest.mark.parametrize("batch, shares", [(1, 1), (1, 3), (2, 1)])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_attention_pooling_equals_the_literal_path(monkeypatch, layout, batch, shares, scale):
    """One query pooling tokens that are its keys and values (GCNet): _Pool's values and gradients, in float64."""
    import attnlib.core as core

    monkeypatch.setattr(core, "_position_shares", lambda tokens: shares)
    calls = []
    pool = core._Pool.apply
    monkeypatch.setattr(core._Pool, "apply", lambda *a: calls.append(1) or pool(*a))
    query, source = pooling_operands(batch, 12, 5, layout)

    def pooled(q, s):
        tokens = as_tokens(s, layout)
        return attend(q.expand(batch, 1, 5), tokens, tokens, scale=scale)[0]

    out = pooled(query, source)
    tokens = as_tokens(source, layout)
    reference, _ = attend(query.expand(batch, 1, 5), tokens, tokens.clone(), scale=scale, fused=False)
    assert calls and not attend(query.expand(batch, 1, 5), tokens, tokens, need_weights=True)[0].isnan().any()
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (query, source), grad),
                               torch.autograd.grad(reference, (query, source), grad))
    assert torch.autograd.gradcheck(pooled, (query, source))


@pytest.mark.parametrize("threads, n, d, batch, expected", [
    (2, 4096, 512, 1, 2), (16, 2700, 512, 1, 15), (4, 4099, 512, 1, 1), (8, 3, 1 << 19, 1, 3),
    (2, 4096, 512, 2, 1),  # a batch already spreads over the threads
    (2, 1024, 512, 1, 1),  # too small for a thread to pay
])
def test_pooling_splits_the_positions_into_thread_shares(monkeypatch, threads, n, d, batch, expected):
    """The largest divisor of N no larger than the thread count, for one large enough image on a CPU."""
    import attnlib.core as core

    monkeypatch.setattr(core.torch, "get_num_threads", lambda: threads)
    assert core._position_shares(torch.empty(batch, n, d)) == expected


@pytest.mark.parametrize("case", ["mask", "weights", "reference", "keys are not values", "query is a token"])
def test_attention_pooling_only_where_the_rule_says(monkeypatch, case):
    import attnlib.core as core

    calls = []
    pool = core._Pool.apply
    monkeypatch.setattr(core._Pool, "apply", lambda *a: calls.append(1) or pool(*a))
    query, source = pooling_operands(2, 9, 5, "tokens")
    tokens = source
    kwargs = {"mask": torch.ones(1, 9, dtype=torch.bool)} if case == "mask" else {}
    if case == "weights":
        kwargs["need_weights"] = True
    if case == "reference":
        kwargs["fused"] = False
    values = tokens.clone() if case == "keys are not values" else tokens
    if case == "query is a token":
        attend(tokens[:, :1], tokens[:, :1], tokens[:, :1])
    else:
        attend(query.expand(2, 1, 5), tokens, values, **kwargs)
    assert not calls


@pytest.mark.parametrize("layout", ["map", "tokens"])
def test_attention_pooling_has_exact_second_derivatives(layout):
    query, source = pooling_operands(1, 9, 5, layout)

    def pooled(q, s):
        tokens = as_tokens(s, layout)
        return attend(q, tokens, tokens, scale=0.7)[0]

    assert torch.autograd.gradgradcheck(pooled, (query, source))


def test_attention_pooling_flushes_subnormal_weights_as_the_plain_path_does():
    """Few positions, many channels (N ≤ d): weights below float32's tiny are 0 on both paths."""
    query = torch.zeros(1, 1, 64)
    query[..., 0] = 1.0
    tokens = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(0))
    tokens[..., 0] = torch.linspace(0, -100, 48)  # logits down to e^-100: subnormal below e^-87.3
    tokens.requires_grad_()
    logits = (query @ tokens.mT).detach()
    unflushed = logits.softmax(-1)
    assert ((unflushed > 0) & (unflushed < torch.finfo(torch.float32).tiny)).any()  # the case is real
    out, _ = attend(query, tokens, tokens, scale=1.0)
    _, _, weights = out.grad_fn.saved_tensors  # _Pool's
    assert not ((weights > 0) & (weights < torch.finfo(torch.float32).tiny)).any()
    torch.testing.assert_close(weights, unflushed, rtol=0, atol=torch.finfo(torch.float32).tiny)
    reference, _ = attend(query, tokens, tokens.clone(), scale=1.0)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def test_attention_pooling_under_bf16_autocast():
    source = torch.randn(1, 32, 100, requires_grad=True)
    query = torch.randn(1, 1, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = source.mT
        out, _ = attend(query, tokens, tokens, scale=1.0)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    assert source.grad.dtype == query.grad.dtype == torch.float32
    assert torch.isfinite(source.grad).all() and torch.isfinite(query.grad).all()


@pytest.mark.parametrize("case", ["scale queries", "scale scores", "mask", "symmetric", "flush", "weights"])
def test_without_autograd_each_step_overwrites_the_scores_and_nothing_else(case):
    """No autograd: the scores are overwritten step by step, with the same result, and no operand changes."""
    g = torch.Generator().manual_seed(0)
    n_k = 3 if case == "scale scores" else 40
    q, k, v = (torch.randn(2, 30, 8, generator=g), torch.randn(2, n_k, 8, generator=g),
               torch.randn(2, n_k, 6, generator=g))
    kwargs = {"scale": 0.3, "need_weights": case == "weights"}
    if case == "mask":
        kwargs["mask"] = torch.rand(30, n_k, generator=g) > 0.5
        kwargs["mask"][:, 0] = True
    if case == "symmetric":
        k, v = q, torch.randn(2, 30, 6, generator=g)
    if case == "flush":  # DANet's CAM, official sign: 6 channels of 80 positions
        k = v = torch.randn(2, 6, 80, generator=g)
        q, kwargs["scale"] = k.neg(), 1.0
    before = [t.clone() for t in (q, k, v)]
    with torch.no_grad():
        out, weights = attend(q, k, v, **kwargs)
    tracked = [t.clone().requires_grad_() for t in (q, k, v)]
    if case == "symmetric":
        tracked[1] = tracked[0]
    if case == "flush":
        tracked[1] = tracked[2] = tracked[0].neg()
    expected, expected_weights = attend(*tracked, **kwargs)
    assert torch.equal(out, expected)
    if case == "weights":
        assert torch.equal(weights, expected_weights)
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0)


def test_softmax_over_the_scores_is_the_softmax_and_falls_back_for_a_strided_matrix():
    from attnlib.core import _softmax_rows
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for n in (7, 2700):  # CUDA: the register kernel (≤ 1024 columns) and the block kernel
            scores = torch.randn(3, 5, n, device=device)
            expected = scores.softmax(-1)
            result = _softmax_rows(scores, in_place=True)
            assert result.data_ptr() == scores.data_ptr() and torch.equal(result, expected)
        strided = torch.randn(3, 40, 5, device=device).mT  # _softmax.out would get this wrong
        result = _softmax_rows(strided, in_place=True)
        assert torch.equal(result, strided.softmax(-1))


@pytest.fixture
def attention_calls(monkeypatch):
    """A list that grows by one at every call of _Attention."""
    import attnlib.core as core

    calls = []
    function = core._Attention.apply
    monkeypatch.setattr(core._Attention, "apply", lambda *a: calls.append(1) or function(*a))
    return calls


@pytest.mark.parametrize("case", ["plain", "key mask", "mask", "value only", "batch×heads"])
def test_training_through_one_kept_matrix_equals_autograd_step_by_step(attention_calls, case):
    """The fast path trains through _Attention: the literal path's output and gradients, and exact second derivatives."""
    batch = (2, 3) if case == "batch×heads" else (2,)
    q, k, v = operands(*batch, n_q=11, n_k=13, d_k=5, d_v=4, dtype=torch.float64)
    mask = None
    if case == "key mask":
        mask = torch.rand(*batch, 1, 13, generator=torch.Generator().manual_seed(1)) > 0.4
    if case == "mask":
        mask = torch.rand(11, 13, generator=torch.Generator().manual_seed(1)) > 0.4
    if mask is not None:
        mask[..., 0] = True
    needs = (False, False, True) if case == "value only" else (True, True, True)
    q, k, v = (t.requires_grad_(n) for t, n in zip((q, k, v), needs))
    leaves = [t for t in (q, k, v) if t.requires_grad]

    def fast(*grad_leaves):
        tensors = iter(grad_leaves)
        return attend(*(next(tensors) if t.requires_grad else t for t in (q, k, v)), scale=0.4, mask=mask)[0]

    out = fast(*leaves)
    assert attention_calls, "the fast path did not train through _Attention"
    expected = attend(q, k, v, scale=0.4, mask=mask, fused=False)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fast, leaves)
    assert torch.autograd.gradgradcheck(fast, leaves)


@pytest.mark.parametrize("case", ["no gradient", "weights", "fused=False", "few keys", "symmetric", "autocast",
                                  "mixed dtypes", "map values"])
def test_training_keeps_one_matrix_only_where_the_rule_says(attention_calls, case):
    q, k, v = operands(2, n_q=11, n_k=4 if case == "few keys" else 13, d_k=5, d_v=4)
    kwargs = {"need_weights": case == "weights", "fused": case != "fused=False"}
    if case == "symmetric":
        k, v = q, torch.randn(2, 11, 4)
    if case == "mixed dtypes":
        v = v.double()
    if case == "map values":  # a B×d_v×N map seen as tokens, with no more queries than channels (ISA, GCNet)
        q, v = q[:, :3], torch.randn(2, 4, 13).mT
    q.requires_grad_(case != "no gradient")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        attend(q, k, v, **kwargs)
    assert not attention_calls  # (the cases where it is used: the test above)


def test_softmax_backward_over_its_gradient_is_the_softmax_backward():
    """_Attention writes S̄ over Ā: the kernel reads each row of Ā before it writes it."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for n in (7, 2700):
            weights = torch.randn(3, 5, n, device=device).softmax(-1)
            grad = torch.randn(3, 5, n, device=device)
            expected = torch._softmax_backward_data(grad, weights, -1, weights.dtype)
            result = torch.ops.aten._softmax_backward_data.out(grad, weights, -1, weights.dtype, grad_input=grad)
            assert result.data_ptr() == grad.data_ptr() and torch.equal(result, expected)


@pytest.mark.parametrize("d_k, training, expected", [
    (129, True, False),   # a wide head in training: the matrix is kept rather than QK^T recomputed
    (129, False, True),   # inference recomputes nothing: the kernel
    (128, True, True),    # up to 128 channels the kernel's recompute pays
])
def test_cpu_training_keeps_a_wide_heads_matrix(monkeypatch, d_k, training, expected):
    import attnlib.core as core

    calls = []
    sdpa = core.F.scaled_dot_product_attention
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    q, k, v = operands(1, n_q=3, n_k=2 * d_k + 1, d_k=d_k, d_v=d_k)
    with torch.set_grad_enabled(training):
        out, _ = attend(q.requires_grad_(), k, v)
    assert bool(calls) == expected == core.takes_fused_path(3, 2 * d_k + 1, d_k, training=training)
    assert core.attention_matrix_bytes(1, 3, 2 * d_k + 1, d_k, fused=True, training=training) == (
        0 if expected else 3 * (2 * d_k + 1) * 4)
    assert core.takes_fused_path(3, 2 * d_k + 1, d_k, device="cuda", training=training)  # CUDA: the kernel
    torch.testing.assert_close(out, attend(q, k, v, fused=False)[0], rtol=0, atol=1e-5)


def _outputs_and_gradients(layers, x, fused):
    outputs = project(x, layers, fused=fused)
    loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in outputs)
    parameters = [p for layer in layers for p in layer.parameters()]
    return outputs, torch.autograd.grad(loss, [x, *parameters])


@pytest.mark.parametrize("bias", [True, False, "mixed"])
@pytest.mark.parametrize("batch", [1, 2])
def test_stacked_projections_equal_the_convolutions_one_by_one(bias, batch):
    torch.manual_seed(0)
    biases = (True, False, True) if bias == "mixed" else (bias,) * 3
    convs = [nn.Conv2d(6, out, 1, bias=b).double() for out, b in zip((2, 2, 5), biases)]
    x = torch.randn(batch, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    results = {fused: _outputs_and_gradients(convs, x, fused) for fused in (False, True)}
    assert [tuple(t.shape) for t in results[True][0]] == [(batch, out, 4, 3) for out in (2, 2, 5)]
    for got, expected in zip(results[True][0] + results[True][1], results[False][0] + results[False][1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)


def _conv_bn_relu_units():
    units = [nn.Sequential(nn.Conv2d(6, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU(inplace=True)),
             nn.Sequential(nn.Conv2d(6, 2, 1), nn.BatchNorm2d(2, affine=False)),  # a bias, no γ and β
             nn.Conv2d(6, 4, 1, bias=False),
             nn.Sequential(nn.Conv2d(6, 2, 1, bias=False), nn.ReLU())]
    for unit in units:
        for m in unit.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics and affine far from the identity
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                if m.affine:
                    nn.init.uniform_(m.weight, -2, 2)
                    nn.init.uniform_(m.bias, -1, 1)
    return [unit.double() for unit in units]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch", [1, 2])
def test_stacked_conv_bn_relu_units_equal_the_layers_one_by_one(train, batch):
    """BatchNorm folded into its convolution in eval mode, batch statistics in training."""
    torch.manual_seed(0)
    reference = _conv_bn_relu_units()
    stacked = copy.deepcopy(reference)
    x = torch.randn(batch, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    results = {}
    for fused, units in ((False, reference), (True, stacked)):
        for unit in units:
            unit.train(train)
        results[fused] = _outputs_and_gradients(units, x, fused)
    for got, expected in zip(results[True][0] + results[True][1], results[False][0] + results[False][1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(reference, stacked):  # training updates the same running statistics
        for (name, buffer), other in zip(a.named_buffers(), b.buffers()):
            torch.testing.assert_close(other, buffer, rtol=0, atol=1e-14, msg=name)


class _Calls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_stacked_projections_fold_batch_norm_in_eval_mode_and_run_one_by_one_in_training(train):
    units = [unit.train(train) for unit in _conv_bn_relu_units()]
    with torch.no_grad(), _Calls() as calls:
        project(torch.randn(1, 6, 4, 3, dtype=torch.float64), units, fused=True)
    assert calls.names.count("conv2d") == (len(units) if train else 1)
    assert calls.names.count("batch_norm") == (2 if train else 0)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    # aten calls, backward included (autograd's engine bypasses TorchFunctionMode)
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_stacked_projections_gradient_is_one_concatenation():
    """The slices' gradients come back as one concatenation, not one zero-filled map per
    slice summed; a single unit keeps the map itself, and its ReLU runs in place."""
    units = [unit.eval() for unit in _conv_bn_relu_units()]
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    outputs = project(x, units, fused=True)
    with _Ops() as ops:
        sum(out.sum() for out in outputs).backward()
    assert "slice_backward" not in " ".join(ops.names)
    assert sum(name.startswith("cat") for name in ops.names) == 1
    (single,) = project(x, (units[3],), fused=True)  # conv-ReLU
    assert not single._is_view() and single._version == 1  # the ReLU overwrote the map


def test_folded_batch_norm_is_the_affine_map_it_replaces():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1).double()
    norm = nn.BatchNorm2d(2).double().eval()
    mean, var, gamma, beta = (torch.tensor(v, dtype=torch.float64)
                              for v in ([0.5, -1.0], [4.0, 0.25], [3.0, -1.0], [0.1, 0.2]))
    for buffer, value in ((norm.running_mean, mean), (norm.running_var, var), (norm.weight, gamma), (norm.bias, beta)):
        buffer.data.copy_(value)
    weight, bias = fold_batch_norm(conv, norm)
    s = gamma / (var + norm.eps).sqrt()
    torch.testing.assert_close(weight, conv.weight * s[:, None, None, None], rtol=0, atol=1e-15)
    torch.testing.assert_close(bias, beta + s * (conv.bias - mean), rtol=0, atol=1e-15)
    assert fold_batch_norm(conv, norm.train()) == (conv.weight, conv.bias)  # batch statistics: nothing to fold
    assert fold_batch_norm(conv, None) == (conv.weight, conv.bias)


def test_a_unit_may_be_a_list_of_modules():
    unit = _conv_bn_relu_units()[0].eval()
    x = torch.randn(1, 6, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        for fused in (False, True):
            (listed,), (sequential,) = project(x, (list(unit),), fused=fused), project(x, (unit,), fused=fused)
            torch.testing.assert_close(listed, sequential, rtol=0, atol=1e-14)
            torch.testing.assert_close(listed, unit(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("layers, pattern", [
    ((nn.Conv2d(4, 2, 3), nn.Conv2d(4, 2, 1)), "1×1"),
    ((nn.Conv2d(4, 2, 1, stride=2), nn.Conv2d(4, 2, 1)), "1×1"),
    ((nn.Conv2d(4, 2, 1, groups=2), nn.Conv2d(4, 2, 1)), "1×1"),
    ((nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)),), "1×1"),
    ((nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)),), "BatchNorm2d and/or a ReLU"),
    ((nn.Sequential(nn.Conv2d(4, 2, 1), nn.Dropout()),), "BatchNorm2d and/or a ReLU"),
    ((nn.Linear(4, 2),), "1×1"),
], ids=["3x3", "stride", "groups", "norm first", "norm last", "dropout", "linear"])
def test_stacked_projections_refuse_what_one_convolution_cannot_stack(layers, pattern):
    for fused in (False, True):
        with pytest.raises(ValueError, match=pattern):
            project(torch.randn(1, 4, 5, 5), layers, fused=fused)


