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

import torch
from torch import nn
from torch.utils import flop_counter

from .ann import afnb_attention_memory, afnb_flops, apnb_attention_memory, apnb_flops
from .ccnet import (criss_cross_attention_memory, criss_cross_flops, recurrent_criss_cross_attention_memory,
                    recurrent_criss_cross_flops)
from .danet import (channel_attention_attention_memory, channel_attention_flops, dual_attention_head_attention_memory,
                    dual_attention_head_flops, position_attention_attention_memory, position_attention_flops)
from .gcnet import (context_block_attention_memory, context_block_flops, simplified_nonlocal_attention_memory,
                    simplified_nonlocal_flops)
from .isanet import interlaced_sparse_attention_memory, interlaced_sparse_flops
from .nonlocal_block import nonlocal_attention_memory, nonlocal_flops

__all__ = [
    "flops", "attention_memory",
    "nonlocal_flops", "nonlocal_attention_memory",
    "context_block_flops", "context_block_attention_memory", "simplified_nonlocal_flops",
    "simplified_nonlocal_attention_memory",
    "position_attention_flops", "position_attention_attention_memory", "channel_attention_flops",
    "channel_attention_attention_memory", "dual_attention_head_flops", "dual_attention_head_attention_memory",
    "criss_cross_flops", "criss_cross_attention_memory", "recurrent_criss_cross_flops",
    "recurrent_criss_cross_attention_memory",
    "apnb_flops", "apnb_attention_memory", "afnb_flops", "afnb_attention_memory",
    "interlaced_sparse_flops", "interlaced_sparse_attention_memory",
]


def _register_cpu_flash_attention() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernel, which it does not count (torch 2.14).

    On a CPU, ``scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``;
    ``FlopCounterMode`` has formulas for the CUDA kernels but none for this one, so it would count
    the fused path as 0 FLOPs.  We register torch's own SDPA formulas for it (forward and backward),
    unless a newer torch already has them.
    """
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    for name, count in (("_scaled_dot_product_flash_attention_for_cpu", forward),
                        ("_scaled_dot_product_flash_attention_for_cpu_backward", backward)):
        op = getattr(torch.ops.aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(count)


_register_cpu_flash_attention()


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
