r"""Global context blocks — Cao, Xu, Lin, Wei and Hu, *GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond*, ICCV Workshops 2019 (arXiv 1904.11492).

The paper's observation: in a trained non-local block the attention maps of different
query positions are almost the same.  So it computes **one** map for the whole image.
The *simplified non-local block* keeps the non-local residual but drops the query:

.. math::

    z_i = x_i + W_v \sum_{j=1}^{N} \alpha_j\, x_j, \qquad
    \alpha_j = \frac{e^{W_k x_j}}{\sum_{m=1}^{N} e^{W_k x_m}},

with :math:`W_k` a 1×1 convolution to a single channel and :math:`W_v` a 1×1 convolution
:math:`C \to C`, moved outside the sum so that it acts once on a C-vector, not at every
position.  The *global context (GC) block* replaces :math:`W_v` by a bottleneck with a
LayerNorm and fuses by addition:

.. math::

    z_i = x_i + W_{v2}\,\operatorname{ReLU}\!\big(\operatorname{LN}(W_{v1} c)\big),
    \qquad c = \sum_{j=1}^{N} \alpha_j\, x_j ,

with :math:`W_{v1}: C \to C/r` and :math:`W_{v2}: C/r \to C`, where :math:`r` is the paper's
*reduction* factor (:math:`r = 16` in the paper; "r16" in the official configs).  Like mmcv
and mmseg, the argument ``ratio`` is its inverse, :math:`1/r`: the default ``ratio=1/4``
(mmseg's ``GCHead``) is :math:`r = 4`, and the paper's setting is ``ratio=1/16``.  Both blocks
follow the paper's three steps: *context modelling* (:math:`c`), *transform* and *fusion*.

**Attention pooling is softmax attention with one learned query.**  Since
:math:`W_k x_j = w_k^\top x_j + b_k`, the weights :math:`\alpha` are
:math:`\operatorname{softmax}(q K^\top)` for the single query :math:`q = w_k^\top`, keys
:math:`K = X` and values :math:`V = X` (the bias :math:`b_k` shifts every logit equally and
the softmax ignores it, so it is left out; :func:`from_mmcv_state_dict` drops mmcv's ``conv_mask.bias``
for that reason).  Where a non-local block has one query per
position, GC has one query per image: the :math:`N \times N` matrix becomes :math:`1 \times N`,
and the same map serves every position.  That is why :meth:`attention_map` is the same for
every query position.

Where each piece lives below:

* context modelling, :math:`c = \operatorname{softmax}(w_k^\top X^\top) X` — the call to
  :func:`attnlib.core.attend` in :meth:`_GlobalContext._context`, written once for both
  blocks; the paper's ablation alternative, global average pooling
  (:math:`\alpha_j = 1/N`, the SE block's squeeze), is ``pooling="avg"``;
* the GC transform and fusions — :func:`_bottleneck` and :meth:`ContextBlock.forward`;
* the simplified non-local block's :math:`W_v` — :meth:`SimplifiedNonLocal2d.forward`.

Follows the official implementation (mmcv's ``ContextBlock``, from the authors' code)
where the paper is silent: the bottleneck width is ``int(C * ratio)``; :math:`W_k` has
Kaiming-normal (fan-in) initialisation; the last convolution of every transform is
zero-initialised; with both fusions the multiplication comes first, then the addition.

**Identity at initialisation.**  With ``"add"`` (the GC block), the zero-initialised last
convolution makes the block start as the identity.  With ``"mul"`` the official gate
:math:`\sigma(t)` starts at :math:`\sigma(0) = 1/2`, so a block with that fusion starts by
*halving* its input; we keep the paper's and the official code's gate rather than change
the model to make the initialisation neutral.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._checks import check_feature_map, check_positive, check_query
from .core import attend

__all__ = [
    "ContextBlock",
    "SimplifiedNonLocal2d",
    "context_block_flops",
    "from_mmcv_state_dict",
    "context_block_attention_memory",
    "simplified_nonlocal_flops",
    "simplified_nonlocal_attention_memory",
]

POOLINGS = ("att", "avg")
FUSIONS = ("add", "mul")


def _check_pooling(pooling: object) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"expected pooling to be one of {POOLINGS}, got {pooling!r}")
    return pooling


def _check_fusions(fusions: object) -> tuple[str, ...]:
    """A non-empty tuple of distinct fusions from ``FUSIONS`` (a bare string is refused)."""
    if isinstance(fusions, str) or not isinstance(fusions, Sequence):
        raise ValueError(f"expected fusions to be a tuple such as ('add',) or ('add', 'mul'), got {fusions!r}")
    if not fusions or any(f not in FUSIONS for f in fusions) or len(set(fusions)) != len(fusions):
        raise ValueError(f"expected fusions to be a non-empty tuple of distinct names from {FUSIONS}, got {fusions!r}")
    return tuple(fusions)


def _bottleneck_planes(channels: int, ratio: object) -> int:
    """Width of the transform's bottleneck, ``int(C * ratio)`` as in the official code; at least 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"expected ratio to be a number with 0 < ratio <= 1, got {ratio!r}")
    planes = int(channels * ratio)
    if planes < 1:
        raise ValueError(f"expected in_channels * ratio >= 1 (a bottleneck of at least one channel), "
                         f"got {channels} * {ratio} = {channels * ratio}")
    return planes


