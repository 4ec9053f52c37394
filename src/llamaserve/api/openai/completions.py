"""POST /v1/completions: OpenAI's legacy text completions, on whichever backend serves the model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from llamaserve.api.openai.calls import call_of, models_of
from llamaserve.api.openai.idempotency import idempotent
from llamaserve.api.openai.inference import InferenceRoute
from llamaserve.api.platform.keys import CallerDep
from llamaserve.protocol.completions import Completion, CompletionRequest

router = APIRouter(route_class=InferenceRoute)


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, caller: CallerDep) -> Any:
    serving = models_of(request).resolve(body.model, caller)
    call = call_of(request, caller)
    return await idempotent(request, call, lambda: serving.completion(body, call))
