"""Real servers on loopback: `llamaserve serve` as a process of its own on a free port, with the embedded model
(forked from a process that has imported llamaserve once: tests/forkserver.py)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from tests.forkserver import ForkedProcess, close_fork_server, fork_server

if TYPE_CHECKING:
    from llamaserve.engine import LlamaModel

MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    process: ForkedProcess  # answers as a subprocess.Popen
    data_dir: Path
    log_path: Path  # the process's stdout and stderr (a file: a pipe nobody reads fills and blocks the server)
    api_key: str = ""  # the default account's key, made at first start
    final_log: str | None = None  # the whole log, kept when the server stops (its directory goes)
    verify: ssl.SSLContext | bool = True  # for HTTPS: its CA

    def log_text(self) -> str:
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (other output, such as the start-up banner, left out)."""
        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass  # a line being written
        return lines

    def access_log(self, request_id: str, timeout: float = 10) -> list[dict[str, Any]]:
        """The access-log lines of one request, once there is one (they are written when the response has
        ended, a moment after the client saw its last byte)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                line
                for line in self.log_lines()
                if line.get("logger") == "llamaserve.access" and line.get("request_id") == request_id
            ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=api_key or self.api_key, max_retries=0, timeout=120)

    def async_openai(self, api_key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=api_key or self.api_key, max_retries=0, timeout=120)

    def http(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key or self.api_key}"}
        return httpx.Client(base_url=self.base_url, timeout=120, headers=headers, verify=self.verify)

    def engine_stats(self) -> dict[str, int]:
        return httpx.get(f"{self.base_url}/health", verify=self.verify).json()["engine"]

    def reset_prefix_cache(self, admin_key: str) -> None:
        """The engine's KV cache as a fresh start leaves it (once the last requests have left the engine)."""
        self.wait_idle()
        r = httpx.post(
            f"{self.base_url}/admin/engine/reset-prefix-cache", headers={"Authorization": f"Bearer {admin_key}"}
        )
        assert r.status_code == 200, r.text

    def wait_idle(self, timeout: float = 30) -> dict[str, int]:
        """Engine stats once nothing runs or waits (aborted sequences leave at the engine's next step)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine_stats()
            if stats["running"] == 0 and stats["waiting"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout}s: {stats}")
            time.sleep(0.05)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll `condition()` until it holds (a fixed sleep would be too short on a slow machine, too long on others)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)


# What the servers' starts and stops cost the run (printed at its end): the suite's time is everyone's.
SERVER_TIME = {"starts": 0, "seconds": 0.0}


def pytest_sessionfinish(session: pytest.Session) -> None:
    close_fork_server()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    starts, seconds = SERVER_TIME["starts"], SERVER_TIME["seconds"]
    terminalreporter.write_line(f"llamaserve servers: {starts} started, {seconds:.0f} s starting and stopping them")


@contextmanager
def start_server(
    *args: str,
    data_dir: Path | None = None,
    command: str = "serve",
    port: int | None = None,
    ca: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """A server on a free port with its own data directory (a fresh SQLite store unless given one, or unless
    args name a --database-url); `server.api_key` is the key it created at first start. With --ssl-certfile in
    args it serves HTTPS on https://localhost:PORT, checked against the CA file `ca`. `env`: variables added to
    its environment. Unless args say otherwise, the embedded model runs 4 slots, not serve's 16: a 16-slot KV cache
    costs a start 0.6 s more (1.5 GB to allocate and clear), and few tests run more than 4 requests at once."""
    port = port or free_port()
    if "--parallel" not in args and "--config" not in args:
        args = ("--parallel", "4", *args)
    threads = os.environ.get("LLAMASERVE_TEST_THREADS", str(min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="llamaserve-test-") as tmp:
        data = data_dir or Path(tmp)
        argv = [
            command,
            "--port",
            str(port),
            "--threads",
            threads,
            *(["--data-dir", str(data)] if command == "serve" else []),
            *args,
        ]
        log_path = Path(tmp) / "server.log"
        process = fork_server().start(argv, {**os.environ, **(env or {})}, log_path)
        tls = "--ssl-certfile" in args
        base = f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"
        verify = ssl.create_default_context(cafile=ca) if ca else True
        server = Server(base, process, data, log_path, verify=verify)
        try:
            # A server whose data goes with it is killed at the end (0.01 s); one whose data outlives it (a data
            # directory or a database of the caller's) stops as in production, settling what it holds (0.25 s).
            with _running(server, graceful=data_dir is not None or "--database-url" in args):
                key_file = data / "default.key"
                server.api_key = key_file.read_text().strip() if key_file.exists() else ""
                yield server
        finally:
            server.final_log = server.log_text()


@contextmanager
def _running(server: Server, graceful: bool) -> Iterator[None]:
    process = server.process
    started = time.monotonic()
    SERVER_TIME["starts"] += 1
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llamaserve exited with {process.returncode}:\n{server.log_text()}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=1, verify=server.verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llamaserve did not become healthy in 120 s")
            time.sleep(0.02)
        SERVER_TIME["seconds"] += time.monotonic() - started
        yield
    finally:
        stopping = time.monotonic()
        if graceful:
            process.terminate()
        else:
            process.kill()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        SERVER_TIME["seconds"] += time.monotonic() - stopping


@contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A plain HTTP server on a loopback port, in a thread (fake upstreams, image hosts); yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # Polled every 50 ms for its shutdown (the default 0.5 s is a wait at every teardown).
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def send_json(handler: BaseHTTPRequestHandler, status: int, body: object) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


POSTGRES_URL = os.environ.get("LLAMASERVE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLAMASERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, error: Exception) -> None:
    """A service the tests need is not there: CI must have it (fail); elsewhere the tests are skipped."""
    message = f"{what} is not reachable: {error}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards) on the server LLAMASERVE_TEST_POSTGRES_URL names;
    yields its SQLAlchemy URL."""
    import asyncio
    import uuid

    import asyncpg
    from sqlalchemy.engine import make_url

    server = make_url(POSTGRES_URL)
    name = f"llamaserve_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server.set(drivername="postgresql").render_as_string(False), timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", e)
    try:
        yield server.set(drivername="postgresql+asyncpg", database=name).render_as_string(False)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=5).ping()
    except redis.RedisError as e:
        unavailable("Redis", e)
    return REDIS_URL


@pytest.fixture
def embedded_llama() -> Iterator[LlamaModel]:
    """The embedded model in this process (2 sequences of 512 tokens), for driving the engine directly."""
    from llamaserve.config import resolve_model
    from llamaserve.engine import ContextConfig, LlamaModel

    path, _ = resolve_model(None)
    model = LlamaModel(str(path), ContextConfig(n_ctx_seq=512, n_seq_max=2, n_batch=64, n_threads=2))
    yield model
    model.close()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The default server: embedded model, 16 slots."""
    with start_server("--parallel", "16") as s:
        yield s


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return server.openai()


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c
