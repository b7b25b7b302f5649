"""``torch.compile`` for qmamba's models: the ``compile`` option of fit/validate/test/predict, ``qmamba score``,
``qmamba serve`` and ``qmamba.load``.

The fused scans are ``torch.library`` custom ops (:mod:`qmamba.ops.fused_scan`), so a whole QMamba, LQMamba or Vim
compiles as one graph (``fullgraph=True``): the kernel stays fused and inductor compiles the norms, projections and
layout changes around it. Compiling is in place (``nn.Module.compile``), so parameter names, state dicts and
checkpoints are those of the eager model. Nothing falls back silently: a missing compiler is reported before any
work starts, and a compilation that fails is one line naming the cause and the option that turns it off.

A model whose weights no longer change (a scorer) runs *frozen* on the CPU: inductor folds its weights into the graph
as constants and packs the matrix products' for oneDNN, which made QMamba-T's scoring 11 % (fp32) and 4 % (bf16)
faster than eager, where compiling without freezing was 3 % faster and 8 % slower (docs/models.md, bf16 on the
CPU). A training run's model is never frozen: its validation would keep scoring with the weights of its first
compilation. The price: torch does not cache frozen graphs, so each process compiles a frozen scorer anew (QMamba-T:
41-56 s on 2 Ice Lake cores, where an unfrozen graph came from the cache in 10 s), and freezing pays back only over
thousands of images: about 3,600 in fp32 and 18,000 in bf16 on the AMX Xeon (docs/models.md, torch.compile).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import torch

from qmamba.errors import QMambaError

__all__ = ["CompileError", "check_compiler", "compile_model", "run_compiled"]


class CompileError(QMambaError):
    """torch.compile cannot run here, or failed on the model."""


def check_compiler(device: torch.device, option: str) -> None:
    """Raise :class:`CompileError` when inductor has no compiler for ``device``: a C++ compiler for CPU code, Triton
    for CUDA code. ``option`` names how the user turns compiling off."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileError(f"torch.compile on {device} needs Triton, which does not import here (it ships with "
                               f"CUDA builds of torch); install it or run without {option}")
        return
    from torch._inductor import cpp_builder

    try:
        compiler = cpp_builder.get_cpp_compiler()
        reason = None if shutil.which(compiler) else f"{compiler} is not on PATH"
    except Exception as err:  # inductor says why it found none
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if reason:
        raise CompileError(f"torch.compile on the CPU needs a C++ compiler ({reason}): install one (apt install g++, "
                           f"or set CXX) or run without {option}")


def compile_model(model: torch.nn.Module, device: torch.device, option: str, frozen: bool = False) -> torch.nn.Module:
    """Compile ``model`` in place as one graph, after checking that a compiler exists for ``device``; ``frozen``
    (for models whose weights will not change) folds the weights into the graph where that pays, on the CPU.

    The scan orders are built inside the graph from the map size, so any input size compiles. Callers whose batch
    size varies (a scorer's requests, a run's last batch) call it through :func:`run_compiled`, which marks the
    batch dimension dynamic: one graph then serves every batch size. Each other new input shape compiles once more;
    past torch's recompile limit (8 shapes) the call fails with the one-line error instead of silently running the
    model eagerly."""
    check_compiler(device, option)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    model.compile(fullgraph=True)
    model._qmamba_frozen = frozen and device.type == "cpu"  # read by run_compiled, which compiles at each new shape
    return model


def run_compiled(model: torch.nn.Module, images: torch.Tensor, option: str) -> torch.Tensor:
    """``model(images)`` for a model :func:`compile_model` compiled: the batch dimension is marked dynamic, so a new
    batch size reuses the graph (a batch of one still compiles its own: torch specializes sizes 0 and 1), and a
    failing compilation is one line naming ``option``."""
    torch._dynamo.maybe_mark_dynamic(images, 0)
    # inductor reads `freezing` when it compiles, and compiles at the call: set for a frozen model's calls only, so
    # other models compiled in this process stay unfrozen (and cacheable: inductor never caches a frozen graph);
    # passed as torch.compile(options=...) it gained nothing measurable (docs/models.md)
    from torch._inductor import config as inductor_config

    frozen = getattr(model, "_qmamba_frozen", False)
    with _compile_errors(option), inductor_config.patch(freezing=True) if frozen else contextlib.nullcontext():
        return model(images)


@contextlib.contextmanager
def _compile_errors(option: str) -> Iterator[None]:
    """Turn a failing compilation (which happens at the first call of a compiled model) into one line."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    try:
        yield
    except FailOnRecompileLimitHit as err:
        limit = torch._dynamo.config.recompile_limit
        raise CompileError(f"torch.compile has compiled this model for {limit} input shapes, its limit, and a new "
                           "shape needs another compilation: give the model inputs of fewer shapes (one crop size; "
                           "the batch size varies freely), raise torch._dynamo.config.recompile_limit, or run "
                           f"without {option}") from err
    except TorchDynamoException as err:
        cause = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise CompileError(f"torch.compile failed on this model ({type(err).__name__}: {cause[:300]}); run without "
                           f"{option}") from err
