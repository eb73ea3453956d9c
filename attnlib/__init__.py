"""attnlib — attention blocks for semantic segmentation, exact to their papers.

The companion library of the open textbook *Attention for Semantic Segmentation*:
one module per paper, one attention core (:func:`attnlib.core.attend`) that every
block uses, analytic costs (:mod:`attnlib.complexity`), effective attention maps
(:func:`attention_map`), and the CamVid data, models and training loop the chapters
share (:mod:`attnlib.data`, :mod:`attnlib.models`, :mod:`attnlib.train`).
"""
__version__ = "0.1.0"  # before the imports: attnlib.train records it in every checkpoint

from . import analysis, complexity
from .ann import AFNB, APNB, pyramid_sample
from .ccnet import CrissCrossAttention, RecurrentCrissCross, criss_cross_mask
from .core import attend, set_fused
from .danet import ChannelAttention, DualAttentionHead, PositionAttention, channel_attention_map
from .gcnet import ContextBlock, SimplifiedNonLocal2d
from .isanet import InterlacedSparseAttention
from .maps import attention_map
from .nonlocal_block import NonLocal2d
from .train import profile


__all__ = [
    "AFNB", "APNB", "ChannelAttention", "ContextBlock", "CrissCrossAttention", "DualAttentionHead",
    "InterlacedSparseAttention", "NonLocal2d", "PositionAttention", "RecurrentCrissCross", "SimplifiedNonLocal2d",
    "analysis", "attend", "attention_map", "channel_attention_map", "complexity", "criss_cross_mask", "profile",
    "pyramid_sample", "set_fused",
]
