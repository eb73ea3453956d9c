r"""Asymmetric non-local blocks — Zhu, Xu, Bai, Huang and Bai, *Asymmetric Non-local Neural
Networks for Semantic Segmentation*, ICCV 2019 (arXiv 1908.07678; official code MendelXu/ANN).

The paper writes the non-local block (Sec. 3.1) on a feature map :math:`X` with
:math:`N = HW` positions, three 1×1 convolutions giving the query :math:`\phi`, the key
:math:`\theta` and the value :math:`\gamma` (each :math:`\hat C\times N`), and

.. math::

    V = \phi^\top \theta \in \mathbb{R}^{N\times N}, \qquad
    O = \operatorname{softmax}_{\text{rows}}(V)\,\gamma^\top, \qquad
    Y = \operatorname{cat}\big(W_o(O^\top),\, X\big).

Its cost is the :math:`N\times N` matrix.  The *asymmetric* block keeps all :math:`N`
queries but samples only :math:`S \ll N` keys and values (Sec. 3.2): a pyramid of
adaptive average poolings :math:`P` (PSPNet's, at sizes :math:`n \in \{1, 3, 6, 8\}`),
flattened and concatenated,

.. math::

    \theta_P = P(\theta),\quad \gamma_P = P(\gamma) \in \mathbb{R}^{\hat C\times S},\qquad
    S = \sum_n n^2 = 1 + 9 + 36 + 64 = 110,

.. math::

    V_P = \phi^\top \theta_P \in \mathbb{R}^{N\times S}, \qquad
    O_P = \operatorname{softmax}_{\text{rows}}\!\big(V_P/\sqrt{\hat C}\big)\,\gamma_P^\top ,

so the matrix is :math:`N\times S` and the cost :math:`O(NS\hat C)` instead of
:math:`O(N^2\hat C)`.  The :math:`1/\sqrt{\hat C}` is the official code's
(``sim_map = (self.key_channels ** -.5) * sim_map``); we follow it.

Two blocks are built on this one core:

* **APNB** (asymmetric pyramid non-local block) — self-attention within one map;
  query and key share one projection (official ``apnb.py``: ``self.f_query = self.f_key``).
* **AFNB** (asymmetric fusion non-local block, Sec. 3.3) — queries :math:`\phi` from the
  high-level map (ResNet stage 4), keys :math:`\theta` and values :math:`\gamma` from the
  low-level map (stage 3), each with its own projection.

Both end as the official code does: :math:`W_o` (a 1×1 conv initialised to zero), then
the concatenation with the input that gave the queries, fused by a 1×1 conv, BatchNorm
(+ ReLU in APNB only) and ``Dropout2d`` (official ``conv_bn_dropout``).  Because of that
fusing conv the blocks do *not* start as the identity, though :math:`W_o = 0` does make
the attention branch start silent.

Where each piece lives below:

* :math:`P` — :func:`pyramid_sample`; :math:`S` — :func:`num_samples`; the bins' weights
  spread back to pixels — :func:`spread_to_pixels`;
* :math:`\phi, \theta, \gamma`, the sampling, :math:`V_P` and :math:`O_P` — the one core
  :meth:`_PyramidNonLocal._attend`, whose softmax attention is :func:`attnlib.core.attend`;
* :math:`W_o` and the fusion with the input — :meth:`_PyramidNonLocal._forward`;
* which input gives queries and which keys — :meth:`APNB.forward`, :meth:`AFNB.forward`.

Deliberate differences from the official code (none changes what its network computes):

* the official APNB applies its shared ``f_key`` twice (``f_query(x)`` and ``f_key(x)``);
  it is applied once here and the result used for both;
* the official APNB fuses with ``Conv2d(2 * in_channels, out_channels)`` although the
  concatenation has ``out_channels + in_channels`` channels (it runs only because its
  network uses ``in_channels == out_channels``); we use ``out_channels + in_channels``;
* convolutions followed by BatchNorm have no bias (BatchNorm's shift absorbs it);
* on the fast path (``fused=True``) :math:`W_o` is folded into the fusion conv, the same
  linear map computed in another order (:meth:`_PyramidNonLocal._forward`); ``fused=False``
  runs the official conv, concatenation and fusion as written;
* the official blocks also take a list of max-pool ``sizes`` for extra "stages"; its
  network uses only ``sizes=[1]`` (one stage, no pooling), which is what is built here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_feature_map, check_positive, check_query, reduced_channels
from .core import attend, attention_matrix_bytes

__all__ = [
    "APNB", "AFNB", "pyramid_sample", "num_samples", "spread_to_pixels",
    "apnb_flops", "apnb_attention_memory", "afnb_flops", "afnb_attention_memory",
]

POOL_SIZES = (1, 3, 6, 8)  # the paper's pyramid: 110 samples
Levels = Sequence[int | tuple[int, int]]  # n (an n×n grid of bins) or (rows, cols), per level


def _is_positive_int(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _check_pool_sizes(pool_sizes: object) -> tuple[int | tuple[int, int], ...]:
    """Check that ``pool_sizes`` is a non-empty sequence of levels and return it as a tuple.

    A level is a positive int ``n`` (an n×n grid of bins, as in the paper) or a pair of
    positive ints ``(rows, cols)``: ``((H, W),)`` samples every pixel of an H×W map once.
    """
    if (
        isinstance(pool_sizes, str)
        or not isinstance(pool_sizes, Sequence)
        or len(pool_sizes) == 0
        or not all(_is_positive_int(n) or (isinstance(n, tuple) and len(n) == 2 and all(map(_is_positive_int, n)))
                   for n in pool_sizes)
    ):
        raise ValueError(f"expected pool_sizes to be a non-empty sequence of positive ints or (rows, cols) "
                         f"pairs of positive ints, got {pool_sizes!r}")
    return tuple(pool_sizes)


def _grids(pool_sizes: Levels) -> list[tuple[int, int]]:
    """Each level of a checked pyramid as its (rows, cols) of bins."""
    return [(n, n) if isinstance(n, int) else n for n in pool_sizes]


def num_samples(pool_sizes: Levels = POOL_SIZES) -> int:
    r"""The number of sampled keys :math:`S = \sum_n n^2` (110 for the paper's ``(1, 3, 6, 8)``)."""
    return sum(rows * cols for rows, cols in _grids(_check_pool_sizes(pool_sizes)))


def pyramid_sample(x: torch.Tensor, pool_sizes: Levels = POOL_SIZES) -> torch.Tensor:
    r"""The sampling module :math:`P` (Sec. 3.2): B×C×H×W → B×C×S.

    Adaptive average pooling to n×n for each ``n`` in ``pool_sizes`` (to rows×cols
    for a pair), each result flattened row-major and the levels concatenated in the
    given order (coarsest first in the paper's pyramid):  :math:`S = \sum_n n^2`.
    Adaptive pooling's bin :math:`k` of :math:`n` along a side of length :math:`L`
    covers :math:`[\lfloor kL/n\rfloor, \lceil (k+1)L/n\rceil)`, so when :math:`n`
    does not divide :math:`L` neighbouring bins overlap by one pixel, and when
    :math:`n > L` pixels repeat.
    """
    grids = _grids(_check_pool_sizes(pool_sizes))
    b, c, _, _ = check_feature_map(x, None, "pyramid_sample")
    levels = [F.adaptive_avg_pool2d(x, (rows, cols)).reshape(b, c, rows * cols)
              for rows, cols in grids]
    return torch.cat(levels, dim=2)


def _bin_matrix(length: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """The 1-D adaptive average pooling as a ``bins × length`` matrix: row k is 1/|k| on bin k.

    Pooling the one-hot vectors gives it column by column, with PyTorch's own bin edges.
    """
    eye = torch.eye(length, dtype=like.dtype, device=like.device)
    return F.adaptive_avg_pool1d(eye[:, None, :], bins)[:, 0, :].T


def spread_to_pixels(row: torch.Tensor, height: int, width: int,
                      pool_sizes: Levels) -> torch.Tensor:
    r"""Spread attention over the S pooled bins (B×S) back to the H×W pixels (B×H×W).

    Pooling is linear, :math:`\gamma_P = \gamma\,\mathcal{P}^\top` with
    :math:`\mathcal{P}_{b,p} = [p \in b]/|b|`, so query i's output
    :math:`\sum_b a_b \gamma_{P,b} = \sum_p (a\mathcal{P})_p\, \gamma_p` gives pixel p
    the exact weight :math:`(a\mathcal{P})_p = \sum_{b \ni p} a_b/|b|`.  A 2-D bin is
    a product of a row bin and a column bin, so per level
    :math:`a\mathcal{P} = R^\top A\, C` (:func:`_bin_matrix` for :math:`R, C`), never
    forming the S×HW matrix.  Rows of several queries may be stacked as the B rows.
    """
    expected = num_samples(pool_sizes)
    if row.dim() != 2 or row.shape[1] != expected:
        raise ValueError(f"spread_to_pixels: expected weights of shape (B, {expected}) "
                         f"for pool sizes {tuple(pool_sizes)!r}, "
                         f"got {tuple(row.shape)}")
    spread = row.new_zeros(row.shape[0], height, width)
    grids = _grids(pool_sizes)
    for (n_rows, n_cols), a in zip(grids, row.split([r * c for r, c in grids], dim=1)):
        rows, cols = _bin_matrix(height, n_rows, row), _bin_matrix(width, n_cols, row)
        a = a.reshape(-1, n_rows, n_cols)
        spread = spread + torch.einsum("bkl,ky,lx->byx", a, rows, cols)
    return spread


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The key/query projection of the official code: 1×1 conv, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU())


class _PyramidNonLocal(nn.Module):
    r"""The core APNB and AFNB share (the official ``_SelfAttentionBlock``).

    Queries :math:`\phi` come from ``queries_from`` (B×C_q×H×W); keys :math:`\theta` and
    values :math:`\gamma` from ``keys_from`` (B×C_k×H×W), pyramid-sampled to S bins.
    ``queries_from_channels=None`` shares the key projection with the queries (APNB).
    Subclasses set ``self.fuse``, the layers applied to ``cat[W_o(O_P^T), queries_from]``.
    """

    def __init__(self, keys_from_channels: int, queries_from_channels: int | None,
                 key_channels: int, value_channels: int, out_channels: int,
                 pool_sizes: Levels, fused: bool) -> None:
        super().__init__()
        for value, name in ((key_channels, "key_channels"),
                            (value_channels, "value_channels"),
                            (out_channels, "out_channels")):
            check_positive(value, name)
        self.key_channels, self.value_channels = key_channels, value_channels
        self.out_channels = out_channels
        self.pool_sizes, self.fused = _check_pool_sizes(pool_sizes), fused

        self.f_key = _conv_bn_relu(keys_from_channels, key_channels)  # θ
        self.f_query = (None if queries_from_channels is None  # None: φ = θ
                        else _conv_bn_relu(queries_from_channels, key_channels))  # φ
        self.f_value = nn.Conv2d(keys_from_channels, value_channels, 1)  # γ
        self.W = nn.Conv2d(value_channels, out_channels, 1)  # W_o, zero as officially
        nn.init.zeros_(self.W.weight)
        nn.init.zeros_(self.W.bias)

    def _attend(self, keys_from: torch.Tensor, queries_from: torch.Tensor,
                need_weights: bool):
        r"""The asymmetric attention, with :math:`V_P = \phi^\top\theta_P`,
        :math:`O_P = \operatorname{softmax}(V_P/\sqrt{\hat C})\,\gamma_P^\top`.

        Returns (B×N×value_channels, B×N×S weights or None).
        """
        key = self.f_key(keys_from)
        # APNB: one projection for queries and keys, computed once
        query = key if self.f_query is None else self.f_query(queries_from)
        # The key is sampled after its projection, θ_P = P(θ), as in the paper: ReLU
        # does not commute with averaging.  γ is affine, so P(γ(X)) = γ(P(X)): it runs
        # on the S bins instead of the N pixels (the official code projects first).
        key = pyramid_sample(key, self.pool_sizes).transpose(1, 2)  # B×S×Ĉ
        value = self.f_value(pyramid_sample(keys_from, self.pool_sizes)[..., None])
        value = value.flatten(2).transpose(1, 2)  # B×S×value_channels
        query = query.flatten(2).transpose(1, 2)  # B×N×Ĉ: every position queries
        return attend(query, key, value, scale=self.key_channels ** -0.5,
                      need_weights=need_weights, fused=self.fused)

    def _context(self, keys_from: torch.Tensor,
                 queries_from: torch.Tensor) -> torch.Tensor:
        """:math:`W_o O_P^\top`, B×out_channels×H×W: the branch before the fusion."""
        b, _, h, w = queries_from.shape
        out, _ = self._attend(keys_from, queries_from, need_weights=False)
        return self.W(out.transpose(1, 2).reshape(b, self.value_channels, h, w))

    def _forward(self, keys_from: torch.Tensor,
                 queries_from: torch.Tensor) -> torch.Tensor:
        r"""The official ``conv_bn_dropout(cat[context, queries_from])``.

        The fusion conv :math:`F = [F_c\ F_x]` (no bias: BatchNorm follows) and
        :math:`W_o` are linear, so :math:`F\,\mathrm{cat}[W_o O_P^\top + b_o, X]
        = (F_c W_o)\,O_P^\top + F_c b_o + F_x X`.  The fast path computes the
        right-hand side: :math:`W_o` folds into :math:`F_c`, and neither the context
        map nor the concatenation is built, so the :math:`N C_o^2` multiply-adds of
        :math:`F_c` are never done.
        """
        if not self.fused:
            context = self._context(keys_from, queries_from)
            return self.fuse(torch.cat([context, queries_from], dim=1))
        b, c, h, w = queries_from.shape
        out, _ = self._attend(keys_from, queries_from, need_weights=False)  # B×N×d_v
        f_context, f_input = self.fuse[0].weight.flatten(1).split(
            [self.out_channels, c], dim=1)
        y = F.conv2d(queries_from, f_input[..., None, None], f_context @ self.W.bias)
        folded = (f_context @ self.W.weight.flatten(1)).expand(b, -1, -1)  # F_c W_o
        y = y.flatten(2).baddbmm(folded, out.mT)  # + (F_c W_o) O_P^T
        return self.fuse[1:](y.reshape(b, -1, h, w))  # BatchNorm (ReLU), dropout

    def _map(self, keys_from: torch.Tensor, queries_from: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """Query ``(i, j)``'s attention over the S bins, spread exactly over the H×W pixels."""
        _, _, h, w = queries_from.shape
        i, j = check_query(query, h, w)
        row = self._attend(keys_from, queries_from, need_weights=True)[1][:, i * w + j]
        return spread_to_pixels(row, h, w, self.pool_sizes)


class APNB(_PyramidNonLocal):
    r"""Asymmetric Pyramid Non-local Block: pyramid-sampled self-attention within one map.

    Args:
        in_channels: C of the input.
        out_channels: C of the output; default ``in_channels``, as the official network.
        key_channels: :math:`\hat C` of the shared query/key projection; default
            ``in_channels // 2`` (the official network's 256 on 512).
        value_channels: width of the value projection :math:`\gamma`; default ``key_channels``.
        pool_sizes: the pyramid; S = Σ n² keys (110 for the default).  A level may be a
            ``(rows, cols)`` pair: ``((H, W),)`` samples every pixel of an H×W map.
        dropout: ``Dropout2d`` rate after the fusion (official 0.05; mmseg has none).
        fused: compute the attention on the fast path when no weights are asked for.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None,
                 key_channels: int | None = None, value_channels: int | None = None,
                 pool_sizes: Levels = POOL_SIZES, dropout: float = 0.05,
                 fused: bool = True) -> None:
        check_positive(in_channels, "in_channels")
        out_channels = in_channels if out_channels is None else out_channels
        if key_channels is None:
            key_channels = reduced_channels(in_channels, 2)
        value_channels = key_channels if value_channels is None else value_channels
        super().__init__(in_channels, None, key_channels, value_channels, out_channels,
                         pool_sizes, fused)
        self.in_channels = in_channels
        self.fuse = nn.Sequential(  # official APNB: conv, BN, ReLU, dropout
            nn.Conv2d(out_channels + in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout2d(dropout),
        )

    def _check(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        return check_feature_map(x, self.in_channels, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._forward(x, x)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch :math:`W_o O_P^\top` alone (what the official efficiency script times)."""
        self._check(x)
        return self._context(x, x)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The N×S matrix softmax(φᵀθ_P/√Ĉ), B×N×S: every pixel against every pooled bin."""
        self._check(x)
        return self._attend(x, x, need_weights=True)[1]

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        r"""Pixel ``query``'s effective attention over the H×W pixels (B×H×W); sums to 1.

        Row ``query`` of :meth:`attention_weights` lives on the S bins; a bin's value is the mean
        of its pixels, so pixel p gets :math:`\sum_{b \ni p} a_b/|b|` — exactly the weight with
        which :math:`\gamma(x_p)` enters this query's output (overlapping bins included).
        """
        self._check(x)
        return self._map(x, x, query)

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`apnb_flops`."""
        return apnb_flops(batch, self.in_channels, height, width, out_channels=self.out_channels,
                          key_channels=self.key_channels, value_channels=self.value_channels,
                          pool_sizes=self.pool_sizes, fused=self.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention matrix :meth:`forward` stores; see :func:`apnb_attention_memory`."""
        return apnb_attention_memory(batch, self.in_channels, height, width, key_channels=self.key_channels,
                                     value_channels=self.value_channels, pool_sizes=self.pool_sizes, fused=self.fused,
                                     device=self.W.weight.device, bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, key_channels={self.key_channels}, "
                f"value_channels={self.value_channels}, pool_sizes={self.pool_sizes}, fused={self.fused}")


class AFNB(_PyramidNonLocal):
    r"""Asymmetric Fusion Non-local Block: high-level queries attend to pooled low-level keys.

    Args:
        low_channels: C of the low-level map (stage 3), which gives keys and values.
        high_channels: C of the high-level map (stage 4), which gives queries and is fused with the output.
        out_channels: C of the output; default ``high_channels``, as the official network.
        key_channels: :math:`\hat C` of the query and key projections; default
            ``high_channels // 8`` (the official network's 256 on 2048).
        value_channels: width of the value projection :math:`\gamma`; default ``key_channels``.
        pool_sizes: the pyramid; S = Σ n² keys (110 for the default), levels as in :class:`APNB`.
        dropout: ``Dropout2d`` rate after the fusion (official 0.05; mmseg has none).
        fused: compute the attention on the fast path when no weights are asked for.
    """

    def __init__(self, low_channels: int, high_channels: int, out_channels: int | None = None,
                 key_channels: int | None = None, value_channels: int | None = None,
                 pool_sizes: Levels = POOL_SIZES, dropout: float = 0.05,
                 fused: bool = True) -> None:
        check_positive(low_channels, "low_channels")
        check_positive(high_channels, "high_channels")
        out_channels = high_channels if out_channels is None else out_channels
        if key_channels is None:
            key_channels = reduced_channels(high_channels, 8)
        value_channels = key_channels if value_channels is None else value_channels
        super().__init__(low_channels, high_channels, key_channels, value_channels,
                         out_channels, pool_sizes, fused)
        self.low_channels, self.high_channels = low_channels, high_channels
        self.fuse = nn.Sequential(  # official AFNB: conv, BN (no ReLU), dropout
            nn.Conv2d(out_channels + high_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.Dropout2d(dropout),
        )

    def _check(self, low: torch.Tensor, high: torch.Tensor) -> tuple[int, int, int, int]:
        name = type(self).__name__
        shape = check_feature_map(high, self.high_channels, f"{name} (high)")
        check_feature_map(low, self.low_channels, f"{name} (low)")
        if (low.shape[0], *low.shape[2:]) != (high.shape[0], *high.shape[2:]):
            raise ValueError(f"{name}: expected low and high of the same batch and spatial size, "
                             f"got low {tuple(low.shape)} and high {tuple(high.shape)}")
        return shape

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        self._check(low, high)
        return self._forward(low, high)

    def context(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The attention branch :math:`W_o O_P^\top` alone, before the fusion with ``high``."""
        self._check(low, high)
        return self._context(low, high)

    def attention_weights(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """The N×S matrix softmax(φ(high)ᵀθ_P(low)/√Ĉ), B×N×S."""
        self._check(low, high)
        return self._attend(low, high, need_weights=True)[1]

    def attention_map(self, low: torch.Tensor, high: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        r"""High-level pixel ``query``'s effective attention over the low-level map's pixels (B×H×W).

        As :meth:`APNB.attention_map`: pixel p of ``low`` gets :math:`\sum_{b \ni p} a_b/|b|`; sums to 1.
        """
        self._check(low, high)
        return self._map(low, high, query)

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`afnb_flops`."""
        return afnb_flops(batch, self.high_channels, height, width, low_channels=self.low_channels,
                          out_channels=self.out_channels, key_channels=self.key_channels,
                          value_channels=self.value_channels, pool_sizes=self.pool_sizes,
                          fused=self.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention matrix :meth:`forward` stores; see :func:`afnb_attention_memory`."""
        return afnb_attention_memory(batch, self.high_channels, height, width, key_channels=self.key_channels,
                                     value_channels=self.value_channels, pool_sizes=self.pool_sizes, fused=self.fused,
                                     device=self.W.weight.device, bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return (f"low_channels={self.low_channels}, high_channels={self.high_channels}, out_channels={self.out_channels}, "
                f"key_channels={self.key_channels}, value_channels={self.value_channels}, "
                f"pool_sizes={self.pool_sizes}, fused={self.fused}")


def _attention_flops(batch: int, n: int, s: int, key_channels: int, value_channels: int) -> int:
    """:math:`2BNS\\hat C + 2BNS d_v`: the logits φᵀθ_P and the aggregation, on either path."""
    return 2 * batch * n * s * (key_channels + value_channels)


def _fusion_flops(batch: int, n: int, channels: int, out_channels: int, value_channels: int,
                  fused: bool) -> dict[str, int]:
    r""":math:`W_o` and the fusion conv on the N pixels, as each path computes them.

    Reference: :math:`2BN\,(d_v C_o + (C_o + C)\,C_o)` in convolutions.  Fused
    (:meth:`_PyramidNonLocal._forward`): :math:`2BNC\,C_o` in the convolution
    :math:`F_x X`, and :math:`2BNd_vC_o + 2C_o^2d_v` in matrix products, the folded
    weight's product and the fold :math:`F_c W_o` itself.
    """
    if fused:
        return {"conv": 2 * batch * n * channels * out_channels,
                "matmul": 2 * value_channels * out_channels * (batch * n + out_channels)}
    return {"conv": 2 * batch * n * (value_channels + out_channels + channels) * out_channels,
            "matmul": 0}


def apnb_flops(batch: int, channels: int, height: int, width: int, *, out_channels: int, key_channels: int,
               value_channels: int, pool_sizes: Levels = POOL_SIZES, fused: bool = False) -> dict[str, int]:
    r"""FLOPs of one :class:`APNB` forward pass, 2 per multiply-add, as ``FlopCounterMode`` counts them.

    With :math:`N = HW`, :math:`S = \sum n^2`, input :math:`C`, output :math:`C_o`, key
    :math:`\hat C` and value :math:`d_v` widths, on the reference path:

    * conv: :math:`2BN\,(C\hat C + d_v C_o + (C_o + C)\,C_o) + 2BS\,C d_v` — the shared
      φ = θ projection once, :math:`W_o` and the fusion conv on the N pixels, and γ on the
      S pooled bins (γ is affine, so it commutes with the pooling; the official code runs
      it on the N pixels, :math:`2BNCd_v`);
    * matmul: :math:`2BNS\,(\hat C + d_v)` — linear in N, against :math:`2BN^2(\hat C + d_v)`
      for the non-local block.

    ``fused=True`` counts the fast path, which folds :math:`W_o` into the fusion conv
    (:func:`_fusion_flops`): :math:`2C_o^2\,(BN - d_v)` fewer.  The pooling, BatchNorm, ReLU and
    softmax are not counted.
    """
    n, s = height * width, num_samples(pool_sizes)
    fusion = _fusion_flops(batch, n, channels, out_channels, value_channels, fused)
    conv = (2 * batch * n * channels * key_channels + 2 * batch * s * channels * value_channels
            + fusion["conv"])
    matmul = _attention_flops(batch, n, s, key_channels, value_channels) + fusion["matmul"]
    return {"conv": conv, "matmul": matmul}


def afnb_flops(batch: int, channels: int, height: int, width: int, *, low_channels: int, out_channels: int,
               key_channels: int, value_channels: int, pool_sizes: Levels = POOL_SIZES,
               fused: bool = False) -> dict[str, int]:
    r"""FLOPs of one :class:`AFNB` forward pass; ``channels`` is the high-level map's C.

    With :math:`C_l` the low-level channels and the rest as in :func:`apnb_flops`, on the
    reference path:

    * conv: :math:`2BN\,(C_l\hat C + C\hat C + d_v C_o + (C_o + C)\,C_o) + 2BS\,C_l d_v` —
      θ on the low map, φ on the high map, :math:`W_o` and the fusion conv, and γ on the S
      pooled bins of the low map;
    * matmul: :math:`2BNS\,(\hat C + d_v)`.

    ``fused=True`` counts the fast path, as in :func:`apnb_flops`.
    """
    n, s = height * width, num_samples(pool_sizes)
    fusion = _fusion_flops(batch, n, channels, out_channels, value_channels, fused)
    conv = (2 * batch * n * (low_channels + channels) * key_channels
            + 2 * batch * s * low_channels * value_channels + fusion["conv"])
    matmul = _attention_flops(batch, n, s, key_channels, value_channels) + fusion["matmul"]
    return {"conv": conv, "matmul": matmul}


def apnb_attention_memory(batch: int, channels: int, height: int, width: int, *, key_channels: int,
                          value_channels: int | None = None, pool_sizes: Levels = POOL_SIZES,
                          fused: bool = False, device: torch.device | str = "cpu", bytes_per_element: int = 4) -> int:
    """Bytes of the B×N×S attention matrix: :math:`BNS` elements, linear in N (the non-local block's is :math:`BN^2`).

    The fused path stores none — unless there are no more samples S than key channels (110 keys
    against 256 channels in the paper's setting), where the core takes its plain path on either
    setting because the matrix is smaller than the queries, and, on a CPU, where S is no larger
    than ``key_channels + value_channels`` (110 against 64 + 64 in this book's model) or
    ``value_channels`` differs from ``key_channels`` (the flash kernel runs only where its
    recomputed product pays; ``None`` means equal; :func:`attnlib.core.takes_fused_path`).
    ``channels`` does not enter; it keeps the signature of the other formulas.
    """
    return attention_matrix_bytes(batch, height * width, num_samples(pool_sizes), key_channels, d_v=value_channels,
                                  device=device, fused=fused, bytes_per_element=bytes_per_element)


def afnb_attention_memory(batch: int, channels: int, height: int, width: int, *, key_channels: int,
                          value_channels: int | None = None, pool_sizes: Levels = POOL_SIZES,
                          fused: bool = False, device: torch.device | str = "cpu", bytes_per_element: int = 4) -> int:
    """Bytes of AFNB's B×N×S attention matrix: the same :math:`BNS` elements as :func:`apnb_attention_memory`."""
    return apnb_attention_memory(batch, channels, height, width, key_channels=key_channels,
                                 value_channels=value_channels, pool_sizes=pool_sizes, fused=fused, device=device,
                                 bytes_per_element=bytes_per_element)
