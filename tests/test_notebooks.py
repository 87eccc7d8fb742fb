"""The example notebooks run top to bottom without error (nbclient, a fresh kernel each)."""

import os

from nbclient import NotebookClient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("train_and_sample.ipynb", "compare_strategies.ipynb", "bring_your_own_model.ipynb")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  # The kernel inherits the environment: import this checkout's jaxdp, run on CPU devices.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  notebook = nbformat.read(os.path.join(ROOT, "examples", name), as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type in ("execute_result", "display_data") and "image/png" in o.get("data", {})
             for o in outputs), "the loss figure was not displayed"
