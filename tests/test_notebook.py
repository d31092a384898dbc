"""The quickstart notebook runs top to bottom on CPU, offline, its loss falls and it ends
with a sample from the model; its install cell installs the checkout it sits in, else the
released package.

The notebook is executed in a fresh Jupyter kernel, as a Colab user would run it. The
kernel is a separate process: it inherits this process's environment (so
``JAXTRAIN_RUN_DIR`` points it at ``tmp_path``) but sets its own ``XLA_FLAGS`` before it
imports JAX.
"""

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    """Everything a code cell printed, as plain text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def _needs(module: str):
    return pytest.importorskip(module, reason=f"the notebook test needs {module} (.[test])")


@pytest.mark.slow  # a fresh kernel and a 60-step run
def test_quickstart_notebook_runs_and_loss_falls(tmp_path, monkeypatch):
    nbformat, nbclient = _needs("nbformat"), _needs("nbclient")
    _needs("ipykernel"), _needs("matplotlib")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "the notebook is committed with outputs; clear them"
    )

    run_dir = tmp_path / "run"
    monkeypatch.setenv("JAXTRAIN_RUN_DIR", str(run_dir))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    cells = {cell.get("id"): cell for cell in nb.cells}
    assert "8 cpu devices" in _text(cells["devices"])
    assert "fsdp_tp" in _text(cells["plan"])
    assert "train loss" in _text(cells["train"])
    assert any("image/png" in out.get("data", {}) for out in cells["plot"].outputs)
    sample = _text(cells["sample"])  # streamed piece by piece after the prompt
    assert sample.startswith("def ") and len(sample.strip()) > len("def ")

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert (run_dir / "params").is_dir()


def test_install_cell_installs_the_checkout_else_the_released_package(tmp_path, monkeypatch):
    """Where jaxtrain is missing, the install cell pip-installs the checkout above the
    working directory (editable), or the PyPI name outside one; where it is present (as in
    the test above) it installs nothing, so nothing reaches for the network."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "".join(next(c for c in cells if c.get("id") == "install")["source"])

    def run_cell(cwd, missing):
        calls = []
        shell = type("Shell", (), {"run_line_magic": lambda self, *args: calls.append(args)})
        find_spec = importlib.util.find_spec
        if missing:
            monkeypatch.setattr(
                importlib.util,
                "find_spec",
                lambda name, *a: None if name == "jaxtrain" else find_spec(name, *a),
            )
        monkeypatch.chdir(cwd)
        exec(source, {"get_ipython": lambda: shell()})
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        return calls

    root = NOTEBOOK.parent.parent
    assert run_cell(NOTEBOOK.parent, missing=True) == [("pip", f"install -q -e {root}")]
    assert run_cell(tmp_path, missing=True) == [("pip", "install -q jaxtrain")]
    assert run_cell(NOTEBOOK.parent, missing=False) == []
