"""notebooks/quickstart.ipynb runs headless as a new user runs it: from a checkout without a demo run, so it trains
briefly (here on small demo sets built beforehand, which the notebook then finds and keeps)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    import nbclient
    import nbformat

    from qmamba.data.demo import build_kadid_style, build_koniq_style

    # the checkout's layout in miniature; the full demo sets take a minute to build, these a few seconds
    (tmp_path / "notebooks").mkdir()
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    build_kadid_style(tmp_path / "data" / "demo" / "kadid10k", sources=("astronaut",), dead_leaves_count=2)
    build_koniq_style(tmp_path / "data" / "demo" / "koniq10k", sources=("astronaut", "coffee", "rocket"),
                      crops_per_source=2, dead_leaves_count=4, variants=6)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "held-out images: SRCC" in outputs and "blurred" in outputs
    assert (tmp_path / "runs" / "quickstart" / "checkpoints" / "best.ckpt").is_file()
