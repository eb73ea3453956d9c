r"""Plain transcriptions of every block: the yardstick of ``python -m attnlib.bench --peers``.

Each function here computes exactly what an attnlib block computes, with that block's own
weights, written the way the papers' official code and mmcv/mmsegmentation write it:
``bmm`` → ``softmax`` → ``bmm`` on B×N×C tensors, no attention core, no fused kernel, no
special cases.  They exist so that a reader can check, without installing anything else, that
an attnlib block is at least as fast as the obvious code (``python -m attnlib.bench --peers``);
``tests/test_bench.py`` holds each one equal to its block in float64.

A peer takes the block and the block's inputs, ``peer(block, *inputs)``, and uses the block's
modules (convolutions, BatchNorm, ...) as they are, so the two compute one function.  Where
the usual code differs from the block (mmseg's ISA pads without masking), the transcription
follows the block, so the comparison is fair.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .ann import pyramid_sample
from .isanet import _Layout

__all__ = ["PEERS"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)  # B×C×N


def nonlocal_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmcv's ``NonLocal2d`` (embedded Gaussian; its ``use_scale`` is the block's ``scale``)."""
    b, _, h, w = x.shape
    g = _flat(block.g(x)).permute(0, 2, 1)  # B×N×d
    theta = _flat(block.theta(x)).permute(0, 2, 1)
    phi = _flat(block.phi(x))  # B×d×N
    weights = (torch.matmul(theta, phi) * block.scale).softmax(dim=-1)
    y = torch.matmul(weights, g).permute(0, 2, 1).reshape(b, -1, h, w)
    return x + block.out_norm(block.out_proj(y))


def context_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmcv's ``ContextBlock`` (attention pooling, add fusion): ``conv_mask`` → softmax over N → matmul."""
    b, c, _, _ = x.shape
    mask = torch.matmul(block.w_k, _flat(x)).softmax(dim=-1)  # B×1×N
    context = torch.matmul(_flat(x), mask.transpose(1, 2)).reshape(b, c, 1, 1)
    return x + block.add_transform(context)


def simplified_nonlocal(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The simplified non-local block: the same attention pooling, then one 1×1 transform."""
    b, c, _, _ = x.shape
    mask = torch.matmul(block.w_k, _flat(x)).softmax(dim=-1)
    context = torch.matmul(_flat(x), mask.transpose(1, 2)).reshape(b, c, 1, 1)
    return x + block.w_v(context)


def position_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmseg's ``PAM`` (DANet's official code): energy = QᵀK, softmax, V·attentionᵀ."""
    b, c, h, w = x.shape
    query = _flat(block.query_conv(x)).permute(0, 2, 1)  # B×N×d
    key = _flat(block.key_conv(x))  # B×d×N
    attention = torch.bmm(query, key).softmax(dim=-1)  # B×N×N
    out = torch.bmm(_flat(block.value_conv(x)), attention.permute(0, 2, 1))  # B×C×N
    return block.alpha * out.reshape(b, c, h, w) + x


def channel_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmseg's ``CAM`` (DANet's official code): softmax(rowmax(E) − E) with E = AAᵀ, then X A."""
    b, c, h, w = x.shape
    a = _flat(x)
    energy = torch.bmm(a, a.permute(0, 2, 1))
    energy_new = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
    attention = energy_new.softmax(dim=-1)
    return block.beta * torch.bmm(attention, a).reshape(b, c, h, w) + x


def criss_cross(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmcv's pure-PyTorch ``CrissCrossAttention``: einsum energies, −∞ on the column diagonal."""
    _, _, h, _ = x.shape
    query, key, value = block.query(x), block.key(x), block.value(x)
    diagonal = torch.diag(torch.full((h,), float("-inf"), device=x.device, dtype=x.dtype))
    energy_h = (torch.einsum("bchw,bciw->bwhi", query, key) + diagonal).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", query, key)
    attention = torch.cat([energy_h, energy_w], dim=-1).softmax(dim=-1)  # B×H×W×(H+W)
    out = torch.einsum("bciw,bhwi->bchw", value, attention[..., :h])
    out = out + torch.einsum("bchj,bhwj->bchw", value, attention[..., h:])
    return block.gamma * out + x


