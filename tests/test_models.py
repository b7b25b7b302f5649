"""Backbones and the QMamba regressor: exact sizes, official checkpoint compatibility, forward/backward, training."""

from __future__ import annotations

import argparse

import pytest
import torch
from vmamba_fixtures import fake_official_checkpoint, official_keys

from qmamba.files.checkpoint import CheckpointError
from qmamba.files.weights import WeightsError
from qmamba.models import build_backbone, build_model, list_models
from qmamba.models.vmamba import VMAMBA_PRESETS

# backbone parameters incl. the final norm, without any head (the papers' counts; docs/architecture.md)
EXACT_PARAMS = {
    "qmamba_tiny": 27_992_640,
    "qmamba_tiny5": 29_936_832,
    "qmamba_small": 49_378_752,
    "qmamba_base": 87_532_800,
    "lqmamba_tiny": 29_877_072,
    "lqmamba_small": 52_911_600,
    "lqmamba_base": 93_791_552,
    "vmamba_tiny_s1l8": 30_249_064 - 769_000,
    "vmamba_tiny_s2l5": 30_705_832 - 769_000,
    "vmamba_small": 50_147_752 - 769_000,
    "vmamba_base": 88_557_800 - 1_025_000,
    "vmamba_vanilla_tiny": 22_893_448 - 769_000,
}
OFFICIAL_KEY_FILES = {
    "vmamba_tiny_s2l5": "keys_vmamba_tiny_s2l5.txt",
    "vmamba_tiny_s1l8": "keys_vmamba_tiny_s1l8.txt",
    "vmamba_vanilla_tiny": "keys_vanilla_tiny_legacy.txt",
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_backbone_parameter_counts_are_exact(name):
    with torch.device("meta"):
        backbone = build_backbone(name)
    assert _count(backbone) == EXACT_PARAMS[name]


def test_regressor_head_is_gap_plus_linear():
    with torch.device("meta"):
        model = build_model("qmamba_small")
    assert model.num_params(include_head=False) == 49_378_752
    assert model.num_params() - model.num_params(include_head=False) == 768 + 1


@pytest.mark.parametrize("name", ["vmamba_tiny_s2l5", "vmamba_tiny_s1l8"])
def test_state_dict_names_and_shapes_equal_official(name):
    official = official_keys(OFFICIAL_KEY_FILES[name])
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_backbone(name).state_dict().items()}
    assert ours == {k: v for k, v in official.items() if not k.startswith("classifier.head.")}


def test_qmamba_tiny_keys_are_the_s2l5_keys_minus_one_block():
    official = official_keys("keys_vmamba_tiny_s2l5.txt")
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_backbone("qmamba_tiny").state_dict().items()}
    expected = {k: v for k, v in official.items()
                if not k.startswith(("classifier.head.", "layers.2.blocks.4."))}
    assert ours == expected
    assert len(ours) == 202  # tensors of the official s2l5 tiny checkpoint without block 2.4 and the head


@pytest.mark.parametrize("name", ["vmamba_tiny_s2l5", "vmamba_tiny_s1l8", "vmamba_vanilla_tiny"])
def test_official_checkpoint_loads_every_tensor(tmp_path, name):
    path = tmp_path / "official.pth"
    state = fake_official_checkpoint(path, OFFICIAL_KEY_FILES[name])
    backbone = build_backbone(name, pretrained=path)
    ours = backbone.state_dict()
    if name == "vmamba_vanilla_tiny":  # legacy names, remapped
        assert torch.equal(ours["patch_embed.0.weight"], state["patch_embed.proj.weight"])
        assert torch.equal(ours["layers.1.blocks.0.op.A_logs"], state["layers.1.blocks.0.self_attention.A_logs"])
        assert torch.equal(ours["classifier.norm.weight"], state["norm.weight"])
        assert len(ours) == len(state) - 2  # everything but head.weight / head.bias
    else:
        for key, value in ours.items():
            assert torch.equal(value, state[key]), key
    assert torch.isfinite(backbone(torch.randn(1, 3, 64, 64))).all()
    assert _channels_last_convolutions(backbone)  # loading copied into the parameters' own layout


