"""Non-local block: every pairwise function against eq. (1) written as loops."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib.nonlocal_block import MODES, NonLocal2d
from conftest import randomize_


def conv1x1(x, conv):
    return torch.einsum("oc,chw->ohw", conv.weight.flatten(1), x) + conv.bias[:, None, None]


@torch.no_grad()
def loop_nonlocal(block: NonLocal2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = BN(W_z y) + x with y_i = Σ_j f(x_i, x_j) g(x_j) / C(x), for one image, as loops."""
    theta = x if block.mode == "gaussian" else conv1x1(x, block.theta)
    if block.pool_input:  # the authors' code: pool x, then φ and g
        pooled = F.max_pool2d(x, 2)
        phi = pooled if block.mode == "gaussian" else conv1x1(pooled, block.phi)
        g = conv1x1(pooled, block.g)
    else:  # the paper's text and mmcv: φ and g, then pool
        phi = x if block.mode == "gaussian" else conv1x1(x, block.phi)
        g = conv1x1(x, block.g)
        if block.sub_sample:
            phi, g = F.max_pool2d(phi, 2), F.max_pool2d(g, 2)
    # the authors' code and mmcv scale the embedded-Gaussian logits by d^-1/2 (use_scale)
    scale = theta.shape[0] ** -0.5 if block.use_scale and block.mode == "embedded_gaussian" else 1.0
    theta, phi, g = theta.flatten(1).T, phi.flatten(1).T, g.flatten(1).T  # N×d, N_k×d
    n, n_k = theta.shape[0], phi.shape[0]
    weights = torch.zeros(n, n_k, dtype=x.dtype)
    for i in range(n):
        for j in range(n_k):
            if block.mode in ("gaussian", "embedded_gaussian"):
                weights[i, j] = math.exp(scale * float(theta[i] @ phi[j]))
            elif block.mode == "dot_product":
                weights[i, j] = float(theta[i] @ phi[j])
            else:
                w_f = block.concat_project.weight.flatten()
                weights[i, j] = max(0.0, float(w_f @ torch.cat([theta[i], phi[j]])))
        weights[i] /= weights[i].sum() if block.mode in ("gaussian", "embedded_gaussian") else n_k
    y = (weights @ g).T.reshape(-1, *x.shape[1:])
    bn = block.out_norm
    z = conv1x1(y, block.out_proj)
    z = (z - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
    return z + x, weights


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample,pool_input", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_equals_loop_definition(mode, sub_sample, pool_input, use_scale, fused):
    block = NonLocal2d(6, 3, mode=mode, sub_sample=sub_sample, pool_input=pool_input, use_scale=use_scale,
                       fused=fused)
    block = randomize_(block, std=0.4).double().eval()
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    out = block(x)
    weights = block.attention_weights(x)
    for b in range(2):
        expected, expected_weights = loop_nonlocal(block, x[b])
        torch.testing.assert_close(out[b], expected)
        torch.testing.assert_close(weights[b], expected_weights)


@pytest.mark.parametrize("use_scale,scale", [(True, 0.5), (False, 1.0)])
def test_embedded_gaussian_scale_follows_the_code_by_default_and_the_paper_on_request(use_scale, scale):
    """Authors' code and mmcv: softmax(θᵀφ/√d), here d = 4; the paper's equation: softmax(θᵀφ)."""
    block = randomize_(NonLocal2d(8, 4, use_scale=use_scale)).double().eval()
    assert NonLocal2d(8, 4).use_scale is True
    x = torch.randn(1, 8, 3, 5, dtype=torch.float64)
    theta, phi = (m(x).flatten(2).transpose(1, 2) for m in (block.theta, block.phi))
    torch.testing.assert_close(block.attention_weights(x), torch.softmax(scale * theta @ phi.transpose(1, 2), -1))


def test_pooling_the_input_differs_from_pooling_the_embeddings():
    """Max-pooling does not commute with a convolution: the authors' code and the paper's text differ."""
    torch.manual_seed(0)
    paper = randomize_(NonLocal2d(8, 4, sub_sample=True)).double().eval()
    code = NonLocal2d(8, 4, sub_sample=True, pool_input=True).double().eval()
    code.load_state_dict(paper.state_dict())
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    assert (paper(x) - code(x)).abs().max() > 1e-3


def test_init_std_draws_the_embeddings_as_the_official_code():
    torch.manual_seed(0)
    block = NonLocal2d(512, 256, init_std=0.01)
    for conv in (block.theta, block.phi, block.g):
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.02)
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert torch.equal(block.out_norm.weight, torch.zeros(512))  # still the identity at initialisation


