"""attnlib — attention blocks for semantic segmentation, exact to their papers.

The companion library of the open textbook *Attention for Semantic Segmentation*:
one module per paper, one attention core (:func:`attnlib.core.attend`) that every
block uses, analytic costs (:mod:`attnlib.complexity`) and effective attention maps
(:func:`attention_map`).
"""
from . import complexity
from .core import attend
from .maps import attention_map
from .nonlocal_block import NonLocal2d

__version__ = "0.1.0"

__all__ = ["attend", "attention_map", "complexity", "NonLocal2d"]