def _channels_last_convolutions(model: torch.nn.Module) -> bool:
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def test_convolutions_run_channels_last_without_copying_their_weights():
    """VMamba's maps are channel-last: its convolution weights are too, so that a convolution of a permuted map
    does not copy its weight into the map's layout at every call, and gradients come in the weights' layout; a
    contiguous state dict (an older checkpoint) loads into that layout."""
    model = build_model("qmamba_test")
    assert _channels_last_convolutions(model)
    model.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    assert _channels_last_convolutions(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        scores = model(images)
    scores.sum().backward()
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1}
    copied = [e for e in prof.events() if e.name == "aten::copy_" and e.input_shapes
              and tuple(e.input_shapes[0]) in weight_shapes]
    assert copied == []
    assert all(p.grad.stride() == p.stride() for p in model.parameters() if p.dim() == 4)


@pytest.mark.parametrize("shape", [(3, 2, 1, 2, 7, 10), (3, 2, 1, 1, 14, 14), (2, 2, 0, 2, 9, 8), (3, 1, 1, 1, 5, 6)],
                         ids=["vmamba-odd", "vmamba", "patches", "stride-1"])
def test_patchwise_conv_computes_the_convolution_as_a_matrix_product(monkeypatch, shape):
    """The product over the patches (any kernel, stride, padding; odd and non-square maps) has the convolution's
    values and every gradient, in fp32 and under bf16 autocast, and takes the channel-last weight as it is."""
    from qmamba.models import layers

    kernel, stride, padding, batch, height, width = shape
    torch.manual_seed(0)
    conv = layers.PatchwiseConv2d(8, 12, kernel, stride, padding).to(memory_format=torch.channels_last)
    monkeypatch.setattr(layers, "PATCH_PRODUCT_WEIGHTS_PER_POSITION", 0)  # always the product
    images = torch.randn(batch, height, width, 8).permute(0, 3, 1, 2)  # a channel-last map, as VMamba's
    assert conv.as_product(images)
    for bf16 in (False, True):
        results = []
        for compute in (conv, lambda x: torch.nn.Conv2d.forward(conv, x)):
            x = images.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = compute(x)
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
            results.append((y, *torch.autograd.grad(y, (x, conv.weight, conv.bias), grad)))
        tolerance = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
        for product, convolution in zip(*results):
            assert product.shape == convolution.shape and product.dtype == convolution.dtype
            torch.testing.assert_close(product.float(), convolution.float(), **tolerance)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)  # (B, C, H, W) over a channel-last map


