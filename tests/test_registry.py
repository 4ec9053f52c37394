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


UPSTREAM = '[[models]]\nid = "a"\n[[models.backends]]\ntype = "upstream"\nurl = "https://x/v1"\nmodel = "m"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nport = 1\n[[models]]\nid = "a"\n', "r.toml: unknown key 'server'"),
        ('[[models]]\nid = "a"\npricee = 1\n', "models[0]: unknown key 'pricee'"),
        (UPSTREAM + 'ca_flie = "ca.pem"\n', "models[0].backends[0]: unknown key 'ca_flie'"),
        (UPSTREAM + 'ca_file = "nowhere.pem"\n', "models[0].backends[0].ca_file: no such file"),
        (UPSTREAM.replace("https", "http") + 'ca_file = "r.toml"\n', "https:// upstreams only"),
        (UPSTREAM.replace("https", "http") + "verify = false\n", "https:// upstreams only"),
        (UPSTREAM + 'ca_file = "r.toml"\nverify = false\n', "choose one"),
        (UPSTREAM + 'verify = "no"\n', "verify: must be true or false"),
        (UPSTREAM + "health_interval = -1\n", "health_interval: must be 0"),
        (UPSTREAM + "weight = 1.5\n", "weight: must be a whole number"),
        (UPSTREAM.replace('id = "a"\n', 'id = "a"\nchat_format = "llama3"\n'), "chat_format: goes with a tokenizer"),
        (UPSTREAM.replace('id = "a"\n', 'id = "a"\ntokenizer = "none.gguf"\n'), "models[0].tokenizer: no such file"),
        (
            UPSTREAM.replace('id = "a"\n', 'id = "a"\ntokenizer = "r.toml"\nchat_format = "chatml"\n'),
            "chat_format: must be one of llama3, template",
        ),
    ],
)
def test_unknown_keys_and_bad_upstream_options_say_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=re.escape(message)):
        load_registry(path)


def test_upstream_options(tmp_path: Path) -> None:
    """Paths relative to the registry's folder; endpoints relative to url; defaults as documented."""
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "vocab.gguf").write_text("")
    path = tmp_path / "r.toml"
    path.write_text(
        UPSTREAM.replace('id = "a"\n', 'id = "a"\ntokenizer = "vocab.gguf"\nchat_format = "llama3"\n')
        + 'ca_file = "ca.pem"\nchat_path = "/llama-v3p1-405b-instruct"\nsend_model = false\nhealth_path = ""\n'
        + '[[models.backends]]\ntype = "upstream"\nurl = "https://y/v1"\nmodel = "m"\nverify = false\n'
    )
    [model] = load_registry(path).models
    assert model.tokenizer == str(tmp_path / "vocab.gguf") and model.chat_format == "llama3"
    first, second = model.backends
    assert first.ca_file == str(tmp_path / "ca.pem") and first.verify and not first.send_model
    assert (
        first.endpoint("chat") == "https://x/v1/llama-v3p1-405b-instruct"
        and first.endpoint("health") == "https://x/v1/"
    )
    assert first.health_path == "" and first.health_interval == 2.0
    assert second.endpoint("chat") == "https://y/v1/chat/completions" and second.endpoint("completions") == (
        "https://y/v1/completions"
    )
    assert second.endpoint("tokenize") == "https://y/tokenize" and not second.verify and second.send_model
