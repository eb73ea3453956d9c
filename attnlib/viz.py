"""The figures every chapter draws, written once: attention overlays, curves, segmentations.

Each function returns a :class:`matplotlib.figure.Figure` and leaves showing it to the
caller (end the notebook cell with ``;`` and the inline backend shows the image alone).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from .data import CLASSES, IGNORE_INDEX, PALETTE, colorize, denormalize
from .maps import attention_map

__all__ = [
    "attention_maps", "capture_inputs", "class_queries", "feature_labels", "plot_attention", "plot_curves",
    "plot_segmentation", "predict", "same_class_mass",
]

QUERY_STYLE = dict(marker="*", s=220, c="#00e5ff", edgecolors="black", linewidths=1.2)


@torch.no_grad()
def capture_inputs(model: nn.Module, module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run ``model(images)`` and return what ``module`` (a block inside it) received as input."""
    captured: list[tuple[torch.Tensor, ...]] = []
    handle = module.register_forward_pre_hook(lambda _, args: captured.append(tuple(a.detach() for a in args)))
    try:
        model(images)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"capture_inputs: expected {type(module).__name__} to run inside the model, but it never did")
    return captured[0]


@torch.no_grad()
def attention_maps(model: nn.Module, module: nn.Module, images: torch.Tensor,
                   queries: Sequence[tuple[int, int]]) -> torch.Tensor:
    """B×Q×h×w: ``module``'s :func:`attnlib.attention_map` for each query, on what the model fed it."""
    inputs = capture_inputs(model, module, images)
    return torch.stack([attention_map(module, inputs if len(inputs) > 1 else inputs[0], q) for q in queries], dim=1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The model's class index per pixel, B×H×W."""
    return model(images).argmax(dim=1)


def feature_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels B×H×W brought to the feature grid ``size``: each cell takes the class that covers
    most of its pixels (the ignore index when unlabelled pixels are the majority)."""
    one_hot = F.one_hot(labels.long().cpu(), IGNORE_INDEX + 1).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, size).argmax(dim=1)


def class_queries(cell_labels: torch.Tensor, classes: Sequence[int], window: int = 5) -> list[tuple[int, tuple[int, int]]]:
    """For each class present in an h×w map of cell labels, the cell deepest inside it.

    "Deepest" is the cell of that class with the most cells of the same class in its
    ``window``×``window`` neighbourhood (first in raster order on ties), so that a query
    sits well inside an object rather than on its border.  Returns ``[(class, (i, j)), ...]``.
    """
    picks = []
    for k in classes:
        mask = (cell_labels == k).float()[None, None]
        if mask.sum() == 0:
            continue
        support = F.avg_pool2d(mask, window, stride=1, padding=window // 2, count_include_pad=True)[0, 0]
        flat = torch.where(mask[0, 0] > 0, support, torch.full_like(support, -1)).flatten().argmax().item()
        picks.append((k, divmod(flat, cell_labels.shape[1])))
    return picks


def same_class_mass(amap: torch.Tensor, cell_labels: torch.Tensor, query: tuple[int, int]) -> tuple[float, float]:
    """(attention mass on cells of the query's class, the share of cells of that class).

    A map that ignores semantics puts mass on a class in proportion to its area; the
    ratio of the two numbers says how much more than that the query attends to its own class.
    """
    same = cell_labels == cell_labels[query]
    return float(amap[same].sum() / amap.sum()), float(same.float().mean())


def _photo(image: torch.Tensor) -> torch.Tensor:
    """A normalised 3×H×W network input as an H×W×3 picture in [0, 1]."""
    return denormalize(image.cpu()).clamp(0, 1)


def _heat(amap: torch.Tensor, alpha: float) -> torch.Tensor:
    """An H×W×4 overlay: colour from the map's own range, opacity growing with the value, so that
    the photo stays visible wherever the query does not look."""
    scaled = (amap - amap.min()) / (amap.max() - amap.min()).clamp(min=1e-12)
    rgba = torch.as_tensor(plt.get_cmap("inferno")(scaled.numpy()), dtype=torch.float32)
    rgba[..., 3] = alpha * scaled.sqrt()
    return rgba


def plot_attention(images: torch.Tensor, maps: torch.Tensor, queries: Sequence[tuple[int, int]],
                   titles: Sequence[str] | None = None, alpha: float = 0.85, panel: float = 3.2) -> Figure:
    """One row per image, one column per query: the photo with the query's attention over it.

    ``images`` are B×3×H×W network inputs, ``maps`` B×Q×h×w attention on the feature grid
    (h×w, e.g. 45×60 at output stride 8).  Each map is upsampled bilinearly to the photo
    and shown with its own colour range (each panel answers "where does *this* query
    look?"), more opaque where the weight is higher; the star marks the query's feature cell.
    """
    b, q, h, w = maps.shape
    if images.shape[0] != b or len(queries) != q:
        raise ValueError(f"plot_attention: expected {b} images and {q} queries to match the maps {tuple(maps.shape)}, "
                         f"got {images.shape[0]} images and {len(queries)} queries")
    height, width = images.shape[-2:]
    up = F.interpolate(maps.float().cpu(), size=(height, width), mode="bilinear", align_corners=False)
    fig, axes = plt.subplots(b, q, figsize=(panel * q * width / height, panel * b), squeeze=False)
    for r in range(b):
        photo = _photo(images[r])
        for c, (i, j) in enumerate(queries):
            ax = axes[r, c]
            ax.imshow(photo)
            ax.imshow(_heat(up[r, c], alpha))
            ax.scatter([(j + 0.5) * width / w - 0.5], [(i + 0.5) * height / h - 0.5], **QUERY_STYLE)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"query ({i}, {j})", fontsize=10)
        if titles is not None:
            axes[r, 0].set_ylabel(titles[r], fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(histories: Mapping[str, Mapping], smooth: int = 5) -> Figure:
    """Training loss (moving average over ``smooth`` steps) and evaluation mIoU, one line per run."""
    fig, (loss_ax, miou_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, history in histories.items():
        loss = torch.tensor(history["loss"], dtype=torch.float64)
        k = max(1, min(smooth, len(loss)))
        averaged = loss.unfold(0, k, 1).mean(1) if len(loss) >= k else loss
        loss_ax.plot(range(k, k + len(averaged)), averaged, label=name)
        evals = history["eval"]
        miou_ax.plot([e["step"] for e in evals], [100 * e["miou"] for e in evals], "o-", label=name)
    loss_ax.set(xlabel="step", ylabel="training loss", title=f"loss (mean of {smooth} steps)")
    miou_ax.set(xlabel="step", ylabel="mIoU (%)", title="evaluation mIoU")
    for ax in (loss_ax, miou_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_segmentation(images: torch.Tensor, labels: torch.Tensor, predictions: Mapping[str, torch.Tensor],
                      panel: float = 2.6) -> Figure:
    """Photo, ground truth and each model's prediction side by side, with a class legend."""
    b = images.shape[0]
    columns = ["photo", "ground truth", *predictions]
    height, width = images.shape[-2:]
    fig, axes = plt.subplots(b, len(columns), figsize=(panel * len(columns) * width / height, panel * b + 0.6),
                             squeeze=False)
    for r in range(b):
        panels = [_photo(images[r]), colorize(labels[r].cpu())] + [colorize(p[r].cpu()) for p in predictions.values()]
        for c, picture in enumerate(panels):
            axes[r, c].imshow(picture)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=[v / 255 for v in PALETTE[k]]) for k in range(len(CLASSES))]
    fig.legend(handles, CLASSES, loc="lower center", ncol=len(CLASSES), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
