"""``qmamba data check``: a config's datasets read, checked and split exactly as ``qmamba fit`` would, without training.

    qmamba data check --config configs/recipe.yaml --config my_ratings.yaml

Every problem of every dataset (labels, scales, images, splits) is reported at once with its row and its fix, and the
command exits 1; a clean check prints each dataset's size, scale and split, and exits 0. Nothing is written: no run
folder, no model, no weights download.
"""

from __future__ import annotations

import warnings
from importlib import import_module

from qmamba.data import IQADataModule
from qmamba.errors import UsageError
from qmamba.redaction import log_to_stderr
from qmamba.training.cli import QMambaCLI, _run_cli

__all__ = ["main"]

USAGE = "usage: qmamba data check --config CONFIG [--config MORE] [--data.init_args.KEY VALUE ...]"


class _DataCheckCLI(QMambaCLI):
    """The fit's parser and configs; only the DataModule is built (no GPU, checkpoint or weights checks)."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        data = self.config.get("data")
        if data is None:
            raise UsageError("the config has no data section to check; pass the config you train with")
        module, _, name = data.class_path.rpartition(".")
        datamodule_class = getattr(import_module(module), name)
        if not issubclass(datamodule_class, IQADataModule):
            raise UsageError(f"qmamba data check reads qmamba.data.IQADataModule configs, not {data.class_path}")
        self.datamodule = datamodule_class(**data.init_args.as_dict())


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__}")
        raise SystemExit(0 if argv else 2)
    if argv[0] != "check":
        raise UsageError(f"unknown data command {argv[0]!r}; {USAGE}")
    log_to_stderr()
    with warnings.catch_warnings():  # the arguments after "data check" are the parser's, not sys.argv's
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        datamodule = _run_cli(argv[1:], _DataCheckCLI, run=False).datamodule
    datamodule.prepare()
    for line in datamodule.summary():
        print(line)
