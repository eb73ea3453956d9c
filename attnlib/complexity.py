r"""Analytic cost of every block: FLOPs and the memory of its attention matrices.

Each block's module holds the formulas for its own paper, next to the code they count;
this module gathers them behind two functions that read a block's settings:

* :func:`flops` — ``{"conv": ..., "matmul": ...}``, 2 FLOPs per multiply-add, exactly
  what :class:`torch.utils.flop_counter.FlopCounterMode` counts for one forward pass
  (convolutions; ``mm``/``bmm``/``addmm``/``baddbmm``/attention kernels).  Element-wise
  work — softmax, normalisation, activations, residual adds — is not counted, by either.
* :func:`attention_memory` — bytes of the attention matrices the block stores in one
  forward pass on its current path (the fused paths store none).

The tests hold :func:`flops` equal to ``FlopCounterMode`` for every block, on both paths.
"""
from __future__ import annotations

from torch import nn

from .nonlocal_block import nonlocal_attention_memory, nonlocal_flops

__all__ = ["flops", "attention_memory", "nonlocal_flops", "nonlocal_attention_memory"]


def _method(block: nn.Module, name: str):
    method = getattr(block, name, None)
    if method is None:
        raise TypeError(f"complexity: expected an attnlib block with a {name}() formula, got {type(block).__name__}")
    return method


def flops(block: nn.Module, batch: int, height: int, width: int) -> dict[str, int]:
    """Analytic FLOPs of ``block``'s forward pass on a ``batch``×C×``height``×``width`` input."""
    return _method(block, "flops")(batch, height, width)


def attention_memory(block: nn.Module, batch: int, height: int, width: int, bytes_per_element: int = 4) -> int:
    """Bytes of attention weights ``block`` materialises on that input (0 on a fused path that stores none)."""
    return _method(block, "attention_memory")(batch, height, width, bytes_per_element=bytes_per_element)
