"""Real servers on loopback: `llamaserve serve` as a subprocess on a free port, with the embedded model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=120)

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=120)

    def engine_stats(self) -> dict[str, int]:
        return httpx.get(f"{self.base_url}/health").json()["engine"]

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


@contextmanager
def start_server(*args: str) -> Iterator[Server]:
    port = free_port()
    threads = os.environ.get("LLAMASERVE_TEST_THREADS", str(min(2, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "llamaserve.cli", "serve", "--port", str(port), "--threads", threads, *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                out = process.stdout.read().decode() if process.stdout else ""
                raise RuntimeError(f"llamaserve exited with {process.returncode}:\n{out}")
            try:
                if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llamaserve did not become healthy in 120 s")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


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
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c