def _bottleneck(channels: int, planes: int) -> nn.Sequential:
    """The GC transform: 1×1 conv C→C/r, LayerNorm [C/r, 1, 1], ReLU, 1×1 conv C/r→C.

    The last convolution is zeroed, so that the transform starts at 0.
    """
    transform = nn.Sequential(
        nn.Conv2d(channels, planes, 1),
        nn.LayerNorm([planes, 1, 1]),  # eases optimising the bottleneck (paper, GC)
        nn.ReLU(),
        nn.Conv2d(planes, channels, 1),
    )
    nn.init.zeros_(transform[-1].weight)
    nn.init.zeros_(transform[-1].bias)
    return transform


class _GlobalContext(nn.Module):
    """Context modelling shared by :class:`ContextBlock` and :class:`SimplifiedNonLocal2d`.

    Holds :math:`w_k` (for attention pooling), computes the context vector :math:`c` and
    the block's one global attention map.
    """

    def __init__(self, in_channels: int, pooling: str, fused: bool) -> None:
        super().__init__()
        self.in_channels = check_positive(in_channels, "in_channels")
        self.pooling, self.fused = _check_pooling(pooling), fused
        if pooling == "att":
            self.w_k = nn.Parameter(torch.empty(1, in_channels))  # W_k as a query vector: C → 1 logit
            nn.init.kaiming_normal_(self.w_k, mode="fan_in", nonlinearity="relu")  # as mmcv's conv_mask

    def _context(self, x: torch.Tensor,
                 need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """c = Σ_j α_j x_j as B×C×1×1, and α as B×1×N (attention pooling, if asked)."""
        b, c, _, _ = x.shape
        if self.pooling == "avg":
            return x.mean(dim=(2, 3), keepdim=True), None  # α_j = 1/N: SE's squeeze
        tokens = x.flatten(2).mT  # B×N×C: each position is a key and a value
        query = self.w_k.expand(b, 1, c)  # one query per image, shared by all positions
        context, weights = attend(query, tokens, tokens, scale=1.0,
                                  need_weights=need_weights, fused=self.fused)
        return context.transpose(1, 2).reshape(b, c, 1, 1), weights

    def attention_map(self, x: torch.Tensor, query: tuple[int, int]) -> torch.Tensor:
        r"""The block's one attention map :math:`\alpha` on the H×W grid (B×H×W), sums to 1.

        It does not depend on ``query`` — that is the paper's point — but the query is still
        checked, so a bad one fails here as it would for any block.  Average pooling gives
        the uniform map :math:`1/N`.
        """
        b, _, h, w = check_feature_map(x, self.in_channels, type(self).__name__)
        check_query(query, h, w)
        if self.pooling == "avg":
            return x.new_full((b, h, w), 1.0 / (h * w))
        return self._context(x, need_weights=True)[1].reshape(b, h, w)


class ContextBlock(_GlobalContext):
    """The global context (GC) block of Cao et al. (2019) for B×C×H×W feature maps.

    Args:
        in_channels: C.
        ratio: 1/r for the paper's reduction factor r, 0 < ratio ≤ 1: the transform's bottleneck
            has ``int(C * ratio)`` channels (at least 1), C/r in the paper's notation.  The
            default 1/4 is mmseg's ``GCHead``; the paper uses r = 16, ``ratio=1/16``.
        pooling: ``"att"`` (attention pooling, the GC block) or ``"avg"`` (global average pooling).
        fusions: a non-empty tuple of distinct fusions, ``"add"`` (:math:`x + t`, the GC
            block) and/or ``"mul"`` (:math:`x \\cdot \\sigma(t)`, the SE-style gate; see the module docstring);
            each has its own transform.  With both, the product comes first, then the sum.
        fused: compute the attention pooling on the fast path when no weights are asked for.
    """

    def __init__(self, in_channels: int, ratio: float = 1 / 4, pooling: str = "att",
                 fusions: Sequence[str] = ("add",), fused: bool = True) -> None:
        super().__init__(in_channels, pooling, fused)
        self.ratio, self.fusions = ratio, _check_fusions(fusions)
        self.planes = _bottleneck_planes(in_channels, ratio)
        self.mul_transform = _bottleneck(in_channels, self.planes) if "mul" in self.fusions else None
        self.add_transform = _bottleneck(in_channels, self.planes) if "add" in self.fusions else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.in_channels, type(self).__name__)
        context, _ = self._context(x, need_weights=False)  # B×C×1×1
        out = x
        if self.mul_transform is not None:
            # a channel gate, the same at every position
            out = out * torch.sigmoid(self.mul_transform(context))
        if self.add_transform is not None:
            out = out + self.add_transform(context)  # one vector added everywhere
        return out

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`context_block_flops`."""
        return context_block_flops(batch, self.in_channels, height, width, ratio=self.ratio,
                                   pooling=self.pooling, fusions=self.fusions)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention weights :meth:`forward` stores; see :func:`context_block_attention_memory`."""
        return context_block_attention_memory(batch, self.in_channels, height, width, pooling=self.pooling,
                                              fused=self.fused, bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, ratio={self.ratio}, planes={self.planes}, "
                f"pooling={self.pooling!r}, fusions={self.fusions}, fused={self.fused}")


