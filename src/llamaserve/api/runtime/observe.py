"""What a request leaves behind for operators: one access-log line when its response has ended, and the
Prometheus metrics of every stage (`/metrics`).

The middleware is pure ASGI and outermost, so refusals before any route (401, 408, 413, 503 while draining) are
logged and counted like the rest, and streams are logged when they end (finished, failed or left by their
client). Per request it adds no await and no query: it reads what the handlers left in the scope's state (the
caller, the admission with model, backend, tokens and first-token time, the error code). Prompts, messages,
bodies, headers and keys are never logged: only the key's public prefix.

Gauges of state (engine, KV cache, holds, upstreams) are read when Prometheus scrapes, not kept up per request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.api.runtime.lifecycle import PROBES
from llamaserve.api.runtime.request_id import forwarded_request_id, new_request_id
from llamaserve.engine.metrics import LATENCY_BUCKETS

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llamaserve.backends.local import LocalModel
    from llamaserve.billing.store import Caller
    from llamaserve.serving.admission import Admission, Call
    from llamaserve.serving.directory import ModelDirectory
    from llamaserve.serving.upstream import UpstreamServing

access_log = logging.getLogger("llamaserve.access")
log = logging.getLogger(__name__)
disable_created_metrics()  # the `_created` series double every counter's samples and no panel reads them

TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE", "HEAD", "OPTIONS"})  # others: "other" (bounded labels)
ENGINE_GAUGES = frozenset({"running", "waiting", "max_batch_sequences", "max_batch_generating"})


class GatewayMetrics:
    """The metrics of one app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._responses = Counter(
            "llamaserve_http_responses",
            "HTTP responses by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self._errors = Counter(
            "llamaserve_http_errors", "Error responses by status and error.code", ["status", "code"], registry=r
        )
        self._duration = Histogram(
            "llamaserve_http_request_duration_seconds",
            "From the request's arrival to the end of its response (a stream's last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        labels = ["model", "backend"]
        self._ttft = Histogram(
            "llamaserve_time_to_first_token_seconds",
            "From the request's arrival at the gateway to its first generated token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._prompt = Histogram(
            "llamaserve_request_prompt_tokens", "Prompt tokens per request", labels, buckets=TOKEN_BUCKETS, registry=r
        )
        self._completion = Histogram(
            "llamaserve_request_completion_tokens",
            "Completion tokens per request",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self._generations = Counter(
            "llamaserve_generations",
            "Generation requests by how they ended: ok, cancelled (client left), error, timeout, rejected",
            [*labels, "outcome"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self._children: dict[tuple[Any, ...], Any] = {}  # labelled children, looked up once (labels() takes a lock)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def response(self, route: str, method: str, status: int, error: str | None, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self._child(self._responses, route, method, str(status)).inc()
        self._child(self._duration, route).observe(seconds)
        if status >= 400:
            self._child(self._errors, str(status), error or "none").inc()

    def generation(self, admission: Admission, ttft: float | None) -> None:
        labels = (admission.model_id, admission.backend or "none")
        if ttft is not None:
            self._child(self._ttft, *labels).observe(ttft)
        if admission.outcome is None:
            return  # not settled (a bug elsewhere): no token counts to report
        self._child(self._generations, *labels, admission.outcome).inc()
        if admission.outcome != "rejected":
            self._child(self._prompt, *labels).observe(admission.prompt_tokens)
            self._child(self._completion, *labels).observe(admission.completion_tokens or 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StateCollector:
    """Gauges and counters read at scrape time from the app's state: the engine's statistics and KV cache,
    credit holds and requests open, each upstream's health, load and answers."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        state = self.app.state
        platform = state.gate.platform
        open_holds = sum(platform.active.values()) if platform is not None else 0
        yield GaugeMetricFamily("llamaserve_holds_open", "Admitted requests whose credit hold is open", open_holds)
        in_flight = state.lifecycle.in_flight
        yield GaugeMetricFamily("llamaserve_requests_in_flight", "HTTP requests being served (probes aside)", in_flight)
        models: ModelDirectory = state.models
        if models.local is not None:
            yield from _engine_metrics(models.local.model)
        if models.upstreams:
            yield from _upstream_metrics(models.upstreams)


def _engine_metrics(model: LocalModel) -> Iterator[Metric]:
    """The engine's counters under their historical names (llamaserve_engine_<stat>_total), and its KV cache."""
    engine, labels = model.engine, [model.id]
    for name, value in dataclasses.asdict(engine.stats).items():
        doc = f"engine statistic {name}"
        family = GaugeMetricFamily if name in ENGINE_GAUGES else CounterMetricFamily
        metric = family(f"llamaserve_engine_{name}", doc, labels=["model"])
        metric.add_metric(labels, value)
        yield metric
    # A slot's cells hold its running sequence, or the prompt it keeps as prefix cache (reusable, evictable).
    kv = zip(
        ("used", "active", "capacity"),
        ("KV cache cells holding tokens", "KV cache cells of running sequences", "KV cache cells in all"),
        engine.kv_cells(),
        strict=True,
    )
    for name, doc, value in kv:
        metric = GaugeMetricFamily(f"llamaserve_engine_kv_cells_{name}", doc, labels=["model"])
        metric.add_metric(labels, value)
        yield metric


def _upstream_metrics(upstream_models: list[UpstreamServing]) -> Iterator[Metric]:
    names = ["model", "backend"]
    in_flight = GaugeMetricFamily("llamaserve_upstream_in_flight", "Requests open on the upstream", labels=names)
    healthy = GaugeMetricFamily("llamaserve_upstream_healthy", "1 if the upstream takes requests", labels=names)
    first_byte = SummaryMetricFamily(
        "llamaserve_upstream_first_byte_seconds", "Time to the upstream's answer (status line)", labels=names
    )
    results = CounterMetricFamily(
        "llamaserve_upstream_requests",
        "Upstream requests by HTTP status (502/504: no answer)",
        labels=[*names, "status"],
    )
    for upstream_model in upstream_models:
        for u in upstream_model.router.upstreams:
            labels = [upstream_model.id, u.spec.url]
            in_flight.add_metric(labels, u.outstanding)
            healthy.add_metric(labels, int(u.available))
            first_byte.add_metric(labels, count_value=u.answered, sum_value=u.first_byte_seconds)
            for status, count in sorted(u.results.items()):
                results.add_metric([*labels, status], count)
    yield from (in_flight, healthy, first_byte, results)


class ObserveMiddleware:
    """Gives every request its id (the `x-request-id` header, `request.state.request_id`), and once its response
    has ended, counts it and writes its access-log line. Pure ASGI (not BaseHTTPMiddleware): it must not buffer or
    delay streamed responses."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, take_forwarded_ids: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.take_forwarded_ids = take_forwarded_ids  # an engine behind a gateway: the gateway's id is the id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = (self.take_forwarded_ids and forwarded_request_id(scope)) or new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status, error = 0, None

        async def send_observed(message: Message) -> None:
            nonlocal status, error
            if message["type"] == "http.response.start":
                if not status:  # the response the client got: a refusal mid-body may be followed by another try
                    status, error = message["status"], state.get("error_code")
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:
            if not status:  # the app's 500 handler answers outside this middleware
                status, error = 500, "internal_error"
            raise
        finally:
            try:
                self._record(scope, state, status, error if status >= 400 else None, started)
            except Exception:  # observing must never fail a request
                log.exception("could not record request %s", request_id)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, error: str | None, started: float) -> None:
        seconds = time.perf_counter() - started
        route = getattr(scope.get("route"), "path", None) or "unmatched"  # the template: bounded labels
        self.metrics.response(route, scope["method"], status, error, seconds)
        call: Call | None = state.get("call")
        admission = call.admission if call is not None else None
        ttft = None
        if admission is not None:
            ttft = admission.first_token_at - started if admission.first_token_at is not None else None
            self.metrics.generation(admission, ttft)
        level = logging.DEBUG if scope["path"] in PROBES else logging.INFO  # scrapes and probes are noise
        if access_log.isEnabledFor(level):
            fields = _fields(scope, state, status, error, seconds, admission, ttft)
            access_log.log(level, "request", extra={"fields": fields})


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _fields(
    scope: Scope,
    state: dict[str, Any],
    status: int,
    error: str | None,
    seconds: float,
    admission: Admission | None,
    ttft: float | None,
) -> dict[str, Any]:
    caller: Caller | None = state.get("caller")
    if caller is not None and caller.key_id == 0:
        caller = None  # `engine` serves everyone as an anonymous caller
    return {
        "request_id": state["request_id"],
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "latency_ms": _ms(seconds),
        "account_id": caller.account_id if caller else None,
        "key_prefix": caller.key_prefix if caller else None,
        "model": admission.model_id if admission else None,
        "backend": admission.backend if admission else None,
        "prompt_tokens": admission.prompt_tokens if admission and admission.outcome else None,
        "completion_tokens": admission.completion_tokens if admission else None,
        "ttft_ms": _ms(ttft),
        "outcome": admission.outcome if admission else None,
        "error": error,
    }
