r"""Attention maps as measurements: the statistics every chapter reports.

A picture of an attention map can flatter.  An undertrained non-local block, for
instance, may send the mass of every query to the top border of the frame: each panel
looks "focused", yet the maps are the same for every query and say nothing about the
scene.  So every chapter measures its maps with the same few numbers, computed here.

For a map :math:`a` over the :math:`N = h\,w` cells of the feature grid
(:math:`\sum_j a_j = 1`) and a set of queries :math:`q = 1..Q`:

* **cross-query similarity** (GCNet's statistic, Cao et al. 2019, Sec. 3.1): the mean
  cosine similarity :math:`\frac{a_q\cdot a_{q'}}{\lVert a_q\rVert\,\lVert a_{q'}\rVert}`
  over pairs of different queries.  1 means one map for all queries, the observation
  GCNet starts from; :func:`query_similarity`.
* **relative entropy** :math:`H(a)/\log N = -\sum_j a_j\log a_j / \log N`: 1 for uniform
  attention, 0 for attention on a single cell; :func:`relative_entropy`.
* **border mass**: the share of the mass on the cells within ``width`` of the grid's
  edge, to be read against the border's share of the area; :func:`border_mass`.
* **same-class ratio**: the mass on cells of the query's own class divided by that
  class's share of the cells.  A map blind to semantics puts mass on a class in
  proportion to its area (ratio 1).  Because a ratio above 1 can also come from
  *locality* (cells near the query tend to share its class) or from a map that ignores
  the query altogether, it is reported next to baselines computed on the same cells:
  the **mean map** over the queries (:func:`mean_map`: what is left if the map does not
  depend on the query), the **distance-matched** map (:func:`distance_matched`: each
  ring of cells at equal distance from the query gets the ring's mean weight, which
  keeps locality and drops everything else) and an **untrained** block of the same
  shape fed the same features (:func:`reinitialised`).

:func:`map_statistics` computes them all for one frame; :func:`interior_queries` places
the queries inside regions of a class, away from their edges and from the frame's border.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "border_mass", "distance_matched", "interior_queries", "map_statistics", "mean_map", "query_similarity",
    "reinitialised", "relative_entropy", "same_class_ratio",
]


def _check_maps(maps: torch.Tensor, name: str) -> torch.Tensor:
    """Q×h×w non-negative maps, as float64 (the statistics are sums of many small terms)."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"{name}: expected maps of shape (Q, h, w), got {shape}")
    if maps.numel() == 0:
        raise ValueError(f"{name}: expected at least one query and one cell, got shape {tuple(maps.shape)}")
    maps = maps.detach().double().cpu()
    if (maps < 0).any() or not torch.isfinite(maps).all():
        raise ValueError(f"{name}: expected finite, non-negative attention maps")
    return maps


def _check_queries(queries: Sequence[tuple[int, int]], count: int, height: int, width: int, name: str) -> None:
    if len(queries) != count:
        raise ValueError(f"{name}: expected {count} queries, one per map, got {len(queries)}")
    for i, j in queries:
        if not (0 <= i < height and 0 <= j < width):
            raise ValueError(f"{name}: expected queries inside the {height}x{width} grid, got {(i, j)}")


def _normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its total, so that the statistics read as shares of the mass."""
    return maps / maps.sum(dim=(1, 2), keepdim=True).clamp(min=torch.finfo(maps.dtype).tiny)


def query_similarity(maps: torch.Tensor) -> float:
    """Mean cosine similarity between the maps of different queries (Q ≥ 2), in [0, 1] for maps ≥ 0."""
    maps = _check_maps(maps, "query_similarity")
    if maps.shape[0] < 2:
        raise ValueError(f"query_similarity: expected at least 2 queries, got {maps.shape[0]}")
    unit = F.normalize(maps.flatten(1), dim=1)
    gram = unit @ unit.T
    q = gram.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (q * (q - 1)))


def relative_entropy(maps: torch.Tensor) -> torch.Tensor:
    r"""Per map, :math:`H(a)/\log N` of the normalised map: 1 = uniform, 0 = a single cell."""
    maps = _normalised(_check_maps(maps, "relative_entropy"))
    n = maps[0].numel()
    if n < 2:
        raise ValueError("relative_entropy: expected a grid of at least 2 cells")
    return -torch.special.xlogy(maps, maps).sum(dim=(1, 2)) / math.log(n)


def border_cells(height: int, width: int, width_cells: int = 1) -> torch.Tensor:
    """Boolean h×w mask of the cells within ``width_cells`` of the grid's edge."""
    if width_cells < 1 or 2 * width_cells >= min(height, width):
        raise ValueError(f"border_cells: expected 1 <= width < min(h, w) / 2 = {min(height, width) / 2}, "
                         f"got {width_cells}")
    inner = torch.zeros(height, width, dtype=torch.bool)
    inner[width_cells:-width_cells, width_cells:-width_cells] = True
    return ~inner


def border_mass(maps: torch.Tensor, width: int = 1) -> tuple[torch.Tensor, float]:
    """(share of each map's mass on the border band of ``width`` cells, the band's share of the cells)."""
    maps = _normalised(_check_maps(maps, "border_mass"))
    band = border_cells(*maps.shape[1:], width)
    return maps[:, band].sum(dim=1), float(band.double().mean())


