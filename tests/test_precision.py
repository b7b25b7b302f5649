"""Scoring in bf16: close to fp32 for QMamba and LQMamba through qmamba.load and qmamba score, recorded in every
output, and refused on one line where the device would only emulate it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import qmamba
from qmamba.cli import main
from qmamba.commands.serve import create_app
from qmamba.files.model_folder import write_model_folder
from qmamba.inference import precision as precision_module
from qmamba.inference.preprocessing import Preprocessing
from qmamba.models import build_model

UNIT_BOUND = 0.01  # docs/scoring.md: bf16 scores within 0.01 of fp32 on the unit scale


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with AVX-512-BF16, whatever this one has (bf16 is then emulated here, as exact, only slower)."""
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))


def _lqmamba_folder(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("lqmamba_test")
    with torch.no_grad():  # scores mid-scale, as a trained model's are
        model.head.regressor[-1].bias.fill_(0.5)
    config = {"architecture": {"backbone": "lqmamba_test"}, "datasets": ["mine"],
              "scales": [{"low": 0.0, "high": 1.0, "lower_better": False}],
              "preprocessing": Preprocessing(crop_size=32, eval_crops=2).as_dict()}
    write_model_folder(path, model.state_dict(), config, "test model\n")
    return path


def test_bf16_scores_are_within_the_bound_of_fp32_for_qmamba_and_lqmamba(trained, tmp_path, native_bf16):
    root, run = trained
    images = [str(p) for p in sorted((root / "kadid" / "images").glob("*.png"))[:12]]
    for model in (run / "checkpoints" / "best.ckpt", _lqmamba_folder(tmp_path / "lqmamba")):
        fp32, bf16 = qmamba.load(model, device="cpu"), qmamba.load(model, device="cpu", precision="bf16")
        assert (fp32.info["precision"], bf16.info["precision"]) == ("fp32", "bf16")
        span = fp32.scale.high - fp32.scale.low
        difference = np.abs(np.array(bf16.score(images)) - np.array(fp32.score(images))) / span
        assert difference.max() < UNIT_BOUND, (model, difference.max())
        assert difference.max() > 0  # bf16 did run: not an fp32 run under another name

    main(["score", "--model", str(run / "checkpoints" / "best.ckpt"), "--precision", "bf16", "--device", "cpu",
          *images[:3], "-o", str(tmp_path / "scores.json")])
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["model"]["precision"] == "bf16"
    expected = qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu", precision="bf16").score(images[:3])
    np.testing.assert_allclose([r["score"] for r in written["scores"]], expected, rtol=1e-6)
    main(["score", "--model", str(run / "checkpoints" / "best.ckpt"), "--precision", "auto", "--device", "cpu",
          images[0], "-o", str(tmp_path / "scores.parquet")])
    import pyarrow.parquet as pq

    metadata = json.loads(pq.read_schema(tmp_path / "scores.parquet").metadata[b"qmamba"])
    assert metadata["model"]["precision"] == "bf16"  # auto on a CPU with native bf16
    with TestClient(create_app(qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu",
                                           precision="bf16"))) as client:
        assert client.get("/health").json()["precision"] == "bf16"


def test_bf16_where_the_device_would_emulate_it_is_one_line_and_auto_is_fp32(trained, monkeypatch, capsys):
    _, run = trained
    monkeypatch.setattr(precision_module, "_cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    image = str(next((trained[0] / "kadid" / "images").glob("*.png")))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--model", str(run / "checkpoints" / "best.ckpt"), "--precision", "bf16", "--device", "cpu",
              image])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "precision bf16: this CPU has neither AVX-512-BF16 nor AMX" in error
    assert qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu", precision="auto").precision == "fp32"
    with pytest.raises(qmamba.errors.UsageError, match="precision must be one of fp32, bf16, auto"):
        qmamba.load(run / "checkpoints" / "best.ckpt", device="cpu", precision="fp16")


@pytest.mark.parametrize("name", ["qmamba_test", "lqmamba_test", "vim_test"])
def test_matmul_weights_stored_in_bf16_give_autocasts_scores_bit_for_bit(name):
    """How a bf16 scorer loads its model: the weights autocast would cast at every batch are cast once, which
    changes nothing in what is computed; norms and the scans' parameters stay fp32."""
    from qmamba.models.low_precision import cast_matmul_weights

    torch.manual_seed(0)
    model, images = build_model(name).eval(), torch.randn(2, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images).float()
        cast_matmul_weights(model)
        assert torch.equal(model(images).float(), expected)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {dtypes[n] for n in dtypes if n.endswith((".norm.weight", "A_logs", "Ds", "A_log", "dt_projs_weight"))
            } <= {torch.float32}
    assert torch.bfloat16 in dtypes.values()
