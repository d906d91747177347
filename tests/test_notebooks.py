"""The notebooks are shipped executed, with their figures, and re-execute to outputs of the same shape.

The committed outputs are what a reader sees on GitHub without running anything, so they must be
there and must be what the current code produces: the slow test runs every notebook top to bottom
(their own cells assert what they show) and compares, cell by cell, the kinds of output with the
committed ones (text, figures, rich results), never pixels or numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: Figures each notebook draws (counted by hand from its plotting cells).
FIGURES = {"01": 1, "02": 0, "03": 3}
#: The backend ipykernel itself selects; named explicitly so an MPLBACKEND=Agg set for the test run
#: (headless CI) does not reach the kernel and swallow the figures.
INLINE = "module://matplotlib_inline.backend_inline"


def output_shape(nb: nbformat.NotebookNode) -> list[list[str]]:
    """Per code cell, the sorted kinds of output: ``stdout``, ``display_data:<mime types>``, ...

    stderr is left out: transformers' weight-loading bar and import-time notices write there, and how
    many stream chunks they make depends on timing.
    """
    shape = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kinds = set()
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                if out.name == "stdout":
                    kinds.add("stdout")
            else:
                kinds.add(":".join([out.output_type, *sorted(out.get("data", {}))]))
        shape.append(sorted(kinds))
    return shape


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_the_three_notebooks_are_shipped():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_with_its_figures(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # executed top to bottom in one kernel: execution counts 1, 2, 3, ...
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert images(nb) == FIGURES[path.stem[:2]]
    # a notebook never picks the backend itself (Jupyter's inline one shows the figures)
    assert not [c for c in code if "matplotlib.use(" in c.source]


def test_output_shape_ignores_stderr_and_counts_kinds_once():
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="Loading weights: 10%"),
        nbformat.v4.new_output("stream", name="stdout", text="a\n"),
        nbformat.v4.new_output("stream", name="stdout", text="b\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "<Figure>", "image/png": "iVBO"}),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), cell])
    assert output_shape(nb) == [["display_data:image/png:text/plain", "stdout"]]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_reexecutes_to_the_committed_output_shape(path):
    committed = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    # run from the repository root (paths in the notebooks are relative to it); outputs never written back
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parents[1])}})
    client.execute(env={**os.environ, "MPLBACKEND": INLINE})
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert output_shape(nb) == output_shape(committed)
    assert images(nb) == FIGURES[path.stem[:2]]
