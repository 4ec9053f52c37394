"""Image intake: data URIs and URLs under strict limits (real HTTP servers on loopback, allow-listed where a
test needs them), and images passed to a vision upstream as data URIs after the gateway's own checks."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import ipaddress
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image as PILImage

from llamaserve.chat.images import Image, ImageError, ImageLimits, load_image
from tests.conftest import Server, send_json, serve_http, start_server

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
RESOURCES = Path(importlib.util.find_spec("llama_models").origin).parent / "resources"  # type: ignore[arg-type,union-attr]
DOG = (RESOURCES / "dog.jpg").read_bytes()


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    PILImage.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


def rotated_jpeg() -> bytes:
    """A 40×20 JPEG whose EXIF says 'rotate 90°': upright it is 20×40."""
    img = PILImage.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    out = io.BytesIO()
    img.save(out, format="JPEG", exif=exif)
    return out.getvalue()


ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/dog.jpg": (200, {"Content-Type": "image/jpeg"}, DOG),
    "/rotated.jpg": (200, {"Content-Type": "image/jpeg"}, rotated_jpeg()),
    "/text": (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),
    "/truncated.jpg": (200, {"Content-Type": "image/jpeg"}, DOG[: len(DOG) // 3]),
    "/bomb.png": (200, {"Content-Type": "image/png"}, png(10_000, 10_000, "1")),  # 100 Mpx in a few KB
    "/to-dog": (302, {"Location": "/dog.jpg"}, b""),
    "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/loop": (302, {"Location": "/loop"}, b""),
    "/missing": (404, {"Content-Type": "text/plain"}, b"no"),
}


class _Images(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/big":  # chunked, no Content-Length: the reader must stop at the cap by itself
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):
                chunk = b"\0" * 65536
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
            return
        status, headers, body = ROUTES.get(self.path, (404, {}, b""))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    with serve_http(_Images) as url:
        yield url


def load(url: str, **limits: Any) -> Image:
    return asyncio.run(load_image(url, ImageLimits(**{"allow": LOOPBACK, **limits})))


def refused(url: str, code: str, **limits: Any) -> str:
    with pytest.raises(ImageError) as e:
        load(url, **limits)
    assert e.value.code == code, (e.value.code, str(e.value))
    return str(e.value)


# --- what works ------------------------------------------------------------------------------------------------
def test_meta_test_images_decode(images: str) -> None:
    for name in ("dog.jpg", "pasta.jpeg"):
        raw = (RESOURCES / name).read_bytes()
        img = load("data:image/jpeg;base64," + base64.b64encode(raw).decode())
        with PILImage.open(io.BytesIO(raw)) as original:
            assert (img.width, img.height) == original.size
    assert load(f"{images}/dog.jpg").sha256 == load("data:image/jpeg;base64," + base64.b64encode(DOG).decode()).sha256


def test_normalised_rgb_and_upright(images: str) -> None:
    img = load(f"{images}/rotated.jpg")
    assert (img.width, img.height) == (20, 40)  # EXIF orientation applied
    with PILImage.open(io.BytesIO(img.png)) as decoded:
        assert decoded.mode == "RGB" and decoded.format == "PNG"
    assert img.data_uri().startswith("data:image/png;base64,")


def test_redirects_are_followed_within_limits(images: str) -> None:
    assert load(f"{images}/to-dog").sha256 == load(f"{images}/dog.jpg").sha256
    refused(f"{images}/loop", "image_unreachable")


# --- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://localhost:9/x.png",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/x.png",
        "http://[::ffff:127.0.0.1]:9/x.png",
        "http://0.0.0.0/x.png",
    ],
)
def test_private_addresses_are_not_fetched(url: str) -> None:
    message = refused(url, "image_blocked_address", allow=())
    assert "non-public" in message


def test_redirect_to_metadata_is_refused(images: str) -> None:
    refused(f"{images}/to-metadata", "image_blocked_address")


def test_allow_list_is_needed_for_internal_hosts(images: str) -> None:
    refused(f"{images}/dog.jpg", "image_blocked_address", allow=())


@pytest.mark.parametrize(
    ("path", "code", "limits"),
    [
        ("/big", "image_too_large", {"max_bytes": 1_000_000}),
        ("/dog.jpg", "image_too_large", {"max_bytes": 10_000}),  # Content-Length says so: refused before reading
        ("/text", "image_not_an_image", {}),
        ("/truncated.jpg", "image_not_an_image", {}),
        ("/bomb.png", "image_too_large", {}),
        ("/missing", "image_unreachable", {}),
    ],
)
def test_bad_bodies(images: str, path: str, code: str, limits: dict[str, Any]) -> None:
    refused(f"{images}{path}", code, **limits)


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,!!!not-base64!!!", "image_bad_data_uri"),
        ("data:text/plain;base64,aGVsbG8=", "image_bad_data_uri"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "image_not_an_image"),
        ("ftp://example.com/x.png", "image_bad_url"),
        ("file:///etc/passwd", "image_bad_url"),
        ("http://no-such-host.invalid/x.png", "image_unreachable"),
    ],
)
def test_bad_urls(url: str, code: str) -> None:
    refused(url, code)


def test_a_silent_server_is_a_timeout() -> None:
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        refused(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", "image_timeout", timeout=0.5)
    finally:
        listener.close()


# --- through the gateway ----------------------------------------------------------------------------------------
class _Upstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that records what it was sent."""

    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Upstream.received.append(body)
        reply = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "A dog."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1620, "completion_tokens": 3, "total_tokens": 1623},
        }
        send_json(self, 200, reply)

    def do_GET(self) -> None:  # noqa: N802 (health probe)
        send_json(self, 200, {"object": "list", "data": []})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def vision_gateway(images: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A gateway with a vision model and a text-only one, both on the recording upstream."""
    config = tmp_path_factory.mktemp("vision") / "llamaserve.toml"
    with serve_http(_Upstream) as base:
        url = f"{base}/v1"
        config.write_text(
            f'[[models]]\nid = "vision"\ncapabilities = ["vision"]\n'
            f'[[models.backends]]\ntype = "upstream"\nurl = "{url}"\nmodel = "llama-3.2-11b-vision"\n'
            f'[[models]]\nid = "text-only"\ncapabilities = ["tools"]\n'
            f'[[models.backends]]\ntype = "upstream"\nurl = "{url}"\nmodel = "llama-3.1-8b"\n'
        )
        with start_server("--config", str(config), "--image-allow", "127.0.0.1/32") as server:
            yield server


def ask(server: Server, model: str, image_url: str) -> httpx.Response:
    content = [
        {"type": "text", "text": "What's in this image?"},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    return httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 20},
        headers=server.auth,
        timeout=60,
    )


def test_vision_upstream_gets_a_checked_data_uri(vision_gateway: Server, images: str) -> None:
    _Upstream.received.clear()
    r = ask(vision_gateway, "vision", f"{images}/dog.jpg")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "A dog." and r.json()["model"] == "vision"
    [sent] = _Upstream.received
    part = sent["messages"][0]["content"][1]
    assert part["image_url"]["url"].startswith("data:image/png;base64,")  # never the URL the client gave
    decoded = PILImage.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert decoded.size == PILImage.open(io.BytesIO(DOG)).size


@pytest.mark.parametrize(
    ("model", "url", "code"),
    [
        ("text-only", "https://example.com/cat.png", "image_input_not_supported"),
        ("vision", "http://169.254.169.254/latest/meta-data/", "image_blocked_address"),
        ("vision", "http://10.0.0.1/x.png", "image_blocked_address"),
        ("vision", "data:image/png;base64,%%%", "image_bad_data_uri"),
    ],
)
def test_gateway_refusals_name_the_part(vision_gateway: Server, model: str, url: str, code: str) -> None:
    _Upstream.received.clear()
    r = ask(vision_gateway, model, url)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == "messages[0].content[1]", error
    assert _Upstream.received == []  # nothing reached the upstream
    balance = httpx.get(f"{vision_gateway.v1}/account/balance", headers=vision_gateway.auth).json()
    assert balance["open_holds"] == 0
