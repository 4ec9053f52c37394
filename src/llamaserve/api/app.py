"""The FastAPI application: routes, error handling, health and metrics, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from llamaserve.api import chat, completions, errors, openai
from llamaserve.backends.local import LocalModel


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


def create_app(model: LocalModel) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            model.close()

    app = FastAPI(title="llamaserve", version="0.1.0", lifespan=lifespan)
    app.state.model = model
    app.state.started = int(time.time())
    errors.install(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(openai.router)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok = model.engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": model.id, "engine": _engine_stats(model)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return _metrics_text(model)

    return app
