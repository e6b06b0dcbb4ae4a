"""The notebooks run top to bottom and print what they promise."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def executed_output(name: str) -> str:
    """Execute ``notebooks/name`` and return the text of every code cell's output."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_quickstart_notebook_executes():
    outputs = executed_output("01_quickstart.ipynb")
    assert "status 0" in outputs
    assert "gWI" in outputs and "Dice" in outputs


@pytest.mark.slow
def test_batched_groups_notebook_executes():
    outputs = executed_output("02_batched_groups.ipynb")
    status = re.search(r"status \[([0-9 ]+)\]", outputs)
    assert status and set(status.group(1).split()) == {"0"}, outputs
    before, after = map(float, re.search(r"gWI before ([0-9.]+) .* after ([0-9.]+)", outputs).groups())
    assert after < 0.7 * before, outputs
    assert "group-iterations/s" in outputs
