"""The documentation site: it builds in strict mode, every example on Get started runs, and the site renders.

Get started's examples run as a reader runs them, on a small model, in a checkout's layout in miniature (the
configs, small demo sets). Four kinds of line are not run as written, and the rules are here, not in the page:
- `pip install ARGS` runs as `pip install --dry-run --no-deps --no-index --no-build-isolation ARGS` from the
  repository: the requirements, files and extras must exist, but the test environment is not changed;
- `make demo` must run (per `make -n`) the commands of the page's "demo, step by step" block, which run for real;
  `make test` must run pytest (this suite: running it would recurse);
- `qmamba fit` gets a one-epoch budget appended (`FIT_BUDGET`); the documented options are used as written;
- a `qmamba` command runs as `python -m qmamba`, the same entry point as the console script, in a process forked from
  a warm interpreter (tests/forked.py), as is a python block: a real process each, without its imports' seconds.
Shell operators (pipes, redirections, `&&`) are refused rather than half-run: keep the page's lines plain commands.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from browser import headless_chrome, needs_chromium
from forked import Zygote
from iqa_fixtures import small_demo_checkout

REPO = Path(__file__).resolve().parents[1]
GET_STARTED = REPO / "docs" / "get-started.md"
FIT_BUDGET = ["--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1"]
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}

pytest.importorskip("mkdocs", reason="the docs tools: pip install -e '.[docs]' (make install installs them)")


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of a config, from its folder (where the snippets' paths start)."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, env=ENV, timeout=300)


def nav_titles() -> list[str]:
    import yaml

    return [next(iter(entry)) for entry in yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]]


# ----------------------------------------------------------------------------------------------- the strict build


def test_the_site_builds_in_strict_mode_with_the_api_reference(tmp_path):
    result = build_site(REPO / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    for page in ("get-started", "training", "datasets", "scoring", "serve", "models", "results", "reliability",
                 "api", "architecture", "contributing"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("load", "inference.scoring.Scorer.from_checkpoint", "inference.scoring.Scorer.score",
                 "ray.score_dataset", "models.build_model", "data.datamodule.IQADataModule",
                 "data.datamodule.DatasetConfig", "training.module.QMambaIQA", "training.prompt_tuning.PromptTuning"):
        assert f'id="qmamba.{name}"' in api, name  # rendered from the docstrings, not only named
    assert ":meth:" not in api and ":mod:" not in api  # the docstrings' Sphinx roles render (docs/griffe_roles.py)
    datasets = (tmp_path / "site" / "datasets" / "index.html").read_text()
    assert "Your own ratings: a table of images and scores" in datasets  # data/README.md, included


@pytest.fixture
def docs_copy(tmp_path):
    """The site's sources in a scratch folder: the config and pages copied, the code and data/README.md linked."""
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    (tmp_path / "src").symlink_to(REPO / "src")
    (tmp_path / "data").symlink_to(REPO / "data")
    return tmp_path


@pytest.mark.parametrize("broken,named", [
    ("See [the tuning page](tuning.md).", "tuning.md"),
    ("See [scoring's maps](scoring.md#quality-maps-in-colour).", "quality-maps-in-colour"),
    ("::: qmamba.inference.scoring.Scorer.score_everything", "qmamba.inference.scoring.Scorer.score_everything"),
], ids=["missing page", "missing anchor", "missing API reference"])
def test_strict_mode_fails_on_a_broken_link_anchor_or_reference(docs_copy, broken, named):
    page = docs_copy / "docs" / "get-started.md"
    page.write_text(page.read_text() + f"\n{broken}\n")
    result = build_site(docs_copy / "mkdocs.yml", docs_copy / "site")
    assert result.returncode != 0 and named in result.stderr


# ------------------------------------------------------------------------------------- Get started's examples


class ExampleFailed(AssertionError):
    pass


