"""``qmamba weights``: list, download ahead of a job, and verify the cached ImageNet weights.

    qmamba weights list                       # every preset: its official file, cache state and size
    qmamba weights fetch qmamba_tiny lqmamba_tiny   # download now (e.g. on a login node before a cluster job)
    qmamba weights fetch --accept-changed FILE      # accept an upstream file whose hash differs from the record
    qmamba weights verify                     # re-hash every cached file against its record
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from qmamba.errors import UsageError
from qmamba.files.weights import (
    OFFICIAL_FILES,
    OfficialWeights,
    WeightsError,
    cache_state,
    fetch,
    verify,
    weights_dir,
)
from qmamba.redaction import log_to_stderr

__all__ = ["main"]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="qmamba weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="{list,fetch,verify}")
    actions.add_parser("list", help="every preset with its official file, cache state and size")
    fetch_parser = actions.add_parser("fetch", help="download the weights of presets (or official file names)")
    fetch_parser.add_argument("names", nargs="+", metavar="NAME", help="a preset (qmamba_tiny) or a file name")
    fetch_parser.add_argument("--accept-changed", action="store_true",
                              help="record a download whose SHA-256 differs from the one recorded before (the file "
                                   "changed upstream); without it that is an error")
    verify_parser = actions.add_parser("verify", help="re-hash cached files against their recorded SHA-256")
    verify_parser.add_argument("names", nargs="*", metavar="NAME", help="presets or file names (default: all cached)")
    args = parser.parse_args(argv)
    log_to_stderr(fmt="%(message)s")
    if args.action == "list":
        list_weights()
    elif args.action == "fetch":
        for weights in _select(args.names):
            cached = fetch(weights, accept_changed=args.accept_changed)
            print(f"{weights.file}: {cached.size / 2**20:.1f} MiB, sha256 {cached.sha256} ({cached.path})")
    else:
        verify_weights(_select(args.names) if args.names else _unique(OFFICIAL_FILES.values()))


def list_weights() -> None:
    """One line per preset: the file it starts from, its release, and what the cache holds."""
    print(f"cache: {weights_dir()}")
    print(f"{'preset':<20} {'official file':<38} {'release':<8} {'cache':<11} {'size':>10}")
    for preset, weights in sorted(OFFICIAL_FILES.items()):
        state, size = cache_state(weights)
        shown = "" if size is None else f"{size / 2**20:.1f} MiB"
        print(f"{preset:<20} {weights.file:<38} {weights.tag:<8} {state:<11} {shown:>10}")
    print(f"source: {next(iter(OFFICIAL_FILES.values())).url.rsplit('/', 2)[0]}/<release>/<file>")


def verify_weights(selected: list[OfficialWeights]) -> None:
    """Re-hash each cached file; every mismatch is reported, then the command fails if there was one."""
    bad = []
    for weights in selected:
        try:
            cached = verify(weights)
        except WeightsError as err:
            print(f"{weights.file}: FAILED: {err}")
            bad.append(weights.file)
            continue
        print(f"{weights.file}: " + ("not cached" if cached is None else f"ok (sha256 {cached.sha256})"))
    if bad:
        raise WeightsError(f"{len(bad)} cached file(s) failed verification: {', '.join(bad)}")


def _select(names: list[str]) -> list[OfficialWeights]:
    by_file = {w.file: w for w in OFFICIAL_FILES.values()}
    unknown = [n for n in names if n not in OFFICIAL_FILES and n not in by_file]
    if unknown:
        raise UsageError(f"unknown weights {', '.join(unknown)}; `qmamba weights list` shows the presets and files")
    return _unique(OFFICIAL_FILES.get(n) or by_file[n] for n in names)


def _unique(weights: Iterable[OfficialWeights]) -> list[OfficialWeights]:
    """Each official file once, in order (several presets share a file)."""
    return list(dict.fromkeys(weights))
