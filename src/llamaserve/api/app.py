"""The FastAPI application: routes, error handling, health and metrics, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from llamaserve.api import account, admin, chat, completions, dashboard, errors, openai, openapi
from llamaserve.api.inference import InferenceMiddleware
from llamaserve.api.lifecycle import Lifecycle, LifecycleMiddleware
from llamaserve.api.observe import GatewayMetrics, ObserveMiddleware, StateCollector
from llamaserve.api.platform import Platform
from llamaserve.api.proxy import UpstreamModel
from llamaserve.backends.counting import TokenCounter
from llamaserve.backends.local import LocalModel
from llamaserve.backends.upstream import Router, Upstream
from llamaserve.billing.bootstrap import open_store, stale_hold_age
from llamaserve.billing.limits import make_limiter
from llamaserve.billing.pricing import Price
from llamaserve.chat.images import ImageLimits
from llamaserve.config import PlatformConfig
from llamaserve.registry import Registry

log = logging.getLogger(__name__)


def _engine_stats(model: LocalModel) -> dict[str, Any]:
    return dataclasses.asdict(model.engine.stats)


async def _readiness(app: FastAPI, model: LocalModel | None) -> dict[str, bool]:
    lifecycle: Lifecycle = app.state.lifecycle
    checks = {"accepting": not lifecycle.draining}
    if model is not None:
        checks["engine"] = model.engine.alive
    platform: Platform | None = app.state.platform
    if platform is not None:
        checks["database"] = await _answers(platform.store.ping())
    for model_id, upstream_model in app.state.upstream_models.items():
        checks[f"upstream:{model_id}"] = any(u.available for u in upstream_model.router.upstreams)
    return checks


async def _answers(probe: Awaitable[None], timeout: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(probe, timeout)
        return True
    except Exception:  # any failure to answer is "not ready"; the reason is for the logs, not the probe
        log.warning("readiness: the database did not answer", exc_info=True)
        return False


async def _open_platform(config: PlatformConfig) -> Platform:
    store = await open_store(config.url, config.data_dir)
    await store.heartbeat()  # alive before the first hold: other gateways must not take its holds for orphans
    stale_after = stale_hold_age(config.request_timeout)
    released = await store.release_stale_holds(stale_after)
    if released:
        log.warning("released %d credit holds left open by an earlier process", released)
    return Platform(
        store=store,
        limiter=make_limiter(config.redis_url),
        price=Price.from_credits(config.price_input, config.price_output),
        request_timeout=config.request_timeout,
        admin_key=config.admin_key,
        max_concurrent_per_account=config.max_concurrent_per_account,
        stale_after=stale_after,
    )


def _upstream_models(registry: Registry | None, counters: dict[str, TokenCounter]) -> dict[str, UpstreamModel]:
    models = {}
    for spec in registry.models if registry else ():
        upstreams = [Upstream.create(b, spec.timeout) for b in spec.backends if b.type == "upstream"]
        if upstreams:
            models[spec.id] = UpstreamModel(spec, Router(upstreams), counters.get(spec.id) or TokenCounter())
    return models


def create_app(
    model: LocalModel | None,
    platform_config: PlatformConfig | None,
    registry: Registry | None = None,
    image_limits: ImageLimits | None = None,
    lifecycle: Lifecycle | None = None,
    counters: dict[str, TokenCounter] | None = None,
) -> FastAPI:
    """The API on a local `model` and on the registry's upstream models (`counters`: the token counters of those
    that name a tokenizer); with a platform config, behind accounts, keys, credits and limits (`serve`), without
    one, open to whoever can reach it (`engine`)."""
    local_spec = next((m for m in registry.models if m.backends[0].type == "local"), None) if registry else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        platform = await _open_platform(platform_config) if platform_config else None
        app.state.platform = platform
        beating = asyncio.get_running_loop().create_task(platform.keep_alive()) if platform else None
        app.state.upstream_models = _upstream_models(registry, counters or {})
        for upstream_model in app.state.upstream_models.values():
            upstream_model.router.start_health_checks()
        if model is not None:
            model.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            if beating is not None:
                beating.cancel()
            for upstream in app.state.upstream_models.values():
                await upstream.router.close()
            if model is not None:
                model.close()
            if platform is not None:
                await platform.drain()  # settle what the last requests used before the store closes
                await platform.limiter.close()
                await app.state.dashboard.close()
                await platform.store.close()

    # No Swagger UI or ReDoc pages: FastAPI's load their scripts from a CDN, on the dashboard's origin and offline
    # as well; the OpenAPI document itself is at /openapi.json.
    app = FastAPI(title="llamaserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model = model
    app.state.local_names = {model.id, *(local_spec.aliases if local_spec else ())} if model else set()
    app.state.local_price = local_spec.price if local_spec else None
    app.state.registry = registry
    app.state.image_limits = image_limits or ImageLimits()
    app.state.platform = None
    app.state.upstream_models = {}
    app.state.started = int(time.time())
    errors.install(app, unknown_path=chat.unknown_model_by_path)
    app.state.lifecycle = lifecycle or Lifecycle()
    inference = [chat.route, completions.route, openai.tokenize_route, openai.detokenize_route]
    app.add_middleware(InferenceMiddleware, routes=inference)  # innermost
    app.add_middleware(LifecycleMiddleware, lifecycle=app.state.lifecycle)
    if platform_config is not None and platform_config.cors_origins:
        # Off unless asked: browsers on other origins may not call the API (the dashboard is same-origin).
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(platform_config.cors_origins),
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["x-request-id", "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"],
        )
    metrics = app.state.metrics = GatewayMetrics()
    if model is not None:
        for collector in model.engine.metrics.collectors:
            metrics.registry.register(collector)
    metrics.registry.register(StateCollector(app))
    # Outermost: every response has an id, and is counted and logged, refusals included.
    app.add_middleware(ObserveMiddleware, metrics=metrics, take_forwarded_ids=platform_config is None)
    app.include_router(chat.router)  # declared for the document and other methods; POSTs: InferenceMiddleware
    app.include_router(completions.router)
    app.include_router(openai.router)
    if platform_config is not None:
        app.include_router(account.router)
        app.include_router(admin.router)
        dashboard.install(app, platform_config)  # the web UI at /, and the APIs it calls
    app.include_router(chat.by_path_router)  # POST /v1/{model}: last, so every other /v1 route comes first
    openapi.install(app, accounts=platform_config is not None)  # /openapi.json, true to what the routes do

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        if model is None:
            return JSONResponse({"status": "ok", "model": None, "engine": None})
        ok = model.engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": model.id, "engine": _engine_stats(model)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: whether this replica should get traffic (a load balancer's probe). /health is liveness."""
        checks = await _readiness(request.app, model)
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        """Prometheus text format: every stage's histograms, counters and gauges (docs/observability.md)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
