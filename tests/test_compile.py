"""torch.compile: the fused scans as custom ops (opcheck), whole models compiled as one graph with the fused kernel
inside and the eager model's numbers, and the ``compile`` option of fit, score and qmamba.load."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from scan_cases import kernel_args
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import qmamba
from qmamba.cli import main
from qmamba.models import build_model
from qmamba.models.compiling import CompileError, check_compiler
from qmamba.models.ss2d import SS2D
from qmamba.ops.cpu_scan import selective_scan_cpu
from qmamba.ops.scan_order import ScanOrder

# Tests that compile the same graphs run one after another on one pytest-xdist worker: the first compiles, the others
# find the graphs in inductor's cache (two workers compiling the same graph at once would both pay for it)
same_scorer_graph = pytest.mark.xdist_group("compiled-scorer")
same_layer_graphs = pytest.mark.xdist_group("compiled-ss2d")


def _norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("merge,rank,out_dtype", [
    (True, 3, torch.float32), (False, None, torch.float32),
    pytest.param(True, 3, torch.bfloat16, marks=pytest.mark.slow),  # 9-12 s on 2 cores of a Zen 3 EPYC
], ids=["merged-rank", "each-full", "bf16"])
def test_cpu_scan_custom_ops_pass_opcheck(merge, rank, out_dtype):
    args = kernel_args(ScanOrder(("w3", "w3c_flip"), 4, 5), 2, 16, 2, merge, rank, out_dtype)  # padded windows
    torch.library.opcheck(selective_scan_cpu.op, args)
    grad_y = torch.randn_like(selective_scan_cpu.op(*args))
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:-1]]  # the backward is not differentiable
    torch.library.opcheck(selective_scan_cpu.backward_op, (grad_y, *plain))
    if merge:  # inference's scan with out_norm: no autograd
        norm = (torch.rand(16) + 0.5, torch.randn(16), 1e-5)
        torch.library.opcheck(selective_scan_cpu.normalized_op, (*plain[:9], plain[10], out_dtype, *norm))


def _compiled_against_eager(name: str, size: int) -> None:
    """``name`` with one block per stage: every stage's scan orders, downsampling and the head, compiled forward and
    backward; the preset's further blocks repeat the same graph (and took inductor 2.5 times as long)."""
    torch.manual_seed(0)
    model = build_model(name, depths=(1, 1, 1, 1))
    images = torch.randn(2, 3, size, size)
    eager = model(images)
    eager.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    scores, modules = run_and_get_code(compiled, images)  # inductor's modules of the call
    code = "\n".join(modules)
    scores.sum().backward()
    assert not counters["graph_break"]
    ss2d_layers = sum(type(m).__name__ == "SS2D" for m in model.modules())
    assert code.count("torch.ops.qmamba.cpu_scan.default(") == ss2d_layers  # the fused kernel, inside the graph
    # fp32 rounding is the floor here: two eager implementations of the same function (the fused kernel and the
    # torch scan) differ by 3.5e-6 to 9.1e-6 on QMamba-T's scores for such inputs, and inductor reorders the fp32
    # sums of norms and products around the kernel (1.6e-5 seen on the scores, 1.05e-5 on a small LayerNorm bias's
    # gradient); a wrong graph differs by orders of magnitude more
    assert _norm_err(scores, eager) < 3e-5
    for n, p in model.named_parameters():
        if n in eager_grads:
            assert _norm_err(p.grad, eager_grads[n]) < 3e-5, n


@pytest.mark.slow
def test_compiled_qmamba_tiny_stages_are_one_graph_with_the_fused_kernel_and_equal_eager():
    _compiled_against_eager("qmamba_tiny", 64)


@pytest.mark.slow
def test_compiled_lqmamba_tiny_stages_with_padded_windows_equal_eager():
    _compiled_against_eager("lqmamba_tiny", 64)  # 16x16 at stage 0: 14-token windows are padded


@same_layer_graphs
@pytest.mark.slow
@pytest.mark.parametrize("options", [{"fullgraph": True}, {"dynamic": True, "fullgraph": True}, {}],
                         ids=["fullgraph", "dynamic", "default"])
def test_torch_compile_runs_ss2d_at_any_sequence_of_input_sizes(options):
    """A user's own torch.compile, forward and backward, on three map sizes in turn (the second makes the default
    symbolic). The scan orders were once constants of the graph, which failed at the second size; one window
    direction is padded at every size here, the other h. One SS2D layer: a whole model's compilations at symbolic
    sizes took 3 minutes each on 2 cores, for the same code."""
    torch.manual_seed(0)
    layer = SS2D(8, directions=("h", "w3c_flip"))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, **options)
    for height, width in ((6, 7), (9, 5), (8, 10)):
        x = torch.randn(2, height, width, 8)
        outputs, grads = [], []
        for run in (compiled, layer):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            y = run(x.requires_grad_())
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            outputs.append(y.detach())
            grads.append([x.grad, *(p.grad for p in layer.parameters())])
        assert _norm_err(*outputs) < 3e-5, (height, width)
        assert all(_norm_err(a, b) < 3e-5 for a, b in zip(*grads, strict=True)), (height, width)
    assert not counters["graph_break"]


