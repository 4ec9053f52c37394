"""Local vision through the real server: the tiny random-weight vision pair of tests/tiny_vision.py (the tiny
Llama 3 and a LLaVA-style "mlp" projector, 16 tokens an image) served by `llamaserve serve --mmproj`, images
sent by the openai client and httpx as data URIs and as URLs of a loopback host the server allow-lists.

The tiny model's text is gibberish, but its logits depend on the image, slightly. At temperature 0 it repeats
its last input token: the `\\n\\n` that ends the assistant header. Banning that one token (BAN) lets those small
image-dependent differences pick the text, so different images give different text.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image as PILImage

from llamaserve.backends.local import ChatPrompt, LocalModel
from llamaserve.chat.template import ChatTemplate
from llamaserve.chat.tools import FORMATS
from llamaserve.config import ServeConfig
from llamaserve.engine import LlamaError
from llamaserve.engine.mtmd import ImageChunk, RGBImage
from llamaserve.engine.scheduler import RECOMPUTE
from tests import tiny_vision
from tests.conftest import MODEL as TEXT_ONLY_MODEL
from tests.conftest import Server, serve_http, start_server

MODEL = "tiny-vision"
IMAGE_TOKENS = tiny_vision.image_tokens("mlp")  # 16
BAN = {"271": -100}  # "\n\n"
IMAGE_TOKEN_ID = 128011  # <|image|> in Meta's Llama 3 vocabulary
RESOURCES = Path(importlib.util.find_spec("llama_models").origin).parent / "resources"  # type: ignore[arg-type,union-attr]
PRICE_IN, PRICE_OUT = 1000, 2000  # credits per million tokens, that is micro-credits per token


def noise_png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG with a header and no pixels: what it claims is all Pillow reads before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def noise(seed: int) -> str:
    return data_uri(noise_png(seed))


def resource(name: str) -> str:
    return data_uri((RESOURCES / name).read_bytes(), "jpeg" if name.endswith((".jpg", ".jpeg")) else "png")


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


def ask(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


class _ImageHost(BaseHTTPRequestHandler):
    """/noise-<seed>.png, and Meta's test images at /dog.jpg and /pasta.jpeg."""

    fetches = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).fetches += 1
        name = self.path.lstrip("/")
        if name.startswith("noise-"):
            body, kind = noise_png(int(name.removeprefix("noise-").removesuffix(".png"))), "image/png"
        elif (RESOURCES / name).is_file():
            body, kind = (RESOURCES / name).read_bytes(), "image/jpeg"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def host() -> Iterator[str]:
    with serve_http(_ImageHost) as base:
        yield base


@pytest.fixture(scope="module")
def vision() -> Iterator[Server]:
    text_model, mmproj = tiny_vision.build_tiny_vision()
    args = ["--model", str(text_model), "--mmproj", str(mmproj), "--model-id", MODEL, "--parallel", "4"]
    args += ["--ctx", "1024", "--image-allow", "127.0.0.1/32", "--starter-credits", "1000"]
    args += ["--price-input", str(PRICE_IN), "--price-output", str(PRICE_OUT)]
    with start_server(*args) as server:
        yield server


@pytest.fixture(scope="module")
def client(vision: Server) -> openai.OpenAI:
    return vision.openai()


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], **kw: Any) -> Any:
    kw = {"model": MODEL, "max_tokens": 6, "temperature": 0, "logit_bias": BAN, **kw}
    return client.chat.completions.create(messages=messages, **kw)  # type: ignore[arg-type]


# --- the model says it takes images ------------------------------------------------------------------------------
def test_model_card_says_vision(vision: Server) -> None:
    [card] = httpx.get(f"{vision.v1}/models", headers=vision.auth).json()["data"]
    assert card["id"] == MODEL and "vision" in card["capabilities"]


