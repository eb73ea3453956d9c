"""The figures every chapter draws, written once: attention overlays, curves, segmentations.

Each function returns a :class:`matplotlib.figure.Figure` at most :data:`PAGE_WIDTH` inches
wide, with fonts of at least 9 pt under :data:`STYLE` (``plt.rcParams.update(viz.STYLE)``),
and leaves showing it to the caller (:func:`attnlib.book.show`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import nn

from .data import CLASSES, IGNORE_INDEX, PALETTE, colorize, denormalize
from .maps import attention_map

__all__ = [
    "PAGE_WIDTH", "STYLE", "attention_maps", "capture_inputs", "feature_labels", "map_scale", "plot_attention",
    "plot_curves", "plot_segmentation", "predict",
]

# The book's page is about 770 CSS px wide.  At 96 dpi one image pixel is one CSS pixel, so a
# figure PAGE_WIDTH inches wide is shown at its own size and its fonts keep their point size.
PAGE_WIDTH = 8.0
STYLE = {
    "figure.dpi": 96, "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 9, "figure.titlesize": 11,
}
CMAP = "inferno"
QUERY_STYLE = dict(marker="*", s=200, c="#00e5ff", edgecolors="black", linewidths=1.2)


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


def _photo(image: torch.Tensor) -> torch.Tensor:
    """A normalised 3×H×W network input as an H×W×3 picture in [0, 1]."""
    return denormalize(image.cpu()).clamp(0, 1)


def map_scale(maps: torch.Tensor) -> tuple[float, float]:
    """The shared colour range ``(vmin, vmax)`` of a set of maps, in units of N·a (see :func:`plot_attention`).

    ``vmin = 1``: only cells that get more than uniform attention are coloured, so a map
    that looks everywhere leaves the photo clear.  ``vmax`` is the largest N·a of all the
    maps, so that no panel saturates, but at least 10, so that the small ripples of a nearly
    uniform map are not stretched over the whole scale.
    """
    n = maps.shape[-2] * maps.shape[-1]
    return 1.0, max(float(maps.detach().max()) * n, 10.0)


def _heat(amap: torch.Tensor, norm: LogNorm, alpha: float) -> torch.Tensor:
    """An H×W×4 overlay on the shared log scale: opacity grows with the value, so that the photo
    stays visible wherever the query does not look (values at or below ``vmin`` are transparent)."""
    scaled = torch.as_tensor(norm(amap.numpy()).filled(0.0), dtype=torch.float32).clamp(0, 1)
    rgba = torch.as_tensor(plt.get_cmap(CMAP)(scaled.numpy()), dtype=torch.float32)
    rgba[..., 3] = alpha * scaled.sqrt()
    return rgba


def plot_attention(images: torch.Tensor, maps: torch.Tensor, queries: Sequence[tuple[int, int]] | Sequence[
                   Sequence[tuple[int, int]]], titles: Sequence[str] | None = None, *,
                   scale: tuple[float, float] | None = None, columns: int = 3, alpha: float = 0.85) -> Figure:
    """Photos with a query's attention over each, on one shared colour scale with a colourbar.

    ``images`` are B×3×H×W network inputs and ``maps`` B×Q×h×w attention on the feature grid
    (h×w, e.g. 45×60 at output stride 8).  ``queries`` are the Q cells (i, j), the same for
    every image, or one list of Q cells per image.  Panels run image by image, query by query,
    ``columns`` to a row; ``titles`` gives one title per panel (default: the query's cell).

    How the maps are normalised: a map :math:`a` sums to 1 over the N = h·w cells, so every
    panel shows :math:`N a`, the attention *relative to uniform* (1 = the weight every cell
    would get from a query that looks everywhere), on one logarithmic scale for the whole
    figure (``scale = (vmin, vmax)``, default :func:`map_scale`: from uniform up).  Brighter
    and more opaque is more weight; cells at or below ``vmin`` leave the photo uncovered.  The star marks the
    query's cell.  Maps are upsampled bilinearly to the photo.
    """
    b, q, h, w = maps.shape
    per_image = [list(queries)] * b if queries and isinstance(queries[0][0], int) else [list(c) for c in queries]
    if images.shape[0] != b or len(per_image) != b or any(len(c) != q for c in per_image):
        raise ValueError(f"plot_attention: expected {b} images and {q} queries per image to match the maps "
                         f"{tuple(maps.shape)}, got {images.shape[0]} images and queries {queries!r}")
    if titles is not None and len(titles) != b * q:
        raise ValueError(f"plot_attention: expected {b * q} panel titles, got {len(titles)}")
    vmin, vmax = map_scale(maps) if scale is None else scale
    norm = LogNorm(vmin=vmin, vmax=vmax)
    height, width = images.shape[-2:]
    up = F.interpolate(maps.detach().float().cpu() * (h * w), size=(height, width), mode="bilinear", align_corners=False)
    count = b * q
    cols = min(columns, count)
    rows = -(-count // cols)
    panel_w = (PAGE_WIDTH - 0.9) / cols
    fig, axes = plt.subplots(rows, cols, figsize=(PAGE_WIDTH, rows * (panel_w * height / width + 0.35)),
                             squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= count:
            continue
        r, c = divmod(k, q)
        i, j = per_image[r][c]
        ax.imshow(_photo(images[r]).numpy())  # arrays: NumPy 2 warns on a tensor's __array__
        ax.imshow(_heat(up[r, c], norm, alpha).numpy())
        ax.scatter([(j + 0.5) * width / w - 0.5], [(i + 0.5) * height / h - 0.5], **QUERY_STYLE)
        ax.set_title(titles[k] if titles is not None else f"query ({i}, {j})")
    colourbar = fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), ax=axes, shrink=0.9, aspect=25, pad=0.02)
    colourbar.set_label("attention × N  (1 = uniform)")
    return fig


def plot_curves(histories: Mapping[str, Mapping], smooth: int = 5) -> Figure:
    """Training loss (moving average over ``smooth`` steps) and evaluation mIoU, one line per run."""
    fig, (loss_ax, miou_ax) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 3.0), layout="constrained")
    for name, history in histories.items():
        loss = torch.tensor(history["loss"], dtype=torch.float64)
        k = max(1, min(smooth, len(loss)))
        averaged = loss.unfold(0, k, 1).mean(1) if len(loss) >= k else loss
        loss_ax.plot(range(k, k + len(averaged)), averaged, label=name)
        evals = history["eval"]
        miou_ax.plot([e["step"] for e in evals], [100 * e["miou"] for e in evals], "o-", label=name)
    loss_ax.set(xlabel="step", ylabel="training loss", title=f"loss (mean of {smooth} steps)")
    miou_ax.set(xlabel="step", ylabel="mIoU (%)", title="test mIoU")
    for ax in (loss_ax, miou_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_segmentation(images: torch.Tensor, labels: torch.Tensor, predictions: Mapping[str, torch.Tensor],
                      opacity: float = 0.75) -> Figure:
    """Ground truth and each model's prediction, one frame per row, as class colours over the photo.

    Each panel blends the class colours (``opacity``) over the photo, so that a reader sees
    the scene and the segmentation at once; unlabelled pixels of the ground truth show the
    photo alone.  At most three panels per row: the ground truth and two models.
    """
    b = images.shape[0]
    columns = ["ground truth", *predictions]
    if len(columns) > 3:
        raise ValueError(f"plot_segmentation: expected at most 2 models (three panels per row), got {len(predictions)}")
    if labels.shape[0] != b or any(p.shape[0] != b for p in predictions.values()):
        raise ValueError(f"plot_segmentation: expected {b} labels and predictions, one per image")
    height, width = images.shape[-2:]
    panel_w = PAGE_WIDTH / 3
    fig, axes = plt.subplots(b, len(columns), figsize=(panel_w * len(columns), b * (panel_w * height / width + 0.3)
                                                       + 0.55), squeeze=False, layout="constrained")
    for r in range(b):
        photo = _photo(images[r])
        for c, segmentation in enumerate([labels[r], *(p[r] for p in predictions.values())]):
            segmentation = segmentation.cpu()
            colours = colorize(segmentation).float() / 255
            blend = torch.where((segmentation == IGNORE_INDEX)[..., None], photo,
                                opacity * colours + (1 - opacity) * photo)
            axes[r, c].imshow(blend.numpy())
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(columns[c])
    handles = [plt.Rectangle((0, 0), 1, 1, color=[v / 255 for v in PALETTE[k]]) for k in range(len(CLASSES))]
    fig.legend(handles, CLASSES, loc="outside lower center", ncol=6, frameon=False)
    return fig
