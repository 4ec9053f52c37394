"""The FastAPI application: routes, error handling, health and metrics, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from llamaserve.api import openapi
from llamaserve.api.openai import batches, chat, completions, files, models
from llamaserve.api.platform import account, admin, dashboard
from llamaserve.api.runtime import errors
from llamaserve.api.runtime.lifecycle import Lifecycle, LifecycleMiddleware
from llamaserve.api.runtime.observe import GatewayMetrics, ObserveMiddleware, StateCollector
from llamaserve.backends.counting import TokenCounter
from llamaserve.backends.local import LocalModel
from llamaserve.backends.upstream import Router, Upstream
from llamaserve.billing.batches import BatchStore
from llamaserve.billing.bootstrap import open_store, stale_hold_age
from llamaserve.billing.idempotency import IdempotencyStore
from llamaserve.billing.limits import make_limiter
from llamaserve.billing.pricing import Price
from llamaserve.chat.images import ImageLimits
from llamaserve.config import PlatformConfig
from llamaserve.registry import Registry
from llamaserve.serving.admission import DEAD_AFTER, Gate, Platform
from llamaserve.serving.batches import BatchRunner
from llamaserve.serving.directory import ModelDirectory
from llamaserve.serving.local import LocalServing
from llamaserve.serving.upstream import UpstreamServing

log = logging.getLogger(__name__)


def _engine_stats(model: LocalModel) -> dict[str, Any]:
    return dataclasses.asdict(model.engine.stats)


async def _readiness(app: FastAPI, model: LocalModel | None) -> dict[str, bool]:
    lifecycle: Lifecycle = app.state.lifecycle
    checks = {"accepting": not lifecycle.draining}
    if model is not None:
        checks["engine"] = model.engine.alive
    platform: Platform | None = app.state.gate.platform
    if platform is not None:
        checks["database"] = await _answers(platform.store.ping())
    for upstream_model in app.state.models.upstreams:
        checks[f"upstream:{upstream_model.id}"] = any(u.available for u in upstream_model.router.upstreams)
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
        limiter=make_limiter(config.redis_url, config.redis_namespace),
        price=Price.from_credits(config.price_input, config.price_output),
        request_timeout=config.request_timeout,
        admin_key=config.admin_key,
        max_concurrent_per_account=config.max_concurrent_per_account,
        stale_after=stale_after,
    )


def _model_directory(
    model: LocalModel | None,
    registry: Registry | None,
    gate: Gate,
    counters: dict[str, TokenCounter],
    image_limits: ImageLimits,
    created: int,
) -> ModelDirectory:
    """Every model served: the local one (under the registry's aliases, at its price) and the registry's upstream
    ones. Upstream sessions need the running event loop."""
    local_spec = next((m for m in registry.models if m.backends[0].type == "local"), None) if registry else None
    local = None
    if model is not None:
        local = LocalServing(model, gate, local_spec.price if local_spec else None, image_limits)
    upstreams = []
    for spec in registry.models if registry else ():
        backends = [Upstream.create(b, spec.timeout) for b in spec.backends if b.type == "upstream"]
        if backends:
            counter = counters.get(spec.id) or TokenCounter()
            upstreams.append(UpstreamServing(spec, Router(backends), counter, gate, image_limits))
    aliases = local_spec.aliases if local_spec else ()
    return ModelDirectory(local, aliases, upstreams, registry, created)


def _batch_runner(
    platform: Platform, config: PlatformConfig, directory: ModelDirectory, model: LocalModel | None
) -> BatchRunner:
    """The runner of batch lines: by default half the local engine's slots (live requests keep the rest)."""
    concurrency = config.batch_concurrency
    if concurrency is None:
        concurrency = max(1, model.config.parallel // 2) if model is not None else 4
    return BatchRunner(
        platform,
        BatchStore(platform.store),
        directory,
        concurrency,
        config.batch_discount,
        config.batch_window,
        config.batch_queued_tokens,
    )


async def _purge_every_minute(keys: IdempotencyStore) -> None:
    """Expired idempotency keys go, with their responses."""
    while True:
        await asyncio.sleep(60)
        try:
            await keys.purge()
        except Exception as e:  # the database out of reach: next time
            log.warning("purging idempotency keys: %s", e)


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        platform = await _open_platform(platform_config) if platform_config else None
        gate = app.state.gate = Gate(platform)
        beating = asyncio.get_running_loop().create_task(platform.keep_alive()) if platform else None
        directory = _model_directory(model, registry, gate, counters or {}, app.state.image_limits, app.state.started)
        app.state.models = directory
        for upstream_model in directory.upstreams:
            upstream_model.router.start_health_checks()
        if model is not None:
            model.start(asyncio.get_running_loop())
        running_batches = purging = None
        if platform is not None and platform_config is not None:
            app.state.batches = _batch_runner(platform, platform_config, directory, model)
            running_batches = asyncio.get_running_loop().create_task(app.state.batches.run())
            lifetime = dt.timedelta(hours=platform_config.idempotency_hours)
            app.state.idempotency = IdempotencyStore(platform.store, lifetime, DEAD_AFTER)
            purging = asyncio.get_running_loop().create_task(_purge_every_minute(app.state.idempotency))
        try:
            yield
        finally:
            if beating is not None:
                beating.cancel()
            if running_batches is not None:
                running_batches.cancel()
                await app.state.batches.stop()
            if purging is not None:
                purging.cancel()
            streams = list(app.state.idempotent_streams)  # keyed streams still generating (clients gone)
            for stream in streams:
                stream.cancel()  # their keys freed: a retry runs afresh
            await asyncio.gather(*streams, return_exceptions=True)
            for upstream_model in directory.upstreams:
                await upstream_model.router.close()
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
    app.state.image_limits = image_limits or ImageLimits()
    app.state.gate = Gate(None)  # until the lifespan opens the platform
    app.state.models = ModelDirectory(None, (), [], None, 0)  # until the lifespan has the models
    app.state.started = int(time.time())
    app.state.idempotency = None  # with a platform: its IdempotencyStore (api/openai/idempotency.py)
    app.state.idempotent_streams = set()  # streams with an Idempotency-Key, consumed by tasks of their own
    errors.install(app, unknown_path=chat.unknown_model_by_path)
    app.state.lifecycle = lifecycle or Lifecycle()
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
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(models.router)
    app.include_router(models.tokenize_router)
    if platform_config is not None:
        app.include_router(account.router)
        app.include_router(admin.router)
        app.include_router(files.router)
        app.include_router(batches.router)
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
