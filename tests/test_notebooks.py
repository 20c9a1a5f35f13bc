"""The Colab notebooks run top to bottom on CPU at toy size, and are stored without outputs."""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# What each must leave in its WORKDIR, and how many fake devices it runs on: the long-context
# notebook splits its sequences over 8, the quickstart runs as on a one-device CPU runtime.
EXPECTED = {
    "quickstart.ipynb": (1, ["loss.png", "token_roles.png", "eval/summary.json"]),
    "long_context_tpu.ipynb": (8, ["loss.png", "converted", "model/2"]),
}


def test_every_notebook_is_run_here():
    assert sorted(EXPECTED) == sorted(path.name for path in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_at_toy_size(path, tmp_path, monkeypatch):
    devices, outputs = EXPECTED[path.name]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    monkeypatch.setenv("XLA_FLAGS", flags.strip())
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(path, as_version=4)
    # What papermill does with a "parameters" cell: the run's values in a cell right after it.
    index = _parameters_index(notebook)
    workdir = tmp_path / "run"
    overrides = f'SIZE = "toy"\nWORKDIR = {str(workdir)!r}'
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    for name in outputs:
        assert (workdir / name).exists(), name
    text = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "size toy" in text
    if path.name == "quickstart.ipynb":
        summary = json.loads((workdir / "eval" / "summary.json").read_text())
        assert summary["tasks"]["passkey"]["evaluated_now"] == 3  # 1 length x 3 depths x 1 trial
        assert "vs DGA xla: max |difference|" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_clean_with_a_parameters_cell_first(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs"
    assert _parameters_index(notebook) == 1  # after the title
    assert "colab.research.google.com/github" in notebook.cells[0].source


def _parameters_index(notebook) -> int:
    tagged = [
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, "one cell tagged parameters"
    return tagged[0]
