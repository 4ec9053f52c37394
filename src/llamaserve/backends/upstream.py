"""An OpenAI-compatible upstream engine (vLLM, `llamaserve engine`, a hosted provider, ...) and the router that
spreads a model's requests over its upstreams.

The hop is aiohttp: TLS with certificate checks (the system's CAs, or the backend's `ca_file`), HTTPS_PROXY and
NO_PROXY, a keep-alive pool per upstream, a timeout on every wait for bytes, and reading paused while the client
is slower than the upstream.

Failures become the seeds' gateway errors: no connection, a certificate refused, a reset or a 5xx is 502; no
answer within the model's timeout is 504; the upstream's 4xx keep their status and meaning. The router sends each
request to the healthy upstream with the fewest requests in flight (per unit of weight); one that fails three
times in a row is left alone for a while (circuit breaker) and then tried again with a single request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from llamaserve.protocol.errors import APIError
from llamaserve.registry import BackendSpec

log = logging.getLogger(__name__)

BREAKER_FAILURES = 3  # consecutive failures that open the circuit
BREAKER_SECONDS = 10.0  # how long an open circuit keeps requests away
PROBE_TIMEOUTS = 3  # probes in a row that may time out before a busy upstream counts as down
CONNECTIONS = 256  # open connections per upstream at most
# Idle connections close before the server's own keep-alive ends (uvicorn's: 5 s), so a request is never written
# to a connection that the server is closing.
KEEPALIVE_SECONDS = 4.0


class UpstreamFailure(Exception):
    """The upstream could not be reached or broke a reply: the message says how, for the client's 502."""


def tls_context(spec: BackendSpec) -> ssl.SSLContext | bool:
    """aiohttp's `ssl` argument for a backend: a context for its CA file, False when verification is off."""
    if not spec.url.startswith("https://") or (spec.verify and spec.ca_file is None):
        return True  # plain HTTP, or the system's CAs (aiohttp's default context)
    if not spec.verify:
        return False
    return ssl.create_default_context(cafile=spec.ca_file)


def env_proxy(url: str) -> tuple[str | None, dict[str, str]]:
    """The proxy HTTPS_PROXY/HTTP_PROXY name for `url` unless NO_PROXY exempts it, and its credentials as a header.
    Read once: aiohttp's trust_env reads the environment and ~/.netrc on a thread for every request, which cost
    about 1 ms a request (bench/gateway_bench.py)."""
    try:
        proxy, auth = aiohttp.helpers.get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, {}
    return str(proxy), {"Proxy-Authorization": auth.encode()} if auth else {}


def describe(error: BaseException) -> str:
    """What went wrong on the hop, in words for a 502's message (the certificate's problem named)."""
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"presented a certificate that was refused ({error.certificate_error})"
    if isinstance(error, aiohttp.ClientSSLError):
        return f"failed the TLS handshake ({error})"
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return "took no connection in time"
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"is unreachable ({error.os_error.strerror or error.os_error})"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "closed the connection"
    if isinstance(error, aiohttp.ClientPayloadError):
        return f"sent a broken reply ({error})"
    return f"failed ({type(error).__name__}: {error})" if str(error) else f"failed ({type(error).__name__})"


def gateway_error(status: int, what: str, code: str = "bad_gateway") -> APIError:
    """A 502 or 504 saying what the upstream did ("the model's upstream engine <what>")."""
    kind = "timeout" if status == 504 else "bad_gateway"
    return APIError(status, f"the model's upstream engine {what}", type=kind, code=code)


def as_uuid(request_id: str) -> str:
    """A request id (`req_<32 hex>`) as the UUID other engines accept in X-Request-Id (api/request_id.py)."""
    try:
        return str(uuid.UUID(request_id.removeprefix("req_")))
    except ValueError:
        return str(uuid.uuid4())


def is_timeout(error: BaseException) -> bool:
    """A wait for the upstream's bytes ran out (a connection never made is a 502, not this)."""
    return isinstance(error, TimeoutError) and not isinstance(error, aiohttp.ConnectionTimeoutError)


