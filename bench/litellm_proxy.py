"""LiteLLM's proxy (`litellm[proxy]`) in front of an OpenAI-protocol upstream, as a peer for bench/gateway_bench.py:
what another Python gateway adds on the same machine, with the same upstream.

LiteLLM lives in a virtualenv of its own (its pins clash with ours), e.g.

    python3 -m venv /tmp/venv-litellm && /tmp/venv-litellm/bin/pip install 'litellm[proxy]'

It runs as it would for a small deployment: one model, a master key, no database (so no spend logs, budgets or
virtual keys), one uvicorn worker. Offline: the model cost map, the Anthropic beta-header list and the autorouter
presets come from the package's own copies (LITELLM_LOCAL_*), telemetry is vetoed (LITELLM_TELEMETRY_DISABLED; the
older `litellm_settings.telemetry` key too), and it starts in a scratch directory, so no stray `.env` is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import free_port, stop  # noqa: E402

# Nothing fetched from the network: these switch LiteLLM to the copies it ships, and telemetry off.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_TELEMETRY_DISABLED": "True",
    "LITELLM_TELEMETRY": "False",  # older releases
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
# Inherited settings that would give it a database, another key or another config.
DROPPED_ENV = ("DATABASE_URL", "DIRECT_URL", "LITELLM_MASTER_KEY", "LITELLM_CONFIG_PATH", "CONFIG_FILE_PATH")
READY_PATH = "/health/liveliness"  # answers without a key and without calling the upstream


@dataclass(frozen=True)
class LiteLLM:
    """How to start LiteLLM's proxy: its command (before the proxy's own options) and the Python beside it."""

    command: list[str]
    python: Path | None

    @classmethod
    def from_path(cls, path: str) -> LiteLLM:
        """`path` is the `litellm` script, or a Python that has litellm[proxy] installed."""
        p = Path(path).expanduser()
        if not p.exists():
            raise SystemExit(f"--litellm: {p} does not exist")
        if p.name.startswith("python"):
            return cls([str(p), "-m", "litellm.proxy.proxy_cli"], p)
        python = p.with_name("python")
        return cls([str(p)], python if python.exists() else None)

    @classmethod
    def from_venv(cls, venv: str) -> LiteLLM:
        """The virtualenv's `litellm` script, else its Python."""
        bin_dir = Path(venv).expanduser() / "bin"
        for candidate in (bin_dir / "litellm", bin_dir / "python"):
            if candidate.exists():
                return cls.from_path(str(candidate))
        raise SystemExit(f"--litellm-venv: no bin/litellm nor bin/python in {venv}")

    def version(self) -> str:
        """The installed litellm's version, for the record (no import of litellm itself: that takes seconds)."""
        if self.python is None:
            return "unknown"
        code = "import importlib.metadata as m; print(m.version('litellm'))"
        done = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, timeout=60)
        return done.stdout.strip() or "unknown"


def config(upstream: str, model: str, name: str, master_key: str) -> dict[str, object]:
    """One model, the upstream's, under `name`; the master key is the only key (no database)."""
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{upstream}/v1", "api_key": "anything"},
            }
        ],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": master_key},
    }


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Its start takes tens of seconds (imports); fails early, with the log's tail, if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"litellm exited with code {proc.returncode} before it was ready:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base + READY_PATH, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"litellm not ready after {timeout:.0f} s (log: {log})")


@contextlib.contextmanager
def proxy(litellm: LiteLLM, upstream: str, model: str, name: str, log: Path) -> Iterator[tuple[str, str]]:
    """LiteLLM's proxy on a free loopback port in front of `upstream` (a base URL without /v1), serving `model` as
    `name`; yields its base URL and master key. Its output goes to `log`."""
    master_key = "sk-" + secrets.token_hex(32)  # it refuses short master keys
    with tempfile.TemporaryDirectory(prefix="litellm_") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(json.dumps(config(upstream, model, name, master_key), indent=2))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV} | OFFLINE_ENV
        port = free_port()
        command = [*litellm.command, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
        with log.open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, log, timeout=300)
            yield base, master_key
        finally:
            stop(proc)
