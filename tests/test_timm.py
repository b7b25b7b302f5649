"""timm backbones under qmamba's quality head (``timm:<name>``): the whole pipeline with timm's tiny test models, the
one-line refusals, and pretrained weights from the Hugging Face cache offline or from a file."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

import qmamba
from qmamba.cli import main
from qmamba.commands.serve import create_app
from qmamba.errors import UsageError
from qmamba.inference.export import export_onnx, verify_onnx
from qmamba.models import build_backbone, build_model
from qmamba.models.flops import count_flops
from qmamba.training import QMambaIQA
from qmamba.training.callbacks import FlopsModelSummary

TIMM_VIT = "timm:test_vit"  # timm's 0.3 M-parameter ViT: attention, LayerNorm, any input size


@pytest.mark.slow  # 25 s on 2 cores of a Zen 3 EPYC: fits, tests, a publish and an ONNX export
def test_a_timm_backbone_trains_tests_predicts_transfers_scores_serves_publishes_and_exports(workdir, capsys, caplog):
    root, config = workdir
    caplog.set_level(logging.INFO)
    main(["fit", "--config", str(config), "--model.init_args.backbone", TIMM_VIT])
    capsys.readouterr()
    run = root / "runs" / "tiny"
    ckpt = run / "checkpoints" / "best.ckpt"
    assert "Total Flops: one forward of a 1x3x32x32 crop; one multiply-add = one FLOP" in caplog.text
    module = QMambaIQA.load_from_checkpoint(ckpt, map_location="cpu")
    module.example_input_array = torch.zeros(1, 3, 32, 32)  # the fit's crop
    summary = FlopsModelSummary(max_depth=1)._summary(None, module)
    assert summary.total_flops == count_flops(module.model, 32).total > 0  # the paper's count, not Lightning's

    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])
    assert "SRCC" in capsys.readouterr().out
    main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", "best"])
    assert len((run / "predictions.csv").read_text().splitlines()) > 1
    main(["transfer", "--source", str(ckpt), "--config", str(config), "--methods", "none,head", "--out", "tr"])
    assert pd.read_csv(root / "tr" / "results.csv")["method"].tolist() == ["none", "head"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", "--source", str(ckpt), "--config", str(config), "--methods", "none,styleprompt", "--out",
              "tr2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "transfer method styleprompt attaches prompts" in err[0]
    assert not (root / "tr2").exists()  # before any method ran

    images = sorted((root / "kadid" / "images").glob("I0*.png"))[:4]
    scorer = qmamba.load(ckpt, device="cpu")
    assert scorer.model.backbone.name == TIMM_VIT
    expected = scorer.score([str(p) for p in images])
    scores = root / "scores.jsonl"
    main(["score", "--ckpt_path", str(ckpt), *map(str, images), "-o", str(scores), "--device", "cpu"])
    rows = {row["path"]: row["score"] for row in map(json.loads, scores.read_text().splitlines())}
    np.testing.assert_allclose([rows[str(p)] for p in images], expected, rtol=1e-5)

    with TestClient(create_app(scorer)) as client:
        response = client.post("/score", files=[("files", (images[0].name, images[0].read_bytes(), "image/png"))])
    assert response.json()["results"][0]["score"] == pytest.approx(expected[0], rel=1e-5)

    main(["publish", str(run), "-o", str(root / "shared")])
    published = qmamba.load(root / "shared", device="cpu")
    np.testing.assert_allclose(published.score([str(p) for p in images]), expected, rtol=1e-5)

    onnx_file = export_onnx(scorer, root / "model.onnx")
    assert verify_onnx(scorer, onnx_file, batches=(1, 3)) < 1e-4


def test_timm_names_and_transfer_methods_that_cannot_run_are_one_line(workdir, capsys, monkeypatch):
    with pytest.raises(UsageError, match=r"unknown timm model 'test_vitt' in 'timm:test_vitt'; did you mean "
                                         r"timm:test_vit"):
        build_model("timm:test_vitt")
    with pytest.raises(UsageError, match=r"timm:test_vit: .*no_such_option.*timm.create_model's arguments"):
        build_model(TIMM_VIT, no_such_option=3)
    root, config = workdir
    for args, message in (
        (["--model.init_args.backbone", "timm:nosuchmodel"], "unknown timm model 'nosuchmodel'"),
        (["--model.init_args.backbone", TIMM_VIT, "--trainer.callbacks+=qmamba.training.PromptTuning",
          "--trainer.callbacks.source", "source.ckpt", "--trainer.callbacks.method", "styleprompt"],
         "transfer method styleprompt attaches prompts to the stages of a vision-Mamba backbone, and timm:test_vit "
         "has none: use head, full or ssf with it"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
        assert not (root / "runs").exists()  # refused before the run folder
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    with pytest.raises(UsageError, match=r'timm:test_vit needs timm: pip install "qmamba\[timm\]"'):
        build_model(TIMM_VIT)


def _hub_cache(cache: Path, repo: str, weights: dict[str, torch.Tensor]) -> None:
    """huggingface_hub's cache layout for one file: refs/main names a commit, its snapshot holds the file."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(weights, folder / "snapshots" / commit / "model.safetensors")


def test_timm_pretrained_weights_load_offline_from_the_hub_cache_and_from_files(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    import timm

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    torch.manual_seed(1)
    reference = timm.create_model("test_resnet")  # with its ImageNet classifier, as the Hub's file holds it
    weights = {k: v.contiguous() for k, v in reference.state_dict().items()}
    _hub_cache(tmp_path / "hub", "timm/test_resnet.r160_in1k", weights)

    def loaded(backbone) -> None:
        own = backbone.model.state_dict()
        assert own.keys() == {k for k in weights if not k.startswith("fc.")}  # the classifier dropped
        assert all(torch.equal(own[k], weights[k]) for k in own)

    loaded(build_backbone("timm:test_resnet", pretrained="imagenet"))
    torch.save(weights, tmp_path / "resnet.pth")
    loaded(build_backbone("timm:test_resnet", pretrained=tmp_path / "resnet.pth"))
    with pytest.raises(UsageError, match=r"timm:test_convnext's pretrained weights \(model.safetensors of the Hugging "
                                         r"Face repo timm/test_convnext.r160_in1k\) are not in the Hugging Face cache "
                                         r".*hf download timm/test_convnext.r160_in1k model.safetensors.*"
                                         r"models--timm--test_convnext.r160_in1k"):
        build_backbone("timm:test_convnext", pretrained="imagenet")
    with pytest.raises(UsageError, match=r"pretrained: .*nothere.pth is not a file"):
        build_backbone("timm:test_resnet", pretrained=tmp_path / "nothere.pth")
