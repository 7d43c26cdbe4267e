"""Every notebook in notebooks/ runs on its tiny setting, and none is committed with outputs.

Each notebook runs in a fresh ipykernel on this interpreter (from the `test` extra) with
PREFOPT_TINY=1 and JAX on the CPU, in a temporary working directory so that nothing lands in
the repository; a cell that raises fails the test with that cell's traceback.
"""

import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("notebooks/*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
    # Without this a moved folder would leave the parametrised tests below with nothing to run.
    assert len(NOTEBOOKS) >= 2, NOTEBOOKS


def this_interpreter_kernel(directory: pathlib.Path) -> KernelManager:
    """A manager of an ipykernel on `sys.executable`, whatever kernel specs the machine has
    (a user-level `python3` spec could name another Python)."""
    spec_dir = directory / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (this interpreter)", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(directory / "kernels")],
                              ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_tiny(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = NotebookClient(notebook, km=this_interpreter_kernel(tmp_path),
                            timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    env = {**os.environ, "PREFOPT_TINY": "1", "JAX_PLATFORMS": "cpu"}
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when a cell raises
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "not every cell ran"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} keep outputs or execution counts"
    # The tiny switch, read first, is what lets the test above run the notebook in seconds.
    assert 'os.environ.get("PREFOPT_TINY", "0") == "1"' in code[0].source, path.name
    assert any("prefopt_jax" in c.source for c in code), path.name