@pytest.mark.parametrize("sub_sample", [False, True])
def test_attention_map_is_the_query_row(sub_sample):
    block = randomize_(NonLocal2d(8, sub_sample=sub_sample)).double().eval()
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    weights = block.attention_weights(x)
    for i, j in [(0, 0), (3, 4), (6, 8)]:
        amap = attnlib.attention_map(block, x, (i, j))
        row = weights[:, i * 9 + j]
        if not sub_sample:
            torch.testing.assert_close(amap, row.reshape(2, 7, 9))
            continue
        for p in range(7):
            for q in range(9):
                cell = (p // 2) * 4 + q // 2  # pooled grid is 3×4; row 6 and column 8 are dropped
                expected = row[:, cell] / 4 if p < 6 and q < 8 else torch.zeros(2, dtype=x.dtype)
                torch.testing.assert_close(amap[:, p, q], expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        NonLocal2d(8, mode="cosine")
    with pytest.raises(ValueError, match="in_channels"):
        NonLocal2d(0)
    with pytest.raises(ValueError, match="inter_channels"):
        NonLocal2d(8, inter_channels=0)
    with pytest.raises(ValueError, match="H, W >= 2"):
        NonLocal2d(8, sub_sample=True)(torch.randn(1, 8, 1, 5))
    with pytest.raises(ValueError, match="expected sub_sample to be a bool, got 'no'"):
        NonLocal2d(8, sub_sample="no")
    with pytest.raises(ValueError, match="expected sub_sample=True"):
        NonLocal2d(8, pool_input=True)
    with pytest.raises(ValueError, match="init_std"):
        NonLocal2d(8, init_std=-1.0)
    with pytest.raises(ValueError, match="mode"):
        attnlib.complexity.nonlocal_flops(1, 8, 4, 4, mode="cosine")


def test_flops_at_97x97_worked_example():
    """The chapter's worked numbers: 1×512×97×97, d = 256 (CCNet's comparison setting)."""
    n, c, d = 97 * 97, 512, 256
    cost = NonLocal2d(c, d).flops(1, 97, 97)
    assert cost == {"conv": 2 * n * c * d * 4, "matmul": 2 * n * n * d * 2}
    assert round(sum(cost.values()) / 1e9, 1) == 100.5
    assert NonLocal2d(c, d, fused=False).attention_memory(1, 97, 97) == n * n * 4  # 354 MB in float32


def test_memory_formula_follows_the_kernel_that_runs(monkeypatch):
    """The plain Gaussian compares C-wide inputs but averages d-wide values: no CPU flash kernel, so it stores A."""
    import attnlib.core as core

    calls = []
    sdpa = core.F.scaled_dot_product_attention
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    gaussian, embedded = NonLocal2d(16, 8, mode="gaussian").eval(), NonLocal2d(16, 8).eval()
    with torch.no_grad():
        gaussian(torch.randn(1, 16, 6, 6))
        assert not calls
        embedded(torch.randn(1, 16, 6, 6))
        assert len(calls) == 1
    assert gaussian.attention_memory(1, 6, 6) == 36 * 36 * 4 and embedded.attention_memory(1, 6, 6) == 0
    assert attnlib.complexity.nonlocal_attention_memory(1, 16, 6, 6, inter_channels=8, mode="gaussian",
                                                        fused=True, device="cuda") == 0



def test_a_wide_heads_training_step_keeps_its_matrix_on_a_cpu_and_the_formula_says_so(monkeypatch):
    """d = 129 > 128: inference takes the flash kernel, a CPU training step keeps A instead."""
    import attnlib.core as core

    calls = []
    sdpa = core.F.scaled_dot_product_attention
    monkeypatch.setattr(core.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    block, x = NonLocal2d(8, 129), torch.randn(1, 8, 17, 17)  # 289 keys > 2 × 129
    with torch.no_grad():
        block(x)
    assert len(calls) == 1 and block.attention_memory(1, 17, 17) == 0
    block(x).sum().backward()
    assert len(calls) == 1 and block.attention_memory(1, 17, 17, training=True) == 289 * 289 * 4
    assert NonLocal2d(8, 128).attention_memory(1, 17, 17, training=True) == 0  # up to 128, the kernel pays

def test_flops_of_the_authors_pooling_run_phi_and_g_on_the_pooled_grid():
    c, d, h, w = 16, 8, 6, 10
    n, n_k = h * w, (h // 2) * (w // 2)
    cost = NonLocal2d(c, d, sub_sample=True, pool_input=True).flops(1, h, w)
    assert cost["conv"] == 2 * c * d * (n + 2 * n_k) + 2 * n * d * c