@dataclass
class Upstream:
    spec: BackendSpec
    session: aiohttp.ClientSession
    outstanding: int = 0  # requests sent and not done: Router.open counts them, done() (or the reply's close) ends
    failures: int = 0  # consecutive
    open_until: float = 0.0
    healthy: bool = True  # the probes' verdict
    probe_timeouts: int = 0  # consecutive
    results: Counter[str] = field(default_factory=Counter)  # requests by outcome: HTTP status, or "502"/"504"
    first_byte_seconds: float = 0.0  # summed over the requests that got an answer
    answered: int = 0
    proxy_headers: dict[str, str] | None = None  # the proxy's credentials: for the proxy, not the upstream

    def done(self) -> None:
        self.outstanding -= 1

    @classmethod
    def create(cls, spec: BackendSpec, timeout: float) -> Upstream:
        """The model's timeout bounds each wait for bytes, the time to the first byte included. Needs a running
        event loop (the session's)."""
        if spec.url.startswith("https://") and not spec.verify:
            log.warning("upstream %s: TLS certificates are not verified (verify = false)", spec.url)
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        proxy, proxy_headers = env_proxy(spec.url)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS, ssl=tls_context(spec)
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(5.0, timeout), sock_read=timeout),
            headers=headers,
            proxy=proxy,
            cookie_jar=aiohttp.DummyCookieJar(),  # one gateway, many users: no upstream cookie goes back
            raise_for_status=False,
        )
        return cls(spec, session, proxy_headers=proxy_headers or None)

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.open_until

    async def probe(self) -> None:
        """Active health check: a live upstream answers GET `health_path`. Coming back closes the circuit. A busy
        upstream may answer slowly (llama-cpp-python's server serves /models under its model lock): only
        PROBE_TIMEOUTS timeouts in a row count as down; a refused connection or an error status counts at once."""
        try:
            url = URL(self.spec.endpoint("health"))
            async with self.session.get(url, timeout=self._probe_timeout(), proxy_headers=self.proxy_headers) as reply:
                await reply.read()
                ok = reply.status == 200
            self.probe_timeouts = 0
        except TimeoutError:
            self.probe_timeouts += 1
            ok = self.probe_timeouts < PROBE_TIMEOUTS and self.healthy
        except aiohttp.ClientError:
            ok = False
        if ok and not self.healthy:
            self.failures, self.open_until = 0, 0.0
        self.healthy = ok

    def _probe_timeout(self) -> aiohttp.ClientTimeout:
        seconds = max(2.0, min(self.spec.health_interval, 10.0))
        return aiohttp.ClientTimeout(total=seconds)

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= BREAKER_FAILURES:
            self.open_until = time.monotonic() + BREAKER_SECONDS

    async def open(self, endpoint: str, body: dict[str, Any], stream: bool, request_id: str) -> UpstreamReply:
        """Send the request; returns the reply once its status is 2xx (its body unread when streaming).
        Raises UpstreamError (retryable when the upstream certainly produced nothing)."""
        started = time.monotonic()
        headers = {"Content-Type": "application/json", "X-Request-Id": as_uuid(request_id)}
        try:
            url = URL(self.spec.endpoint(endpoint))
            data = json.dumps(body).encode()
            response = await self.session.post(url, data=data, headers=headers, proxy_headers=self.proxy_headers)
        except (aiohttp.ClientError, TimeoutError) as e:
            if is_timeout(e):
                self.results["504"] += 1
                raise UpstreamError(gateway_error(504, "did not answer in time", "upstream_timeout"), False) from e
            self.results["502"] += 1
            raise UpstreamError(gateway_error(502, describe(e), "bad_gateway"), retryable=True) from e
        self.first_byte_seconds += time.monotonic() - started
        self.answered += 1
        self.results[str(response.status)] += 1
        if response.status >= 400:
            error = await self._from_status(response)
            raise UpstreamError(error, retryable=response.status >= 500)
        reply = UpstreamReply(response)
        if not stream:
            try:
                reply.body = await response.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                if is_timeout(e):
                    raise UpstreamError(gateway_error(504, "did not finish in time", "upstream_timeout"), False) from e
                raise UpstreamError(gateway_error(502, describe(e), "bad_gateway"), False) from e
            finally:
                response.release()
        return reply

    async def _from_status(self, response: aiohttp.ClientResponse) -> APIError:
        try:
            text = (await response.read()).decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError):
            text = ""
        finally:
            response.release()
        message, detail = error_detail(text, response.reason or str(response.status))
        if response.status >= 500:
            return gateway_error(502, f"failed ({response.status}: {message})", "bad_gateway")
        # The upstream's 4xx is the client's fault: pass it on, in our shape.
        return APIError(
            response.status,
            message,
            type=_str(detail.get("type")) or "invalid_request_error",
            param=_str(detail.get("param")),
            code=_str(detail.get("code")),
        )

    async def close(self) -> None:
        await self.session.close()


