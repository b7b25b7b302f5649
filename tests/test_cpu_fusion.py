"""CPU inference runs a VSS block's matrix products and convolution with their bias, activation and residual sum
fused by oneDNN (qmamba.ops.cpu_fusion): the same function as the separate ops, and those ops wherever fusing would
change what runs (autograd, hooks, dispatch modes)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from qmamba.models.vmamba import VSSBlock
from qmamba.ops import cpu_fusion

FUSED = {"mkldnn::_linear_pointwise", "mkldnn::_convolution_pointwise"}
UNFUSED = {"aten::gelu", "aten::silu", "aten::addmm"}


@pytest.fixture(scope="module")
def block() -> VSSBlock:
    torch.manual_seed(0)
    block = VSSBlock(16, ssm_ratio=2.0, d_state=1, mlp_ratio=4.0, drop_path=0.1, scan_backend="torch").eval()
    for name, param in block.named_parameters():  # random biases, so that a bias dropped or added twice shows
        if name.endswith("bias") and "dt_projs" not in name:
            torch.nn.init.normal_(param)
    return block.to(memory_format=torch.channels_last)


def ops_run(call) -> set[str]:  # noqa: ANN001
    with profile() as prof:
        call()
    return {event.key for event in prof.key_averages()}


def test_inference_fuses_and_computes_the_same_function(block: VSSBlock) -> None:
    x = torch.randn(2, 6, 5, 16)
    separate = block(x)  # autograd on: the torch ops, one at a time
    assert separate.requires_grad
    with torch.no_grad():
        ran = ops_run(lambda: block(x))
        fused = block(x)
    assert FUSED <= ran and not ran & UNFUSED
    torch.testing.assert_close(fused, separate.detach(), rtol=1e-5, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # as bf16 scoring and bf16-mixed validation run it
        separate = block(x)
        with torch.no_grad():
            ran = ops_run(lambda: block(x))
            fused = block(x)
            native = cpu_fusion.fused_dtype(x, block.mlp.fc1) == torch.bfloat16
    assert fused.dtype == separate.dtype == torch.float32  # the residual stream stays fp32 under autocast
    if native:
        assert FUSED <= ran and not ran & UNFUSED
    else:  # no native bf16 here (AVX2): torch's bf16 ops run
        assert not ran & FUSED
    torch.testing.assert_close(fused, separate.detach(), rtol=0.02, atol=0.02)


def test_training_runs_the_torch_ops_with_stochastic_depth(block: VSSBlock) -> None:
    x = torch.randn(2, 6, 5, 16)
    block.train()
    try:
        torch.manual_seed(1)
        got = block(x)
        torch.manual_seed(1)
        y = x + block.drop_path(block.op(block.norm(x)))
        expected = y + block.drop_path(block.mlp(block.norm2(y)))
    finally:
        block.eval()
    assert torch.equal(got, expected)
    assert not ops_run(lambda: block(x).sum().backward()) & FUSED


def test_hooks_and_dispatch_modes_see_the_torch_ops(block: VSSBlock) -> None:
    x = torch.randn(2, 6, 5, 16)
    seen = []
    handle = block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        with torch.no_grad():
            block(x)
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 6, 5, 64])]

    def flops(grad: bool) -> int:  # torch's counter hooks every module, and counts only the torch ops
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as counter:
            block(x)
        return counter.get_total_flops()

    assert flops(False) == flops(True) > 0

    class Ops(TorchDispatchMode):  # a mode without hooks: fake tensors, a tracer
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Ops() as mode:
        block(x)
    assert "aten.addmm" in mode.seen and not any(op.startswith("mkldnn") for op in mode.seen)

    with torch.no_grad():  # vmap: the fused ops have no batching rule
        ran = ops_run(lambda: torch.func.vmap(block.mlp)(x))
    assert "aten::addmm" in ran and not ran & FUSED
