"""The model registry (`--config llamaserve.toml`): which models the gateway serves, under which names, at
which prices, and on which backends.

    [[models]]
    id = "meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo"
    aliases = ["llama-v3p1-405b-instruct"]
    context_length = 131072
    price_input = 3.5           # credits per million tokens
    price_output = 3.5
    capabilities = ["tools", "json", "logprobs"]
    timeout = 120               # seconds to the first byte before 504

    [[models.backends]]
    type = "upstream"           # an OpenAI-compatible server: vLLM, `llamaserve engine`, ...
    url = "http://10.0.0.11:8000/v1"
    model = "meta-llama/Llama-3.1-405B-Instruct-FP8"   # its name there
    api_key_env = "VLLM_KEY"    # the upstream's key, read from this environment variable
    weight = 1

A `local` backend (`path = "model.gguf"`) runs in this process on our engine; at most one per gateway. With
`mmproj = "mmproj.gguf"` (a vision projector for that model, llama.cpp's mtmd) it takes images: capability
"vision" follows from it (and a local model cannot claim "vision" without one). The same structure in YAML (a
file ending .yaml or .yml) works too.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamaserve.billing.pricing import Price

CAPABILITIES = frozenset({"tools", "json", "vision", "logprobs"})


class RegistryError(ValueError):
    """A registry file that cannot be served; the message says where."""


@dataclass(frozen=True)
class BackendSpec:
    type: str  # local | upstream
    url: str = ""  # upstream: base URL ending in /v1
    model: str = ""  # upstream: the model's name there
    api_key: str | None = field(default=None, repr=False)
    weight: int = 1
    path: str = ""  # local: the GGUF file
    mmproj: str | None = None  # local: the vision projector GGUF, if the model takes images

    @property
    def name(self) -> str:
        return self.url or f"local:{self.path}"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    aliases: tuple[str, ...]
    context_length: int
    price: Price
    capabilities: frozenset[str]
    timeout: float
    backends: tuple[BackendSpec, ...]

    def card(self, created: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": created,
            "owned_by": "llamaserve",
            "aliases": list(self.aliases),
            "max_model_len": self.context_length,
            "capabilities": sorted(self.capabilities),
            "pricing": {
                "input_per_million": self.price.input_per_million,
                "output_per_million": self.price.output_per_million,
            },
        }


@dataclass(frozen=True)
class Registry:
    models: tuple[ModelSpec, ...]

    def resolve(self, name: str) -> ModelSpec | None:
        """The model a client's name (id or alias) means."""
        for model in self.models:
            if name == model.id or name in model.aliases:
                return model
        return None


def load_registry(path: Path) -> Registry:
    """A registry from TOML, or from YAML (`.yaml`/`.yml`, the same structure)."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise RegistryError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a mapping with a list of models")
    models = tuple(_model(m, f"{path}: models[{i}]") for i, m in enumerate(data.get("models") or []))
    if not models:
        raise RegistryError(f"{path}: no [[models]]")
    names = [n for m in models for n in (m.id, *m.aliases)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistryError(f"{path}: names used twice: {', '.join(duplicates)}")
    if sum(b.type == "local" for m in models for b in m.backends) > 1:
        raise RegistryError(f"{path}: at most one local backend per gateway (run `llamaserve engine` for more)")
    return Registry(models)


def _model(m: dict[str, Any], where: str) -> ModelSpec:
    if not isinstance(m.get("id"), str) or not m["id"]:
        raise RegistryError(f"{where}: needs an id")
    caps = frozenset(m.get("capabilities", ["tools", "json", "logprobs"]))
    if not caps <= CAPABILITIES:
        raise RegistryError(f"{where}: unknown capabilities {sorted(caps - CAPABILITIES)}")
    backends = tuple(_backend(b, f"{where}.backends[{i}]") for i, b in enumerate(m.get("backends") or []))
    if not backends:
        raise RegistryError(f"{where}: needs at least one [[models.backends]]")
    if backends[0].type == "local":
        if backends[0].mmproj:
            caps |= {"vision"}
        elif "vision" in caps:
            raise RegistryError(f"{where}: capability vision needs mmproj (a vision projector) on its local backend")
    return ModelSpec(
        id=m["id"],
        aliases=tuple(m.get("aliases", [])),
        context_length=int(m.get("context_length", 8192)),
        price=Price.from_credits(float(m.get("price_input", 0.1)), float(m.get("price_output", 0.2))),
        capabilities=caps,
        timeout=float(m.get("timeout", 60)),
        backends=backends,
    )


def _backend(b: dict[str, Any], where: str) -> BackendSpec:
    kind = b.get("type")
    if kind == "local":
        if not b.get("path"):
            raise RegistryError(f"{where}: a local backend needs a path")
        mmproj = b.get("mmproj")
        if mmproj is not None and (not isinstance(mmproj, str) or not mmproj):
            raise RegistryError(f"{where}: mmproj must be the path of a projector GGUF")
        return BackendSpec("local", path=str(b["path"]), mmproj=mmproj)
    if kind != "upstream":
        raise RegistryError(f"{where}: type must be 'local' or 'upstream'")
    if not str(b.get("url", "")).startswith(("http://", "https://")) or not b.get("model"):
        raise RegistryError(f"{where}: an upstream backend needs url (http...) and model")
    key = None
    if b.get("api_key_env"):
        key = os.environ.get(b["api_key_env"])
        if key is None:
            raise RegistryError(f"{where}: environment variable {b['api_key_env']} is not set")
    weight = int(b.get("weight", 1))
    if weight < 1:
        raise RegistryError(f"{where}: weight must be at least 1")
    return BackendSpec("upstream", url=str(b["url"]).rstrip("/"), model=str(b["model"]), api_key=key, weight=weight)
