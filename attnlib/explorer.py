r"""The attention explorer: point at a pixel of the photo and see where the block looks.

The static figures show a few chosen queries.  The explorer precomputes a block's
effective maps (:func:`attnlib.attention_map`) for a whole grid of queries over a few
frames and writes **one self-contained** ``text/html`` **output**: hovering over (or
tapping) the photo selects the nearest query, whose map is drawn over the photo with its
statistics beside it.  It has no external file, library, font or widget, so it runs
wherever a notebook's HTML output runs its scripts: the Jupyter Book site, JupyterLab
(trusted notebooks) and Colab.

**The colour scale** is the book's shared one.  A map :math:`a` over the :math:`N = hw`
feature cells is shown as :math:`N a`, the attention *relative to uniform* (1: the query
spreads its weight evenly), at the position

.. math::

    t = \operatorname{clip}\!\left(
        \frac{\log (N a / v_{\min})}{\log (v_{\max} / v_{\min})},\ 0,\ 1\right)

of a logarithmic scale from ``vmin`` to ``vmax`` (one scale for every query and frame of an
explorer), coloured by matplotlib's ``inferno`` at :math:`t` with opacity
:math:`0.85\sqrt{t}`: cells at or below ``vmin`` are transparent, so the photo stays
visible where the query does not look.

**The encoding** keeps a chapter's output within a byte budget (300 KB by default):

* photos are JPEG data URIs, 320 px wide, quality 75;
* maps are average-pooled over ``pool``×``pool`` cells, where ``pool`` divides h and w.
  The mean of :math:`N a` over a tile is :math:`N' a'` on the coarse grid of
  :math:`N' = N/\text{pool}^2` cells, with :math:`a'` the tile's mass, so pooling keeps
  the scale's meaning;
* each pooled value is stored as the byte :math:`\operatorname{round}(255\,t)`, base64
  encoded: the error is at most half a step, :math:`\tfrac{1}{510}` of the scale's
  log range.

The browser turns each byte back into :math:`N a` (values at or below ``vmin`` come back as
``vmin``), interpolates bilinearly to the photo, as the static figures do, and only then
takes the logarithm and the colour.  The 256 colours and opacities of the scale are
computed here from matplotlib and embedded, so page and figures agree.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from PIL import Image
from torch import nn

from ._checks import check_positive, check_query
from .viz import attention_maps

__all__ = ["Explorer", "effective_maps", "query_grid"]

ALPHA = 0.85  # opacity at the top of the scale, as in the static figures
LEVELS = 255  # t is stored as round(255 t): one byte per pooled cell


def query_grid(h: int, w: int, step: int = 5) -> list[tuple[int, int]]:
    """The centre cells of the ``step``×``step`` tiles that cover an h×w grid, in raster order.

    ``query_grid(45, 60)`` gives the 9×12 queries (2, 2), (2, 7), …, (42, 57): every one
    sits ``step // 2`` cells or more inside the border.  When ``step`` does not divide a
    side, the tiles are centred and the rest is split between both ends.
    """
    for value, name in ((h, "h"), (w, "w"), (step, "step")):
        check_positive(value, name)
    if step > min(h, w):
        raise ValueError(f"query_grid: expected step <= min(h, w) = {min(h, w)} (one tile or more per side), got {step}")
    rows = [(h % step) // 2 + step // 2 + step * k for k in range(h // step)]
    cols = [(w % step) // 2 + step // 2 + step * k for k in range(w // step)]
    return [(i, j) for i in rows for j in cols]


@torch.no_grad()
def effective_maps(model: nn.Module, block: nn.Module, images: torch.Tensor,
                   queries: Sequence[tuple[int, int]]) -> torch.Tensor:
    """F×Q×h×w on the CPU: ``block``'s effective map for each query, on what ``model`` feeds it.

    ``images`` are F network inputs (F×3×H×W, normalised), run one at a time through
    :func:`attnlib.viz.attention_maps` so that a block's N×N attention is held for one frame
    only.  The model runs in eval mode, the mode it is shown in; every module's mode is put
    back afterwards.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"effective_maps: expected images of shape (F, 3, H, W), got {shape}")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return torch.cat([attention_maps(model, block, images[f:f + 1], queries).float().cpu()
                          for f in range(images.shape[0])])
    finally:
        for module, training in modes:
            module.train(training)


