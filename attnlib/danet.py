r"""Dual attention — Fu, Liu, Tian, Li, Bao, Fang and Lu, *Dual Attention Network for
Scene Segmentation*, CVPR 2019.

DANet puts two self-attention modules side by side on a dilated FCN's features
:math:`A \in \mathbb{R}^{C\times H\times W}` (reshaped to :math:`C \times N`, :math:`N = HW`).

**Position attention module (PAM, eqs. 1–2).**  Three 1×1 convolutions give
:math:`B, C \in \mathbb{R}^{C/r \times N}` and :math:`D \in \mathbb{R}^{C \times N}`, and

.. math::

    s_{ji} = \frac{\exp(B_i \cdot C_j)}{\sum_{i=1}^{N} \exp(B_i \cdot C_j)}, \qquad
    E_j = \alpha \sum_{i=1}^{N} s_{ji}\, D_i + A_j .

Mind the indices: :math:`s_{ji}` is "the :math:`i`-th position's impact on the :math:`j`-th",
the softmax runs over :math:`i`, and :math:`j` is the output position.  So :math:`C` embeds
the position that asks (the **query**) and :math:`B` the positions it looks at (the
**keys**); :math:`D` gives the **values**.  In attention form, output :math:`j` is row
:math:`j` of :math:`\operatorname{softmax}(Q K^\top) V` with :math:`Q = C^\top`,
:math:`K = B^\top`, :math:`V = D^\top` — no :math:`1/\sqrt{d}` scaling (the paper has none).
The official code names the convolutions by these roles: its ``query_conv`` is the paper's
C and its ``key_conv`` is B.  They are three *separate* convolutions: a widely copied
version computes all three with one.

**Channel attention module (CAM, eqs. 3–4).**  No convolutions: channels attend to channels,
each channel map :math:`A_i \in \mathbb{R}^{N}` being a query, a key and a value,

.. math::

    x_{ji} = \frac{\exp(A_i \cdot A_j)}{\sum_{i=1}^{C} \exp(A_i \cdot A_j)}, \qquad
    E_j = \beta \sum_{i=1}^{C} x_{ji}\, A_i + A_j .

With :math:`X` stored row by row, :math:`X_{[j, i]} = x_{ji}` (rows sum to 1), the sum is
:math:`X A` — not :math:`X^\top A`, which a known bug in copies computes (it weighs channel
:math:`j` by a *column* of :math:`X`, which does not sum to 1).  The paper's text says
"the transpose of X" because it indexes :math:`X` the other way round; eq. 4 fixes the meaning.

**The sign of the channel energy: we follow the official code.**  The official CAM (and
mmsegmentation's) computes ``energy_new = max(energy, -1, keepdim) - energy`` with
``energy`` :math:`= AA^\top`, then a row softmax.  The row maximum is a constant per row and
the softmax is shift-invariant per row, so

.. math::

    \operatorname{softmax}_i\big(\max_{i'} E_{ji'} - E_{ji}\big) = \operatorname{softmax}_i(-E_{ji}),

i.e. the official code uses :math:`\exp(-A_i \cdot A_j)`, the opposite sign of eq. 3 (a channel
attends most to the channels *least* similar to it).  We follow the official code, with which
DANet's reported results were obtained; the core call is ``attend(query=-A, key=A, value=A, scale=1.0)``.
``ChannelAttention(sign="paper")`` gives eq. 3 as printed, ``attend(query=A, ...)``.

Both modules end in a learnable scale initialised to 0 (:math:`\alpha`, :math:`\beta`;
Sec. 3.2–3.3), so they start as the identity.

**The head (Sec. 3.4).**  Each module sits in its own branch, conv–BN–ReLU (3×3) before and
after; the branch outputs are fused by an element-wise sum.  The official head reduces the
width to ``in_channels // 4`` and ends in a dropout + 1×1 classifier (plus one auxiliary classifier
per branch); here the width is the ``channels`` argument and the classifiers are left to the
segmentation model, which reads the two branch outputs through ``forward(x, return_branches=True)``
for those auxiliary classifiers (see :class:`attnlib.models.Segmentor`).

Where each equation lives below:

* eq. 1–2 — :meth:`PositionAttention._forward` (B, C, D: ``key_conv``, ``query_conv``,
  ``value_conv``);
* eq. 3–4 with the official sign — :meth:`ChannelAttention._forward`;
* the element-wise sum fusion — :meth:`DualAttentionHead.forward`.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_feature_map, check_positive, check_query, reduced_channels
from .core import attend, attention_matrix_bytes, project

__all__ = [
    "PositionAttention",
    "ChannelAttention",
    "DualAttentionHead",
    "channel_attention_map",
    "SIGNS",
    "position_attention_flops",
    "position_attention_attention_memory",
    "channel_attention_flops",
    "channel_attention_attention_memory",
    "dual_attention_head_flops",
    "dual_attention_head_attention_memory",
]


class PositionAttention(nn.Module):
    """DANet's position attention module (PAM), eqs. 1–2, for B×C×H×W feature maps.

    Args:
        in_channels: C.
        reduction: B and C have ``C // reduction`` channels (8 in the paper's code).
        fused: compute eq. 2 on the fast path when no weights are asked for.
    """

    def __init__(self, in_channels: int, reduction: int = 8,
                 fused: bool = True) -> None:
        super().__init__()
        self.in_channels = check_positive(in_channels, "in_channels")
        self.reduction, self.fused = reduction, fused
        d = self.key_channels = reduced_channels(in_channels, reduction)
        self.query_conv = nn.Conv2d(in_channels, d, 1)  # C: the output position j
        self.key_conv = nn.Conv2d(in_channels, d, 1)  # B: the positions i it reads
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)  # D
        # α = 0: the module starts as the identity
        self.alpha = nn.Parameter(torch.zeros(1))

    def _forward(self, x: torch.Tensor, need_weights: bool):
        b, c, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        convs = (self.query_conv, self.key_conv, self.value_conv)  # stacked when fused
        # B×N×d each: one row per position
        query, key, value = (t.flatten(2).transpose(1, 2)
                             for t in project(x, convs, fused=self.fused))
        # Row j of the weights is s_j· = softmax_i(B_i · C_j)  (eq. 1); no 1/√d scaling.
        out, weights = attend(query, key, value, scale=1.0,
                              need_weights=need_weights, fused=self.fused)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        # E_j = α Σ_i s_ji D_i + A_j  (eq. 2), in one pass: no α·out temporary
        return torch.addcmul(x, self.alpha, out), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial attention map S, B×N×N, with ``S[:, j, i]`` = s_ji (rows sum to 1)."""
        return self._forward(x, need_weights=True)[1]

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """Row ``query`` = j of S on the H×W grid (B×H×W): s_ji over all positions i; sums to 1.

        Only that row is computed, O(N d) instead of the N×N map of :meth:`attention_weights`.
        """
        b, _, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        i, j = check_query(query, h, w)
        query_j = self.query_conv(x[:, :, i:i + 1, j:j + 1]).flatten(1)  # C_j, B×d
        keys = self.key_conv(x).flatten(2)  # B_i for every i, B×d×N
        energy = torch.matmul(query_j.unsqueeze(1), keys).squeeze(1)  # B_i · C_j, B×N
        return energy.softmax(dim=-1).reshape(b, h, w)  # eq. 1, the softmax over i

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`position_attention_flops`."""
        return position_attention_flops(batch, self.in_channels, height, width, reduction=self.reduction)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4, *,
                         training: bool = False) -> int:
        """Bytes of attention matrix :meth:`forward` stores; see :func:`position_attention_attention_memory`."""
        return position_attention_attention_memory(batch, self.in_channels, height, width, reduction=self.reduction,
                                                   fused=self.fused, device=self.alpha.device, training=training,
                                                   bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, reduction={self.reduction}, fused={self.fused}"


SIGNS = ("official", "paper")


class ChannelAttention(nn.Module):
    """DANet's channel attention module (CAM), eqs. 3–4, with the official code's sign by default.

    It has no weights but β and works for any channel count.  ``in_channels`` is optional:
    given, the input's channel count is checked against it, and :meth:`flops` and
    :meth:`attention_memory` (which depend on C) can be computed; left ``None``, any C is
    accepted and those two methods raise (use :func:`channel_attention_flops` instead).

    It mixes channels, not positions, so it has no spatial ``attention_map``; its C×C map is
    :func:`channel_attention_map`.

    Args:
        in_channels: C, or ``None`` for any.
        fused: compute eq. 4 on the fast path when no weights are asked for.
        sign: ``"official"``, softmax(−E) as the official code and mmseg compute it
            (``max(E) − E``), or ``"paper"``, softmax(E) as eq. 3 is printed.
    """

    def __init__(self, in_channels: int | None = None, fused: bool = True,
                 sign: str = "official") -> None:
        super().__init__()
        if in_channels is not None:
            check_positive(in_channels, "in_channels")
        if sign not in SIGNS:
            raise ValueError(f"ChannelAttention: expected sign in {SIGNS}, "
                             f"got {sign!r}")
        self.in_channels, self.fused, self.sign = in_channels, fused, sign
        # β = 0: the module starts as the identity
        self.beta = nn.Parameter(torch.zeros(1))

    def _forward(self, x: torch.Tensor, need_weights: bool):
        b, c, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        a = x.flatten(2)  # B×C×N: channel i is the vector A_i
        # The official sign: softmax_i(rowmax − A_j·A_i) = softmax_i(−A_j·A_i), the
        # logit scale s = −1; the paper's eq. 3 has s = 1.
        sign = -1.0 if self.sign == "official" else 1.0
        out, weights = attend(a, a, a, scale=sign,
                              need_weights=need_weights, fused=self.fused)
        # E_j = β Σ_i x_ji A_i + A_j  (eq. 4): the rows of X weigh A, i.e. X A
        return torch.addcmul(x, self.beta, out.reshape(b, c, h, w)), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def _channels(self) -> int:
        if self.in_channels is None:
            raise ValueError("ChannelAttention: its cost depends on the channel count; construct it as "
                             "ChannelAttention(in_channels) or call channel_attention_flops/_attention_memory")
        return self.in_channels

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`channel_attention_flops`."""
        return channel_attention_flops(batch, self._channels(), height, width, fused=self.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention matrix :meth:`forward` stores; see :func:`channel_attention_attention_memory`."""
        return channel_attention_attention_memory(batch, self._channels(), height, width, fused=self.fused,
                                                  bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, fused={self.fused}, sign={self.sign!r}"


def channel_attention_map(block: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """CAM's channel attention map X for input ``x``: B×C×C with ``X[:, j, i]`` = x_ji.

    Row j is the distribution over the channels i that output channel j mixes (rows sum
    to 1), with the block's sign: by default the official code's, ``softmax_i(max − A_j·A_i)``
    = ``softmax_i(−A_j·A_i)``; with ``sign="paper"``, ``softmax_i(A_j·A_i)``.
    """
    if not isinstance(block, ChannelAttention):
        raise TypeError(f"channel_attention_map: expected a ChannelAttention, got {type(block).__name__}")
    return block._forward(x, need_weights=True)[1]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3×3 conv (no bias: BN follows), BatchNorm, ReLU — the official head's branch layers."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class DualAttentionHead(nn.Module):
    """DANet's head without its classifier: PAM and CAM branches fused by an element-wise sum.

    Each branch is 3×3 conv–BN–ReLU (``in_channels`` → ``channels``), the attention module,
    3×3 conv–BN–ReLU (``channels`` → ``channels``).  Returns B×``channels``×H×W.

    ``fused`` is shared by both modules: reading it says whether both take their fused path,
    setting it switches both.  ``forward(x, return_branches=True)`` also returns each branch's
    output, for mmseg's per-branch auxiliary classifiers.

    Args:
        in_channels: channels of the backbone features.
        channels: width of both branches (the official head uses ``in_channels // 4``).
        reduction: PAM's reduction of B and C.
        fused: the attention modules' path.
    """

    def __init__(self, in_channels: int, channels: int, reduction: int = 8, fused: bool = True) -> None:
        super().__init__()
        self.in_channels = check_positive(in_channels, "in_channels")
        self.out_channels = check_positive(channels, "channels")
        self.reduction = reduction
        self.pam_in = _conv_bn_relu(in_channels, channels)
        self.pam = PositionAttention(channels, reduction, fused)
        self.pam_out = _conv_bn_relu(channels, channels)
        self.cam_in = _conv_bn_relu(in_channels, channels)
        self.cam = ChannelAttention(channels, fused)
        self.cam_out = _conv_bn_relu(channels, channels)

    @property
    def fused(self) -> bool:
        """True when both attention modules take their fused path; setting it switches both."""
        return self.pam.fused and self.cam.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.pam.fused = self.cam.fused = value

    def forward(self, x: torch.Tensor, return_branches: bool = False):
        """B×C′×H×W, or ``(sum, position, channel)`` with ``return_branches``."""
        check_feature_map(x, self.in_channels, type(self).__name__)
        position = self.pam_out(self.pam(self.pam_in(x)))
        channel = self.cam_out(self.cam(self.cam_in(x)))
        out = position + channel  # element-wise sum fusion (Sec. 3.4)
        return (out, position, channel) if return_branches else out

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        """The PAM's map for ``query``, computed on the PAM's own input (the first conv's output)."""
        check_feature_map(x, self.in_channels, type(self).__name__)
        return self.pam.attention_map(self.pam_in(x), query)

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`dual_attention_head_flops`."""
        return dual_attention_head_flops(batch, self.in_channels, height, width, channels=self.out_channels,
                                         reduction=self.reduction, fused=self.cam.fused)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4, *,
                         training: bool = False) -> int:
        """Bytes of the PAM's and the CAM's attention matrices, each on its own path."""
        return (self.pam.attention_memory(batch, height, width, bytes_per_element, training=training)
                + self.cam.attention_memory(batch, height, width, bytes_per_element))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.out_channels}, reduction={self.reduction}, "
                f"fused={self.fused}")


def position_attention_flops(batch: int, channels: int, height: int, width: int, *,
                             reduction: int = 8) -> dict[str, int]:
    r"""FLOPs of one :class:`PositionAttention` forward pass, as ``FlopCounterMode`` counts them.

    With :math:`N = HW` and :math:`d = \lfloor C/r \rfloor`: ``"conv"``, the 1×1 convolutions
    B and C (:math:`2BNCd` each) and D (:math:`2BNC^2`); ``"matmul"``, the energies
    :math:`2BN^2d` and the aggregation :math:`2BN^2C` — the :math:`O(N^2C)` term.  The same on
    both paths; element-wise work (softmax, α, the residual) is not counted.
    """
    d, n = reduced_channels(channels, reduction), height * width
    return {"conv": 2 * batch * n * channels * (2 * d + channels),
            "matmul": 2 * batch * n * n * d + 2 * batch * n * n * channels}


def position_attention_attention_memory(batch: int, channels: int, height: int, width: int, *, reduction: int = 8,
                                        fused: bool = False, device: torch.device | str = "cpu",
                                        training: bool = False, bytes_per_element: int = 4) -> int:
    """Bytes of the B×N×N map S the reference path materialises — :math:`O(N^2)`.

    The fused path stores none on CUDA, but stores S on a CPU too: there the values (C wide) and
    the keys (C/r wide) differ in width, which PyTorch's CPU flash kernel does not take, so the
    core computes S plainly (see :func:`attnlib.core.takes_fused_path`).

    ``training=True`` describes a step that computes gradients: on a CPU, a head wider than 128
    channels then keeps its matrix rather than recompute it (:func:`attnlib.core.takes_fused_path`).
    """
    n = height * width
    return attention_matrix_bytes(batch, n, n, reduced_channels(channels, reduction), d_v=channels, device=device,
                                  fused=fused, training=training, bytes_per_element=bytes_per_element)


def channel_attention_flops(batch: int, channels: int, height: int, width: int, *,
                            fused: bool = False) -> dict[str, int]:
    r"""FLOPs of one :class:`ChannelAttention` forward pass, as ``FlopCounterMode`` counts them.

    No convolutions; the energies :math:`AA^\top` cost :math:`2BC^2N` and the aggregation
    :math:`XA` another :math:`2BC^2N`: linear in :math:`N`, quadratic in :math:`C`.  The fused
    path computes the symmetric energies from three of their four blocks
    (:class:`attnlib.core._Gram`), :math:`2BN(hC + (C-h)^2)` with :math:`h = \lfloor C/2\rfloor`,
    about :math:`\tfrac34 \cdot 2BC^2N`.
    """
    n, half = height * width, channels // 2
    energy = 2 * batch * n * (half * channels + (channels - half) ** 2 if fused and half else channels * channels)
    return {"conv": 0, "matmul": energy + 2 * batch * channels * channels * n}


def channel_attention_attention_memory(batch: int, channels: int, height: int, width: int, *, fused: bool = False,
                                       bytes_per_element: int = 4) -> int:
    """Bytes of the B×C×C map X — independent of H and W.

    The queries are channels with :math:`N = HW` entries each, usually far more than the C
    keys, so even the fused path takes the core's plain path and stores X (see
    :func:`attnlib.core.takes_fused_path`): it is only :math:`C^2` numbers.
    """
    return attention_matrix_bytes(batch, channels, channels, height * width, fused=fused,
                                  bytes_per_element=bytes_per_element)


def dual_attention_head_flops(batch: int, in_channels: int, height: int, width: int, *, channels: int,
                              reduction: int = 8, fused: bool = False) -> dict[str, int]:
    r"""FLOPs of one :class:`DualAttentionHead` forward pass, as ``FlopCounterMode`` counts them.

    The four 3×3 convolutions (padding 1, so H×W is kept) cost
    :math:`2 \cdot 2BN \cdot 9\,C_{\text{in}} C' + 2 \cdot 2BN \cdot 9\,C'^2` with :math:`C'` = ``channels``;
    add :func:`position_attention_flops` and :func:`channel_attention_flops` at width :math:`C'`
    (``fused`` is the CAM's path).
    """
    n = height * width
    convs = 2 * (2 * batch * n * 9 * in_channels * channels) + 2 * (2 * batch * n * 9 * channels * channels)
    pam = position_attention_flops(batch, channels, height, width, reduction=reduction)
    cam = channel_attention_flops(batch, channels, height, width, fused=fused)
    return {"conv": convs + pam["conv"] + cam["conv"], "matmul": pam["matmul"] + cam["matmul"]}


def dual_attention_head_attention_memory(batch: int, in_channels: int, height: int, width: int, *, channels: int,
                                         reduction: int = 8, fused: bool = False, device: torch.device | str = "cpu",
                                         training: bool = False, bytes_per_element: int = 4) -> int:
    """Bytes of the PAM's B×N×N and the CAM's B×C'×C' maps, each by the core's rule.

    On the fused path the PAM stores none on CUDA (but does on a CPU, see
    :func:`position_attention_attention_memory`), and the CAM still stores its small C'×C' map
    (see :func:`channel_attention_attention_memory`).

    ``in_channels`` is accepted for a signature uniform with the other blocks; the maps do not depend on it.
    """
    return (position_attention_attention_memory(batch, channels, height, width, reduction=reduction, fused=fused,
                                                device=device, training=training, bytes_per_element=bytes_per_element)
            + channel_attention_attention_memory(batch, channels, height, width, fused=fused,
                                                 bytes_per_element=bytes_per_element))
