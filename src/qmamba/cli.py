"""The ``qmamba`` command: one table of subcommands, each module imported only when its command runs.

Errors the user can fix (:class:`qmamba.errors.QMambaError`) print one line and exit 1 (2 for usage errors);
``QMAMBA_DEBUG=1`` shows the traceback instead. Commands that only read a checkpoint (``score``, ``export``) and
``--help`` / ``--version`` never import Lightning. LightningCLI's subcommands (``fit``, ``validate``, ``test``,
``predict``) get the whole argument list, since LightningCLI parses the subcommand itself; every other module's
``main`` gets the arguments after its name.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from importlib import import_module
from typing import NamedTuple

import qmamba
from qmamba.heap import keep_freed_memory

__all__ = ["COMMANDS", "main"]


class Command(NamedTuple):
    module: str
    summary: str


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS: dict[str, Command] = {
    "fit": Command("qmamba.training.cli", "train a model: qmamba fit --config configs/demo.yaml"),
    "validate": Command("qmamba.training.cli", "evaluate a checkpoint on the validation splits"),
    "test": Command("qmamba.training.cli", "test a checkpoint: qmamba test --config RUN/config.yaml --ckpt_path best"),
    "predict": Command("qmamba.training.cli", "score a config's test images with a checkpoint (Lightning loop)"),
    "score": Command("qmamba.commands.score", "score image files and folders with a checkpoint (no Lightning)"),
    "export": Command("qmamba.commands.export", "export a checkpoint to ONNX"),
    "publish": Command("qmamba.commands.publish", "a checkpoint or run folder as a model folder (safetensors, config, "
                                                  "model card) to share"),
    "serve": Command("qmamba.commands.serve", "a scoring service and web page for a checkpoint (no Lightning)"),
    "models": Command("qmamba.commands.models", "the backbones with their parameters and GFLOPs (as the paper "
                                                "counts them), timm's included"),
    "weights": Command("qmamba.commands.weights", "list, download and verify the ImageNet-pretrained backbones"),
    "benchmark": Command("qmamba.protocols.benchmark", "the N-split protocol on one config: median and mean SRCC/PLCC"),
    "compare": Command("qmamba.protocols.compare", "several backbones through one config's protocol: accuracy against "
                                                   "params, GFLOPs, speed and memory, as a table and a plot"),
    "transfer": Command("qmamba.protocols.transfer", "adapt a trained model to another dataset with several methods"),
    "data": Command("qmamba.training.data_check", "check a config's datasets without training: qmamba data check "
                                                  "--config CONFIG"),
    "demo-data": Command("qmamba.data.demo", "build the two embedded demo datasets"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return ("usage: qmamba COMMAND [ARGS...]   (qmamba COMMAND --help for its options)\n\n"
            "No-reference image quality assessment with QMamba.\n\ncommands:\n" + "\n".join(lines))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``qmamba`` console script (``args`` lets tests call it in-process).

    As the process's own command it freezes the garbage collector's objects at exit: the interpreter's last
    collections walk every object that torch, Lightning and numba made, about 1 s of each command's exit (0.2 s
    frozen; 2 AMX Xeon cores). An object that only a reference cycle holds is then left to the operating system rather
    than finalised; qmamba closes and renames its outputs before a command returns, and atexit handlers, logging's
    flush and ``weakref.finalize`` callbacks run as before. Its C heap also keeps the memory torch frees
    (:mod:`qmamba.heap`), so that each batch reuses the previous one's pages."""
    argv = sys.argv[1:] if args is None else list(args)
    if args is None:  # this process's own command: the interpreter's exit follows
        atexit.register(gc.freeze)  # runs after the handlers the command registers (the last is first)
        keep_freed_memory()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"qmamba {qmamba.__version__}")
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"{usage()}\n\nqmamba: error: unknown command {name!r}", file=sys.stderr)
        raise SystemExit(2)
    from qmamba.errors import QMambaError, UsageError
    from qmamba.redaction import without_password

    try:
        if name in LIGHTNING_COMMANDS:  # None: LightningCLI reads sys.argv itself (and warns when given both)
            import_module(COMMANDS[name].module).main(None if args is None else argv)
        else:
            import_module(COMMANDS[name].module).main(argv[1:])
    except QMambaError as err:  # user-fixable: a message, not a traceback (QMAMBA_DEBUG=1 shows it)
        if os.environ.get("QMAMBA_DEBUG"):
            raise
        print(f"qmamba: error: {without_password(str(err))}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, UsageError) else 1) from None
