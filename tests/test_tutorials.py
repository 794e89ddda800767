"""The tutorial notebooks run end to end, at smoke size (as Pyro tests its examples)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).parents[1] / "tutorials"
# Each notebook's cell tagged "parameters" is replaced by these values.
SMOKE_PARAMETERS = {
    "01_papalexi_end_to_end.ipynb": "MAX_EPOCHS = 2\nN_PERMS = 50",
    "02_simulated_screen.ipynb": "N_CELLS = 2_000\nN_GENES = 300\nMAX_EPOCHS = 3\nN_PERMS = 50",
}


def test_every_notebook_has_smoke_parameters():
    assert sorted(path.name for path in TUTORIALS.glob("*.ipynb")) == sorted(SMOKE_PARAMETERS)


@pytest.mark.parametrize("name", sorted(SMOKE_PARAMETERS))
def test_tutorial_runs_at_smoke_size(name, tmp_path):
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    parameters[0].source = SMOKE_PARAMETERS[name]
    # Raises CellExecutionError, with the failing cell and its traceback, if any cell fails.
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        extra_arguments=["--HistoryManager.enabled=False"],
    ).execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)
