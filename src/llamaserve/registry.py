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
    batch_discount = 0.5        # off the price for batch lines (default: the server's --batch-discount)

    [[models.backends]]
    type = "upstream"           # an OpenAI-compatible server: vLLM, `llamaserve engine`, ...
    url = "http://10.0.0.11:8000/v1"
    model = "meta-llama/Llama-3.1-405B-Instruct-FP8"   # its name there
    api_key_env = "VLLM_KEY"    # the upstream's key, read from this environment variable
    weight = 1

An upstream over HTTPS verifies the server's certificate against the system's CAs, or against `ca_file` (a PEM
bundle: a private CA); `verify = false` turns verification off and is logged at start. HTTPS_PROXY and NO_PROXY
are honoured. `chat_path` and `completions_path` name the endpoints relative to `url` (Segmind's form:
`chat_path = "llama-v3p1-405b-instruct"` with `send_model = false`, which leaves `model` out of the body).
`health_path` (default "models"; "" for none) is probed every `health_interval` seconds (0: never).

A model may name a `tokenizer` (a GGUF file; the vocabulary alone is enough) and its `chat_format` ("llama3",
or "template" for the GGUF's own chat template): then, where an upstream reports no usage, its tokens are counted
exactly instead of estimated from the text's bytes.

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


MODEL_KEYS = frozenset(
    {"id", "aliases", "context_length", "price_input", "price_output", "capabilities", "timeout", "backends"}
    | {"tokenizer", "chat_format", "batch_discount"}
)
LOCAL_KEYS = frozenset({"type", "path", "mmproj"})
UPSTREAM_KEYS = frozenset(
    {"type", "url", "model", "api_key_env", "weight", "ca_file", "verify", "chat_path", "completions_path"}
    | {"send_model", "health_path", "health_interval"}
)
CHAT_FORMATS = ("llama3", "template")


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
    ca_file: str | None = None  # upstream over HTTPS: the CA bundle its certificate is checked against
    verify: bool = True  # upstream over HTTPS: check its certificate at all
    chat_path: str = "chat/completions"  # upstream: endpoints, relative to url
    completions_path: str = "completions"
    send_model: bool = True  # upstream: put `model` in the body (Segmind's path form takes none)
    health_path: str = "models"  # upstream: GET probe, relative to url; "" for none
    health_interval: float = 2.0  # upstream: seconds between probes; 0 for none

    @property
    def name(self) -> str:
        return self.url or f"local:{self.path}"

    def endpoint(self, name: str) -> str:
        """The URL of an upstream's endpoint: "chat", "completions", "health", or one at the server's root beside
        /v1 ("tokenize", "detokenize", as vLLM serves them)."""
        paths = {"chat": self.chat_path, "completions": self.completions_path, "health": self.health_path}
        if name in paths:
            return f"{self.url}/{paths[name]}"
        return f"{self.url.removesuffix('/v1')}/{name}"


@dataclass(frozen=True)
class ModelSpec:
    id: str
    aliases: tuple[str, ...]
    context_length: int
    price: Price
    capabilities: frozenset[str]
    timeout: float
    backends: tuple[BackendSpec, ...]
    tokenizer: str | None = None  # a GGUF whose vocabulary counts the tokens an upstream does not report
    chat_format: str = "template"  # how that tokenizer's prompts are rendered: llama3 | template
    batch_discount: float | None = None  # off its price for batch lines; None: the server's --batch-discount
    where: str = field(default="", compare=False)  # its place in the registry file, for messages

    def card(self, created: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": created,
            "owned_by": "llamaserve",
            "aliases": list(self.aliases),
            "max_model_len": self.context_length,
            "capabilities": sorted(self.capabilities),
            "pricing": self.price.per_million_credits(),
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
    _known(data, frozenset({"models"}), str(path))
    entries = data.get("models") or []
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise RegistryError(f"{path}: models must be a list of tables ([[models]])")
    models = tuple(_model(m, f"{path}: models[{i}]", path.parent) for i, m in enumerate(entries))
    if not models:
        raise RegistryError(f"{path}: no [[models]]")
    names = [n for m in models for n in (m.id, *m.aliases)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistryError(f"{path}: names used twice: {', '.join(duplicates)}")
    if sum(b.type == "local" for m in models for b in m.backends) > 1:
        raise RegistryError(f"{path}: at most one local backend per gateway (run `llamaserve engine` for more)")
    return Registry(models)


def _known(table: dict[str, Any], keys: frozenset[str], where: str) -> None:
    """Refuse keys the registry does not know: a typo (`ca_flie`) must not be ignored in silence."""
    unknown = sorted(set(table) - keys)
    if unknown:
        raise RegistryError(f"{where}: unknown key {', '.join(map(repr, unknown))} (known: {', '.join(sorted(keys))})")


def _file(value: Any, where: str, base: Path) -> str:
    """A file the registry names (relative to the registry's folder), which must exist."""
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{where}: must be the path of a file")
    path = base / Path(value).expanduser()
    if not path.is_file():
        raise RegistryError(f"{where}: no such file: {path}")
    return str(path)


def _typed(table: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RegistryError(f"{where}.{key}: must be {_KINDS[kind]}")
    return value


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _model(m: dict[str, Any], where: str, base: Path) -> ModelSpec:
    _known(m, MODEL_KEYS, where)
    if not isinstance(m.get("id"), str) or not m["id"]:
        raise RegistryError(f"{where}: needs an id")
    caps = frozenset(m.get("capabilities", ["tools", "json", "logprobs"]))
    if not caps <= CAPABILITIES:
        raise RegistryError(f"{where}: unknown capabilities {sorted(caps - CAPABILITIES)}")
    backends = tuple(_backend(b, f"{where}.backends[{i}]", base) for i, b in enumerate(m.get("backends") or []))
    if not backends:
        raise RegistryError(f"{where}: needs at least one [[models.backends]]")
    if backends[0].type == "local":
        if backends[0].mmproj:
            caps |= {"vision"}
        elif "vision" in caps:
            raise RegistryError(f"{where}: capability vision needs mmproj (a vision projector) on its local backend")
    tokenizer = _file(m["tokenizer"], f"{where}.tokenizer", base) if "tokenizer" in m else None
    chat_format = m.get("chat_format", "template")
    if chat_format not in CHAT_FORMATS:
        raise RegistryError(f"{where}.chat_format: must be one of {', '.join(CHAT_FORMATS)}")
    if "chat_format" in m and tokenizer is None:
        raise RegistryError(f"{where}.chat_format: goes with a tokenizer (it says how that tokenizer's prompts look)")
    discount = _typed(m, "batch_discount", float, None, where) if "batch_discount" in m else None
    if discount is not None and not 0 <= discount <= 1:
        raise RegistryError(f"{where}.batch_discount: must be between 0 and 1 (0.5: half price)")
    return ModelSpec(
        id=m["id"],
        aliases=tuple(m.get("aliases", [])),
        context_length=int(m.get("context_length", 8192)),
        price=Price.from_credits(float(m.get("price_input", 0.1)), float(m.get("price_output", 0.2))),
        capabilities=caps,
        timeout=float(m.get("timeout", 60)),
        backends=backends,
        tokenizer=tokenizer,
        chat_format=chat_format,
        batch_discount=discount,
        where=where,
    )


def _backend(b: dict[str, Any], where: str, base: Path) -> BackendSpec:
    if not isinstance(b, dict):
        raise RegistryError(f"{where}: must be a table ([[models.backends]])")
    kind = b.get("type")
    if kind == "local":
        _known(b, LOCAL_KEYS, where)
        if not b.get("path"):
            raise RegistryError(f"{where}: a local backend needs a path")
        mmproj = b.get("mmproj")
        if mmproj is not None and (not isinstance(mmproj, str) or not mmproj):
            raise RegistryError(f"{where}: mmproj must be the path of a projector GGUF")
        return BackendSpec("local", path=str(b["path"]), mmproj=mmproj)
    if kind != "upstream":
        raise RegistryError(f"{where}: type must be 'local' or 'upstream'")
    _known(b, UPSTREAM_KEYS, where)
    url = str(b.get("url", ""))
    if not url.startswith(("http://", "https://")) or not b.get("model"):
        raise RegistryError(f"{where}: an upstream backend needs url (http...) and model")
    tls = url.startswith("https://")
    ca_file = _file(b["ca_file"], f"{where}.ca_file", base) if "ca_file" in b else None
    verify = _typed(b, "verify", bool, True, where)
    if not tls and (ca_file is not None or "verify" in b):
        raise RegistryError(f"{where}: ca_file and verify apply to https:// upstreams only, and url is {url}")
    if ca_file is not None and not verify:
        raise RegistryError(f"{where}: ca_file with verify = false: choose one")
    interval = _typed(b, "health_interval", float, 2.0, where)
    if interval < 0:
        raise RegistryError(f"{where}.health_interval: must be 0 (no probes) or more")
    paths = {k: _typed(b, k, str, default, where).strip("/") for k, default in _PATHS.items()}
    key = None
    if b.get("api_key_env"):
        key = os.environ.get(b["api_key_env"])
        if key is None:
            raise RegistryError(f"{where}: environment variable {b['api_key_env']} is not set")
    weight = _typed(b, "weight", int, 1, where)
    if weight < 1:
        raise RegistryError(f"{where}: weight must be at least 1")
    return BackendSpec(
        "upstream",
        url=url.rstrip("/"),
        model=str(b["model"]),
        api_key=key,
        weight=weight,
        ca_file=ca_file,
        verify=verify,
        send_model=_typed(b, "send_model", bool, True, where),
        health_interval=interval,
        **paths,
    )


_PATHS = {"chat_path": "chat/completions", "completions_path": "completions", "health_path": "models"}
