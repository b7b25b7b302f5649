"""Regenerate requirements/constraints.txt, the exact versions `make install` installs qmamba's tools at, or (with
--lowest) requirements/lowest.txt, the oldest versions pyproject.toml's ranges allow.

Without a lock, pip 23's resolver backtracked for 7-9 minutes through ray, s3fs and selenium releases on a new
machine and then gave up (ResolutionImpossible); with exact versions it has nothing to search. The lock is made the
way a new machine installs: a fresh virtual environment, the newest pip (it resolves the ranges in seconds), torch
first (the build that fits the machine, which the lock leaves out), then every extra but `cuda` without constraints,
then `pip freeze`. torch's own dependencies stay out too (its CUDA libraries, triton, sympy: another torch pins
other versions), except those qmamba requires itself (numpy, pillow, fsspec).

pip cannot resolve to the lowest versions, so --lowest asks uv (`--resolution lowest-direct`: each of qmamba's
requirements at its lower bound, what they need at versions that fit). `make install CONSTRAINTS=requirements/
lowest.txt` then `make test` checks that the lower bounds are honest.

Run `make lock` when pyproject.toml's dependencies change or to move to newer releases, then `make test`: the lock
is only committed once the suite passes on it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "test,demo,export,docs,benchmark,cloud,ray,serve,parquet"  # every extra but cuda (nvcc builds, never locked)
QMAMBA_REQUIRES = ("import importlib.metadata as m, re; "
                   "print('\\n'.join(sorted({re.split(r'[^A-Za-z0-9._-]', r, maxsplit=1)[0] "
                   "for r in m.requires('qmamba')})))")


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares it (Jinja2 == jinja2, typing_extensions == typing-extensions)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_of(text: str) -> dict[str, str]:
    """'Name==version' lines (freeze or compile output, comments ignored) as {normalised name: line}."""
    pins = [line.strip() for line in text.splitlines() if "==" in line and not line.lstrip().startswith("#")]
    return {normalise(line.split("==")[0]): line for line in pins}


def run(*command: str | Path) -> str:
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True).stdout


def pip(python: Path, *args: str) -> None:
    print("+ pip install", " ".join(shlex.quote(a) for a in args), flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def lowest_pins(env: Path, torch_spec: str) -> dict[str, str]:
    """uv's lowest-direct resolution of the extras, over the torch given (the lowest torch may not exist here)."""
    pip(env / "bin" / "python", "uv")
    torch_pins = env / "torch.txt"
    torch_pins.write_text("\n".join(torch_spec.split()) + "\n")
    extras = [arg for extra in EXTRAS.split(",") for arg in ("--extra", extra)]
    return pins_of(run(env / "bin" / "uv", "pip", "compile", ROOT / "pyproject.toml", *extras, "--resolution",
                       "lowest-direct", "-c", torch_pins, "--python", env / "bin" / "python", "--quiet"))


def header(python: Path, torch_spec: str, lowest: bool) -> str:
    py, machine, pip_version, torch_version = run(python, "-c", "import platform, pip, torch; print(platform."
                                                  "python_version(), platform.machine(), pip.__version__, "
                                                  "torch.__version__)").split()
    what = ("the lowest versions pyproject.toml's ranges allow (uv, --resolution lowest-direct)" if lowest else
            "qmamba's tools at the versions the test suite passed with: `make install` installs with -c this file")
    return (f"# {what}.\n"
            f"# Made by `make {'lock-lowest' if lowest else 'lock'}` (requirements/lock.py) with Python {py} on "
            f"{machine}, pip {pip_version},\n"
            f"# over torch {torch_version} ({torch_spec}), which is not locked.\n"
            f"# Extras: {EXTRAS}.\n"
            "# Regenerate it when pyproject.toml's dependencies change, then run `make test` before committing it.\n")


def make_lock(torch_spec: str, lowest: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="qmamba-lock-") as scratch:
        env = Path(scratch) / "venv"
        venv.create(env, with_pip=True)
        python = env / "bin" / "python"
        pip(python, "--upgrade", "pip")
        pip(python, *torch_spec.split())
        torch_own = pins_of(run(python, "-m", "pip", "freeze"))
        if lowest:
            pip(python, "--no-deps", "-e", str(ROOT))  # qmamba's metadata, for its requirement names
            pins = lowest_pins(env, torch_spec)
        else:
            pip(python, "-e", f"{ROOT}[{EXTRAS}]")
            pins = pins_of(run(python, "-m", "pip", "freeze", "--exclude-editable"))
        named = {normalise(name) for name in run(python, "-c", QMAMBA_REQUIRES).split()}
        left_out = (set(torch_own) - named) | {"torch", "torchvision", "qmamba"}
        kept = sorted((pin for name, pin in pins.items() if name not in left_out), key=str.lower)
        return header(python, torch_spec, lowest) + "\n".join(kept) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default=os.environ.get("TORCH_SPEC", "torch torchvision"),
                        help="the torch requirements installed first, e.g. 'torch==2.14.1 torchvision==0.29.1'")
    parser.add_argument("--lowest", action="store_true", help="the lowest versions the ranges allow")
    parser.add_argument("--output", type=Path, help="default: requirements/constraints.txt (lowest.txt with --lowest)")
    args = parser.parse_args()
    output = args.output or ROOT / "requirements" / ("lowest.txt" if args.lowest else "constraints.txt")
    text = make_lock(args.torch, args.lowest)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(text)
    os.replace(partial, output)  # a failed run leaves the previous file as it was
    print(f"wrote {output}: {len(pins_of(text))} pins", file=sys.stderr)


if __name__ == "__main__":
    main()
