r"""Criss-cross attention — Huang, Wang, Huang, Huang, Wei and Liu, *CCNet: Criss-Cross
Attention for Semantic Segmentation*, ICCV 2019 (arXiv 1811.11721; official code
speedinghzl/CCNet, and the pure-PyTorch version in mmcv ``ops/cc_attention.py``).

From a feature map :math:`H \in \mathbb{R}^{C\times H\times W}` three 1×1 convolutions give
queries and keys :math:`Q, K \in \mathbb{R}^{C'\times H\times W}` (:math:`C' = C/8` in the paper)
and values :math:`V \in \mathbb{R}^{C\times H\times W}`.  A position :math:`u` does not look at
all :math:`HW` positions but only at its *criss-cross path* :math:`\Omega_u`: the
:math:`H + W - 1` positions in its row and its column (itself once).  The **affinity**
(paper, eq. 1) scores each of them,

.. math::

    d_{i,u} = Q_u\, \Omega_{i,u}^\top, \qquad i = 1, \dots, H + W - 1,

and a softmax over those :math:`H + W - 1` scores gives :math:`A_{i,u}`.  The
**aggregation** (eq. 2) collects the values on the same path and adds the input:

.. math::

    H'_u = \gamma \sum_{i=1}^{H+W-1} A_{i,u}\, \Phi_{i,u} + H_u .

There is no :math:`1/\sqrt{C'}` on the scores (neither paper nor official code has one).
:math:`\gamma` is a learnable scalar initialised to 0 — it is not in eq. 2 but in both the
official code (``self.gamma = nn.Parameter(torch.zeros(1))``) and mmcv (``Scale(0.)``) — so the
block starts as the identity.

One pass reaches only the cross; the **recurrent** module (RCCA, Sec. 3.2) applies the *same*
module :math:`R` times.  With :math:`R = 2` every position reaches every other: from :math:`u` to
any :math:`v` there is a path through the corner :math:`(u_\text{row}, v_\text{col})`.

**The double-counting pitfall.**  Implementations split :math:`\Omega_u` into the column (:math:`H`
positions) and the row (:math:`W` positions); :math:`u` is in both.  Unless one copy is removed the
softmax runs over :math:`H + W` entries and :math:`u` gets twice its weight.  The original CUDA
kernel (``ca_forward_kernel`` in speedinghzl/CCNet) computes exactly the :math:`H + W - 1`
affinities: its row branch covers all :math:`W` positions, its column branch skips the query's own
row (``j = i < y ? i : i + 1``), so there is no :math:`-\infty` anywhere.  The pure-PyTorch
versions that replaced it, the authors' later code and mmcv's (PRs #1186/#1201, about 5.4× faster
than the kernel), compute all :math:`H + W` and put :math:`-\infty` on the column branch's diagonal
before the joint softmax.  Both give the same function; we do as mmcv.

Where each equation lives below:

* :math:`Q, K, V` — :meth:`CrissCrossAttention._project`;
* eq. 1, the joint softmax and eq. 2, computed the fast way (row by row and column by column,
  :math:`O(HW(H+W)C)`) — :meth:`CrissCrossAttention._factorised`;
* the same, written as the definition (dense attention over all :math:`HW` keys with the
  criss-cross mask :func:`criss_cross_mask`, :math:`O((HW)^2 C)`) — :meth:`CrissCrossAttention._dense`;
* :math:`\gamma` and the residual — :meth:`CrissCrossAttention._forward`;
* the recurrence with shared weights — :meth:`RecurrentCrissCross.forward`.

**Why ``fused=True`` means the factorised path here.**  The core's fused path,
:func:`torch.nn.functional.scaled_dot_product_attention`, takes one set of keys per query
batch.  Criss-cross attention needs one softmax over the *union* of a row and a column, and
each position has a different union; SDPA can only express that with the dense
:math:`HW\times HW` mask (the reference path, :math:`O((HW)^2)`) or by gathering every
position's :math:`H + W - 1` keys and values into its own tensor — :math:`HW(H+W)(C' + C)`
numbers, more than the :math:`HW(H+W)` energies the factorised form stores.  So the fast path
is the factorised one, and the test-suite holds it equal to the dense masked definition.
Its softmax follows the core's convention (a :math:`-\infty` where a key is excluded, then a
softmax over the last dimension); it is written out in :meth:`~CrissCrossAttention._factorised`
because :func:`attnlib.core.attend` fuses score, softmax and aggregation into one call and
exposes no separate softmax step.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_feature_map, check_positive, check_query, reduced_channels
from .core import attend, project

__all__ = [
    "CrissCrossAttention",
    "RecurrentCrissCross",
    "criss_cross_mask",
    "criss_cross_flops",
    "criss_cross_attention_memory",
    "recurrent_criss_cross_flops",
    "recurrent_criss_cross_attention_memory",
]


def criss_cross_mask(height: int, width: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The criss-cross pattern as a boolean ``HW × HW`` matrix over row-major positions.

    Entry ``[u, v]`` is ``True`` where position ``v`` shares a row or a column with
    ``u``: each row has exactly ``H + W - 1`` ``True`` entries, ``u`` itself once.
    """
    check_positive(height, "height")
    check_positive(width, "width")
    position = torch.arange(height * width, device=device)
    row, col = position // width, position % width
    return (row[:, None] == row[None, :]) | (col[:, None] == col[None, :])


