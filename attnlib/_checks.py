"""Input validation shared by every block: bad input gets a clear ``ValueError``.

Each message names what was expected and what came, so a reader who passes a 3-D
tensor or the wrong channel count learns exactly what to fix.  Nothing is
silently broadcast.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["check_feature_map", "check_positive", "check_positive_pair", "check_query", "reduced_channels"]


def check_feature_map(x: object, channels: int | None, name: str) -> tuple[int, int, int, int]:
    """Check that ``x`` is a floating B×C×H×W tensor with ``channels`` channels.

    Returns ``(B, C, H, W)``.  ``name`` (the block's class name) starts the message.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor (B, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    b, c, h, w = x.shape
    if channels is not None and c != channels:
        raise ValueError(f"{name}: expected {channels} input channels, got {c} (shape {tuple(x.shape)})")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"{name}: expected a non-empty batch and spatial size, got shape {tuple(x.shape)}")
    return b, c, h, w


def check_positive(value: object, name: str) -> int:
    """Check that ``value`` is a positive ``int`` (``bool`` is refused) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} to be a positive int, got {value!r}")
    return value


def check_positive_pair(value: object, name: str) -> tuple[int, int]:
    """Accept ``n`` or ``(nh, nw)`` of positive ints; return ``(nh, nw)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return check_positive(value, name), value
    if isinstance(value, Sequence) and len(value) == 2:
        return check_positive(value[0], name), check_positive(value[1], name)
    raise ValueError(f"expected {name} to be a positive int or a pair of positive ints, got {value!r}")


def check_query(query: object, height: int, width: int) -> tuple[int, int]:
    """Check that ``query`` is a position ``(i, j)`` inside an H×W map and return it."""
    if (
        not isinstance(query, Sequence)
        or len(query) != 2
        or not all(isinstance(q, int) and not isinstance(q, bool) for q in query)
    ):
        raise ValueError(f"expected query to be a pair of ints (i, j), got {query!r}")
    i, j = query
    if not (0 <= i < height and 0 <= j < width):
        raise ValueError(
            f"expected query (i, j) with 0 <= i < {height} and 0 <= j < {width} (the feature map is {height}x{width}), got {query!r}"
        )
    return i, j


def reduced_channels(in_channels: int, reduction: object) -> int:
    """``in_channels // reduction``, the query/key width of DANet's PAM and CCNet's CCA; at least 1."""
    check_positive(reduction, "reduction")
    if in_channels // reduction < 1:
        raise ValueError(f"expected in_channels // reduction >= 1 (at least one query/key channel), "
                         f"got {in_channels} // {reduction} = 0")
    return in_channels // reduction