def recurrent_criss_cross(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmseg's ``CCHead`` loop: the plain criss-cross module applied ``recurrence`` times."""
    for _ in range(block.recurrence):
        x = criss_cross(block.cca, x)
    return x


def _pyramid_attention(block: nn.Module, keys_from: torch.Tensor, queries_from: torch.Tensor) -> torch.Tensor:
    """mmseg's ``SelfAttentionBlock`` with ``PPMConcat`` keys and values (the official ``_SelfAttentionBlock``)."""
    b, _, h, w = queries_from.shape
    key = block.f_key(keys_from)
    query = key if block.f_query is None else block.f_query(queries_from)
    query = _flat(query).permute(0, 2, 1)  # B×N×d
    key_p = pyramid_sample(key, block.pool_sizes)  # B×d×S
    value_p = pyramid_sample(block.f_value(keys_from), block.pool_sizes).permute(0, 2, 1)  # B×S×d_v
    sim = (torch.matmul(query, key_p) * block.key_channels ** -0.5).softmax(dim=-1)
    context = torch.matmul(sim, value_p).permute(0, 2, 1).reshape(b, -1, h, w)
    return block.fuse(torch.cat([block.W(context), queries_from], dim=1))


def apnb(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _pyramid_attention(block, x, x)


def afnb(block: nn.Module, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return _pyramid_attention(block, low, high)


def _isa_stage(sa: nn.Module, x: torch.Tensor, groups: int, size: int, real: torch.Tensor | None) -> torch.Tensor:
    """openseg's ``SelfAttentionBlock2D`` on B·groups sequences of ``size`` tokens (x: (B·groups)×C×size×1)."""
    query = _flat(sa.query(x)).permute(0, 2, 1)
    key = _flat(sa.key(x))
    value = _flat(sa.value(x)).permute(0, 2, 1)
    sim = torch.matmul(query, key) * sa.key_channels ** -0.5
    if real is not None:  # padded keys out, as the block does; a group without real keys keeps all
        sim = sim.masked_fill(~real[:, None, :], float("-inf"))
    context = torch.matmul(sim.softmax(dim=-1), value).permute(0, 2, 1)
    return sa.out(context.reshape(x.shape[0], -1, size, 1))


def interlaced_sparse(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmseg's ``ISAHead`` / openseg's ``ISA_Block``: pad, regroup, attend, regroup back, twice.

    The regrouping is the official reshape–permute; unlike mmseg, padded keys are masked, as the block does.
    """
    b, c, h, w = x.shape
    layout = _Layout.of(h, w, block.down_factor)
    (gh, gw), (dh, dw) = layout.grid, layout.block
    real = layout.pad(torch.ones(h, w, device=x.device)) > 0 if layout.needs_padding else None  # H_p×W_p
    x = layout.pad(x)
    # long range: groups are offsets (dh, dw), members one per block (gh, gw)
    long = x.reshape(b, c, gh, dh, gw, dw).permute(0, 3, 5, 1, 2, 4).reshape(b * dh * dw, c, gh * gw, 1)
    long_real = None
    if real is not None:
        long_real = real.reshape(gh, dh, gw, dw).permute(1, 3, 0, 2).reshape(dh * dw, gh * gw)
        long_real = (long_real | ~long_real.any(dim=1, keepdim=True)).repeat(b, 1)
    y = _isa_stage(block.long_range, long, dh * dw, gh * gw, long_real)
    y = y.reshape(b, dh, dw, -1, gh, gw).permute(0, 3, 4, 1, 5, 2)  # B×C×gh×dh×gw×dw
    # short range: groups are blocks (gh, gw), members their dh·dw positions
    short = y.permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, -1, dh * dw, 1)
    short_real = None
    if real is not None:
        short_real = real.reshape(gh, dh, gw, dw).permute(0, 2, 1, 3).reshape(gh * gw, dh * dw)
        short_real = (short_real | ~short_real.any(dim=1, keepdim=True)).repeat(b, 1)
    z = _isa_stage(block.short_range, short, gh * gw, dh * dw, short_real)
    z = z.reshape(b, gh, gw, -1, dh, dw).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, gh * dh, gw * dw)
    return layout.crop(z)


# Bench name → plain transcription (the names of attnlib.bench.BLOCKS).
PEERS: dict[str, Callable[..., torch.Tensor]] = {
    "nonlocal": nonlocal_block,
    "gc": context_block,
    "simplified-nl": simplified_nonlocal,
    "pam": position_attention,
    "cam": channel_attention,
    "cca": criss_cross,
    "rcca": recurrent_criss_cross,
    "apnb": apnb,
    "afnb": afnb,
    "isa": interlaced_sparse,
}