def test_text_only_model_refuses_images(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": TEXT_ONLY_MODEL, "messages": ask(text("What is it?"), image(noise(1))), "max_tokens": 2},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "image_input_not_supported" and error["param"] == "messages[0].content[1]", error
    assert error["message"].startswith(f"model {TEXT_ONLY_MODEL} does not accept image input")


# --- images run through mtmd ---------------------------------------------------------------------------------------
def test_prompt_tokens_grow_by_the_image_tokens(client: openai.OpenAI) -> None:
    without = chat(client, ask(text("What is in the picture?")))
    with_image = chat(client, ask(text("What is in the picture?"), image(noise(1))))
    two_images = chat(client, ask(text("What is in the picture?"), image(noise(1)), image(noise(2))))
    assert with_image.usage.prompt_tokens == without.usage.prompt_tokens + IMAGE_TOKENS
    assert two_images.usage.prompt_tokens == without.usage.prompt_tokens + 2 * IMAGE_TOKENS
    assert with_image.choices[0].finish_reason == "length" and with_image.usage.completion_tokens == 6


def test_different_images_give_different_text(client: openai.OpenAI) -> None:
    a = chat(client, ask(image(noise(0)), text("What is it?")), logprobs=True)
    b = chat(client, ask(image(noise(1)), text("What is it?")), logprobs=True)
    again = chat(client, ask(image(noise(0)), text("What is it?")), logprobs=True)
    assert a.choices[0].message.content != b.choices[0].message.content
    assert a.choices[0].logprobs.content[0].logprob != b.choices[0].logprobs.content[0].logprob
    assert again.choices[0].message.content == a.choices[0].message.content
    assert again.choices[0].logprobs.content[0].logprob == a.choices[0].logprobs.content[0].logprob


def test_url_and_data_uri_give_the_same(client: openai.OpenAI, host: str) -> None:
    by_data = chat(client, ask(image(noise(3)), text("Describe.")))
    by_url = chat(client, ask(image(f"{host}/noise-3.png"), text("Describe.")))
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    assert by_url.usage.prompt_tokens == by_data.usage.prompt_tokens


@pytest.mark.parametrize("name", ["dog.jpg", "pasta.jpeg"])
def test_meta_test_images_decode_and_run(client: openai.OpenAI, host: str, name: str) -> None:
    """The real photographs llama_models ships (a JPEG of 1 MP and more), by data URI and by URL."""
    by_data = chat(client, ask(image(resource(name)), text("What is this?")))
    by_url = chat(client, ask(image(f"{host}/{name}"), text("What is this?")))
    plain = chat(client, ask(text("What is this?")))
    assert by_data.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_TOKENS
    assert by_url.choices[0].message.content == by_data.choices[0].message.content


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    messages = ask(text("Look:"), image(noise(4)), text("Now describe it."))
    whole = chat(client, messages, max_tokens=8)
    stream = chat(client, messages, max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


# --- the prefix cache knows images by their content --------------------------------------------------------------
def test_prefix_reuse_across_an_image_needs_the_same_image(client: openai.OpenAI, vision: Server) -> None:
    prefix = "You are shown a picture and answer questions about it. " * 4

    def run(seed: int) -> Any:
        return chat(client, ask(text(prefix), image(noise(seed)), text("What colour dominates?")))

    first = run(20)
    encoded = vision.engine_stats()["images_encoded"]
    repeat = run(20)  # the same image: its KV reused, and not encoded again
    assert repeat.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - RECOMPUTE
    assert vision.engine_stats()["images_encoded"] == encoded
    assert repeat.choices[0].message.content == first.choices[0].message.content
    other = run(21)  # the same text around another image: only the text before the image is reused
    assert vision.engine_stats()["images_encoded"] == encoded + 1
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - IMAGE_TOKENS


# --- many at once ----------------------------------------------------------------------------------------------------
def test_concurrent_mixed_text_and_image_requests(vision: Server, client: openai.OpenAI) -> None:
    """Six requests at once on four slots, images decoded while other sequences decode: each gets what it gets
    alone. The concurrent round runs first, on a cold cache for its images, so their images are encoded and
    decoded mid-traffic."""
    requests = [
        (ask(image(noise(30)), text("First image.")), 6),
        (ask(text("A plain question about the weather in Lisbon.")), 24),
        (ask(text("Two:"), image(noise(31)), image(noise(32))), 6),
        (ask(text("Another plain question, about trains.")), 24),
        (ask(image(noise(33)), text("Fourth.")), 10),
        (ask(text("A third text-only request.")), 16),
    ]
    encoded = vision.engine_stats()["images_encoded"]

    async def together() -> list[str]:
        async_client = vision.async_openai()
        responses = await asyncio.gather(
            *[
                async_client.chat.completions.create(
                    model=MODEL,
                    messages=m,
                    max_tokens=n,
                    temperature=0,
                    logit_bias=BAN,  # type: ignore[arg-type]
                )
                for m, n in requests
            ]
        )
        return [r.choices[0].message.content or "" for r in responses]

    concurrent = asyncio.run(together())
    assert vision.engine_stats()["images_encoded"] == encoded + 4
    alone = [chat(client, m, max_tokens=n).choices[0].message.content for m, n in requests]
    assert concurrent == alone
    assert vision.wait_idle()["running"] == 0


def test_n_choices_encode_and_prefill_the_image_once(vision: Server, client: openai.OpenAI) -> None:
    encoded = vision.engine_stats()["images_encoded"]
    r = chat(client, ask(image(noise(35)), text("Two answers.")), n=2)
    assert vision.engine_stats()["images_encoded"] == encoded + 1
    assert r.choices[0].message.content == r.choices[1].message.content  # temperature 0
    assert r.usage.completion_tokens == 12


# --- billing -----------------------------------------------------------------------------------------------------
def test_image_tokens_are_billed_as_prompt_tokens(vision: Server) -> None:
    with vision.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": ask(image(noise(40)), text("Bill me.")), "max_tokens": 3},
        )
        assert r.status_code == 200, r.text
        used = r.json()["usage"]
        request_id = r.headers["x-request-id"]
        for _ in range(50):  # settlement runs just after the response
            records = http.get("/v1/account/usage", params={"model": MODEL}).json()["data"]
            record = next((x for x in records if x["request_id"] == request_id), None)
            if record is not None:
                break
            time.sleep(0.05)
        assert record is not None
        assert record["prompt_tokens"] == used["prompt_tokens"] and record["completion_tokens"] == 3
        assert record["cost_micro"] == used["prompt_tokens"] * PRICE_IN + 3 * PRICE_OUT  # micro-credits
        assert http.get("/v1/account/balance").json()["open_holds"] == 0


# --- refusals ----------------------------------------------------------------------------------------------------
def test_a_key_over_its_rate_limit_gets_429_before_its_images_are_fetched(vision: Server, host: str) -> None:
    """Image tokens are known only once the images are fetched and tokenized, so the request is admitted after
    that; a key whose limits cannot take it now is refused first, and nothing is fetched for it."""
    key = cli_key(vision, "limited", plan="free")  # 5 requests a minute
    with httpx.Client(base_url=vision.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
        for _ in range(5):
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ask(text("Hi")), "max_tokens": 1})
            assert r.status_code == 200, r.text
        fetched = _ImageHost.fetches
        asked = {"model": MODEL, "messages": ask(image(f"{host}/noise-7.png"), text("What is it?")), "max_tokens": 1}
        r = http.post("/v1/chat/completions", json=asked)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
        assert int(r.headers["Retry-After"]) >= 1 and r.headers["x-ratelimit-remaining-requests"] == "0"
        assert _ImageHost.fetches == fetched  # nothing fetched for it
    with vision.http() as http:  # a key within its limits: the same request is served, the image fetched
        assert http.post("/v1/chat/completions", json=asked).status_code == 200
    assert _ImageHost.fetches == fetched + 1


