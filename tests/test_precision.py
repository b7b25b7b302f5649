"""Scoring in bf16: close to fp32 for QMamba and LQMamba through qmamba.load and qmamba score, recorded in every
output, and refused on one line where the device would only emulate it."""

from __future__ import annotations

import copy
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
from qmamba.models.low_precision import cast_matmul_weights, prepare_bf16_inference
from qmamba.models.ss2d import SS2D

UNIT_BOUND = 0.01  # docs/scoring.md: bf16 scores within 0.01 of fp32 on the unit scale


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU with AVX-512-BF16, whatever this one has (bf16 is then emulated here, as exact, only slower)."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx512_bf16"}))


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
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
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


@pytest.mark.parametrize("name", ["qmamba_test", "lqmamba_test"])
def test_bf16_scans_hand_their_norm_bf16_within_bf16_rounding_of_autocast(name):
    """How a bf16 scorer runs SS2D: the scan (still fp32 inside) returns bf16, so the LayerNorm after it reads bf16 and
    keeps its statistics in fp32 inside the op, where under autocast alone it normalised an fp32 copy. Not on a GPU,
    whose autocast normalises in fp32 whatever it is given."""
    torch.manual_seed(0)
    model, images = build_model(name).eval(), torch.randn(2, 3, 64, 64)
    for_gpu = prepare_bf16_inference(copy.deepcopy(model), torch.device("cuda"))
    assert {m.scan_out_dtype for m in for_gpu.modules() if isinstance(m, SS2D)} == {None}
    norm_inputs = []
    for module in model.modules():
        if isinstance(module, SS2D):
            module.out_norm.register_forward_pre_hook(lambda _, args: norm_inputs.append(args[0].dtype))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = cast_matmul_weights(model)(images).float()
        assert set(norm_inputs) == {torch.float32}
        norm_inputs.clear()
        scores = prepare_bf16_inference(model, torch.device("cpu"))(images).float()
    assert set(norm_inputs) == {torch.bfloat16}
    assert 0 < (scores - expected).abs().max() < 0.01 * expected.abs().max()  # bf16's rounding, once more


@pytest.mark.slow
def test_a_compiled_bf16_scorer_is_one_graph_with_the_bf16_scan_and_the_eager_scores(trained, native_bf16):
    """--compile with --precision bf16: the model compiles as one graph under autocast, the fused scan inside it
    writing bf16, and the scores are eager bf16's within bf16's rounding (inductor fuses the norms and activations
    around the scan and rounds their results once)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    checkpoint = trained[1] / "checkpoints" / "best.ckpt"
    images = [str(p) for p in sorted((trained[0] / "kadid" / "images").glob("*.png"))[:8]]
    eager = qmamba.load(checkpoint, device="cpu", precision="bf16")
    compiled = qmamba.load(checkpoint, device="cpu", precision="bf16", compile=True)
    torch._dynamo.reset()
    counters.clear()
    scores, modules = run_and_get_code(compiled.score, images)
    code = "\n".join(modules)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    layers = sum(isinstance(m, SS2D) for m in compiled.model.modules())
    assert code.count("torch.ops.qmamba.cpu_scan.default(") == layers
    assert code.count("torch.bfloat16)") >= layers  # each scan's out_dtype argument
    span = eager.scale.high - eager.scale.low
    difference = np.abs(np.array(scores) - np.array(eager.score(images))) / span
    assert difference.max() < UNIT_BOUND / 2, difference.max()
