"""Config files as hostile input: a YAML file that names itself a config is parsed by jsonargparse, which expands
every alias into a copy. A "billion laughs" file of nine anchors of nine aliases each is 2 KB that becomes 10^9 nodes
(past 4 GB with no word); so before the parser sees a file, its size, its nesting and the number of nodes its aliases
expand to are bounded, each a line naming the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from qmamba.errors import UsageError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "check_config_args", "check_config_file"]

MAX_CONFIG_BYTES = 1 << 20  # qmamba's largest config is 3 KB
MAX_CONFIG_NODES = 100_000  # after expanding aliases; a config of 20 datasets is a few hundred
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def check_config_args(args: Sequence[str]) -> None:
    """Check every config file that command-line ``args`` name (``--config FILE``, ``--config=FILE``, or any
    option whose value is an existing YAML or JSON file, which jsonargparse reads as that option's config)."""
    for arg in args:
        value = str(arg).split("=", 1)[1] if str(arg).startswith("--") and "=" in str(arg) else str(arg)
        if value.lower().endswith(CONFIG_SUFFIXES) and Path(value).is_file():
            check_config_file(Path(value))


def check_config_file(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UsageError(f"{path} holds {size} bytes, more than the {MAX_CONFIG_BYTES >> 20} MB a config can: is it "
                         "a config?")
    try:
        root = yaml.compose(path.read_bytes(), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the config parser says what is wrong, and where
    except RecursionError:
        raise UsageError(f"{path} nests its values too deep for a config") from None
    nodes = _expanded_nodes(root, {})
    if nodes > MAX_CONFIG_NODES:
        raise UsageError(f"{path}: its aliases (*name) expand to {nodes:.3g} values, more than the "
                         f"{MAX_CONFIG_NODES:,} of any config (a YAML bomb?); write the values out instead")


def _expanded_nodes(node: yaml.Node | None, memo: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias is a copy: each node counted once per reference, in time
    linear in the file (an alias is the same node object, so its count is looked up)."""
    if node is None:
        return 0
    if id(node) not in memo:
        memo[id(node)] = 1  # a node that contains itself (a recursive anchor) counts once where it recurs
        children = node.value if isinstance(node, yaml.SequenceNode) else [
            item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else []
        memo[id(node)] = 1 + sum(_expanded_nodes(child, memo) for child in children)
    return memo[id(node)]
