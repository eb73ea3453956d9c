r"""Block diagrams with tensor shapes, one visual language for every chapter.

Each chapter draws its block the way Wang et al. (2018, Fig. 2) draw the non-local
block: boxes for tensors and operations laid out top to bottom, circles where two
tensors meet, and every arrow labelled with the shape of the tensor it carries.
:class:`Diagram` does that with matplotlib alone.  The caller places each node on a
grid (``row`` grows downwards, ``col`` to the right; half cells such as ``col=0.5``
centre a node between two columns) and names the edges; nothing is laid out
automatically, so the figure is exactly what the code says.

Four kinds of node share one style everywhere:

==============  =======================================================================
``kind``        drawn as
==============  =======================================================================
``"tensor"``    a rounded, light blue box: an input or output, its shape on a second line
``"op"``        a white box: a convolution, projection, normalisation or reshape
``"attention"`` an orange box: where the attention weights are formed (softmax, affinity)
``"symbol"``    a circle around an operator: ``"+"`` (sum, ⊕), ``r"$\times$"`` (matrix
                product, ⊗ in the paper's figure), ``r"$\cdot\gamma$"`` (a scale)
==============  =======================================================================

**Readable at page width.**  The book shows a figure at most ~750 px wide.  Positions are
in inches (a column is ``col_width`` inches, a row ``row_height``) and fonts in points, so a
larger grid makes a wider figure rather than smaller text; :meth:`Diagram.draw` refuses a
figure so wide that its smallest text, scaled down to 750 px, would be under 9 px
(``fontsize × 750 / (width × 72) ≥ 9``).

A worked example — the attention of the embedded-Gaussian non-local block,
:math:`A = \operatorname{softmax}(\theta\phi^\top)`, for C = 128, d = 64 and a 45×60 map
(N = 2700); :func:`nonlocal_block` draws the whole block the same way:

>>> d = Diagram(title="Non-local attention")
>>> x = d.node("x", "$x$", shape="128×45×60", row=0, col=0.5, kind="tensor")
>>> theta = d.node("theta", r"$\theta$: 1×1 conv", row=1, col=0)
>>> phi = d.node("phi", r"$\phi$: 1×1 conv", row=1, col=1)
>>> s = d.node("s", r"$\times$", row=2, col=0.5, kind="symbol")
>>> a = d.node("a", "softmax over $j$", row=3, col=0.5, kind="attention")
>>> d.edge(x, theta, route="vhv"); d.edge(x, phi, route="vhv")
>>> d.edge(theta, s, label="2700×64"); d.edge(phi, s, label="64×2700")
>>> d.edge(s, a, label="2700×2700")
>>> fig = d.draw()
>>> len(fig.axes[0].patches)  # five boxes and circles, five arrows
10
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path

__all__ = ["Diagram", "nonlocal_block"]

KINDS = ("tensor", "op", "attention", "symbol")
ROUTES = ("auto", "straight", "vh", "hv", "vhv")

FONT = 11          # node labels (points)
EDGE_FONT = 10     # edge labels: the smallest text
TITLE_FONT = 12
SYMBOL_FONT = 14   # the operator inside a circle
PAGE_PX, MIN_PX = 750, 9
# The widest figure whose smallest text still renders at MIN_PX when shown PAGE_PX wide.
MAX_WIDTH = EDGE_FONT * PAGE_PX / (MIN_PX * 72)

PAD_X, PAD_Y = 0.12, 0.08         # inches between a label and its box
MIN_BOX = (0.9, 0.36)             # inches: short labels still get a box of the usual size
RADIUS = 0.17                     # inches, the circle of a symbol node
MARGIN = 0.12                     # inches around everything drawn
INK = "#333333"
STYLES = {
    "tensor": dict(facecolor="#e3ecf7", edgecolor="#4a6a8f", linewidth=1.1),
    "op": dict(facecolor="white", edgecolor=INK, linewidth=1.1),
    "attention": dict(facecolor="#fbd9ae", edgecolor="#c0661d", linewidth=1.4),
    "symbol": dict(facecolor="white", edgecolor=INK, linewidth=1.1),
}
ARROW = dict(arrowstyle="-|>,head_length=0.5,head_width=0.22", mutation_scale=14, color=INK, linewidth=1.1,
             joinstyle="miter", capstyle="butt")
DASHES = (0, (4, 2.5))
# Fixed here rather than taken from the caller's rcParams, so that the figure is the same in every
# notebook; applied with a context manager, so nothing is left changed.
RC = {"font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "mathtext.fontset": "dejavusans",
      "text.usetex": False}


@dataclass
class _Node:
    name: str
    label: str
    row: float
    col: float
    kind: str
    shape: str | None
    dashed: bool
    half: tuple[float, float] = (0.0, 0.0)  # half width, half height in inches, set by draw()


@dataclass
class _Edge:
    src: str
    dst: str
    label: str | None
    route: str
    via: list[tuple[float, float]] = field(default_factory=list)
    dashed: bool = False
    flip: bool = False


class Diagram:
    """A block diagram on a grid: add nodes and edges, then :meth:`draw` it.

    Args:
        title: drawn above the diagram (mathtext allowed), or ``None``.
        col_width: inches between the centres of two columns.
        row_height: inches between the centres of two rows.
    """

    def __init__(self, title: str | None = None, *, col_width: float = 1.9, row_height: float = 0.8) -> None:
        for name, value in (("col_width", col_width), ("row_height", row_height)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Diagram: expected {name} to be a positive number of inches, got {value!r}")
        self.title, self.col_width, self.row_height = title, float(col_width), float(row_height)
        self._nodes: dict[str, _Node] = {}
        self._edges: list[_Edge] = []

    def node(self, name: str, label: str, *, row: float, col: float, kind: str = "op", shape: str | None = None,
             dashed: bool = False) -> str:
        """Add a node and return its ``name`` (to pass to :meth:`edge`).

        ``label`` is matplotlib mathtext (``"$\\theta$: 1×1 conv"``; ``"\\n"`` breaks lines); for a
        ``"symbol"`` node it is the operator drawn inside the circle.  ``shape`` (a tensor's
        shape, e.g. ``"C×H×W"``) is written on a line of its own under the label.  ``dashed``
        marks an optional step.  The box grows to fit its text.
        """
        if name in self._nodes:
            raise ValueError(f"Diagram.node: expected a new name, got {name!r}, which is already a node")
        if kind not in KINDS:
            raise ValueError(f"Diagram.node: expected kind to be one of {KINDS}, got {kind!r}")
        for axis, value in (("row", row), ("col", col)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"Diagram.node: expected {axis} to be a number >= 0, got {value!r} for {name!r}")
        for other in self._nodes.values():
            if (other.row, other.col) == (row, col):
                raise ValueError(f"Diagram.node: expected each node in a cell of its own, got {name!r} in "
                                 f"(row={row}, col={col}), the cell of {other.name!r}")
        self._nodes[name] = _Node(name, label, float(row), float(col), kind, shape, dashed)
        return name

    def edge(self, src: str, dst: str, label: str | None = None, *, route: str = "auto",
             via: Sequence[tuple[float, float]] = (), dashed: bool = False, flip: bool = False) -> None:
        """Add an arrow from node ``src`` to node ``dst``, labelled with ``label`` (the shape it carries).

        ``route`` is the path between the two centres, clipped at the boxes:

        * ``"straight"`` — one segment (diagonal if the nodes are not aligned);
        * ``"vh"`` — down (or up) first, then across into the side of ``dst``;
        * ``"hv"`` — across first, then down into the top of ``dst`` (fan-out from one source);
        * ``"vhv"`` — down to half-way between the rows, across, down into ``dst`` (a bus);
        * ``"auto"`` — ``"straight"`` when the nodes share a row or a column, else ``"vh"``.

        ``via`` instead lists the corners as grid points ``(row, col)``, e.g. a residual that
        runs down a free column.  The label sits beside the longest vertical segment, on its
        right (``flip``: left), or above the longest horizontal one (``flip``: below) when the
        path has no vertical segment.
        """
        for end in (src, dst):
            if end not in self._nodes:
                raise ValueError(f"Diagram.edge: expected the name of a node ({', '.join(self._nodes) or 'none yet'}), "
                                 f"got {end!r}")
        if src == dst:
            raise ValueError(f"Diagram.edge: expected two different nodes, got an edge from {src!r} to itself")
        if route not in ROUTES:
            raise ValueError(f"Diagram.edge: expected route to be one of {ROUTES}, got {route!r}")
        if via and route != "auto":
            raise ValueError(f"Diagram.edge: expected either via or route, got both (route={route!r}, via={via!r})")
        self._edges.append(_Edge(src, dst, label, route, [tuple(map(float, p)) for p in via], dashed, flip))

    # ---- geometry, in inches (y grows upwards, so row r sits at y = -r * row_height) ----

    def _xy(self, row: float, col: float) -> tuple[float, float]:
        return col * self.col_width, -row * self.row_height

    def _corners(self, edge: _Edge) -> list[tuple[float, float]]:
        src, dst = self._nodes[edge.src], self._nodes[edge.dst]
        (sx, sy), (tx, ty) = self._xy(src.row, src.col), self._xy(dst.row, dst.col)
        route = edge.route
        if edge.via:
            return [self._xy(r, c) for r, c in edge.via]
        if route == "auto":
            route = "straight" if sx == tx or sy == ty else "vh"
        return {"straight": [], "vh": [(sx, ty)], "hv": [(tx, sy)],
                "vhv": [(sx, (sy + ty) / 2), (tx, (sy + ty) / 2)]}[route]

    def _path(self, edge: _Edge) -> list[tuple[float, float]]:
        """The arrow's points, from the border of ``src`` to the border of ``dst``."""
        src, dst = self._nodes[edge.src], self._nodes[edge.dst]
        points = [self._xy(src.row, src.col), *self._corners(edge), self._xy(dst.row, dst.col)]
        points = [p for i, p in enumerate(points) if i == 0 or p != points[i - 1]]  # a corner on a centre
        points[0] = self._border(src, points[1], edge)
        points[-1] = self._border(dst, points[-2], edge)
        return points

    def _border(self, node: _Node, toward: tuple[float, float], edge: _Edge) -> tuple[float, float]:
        """Where the segment from the centre of ``node`` to ``toward`` leaves its box."""
        cx, cy = self._xy(node.row, node.col)
        dx, dy = toward[0] - cx, toward[1] - cy
        if node.kind == "symbol":
            t = RADIUS / math.hypot(dx, dy)
        else:
            hw, hh = node.half
            t = min(hw / abs(dx) if dx else math.inf, hh / abs(dy) if dy else math.inf)
        if t >= 1:
            raise ValueError(f"Diagram.edge: the path of {edge.src!r} -> {edge.dst!r} turns inside the box of "
                             f"{node.name!r}; move the node or give corners with via")
        return cx + t * dx, cy + t * dy

    def _check_overlaps(self) -> None:
        nodes = list(self._nodes.values())
        for i, a in enumerate(nodes):
            (ax, ay), (aw, ah) = self._xy(a.row, a.col), a.half
            for b in nodes[i + 1:]:
                (bx, by), (bw, bh) = self._xy(b.row, b.col), b.half
                if abs(ax - bx) < aw + bw and abs(ay - by) < ah + bh:
                    raise ValueError(f"Diagram.draw: expected separate boxes, got {a.name!r} and {b.name!r} "
                                     "overlapping; widen col_width/row_height or move one of them")

    def _check_crossings(self, edge: _Edge, path: list[tuple[float, float]]) -> None:
        for node in self._nodes.values():
            if node.name in (edge.src, edge.dst):
                continue
            (cx, cy), (hw, hh) = self._xy(node.row, node.col), node.half
            if any(_crosses(p, q, (cx - hw, cx + hw, cy - hh, cy + hh)) for p, q in zip(path[:-1], path[1:])):
                raise ValueError(f"Diagram.draw: expected the arrow {edge.src!r} -> {edge.dst!r} to go around other "
                                 f"nodes, got it crossing {node.name!r}; choose another route or give corners with via")

    # ---- drawing ----

    def draw(self) -> Figure:
        """Draw the diagram and return the :class:`~matplotlib.figure.Figure` (the caller shows it).

        One inch of figure is one inch of grid: the figure's size is that of what is drawn,
        plus a small margin.  Raises ``ValueError`` for overlapping boxes, a path that turns
        inside a box, or a figure too wide to stay readable at page width.
        """
        if not self._nodes:
            raise ValueError("Diagram.draw: expected at least one node, got an empty diagram")
        with plt.rc_context(RC):
            fig = plt.figure(figsize=(1, 1), facecolor="white")
            try:
                self._draw(fig)
            except ValueError:
                plt.close(fig)
                raise
        return fig

    def _draw(self, fig: Figure) -> None:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        labels = {}
        for node in self._nodes.values():
            x, y = self._xy(node.row, node.col)
            text = node.label if node.shape is None else f"{node.label}\n{node.shape}"
            size = SYMBOL_FONT if node.kind == "symbol" else FONT
            labels[node.name] = ax.text(x, y, text, fontsize=size, ha="center", va="center", ma="center",
                                        zorder=4, gid=f"label:{node.name}")
            extent = labels[node.name].get_window_extent()
            w, h = extent.width / fig.dpi, extent.height / fig.dpi
            if node.kind == "symbol" and max(w, h) > 2 * RADIUS:
                raise ValueError(f"Diagram.draw: expected the symbol of {node.name!r} to fit its circle "
                                 f"({2 * RADIUS} in), got {node.label!r}, {max(w, h):.2f} in; use an \"op\" box")
            node.half = ((RADIUS, RADIUS) if node.kind == "symbol" else
                         (max(w / 2 + PAD_X, MIN_BOX[0] / 2), max(h / 2 + PAD_Y, MIN_BOX[1] / 2)))
        self._check_overlaps()

        for node in self._nodes.values():
            ax.add_patch(self._patch(node))
        points = []
        for edge in self._edges:
            path = self._path(edge)
            self._check_crossings(edge, path)
            points += path
            ax.add_patch(FancyArrowPatch(path=Path(path), linestyle=DASHES if edge.dashed else "-", zorder=2,
                                         gid=f"edge:{edge.src}->{edge.dst}", **ARROW))
            if edge.label is not None:
                self._label(ax, edge, path)

        # The figure is the box around the nodes and arrows, grown to hold every text.
        for node in self._nodes.values():
            (x, y), (hw, hh) = self._xy(node.row, node.col), node.half
            points += [(x - hw, y - hh), (x + hw, y + hh)]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if self.title is not None:
            ax.text((min(xs) + max(xs)) / 2, max(ys) + 0.12, self.title, fontsize=TITLE_FONT, ha="center",
                    va="bottom", gid="title")
        self._fit(fig, ax, (min(xs), max(xs), min(ys), max(ys)))
        for text in ax.texts:
            box = text.get_window_extent().transformed(ax.transData.inverted())
            xs += [box.x0, box.x1]
            ys += [box.y0, box.y1]
        width = self._fit(fig, ax, (min(xs), max(xs), min(ys), max(ys)))
        if width > MAX_WIDTH:
            raise ValueError(f"Diagram.draw: expected a figure at most {MAX_WIDTH:.1f} in wide, so that "
                             f"{EDGE_FONT} pt text stays >= {MIN_PX} px at {PAGE_PX} px page width; got "
                             f"{width:.1f} in — use fewer columns or a smaller col_width")

    @staticmethod
    def _fit(fig: Figure, ax, bounds: tuple[float, float, float, float]) -> float:
        """Make the figure exactly the bounds plus the margin, one inch per inch of grid; return its width."""
        x0, x1, y0, y1 = bounds
        ax.set_xlim(x0 - MARGIN, x1 + MARGIN)
        ax.set_ylim(y0 - MARGIN, y1 + MARGIN)
        width = x1 - x0 + 2 * MARGIN
        fig.set_size_inches(width, y1 - y0 + 2 * MARGIN)
        return width

    def _patch(self, node: _Node):
        x, y = self._xy(node.row, node.col)
        style = dict(STYLES[node.kind], linestyle=DASHES if node.dashed else "-", zorder=3, gid=f"node:{node.name}")
        if node.kind == "symbol":
            return Circle((x, y), RADIUS, **style)
        hw, hh = node.half
        box = "round,pad=0,rounding_size=0.09" if node.kind == "tensor" else "square,pad=0"
        return FancyBboxPatch((x - hw, y - hh), 2 * hw, 2 * hh, boxstyle=box, **style)

    @staticmethod
    def _label(ax, edge: _Edge, path: list[tuple[float, float]]) -> None:
        segments = list(zip(path[:-1], path[1:]))
        vertical = [s for s in segments if s[0][0] == s[1][0]]
        (x0, y0), (x1, y1) = max(vertical or segments, key=lambda s: math.dist(*s))
        sign = -1 if edge.flip else 1
        if x0 == x1 or y0 != y1:  # beside a vertical (or slanted) segment
            offset, ha, va = (5 * sign, 0), ("right" if edge.flip else "left"), "center"
        else:                     # above or below a horizontal one
            offset, ha, va = (0, 3 * sign), "center", ("top" if edge.flip else "bottom")
        ax.annotate(edge.label, ((x0 + x1) / 2, (y0 + y1) / 2), xytext=offset, textcoords="offset points",
                    fontsize=EDGE_FONT, ha=ha, va=va, color=INK, zorder=4, gid=f"edge-label:{edge.src}->{edge.dst}")


