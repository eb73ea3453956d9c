"""The website: build it once, then check what a reader will see.

The book is built exactly as a maintainer builds it (``jupyter-book build . -W``, every
warning an error), but into a temporary folder, so the working tree is left untouched.
The checks then read the HTML:

* every page listed in ``_toc.yml`` was built;
* every chapter (a ``notebooks/`` entry of the table of contents) shows its figures as
  images and its mathematics as MathJax;
* no page shows an error: no traceback, no stderr stream;
* the bibliography lists every paper of ``book/references.bib``.

Notebooks are not executed by the build (``execute_notebooks: "off"``): the site shows
the outputs stored in them, so these tests check the stored outputs.  Running the
notebooks is nbval's job.
"""
from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOC = REPO / "_toc.yml"
CONFIG = REPO / "_config.yml"
BIBLIOGRAPHY_PAGE = "book/bibliography"
BUILD_TIMEOUT_S = 1800

# What myst-nb writes for outputs that a published page must not show.  A stored error
# output renders as <div class="output traceback ...">, a stderr stream as
# <div class="output stderr ...">; older renderers used "output error".
BAD_OUTPUT_CLASSES = ("output traceback", "output stderr", "output error")
TRACEBACK_TEXT = "Traceback (most recent call last)"

IMAGE_SRC = re.compile(r"""<img\b[^>]*?\bsrc\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
IMAGE_FILE = re.compile(r"\.(png|jpe?g|svg)$", re.IGNORECASE)
IMAGE_DATA = re.compile(r"^data:image/(png|jpeg|svg\+xml)[;,]", re.IGNORECASE)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ---------------------------------------------------------------------------------------
# The table of contents and the bibliography, read from the sources
# ---------------------------------------------------------------------------------------


def _toc_files(node: object) -> list[str]:
    """Every ``file:`` (and the ``root:``) in a jb-book table of contents, in order."""
    found: list[str] = []
    if isinstance(node, dict):
        for key in ("root", "file"):
            if isinstance(node.get(key), str):
                found.append(node[key])
        for value in node.values():
            if isinstance(value, (list, dict)):
                found.extend(_toc_files(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_toc_files(item))
    return found


def _doc_name(entry: str) -> str:
    """``notebooks/01_nonlocal.ipynb`` or ``notebooks/01_nonlocal`` -> ``notebooks/01_nonlocal``."""
    return re.sub(r"\.(ipynb|md)$", "", entry.strip("/"))


TOC_PAGES = [_doc_name(f) for f in _toc_files(yaml.safe_load(TOC.read_text(encoding="utf-8")))]
CHAPTERS = [page for page in TOC_PAGES if page.startswith("notebooks/")]


def _bib_titles(text: str) -> dict[str, str]:
    """``{key: title}`` for every entry of a BibTeX file (titles may nest braces)."""
    titles: dict[str, str] = {}
    for entry in re.finditer(r"@\w+\s*\{\s*([^,\s]+)\s*,", text):
        key, start = entry.group(1), entry.end()
        nxt = re.search(r"^\s*@\w+\s*\{", text[start:], re.MULTILINE)
        body = text[start : start + nxt.start()] if nxt else text[start:]
        field = re.search(r"(?<![A-Za-z])title\s*=\s*\{", body, re.IGNORECASE)
        if field is None:
            continue
        depth, i = 1, field.end()
        while depth and i < len(body):
            depth += {"{": 1, "}": -1}.get(body[i], 0)
            i += 1
        titles[key] = body[field.end() : i - 1]
    return titles


def _normalise(text: str) -> str:
    """Lower case, no braces or LaTeX quoting, single spaces: how titles are compared."""
    text = re.sub(r"[{}]", "", text)
    return re.sub(r"\s+", " ", text).strip().lower()


# ---------------------------------------------------------------------------------------
# The build, once per session
# ---------------------------------------------------------------------------------------


@dataclass(repr=False)
class Site:
    returncode: int
    stdout: str
    stderr: str
    html: Path  # <out>/_build/html

    def page(self, doc: str) -> Path:
        return self.html / f"{doc}.html"

    def __repr__(self) -> str:
        return f"Site(returncode={self.returncode}, html={str(self.html)!r})"


def _jupyter_book() -> list[str]:
    """The ``jupyter-book`` command of the interpreter running the tests.

    ``python -m jupyter_book`` does not work (the package has no ``__main__``), so take
    the script installed next to ``sys.executable`` and, failing that, call the CLI's
    entry point in this interpreter.
    """
    bindir = Path(sys.executable).parent
    for name in ("jupyter-book", "jupyter-book.exe"):
        script = bindir / name
        if script.is_file():
            return [str(script)]
    return [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    out = tmp_path_factory.mktemp("site")
    command = [*_jupyter_book(), "build", str(REPO), "--path-output", str(out), "-W", "--keep-going"]
    env = {**os.environ, "NO_COLOR": "1"}
    try:
        done = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"jupyter-book build did not finish within {BUILD_TIMEOUT_S} s: {exc}")
    return Site(
        returncode=done.returncode,
        stdout=ANSI.sub("", done.stdout),
        stderr=ANSI.sub("", done.stderr),
        html=out / "_build" / "html",
    )


@pytest.fixture(scope="module")
def built(site: Site) -> Site:
    """The site, for checks that need its HTML (skipped, not failed, if there is none)."""
    if not (site.html / "index.html").is_file():
        pytest.skip("the build produced no HTML; see test_build_passes_with_warnings_as_errors")
    return site


def _article(page_html: str) -> str:
    """The page's own content, without the theme's navigation, header and footer."""
    match = re.search(r"<article\b.*?</article>", page_html, re.DOTALL | re.IGNORECASE)
    return match.group(0) if match else page_html


def _text(page_html: str) -> str:
    """What a reader reads: tags removed, entities decoded, whitespace collapsed."""
    page_html = re.sub(r"<(script|style)\b.*?</\1>", " ", page_html, flags=re.DOTALL | re.IGNORECASE)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page_html)))


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------


def test_build_passes_with_warnings_as_errors(site: Site) -> None:
    assert site.returncode == 0, (
        f"`jupyter-book build . -W` failed with exit status {site.returncode}.\n"
        f"--- stderr (warnings and errors) ---\n{site.stderr[-20000:]}\n"
        f"--- stdout (end) ---\n{site.stdout[-2500:]}"
    )


def test_toc_lists_at_least_one_chapter() -> None:
    assert CHAPTERS, f"{TOC.name} lists no chapter under notebooks/: {TOC_PAGES}"


def test_every_toc_page_is_built(built: Site) -> None:
    missing = [doc for doc in TOC_PAGES if not built.page(doc).is_file()]
    assert not missing, f"pages in {TOC.name} with no HTML page in {built.html}: {missing}"
    assert (built.html / "index.html").is_file()


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_shows_its_figures(built: Site, chapter: str) -> None:
    page = built.page(chapter)
    assert page.is_file(), f"no page for {chapter}"
    sources = IMAGE_SRC.findall(_article(page.read_text(encoding="utf-8")))
    figures = [src for src in sources if IMAGE_DATA.match(src) or IMAGE_FILE.search(src.split("?")[0])]
    assert figures, (
        f"{chapter}: no <img> of a PNG or SVG on the page (found {sources or 'no <img> at all'}). "
        "Are the notebook's figure outputs stored (run all cells, then save)?"
    )
    broken = [
        src for src in figures if not IMAGE_DATA.match(src) and not (page.parent / src.split("?")[0]).is_file()
    ]
    assert not broken, f"{chapter}: images that point to no file: {broken}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_shows_its_maths(built: Site, chapter: str) -> None:
    page = built.page(chapter)
    assert page.is_file(), f"no page for {chapter}"
    page_html = page.read_text(encoding="utf-8")
    article = _article(page_html)
    assert any(marker in article for marker in ('class="math', "\\(", "\\[", "$$")), (
        f"{chapter}: no mathematics on the page (no MathJax markup such as class=\"math\")"
    )
    assert "mathjax" in page_html.lower(), f"{chapter}: the page does not load MathJax"


def test_no_page_shows_an_error_or_stderr(built: Site) -> None:
    problems: list[str] = []
    for page in sorted(built.html.rglob("*.html")):
        relative = page.relative_to(built.html)
        if relative.parts[0].startswith("_"):  # _static, _sources, _images: theme and copies
            continue
        page_html = page.read_text(encoding="utf-8")
        for css in BAD_OUTPUT_CLASSES:
            count = page_html.count(f'class="{css}')
            if count:
                problems.append(f'{relative}: {count} output(s) rendered as class="{css} ..."')
        if TRACEBACK_TEXT in _text(page_html):
            problems.append(f"{relative}: the text {TRACEBACK_TEXT!r}")
    assert not problems, (
        "the site shows error or stderr output (catch expected exceptions and print their message; "
        "silence or redirect warnings and progress bars, then re-run and save the notebook):\n  "
        + "\n  ".join(problems)
    )


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_notebook_stores_no_error_or_stderr(chapter: str) -> None:
    """The same rule on the source, with cell numbers, to find the culprit fast."""
    path = REPO / f"{chapter}.ipynb"
    assert path.is_file(), f"{TOC.name} lists {chapter}, but {path.relative_to(REPO)} does not exist"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    problems = []
    for number, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"cell {number}: error {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = "".join(output.get("text", ""))
                problems.append(f"cell {number}: stderr {text[:120]!r}")
    assert not problems, f"{chapter}.ipynb stores outputs the site must not show:\n  " + "\n  ".join(problems)


def test_bibliography_lists_every_paper(built: Site) -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    bibfiles = config.get("bibtex_bibfiles") or []
    assert bibfiles, f"{CONFIG.name} names no bibtex_bibfiles"
    titles: dict[str, str] = {}
    for bibfile in bibfiles:
        titles.update(_bib_titles((REPO / bibfile).read_text(encoding="utf-8")))
    assert titles, f"no entries found in {bibfiles}"

    page = built.page(BIBLIOGRAPHY_PAGE)
    assert page.is_file(), f"no bibliography page {BIBLIOGRAPHY_PAGE}.html"
    listed = _normalise(_text(_article(page.read_text(encoding="utf-8"))))
    missing = [f"{key} ({title})" for key, title in titles.items() if _normalise(title) not in listed]
    assert not missing, (
        "papers of the .bib file missing from the bibliography page; each entry must be cited "
        "somewhere in the book with {cite:p}`key` or {cite:t}`key`:\n  " + "\n  ".join(missing)
    )