def same_class_ratio(maps: torch.Tensor, cell_labels: torch.Tensor, queries: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Per query: (mass on cells of the query's class) / (that class's share of the cells).

    ``cell_labels`` is the h×w grid of class indices (see :func:`attnlib.viz.feature_labels`).
    1 means no preference for the query's own class; the largest possible value is
    1 / share, reached by a map that puts all its mass on the class.
    """
    maps = _normalised(_check_maps(maps, "same_class_ratio"))
    if cell_labels.shape != maps.shape[1:]:
        raise ValueError(f"same_class_ratio: expected cell labels of shape {tuple(maps.shape[1:])}, "
                         f"got {tuple(cell_labels.shape)}")
    _check_queries(queries, maps.shape[0], *maps.shape[1:], "same_class_ratio")
    ratios = []
    for amap, query in zip(maps, queries):
        same = cell_labels == cell_labels[query]
        ratios.append(amap[same].sum() / same.double().mean())
    return torch.stack(ratios)


def mean_map(maps: torch.Tensor) -> torch.Tensor:
    """The mean of the (normalised) maps over the queries, repeated for every query: the
    query-independent baseline."""
    maps = _normalised(_check_maps(maps, "mean_map"))
    return maps.mean(dim=0, keepdim=True).expand_as(maps)


def distance_matched(maps: torch.Tensor, queries: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Each map with every cell replaced by the mean weight of the cells at the same (rounded
    Euclidean) distance from the query: the locality of the map, and nothing else."""
    maps = _normalised(_check_maps(maps, "distance_matched"))
    q, h, w = maps.shape
    _check_queries(queries, q, h, w, "distance_matched")
    rows = torch.arange(h, dtype=torch.float64)[:, None]
    cols = torch.arange(w, dtype=torch.float64)[None, :]
    out = torch.empty_like(maps)
    for k, (i, j) in enumerate(queries):
        ring = torch.hypot(rows - i, cols - j).round().long().flatten()
        total = torch.zeros(int(ring.max()) + 1, dtype=maps.dtype).index_add_(0, ring, maps[k].flatten())
        count = torch.bincount(ring).to(maps.dtype)
        out[k] = (total / count)[ring].reshape(h, w)
    return out


@torch.no_grad()
def reinitialised(block: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``block`` with every parameter drawn afresh (each submodule's own
    ``reset_parameters``), in eval mode: the *untrained* baseline on the same features."""
    fresh = copy.deepcopy(block).eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    return fresh


def map_statistics(maps: torch.Tensor, cell_labels: torch.Tensor, queries: Sequence[tuple[int, int]], *,
                   untrained: torch.Tensor | None = None, border_width: int = 1) -> dict[str, object]:
    """Every statistic of this module for the Q maps of one frame.

    Returns a dict of per-query tensors (``"entropy"``, ``"border_mass"``, ``"same_class"``,
    and the same-class ratio of the baselines ``"same_class_mean_map"``,
    ``"same_class_distance"`` and, when ``untrained`` maps of the same queries are given,
    ``"same_class_untrained"``) and of scalars (``"similarity"``, ``"border_share"``).
    """
    maps = _check_maps(maps, "map_statistics")
    border, share = border_mass(maps, border_width)
    stats: dict[str, object] = {
        "similarity": query_similarity(maps) if maps.shape[0] > 1 else float("nan"),
        "entropy": relative_entropy(maps),
        "border_mass": border,
        "border_share": share,
        "same_class": same_class_ratio(maps, cell_labels, queries),
        "same_class_mean_map": same_class_ratio(mean_map(maps), cell_labels, queries),
        "same_class_distance": same_class_ratio(distance_matched(maps, queries), cell_labels, queries),
    }
    if untrained is not None:
        if untrained.shape != maps.shape:
            raise ValueError(f"map_statistics: expected untrained maps of shape {tuple(maps.shape)}, "
                             f"got {tuple(untrained.shape)}")
        stats["same_class_untrained"] = same_class_ratio(untrained, cell_labels, queries)
    return stats


def interior_queries(cell_labels: torch.Tensor, classes: Sequence[int], *, margin: int = 2,
                     min_depth: int = 1) -> list[tuple[int, tuple[int, int]]]:
    """For each class in ``classes`` present in the h×w grid, the cell deepest inside its region.

    A cell's *depth* is its Chebyshev distance to the nearest cell of another class or to the
    nearest cell within ``margin`` of the frame's border, so a query never sits on an object's
    edge nor on the border band, where zero padding gives features of their own.  Among the
    deepest cells, the one closest to the centroid of the class's region wins (no raster-order
    bias toward the top-left).  Classes whose deepest cell has depth below ``min_depth`` are
    left out.  Returns ``[(class, (i, j)), ...]`` in the order of ``classes``.
    """
    if cell_labels.dim() != 2:
        raise ValueError(f"interior_queries: expected an h×w grid of class indices, got shape {tuple(cell_labels.shape)}")
    h, w = cell_labels.shape
    if margin < 0 or 2 * margin >= min(h, w):
        raise ValueError(f"interior_queries: expected 0 <= margin < {min(h, w) / 2}, got {margin}")
    picks = []
    for k in classes:
        region = cell_labels == k
        if not region.any():
            continue
        inside = region.clone()
        if margin:
            inside &= ~border_cells(h, w, margin)
        # Depth by repeated 3×3 erosion: a cell survives d erosions when every cell within
        # Chebyshev distance d is inside; cells outside the frame count as outside.
        depth = torch.zeros(h, w, dtype=torch.long)
        alive = inside.float()[None, None]
        while alive.any():
            depth += alive[0, 0].long()
            alive = -F.max_pool2d(-F.pad(alive, (1, 1, 1, 1), value=0.0), 3, stride=1)
        best = int(depth.max())
        if best < min_depth:
            continue
        cells = (depth == best).nonzero().double()
        centroid = region.nonzero().double().mean(dim=0)
        i, j = cells[(cells - centroid).square().sum(dim=1).argmin()].long().tolist()
        picks.append((k, (i, j)))
    return picks
