"""notebooks/quickstart.ipynb runs headless as a new user runs it: from a checkout without a demo run, so it trains
briefly (here on small demo sets built beforehand, which the notebook then finds and keeps)."""

from __future__ import annotations

from pathlib import Path

import pytest
from iqa_fixtures import small_demo_checkout

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    import nbclient
    import nbformat

    small_demo_checkout(tmp_path)
    (tmp_path / "notebooks").mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "held-out images: SRCC" in outputs and "blurred" in outputs
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "best.ckpt").is_file()
