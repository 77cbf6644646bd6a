"""Every notebook in notebooks/ runs top to bottom on CPU, each in a fresh kernel (nbclient)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # the digits QAT cell takes about a minute on two busy cores
STORED_OUTPUTS = ("04_your_own_model.ipynb",)
"""Notebooks committed executed, so that their figures show on GitHub without running them."""


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_functional_api.ipynb",
        "02_qat_digits.ipynb",
        "03_toy_regression.ipynb",
        "04_your_own_model.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_as_documented(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    if path.name in STORED_OUTPUTS:
        # Executed top to bottom in one kernel, without errors, with its figures as PNGs.
        assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
        outputs = [out for cell in code for out in cell.outputs]
        assert not [out for out in outputs if out.output_type == "error"]
        assert len([out for out in outputs if "image/png" in out.get("data", {})]) >= 2
    else:
        assert all(not cell.outputs and cell.execution_count is None for cell in code)
    # The first cell installs the package on Colab only.
    assert 'if "google.colab" in sys.modules:' in code[0].source and "REPO = " in code[0].source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: CPU only, and temporary folders (the digits
    # notebook's workdir) under pytest's tmp_path.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 2, "every notebook draws its figures inline"
