"""The chapters' conventions that nbval cannot see: one repository URL, a Colab-only install."""
from __future__ import annotations

import ast
import json
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
