"""Running ``qmamba score`` in-process from tests, as a user would from a shell."""

from __future__ import annotations

from qmamba.cli import main


def run_score(trained, *args: str) -> int:  # noqa: ANN001 (the session fixture's (root, run folder) pair)
    """qmamba score with the trained test model on the CPU; its exit status (0 when it returns)."""
    try:
        main(["score", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"), "--device", "cpu", *args])
    except SystemExit as exit_info:
        return exit_info.code
    return 0
