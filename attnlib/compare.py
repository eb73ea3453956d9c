r"""Comparing heads over seeds: the arithmetic of the book's last chapter.

:func:`attnlib.experiments.load_results` returns ``{head: [record of seed 0, seed 1, ...]}``.
This module turns such records into what a comparison needs, without deciding anything
the numbers do not support:

* :func:`seed_summary` — a metric's mean and sample standard deviation over the seeds
  (``ddof = 1``; the standard deviation of a single seed is undefined, ``nan``);
* :func:`separated` — whether two heads differ by more than the seed-to-seed spread, in
  the strictest sense that three seeds allow: every seed of one head scores above every
  seed of the other (their ranges do not overlap);
* :func:`class_iou` — the per-class IoU averaged over seeds, a heads × classes array with
  ``nan`` where a class was absent from both prediction and ground truth in every seed;
* :func:`loglog_slope` — the least-squares slope of :math:`\log y` against :math:`\log x`,
  the exponent :math:`k` of a cost that grows as :math:`x^k`.

With two or three seeds, "not separated" does not mean "equal": it means these runs
cannot tell.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["class_iou", "loglog_slope", "metric", "seed_summary", "separated", "separated_pairs"]


def metric(records: Sequence[Mapping], key: str | Callable[[Mapping], float] = "miou") -> list[float]:
    """One value per record: ``record["test"][key]``, or ``key(record)`` for a callable."""
    if not records:
        raise ValueError("metric: expected at least one record, got none")
    if callable(key):
        return [float(key(r)) for r in records]
    missing = [r.get("seed") for r in records if key not in r.get("test", {})]
    if missing:
        raise ValueError(f"metric: expected records with test[{key!r}], the seeds {missing} have none")
    return [float(r["test"][key]) for r in records]


def seed_summary(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "min", "max", "n"}`` of one head's values over its seeds (std with ddof = 1)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"seed_summary: expected a non-empty list of finite numbers, got {list(values)!r}")
    std = float(x.std(ddof=1)) if x.size > 1 else math.nan
    return {"mean": float(x.mean()), "std": std, "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def separated(a: Sequence[float], b: Sequence[float]) -> int:
    """+1 if every value of ``a`` exceeds every value of ``b``, −1 for the reverse, 0 if the ranges overlap.

    Both need at least two seeds: with one, nothing is known about the spread.
    """
    for values, name in ((a, "a"), (b, "b")):
        if len(values) < 2:
            raise ValueError(f"separated: expected at least 2 seeds for {name}, got {len(values)}")
    if min(a) > max(b):
        return 1
    if min(b) > max(a):
        return -1
    return 0


def separated_pairs(values: Mapping[str, Sequence[float]]) -> list[tuple[str, str]]:
    """Every pair ``(higher, lower)`` of heads whose seed ranges do not overlap, in the mapping's order."""
    names = list(values)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sign = separated(values[a], values[b])
            if sign:
                pairs.append((a, b) if sign > 0 else (b, a))
    return pairs


def class_iou(results: Mapping[str, Sequence[Mapping]], classes: Sequence[str]) -> np.ndarray:
    """Heads × classes: each class's IoU averaged over the seeds where it is defined (``nan`` where none is)."""
    table = np.full((len(results), len(classes)), math.nan)
    for row, records in enumerate(results.values()):
        for col, name in enumerate(classes):
            found = [r["test"]["iou"].get(name, KeyError) for r in records]
            if KeyError in found:
                raise ValueError(f"class_iou: expected every record to list class {name!r}, "
                                 f"got classes {sorted(records[found.index(KeyError)]['test']['iou'])}")
            defined = [v for v in found if v is not None]
            if defined:
                table[row, col] = float(np.mean(defined))
    return table


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    r"""The least-squares slope of :math:`\log y` against :math:`\log x`: k for y ∝ x^k."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"loglog_slope: expected two 1-D sequences of the same length >= 2, got shapes "
                         f"{x.shape} and {y.shape}")
    if (x <= 0).any() or (y <= 0).any() or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("loglog_slope: expected finite, positive values (a logarithm is taken)")
    if np.ptp(x) == 0:
        raise ValueError("loglog_slope: expected at least two different x")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])
