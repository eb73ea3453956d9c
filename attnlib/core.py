r"""The one attention core that every block of the book is built on.

Every block in this package, whatever its paper calls it, ends in the same three
steps (Vaswani et al., 2017, eq. 1):

.. math::

    S = s\,Q K^\top \;(+\,\text{mask}), \qquad
    A = \operatorname{softmax}_{\text{rows}}(S), \qquad
    Y = A V ,

with queries :math:`Q \in \mathbb{R}^{N_q\times d_k}`, keys
:math:`K \in \mathbb{R}^{N_k\times d_k}`, values :math:`V \in \mathbb{R}^{N_k\times d_v}`
and a scale :math:`s`.  The blocks differ only in *which* positions become queries,
keys and values (all pixels, pooled bins, a row and a column, an interlaced group),
not in this core, so it is written once, here.

Two paths compute it:

* the **reference path** writes the three steps out literally, materialises the
  :math:`N_q\times N_k` matrix :math:`A` and can return it (the chapters plot it);
* the **fused path** calls :func:`torch.nn.functional.scaled_dot_product_attention`,
  which on recent PyTorch never stores :math:`A` (flash / memory-efficient kernels); in
  training their backward pass recomputes :math:`QK^\top` instead, one more
  :math:`N_q\times N_k\times d_k` product per step.

``attend`` takes the fused path unless the weights are asked for or ``fused=False`` — or the
attention matrix is no larger than the queries (a single query, or no more keys than query
channels): then there is nothing to save, and two plain products are as fast — or no
memory-saving kernel exists for these operands on this device (see :func:`takes_fused_path`):
then SDPA would store the matrix anyway, more slowly than the plain path — or, on a CPU, the
matrix is no larger than the queries and outputs together (:math:`N_k \le d_k + d_v`): there
the kernel's backward pass, which recomputes :math:`QK^\top`, costs more time than the little
memory it saves is worth — or, on a CPU in training, the head is wider than 128 channels: there
the recomputed product costs more than keeping :math:`A`.
The test-suite holds the two equal (float32, ``atol=1e-5``).

Four details of the plain path make it fast without changing what it computes:

* the scale multiplies the smaller of the :math:`N_q\times d_k` queries and the
  :math:`N_q\times N_k` scores (:math:`(sQ)K^\top = s\,QK^\top`): the queries when
  :math:`N_k \ge d_k` (the usual case), the scores when there are fewer keys than query
  channels (DANet's channel attention, whose official sign is the scale :math:`s = -1`);
  it is skipped when :math:`s = 1`;
* when the values are a feature map seen as tokens (a transposed view) and the matrix is no
  larger than the values (:math:`N_q \le d_v`: GCNet, ISA), :math:`AV` is computed as
  :math:`(V^\top A^\top)^\top`, so that neither it nor its gradient transposes the map;
* where the matrix is no larger than the queries (:math:`N_k \le d_k`: DANet's channel
  attention, ANN, ISA at 512 channels), weights below ``torch.finfo(dtype).tiny`` are set
  to 0.  Such weights are *subnormal* floats: CPUs that handle them in microcode multiply them
  many times more slowly than normal numbers, and DANet's channel attention, whose official
  sign (softmax of :math:`-E`) spreads its logits over hundreds, produces them.  A weight below
  :math:`10^{-38}` changes no output by more than float rounding.  On those small matrices the
  extra pass is cheap; on the large :math:`N\times N` ones (position attention, the reference
  paths) it would cost more than half as much as the softmax, so they do without, like every other
  implementation.  The flush is local to ``attend``: the process-wide switch
  (``torch.set_flush_denormal``) stays as the user set it;
* where the scores need no gradient (``torch.no_grad``, or queries and keys that need none),
  they are a temporary that nothing else holds: the scale, the mask, the softmax and the flush
  overwrite them, so inference allocates one :math:`N_q\times N_k` matrix instead of one per
  step.  On the 2-core CPU where it was measured, DANet's position attention (1×512×64×64 and
  2×128×45×60) ran its forward pass 1.13–1.3× faster for it with the default allocator, which
  hands every fresh large matrix back to the system and pays page faults to touch it again,
  and 1.01× faster with freed memory kept.

Three more, on the fast setting only (``fused=True``); ``fused=False`` keeps the literal
steps, and the tests hold the two equal:

* in training, where the matrix is larger than the queries and outputs together
  (:math:`N_k > d_k + d_v`: position attention, non-local blocks off the kernel),
  :class:`_Attention` keeps one :math:`N_q\times N_k` matrix per step instead of allocating
  four: the softmax overwrites the scores, and its backward pass overwrites the gradient of
  the weights.  On the 2-core CPU where it was measured, a training step of DANet's position
  attention (1×512×64×64) took 464.5 ms against mmseg's 511.9 ms with the default allocator,
  and 411.4 against 423.9 ms with freed memory kept.  On ANN's small N×110 matrices it was
  slower than autograd step by step (APNB, 2×128×45×60: 32.9 against 29.8 ms), so they keep it;
* when the keys *are* the queries (DANet's channel attention, :math:`E = AA^\top`), the
  scores :math:`S = s\,QQ^\top` form a symmetric matrix, and :class:`_Gram` computes them
  through that symmetry: three quarters of the products forward, and one product instead of
  two backward;
* when one query pools tokens that are both its keys and its values (GCNet's attention
  pooling, :math:`y = \operatorname{softmax}(s\,qX^\top)X`), :class:`_Pool` computes it:
  its two matrix–vector products, which a CPU BLAS runs on one core, are split over the
  positions so that every thread takes a share, and its backward pass writes the rank-two
  gradient of :math:`X` in one pass instead of two outer products and a sum.

Before the core, most blocks project one map into queries, keys and values with 1×1
convolutions; on the fast setting :func:`project` runs them as one convolution.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attend", "attention_matrix_bytes", "fold_batch_norm", "project", "set_fused", "takes_fused_path"]


def _check_operands(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Refuse operands that would only work by broadcasting: the blocks never rely on it."""
    q, k, v = query.shape, key.shape, value.shape
    if not (len(q) == len(k) == len(v) >= 2):
        raise ValueError(
            "attend: expected query, key and value with the same number of dimensions (>= 2), got shapes "
            f"{tuple(q)}, {tuple(k)}, {tuple(v)}"
        )
    if q[:-2] != k[:-2] or k[:-2] != v[:-2]:
        raise ValueError(
            f"attend: expected equal leading (batch) dimensions, got {tuple(q[:-2])}, {tuple(k[:-2])}, {tuple(v[:-2])}"
        )
    if q[-1] != k[-1]:
        raise ValueError(f"attend: expected query and key of equal width d_k, got {q[-1]} and {k[-1]}")
    if k[-2] != v[-2]:
        raise ValueError(f"attend: expected as many keys as values, got {k[-2]} keys and {v[-2]} values")
    if mask is not None:
        n_q, n_k = q[-2], k[-2]
        if mask.dtype != torch.bool:
            raise ValueError(f"attend: expected a boolean mask (True = may attend), got dtype {mask.dtype}")
        shapes = ((n_q, n_k), (1, n_k), q[:-1] + (n_k,), q[:-2] + (1, n_k))
        if mask.shape not in shapes:
            raise ValueError(
                f"attend: expected a mask of shape {' or '.join(str(tuple(s)) for s in shapes)}, got {tuple(mask.shape)}"
            )
        if not mask.any(dim=-1).all():  # such a row is NaN on one path and 0 on the other
            raise ValueError("attend: expected every query to keep at least one key, got a mask row that is all False")


