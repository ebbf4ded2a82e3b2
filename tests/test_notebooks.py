"""The notebooks: the committed ones are what scripts/build_notebooks.py writes, and each runs top to bottom
in tiny mode (TRAJFORMER_TINY=1) on the shipped artifacts, so a notebook that breaks fails CI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "scripts" / "build_notebooks.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


@pytest.mark.parametrize("name", list(build.SPECS))
def test_committed_notebook_matches_the_build_script(name):
    committed = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    expected = build.notebook(build.SPECS[name])
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in expected.cells], (
        f"notebooks/{name}.ipynb is stale; regenerate it with scripts/build_notebooks.sh {name}")
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code[:2]), f"notebooks/{name}.ipynb was committed without its outputs"


@pytest.mark.parametrize("name", list(build.SPECS))
def test_notebook_executes_in_tiny_mode(name, monkeypatch):
    monkeypatch.setenv("TRAJFORMER_TINY", "1")
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
