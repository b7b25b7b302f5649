"""Where the suite's time goes, and the order that spends it best on parallel workers.

Each test is given one *kind* from what it did while it ran (setup, call and teardown): it ran Triton's interpreter,
drove Chromium, used a Ray cluster, compiled with ``torch.compile`` (dynamo traced a frame, inductor ran the C++
compiler, or the test's own code asks to compile), started another process, or stepped an optimizer (training);
else it is a plain test. The kind travels with the test's reports (a user property, so also
in ``--junitxml``), and the run ends with the time by kind and by file (the controller's view under xdist).

Under ``.ci/run`` (``QMAMBA_SUITE_DEADLINE``, a Unix time) the suite stops at that time, saying so in one line,
rather than run into CI's own limit.

Each run's durations are kept in the cache folder outside the clone (``durations.json``), and the next run starts
the longest tests and ``xdist_group`` groups first, so that no long test is left for the end while the other workers
have nothing to do. Without a record (a new machine), tests marked ``slow`` go first.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

KINDS = ("triton interpreter", "browser", "ray", "compile", "subprocess", "training", "other")
SLOW_GUESS, FAST_GUESS = 10.0, 0.5  # seconds, for a test the record does not know yet
SLOW = 8.0  # seconds under make test on a 2-core Zen 3 EPYC: longer tests are marked slow (make test-fast skips them)
_APART = ("pytest {} with pytest-xdist {} would run the tests of an xdist_group on different workers (pytest-xdist "
          "issue 1386): install the versions make install installs (requirements/constraints.txt), or run with -n 0")


COMPILERS = {"cc", "c++", "gcc", "g++", "clang", "clang++"}  # inductor's C++ compiles, when its cache misses
ASKS_TO_COMPILE = re.compile(r"torch\.compile\(|compile=True|[\"']--(model\.)?compile[\"']")


def _group(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("xdist_group")
    return None if marker is None else str(marker.args[0] if marker.args else marker.kwargs["name"])


def _test_id(nodeid: str) -> str:
    """A test's node ID without the ``@group`` that pytest-xdist's loadgroup appends (its own rule)."""
    return nodeid.rsplit("@", 1)[0] if nodeid.rfind("@") > nodeid.rfind("]") else nodeid


class SuiteTiming:
    """The pytest plugin: registered by conftest.py in every process, controller and workers alike."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.started = time.monotonic()
        self.deadline = float(os.environ.get("QMAMBA_SUITE_DEADLINE") or "inf")
        self.session: pytest.Session | None = None
        self.spawned: list[tuple[str, dict]] | None = None  # command lines (and environments) of this test
        self.optimizer_steps, self.steps_before, self.hooked = 0, 0, False
        self.frames, self.ray_seen, self.asks_to_compile = 0, False, False
        sys.addaudithook(self._audit)

    # ---------------------------------------------------------------------------------------------- the order

    def _known(self) -> dict[str, float]:
        try:
            return {str(k): float(v) for k, v in json.loads(self.record.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def pytest_configure(self, config: pytest.Config) -> None:
        """pytest 9.2 changed how node IDs are kept, and pytest-xdist 3.8 tells its controller a test's group by
        changing the test's node ID: with both, the groups are ignored without a word (pytest-xdist issue 1386)."""
        if config.getoption("numprocesses", None) and config.getoption("dist", None) == "loadgroup":
            from importlib.metadata import version

            from packaging.version import Version

            if Version(pytest.__version__) >= Version("9.2") and Version(version("pytest-xdist")) <= Version("3.8"):
                raise pytest.UsageError(_APART.format(pytest.__version__, version("pytest-xdist")))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """Longest first: each test alone, or each ``xdist_group`` as one unit (xdist runs a group on one worker
        in the order given here). The same order in every worker: they read the same record."""
        if hasattr(config, "workerinput") and config.getvalue("loadgroup"):
            from importlib.metadata import version

            apart = [item for item in items if _group(item) and _test_id(item.nodeid) == item.nodeid]
            if apart:  # any other pair of versions that loses the groups: their IDs lack the @group suffix
                raise pytest.UsageError(_APART.format(pytest.__version__, version("pytest-xdist")))
        known = self._known()

        def guess(item: pytest.Item) -> float:
            return known.get(_test_id(item.nodeid), SLOW_GUESS if item.get_closest_marker("slow") else FAST_GUESS)

        units: dict[str, list[pytest.Item]] = {}
        for item in items:
            units.setdefault(_group(item) or item.nodeid, []).append(item)
        ordered = sorted(units.values(), key=lambda unit: -sum(map(guess, unit)))  # stable: file order on ties
        items[:] = [item for unit in ordered for item in unit]

    # ------------------------------------------------------------------------------------------ the kind of test

    def _audit(self, event: str, args: tuple) -> None:
        if event == "subprocess.Popen" and self.spawned is not None:
            executable, argv, _, env = args
            command = " ".join(map(str, argv if isinstance(argv, (list, tuple)) else [argv or executable]))
            self.spawned.append((command, dict(env or {})))

    def _on_step(self, *_: object) -> None:
        self.optimizer_steps += 1

    @staticmethod
    def _frames_compiled() -> int:
        convert_frame = sys.modules.get("torch._dynamo.convert_frame")
        return getattr(convert_frame, "FRAME_COUNTER", 0) if convert_frame else 0

    @staticmethod
    def _ray_running() -> bool:
        ray = sys.modules.get("ray")
        return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):  # noqa: ANN201 - a hook wrapper
        optimizer = sys.modules.get("torch.optim.optimizer")
        if optimizer is not None and not self.hooked:  # every optimizer's steps, from the first one imported
            optimizer.register_optimizer_step_post_hook(self._on_step)
            self.hooked = True
        self.spawned, self.frames, self.steps_before = [], self._frames_compiled(), self.optimizer_steps
        self.ray_seen = False
        function = getattr(item, "function", None)
        self.asks_to_compile = bool(function and ASKS_TO_COMPILE.search(inspect.getsource(function)))
        yield
        self.ray_seen = self._ray_running()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):  # noqa: ANN201
        yield
        self.ray_seen = self.ray_seen or self._ray_running()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        item.user_properties.append(("kind", self._kind()))
        item.user_properties.append(("marked slow", item.get_closest_marker("slow") is not None))
        self.spawned = None

    def _kind(self) -> str:
        commands = [command for command, _ in self.spawned or []]
        if any(env.get("TRITON_INTERPRET") == "1" for _, env in self.spawned or []):
            return "triton interpreter"
        if any("chromedriver" in command for command in commands):
            return "browser"
        if self.ray_seen or any(word in ("ray", "raylet") or word.endswith(("/raylet", "/gcs_server"))
                                for command in commands for word in command.split()):
            return "ray"
        compiler = any(Path(command.split()[0]).name in COMPILERS for command in commands if command)
        if self.asks_to_compile or compiler or self._frames_compiled() != self.frames:  # (reset() zeroes the count)
            return "compile"
        if any("torch._inductor.compile_worker" not in command for command in commands):
            return "subprocess"
        if self.optimizer_steps > self.steps_before:
            return "training"
        return "other"

    # ---------------------------------------------------------------------------------------------- the deadline

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown" or time.time() < self.deadline or self.session is None:
            return
        config = self.session.config
        if hasattr(config, "workerinput"):
            return  # the controller stops the run
        reason = (f"the suite ran past its deadline ({time.strftime('%H:%M:%S', time.localtime(self.deadline))}, "
                  "QMAMBA_SUITE_DEADLINE from .ci/run): stopped so that CI ends with the slowest tests listed")
        self.deadline = float("inf")  # said once
        dsession = config.pluginmanager.getplugin("dsession")  # pytest-xdist's controller, which runs the loop
        if dsession is not None:
            dsession.shouldstop = reason
        else:
            self.session.shouldstop = reason

    # --------------------------------------------------------------------------------------------- the summary

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001
        if hasattr(config, "workerinput"):
            return  # a worker: the controller reports
        seconds: dict[str, float] = defaultdict(float)
        kinds: dict[str, str] = {}
        unmarked: set[str] = set()
        for reports in terminalreporter.stats.values():
            for report in reports:
                if isinstance(report, pytest.TestReport):
                    test = _test_id(report.nodeid)
                    seconds[test] += report.duration
                    properties = dict(report.user_properties)
                    kinds.update({test: properties["kind"]} if "kind" in properties else {})
                    unmarked.update([test] if properties.get("marked slow") is False else [])
        if not seconds:
            return
        problem = self._save(seconds)
        wall = time.monotonic() - self.started
        total = sum(seconds.values())
        write = terminalreporter.write_line
        terminalreporter.section("where the time went")
        write(f"{len(seconds)} tests, {total:.0f} s of test time in {wall:.0f} s "
              f"({total / max(wall, 1e-9):.2f} tests at a time on average); setup + call + teardown of each test")
        by_kind: dict[str, list[float]] = defaultdict(list)
        by_file: dict[str, list[float]] = defaultdict(list)
        file_kinds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for nodeid, duration in seconds.items():
            kind = kinds.get(nodeid, "other")
            by_kind[kind].append(duration)
            path = nodeid.split("::")[0]
            by_file[path].append(duration)
            file_kinds[path][kind] += duration
        write(f"{'kind':<20} {'tests':>6} {'seconds':>8} {'share':>6}")
        for kind in sorted(by_kind, key=lambda k: -sum(by_kind[k])):
            write(f"{kind:<20} {len(by_kind[kind]):>6} {sum(by_kind[kind]):>8.1f} "
                  f"{sum(by_kind[kind]) / total:>6.1%}")
        write("")
        write(f"{'file':<36} {'tests':>6} {'seconds':>8} {'share':>6}  most of it")
        for path in sorted(by_file, key=lambda p: -sum(by_file[p])):
            main_kind = max(file_kinds[path], key=file_kinds[path].get)
            write(f"{path:<36} {len(by_file[path]):>6} {sum(by_file[path]):>8.1f} "
                  f"{sum(by_file[path]) / total:>6.1%}  {main_kind}")
        long_unmarked = sorted((t for t in unmarked if seconds[t] > SLOW), key=lambda t: -seconds[t])
        if long_unmarked:
            write("")
            write(f"not marked slow, and over {SLOW:.0f} s (mark them @pytest.mark.slow: make test-fast is the "
                  "edit-test loop):")
            for test in long_unmarked:
                write(f"  {seconds[test]:6.1f} s  {test}")
        if problem:
            write(problem)

    def _save(self, seconds: dict[str, float]) -> str | None:
        """Merge this run's durations into the record, atomically (two runs may end at once); what went wrong."""
        known = self._known() | seconds
        partial = self.record.with_name(f"{self.record.name}.{os.getpid()}.partial")
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(known, indent=0, sort_keys=True))
            partial.replace(self.record)
        except OSError as error:
            return f"the durations were not recorded ({error}): the next run starts the slow-marked tests first"
        return None
