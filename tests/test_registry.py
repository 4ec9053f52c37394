"""The model registry file: TOML and YAML give the same registry; mistakes are errors that say where."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llamaserve.billing.pricing import Price
from llamaserve.registry import RegistryError, load_registry

TOML = """
[[models]]
id = "meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo"
aliases = ["llama-v3p1-405b-instruct"]
context_length = 131072
price_input = 3.5
price_output = 3.5
capabilities = ["tools", "json"]
timeout = 120

[[models.backends]]
type = "upstream"
url = "http://10.0.0.11:8000/v1/"
model = "meta-llama/Llama-3.1-405B-Instruct-FP8"
weight = 2
"""
YAML = """
models:
  - id: meta-llama/Meta-Llama-3.1-405B-Instruct-Turbo
    aliases: [llama-v3p1-405b-instruct]
    context_length: 131072
    price_input: 3.5
    price_output: 3.5
    capabilities: [tools, json]
    timeout: 120
    backends:
      - type: upstream
        url: http://10.0.0.11:8000/v1/
        model: meta-llama/Llama-3.1-405B-Instruct-FP8
        weight: 2
"""


def test_toml_and_yaml_agree(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(TOML)
    (tmp_path / "r.yaml").write_text(YAML)
    toml, yaml = load_registry(tmp_path / "r.toml"), load_registry(tmp_path / "r.yaml")
    assert toml == yaml
    [model] = toml.models
    assert toml.resolve("llama-v3p1-405b-instruct") is model and toml.resolve(model.id) is model
    assert toml.resolve("other") is None
    assert model.price == Price(3_500_000, 3_500_000) and model.capabilities == {"tools", "json"}
    [backend] = model.backends
    assert backend.url == "http://10.0.0.11:8000/v1" and backend.weight == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [[models]]"),
        ('[[models]]\nid = "a"\n', "at least one"),
        ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "gpu"\n', "type must be"),
        ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "upstream"\nurl = "ftp://x"\nmodel = "m"\n', "url"),
        (
            '[[models]]\nid = "a"\ncapabilities = ["telepathy"]\n[[models.backends]]\ntype = "local"\npath = "x"\n',
            "telepathy",
        ),
        (
            '[[models]]\nid = "a"\n[[models.backends]]\ntype = "upstream"\nurl = "http://x"\nmodel = "m"\n'
            'api_key_env = "LLAMASERVE_TEST_UNSET_VARIABLE"\n',
            "LLAMASERVE_TEST_UNSET_VARIABLE",
        ),
        ('[[models]]\nid = "a"\naliases = ["a"]\n[[models.backends]]\ntype = "local"\npath = "x"\n', "used twice"),
        ("[[models]\n", "r.toml"),
        (
            '[[models]]\nid = "a"\ncapabilities = ["vision"]\n[[models.backends]]\ntype = "local"\npath = "x"\n',
            "capability vision needs mmproj",
        ),
        ('[[models]]\nid = "a"\n[[models.backends]]\ntype = "local"\npath = "x"\nmmproj = ""\n', "mmproj must be"),
    ],
)
def test_mistakes_say_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=re.escape(message)):
        load_registry(path)


def test_a_local_model_with_a_projector_takes_images(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(
        '[[models]]\nid = "v"\ncapabilities = ["tools"]\n'
        '[[models.backends]]\ntype = "local"\npath = "m.gguf"\nmmproj = "mmproj.gguf"\n'
    )
    [model] = load_registry(path).models
    assert model.capabilities == {"tools", "vision"} and model.backends[0].mmproj == "mmproj.gguf"
