"""Every notebook in notebooks/ runs top to bottom (they load committed results or train for seconds), so they
cannot rot."""

from __future__ import annotations

import re

import nbclient  # the `test` extra installs nbclient, nbformat and ipykernel: a missing one is an error, not a skip
import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FIGURE_CALL = re.compile(r"\bplt\.subplots?\(|\bplot\.(tradeoff|figure\d|plot)\(")


def test_every_reproduction_has_its_notebook():
  """The quick start and one notebook per reproduction in experiments/ (renaming one must not drop it silently)."""
  names = {path.stem for path in NOTEBOOKS}
  reproductions = {path.name for path in (REPO / "experiments").iterdir() if (path / "README.md").exists()}
  assert reproductions == {"yosinski", "ulmfit", "lora_vs_full", "forgetting"}, reproductions
  assert names >= {"quickstart"} | reproductions, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's temporary folders (the quick start's workdir) go here
  notebook = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert not [o for cell in code_cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
  # Every cell that draws (a plot module's figure function or pyplot) shows its own figure: one figure that
  # stopped rendering must not hide behind another cell's.
  drawing_cells = [index for index, cell in enumerate(code_cells) if FIGURE_CALL.search(cell.source)]
  assert drawing_cells, f"{path.name} draws no figure"
  for index in drawing_cells:
    images = [o for o in code_cells[index].get("outputs", [])
              if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) == 1, f"{path.name}: code cell {index} drew {len(images)} figures, expected 1"