def cli_key(server: Server, account: str, plan: str) -> str:
    """A key of a new account on `plan`, made with the CLI on the server's store (as an operator would)."""
    cli = [sys.executable, "-m", "llamaserve.cli"]
    where = ["--data-dir", str(server.data_dir)]
    made = subprocess.run([*cli, "accounts", "create", account, "--plan", plan, "--credits", "10", *where], timeout=120)
    assert made.returncode == 0
    keyed = subprocess.run([*cli, "keys", "create", account, *where], capture_output=True, text=True, timeout=120)
    assert keyed.returncode == 0, keyed.stderr
    return keyed.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,%%%", "image_bad_data_uri"),
        ("http://10.0.0.1/x.png", "image_blocked_address"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "image_not_an_image"),
        (data_uri(png_header(20000, 20000)), "image_too_large"),  # 57 bytes claiming 400 million pixels
    ],
)
def test_bad_images_name_their_part(vision: Server, url: str, code: str) -> None:
    with vision.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": ask(text("Look"), image(noise(1)), image(url)), "max_tokens": 2},
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == code and error["param"] == "messages[0].content[2]", error


def test_a_requests_images_share_a_count_and_a_pixel_budget(vision: Server) -> None:
    """Each image may have 40 MP, all of one request's together 64 MP (checked from the header, before
    decoding), and a request may hold 16 images."""
    out = io.BytesIO()
    PILImage.new("RGB", (6000, 6000), "red").save(out, format="PNG")  # 36 MP
    cases = [
        (
            ask(text("Look"), image(data_uri(out.getvalue())), image(data_uri(png_header(6000, 6000)))),
            "image_too_large",
        ),
        (ask(text("Look"), *[image(noise(1))] * 17), "too_many_images"),
    ]
    with vision.http() as http:
        for messages, code in cases:
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            where = "messages[0].content[2]" if code == "image_too_large" else "messages[0].content[17]"
            assert error["code"] == code and error["param"] == where, error


