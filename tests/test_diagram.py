"""The block-diagram helper: structure of the drawn figures, readability, and its errors.

The checks read the artists, not pixels: one text per label, one arrow per edge, boxes that
do not overlap, edge labels off the boxes, every text at least 9 px when the figure is shown
750 px wide.  Besides the non-local block (a library function), the tests draw GCNet's context
block and CCNet's criss-cross attention, to hold that the same API serves other chapters.
"""
from __future__ import annotations

import doctest
import io
import itertools

import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib.patches import FancyArrowPatch
from matplotlib.text import Text

import attnlib.diagram
from attnlib.diagram import Diagram, nonlocal_block


@pytest.fixture(autouse=True)
def close_new_figures():
    before = set(plt.get_fignums())
    yield
    for number in set(plt.get_fignums()) - before:
        plt.close(number)


def context_block() -> Diagram:
    """GCNet's global context block (the paper's notation: W_v1 is C→C/r)."""
    d = Diagram(title="Global context block")
    x = d.node("x", "$x$", shape="C×H×W", row=0, col=1, kind="tensor")
    w_k = d.node("w_k", "$W_k$: 1×1 conv", row=1, col=0)
    softmax = d.node("softmax", "softmax over $N$", row=2, col=0, kind="attention")
    pool = d.node("pool", r"$\times$", row=3, col=1, kind="symbol")
    w_v1 = d.node("w_v1", "$W_{v1}$: 1×1 conv", row=4, col=1)
    norm = d.node("norm", "LayerNorm, ReLU", row=5, col=1)
    w_v2 = d.node("w_v2", "$W_{v2}$: 1×1 conv", row=6, col=1)
    add = d.node("add", "+", row=7, col=1, kind="symbol")
    z = d.node("z", "$z$", shape="C×H×W", row=8, col=1, kind="tensor")
    d.edge(x, w_k, route="vhv")
    d.edge(w_k, softmax, label="1×H×W")
    d.edge(softmax, pool, label="N×1")
    d.edge(x, pool, label="C×N")
    d.edge(pool, w_v1, label="C×1×1")
    d.edge(w_v1, norm, label="C/r×1×1")
    d.edge(norm, w_v2, label="C/r×1×1")
    d.edge(w_v2, add, label="C×1×1")
    d.edge(x, add, via=[(0, 1.75), (7, 1.75)])
    d.edge(add, z)
    return d


def criss_cross() -> Diagram:
    """CCNet's criss-cross attention, one pass."""
    d = Diagram(title="Criss-cross attention")
    x = d.node("x", "$x$", shape="C×H×W", row=0, col=1, kind="tensor")
    q = d.node("q", "$Q$: 1×1 conv", row=1, col=0)
    k = d.node("k", "$K$: 1×1 conv", row=1, col=1)
    v = d.node("v", "$V$: 1×1 conv", row=1, col=2)
    affinity = d.node("affinity", "affinity", row=2, col=0.5, kind="attention")
    softmax = d.node("softmax", "softmax over $H+W-1$", row=3, col=0.5, kind="attention")
    aggregate = d.node("aggregate", "aggregation", row=4, col=0.5)
    scale = d.node("scale", r"$\cdot\gamma$", row=5, col=0.5, kind="symbol")
    add = d.node("add", "+", row=6, col=0.5, kind="symbol")
    out = d.node("out", "$x'$", shape="C×H×W", row=7, col=0.5, kind="tensor")
    for target in (q, k, v):
        d.edge(x, target, route="vhv")
    d.edge(q, affinity, label="C′×H×W")
    d.edge(k, affinity, label="C′×H×W")
    d.edge(affinity, softmax, label="(H+W−1)×H×W")
    d.edge(softmax, aggregate, label="(H+W−1)×H×W")
    d.edge(v, aggregate, label="C×H×W")
    d.edge(aggregate, scale, label="C×H×W")
    d.edge(scale, add, label="C×H×W")
    d.edge(x, add, via=[(0, 2.6), (6, 2.6)])
    d.edge(add, out)
    return d


# (figure, nodes, edges, labelled edges, edge labels that must appear)
CASES = {
    "nonlocal": (nonlocal_block, 10, 12, 7, {"2700×64", "64×2700", "2700×2700", "64×45×60", "128×45×60"}),
    "nonlocal_sub_sample": (lambda: nonlocal_block(sub_sample=True), 12, 14, 9,
                            {"2700×64", "64×660", "2700×660", "660×64"}),
    "context_block": (lambda: context_block().draw(), 9, 10, 7, {"N×1", "C×N", "C/r×1×1"}),
    "criss_cross": (lambda: criss_cross().draw(), 10, 12, 7, {"C′×H×W", "(H+W−1)×H×W"}),
}


def by_gid(artists, prefix):
    return [a for a in artists if (a.get_gid() or "").startswith(prefix)]


def texts(fig):
    return [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]


@pytest.mark.parametrize("case", CASES)
def test_one_artist_per_label_and_per_edge(case):
    draw, nodes, edges, labelled, shapes = CASES[case]
    fig = draw()
    ax, = fig.axes
    assert len(texts(fig)) == nodes + labelled + 1  # + the title
    assert len(by_gid(ax.texts, "label:")) == nodes
    edge_labels = by_gid(ax.texts, "edge-label:")
    assert len(edge_labels) == labelled
    assert shapes <= {t.get_text() for t in edge_labels}
    assert len(by_gid(ax.patches, "node:")) == nodes
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == edges and all(a.get_gid().startswith("edge:") for a in arrows)