class SimplifiedNonLocal2d(_GlobalContext):
    r"""The paper's simplified non-local block: :math:`z_i = x_i + W_v \sum_j \alpha_j x_j`.

    :math:`W_v` is a 1×1 convolution :math:`C \to C`, applied once to the context vector.
    It is zero-initialised so that the block starts as the identity: our choice, following
    the GC block's convention for its last convolution (the non-local paper zeroes a
    BatchNorm scale instead).

    Args:
        in_channels: C.
        fused: compute the attention pooling on the fast path when no weights are asked for.
    """

    def __init__(self, in_channels: int, fused: bool = True) -> None:
        super().__init__(in_channels, "att", fused)
        self.w_v = nn.Conv2d(in_channels, in_channels, 1)
        nn.init.zeros_(self.w_v.weight)
        nn.init.zeros_(self.w_v.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.in_channels, type(self).__name__)
        context, _ = self._context(x, need_weights=False)
        return x + self.w_v(context)  # W_v c, the same vector added at every position

    def flops(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Analytic FLOPs of :meth:`forward` at this size; see :func:`simplified_nonlocal_flops`."""
        return simplified_nonlocal_flops(batch, self.in_channels, height, width)

    def attention_memory(self, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
        """Bytes of attention weights :meth:`forward` stores; see :func:`simplified_nonlocal_attention_memory`."""
        return simplified_nonlocal_attention_memory(batch, self.in_channels, height, width, fused=self.fused,
                                                    bytes_per_element=bytes_per_element)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, fused={self.fused}"


def from_mmcv_state_dict(
        state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An mmcv ``ContextBlock``'s weights (mmseg's ``GCHead.gc_block``) for attnlib's.

    mmcv's ``conv_mask`` is a 1×1 convolution C → 1 *with* a bias; its weight becomes
    :math:`w_k` and its bias is dropped, because a constant added to every logit leaves
    the softmax unchanged.  ``channel_add_conv`` and ``channel_mul_conv`` become
    ``add_transform`` and ``mul_transform`` (same layers, same order).  Build the
    :class:`ContextBlock` with the matching ``pooling``, ``fusions`` and ``ratio``;
    ``block.load_state_dict(...)`` then checks the shapes.
    """
    renames = {"channel_add_conv.": "add_transform.",
               "channel_mul_conv.": "mul_transform."}
    converted = {}
    for key, value in state_dict.items():
        if key == "conv_mask.weight":
            if value.dim() != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
                raise ValueError(f"from_mmcv_state_dict: expected conv_mask.weight of "
                                 f"shape (1, C, 1, 1), got {tuple(value.shape)}")
            converted["w_k"] = value.reshape(1, -1)
        elif key == "conv_mask.bias":
            continue  # shifts every logit equally: the softmax ignores it
        else:
            prefix = next((p for p in renames if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"from_mmcv_state_dict: expected keys of mmcv's "
                                 f"ContextBlock (conv_mask.*, channel_add_conv.*, "
                                 f"channel_mul_conv.*), got {key!r}")
            converted[renames[prefix] + key[len(prefix):]] = value
    return converted


def _attention_pooling_flops(batch: int, channels: int, height: int, width: int) -> int:
    """One query against N keys (2BNC) and the weighted sum of N values (2BNC)."""
    return 2 * batch * height * width * channels * 2


def context_block_flops(batch: int, channels: int, height: int, width: int, *, ratio: float = 1 / 4,
                        pooling: str = "att", fusions: Sequence[str] = ("add",)) -> dict[str, int]:
    r"""FLOPs of one :class:`ContextBlock` forward pass, 2 per multiply-add, as ``FlopCounterMode`` counts them.

    With :math:`N = HW` and the bottleneck width :math:`P = \lfloor C \cdot \text{ratio} \rfloor`
    (:math:`C/r` for the paper's reduction factor :math:`r`):

    * ``"matmul"``: attention pooling costs :math:`2BNC` for the logits :math:`w_k^\top x_j`
      and :math:`2BNC` for :math:`\sum_j \alpha_j x_j` — *linear* in N, against the non-local
      block's :math:`O(N^2 C)`; average pooling is an (uncounted) mean: 0.
    * ``"conv"``: each fusion's transform acts on one C-vector per image,
      :math:`2BCP + 2BPC`, independent of H and W.

    Element-wise work (softmax, LayerNorm, ReLU, the sigmoid gate, the fusion) is not counted.
    The cost is the same on both paths.
    """
    planes = _bottleneck_planes(channels, ratio)
    conv = len(_check_fusions(fusions)) * (2 * batch * channels * planes + 2 * batch * planes * channels)
    matmul = _attention_pooling_flops(batch, channels, height, width) if _check_pooling(pooling) == "att" else 0
    return {"conv": conv, "matmul": matmul}


def context_block_attention_memory(batch: int, channels: int, height: int, width: int, *, pooling: str = "att",
                                   fused: bool = False, bytes_per_element: int = 4) -> int:
    """Bytes of the B×1×N attention weights — :math:`O(N)`, not :math:`O(N^2)`.

    Both paths store them: with a single query there is no larger matrix to leave out, and
    the fast path (:class:`attnlib.core._Pool`) keeps the same weights for its backward pass,
    so ``fused`` changes nothing.  Average pooling has no attention weights (0).
    ``channels`` is accepted for a signature uniform with the other blocks; the weights do
    not depend on it.
    """
    if _check_pooling(pooling) == "avg":
        return 0
    return batch * height * width * bytes_per_element


def simplified_nonlocal_flops(batch: int, channels: int, height: int, width: int) -> dict[str, int]:
    r"""FLOPs of one :class:`SimplifiedNonLocal2d` forward pass, as ``FlopCounterMode`` counts them.

    ``"matmul"``: attention pooling, :math:`2BNC + 2BNC`.  ``"conv"``: :math:`W_v` on one
    C-vector per image, :math:`2BC^2` (it would be :math:`2BNC^2` inside the sum, where the
    non-local block has it).  The cost is the same on both paths.
    """
    return {"conv": 2 * batch * channels * channels, "matmul": _attention_pooling_flops(batch, channels, height, width)}


def simplified_nonlocal_attention_memory(batch: int, channels: int, height: int, width: int, *, fused: bool = False,
                                         bytes_per_element: int = 4) -> int:
    """Bytes of the B×1×N attention weights, on either path (see :func:`context_block_attention_memory`)."""
    return context_block_attention_memory(batch, channels, height, width, pooling="att", fused=fused,
                                          bytes_per_element=bytes_per_element)
