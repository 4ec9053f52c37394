"""The FastAPI application: routes, error handling, health and metrics, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from llamaserve.api import account, admin, chat, completions, errors, openai
from llamaserve.api.platform import Platform
from llamaserve.api.request_id import RequestIdMiddleware
from llamaserve.backends.local import LocalModel
from llamaserve.billing.bootstrap import open_store, stale_hold_age
from llamaserve.billing.limits import make_limiter
from llamaserve.billing.pricing import Price
from llamaserve.config import PlatformConfig

log = logging.getLogger(__name__)


def _engine_stats(model: LocalModel) -> dict[str, Any]:
    return dataclasses.asdict(model.engine.stats)


def _metrics_text(model: LocalModel) -> str:
    """Prometheus text format: every engine counter and gauge, labelled with the model."""
    lines = []
    for name, value in _engine_stats(model).items():
        kind = "gauge" if name in ("running", "waiting") or name.startswith("max_") else "counter"
        metric = f"llamaserve_engine_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# TYPE {metric} {kind}", f'{metric}{{model="{model.id}"}} {value}']
    return "\n".join(lines) + "\n"


async def _open_platform(config: PlatformConfig) -> Platform:
    store = await open_store(config.url, config.data_dir)
    released = await store.release_stale_holds(stale_hold_age(config.request_timeout))
    if released:
        log.warning("released %d credit holds left open by an earlier process", released)
    return Platform(
        store=store,
        limiter=make_limiter(config.redis_url),
        price=Price.from_credits(config.price_input, config.price_output),
        request_timeout=config.request_timeout,
        admin_key=config.admin_key,
    )


def create_app(model: LocalModel, platform_config: PlatformConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        platform = await _open_platform(platform_config)
        app.state.platform = platform
        model.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            model.close()
            await platform.drain()  # settle what the last requests used before the store closes
            await platform.limiter.close()
            await platform.store.close()

    app = FastAPI(title="llamaserve", version="0.1.0", lifespan=lifespan)
    app.state.model = model
    app.state.started = int(time.time())
    errors.install(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(openai.router)
    app.include_router(account.router)
    app.include_router(admin.router)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok = model.engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": model.id, "engine": _engine_stats(model)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return _metrics_text(model)

    return app
