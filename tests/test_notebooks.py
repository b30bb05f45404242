"""The notebooks run top to bottom in the quick setting (NRNN_QUICK=1), on a copy: stored outputs stay."""

import ast
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("NRNN_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_notebooks_exist_with_stored_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_implicit_vs_explicit.ipynb", "02_stochastic_stabilization.ipynb",
                                           "03_robustness.ipynb", "04_bring_your_own_cell.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("outputs") or c.execution_count for c in code), f"{path.name} is stored without outputs"


def test_each_notebook_sets_up_its_host_before_any_jax_computation():
    """The first code cell imports, then calls `nrnn_jax.host.configure()` (a notebook owns its kernel process);
    the stored outputs were made with it: the cell printed what it did."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        body = ast.parse(first.source).body
        calls = [i for i, node in enumerate(body) if "host.configure()" in ast.unparse(node)]
        assert calls, path.name
        assert all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body[:calls[0]]), path.name
        printed = "".join(o.get("text", "") for o in first.get("outputs", []))
        assert printed.startswith("host: {'devices': ") and "'allocator': " in printed, (path.name, printed)
