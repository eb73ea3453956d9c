r"""Non-local block — Wang, Girshick, Gupta and He, *Non-local Neural Networks*, CVPR 2018.

The generic non-local operation (paper, eq. 1) computes at every position :math:`i`

.. math::

    y_i = \frac{1}{\mathcal{C}(x)} \sum_{\forall j} f(x_i, x_j)\, g(x_j),
    \qquad g(x_j) = W_g x_j ,

and the block wraps it in a residual (eq. 6):

.. math::

    z_i = W_z\, y_i + x_i .

The paper gives four pairwise functions :math:`f` with their normalisers
:math:`\mathcal{C}`, all implemented here (``mode``):

======================  ==============================================  ==========================
``mode``                :math:`f(x_i, x_j)`                             :math:`\mathcal{C}(x)`
======================  ==============================================  ==========================
``gaussian``            :math:`e^{x_i^\top x_j}`                        :math:`\sum_j f(x_i, x_j)`
``embedded_gaussian``   :math:`e^{\theta(x_i)^\top \phi(x_j)}`          :math:`\sum_j f(x_i, x_j)`
``dot_product``         :math:`\theta(x_i)^\top \phi(x_j)`              :math:`N`, the number of :math:`j`
``concatenation``       :math:`\operatorname{ReLU}(w_f^\top[\theta(x_i), \phi(x_j)])`  :math:`N`
======================  ==============================================  ==========================

with :math:`\theta(x_i) = W_\theta x_i` and :math:`\phi(x_j) = W_\phi x_j` (1×1 convolutions).
For the two Gaussian forms :math:`f/\mathcal{C}` is a softmax over :math:`j`: the block is
softmax self-attention with :math:`Q=\theta(x)`, :math:`K=\phi(x)`, :math:`V=g(x)`.

Three choices where the paper's text, the authors' code (facebookresearch/video-nonlocal-net)
and mmcv/mmseg differ, each a switch here:

* **the logit scale** (``use_scale``).  The paper's equations have no :math:`1/\sqrt{d}`; the
  authors' code (``USE_SCALE = True``) and mmcv's ``NonLocal2d`` (``use_scale=True``, which
  mmseg's ``NLHead`` uses) multiply the embedded-Gaussian logits by :math:`d^{-1/2}`.  The
  default follows the code; ``use_scale=False`` is the paper's equation.
* **where sub-sampling pools** (``pool_input``).  The paper's text and mmcv max-pool
  :math:`\phi(x)` and :math:`g(x)`; the authors' code max-pools :math:`x` *before* the
  :math:`\phi` and :math:`g` convolutions (``USE_MAXPOOL``), which is cheaper and gives a
  different output (a max does not commute with a convolution).  Default: the paper's.
* **the initialisation of** :math:`\theta, \phi, g` (``init_std``).  The authors' code and
  mmcv draw them from :math:`\mathcal{N}(0, 0.01^2)`; the default keeps PyTorch's
  (Kaiming-uniform), like every other layer of the book's network, which trains from scratch.

Where each equation lives below:

* :math:`\theta, \phi, g` and the optional 2×2 max-pool of the keys and values
  (the paper's "subsampling" trick, Sec. 3.3) — :meth:`NonLocal2d._embed`;
* eq. (1) for the Gaussian forms — the call to :func:`attnlib.core.attend` in
  :meth:`NonLocal2d._aggregate`; for ``dot_product`` the same sum, reassociated as
  :math:`\theta\,(\phi^\top g)/N` on the fused path; for ``concatenation``
  :math:`w_f^\top[\theta_i,\phi_j] = w_\theta^\top\theta_i + w_\phi^\top\phi_j`, so the
  pairwise tensor is one broadcast add, never a concatenated :math:`N\times N\times 2d` tensor;
* eq. (6), :math:`W_z` followed by BatchNorm whose scale starts at zero, so the block
  starts as the identity (Sec. 4.1) — :meth:`NonLocal2d.forward`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_feature_map, check_positive, check_query
from .core import attend, attention_matrix_bytes, project

__all__ = ["NonLocal2d", "nonlocal_flops", "nonlocal_attention_memory"]

MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


class NonLocal2d(nn.Module):
    r"""The non-local block of Wang et al. (2018) for B×C×H×W feature maps.

    Args:
        in_channels: C.
        inter_channels: width of :math:`\theta, \phi, g` (default ``C // 2``, at least 1).
        mode: one of ``"embedded_gaussian"``, ``"gaussian"``, ``"dot_product"``, ``"concatenation"``.
        sub_sample: max-pool the keys and values by 2×2 (4× fewer keys).
        pool_input: with ``sub_sample``, pool :math:`x` before the :math:`\phi` and :math:`g`
            convolutions (the authors' code) instead of pooling :math:`\phi(x)` and :math:`g(x)`
            (the paper's text, mmcv).
        use_scale: multiply the embedded-Gaussian logits by :math:`d^{-1/2}` (the authors' code,
            mmcv, mmseg); ``False`` is the paper's equation.
        init_std: draw :math:`\theta, \phi, g` from :math:`\mathcal{N}(0, \text{init\_std}^2)` with zero
            bias (the authors' code and mmcv use 0.01); ``None`` keeps PyTorch's initialisation.
        bn: follow :math:`W_z` with a BatchNorm initialised to zero (else :math:`W_z` itself is zeroed).
        fused: compute eq. (1) on the fast path when no weights are asked for.
    """

    def __init__(
        self,
        in_channels: int,
        inter_channels: int | None = None,
        mode: str = "embedded_gaussian",
        sub_sample: bool = False,
        pool_input: bool = False,
        use_scale: bool = True,
        init_std: float | None = None,
        bn: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        check_positive(in_channels, "in_channels")
        inter_channels = _inter_channels(in_channels, inter_channels)
        _check_mode(mode)
        flags = {"sub_sample": sub_sample, "pool_input": pool_input,
                 "use_scale": use_scale, "bn": bn, "fused": fused}
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"NonLocal2d: expected {flag} to be a bool, "
                                 f"got {value!r}")
        if pool_input and not sub_sample:
            raise ValueError("NonLocal2d: pool_input=True says where sub-sampling "
                             "pools, so expected sub_sample=True, got sub_sample=False")
        positive = isinstance(init_std, (int, float)) and init_std > 0
        if init_std is not None and not positive:
            raise ValueError("NonLocal2d: expected init_std to be None or a positive "
                             f"number, got {init_std!r}")
        self.in_channels, self.inter_channels = in_channels, inter_channels
        self.mode, self.sub_sample, self.pool_input = mode, sub_sample, pool_input
        self.use_scale, self.init_std, self.fused = use_scale, init_std, fused

        self.g = nn.Conv2d(in_channels, inter_channels, 1)
        if mode != "gaussian":  # the plain Gaussian compares raw features x_i^T x_j
            self.theta = nn.Conv2d(in_channels, inter_channels, 1)
            self.phi = nn.Conv2d(in_channels, inter_channels, 1)
        if mode == "concatenation":
            self.concat_project = nn.Conv2d(2 * inter_channels, 1, 1, bias=False)  # w_f
        self.pool = nn.MaxPool2d(2) if sub_sample else nn.Identity()
        self.out_proj = nn.Conv2d(inter_channels, in_channels, 1)  # W_z
        self.out_norm = nn.BatchNorm2d(in_channels) if bn else nn.Identity()
        if init_std is not None:
            names = [n for n in ("theta", "phi", "g") if hasattr(self, n)]
            for conv in (getattr(self, n) for n in names):
                nn.init.normal_(conv.weight, std=init_std)
                nn.init.zeros_(conv.bias)
        zeroed = self.out_norm if bn else self.out_proj
        nn.init.zeros_(zeroed.weight)
        nn.init.zeros_(zeroed.bias)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """θ(x) as B×N×d; φ(x), g(x) on the (optionally pooled) key grid as B×N_k×d."""
        # The authors' code pools before φ and g; the paper and mmcv pool after.
        source = self.pool(x) if self.pool_input else x
        if self.mode == "gaussian":
            theta, phi, g = x, source, self.g(source)
        elif self.pool_input:
            theta = self.theta(x)
            phi, g = project(source, (self.phi, self.g), fused=self.fused)
        else:  # one stacked convolution when fused
            theta, phi, g = project(x, (self.theta, self.phi, self.g), fused=self.fused)
        if not self.pool_input:
            phi, g = self.pool(phi), self.pool(g)
        return tuple(t.flatten(2).transpose(1, 2) for t in (theta, phi, g))

    @property
    def scale(self) -> float:
        """The logit scale s: :math:`d^{-1/2}` for the embedded Gaussian with
        ``use_scale``, else 1."""
        if self.use_scale and self.mode == "embedded_gaussian":
            return self.inter_channels ** -0.5
        return 1.0

    def _pairwise(self, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """f(x_i, x_j) / C(x) for the two modes normalised by N (B×N×N_k)."""
        if self.mode == "dot_product":
            return torch.matmul(theta, phi.transpose(1, 2)) / phi.shape[1]
        w_f = self.concat_project.weight.flatten(1).t()  # 2d×1
        w_theta, w_phi = w_f.split(self.inter_channels)  # d×1 each
        # w_f^T [θ_i, φ_j] = w_θ^T θ_i + w_φ^T φ_j: a broadcast add, not an
        # N×N_k×2d concatenation.
        return F.relu(theta @ w_theta + (phi @ w_phi).transpose(1, 2)) / phi.shape[1]

    def _aggregate(self, theta, phi, g, need_weights: bool):
        """Eq. (1): y_i = Σ_j f(x_i, x_j) g(x_j) / C(x).

        Returns (y as B×N×d, the weights or None)."""
        if self.mode in ("embedded_gaussian", "gaussian"):
            return attend(theta, phi, g, scale=self.scale,
                          need_weights=need_weights, fused=self.fused)
        if self.mode == "dot_product" and self.fused and not need_weights:
            # θ (φ^T g) / N: the same sum, O(N d²) instead of O(N² d); no N×N matrix.
            y = torch.matmul(theta, torch.matmul(phi.transpose(1, 2), g))
            return y / phi.shape[1], None
        weights = self._pairwise(theta, phi)
        return torch.matmul(weights, g), (weights if need_weights else None)

    def _check(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        b, c, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        if self.sub_sample and (h < 2 or w < 2):
            raise ValueError(f"NonLocal2d: sub_sample pools by 2x2, so expected H, W >= 2, got {h}x{w}")
        return b, c, h, w

    def _forward(self, x: torch.Tensor, need_weights: bool):
        b, _, h, w = self._check(x)
        y, weights = self._aggregate(*self._embed(x), need_weights)
        y = y.transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return self.out_norm(self.out_proj(y)) + x, weights  # z = W_z y + x  (eq. 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The matrix f(x_i, x_j)/C(x), B×N×N_k, N = HW; N_k = HW, or the pooled grid if ``sub_sample``."""
        self._check(x)
        return self._aggregate(*self._embed(x), need_weights=True)[1]  # W_z and its BN play no part

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        r"""Row ``query`` of :meth:`attention_weights` laid out on the H×W input grid (B×H×W).

        Without sub-sampling this is exactly :math:`f(x_i, x_j)/\mathcal{C}(x)` over all j.  With
        sub-sampling the keys are 2×2 max-pooled cells; each cell's weight is shared equally by
        its four pixels (a display convention: the max picks one pixel per channel), and the last
        row/column of an odd-sized map, which the pool drops, gets zero.  For the Gaussian modes
        the map sums to 1; for ``dot_product``/``concatenation`` it sums to whatever Σ_j f/N is.
        """
        b, _, h, w = self._check(x)
        i, j = check_query(query, h, w)
        theta, phi, g = self._embed(x)
        # One query's row only: O(N d) instead of the N×N matrix of attention_weights.
        row = self._aggregate(theta[:, i * w + j:i * w + j + 1], phi, g, need_weights=True)[1][:, 0]
        if not self.sub_sample:
            return row.reshape(b, h, w)
        cells = row.reshape(b, 1, h // 2, w // 2)
        spread = F.interpolate(cells, scale_factor=2, mode="nearest") / 4
        return F.pad(spread, (0, w % 2, 0, h % 2)).reshape(b, h, w)

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`nonlocal_flops`."""
        return nonlocal_flops(batch, self.in_channels, height, width, inter_channels=self.inter_channels,
                              mode=self.mode, sub_sample=self.sub_sample, pool_input=self.pool_input,
                              fused=self.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4, *,
                         training: bool = False) -> int:
        """Bytes of attention matrix :meth:`forward` stores; see :func:`nonlocal_attention_memory`."""
        return nonlocal_attention_memory(batch, self.in_channels, height, width, inter_channels=self.inter_channels,
                                         mode=self.mode, sub_sample=self.sub_sample, fused=self.fused,
                                         device=self.g.weight.device, training=training,
                                         bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, mode={self.mode!r}, "
                f"sub_sample={self.sub_sample}, pool_input={self.pool_input}, use_scale={self.use_scale}, "
                f"init_std={self.init_std}, fused={self.fused}")


def _inter_channels(channels: int, inter_channels: int | None) -> int:
    """The width d of θ, φ, g: ``C // 2`` by default (the paper's choice), at least 1."""
    return max(channels // 2, 1) if inter_channels is None else check_positive(inter_channels, "inter_channels")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"expected mode to be one of {MODES}, got {mode!r}")
    return mode


def _num_keys(height: int, width: int, sub_sample: bool) -> int:
    return (height // 2) * (width // 2) if sub_sample else height * width


def nonlocal_flops(batch: int, channels: int, height: int, width: int, *, inter_channels: int | None = None,
                   mode: str = "embedded_gaussian", sub_sample: bool = False, pool_input: bool = False,
                   fused: bool = False) -> dict[str, int]:
    r"""FLOPs of one :class:`NonLocal2d` forward pass, 2 per multiply-add, as ``FlopCounterMode`` counts them.

    Returns ``{"conv": ..., "matmul": ...}``: the 1×1 convolutions
    (:math:`\theta, \phi, g`: :math:`2BNCd` each; :math:`W_z`: :math:`2BNdC`) and the
    attention products.  With :math:`N = HW`, :math:`N_k` keys and :math:`d` the inter width,
    the softmax forms cost :math:`2BNN_k d_k + 2BNN_k d` — the :math:`O(N^2C)` term that dominates
    at segmentation resolutions.  The fused ``dot_product`` path reassociates to
    :math:`2BN_k d^2 + 2BNd^2`.  With ``pool_input`` (the authors' code), :math:`\phi` and
    :math:`g` run on the :math:`N_k` pooled positions only.  Element-wise work (softmax, BN,
    the residual, the logit scale) is not counted.
    """
    d = _inter_channels(channels, inter_channels)
    n, n_k = height * width, _num_keys(height, width, sub_sample)
    _check_mode(mode)
    key_positions = n_k if pool_input else n  # where φ and g are computed
    key_convs = 1 if mode == "gaussian" else 2  # g, plus φ unless raw features are compared
    query_convs = 0 if mode == "gaussian" else 1  # θ
    conv = (2 * batch * channels * d * (n * query_convs + key_positions * key_convs)
            + 2 * batch * n * d * channels)
    d_k = channels if mode == "gaussian" else d
    if mode == "dot_product" and fused:
        matmul = 2 * batch * n_k * d * d + 2 * batch * n * d * d
    elif mode == "concatenation":
        matmul = 2 * batch * (n + n_k) * d + 2 * batch * n * n_k * d
    else:
        matmul = 2 * batch * n * n_k * d_k + 2 * batch * n * n_k * d
    return {"conv": conv, "matmul": matmul}


def nonlocal_attention_memory(batch: int, channels: int, height: int, width: int, *, inter_channels: int | None = None,
                              mode: str = "embedded_gaussian", sub_sample: bool = False, fused: bool = False,
                              device: torch.device | str = "cpu", training: bool = False,
                              bytes_per_element: int = 4) -> int:
    """Bytes of the B×N×N_k attention matrix the reference path materialises — :math:`O(N^2)`.

    The fused paths store none (``scaled_dot_product_attention``'s kernels tile it, see
    :func:`attnlib.core.takes_fused_path`; the reassociated dot product never forms it): 0.
    ``concatenation`` always forms it.

    ``training=True`` describes a step that computes gradients: on a CPU, a head wider than 128
    channels then keeps its matrix rather than recompute it (:func:`attnlib.core.takes_fused_path`).
    """
    n, n_k = height * width, _num_keys(height, width, sub_sample)
    if _check_mode(mode) == "dot_product":
        return 0 if fused else batch * n * n_k * bytes_per_element
    if mode == "concatenation":
        return batch * n * n_k * bytes_per_element
    d_v = _inter_channels(channels, inter_channels)  # g's width, whatever the mode
    d_k = channels if mode == "gaussian" else d_v  # the gaussian compares the inputs themselves
    return attention_matrix_bytes(batch, n, n_k, d_k, d_v=d_v, device=device, fused=fused, training=training,
                                  bytes_per_element=bytes_per_element)