class _Gram(torch.autograd.Function):
    r"""The symmetric scores :math:`G = XX^\top` of one set of tokens, through their symmetry.

    Forward: the top block row :math:`[X_1X_1^\top, X_1X_2^\top]` and :math:`X_2X_2^\top`,
    the lower-left block being the transpose of :math:`X_1X_2^\top`: three quarters of the
    products.  Backward: :math:`\bar X = (\bar G + \bar G^\top)X`,
    one product where autograd, seeing :math:`X` and :math:`X^\top` as two operands, takes two.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        half = x.shape[-2] // 2
        if half == 0:
            return torch.matmul(x, x.mT)
        top = torch.matmul(x[..., :half, :], x.mT)  # rows 1..h: X_1 X^T
        corner = torch.matmul(x[..., half:, :], x[..., half:, :].mT)  # X_2 X_2^T
        return torch.cat([top, torch.cat([top[..., half:].mT, corner], dim=-1)], dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # under autocast the grad comes in the product's dtype; autograd casts the result back to x's
        return torch.matmul(grad + grad.mT, x.to(grad.dtype))


def _flush_subnormals(weights: torch.Tensor, n_k: int, d_k: int, in_place: bool = False) -> torch.Tensor:
    """Weights below ``tiny`` set to 0, where the matrix is no larger than the queries (N_k ≤ d_k).

    Subnormal weights make the product with the values crawl on a CPU; as 0 they change
    nothing visible.  On those small matrices the extra pass is cheap (see the module's
    docstring).  One pass: w if w > tiny else 0.
    """
    if n_k > d_k:
        return weights
    return F.threshold(weights, torch.finfo(weights.dtype).tiny, 0.0, inplace=in_place)


def _softmax_rows(scores: torch.Tensor, in_place: bool) -> torch.Tensor:
    """Row-wise softmax of ``scores``, written over them when ``in_place`` and they are contiguous.

    Along each row the kernel reads every score before it writes that weight (the maximum,
    then the exponentials, then their scaling), so its output may be its input.  Only for
    a contiguous matrix: ``_softmax.out`` writes a strided output as if it were contiguous
    (torch 2.14).  The test-suite holds the two ways bitwise equal.
    """
    if in_place and scores.is_contiguous():
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return scores.softmax(dim=-1)


_SHARED_ELEMENTS = 1 << 20  # 4 MiB of float32


def _position_shares(tokens: torch.Tensor) -> int:
    """How many shares of the N positions :class:`_Pool` splits its products into.

    A CPU BLAS runs a matrix–vector product on one thread.  Cut into ``k`` equal shares of
    the positions, stacked as a batch, the product runs on up to ``k`` threads: ``k`` is the
    largest divisor of N no larger than the thread count.  Only for one image of at least
    ``_SHARED_ELEMENTS`` numbers: below that (measured on a 2-core CPU, 1×512×32×32 against
    1×512×64×64) starting a thread costs more than its share saves, a batch of images already
    spreads over the threads, and the shares of several images are not one strided view.  On
    other devices the product is parallel already: 1.
    """
    batch, n, d = tokens.shape
    if tokens.device.type != "cpu" or batch != 1 or n * d < _SHARED_ELEMENTS:
        return 1
    threads = torch.get_num_threads()
    return max(k for k in range(1, min(threads, n) + 1) if n % k == 0)


def _row_times_tokens_t(row: torch.Tensor, tokens: torch.Tensor, shares: int) -> torch.Tensor:
    """``row @ tokens.mT`` (1×d times d×N, one entry per position), the positions in ``shares``."""
    if shares == 1:
        return torch.bmm(row, tokens.mT)
    n = tokens.shape[-2]
    parts = torch.bmm(row.expand(shares, -1, -1), tokens[0].unflatten(0, (shares, n // shares)).mT)
    return parts.reshape(1, 1, n)  # share-major is position order


def _row_times_tokens(row: torch.Tensor, tokens: torch.Tensor, shares: int) -> torch.Tensor:
    """``row @ tokens`` (1×N times N×d, a sum over positions), the sum taken in ``shares``."""
    if shares == 1:
        return torch.bmm(row, tokens)
    n = tokens.shape[-2]
    parts = torch.bmm(row.reshape(shares, 1, n // shares), tokens[0].unflatten(0, (shares, n // shares)))
    return parts.sum(0, keepdim=True)


def _pool_weights(query: torch.Tensor, tokens: torch.Tensor, scale: float, shares: int) -> torch.Tensor:
    """The pooling weights α = softmax(s q Xᵀ), B×1×N, flushed as :func:`attend`'s plain path flushes them."""
    logits = _row_times_tokens_t(query, tokens, shares)
    if scale != 1.0:
        logits = logits * scale
    return _flush_subnormals(logits.softmax(dim=-1), tokens.shape[-2], tokens.shape[-1])