def test_vmamba_downsamples_with_a_matrix_product_only_where_its_map_is_small_and_nothing_observes_it():
    """QMamba-T's last downsampling (384 -> 768 on a 14 x 14 map) runs as the product up to batch 4, the convolution
    from batch 8 and at the downsampling before it; dispatch modes (FLOP counters, fake tensors), like compiling and
    exporting, see the convolution."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("qmamba_tiny")
    last, before = (model.backbone.layers[i].downsample[1] for i in (2, 1))
    assert isinstance(last, torch.nn.Conv2d) and type(last).__name__ == "PatchwiseConv2d"
    assert [last.as_product(torch.empty(b, 384, 14, 14)) for b in (1, 2, 4, 8)] == [True, True, True, False]
    assert not before.as_product(torch.empty(1, 192, 28, 28))
    x = torch.randn(2, 14, 14, 384).permute(0, 3, 1, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager = last(x)
    ran = {e.name for e in prof.events()}
    assert "aten::convolution" not in ran and {"aten::linear", "aten::as_strided"} <= ran
    with FlopCounterMode(display=False) as flops:
        observed = last(x)
    assert flops.get_flop_counts()["Global"] == {torch.ops.aten.convolution: 2 * 2 * 49 * 768 * 384 * 9}
    torch.testing.assert_close(observed, eager, rtol=1e-4, atol=1e-4)


def test_qmamba_tiny_from_the_5_block_checkpoint_drops_exactly_one_block(tmp_path, caplog):
    path = tmp_path / "vssm_tiny_0230_ckpt_epoch_262.pth"
    state = fake_official_checkpoint(path, "keys_vmamba_tiny_s2l5.txt")
    from qmamba.models import load_official_checkpoint

    backbone = build_backbone("qmamba_tiny")
    report = load_official_checkpoint(backbone, path)
    assert report.missing == []
    dropped = sorted(k for k in state if k.startswith(("layers.2.blocks.4.", "classifier.head.")))
    assert sorted(report.dropped) == dropped
    assert len([k for k in report.dropped if k.startswith("layers.2.blocks.4.")]) == 18


def test_lqmamba_starts_from_vmamba_weights_with_new_biattn(tmp_path):
    path = tmp_path / "official.pth"
    fake_official_checkpoint(path, "keys_vmamba_tiny_s2l5.txt")
    from qmamba.models import load_official_checkpoint

    report = load_official_checkpoint(build_backbone("lqmamba_tiny"), path)
    assert report.missing and all(".op.fusion." in k for k in report.missing)
    assert len(report.missing) == 10 * 6  # 10 blocks x (norm w/b, fc1 w/b, fc2 w/b)


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    path = tmp_path / "vssm1_tiny_0230s.pth"
    fake_official_checkpoint(path, "keys_vmamba_tiny_s1l8.txt")
    with pytest.raises(CheckpointError, match=r"shape mismatches(.|\n)*in_proj\.weight(.|\n)*vmamba_tiny_s1l8"):
        build_backbone("vmamba_tiny_s2l5", pretrained=path)


def test_untrusted_pickle_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {}, "config": argparse.Namespace(lr=0.1)}, path)  # a pickled config object
    with pytest.raises(CheckpointError, match="trusted=True"):
        build_backbone("qmamba_test", pretrained=path)
    with pytest.raises(WeightsError, match="missing.pth does not exist"):
        build_backbone("qmamba_test", pretrained=tmp_path / "missing.pth")


def test_unknown_names_are_listed():
    with pytest.raises(ValueError, match="qmamba_tiny"):
        build_backbone("qmamba_huge")
    with pytest.raises(ValueError, match="head_features"):
        build_model("qmamba_test", head_features=("stage7",))


@pytest.mark.parametrize("name", ["qmamba_test", "lqmamba_test", "vim_test"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_forward_backward_shapes(name, size):
    model = build_model(name)
    images = torch.randn(2, 3, *size)
    scores = model(images)
    assert scores.shape == (2,)
    scores.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_forward_features_are_named_stage_outputs():
    model = build_model("qmamba_test")
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    assert [tuple(feats[f"stage{i}"].shape) for i in range(4)] == [
        (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)
    ]
    assert feats["norm"].shape == (2, 128, 2, 2) and feats["pooled"].shape == (2, 128)
    assert torch.allclose(feats["pooled"], feats["norm"].mean(dim=(2, 3)), atol=1e-6)


def test_multi_stage_head_pools_normalises_and_concatenates_the_named_features():
    torch.manual_seed(0)
    model = build_model("qmamba_test", head_features=("stage2", "pooled"), head_hidden=32).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images)
        head = model.head
        stage2 = head.norms[0](features["stage2"].mean(dim=(2, 3)))
        pooled = head.norms[1](features["pooled"])
        expected = head.regressor(torch.cat([stage2, pooled], dim=-1)).squeeze(-1)
        torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
    assert head.regressor[0].in_features == features["stage2"].shape[1] + features["pooled"].shape[1]
    assert head.regressor[0].out_features == 32
    with pytest.raises(ValueError, match="head_features \\['stage9'\\] not produced"):
        build_model("qmamba_test", head_features=("stage9",))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_model("qmamba_test")
    ckpt = build_model("qmamba_test", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    plain(images).sum().backward()
    ckpt(images).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_ssm_parameters_are_flagged_for_no_weight_decay():
    model = build_model("qmamba_test")
    flagged = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert flagged == {"A_logs", "Ds"}


def test_window_presets_are_configurable():
    custom = (("h", "w4"), ("v", "w2c_flip"), ("h_flip", "w2"), ("v_flip", "w2"))
    model = build_model("qmamba_test", directions=custom, bi_attn=True)
    assert model.backbone.layers[1].blocks[0].op.directions == ("v", "w2c_flip")
    assert model(torch.randn(1, 3, 40, 56)).shape == (1,)  # maps not divisible by the windows get padded


@pytest.mark.parametrize("name", ["qmamba_test", "lqmamba_test", "vim_test"])
def test_tiny_model_trains_with_falling_loss(name):
    torch.manual_seed(0)
    model = build_model(name)
    images = torch.randn(8, 3, 32, 32)
    target = torch.linspace(-1, 1, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(images), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_registry_covers_the_public_names():
    required = {"qmamba_tiny", "qmamba_small", "qmamba_base", "lqmamba_small", "lqmamba_base", "vmamba_tiny_s1l8",
                "vmamba_tiny_s2l5", "vmamba_small", "vmamba_base"}
    assert required <= set(list_models())
    assert set(VMAMBA_PRESETS) <= set(list_models())
