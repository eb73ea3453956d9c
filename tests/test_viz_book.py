"""The chapters' shared figures (attnlib.viz) and page helpers (attnlib.book)."""
from __future__ import annotations

import json

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import LogNorm
from matplotlib.text import Text

from attnlib import book, viz
from attnlib.data import IGNORE_INDEX


@pytest.fixture(autouse=True)
def book_style():
    with matplotlib.rc_context(viz.STYLE):
        yield
    plt.close("all")


def rendered_points(fig) -> list[float]:
    """Every visible text's size in points as a reader sees it: the figure shown PAGE_WIDTH wide at 96 dpi."""
    fig.canvas.draw()
    shrink = min(1.0, viz.PAGE_WIDTH / fig.get_figwidth())
    return [t.get_fontsize() * shrink for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def random_maps(b: int, q: int, h: int = 9, w: int = 12) -> torch.Tensor:
    torch.manual_seed(0)
    return (3 * torch.randn(b, q, h * w)).softmax(dim=-1).reshape(b, q, h, w)


def test_attention_panels_share_one_log_scale_with_a_colourbar_and_three_columns():
    images = torch.randn(2, 3, 72, 96)
    maps = random_maps(2, 2)
    fig = viz.plot_attention(images, maps, [(2, 3), (6, 8)])
    photos = [ax for ax in fig.axes if ax.images]
    assert len(photos) == 4
    assert max(ax.get_subplotspec().colspan.stop for ax in photos) <= 3
    norms = {(im.norm.vmin, im.norm.vmax) for ax in fig.axes for im in ax.images if isinstance(im.norm, LogNorm)}
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 1 and "uniform" in colourbars[0].get_ylabel()
    vmin, vmax = viz.map_scale(maps)
    assert vmax == pytest.approx(max(float(maps.max()) * 108, 10.0))
    assert vmin == 1.0
    assert viz.map_scale(torch.full((1, 1, 4, 4), 1 / 16)) == (1.0, 10.0)  # uniform: not stretched
    assert norms <= {(vmin, vmax)}
    assert fig.get_figwidth() <= viz.PAGE_WIDTH
    assert min(rendered_points(fig)) >= 9


def test_attention_panel_overlay_is_transparent_below_vmin():
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, 1, 1] = 1.0
    norm = LogNorm(vmin=0.1, vmax=16.0)
    overlay = viz._heat(maps[0, 0] * 16, norm, alpha=0.85)
    assert overlay[0, 0, 3] == 0 and overlay[1, 1, 3] == pytest.approx(0.85)


def test_attention_queries_can_differ_per_image_and_bad_shapes_are_named():
    images = torch.randn(2, 3, 36, 48)
    maps = random_maps(2, 1)
    fig = viz.plot_attention(images, maps, [[(1, 1)], [(5, 7)]], titles=["a", "b"])
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["a", "b"]
    with pytest.raises(ValueError, match="expected 2 images and 1 queries per image"):
        viz.plot_attention(images[:1], maps, [(1, 1)])
    with pytest.raises(ValueError, match="expected 2 panel titles"):
        viz.plot_attention(images, maps, [(1, 1)], titles=["only one"])


def test_segmentation_has_at_most_three_panels_per_row_and_readable_legend():
    images = torch.randn(2, 3, 36, 48)
    labels = torch.randint(0, 11, (2, 36, 48))
    labels[:, 0] = IGNORE_INDEX
    fig = viz.plot_segmentation(images, labels, {"A": labels, "B": labels})
    assert len([ax for ax in fig.axes if ax.images]) == 6
    assert min(rendered_points(fig)) >= 9
    with pytest.raises(ValueError, match="at most 2 models"):
        viz.plot_segmentation(images, labels, {"A": labels, "B": labels, "C": labels})


def test_curves_fit_the_page():
    history = {"loss": [2.0, 1.5, 1.2, 1.0, 0.9, 0.8], "eval": [{"step": 6, "miou": 0.2}]}
    fig = viz.plot_curves({"FCN": history, "non-local": history})
    assert fig.get_figwidth() <= viz.PAGE_WIDTH and min(rendered_points(fig)) >= 9


def test_show_stores_photos_as_jpeg_and_plots_as_png_and_closes_the_figure():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(torch.rand(60, 80, 3).numpy())
    picture = book.show(fig, photo=True)
    assert picture.data[:3] == b"\xff\xd8\xff" and picture._repr_png_() is None
    assert not plt.fignum_exists(fig.number)
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    picture = book.show(fig)
    assert picture.data[:8] == b"\x89PNG\r\n\x1a\n" and picture._repr_jpeg_() is None
    assert repr(picture) == "<png figure>"
    with pytest.raises(ValueError, match="expected a matplotlib Figure"):
        book.show("not a figure")


def record(device: str = "AMD EPYC (2 threads)", images: int = 8) -> dict:
    return {"run": {"device": device}, "metrics": {"images": images}}


def test_quick_profile_note_says_it_is_a_smoke_run_and_names_hardware_and_frames():
    note = book.profile_note("quick", {"FCN": record(), "non-local": record()})
    html = note._repr_html_()
    assert 'class="admonition warning"' in html and "not a result" in html
    assert "AMD EPYC (2 threads)" in html and "8 of the 233 test frames" in html and "FCN, non-local" in html
    full = book.profile_note("full", {"FCN": record("NVIDIA H100", 233)})._repr_html_()
    assert 'class="admonition note"' in full and "233 of the 233" in full and "smoke" not in full


def test_profile_note_refuses_mixed_evaluations_and_unknown_profiles():
    with pytest.raises(ValueError, match="same frames"):
        book.profile_note("quick", {"a": record(images=8), "b": record(images=16)})
    with pytest.raises(ValueError, match="unknown profile"):
        book.profile_note("medium", {"a": record()})
    with pytest.raises(ValueError, match="at least one"):
        book.profile_note("quick", {})


def test_say_renders_markdown_and_refuses_empty_text():
    assert book.say("mIoU **12.3 %**")._repr_markdown_() == "mIoU **12.3 %**"
    with pytest.raises(ValueError, match="non-empty Markdown"):
        book.say("  ")


def test_strip_timings_removes_execution_metadata_only():
    notebook = {"cells": [{"metadata": {"execution": {"iopub.status.busy": "2026"}, "tags": ["x"]}}, {}]}
    assert json.dumps(book.strip_timings(notebook)) == json.dumps({"cells": [{"metadata": {"tags": ["x"]}}, {}]})


def test_training_plan_quotes_the_schedule_and_the_measured_time_and_returns_the_schedule(capsys):
    from attnlib.train import PROFILES

    assert book.training_plan("quick", "two models (FCN, CCNet)") is PROFILES["quick"]
    plan = capsys.readouterr().out
    assert "two models (FCN, CCNet), 40 steps of 4 crops of 96×128 each" in plan
    assert f"about {book.SECONDS_PER_MODEL['quick']} s per model" in plan
    book.training_plan("full", "seven models")
    assert "not been measured yet" in capsys.readouterr().out
    with pytest.raises(ValueError, match="quick"):
        book.training_plan("fast", "one model")
