"""ONNX export of a trained QMamba through ``torch.export`` and the pure-PyTorch selective scan.

The command is :mod:`qmamba.commands.export` (``qmamba export --ckpt_path best.ckpt --output qmamba.onnx``).

VMamba itself cannot be exported (its scan exists only as a CUDA kernel); qmamba's blocked pure-PyTorch scan is
plain tensor algebra, so the whole regressor exports. The graph maps a batch of normalised crops (dynamic batch
size, fixed crop size) to unit-scale scores, like the PyTorch model; the ONNX metadata records what a caller needs
around it (crop size, crop count, normalisation, the score scale and direction). Requires ``pip install
"qmamba[export]"`` (onnx, onnxscript; onnxruntime to verify).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmamba.errors import QMambaError, UsageError
from qmamba.inference.scoring import Scorer

__all__ = ["export_onnx", "verify_onnx"]


def export_onnx(scorer: Scorer, output: str | os.PathLike[str], opset: int = 18) -> Path:
    """Write ``scorer``'s model as ONNX with a dynamic batch axis; returns the path."""
    import onnx

    model = scorer.model.float().cpu().eval()
    size = scorer.crops.size
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():  # builds (and caches) the scan-order index tables eagerly: built while tracing, their
        model(example)  # construction would be traced too and stop on data-dependent checks
    batch = torch.export.Dim("batch", min=1, max=4096)
    output = Path(output)
    tmp = _temporary_next_to(output)  # before the export's minutes: an unwritable folder is said at once
    try:
        torch.onnx.export(model, (example,), tmp, dynamo=True, opset_version=opset, input_names=["crops"],
                          output_names=["unit_scores"], dynamic_shapes={"images": {0: batch}}, verbose=False)
        graph = onnx.load(tmp)
        meta: dict[str, Any] = {
            **scorer.info,
            "input": "(N, 3, crop_size, crop_size) crops of RGB images in [0, 1] normalised with mean/std; an "
                     "image's score is the mean over its crops, mapped with score_range",
            "mean": list(scorer.crops.preprocessing.mean),
            "std": list(scorer.crops.preprocessing.std),
        }
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=json.dumps(value, default=float))
        onnx.save(graph, tmp)
        os.replace(tmp, output)
    except OSError as err:  # a full disk while writing
        raise QMambaError(f"cannot write {output}: {err.strerror or err}; free space or pick another --output") \
            from None
    finally:
        tmp.unlink(missing_ok=True)
    return output


def _temporary_next_to(output: Path) -> Path:
    """An exclusively created, randomly named file in ``output``'s folder (a link planted there redirects nothing)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    except OSError as err:
        raise UsageError(f"cannot write --output {output}: {err.strerror or err}; pick a folder you can write") \
            from None
    os.close(fd)
    return Path(tmp)


def verify_onnx(scorer: Scorer, path: str | os.PathLike[str], batches: tuple[int, ...] = (1, 3)) -> float:
    """Largest relative difference between onnxruntime and PyTorch on random crops of several batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    size, worst = scorer.crops.size, 0.0
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        crops = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = scorer.model.float().cpu()(crops).numpy()
        got = session.run(None, {session.get_inputs()[0].name: crops.numpy()})[0]
        worst = max(worst, float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-3))))
    return worst