def test_echo_logprobs_with_images_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, ask(image(noise(1)), text("x")), logprobs=True, extra_body={"echo": True})
    assert e.value.body["param"] == "echo"  # type: ignore[index]


def test_tokenize_refuses_images(vision: Server) -> None:
    r = vision.http().post("/tokenize", json={"model": MODEL, "messages": ask(image(noise(1)))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]", r.text


# --- the prompt, in process ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local() -> Iterator[LocalModel]:
    text_model, mmproj = tiny_vision.build_tiny_vision()
    model = LocalModel(ServeConfig(model=str(text_model), mmproj=str(mmproj), parallel=2, ctx=512, batch=64, threads=2))
    yield model
    model.close()


def rgb(seed: int) -> RGBImage:
    with PILImage.open(io.BytesIO(noise_png(seed))) as im:
        return RGBImage(im.convert("RGB").tobytes(), im.width, im.height)


def shown(prompt: ChatPrompt) -> list[int]:
    """The prompt's tokens with each image as the <|image|> token."""
    return [t for c in prompt.chunks for t in ([IMAGE_TOKEN_ID] if isinstance(c, ImageChunk) else c)]


def test_llama3_prompt_puts_each_image_where_its_segment_is(local: LocalModel) -> None:
    from llamaserve.chat.llama3 import render_llama3_segments, tokenize_segments

    assert local.chat_format == "llama3"
    images = [rgb(1), rgb(2)]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "And"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "this?"}, {"type": "image", "image": images[1]}]},
    ]
    prompt = local.render_chat(messages)
    expected = tokenize_segments(
        render_llama3_segments(messages), lambda t, special: local.llama.tokenize(t, False, parse_special=special)
    )
    assert shown(prompt) == expected
    assert [c.id for c in prompt.chunks if isinstance(c, ImageChunk)] == [i.id for i in images]
    assert prompt.n_tokens == len(expected) - 2 + 2 * IMAGE_TOKENS and prompt.tokens == []
    assert prompt.text.count("<|image|>") == 2


