r"""Effective attention maps: where does position (i, j) look?

:func:`attention_map` asks a block for its attention from one query position over every
input position, as a B×H×W tensor the chapters overlay on the photo.  What "effective"
means depends on the block, and each block documents its own method:

==========================================  ==================================================================================
block                                       map for query (i, j)
==========================================  ==================================================================================
``NonLocal2d``, ``PositionAttention``       the row of the full N×N attention matrix (N×N/4, spread back, with ``sub_sample``)
``DualAttentionHead``                       its position attention's row, on that module's own input
``ContextBlock``, ``SimplifiedNonLocal2d``  the one global softmax map — the same for every query
``CrissCrossAttention``                     the H+W−1 weights of row i and column j, scattered back
``RecurrentCrissCross``                     the loops' matrices composed, :math:`A_R\cdots A_1`, one row
``AFNB``, ``APNB``                          each pooled bin's weight spread evenly over its pixels
``InterlacedSparseAttention``               short-range ∘ long-range, :math:`A_{\text{short}}A_{\text{long}}`, one row
==========================================  ==================================================================================

Wherever a softmax makes the block's attention a distribution, the map sums to 1.  Channel
attention (DANet's CAM) mixes channels, not positions, and has no spatial map: use
:func:`attnlib.danet.channel_attention_map` for its C×C matrix.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["attention_map"]


def attention_map(block: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], query: tuple[int, int]) -> torch.Tensor:
    """The effective attention of ``block`` from ``query = (i, j)`` over all H×W positions of ``x``.

    ``x`` is the block's input, B×C×H×W, or the tuple of its inputs for a block with two
    (``AFNB(low, high)``, whose queries live on ``high``).  Returns a B×H×W tensor.
    Raises ``ValueError`` for a query outside the map or bad input, ``TypeError`` for a
    module that has no spatial attention map.
    """
    method = getattr(block, "attention_map", None)
    if method is None:
        raise TypeError(
            f"attention_map: expected a block with a spatial attention map, got {type(block).__name__}"
            + (" (channel attention has no spatial map: use attnlib.danet.channel_attention_map)"
               if type(block).__name__ == "ChannelAttention" else "")
        )
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    expected = len(inspect.signature(method).parameters) - 1  # all but the query
    if len(inputs) != expected:
        raise ValueError(f"attention_map: expected {expected} input tensor(s) for {type(block).__name__}, "
                         f"got {len(inputs)}")
    # Computing a map must not change the model: a block in training mode would update its
    # BatchNorm statistics on the way, so they are put back afterwards.
    buffers = [(b, b.clone()) for b in block.buffers()]
    try:
        return method(*inputs, query)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