def error_detail(text: str, fallback: str) -> tuple[str, dict[str, Any]]:
    """An upstream's error body as (a readable message, OpenAI's `error` object if it sent one). Engines differ:
    OpenAI's `{"error": {...}}`, `{"error": "text"}`, FastAPI's `{"detail": ...}`, `{"message": ...}`, plain text
    or HTML."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            return _str(error.get("message")) or text[:500] or fallback, error
        for key in ("error", "detail", "message"):
            if data.get(key):
                value = data[key]
                return (value if isinstance(value, str) else json.dumps(value))[:500], {}
    return " ".join(text.split())[:500] or fallback, {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class UpstreamReply:
    """An upstream's 2xx answer: the whole body (`body`, non-streaming) or its SSE lines (`lines()`)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.body = b""
        self.on_close: Callable[[], None] | None = None  # once, at the first close()

    def json(self) -> Any:
        return json.loads(self.body)

    async def lines(self) -> AsyncIterator[str]:
        """The stream's lines, however long (an echoed prompt with its logprobs is one SSE line). Raises
        UpstreamFailure (or TimeoutError) when the upstream breaks it."""
        pending = b""
        try:
            async for data in self.response.content.iter_any():
                pending += data
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    yield line.rstrip(b"\r").decode(errors="replace")
        except aiohttp.ClientError as e:
            raise UpstreamFailure(describe(e)) from e
        if pending:
            yield pending.decode(errors="replace")

    def close(self) -> None:
        """Back to the pool when the body was read to its end, else the connection closes. Idempotent."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()
        done, self.on_close = self.on_close, None
        if done is not None:
            done()


class UpstreamError(Exception):
    def __init__(self, error: APIError, retryable: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable


class Router:
    """Least outstanding requests per unit of weight, over the upstreams whose circuit is closed."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self._checks: list[asyncio.Task[None]] = []

    def start_health_checks(self) -> None:
        loop = asyncio.get_running_loop()
        self._checks = [
            loop.create_task(self._check_forever(u))
            for u in self.upstreams
            if u.spec.health_path and u.spec.health_interval
        ]

    @staticmethod
    async def _check_forever(upstream: Upstream) -> None:
        while True:
            await upstream.probe()
            await asyncio.sleep(upstream.spec.health_interval)

    def pick(self, exclude: tuple[Upstream, ...] = ()) -> Upstream | None:
        candidates = [u for u in self.upstreams if u not in exclude and u.available]
        if not candidates:  # none looks well: try the one that opened first rather than refuse outright
            candidates = sorted((u for u in self.upstreams if u not in exclude), key=lambda u: u.open_until)[:1]
        return min(candidates, key=lambda u: u.outstanding / u.spec.weight, default=None)

    async def open(
        self, endpoint: str, body: dict[str, Any], stream: bool, request_id: str
    ) -> tuple[Upstream, UpstreamReply]:
        """Send a request to an endpoint (BackendSpec.endpoint) of the best upstream; if that fails before
        producing anything,
        once more: to another upstream, or to the same one when it is the only one (a kept-alive connection
        closed under the request)."""
        tried: tuple[Upstream, ...] = ()
        while True:
            upstream = self.pick(tried) or (tried[0] if len(self.upstreams) == 1 and len(tried) == 1 else None)
            if upstream is None:
                raise APIError(
                    502, "no upstream engine is available for this model", type="bad_gateway", code="bad_gateway"
                )
            tried += (upstream,)
            spec = upstream.spec
            sent = {**body, "model": spec.model} if spec.send_model else {k: v for k, v in body.items() if k != "model"}
            upstream.outstanding += 1
            try:
                response = await upstream.open(endpoint, sent, stream, request_id)
            except UpstreamError as e:
                upstream.done()
                if e.error.status >= 500:
                    upstream.failed()
                if not e.retryable or len(tried) >= 2:
                    raise e.error from e
                continue
            except BaseException:  # cancelled: the request was refused (or its client left) meanwhile
                upstream.done()
                raise
            upstream.succeeded()
            if stream:  # in flight until the stream is closed
                response.on_close = upstream.done
            else:  # its whole body is in
                upstream.done()
            return upstream, response

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        for u in self.upstreams:
            await u.close()
