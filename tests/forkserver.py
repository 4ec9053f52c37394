"""Test servers forked from a process that has already imported llamaserve: a start skips the second of imports
a fresh interpreter spends (fastapi, sqlalchemy, pydantic models, llama.cpp's bindings), about half of what a
server's start and stop cost the suite.

The fork server is a fresh interpreter (no threads of the test process, no OpenMP pool: forking stays safe) that
imports llamaserve's modules and nothing more, and forks one child per server. A child redirects its
output to the server's log, takes the environment the test process has now, and runs the `llamaserve` command
line, exactly as `python -m llamaserve.cli ARGS` would. The test process drives it by pid, through a
`ForkedProcess` that answers as `subprocess.Popen` does (poll, wait, signals); the fork server reaps it."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

# What every child would import, imported once here (the command imports most of them lazily, when it runs).
PRELOADED = (
    "llamaserve.cli",
    "llamaserve.api.app",
    "llamaserve.api.runtime.http_protocol",
    "llamaserve.backends.local",
    "llamaserve.billing.migrations",
    "sqlalchemy.dialects.sqlite.aiosqlite",
    "uvicorn.lifespan.on",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.httptools_impl",
)


def serve() -> None:
    """The fork server's loop, over its stdin and stdout, a JSON line each way: {"start": [argv, env, log]} → the
    child's pid; {"poll": pid} → its exit code, or null while it runs."""
    for module in PRELOADED:
        importlib.import_module(module)
    exited: dict[int, int] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            pid = os.fork()
            if pid == 0:
                _child(*request["start"])
            answer: int | None = pid
        else:
            pid = request["poll"]
            if pid not in exited:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exited[pid] = os.waitstatus_to_exitcode(status)
            answer = exited.get(pid)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """Become `llamaserve ARGV`, output to `log`; never returns."""
    code = 1
    try:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from llamaserve.cli import app

        try:
            app(argv, prog_name="llamaserve")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkServer:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.lock = threading.Lock()

    def _ask(self, request: dict[str, Any]) -> Any:
        """One request and its answer; one at a time (a test may wait for a server from another thread)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        with self.lock:
            self.process.stdin.write(json.dumps(request) + "\n")
            answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server exited with {self.process.wait()}")
        return json.loads(answer)

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> ForkedProcess:
        return ForkedProcess(self, self._ask({"start": [argv, env, str(log)]}), argv)

    def poll(self, pid: int) -> int | None:
        return self._ask({"poll": pid})

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


class ForkedProcess:
    """A forked server, driven as a `subprocess.Popen`."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self.server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.poll(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode} args={self.args!r}>"


_fork_server: ForkServer | None = None


def fork_server() -> ForkServer:
    global _fork_server
    if _fork_server is None:
        _fork_server = ForkServer()
    return _fork_server


def close_fork_server() -> None:
    global _fork_server
    if _fork_server is not None:
        _fork_server.close()
        _fork_server = None


if __name__ == "__main__":
    serve()