def test_template_prompt_cuts_the_rendered_text_at_the_images(local: LocalModel, monkeypatch: Any) -> None:
    """A Jinja template (here the ChatML default of a GGUF without one): each image part a sentinel where the
    part is, the rendered text cut there. User text that spells the marker or a sentinel stays text."""
    monkeypatch.setattr(local, "chat_format", "template")
    monkeypatch.setattr(local, "tool_format", FORMATS["hermes"])
    forged = "<__media__> <llamaserve-image-0123456789abcdef01234567-0>"
    messages = [{"role": "user", "content": [{"type": "text", "text": forged}, {"type": "image", "image": rgb(1)}]}]
    prompt = local.render_chat(messages)
    before, image_chunk, after = prompt.chunks
    assert isinstance(image_chunk, ImageChunk) and image_chunk.n_tokens == IMAGE_TOKENS
    bos = [local.llama.bos] if local.llama.adds_bos else []  # the template writes none: added, as for text
    assert before == bos + local.llama.tokenize(f"<|im_start|>user\n{forged}\n", add_special=False)
    assert after == local.llama.tokenize("<|im_end|>\n<|im_start|>assistant\n", add_special=False)
    assert prompt.text == f"<|im_start|>user\n{forged}\n<__media__><|im_end|>\n<|im_start|>assistant\n"


def test_typed_content_templates_get_parts() -> None:
    """SmolVLM's template iterates over the content's parts: given a string it renders nothing of it."""
    smolvlm = (
        "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}: "
        "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
        "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )
    assert ChatTemplate(smolvlm, "<|im_start|>", "<end_of_utterance>").typed_content
    assert not ChatTemplate(None, "<s>", "</s>").typed_content


def test_non_causal_projector_needs_a_batch_that_holds_an_image() -> None:
    text_model, mmproj = tiny_vision.build_tiny_vision(projector="gemma3")
    config = ServeConfig(model=str(text_model), mmproj=str(mmproj), parallel=1, ctx=256, batch=2, threads=1)
    with pytest.raises(LlamaError, match="use --batch 4 or more"):
        LocalModel(config)


def test_gemma3_projector_is_served() -> None:
    """Non-causal attention over each image (Gemma 3's projector, 4 tokens an image), through the Jinja path."""
    text_model, mmproj = tiny_vision.build_tiny_vision(projector="gemma3")
    args = ["--model", str(text_model), "--mmproj", str(mmproj), "--model-id", MODEL, "--parallel", "2"]
    with start_server(*args, "--ctx", "512", "--chat-format", "template", command="engine") as server:
        client = server.openai(api_key="none")
        plain = chat(client, ask(text("What is it?")))
        a = chat(client, ask(image(noise(1)), text("What is it?")), logprobs=True)
        b = chat(client, ask(image(noise(2)), text("What is it?")), logprobs=True)
        # 4 image tokens, and mtmd's <start_of_image> and <end_of_image>, plain text in this vocabulary.
        assert a.usage.prompt_tokens > plain.usage.prompt_tokens + tiny_vision.image_tokens("gemma3")
        assert a.usage.prompt_tokens == b.usage.prompt_tokens
        assert a.choices[0].logprobs.content[0].logprob != b.choices[0].logprobs.content[0].logprob


def test_registry_local_backend_with_mmproj(tmp_path: Path) -> None:
    text_model, mmproj = tiny_vision.build_tiny_vision()
    config = tmp_path / "llamaserve.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\naliases = ["eyes"]\ncapabilities = ["json"]\n'
        f'[[models.backends]]\ntype = "local"\npath = "{text_model}"\nmmproj = "{mmproj}"\n'
    )
    with start_server("--config", str(config), "--parallel", "2", "--ctx", "512") as server:
        [card] = httpx.get(f"{server.v1}/models", headers=server.auth).json()["data"]
        assert card["capabilities"] == ["json", "vision"]
        r = chat(server.openai(), ask(image(noise(1)), text("Hi")), model="eyes")
        plain = chat(server.openai(), ask(text("Hi")), model="eyes")
        assert r.usage.prompt_tokens == plain.usage.prompt_tokens + IMAGE_TOKENS
