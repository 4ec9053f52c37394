"""An OpenAI-compatible upstream engine (vLLM, `llamaserve engine`, ...) and the router that spreads a model's
requests over its upstreams.

Failures become the seeds' gateway errors: no connection, a reset or a 5xx is 502; no answer within the
model's timeout is 504; the upstream's 4xx keep their meaning. The router sends each request to the healthy
upstream with the fewest requests in flight (per unit of weight); one that fails three times in a row is left
alone for a while (circuit breaker) and then tried again with a single request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llamaserve.backends.http1 import ConnectionFailed, Http1Client, Reply
from llamaserve.protocol.errors import APIError
from llamaserve.registry import BackendSpec

BREAKER_FAILURES = 3  # consecutive failures that open the circuit
BREAKER_SECONDS = 10.0  # how long an open circuit keeps requests away
HEALTH_INTERVAL = 2.0  # seconds between probes of each upstream (GET /models)


@dataclass
class Upstream:
    spec: BackendSpec
    client: Http1Client
    outstanding: int = 0
    failures: int = 0  # consecutive
    open_until: float = 0.0
    healthy: bool = True  # the last probe's verdict
    results: Counter[str] = field(default_factory=Counter)  # requests by outcome: HTTP status, or "502"/"504"
    first_byte_seconds: float = 0.0  # summed over the requests that got an answer
    answered: int = 0

    @classmethod
    def create(cls, spec: BackendSpec, timeout: float) -> Upstream:
        """The model's timeout bounds each wait for bytes, the time to the first byte included."""
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        return cls(spec, Http1Client(spec.url, headers, connect_timeout=min(5.0, timeout), read_timeout=timeout))

    @property
    def available(self) -> bool:
        return self.healthy and time.monotonic() >= self.open_until

    async def probe(self) -> None:
        """Active health check: a live upstream answers GET /models. Coming back closes the circuit."""
        try:
            async with asyncio.timeout(min(2.0, HEALTH_INTERVAL)):
                reply = await self.client.request("GET", "models")
                try:
                    ok = reply.status == 200
                    await reply.read()
                finally:
                    reply.release()
        except (ConnectionFailed, TimeoutError):
            ok = False
        if ok and not self.healthy:
            self.failures, self.open_until = 0, 0.0
        self.healthy = ok

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        if self.failures >= BREAKER_FAILURES:
            self.open_until = time.monotonic() + BREAKER_SECONDS

    async def open(self, path: str, body: dict[str, Any], stream: bool, request_id: str) -> UpstreamReply:
        """Send the request; returns the reply once its status is 2xx (its body unread when streaming).
        Raises UpstreamError (retryable when the upstream certainly produced nothing)."""
        started = time.monotonic()
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        try:
            response = await self.client.request("POST", path, json.dumps(body).encode(), headers)
        except TimeoutError as e:
            self.results["504"] += 1
            raise UpstreamError(self._error(504, "did not answer in time", "upstream_timeout"), retryable=False) from e
        except ConnectionFailed as e:
            self.results["502"] += 1
            raise UpstreamError(self._error(502, f"is unreachable ({e})", "bad_gateway"), True) from e
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
            except TimeoutError as e:
                raise UpstreamError(self._error(504, "did not finish in time", "upstream_timeout"), False) from e
            except ConnectionFailed as e:
                raise UpstreamError(self._error(502, "broke the connection", "bad_gateway"), False) from e
            finally:
                response.release()
        return reply

    def _error(self, status: int, what: str, code: str) -> APIError:
        kind = "timeout" if status == 504 else "bad_gateway"
        return APIError(status, f"the model's upstream engine {what}", type=kind, code=code)

    async def _from_status(self, response: Reply) -> APIError:
        try:
            text = (await response.read()).decode(errors="replace")
        except (ConnectionFailed, TimeoutError):
            text = ""
        finally:
            response.release()
        try:
            detail = json.loads(text).get("error") or {}
        except (ValueError, AttributeError):
            detail = {}
        message = detail.get("message") or text[:200] or response.reason or str(response.status)
        if response.status >= 500:
            return self._error(502, f"failed ({response.status}: {message})", "bad_gateway")
        # The upstream's 4xx is the client's fault: pass it on, in our shape.
        return APIError(
            response.status,
            str(message),
            type=detail.get("type") or "invalid_request_error",
            param=detail.get("param"),
            code=detail.get("code"),
        )


class UpstreamReply:
    """An upstream's 2xx answer: the whole body (`body`, non-streaming) or its SSE lines (`lines()`)."""

    def __init__(self, response: Reply) -> None:
        self.response = response
        self.body = b""

    def json(self) -> Any:
        return json.loads(self.body)

    async def lines(self) -> AsyncIterator[str]:
        """The stream's lines, however long (an echoed prompt with its logprobs is one SSE line)."""
        pending = b""
        async for data in self.response.chunks():
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.decode()

    def close(self) -> None:
        self.response.release()  # back to the pool when the body was read to its end, else the connection closes


class UpstreamError(Exception):
    def __init__(self, error: APIError, retryable: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable


class Router:
    """Least outstanding requests per unit of weight, over the upstreams whose circuit is closed."""

    def __init__(self, upstreams: list[Upstream]) -> None:
        self.upstreams = upstreams
        self._checks: asyncio.Task[None] | None = None

    def start_health_checks(self) -> None:
        self._checks = asyncio.get_running_loop().create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await asyncio.gather(*(u.probe() for u in self.upstreams))
            await asyncio.sleep(HEALTH_INTERVAL)

    def pick(self, exclude: tuple[Upstream, ...] = ()) -> Upstream | None:
        candidates = [u for u in self.upstreams if u not in exclude and u.available]
        if not candidates:  # none looks well: try the one that opened first rather than refuse outright
            candidates = sorted((u for u in self.upstreams if u not in exclude), key=lambda u: u.open_until)[:1]
        return min(candidates, key=lambda u: u.outstanding / u.spec.weight, default=None)

    async def open(
        self, path: str, body: dict[str, Any], stream: bool, request_id: str
    ) -> tuple[Upstream, UpstreamReply]:
        """Send to the best upstream; if it fails before producing anything, once more to another."""
        tried: tuple[Upstream, ...] = ()
        while True:
            upstream = self.pick(tried)
            if upstream is None:
                raise APIError(
                    502, "no upstream engine is available for this model", type="bad_gateway", code="bad_gateway"
                )
            tried += (upstream,)
            upstream.outstanding += 1
            try:
                response = await upstream.open(path, {**body, "model": upstream.spec.model}, stream, request_id)
            except UpstreamError as e:
                upstream.outstanding -= 1
                if e.error.status >= 500:
                    upstream.failed()
                if not e.retryable or len(tried) >= 2:
                    raise e.error from e
                continue
            except BaseException:  # cancelled: the request was refused (or its client left) meanwhile
                upstream.outstanding -= 1
                raise
            upstream.succeeded()
            return upstream, response

    async def close(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
        for u in self.upstreams:
            await u.client.close()
