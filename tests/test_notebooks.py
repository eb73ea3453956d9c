"""The chapters' conventions that nbval cannot see (CONTRIBUTING.md): one repository URL, a Colab-only
install, no stderr, figures named, captioned and described, listings that fit the page, a size budget."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_installs_attnlib_from_the_configured_repository_only_in_colab(path):
    setup = code_cells(path)[0]
    tree = ast.parse(setup)
    assigned = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    assert assigned.get("REPOSITORY") == repository_url(), "the setup cell must use _config.yml's repository.url"
    assert '"google.colab" in sys.modules' in setup and 'find_spec("attnlib") is None' in setup
    assert setup.count(repository_url()) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stray_figure_reprs_or_stderr_in_stored_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    for index, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"cell {index} stores an error"
            assert output.get("name") != "stderr", f"cell {index} writes to stderr: {''.join(output['text'])[:200]}"
            if output["output_type"] == "execute_result":
                text = "".join(output["data"].get("text/plain", ""))
                assert not text.startswith("<Figure size"), f"cell {index} shows a stray {text}"


# ---------------------------------------------------------------------------------------
# The chapter conventions of CONTRIBUTING.md that can be read off the stored notebook
# ---------------------------------------------------------------------------------------

MAX_CHAPTER_BYTES = 1_500_000
LISTING_WIDTH = 88
PYOBJECT = re.compile(r"```\{literalinclude\}\s+(\S+)\s*\n(?:[^`]*?):pyobject:\s*(\S+)")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 requires cell ids; without them nbval warns on every run (stderr stays clean)."""
    ids = [cell.get("id") for cell in cells(path)]
    assert None not in ids, f"{path.name}: cells {[i for i, v in enumerate(ids) if v is None]} have no id"
    assert len(set(ids)) == len(ids), f"{path.name}: duplicate cell ids"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_stays_within_its_size_budget(path):
    assert path.stat().st_size <= MAX_CHAPTER_BYTES, (
        f"{path.name} is {path.stat().st_size:,} bytes: store photographs as JPEG (attnlib.book.show(fig, photo=True))")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_tags_not_visible_comments(path):
    for index, cell in enumerate(cells(path)):
        assert "NBVAL" not in "".join(cell["source"]), f"cell {index}: use nbval's cell tags, not a visible comment"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_execution_timestamps_are_stored(path):
    for index, cell in enumerate(cells(path)):
        assert "execution" not in cell.get("metadata", {}), (
            f"cell {index} stores execution timestamps: execute with attnlib.book.execute_notebook")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_is_named_captioned_and_described(path):
    figures = 0
    for index, cell in enumerate(cells(path)):
        if not any(mime in out.get("data", {}) for out in cell.get("outputs", []) for mime in IMAGE_TYPES):
            continue
        figures += 1
        meta = cell["metadata"].get("mystnb", {})
        figure, image = meta.get("figure", {}), meta.get("image", {})
        assert figure.get("name", "").startswith("fig-"), f"cell {index}: a figure needs mystnb.figure.name 'fig-…'"
        assert len(figure.get("caption", "")) > 20, f"cell {index}: a figure needs a caption"
        assert len(image.get("alt", "")) > 20, f"cell {index}: a figure needs alt text"
    assert figures, f"{path.name} shows no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_source_fits_the_page(path):
    """Every object a chapter shows with literalinclude :pyobject: has lines of at most 88 characters."""
    shown = [m for cell in cells(path) if cell["cell_type"] == "markdown"
             for m in PYOBJECT.findall("".join(cell["source"]))]
    for relative, name in shown:
        source = (path.parent / relative).resolve()
        tree = ast.parse(source.read_text())
        node = _find(tree, name.split("."))
        assert node is not None, f"{path.name} shows {name} from {relative}, which has no such object"
        lines = source.read_text().splitlines()[node.lineno - 1 - len(node.decorator_list):node.end_lineno]
        long = [line for line in lines if len(line) > LISTING_WIDTH]
        assert not long, f"{relative}:{name} has lines over {LISTING_WIDTH} characters: {long[:2]}"


def _find(tree: ast.AST, names: list[str]):
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == names[0]:
            return node if len(names) == 1 else _find(node, names[1:])
    return None


def test_binder_installs_a_cpu_torch_and_attnlib_itself():
    lines = [line.split("#")[0].strip() for line in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert "-e ." in lines and any(line.startswith("torch>=") for line in lines)