def _crosses(p: tuple[float, float], q: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    """Whether the segment p-q enters the open box (x0, x1, y0, y1) (Liang-Barsky clipping)."""
    (px, py), (dx, dy) = p, (q[0] - p[0], q[1] - p[1])
    x0, x1, y0, y1 = box
    low, high = 0.0, 1.0
    for step, near, far in ((dx, x0 - px, x1 - px), (dy, y0 - py, y1 - py)):
        if step == 0:
            if not near < 0 < far:  # parallel to this side and outside (or on) the box
                return False
            continue
        t0, t1 = sorted((near / step, far / step))
        low, high = max(low, t0), min(high, t1)
    return high - low > 1e-9


def nonlocal_block(channels: int = 128, inter: int = 64, height: int = 45, width: int = 60,
                   sub_sample: bool = False, use_scale: bool = True) -> Figure:
    r"""The embedded-Gaussian non-local block (:class:`attnlib.NonLocal2d`) with its tensor shapes.

    Drawn after Wang et al. (2018, Fig. 2) for one image (batch dimension left out):
    :math:`\theta, \phi, g` are 1×1 convolutions C→d, flattened to N×d (N = HW);
    :math:`S = \theta\phi^\top` is N×N; :math:`A` is its softmax over each row (of
    :math:`S/\sqrt{d}` with ``use_scale``, as :class:`attnlib.NonLocal2d` by default);
    :math:`Y = A g` is N×d, reshaped to d×H×W; :math:`W_z` (1×1 conv d→C, then BatchNorm
    initialised to zero) brings it back to C channels and the residual gives
    :math:`z = W_z y + x`.  The defaults are the book's trained head: C = 128, d = 64 on a
    45×60 map, N = 2700.  ``sub_sample`` adds the optional 2×2 max-pool of :math:`\phi`
    and :math:`g` (dashed), which leaves :math:`N_k = \lfloor H/2\rfloor\lfloor W/2\rfloor` keys.
    """
    for name, value in (("channels", channels), ("inter", inter), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"nonlocal_block: expected {name} to be a positive int, got {value!r}")
    if sub_sample and (height < 2 or width < 2):
        raise ValueError(f"nonlocal_block: sub_sample pools by 2×2, so expected height, width >= 2, "
                         f"got {height}×{width}")
    n = height * width
    keys = (height // 2) * (width // 2) if sub_sample else n
    c, d, p = channels, inter, int(sub_sample)  # p: the extra row the pooling takes
    grid = f"{height}×{width}"

    dia = Diagram(title="Non-local block (embedded Gaussian)" + (", sub-sampled" if sub_sample else ""))
    x = dia.node("x", "$x$", shape=f"{c}×{grid}", row=0, col=1, kind="tensor")
    theta = dia.node("theta", r"$\theta$: 1×1 conv", row=1, col=0)
    phi = dia.node("phi", r"$\phi$: 1×1 conv", row=1, col=1)
    g = dia.node("g", "$g$: 1×1 conv", row=1, col=2)
    dia.edge(x, theta, route="vhv")
    dia.edge(x, phi)
    dia.edge(x, g, route="vhv")
    if sub_sample:
        phi_pool = dia.node("phi_pool", "2×2 max-pool", row=2, col=1, dashed=True)
        g_pool = dia.node("g_pool", "2×2 max-pool", row=2, col=2, dashed=True)
        dia.edge(phi, phi_pool, label=f"{d}×{grid}")
        dia.edge(g, g_pool, label=f"{d}×{grid}")
        phi, g = phi_pool, g_pool  # the keys and values now come from the pooled grid
    scores = dia.node("scores", r"$\times$", row=2 + p, col=0.5, kind="symbol")
    logits = r"softmax of $S/\sqrt{d}$, each row" if use_scale else "softmax over each row"
    softmax = dia.node("softmax", logits, row=3 + p, col=0.5, kind="attention")
    mix = dia.node("mix", r"$\times$", row=4 + p, col=0.5, kind="symbol")
    w_z = dia.node("w_z", "$W_z$: 1×1 conv, BN (zero-init)", row=5 + p, col=0.5)
    add = dia.node("add", "+", row=6 + p, col=0.5, kind="symbol")
    z = dia.node("z", "$z$", shape=f"{c}×{grid}", row=7 + p, col=0.5, kind="tensor")
    dia.edge(theta, scores, label=f"{n}×{d}")
    dia.edge(phi, scores, label=f"{d}×{keys}")                 # φ transposed: d×N_k
    dia.edge(scores, softmax, label=f"{n}×{keys}")
    dia.edge(softmax, mix, label=f"{n}×{keys}")
    dia.edge(g, mix, label=f"{keys}×{d}")
    dia.edge(mix, w_z, label=f"{d}×{grid}")                    # Y = A g, N×d reshaped to d×H×W
    dia.edge(w_z, add, label=f"{c}×{grid}")
    dia.edge(x, add, via=[(0, 2.55), (6 + p, 2.55)])           # the residual, down a free column
    dia.edge(add, z)
    return dia.draw()