@same_scorer_graph
@pytest.mark.slow
def test_a_compiled_scorer_takes_every_batch_size_with_one_frozen_graph(trained, monkeypatch):
    """serve --compile once answered HTTP 500 from the ninth new batch size on (torch's recompile limit): the batch
    dimension is dynamic now, and serve's batches are the scorer's. On the CPU the graph is frozen (the weights folded
    in), set around the compiling call: passed as torch.compile's option it had gained nothing."""
    from torch._inductor import freezing

    freezes, real_freeze = [], freezing.freeze

    def counted_freeze(*args: object, **kwargs: object) -> object:
        freezes.append(args)
        return real_freeze(*args, **kwargs)

    monkeypatch.setattr(freezing, "freeze", counted_freeze)
    checkpoint = trained[1] / "checkpoints" / "best.ckpt"
    eager, compiled = (qmamba.load(checkpoint, device="cpu", compile=c) for c in (False, True))
    size = eager.crops.size
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    for count in range(2, 12):  # ten batch sizes
        crops = [torch.randn(1, 3, size, size) for _ in range(count)]  # normalised crops, one per image
        assert compiled.score_crops(crops) == pytest.approx(eager.score_crops(crops), abs=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert freezes


@same_scorer_graph
@pytest.mark.slow  # a frozen scorer's graph, which inductor never caches: 19-36 s on 2 Ice Lake cores
def test_the_recompile_limit_is_one_line_naming_the_cause(trained):
    scorer = qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu", compile=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        scorer.score_crops([torch.zeros(2, 3, 32, 32)])
        with pytest.raises(CompileError, match=r"compiled this model for 1 input shapes, its limit.*new shape.*"
                                               r"recompile_limit.*without --compile"):
            scorer.score_crops([torch.zeros(2, 3, 48, 48)])


def test_a_missing_cpp_compiler_is_one_line_naming_the_option(monkeypatch):
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "no-such-c++")
    with pytest.raises(CompileError, match=r"needs a C\+\+ compiler \(no-such-c\+\+ is not on PATH\).*run without "
                                           r"--compile"):
        check_compiler(torch.device("cpu"), "--compile")


@same_scorer_graph
@pytest.mark.slow
def test_score_compile_gives_the_eager_scores(trained, tmp_path, capsys):
    root, run = trained
    ckpt = str(run / "checkpoints" / "best.ckpt")
    images = str(root / "kadid" / "images")
    outputs = {}
    for flags in ([], ["--compile"]):
        out = tmp_path / f"scores{len(flags)}.jsonl"
        # 36 images in batches of 12 (the batch dimension is dynamic: any batch size would reuse the graph)
        main(["score", "--ckpt_path", ckpt, images, "-o", str(out), "--device", "cpu", "--batch-size", "12", *flags])
        outputs[bool(flags)] = {row["path"]: row["score"] for row in map(json.loads, out.read_text().splitlines())}
    assert outputs[True].keys() == outputs[False].keys()
    assert all(abs(outputs[True][p] - outputs[False][p]) < 1e-5 for p in outputs[False])


def test_score_compile_without_a_compiler_stops_before_scoring(trained, tmp_path, monkeypatch, capsys):
    from torch._inductor import cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "no-such-c++")
    root, run = trained
    out = tmp_path / "scores.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"), str(root / "kadid" / "images"), "-o",
              str(out), "--device", "cpu", "--compile"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "C++ compiler" in err[0] and "--compile" in err[0]
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.slow
def test_fit_with_model_compile_trains_compiled_and_records_the_option(workdir, capsys):
    root, config = workdir
    torch._dynamo.reset()
    counters.clear()
    main(["fit", "--config", str(config), "--trainer.fast_dev_run", "true", "--model.compile", "true"])
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # the step ran compiled
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.compile", "true", "--print_config"])
    assert "  compile: true" in capsys.readouterr().out  # what a run's config.yaml records


def test_auto_keeps_the_custom_ops_when_compiling_and_the_torch_scan_when_exporting(monkeypatch):
    dispatch = importlib.import_module("qmamba.ops.selective_scan")  # the module (the package exports the function)
    monkeypatch.setattr(dispatch, "cuda_selective_scan_available", lambda: True)
    monkeypatch.setattr(dispatch, "triton_selective_scan_available", lambda: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert dispatch.resolve_backend("auto", cuda) == "cuda"  # eager: mamba-ssm first
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.resolve_backend("auto", cuda) == "triton"  # mamba-ssm's op is no custom op
    assert dispatch.resolve_backend("auto", cpu) == "cpu"
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert dispatch.resolve_backend("auto", cpu) == dispatch.resolve_backend("auto", cuda) == "torch"  # ONNX
