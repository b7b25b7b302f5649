"""`python -m qmamba ...` and `python SCRIPT ...` as real processes without the import: forked from a warm interpreter.

A `qmamba fit` process spends ~9 s of its ~16 s importing torch, Lightning and torchmetrics before it trains (2 AMX
Xeon cores; about three times that on a first-generation EPYC), and the tests that kill, signal and resume runs start
many of them. Here a server process imports a command's modules once; each request forks it, and the child becomes
`python -m qmamba ARGS` (``runpy``, as the interpreter runs ``-m``), or `python SCRIPT ARGS`, in the request's
folder, environment and standard streams. The child is a real process with its own pid: SIGKILL and SIGTERM reach it,
its exit status is reported as :class:`subprocess.Popen` reports one, and its weights are those of a fresh process to
the bit (a fit forked here and one started anew: identical checkpoints). Tests that prove the installed command works
end to end keep starting it afresh (tests/test_cli.py); this is for the tests where the process is the means: killed,
signalled and resumed runs, Get started's examples, the benchmark scripts.

Variables that an interpreter reads while it starts or imports (``PYTHONPATH`` and the other start-up ones, numba's,
torch's and thread counts: ``IMPORT_TIME``) are the server's: a request that sets them otherwise is refused, as the
child could not honour them.

Run as a script, this module is the server: ``python forked.py FD MODULE...`` imports the modules, then serves the
socket it inherits as file descriptor FD.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

# what each command imports before it works, so that its children start warm (a score child imports no Lightning,
# as `qmamba score` does not)
PRELOAD = {
    "fit": ("qmamba.cli", "qmamba.training.cli"),
    "score": ("qmamba.cli", "qmamba.commands.score", "qmamba.commands.score_parts", "qmamba.commands.score_outputs",
              "qmamba.inference.scoring", "qmamba.inference.model_sources", "qmamba.ops.cpu_scan"),
    # what the scripts under benchmarks/ import, all of it (4-8 s of each script's start on 2 AMX Xeon cores)
    "benchmarks": ("qmamba.training.optimizers", "qmamba.models", "qmamba.ops.cpu_scan", "qmamba.inference.scoring",
                   "lightning", "pandas"),
}
# read while an interpreter starts or imports, before a child could see a change (PYTHONBREAKPOINT, say, is read when
# called, and Ray sets it in the test process)
IMPORT_TIME = ("PYTHONPATH", "PYTHONHOME", "PYTHONHASHSEED", "PYTHONOPTIMIZE", "PYTHONWARNINGS", "PYTHONUNBUFFERED",
               "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUTF8", "PYTHONIOENCODING", "PYTHONDEVMODE",
               "PYTHONMALLOC", "NUMBA_", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "CUDA", "LD_", "MALLOC_",
               "GLIBC_TUNABLES")
_PACKET = 1 << 20


class ForkedProcess:
    """The part of :class:`subprocess.Popen` the tests use: pid, returncode, poll, wait, communicate, send_signal,
    kill, terminate and the PIPE streams."""

    def __init__(self, zygote: Zygote, pid: int, stdout: IO[str] | None, stderr: IO[str] | None) -> None:
        self._zygote, self.pid, self.stdout, self.stderr = zygote, pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self._zygote.exit_code(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(f"qmamba (pid {self.pid})", timeout)
            self.returncode = code
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Wait for the exit while reading the PIPE streams to their end (so that a full pipe never stalls the
        child): (stdout, stderr), None for a stream not piped."""
        texts: dict[int, str] = {}
        readers = [threading.Thread(target=lambda i=i, stream=stream: texts.__setitem__(i, stream.read()), daemon=True)
                   for i, stream in enumerate((self.stdout, self.stderr)) if stream is not None]
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join(timeout)
        return texts.get(0), texts.get(1)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """A server process that has imported ``modules`` and forks a child per :meth:`popen`."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server = subprocess.Popen([sys.executable, __file__, str(theirs.fileno()), *modules],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self._socket, self._exits = ours, {}
        ready = json.loads(self._socket.recv(_PACKET) or b"{}")
        if "environment" not in ready:
            raise RuntimeError(f"the forking server did not start (exit {self._server.wait(timeout=60)})")
        self._environment: dict[str, str] = ready["environment"]

    def popen(self, args: list[str], cwd: str | Path | None = None, env: dict[str, str] | None = None,
              stdout: int | IO | None = None, stderr: int | IO | None = None,
              script: str | Path | None = None) -> ForkedProcess:
        """`python -m qmamba *args` (or `python SCRIPT *args`) in ``cwd`` with ``env`` (default: this process's);
        ``stdout``/``stderr``: None (this process's), :data:`subprocess.DEVNULL`, :data:`subprocess.PIPE` (a text
        stream on the process) or an open file."""
        env = dict(os.environ if env is None else env)
        changed = sorted(name for name in {*env, *self._environment} if name.startswith(IMPORT_TIME)
                         and env.get(name) != self._environment.get(name))
        if changed:
            raise ValueError(f"{', '.join(changed)} differ from the forking server's, which read them while it "
                             "started: start this process with subprocess instead")
        streams, sent = [], []
        for target, inherited in ((stdout, 1), (stderr, 2)):
            if target == subprocess.PIPE:
                read, write = os.pipe()
                streams.append(open(read, encoding="utf-8", errors="replace"))  # noqa: SIM115
                sent.append(write)
            elif target == subprocess.DEVNULL:
                streams.append(None)
                sent.append(os.open(os.devnull, os.O_WRONLY))
            else:
                streams.append(None)
                sent.append(os.dup(inherited if target is None else target.fileno()))
        sent.insert(0, os.open(os.devnull, os.O_RDONLY))
        request = {"args": list(map(str, args)), "cwd": str(cwd or os.getcwd()), "env": env,
                   "script": None if script is None else str(Path(script).resolve())}
        try:
            socket.send_fds(self._socket, [json.dumps(request).encode()], sent)
        finally:
            for fd in sent:  # the server holds copies now, and passes them to the child
                os.close(fd)
        pid = self._receive_pid()
        return ForkedProcess(self, pid, *streams)

    def run(self, args: list[str], cwd: str | Path | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None, script: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """:func:`subprocess.run` with ``capture_output=True, text=True``: the output goes through files, so that
        neither stream can fill a pipe while the other is read."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = self.popen(args, cwd=cwd, env=env, stdout=out, stderr=err, script=script)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess([str(script or "qmamba"), *args], code, out.read(), err.read())

    def _receive_pid(self) -> int:
        while True:
            message = self._message(None)
            if "pid" in message:
                return message["pid"]

    def _message(self, timeout: float | None) -> dict:
        self._socket.settimeout(timeout)
        try:
            packet = self._socket.recv(_PACKET)
        finally:
            self._socket.settimeout(None)
        if not packet:
            raise RuntimeError(f"the forking server exited ({self._server.poll()})")
        message = json.loads(packet)
        if "exit" in message:
            self._exits[message["exit"]] = message["code"]
        return message

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The exit code of child ``pid`` (negative: the signal that ended it), or None if it is still running after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._exits:
            try:  # at least one look, so that poll() sees an exit already reported
                self._message(None if deadline is None else max(deadline - time.monotonic(), 1e-3))
            except TimeoutError:
                return None
        return self._exits[pid]

    def close(self) -> None:
        self._socket.close()  # the server exits when its socket closes
        self._server.wait(timeout=60)


# -------------------------------------------------------------------------------------------------- the server
def _serve(connection: socket.socket, started: dict[str, str]) -> dict:
    """Fork a child per request and report its pid and exit; return the request in the child, exit when the client
    has gone. ``started``: the environment before the imports, which requests are checked against."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(connection, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    connection.send(json.dumps({"environment": started}).encode())
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_read:
                os.read(wake_read, 4096)
                while True:
                    try:
                        pid, status = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                    connection.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
                continue
            packet, fds, _, _ = socket.recv_fds(connection, _PACKET, 3)
            if not packet:
                raise SystemExit(0)
            request = json.loads(packet)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                selector.close()
                connection.close()
                os.close(wake_read)
                os.close(wake_write)
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                return request
            for fd in fds:
                os.close(fd)
            connection.send(json.dumps({"pid": pid}).encode())


def _become(request: dict, started: dict[str, str]) -> None:
    """Turn this forked child into `python -m qmamba ARGS` or `python SCRIPT ARGS`: a real process's folder,
    environment, argv, import path and seeds. What the imports set in the environment (from ``started`` to now) is set
    as a new process's imports would."""
    import numpy as np

    imported = {name: value for name, value in os.environ.items() if started.get(name) != value}
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update({name: value for name, value in imported.items() if name not in request["env"]})
    np.random.seed()  # a new interpreter draws numpy's global seed afresh (Python's own random reseeds on fork)
    tempfile.tempdir = None  # and reads TMPDIR afresh: the server's imports asked for its temporary folder
    script = request["script"]
    # the interpreter puts the script's folder first on the import path, or for -m the working folder
    sys.path[0] = os.path.dirname(script) if script else os.getcwd()
    if script:
        sys.argv = [script, *request["args"]]
        runpy.run_path(script, run_name="__main__")
    else:
        sys.argv = ["qmamba", *request["args"]]
        runpy.run_module("qmamba", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    environment = dict(os.environ)
    for module in sys.argv[2:]:
        importlib.import_module(module)
    _become(_serve(socket.socket(fileno=int(sys.argv[1])), environment), environment)