@pytest.mark.parametrize("case", CASES)
def test_boxes_and_labels_do_not_overlap(case):
    fig = CASES[case][0]()
    ax, = fig.axes
    fig.canvas.draw()
    boxes = {p.get_gid(): p.get_window_extent() for p in by_gid(ax.patches, "node:")}
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), (a, b)
    for label in by_gid(ax.texts, "edge-label:"):
        extent = label.get_window_extent()
        for name, box in boxes.items():
            assert not extent.overlaps(box), (label.get_text(), name)
    # every node label sits inside its own box
    for label in by_gid(ax.texts, "label:"):
        box = boxes["node:" + label.get_gid().removeprefix("label:")]
        extent = label.get_window_extent()
        assert box.x0 < extent.x0 and extent.x1 < box.x1, label.get_text()


@pytest.mark.parametrize("case", CASES)
def test_text_readable_at_page_width(case):
    fig = CASES[case][0]()
    width = fig.get_size_inches()[0]
    assert width <= 750 / 72 * 10 / 9  # the 10 pt edge labels render >= 9 px at 750 px
    for text in texts(fig):
        assert text.get_fontsize() * 750 / (width * 72) >= 9, (text.get_text(), text.get_fontsize(), width)


def test_nonlocal_figure_size():
    """The book's head fits the page: about 6 inches wide, taller than wide, like the paper's Fig. 2."""
    w, h = nonlocal_block().get_size_inches()
    assert 5 < w < 7 and w < h < 8


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40, metadata={"Software": None})
    return buffer.getvalue()


def test_rcparams_untouched_and_output_deterministic():
    before = dict(matplotlib.rcParams)
    reference = png(nonlocal_block())
    assert dict(matplotlib.rcParams) == before
    with matplotlib.rc_context({"font.size": 20, "font.family": "serif", "mathtext.fontset": "cm"}):
        styled = png(nonlocal_block())  # the caller's style does not reach the diagram
    assert styled == reference
    assert dict(matplotlib.rcParams) == before


def test_arrows_end_on_the_boxes():
    d = Diagram()
    a = d.node("a", "a", row=0, col=0)
    b = d.node("b", "+", row=1, col=0, kind="symbol")
    c = d.node("c", "c", row=1, col=1, kind="tensor")
    d.edge(a, b)
    d.edge(a, c, route="hv")
    d.draw()
    (x0, y0), (x1, y1) = d._path(d._edges[0])
    a_half, radius = d._nodes["a"].half[1], attnlib.diagram.RADIUS
    assert (x0, x1) == (0, 0)
    assert y0 == pytest.approx(-a_half) and y1 == pytest.approx(-d.row_height + radius)
    path = d._path(d._edges[1])
    assert path == [pytest.approx((d._nodes["a"].half[0], 0)), (d.col_width, 0),
                    pytest.approx((d.col_width, -d.row_height + d._nodes["c"].half[1]))]


def test_module_docstring_example():
    result = doctest.testmod(attnlib.diagram, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def two_nodes() -> Diagram:
    d = Diagram()
    d.node("a", "a", row=0, col=0)
    d.node("b", "b", row=1, col=0)
    return d


@pytest.mark.parametrize("call, message", [
    (lambda d: d.node("a", "again", row=2, col=0), "already a node"),
    (lambda d: d.node("c", "c", row=1, col=0), "cell of 'b'"),
    (lambda d: d.node("c", "c", row=2, col=0, kind="box"), "kind to be one of"),
    (lambda d: d.node("c", "c", row=-1, col=0), "row to be a number >= 0"),
    (lambda d: d.edge("a", "nowhere"), "got 'nowhere'"),
    (lambda d: d.edge("a", "a"), "to itself"),
    (lambda d: d.edge("a", "b", route="curvy"), "route to be one of"),
    (lambda d: d.edge("a", "b", route="vh", via=[(0, 1)]), "either via or route"),
])
def test_input_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(two_nodes())


@pytest.mark.parametrize("build, message", [
    (lambda d: d.node("c", "c", row=0, col=0.3), "'a' and 'c' overlapping"),
    (lambda d: (d.node("c", "c", row=2, col=0), d.edge("a", "c")), "crossing 'b'"),
    (lambda d: [d.node(f"n{i}", "n", row=2, col=i) for i in range(7)], "at most 11.6 in wide"),
    (lambda d: d.node("c", "matrix product", row=2, col=0, kind="symbol"), "fit its circle"),
])
def test_draw_errors_leave_no_figure(build, message):
    d = two_nodes()
    build(d)
    before = plt.get_fignums()
    with pytest.raises(ValueError, match=message):
        d.draw()
    assert plt.get_fignums() == before


def test_empty_diagram_and_bad_arguments():
    with pytest.raises(ValueError, match="empty diagram"):
        Diagram().draw()
    with pytest.raises(ValueError, match="col_width"):
        Diagram(col_width=0)
    with pytest.raises(ValueError, match="inter to be a positive int"):
        nonlocal_block(inter=0)
    with pytest.raises(ValueError, match="height, width >= 2"):
        nonlocal_block(height=1, sub_sample=True)