def _array(x: object, name: str) -> np.ndarray:
    """A tensor or array-like as a NumPy array (on the CPU, detached)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Explorer: expected {name} to be a tensor or an array, got {type(x).__name__}") from error


def _photo_pixels(photos: object, frames: int) -> np.ndarray:
    """F×3×H×W (or F×H×W×3, as :func:`attnlib.data.denormalize` returns) in [0, 1] or uint8 → F×H×W×3 uint8."""
    x = _array(photos, "photos")
    channels_last = x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] == 3
    if x.ndim != 4 or not (x.shape[1] == 3 or channels_last) or x.shape[0] != frames:
        raise ValueError(f"Explorer: expected photos of shape ({frames}, 3, H, W) or ({frames}, H, W, 3) "
                         f"to match the maps' {frames} frames, got {tuple(x.shape)}")
    if not channels_last:
        x = x.transpose(0, 2, 3, 1)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"Explorer: expected float photos in [0, 1] or uint8 photos, got dtype {x.dtype}")
    low, high = float(x.min()), float(x.max())
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(f"Explorer: expected float photos in [0, 1] (network inputs need attnlib.data.denormalize "
                         f"first), got values in [{low:.3g}, {high:.3g}]")
    return np.rint(x * 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, width: int, quality: int) -> tuple[str, tuple[int, int]]:
    """An H×W×3 uint8 picture as a JPEG data URI ``width`` pixels wide (never enlarged), and its (width, height)."""
    image = Image.fromarray(pixels)
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.size


def _quantise(maps: np.ndarray, pool: int, vmin: float, vmax: float) -> np.ndarray:
    """F×Q×h×w maps → F×Q×(h/pool)×(w/pool) bytes round(255 t), t the position of N·a on the log scale."""
    f, q, h, w = maps.shape
    relative = (h * w * maps.astype(np.float64)).reshape(f, q, h // pool, pool, w // pool, pool).mean(axis=(3, 5))
    with np.errstate(divide="ignore"):  # a zero weight lies at log 0 = -inf: below vmin, transparent
        t = np.log(relative / vmin) / math.log(vmax / vmin)
    return np.rint(LEVELS * np.clip(t, 0.0, 1.0)).astype(np.uint8)


def _colour_table(alpha: float) -> bytes:
    """The scale's 256 RGBA colours: inferno at t = k/255, opacity ``alpha``·√t."""
    t = np.arange(LEVELS + 1) / LEVELS
    rgba = matplotlib.colormaps["inferno"](t)
    rgba[:, 3] = alpha * np.sqrt(t)
    return np.rint(255 * rgba).astype(np.uint8).tobytes()


