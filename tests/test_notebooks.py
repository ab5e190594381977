"""Every notebook in notebooks/ runs top to bottom (they load committed results or train for seconds), so they
cannot rot."""

from __future__ import annotations

import nbclient  # the `test` extra installs nbclient, nbformat and ipykernel: a missing one is an error, not a skip
import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_every_reproduction_has_its_notebook():
  """The quick start and one notebook per reproduction in experiments/ (renaming one must not drop it silently)."""
  names = {path.stem for path in NOTEBOOKS}
  reproductions = {path.name for path in (REPO / "experiments").iterdir() if (path / "README.md").exists()}
  assert reproductions == {"yosinski", "ulmfit", "lora_vs_full", "forgetting"}, reproductions
  assert names >= {"quickstart"} | reproductions, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path):
  notebook = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
      f"{path.name} drew no figure"
