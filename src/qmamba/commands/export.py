"""``qmamba export``: a trained QMamba as an ONNX file, checked against PyTorch with onnxruntime.

    qmamba export --ckpt_path runs/demo/checkpoints/best.ckpt --output qmamba.onnx
"""

from __future__ import annotations

import argparse

from qmamba.errors import UsageError
from qmamba.inference.export import export_onnx, verify_onnx
from qmamba.inference.model_sources import add_model_arguments
from qmamba.inference.scoring import load

__all__ = ["main"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba export", description="Export a trained QMamba to ONNX.")
    add_model_arguments(parser)
    parser.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UsageError(f"qmamba export needs the export extra ({err.name} is missing): pip install "
                         "\"qmamba[export]\"") from None
    scorer = load(args.ckpt_path, device="cpu", trusted=args.trust_checkpoint, sha256=args.sha256)
    path = export_onnx(scorer, args.output, args.opset)
    print(f"qmamba export: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if not args.no_verify:
        print(f"qmamba export: onnxruntime vs PyTorch, max relative difference {verify_onnx(scorer, path):.2e}")
