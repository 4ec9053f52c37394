"""Image inputs: `image_url` parts as base64 data URIs or http(s) URLs, fetched and decoded under strict limits.

Fetching a URL a client names is a server-side request on the client's behalf, so:
- the host name is resolved here and every address checked: no private, loopback, link-local (cloud metadata
  included), multicast or reserved address unless the deployment allow-lists its network;
- the connection goes to the address that was checked (the name is kept for Host and TLS), so a second DNS
  answer cannot swap in another address;
- redirects are followed by hand, a few at most, each target checked the same way;
- the body is streamed and stopped at the size cap; the whole fetch has a time cap;
- the content type must be an image, and Pillow must decode it: the pixel count is checked from the header
  before any decoding (decompression bombs), EXIF orientation applied, colours made RGB.
Every failure is an ImageError with a code; the API turns it into a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import io
import ipaddress
import socket
import warnings
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageError(ValueError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0  # seconds for the whole fetch, redirects included
    max_redirects: int = 3
    max_pixels: int = 40_000_000
    # One request's images together: 12 images of 40 MP each took the server from 0.2 to 2.6 GB.
    max_images: int = 16
    max_request_pixels: int = 64_000_000
    allow: tuple[IPNetwork, ...] = field(default_factory=tuple)  # networks a deployment trusts (internal hosts)


@dataclass(frozen=True)
class Image:
    """A decoded, normalised image (RGB, upright)."""

    rgb: bytes = field(repr=False)  # packed 8-bit RGB rows, width * height * 3 bytes (what a local projector reads)
    width: int
    height: int

    @functools.cached_property
    def sha256(self) -> str:
        """Of the size and pixels: identifies the image (the engine's image ids are this same hash)."""
        digest = hashlib.sha256(f"{self.width}x{self.height}:".encode())
        digest.update(self.rgb)
        return digest.hexdigest()

    @functools.cached_property
    def png(self) -> bytes:
        """PNG-encoded (for upstreams), made on first use: a local model reads the pixels as they are."""
        out = io.BytesIO()
        PILImage.frombytes("RGB", (self.width, self.height), self.rgb).save(out, format="PNG")
        return out.getvalue()

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


class ImageBudget:
    """What one request's images may add up to: a count, and a total of pixels checked from each image's header
    before it is decoded."""

    def __init__(self, limits: ImageLimits) -> None:
        self.limits = limits
        self.pixels_left = limits.max_request_pixels

    async def load(self, url: str) -> Image:
        image = await load_image(url, self.limits, self.pixels_left)
        self.pixels_left -= image.width * image.height
        return image


async def load_image(url: str, limits: ImageLimits, pixels_left: int | None = None) -> Image:
    """The image at `url` (http(s) or a data URI), decoded; at most `pixels_left` pixels (a request's budget)."""
    if url.startswith("data:"):
        raw = _from_data_uri(url, limits)
    elif urlsplit(url).scheme in ("http", "https"):
        try:
            raw = await asyncio.wait_for(_fetch(url, limits), limits.timeout)
        except TimeoutError as e:
            raise ImageError(f"fetching the image took longer than {limits.timeout:g}s", "image_timeout") from e
    else:
        raise ImageError("image_url must be an http(s) URL or a data:image/...;base64 URI", "image_bad_url")
    # Decoding a large image takes a while: off the event loop.
    return await asyncio.to_thread(_decode, raw, limits, limits.max_pixels if pixels_left is None else pixels_left)


def _from_data_uri(url: str, limits: ImageLimits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError("a data URI image must look like data:image/<type>;base64,<data>", "image_bad_data_uri")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise ImageError(f"the image is larger than {limits.max_bytes} bytes", "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError("the data URI's base64 is invalid", "image_bad_data_uri") from e


# --- fetching ------------------------------------------------------------------------------------------------
def _blocked(address: IPAddress, allow: tuple[IPNetwork, ...]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allow):
        return False
    return not address.is_global or address.is_multicast or address.is_reserved or address.is_unspecified


async def _checked_address(host: str, port: int, limits: ImageLimits) -> str:
    """Resolve `host`; every address must be allowed (a name with one private address is refused)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ImageError(f"the image host {host!r} does not resolve", "image_unreachable") from e
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if _blocked(address, limits.allow):
            raise ImageError(
                f"the image URL points to a non-public address ({address}); it is not fetched", "image_blocked_address"
            )
    return str(addresses[0])


async def _fetch(url: str, limits: ImageLimits) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, timeout=limits.timeout, trust_env=False) as client:
        for _ in range(limits.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ImageError("the image URL (or a redirect) is not http(s)", "image_bad_url")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await _checked_address(parts.hostname, port, limits)
            pinned = parts._replace(netloc=f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
            request = client.build_request(
                "GET",
                pinned.geturl(),
                headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"},
                extensions={"sni_hostname": parts.hostname},
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.HTTPError as e:
                raise ImageError(f"the image URL is unreachable ({type(e).__name__})", "image_unreachable") from e
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                return await _body(response, limits)
            finally:
                await response.aclose()
        raise ImageError(f"the image URL redirects more than {limits.max_redirects} times", "image_unreachable")


async def _body(response: httpx.Response, limits: ImageLimits) -> bytes:
    if response.status_code != 200:
        raise ImageError(f"the image URL answered {response.status_code}", "image_unreachable")
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        raise ImageError(f"the URL is not an image (content type {kind or 'missing'})", "image_not_an_image")
    if int(response.headers.get("content-length") or 0) > limits.max_bytes:
        raise ImageError(f"the image is larger than {limits.max_bytes} bytes", "image_too_large")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limits.max_bytes:  # a lying or absent Content-Length: stop at the cap
            raise ImageError(f"the image is larger than {limits.max_bytes} bytes", "image_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# --- decoding ------------------------------------------------------------------------------------------------
def _decode(raw: bytes, limits: ImageLimits, pixels_left: int) -> Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns about huge images when opening them; here that is a refusal, not a warning.
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            img = PILImage.open(io.BytesIO(raw))
    except (PILImage.DecompressionBombWarning, PILImage.DecompressionBombError) as e:
        raise ImageError(f"the image has too many pixels ({e})", "image_too_large") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"the image cannot be decoded ({e})", "image_not_an_image") from e
    try:
        with img:
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"the image has {width}×{height} pixels; at most {limits.max_pixels} are accepted",
                    "image_too_large",
                )
            if width * height > pixels_left:
                raise ImageError(
                    f"the image has {width}×{height} pixels, more than the {max(pixels_left, 0)} left of the "
                    f"{limits.max_request_pixels} one request's images may have together",
                    "image_too_large",
                )
            img.load()
            upright = ImageOps.exif_transpose(img).convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise ImageError(f"the image cannot be decoded ({e})", "image_not_an_image") from e
    return Image(upright.tobytes(), upright.width, upright.height)
