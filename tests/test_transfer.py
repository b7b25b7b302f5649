"""Transferable IQA: prompts start as the identity, the callback trains exactly what it should, tuned files reload."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from iqa_fixtures import make_kadid, make_koniq

from qmamba.data import DatasetConfig, IQADataModule
from qmamba.models import build_model
from qmamba.models.prompts import attach_prompts
from qmamba.training import PromptTuning, QMambaIQA, load_tuned
from qmamba.training.prompt_tuning import _model_state


@pytest.mark.parametrize("method", ["styleprompt", "static", "ssf"])
@pytest.mark.parametrize("where", ["block", "stage"])
def test_attached_prompts_start_as_the_identity(method, where):
    torch.manual_seed(0)
    model = build_model("lqmamba_test").eval()
    images = torch.randn(2, 3, 64, 64)
    before = model(images)
    prompts = attach_prompts(model, method, where)
    assert len(prompts) > 0 and all(k.startswith("prompts.") for k in model.state_dict() if "prompt" in k)
    torch.testing.assert_close(model(images), before, rtol=0, atol=0)


def _trainer(root: Path, callbacks: list, steps: int = 2) -> L.Trainer:
    return L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     limit_val_batches=1, num_sanity_val_steps=0, enable_model_summary=False, callbacks=callbacks)


def _data(root: Path) -> IQADataModule:
    return IQADataModule([DatasetConfig("koniq10k", str(root), label="target")], batch_size=4, crop_size=32,
                         eval_crops=1, num_workers=0)


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """A small QMamba "source model" checkpoint (one step on a KADID-format fixture) and a KonIQ-format target set."""
    root = tmp_path_factory.mktemp("transfer")
    make_kadid(root / "kadid", refs=4)
    make_koniq(root / "koniq", n=20)
    module = QMambaIQA("qmamba_test")
    data = IQADataModule([DatasetConfig("kadid10k", str(root / "kadid"))], batch_size=4, crop_size=32, eval_crops=1,
                         num_workers=0)
    trainer = _trainer(root / "source", [], steps=1)
    trainer.fit(module, data)
    path = root / "source.ckpt"
    trainer.save_checkpoint(path)
    return root, path


class Probe(L.Callback):
    """Records what training sees: modes of frozen parts, and which parameters got gradients."""

    def __init__(self) -> None:
        self.frozen_training: list[bool] = []
        self.with_grad: set[str] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.frozen_training.append(pl_module.model.backbone.layers[0].blocks[0].drop_path.training)

    def on_after_backward(self, trainer, pl_module):
        self.with_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method, trainable_prefixes", [
    ("styleprompt", ("model.prompts.", "model.head.")),
    ("ssf", ("model.prompts.", "model.head.")),
    ("head", ("model.head.",)),
])
def test_callback_trains_only_the_chosen_parameters(source, tmp_path, method, trainable_prefixes):
    root, ckpt = source
    module = QMambaIQA("qmamba_test")
    tuning, probe = PromptTuning(str(ckpt), method=method), Probe()
    trainer = _trainer(tmp_path, [tuning, probe])
    trainer.fit(module, _data(root / "koniq"))
    source_state = _model_state(ckpt, trusted=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(trainable_prefixes) for n in trainable)
    assert probe.with_grad == trainable  # gradients reach exactly the tuned set
    for name, value in module.model.backbone.state_dict().items():  # frozen weights are bit-identical
        assert torch.equal(value, source_state[f"backbone.{name}"]), name
    assert probe.frozen_training and not any(probe.frozen_training)  # frozen parts ran in eval mode
    assert tuning.counts[0] == sum(module.model.state_dict()[n[len("model."):]].numel() for n in trainable)


def test_full_finetuning_trains_everything(source, tmp_path):
    root, ckpt = source
    module = QMambaIQA("qmamba_test")
    trainer = _trainer(tmp_path, [PromptTuning(str(ckpt), method="full")], steps=1)
    trainer.fit(module, _data(root / "koniq"))
    assert all(p.requires_grad for p in module.parameters())


def test_tuned_file_is_small_and_reproduces_the_tuned_model(source, tmp_path):
    root, ckpt = source
    module = QMambaIQA("qmamba_test")
    tuning = PromptTuning(str(ckpt), method="styleprompt")
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, accelerator="cpu", enable_progress_bar=False,
                        limit_val_batches=1, num_sanity_val_steps=0, enable_model_summary=False, callbacks=[tuning],
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run", version=""))
    trainer.fit(module, _data(root / "koniq"))
    full = Path(trainer.checkpoint_callback.best_model_path)
    tuned = tmp_path / "run" / "tuned.pt"
    assert tuned.stat().st_size < 0.05 * full.stat().st_size

    tuned_model = build_model("qmamba_test").eval()
    attach_prompts(tuned_model, "styleprompt")
    tuned_model.load_state_dict(_model_state(full, trusted=False))
    rebuilt = build_model("qmamba_test").eval()
    rebuilt.load_state_dict(_model_state(ckpt, trusted=False))
    load_tuned(rebuilt, tuned)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), tuned_model(images), rtol=0, atol=0)
        source_model = build_model("qmamba_test").eval()
        source_model.load_state_dict(_model_state(ckpt, trusted=False))
        assert not torch.equal(source_model(images), tuned_model(images))  # tuning changed something

    twin = copy.deepcopy(rebuilt)  # EMA / SWA copies: the copy's hooks must use the copy's prompts
    with torch.no_grad():
        torch.testing.assert_close(twin(images), rebuilt(images), rtol=0, atol=0)
        twin.prompts["stage0"].beta.bias.add_(1.0)
        assert not torch.equal(twin(images), rebuilt(images))
        torch.testing.assert_close(rebuilt(images), tuned_model(images), rtol=0, atol=0)


@pytest.mark.slow
def test_transfer_command_compares_methods_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    from qmamba.cli import main

    conf = (Path(__file__).parent / "conf" / "tiny.yaml").read_text()
    make_kadid(tmp_path / "kadid", refs=4)
    make_koniq(tmp_path / "koniq", n=20)
    (tmp_path / "source.yaml").write_text(conf.replace("KADID_ROOT", str(tmp_path / "kadid")))
    (tmp_path / "target.yaml").write_text(conf.replace(
        "{name: kadid10k, root: KADID_ROOT, label: tiny_kadid}", f"{{name: koniq10k, root: {tmp_path / 'koniq'}}}"))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "source.yaml"])
    source = tmp_path / "runs" / "tiny" / "checkpoints" / "best.ckpt"
    args = ["transfer", "--source", str(source), "--config", "target.yaml", "--methods", "none,styleprompt,head,full",
            "--src-name", "tiny_kadid", "--out", "tr"]
    main(args)
    results = pd.read_csv(tmp_path / "tr" / "results.csv")
    assert results["method"].tolist() == ["none", "styleprompt", "head", "full"]
    assert (results["source"] == "tiny_kadid").all() and (results["target"] == "target").all()
    counts = dict(zip(results["method"], results["trainable_params"], strict=True))
    assert counts["none"] == 0 < counts["head"] < counts["styleprompt"] < counts["full"]
    totals = dict(zip(results["method"], results["total_params"], strict=True))
    assert counts["full"] == totals["full"] == totals["head"] < totals["styleprompt"]  # prompts add parameters
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny_kadid -> target")]
    assert len(lines) == 4 and all("SRCC" in line and "PLCC" in line for line in lines)
    assert (results["test_images_seen_in_source_training"] == 0).all()

    # a target that is the source's own set split anew, by image: its test images include some the source trained on
    (tmp_path / "again.yaml").write_text(conf.replace("KADID_ROOT", str(tmp_path / "kadid")).replace(
        "label: tiny_kadid}", "label: tiny_kadid, protocol: random}"))
    main(["transfer", "--source", str(source), "--config", "again.yaml", "--methods", "none", "--out", "again"])
    seen = pd.read_csv(tmp_path / "again" / "results.csv")["test_images_seen_in_source_training"].item()
    assert seen > 0 and f"transfer: {seen} of the target's " in capsys.readouterr().out

    import qmamba

    tuned = qmamba.load(tmp_path / "tr" / "styleprompt" / "checkpoints" / "best.ckpt", device="cpu")
    assert tuned.info["datasets"] == ["koniq10k"] and "prompts" in dict(tuned.model.named_children())
    assert isinstance(tuned.score(next((tmp_path / "koniq" / "1024x768").glob("*.jpg"))), float)

    stamp = (tmp_path / "tr" / "styleprompt" / "tuned.pt").stat().st_mtime_ns
    main(args)  # everything finished: nothing is retrained
    assert (tmp_path / "tr" / "styleprompt" / "tuned.pt").stat().st_mtime_ns == stamp


def test_transfer_to_a_target_of_comparisons_reports_pair_metrics(tmp_path, monkeypatch, capsys):
    """A target with comparisons and no scores (once a KeyError on 'srcc' after its fits)."""
    from qmamba.cli import main
    from qmamba.data.demo import simulated_comparisons

    conf = (Path(__file__).parent / "conf" / "tiny.yaml").read_text()
    make_kadid(tmp_path / "kadid", refs=4)
    labels = make_kadid(tmp_path / "target", refs=6)
    split = labels["ref_img"].map({"I01.png": "val", "I02.png": "test"}).fillna("train")  # by reference
    simulated_comparisons("images/" + labels["dist_img"], labels["dmos"], split).to_csv(tmp_path / "target" /
                                                                                       "pairs.csv", index=False)
    (tmp_path / "source.yaml").write_text(conf.replace("KADID_ROOT", str(tmp_path / "kadid")))
    (tmp_path / "target.yaml").write_text(conf.replace(
        "{name: kadid10k, root: KADID_ROOT, label: tiny_kadid}",
        f"{{name: pairs, comparisons: {{file: {tmp_path / 'target' / 'pairs.csv'}, split: split}}}}"))
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "source.yaml"])
    main(["transfer", "--source", str(tmp_path / "runs" / "tiny" / "checkpoints" / "best.ckpt"), "--config",
          "target.yaml", "--methods", "none,head", "--src-name", "tiny_kadid", "--out", "tr"])
    results = pd.read_csv(tmp_path / "tr" / "results.csv")
    assert results["method"].tolist() == ["none", "head"] and "srcc" not in results
    assert results["pair_accuracy"].between(0, 1).all() and (results["log_likelihood"] < 0).all()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny_kadid -> target")]
    assert len(lines) == 2 and all("pair accuracy" in line and "SRCC" not in line for line in lines)


def test_methods_all_means_every_tuning_method_and_unknown_ones_are_refused(tmp_path):
    from qmamba.protocols.transfer import parse_methods, run_transfer

    methods = parse_methods("all")
    assert methods[0] == "none" and "static" in methods  # `all` once left out the v1 prompts
    for method in methods[1:]:
        assert PromptTuning(source=tmp_path / "x.ckpt", method=method).method == method  # each one the callback takes
    assert parse_methods("none, ssf") == ("none", "ssf")
    with pytest.raises(ValueError, match="unknown transfer methods \\['prompt'\\]; choose from none, styleprompt"):
        run_transfer(tmp_path / "x.ckpt", "target.yaml", ["none", "prompt"], tmp_path / "out")
