r"""Interlaced sparse self-attention — Huang, Yuan, Guo, Zhang, Chen and Wang, *Interlaced Sparse
Self-Attention for Semantic Segmentation*, arXiv 1907.12273, 2019 (official code:
openseg.pytorch ``lib/models/modules/isa_block.py``; also mmseg's ``ISAHead``).

Dense self-attention on :math:`N = HW` positions costs :math:`O(N^2)`.  ISA factorises the dense
affinity into the product of two sparse ones, :math:`A = A^S A^L`: a **long-range** attention among
positions far apart, then a **short-range** attention among neighbours.  Cut the map into blocks of
:math:`d_h\times d_w` pixels (``down_factor``; :math:`g_h = \lceil H/d_h\rceil` by
:math:`g_w = \lceil W/d_w\rceil` blocks) and write a position as
:math:`(g_i d_h + a,\; g_j d_w + b)`: block :math:`(g_i, g_j)`, offset :math:`(a, b)` inside it.

* long range: one group per offset :math:`(a, b)` — the :math:`G = g_h g_w` positions, one per
  block, spaced :math:`d_h, d_w` apart (the "interlaced" sampling);
* short range: one group per block — its :math:`d_h d_w` neighbours.

Within each group runs one self-attention block (openseg's ``SelfAttentionBlock2D``), on tokens
:math:`X` of the group,

.. math::

    \operatorname{SA}(X) = \rho\!\left(\operatorname{softmax}_{\text{rows}}\!\Big(
        \frac{\theta(X)\,\phi(X)^\top}{\sqrt{d_k}}\Big)\, g(X)\right),

with :math:`\theta, \phi` (query, key) each two conv-BN-ReLU 1×1 layers to ``key_channels``
(:math:`d_k`), :math:`g` (value) one 1×1 conv to ``value_channels``, and :math:`\rho` a 1×1
conv-BN-ReLU to ``out_channels``; no bias in the convs (BN follows).  The output is

.. math::

    Z = \operatorname{SA}_S\big(\operatorname{SA}_L(X)\big),

:math:`\operatorname{SA}_L` mapping ``in_channels`` → ``out_channels`` and :math:`\operatorname{SA}_S`
``out_channels`` → ``out_channels``.  There is no residual: ISA is a context module whose output
the head concatenates with its input.  Any position reaches any other in two steps: from
:math:`u` to :math:`v` through the position in :math:`u`'s block that has :math:`v`'s offset.
The cost is :math:`O(d_h d_w G^2 + G (d_h d_w)^2)` instead of :math:`O((d_h d_w G)^2)`.

We follow openseg's ``ISA_Block`` (whose signature this is); mmseg's ``ISAHead`` builds the same
thing with the value width tied to the input width and a bias in the value conv.
The 1×1 convolutions and BatchNorm act per position (BN's statistics pool every position either
way), so, as in the official code, each stage regroups its input once and runs them on the groups.

**Padding — a deliberate deviation, switchable.**  The official code zero-pads the map to
multiples of :math:`(d_h, d_w)` (``pad // 2`` before, the rest after) and lets the padded
positions take part in both attentions, so the output at real positions depends on how much
padding a size happens to need.  By default (``pad_mode="mask"``) we pad the same way but mask
the padded positions out *as keys*: at real positions the attention is a distribution over real
positions only, and (in eval mode) the output does not depend on the padding.
``pad_mode="zeros"`` gives the official behaviour: no mask, the padded zeros (after θ, φ and
their BatchNorms, no longer zero) are keys like any other position.  In training, BatchNorm's batch statistics still include the padded
positions, as in the official code.  When :math:`H < d_h` (or :math:`W < d_w`) a long-range group
can hold no real position at all; its rows attend to all of their group's keys instead of none
(no NaN).  Those rows are padded positions: their outputs are cropped away, and, being masked as
keys in the short-range step, never reach a real position.

Where each piece lives below:

* padding, the two groupings and their inverses, the key masks — :class:`_Layout`;
* :math:`\theta, \phi, g`, the softmax attention (through :func:`attnlib.core.attend`) and
  :math:`\rho` — :class:`SelfAttentionBlock`;
* :math:`Z = \operatorname{SA}_S(\operatorname{SA}_L(X))` and the crop —
  :meth:`InterlacedSparseAttention._forward`;
* :math:`A^L`, :math:`A^S` and :math:`A^S A^L` — :meth:`InterlacedSparseAttention.attention_matrices`
  and :meth:`InterlacedSparseAttention.attention_maps`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_feature_map, check_positive, check_positive_pair, check_query
from .core import attend, attention_matrix_bytes, project

__all__ = ["InterlacedSparseAttention", "SelfAttentionBlock", "interlaced_sparse_flops",
           "interlaced_sparse_attention_memory", "PAD_MODES"]

PAD_MODES = ("mask", "zeros")  # padded keys masked (attnlib), or attended to (openseg, mmseg)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # ReLU in place, on BatchNorm's output (which BatchNorm's backward does not need): one map fewer
    return [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


# The padded map as tokens, channels last, viewed as blocks (B, g_h, d_h, g_w, d_w, C)
# (_Layout.blocks), is permuted so that the groups come first, then the positions inside a
# group, then the channels:
#   long range  -> (B, d_h, d_w | g_h, g_w | C): one group per offset, one position from every block;
#   short range -> (B, g_h, g_w | d_h, d_w | C): one group per block, its d_h·d_w positions.
# The attention returns its context in this order too; the inverses put it back into blocks.
_GROUP = {"long": (0, 2, 4, 1, 3, 5), "short": (0, 1, 3, 2, 4, 5)}
_UNGROUP = {kind: tuple(perm.index(axis) for axis in range(6)) for kind, perm in _GROUP.items()}


@dataclass(frozen=True)
class _Layout:
    """How an H×W map is padded to ``(g_h d_h) × (g_w d_w)`` and cut into the two kinds of group."""

    height: int
    width: int
    block: tuple[int, int]  # (d_h, d_w), the down factor
    grid: tuple[int, int]  # (g_h, g_w), blocks per column and per row

    @classmethod
    def of(cls, height: int, width: int, down_factor: tuple[int, int]) -> _Layout:
        dh, dw = down_factor
        return cls(height, width, (dh, dw), (math.ceil(height / dh), math.ceil(width / dw)))

    @property
    def padded(self) -> tuple[int, int]:
        return self.grid[0] * self.block[0], self.grid[1] * self.block[1]

    @property
    def offset(self) -> tuple[int, int]:
        """Padding before the map (top, left): half of it, rounded down, as in the official code."""
        return (self.padded[0] - self.height) // 2, (self.padded[1] - self.width) // 2

    @property
    def needs_padding(self) -> bool:
        return self.padded != (self.height, self.width)

    def groups(self, kind: str) -> int:
        (gh, gw), (dh, dw) = self.grid, self.block
        return dh * dw if kind == "long" else gh * gw

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        (top, left), (hp, wp) = self.offset, self.padded
        return F.pad(x, (left, wp - self.width - left, top, hp - self.height - top))

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        top, left = self.offset
        return x[..., top:top + self.height, left:left + self.width]

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W → the zero-padded map as tokens, B×g_h×d_h×g_w×d_w×C: one copy."""
        (gh, gw), (dh, dw) = self.grid, self.block
        b, c = x.shape[:2]
        shape = (b, *self.padded, c)
        tokens = x.new_zeros(shape) if self.needs_padding else x.new_empty(shape)
        top, left = self.offset
        tokens[:, top:top + self.height, left:left + self.width] = x.permute(0, 2, 3, 1)
        return tokens.view(b, gh, dh, gw, dw, c)

    def to_map(self, blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`blocks`: tokens → the real positions, B×C×H×W, in the
        layout of ``like`` (channels last or contiguous), as a convolution's would be."""
        b, c = blocks.shape[0], blocks.shape[-1]
        # whole tokens into the map's order first (a copy after the short-range step),
        # then the crop in like's layout: a transpose, or for channels last no copy
        # unless there is padding to crop
        tokens = blocks.reshape(b, *self.padded, c).permute(0, 3, 1, 2)
        channels_last = (like.is_contiguous(memory_format=torch.channels_last)
                         and not like.is_contiguous())
        return self.crop(tokens).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def group(self, blocks: torch.Tensor, kind: str) -> torch.Tensor:
        """Blocks (:meth:`blocks`) → one group per row, (B·groups)×C×S×1: one copy.

        ``kind`` is ``"long"`` or ``"short"``; S is the positions per group.  The map
        is channels last: in memory each group's S tokens follow one another, C
        channels each.  The 1×1 convolutions and BatchNorm run on the groups as they
        would on the padded map, the attention reads each group's queries, keys and
        values as rows, and the next step regroups whole tokens.
        """
        b, c = blocks.shape[0], blocks.shape[-1]
        rows = b * self.groups(kind)
        tokens = blocks.permute(_GROUP[kind]).reshape(rows, -1, c).contiguous()
        return tokens.unsqueeze(2).permute(0, 3, 1, 2)  # a view, channels last

    def ungroup(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """(B·groups)×C×S×1 → blocks: the inverse of :meth:`group`, a view where it can."""
        (gh, gw), (dh, dw) = self.grid, self.block
        order = (dh, dw, gh, gw) if kind == "long" else (gh, gw, dh, dw)
        tokens = x.squeeze(3).mT  # (B·groups)×S×C
        return tokens.reshape(-1, *order, x.shape[1]).permute(_UNGROUP[kind])

    def grouped(self, plane: torch.Tensor, kind: str) -> torch.Tensor:
        """An H_p×W_p plane over the padded map (positions, a mask) → groups×S."""
        (gh, gw), (dh, dw) = self.grid, self.block
        return self.group(plane.reshape(1, gh, dh, gw, dw, 1), kind)[:, 0, :, 0]

    def index(self, kind: str, device: torch.device) -> torch.Tensor:
        """groups×positions: the row-major index in the padded map of each grouped position."""
        positions = torch.arange(self.padded[0] * self.padded[1], device=device)
        return self.grouped(positions.reshape(self.padded), kind)

    def key_mask(self, kind: str, batch: int,
                 device: torch.device) -> torch.Tensor | None:
        """``attend``'s key mask (True = may attend), (B·groups)×1×S: hides padded keys.

        One row per group serves all its queries.  ``None`` if nothing is padded.  A
        group without any real key keeps all its keys (those queries are padding).
        """
        if not self.needs_padding:
            return None
        real = torch.zeros(self.padded, dtype=torch.bool, device=device)
        top, left = self.offset
        real[top:top + self.height, left:left + self.width] = True
        keys = self.grouped(real, kind)  # groups×positions
        keys = keys | ~keys.any(dim=1, keepdim=True)
        return keys[:, None, :].repeat(batch, 1, 1)

    def dense(self, weights: torch.Tensor, kind: str) -> torch.Tensor:
        """Per-group weights B×groups×S×S (S positions per group) as the B×N_p×N_p matrix over the padded map."""
        index = self.index(kind, weights.device)
        n = self.padded[0] * self.padded[1]
        matrix = weights.new_zeros(weights.shape[0], n, n)
        matrix[:, index[:, :, None], index[:, None, :]] = weights
        return matrix


class SelfAttentionBlock(nn.Module):
    """openseg's ``SelfAttentionBlock2D`` applied within groups: ρ(softmax(θφᵀ/√d_k) g).

    Args:
        in_channels, key_channels, value_channels, out_channels: the widths of the input,
            of θ and φ, of g, and of the output ρ.
    """

    def __init__(self, in_channels: int, key_channels: int, value_channels: int, out_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.query = nn.Sequential(*_conv_bn_relu(in_channels, key_channels), *_conv_bn_relu(key_channels, key_channels))
        self.key = nn.Sequential(*_conv_bn_relu(in_channels, key_channels), *_conv_bn_relu(key_channels, key_channels))
        self.value = nn.Conv2d(in_channels, value_channels, 1, bias=False)
        self.out = nn.Sequential(*_conv_bn_relu(value_channels, out_channels))

    def forward(self, x: torch.Tensor, layout: _Layout, kind: str, *, fused: bool,
                need_weights: bool, mask_padding: bool = True):
        """x: the padded map as blocks of tokens, B×g_h×d_h×g_w×d_w×C
        (``_Layout.blocks``).  Returns ρ(context) as blocks, and the weights,
        B×groups×S×S, or None.

        ``mask_padding=False`` lets padded positions be keys, as the official code does.
        """
        groups = layout.group(x, kind)  # (B·groups)×C×S×1, channels last
        # θ, φ, g on the groups: their first layers all read the groups (one stacked
        # convolution when fused, BatchNorms folded in eval mode: attnlib.core.project)
        theta, phi = list(self.query), list(self.key)  # modules, not new Sequentials
        q, k, v = project(groups, (theta[:3], phi[:3], self.value), fused=fused)
        (q,), (k,) = (project(t, (f[3:],), fused=fused)
                      for t, f in ((q, theta), (k, phi)))
        q, k, v = (t.flatten(2).mT for t in (q, k, v))  # (B·groups)×S×width, views
        mask = layout.key_mask(kind, x.shape[0], x.device) if mask_padding else None
        context, weights = attend(q, k, v, scale=self.key_channels ** -0.5, mask=mask,
                                  need_weights=need_weights, fused=fused)
        # ρ on the context as (B·groups)×d_v×S×1, channels last: a view
        context = context.unsqueeze(2).permute(0, 3, 1, 2)
        (out,) = project(context, (self.out,), fused=fused)
        if weights is not None:
            weights = weights.reshape(x.shape[0], -1, *weights.shape[-2:])
        return layout.ungroup(out, kind), weights


class InterlacedSparseAttention(nn.Module):
    """openseg's ``ISA_Block``: long-range then short-range self-attention, for B×C×H×W maps.

    Args:
        in_channels: C.
        key_channels: :math:`d_k`, width of queries and keys (mmseg: ``isa_channels = 256``).
        value_channels: width of the values.
        out_channels: width of the output (an attribute, read by the heads).
        down_factor: :math:`(d_h, d_w)`, or one int for both: the block size (paper: 8×8).  Each
            long-range group is the map subsampled by this factor, hence the name.
        fused: compute the attentions with ``scaled_dot_product_attention`` when no weights are asked for,
            and the projections as stacked convolutions, with the BatchNorms folded in eval mode
            (:func:`attnlib.core.project`).
        pad_mode: on a size not divisible by ``down_factor``, ``"mask"`` hides the padded positions
            as keys (the default); ``"zeros"`` lets them take part, as openseg's ``ISA_Block`` and
            mmseg's ``ISAHead`` do.  The two agree on divisible sizes.
    """

    def __init__(self, in_channels: int, key_channels: int, value_channels: int, out_channels: int,
                 down_factor: int | tuple[int, int] = (8, 8), fused: bool = True, pad_mode: str = "mask") -> None:
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"InterlacedSparseAttention: expected pad_mode in {PAD_MODES}, got {pad_mode!r}")
        self.pad_mode = pad_mode
        for value, name in ((in_channels, "in_channels"), (key_channels, "key_channels"),
                            (value_channels, "value_channels"), (out_channels, "out_channels")):
            check_positive(value, name)
        self.in_channels, self.key_channels = in_channels, key_channels
        self.value_channels, self.out_channels = value_channels, out_channels
        self.down_factor = check_positive_pair(down_factor, "down_factor")
        self.fused = fused
        self.long_range = SelfAttentionBlock(in_channels, key_channels, value_channels, out_channels)
        self.short_range = SelfAttentionBlock(out_channels, key_channels, value_channels, out_channels)

    def _forward(self, x: torch.Tensor, need_weights: bool):
        _, _, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        layout = _Layout.of(h, w, self.down_factor)
        options = {"fused": self.fused, "need_weights": need_weights,
                   "mask_padding": self.pad_mode == "mask"}
        y, long_weights = self.long_range(layout.blocks(x), layout, "long", **options)
        z, short_weights = self.short_range(y, layout, "short", **options)
        return layout.to_map(z, like=x), layout, (long_weights, short_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def attention_matrices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(A^L, A^S)`, each B×N_p×N_p over the padded map, zero between groups.

        Positions in the row-major order of the padded map (N_p = H_p W_p).  The two
        factors of the effective map :math:`A^S A^L`: row :math:`u` of :math:`A^L`
        holds the long-range weights of position :math:`u`, row :math:`u` of
        :math:`A^S` its short-range ones.
        """
        _, layout, (long_weights, short_weights) = self._forward(x, need_weights=True)
        return layout.dense(long_weights, "long"), layout.dense(short_weights, "short")

    def attention_maps(self, x: torch.Tensor, queries) -> torch.Tensor:
        r"""Rows ``queries`` of :math:`A^S A^L` over the H×W real positions (B×Q×H×W).

        :math:`A^L` and :math:`A^S` are the two attentions as dense matrices over the
        padded map (:meth:`attention_matrices`).  The composition follows the value
        path — what the short-range step reads, through the long-range step — and
        ignores the nonlinear projections between them.  With ``pad_mode="mask"`` each
        map sums to 1 (padded keys are masked) and, on a size divisible by the down
        factor, is positive everywhere.  With ``pad_mode="zeros"`` the padded positions
        take their share, which the crop leaves out: the map sums to 1 minus that share.
        """
        _, _, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        cells = [check_query(query, h, w) for query in queries]
        layout = _Layout.of(h, w, self.down_factor)
        top, left = layout.offset
        rows = [(i + top) * layout.padded[1] + (j + left) for i, j in cells]  # padded
        a_long, a_short = self.attention_matrices(x)
        maps = a_short[:, rows] @ a_long  # B×Q×N_p
        return layout.crop(maps.reshape(*maps.shape[:2], *layout.padded))

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """Row ``query`` of :math:`A^S A^L` over the H×W real positions (B×H×W); see
        :meth:`attention_maps`."""
        return self.attention_maps(x, [query])[:, 0]

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`interlaced_sparse_flops`."""
        return interlaced_sparse_flops(batch, self.in_channels, height, width, key_channels=self.key_channels,
                                       value_channels=self.value_channels, out_channels=self.out_channels,
                                       down_factor=self.down_factor)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4, *,
                         training: bool = False) -> int:
        """Bytes of attention :meth:`forward` stores; see :func:`interlaced_sparse_attention_memory`."""
        return interlaced_sparse_attention_memory(batch, self.in_channels, height, width, key_channels=self.key_channels,
                                                  value_channels=self.value_channels, down_factor=self.down_factor,
                                                  fused=self.fused, device=self.long_range.value.weight.device,
                                                  training=training, bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, key_channels={self.key_channels}, value_channels={self.value_channels}, "
                f"out_channels={self.out_channels}, down_factor={self.down_factor}, fused={self.fused}, "
                f"pad_mode={self.pad_mode!r}")


def _groups(height: int, width: int, down_factor) -> tuple[int, int]:
    """(G, P): the number of blocks G = g_h g_w and the positions per block P = d_h d_w."""
    layout = _Layout.of(height, width, check_positive_pair(down_factor, "down_factor"))
    return layout.grid[0] * layout.grid[1], layout.block[0] * layout.block[1]


def interlaced_sparse_flops(batch: int, channels: int, height: int, width: int, *, key_channels: int,
                            value_channels: int, out_channels: int, down_factor=(8, 8)) -> dict[str, int]:
    r"""FLOPs of one :class:`InterlacedSparseAttention` forward pass, as ``FlopCounterMode`` counts them.

    Everything runs on the *padded* map, :math:`N_p = G P` positions (:math:`G = g_h g_w` blocks of
    :math:`P = d_h d_w` positions).  Per self-attention block with input width :math:`C_\text{in}`:

    * ``conv`` — θ and φ, :math:`2BN_p(C_\text{in}d_k + d_k^2)` each; g, :math:`2BN_pC_\text{in}d_v`;
      ρ, :math:`2BN_pd_vC_\text{out}` (no biases; BN and ReLU not counted);
    * ``matmul`` — scores and aggregation, :math:`2B\,(\text{groups})\,(\text{size})^2(d_k + d_v)`:
      long range :math:`P` groups of :math:`G`, short range :math:`G` groups of :math:`P`.

    The same on both paths (SDPA on CPU is counted as its two products).
    """
    g, p = _groups(height, width, down_factor)
    n_padded = g * p

    def block_conv(c_in: int) -> int:
        qk = 2 * (c_in * key_channels + key_channels * key_channels)
        return 2 * batch * n_padded * (qk + c_in * value_channels + value_channels * out_channels)

    conv = block_conv(channels) + block_conv(out_channels)
    matmul = 2 * batch * (p * g * g + g * p * p) * (key_channels + value_channels)
    return {"conv": conv, "matmul": matmul}


def interlaced_sparse_attention_memory(batch: int, channels: int, height: int, width: int, *, key_channels: int,
                                       value_channels: int | None = None, down_factor=(8, 8), fused: bool = False,
                                       device: torch.device | str = "cpu", training: bool = False,
                                       bytes_per_element: int = 4) -> int:
    r"""Bytes of the attention weights the reference path stores: :math:`B\,(P\,G^2 + G\,P^2)` elements.

    Long range: :math:`P = d_h d_w` matrices of :math:`G\times G` (:math:`G = g_h g_w`, padded);
    short range: :math:`G` matrices of :math:`P\times P`.  For :math:`N = GP` and :math:`P \approx G
    \approx \sqrt N` that is :math:`O(N^{1.5})` against :math:`O(N^2)`.  The fused path stores none
    (``scaled_dot_product_attention``'s kernels tile the matrices) — except for a stage whose
    groups have no more positions than ``key_channels``, where the core's plain path is as fast
    and the matrices are small, and, on a CPU, for a stage whose groups have no more positions than
    ``key_channels + value_channels`` or whose ``value_channels`` differs from ``key_channels``
    (the flash kernel runs only where its recomputed product pays; ``None`` means equal;
    :func:`attnlib.core.takes_fused_path`).  ``channels`` does not enter.

    ``training=True`` describes a step that computes gradients: on a CPU, a head wider than 128
    channels then keeps its matrix rather than recompute it (:func:`attnlib.core.takes_fused_path`).
    """
    g, p = _groups(height, width, down_factor)
    rule = dict(d_v=value_channels, device=device, fused=fused, training=training, bytes_per_element=bytes_per_element)
    long_range = attention_matrix_bytes(batch * p, g, g, key_channels, **rule)
    short_range = attention_matrix_bytes(batch * g, p, p, key_channels, **rule)
    return long_range + short_range