def _script_json(value: object) -> str:
    """JSON that is safe inside an inline ``<script>``: ASCII only and no ``</``."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("</", "<\\/")


class Explorer:
    r"""An interactive view of F frames × Q queries of attention maps, as one HTML output.

    In a notebook, ending a cell with the explorer displays it (:meth:`_repr_html_`);
    :meth:`html` returns the same string.  The same inputs give byte-identical HTML: the
    element id derives from ``name`` and a hash of the content, so several explorers can
    share a page and a re-executed notebook diffs cleanly.

    Args:
        photos: F×3×H×W float pictures in [0, 1] (already denormalised) or uint8; F×H×W×3,
            what :func:`attnlib.data.denormalize` returns, is accepted too.
        maps: F×Q×h×w attention on the feature grid (each a distribution summing to 1, or to
            what the block's normaliser gives); N·a is shown, N = hw.
        queries: the Q query cells (i, j) of the maps, e.g. :func:`query_grid`.
        vmin, vmax: the ends of the logarithmic colour scale of N·a, 0 < vmin < vmax.
        stats: ``{"entropy / log N": F×Q array, ...}``, shown beside the photo for the
            selected query, each value written by ``fmt``.
        labels: F sequences of Q strings (e.g. the query's class), shown as "class".
        title: a line above the explorer.
        name: names the explorer in its element id; give explorers on one page different
            names.
        fmt: a format string for the statistics, ``"{:.2f}"``, or one per statistic.
        pool: the map pooling factor; ``None`` takes the smallest common divisor of h and w
            whose output fits ``max_bytes``.
        photo_width, quality: the photos' JPEG width in pixels and quality.
        max_bytes: the most the HTML may weigh (UTF-8 bytes).

    Raises ``ValueError`` for inputs of the wrong shape, type or range, naming what was
    expected and what came, and when no allowed ``pool`` brings the output within
    ``max_bytes``.
    """

    def __init__(self, photos: object, maps: object, queries: Sequence[tuple[int, int]], *, vmin: float,
                 vmax: float, stats: Mapping[str, object] | None = None,
                 labels: Sequence[Sequence[str]] | None = None, title: str = "", name: str = "explorer",
                 fmt: str | Mapping[str, str] = "{:.2f}", pool: int | None = None, photo_width: int = 320,
                 quality: int = 75, max_bytes: int = 300_000) -> None:
        maps = _array(maps, "maps")
        if maps.ndim != 4 or not np.issubdtype(maps.dtype, np.floating) or 0 in maps.shape:
            raise ValueError(f"Explorer: expected non-empty float maps of shape (F, Q, h, w), "
                             f"got shape {tuple(maps.shape)} and dtype {maps.dtype}")
        if not np.isfinite(maps).all() or maps.min() < 0:
            raise ValueError(f"Explorer: expected finite, non-negative attention maps, "
                             f"got values in [{maps.min():.3g}, {maps.max():.3g}]")
        frames, count, h, w = maps.shape
        if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence) or len(queries) != count:
            got = len(queries) if isinstance(queries, Sequence) else type(queries).__name__
            raise ValueError(f"Explorer: expected {count} queries to match the maps {tuple(maps.shape)}, got {got}")
        self.queries = [check_query(q, h, w) for q in queries]
        if not (isinstance(vmin, numbers.Real) and isinstance(vmax, numbers.Real) and 0 < vmin < vmax < math.inf):
            raise ValueError(f"Explorer: expected 0 < vmin < vmax (a logarithmic scale), got vmin={vmin!r}, vmax={vmax!r}")
        for value, what in ((photo_width, "photo_width"), (max_bytes, "max_bytes")):
            check_positive(value, what)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"Explorer: expected a JPEG quality between 1 and 100, got {quality!r}")
        divisors = [k for k in range(1, min(h, w) + 1) if h % k == 0 and w % k == 0]
        if pool is not None and (isinstance(pool, bool) or pool not in divisors):
            raise ValueError(f"Explorer: expected pool to divide both sides of the {h}x{w} maps "
                             f"(one of {divisors}), got {pool!r}")

        self.frames, self.shape = frames, (h, w)
        self.vmin, self.vmax = float(vmin), float(vmax)
        self.title, self.name, self.max_bytes = str(title), str(name), max_bytes
        self._maps = maps
        self._stats = self._format_stats(stats, fmt, frames, count)
        self._labels = self._check_labels(labels, frames, count)
        jpegs = [_jpeg(p, photo_width, quality) for p in _photo_pixels(photos, frames)]
        self._photos, self._photo_size = [uri for uri, _ in jpegs], jpegs[0][1]
        self._colours = base64.b64encode(_colour_table(ALPHA)).decode("ascii")

        sizes = {}
        for k in ([pool] if pool is not None else divisors):
            self.pool = k
            self._html = self._render()
            sizes[k] = self.nbytes
            if self.nbytes <= max_bytes:
                return
        tried = ", ".join(f"{s:,} bytes with pool {k}" for k, s in sizes.items())
        raise ValueError(f"Explorer: expected the HTML to weigh at most max_bytes={max_bytes:,} bytes, got {tried} "
                         f"({frames} photos take {sum(map(len, self._photos)):,}); lower photo_width or quality, "
                         f"show fewer frames or queries, or raise max_bytes")

    @staticmethod
    def _format_stats(stats: Mapping[str, object] | None, fmt: str | Mapping[str, str], frames: int,
                      count: int) -> list[list]:
        """``[[name, F×Q formatted strings], ...]`` in the mapping's order."""
        if stats is None:
            return []
        if not isinstance(stats, Mapping):
            raise ValueError(f"Explorer: expected stats to be a mapping name -> array (F, Q), got {type(stats).__name__}")
        formatted = []
        for name, values in stats.items():
            values = _array(values, f"stats[{name!r}]")
            if values.shape != (frames, count) or not np.issubdtype(values.dtype, np.number):
                raise ValueError(f"Explorer: expected stats[{name!r}] to be numbers of shape ({frames}, {count}) "
                                 f"(frames, queries), got shape {tuple(values.shape)} and dtype {values.dtype}")
            spec = fmt.get(name, "{:.2f}") if isinstance(fmt, Mapping) else fmt
            formatted.append([str(name), [[spec.format(float(v)) for v in row] for row in values]])
        return formatted

    @staticmethod
    def _check_labels(labels: Sequence[Sequence[str]] | None, frames: int, count: int) -> list[list[str]] | None:
        """The F×Q labels as lists of strings, or ``None``."""
        if labels is None:
            return None
        shape_ok = (isinstance(labels, Sequence) and len(labels) == frames
                    and all(isinstance(row, Sequence) and not isinstance(row, str) and len(row) == count
                            for row in labels))
        if not shape_ok:
            got = [len(row) if isinstance(row, Sequence) else type(row).__name__ for row in labels] \
                if isinstance(labels, Sequence) else type(labels).__name__
            raise ValueError(f"Explorer: expected labels as {frames} sequences of {count} strings (frames, queries), "
                             f"got {got}")
        return [[str(s) for s in row] for row in labels]

    @property
    def nbytes(self) -> int:
        """The size of :meth:`html` in bytes (UTF-8)."""
        return len(self._html.encode("utf-8"))

    def html(self) -> str:
        """The self-contained HTML: markup, a scoped stylesheet and one inline script (an IIFE)."""
        return self._html

    def _repr_html_(self) -> str:
        return self._html

    def __repr__(self) -> str:
        return (f"Explorer({self.name!r}: {self.frames} frames x {len(self.queries)} queries on "
                f"{self.shape[0]}x{self.shape[1]}, pool {self.pool}, {self.nbytes:,} bytes)")

    def _initial_query(self) -> int:
        """The query nearest the grid's centre (the first on ties): what the page shows before any hover."""
        ci, cj = (self.shape[0] - 1) / 2, (self.shape[1] - 1) / 2
        return min(range(len(self.queries)), key=lambda k: (self.queries[k][0] - ci) ** 2 + (self.queries[k][1] - cj) ** 2)

    def _render(self) -> str:
        h, w = self.shape
        ph, pw = h // self.pool, w // self.pool
        codes = _quantise(self._maps, self.pool, self.vmin, self.vmax)
        data = {
            "feature": [h, w], "grid": [ph, pw], "queries": [list(q) for q in self.queries],
            "vmin": self.vmin, "vmax": self.vmax, "start": self._initial_query(),
            "maps": base64.b64encode(codes.tobytes()).decode("ascii"), "colours": self._colours,
            "photos": [None] + self._photos[1:],  # the first one is the <img>'s src already
            "stats": self._stats, "labels": self._labels, "title": self.title,
        }
        payload = _script_json(data)
        digest = hashlib.sha256((self.name + "\0" + self._photos[0] + "\0" + payload).encode("utf-8")).hexdigest()
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", self.name).strip("-") or "explorer"
        uid = f"attnlib-{slug}-{digest[:12]}"

        width, height = self._photo_size
        ticks = [self.vmin] + ([1.0] if self.vmin < 1.0 < self.vmax else []) + [self.vmax]
        tick_marks = "".join(
            f'<span style="left:{100 * math.log(v / self.vmin) / math.log(self.vmax / self.vmin):.2f}%">{v:g}</span>'
            for v in ticks)
        buttons = "".join(f'<button type="button" data-frame="{f}" aria-pressed="{str(f == 0).lower()}">'
                          f'{f + 1}</button>' for f in range(self.frames)) if self.frames > 1 else ""
        title = f'<div class="ax-title">{html.escape(self.title)}</div>' if self.title else ""
        alt = html.escape(f"{self.title + ': ' if self.title else ''}frame 1 of {self.frames}", quote=True)
        frames = f'<div class="ax-frames" role="group" aria-label="frame">frame {buttons}</div>' if buttons else ""
        return (
            f'<div id="{uid}" class="attnlib-explorer">'
            f"<style>{_CSS.replace('#ID', '#' + uid).replace('MAXW', str(round(1.5 * width)))}</style>"
            f"{title}"
            '<p class="ax-help">Hover over or tap the photo to choose a query cell (with the photo focused, '
            "the arrow keys move it): the colours show where that query looks.</p>"
            f"{frames}"
            '<div class="ax-body">'
            '<div class="ax-stage" tabindex="0" aria-label="photo with the selected query\'s attention map; '
            'the arrow keys move the query">'
            f'<img class="ax-photo" src="{self._photos[0]}" width="{width}" height="{height}" alt="{alt}">'
            f'<canvas class="ax-map" width="{width}" height="{height}" aria-hidden="true"></canvas>'
            '<div class="ax-ring"></div></div>'
            '<div class="ax-side">'
            '<div class="ax-query" aria-live="polite"></div><table class="ax-stats"></table>'
            '<div class="ax-cbar"><canvas width="256" height="1" aria-hidden="true"></canvas>'
            f'<div class="ax-ticks">{tick_marks}</div>'
            f'<div class="ax-unit">attention &times; uniform (log scale), on {ph}&times;{pw} cells</div></div>'
            "</div></div>"
            '<p class="ax-nojs">(The explorer needs JavaScript; in JupyterLab, trust the notebook.)</p>'
            f"<script>(function () {{\nvar ID = {_script_json(uid)};\nvar D = {payload};\n{_JS}}})();</script>"
            "</div>"
        )


# The stylesheet, scoped to one explorer's id (#ID); MAXW caps the photo at 1.5 times its JPEG width.
_CSS = (
    "#ID{margin:.6em 0;font-size:14px;line-height:1.4}"
    "#ID .ax-title{font-weight:600}"
    "#ID .ax-help,#ID .ax-unit{margin:.2em 0;font-size:12.5px;opacity:.8}"
    "#ID .ax-frames{margin:.3em 0}"
    "#ID .ax-frames button{margin-left:.3em;padding:.1em .7em;border:1px solid #888;border-radius:3px;"
    "background:transparent;color:inherit;cursor:pointer;font:inherit}"
    "#ID .ax-frames button[aria-pressed=true]{background:#555;color:#fff}"
    "#ID .ax-body{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}"
    "#ID .ax-stage{position:relative;flex:1 1 320px;max-width:MAXWpx;line-height:0;cursor:crosshair;"
    "touch-action:manipulation}"
    "#ID .ax-stage img{display:block;width:100%;height:auto;max-width:none;margin:0}"
    "#ID .ax-map{position:absolute;left:0;top:0;width:100%;height:100%}"
    "#ID .ax-ring{position:absolute;width:14px;height:14px;margin:-10px 0 0 -10px;border:3px solid #00e5ff;"
    "border-radius:50%;box-shadow:0 0 0 1px #000,inset 0 0 0 1px #000;pointer-events:none}"
    "#ID .ax-side{flex:0 1 230px;min-width:180px}"
    "#ID .ax-query{font-weight:600}"
    "#ID .ax-stats{border-collapse:collapse;margin:.3em 0;font-size:13px}"
    "#ID .ax-stats td{padding:.05em .8em .05em 0;border:0;vertical-align:top}"
    "#ID .ax-stats td+td{font-variant-numeric:tabular-nums}"
    "#ID .ax-cbar{margin:.8em 12px 0}"
    "#ID .ax-cbar canvas{display:block;width:100%;height:12px;border:1px solid #888}"
    "#ID .ax-ticks{position:relative;height:1.3em;font-size:12px}"
    "#ID .ax-ticks span{position:absolute;top:0;transform:translateX(-50%)}"
)

# The behaviour, plain ES5 inside the IIFE that _render writes around it (ID and D defined there).
_JS = r"""var script = document.currentScript;
var root = (script && script.parentNode && script.parentNode.id === ID) ? script.parentNode : document.getElementById(ID);
if (!root) { return; }
function bytes(b64) {
  var s = atob(b64), a = new Uint8Array(s.length);
  for (var n = 0; n < s.length; n++) { a[n] = s.charCodeAt(n); }
  return a;
}
var codes = bytes(D.maps), colours = bytes(D.colours);
var h = D.feature[0], w = D.feature[1], gh = D.grid[0], gw = D.grid[1], Q = D.queries.length;
var stage = root.querySelector('.ax-stage'), img = root.querySelector('.ax-photo');
var canvas = root.querySelector('.ax-map'), ctx = canvas.getContext('2d');
var W = canvas.width, H = canvas.height, out = ctx.createImageData(W, H);
var ring = root.querySelector('.ax-ring'), heading = root.querySelector('.ax-query');
var table = root.querySelector('.ax-stats'), buttons = root.querySelectorAll('.ax-frames button');
var photos = D.photos.slice(); photos[0] = img.getAttribute('src');
var span = Math.log(D.vmax / D.vmin), level = [];
for (var step = 0; step < 256; step++) { level.push(D.vmin * Math.exp(span * step / 255)); }
// Bilinear sampling as torch's interpolate(align_corners=False): for each output pixel, two source cells and a weight.
function axis(n, m) {
  var lo = new Int32Array(n), hi = new Int32Array(n), f = new Float32Array(n);
  for (var x = 0; x < n; x++) {
    var s = Math.max((x + 0.5) * m / n - 0.5, 0), a = Math.min(Math.floor(s), m - 1);
    lo[x] = a; hi[x] = Math.min(a + 1, m - 1); f[x] = s - a;
  }
  return {lo: lo, hi: hi, f: f};
}
var ys = axis(H, gh), xs = axis(W, gw), frame = 0, query = D.start;
function draw() {
  var base = (frame * Q + query) * gh * gw, px = out.data;
  for (var y = 0; y < H; y++) {
    var r0 = base + ys.lo[y] * gw, r1 = base + ys.hi[y] * gw, fy = ys.f[y];
    for (var x = 0; x < W; x++) {
      var c0 = xs.lo[x], c1 = xs.hi[x], fx = xs.f[x];
      var top = level[codes[r0 + c0]] * (1 - fx) + level[codes[r0 + c1]] * fx;
      var bottom = level[codes[r1 + c0]] * (1 - fx) + level[codes[r1 + c1]] * fx;
      var t = Math.round(255 * Math.log((top * (1 - fy) + bottom * fy) / D.vmin) / span);
      var c = 4 * (t < 0 ? 0 : (t > 255 ? 255 : t)), p = 4 * (y * W + x);
      px[p] = colours[c]; px[p + 1] = colours[c + 1]; px[p + 2] = colours[c + 2]; px[p + 3] = colours[c + 3];
    }
  }
  ctx.putImageData(out, 0, 0);
}
function row(name, value) {
  var tr = document.createElement('tr'), a = document.createElement('td'), b = document.createElement('td');
  a.textContent = name; b.textContent = value; tr.appendChild(a); tr.appendChild(b); table.appendChild(tr);
}
function update() {
  var q = D.queries[query];
  draw();
  ring.style.left = (100 * (q[1] + 0.5) / w) + '%';
  ring.style.top = (100 * (q[0] + 0.5) / h) + '%';
  heading.textContent = 'query (' + q[0] + ', ' + q[1] + ')' + (D.photos.length > 1 ? ', frame ' + (frame + 1) : '');
  while (table.firstChild) { table.removeChild(table.firstChild); }
  for (var s = 0; s < D.stats.length; s++) { row(D.stats[s][0], D.stats[s][1][frame][query]); }
  if (D.labels) { row('class', D.labels[frame][query]); }
}
function nearest(i, j) {
  var best = 0, bestD = Infinity;
  for (var k = 0; k < Q; k++) {
    var di = D.queries[k][0] - i, dj = D.queries[k][1] - j, d = di * di + dj * dj;
    if (d < bestD) { best = k; bestD = d; }
  }
  return best;
}
function pick(event) {
  var box = stage.getBoundingClientRect();
  if (!box.width || !box.height) { return; }
  var k = nearest((event.clientY - box.top) / box.height * h - 0.5, (event.clientX - box.left) / box.width * w - 0.5);
  if (k !== query) { query = k; update(); }
}
stage.addEventListener('mousemove', pick);
stage.addEventListener('click', pick);
// Arrow keys: the nearest query in that direction, preferring ones in line with the current one.
var ARROWS = {ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1]};
stage.addEventListener('keydown', function (event) {
  var dir = ARROWS[event.key];
  if (!dir) { return; }
  event.preventDefault();
  var here = D.queries[query], best = query, bestScore = Infinity;
  for (var k = 0; k < Q; k++) {
    var di = D.queries[k][0] - here[0], dj = D.queries[k][1] - here[1];
    var along = di * dir[0] + dj * dir[1], across = Math.abs(di * dir[1] - dj * dir[0]);
    if (along > 0 && along + 4 * across < bestScore) { best = k; bestScore = along + 4 * across; }
  }
  if (best !== query) { query = best; update(); }
});
function show(f) {
  frame = f;
  img.setAttribute('src', photos[f]);
  img.setAttribute('alt', (D.title ? D.title + ': ' : '') + 'frame ' + (f + 1) + ' of ' + photos.length);
  for (var n = 0; n < buttons.length; n++) { buttons[n].setAttribute('aria-pressed', String(n === f)); }
  update();
}
for (var b = 0; b < buttons.length; b++) {
  buttons[b].addEventListener('click', (function (f) { return function () { show(f); }; })(b));
}
var bar = root.querySelector('.ax-cbar canvas').getContext('2d'), strip = bar.createImageData(256, 1);
for (var c = 0; c < 1024; c++) { strip.data[c] = c % 4 === 3 ? 255 : colours[c]; }  // opaque: the colours alone
bar.putImageData(strip, 0, 0);
root.querySelector('.ax-nojs').style.display = 'none';
update();
"""