def code_blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)[^\n]*\n(.*?)^```", markdown, re.S | re.M)]


def shell_commands(code: str) -> list[list[str]]:
    """A shell block's commands as argument lists: continuation lines joined, comments dropped."""
    commands = [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c]
    for command in commands:
        if SHELL_OPERATORS & set(command):
            raise ExampleFailed(f"{shlex.join(command)}: shell operators are not run by the examples test; "
                                "keep the page's lines plain commands")
    return commands


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that exited 0; ExampleFailed with its end otherwise."""
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise ExampleFailed(f"{shlex.join(map(str, result.args))} exited {result.returncode}:\n{output[-3000:]}")
    return output


def run(argv: list[str], cwd: Path) -> str:
    return succeeded(subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=1200))


def as_documented(command: list[str]) -> str:
    """`python -m qmamba x` (how the Makefile spells it, after any VAR=value) as a reader types it: `qmamba x`."""
    words = [w for w in command if not re.fullmatch(r"[A-Z_]+=\S*", w)]
    if len(words) > 2 and words[1:3] == ["-m", "qmamba"]:
        words = ["qmamba", *words[3:]]
    return shlex.join(words)


def make_commands(target: str) -> list[list[str]]:
    """The qmamba and pytest commands `make TARGET` runs (its install recipe aside: the pip lines cover it)."""
    dry = run(["make", "-n", target, f"PYTHON={sys.executable}"], REPO).replace("\\\n", " ")
    return [shlex.split(line) for line in dry.splitlines() if re.search(r" -m (qmamba|pytest)\b", line)]


def run_command(command: list[str], sandbox: Path, demo_steps: list[str], python: Zygote) -> None:
    program, args = command[0], command[1:]
    if program == "pip":
        if args[:1] != ["install"]:
            raise ExampleFailed(f"{shlex.join(command)}: only pip install is understood")
        output = run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                      "--no-build-isolation", *args[1:]], REPO)
        if "does not provide the extra" in output:
            raise ExampleFailed(f"{shlex.join(command)}: {output}")
    elif program == "make":
        target = args[0]
        made = [as_documented(c) for c in make_commands(target)]
        if target == "demo":
            qmamba_steps = [c for c in made if c.startswith("qmamba ")]
            if qmamba_steps != demo_steps:
                raise ExampleFailed(f"make demo runs {qmamba_steps}, the page says {demo_steps}")
        elif target == "test":
            if not any(c.split()[1:3] == ["-m", "pytest"] for c in made):
                raise ExampleFailed(f"make test runs {made}, not pytest")
        else:
            raise ExampleFailed(f"make {target}: the examples test knows make demo and make test")
    elif program == "qmamba":
        args = [*args, *(FIT_BUDGET if args[:1] == ["fit"] else [])]
        succeeded(python.run(args, cwd=sandbox, env=ENV, timeout=1200))
    else:
        run(command, sandbox)


def run_examples(markdown: str, sandbox: Path, python: Zygote) -> int:
    """Run every bash and python block of a page in order, qmamba and python in processes forked from ``python``; the
    number of examples run."""
    blocks = code_blocks(markdown)
    step_by_step = [shell_commands(code) for lang, code in blocks if lang == "bash" and "qmamba demo-data" in code]
    demo_steps = [shlex.join(c) for c in step_by_step[0]] if step_by_step else []
    count = 0
    for lang, code in blocks:
        if lang == "bash":
            for command in shell_commands(code):
                run_command(command, sandbox, demo_steps, python)
                count += 1
        elif lang == "python":
            script = sandbox / "example.py"
            script.write_text(code)
            succeeded(python.run([], cwd=sandbox, env=ENV, timeout=1200, script=script))
            count += 1
        else:
            raise ExampleFailed(f"a ```{lang} block: the examples test runs bash and python blocks")
    return count


def section(markdown: str, heading: str) -> str:
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end > 0 else None]


@pytest.mark.slow
def test_every_example_on_get_started_runs(tmp_path, forked_qmamba):
    sandbox = small_demo_checkout(tmp_path)
    count = run_examples(GET_STARTED.read_text(), sandbox, forked_qmamba("fit"))
    assert count >= 10
    assert (sandbox / "runs" / "demo" / "checkpoints" / "best.ckpt").is_file()
    rows = (sandbox / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score,flag" and len(rows) > 10
    assert any((sandbox / "maps").rglob("*.png"))


@pytest.fixture
def scoring_sandbox(trained, tmp_path):
    """A run folder and a photo folder where Get started's scoring examples expect them."""
    checkpoints = tmp_path / "runs" / "demo" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(trained[1] / "checkpoints" / "best.ckpt", checkpoints / "best.ckpt")
    photos = tmp_path / "data" / "demo" / "koniq10k" / "1024x768"
    photos.mkdir(parents=True)
    for image in sorted(trained[0].rglob("*.png"))[:4]:
        from PIL import Image

        Image.open(image).convert("RGB").save(photos / f"{image.stem}.jpg", quality=95)
    return tmp_path


@pytest.mark.slow
def test_a_renamed_option_on_get_started_fails_the_examples(scoring_sandbox, forked_qmamba):
    scoring = section(GET_STARTED.read_text(), "Score a folder")
    assert "--ckpt_path" in scoring
    with pytest.raises(ExampleFailed, match="--checkpoint_path"):
        run_examples(scoring.replace("--ckpt_path", "--checkpoint_path", 1), scoring_sandbox, forked_qmamba("fit"))
    assert run_examples(scoring, scoring_sandbox, forked_qmamba("fit")) == 4  # as written, the same examples pass


def test_shell_operators_are_refused_not_half_run():
    with pytest.raises(ExampleFailed, match="shell operators"):
        shell_commands("qmamba score --ckpt_path a.ckpt photos/ -o - | head -3\n")


# ------------------------------------------------------------------------------------------------ the browser


@pytest.mark.slow
@needs_chromium
def test_the_built_site_renders_its_navigation_in_a_browser(tmp_path):
    from PIL import Image, ImageStat
    from selenium.webdriver.common.by import By

    site = tmp_path / "site"
    assert build_site(REPO / "mkdocs.yml", site).returncode == 0
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    chrome = headless_chrome(1400, 1000)  # wide enough for the navigation's sidebar (a drawer below 1220 px)
    try:
        chrome.get(f"http://127.0.0.1:{server.server_address[1]}/get-started/")
        assert chrome.title.startswith("Get started")
        links = chrome.find_elements(By.CSS_SELECTOR, "nav.md-nav--primary a.md-nav__link")
        shown = {link.text.strip() for link in links if link.is_displayed()}
        assert set(nav_titles()) <= shown, shown
        assert chrome.find_element(By.CSS_SELECTOR, "article h1").text == "Get started"
        shot = tmp_path / "site.png"
        chrome.save_screenshot(str(shot))
    finally:
        chrome.quit()
        server.shutdown()
    image = Image.open(shot).convert("L")
    assert image.size[0] >= 1000
    assert max(ImageStat.Stat(image).stddev) > 20  # a page, not a blank window