class CrissCrossAttention(nn.Module):
    """One criss-cross attention module (CCNet, Sec. 3.2, Fig. 3) for B×C×H×W feature maps.

    Args:
        in_channels: C.
        reduction: :math:`C' = C / \\text{reduction}` channels for queries and keys (paper: 8).
        fused: take the factorised :math:`O(HW(H+W))` path (else the dense masked definition).
    """

    def __init__(self, in_channels: int, reduction: int = 8,
                 fused: bool = True) -> None:
        super().__init__()
        check_positive(in_channels, "in_channels")
        self.in_channels, self.reduction, self.fused = in_channels, reduction, fused
        self.key_channels = reduced_channels(in_channels, reduction)
        self.query = nn.Conv2d(in_channels, self.key_channels, 1)
        self.key = nn.Conv2d(in_channels, self.key_channels, 1)
        self.value = nn.Conv2d(in_channels, in_channels, 1)
        # γ = 0, one scalar as in the official code: the block starts as the identity.
        self.gamma = nn.Parameter(torch.zeros(1))

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K (B×C'×H×W) and V (B×C×H×W): one stacked convolution when fused."""
        return project(x, (self.query, self.key, self.value), fused=self.fused)

    @staticmethod
    def _factorised(q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 1–2 along columns and rows.

        Returns the aggregation (B×C×H×W) and A (B×H×W×(H+W)): ``A[b, i, j, :H]``
        weighs the keys of column ``j`` (rows ``0..H-1``), ``A[b, i, j, H:]`` those of
        row ``i`` (columns ``0..W-1``); the column entry of ``(i, j)`` itself is exactly
        0.  Plain ``@`` on 4-D tensors (always a ``bmm``) rather than ``einsum``, which
        turns products over size-1 dimensions into uncounted element-wise work when H or
        W is 1.
        """
        h, w = q.shape[2], q.shape[3]
        # The column terms batch over the W columns.  Read from the B×C×H×W maps, their
        # operands would have no unit stride within a matrix, and a bmm copies such
        # operands matrix by matrix (a quarter of the block's time at B = 1): so they
        # read copies laid out column by column, made once.
        q_col = q.permute(0, 3, 2, 1).contiguous()  # B×W×H×C'
        k_col = k.permute(0, 3, 1, 2).contiguous()  # B×W×C'×H
        # Column energies, batched over the W columns: e_col[b,i,j,k] = Q(i,j)·K(k,j).
        e_col = q_col @ k_col  # B×W×H×H, [b, j, i, k]
        e_col = e_col.transpose(1, 2)  # B×H×W×H
        # Row energies, batched over the H rows: e_row[b, i, j, l] = Q(i, j)·K(i, l).
        e_row = q.permute(0, 2, 3, 1) @ k.permute(0, 2, 1, 3)  # B×H×W×W
        # (i, j) is on its column and on its row: drop the column copy (k == i), so it
        # counts once.  The mask broadcasts over j.
        own_position = torch.eye(h, dtype=torch.bool, device=q.device)[:, None, :]
        e_col = e_col.masked_fill(own_position, float("-inf"))
        # One softmax over the H + W energies (H + W - 1 finite): the A of eq. 1.
        attention = torch.cat([e_col, e_row], dim=-1).softmax(dim=-1)
        a_col, a_row = attention.split([h, w], dim=-1)
        # Eq. 2: Σ over the column (batched over columns) + Σ over the row (over rows).
        if not (attention.requires_grad or v.requires_grad):
            # Without autograd, values on the right: both products come out channels
            # last, from one copy of V, and their sum pairs whole C-channel rows
            # instead of transposing every H×W plane.
            v_last = v.permute(0, 2, 3, 1).contiguous()  # B×H×W×C
            y = a_row @ v_last  # B×H×W×C: [b,i,j,c]
            y_col = a_col.transpose(1, 2) @ v_last.transpose(1, 2)  # [b,j,i,c]
            return y.add_(y_col.transpose(1, 2)).permute(0, 3, 1, 2), attention
        # With autograd, values on the left, so that the products come out channels
        # first, as the map: in a training step that layout's gradients cost less.
        v_col = v.permute(0, 3, 1, 2).contiguous()  # B×W×C×H
        y_col = v_col @ a_col.permute(0, 2, 3, 1)  # B×W×C×H: [b,j,c,i]
        y_row = v.permute(0, 2, 1, 3) @ a_row.transpose(-1, -2)  # B×H×C×W: [b,i,c,j]
        # B×C×H×W in y_row's layout: the residual (see _forward) reads it as it is and
        # writes the contiguous map, so RCCA's next loop does not run on a permuted one.
        return y_row.permute(0, 2, 1, 3) + y_col.permute(0, 2, 3, 1), attention

    @staticmethod
    def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool):
        """Eqs. 1–2 as the definition: attention over all N = HW keys, masked.

        Returns the aggregation (B×C×H×W) and, if asked, the B×N×N weights.
        """
        b, c, h, w = v.shape
        tokens = [t.flatten(2).transpose(1, 2) for t in (q, k, v)]  # B×N×C', C', C
        mask = criss_cross_mask(h, w, device=v.device)
        y, weights = attend(*tokens, scale=1.0, mask=mask, need_weights=need_weights,
                            fused=False)
        return y.transpose(1, 2).reshape(b, c, h, w), weights

    def _forward(self, x: torch.Tensor, need_weights: bool):
        check_feature_map(x, self.in_channels, type(self).__name__)
        q, k, v = self._project(x)
        if self.fused and not need_weights:
            y, weights = self._factorised(q, k, v)[0], None
        else:
            y, weights = self._dense(q, k, v, need_weights)
        # H' = γ · aggregation + H  (eq. 2) in one pass, with no γ·y temporary; it reads
        # y in any layout and writes H' in x's
        return torch.addcmul(x, self.gamma, y), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The dense B×N×N attention matrix (N = HW): H + W − 1 non-zeros per row, each row sums to 1."""
        return self._forward(x, need_weights=True)[1]

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """The H + W − 1 weights of ``query = (i, j)`` on the H×W grid (B×H×W).

        Zero off row ``i`` and column ``j``; sums to 1.  Read from the factorised
        attention, so it costs :math:`O(HW(H+W))`, not the dense :math:`(HW)^2`.
        """
        b, _, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        i, j = check_query(query, h, w)
        attention = self._factorised(*self._project(x))[1][:, i, j]  # B×(H+W)
        amap = attention.new_zeros(b, h, w)
        amap[:, :, j] = attention[:, :h]  # column j; its row-i entry (the copy) is 0
        amap[:, i, :] += attention[:, h:]  # row i, including (i, j) itself
        return amap

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`criss_cross_flops`."""
        return criss_cross_flops(batch, self.in_channels, height, width, reduction=self.reduction, fused=self.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention :meth:`forward` stores; see :func:`criss_cross_attention_memory`."""
        return criss_cross_attention_memory(batch, self.in_channels, height, width, reduction=self.reduction,
                                            fused=self.fused, bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, reduction={self.reduction}, fused={self.fused}"


class RecurrentCrissCross(nn.Module):
    """Recurrent criss-cross attention (RCCA, Sec. 3.2): ONE :class:`CrissCrossAttention`, applied
    ``recurrence`` times with the same weights (the paper's :math:`R`; :math:`R = 2` gives every
    position the whole image).

    Args:
        in_channels: C.
        reduction: as in :class:`CrissCrossAttention`.
        recurrence: :math:`R \\ge 1`, the number of loops (paper and mmseg: 2).
        fused: the path of the shared module (this attribute reads and writes ``cca.fused``).
    """

    def __init__(self, in_channels: int, reduction: int = 8, recurrence: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.recurrence = check_positive(recurrence, "recurrence")
        self.cca = CrissCrossAttention(in_channels, reduction, fused=fused)

    @property
    def fused(self) -> bool:
        return self.cca.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.cca.fused = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        r"""Row ``query`` of the loops' matrices composed, :math:`A_R\cdots A_1`, B×H×W.

        :math:`A_r` is the dense criss-cross matrix of loop :math:`r`, computed on that
        loop's input.  The composition follows the value path only (what loop
        :math:`R`'s aggregation reads, through the earlier loops' aggregations) and
        ignores the residual and :math:`\gamma`.  A product of row-stochastic matrices,
        it sums to 1; with :math:`R = 2` every entry is positive.
        """
        b, _, h, w = check_feature_map(x, self.cca.in_channels, type(self).__name__)
        i, j = check_query(query, h, w)
        loops = []
        for _ in range(self.recurrence):
            x, weights = self.cca._forward(x, need_weights=True)
            loops.append(weights)
        row = loops[-1][:, i * w + j][:, None]  # B×1×N: row of A_R
        # (row of A_R) A_{R-1} ⋯ A_1, vector by matrix: never an N×N product.
        for weights in reversed(loops[:-1]):
            row = row @ weights
        return row.reshape(b, h, w)

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward`; see :func:`recurrent_criss_cross_flops`."""
        return recurrent_criss_cross_flops(batch, self.cca.in_channels, height, width, reduction=self.cca.reduction,
                                           recurrence=self.recurrence, fused=self.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention :meth:`forward` stores; see :func:`recurrent_criss_cross_attention_memory`."""
        return recurrent_criss_cross_attention_memory(batch, self.cca.in_channels, height, width,
                                                      reduction=self.cca.reduction, recurrence=self.recurrence,
                                                      fused=self.fused, bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return f"recurrence={self.recurrence}"


def _keys_per_query(height: int, width: int, fused: bool) -> int:
    """Scores computed per query: the H + W of the factorised path (one is masked), or all HW."""
    return height + width if fused else height * width


def criss_cross_flops(batch: int, channels: int, height: int, width: int, *, reduction: int = 8,
                      fused: bool = False) -> dict[str, int]:
    r"""FLOPs of one :class:`CrissCrossAttention` forward pass, 2 per multiply-add, as ``FlopCounterMode`` counts.

    With :math:`N = HW`, :math:`C' = C/r`:

    * ``conv`` — the 1×1 convolutions :math:`Q, K, V`: :math:`2BNC(C' + C' + C)` (bias not counted);
    * ``matmul`` — affinity :math:`2BNMC'` plus aggregation :math:`2BNMC`, where :math:`M` is the number
      of keys scored per query: :math:`H + W` on the factorised path (the duplicate of the query is
      computed, then set to :math:`-\infty` — an uncounted element-wise step), :math:`N` on the dense
      reference path.  So :math:`O(N(H+W)C)` against the non-local block's :math:`O(N^2C)`.

    Example (speedinghzl/CCNet issue #2): at 1×512×97×97 with :math:`r = 8` one module costs
    :math:`2\cdot97^2\cdot512\cdot(64+64+512) + 2\cdot97^2\cdot194\cdot(64+512) \approx 8.27` GFLOPs.
    """
    key_channels = reduced_channels(channels, reduction)
    n, m = height * width, _keys_per_query(height, width, fused)
    conv = 2 * batch * n * channels * (2 * key_channels + channels)
    matmul = 2 * batch * n * m * key_channels + 2 * batch * n * m * channels
    return {"conv": conv, "matmul": matmul}


def criss_cross_attention_memory(batch: int, channels: int, height: int, width: int, *, reduction: int = 8,
                                 fused: bool = False, bytes_per_element: int = 4) -> int:
    """Bytes of attention one :class:`CrissCrossAttention` pass stores: :math:`B\\cdot N\\cdot M` elements.

    :math:`M = H + W` on the factorised path (the B×H×W×(H+W) energies and weights), :math:`M = N = HW`
    on the dense reference path — :math:`O(N^{1.5})` against :math:`O(N^2)` for a square map.
    ``channels`` and ``reduction`` do not enter; they are accepted so every block's formula reads alike.
    """
    return batch * height * width * _keys_per_query(height, width, fused) * bytes_per_element


def recurrent_criss_cross_flops(batch: int, channels: int, height: int, width: int, *, reduction: int = 8,
                                recurrence: int = 2, fused: bool = False) -> dict[str, int]:
    """FLOPs of :class:`RecurrentCrissCross`: ``recurrence`` times :func:`criss_cross_flops` (the weights
    are shared, the work is not).  At 1×512×97×97, R = 2: about 16.5 GFLOPs."""
    one = criss_cross_flops(batch, channels, height, width, reduction=reduction, fused=fused)
    return {kind: recurrence * count for kind, count in one.items()}


def recurrent_criss_cross_attention_memory(batch: int, channels: int, height: int, width: int, *, reduction: int = 8,
                                           recurrence: int = 2, fused: bool = False, bytes_per_element: int = 4) -> int:
    """Bytes of attention :class:`RecurrentCrissCross` stores: ``recurrence`` times one module's, since a
    training pass keeps every loop's weights for the backward pass (inference needs one loop's at a time)."""
    return recurrence * criss_cross_attention_memory(batch, channels, height, width, reduction=reduction,
                                                     fused=fused, bytes_per_element=bytes_per_element)
