"""The attention explorer's HTML, checked without a browser: structure, ids, the encoded data, budget, errors."""
from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from attnlib.explorer import Explorer, effective_maps, query_grid
from attnlib.nonlocal_block import NonLocal2d
from attnlib.viz import attention_maps
from conftest import randomize_

H, W = 15, 20
QUERIES = query_grid(H, W, 5)  # 3×4 queries
VMIN, VMAX = 0.1, 30.0
VOID = {"img", "br", "meta", "input", "hr", "link", "source", "col", "wbr"}


def inputs(frames: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth photos F×3×60×80 in [0, 1] and maps F×Q×15×20 that sum to 1: spread, a peak at the query
    above ``VMAX``, row 0 exactly 0 (below any ``vmin``)."""
    g = torch.Generator().manual_seed(seed)
    photos = F.interpolate(torch.rand(frames, 3, 6, 8, generator=g), size=(60, 80), mode="bilinear")
    maps = torch.rand(frames, len(QUERIES), H, W, generator=g, dtype=torch.float64) ** 6
    maps = maps / maps.sum((-2, -1), keepdim=True)
    for k, (i, j) in enumerate(QUERIES):
        maps[:, k, i, j] += 1
    maps[..., 0, :] = 0
    return photos, (maps / maps.sum((-2, -1), keepdim=True)).float()


def explorer(frames: int = 2, seed: int = 0, **kwargs) -> Explorer:
    photos, maps = inputs(frames, seed)
    options = dict(vmin=VMIN, vmax=VMAX, max_bytes=10**7)
    return Explorer(photos, maps, QUERIES, **{**options, **kwargs})


def payload(page: str) -> dict:
    """The data the script carries, parsed back from the HTML."""
    return json.loads(re.search(r"\nvar D = (\{.*\});\n", page).group(1).replace("<\\/", "</"))


class Structure(HTMLParser):
    """Checks that tags nest and close, and collects ids, attributes and scripts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.ids: list[str] = []
        self.attributes: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attributes.append((tag, attrs))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        (self.scripts if self.open and self.open[-1] == "script" else self.text).append(data)


def parse(page: str) -> Structure:
    structure = Structure()
    structure.feed(page)
    structure.close()
    assert structure.open == [], f"unclosed tags {structure.open}"
    return structure


def test_query_grid_centres_the_tiles():
    grid = query_grid(45, 60)
    assert len(grid) == 9 * 12
    assert grid[:3] == [(2, 2), (2, 7), (2, 12)] and grid[-1] == (42, 57)
    assert query_grid(7, 10, 3) == [(1, 1), (1, 4), (1, 7), (4, 1), (4, 4), (4, 7)]  # remainders split: 7 = 1+3+3
    assert query_grid(8, 8, 3) == [(2, 2), (2, 5), (5, 2), (5, 5)]
    with pytest.raises(ValueError, match=r"step <= min\(h, w\) = 7.*got 8"):
        query_grid(7, 10, 8)
    with pytest.raises(ValueError, match="step to be a positive int, got 0"):
        query_grid(7, 10, 0)


def test_html_is_one_scoped_widget_with_one_iife_and_nothing_external():
    page = explorer(title="Non-local <b>", stats={"entropy / log N": np.zeros((2, len(QUERIES)))}).html()
    structure = parse(page)
    assert len(structure.scripts) == 1
    script = structure.scripts[0]
    assert script.startswith("(function () {\n") and script.endswith("})();")
    assert page.count("<script") == 1 and page.count("<style") == 1
    root = structure.attributes[0][1]["id"]
    assert structure.attributes[0][0] == "div" and page.endswith("</script></div>")
    css = page[page.index("<style>") + 7:page.index("</style>")]
    assert all(rule.startswith(f"#{root} ") or rule.startswith(f"#{root}{{") for rule in css.split("}") if rule)
    assert "://" not in page  # no URL of any kind: no CDN, no remote image
    for tag, attrs in structure.attributes:
        for name in ("src", "href"):
            assert not attrs.get(name, "data:").lower().startswith(("http", "//")), (tag, attrs.get(name))
    assert not re.search(r"\brequire\s*\(|\bimport\s*\(", script)
    assert "Non-local &lt;b&gt;" in page  # the title is escaped
    images = [attrs for tag, attrs in structure.attributes if tag == "img"]
    assert len(images) == 1 and images[0]["alt"] == "Non-local <b>: frame 1 of 2"
    assert images[0]["src"].startswith("data:image/jpeg;base64,")
    assert "Hover over or tap the photo" in "".join(structure.text)
    assert [attrs["data-frame"] for tag, attrs in structure.attributes if tag == "button"] == ["0", "1"]


def test_ids_are_unique_per_explorer_and_stable():
    first, second = explorer(name="nonlocal"), explorer(name="gcnet")
    ids = [parse(e.html()).ids for e in (first, second)]
    assert all(len(i) == 1 for i in ids) and ids[0] != ids[1]
    assert ids[0][0].startswith("attnlib-nonlocal-") and ids[1][0].startswith("attnlib-gcnet-")
    assert f'var ID = "{ids[0][0]}";' in first.html()
    other_maps = explorer(name="nonlocal", seed=1)
    assert parse(other_maps.html()).ids != ids[0]  # same name, other content: another id
    assert explorer(name="a b/c").html().count('id="attnlib-a-b-c-') == 1


def test_same_inputs_give_byte_identical_html():
    stats = {"entropy / log N": np.linspace(0, 1, 2 * len(QUERIES)).reshape(2, -1)}
    a, b = explorer(stats=stats, name="x"), explorer(stats=stats, name="x")
    assert a.html() == b.html() and a._repr_html_() == a.html()
    assert a.nbytes == len(a.html().encode("utf-8"))


@pytest.mark.parametrize("pool", [1, 5])
def test_maps_decode_to_the_log_scale_within_half_a_step(pool):
    photos, maps = inputs()
    page = Explorer(photos, maps, QUERIES, vmin=VMIN, vmax=VMAX, pool=pool, max_bytes=10**7).html()
    data = payload(page)
    gh, gw = H // pool, W // pool
    assert data["grid"] == [gh, gw] and data["feature"] == [H, W]
    assert data["queries"] == [list(q) for q in QUERIES]
    codes = np.frombuffer(base64.b64decode(data["maps"]), np.uint8).reshape(2, len(QUERIES), gh, gw)
    relative = F.avg_pool2d(H * W * maps.double().flatten(0, 1)[:, None], pool)[:, 0].view(2, len(QUERIES), gh, gw)
    t = (relative / VMIN).log() / math.log(VMAX / VMIN)
    assert np.abs(codes / 255 - t.clamp(0, 1).numpy()).max() <= 0.5 / 255 + 1e-9
    assert (codes[t.numpy() >= 1] == 255).all() and (codes[t.numpy() <= 0] == 0).all()
    if pool == 1:  # the data reach both clipped ends: zero weight is transparent, the peaks saturate
        assert (codes[..., 0, :] == 0).all() and all((codes[:, k, i, j] == 255).all() for k, (i, j) in enumerate(QUERIES))


def test_the_colour_table_is_inferno_with_sqrt_opacity():
    colours = np.frombuffer(base64.b64decode(payload(explorer().html())["colours"]), np.uint8).reshape(256, 4)
    inferno = matplotlib.colormaps["inferno"]
    for k in (0, 1, 100, 255):
        assert np.abs(colours[k, :3].astype(int) - np.array(inferno(k / 255)[:3]) * 255).max() <= 0.5
        assert colours[k, 3] == round(255 * 0.85 * math.sqrt(k / 255))
    assert colours[0, 3] == 0 and colours[255, 3] == 217


def test_photos_are_jpegs_of_the_given_width_in_every_accepted_layout():
    photos, maps = inputs()
    big = F.interpolate(photos, size=(120, 160), mode="bilinear", align_corners=False).clamp(0, 1)
    first = Explorer(big, maps, QUERIES, vmin=VMIN, vmax=VMAX, photo_width=80, max_bytes=10**7)
    uris = [attrs["src"] for tag, attrs in parse(first.html()).attributes if tag == "img"]
    uris += payload(first.html())["photos"][1:]
    assert len(uris) == 2
    for uri, photo in zip(uris, big):
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as jpeg:
            assert jpeg.format == "JPEG" and jpeg.size == (80, 60)
            small = F.interpolate(photo[None], size=(60, 80), mode="area")[0].permute(1, 2, 0).numpy() * 255
            assert np.abs(np.asarray(jpeg.convert("RGB"), dtype=float) - small).mean() < 8  # the same picture (another frame: ~58)
    as_uint8 = (big * 255).round().to(torch.uint8)
    for layout in (as_uint8, as_uint8.permute(0, 2, 3, 1), big.permute(0, 2, 3, 1).numpy()):
        again = Explorer(layout, maps, QUERIES, vmin=VMIN, vmax=VMAX, photo_width=80, max_bytes=10**7)
        assert again.html() == first.html()


def test_stats_and_labels_are_formatted_per_frame_and_query():
    q = len(QUERIES)
    entropy = np.arange(2 * q).reshape(2, q) / 100
    labels = [[f"class{f}-{k}" for k in range(q)] for f in range(2)]
    e = explorer(stats={"entropy / log N": entropy, "ratio": torch.full((2, q), 3.14159)}, labels=labels,
                 fmt={"ratio": "{:.1f}x"})
    data = payload(e.html())
    assert [name for name, _ in data["stats"]] == ["entropy / log N", "ratio"]
    assert data["stats"][0][1][1][2] == f"{entropy[1, 2]:.2f}" == "0.14"
    assert data["stats"][1][1][0][0] == "3.1x"
    assert data["labels"] == labels


def test_the_budget_picks_the_finest_pool_that_fits_and_refuses_beyond():
    sizes = {pool: explorer(pool=pool).nbytes for pool in (1, 5)}
    assert sizes[5] < sizes[1]
    assert explorer().pool == 1
    assert explorer(max_bytes=sizes[5] + 10).pool == 5  # 15×20: pool 1 does not fit, 5 (3×4 cells) does
    assert explorer(max_bytes=sizes[5]).nbytes <= sizes[5]
    with pytest.raises(ValueError, match=rf"at most max_bytes=1,000 bytes, got {sizes[1]:,} bytes with pool 1, "):
        explorer(max_bytes=1000)
    with pytest.raises(ValueError, match=rf"max_bytes={sizes[5] - 1:,} bytes, got {sizes[5]:,} bytes with pool 5 \("):
        explorer(pool=5, max_bytes=sizes[5] - 1)


def test_a_chapter_sized_explorer_fits_the_default_budget():
    # 3 CamVid-sized frames, 9×12 queries on the 45×60 grid: what a chapter shows.
    g = torch.Generator().manual_seed(0)
    photos = torch.rand(3, 3, 1, 1, generator=g).expand(3, 3, 360, 480) * torch.linspace(0.3, 1, 480)  # smooth
    maps = torch.rand(3, 108, 45, 60, generator=g)
    e = Explorer(photos, maps / maps.sum((-2, -1), keepdim=True), query_grid(45, 60), vmin=0.2, vmax=20)
    assert e.nbytes <= 300_000 and e.pool == 3
    assert payload(e.html())["grid"] == [15, 20]


@pytest.mark.parametrize("change, message", [
    (dict(maps=torch.rand(12, H, W)), r"maps of shape \(F, Q, h, w\), got shape \(12, 15, 20\)"),
    (dict(maps=-torch.ones(2, 12, H, W)), r"non-negative attention maps, got values in \[-1, -1\]"),
    (dict(maps=torch.full((2, 12, H, W), float("nan"))), "finite, non-negative"),
    (dict(photos=torch.rand(3, 3, 60, 80)), r"photos of shape \(2, 3, H, W\) or \(2, H, W, 3\) .*got \(3, 3, 60, 80\)"),
    (dict(photos=torch.rand(2, 60, 80)), r"got \(2, 60, 80\)"),
    (dict(photos=torch.randn(2, 3, 60, 80)), r"photos in \[0, 1\] \(network inputs need attnlib.data.denormalize"),
    (dict(queries=QUERIES[:-1]), r"expected 12 queries to match the maps \(2, 12, 15, 20\), got 11"),
    (dict(queries=QUERIES[:-1] + [(15, 0)]), r"0 <= i < 15 and 0 <= j < 20.*got \(15, 0\)"),
    (dict(vmin=1.0, vmax=1.0), r"0 < vmin < vmax .*got vmin=1.0, vmax=1.0"),
    (dict(vmin=0.0), "got vmin=0.0"),
    (dict(pool=4), r"pool to divide both sides of the 15x20 maps \(one of \[1, 5\]\), got 4"),
    (dict(stats={"entropy": np.zeros((2, 11))}), r"stats\['entropy'\] to be numbers of shape \(2, 12\).*got shape \(2, 11\)"),
    (dict(stats=[1, 2]), "stats to be a mapping"),
    (dict(labels=[["Road"] * 12]), r"labels as 2 sequences of 12 strings .*got \[12\]"),
    (dict(labels=[["Road"] * 12, ["Road"] * 11]), r"got \[12, 11\]"),
    (dict(quality=0), "JPEG quality between 1 and 100, got 0"),
    (dict(max_bytes=0), "max_bytes to be a positive int, got 0"),
])
def test_bad_inputs_name_what_was_expected_and_what_came(change, message):
    photos, maps = inputs()
    arguments = dict(photos=photos, maps=maps, queries=QUERIES, vmin=VMIN, vmax=VMAX)
    with pytest.raises(ValueError, match=message):
        Explorer(**{**arguments, **change})


def test_effective_maps_are_the_blocks_maps_frame_by_frame_in_eval_mode():
    torch.manual_seed(0)
    block = NonLocal2d(8)
    model = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), block), std=0.3)
    images = torch.randn(3, 3, 6, 8)
    queries = query_grid(6, 8, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    maps = effective_maps(model, block, images, queries)
    assert model.training and block.training  # every mode put back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # BN statistics untouched
    assert maps.shape == (3, len(queries), 6, 8) and maps.device.type == "cpu"
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, len(queries)))
    expected = attention_maps(model.eval(), block, images, queries)  # eval: each frame alone is the same
    torch.testing.assert_close(maps, expected)
    assert not torch.allclose(maps[0], maps[1])  # frames differ: the maps are not one frame's repeated
    with pytest.raises(ValueError, match=r"images of shape \(F, 3, H, W\), got \(3, 6, 8\)"):
        effective_maps(model, block, images[0], queries)
