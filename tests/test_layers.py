"""The package's folders are its layers, and imports point down them (docs/architecture.md): read from the source
tree, so that a module importing a layer above its own fails here before it tangles the project."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qmamba"
# bottom first; a module may import its own layer and those below
LAYERS = ["errors", "redaction", "heap", "machine", "files", "ops", "models", "inference", "data", "training",
          "protocols", "commands", "cli"]
TOP = {"cli", "__main__", "__init__", "ray"}  # the command table, ``python -m qmamba``, ``qmamba.load``, ``qmamba.ray``


def layer_of(module: str) -> int:
    """Layer index of a dotted module name under ``qmamba``."""
    first = module.split(".")[1]
    return LAYERS.index("cli") if first in TOP else LAYERS.index(first)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every qmamba module ``path`` imports, at module level or inside functions."""
    module = "qmamba." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("qmamba.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("qmamba."):
                found.append((node.lineno, name))
    return found


def layer_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "qmamba." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module) if module != "qmamba" else LAYERS.index("cli")
        for line, imported in imports_of(path):
            if layer_of(imported) > own:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} ({LAYERS[own]}) imports {imported} "
                                f"({LAYERS[layer_of(imported)]})")
    return problems


def test_every_module_belongs_to_a_layer():
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        assert relative.parts[0].removesuffix(".py") in {*LAYERS, *TOP}, f"{relative} is in no layer of {LAYERS}"


def test_imports_point_down_the_layers():
    assert layer_violations() == []


def test_the_package_root_imports_nothing_when_imported():
    """``qmamba.load`` imports the inference core when called, so that any module may read ``qmamba.__version__``."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
             and any(alias.name.startswith("qmamba") for alias in node.names)
             or isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qmamba")]
    assert eager == []


def test_the_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """A models module importing the training layer is reported, with its file and line."""
    package = tmp_path / "qmamba"
    (package / "models").mkdir(parents=True)
    (package / "models" / "bad.py").write_text("import torch\nfrom qmamba.training.module import QMambaIQA\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    assert layer_violations() == ["models/bad.py:2 (models) imports qmamba.training.module (training)"]


OLD_CHECKPOINT = Path(__file__).parent / "data" / "checkpoints" / "before_the_layout_move.ckpt"


def test_a_checkpoint_written_before_the_package_moved_still_loads_and_scores_the_same(tmp_path, monkeypatch):
    """Written by ``qmamba fit`` when the inference core lived in the package root (qmamba_test with dim 8, one
    epoch on the tiny KADID fixture; optimizer states removed for size); its score of a fixed image was 3.604013."""
    import numpy as np

    import qmamba

    image = (np.indices((48, 64)).sum(0) % 256).astype(np.uint8)
    rgb = np.stack([image, image[::-1], 255 - image], -1)
    assert qmamba.load(OLD_CHECKPOINT, device="cpu").score(rgb) == pytest.approx(3.604013204574585, rel=1e-6)

    from iqa_fixtures import make_kadid

    from qmamba.cli import main

    make_kadid(tmp_path / "kadid")
    config = tmp_path / "tiny.yaml"
    config.write_text((Path(__file__).parent / "conf" / "tiny.yaml").read_text().replace(
        "KADID_ROOT", str(tmp_path / "kadid")))
    monkeypatch.chdir(tmp_path)
    main(["test", "--config", str(config), "--ckpt_path", str(OLD_CHECKPOINT),
          "--model.init_args.backbone_args", "{dim: 8}"])  # through Lightning's loading too
    assert (tmp_path / "runs" / "tiny" / "test_results.json").is_file()