class _Pool(torch.autograd.Function):
    r"""Attention pooling :math:`y = \alpha X`, :math:`\alpha = \operatorname{softmax}(s\,qX^\top)`: one query, tokens that are keys and values.

    ``query`` is B×1×d, ``tokens`` B×N×d.  Forward: the logits and the weighted sum, each split
    over the positions (:func:`_position_shares`).  Backward, with :math:`\bar\alpha = \bar y X^\top`
    and :math:`\bar\ell = s\,\alpha \odot (\bar\alpha - \langle \alpha, \bar\alpha\rangle)`:
    :math:`\bar q = \bar\ell X` and the rank-two :math:`\bar X = \alpha^\top \bar y + \bar\ell^\top q`,
    written in one pass in the tokens' own layout, where autograd writes two outer products
    and adds them.  For a second derivative (``create_graph=True``) the backward pass
    recomputes :math:`\alpha` from :math:`q` and :math:`X`, so that its own graph is complete.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, tokens: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.shares = scale, _position_shares(tokens)
        weights = _pool_weights(query, tokens, scale, ctx.shares)
        ctx.save_for_backward(query, tokens, weights)
        return _row_times_tokens(weights.to(tokens.dtype), tokens, ctx.shares)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        query, tokens, weights = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: α must depend on q and X in the new graph
            weights = _pool_weights(query, tokens, ctx.scale, ctx.shares)
        # under autocast the grad comes in the product's dtype: work in the tokens'
        grad, weights = grad.to(tokens.dtype), weights.to(tokens.dtype)
        grad_weights = _row_times_tokens_t(grad, tokens, ctx.shares)  # ᾱ = ȳ Xᵀ
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
        if ctx.scale != 1.0:
            grad_logits = grad_logits * ctx.scale
        grad_query = _row_times_tokens(grad_logits, tokens, ctx.shares) if ctx.needs_input_grad[0] else None
        grad_tokens = None
        if ctx.needs_input_grad[1]:
            if tokens.stride(-2) == 1:  # a feature map seen as tokens: write B×d×N, return its transpose
                grad_tokens = (grad.mT * weights).addcmul_(query.mT, grad_logits).mT
            else:
                grad_tokens = (weights.mT * grad).addcmul_(grad_logits.mT, query)
        return grad_query, grad_tokens, None


class _Attention(torch.autograd.Function):
    r"""Training that keeps one N_q×N_k matrix: :math:`Y = AV`, :math:`A = \operatorname{softmax}(QK^\top + M)`.

    Step by step, autograd allocates :math:`S` and :math:`A` forward and :math:`\bar A` and
    :math:`\bar S` backward: four N_q×N_k matrices per step.  Here the mask and the softmax
    overwrite :math:`S`, and the softmax's backward overwrites :math:`\bar A`:

    .. math::

        \bar V = A^\top \bar Y, \quad \bar A = \bar Y V^\top, \quad
        \bar S = A \odot (\bar A - \operatorname{rowsum}(A \odot \bar A)), \quad
        \bar Q = \bar S K, \quad \bar K = \bar S^\top Q,

    the same six products as autograd's, two matrices instead of four.  Queries arrive scaled
    (:func:`attend` scales them).  For a second derivative (``create_graph=True``) the backward
    pass recomputes :math:`A` from :math:`Q` and :math:`K`, out of place, so that its own graph
    is complete.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        weights = _weights(query, key, mask, in_place=True)
        ctx.save_for_backward(query, key, value, weights, mask)
        return torch.matmul(weights, value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, weights, mask = ctx.saved_tensors
        need_query, need_key, need_value, _ = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled()
        if create_graph:  # A must depend on Q and K in the new graph
            weights = _weights(query, key, mask, in_place=False)
        grad_value = torch.matmul(weights.mT, grad) if need_value else None
        if not (need_query or need_key):
            return None, None, grad_value, None
        grad_weights = torch.matmul(grad, value.mT)
        if create_graph or not grad_weights.is_contiguous():
            grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        else:  # row by row, the kernel reads all of Ā before it writes S̄ over it
            grad_scores = torch.ops.aten._softmax_backward_data.out(grad_weights, weights, -1, weights.dtype,
                                                                    grad_input=grad_weights)
        grad_query = torch.matmul(grad_scores, key) if need_query else None
        grad_key = torch.matmul(grad_scores.mT, query) if need_key else None
        return grad_query, grad_key, grad_value, None


def _one_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Operands of one dtype, outside autocast: what :class:`_Attention` computes in."""
    return (not torch.is_autocast_enabled(query.device.type)
            and query.dtype == key.dtype == value.dtype)


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """S + M: -inf where ``mask`` is False, written over the scores when ``in_place``."""
    if mask is None:
        return scores
    return scores.masked_fill_(~mask, float("-inf")) if in_place else scores.masked_fill(~mask, float("-inf"))


def _weights(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """A = softmax(QKᵀ + M), the mask and softmax written over the scores when ``in_place``."""
    return _softmax_rows(_masked(torch.matmul(query, key.mT), mask, in_place), in_place)


_CPU_RECOMPUTE_WIDTH = 128  # d_k above which, on a CPU, training keeps A rather than recompute QK^T


def takes_fused_path(n_q: int, n_k: int, d_k: int, *, d_v: int | None = None,
                     device: torch.device | str = "cpu", fused: bool = True, need_weights: bool = False,
                     training: bool = False) -> bool:
    r"""Whether :func:`attend` calls ``scaled_dot_product_attention`` for these sizes on ``device``.

    The fused kernels pay by never storing the :math:`N_q\times N_k` matrix.  So the fused path
    is taken only when that saves something and a kernel that saves it exists:

    * with a single query (GCNet's global context), or no more keys than query channels (DANet's
      channel attention, ANN's 110 pooled keys, ISA's groups of 64 at 64 channels), that matrix
      is no larger than the queries themselves: nothing is saved, and on a CPU two plain products
      are as fast or faster;
    * on a CPU (torch 2.14) the memory-saving (flash) kernel needs value width ``d_v`` equal to
      ``d_k``; otherwise (DANet's position attention, 64 vs 512) SDPA falls back to its math
      kernel, which stores the matrix and is slower than the plain path.  On CUDA the
      memory-efficient kernel takes any ``d_v``, so there the fused path stays;
    * on a CPU, where the products dominate, the kernel's backward pass pays one more
      :math:`N_q\times N_k\times d_k` product, the recomputed :math:`QK^\top` (seven products per
      training step instead of six).  It is worth that only where the matrix it saves is larger
      than the queries and outputs the block holds anyway, :math:`N_k > d_k + d_v`; ANN's 110
      pooled keys at 64 + 64 channels are not (measured on a 2-core CPU, APNB at 2×128×45×60: 27.4 ms
      per training step on the plain path, 29.1 ms through the kernel);
    * on a CPU, in training (``training=True``: operands that need gradients), the recomputed
      product costs :math:`d_k` multiply-adds per weight, while keeping :math:`A` costs a few
      passes over memory per weight (:class:`_Attention` keeps one matrix).  Above
      :math:`d_k = 128` the product costs more, and the plain path trains instead (measured on a
      2-core CPU, one forward and backward, kernel against kept matrix: 1×4096 tokens at
      :math:`d_k = 256`, 385.7 against 360.0 ms, 369.9 against 312.4 ms with freed memory kept;
      at 128, 201.9 against 217.2 ms, 201.1 against 177.8 ms; 2×2700 tokens at 64, 94.8
      against 146.2 ms, 94.5 against 111.0 ms).  Inference recomputes nothing: the kernel stays.

    On CUDA, where the kernel is faster in both directions, it is taken whenever it saves
    anything.  ``d_v=None`` means ``d_v == d_k``.  Whatever ``fused`` says, the other cases take
    the plain path.
    """
    if not fused or need_weights or n_q == 1 or n_k <= d_k:
        return False
    if torch.device(device).type == "cuda":
        return True  # a memory-efficient kernel for any d_v
    d_v = d_k if d_v is None else d_v
    if training and d_k > _CPU_RECOMPUTE_WIDTH:
        return False  # the recomputed Q K^T costs more than keeping A
    return d_v == d_k and n_k > d_k + d_v  # the flash kernel, where its recompute pays


def attention_matrix_bytes(count: int, n_q: int, n_k: int, d_k: int, *, d_v: int | None = None,
                           device: torch.device | str = "cpu", fused: bool, training: bool = False,
                           bytes_per_element: int = 4) -> int:
    """Bytes of ``count`` N_q×N_k attention matrices as :func:`attend` stores them (0 when fused).

    The one rule every block's ``attention_memory`` formula uses, so formulas and core agree:
    it asks :func:`takes_fused_path`, with the same ``d_v``, ``device`` and ``training``, which
    path runs.
    """
    fused_path = takes_fused_path(n_q, n_k, d_k, d_v=d_v, device=device, fused=fused, training=training)
    return 0 if fused_path else count * n_q * n_k * bytes_per_element


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    need_weights: bool = False,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Softmax attention :math:`Y = \operatorname{softmax}(s\,QK^\top + M)\,V`.

    Args:
        query: ``(..., N_q, d_k)``.
        key: ``(..., N_k, d_k)``, the same leading dimensions as ``query``.
        value: ``(..., N_k, d_v)``.
        scale: the factor :math:`s` on the logits.  ``None`` means the transformer's
            :math:`1/\sqrt{d_k}`; the non-local family uses ``1.0`` (no scaling).
        mask: optional boolean ``(N_q, N_k)`` or ``(..., N_q, N_k)``, or a key mask
            ``(1, N_k)`` or ``(..., 1, N_k)`` that holds for every query; ``True``
            where a query may attend to a key (:math:`M` is 0 there, :math:`-\infty`
            elsewhere).  Every query must keep at least one key.
        need_weights: also return the attention matrix :math:`A` (takes the
            reference path).
        fused: use ``scaled_dot_product_attention`` when the weights are not
            needed, :class:`_Gram` when the keys are the queries, and
            :class:`_Pool` when one query pools tokens that are its keys and values.

    Returns:
        ``(Y, A)``: ``Y`` is ``(..., N_q, d_v)``; ``A`` is ``(..., N_q, N_k)``, or
        ``None`` when the weights were not asked for.
    """
    _check_operands(query, key, value, mask)
    n_q, d_k = query.shape[-2:]
    n_k, d_v = value.shape[-2:]
    if scale is None:
        scale = 1.0 / math.sqrt(d_k)
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value))
    if takes_fused_path(n_q, n_k, d_k, d_v=d_v, device=query.device,
                        fused=fused, need_weights=need_weights, training=training):
        # Contiguous operands: on a CPU, SDPA takes its flash kernel only for those,
        # and falls back to the math path (which stores A) for transposed views.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        out = F.scaled_dot_product_attention(query, key, value,
                                             attn_mask=mask, scale=scale)
        return out, None
    pooling = (n_q == 1 and key is value and key is not query and mask is None
               and query.dim() == 3)
    if fused and pooling and not need_weights:
        return _Pool.apply(query, key, scale), None  # attention pooling: see _Pool
    symmetric = fused and key is query  # S = s QQ^T: see _Gram
    scale_scores = scale != 1.0 and (symmetric or n_k < d_k)  # S is the smaller
    if scale != 1.0 and not scale_scores:
        query = query * scale  # (sQ)K^T = s QK^T: N_q·d_k products, not N_q·N_k
    transposed_values = (n_q <= d_v and value.stride(-2) == 1
                         and value.stride(-1) != 1)
    if (fused and training and not need_weights and not symmetric and n_k > d_k + d_v
            and not transposed_values and _one_dtype(query, key, value)):
        # One N_q×N_k matrix kept for the backward pass: see _Attention.
        return _Attention.apply(query, key, value, mask), None
    if symmetric:
        scores = _Gram.apply(query)
    else:
        scores = torch.matmul(query, key.transpose(-2, -1))  # S = s Q K^T
    # Outside autograd's graph, S is a temporary nobody else holds: each step
    # overwrites it instead of allocating another N_q×N_k matrix.
    in_place = not scores.requires_grad
    if scale_scores:
        scores = scores.mul_(scale) if in_place else scores * scale
    scores = _masked(scores, mask, in_place)
    weights = _softmax_rows(scores, in_place)  # A = softmax(S), row-wise
    weights = _flush_subnormals(weights, n_k, d_k, in_place)  # small matrices only
    a = weights if weights.dtype == value.dtype else weights.to(value.dtype)
    if transposed_values:
        # V is a B×d_v×N_k feature map seen as tokens: Y = (VᵀAᵀ)ᵀ reads V, and
        # writes its gradient, in the map's own layout.  Only where A (N_q×N_k) is
        # no larger than V: A's gradient then comes back transposed, which on a
        # large N×N matrix costs more than it saves.
        out = torch.matmul(value.mT, a.mT).mT
    else:
        out = torch.matmul(a, value)  # Y = A V
    return out, (weights if need_weights else None)


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Weight and bias of one convolution equal to ``norm(conv(x))``.

    A BatchNorm that normalises by its running statistics :math:`\mu, \sigma^2` (eval
    mode) is an affine map per channel, so with :math:`s = \gamma/\sqrt{\sigma^2 +
    \epsilon}`, :math:`\operatorname{BN}(Wx + b) = (sW)x + \beta + s(b - \mu)`.
    ``conv``'s own weight and bias come back unchanged where there is nothing to fold:
    no ``norm``, or one that normalises by the statistics of its batch (training).
    """
    if norm is None or not _uses_running_statistics(norm):
        return conv.weight, conv.bias
    s = (norm.running_var + norm.eps).rsqrt()
    if norm.affine:
        s = s * norm.weight
    shift = -norm.running_mean if conv.bias is None else conv.bias - norm.running_mean
    bias = shift * s if not norm.affine else norm.bias + shift * s
    return conv.weight * s[:, None, None, None], bias


def _uses_running_statistics(norm: nn.BatchNorm2d) -> bool:
    # BatchNorm's own rule: eval mode, with running statistics to use
    return not norm.training and norm.running_mean is not None


def _modules(layer) -> list[nn.Module]:
    # a module (a Sequential: its modules), or modules applied in turn
    single = isinstance(layer, nn.Module) and not isinstance(layer, nn.Sequential)
    return [layer] if single else list(layer)


def _pointwise_unit(layer) -> tuple[nn.Conv2d, nn.BatchNorm2d | None, bool]:
    """``layer`` as (1×1 convolution, BatchNorm or None, whether a ReLU follows)."""
    parts = _modules(layer)
    conv = parts.pop(0) if parts else None
    norm = parts.pop(0) if parts and isinstance(parts[0], nn.BatchNorm2d) else None
    relu = bool(parts) and isinstance(parts[0], nn.ReLU)
    pointwise = (isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride == conv.dilation
                 == (1, 1) and conv.padding == (0, 0) and conv.groups == 1)
    if not pointwise or len(parts) > relu:
        raise ValueError("project: expected plain 1×1 convolutions, each alone or followed by a "
                         f"BatchNorm2d and/or a ReLU, got {layer}")
    return conv, norm, relu


def project(x: torch.Tensor, layers: tuple, *, fused: bool) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)``: several 1×1 projections of one map.

    Most blocks project one map into queries, keys and values.  A layer is a 1×1
    ``nn.Conv2d``, alone or with a ``BatchNorm2d`` and/or a ``ReLU`` after it, in an
    ``nn.Sequential`` or a list of modules applied in turn.  ``fused=True`` runs the
    convolutions as one, with their weights stacked: one pass over ``x`` and one product
    where there were several, and in a training step one gradient for ``x`` instead of a
    sum of several.  A BatchNorm in eval mode is folded into its convolution
    (:func:`fold_batch_norm`), which saves it a pass over the map.  The outputs are
    channel slices of one map.  ``fused=False`` calls each layer, and so does a call
    with a BatchNorm on the statistics of its batch (training), which reads a map of
    its own faster than a strided slice of a stacked one.  On the 2-core CPU where it
    was measured (2×128×45×60, freed memory kept, the fastest of 236–380 alternating
    calls, BatchNorms in eval mode), a training step took 35.6 against 37.5 ms for it
    in ISA and 15.1 against 15.3 ms in criss-cross attention.
    """
    units = [_pointwise_unit(layer) for layer in layers]
    if not fused or any(norm is not None and not _uses_running_statistics(norm)
                        for _, norm, _ in units):
        return tuple(functools.reduce(lambda y, m: m(y), _modules(layer), x)
                     for layer in layers)
    weights, biases = zip(*(fold_batch_norm(conv, norm) for conv, norm, _ in units))
    if any(b is not None for b in biases):  # a layer without a bias adds zeros
        biases = [w.new_zeros(len(w)) if b is None else b
                  for w, b in zip(weights, biases)]
    bias = None if biases[0] is None else torch.cat(biases)
    stacked = F.conv2d(x, torch.cat(weights), bias)
    # split's gradient is one concatenation (narrow's: a zero-filled map per slice);
    # one unit keeps the map itself, which its ReLU may then overwrite
    sizes = [conv.out_channels for conv, _, _ in units]
    slices = stacked.split(sizes, 1) if len(units) > 1 else (stacked,)
    outputs = []
    for (_, _, relu), out in zip(units, slices):
        # ReLU in place, unless autograd keeps this slice and another ReLU writes it
        if relu:
            out = out.relu() if out.requires_grad and out._is_view() else out.relu_()
        outputs.append(out)
    return tuple(outputs)


def set_fused(module: nn.Module, fused: bool) -> nn.Module:
    """Switch every attnlib block inside ``module`` to its fused (``True``) or reference path."""
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return module
