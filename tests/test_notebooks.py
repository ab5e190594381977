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
  # nbclient passes over cells tagged skip-execution without a word: every code cell must have run.
  assert all(cell.get("execution_count") is not None for cell in code_cells), f"{path.name}: a code cell did not run"
  # Every cell that draws (a plot module's figure function or pyplot) shows its own figure: one figure that
  # stopped rendering must not hide behind another cell's.
  drawing_cells = [index for index, cell in enumerate(code_cells) if FIGURE_CALL.search(cell.source)]
  assert drawing_cells, f"{path.name} draws no figure"
  for index in drawing_cells:
    images = [o for o in code_cells[index].get("outputs", [])
              if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) == 1, f"{path.name}: code cell {index} drew {len(images)} figures, expected 1"

  printed = "".join(o.get("text", "") for cell in code_cells for o in cell.get("outputs", [])
                    if o.get("output_type") == "stream")
  readme = REPO / "experiments" / path.stem / "README.md"
  if readme.exists():
    check_tables_match_readme(printed, readme.read_text(), path.name)
  else:
    check_quoted_numbers(notebook, printed, path.name)


def _table_row(line: str) -> str:
  """A markdown table row without bold marks and `(n=k)` counts, which the README's tables and the plot scripts'
  print-outs write differently."""
  return re.sub(r"\*\*| \(n=\d+\)", "", line).strip()


def check_tables_match_readme(printed: str, readme: str, name: str):
  """Every data row of every markdown table a reproduction's notebook prints is in its experiment's README, and so
  is every figure of its summary sentences: the README cannot go stale against the committed results that the
  notebook reads. (Header rows and the Yosinski notebook's plain-text table of the pooled splits are not compared.)"""
  lines = printed.splitlines()
  separators = [i for i, line in enumerate(lines) if re.fullmatch(r"\|(\s*-+\s*\|)+", line.strip())]
  headers = {i - 1 for i in separators}
  rows = [line for i, line in enumerate(lines)
          if line.startswith("|") and i not in headers and i not in separators]
  assert rows, f"{name} printed no markdown table"
  readme_rows = {_table_row(line) for line in readme.splitlines() if line.startswith("|")}
  missing = [row for row in rows if _table_row(row) not in readme_rows]
  assert not missing, f"{name} printed rows its experiment's README does not have: {missing}"
  # The forgetting notebook's summary sentences (the README words them its own way): their mean ± std figures.
  for line in lines:
    if line.startswith("Source test accuracy"):
      figures = re.findall(r"\d+\.\d+ ± \d+\.\d+", line)
      assert figures and all(figure in readme for figure in figures), (name, line)


def check_quoted_numbers(notebook, printed: str, name: str):
  """The quick start's prose quotes what its run printed ("printed transfer 0.7968 vs scratch 0.8342"): the run
  must still print that, within 2 of the 187 validation images (XLA's float results vary across CPUs)."""
  prose = " ".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
  quoted = re.search(r"printed transfer ([\d.]+) vs scratch ([\d.]+)", " ".join(prose.split()))
  assert quoted, f"{name}'s prose quotes no printed result"
  now = re.search(r"transfer ([\d.]+) vs scratch ([\d.]+)", printed)
  assert now, f"{name} printed no result"
  for was, got in zip(quoted.groups(), now.groups()):
    assert abs(float(was) - float(got)) <= 2 / 187 + 1e-9, (
        f"{name}: the prose quotes {quoted[0]}, the run printed {now[0]}")
