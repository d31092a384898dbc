"""The quickstart notebook runs top to bottom on CPU, offline, and its loss falls.

The notebook is executed in a fresh Jupyter kernel, as a Colab user would run it. The
kernel is a separate process: it inherits this process's environment (so
``JAXTRAIN_RUN_DIR`` points it at ``tmp_path``) but sets its own ``XLA_FLAGS`` before it
imports JAX.
"""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def _text(cell: nbformat.NotebookNode) -> str:
    """Everything a code cell printed, as plain text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_runs_and_loss_falls(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
        "the notebook is committed with outputs; clear them"
    )

    run_dir = tmp_path / "run"
    monkeypatch.setenv("JAXTRAIN_RUN_DIR", str(run_dir))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    cells = {cell.get("id"): cell for cell in nb.cells}
    assert "8 cpu devices" in _text(cells["devices"])
    assert "fsdp_tp" in _text(cells["plan"])
    assert "train loss" in _text(cells["train"])
    assert any("image/png" in out.get("data", {}) for out in cells["plot"].outputs)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert (run_dir / "params").is_dir()
